"""benchmarks/loop.py --loop: the whole continuous-learning loop, timed, with simulated users.

Against a Perennial Deployment with `continuousLearning.enabled` (default `fruit-chat` of the demo): with
`--loop-kubeconfig` one already running (e.g. `perennial dev --demo --apply examples/local` in another terminal:
`.perennial/kubeconfig`), else `perennial dev --demo --apply examples/local` is started here in the work
directory (it builds the tiny model and trains the demo's adapters first: minutes on a laptop CPU).

`perennial simulate-users`'s population (perennial.simusers.BackgroundUsers) asks and rates through the
Deployment's endpoint while the Deployment, its TrainingRuns and Adapters are polled every `--loop-poll` seconds.
It prints, in seconds since the users started:

  threshold   the users had sent `minNewRecords` rating records (thumbs-up 1, thumbs-down + correction 2)
  seen        the Deployment's status.newFeedbackRecords first read >= minNewRecords (when a poll caught it)
  run         the first TrainingRun created after the start (its creationTimestamp: 1 s resolution)
  adapter     the Adapter that run produced (its creationTimestamp)
  serving     status.servedAdapters first named it for the served name (first poll that saw it)
  answered    the users' first answer attributed to it

and then each step's duration from the threshold, and the approval of the answers of the adapter served before
against those of the new one: both with Wilson 95% intervals and sample sizes, the difference with Newcombe's
interval and the one-sided two-proportion z-test (perennial.stats). The users' series is written to
`--loop-out` (.png, .csv, .json). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perennial.simusers import (
    BackgroundUsers,
    Change,
    DeploymentSource,
    Result,
    Settings,
    demo_questions,
    summary,
    write_outputs,
)
from perennial.stats import Proportion, compare

API = "perennial.ai/v1alpha1"
REPO = Path(__file__).resolve().parents[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loop", action="store_true", help="the whole loop with simulated users: threshold -> TrainingRun -> Adapter -> serving, approval before/after")
    p.add_argument("--loop-kubeconfig", help="a running control plane's kubeconfig (default: start `perennial dev --demo` here)")
    p.add_argument("--loop-apply", default=str(REPO / "examples" / "local"), help="the manifests `perennial dev --demo` applies when started here")
    p.add_argument("--loop-deployment", default="fruit-chat")
    p.add_argument("--loop-namespace", default="default")
    p.add_argument("--loop-model", default="fruit", help="the served name the users ask")
    p.add_argument("--loop-users", type=int, default=4)
    p.add_argument("--loop-think", type=float, default=0.2, help="mean seconds a user waits between questions")
    p.add_argument("--loop-feedback-rate", type=float, default=1.0)
    p.add_argument("--loop-after", type=float, default=60.0, help="seconds of answers from the new adapter to collect after it serves")
    p.add_argument("--loop-timeout", type=float, default=1800.0, help="give up after this many seconds")
    p.add_argument("--loop-poll", type=float, default=1.0)
    p.add_argument("--loop-out", default="perennial-loop-users", help="the users' series: <out>.png, .csv, .json")


# ----------------------------------------------------------------------------- the timeline (pure)
@dataclass
class Observation:
    """One poll: seconds since the users started, and what the API server said."""

    t: float
    new_records: int | None
    served: str | None
    runs: dict[str, float] = field(default_factory=dict)  # TrainingRun -> created (s since start)
    adapters: dict[str, tuple[float, str | None]] = field(default_factory=dict)  # Adapter -> (created, its TrainingRun)


@dataclass
class Timeline:
    threshold: float | None = None
    seen: float | None = None
    run: str | None = None
    run_created: float | None = None
    adapter: str | None = None
    adapter_created: float | None = None
    serving: float | None = None
    answered: float | None = None
    before: str | None = None

    def steps(self) -> list[tuple[str, float | None]]:
        return [("threshold", self.threshold), ("seen", self.seen), ("run", self.run_created), ("adapter", self.adapter_created),
                ("serving", self.serving), ("answered", self.answered)]


def records_sent_at(result_answers: list[Any], count: int) -> float | None:
    """When the users' rating records reached `count` (a thumbs-up is one record, a thumbs-down plus correction two)."""
    total = 0
    for a in sorted(result_answers, key=lambda a: a.t):
        if a.feedback is not None:
            total += 1 if a.feedback == "up" else 2
            if total >= count:
                return a.t
    return None


def timeline(observations: list[Observation], answers: list[Any], min_new_records: int, existing_runs: set[str],
             served_at_start: str | None) -> Timeline:
    """The loop's moments from the polls and the users' answers: the first TrainingRun that was not there at the
    start, the Adapter made by it, when the Deployment and the users first saw that Adapter serve."""
    tl = Timeline(threshold=records_sent_at(answers, min_new_records), before=served_at_start)
    for o in observations:
        if tl.seen is None and o.new_records is not None and o.new_records >= min_new_records:
            tl.seen = o.t
        if tl.run is None:
            new = sorted((created, name) for name, created in o.runs.items() if name not in existing_runs)
            if new:
                tl.run_created, tl.run = new[0]
        if tl.run is not None and tl.adapter is None:
            made = sorted((created, name) for name, (created, run) in o.adapters.items() if run == tl.run)
            if made:
                tl.adapter_created, tl.adapter = made[0]
        if tl.adapter is not None and tl.serving is None and o.served is not None and tl.adapter in o.served.split(" + canary "):
            tl.serving = o.t
    if tl.adapter is not None:
        tl.answered = min((a.t for a in answers if a.approved is not None and a.adapter == tl.adapter), default=None)
        if tl.answered is not None:  # "before" is what answered just before it (another adapter may have come meanwhile)
            earlier = [a for a in answers if a.approved is not None and a.adapter not in (None, tl.adapter) and a.t < tl.answered]
            if earlier:
                tl.before = max(earlier, key=lambda a: a.t).adapter
    return tl


def approval_of(answers: list[Any], adapter: str | None) -> Proportion:
    judged = [a for a in answers if a.approved is not None and adapter is not None and a.adapter == adapter]
    return Proportion(sum(bool(a.approved) for a in judged), len(judged))


def report(tl: Timeline, result: Result) -> list[str]:
    lines = ["loop (seconds since the users started; run/adapter from creationTimestamp, 1 s resolution; seen/serving from polls):"]
    for name, t in tl.steps():
        since = "" if t is None or tl.threshold is None else f"  ({t - tl.threshold:+.1f} s from the threshold)"
        lines.append(f"  {name:<9} {'-' if t is None else f'{t:8.1f}'}{since}")
    lines.append(f"  TrainingRun {tl.run or '-'}, Adapter {tl.adapter or '-'}, served before {tl.before or '-'}")
    before, after = approval_of(result.answers, tl.before), approval_of(result.answers, tl.adapter)
    lines.append(f"approval of {tl.before or '-'} vs {tl.adapter or '-'}: {compare(before, after).format()}")
    return lines


def table_rows(tl: Timeline, result: Result, min_new_records: int) -> list[tuple[str, str]]:
    """The loop's figures as (what, figure) rows of the benchmark's summary table."""

    def since(t: float | None) -> str:
        return "-" if t is None or tl.threshold is None else f"{t - tl.threshold:.1f} s"

    before, after = approval_of(result.answers, tl.before), approval_of(result.answers, tl.adapter)
    return [(f"loop: threshold ({min_new_records} rating records sent) -> TrainingRun created", f"{since(tl.run_created)} ({tl.run or '-'})"),
            ("loop: threshold -> Adapter created", f"{since(tl.adapter_created)} ({tl.adapter or '-'})"),
            ("loop: threshold -> serving", since(tl.serving)),
            ("loop: approval before -> after (Wilson 95%)", f"{tl.before or '-'} {before.format()} -> {tl.adapter or '-'} {after.format()}"),
            ("loop: difference (Newcombe 95%), one-sided z-test", difference(compare(before, after)))]


def difference(c: Any) -> str:
    d, di, t = c.difference, c.difference_interval, c.test
    if d is None or di is None or t is None:
        return "no comparison (a side has no answers)"
    return f"{d:+.3f} [{di[0]:+.3f}, {di[1]:+.3f}], z={t.z:.2f}, p(after > before)={t.p_greater:.3g}: {c.verdict}"


# ----------------------------------------------------------------------------- the run
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _created(obj: dict[str, Any], started_wall: float) -> float:
    ts = (obj.get("metadata") or {}).get("creationTimestamp") or ""
    return dt.datetime.fromisoformat(ts).timestamp() - started_wall if ts else float("nan")


def _wait(what: str, check: Any, timeout: float, poll: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = check()
        except Exception:  # noqa: BLE001 - the API server is still starting
            got = None
        if got:
            return got
        time.sleep(poll)
    raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")


def loop_section(args: argparse.Namespace, workdir: str) -> None:
    from perennial.kube import connect

    dev = None
    deadline = time.monotonic() + args.loop_timeout
    try:
        kubeconfig = args.loop_kubeconfig
        if not kubeconfig:
            state = Path(workdir) / "dev"
            log = open(Path(workdir) / "dev.log", "w")  # noqa: SIM115 - closed with the process
            cmd = [sys.executable, "-m", "perennial.cli", "dev", "--demo", "--apply", str(Path(args.loop_apply).resolve()),
                   "--state-dir", str(state), "--port", str(_free_port()), "--metrics-port", str(_free_port()),
                   "--health-port", str(_free_port())]
            print(f"loop: starting {' '.join(cmd[2:])} (log: {log.name})", flush=True)
            dev = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
            kubeconfig = str(_wait("the dev control plane's kubeconfig", lambda: (state / "kubeconfig").exists() and state / "kubeconfig",
                                   deadline - time.monotonic()))
        kube = connect(kubeconfig=kubeconfig)
        source = DeploymentSource(kube, args.loop_namespace, args.loop_deployment)
        name = f"{args.loop_namespace}/{args.loop_deployment}"
        obj = _wait(f"Deployment {name} serving {args.loop_model}",
                    lambda: (o := source.get()) and (o.get("status") or {}).get("endpoint") and source.served_adapter(args.loop_model) and o,
                    deadline - time.monotonic(), args.loop_poll)
        learning = (obj.get("spec") or {}).get("continuousLearning") or {}
        if not learning.get("enabled"):
            print(f"loop: Deployment {name} has no continuousLearning.enabled: the loop cannot close here, nothing measured", flush=True)
            return
        min_new = int(learning.get("minNewRecords", 1000))
        family = learning.get("adapterFamily")
        existing = {r["metadata"]["name"] for r in kube.list(API, "TrainingRun", args.loop_namespace)}
        served_at_start = source.served_adapter(args.loop_model)
        settings = Settings(url=obj["status"]["endpoint"], model=args.loop_model, token=source.token(), users=args.loop_users,
                            think=args.loop_think, feedback_rate=args.loop_feedback_rate, window=30.0,
                            duration=max(1.0, deadline - time.monotonic()), poll=args.loop_poll)

        async def probe() -> str | None:
            import asyncio

            return await asyncio.to_thread(source.served_adapter, args.loop_model)

        users = BackgroundUsers(settings, demo_questions(), adapter_probe=probe).start()
        started_wall = users.started_wall
        print(f"loop: {settings.users} users asking {args.loop_model} at {settings.base}; {name} serves {served_at_start}, "
              f"trains at {min_new} new records (family {family})", flush=True)
        observations: list[Observation] = []
        tl = Timeline()
        try:
            while time.monotonic() < deadline:
                try:
                    o = source.get()
                    runs = {r["metadata"]["name"]: _created(r, started_wall) for r in kube.list(API, "TrainingRun", args.loop_namespace)}
                    adapters = {a["metadata"]["name"]: (_created(a, started_wall),
                                                        (((a.get("spec") or {}).get("lineage") or {}).get("trainingRunRef") or {}).get("name"))
                                for a in kube.list(API, "Adapter", args.loop_namespace)}
                    served = source.served_adapter(args.loop_model)
                    # stamped when the poll's reads are done: "by then the API server said so"
                    observations.append(Observation(users.elapsed, (o.get("status") or {}).get("newFeedbackRecords"), served, runs, adapters))
                except Exception as e:  # noqa: BLE001 - a failed poll is skipped
                    print(f"loop: poll failed: {e}", flush=True)
                tl = timeline(observations, users.answers(), min_new, existing, served_at_start)
                if tl.serving is not None and users.approval_since(tl.serving, tl.adapter).n and users.elapsed - tl.serving >= args.loop_after:
                    break
                time.sleep(args.loop_poll)
        finally:
            result = users.stop()
        tl = timeline(observations, result.answers, min_new, existing, served_at_start)
        result.markers = [Change(t, label, "loop") for t, label in
                          [(tl.threshold, f"{min_new} rating records sent"), (tl.run_created, f"TrainingRun {tl.run}"),
                           (tl.adapter_created, f"Adapter {tl.adapter}")] if t is not None]
        for line in [*summary(result), *report(tl, result)]:
            print(line, flush=True)
        table = getattr(args, "table", None)
        if table is not None:
            table.extend(table_rows(tl, result, min_new))
        paths = write_outputs(result, args.loop_out)
        print("loop: wrote " + ", ".join(str(p) for p in paths.values()), flush=True)
    finally:
        if dev is not None and dev.poll() is None:
            os.killpg(dev.pid, signal.SIGTERM)  # its own session: perennial dev and the pods it runs
            try:
                dev.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(dev.pid, signal.SIGKILL)
                dev.wait(30)
