"""Operator-wide settings, from the environment (the Helm chart sets them)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default) or default


@dataclass(frozen=True)
class OperatorConfig:
    trainer_image: str = field(default_factory=lambda: _env("PERENNIAL_TRAINER_IMAGE", "ghcr.io/perennial-ai/perennial-trainer:0.1.0"))
    server_image: str = field(default_factory=lambda: _env("PERENNIAL_SERVER_IMAGE", "ghcr.io/perennial-ai/perennial-server:0.1.0"))
    #: Where artifacts go when a TrainingRun names no `output.artifactUri`.
    artifact_uri: str = field(default_factory=lambda: _env("PERENNIAL_ARTIFACT_URI", "pvc://perennial-artifacts/adapters"))
    #: Feedback store when a Deployment names none.
    feedback_store_uri: str = field(default_factory=lambda: _env("PERENNIAL_FEEDBACK_STORE_URI", "pvc://perennial-feedback/store"))
    #: Where the operator's own pod mounts the PVCs it reads (`pvc://<claim>/<path>` -> `<root>/<claim>/<path>`).
    pvc_root: str = field(default_factory=lambda: _env("PERENNIAL_PVC_ROOT", "/mnt/pvc"))
    #: Seconds between looks for what cannot be watched (an Adapter's missing artifact in storage).
    resync_seconds: float = field(default_factory=lambda: float(_env("PERENNIAL_RESYNC_SECONDS", "30")))
    #: Seconds between reads of a running trainer's progress (its pod log).
    progress_seconds: float = field(default_factory=lambda: float(_env("PERENNIAL_PROGRESS_SECONDS", "5")))
    #: Progress reads (pod logs of running trainers) per second, all runs together: with many runs,
    #: each is read less often than every `progress_seconds`.
    progress_reads_per_second: float = field(default_factory=lambda: float(_env("PERENNIAL_PROGRESS_READS_PER_SECOND", "20")))
    #: Concurrent reconciles (all kinds).
    workers: int = field(default_factory=lambda: int(_env("PERENNIAL_WORKERS", "16")))
