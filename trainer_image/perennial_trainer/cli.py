"""`perennial-trainer` / `python -m perennial_trainer`.

    perennial-trainer train --config run.yaml [--max-steps N --learning-rate X --output-uri URI ...]
    perennial-trainer --config run.yaml                  # same as `train`
    perennial-trainer grade --reward-spec rs.yaml --samples samples.jsonl [--json]
    perennial-trainer grade --reward-spec rs.yaml --tests  # run the RewardSpec's own tests

`train` exits 0 on success; on failure 1 when a retry may help, or a permanent exit code (10 invalid
config, 11 dataset, 12 reward spec, 13 model; the table is `perennial.api.exitcodes`); either way the
termination message (JSON `status`, `reason`, `message`) is written.
`grade --tests` prints one JSON line per test, writes {"status", "results"} to the termination
log, and exits 1 if any test fails. `--reward-spec` accepts a RewardSpec resource or its spec.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

log = logging.getLogger("perennial_trainer")

# flag -> dotted RunConfig key
OVERRIDES = {
    "run_name": "runName", "namespace": "namespace", "output_uri": "outputUri", "checkpoint_dir": "checkpointDir",
    "base_model_uri": "baseModelUri", "parent_adapter_uri": "parentAdapterUri",
    "feedback_store_uri": "feedbackStoreUri",
    "method": "spec.method",
    "max_steps": "spec.hyperparameters.maxSteps", "epochs": "spec.hyperparameters.epochs",
    "learning_rate": "spec.hyperparameters.learningRate", "batch_size": "spec.hyperparameters.batchSize",
    "seed": "spec.hyperparameters.seed", "num_generations": "spec.hyperparameters.numGenerations",
    "max_completion_length": "spec.hyperparameters.maxCompletionLength",
    "checkpoint_every_steps": "spec.runPolicy.checkpointEverySteps",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perennial-trainer", description="Perennial trainer: LoRA SFT / DPO / GRPO with TRL + PEFT, and RewardSpec graders.")
    p.add_argument("--config", help="run config (RunConfig YAML); implies `train`")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("train", help="train an adapter from a RunConfig")
    t.add_argument("--config", dest="train_config", default=None, help="RunConfig YAML (default /etc/perennial/run.yaml)")
    t.add_argument("--termination-log", default=None, help="termination message path (default $PERENNIAL_TERMINATION_LOG or /dev/termination-log)")
    for flag in OVERRIDES:
        kind: Any = str
        if flag in ("max_steps", "epochs", "batch_size", "seed", "num_generations", "max_completion_length", "checkpoint_every_steps"):
            kind = int
        t.add_argument("--" + flag.replace("_", "-"), type=kind, default=None, help=f"overrides `{OVERRIDES[flag]}`")
    # Several processes (torchrun, see `distributed.py`): the pod's entrypoint launches, the workers train.
    t.add_argument("--nproc-per-node", type=int, default=None, help="trainer processes in this pod (one per GPU; default $PERENNIAL_NPROC_PER_NODE or 1)")
    t.add_argument("--nnodes", type=int, default=1, help="pods training together (c10d rendezvous at --rdzv-endpoint)")
    t.add_argument("--node-rank", type=int, default=None, help="this pod's index among --nnodes (default $JOB_COMPLETION_INDEX)")
    t.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the c10d rendezvous (pod 0) when --nnodes > 1")
    t.add_argument("--rdzv-id", default=None, help="rendezvous id (default: the run name)")
    g = sub.add_parser("grade", help="grade samples with a RewardSpec, or run its tests")
    g.add_argument("--reward-spec", required=True, help="RewardSpec YAML (a resource or a bare spec)")
    g.add_argument("--samples", help="JSONL: one object per line with `completion` (or `output_text`), optional `prompt`, `item`")
    g.add_argument("--tests", action="store_true", help="run the RewardSpec's own tests; exit 1 if any fails")
    g.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    g.add_argument("--termination-log", default=None)
    return p


def load_reward_spec(path: str):
    """A RewardSpec (resource or bare spec) validated as the API server validates it (the CRD's schema and CEL
    rules, same messages); `TrainerError("InvalidRewardSpec")` otherwise."""
    import pydantic
    import yaml

    from perennial.api import RewardSpecSpec

    from .errors import TrainerError

    from perennial.api import API_VERSION, RewardSpecResource
    from perennial.crdgen import crd
    from perennial.local.validation import Invalid, check_custom_object

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise TrainerError(f"cannot read RewardSpec {path}: {e}", "InvalidRewardSpec") from None
    if not isinstance(raw, dict):
        raise TrainerError(f"RewardSpec {path} must be a YAML mapping (a RewardSpec resource or its spec), "
                           f"not {type(raw).__name__}", "InvalidRewardSpec")
    # A resource as `kubectl apply` sends it, or its bare spec (named after the file, as the object would be).
    if "spec" in raw and "graders" not in raw:
        doc = {"apiVersion": API_VERSION, "kind": "RewardSpec", **raw}
        doc.setdefault("metadata", {"name": Path(path).stem})
    else:
        doc = {"apiVersion": API_VERSION, "kind": "RewardSpec", "metadata": {"name": Path(path).stem}, "spec": raw}
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != "RewardSpec":
        raise TrainerError(f"{path}: expected apiVersion {API_VERSION!r} and kind 'RewardSpec', got "
                           f"{doc.get('apiVersion')!r} and {doc.get('kind')!r}", "InvalidRewardSpec")
    # The API server's own admission (the CRD's OpenAPI schema and CEL rules), with its messages.
    try:
        obj = check_custom_object(crd(RewardSpecResource), doc)
    except Invalid as e:
        raise TrainerError(str(e), "InvalidRewardSpec") from None
    try:
        return RewardSpecSpec.model_validate(obj["spec"])
    except pydantic.ValidationError as e:  # what the schema cannot say (should not happen): still Kubernetes-style
        raise TrainerError(_kube_style(f'RewardSpec.perennial.ai "{obj["metadata"].get("name", "")}"', e),
                           "InvalidRewardSpec") from None


def _kube_style(what: str, err) -> str:
    """A pydantic ValidationError as kube-apiserver words a 422: `<what> is invalid: spec.a[0].b: Invalid value: ...`."""
    msgs = []
    for e in err.errors():
        path = "spec"
        for part in e["loc"]:
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
        msg = e["msg"].removeprefix("Value error, ")
        msgs.append(f"{path}: Invalid value: {json.dumps(e.get('input'), default=str)[:80]}: {msg}")
    return f"{what} is invalid: " + (msgs[0] if len(msgs) == 1 else "[" + ", ".join(msgs) + "]")


def cmd_grade(a) -> int:
    from .graders import run_tests, score_all
    from .progress import write_termination

    spec = load_reward_spec(a.reward_spec)
    if a.tests:
        results = run_tests(spec)
        for r in results:
            print(json.dumps(r, separators=(",", ":")), flush=True)
        failed = [r["name"] for r in results if not r["passed"]]
        summary = {"status": "Failed" if failed else "Succeeded", "reason": "TestsFailed" if failed else "TestsPassed",
                   "message": f"{len(results) - len(failed)}/{len(results)} tests passed" + (f"; failed: {', '.join(failed)}" if failed else ""),
                   "results": [{k: r[k] for k in ("name", "passed", "score", "message")} for r in results]}
        write_termination(summary, a.termination_log)
        print(summary["message"], file=sys.stderr)
        return 1 if failed else 0
    if not a.samples:
        print("grade: give --samples FILE or --tests", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in Path(a.samples).read_text().splitlines() if line.strip()]
    samples = [{"output_text": r.get("completion", r.get("output_text", "")), "prompt": r.get("prompt")} for r in rows]
    items = [r.get("item") or {k: v for k, v in r.items() if k not in ("completion", "output_text", "prompt")} for r in rows]
    scored = score_all(spec, samples, items)
    names = [g.name for g in spec.graders]
    if a.json:
        for i, s in enumerate(scored):
            print(json.dumps({"index": i, "total": s.total, "scores": s.scores, "reasons": s.reasons}, separators=(",", ":")))
    else:
        w = max([5] + [len(n) for n in names])
        print("  ".join(["#".rjust(4)] + [n.rjust(w) for n in names] + ["total".rjust(w)]))
        for i, s in enumerate(scored):
            print("  ".join([str(i).rjust(4)] + [f"{s.scores[n]:.3f}".rjust(w) for n in names] + [f"{s.total:.3f}".rjust(w)]))
        if scored:
            print("  ".join(["mean"] + [f"{sum(s.scores[n] for s in scored) / len(scored):.3f}".rjust(w) for n in names]
                            + [f"{sum(s.total for s in scored) / len(scored):.3f}".rjust(w)]))
    return 0


LAUNCHER_FLAGS = ("--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-id")


def worker_argv(argv: list[str]) -> list[str]:
    """The command line a torchrun worker gets: the launcher's own, less the launcher flags."""
    out: list[str] = []
    skip = False
    for x in argv:
        if skip:
            skip = False
            continue
        if x in LAUNCHER_FLAGS:
            skip = True
            continue
        if any(x.startswith(f + "=") for f in LAUNCHER_FLAGS):
            continue
        out.append(x)
    return out


def cmd_train(a, config_path: str, argv: list[str] | None = None) -> int:
    from .config import DEFAULT_CONFIG_PATH, load_config
    from .distributed import NPROC_ENV, die_with_parent, is_worker, launch, quiet_if_replica, world
    from .errors import TrainerError
    from .progress import write_termination

    if not is_worker():
        try:
            nproc = a.nproc_per_node if a.nproc_per_node is not None else int(os.environ.get(NPROC_ENV) or 1)
        except ValueError:
            nproc = 0
        if nproc < 1 or a.nnodes < 1:
            msg = f"--nproc-per-node ({nproc}) and --nnodes ({a.nnodes}) must be at least 1"
            write_termination({"status": "Failed", "reason": "InvalidConfig", "message": msg}, a.termination_log)
            return TrainerError(msg, "InvalidConfig").exit_code
        if nproc > 1 or a.nnodes > 1:
            try:
                return launch(worker_argv(argv or []), nproc_per_node=nproc, nnodes=a.nnodes, node_rank=a.node_rank,
                              rdzv_endpoint=a.rdzv_endpoint, rdzv_id=a.rdzv_id or "perennial", termination_log=a.termination_log)
            except TrainerError as e:
                write_termination({"status": "Failed", "reason": e.reason, "message": str(e)}, a.termination_log)
                return e.exit_code
    w = world()
    if w.distributed:
        die_with_parent()
        quiet_if_replica(w)
        if not w.main:  # rank 0 alone writes the termination message (and prints the result)
            def write_termination(result, path=None):
                return ""

    overrides = {OVERRIDES[k]: getattr(a, k, None) for k in OVERRIDES}
    if overrides.get("spec.hyperparameters.learningRate") is not None:
        overrides["spec.hyperparameters.learningRate"] = str(overrides["spec.hyperparameters.learningRate"])
    try:
        cfg = load_config(config_path or DEFAULT_CONFIG_PATH, overrides)
        from .train import run

        result = run(cfg)
    except TrainerError as e:
        log.error("run failed: %s", e)
        write_termination({"status": "Failed", "reason": e.reason, "message": str(e),
                           **({"metrics": {k: round(v, 6) for k, v in e.metrics.items()}} if e.metrics else {})}, a.termination_log)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - report, never a silent crash
        traceback.print_exc()
        write_termination({"status": "Failed", "reason": "TrainerCrashed", "message": f"{e.__class__.__name__}: {e}"}, a.termination_log)
        return 1
    text = write_termination(result, a.termination_log)
    if w.main:
        print("PERENNIAL_RESULT " + text, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        # The program itself (not a caller in-process, e.g. tests): everything this process and its children
        # write to stdout/stderr leaves the pod as its log, so it passes through the redactor (`redact.py`).
        # It also holds the pod's credentials: no same-uid process may read its environ or memory.
        from .redact import install_fd_redaction, make_non_dumpable

        make_non_dumpable()
        install_fd_redaction()
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _parser()
    if not any(x in ("train", "grade") for x in argv) and any(x == "--config" or x.startswith("--config=") for x in argv):
        # `perennial-trainer --config run.yaml [flags]` means `train`
        pre = []
        if "--log-level" in argv:
            i = argv.index("--log-level")
            pre = argv[i:i + 2]
            argv = argv[:i] + argv[i + 2:]
        argv = pre + ["train"] + argv
    a = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(a.log_level).upper(), logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if a.command == "grade":
        from .errors import TrainerError

        try:
            return cmd_grade(a)
        except TrainerError as e:
            print(f"error: {e}", file=sys.stderr)
            if a.tests:  # the RewardSpec validation Job: say why in the termination message, as `train` does
                from .progress import write_termination

                write_termination({"status": "Failed", "reason": e.reason, "message": str(e)}, a.termination_log)
            return 2
    if a.command == "train":
        return cmd_train(a, a.train_config or a.config, argv)
    p.print_help()
    return 2
