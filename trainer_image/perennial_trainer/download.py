"""Download a BaseModel's weights into the cache volume: the BaseModel cache Job's program.

    python -m perennial_trainer.download --source hf://org/name --revision main --dest /cache/model

`hf://` goes through huggingface_hub (token from `HF_TOKEN`); `s3://`, `gs://`,
`file://` and `pvc://` through fsspec. A marker file makes a restarted Job a no-op
once a download completed; a partial download is resumed or redone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

from .storage import resolve_uri

MARKER = ".perennial-download.json"


def download(source: str, dest: str, revision: str | None = None) -> Path:
    target = Path(dest)
    marker = target / MARKER
    wanted = {"source": source, "revision": revision}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        print(f"already downloaded: {source} -> {target}", flush=True)
        return target
    target.mkdir(parents=True, exist_ok=True)
    parsed = urlparse(source)
    if parsed.scheme == "hf":
        from huggingface_hub import snapshot_download

        repo = f"{parsed.netloc}{parsed.path}".strip("/")
        snapshot_download(repo_id=repo, revision=revision, local_dir=str(target), token=os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
    else:
        import fsspec

        fs, path = fsspec.core.url_to_fs(resolve_uri(source))
        if not fs.exists(path):
            raise FileNotFoundError(f"{source} does not exist")
        fs.get(path.rstrip("/") + "/", str(target) + "/", recursive=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(wanted))
    os.replace(tmp, marker)
    print(f"downloaded {source} -> {target}", flush=True)
    return target


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the program itself: its output leaves the pod as its log (the Hub token must not)
        from .redact import install_fd_redaction

        install_fd_redaction()
    parser = argparse.ArgumentParser(prog="perennial_trainer.download", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--dest", required=True)
    parser.add_argument("--revision", default=None)
    args = parser.parse_args(argv)
    try:
        download(args.source, args.dest, args.revision)
    except Exception as exc:  # noqa: BLE001 - reported through the termination message and exit code
        from .redact import redact

        message = json.dumps({"status": "Failed", "reason": "DownloadFailed", "message": redact(f"{type(exc).__name__}: {exc}")[:3000]})
        try:
            Path(os.environ.get("PERENNIAL_TERMINATION_LOG", "/dev/termination-log")).write_text(message)
        except OSError:
            pass
        print(message, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
