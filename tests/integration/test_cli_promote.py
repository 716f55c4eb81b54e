"""`perennial promote <name>`: the verb the rollout's own message names sets the promotion annotation to the value
the status says waits (`status.regions[].pendingPromotion`), against the embedded control plane."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from perennial.api.deployment import PROMOTE_ANNOTATION
from perennial.cli import install_crds, main
from perennial.kube import connect
from perennial.local.apiserver import start_in_thread

API = "perennial.ai/v1alpha1"


@pytest.fixture
def kube_and_config(tmp_path: Path) -> Iterator[tuple[Any, str]]:
    server = start_in_thread()
    try:
        kube = connect(server=server.url)
        install_crds(kube)
        yield kube, str(server.write_kubeconfig(tmp_path / "kubeconfig"))
    finally:
        server.stop()


def waiting(kube: Any, *pending: str | None) -> None:
    kube.create({"apiVersion": API, "kind": "Deployment", "metadata": {"name": "chat", "namespace": "default"},
                 "spec": {"baseModelRef": {"name": "base"}, "strategy": {"blueGreen": {"autoPromote": False}}}})
    regions = [{"name": f"r{i}", **({"pendingPromotion": p} if p else {})} for i, p in enumerate(pending)]
    kube.patch(API, "Deployment", "default", "chat", {"status": {"regions": regions}}, subresource="status")


def annotation(kube: Any) -> str | None:
    return (kube.get(API, "Deployment", "default", "chat")["metadata"].get("annotations") or {}).get(PROMOTE_ANNOTATION)


def test_promote_sets_the_annotation_to_the_pending_revision(kube_and_config, capsys):
    kube, config = kube_and_config
    waiting(kube, "3f2a9c01be", None, "3f2a9c01be")
    assert main(["promote", "chat", "--kubeconfig", config]) == 0
    assert annotation(kube) == "3f2a9c01be"
    assert "promoted: perennial.ai/promote=3f2a9c01be" in capsys.readouterr().out


def test_promote_refuses_when_nothing_or_several_things_wait(kube_and_config, capsys):
    kube, config = kube_and_config
    assert main(["promote", "missing", "--kubeconfig", config]) == 1
    waiting(kube, None)
    assert main(["promote", "chat", "--kubeconfig", config]) == 1
    assert "no rollout waits for a promotion" in capsys.readouterr().err
    kube.patch(API, "Deployment", "default", "chat", {"status": {"regions": [{"name": "a", "pendingPromotion": "aaa"},
                                                                            {"name": "b", "pendingPromotion": "bbb"}]}}, subresource="status")
    assert main(["promote", "chat", "--kubeconfig", config]) == 1
    assert "name one with --value" in capsys.readouterr().err
    assert annotation(kube) is None
    assert main(["promote", "chat", "--kubeconfig", config, "--value", "bbb"]) == 0
    assert annotation(kube) == "bbb"
