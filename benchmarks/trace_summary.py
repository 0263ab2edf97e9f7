"""Where a profiled decode step spends device time: kernels, collectives, idle gaps.

Reads the ``perfetto_trace.json.gz`` that ``jax.profiler.trace(...,
create_perfetto_trace=True)`` writes and, for every device process in it
(``/device:GPU:n``, ``/device:TPU:n``), reports per step:

* ``kernel_ms``: the sum of the device's op durations;
* ``busy_ms``: the union of those intervals (overlapping streams counted once);
* ``collective_ms``: ops whose name says NCCL / all-reduce / all-gather /
  reduce-scatter / collective-permute (their union);
* ``span_ms``: first op start to last op end, so ``span - busy`` is the time the
  device waited (launch gaps, host work, waiting on the other device);
* ``ops``: op count, and the ten costliest op names;
* ``idle_before``: per op name, the device's idle time just before that op started.

    python benchmarks/trace_summary.py TRACE.json.gz --steps 10
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re

COLLECTIVE = re.compile(r"nccl|all-?reduce|all_reduce|allreduce|all-?gather|all_gather|"
                        r"reduce-?scatter|collective-?permute|all-to-all", re.I)
DEVICE = re.compile(r"/device:(GPU|TPU):\d+")


def _union_ms(intervals) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total / 1e3  # trace times are microseconds


def _name(e) -> str:
    args = e.get("args") or {}
    return str(args.get("hlo_op") or args.get("long_name") or e.get("name", ""))


def trace_runs(run, runs: int, steps_per_run: int, with_host: bool = False):
    """``run()`` called ``runs`` times under the jax profiler (then waited for), and
    :func:`summarize` of that trace per step ({} where no trace file came out); with
    ``with_host``, (that, :func:`host_summary` of the same trace)."""
    import glob
    import os
    import tempfile

    import jax

    d = tempfile.mkdtemp(prefix="trace_")
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(runs):
            res = run()
        jax.block_until_ready(res)
    files = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)
    dev = summarize(files[0], runs * steps_per_run) if files else {}
    if not with_host:
        return dev
    return dev, (host_summary(files[0], runs * steps_per_run) if files else {})


def _load(path: str):
    """The trace's events and {pid: process name}."""
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    return events, procs


def summarize(path: str, steps: int) -> dict:
    """{device name: figures per step} for every device process of the trace."""
    events, procs = _load(path)
    per_dev = collections.defaultdict(list)
    for e in events:
        name = procs.get(e.get("pid"), "")
        if e.get("ph") == "X" and DEVICE.search(name) and e.get("dur") is not None:
            per_dev[DEVICE.search(name).group(0)].append(e)
    out = {}
    for dev, evs in sorted(per_dev.items()):
        iv = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in evs]
        coll = [(s, t) for (s, t), e in zip(iv, evs)
                if COLLECTIVE.search(e.get("name", "")) or COLLECTIVE.search(_name(e))]
        by_name, counts = collections.Counter(), collections.Counter()
        for e in evs:
            by_name[e.get("name", "")[:80]] += float(e["dur"])
            counts[e.get("name", "")[:80]] += 1
        # the device's idle time just before each op (since the previous op ended), by name
        idle, end = collections.Counter(), None
        for (s, t), e in sorted(zip(iv, evs), key=lambda x: x[0]):
            if end is not None and s > end:
                idle[e.get("name", "")[:80]] += s - end
            end = t if end is None else max(end, t)
        out[dev] = dict(
            ops=len(evs) / steps,
            kernel_ms=sum(t - s for s, t in iv) / 1e3 / steps,
            busy_ms=_union_ms(iv) / steps,
            collective_ms=_union_ms(coll) / steps,
            collective_ops=len(coll) / steps,
            span_ms=(max(t for _, t in iv) - min(s for s, _ in iv)) / 1e3 / steps,
            top=[(n, round(d / 1e3 / steps, 4)) for n, d in by_name.most_common(10)],
            # every op name: [count, ms] per step, costliest first
            by_op={n: [counts[n] / steps, round(d / 1e3 / steps, 5)]
                   for n, d in by_name.most_common()},
            # every op name the device waited before: ms per step, longest first
            idle_before={n: round(d / 1e3 / steps, 5) for n, d in idle.most_common()},
        )
    return out


def host_summary(path: str, steps: int, top: int = 40) -> dict:
    """The host threads' events (the runtime's own annotations: executable launch, thunks,
    buffer handling) summed by name: {name: [count, ms]} per step, the ``top`` costliest.
    Nested events are each counted, so the figures show where host time goes, not a sum."""
    events, procs = _load(path)
    by_name, counts = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e.get("dur") is None:
            continue
        if DEVICE.search(procs.get(e.get("pid"), "")):
            continue
        n = str(e.get("name", ""))[:80]
        by_name[n] += float(e["dur"])
        counts[n] += 1
    return {n: [counts[n] / steps, round(d / 1e3 / steps, 5)]
            for n, d in by_name.most_common(top)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=1)
    a = ap.parse_args(argv)
    print("host, per step (nested events each counted):")
    for n, (k, ms) in list(host_summary(a.trace, a.steps).items())[:20]:
        print(f"    {ms:8.3f} ms  x{k:6.1f}  {n}")
    for dev, s in summarize(a.trace, a.steps).items():
        print(f"{dev}: {s['ops']:.0f} ops, kernels {s['kernel_ms']:.2f} ms, busy "
              f"{s['busy_ms']:.2f} ms, collectives {s['collective_ms']:.2f} ms "
              f"({s['collective_ops']:.0f} ops), span {s['span_ms']:.2f} ms per step")
        for n, d in s["top"]:
            print(f"    {d:8.3f} ms  {n}")


if __name__ == "__main__":
    main()
