"""Fixtures of the integration tests (the harness lives in harness.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Cluster

from perennial.cli import install_crds
from perennial.config import OperatorConfig
from perennial.kube import connect
from perennial.local.apiserver import start_in_thread


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    server = start_in_thread()
    kube = connect(server=server.url)
    install_crds(kube)
    config = OperatorConfig(pvc_root=str(tmp_path / "pvc"), artifact_uri=f"file://{tmp_path}/artifacts", feedback_store_uri=f"file://{tmp_path}/feedback", trainer_image="perennial-trainer:test")
    c = Cluster(server=server, kube=kube, config=config)
    c.start_operator()
    try:
        yield c
    finally:
        try:
            c.stop_operator()
        finally:
            server.stop()
