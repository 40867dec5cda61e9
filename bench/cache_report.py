#!/usr/bin/env python3
"""Turns the raw outputs of one bench/cache.sh run into its Markdown report (on stdout).

usage: bench/cache_report.py .local/bench/cache-raw-<timestamp>

Reads meta.json and, per concurrency c and round r, health-c<c>-r<r>, warm-c<c>-r<r>,
nocache-c<c>-r<r>, norl-c<c>-r<r>: <name>.json (orderd-bench --json) and <name>.cpu (clock
ticks of the loaded orderd, of PostgreSQL, of Redis and of the machine, and Redis's INFO
counters, before and after). A cell's figures are those of its median round (by calls/s);
its CPU per call is over all its rounds; min-max shows the spread between rounds.
"""
import os

import benchlib
from benchlib import errs

RAW, META, CLK, CONCS = benchlib.open_run()
ROUNDS = int(META.get("rounds", 1))
CELLS = ["health", "warm", "nocache", "norl"]
TITLE = {
    "health": "bare round trip (Health/Check)",
    "warm": "GetOrder, cache warm",
    "nocache": "GetOrder, cache disabled",
    "norl": "GetOrder, cache warm, ratelimit.enabled=false",
}


KEYS = ("orderd", "pg", "redis", "machine", "redis_cmds", "redis_hits", "redis_misses", "time")


def cell(name):
    """The median round of a cell, with "per" (CPU per call over all rounds), "spread"
    (min and max calls/s) and "errors_total"/"errors" summed over the rounds."""
    runs = []
    for r in range(1, ROUNDS + 1):
        j = benchlib.load_json(RAW, "%s-r%d.json" % (name, r))
        if j is not None:
            runs.append((j, benchlib.load_kv(RAW, "%s-r%d.cpu" % (name, r))))
    if not runs:
        return None
    runs.sort(key=lambda jc: jc[0]["throughput"])
    j = dict(runs[len(runs) // 2][0])
    j["spread"] = (runs[0][0]["throughput"], runs[-1][0]["throughput"])
    j["rounds"] = len(runs)
    errors = {}
    for rj, _ in runs:
        for k, v in (rj.get("errors") or {}).items():
            errors[k] = errors.get(k, 0) + v
    j["errors"] = errors
    j["errors_total"] = sum(rj.get("errors_total", 0) for rj, _ in runs)
    j["per"] = None
    done = [(rj, cpu) for rj, cpu in runs if "after_time" in cpu and "before_time" in cpu]
    calls = sum(rj.get("checked", 0) for rj, _ in done)  # warm-up and drain included
    if calls:
        d = {k: sum(cpu["after_" + k] - cpu["before_" + k] for _, cpu in done) for k in KEYS}
        client = sum(rj.get("client_cpu_s", 0.0) for rj, _ in done)
        other = max(0.0, d["machine"] / CLK - client - (d["orderd"] + d["pg"] + d["redis"]) / CLK)
        j["per"] = {
            "client_us": 1e6 * client / calls,
            "orderd_us": 1e6 * d["orderd"] / CLK / calls,
            "redis_us": 1e6 * d["redis"] / CLK / calls,
            "pg_us": 1e6 * d["pg"] / CLK / calls,
            "redis_cmds": d["redis_cmds"] / calls,
            "redis_misses": d["redis_misses"] / calls,
            "other_pct": 100.0 * other / (d["time"] * META["cores"]) if d["time"] > 0 else 0.0,
        }
    return j


def thr(j):
    return "?" if not j else "%.0f" % j["throughput"]


def thr_spread(j):
    if not j:
        return "?"
    if j["rounds"] < 2:
        return thr(j)
    return "%.0f (%.0f-%.0f)" % (j["throughput"], j["spread"][0], j["spread"][1])


def lat(j):
    if not j:
        return "?"
    return "%.2f / %.2f" % (j["latency_ms"]["p50"], j["latency_ms"]["p99"])


def ratio(a, b):
    return "-" if not a or not b else "%.2f" % (a["throughput"] / b["throughput"])


cells = {c: {n: cell("%s-c%s" % (n, c)) for n in CELLS} for c in CONCS}

print("# GetOrder through the Redis cache: warm vs disabled vs a bare round trip\n")
print("%s, %s cores (%s); Redis %s, PostgreSQL %s; commit %s%s; %s." % (
    META["date"], META["cores"], META["cpu"], META["redis"], META["postgres"], META["commit"],
    " (dirty tree)" if META["dirty"] == "yes" else "", META["raw"]))
print("Each cell: %d rounds of orderd-bench, %s measured after %s of warm-up, the order "
      "of the cells rotating from round to round; the median round is shown, (min-max) "
      "across rounds. Closed loop, every response checked; %s orders read round robin; "
      "orderd workers %s; rate limits on at %s (never refusing) except in the last "
      "column.\n" % (ROUNDS, META["duration"], META["warmup"], META["orders"],
                     META["workers"], META["limits"]))

print("## Throughput (calls/s) and the ratios\n")
print("| concurrency | bare (health) | GetOrder warm | GetOrder cache off | warm / cache off "
      "| warm / bare | GetOrder warm, no rate limits | warm / no rate limits |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|")
for c in CONCS:
    x = cells[c]
    print("| %s | %s | %s | %s | **%s** | **%s** | %s | %s |" % (
        c, thr_spread(x["health"]), thr_spread(x["warm"]), thr_spread(x["nocache"]),
        ratio(x["warm"], x["nocache"]), ratio(x["warm"], x["health"]), thr_spread(x["norl"]),
        ratio(x["warm"], x["norl"])))

print("\n## Latency p50 / p99 (ms), median round\n")
print("| concurrency | " + " | ".join(TITLE[n] for n in CELLS) + " |")
print("|---:|" + "---:|" * len(CELLS))
for c in CONCS:
    print("| %s | %s |" % (c, " | ".join(lat(cells[c][n]) for n in CELLS)))

print("\n## Where the CPU goes (µs per call, all rounds) and Redis commands per call\n")
print("client = orderd-bench; other % = CPU of processes outside the benchmark (over ~10 %: "
      "the run was disturbed). Redis cmds/call counts the commands Lua scripts run inside "
      "Redis too (not round trips); misses/call counts reads of absent keys (the cache's "
      "epoch key before any outage, for one), not only cache misses.\n")
print("| concurrency | cell | client | orderd | Redis | PostgreSQL | Redis cmds/call "
      "| Redis misses/call | other % |")
print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
for c in CONCS:
    for n in CELLS:
        j = cells[c][n]
        p = j and j["per"]
        if not p:
            print("| %s | %s | ? | ? | ? | ? | ? | ? | ? |" % (c, n))
            continue
        print("| %s | %s | %.0f | %.0f | %.0f | %.0f | %.2f | %.3f | %.1f |" % (
            c, n, p["client_us"], p["orderd_us"], p["redis_us"], p["pg_us"], p["redis_cmds"],
            p["redis_misses"], p["other_pct"]))

print("\n## Errors (every call checked, warm-up and drain included, all rounds)\n")
print("| concurrency | " + " | ".join(CELLS) + " |")
print("|---:|" + "---|" * len(CELLS))
for c in CONCS:
    print("| %s | %s |" % (c, " | ".join(errs(cells[c][n]) for n in CELLS)))

warn = os.path.join(RAW, "warnings.txt")
if os.path.exists(warn) and os.path.getsize(warn) > 0:
    lines = open(warn).read().splitlines()
    print("\n**orderd logged %d warnings/errors during the run** (first: `%s`): a Redis "
          "fallback makes a cell something else than its title." % (len(lines), lines[0][:200]))
print("\nLoad average before / after: %s / %s." % (META["load_before"], META["load_after"]))
