"""Continuous learning, headless: what the operator's loop costs and how fast it closes.

Sections (run one or more; default: all that exist):

  --tick   Cost of one feedback-store tick against the store's size. For each size (default
           10k, 100k and 1M records) a local store is generated (`perennial_records` JSON lines
           in `<deployment>/<yyyy>/<mm>/<dd>/<pod>-<seq>.jsonl` segments, `--records-per-day`
           (10k) a day on the days ending today -- so a bigger store is a longer history, as in
           production --, half interactions and half ratings; nothing is trained) and
           `perennial.feedback.store.FeedbackStore.scan` is timed:
             first     a fresh FeedbackStore, empty index: reads every segment;
                       then snapshots take all of it, one per day of history (as a loop firing daily
                       would have; `--one-snapshot`: one over all of it), timed apart;
             incr      the same object, after one new segment was shipped;
             restart   a new FeedbackStore (an operator restart: the index is loaded from the
                       store) after one more new segment;
             idle      the same object again, nothing new.
           incr, restart and idle are medians of `--repeat` (7) ticks each (an incremental tick is
           mostly the fsync of its index file and the parse of the new segment: noisy on a shared disk,
           so its CPU time is printed too, as is a restart's).
           It prints records read and the wall time of each tick, and ratios measured in this
           one run: first / incremental per size, and each tick's time at the largest size over
           the smallest (a tick whose cost does not grow with history stays near 1x while the
           store grows 100x).

  --loop   The whole loop with simulated users (benchmarks/loop_live.py): threshold -> TrainingRun ->
           Adapter -> serving, and approval before/after with confidence intervals and sample sizes.

Nothing is asserted; the exit status is 0 unless something crashed. The generated stores live in
a temporary directory removed at the end (`--keep` keeps it). Usage:

    python benchmarks/loop.py [--tick] [--sizes 10000 100000 1000000] [--records-per-segment 200] [--records-per-day 10000]
    python benchmarks/loop.py --loop [--loop-kubeconfig .perennial/kubeconfig] [--loop-users 4] [--loop-after 60]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from loop_live import add_arguments as add_loop_arguments
from loop_live import loop_section
from perennial.feedback.snapshot import snapshot_name
from perennial.feedback.store import FeedbackStore
from perennial_records import FeedbackRecord, InteractionRecord, segment_name

DEPLOYMENT = "bench"


def _templates() -> tuple[str, str]:
    """One interaction and one rating as the sidecar writes them, with placeholders for id and time."""
    inter = InteractionRecord(id="RID", deployment=DEPLOYMENT, namespace="default", model="toy",
                              messages=[{"role": "user", "content": "What colour is a banana? Answer in one word."}],
                              params={"temperature": 0.7, "max_tokens": 16}, response="<answer>yellow</answer>",
                              finish_reason="stop", usage={"prompt_tokens": 21, "completion_tokens": 6}, latency_ms=41.5,
                              time="TIME").to_json()
    rate = FeedbackRecord(id="fb-FID", response_id="RID", type="thumbs", thumbs="up", deployment=DEPLOYMENT,
                          namespace="default", time="TIME").to_json()
    return inter, rate


def generate(root: str, records: int, per_segment: int, days: int, start_seq: int = 0, only_today: bool = False) -> int:
    """Write `records` records (interaction + its rating pairs) in segments of `per_segment`; returns segments written."""
    inter_t, rate_t = _templates()
    today = dt.datetime.now(dt.UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    n_seg = max(1, -(-records // per_segment))
    written = 0
    for s in range(n_seg):
        day = today if only_today else today - dt.timedelta(days=days - 1 - (s * days // n_seg))
        name = segment_name(DEPLOYMENT, f"pod-{s % 4}", start_seq + s, day)
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ts = day.isoformat()
        out = []
        for k in range(min(per_segment, records - written) // 2):
            rid = f"{start_seq + s:08x}{k:08x}" + "0" * 16
            out.append(inter_t.replace("RID", rid).replace("TIME", ts))
            out.append(rate_t.replace("RID", rid).replace("FID", rid).replace("TIME", ts))
        written += len(out)
        with open(path, "w") as f:
            f.write("\n".join(out) + "\n")
    return n_seg


def snapshot_history(store: FeedbackStore, one: bool) -> int:
    """Snapshot everything pending: in one snapshot, or one a day (by segment day, as a daily loop would have);
    returns the ratings snapshotted."""
    if one:
        snap = store.take_snapshot(DEPLOYMENT)
        return snap.counts.ratings if snap else 0
    plan = store.plan_snapshot(DEPLOYMENT)
    if plan is None:
        return 0
    by_day: dict[str, list[Any]] = {}
    for part in plan[1]:
        by_day.setdefault("/".join(part.name.split("/")[1:4]), []).append(part)
    ratings = 0
    seq = store.cursor(DEPLOYMENT).sequence
    for i, day in enumerate(sorted(by_day)):
        ratings += store.write_snapshot(DEPLOYMENT, snapshot_name(DEPLOYMENT, seq + i), by_day[day]).counts.ratings
    return ratings


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    r = fn(*args)
    return time.perf_counter() - t0, r


def tick_cost(args: argparse.Namespace, workdir: str) -> None:
    print(f"== tick: feedback-store tick cost against store size ({args.records_per_segment} records per segment, "
          f"{args.records_per_day:,} records a day, local store) ==", flush=True)
    # warm-up (imports, pydantic's first validations) so that the first size is not charged for it
    warm = os.path.join(workdir, "warm-up")
    generate(warm, 400, 200, 1)
    FeedbackStore(warm).scan(DEPLOYMENT)
    shutil.rmtree(warm, ignore_errors=True)
    seq = iter(range(10_000_000, 20_000_000))

    def ship_one(root: str) -> None:
        generate(root, args.records_per_segment, args.records_per_segment, 1, start_seq=next(seq), only_today=True)

    def median(xs: list[float]) -> float:
        return statistics.median(xs)

    rows = []
    for size in args.sizes:
        root = os.path.join(workdir, f"store-{size}")
        os.makedirs(root)
        days = max(1, -(-size // args.records_per_day))
        t_gen, n_seg = _timed(generate, root, size, args.records_per_segment, days)
        store = FeedbackStore(root)
        t_first, first = _timed(store.scan, DEPLOYMENT)
        # the history so far goes into snapshots, as when the loop fired (once a day, or once over all of it with
        # --one-snapshot): the steady state ticks run in
        t_snap, snap_ratings = _timed(snapshot_history, store, args.one_snapshot)
        incr_t, incr_read, restart_t, restart_read, idle_t, idle_read = [], [], [], [], [], []
        incr_cpu: list[float] = []
        restart_cpu: list[float] = []
        for _ in range(args.repeat):  # one new segment shipped, then a tick
            ship_one(root)
            c0 = time.process_time()
            t, r = _timed(store.scan, DEPLOYMENT)
            incr_cpu.append(time.process_time() - c0)
            incr_t.append(t)
            incr_read.append(r.records_read)
        for _ in range(args.repeat):  # one new segment shipped, then a restarted operator's first tick
            ship_one(root)
            c0 = time.process_time()
            store = FeedbackStore(root)
            t, r = _timed(store.scan, DEPLOYMENT)
            restart_cpu.append(time.process_time() - c0)
            restart_t.append(t)
            restart_read.append(r.records_read)
        for _ in range(args.repeat):  # nothing new
            t, last = _timed(store.scan, DEPLOYMENT)
            idle_t.append(t)
            idle_read.append(last.records_read)
        row = (size, n_seg, t_first, first.records_read, median(incr_t), max(incr_read), median(restart_t), max(restart_read),
               median(idle_t), max(idle_read), t_snap, last.segments_in_memory, median(incr_cpu), median(restart_cpu))
        rows.append(row)
        print(f"records={size:>9,} segments={n_seg:>6,} days={days:>3} (generated in {t_gen:.1f}s) | "
              f"first: read {first.records_read:>9,} records in {t_first * 1000:9.1f} ms | "
              f"incr: read {row[5]:>4,} records in {row[4] * 1000:6.1f} ms ({row[12] * 1000:5.1f} ms CPU) | "
              f"restart: read {row[7]:>4,} records in {row[6] * 1000:6.1f} ms ({row[13] * 1000:5.1f} ms CPU) | "
              f"idle: read {row[9]} records in {row[8] * 1000:5.1f} ms | "
              f"first/incr = {t_first / row[4]:6.1f}x | snapshot(s) of the first tick's {snap_ratings:,} ratings "
              f"{t_snap * 1000:.0f} ms | pending ratings {last.pending.ratings:,} | segments held in memory {last.segments_in_memory:,}",
              flush=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    table = getattr(args, "table", None)
    if table is not None:
        for r in rows:
            table.append((f"tick, store of {r[0]:,} records ({r[1]:,} segments)",
                          (f"records read: first {r[3]:,} / incr {r[5]:,} / restart {r[7]:,} / idle {r[9]:,}; "
                          f"ms: first {r[2] * 1000:.0f} / incr {r[4] * 1000:.1f} (CPU {r[12] * 1000:.1f}) / "
                          f"restart {r[6] * 1000:.1f} (CPU {r[13] * 1000:.1f}) / idle {r[8] * 1000:.1f}")))
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        growth = hi[0] / lo[0]
        print(f"store grew {growth:.0f}x ({lo[0]:,} -> {hi[0]:,} records): "
              f"first tick {hi[2] / lo[2]:.1f}x, incremental tick {hi[4] / lo[4]:.2f}x (CPU {hi[12] / lo[12]:.2f}x), "
              f"restart tick {hi[6] / lo[6]:.2f}x (CPU {hi[13] / lo[13]:.2f}x), idle tick {hi[8] / lo[8]:.2f}x; "
              f"records read per incremental tick {lo[5]} -> {hi[5]}, per restart tick {lo[7]} -> {hi[7]}, "
              f"per idle tick {lo[9]} -> {hi[9]} (medians of {args.repeat} ticks)", flush=True)
        if table is not None:
            table.append((f"tick cost, store {growth:.0f}x larger",
                          (f"first {hi[2] / lo[2]:.1f}x, incr {hi[4] / lo[4]:.2f}x (CPU {hi[12] / lo[12]:.2f}x), "
                          f"restart {hi[6] / lo[6]:.2f}x (CPU {hi[13] / lo[13]:.2f}x), idle {hi[8] / lo[8]:.2f}x")))
    if len(rows) >= 3:
        # the two largest stores both hold more days than a tick's window and what is kept in memory: only the length
        # of the history differs (the smallest may hold less than a window, so a restart there loads less)
        mid, hi = rows[-2], rows[-1]
        growth = hi[0] / mid[0]
        print(f"store grew {growth:.0f}x ({mid[0]:,} -> {hi[0]:,} records): incremental tick {hi[4] / mid[4]:.2f}x "
              f"(CPU {hi[12] / mid[12]:.2f}x), restart tick {hi[6] / mid[6]:.2f}x (CPU {hi[13] / mid[13]:.2f}x), "
              f"idle tick {hi[8] / mid[8]:.2f}x", flush=True)
        if table is not None:
            table.append((f"tick cost, store {growth:.0f}x larger ({mid[0]:,} -> {hi[0]:,})",
                          (f"incr {hi[4] / mid[4]:.2f}x (CPU {hi[12] / mid[12]:.2f}x), "
                          f"restart {hi[6] / mid[6]:.2f}x (CPU {hi[13] / mid[13]:.2f}x), idle {hi[8] / mid[8]:.2f}x")))


SECTIONS: dict[str, Callable[[argparse.Namespace, str], None]] = {"tick": tick_cost, "loop": loop_section}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tick", action="store_true", help="feedback-store tick cost against store size")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="store sizes in records")
    p.add_argument("--records-per-segment", type=int, default=200)
    p.add_argument("--records-per-day", type=int, default=10_000, help="records a day in the generated history (ending today)")
    p.add_argument("--repeat", type=int, default=7, help="incremental, restart and idle ticks per size (medians printed)")
    p.add_argument("--keep", action="store_true", help="keep the generated stores")
    p.add_argument("--one-snapshot", action="store_true",
                   help="the generated history goes into one snapshot (default: one a day, as a loop firing daily)")
    add_loop_arguments(p)
    args = p.parse_args(argv)
    chosen = [name for name in SECTIONS if getattr(args, name, False)] or list(SECTIONS)
    workdir = tempfile.mkdtemp(prefix="perennial-loop-bench-")
    args.table = []  # (what, figure) rows each section adds: printed as one table at the end
    try:
        for name in chosen:
            SECTIONS[name](args, workdir)
        if args.table:
            width = max(len(k) for k, _ in args.table)
            print(f"== summary ({', '.join(chosen)} in one run) ==", flush=True)
            for k, v in args.table:
                print(f"  {k:<{width}}  {v}", flush=True)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
