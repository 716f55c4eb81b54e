"""The trainer's run configuration: the contract between the operator and the trainer image.

The operator renders one `RunConfig` as YAML (camelCase keys) into a ConfigMap that
is mounted into the training pod at ``/etc/perennial/run.yaml``; the container runs
``perennial-trainer --config /etc/perennial/run.yaml``.

Example::

    runName: support-bot-7            # the TrainingRun's name
    namespace: team-a
    runUid: 0b7c...                   # optional, copied into the lineage
    spec:                             # the TrainingRun's spec, verbatim (perennial.api.TrainingRunSpec)
      method: GRPO
      baseModelRef: {name: qwen-small}
      parentAdapterRef: {name: support-bot-v6}
      rewardSpecRef: {name: support-rubric}
      datasets:
      - {name: train, uri: pvc://data/support/train.jsonl}
      hyperparameters: {learningRate: "1e-5", maxSteps: 200}
      output: {adapterFamily: support-bot}
    baseModelUri: /models/qwen-small  # resolved weights: local path (the cache PVC mount) or fsspec URI
    parentAdapterUri: s3://artifacts/team-a/support-bot-6   # resolved artifact of parentAdapterRef
    rewardSpec: {graders: [...], tests: [...]}              # the RewardSpec's spec, resolved
    evalRewardSpec: {graders: [...]}                        # evaluation.rewardSpecRef resolved (else rewardSpec)
    outputUri: s3://artifacts/team-a/support-bot-7          # where the artifact is written
    feedbackStoreUri: s3://feedback/team-a                  # default store of feedback datasets
    checkpointDir: /mnt/pvc/ckpt/support-bot-7              # survives pod restarts; default <outputUri>/checkpoints if local

Command-line flags override config values (``--output-uri``, ``--max-steps``,
``--learning-rate``, ``--checkpoint-dir``, ...; see ``perennial-trainer train --help``).

Environment:

* ``PERENNIAL_TERMINATION_LOG``: termination message path (default ``/dev/termination-log``).
* ``PERENNIAL_PVC_ROOT``: mount root of ``pvc://<claim>/<path>`` URIs (default ``/mnt/pvc``).
* ``PERENNIAL_SECRETS_DIR``: where Secret keys are mounted as files (default ``/var/run/secrets/perennial``),
  e.g. the LLM judge API key ``<dir>/<secret name>/<key>``; an env var named
  ``<SECRET_NAME>_<KEY>`` (upper-cased, non-alphanumerics as ``_``) takes precedence.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pydantic
import yaml
from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from perennial.api import RewardSpecSpec, TrainingRunSpec

from .errors import TrainerError

DEFAULT_CONFIG_PATH = "/etc/perennial/run.yaml"


class RunConfig(pydantic.BaseModel):
    """Everything one training run needs, resolved by the operator."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    run_name: str = Field(description="Name of the TrainingRun.")
    namespace: str = Field(default="default", description="Namespace of the TrainingRun.")
    run_uid: str | None = Field(default=None, description="UID of the TrainingRun (lineage).")
    spec: TrainingRunSpec = Field(description="The TrainingRun spec.")
    base_model_uri: str = Field(description="Local path or fsspec URI of the base model weights.")
    parent_adapter_uri: str | None = Field(default=None, description="Local path or fsspec URI of the parent adapter.")
    reward_spec: RewardSpecSpec | None = Field(default=None, description="Graders for GRPO rewards (and evaluation).")
    eval_reward_spec: RewardSpecSpec | None = Field(default=None, description="Graders for evaluation; `rewardSpec` if unset.")
    output_uri: str = Field(description="Where the artifact is written (local path or fsspec URI).")
    feedback_store_uri: str | None = Field(default=None, description="Default feedback store for feedback datasets.")
    checkpoint_dir: str | None = Field(default=None, description="Checkpoint directory (local); default `<outputUri>/checkpoints` for local outputs, else a temp dir.")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    def config_hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def grading_spec(self) -> RewardSpecSpec | None:
        return self.eval_reward_spec or self.reward_spec


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a RunConfig YAML/JSON file and apply `overrides` (dotted camelCase keys, e.g.
    ``spec.hyperparameters.maxSteps``)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise TrainerError(f"run config {path} not found", "ConfigNotFound") from None
    except yaml.YAMLError as e:
        raise TrainerError(f"run config {path} is not valid YAML: {e}", "InvalidConfig") from None
    if not isinstance(raw, dict):
        raise TrainerError(f"run config {path} must be a mapping", "InvalidConfig")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    try:
        return RunConfig.model_validate(raw)
    except pydantic.ValidationError as e:
        if all(err["loc"] and err["loc"][0] in ("rewardSpec", "reward_spec", "evalRewardSpec", "eval_reward_spec") for err in e.errors()):
            raise TrainerError(f"run config {path}: the reward spec is invalid: {e}", "InvalidRewardSpec") from None
        raise TrainerError(f"run config {path} is invalid: {e}", "InvalidConfig") from None
