"""Continuous learning when the feedback store fails, while the Deployment serves: end to end on one machine.

The operator's children run in the local runtime (pods as processes: the real sidecar in front of a stand-in engine,
Services on local ports); the sidecar ships its segments to the Deployment's `feedback.storeUri` (a PVC directory),
and the learning loop reads it. A client asks through the Deployment's endpoint all along. Then:

1. the store's volume goes away (the directory is replaced by a file, as when a volume is not mounted): the
   Deployment's `Learning` condition turns False `StoreUnreachable` naming the store, with a Warning Event; the
   client's requests and ratings are still answered (the sidecar keeps the records in its spool), `Ready` and the
   endpoint do not move, and no TrainingRun is made;
2. the volume comes back holding damaged segments (invalid JSON, records of an unknown kind, ratings that fail the
   schema -- more of them than the threshold -- and a segment with a torn last line): the spooled ratings arrive
   and are counted, the damaged ones are skipped and counted by reason in the condition and a Warning Event naming
   a damaged segment, and still no TrainingRun: the good ratings are below `minNewRecords`;
3. more ratings through the sidecar reach the threshold: the loop creates its TrainingRun, whose snapshot holds
   exactly the good ratings.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from harness import API, running_cluster, wait_for
from perennial.controllers import learning
from perennial.feedback import store as store_module
from perennial.feedback.store import FeedbackStore
from perennial_records import segment_name

NS = "default"
DEP = "chat"
IMAGE = "perennial-server:learn"
MIN_NEW = 12
ENTRY = str(Path(__file__).with_name("serving_entry.py"))
# the sidecar rolls a spool segment every second and looks to ship every half second (defaults: 60 s, 2 s)
SIDECAR = [sys.executable, "-c", "import os, runpy; os.environ['PERENNIAL_SEGMENT_MAX_AGE_S'] = '1'; "
           "os.environ['PERENNIAL_SHIP_INTERVAL_S'] = '0.5'; runpy.run_path(" + repr(ENTRY) + ", run_name='__main__')"]


def spec() -> dict[str, Any]:
    return {
        "baseModelRef": {"name": "base"}, "engine": {"type": "Transformers"}, "replicas": 1,
        "strategy": {"blueGreen": {"scaleDownDelaySeconds": 2, "smokeTest": {"expectRegex": "hello from chat-", "timeoutSeconds": 20}}},
        "feedback": {"enabled": True, "samplePercent": 100, "storeUri": "pvc://feedback/chat"},
        "continuousLearning": {"enabled": True, "adapterFamily": "chat", "minNewRecords": MIN_NEW, "minIntervalSeconds": 0,
                               "template": {"method": "SFT", "resources": {"gpus": 0}}},
    }


class Client:
    """Asks through the endpoint every 50 ms (no rating) and, on demand, asks and rates (a thumbs-up each); counts
    every failure."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token
        self.answers: list[float] = []
        self.errors: list[str] = []
        self.rated = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def ask(self) -> str:
        out = self._post("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hi"}]})
        assert out["choices"][0]["message"]["content"].startswith("hello from chat-"), out
        self.answers.append(time.monotonic())
        return out["id"]

    def rate(self, n: int) -> None:
        for _ in range(n):
            rid = self.ask()
            self._post("/v1/feedback", [{"id": f"fb-{uuid.uuid4().hex}", "response_id": rid, "thumbs": "up"}],
                       {"Authorization": f"Bearer {self.token}"})
            self.rated += 1

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.ask()
            except Exception as exc:  # noqa: BLE001 - every failure counts
                self.errors.append(repr(exc))
            time.sleep(0.05)

    def answered_between(self, t0: float, t1: float) -> int:
        return sum(t0 <= t <= t1 for t in self.answers)


def damage(store_dir: Path) -> tuple[int, int]:
    """Write damaged segments into the store (as a crashed writer or a broken copy would leave them): 26 ratings that
    fail the schema (more than the threshold), 6 lines of invalid JSON, 4 records of an unknown kind, and a segment
    whose last line is torn. Returns (lines skipped, segments damaged)."""
    now = dt.datetime.now(dt.UTC)
    bad = [json.dumps({"kind": "feedback", "responseId": f"x{i}", "type": "thumbs", "deployment": DEP}) for i in range(26)]  # no `thumbs`
    bad += ["{not json" for _ in range(6)] + [json.dumps({"kind": "mystery", "id": f"m{i}"}) for i in range(4)]
    first = store_dir / segment_name(DEP, "gone-pod", 1, now)
    first.parent.mkdir(parents=True, exist_ok=True)
    first.write_text("\n".join(bad) + "\n")
    torn = store_dir / segment_name(DEP, "gone-pod", 2, now)
    good = json.dumps({"kind": "interaction", "id": "i-torn", "deployment": DEP, "response": "ok", "time": now.isoformat()})
    torn.write_text(good + "\n" + '{"kind": "feedback", "responseId": "i-torn", "type": "thu')  # cut mid-record
    return len(bad) + 1, 2


def test_store_outage_and_damaged_segments_leave_serving_alone_and_the_loop_recovers(tmp_path: Path):
    from perennial.local.cluster import LocalCluster
    from perennial.local.kubelet import DEFAULT_COMMANDS

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    store_module._shared.clear()  # the store objects of earlier tests in this process
    with running_cluster(tmp_path, server_image=IMAGE, learning_seconds=0.5) as cluster:
        runtime = LocalCluster(cluster.kube, cluster.server, workdir=tmp_path / "pods", pvc_root=tmp_path / "pvc",
                               images={IMAGE: SIDECAR}, commands={**DEFAULT_COMMANDS, "perennial-server": SIDECAR},
                               pod_options={"restart_backoff_seconds": 0.5, "max_grace_seconds": 10}).start()
        client = None
        try:
            cluster.create("BaseModel", "base", {"source": {"uri": f"file://{model}"}})
            cluster.wait_condition("BaseModel", "base", "Ready", "True")
            cluster.create("Deployment", DEP, spec())
            cluster.wait_condition("Deployment", DEP, "Ready", "True", timeout=120)
            status = wait_for(lambda: (s := cluster.get("Deployment", DEP)["status"]).get("endpoint", "").startswith("http://127.0.0.1:") and s,
                              timeout=60, message="the local endpoint in status")
            endpoint = status["endpoint"]
            cluster.wait_condition("Deployment", DEP, "Learning", "True", "Collecting", timeout=60)
            ready = cluster.condition("Deployment", DEP, "Ready")
            secret = cluster.kube.get("v1", "Secret", NS, f"{DEP}-feedback-token")
            client = Client(endpoint, base64.b64decode(secret["data"]["token"]).decode())
            client.thread.start()

            def runs() -> list[dict[str, Any]]:
                return [r for r in cluster.kube.list(API, "TrainingRun", NS)
                        if (r["metadata"].get("labels") or {}).get(learning.DEPLOYMENT_LABEL) == DEP]

            def learning_cond() -> dict[str, Any]:
                return cluster.condition("Deployment", DEP, "Learning") or {}

            # 1. the volume goes away: a file where the store's directory was
            store_dir = tmp_path / "pvc" / "feedback" / "chat"
            away = store_dir.with_name("chat.unmounted")
            wait_for(store_dir.is_dir, timeout=60, message="the store directory (made for the sidecar's mount)")
            store_dir.rename(away)
            store_dir.write_text("not a directory")
            t_out = time.monotonic()
            down = cluster.wait_condition("Deployment", DEP, "Learning", "False", "StoreUnreachable", timeout=60)
            assert "feedback" in down["message"] and "not a directory" in down["message"], down
            assert "serving is not affected" in down["message"]
            wait_for(lambda: any(e["type"] == "Warning" and e["reason"] == "StoreUnreachable" for e in cluster.events(DEP)), timeout=30,
                     message="a Warning Event saying the store cannot be read")
            client.rate(5)  # answered and rated while the store is gone: the sidecar keeps them in its spool
            time.sleep(3)  # several looks of the loop (every 0.5 s)
            assert learning_cond().get("reason") == "StoreUnreachable"
            assert runs() == []
            assert cluster.condition("Deployment", DEP, "Ready") == ready  # not even its lastTransitionTime moved
            assert cluster.get("Deployment", DEP)["status"]["endpoint"] == endpoint
            assert client.answered_between(t_out, time.monotonic()) >= 5 and not client.errors, client.errors[:5]

            # 2. the volume is back, holding damaged segments besides what was shipped before
            skipped, segments = damage(away)
            store_dir.unlink()
            away.rename(store_dir)
            wait_for(lambda: (cluster.get("Deployment", DEP).get("status") or {}).get("newFeedbackRecords") == 5, timeout=90,
                     message=f"the 5 spooled ratings counted once the store is back: {learning_cond()}")
            back = cluster.wait_condition("Deployment", DEP, "Learning", "True", "Collecting", timeout=30)
            assert f"{skipped} record(s) skipped" in back["message"], back
            for reason, n in (("InvalidRecord", 26), ("InvalidJSON", 6), ("UnknownKind", 4), ("TornLine", 1)):
                assert f"{reason} {n}" in back["message"], back
            assert f"in {segments} segment(s)" in back["message"] and "gone-pod" in back["message"], back
            warned = wait_for(lambda: [e for e in cluster.events(DEP) if e["type"] == "Warning" and e["reason"] == "FeedbackRecordsSkipped"],
                              timeout=30, message="a Warning Event counting the skipped records")
            assert f"{skipped} record(s)" in warned[0]["message"] and "gone-pod" in warned[0]["message"], warned
            time.sleep(2)
            assert runs() == [], "no TrainingRun from damaged records"

            # 3. recovery: good ratings reach the threshold
            client.rate(MIN_NEW - 5)
            run = wait_for(lambda: next(iter(runs()), None), timeout=90, message=f"the TrainingRun once {MIN_NEW} good ratings are in")
            assert run["metadata"]["name"] == learning.run_name(DEP, 1)
            assert len(runs()) == 1
            snap = FeedbackStore(f"file://{store_dir}").get_snapshot(DEP, 1)
            assert snap is not None and snap.counts.ratings == MIN_NEW, snap
            cluster.wait_condition("Deployment", DEP, "Learning", "True", timeout=30)
            # serving never noticed
            client.stop.set()
            client.thread.join(30)
            assert not client.errors, client.errors[:5]
            assert cluster.condition("Deployment", DEP, "Ready") == ready
            assert cluster.get("Deployment", DEP)["status"]["endpoint"] == endpoint
        finally:
            if client is not None:
                client.stop.set()
            runtime.stop()
            store_module._shared.clear()
            shutil.rmtree(tmp_path / "pods", ignore_errors=True)
