"""`perennial-server` command: `sidecar`, `engine`, `vllm`."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from .config import add_sidecar_args

    p = argparse.ArgumentParser(prog="perennial-server", description="Perennial serving pod: feedback sidecar, CPU engine, vLLM launcher.")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)

    sc = sub.add_parser("sidecar", help="feedback sidecar: OpenAI-compatible proxy, capture, /v1/feedback")
    add_sidecar_args(sc)

    from .engine import add_engine_args
    from .vllm import add_vllm_args

    add_engine_args(sub.add_parser("engine", help="CPU engine: Transformers + PEFT, OpenAI-compatible"))
    add_vllm_args(sub.add_parser("vllm", help="build the vLLM command line from an engine spec and exec it"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    if args.command == "sidecar":
        from .config import sidecar_config_from_args

        cfg = sidecar_config_from_args(args)
        if cfg.worker_index >= 0:
            # a worker stopped while still starting would skip recovering and shipping its spool:
            # hold SIGTERM/SIGINT until serve() has its handlers (it unblocks them)
            import signal

            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        if cfg.workers > 1 and cfg.worker_index < 0:
            from .workers import supervise

            return supervise(cfg, args.log_level)
        from .sidecar import main as sidecar_main

        sidecar_main(cfg)
        return 0
    if args.command == "engine":
        from .engine import main as engine_main

        return engine_main(args) or 0
    if args.command == "vllm":
        from .vllm import main as vllm_main

        return vllm_main(args) or 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
