"""`perennial dev --demo`: the continuous-learning loop told as it happens.

Once the demo's Deployment (`fruit-chat`) serves its tracked name (`fruit`), a small simulated user population
(perennial.simusers.BackgroundUsers: a few users asking the toy's questions through the sidecar with the `openai`
client and rating every answer, a thumbs-up when right, a thumbs-down and a correction when wrong) runs in the
background, and the story is printed, one line per event:

  users     who asks what, where, and where the chart is written
  approval  every window: the adapter that answered, the approval rate with its Wilson interval and n, and the
            Deployment's `status.newFeedbackRecords` against `minNewRecords`
  feedback  the users' rating records since the last run reached `minNewRecords` (the threshold)
  training  a TrainingRun the operator created from the feedback (trigger, snapshot, parent), and how it ended
  gate      an Adapter of the loop promoted, not promoted or rolled back, with the gate's numbers
  serving   the served name moved to another Adapter, the seconds threshold -> run -> adapter -> serving, and the
            approval of the adapter before it

and `<prefix>.png` (approval over time, the loop's moments marked), `.csv` and `.json` are rewritten every
`chart_seconds` and at the end. `describe_*` are pure (tested on objects); `LoopStory` polls the API server in a
daemon thread.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .resources import conditions as cond

API = "perennial.ai/v1alpha1"
DEPLOYMENT_LABEL = "perennial.ai/deployment"
LOCAL_URL = "perennial.ai/local-url"
log = logging.getLogger("perennial.dev")


def _created(obj: Mapping[str, Any]) -> float | None:
    ts = (obj.get("metadata") or {}).get("creationTimestamp")
    try:
        return _dt.datetime.fromisoformat(str(ts)).timestamp() if ts else None
    except ValueError:
        return None


def describe_run_created(run: Mapping[str, Any], since_threshold: float | None) -> str:
    meta, spec = run.get("metadata") or {}, run.get("spec") or {}
    ann = meta.get("annotations") or {}
    seq = (meta.get("labels") or {}).get("perennial.ai/feedback-snapshot", "?")
    parent = (spec.get("parentAdapterRef") or {}).get("name") or "the base model"
    when = f" ({since_threshold:.0f} s after the threshold)" if since_threshold is not None else ""
    return (f"training  TrainingRun {meta.get('name')} created by the operator{when}: {spec.get('method', 'SFT')} on feedback "
            f"snapshot {seq} (trigger {ann.get('perennial.ai/learning-trigger', '?')}), continuing {parent}")


def describe_run_finished(run: Mapping[str, Any]) -> str:
    st = run.get("status") or {}
    name = (run.get("metadata") or {}).get("name")
    if st.get("phase") == "Succeeded":
        adapter = (st.get("adapterRef") or {}).get("name") or "?"
        return f"training  TrainingRun {name} Succeeded -> Adapter {adapter}"
    c = cond.get(st.get("conditions"), "Succeeded") or {}
    return f"training  TrainingRun {name} {st.get('phase')}: {c.get('reason', '')}: {c.get('message', '')}".rstrip(": ")


def promoted_state(adapter: Mapping[str, Any]) -> tuple[str, str, str] | None:
    c = cond.get((adapter.get("status") or {}).get("conditions"), "Promoted")
    return (str(c.get("status")), str(c.get("reason", "")), str(c.get("message", ""))) if c else None


def describe_gate(name: str, state: tuple[str, str, str]) -> str:
    status, reason, message = state
    if status == "True":
        return f"gate      Adapter {name} promoted ({reason}) {message}"
    if reason == "RolledBack":
        return f"gate      Adapter {name} ROLLED BACK: {message}"
    return f"gate      Adapter {name} not promoted ({reason}) {message}"


@dataclass
class Round:
    """One TrainingRun of the loop, in wall-clock seconds."""

    run: str
    created: float | None
    threshold: float | None = None
    adapter: str | None = None
    adapter_created: float | None = None
    served: float | None = None
    finished: bool = False

    def timings(self) -> str:
        t0 = self.threshold
        if t0 is None:
            return ""
        parts = [f"{what} +{t - t0:.0f} s" for what, t in (("run", self.created), ("adapter", self.adapter_created), ("serving", self.served))
                 if t is not None]
        return "threshold -> " + ", ".join(parts)


@dataclass
class StoryState:
    """What has been printed about already."""

    rounds: dict[str, Round] = field(default_factory=dict)
    gates: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    served: str | None = None
    markers: list[tuple[float, str]] = field(default_factory=list)  # (wall time, label)


def rating_records_after(answers: list[Any], started_wall: float, after_wall: float, count: int) -> float | None:
    """Wall time at which the users' rating records sent after `after_wall` reached `count` (a thumbs-up is one
    record, a thumbs-down plus its correction two)."""
    total = 0
    for a in sorted(answers, key=lambda a: a.t):
        if a.feedback is None or started_wall + a.t < after_wall:
            continue
        total += 1 if a.feedback == "up" else 2
        if total >= count:
            return started_wall + a.t
    return None


class LoopStory:
    """Starts the simulated users once the Deployment serves `model`, prints the loop's events, writes the chart."""

    def __init__(self, kube: Any, out_prefix: Path, *, namespace: str = "default", deployment: str = "fruit-chat", model: str = "fruit",
                 users: int = 2, think: float = 1.0, feedback_rate: float = 1.0, window: float = 30.0, poll: float = 2.0,
                 chart_seconds: float = 30.0, out: Callable[[str], None] | None = None) -> None:
        self.kube, self.prefix = kube, Path(out_prefix)
        self.namespace, self.deployment, self.model = namespace, deployment, model
        self.n_users, self.think, self.feedback_rate, self.window = users, think, feedback_rate, window
        self.poll_seconds, self.chart_seconds = poll, chart_seconds
        self.out = out or (lambda text: print(text, flush=True))
        self.users: Any = None
        self.state = StoryState()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._last_window = -1
        self._last_chart = time.monotonic()
        self._pending_threshold: float | None = None
        self._thread = threading.Thread(target=self._run, name="perennial-dev-loop", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LoopStory:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling and the users; print the summary and write the chart one last time."""
        self._stop.set()
        self._thread.join(30)
        with self._lock:
            if self.users is None:
                return
            try:
                result = self.users.stop(timeout=60)
            except Exception as exc:  # noqa: BLE001 - the summary is a garnish at exit
                self.out(f"users     could not stop cleanly: {exc}")
                return
            from .simusers import summary

            result.markers = self._markers(result.started_wall)
            for line in summary(result):
                self.out(f"users     {line}")
            self._write(result)

    # ------------------------------------------------------------------ polling
    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - the API server may be restarting; never kill the dev process
                log.debug("loop story: %s", exc)

    def _local_url(self) -> str | None:
        svc = self.kube.get("v1", "Service", self.namespace, self.deployment) or {}
        url = ((svc.get("metadata") or {}).get("annotations") or {}).get(LOCAL_URL)
        return str(url).rstrip("/") if url else None

    def _served(self, obj: Mapping[str, Any]) -> str | None:
        for s in (obj.get("status") or {}).get("servedAdapters") or []:
            if s.get("name") == self.model:
                return s.get("adapter") or None
        return None

    def _start_users(self, obj: Mapping[str, Any], url: str) -> None:
        from .simusers import (
            BackgroundUsers,
            DeploymentSource,
            Settings,
            demo_questions,
        )

        source = DeploymentSource(self.kube, self.namespace, self.deployment)
        settings = Settings(url=url, model=self.model, token=source.token(), users=self.n_users, think=self.think,
                            feedback_rate=self.feedback_rate, window=self.window, duration=365 * 86400.0, poll=self.poll_seconds)

        async def probe() -> str | None:
            return await asyncio.to_thread(source.served_adapter, self.model)

        # the openai client's httpx logs a line per request at INFO: the story is the users' voice here
        logging.getLogger("httpx").setLevel(logging.WARNING)
        self.users = BackgroundUsers(settings, demo_questions(), adapter_probe=probe, out=None).start()
        cl = (obj.get("spec") or {}).get("continuousLearning") or {}
        loop = (f"the operator trains family {cl.get('adapterFamily')} at {cl.get('minNewRecords', 1000)} new rated records"
                if cl.get("enabled") else f"Deployment {self.deployment} has no continuousLearning.enabled: nothing will train")
        self.out(f"users     {self.n_users} simulated user{'s' if self.n_users != 1 else ''} ask {self.model} at {url} and rate every answer "
                 f"(thumbs up when right, down + a correction when wrong); {loop}")
        self.out(f"users     approval chart: {self.prefix}.png (and .csv, .json), rewritten every {self.chart_seconds:g} s")

    def poll(self) -> None:
        obj = self.kube.get(API, "Deployment", self.namespace, self.deployment)
        if obj is None:
            return
        st = obj.get("status") or {}
        served = self._served(obj)
        if self.users is None:
            url = self._local_url()
            if not (served and url and cond.is_true(st.get("conditions"), "Ready")):
                return
            with self._lock:
                if self._stop.is_set():
                    return
                self._start_users(obj, url)
            self.state.served = served
        now = time.time()
        cl = (obj.get("spec") or {}).get("continuousLearning") or {}
        min_new = int(cl.get("minNewRecords", 1000))
        answers = self.users.answers()
        started = self.users.started_wall
        self._threshold(answers, started, min_new, now)
        self._runs(now)
        self._adapters(cl.get("adapterFamily"))
        if served != self.state.served:
            self._serving(served, answers, now)
        self._window_line(answers, started, st.get("newFeedbackRecords"), min_new)
        if time.monotonic() - self._last_chart >= self.chart_seconds:
            self._last_chart = time.monotonic()
            self._chart()

    def _threshold(self, answers: list[Any], started: float, min_new: int, now: float) -> None:
        """Once per round: the users' rating records since the last run was created reached `minNewRecords`."""
        if self._pending_threshold is not None:
            return
        after = max([started] + [r.created for r in self.state.rounds.values() if r.created is not None])
        t = rating_records_after(answers, started, after, min_new)
        if t is None:
            return
        self._pending_threshold = t
        self.state.markers.append((t, f"{min_new} rating records"))
        self.out(f"feedback  the users have sent {min_new} rating records since the last run ({now - t:.0f} s ago): the operator "
                 "trains once the sidecar has shipped them to the store (a spool segment closes within 60 s) and it looks again")

    def _runs(self, now: float) -> None:
        s = self.state
        runs = self.kube.list(API, "TrainingRun", self.namespace, f"{DEPLOYMENT_LABEL}={self.deployment}")
        for run in sorted(runs, key=lambda r: _created(r) or 0):
            name = run["metadata"]["name"]
            r = s.rounds.get(name)
            if r is None:
                threshold, self._pending_threshold = self._pending_threshold, None
                r = s.rounds[name] = Round(name, _created(run) or now, threshold)
                s.markers.append((r.created or now, f"TrainingRun {name}"))
                self.out(describe_run_created(run, (r.created - threshold) if threshold and r.created else None))
            phase = (run.get("status") or {}).get("phase")
            if not r.finished and phase in ("Succeeded", "Failed"):
                r.finished = True
                r.adapter = ((run.get("status") or {}).get("adapterRef") or {}).get("name")
                self.out(describe_run_finished(run))

    def _adapters(self, family: str | None) -> None:
        s = self.state
        mine = {r.adapter: r for r in s.rounds.values() if r.adapter}
        for a in self.kube.list(API, "Adapter", self.namespace):
            name = a["metadata"]["name"]
            if family and (a.get("spec") or {}).get("family") != family:
                continue
            if name in mine and mine[name].adapter_created is None:
                mine[name].adapter_created = _created(a)
            state = promoted_state(a)
            if state is None or s.gates.get(name) == state:
                continue
            s.gates[name] = state
            label = "promoted" if state[0] == "True" else ("rolled back" if state[1] == "RolledBack" else "not promoted")
            s.markers.append((time.time(), f"{name} {label}"))
            self.out(describe_gate(name, state))

    def _serving(self, served: str | None, answers: list[Any], now: float) -> None:
        from .stats import Proportion

        s = self.state
        before = s.served
        s.served = served
        judged = [a for a in answers if a.approved is not None and a.adapter == before]
        approval = Proportion(sum(bool(a.approved) for a in judged), len(judged))
        r = next((r for r in s.rounds.values() if r.adapter == served), None)
        timing = ""
        if r is not None and r.served is None:
            r.served = now
            timing = f"; {r.timings()}" if r.timings() else ""
        self.out(f"serving   {self.model} -> {served or '-'} (was {before or '-'}, approval {approval.format()}){timing}")

    def _window_line(self, answers: list[Any], started: float, new_records: Any, min_new: int) -> None:
        from .simusers import windows

        elapsed = self.users.elapsed
        index = int(elapsed // self.window) - 1  # the last complete window
        if index <= self._last_window:
            return
        self._last_window = index
        w = windows([a for a in answers if index * self.window <= a.t < (index + 1) * self.window], self.window, (index + 1) * self.window)[index]
        after = max([started] + [r.created for r in self.state.rounds.values() if r.created is not None])
        sent = sum(1 if a.feedback == "up" else 2 for a in answers if a.feedback is not None and started + a.t >= after)
        self.out(f"approval  [{w.start:5.0f}s-{w.end:5.0f}s] {self.model} -> {w.adapter_label or '-'}: {w.approval.format()}  (errors {w.errors}) "
                 f"| rating records sent since the last run {sent}/{min_new}, in the store not trained on {new_records if new_records is not None else '-'}")

    # ------------------------------------------------------------------ chart
    def _markers(self, started_wall: float) -> list[Any]:
        from .simusers import Change

        return [Change(t - started_wall, label, "loop") for t, label in self.state.markers]

    def _result(self) -> Any:
        from .simusers import Result

        u = self.users
        return Result(u.sim.s, u.started_wall, max(u.elapsed, 1e-3), u.answers(), Counter(u.sim.errors), Counter(u.sim.feedback_errors),
                      probe_errors=Counter(u.sim.probe_errors), markers=self._markers(u.started_wall))

    def _chart(self) -> None:
        if self.users is None:
            return
        self._write(self._result())

    def _write(self, result: Any) -> None:
        from .simusers import write_outputs

        try:
            write_outputs(result, self.prefix)
        except Exception as exc:  # noqa: BLE001 - e.g. matplotlib missing: said once per attempt, never fatal
            log.warning("could not write the approval chart %s.png: %s", self.prefix, exc)
