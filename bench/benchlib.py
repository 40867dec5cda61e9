"""Helpers shared by bench/report.py and bench/cache_report.py (imported from bench/)."""
import json
import os
import sys


def open_run():
    """The raw directory named on the command line, its meta.json, the clock ticks per second
    and the concurrencies: (raw, meta, clk, concs)."""
    raw = sys.argv[1]
    meta = json.load(open(os.path.join(raw, "meta.json")))
    return raw, meta, float(meta["clk_tck"]), meta["concurrency"].split()


def load_json(raw, name):
    """The last line of an orderd-bench --json output, parsed (None if missing or bad)."""
    try:
        with open(os.path.join(raw, name)) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def load_kv(raw, name, tolerate=(OSError, ValueError)):
    """The key=number lines of a file (the .cpu counters) as a dict of floats; {} or what was
    read so far when it is missing (or, with ValueError in tolerate, holds a bad number)."""
    out = {}
    try:
        with open(os.path.join(raw, name)) as f:
            for line in f:
                k, _, v = line.strip().partition("=")
                if v:
                    out[k] = float(v)
    except tolerate:
        pass
    return out


def errs(j):
    """A cell's errors: "0", "CODE=n ...", or "no result"."""
    if j is None:
        return "no result"
    if not j.get("errors_total"):
        return "0"
    return " ".join("%s=%d" % kv for kv in j["errors"].items())
