"""The reward/loss curve (PNG) saved with every adapter, drawn by a helper process.

matplotlib costs about a second of CPU to import. The trainer starts this helper
when a run begins (`CurvePlotter`), so the import happens on another core while
torch, transformers and the model load; at the end the trainer sends the history
(`send`) and the helper draws while the adapter is saved (`wait` collects it). The helper is a plain child
process (`python -m perennial_trainer.curves OUT.png`, history as JSON on stdin),
so no thread competes with training for the GIL. A plot never fails a run.

    python -m perennial_trainer.curves curves.png < history.json
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any

from .redact import minimal_env

log = logging.getLogger("perennial_trainer")

SERIES = ("loss", "reward")


def plot_curves(history: list[dict[str, Any]], path: str) -> bool:
    """Draw loss and mean reward per step into `path`; False when there is nothing to draw."""
    series = {k: [(h["step"], h[k]) for h in history if isinstance(h, dict) and k in h and "step" in h] for k in SERIES}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    # the object-oriented API with the Agg canvas: no pyplot state, no GUI backend lookup
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(series), 3.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(series), squeeze=False)
    for ax, (k, pts) in zip(axes[0], series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_xlabel("step")
        ax.set_ylabel(k)
        ax.set_title(k)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=80)
    os.replace(tmp, path)
    return True


def _mpl_config_dir(path: str) -> str:
    """matplotlib's cache/config directory for the helper: under TMPDIR (the root filesystem and HOME may be
    read-only in the pod)."""
    import tempfile

    return os.path.join(tempfile.gettempdir(), "perennial-matplotlib")


class CurvePlotter:
    """Handle on the helper process; `finish()` hands it the history and waits for the PNG."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None
        self._history: list[dict[str, Any]] = []
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "perennial_trainer.curves", path],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                # a minimal environment: the helper lives for the whole run and any same-uid process can read
                # its /proc/<pid>/environ, so it gets no credential (object-store keys, tokens) of the trainer
                env=minimal_env(OMP_NUM_THREADS="1", MPLBACKEND="Agg", MPLCONFIGDIR=_mpl_config_dir(path)),
            )
        except OSError as e:
            log.warning("cannot start the curve plotter (%s); drawing in-process at the end", e)

    def send(self, history: list[dict[str, Any]]) -> None:
        """Hand over the history; the helper draws while the trainer saves the adapter."""
        self._history = history
        if self.proc is None or self.proc.stdin is None:
            return
        try:
            self.proc.stdin.write(json.dumps(history).encode())
            self.proc.stdin.close()
        except OSError as e:  # the helper died: draw in-process in wait()
            log.warning("curve plotter is gone (%s); drawing in-process", e)
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def wait(self, timeout_s: float = 120.0) -> None:
        """Block until curves.png is written (or give up with a warning)."""
        if self.proc is None:
            try:
                plot_curves(self._history, self.path)
            except Exception as e:  # noqa: BLE001 - a plot never fails the run
                log.warning("cannot plot curves: %s", e)
            return
        try:
            self.proc.wait(timeout=timeout_s)
            err = self.proc.stderr.read() if self.proc.stderr else b""
            if self.proc.returncode != 0:
                log.warning("cannot plot curves: %s", err.decode(errors="replace").strip()[-500:])
        except (subprocess.TimeoutExpired, OSError) as e:
            self.proc.kill()
            log.warning("cannot plot curves: %s", e)

    def cancel(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401 - import while the trainer works
    from matplotlib.figure import Figure  # noqa: F401

    raw = sys.stdin.buffer.read()
    if not raw.strip():
        return 0  # the run ended before training: nothing to draw
    try:
        history = json.loads(raw)
    except ValueError as e:
        print(f"history is not JSON: {e}", file=sys.stderr)
        return 1
    plot_curves(history if isinstance(history, list) else [], argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
