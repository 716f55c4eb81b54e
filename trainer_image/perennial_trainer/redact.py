"""Redaction by value: no secret the trainer knows leaves the pod in what it writes.

What leaves a trainer pod: its stdout/stderr (pod logs, read by the operator for progress and shown by
`kubectl logs`), the termination message (copied by the operator into `status`), and the JSON files it
writes next to the artifact (`progress.json`, `metrics.json`, `manifest.json`). Every one of them passes
through `Redactor.redact`, which replaces each secret value (and its JSON-escaped, `repr`, URL-quoted and
base64 spellings) by ``[REDACTED]``.

The secret values are everything the process knows that came from a Secret:

* environment variables, except a short list of names that are known not to be secret (``PATH``,
  ``HOME``, ``PERENNIAL_*`` settings, service links, ...): Secrets arrive through `envFrom`, whose keys
  the operator cannot know, so "every value but the known-harmless ones" is the safe direction;
* every file under ``$PERENNIAL_SECRETS_DIR`` (the projected LLM-judge keys); of values that are JSON
  (a service-account key), also the string leaves under secret-sounding keys (``private_key``).

Values shorter than `MIN_LENGTH` are not redacted (``1``, ``true`` would shred every line).

This is the last line of defence, not the first: it stops a secret copied verbatim (an exception
message quoting a header, a grader that prints what it read, an endpoint that echoes the key). Code
that *encodes* a value it can read (reversed, one character per line) is stopped only by not being
able to read it (the sandbox's clean environment and Landlock; helper processes with a minimal
environment, see `minimal_env`). The operator bounds and re-redacts what it copies into status.

`install_fd_redaction()` (called by the `perennial-trainer` entrypoint, not by in-process callers such
as tests) puts a pipe in front of file descriptors 1 and 2: everything written to them by this process,
by C extensions and by children that inherit them goes through the redactor line by line.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import re
import threading
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

REDACTED = "[REDACTED]"
MIN_LENGTH = 6
_MAX_SECRET_FILE = 1 << 16

#: Environment variables whose values are known not to be secret (never redacted).
SAFE_ENV = frozenset({
    "PATH", "HOME", "HOSTNAME", "PWD", "OLDPWD", "SHELL", "USER", "LOGNAME", "TERM", "TZ", "LANG", "LANGUAGE",
    "TMPDIR", "SHLVL", "_", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "LIBRARY_PATH", "CONDA_PREFIX",
    "HF_HOME", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE", "TOKENIZERS_PARALLELISM",
    "MPLBACKEND", "MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES",
    "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK",
})
_SAFE_PREFIXES = ("PERENNIAL_", "PYTHON", "LC_", "KUBERNETES_", "NCCL_", "CUDA_", "NV_", "PYTEST_", "COV_")
# Kubernetes service links (`<SVC>_SERVICE_HOST`, `<SVC>_PORT_443_TCP_ADDR`, ...): addresses, not secrets.
_SERVICE_LINK = re.compile(r"_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)?)$")
#: Settings of this module itself that must never be redacted (the secrets dir path).
_SECRET_FILE_DIR_ENV = "PERENNIAL_SECRETS_DIR"


def env_is_safe(name: str) -> bool:
    return name in SAFE_ENV or name.startswith(_SAFE_PREFIXES) or bool(_SERVICE_LINK.search(name))


_SECRET_KEY = re.compile(r"key|secret|token|password|passwd|credential|private|auth", re.IGNORECASE)


_VERSION = re.compile(r"^[0-9][0-9.]*$")


def _harmless_value(value: str) -> bool:
    """Values that cannot be secrets whatever their variable: an existing absolute path (a CA bundle, a config
    file: its content may be secret, its name is not), a number or version."""
    v = value.strip()
    return bool(_VERSION.match(v)) or (v.startswith("/") and not any(c.isspace() for c in v) and os.path.exists(v))


def _json_leaves(value: str) -> list[str]:
    """String leaves of a JSON secret under secret-sounding keys (a service-account key's `private_key`,
    `private_key_id`; not its `type` or `token_uri`... which are the same for everyone)."""
    try:
        obj = json.loads(value)
    except ValueError:
        return []
    out: list[str] = []

    def walk(o: object, key: str = "") -> None:
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, str(k))
        elif isinstance(o, list):
            for v in o:
                walk(v, key)
        elif isinstance(o, str) and _SECRET_KEY.search(key) and not o.startswith(("http://", "https://")):
            out.append(o)

    walk(obj)
    return out


def secret_files(root: str | os.PathLike | None) -> list[str]:
    """Contents of every regular file under `root` (Kubernetes' `..data` symlinks included once)."""
    if not root:
        return []
    base = Path(root)
    if not base.is_dir():
        return []
    out: list[str] = []
    for dirpath, _dirs, files in os.walk(base, followlinks=True):
        for f in files:
            p = Path(dirpath) / f
            try:
                if p.is_file() and p.stat().st_size <= _MAX_SECRET_FILE:
                    out.append(p.read_text(errors="replace"))
            except OSError:
                continue  # unreadable to us: not something we can leak either
    return out


def known_secrets(environ: dict[str, str] | None = None, secrets_dir: str | None = None) -> list[str]:
    """Every secret value this process knows (see the module docstring)."""
    environ = dict(os.environ if environ is None else environ)
    if secrets_dir is None:
        secrets_dir = environ.get(_SECRET_FILE_DIR_ENV, "/var/run/secrets/perennial")
    raw = [v for k, v in environ.items() if not env_is_safe(k) and not _harmless_value(v)]
    raw += secret_files(secrets_dir)
    values: list[str] = []
    for v in raw:
        for candidate in [v, v.strip(), *_json_leaves(v), *v.strip().splitlines()]:
            candidate = candidate.strip()
            if len(candidate) >= MIN_LENGTH:
                values.append(candidate)
    return values


def _spellings(value: str) -> Iterable[str]:
    yield value
    yield json.dumps(value)[1:-1]
    yield repr(value)[1:-1]
    yield urllib.parse.quote(value, safe="")
    yield urllib.parse.quote_plus(value)
    raw = value.encode()
    yield base64.b64encode(raw).decode().rstrip("=")
    yield base64.urlsafe_b64encode(raw).decode().rstrip("=")


class Redactor:
    """Replaces every spelling of every secret value by `REDACTED`."""

    def __init__(self, secrets: Iterable[str]):
        spellings = {s for v in secrets for s in _spellings(v) if len(s) >= MIN_LENGTH}
        self.count = len(spellings)
        # longest first: a secret that contains another is replaced whole
        self._pattern = re.compile("|".join(re.escape(s) for s in sorted(spellings, key=len, reverse=True))) if spellings else None

    def redact(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(REDACTED, text)

    def redact_bytes(self, data: bytes) -> bytes:
        if self._pattern is None or not data:
            return data
        return self.redact(data.decode("utf-8", errors="surrogateescape")).encode("utf-8", errors="surrogateescape")

    def __bool__(self) -> bool:
        return self._pattern is not None


_lock = threading.Lock()
_current: Redactor | None = None


def redactor() -> Redactor:
    """The process-wide redactor, built once from the environment and the secret files."""
    global _current
    with _lock:
        if _current is None:
            _current = Redactor(known_secrets())
        return _current


def reset() -> None:
    """Forget the process-wide redactor (tests that change the environment)."""
    global _current
    with _lock:
        _current = None


def redact(text: str) -> str:
    return redactor().redact(text)


# ---------------------------------------------------------------- helper processes


#: What a helper process (curve plotter, ...) is given of the trainer's environment: nothing secret.
HELPER_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "HOME", "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH")


def minimal_env(**extra: str) -> dict[str, str]:
    """A minimal environment for trusted helper processes: no credential, no Secret, no setting they
    do not need. A same-uid process can read a helper's `/proc/<pid>/environ`; there is nothing to read."""
    env = {k: os.environ[k] for k in HELPER_ENV if k in os.environ and env_is_safe(k)}
    env.setdefault("PATH", os.defpath)
    env.update(extra)
    return env


# ---------------------------------------------------------------- file descriptors 1 and 2


class _FdPump:
    """Moves what is written to one fd (through a pipe) to the original fd, line by line, redacted."""

    _LIMIT = 1 << 16  # a line longer than this is redacted and written in pieces of this size

    def __init__(self, fd: int, red: Redactor):
        self.fd = fd
        self.red = red
        self.out = os.dup(fd)
        r, w = os.pipe()
        os.dup2(w, fd)
        os.close(w)
        self.r = r
        self.thread = threading.Thread(target=self._run, name=f"perennial-redact-fd{fd}", daemon=True)
        self.thread.start()

    def _write(self, data: bytes) -> None:
        data = self.red.redact_bytes(data)
        while data:
            try:
                n = os.write(self.out, data)
            except InterruptedError:
                continue
            except OSError:
                return
            data = data[n:]

    def _run(self) -> None:
        buf = b""
        try:
            while True:
                chunk = os.read(self.r, 1 << 16)
                if not chunk:
                    break
                buf += chunk
                cut = max(buf.rfind(b"\n"), buf.rfind(b"\r"))
                if cut >= 0:
                    self._write(buf[: cut + 1])
                    buf = buf[cut + 1:]
                while len(buf) > self._LIMIT:
                    # a huge line without a newline: redact what fits; a secret can straddle the cut only
                    # if it is written without any newline among 64 KiB, and then keep the tail's 4 KiB
                    self._write(buf[: self._LIMIT - 4096])
                    buf = buf[self._LIMIT - 4096:]
        except Exception:
            while True:
                try:
                    chunk = os.read(self.r, 1 << 16)
                except OSError:
                    break
                if not chunk:
                    break
                self._write(chunk)
        finally:
            if buf:
                self._write(buf)

    def stop(self, timeout: float = 5.0) -> None:
        os.dup2(self.out, self.fd)  # our own write end is closed: the thread sees EOF once children let go
        self.thread.join(timeout)


_pumps: list[_FdPump] = []


def install_fd_redaction() -> bool:
    """Redact everything written to fds 1 and 2 from now on (the trainer's entrypoint). False when
    there is nothing to redact (no secret known): then nothing is installed."""
    import sys

    red = redactor()
    if not red or _pumps:
        return bool(_pumps)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    for fd in (1, 2):
        _pumps.append(_FdPump(fd, red))
    atexit.register(_stop_pumps)
    return True


def _stop_pumps() -> None:
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    while _pumps:
        _pumps.pop().stop()


def make_non_dumpable() -> bool:
    """PR_SET_DUMPABLE 0 for this process, from its first moment: a same-uid process (a grader, a helper)
    cannot read its /proc/<pid>/environ or memory, where the credentials are. False where unavailable."""
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) == 0  # PR_SET_DUMPABLE
    except (OSError, AttributeError):
        return False
