"""Checkpoints that outlive the pod.

The training Job runs with `restartPolicy: Never` (its `podFailurePolicy` needs it), so a retry is a
new pod with fresh emptyDirs. Local outputs (`file://`, `pvc://`, a path) keep their checkpoints next
to the artifact (`<outputUri>/checkpoints`, on the volume), which the new pod mounts again. Object-store
outputs train into a local directory and mirror each checkpoint to `<outputUri>/checkpoints/checkpoint-N/`
(a `COMPLETE` marker written last; older mirrored checkpoints removed after it); a new pod with an empty
local directory downloads the newest complete one and resumes from it. Success removes the mirror.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from pathlib import Path

from .storage import filesystem, is_local, upload_dir

log = logging.getLogger("perennial_trainer")

COMPLETE = "COMPLETE"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def mirror_uri(output_uri: str) -> str | None:
    """Where checkpoints are mirrored: `<outputUri>/checkpoints` for object-store outputs, None for local ones."""
    if is_local(output_uri):
        return None
    return output_uri.rstrip("/") + "/checkpoints"


def _remote_checkpoints(remote: str) -> list[tuple[int, str, bool]]:
    """(step, path, complete) of the mirrored checkpoints, oldest first."""
    fs, root = filesystem(remote)
    if not fs.exists(root):
        return []
    out = []
    for p in fs.ls(root, detail=False):
        m = _CHECKPOINT.match(posixpath.basename(p.rstrip("/")))
        if m:
            out.append((int(m.group(1)), p.rstrip("/"), fs.exists(f"{p.rstrip('/')}/{COMPLETE}")))
    return sorted(out)


def upload_checkpoint(local_checkpoint: str | os.PathLike, remote: str) -> None:
    """Mirror one local `checkpoint-N` directory, then drop the older mirrored ones."""
    name = Path(local_checkpoint).name
    step = int(_CHECKPOINT.match(name).group(1))  # type: ignore[union-attr]
    upload_dir(local_checkpoint, f"{remote.rstrip('/')}/{name}")
    fs, root = filesystem(remote)
    fs.pipe_file(f"{root.rstrip('/')}/{name}/{COMPLETE}", b"")
    for s, path, _ in _remote_checkpoints(remote):
        if s != step:
            fs.rm(path, recursive=True)
    log.info("mirrored checkpoint %s to %s", name, remote)


def restore_checkpoint(remote: str, local_dir: str | os.PathLike) -> str | None:
    """Download the newest complete mirrored checkpoint into `local_dir`; its local path, or None."""
    complete = [(s, p) for s, p, ok in _remote_checkpoints(remote) if ok]
    if not complete:
        return None
    _, path = complete[-1]
    fs, _ = filesystem(remote)
    dest = Path(local_dir) / posixpath.basename(path)
    fs.get(path, str(dest), recursive=True)
    (dest / COMPLETE).unlink(missing_ok=True)
    log.info("restored checkpoint %s from %s", dest.name, remote)
    return str(dest)


def remove_mirror(remote: str) -> None:
    fs, root = filesystem(remote)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def mirror_callback(remote: str):
    """A transformers `TrainerCallback` mirroring every checkpoint the Trainer saves."""
    from transformers import TrainerCallback

    class CheckpointMirror(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                upload_checkpoint(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), remote)

    return CheckpointMirror()
