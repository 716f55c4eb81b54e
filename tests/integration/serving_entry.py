"""`perennial-server` for the serving pods of the Deployment controller's end-to-end test: `engine ...` runs the
stand-in engine (serving_fake_engine.py: no model to load) on the engine's host and port; every other
subcommand (the sidecar) is the real `perennial_server.cli`."""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "engine":
        p = argparse.ArgumentParser()
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", default="8000")
        known, _ = p.parse_known_args(sys.argv[2:])
        sys.argv = [sys.argv[0], "--host", known.host, "--port", str(known.port)]
        if os.environ.get("HOSTNAME"):  # the pod's name, as the kubelet sets it: the engine answers with it
            os.environ.setdefault("POD_NAME", os.environ["HOSTNAME"])
        runpy.run_path(str(Path(__file__).with_name("serving_fake_engine.py")), run_name="__main__")
        return
    from perennial_server import cli

    sys.argv = ["perennial-server", *sys.argv[1:]]
    sys.exit(cli.main(sys.argv[1:]))


if __name__ == "__main__":
    main()
