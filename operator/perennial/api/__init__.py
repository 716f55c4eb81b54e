"""Perennial API types (group `perennial.ai`, version `v1alpha1`): the single source of truth.

Pure pydantic; imports neither kopf nor the kubernetes client.
"""

from .adapter import AdapterResource, AdapterSpec, AdapterStatus, Lineage
from .basemodel import BaseModelResource, BaseModelSpec, BaseModelStatus
from .common import API_VERSION, CATEGORY, GROUP, VERSION, Condition, LocalObjectReference, Metric, SecretKeySelector
from .deployment import DeploymentResource, DeploymentSpec, DeploymentStatus
from .records import FeedbackRecord, InteractionRecord, parse_record
from .rewardspec import Grader, RewardSpecResource, RewardSpecSpec, RewardSpecStatus
from .trainingrun import TrainingRunResource, TrainingRunSpec, TrainingRunStatus

#: Every kind, in dependency order.
KINDS = (BaseModelResource, RewardSpecResource, TrainingRunResource, AdapterResource, DeploymentResource)
KIND_BY_NAME = {k.model_fields["kind"].default: k for k in KINDS}

__all__ = [
    "API_VERSION", "CATEGORY", "GROUP", "VERSION", "KINDS", "KIND_BY_NAME",
    "AdapterResource", "AdapterSpec", "AdapterStatus", "Lineage",
    "BaseModelResource", "BaseModelSpec", "BaseModelStatus",
    "Condition", "LocalObjectReference", "Metric", "SecretKeySelector",
    "DeploymentResource", "DeploymentSpec", "DeploymentStatus",
    "FeedbackRecord", "InteractionRecord", "parse_record",
    "Grader", "RewardSpecResource", "RewardSpecSpec", "RewardSpecStatus",
    "TrainingRunResource", "TrainingRunSpec", "TrainingRunStatus",
]
