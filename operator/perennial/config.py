"""Operator-wide settings, from the environment (the Helm chart sets them)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .resources.networkpolicy import EgressSettings
from .resources.podsecurity import PodSettings

if TYPE_CHECKING:
    from .resources.deployment import ServingSettings


def _list(name: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in os.environ.get(name, "").split(",") if x.strip())


#: a Secret's name: a DNS subdomain
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


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
    #: each is read less often than every `progress_seconds` (5 a second: 25 trainers are read every 5 s;
    #: each read is one API request the API server proxies to a kubelet, and ~1.5 ms of the operator's CPU).
    progress_reads_per_second: float = field(default_factory=lambda: float(_env("PERENNIAL_PROGRESS_READS_PER_SECOND", "5")))
    #: Seconds between looks at the feedback store of a Deployment with `continuousLearning.enabled` (the store cannot
    #: be watched; a look reads only segments new since the last one). Deployments without it are never looked at.
    learning_seconds: float = field(default_factory=lambda: float(_env("PERENNIAL_LEARNING_SECONDS", "30")))
    #: How long after its UTC day ends a feedback day directory is still listed by every look (segments are named by
    #: the day their pod opened them and shipped within about a minute); older days are sealed once consumed.
    feedback_late_arrival_seconds: float = field(default_factory=lambda: float(_env("PERENNIAL_FEEDBACK_LATE_ARRIVAL_SECONDS", "86400")))
    #: Seconds between full rescans of a feedback store (every day directory listed: segments shipped later than the
    #: window above, e.g. spooled through a store outage, are found then and counted in a metric).
    feedback_full_rescan_seconds: float = field(default_factory=lambda: float(_env("PERENNIAL_FEEDBACK_FULL_RESCAN_SECONDS", "21600")))
    #: Concurrent reconciles (all kinds).
    workers: int = field(default_factory=lambda: int(_env("PERENNIAL_WORKERS", "16")))
    # --- pods that run untrusted code (resources/podsecurity.py, resources/networkpolicy.py) ---
    #: Images above may be `repo:tag` or `repo@sha256:<digest>`; pin by digest in production.
    #: Size limits of the emptyDirs (and so the ephemeral storage) of training, validation and download pods.
    trainer_scratch_size: str = field(default_factory=lambda: _env("PERENNIAL_TRAINER_SCRATCH_SIZE", PodSettings.trainer_scratch))
    trainer_checkpoint_size: str = field(default_factory=lambda: _env("PERENNIAL_TRAINER_CHECKPOINT_SIZE", PodSettings.trainer_checkpoints))
    shared_memory_size: str = field(default_factory=lambda: _env("PERENNIAL_SHARED_MEMORY_SIZE", PodSettings.shared_memory))
    validation_scratch_size: str = field(default_factory=lambda: _env("PERENNIAL_VALIDATION_SCRATCH_SIZE", PodSettings.validation_scratch))
    download_scratch_size: str = field(default_factory=lambda: _env("PERENNIAL_DOWNLOAD_SCRATCH_SIZE", PodSettings.download_scratch))
    #: `activeDeadlineSeconds` of the Jobs: training (when a run sets none), RewardSpec validation, weight download.
    training_deadline_seconds: int = field(default_factory=lambda: int(_env("PERENNIAL_TRAINING_DEADLINE_SECONDS", str(PodSettings.training_deadline_seconds))))
    validation_deadline_seconds: int = field(default_factory=lambda: int(_env("PERENNIAL_VALIDATION_DEADLINE_SECONDS", str(PodSettings.validation_deadline_seconds))))
    download_deadline_seconds: int = field(default_factory=lambda: int(_env("PERENNIAL_DOWNLOAD_DEADLINE_SECONDS", str(PodSettings.download_deadline_seconds))))
    #: NetworkPolicies for training and validation pods: "true" (default), "false" (the cluster enforces none, or
    #: the platform team provides its own).
    network_policies: bool = field(default_factory=lambda: _env("PERENNIAL_NETWORK_POLICIES", "true").lower() in ("1", "true", "yes"))
    #: CIDRs through which external host names are reached (an egress proxy/gateway, the object store's range);
    #: unset: the public internet minus private, link-local and loopback ranges, on the destination's port only.
    egress_cidrs: tuple[str, ...] = field(default_factory=lambda: _list("PERENNIAL_EGRESS_CIDRS"))
    #: extra DNS server CIDRs (node-local DNS cache, e.g. 169.254.20.10/32); the cluster DNS in `dns_namespace` is always allowed.
    dns_cidrs: tuple[str, ...] = field(default_factory=lambda: _list("PERENNIAL_DNS_CIDRS"))
    dns_namespace: str = field(default_factory=lambda: _env("PERENNIAL_DNS_NAMESPACE", "kube-system"))
    #: the S3-compatible endpoint `s3://` URIs go to (MinIO, ...), if not AWS
    s3_endpoint: str = field(default_factory=lambda: _env("PERENNIAL_S3_ENDPOINT", ""))
    #: Secrets (names, comma-separated) every pod the operator creates pulls its images with: trainer, validation,
    #: download and serving pods. Each must exist in the namespace of the pods (the operator never reads them).
    image_pull_secrets: tuple[str, ...] = field(default_factory=lambda: _list("PERENNIAL_IMAGE_PULL_SECRETS"))

    def __post_init__(self) -> None:
        for name in self.image_pull_secrets:
            if len(name) > 253 or not _SECRET_NAME.match(name):
                raise ValueError(f"PERENNIAL_IMAGE_PULL_SECRETS: {name!r} is not a Secret name (a DNS subdomain: lower-case "
                                 "letters, digits, '-' and '.')")

    def pod_settings(self) -> PodSettings:
        return PodSettings(
            trainer_scratch=self.trainer_scratch_size, trainer_checkpoints=self.trainer_checkpoint_size,
            shared_memory=self.shared_memory_size, validation_scratch=self.validation_scratch_size,
            download_scratch=self.download_scratch_size, training_deadline_seconds=self.training_deadline_seconds,
            validation_deadline_seconds=self.validation_deadline_seconds, download_deadline_seconds=self.download_deadline_seconds,
            image_pull_secrets=self.image_pull_secrets,
        )

    def serving_settings(self) -> "ServingSettings":
        """The operator-wide settings of serving pods (resources.deployment.ServingSettings)."""
        from .resources.deployment import ServingSettings

        return ServingSettings(feedback_store_uri=self.feedback_store_uri or None, image_pull_secrets=self.image_pull_secrets)

    def egress_settings(self) -> EgressSettings | None:
        """None when the operator builds no NetworkPolicies."""
        if not self.network_policies:
            return None
        return EgressSettings(egress_cidrs=self.egress_cidrs, dns_cidrs=self.dns_cidrs, dns_namespace=self.dns_namespace,
                              s3_endpoint=self.s3_endpoint or None)
