"""benchmarks/loop.py --loop: the loop's moments read from polls and the simulated users' answers (pure)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from loop_live import Observation, approval_of, records_sent_at, report, timeline
from perennial.simusers import Answer, Result, Settings


def ans(t: float, adapter: str | None, approved: bool | None, feedback: str | None = None) -> Answer:
    return Answer(t, 0, adapter, approved, feedback=feedback)


ANSWERS = [
    ans(1.0, "fruit-v1", True, "up"),             # 1 record
    ans(2.0, "fruit-v1", False, "down+correction"),  # 3
    ans(3.0, "fruit-v1", False, None),
    ans(4.0, "fruit-v1", False, "down+correction"),  # 5: the threshold of 5
    ans(5.0, None, None),                          # a failed request
    ans(30.0, "fruit-v2", True, "up"),
    ans(31.0, "fruit-v2", True, "up"),
    ans(32.0, "fruit-v2", False, "down+correction"),
]


@pytest.mark.parametrize(("count", "t"), [(1, 1.0), (2, 2.0), (3, 2.0), (5, 4.0), (6, 30.0), (11, None)])
def test_records_sent_counts_a_correction_as_a_second_record(count: int, t: float | None) -> None:
    assert records_sent_at(ANSWERS, count) == t


def test_timeline_takes_the_first_new_run_its_adapter_and_the_first_poll_serving_it() -> None:
    polls = [
        Observation(3.0, 3, "fruit-v1", {"fruit-sft": -100.0}, {"fruit-v1": (-90.0, "fruit-sft")}),
        # the threshold passed and a run was created in the same pass: the status already counts from it
        Observation(6.0, 0, "fruit-v1", {"fruit-sft": -100.0, "fruit-chat-1": 5.0}, {"fruit-v1": (-90.0, "fruit-sft")}),
        Observation(20.0, 1, "fruit-v1", {"fruit-sft": -100.0, "fruit-chat-1": 5.0, "fruit-chat-2": 19.0},
                    {"fruit-v1": (-90.0, "fruit-sft"), "fruit-v2": (18.0, "fruit-chat-1"), "other": (10.0, None)}),
        Observation(25.0, 6, "fruit-v1 + canary fruit-v2", {}, {}),
    ]
    tl = timeline(polls, ANSWERS, 5, {"fruit-sft"}, "fruit-v1")
    assert (tl.threshold, tl.seen, tl.run, tl.run_created, tl.adapter, tl.adapter_created, tl.serving, tl.answered) == (
        4.0, 25.0, "fruit-chat-1", 5.0, "fruit-v2", 18.0, 25.0, 30.0)
    assert tl.before == "fruit-v1"
    # another adapter answered between the start and the new one: it is the "before"
    mid = [*ANSWERS[:5], ans(20.0, "fruit-v1b", False), *ANSWERS[5:]]
    assert timeline(polls, mid, 5, {"fruit-sft"}, "fruit-v1").before == "fruit-v1b"
    # nothing new yet: no run, no adapter, no serving
    empty = timeline(polls[:1], ANSWERS[:2], 5, {"fruit-sft"}, "fruit-v1")
    assert (empty.threshold, empty.run, empty.adapter, empty.serving, empty.answered) == (None, None, None, None, None)


def test_report_prints_each_step_from_the_threshold_and_approval_before_after() -> None:
    polls = [Observation(26.0, 0, "fruit-v2", {"fruit-chat-1": 5.0}, {"fruit-v2": (18.0, "fruit-chat-1")})]
    tl = timeline(polls, ANSWERS, 5, set(), "fruit-v1")
    assert approval_of(ANSWERS, "fruit-v1").n == 4 and approval_of(ANSWERS, "fruit-v2").k == 2
    result = Result(Settings(url="http://x", model="fruit", token=None, feedback_rate=0), 0.0, 40.0, ANSWERS, {}, {})  # type: ignore[arg-type]
    text = "\n".join(report(tl, result))
    assert re.search(r"run +5\.0  \(\+1\.0 s from the threshold\)", text)
    assert re.search(r"serving +26\.0  \(\+22\.0 s from the threshold\)", text)
    assert re.search(r"seen +-\n", text)
    assert "before 0.250 [0.046, 0.699] n=4 -> after 0.667 [0.208, 0.939] n=3" in text


def test_loop_section_against_a_stand_in_operator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The section's polling, end to end: an embedded control plane, a stand-in sidecar (tests/unit/test_simusers.py)
    and a stand-in operator thread that, once the users sent minNewRecords rating records, creates a TrainingRun,
    its Adapter, and moves the served name to it (the sidecar answering right from then on)."""
    import argparse
    import threading

    from loop_live import add_arguments, loop_section
    from perennial.cli import install_crds
    from perennial.kube import connect
    from perennial.local.apiserver import new_token, start_in_thread
    from perennial.local.tls import self_signed
    from test_simusers import TOKEN, FakeSidecar

    server = start_in_thread(token=new_token(), tls=self_signed())
    sidecar = FakeSidecar()
    stop = threading.Event()
    try:
        kube = connect(server=server.url, token=server.token, ca_file=server.ca_file)
        install_crds(kube)
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        api = "perennial.ai/v1alpha1"

        def serve(adapter: str) -> None:
            kube.patch_status(api, "Deployment", "default", "fruit-chat",
                              {"endpoint": sidecar.url, "servedAdapters": [{"name": "fruit", "adapter": adapter}]})

        kube.create({"apiVersion": api, "kind": "Deployment", "metadata": {"name": "fruit-chat", "namespace": "default"},
                     "spec": {"baseModelRef": {"name": "tiny"}, "adapters": [{"name": "fruit", "track": {"family": "fruit"}}],
                              "feedback": {"enabled": True, "storeUri": "pvc://feedback/fruit-chat"},
                              "continuousLearning": {"enabled": True, "adapterFamily": "fruit", "minNewRecords": 20}}})
        kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "fruit-chat-feedback-token", "namespace": "default"},
                     "stringData": {"token": TOKEN}})
        serve("fruit-v1")

        def operator() -> None:
            while not stop.is_set() and len(sidecar.stored) < 20:
                stop.wait(0.05)
            if stop.is_set():
                return
            kube.create({"apiVersion": api, "kind": "TrainingRun", "metadata": {"name": "fruit-chat-1", "namespace": "default"},
                         "spec": {"method": "SFT", "baseModelRef": {"name": "tiny"}, "datasets": [{"name": "d", "uri": "pvc://data/sft.jsonl"}],
                                  "resources": {"gpus": 0}, "output": {"adapterFamily": "fruit"}}})
            kube.create({"apiVersion": api, "kind": "Adapter", "metadata": {"name": "fruit-v2", "namespace": "default"},
                         "spec": {"baseModelRef": {"name": "tiny"}, "family": "fruit", "version": 2, "artifactUri": "file:///tmp/a",
                                  "lora": {"rank": 8, "alpha": 16}, "lineage": {"trainingRunRef": {"name": "fruit-chat-1"}}}})
            serve("fruit-v2")
            sidecar.adapter = "good"

        op = threading.Thread(target=operator, daemon=True)
        op.start()
        p = argparse.ArgumentParser()
        add_arguments(p)
        args = p.parse_args(["--loop-kubeconfig", str(kubeconfig), "--loop-users", "2", "--loop-think", "0.02", "--loop-after", "2",
                             "--loop-poll", "0.2", "--loop-timeout", "300", "--loop-out", str(tmp_path / "users")])
        loop_section(args, str(tmp_path))
    finally:
        stop.set()
        sidecar.stop()
        server.stop()
    out = capsys.readouterr().out
    assert "TrainingRun fruit-chat-1, Adapter fruit-v2, served before fruit-v1" in out
    steps = {m[1]: float(m[2]) for m in re.finditer(r"^  (threshold|run|adapter|serving|answered) +(-?\d+\.\d)", out, re.MULTILINE)}
    assert set(steps) == {"threshold", "run", "adapter", "serving", "answered"}, out
    # one clock: the run and its adapter were created after the users started, within the test's minutes
    assert all(-2.0 <= t <= 300.0 for t in steps.values()), steps
    # the stand-in operator moved the name only after 20 rating records were stored: after the users' threshold
    assert steps["threshold"] <= steps["serving"] and steps["threshold"] <= steps["answered"]
    line = next(ln for ln in out.splitlines() if ln.startswith("approval of fruit-v1 vs fruit-v2"))
    assert line.endswith(": higher"), line
    assert (tmp_path / "users.png").read_bytes()[:4] == b"\x89PNG"
    markers = [m["label"] for m in json.loads((tmp_path / "users.json").read_text())["markers"]]
    assert markers == ["20 rating records sent", "TrainingRun fruit-chat-1", "Adapter fruit-v2"]
