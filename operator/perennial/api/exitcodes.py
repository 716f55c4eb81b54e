"""Exit codes of the trainer container: the one place they are defined.

The trainer (`perennial_trainer`) exits with these; the training Job's `podFailurePolicy`
(`perennial.resources.trainingrun.pod_failure_policy`) fails the Job at once on a permanent one
instead of retrying it up to `runPolicy.backoffLimit` times. Either way the container's
termination message is JSON `{"status": "Failed", "reason": "<CamelCase>", "message": "..."}`
saying why.

| Code | Meaning | Retried? |
|---|---|---|
| 0 | the run succeeded | - |
| 1 | a transient or unexpected failure (a crash, an I/O error, a storage outage) | yes, up to `backoffLimit` |
| 10 | invalid run config (`InvalidConfig`, `ConfigNotFound`, `StorageUnavailable`), or a run that cannot fit its GPUs (`InsufficientGPUMemory`, the estimate in the message: `perennial.memory`) | no |
| 11 | a dataset that is missing, unreadable or has the wrong rows (`DatasetNotFound`, `InvalidDataset`, `DatasetHashMismatch`, `EmptyDataset`, `InsufficientData`, `MissingColumn`) | no |
| 12 | an invalid reward spec (`InvalidRewardSpec`) | no |
| 13 | a base model or parent adapter that is missing or cannot be loaded (`BaseModelUnavailable`, `ParentAdapterInvalid`, `NotFound`) | no |
| 14 | the adapter's held-out reward is below its parent's (or the base model's) and `evaluation.failIfWorseThanParent` is set (`WorseThanParent`, `WorseThanBase`) | no |

A container killed by a signal exits 128+N (137 for SIGKILL, e.g. out of memory): retried.
Evicted or preempted pods (condition `DisruptionTarget`) are not counted at all.
"""

from __future__ import annotations

from enum import IntEnum


class TrainerExit(IntEnum):
    SUCCEEDED = 0
    FAILED = 1
    INVALID_CONFIG = 10
    INVALID_DATASET = 11
    INVALID_REWARD_SPEC = 12
    INVALID_MODEL = 13
    WORSE_THAN_PARENT = 14


#: Exit codes of failures that no retry can fix.
PERMANENT_EXIT_CODES: tuple[int, ...] = tuple(int(c) for c in (
    TrainerExit.INVALID_CONFIG, TrainerExit.INVALID_DATASET, TrainerExit.INVALID_REWARD_SPEC, TrainerExit.INVALID_MODEL,
    TrainerExit.WORSE_THAN_PARENT,
))  # plain ints: they go into manifests

#: The trainer's failure reasons (`TrainerError.reason`) that are permanent, by exit code. Any other reason is
#: `FAILED` (1, retried).
PERMANENT_REASONS: dict[str, TrainerExit] = {
    "InvalidConfig": TrainerExit.INVALID_CONFIG,
    "ConfigNotFound": TrainerExit.INVALID_CONFIG,
    "StorageUnavailable": TrainerExit.INVALID_CONFIG,
    "InsufficientGPUMemory": TrainerExit.INVALID_CONFIG,
    "DatasetNotFound": TrainerExit.INVALID_DATASET,
    "InvalidDataset": TrainerExit.INVALID_DATASET,
    "DatasetHashMismatch": TrainerExit.INVALID_DATASET,
    "EmptyDataset": TrainerExit.INVALID_DATASET,
    "InsufficientData": TrainerExit.INVALID_DATASET,
    "MissingColumn": TrainerExit.INVALID_DATASET,
    "InvalidRewardSpec": TrainerExit.INVALID_REWARD_SPEC,
    "BaseModelUnavailable": TrainerExit.INVALID_MODEL,
    "ParentAdapterInvalid": TrainerExit.INVALID_MODEL,
    "NotFound": TrainerExit.INVALID_MODEL,
    "WorseThanParent": TrainerExit.WORSE_THAN_PARENT,
    "WorseThanBase": TrainerExit.WORSE_THAN_PARENT,
}


def exit_code_for(reason: str) -> int:
    """The trainer's exit code for a failure `reason`."""
    return int(PERMANENT_REASONS.get(reason, TrainerExit.FAILED))
