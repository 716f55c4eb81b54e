"""Fixtures of the integration tests (the harness lives in tests/harness.py).

Every flow runs twice: against a well-behaved control plane, and against one that
fights back (500s, 429 with Retry-After, 409s, slow answers, watches closed
mid-stream, 410 on resume) at `PERENNIAL_TEST_FAULT_RATE` (default 5 %) of the
operator's requests. Under faults, each test must still pass and leave no
duplicate children.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import API, Cluster, running_cluster, wait_for

from perennial.local.faults import FaultConfig

LOCAL_URL = "perennial.ai/local-url"  # the Service annotation the local runtime's proxy writes


def fault_config(seed: int) -> FaultConfig:
    rate = float(os.environ.get("PERENNIAL_TEST_FAULT_RATE", "0.05"))
    return FaultConfig(rate=rate, seed=seed, retry_after_seconds=1, slow_ms=100, watch_close_after=(0.2, 2.0))


def record_managers(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The operator's controller managers, as `runtime` makes them from now on (a test reads their watch-fed cache,
    e.g. to wait until the operator has seen a change before acting on it)."""
    from perennial import runtime

    managers: list[Any] = []

    class Recorded(runtime.Manager):  # type: ignore[name-defined,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            managers.append(self)

    monkeypatch.setattr(runtime, "Manager", Recorded)
    return managers


def proxy_service(kube: Any, managers: list[Any], namespace: str, name: str, url: str, timeout: float = 60) -> None:
    """Play the local kube-proxy: Service `name` answers at `url` (the annotation `perennial.local.proxy` writes), and
    wait until the operator's watch-fed cache has it. The operator acts on its cache: it must have seen the URL before
    the pods get ready, else its smoke test may run against the Service's DNS name, fail, and abort the rollout, as it
    should for a real failure."""
    wait_for(lambda: kube.get("v1", "Service", namespace, name), timeout=timeout, message=f"Service {name}")
    kube.patch("v1", "Service", namespace, name, {"metadata": {"annotations": {LOCAL_URL: url}}})
    cache = managers[-1].cache
    wait_for(lambda: ((cache.get("v1", "Service", namespace, name) or {}).get("metadata", {}).get("annotations") or {}).get(LOCAL_URL) == url,
             timeout=timeout, message=f"the operator's cache has the local URL of {name}")


def assert_no_duplicates(cluster: Cluster) -> None:
    jobs = collections.Counter(
        ((j["metadata"].get("ownerReferences") or [{}])[0].get("uid"), j["metadata"]["labels"].get("app.kubernetes.io/component"), j["metadata"]["name"])
        for j in cluster.kube.list("batch/v1", "Job", None)
    )
    runs = collections.Counter((uid, comp) for (uid, comp, _name) in jobs if comp == "trainer")
    assert all(n == 1 for n in runs.values()), f"a TrainingRun has more than one Job: {runs}"
    made = collections.Counter(((a["spec"].get("lineage") or {}).get("trainingRunUid")) for a in cluster.kube.list(API, "Adapter", None))
    made.pop(None, None)
    assert all(n == 1 for n in made.values()), f"a TrainingRun made more than one Adapter: {made}"


@pytest.fixture(params=["clean", "faults"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    faults = fault_config(seed=len(request.node.nodeid)) if request.param == "faults" else None
    with running_cluster(tmp_path, faults=faults) as c:
        yield c
        if faults is not None:
            assert_no_duplicates(c)


@pytest.fixture
def clean_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """For tests that count requests exactly: no faults."""
    with running_cluster(tmp_path) as c:
        yield c
