"""Several trainer processes in one pod (and across pods): the launcher and what each process is.

`perennial-trainer train --config run.yaml --nproc-per-node N` starts N worker processes through PyTorch's own
launcher (`torch.distributed.run`, i.e. torchrun, called in this process so the log redaction installed by the
entrypoint wraps every worker's output). Each worker runs `perennial-trainer train` again with the torchrun
environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, ...); transformers/Accelerate then train with
DistributedDataParallel (gloo on CPU, NCCL on GPU), or FSDP2 where `fsdp_wanted` says so.

Only global rank 0 writes: progress lines, `progress.json`, checkpoints (the Trainer itself saves on the main
process; every rank reads them back on resume), evaluation, metrics, the artifact and the termination message.
The other ranks log warnings only. `hyperparameters.batchSize` is per process (Hugging Face's
`per_device_train_batch_size`): the global batch per optimizer step is batchSize x processes x
gradientAccumulationSteps.

Across pods (`--nnodes M`), the rendezvous is torchrun's c10d at `--rdzv-endpoint` (pod 0 of an indexed Job
behind a headless Service); `--node-rank` defaults to `$JOB_COMPLETION_INDEX`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("perennial_trainer")

NPROC_ENV = "PERENNIAL_NPROC_PER_NODE"
FSDP_ENV = "PERENNIAL_FSDP"  # "1" forces FSDP2, "0" forces DDP; unset: the size rule (`fsdp_wanted`)


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Global rank 0: the one process that writes."""
        return self.rank == 0

    @property
    def local_main(self) -> bool:
        """Local rank 0: the process of its pod that prepares the pod's files (downloaded checkpoints)."""
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place, from torchrun's environment (a plain run is rank 0 of 1)."""
    def num(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            return default

    return World(rank=num("RANK", 0), local_rank=num("LOCAL_RANK", 0), size=max(1, num("WORLD_SIZE", 1)))


def is_worker() -> bool:
    """Started by torchrun (a worker), not the pod's entrypoint."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def quiet_if_replica(w: World) -> None:
    """Ranks other than 0 say only what is wrong (log warnings and errors): no progress bars, no library
    deprecation chatter (rank 0 shows the same once)."""
    if not w.main:
        import warnings

        logging.getLogger().setLevel(logging.WARNING)
        log.setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"
        try:
            import datasets
            import transformers

            datasets.disable_progress_bars()
            transformers.utils.logging.disable_progress_bar()
            transformers.utils.logging.set_verbosity_error()
        except ImportError:
            pass


def die_with_parent() -> None:
    """A worker whose launcher is gone (SIGKILL of the launcher alone) must not train on: it would write
    checkpoints next to the retried run's. PR_SET_PDEATHSIG is Linux's way to say it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl
            os.kill(os.getpid(), signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def fsdp_wanted(n_params: int, bytes_per_param: int, gpu_bytes: int | None, w: World) -> bool:
    """FSDP2 instead of DDP: forced by `$PERENNIAL_FSDP`, else when several processes share GPUs and one full copy
    of the base weights would take more than half of one GPU (DDP keeps a full copy on every GPU; FSDP shards it
    over them). CPU runs keep DDP unless forced."""
    forced = os.environ.get(FSDP_ENV, "").strip().lower()
    if forced in ("1", "true", "yes"):
        return w.distributed
    if forced in ("0", "false", "no"):
        return False
    if not w.distributed or not gpu_bytes:
        return False
    return n_params * bytes_per_param > gpu_bytes // 2


def launch(worker_argv: list[str], *, nproc_per_node: int, nnodes: int = 1, node_rank: int | None = None,
           rdzv_endpoint: str | None = None, rdzv_id: str = "perennial", termination_log: str | None = None) -> int:
    """Run `python -m perennial_trainer <worker_argv>` as `nproc_per_node` processes (x `nnodes` pods) under
    torchrun; the exit code is the first failed worker's (a permanent trainer code stays permanent, so the Job's
    podFailurePolicy still applies). If no worker wrote the termination message, the launcher writes one."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from .progress import termination_log_path, write_termination

    if nnodes > 1 and not rdzv_endpoint:
        from .errors import TrainerError

        raise TrainerError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the c10d rendezvous)", "InvalidConfig")
    if node_rank is None:
        node_rank = int(os.environ.get("JOB_COMPLETION_INDEX", "0") or 0)
    args = [f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}", "--max-restarts=0"]
    if nnodes > 1:
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}", f"--node-rank={node_rank}"]
    else:
        args += ["--standalone"]
    args += ["--module", "perennial_trainer", *worker_argv]
    term = termination_log or termination_log_path()
    before = _read(term)
    log.info("starting %d trainer processes (node %d of %d)", nproc_per_node, node_rank, nnodes)
    try:
        run(get_args_parser().parse_args(args))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        if _read(term) == before:  # the failed worker could not say why (killed, crashed before writing)
            write_termination({"status": "Failed", "reason": "TrainerCrashed",
                               "message": f"trainer process rank {rank} failed: {_why(failure)}"}, term)
        return code
    return 0


def _why(failure) -> str:
    if failure.exitcode is not None and failure.exitcode < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-failure.exitcode).name}"
        except ValueError:
            return f"killed by signal {-failure.exitcode}"
    msg = failure.message if isinstance(failure.message, str) else ""
    return f"exit code {failure.exitcode}" + (f": {msg[:500]}" if msg and msg != "<N/A>" else "")


def _read(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None
