#!/usr/bin/env python3
"""Turns the raw outputs of one bench/run.sh run into its Markdown report (on stdout).

usage: bench/report.py .local/bench/raw-<timestamp>

Reads meta.json and, per concurrency c: health-c<c>.json, get-c<c>.json, place-c<c>.json
(orderd-bench --json), pg-get-c<c>.pgbench, pg-place-c<c>.pgbench (pgbench output), and the
<name>.cpu counters bench/run.sh took around each run (clock ticks of orderd, of the
PostgreSQL server and of the whole machine).
"""
import os
import re

import benchlib
from benchlib import errs

RAW, META, CLK, CONCS = benchlib.open_run()


def path(name):
    return os.path.join(RAW, name)


def load_cpu(name):
    return benchlib.load_kv(RAW, name, (OSError,))


def load_pgbench(name):
    try:
        text = open(path(name)).read()
    except OSError:
        return None

    def num(pattern):
        m = re.search(pattern, text, re.M)
        return float(m.group(1)) if m else None

    return {
        "tps": num(r"^tps = ([0-9.]+)"),
        "lat": num(r"^latency average = ([0-9.]+) ms"),
        "tx": num(r"^number of transactions actually processed: ([0-9]+)"),
        "failed": num(r"^number of failed transactions: ([0-9]+)"),
    }


def cpu_figures(cpu, client_s, units):
    """CPU seconds of client, orderd, PostgreSQL, others over the run, and µs per unit."""
    if "after_time" not in cpu or "before_time" not in cpu:
        return None
    wall = cpu["after_time"] - cpu["before_time"]
    orderd = (cpu["after_orderd"] - cpu["before_orderd"]) / CLK
    pg = (cpu["after_pg"] - cpu["before_pg"]) / CLK
    machine = (cpu["after_machine"] - cpu["before_machine"]) / CLK
    other = max(0.0, machine - client_s - orderd - pg)
    per = (lambda s: 1e6 * s / units) if units else (lambda s: float("nan"))
    return {
        "wall": wall,
        "client_us": per(client_s),
        "orderd_us": per(orderd),
        "pg_us": per(pg),
        "busy_pct": 100.0 * machine / (wall * META["cores"]) if wall > 0 else float("nan"),
        "other_pct": 100.0 * other / (wall * META["cores"]) if wall > 0 else float("nan"),
    }


def orderd_cell(name):
    j = benchlib.load_json(RAW, name + ".json")
    if j is None:
        return None
    calls = j.get("checked", 0) + j.get("preload_calls", 0)
    j["cpu"] = cpu_figures(load_cpu(name + ".cpu"), j.get("client_cpu_s", 0.0), calls)
    return j


def pgbench_cell(name):
    p = load_pgbench(name + ".pgbench")
    if p is None:
        return None
    cpu = load_cpu(name + ".cpu")
    p["cpu"] = cpu_figures(cpu, cpu.get("client_ticks", 0.0) / CLK, p["tx"] or 0)
    return p


def f0(v):
    return "?" if v is None else "%.0f" % v


def f2(v):
    return "?" if v is None else "%.2f" % v


def ratio(a, b):
    return "-" if not a or not b else "%.2f" % (a / b)


def lat(j):
    if not j:
        return "?"
    return "%s / %s" % (f2(j["latency_ms"]["p50"]), f2(j["latency_ms"]["p99"]))


def cpu3(c, keys):
    if not c or not c["cpu"]:
        return "?"
    return " / ".join("%.0f" % c["cpu"][k] for k in keys)


cells = {}
for c in CONCS:
    cells[c] = {
        "health": orderd_cell("health-c%s" % c),
        "get": orderd_cell("get-c%s" % c),
        "place": orderd_cell("place-c%s" % c),
        "pg_get": pgbench_cell("pg-get-c%s" % c),
        "pg_place": pgbench_cell("pg-place-c%s" % c),
    }

m = META
out = []
w = out.append
w("# orderd benchmark, %s" % m["date"])
w("")
w("- machine: %d cores (%s), %s GiB; orderd-bench, orderd and PostgreSQL (and pgbench) share it;"
  " load average before/after: %s / %s" % (m["cores"], m["cpu"], m["mem_gib"], m["load_before"], m["load_after"]))
w("- orderd %s%s, Release build, %s workers, log level warn; libgrpc-dev %s; PostgreSQL %s (%s, fsync %s), database %s made fresh"
  % (m["commit"], " + uncommitted changes" if m["dirty"] == "yes" else "", m["workers"], m["grpc"], m["postgres"],
     "the private stack" if m["use_stack"] else m["pg"], m["fsync"], m["db"]))
w("- every cell: %s measured after %s of warm-up (orderd-bench: closed loop, connections %s, %d client thread(s));"
  " pgbench: -T %d -j %d -n -M prepared, no warm-up; GetOrder reads %d orders round robin (pgbench: at random)"
  % (m["duration"], m["warmup"], "min(concurrency, 8)" if m["connections"] == "auto" else m["connections"],
     m["threads"], m["duration_s"], m["pgbench_jobs"], m["orders"]))
w("")
w("## Throughput")
w("")
w("| conc | PlaceOrder calls/s | p50 / p99 ms | pgbench place tps | avg ms | **orderd / pgbench** "
  "| GetOrder calls/s | p50 / p99 ms | pgbench get tps | avg ms | **orderd / pgbench** | health calls/s | p50 / p99 ms |")
w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for c in CONCS:
    x = cells[c]
    pl, gt, hl, pp, pg = x["place"], x["get"], x["health"], x["pg_place"], x["pg_get"]
    w("| %s | %s | %s | %s | %s | **%s** | %s | %s | %s | %s | **%s** | %s | %s |" % (
        c,
        f0(pl and pl["throughput"]), lat(pl), f0(pp and pp["tps"]), f2(pp and pp["lat"]),
        ratio(pl and pl["throughput"], pp and pp["tps"]),
        f0(gt and gt["throughput"]), lat(gt), f0(pg and pg["tps"]), f2(pg and pg["lat"]),
        ratio(gt and gt["throughput"], pg and pg["tps"]),
        f0(hl and hl["throughput"]), lat(hl)))
w("")
w("orderd latencies are per call at the client (p99.9 and max are in the raw JSON); pgbench's are the"
  " average of one script: 4 transactions for place, 1 for get.")
w("")
w("## Where the CPU goes")
w("")
w("CPU microseconds per call (orderd rows: per RPC, warm-up included) or per"
  " script (pgbench rows), by process; busy = the whole machine (interrupt time left out), other = processes that are not part"
  " of the benchmark (if that is more than a few %, the run was disturbed).")
w("")
w("| conc | PlaceOrder µs: client / orderd / PG | pgbench place µs: pgbench / PG | GetOrder µs: client / orderd / PG "
  "| pgbench get µs: pgbench / PG | health µs: client / orderd | busy % (max) | other % (max) |")
w("|---:|---:|---:|---:|---:|---:|---:|---:|")
worst_other = 0.0
disturbed = []
for c in CONCS:
    x = cells[c]
    busy = [v["cpu"]["busy_pct"] for v in x.values() if v and v.get("cpu")]
    other = [v["cpu"]["other_pct"] for v in x.values() if v and v.get("cpu")]
    worst_other = max([worst_other] + other)
    if other and max(other) > 10:
        disturbed.append(c)
    w("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
        c,
        cpu3(x["place"], ("client_us", "orderd_us", "pg_us")),
        cpu3(x["pg_place"], ("client_us", "pg_us")),
        cpu3(x["get"], ("client_us", "orderd_us", "pg_us")),
        cpu3(x["pg_get"], ("client_us", "pg_us")),
        cpu3(x["health"], ("client_us", "orderd_us")),
        "%.0f" % max(busy) if busy else "?",
        "%.0f" % max(other) if other else "?"))
w("")
if disturbed:
    w("**Warning: up to %.0f %% of the machine went to other processes during the rows of concurrency %s:"
      " those figures are disturbed; rerun them on a quiet machine before comparing.**"
      % (worst_other, ", ".join(disturbed)))
    w("")
w("## Errors")
w("")
w("Every response's grpc-status was checked (warm-up and drain included), then the message decoded and checked.")
w("")
for c in CONCS:
    x = cells[c]
    w("- c=%s: health %s, GetOrder %s, PlaceOrder %s; pgbench failed transactions: get %s, place %s" % (
        c, errs(x["health"]), errs(x["get"]), errs(x["place"]),
        f0(x["pg_get"] and x["pg_get"]["failed"]), f0(x["pg_place"] and x["pg_place"]["failed"])))
if m["logcost_c"]:
    c = m["logcost_c"]
    warn, info = cells[c]["get"], orderd_cell("get-c%s-info" % c)
    w("")
    w("## Per-request logging")
    w("")
    if warn and info:
        w("GetOrder at concurrency %s, log level warn vs info (one JSON access-log line per call, to a file):"
          " %s vs %s calls/s (info/warn = %s), p99 %s vs %s ms, orderd CPU %s vs %s µs per call; errors %s."
          % (c, f0(warn["throughput"]), f0(info["throughput"]), ratio(info["throughput"], warn["throughput"]),
             f2(warn["latency_ms"]["p99"]), f2(info["latency_ms"]["p99"]),
             f0(warn["cpu"] and warn["cpu"]["orderd_us"]), f0(info["cpu"] and info["cpu"]["orderd_us"]),
             errs(info)))
    else:
        w("(no result)")
w("")
w("Raw outputs: %s/" % m["raw"])
print("\n".join(out))
