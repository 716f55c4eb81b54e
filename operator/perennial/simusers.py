"""`perennial simulate-users`: a simulated user population for any Deployment's OpenAI endpoint.

N concurrent users ask a task's questions (the demo's fruit-colour toy by default, or a JSONL file of questions
with their expected answers) through the served name with the `openai` client, judge every answer with the
task's checker and rate it at `POST /v1/feedback` (the Deployment's bearer token): a thumbs-up when it is right,
a thumbs-down plus a correction (the right answer) when it is wrong, each answer rated with probability
`--feedback-rate`. A failed request (429, 5xx, timeout, refused connection) is counted, never fatal.

Approval is the share of answers the users judged right (every judged answer counts, rated or not; the rated
ones are a random sample of them). Every `--window` seconds a line shows the adapter that answered, requests,
errors, feedback sent and the approval rate with its Wilson 95% interval and n. At the end: the approval of each
stretch served by one adapter, each stretch compared with the one before (difference with Newcombe's interval,
two-proportion z-test; perennial.stats), and `<out>.png` (approval over time, changes marked), `<out>.csv`
(the windows) and `<out>.json` (windows, changes, stretches, comparisons, counters).

Which adapter answered: an answer names the served name, never the Adapter (the sidecar hides it). With
`--deployment NAME` the Perennial Deployment's `status.servedAdapters` is polled (kubeconfig) and each answer is
attributed to the Adapter behind the served name at that moment (a canary shows both); without it, to the
answer's `model`. Change moments come from the attribution changing, and from `--events FILE` (JSON lines
`{"time": <unix seconds or RFC 3339>, "label": "..."}`, read at the end, so another process may append to it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import datetime as _dt
import itertools
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .stats import Comparison, Proportion, compare

TOKEN_ENV = "PERENNIAL_FEEDBACK_TOKEN"
#: Event reasons marked on the chart with --deployment (the controllers' Notes about training, promotion and rollout)
MARKED_REASONS = frozenset({"TrainingRunCreated", "AdapterPromoted", "AdapterRolledBack", "AdapterServed", "Switched", "RolledBack"})
MAX_FEEDBACK_BACKOFF_S = 5.0
INSTALL_HINT = "pip install 'perennial[simulate]'"


# ----------------------------------------------------------------------------- the task
@dataclass(frozen=True)
class Question:
    messages: tuple[tuple[str, str], ...]  # (role, content)
    answer: str
    #: what a user sends as the correction of a wrong answer (the right completion)
    correction: str

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def text(self) -> str:
        return self.messages[-1][1]


def _answer_tag(text: str, q: Question) -> bool:
    return text.strip() == f"<answer>{q.answer}</answer>"


def _exact(text: str, q: Question) -> bool:
    return text.strip() == q.answer.strip()


def _contains(text: str, q: Question) -> bool:
    return q.answer.strip().lower() in text.lower()


def _regex(text: str, q: Question) -> bool:
    return re.fullmatch(q.answer, text.strip(), re.DOTALL) is not None


#: checker name -> (is the answer right?, the correction of a wrong answer when the row names none)
CHECKERS: dict[str, tuple[Callable[[str, Question], bool], Callable[[str], str] | None]] = {
    # the demo RewardSpec's `correct` grader: the completion (stripped) equals `<answer>{answer}</answer>`
    "answer-tag": (_answer_tag, lambda a: f"<answer>{a}</answer>"),
    "exact": (_exact, lambda a: a),
    "contains": (_contains, lambda a: a),
    # `answer` is a regular expression the whole (stripped) completion must match: rows must carry `correction`
    "regex": (_regex, None),
}


def _messages(prompt: Any, where: str) -> tuple[tuple[str, str], ...]:
    if isinstance(prompt, str) and prompt:
        return (("user", prompt),)
    if isinstance(prompt, list) and prompt:
        out = []
        for i, m in enumerate(prompt):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"{where}: `prompt[{i}]` must be an object with string `role` and `content`")  # noqa: TRY004 - a bad row is a ValueError to the CLI
            out.append((m["role"], m["content"]))
        return tuple(out)
    raise ValueError(f"{where}: `prompt` must be a non-empty string or a non-empty list of chat messages")


def question(prompt: Any, answer: Any, checker: str, correction: Any = None, where: str = "question") -> Question:
    if checker not in CHECKERS:
        raise ValueError(f"unknown checker {checker!r}; one of {', '.join(CHECKERS)}")
    if not isinstance(answer, str) or not answer:
        raise ValueError(f"{where}: `answer` must be a non-empty string")
    if checker == "regex":
        try:
            re.compile(answer)
        except re.error as e:
            raise ValueError(f"{where}: `answer` must be a valid regular expression for the regex checker: {e}") from None
    if correction is None:
        make = CHECKERS[checker][1]
        if make is None:
            raise ValueError(f"{where}: the {checker} checker needs a `correction` in every row")
        correction = make(answer)
    if not isinstance(correction, str) or not correction:
        raise ValueError(f"{where}: `correction` must be a non-empty string")
    return Question(_messages(prompt, where), answer, correction)


def load_questions(path: str | os.PathLike[str], checker: str = "answer-tag") -> list[Question]:
    """Questions from JSON lines `{"prompt": str | [chat messages], "answer": str, "correction"?: str}` (the
    demo's `data/*.jsonl` rows have this shape)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{no}"
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where}: not valid JSON: {e}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: a row must be a JSON object")  # noqa: TRY004
            out.append(question(row.get("prompt"), row.get("answer"), checker, row.get("correction"), where))
    if not out:
        raise ValueError(f"{path}: no questions")
    return out


def demo_questions() -> list[Question]:
    """The demo's toy task (`perennial dev --demo`): every fruit in every phrasing, answered `<answer>colour</answer>`."""
    from perennial_trainer.tinymodel import fruit_rows

    return [question(r["prompt"], r["answer"], "answer-tag") for r in fruit_rows()]


# ----------------------------------------------------------------------------- records and series
@dataclass
class Answer:
    """One request of one user. `approved` is None when the request failed (`error` says how)."""

    t: float  # seconds since the start, when the request ended
    user: int
    adapter: str | None
    approved: bool | None
    error: str | None = None
    response_id: str | None = None
    #: "up", "down+correction", None (not rated); `feedback_error` when the rating failed
    feedback: str | None = None
    feedback_error: str | None = None
    rate_limited: int = 0  # 429s met by this request and its rating


@dataclass(frozen=True)
class Change:
    t: float
    label: str
    source: str  # "adapter" (the attribution changed) or "event" (passed in)


@dataclass
class Window:
    index: int
    start: float
    end: float
    requests: int = 0
    answered: int = 0
    approved: int = 0
    errors: int = 0
    rate_limited: int = 0
    feedback_sent: int = 0
    feedback_errors: int = 0
    adapters: list[str] = field(default_factory=list)  # in order of first answer

    @property
    def approval(self) -> Proportion:
        return Proportion(self.approved, self.answered)

    @property
    def adapter_label(self) -> str:
        return " -> ".join(self.adapters) if self.adapters else "-"

    def row(self) -> dict[str, Any]:
        p = self.approval
        lo, hi = p.interval
        return {"window": self.index, "start_s": round(self.start, 3), "end_s": round(self.end, 3), "adapter": self.adapter_label,
                "requests": self.requests, "answered": self.answered, "approved": self.approved,
                "approval": None if p.rate is None else round(p.rate, 6), "ci_low": round(lo, 6), "ci_high": round(hi, 6),
                "errors": self.errors, "rate_limited": self.rate_limited, "feedback_sent": self.feedback_sent,
                "feedback_errors": self.feedback_errors}


def windows(answers: Iterable[Answer], width: float, end: float) -> list[Window]:
    """The answers in windows [i·width, (i+1)·width) up to `end`; a last stretch shorter than half a window (the
    requests in flight when the run stopped) joins the window before it, so the series ends on no tiny sample."""
    if width <= 0:
        raise ValueError("the window must be positive")
    count = max(1, math.ceil(end / width - 0.5))
    out = [Window(i, i * width, end if i == count - 1 else (i + 1) * width) for i in range(count)]
    for a in answers:
        w = out[min(count - 1, max(0, int(a.t // width)))]
        w.requests += 1
        w.rate_limited += a.rate_limited
        if a.approved is None:
            w.errors += 1
        else:
            w.answered += 1
            w.approved += a.approved
            if a.adapter is not None and a.adapter not in w.adapters:
                w.adapters.append(a.adapter)
        if a.feedback is not None:
            w.feedback_sent += 1
        if a.feedback_error is not None:
            w.feedback_errors += 1
    return out


def adapter_changes(answers: Iterable[Answer]) -> list[Change]:
    """A change wherever the adapter of an answer differs from the previous answer's (in time order)."""
    out: list[Change] = []
    prev: str | None = None
    for a in sorted((a for a in answers if a.approved is not None and a.adapter is not None), key=lambda a: a.t):
        if prev is not None and a.adapter != prev:
            out.append(Change(a.t, f"{prev} -> {a.adapter}", "adapter"))
        prev = a.adapter
    return out


@dataclass(frozen=True)
class Stretch:
    """Answers between two change moments."""

    start: float
    end: float
    adapters: tuple[str, ...]
    approval: Proportion

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.approval.interval
        return {"start_s": round(self.start, 3), "end_s": round(self.end, 3), "adapters": list(self.adapters), "approved": self.approval.k,
                "n": self.approval.n, "approval": self.approval.rate, "interval": [lo, hi]}


def stretches(answers: Sequence[Answer], changes: Sequence[Change], end: float) -> list[Stretch]:
    cuts = sorted({c.t for c in changes if 0 < c.t < end})
    bounds = [0.0, *cuts, end]
    out = []
    for lo, hi in itertools.pairwise(bounds):
        last = hi == end
        inside = [a for a in answers if a.approved is not None and lo <= a.t and (a.t < hi or (last and a.t <= hi))]
        names = tuple(dict.fromkeys(a.adapter for a in inside if a.adapter is not None))
        out.append(Stretch(lo, hi, names, Proportion(sum(bool(a.approved) for a in inside), len(inside))))
    return out


def comparisons(parts: Sequence[Stretch]) -> list[Comparison]:
    return [compare(a.approval, b.approval) for a, b in itertools.pairwise(parts)]


def parse_event_time(value: Any, started_wall: float) -> float:
    """An event's time as seconds since the run started: unix seconds or an RFC 3339 string."""
    if isinstance(value, bool):
        raise ValueError("an event's `time` must be unix seconds or an RFC 3339 string")  # noqa: TRY004
    if isinstance(value, int | float):
        return float(value) - started_wall
    if isinstance(value, str):
        t = _dt.datetime.fromisoformat(value)
        if t.tzinfo is None:
            t = t.replace(tzinfo=_dt.UTC)
        return t.timestamp() - started_wall
    raise ValueError("an event's `time` must be unix seconds or an RFC 3339 string")


def read_events(path: str | os.PathLike[str], started_wall: float) -> list[Change]:
    out = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("a row must be a JSON object")  # noqa: TRY004
                label = row.get("label", "event")
                if not isinstance(label, str):
                    raise ValueError("`label` must be a string")  # noqa: TRY004
                out.append(Change(parse_event_time(row.get("time"), started_wall), label, "event"))
            except ValueError as e:
                raise ValueError(f"{path}:{no}: {e}") from None
    return out


# ----------------------------------------------------------------------------- the run
@dataclass
class Settings:
    url: str
    model: str
    token: str | None
    users: int = 8
    duration: float = 60.0
    max_requests: int | None = None
    feedback_rate: float = 1.0
    window: float = 10.0
    think: float = 0.5
    max_tokens: int = 16
    temperature: float | None = None
    timeout: float = 30.0
    retries: int = 2
    seed: int | None = None
    api_key: str = "unused"
    poll: float = 2.0

    def check(self) -> None:
        if not re.match(r"^https?://[^/\s]+", self.url):
            raise ValueError(f"the URL must be http(s)://host[:port][/path] (got {self.url!r})")
        if not self.model:
            raise ValueError("a served model name is needed (--model)")
        if self.users < 1:
            raise ValueError("--users must be at least 1")
        if not 0.0 <= self.feedback_rate <= 1.0:
            raise ValueError("--feedback-rate must be between 0 and 1")
        if self.feedback_rate > 0 and not self.token:
            raise ValueError(f"rating answers needs the Deployment's feedback token: --token-file, ${TOKEN_ENV}, "
                             "--token-secret or --deployment (or --feedback-rate 0)")
        for name in ("duration", "window", "timeout", "poll"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be positive")
        if self.think < 0 or self.retries < 0 or self.max_tokens < 1:
            raise ValueError("--think and --retries must not be negative, --max-tokens at least 1")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError("--requests must be at least 1")

    @property
    def base(self) -> str:
        """The server's root (a trailing `/v1` is accepted and dropped)."""
        return re.sub(r"/v1/?$", "", self.url.rstrip("/"))


@dataclass
class Result:
    settings: Settings
    started_wall: float
    duration: float
    answers: list[Answer]
    errors: Counter[str]
    feedback_errors: Counter[str]
    events: list[Change] = field(default_factory=list)
    #: failed reads of the serving adapter (the answers keep the last one read)
    probe_errors: Counter[str] = field(default_factory=Counter)
    #: moments only marked on the chart (the Deployment's Kubernetes Events): they split no stretch
    markers: list[Change] = field(default_factory=list)

    @property
    def changes(self) -> list[Change]:
        return sorted([*adapter_changes(self.answers), *self.events], key=lambda c: c.t)

    def windows(self) -> list[Window]:
        return windows(self.answers, self.settings.window, self.duration)

    def stretches(self) -> list[Stretch]:
        return stretches(self.answers, self.changes, self.duration)

    @property
    def approval(self) -> Proportion:
        judged = [a for a in self.answers if a.approved is not None]
        return Proportion(sum(bool(a.approved) for a in judged), len(judged))

    def totals(self) -> dict[str, Any]:
        return {
            "requests": len(self.answers),
            "answered": sum(a.approved is not None for a in self.answers),
            "errors": dict(self.errors),
            "rateLimited": sum(a.rate_limited for a in self.answers),
            "feedbackSent": sum(a.feedback is not None for a in self.answers),
            "thumbsUp": sum(a.feedback == "up" for a in self.answers),
            "thumbsDownWithCorrection": sum(a.feedback == "down+correction" for a in self.answers),
            "feedbackErrors": dict(self.feedback_errors),
            "notRated": sum(a.approved is not None and a.feedback is None and a.feedback_error is None for a in self.answers),
            "probeErrors": dict(self.probe_errors),
        }

    def to_dict(self) -> dict[str, Any]:
        parts = self.stretches()
        return {
            "url": self.settings.url, "model": self.settings.model, "users": self.settings.users,
            "feedbackRate": self.settings.feedback_rate, "windowSeconds": self.settings.window,
            "startedAt": _dt.datetime.fromtimestamp(self.started_wall, _dt.UTC).isoformat(),
            "durationSeconds": round(self.duration, 3), "totals": self.totals(),
            "approval": {"approved": self.approval.k, "n": self.approval.n, "rate": self.approval.rate, "interval": list(self.approval.interval)},
            "windows": [w.row() for w in self.windows()],
            "changes": [{"t_s": round(c.t, 3), "label": c.label, "source": c.source} for c in self.changes],
            "markers": [{"t_s": round(c.t, 3), "label": c.label, "source": c.source} for c in self.markers],
            "stretches": [s.to_dict() for s in parts],
            "comparisons": [c.to_dict() for c in comparisons(parts)],
        }


def _error_kind(e: BaseException) -> str:
    import openai

    if isinstance(e, openai.RateLimitError):
        return "429"
    if isinstance(e, openai.APIStatusError):
        return str(e.status_code)
    if isinstance(e, openai.APITimeoutError):
        return "timeout"
    if isinstance(e, openai.APIConnectionError):
        return "connection"
    return type(e).__name__


def format_window(w: Window) -> str:
    return (f"[{w.start:7.1f}s-{w.end:7.1f}s] adapter {w.adapter_label:<24} requests {w.requests:4d} "
            f"(errors {w.errors}, 429s {w.rate_limited})  feedback {w.feedback_sent:4d}  approval {w.approval.format()}")


class Simulation:
    """The users, their client connections and the records of one run. `adapter_probe` (async, no arguments)
    names the adapter serving the model now; polled every `settings.poll` seconds."""

    def __init__(self, settings: Settings, questions: Sequence[Question], *, checker: str = "answer-tag",
                 adapter_probe: Callable[[], Awaitable[str | None]] | None = None, out: TextIO | None = sys.stdout) -> None:
        settings.check()
        if not questions:
            raise ValueError("no questions to ask")
        self.s = settings
        self.questions = list(questions)
        self.check = CHECKERS[checker][0]
        self.probe = adapter_probe
        self.out = out
        self.answers: list[Answer] = []
        self.errors: Counter[str] = Counter()
        self.feedback_errors: Counter[str] = Counter()
        self.probe_errors: Counter[str] = Counter()
        self.adapter: str | None = None
        self.stop = asyncio.Event()
        self.issued = 0
        self._t0 = 0.0
        self.started_wall = 0.0
        #: set once the clock runs (`now()`, `started_wall`): a thread waiting on it sees the run's start
        self.started = threading.Event()
        self._printed = -1

    def now(self) -> float:
        return time.monotonic() - self._t0

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            try:
                await asyncio.wait_for(self.stop.wait(), seconds)
            except TimeoutError:
                pass

    async def _poll(self) -> None:
        assert self.probe is not None
        while not self.stop.is_set():
            try:
                self.adapter = await self.probe()
            except Exception as e:  # noqa: BLE001 - an unreachable API server leaves the last known adapter
                self.probe_errors[type(e).__name__] += 1
            await self._sleep(self.s.poll)

    async def _rate(self, http: Any, user: int, rid: str, q: Question, approved: bool, a: Answer) -> None:
        import aiohttp

        tag = f"sim-{uuid.uuid4().hex}"
        who = f"simulated-user-{user}"
        if approved:
            body = [{"id": f"{tag}-up", "response_id": rid, "thumbs": "up", "user": who}]
        else:
            body = [{"id": f"{tag}-down", "response_id": rid, "thumbs": "down", "user": who},
                    {"id": f"{tag}-fix", "response_id": rid, "correction": q.correction, "user": who}]
        headers = {"Authorization": f"Bearer {self.s.token}"}
        for attempt in range(self.s.retries + 1):
            last = attempt == self.s.retries
            try:
                async with http.post(f"{self.s.base}/v1/feedback", json=body, headers=headers) as r:
                    await r.read()
                    if r.status == 200:
                        a.feedback = "up" if approved else "down+correction"
                        a.feedback_error = None
                        return
                    kind = str(r.status)
                    if r.status == 429:
                        a.rate_limited += 1
                        try:
                            wait = float(r.headers.get("Retry-After", "1"))
                        except ValueError:
                            wait = 1.0
                    elif r.status >= 500:
                        wait = 0.2 * 2 ** attempt
                    else:  # refused (401, 400, ...): retrying changes nothing
                        a.feedback_error = kind
                        self.feedback_errors[kind] += 1
                        return
            except (aiohttp.ClientError, TimeoutError) as e:  # the same ids again: the sidecar stores them once
                kind, wait = type(e).__name__, 0.2 * 2 ** attempt
            if last or self.stop.is_set():
                a.feedback_error = kind
                self.feedback_errors[kind] += 1
                return
            await self._sleep(min(MAX_FEEDBACK_BACKOFF_S, wait))

    async def _user(self, user: int, client: Any, http: Any) -> None:
        rnd = random.Random(None if self.s.seed is None else self.s.seed * 1_000_003 + user)
        await self._sleep(rnd.uniform(0, self.s.think))  # users do not all start in the same instant
        while not self.stop.is_set():
            if self.s.max_requests is not None and self.issued >= self.s.max_requests:
                break
            self.issued += 1
            q = rnd.choice(self.questions)
            extra: dict[str, Any] = {} if self.s.temperature is None else {"temperature": self.s.temperature}
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model=self.s.model, messages=q.chat(), max_tokens=self.s.max_tokens, **extra)
                resp = raw.parse()
                text = (resp.choices[0].message.content or "") if resp.choices else ""
                rid = resp.id or raw.headers.get("x-request-id")
                approved = self.check(text, q)
                a = Answer(self.now(), user, self.adapter or resp.model or None, approved, response_id=rid)
            except Exception as e:  # noqa: BLE001 - every failure is counted, none ends the run
                kind = _error_kind(e)
                self.errors[kind] += 1
                a = Answer(self.now(), user, None, None, error=kind, rate_limited=int(kind == "429"))
                self.answers.append(a)
                await self._sleep(max(self.s.think, 0.2) * rnd.uniform(0.5, 1.5))
                continue
            self.answers.append(a)
            if rid and self.s.feedback_rate > 0 and rnd.random() < self.s.feedback_rate:
                await self._rate(http, user, rid, q, approved, a)
            elif not rid:
                a.feedback_error = "no response id"  # nothing to rate
                self.feedback_errors["no response id"] += 1
            await self._sleep(self.s.think * rnd.uniform(0.5, 1.5))
        if self.s.max_requests is not None and self.issued >= self.s.max_requests:
            self.stop.set()

    async def _report(self) -> None:
        index = 0
        self._printed = -1
        while True:
            await self._sleep(self._t0 + (index + 1) * self.s.window - time.monotonic())
            if self.stop.is_set():
                return
            if self.out is not None:
                w = windows([a for a in self.answers if index * self.s.window <= a.t < (index + 1) * self.s.window],
                            self.s.window, (index + 1) * self.s.window)[index]
                print(format_window(w), file=self.out, flush=True)
                self._printed = index
            index += 1

    async def run(self) -> Result:
        try:
            import aiohttp
            import openai
        except ImportError as e:
            raise RuntimeError(f"simulate-users needs {e.name}: {INSTALL_HINT}") from None
        self.started_wall = started_wall = time.time()
        self._t0 = time.monotonic()
        self.started.set()
        client = openai.AsyncOpenAI(base_url=f"{self.s.base}/v1", api_key=self.s.api_key, max_retries=0, timeout=self.s.timeout)
        timeout = aiohttp.ClientTimeout(total=self.s.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            tasks = [asyncio.create_task(self._user(i, client, http), name=f"user-{i}") for i in range(self.s.users)]
            helpers = [asyncio.create_task(self._report(), name="report")]
            if self.probe is not None:
                try:
                    self.adapter = await self.probe()
                except Exception as e:  # noqa: BLE001
                    self.probe_errors[type(e).__name__] += 1
                helpers.append(asyncio.create_task(self._poll(), name="probe"))
            try:
                await asyncio.wait_for(self.stop.wait(), self.s.duration)
            except TimeoutError:
                pass
            finally:
                self.stop.set()
                # a user finishes the request in flight (bounded by the client's timeout) and records it
                await asyncio.gather(*tasks, return_exceptions=True)
                for h in helpers:
                    h.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)
                await client.close()
        end = self.now()
        if self.out is not None and self.answers:
            w = windows(self.answers, self.s.window, end)[-1]
            if w.requests and w.index > self._printed:  # else its line is out (a few answers in flight join it)
                print(format_window(w), file=self.out, flush=True)
        return Result(self.s, started_wall, end, list(self.answers), self.errors, self.feedback_errors, probe_errors=self.probe_errors)


class BackgroundUsers:
    """A Simulation in a thread of its own (its own event loop), for callers that do other things meanwhile
    (`perennial dev`, benchmarks/loop.py): `start()`, `approval_since(t)` while it runs, `stop()` -> Result."""

    def __init__(self, settings: Settings, questions: Sequence[Question], **kwargs: Any) -> None:
        self.sim = Simulation(settings, questions, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._result: Result | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="simulated-users", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._result = self._loop.run_until_complete(self.sim.run())
        except BaseException as e:  # noqa: BLE001 - handed to the caller by stop()
            self._error = e
        finally:
            self._loop.close()

    def start(self, timeout: float = 60.0) -> BackgroundUsers:
        """Start the users; returns once their clock runs (`elapsed`, `started_wall`)."""
        self._thread.start()
        if not self.sim.started.wait(timeout) and self._error is None:
            raise TimeoutError(f"the simulated users did not start within {timeout:g} s")
        if self._error is not None:
            raise self._error
        return self

    @property
    def started_wall(self) -> float:
        return self.sim.started_wall

    @property
    def elapsed(self) -> float:
        return self.sim.now()

    def answers(self) -> list[Answer]:
        return list(self.sim.answers)  # a copy: the users' thread only ever appends

    def approval_since(self, t: float = 0.0, adapter: str | None = None) -> Proportion:
        """Approval of the answers since `t` seconds after the start (of one adapter, if named)."""
        judged = [a for a in self.answers() if a.approved is not None and a.t >= t and (adapter is None or a.adapter == adapter)]
        return Proportion(sum(bool(a.approved) for a in judged), len(judged))

    def stop(self, timeout: float = 120.0) -> Result:
        """Stop the users (each finishes its request in flight) and return the run's Result."""
        if self._thread.is_alive():
            try:
                self._loop.call_soon_threadsafe(self.sim.stop.set)
            except RuntimeError:  # the loop already closed: the run ended by itself
                pass
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the simulated users did not stop within {timeout:g} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


# ----------------------------------------------------------------------------- outputs
def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_chart(result: Result, path: Path) -> None:
    """Approval rate per window with its Wilson 95% band, each stretch's approval as a level, changes marked."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError(f"the chart needs matplotlib: {INSTALL_HINT}") from None
    matplotlib.use("Agg")  # files only, never a display
    from matplotlib.figure import Figure

    ws = [w for w in result.windows() if w.answered]
    fig = Figure(figsize=(10, 5), dpi=100)
    ax = fig.add_subplot()
    if ws:
        x = [(w.start + w.end) / 2 for w in ws]
        y = [w.approval.rate for w in ws]
        ax.fill_between(x, [w.approval.interval[0] for w in ws], [w.approval.interval[1] for w in ws],
                        alpha=0.2, color="tab:blue", label="Wilson 95% interval")
        ax.plot(x, y, marker="o", color="tab:blue", label=f"approval per {result.settings.window:g} s window")
    for s in result.stretches():
        if s.approval.n:
            ax.hlines(s.approval.rate, s.start, s.end, colors="tab:green", linestyles="dotted")
            ax.annotate(f"{' -> '.join(s.adapters) or 'approval'}: {s.approval.rate:.2f} (n={s.approval.n})", ((s.start + s.end) / 2, s.approval.rate),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8, color="tab:green")
    for c in [*result.changes, *(m for m in result.markers if 0 <= m.t <= result.duration)]:
        color, style = {"adapter": ("tab:red", "--"), "event": ("tab:purple", "--")}.get(c.source, ("tab:gray", ":"))
        ax.axvline(c.t, color=color, linestyle=style, linewidth=1)
        ax.annotate(c.label, (c.t, 0.02), rotation=90, fontsize=7, color=color, ha="right", va="bottom")
    ax.set_xlim(0, max(result.duration, 1e-3))
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("approval rate (answers judged right)")
    total = result.approval
    ax.set_title(f"{result.settings.model} at {result.settings.base}: {result.settings.users} simulated users, approval {total.format()}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    if ws:
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    _atomic_write(path, lambda p: fig.savefig(p, format="png"))


def write_outputs(result: Result, prefix: str | os.PathLike[str]) -> dict[str, Path]:
    """`<prefix>.json`, `<prefix>.csv` and `<prefix>.png`."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = {k: prefix.with_name(prefix.name + "." + k) for k in ("json", "csv", "png")}
    doc = result.to_dict()

    def write_json(p: Path) -> None:
        p.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")

    def write_csv(p: Path) -> None:
        with open(p, "w", newline="", encoding="utf-8") as f:
            rows = doc["windows"]
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["window"])
            w.writeheader()
            w.writerows(rows)

    _atomic_write(paths["json"], write_json)
    _atomic_write(paths["csv"], write_csv)
    write_chart(result, paths["png"])
    return paths


def summary(result: Result) -> list[str]:
    t = result.totals()
    lines = [(f"{t['requests']} requests, {t['answered']} answered, errors {t['errors'] or 0}, 429s {t['rateLimited']}; "
             f"feedback sent {t['feedbackSent']} ({t['thumbsUp']} up, {t['thumbsDownWithCorrection']} down + correction), "
             f"feedback errors {t['feedbackErrors'] or 0}"),
             f"approval overall {result.approval.format()}"]
    parts = result.stretches()
    for s in parts:
        lines.append(f"  {s.start:7.1f}s-{s.end:7.1f}s  {' -> '.join(s.adapters) or '-':<24} approval {s.approval.format()}")
    changes = result.changes
    for part, s in zip(parts[1:], comparisons(parts), strict=True):
        label = ", ".join(c.label for c in changes if c.t == part.start)
        lines.append(f"  at {part.start:.1f}s ({label}): {s.format()}")
    for m in result.markers:
        lines.append(f"  event at {m.t:.1f}s: {m.label}")
    return lines


# ----------------------------------------------------------------------------- the Deployment (kubeconfig)
class DeploymentSource:
    """A Perennial Deployment read through the kubeconfig: its endpoint, its feedback token, and the Adapter
    behind a served name now."""

    def __init__(self, kube: Any, namespace: str, name: str) -> None:
        self.kube, self.namespace, self.name = kube, namespace, name

    def get(self) -> dict[str, Any]:
        obj = self.kube.get("perennial.ai/v1alpha1", "Deployment", self.namespace, self.name)
        if obj is None:
            raise LookupError(f"Deployment {self.namespace}/{self.name} (perennial.ai) not found")
        return obj

    def endpoint(self) -> str | None:
        return (self.get().get("status") or {}).get("endpoint")

    def token(self) -> str:
        ref = ((self.get().get("spec") or {}).get("feedback") or {}).get("tokenSecretRef") or {}
        return secret_value(self.kube, self.namespace, ref.get("name") or f"{self.name}-feedback-token", ref.get("key") or "token")

    def events(self, start_wall: float, end_wall: float) -> list[Change]:
        """The Deployment's rollout and learning Events (and its Adapters' promotions) between two wall-clock times,
        as chart markers (seconds since `start_wall`)."""
        out = []
        for e in self.kube.list("v1", "Event", self.namespace):
            obj = e.get("involvedObject") or {}
            reason = e.get("reason") or ""
            ours = obj.get("name") == self.name or (obj.get("kind") == "Adapter" and self.name in (e.get("message") or ""))
            if reason not in MARKED_REASONS or not ours:
                continue
            stamp = e.get("lastTimestamp") or e.get("eventTime") or e.get("firstTimestamp") or (e.get("metadata") or {}).get("creationTimestamp")
            try:
                t = _dt.datetime.fromisoformat(stamp).timestamp()
            except (TypeError, ValueError):
                continue
            if start_wall - 1 <= t <= end_wall + 1:  # Event times have a resolution of 1 s
                who = "" if obj.get("name") == self.name else f" {obj.get('name')}"
                out.append(Change(t - start_wall, f"{reason}{who}", "k8s"))
        return sorted(out, key=lambda c: c.t)

    def served_adapter(self, model: str) -> str | None:
        for s in (self.get().get("status") or {}).get("servedAdapters") or []:
            if s.get("name") == model:
                adapter = s.get("adapter") or None
                canary = s.get("canaryAdapter")
                return f"{adapter} + canary {canary}" if canary and adapter else adapter
        return None


def secret_value(kube: Any, namespace: str, name: str, key: str = "token") -> str:
    secret = kube.get("v1", "Secret", namespace, name)
    if secret is None:
        raise LookupError(f"Secret {namespace}/{name} not found")
    raw = (secret.get("data") or {}).get(key)
    if not raw:
        raise LookupError(f"Secret {namespace}/{name} has no key {key!r}")
    return base64.b64decode(raw).decode().strip()


# ----------------------------------------------------------------------------- the command
def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("simulate-users", help="a simulated user population asking and rating through a Deployment's endpoint",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", help="the Deployment's endpoint (its status.endpoint; a trailing /v1 is fine); default: read from --deployment")
    p.add_argument("--model", default="fruit", help="the served name to ask")
    p.add_argument("--deployment", help="a Perennial Deployment: its endpoint, feedback token and the Adapter behind --model (polled)")
    p.add_argument("--namespace", "-n", default="default")
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    p.add_argument("--context", default=None)
    p.add_argument("--token-file", help=f"a file holding the feedback bearer token (else ${TOKEN_ENV}, else --token-secret / --deployment)")
    p.add_argument("--token-secret", help="a Secret (key `token`) holding the feedback token, read through the kubeconfig")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the completions' API key, if any "
                   "(Perennial's completions need none)")
    p.add_argument("--users", type=int, default=8, help="concurrent users")
    p.add_argument("--duration", type=float, default=60.0, help="seconds to run (Ctrl-C ends early and still writes the outputs)")
    p.add_argument("--requests", type=int, default=None, help="stop after this many requests in all")
    p.add_argument("--feedback-rate", type=float, default=1.0, help="probability that a user rates an answer")
    p.add_argument("--window", type=float, default=10.0, help="seconds per window of the live lines and the chart")
    p.add_argument("--think", type=float, default=0.5, help="mean seconds a user waits between questions")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=None, help="default: the server's")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=2, help="retries of a rating that got no answer, a 5xx or a 429 (same ids: stored once)")
    p.add_argument("--questions", help="JSON lines {prompt, answer[, correction]}; default: the demo's fruit-colour questions")
    p.add_argument("--checker", choices=sorted(CHECKERS), default="answer-tag",
                   help="how an answer is judged right: answer-tag = '<answer>{answer}</answer>' (the demo's)")
    p.add_argument("--events", help="JSON lines {time, label}: extra moments to mark (e.g. promotions), read at the end")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between reads of the Deployment's served adapter")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default="perennial-users", help="writes <out>.png, <out>.csv and <out>.json")
    p.set_defaults(func=main)
    return p


def _token(args: argparse.Namespace, source: DeploymentSource | None, kube: Any) -> str | None:
    if args.token_file:
        return Path(args.token_file).read_text(encoding="utf-8").strip() or None
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    if args.token_secret:
        return secret_value(kube, args.namespace, args.token_secret)
    if source is not None:
        return source.token()
    return None


def main(args: argparse.Namespace) -> int:
    try:
        kube = source = None
        if args.deployment or args.token_secret:
            from .kube import connect

            kube = connect(kubeconfig=args.kubeconfig, context=args.context)
            if args.deployment:
                source = DeploymentSource(kube, args.namespace, args.deployment)
        url = args.url or (source.endpoint() if source else None)
        if not url:
            raise ValueError("where to send requests: --url, or --deployment of a Deployment with status.endpoint")
        token = _token(args, source, kube) if args.feedback_rate > 0 else None
        questions = load_questions(args.questions, args.checker) if args.questions else demo_questions()
        settings = Settings(url=url, model=args.model, token=token, users=args.users, duration=args.duration,
                            max_requests=args.requests, feedback_rate=args.feedback_rate, window=args.window, think=args.think,
                            max_tokens=args.max_tokens, temperature=args.temperature, timeout=args.timeout, retries=args.retries,
                            seed=args.seed, api_key=os.environ.get(args.api_key_env) or "unused", poll=args.poll)
        probe = None
        if source is not None:
            src = source

            async def probe() -> str | None:
                return await asyncio.to_thread(src.served_adapter, args.model)
        sim = Simulation(settings, questions, checker=args.checker, adapter_probe=probe)
    except Exception as e:  # noqa: BLE001 - bad flags or files, an unreachable or refusing API server: one line, exit 2
        print(f"simulate-users: {e}", file=sys.stderr)
        return 2
    print(f"{settings.users} simulated users asking {settings.model} at {settings.base} for {settings.duration:g} s "
          f"({len(questions)} questions, feedback rate {settings.feedback_rate:g})", flush=True)

    async def go() -> Result:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, sim.stop.set)
            loop.add_signal_handler(signal.SIGTERM, sim.stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread / platform without them
            pass
        return await sim.run()

    try:
        result = asyncio.run(go())
        if args.events:
            result.events = read_events(args.events, result.started_wall)
        if source is not None:
            try:
                result.markers = source.events(result.started_wall, result.started_wall + result.duration)
            except Exception as e:  # noqa: BLE001 - markers are a garnish: the run's outputs are written regardless
                print(f"simulate-users: could not read the Deployment's Events: {e}", file=sys.stderr)
        for line in summary(result):
            print(line)
        paths = write_outputs(result, args.out)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"simulate-users: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
