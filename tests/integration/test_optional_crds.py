"""Add-ons installed while the operator runs (issue 15), against the embedded control plane: KEDA's CRD installed
after a `provider: KEDA` Deployment was reported `KEDANotInstalled` makes its ScaledObject at once, without a
restart. (LeaderWorkerSet: tests/integration/test_deployment_lws.py; JobSet and TrainJob:
tests/integration/test_trainingrun_engines.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import wait_for
from test_chart_rbac_flows import KEDA_CRD
from test_deployment_controller import NS, Serving, serving_cluster, spec

KEDA = {"enabled": True, "provider": "KEDA", "minReplicas": 1, "maxReplicas": 3, "metric": "QueueLength", "prometheusAddress": "http://prometheus:9090"}


@pytest.fixture
def serving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Serving]:
    with serving_cluster(tmp_path, monkeypatch) as w:
        yield w


def scaled_objects(w: Serving) -> list[dict]:
    return w.kube.list("keda.sh/v1alpha1", "ScaledObject", NS) if w.kube.request("GET", "/apis/keda.sh/v1alpha1") else []


def test_keda_installed_while_the_operator_runs_is_used_without_a_restart(serving: Serving):
    w = serving
    w.cluster.create("Deployment", "scaled", spec(autoscaling=KEDA))
    w.proxied("scaled-preview")
    w.ready("scaled-blue")
    w.cluster.wait_condition("Deployment", "scaled", "Degraded", "True", "KEDANotInstalled", timeout=30)
    w.kube.apply(KEDA_CRD)
    (so,) = wait_for(lambda: scaled_objects(w), timeout=30, message="the ScaledObject once KEDA's CRD is served, without a restart")
    assert so["spec"]["scaleTargetRef"]["name"] == "scaled-blue"
    wait_for(lambda: (w.cluster.condition("Deployment", "scaled", "Degraded") or {}).get("reason") != "KEDANotInstalled",
             timeout=30, message="KEDANotInstalled cleared")
    assert len(w.managers) == 1, "the operator was not restarted"
