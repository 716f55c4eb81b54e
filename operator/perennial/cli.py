"""`perennial`: generate CRDs, run the operator, or run everything locally (`perennial dev`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml


def _crds(args: argparse.Namespace) -> int:
    from . import crdgen

    if args.action == "write":
        for path in crdgen.write():
            print(f"wrote {path}")
        return 0
    problems = crdgen.check()
    if problems:
        print("crds/ is stale; run `perennial crds write` and commit the result:\n", file=sys.stderr)
        for p in problems:
            print(p, file=sys.stderr)
        return 1
    print("crds/ matches the API models")
    return 0


class _QuietTimers(logging.Filter):
    """Drop kopf's "Timer '…' succeeded." lines: one per object every few seconds says nothing new."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not (record.getMessage().startswith("Timer '") and record.getMessage().endswith("' succeeded."))


def _configure_logging(fmt: str, verbose: bool) -> None:
    import kopf

    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON if fmt == "json" else kopf.LogFormat.PLAIN)
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_QuietTimers())


def _run(args: argparse.Namespace) -> int:
    from . import runtime_gc
    from .runtime import run

    _configure_logging(args.log_format, args.verbose)
    runtime_gc.tune()  # once imported: a long-running process (runtime_gc)
    run(
        kubeconfig=args.kubeconfig,
        namespaces=args.namespace or None,
        health_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
        metrics_port=args.metrics_port or None,
        standalone=args.standalone,
    )
    return 0


def load_manifests(paths: list[str]) -> list[dict[str, Any]]:
    """YAML documents of the given files and directories (sorted; like `kubectl apply -f`, not recursive), in a dependency-friendly order."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(x for x in p.glob("*") if x.suffix in (".yaml", ".yml")) if p.is_dir() else [p]
    docs = []
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            if isinstance(doc, dict) and doc.get("kind"):
                docs.append(doc)
    order = {"Namespace": 0, "CustomResourceDefinition": 1, "Secret": 2, "ConfigMap": 2, "PersistentVolumeClaim": 2, "BaseModel": 3, "RewardSpec": 3}
    return sorted(docs, key=lambda d: order.get(d["kind"], 5))


def install_crds(kube: Any) -> None:
    from .crdgen import all_crds

    for crd in all_crds():
        kube.apply(crd)


LOCAL_TRAINER_IMAGE = "perennial-trainer:local"
LOCAL_SERVER_IMAGE = "perennial-server:local"


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _start_control_plane(host: str, port: int, state: Path, faults: Any = None, crds: bool = True,
                         cleanup: list[Any] | None = None) -> tuple[Any, Path, Any]:
    """The embedded API server in a background thread, a kubeconfig for it under `state`, and a client (CRDs installed, then `faults` on).
    The server's stop is appended to `cleanup` as soon as it runs.

    The server serves HTTPS with a fresh self-signed certificate and refuses requests without a fresh random bearer
    token; the kubeconfig (mode 0600) holds both."""
    from .kube import connect
    from .local.apiserver import new_token, start_in_thread
    from .local.tls import self_signed

    if not _is_loopback(host):
        logging.getLogger("perennial").warning(
            "The control plane listens on %s, not only on loopback: other machines can reach it (HTTPS with a "
            "self-signed certificate, the kubeconfig's bearer token required). Prefer the default --host 127.0.0.1.", host)
    token = new_token()
    server = start_in_thread(host, port, token=token, tls=self_signed(host))
    if cleanup is not None:
        cleanup.append(server.stop)
    kubeconfig = server.write_kubeconfig(state / "kubeconfig")
    kube = connect(server=server.url, token=token, ca_file=server.ca_file)
    if crds:
        install_crds(kube)
    server.set_faults(faults)  # after the CRDs: faults are for the clients under test, not for the setup
    return server, kubeconfig, kube


def _control_plane(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .local.faults import FaultConfig

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    state = Path(args.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    faults = None
    if args.faults_rate:
        faults = FaultConfig(rate=args.faults_rate, faults=tuple(args.faults.split(",")), seed=args.faults_seed,
                             user_agents=tuple(args.faults_clients.split(",")))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server, kubeconfig, _ = _start_control_plane(args.host, args.port, state, faults, args.crds)
    from . import runtime_gc

    runtime_gc.tune()  # started: a long-running process (runtime_gc)
    print(f"control plane  {server.url}\nkubeconfig     {kubeconfig}\n"
          f"faults         {server.faults.to_dict() if faults else 'off'} (PUT {server.url}/debug/perennial/faults)\n"
          f"requests       {server.url}/debug/perennial/requests\nPress Ctrl-C to stop.", flush=True)
    try:
        while not stop.wait(3600):
            pass
    finally:
        server.stop()
    return 0


class _Stopped(BaseException):
    """Ctrl-C or SIGTERM while `perennial dev` starts (raised by its signal handler).

    Not KeyboardInterrupt: CPython 3.11 records a KeyboardInterrupt that passes through code run by
    `PyRun_String` (extension modules do, e.g. while they are imported) as unhandled for good, and the
    process then ends killed by SIGINT (exit status -2) even though `perennial dev` caught it and
    stopped cleanly."""


def _caused_by_stop(exc: BaseException) -> bool:
    """Whether `exc` was raised because of a `_Stopped`: the signal handler raises it wherever the main thread
    is, and some places turn what is raised there into another exception with it as the cause (CPython 3.11
    wraps what a descriptor's `__set_name__` raises, as while a dataclass is defined, in a RuntimeError)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, _Stopped):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _dev(args: argparse.Namespace) -> int:
    import signal
    import threading

    stop = threading.Event()  # also kopf's stop flag: a signal after the start stops the operator through it
    starting = True

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()
        if starting:
            raise _Stopped(signum)

    previous: dict[int, Any] = {}
    cleanup: list[Any] = []  # what started, stopped in reverse order whatever happens next
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
        operator = _dev_start(args, cleanup)
        starting = False  # from here on a signal sets the flag: the operator's imports and its start end on it
        from .runtime import run

        if not stop.is_set():
            # kopf installs its own SIGINT/SIGTERM handlers once it runs; until then on_signal sets the flag
            run(stop_flag=stop, **operator)
    except (_Stopped, Exception) as exc:  # _Stopped itself, or as the cause of what Python wrapped it in
        starting = False  # a second signal now only sets the flag
        if not _caused_by_stop(exc):
            raise
        print("Stopped while starting.", flush=True)
    except KeyboardInterrupt:  # with the asyncio loop: a Ctrl-C between its close putting back Python's handler and ours
        starting = False
        print("Stopped.", flush=True)
    finally:
        starting = False
        for sig in previous:  # an asyncio loop's close puts back Python's default handlers: a second signal waits too
            signal.signal(sig, on_signal)
        failed = 0
        for stopper in reversed(cleanup):
            try:
                stopper()
            except Exception:  # the rest is stopped all the same (the child processes above all)
                failed += 1
                logging.getLogger("perennial").exception("Stopping %s failed", getattr(stopper, "__qualname__", stopper))
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if failed else 0


def _dev_start(args: argparse.Namespace, cleanup: list[Any]) -> dict[str, Any]:
    """Start everything of `perennial dev` but the operator (each part's stop appended to `cleanup`): the
    operator's arguments (`runtime.run`)."""
    from .local.cluster import LocalCluster

    _configure_logging(args.log_format, args.verbose)
    state = Path(args.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    pvc_root = state / "pvc"
    if args.demo:
        from perennial_trainer.demo import prepare

        print(f"Preparing the demo: a tiny offline model and toy data under {pvc_root} ...", flush=True)
        prepare(pvc_root)
    server, kubeconfig, kube = _start_control_plane(args.host, args.port, state, cleanup=cleanup)
    applied = []
    for doc in load_manifests(args.apply or []):
        doc.setdefault("metadata", {}).setdefault("namespace", "default")
        _, action = kube.apply(doc)
        applied.append(f"{doc['kind']}/{doc['metadata']['name']} {action}")
    print(
        f"""
Perennial dev is running.
  control plane  {server.url}
  kubeconfig     {kubeconfig}
  metrics        http://{args.host}:{args.metrics_port}/metrics   (once the operator has started, a few seconds)
  health         http://{args.host}:{args.health_port}/healthz
{''.join(f'  applied        {a}{chr(10)}' for a in applied)}
Jobs of the trainer image run here as local processes (logs: kubectl logs -l perennial.ai/trainingrun=<name>),
and so do the pods of Deployments of the server image; each Service is proxied on a local port
(its annotation perennial.ai/local-url: kubectl get svc <name> -o yaml).
In another shell:
  export KUBECONFIG={kubeconfig}
  kubectl get perennial
  kubectl get trainingruns -w          # progress, reward, adapter
  kubectl describe trainingrun <name>
  kubectl get pdeploy -w               # serving: adapters, active color, ready, phase (a URL is printed here once Ready)
  kubectl explain trainingrun.spec
Press Ctrl-C to stop.
""",
        flush=True,
    )
    from .config import OperatorConfig

    config = OperatorConfig(
        pvc_root=str(pvc_root),
        # under the PVC root: the serving pods' sidecars load local adapter paths from their claims only (the local
        # runtime gives its processes PERENNIAL_PVC_ROOT=<pvc_root>), as a cluster's adapters live on a claim
        artifact_uri=f"file://{pvc_root / 'artifacts'}",
        feedback_store_uri=f"file://{state / 'feedback'}",
        trainer_image=LOCAL_TRAINER_IMAGE,
        server_image=LOCAL_SERVER_IMAGE,
        # one machine, one store on its disk: look at the feedback of learning Deployments often (a look reads only
        # the segments new since the last one)
        learning_seconds=10.0,
    )
    # The local runtime: Pods (of Jobs, of apps/v1 Deployments) that run Perennial's own images become local
    # processes; Services get local ports (annotation perennial.ai/local-url).
    kubelet = LocalCluster(
        kube,
        server,
        workdir=state / "pods",
        pvc_root=str(pvc_root),
        images={
            LOCAL_TRAINER_IMAGE: [sys.executable, "-m", "perennial_trainer"],
            LOCAL_SERVER_IMAGE: [sys.executable, "-m", "perennial_server.cli"],
        },
    )
    cleanup.append(kubelet.stop)
    kubelet.start()
    # Once a Perennial Deployment is Ready: its URL, model names and how to call it and rate an answer.
    from .devserving import ServingAnnouncer

    announcer = ServingAnnouncer(kube, str(kubeconfig)).start()
    cleanup.append(announcer.stop)
    # The demo's loop: simulated users ask and rate through the sidecar once the Deployment serves; the story is
    # printed as it happens and the approval chart written under the state dir.
    if args.demo and args.users > 0:
        from .devloop import LoopStory

        story = LoopStory(kube, state / "loop", deployment=args.users_deployment, model=args.users_model, users=args.users,
                          think=args.users_think).start()
        cleanup.append(story.stop)
        print(f"Simulated users: {args.users}, once Deployment {args.users_deployment} serves {args.users_model} "
              f"(--no-users to opt out); approval chart: {state / 'loop.png'}\n", flush=True)
    return {
        "server": server.url,
        "token": server.token,
        "ca_file": server.ca_file,
        "config": config,
        "standalone": True,
        "health_endpoint": f"http://{args.host}:{args.health_port}/healthz",
        "metrics_port": args.metrics_port,
        "metrics_host": args.host,
    }


def _promote(args: argparse.Namespace) -> int:
    """Promote the rollout of a Perennial Deployment that waits for it (`autoPromote: false`): set the annotation
    `perennial.ai/promote` to the value its status names (`status.regions[].pendingPromotion`)."""
    from .api.deployment import PROMOTE_ANNOTATION
    from .kube import connect

    logging.basicConfig(level=logging.WARNING)
    kube = connect(kubeconfig=args.kubeconfig, context=args.context)
    obj = kube.get("perennial.ai/v1alpha1", "Deployment", args.namespace, args.name)
    if obj is None:
        print(f"Deployment {args.namespace}/{args.name} (perennial.ai) not found", file=sys.stderr)
        return 1
    pending = sorted({r["pendingPromotion"] for r in (obj.get("status") or {}).get("regions") or [] if r.get("pendingPromotion")})
    value = args.value
    if value is None:
        if not pending:
            print(f"Deployment {args.namespace}/{args.name}: no rollout waits for a promotion "
                  "(status.regions[].pendingPromotion is empty)", file=sys.stderr)
            return 1
        if len(pending) > 1:
            print(f"Deployment {args.namespace}/{args.name}: regions wait for different promotions ({', '.join(pending)}): "
                  "name one with --value", file=sys.stderr)
            return 1
        value = pending[0]
    kube.patch("perennial.ai/v1alpha1", "Deployment", args.namespace, args.name, {"metadata": {"annotations": {PROMOTE_ANNOTATION: value}}})
    print(f"deployment.perennial.ai/{args.name} promoted: {PROMOTE_ANNOTATION}={value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="perennial", description="Perennial: the lifecycle of specialized LLMs on Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True)

    crds = sub.add_parser("crds", help="generate or check crds/ from the API models")
    crds.add_argument("action", choices=["write", "check"])
    crds.set_defaults(func=_crds)

    run = sub.add_parser("run", help="run the operator against the current kubeconfig or in-cluster config")
    run.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    run.add_argument("--namespace", "-n", action="append", help="watch only this namespace (repeatable); all by default")
    run.add_argument("--metrics-port", type=int, default=8080)
    run.add_argument("--health-port", type=int, default=8081)
    run.add_argument("--standalone", action="store_true", help="no peering (a single replica)")
    run.add_argument("--log-format", choices=["plain", "json"], default="json")
    run.add_argument("--verbose", action="store_true")
    run.set_defaults(func=_run)

    dev = sub.add_parser("dev", help="embedded control plane + operator on this machine")
    dev.add_argument("--host", default="127.0.0.1", help="address of the control plane, metrics and health endpoints (default: loopback only)")
    dev.add_argument("--port", type=int, default=6444)
    dev.add_argument("--state-dir", default=".perennial")
    dev.add_argument("--apply", action="append", help="manifest file or directory to apply at start (repeatable)")
    dev.add_argument("--demo", action="store_true", help="build a tiny offline model and toy data for examples/local (trains on a laptop CPU)")
    dev.add_argument("--users", type=int, default=2, help="with --demo: simulated users asking and rating once the demo's Deployment serves")
    dev.add_argument("--no-users", dest="users", action="store_const", const=0, help="with --demo: no simulated users (nothing trains by itself)")
    dev.add_argument("--users-think", type=float, default=1.0, help="mean seconds a simulated user waits between questions")
    dev.add_argument("--users-deployment", default="fruit-chat", help="the Deployment (namespace default) the simulated users ask")
    dev.add_argument("--users-model", default="fruit", help="the served name the simulated users ask")
    dev.add_argument("--metrics-port", type=int, default=9090)
    dev.add_argument("--health-port", type=int, default=9091)
    dev.add_argument("--log-format", choices=["plain", "json"], default="plain")
    dev.add_argument("--verbose", action="store_true")
    dev.set_defaults(func=_dev)

    promote = sub.add_parser("promote", help="promote the rollout of a Deployment that waits for it (autoPromote: false)")
    promote.add_argument("name", help="the Perennial Deployment")
    promote.add_argument("--namespace", "-n", default="default")
    promote.add_argument("--value", help="the revision (or Adapter) to promote; default: the one status.regions[].pendingPromotion names")
    promote.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    promote.add_argument("--context", default=None)
    promote.set_defaults(func=_promote)

    from .simusers import add_parser as add_simulate_users

    add_simulate_users(sub)

    cp = sub.add_parser("control-plane", help="only the embedded control plane (API server, CRDs installed), in this process")
    cp.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    cp.add_argument("--port", type=int, default=6444)
    cp.add_argument("--state-dir", default=".perennial", help="where the kubeconfig is written")
    cp.add_argument("--crds", action=argparse.BooleanOptionalAction, default=True, help="install Perennial's CRDs")
    cp.add_argument("--faults-rate", type=float, default=0.0, help="probability per request of an injected fault (0: none)")
    cp.add_argument("--faults", default="500,429,409,slow,watch-close,410", help="comma-separated kinds of faults to inject")
    cp.add_argument("--faults-seed", type=int, default=None)
    cp.add_argument("--faults-clients", default="kopf,perennial-operator", help="comma-separated User-Agent prefixes faults hit")
    cp.add_argument("--verbose", action="store_true")
    cp.set_defaults(func=_control_plane)

    args = parser.parse_args(argv)
    if args.command == "crds":
        logging.basicConfig(level=logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
