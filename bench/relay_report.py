#!/usr/bin/env python3
"""Prints the markdown report of a bench/relay.sh run from its raw directory:
    bench/relay_report.py .local/bench/relay-raw-<stamp>
Inputs (written by bench/relay.sh): meta.json; per lag level C: lag-cC.json (orderd-bench),
lag-cC.cpu, lag-cC.pgdb, lag-cC.window.json, lag-cC.sql.json, lag-cC.metrics, and the
relay-off reference off-cC.json, off-cC.cpu, off-cC.pgdb; per batch B: drain-bB.sql.json,
drain-bB.meta.json, drain-bB.cpu, drain-bB.pgdb, drain-bB.metrics, drain-bB.plan.txt,
base-bB.json, base-bB.cpu (and stale-bB.* for the stale-statistics drains); the orderd-*.log,
warnings.txt, top-before.txt, top-after.txt. See bench/README.md ("bench/relay.sh")."""
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import errs, load_json, load_kv  # noqa: E402


def load_obj(raw, name):
    """A JSON object file (psql's one line, or the script's), None if missing or bad."""
    try:
        with open(os.path.join(raw, name)) as f:
            text = f.read().strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def load_metrics(raw, name):
    out = {}
    try:
        with open(os.path.join(raw, name)) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2:
                    out[parts[0]] = float(parts[1])
    except (OSError, ValueError):
        pass
    return out


def fmt(v, digits=0, dash="–"):
    if v is None:
        return dash
    if digits == 0:
        return "{:,.0f}".format(v).replace(",", " ")
    return "%.*f" % (digits, v)


def ms(v):
    if v is None:
        return "–"
    return "%.1f" % v if v < 100 else "%.0f" % v


def plan_summary(raw, name):
    """(execution ms, the plan node that probes `outbox p`) of an EXPLAIN ANALYZE output."""
    try:
        with open(os.path.join(raw, name)) as f:
            text = f.read()
    except OSError:
        return None, None
    m = re.search(r"Execution Time: ([0-9.]+) ms", text)
    inner = None
    for line in text.splitlines():
        if " on outbox p" in line:
            node = re.sub(r"\s*\(actual.*", "", line.strip().lstrip("->").strip())
            node = node.replace(" on outbox p", "")
            r = re.search(r"rows=(\d+) loops=(\d+)", line)
            inner = "%s%s" % (node, ": %s rows read × %s candidates" % r.groups() if r else "")
            break
    return (float(m.group(1)) if m else None), inner


def count_lines(raw, name, needle):
    try:
        with open(os.path.join(raw, name)) as f:
            return sum(1 for line in f if needle in line)
    except OSError:
        return 0


def load_pgdb(raw, name):
    """Ticks of the PostgreSQL backends of the benchmark's database between the before and
    after readings of a .pgdb file: every backend alive at the end, minus what it had at
    the start (0 if it started since). None when there is no complete reading."""
    seen = {"before": {}, "after": {}}
    try:
        with open(os.path.join(raw, name)) as f:
            for line in f:
                p = line.split()
                if len(p) == 3 and p[0] in seen:
                    seen[p[0]][p[1]] = float(p[2])
    except (OSError, ValueError):
        return None
    if not seen["after"]:
        return None
    return sum(max(0.0, t - seen["before"].get(pid, 0.0)) for pid, t in seen["after"].items())


class Cpu:
    """CPU seconds per process between the before/after readings of one .cpu file (pgdb:
    the backends of the benchmark's database, from the .pgdb file next to it)."""

    def __init__(self, raw, name, clk, cores):
        kv = load_kv(raw, name + ".cpu")
        self.kv, self.clk, self.cores = kv, clk, cores
        self.dt = kv.get("after_time", 0) - kv.get("before_time", 0)
        ticks = load_pgdb(raw, name + ".pgdb")
        self.kv["before_pgdb"], self.kv["after_pgdb"] = 0.0, ticks or 0.0

    def ok(self):
        return self.dt > 0 and "after_machine" in self.kv

    def s(self, what):
        return (self.kv.get("after_" + what, 0) - self.kv.get("before_" + what, 0)) / self.clk

    def pct(self, seconds):
        return 100.0 * seconds / self.dt if self.dt > 0 else None

    def busy(self):
        return self.pct(self.s("machine")) / self.cores if self.ok() else None

    def other(self, known):
        if not self.ok():
            return None
        return max(0.0, self.pct(self.s("machine") - known) / self.cores)


def top_lines(raw, name):
    """The processes of a `top` reading that used 3 % of a core or more."""
    out = []
    try:
        with open(os.path.join(raw, name)) as f:
            for line in f:
                p = line.split()
                if len(p) >= 12 and p[0].isdigit():
                    try:
                        cpu = float(p[8])
                    except ValueError:
                        continue
                    if cpu >= 3:
                        out.append("%s (%s) %.0f %%" % (p[11], p[0], cpu))
    except OSError:
        pass
    return ", ".join(out) if out else "nothing above 3 % of a core"


def main():
    raw = sys.argv[1]
    meta = json.load(open(os.path.join(raw, "meta.json")))
    clk, cores = float(meta["clk_tck"]), int(meta["cores"])
    concs = meta["concurrency"].split()
    batches = meta["batches"].split()
    problems = []
    p = print

    p("# orderd outbox relay benchmark, %s" % meta["date"])
    p()
    p("- machine: %d cores (%s), %s GiB, **shared**: orderd-bench, orderd, PostgreSQL and "
      "RabbitMQ (and amqp-baseline) all run on these cores, next to whatever else ran "
      "(below); load average before/after: %s / %s"
      % (cores, meta["cpu"], meta["mem_gib"], meta["load_before"], meta["load_after"]))
    p("- other processes using CPU when the run started: %s; when it ended: %s"
      % (top_lines(raw, "top-before.txt"), top_lines(raw, "top-after.txt")))
    p("- orderd %s%s, Release build, %s workers, log level warn, cache and rate limits off; "
      "PostgreSQL %s (the private stack, fsync off), database made fresh; RabbitMQ %s "
      "(%s, %s), rabbitmq-c %s; exchange `%s`, durable classic queues %s, purged before "
      "every cell"
      % (meta["commit"], " + uncommitted changes" if meta["dirty"] == "yes" else "",
         meta["workers"], meta["postgres"], meta["rabbitmq"], meta["amqp"], meta["rmq_note"],
         meta["librabbitmq"], meta["exchange"], meta["queues"]))
    p("- **one run, one sample** of each figure: compare within the run, not across runs")
    p()

    # ---- 1. lag ----
    p("## 1. Lag from commit to broker ack at a steady PlaceOrder load")
    p()
    p("orderd with the relay on (relay_batch 100), `orderd-bench --method place` for %s after "
      "%s of warm-up per level (closed loop; each PlaceOrder writes 2 events). Lag = "
      "`published_at - created_at` of every event created in the window (created_at: the "
      "trigger's clock_timestamp() in the order's transaction, before its commit; "
      "published_at: the relay's mark-sent statement after the broker's ack)."
      % (meta["duration"], meta["warmup"]))
    p()
    p("| conc | PlaceOrder calls/s | p50 / p99 ms | events created/s | **events published/s** "
      "| **lag p50 / p90 / p99 ms** | lag max ms | events per relay round | backlog at end "
      "(max in window) | CPU % of a core: orderd / PG / broker / client | busy % | other % |")
    p("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lag_errors, cost_rows = [], []
    for c in concs:
        j = load_json(raw, "lag-c%s.json" % c)
        s = load_obj(raw, "lag-c%s.sql.json" % c) or {}
        w = load_obj(raw, "lag-c%s.window.json" % c) or {}
        cpu = Cpu(raw, "lag-c%s" % c, clk, cores)
        dur = (w.get("we", 0) - w.get("ws", 0)) or None
        lag = s.get("lag_ms") or {}
        rounds = s.get("rounds") or 0
        cpus = "–"
        busy = other = None
        if cpu.ok():
            client = (j or {}).get("client_cpu_s", 0.0)
            o, g, r = cpu.s("orderd"), cpu.s("pgdb"), cpu.s("rmq")
            cpus = " / ".join(fmt(cpu.pct(x)) for x in (o, g, r, client))
            busy, other = cpu.busy(), cpu.other(o + g + r + client)
        drained = None
        if s.get("drained_at") and w.get("we"):
            drained = max(0.0, s["drained_at"] - w["we"])
        p("| %s | %s | %s / %s | %s | **%s** | **%s / %s / %s** | %s | %s | %s (%s) | %s | %s | %s |" % (
            c,
            fmt(j and j.get("throughput")),
            ms(j and j["latency_ms"]["p50"]), ms(j and j["latency_ms"]["p99"]),
            fmt(s.get("created", 0) / dur if dur else None),
            fmt(s.get("published", 0) / dur if dur else None),
            ms(lag.get("p50")), ms(lag.get("p90")), ms(lag.get("p99")), ms(lag.get("max")),
            fmt(s["published"] / rounds, 1) if rounds else "–",
            fmt(s.get("backlog_end")), fmt(s.get("backlog_max")),
            cpus, fmt(busy), fmt(other)))
        met = load_metrics(raw, "lag-c%s.metrics" % c)
        lost = count_lines(raw, "orderd-lag-c%s.log" % c, "rabbitmq connection lost")
        lag_errors.append("c=%s: PlaceOrder errors: relay on %s, relay off %s; broker connection "
                          "lost %d time(s); events created %s, "
                          "still unpublished %s, published more than once %s, backlog drained %s s "
                          "after the window; relay counters: published %s, nacked %s, unroutable "
                          "%s, confirm timeouts %s, reconnects %s"
                          % (c, errs(j), errs(load_json(raw, "off-c%s.json" % c)), lost,
                             fmt(s.get("created")), fmt(s.get("unpublished")),
                             fmt(s.get("retried")), fmt(drained, 2),
                             fmt(met.get("orderd_outbox_published_total")),
                             fmt(met.get("orderd_outbox_nacked_total")),
                             fmt(met.get("orderd_outbox_unroutable_total")),
                             fmt(met.get("orderd_outbox_confirm_timeouts_total")),
                             fmt(met.get('orderd_amqp_reconnects_total{connection="relay"}'))))
        if j is None or j.get("errors_total") or s.get("unpublished") or s.get("retried") or lost \
                or met.get("orderd_outbox_nacked_total") or met.get("orderd_outbox_unroutable_total") \
                or met.get("orderd_outbox_confirm_timeouts_total"):
            problems.append("lag c=%s: see Errors" % c)
        created_per_s = s.get("created", 0) / dur if dur else 0
        if (s.get("backlog_end") or 0) > max(100, created_per_s / 2):
            problems.append("the relay did not keep up at c=%s: %s events unsent at the window's end "
                            "(%s published/s for %s created/s), drained %s s after the load stopped"
                            % (c, fmt(s.get("backlog_end")), fmt(s.get("published", 0) / dur),
                               fmt(created_per_s), fmt(drained, 1)))
        # what the relay costs the write path: the same cell with the relay off
        off = load_json(raw, "off-c%s.json" % c)
        ocpu = Cpu(raw, "off-c%s" % c, clk, cores)
        if off and off.get("errors_total"):
            problems.append("relay-off c=%s: PlaceOrder errors" % c)

        def per_call(cp, jj, what):
            if not cp.ok() or not jj or not jj.get("checked"):
                return None
            return 1e6 * cp.s(what) / jj["checked"]
        cost_rows.append("| %s | %s / %s | %s / %s | %s / %s | %s / %s | %s / %s | %s / %s |" % (
            c, fmt(off and off.get("throughput")), fmt(j and j.get("throughput")),
            ms(off and off["latency_ms"]["p50"]), ms(j and j["latency_ms"]["p50"]),
            ms(off and off["latency_ms"]["p99"]), ms(j and j["latency_ms"]["p99"]),
            fmt(per_call(ocpu, off, "orderd")), fmt(per_call(cpu, j, "orderd")),
            fmt(per_call(ocpu, off, "pgdb")), fmt(per_call(cpu, j, "pgdb")),
            fmt(ocpu.busy()), fmt(cpu.busy())))
    p()
    p("Events per relay round: the events marked sent by one mark-sent transaction (one claim, "
      "one publish + confirm wait) during the window: how much batching the load gives the relay. "
      "Backlog: unpublished events at the window's end and the most at any moment in it (exact, "
      "from the timestamps). CPU %% of one core over the cell (warm-up included): PG = the "
      "backends of the benchmark's database only (the stack's server also serves other sessions; "
      "its WAL writer, checkpointer and background writer are left out, and land in other); "
      "busy = the whole machine (of %d cores); other = processes outside the benchmark." % cores)
    p()
    p("What the relay costs the write path: the same PlaceOrder cell just before, through an "
      "orderd with the relay off (its events then marked sent without being published: never seen by a relay).")
    p()
    p("| conc | PlaceOrder calls/s relay off / on | p50 ms off / on | p99 ms off / on | orderd CPU µs "
      "per call off / on | PG CPU µs per call off / on | busy % off / on |")
    p("|---:|---:|---:|---:|---:|---:|---:|")
    for row in cost_rows:
        p(row)
    p()
    p("CPU per call = the cell's CPU (warm-up included) / every call it made; with the relay on "
      "it includes the relay's work for that call's 2 events (claim, publish, mark sent).")
    p()

    # ---- 2. drain ----
    p("## 2. Drain rate: the relay alone, next to the bare broker work")
    p()
    p("Per cell: %s orders placed through an orderd with the relay off (an outbox backlog of "
      "twice as many events), then an orderd with the relay on (`ORDERD_AMQP_RELAY_BATCH`) and "
      "no RPC load, until every row is published. **relay events/s** = events after the first "
      "round / time from the first round's mark to the last's (startup and the first round left "
      "out); **baseline msg/s** = `amqp-baseline` right after the drain: as many messages, the "
      "outbox's bodies, the relay's properties, persistent + mandatory, same exchange and queues, "
      "same batch size, publish the batch then wait for all its confirms, no PostgreSQL, likewise "
      "counted after its first batch. Statistics: *fresh* = the outbox was `VACUUM ANALYZE`d "
      "with the backlog in it; *stale* = analyzed before the backlog was written (autovacuum off "
      "for the table meanwhile), so the planner believes no row is unsent: what a production "
      "outbox looks like after an outage, since a backlog is far below autovacuum's 10 %% of a "
      "table that keeps %s of sent rows." % (fmt(meta["relay_orders"]), "7 days"))
    p()
    cells = [("drain-b%s" % b, b, "fresh") for b in batches]
    cells += [("stale-b%s" % b, b, "stale") for b in meta.get("stale_batches", "").split()]
    p("| batch | statistics | events | relay rounds | **relay events/s** | ms per round | from "
      "orderd start to drained | **baseline msg/s** | ms per batch | **relay / baseline** | "
      "PostgreSQL ms per round (difference) |")
    p("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    drain_notes, cpu_rows = [], []
    for name, b, stats in cells:
        s = load_obj(raw, name + ".sql.json") or {}
        m = load_obj(raw, name + ".meta.json") or {}
        base = load_json(raw, "base-b%s.json" % b) or {}
        cpu = Cpu(raw, name, clk, cores)
        bcpu = Cpu(raw, "base-b%s" % b, clk, cores)
        met = load_metrics(raw, name + ".metrics")
        rows, rounds = s.get("rows") or 0, s.get("rounds") or 0
        rate = per_round = total = None
        if rounds > 1 and s.get("last_mark") and s.get("first_mark"):
            span = s["last_mark"] - s["first_mark"]
            if span > 0:
                rate = (rows - s["first_round_rows"]) / span
                per_round = 1000.0 * span / (rounds - 1)
        if s.get("last_mark") and cpu.kv.get("before_time"):
            total = s["last_mark"] - cpu.kv["before_time"]
        brate = base.get("steady_rate")
        per_batch = None
        if base.get("batches", 0) > 1:
            per_batch = 1000.0 * base["steady_s"] / (base["batches"] - 1)
        ratio = rate / brate if rate and brate else None
        pgms = per_round - per_batch if per_round is not None and per_batch is not None else None
        p("| %s | %s | %s | %s | **%s** | %s | %s s (%s events/s) | **%s** | %s | **%s** | %s |" % (
            b, stats, fmt(rows), fmt(rounds), fmt(rate), fmt(per_round, 2),
            fmt(total, 2), fmt(rows / total if total else None),
            fmt(brate), fmt(per_batch, 2), fmt(ratio, 2), fmt(pgms, 2)))
        cpus = bcpus = "–"
        oth = ["–", "–"]
        if cpu.ok() and rows:
            o, g, r = cpu.s("orderd"), cpu.s("pgdb"), cpu.s("rmq")
            cpus = " / ".join(fmt(1e6 * x / rows) for x in (o, g, r))
            oth[0] = fmt(cpu.other(o + g + r))
        if stats == "fresh" and bcpu.ok() and base.get("messages"):
            t, r = base.get("cpu_s", 0.0), bcpu.s("rmq")
            bcpus = " / ".join(fmt(1e6 * x / base["messages"]) for x in (t, r))
            oth[1] = fmt(bcpu.other(t + r))
        claim_ms, inner = plan_summary(raw, name + ".plan.txt")
        cpu_rows.append("| %s | %s | %s | %s | %s | %s | %s |" % (
            b, stats, ms(claim_ms), inner or "–", cpus, bcpus, " / ".join(oth)))
        lost = count_lines(raw, "orderd-%s.log" % name, "rabbitmq connection lost")
        drain_notes.append(
            "batch %s, %s statistics: backlog %s events (mean body %s bytes; baseline %s bytes), "
            "still unpublished %s, published more than once %s, largest round %s rows, first round "
            "%s rows%s; relay counters: published %s, nacked %s, unroutable %s, confirm timeouts %s; "
            "broker connection lost %d time(s); %squeues after the drain: %s"
            % (b, stats, fmt(m.get("backlog")), fmt(s.get("body_bytes_mean")),
               fmt(base.get("body_bytes_mean")), fmt(s.get("unpublished")), fmt(s.get("retried")),
               fmt(s.get("round_rows_max")), fmt(s.get("first_round_rows")),
               ", **STUCK: not drained within the timeout**" if m.get("stuck") else "",
               fmt(met.get("orderd_outbox_published_total")),
               fmt(met.get("orderd_outbox_nacked_total")),
               fmt(met.get("orderd_outbox_unroutable_total")),
               fmt(met.get("orderd_outbox_confirm_timeouts_total")), lost,
               "baseline: acked %s, nacked %s, returned %s, unconfirmed %s; "
               % (fmt(base.get("acked")), fmt(base.get("nacked")), fmt(base.get("returned")),
                  fmt(base.get("unconfirmed"))) if stats == "fresh" else "",
               (m.get("queues") or "?").strip()))
        if (m.get("stuck") or s.get("unpublished") or s.get("retried") or lost
                or (stats == "fresh" and (not base or base.get("nacked") or base.get("returned")
                                          or base.get("unconfirmed")))
                or met.get("orderd_outbox_nacked_total") or met.get("orderd_outbox_unroutable_total")
                or met.get("orderd_outbox_confirm_timeouts_total")):
            problems.append("drain batch %s (%s statistics): see Errors" % (b, stats))
    p()
    p("A relay round is one claim transaction, the batch published, every confirm awaited, one "
      "mark-sent transaction (rows marked together share that transaction's xmin, which is how "
      "rounds are counted). The baseline does the middle part only, so **relay / baseline** is "
      "the share of the bare broker rate the relay keeps, and ms per round minus ms per batch "
      "is, roughly, what the PostgreSQL side of a round (claim, mark sent) costs. \"From orderd "
      "start\" includes orderd's start, the broker connection and the first round. A stale row "
      "is compared with the fresh baseline of its batch size.")
    p()
    p("Where it goes: one claim of a full batch at the full backlog, run under `EXPLAIN ANALYZE` "
      "(rolled back) just before the drain, with the plan PostgreSQL chose for the "
      "`NOT EXISTS` (an earlier unsent event of the same order and family) of every candidate "
      "row; CPU per event over the whole drain.")
    p()
    p("| batch | statistics | one claim, ms | the NOT EXISTS probe (per candidate row) | CPU µs "
      "per event: orderd / PG / broker | baseline µs per msg: tool / broker | other % (drain / "
      "baseline) |")
    p("|---:|---|---:|---|---:|---:|---:|")
    for row in cpu_rows:
        p(row)
    p()
    p("CPU per event of orderd includes its start; PG = the backends of the benchmark's database.")
    p()

    # ---- errors ----
    p("## Errors and warnings")
    p()
    for line in lag_errors + drain_notes:
        p("- " + line)
    try:
        with open(os.path.join(raw, "warnings.txt")) as f:
            warn = [line.rstrip("\n") for line in f if line.strip()]
    except OSError:
        warn = []
    forced = sum(1 for line in warn if "CONNECTION_FORCED" in line)
    if forced:
        p("- **the broker closed orderd's connections %d time(s) (CONNECTION_FORCED)**: this "
          "benchmark never does that; another session on the shared broker did (its tests close "
          "all connections or restart the broker). The cells where it happened are disturbed." % forced)
        problems.append("the shared broker dropped connections during the run (another session)")
    if warn:
        p("- orderd logged %d warning(s) or error(s), the first ones:" % len(warn))
        p()
        p("```")
        for line in warn[:15]:
            p(line[:400])
        p("```")
        problems.append("orderd logged warnings")
    else:
        p("- orderd logged no warning and no error")
    p()
    p("**Verdict:** %s" % ("; ".join(problems) if problems else
                           "no failed call, every event published exactly once, no stuck backlog"))
    p()
    p("Raw outputs: %s/ (`bench/relay_report.py %s` prints this again)" % (meta["raw"], meta["raw"]))


if __name__ == "__main__":
    main()
