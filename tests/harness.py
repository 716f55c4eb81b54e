"""Test harness: the real operator (kopf) against the embedded control plane, each in its own thread."""

from __future__ import annotations

import contextlib
import os
import time
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perennial.cli import install_crds
from perennial.config import OperatorConfig
from perennial.kube import Kube, connect
from perennial.local.apiserver import ServerThread, new_token, start_in_thread
from perennial.local.tls import self_signed
from perennial.local.faults import FaultConfig
from waiting import wait_for  # noqa: F401 - re-exported for the tests

API = "perennial.ai/v1alpha1"


def grace_seconds() -> int:
    """The operator pod's terminationGracePeriodSeconds (the chart's): how long a stop may take before the kubelet kills it."""
    import re

    chart = Path(__file__).resolve().parents[1] / "charts" / "perennial" / "templates" / "deployment.yaml"
    found = re.search(r"terminationGracePeriodSeconds:\s*(\d+)", chart.read_text())
    assert found, f"no terminationGracePeriodSeconds in {chart}"
    return int(found.group(1))


class OperatorThread:
    """`perennial.runtime.run` in a thread, stoppable and restartable."""

    def __init__(self, url: str, config: OperatorConfig, token: str | None = None, ca_file: str | None = None):
        from perennial.runtime import run

        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None

        def target() -> None:
            try:
                run(server=url, token=token, ca_file=ca_file, config=config, standalone=True, health_endpoint=None, metrics_port=None, stop_flag=self.stop_flag, ready_flag=self.ready_flag)
            except BaseException as exc:  # surfaced by stop()
                self.error = exc

        self.thread = threading.Thread(target=target, name="perennial-operator", daemon=True)
        self.thread.start()
        assert self.ready_flag.wait(30), "operator did not start"

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(grace_seconds())  # in a pod, the kubelet's SIGKILL would end it here
        assert not self.thread.is_alive(), f"operator did not stop within the pod's grace period ({grace_seconds()} s)"
        if self.error:
            raise self.error


@dataclass
class Cluster:
    server: ServerThread
    kube: Kube
    config: OperatorConfig
    operator: OperatorThread | None = None
    #: the operator's bearer token when it is not the server's own (PERENNIAL_TEST_RBAC)
    operator_token: str | None = None

    def start_operator(self) -> OperatorThread:
        self.operator = OperatorThread(self.server.url, self.config, self.operator_token or self.server.token, self.server.ca_file)
        return self.operator

    def stop_operator(self) -> None:
        if self.operator:
            self.operator.stop()
            self.operator = None

    def restart_operator(self) -> None:
        self.stop_operator()
        self.start_operator()

    # -- convenience ---------------------------------------------------------
    def create(self, kind: str, name: str, spec: dict[str, Any], namespace: str = "default", api: str = API) -> dict[str, Any]:
        return self.kube.create({"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": namespace}, "spec": spec})

    def get(self, kind: str, name: str, namespace: str = "default", api: str = API) -> dict[str, Any] | None:
        return self.kube.get(api, kind, namespace, name)

    def condition(self, kind: str, name: str, ctype: str = "Ready", namespace: str = "default") -> dict[str, Any] | None:
        obj = self.get(kind, name, namespace)
        for c in ((obj or {}).get("status") or {}).get("conditions") or []:
            if c["type"] == ctype:
                return c
        return None

    def wait_condition(self, kind: str, name: str, ctype: str, status: str, reason: str | None = None, timeout: float = 20) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            c = self.condition(kind, name, ctype)
            if c and c["status"] == status and (reason is None or c["reason"] == reason):
                return c
            return None

        return wait_for(check, timeout, message=f"{kind}/{name} {ctype}={status} {reason or ''}")

    def events(self, name: str, namespace: str = "default") -> list[dict[str, Any]]:
        return [e for e in self.kube.list("v1", "Event", namespace) if e.get("involvedObject", {}).get("name") == name]




class FakeKubelet:
    """Plays the kubelet and the Job controller for tests: pods, their status and their logs."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    def _pod_name(self, job: str, attempt: int = 0) -> str:
        return f"{job}-{attempt}"

    def start(self, job: str, namespace: str = "default", attempt: int = 0) -> str:
        kube = self.cluster.kube
        j = wait_for(lambda: kube.get("batch/v1", "Job", namespace, job), message=f"Job {job}")
        pod = self._pod_name(job, attempt)
        tpl = j["spec"]["template"]
        kube.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod,
                    "namespace": namespace,
                    "labels": {**tpl["metadata"].get("labels", {}), "job-name": job, "batch.kubernetes.io/job-name": job},
                    "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job, "uid": j["metadata"]["uid"], "controller": True}],
                },
                "spec": tpl["spec"],
            }
        )
        kube.patch("v1", "Pod", namespace, pod, {"status": {"phase": "Running", "containerStatuses": [{"name": "trainer", "restartCount": 0, "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}}, subresource="status")
        kube.patch("batch/v1", "Job", namespace, job, {"status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}}, subresource="status")
        return pod

    def log(self, pod: str, text: str, namespace: str = "default") -> None:
        self.cluster.server.append_pod_log(namespace, pod, text)

    def finish(self, job: str, pod: str, *, exit_code: int, message: str = "", reason: str | None = None, job_condition: str, job_reason: str = "", namespace: str = "default") -> None:
        kube = self.cluster.kube
        terminated = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error"), "message": message, "finishedAt": "2026-01-01T00:10:00Z"}
        kube.patch("v1", "Pod", namespace, pod, {"status": {"phase": "Succeeded" if exit_code == 0 else "Failed", "containerStatuses": [{"name": "trainer", "restartCount": 0, "state": {"terminated": terminated}}]}}, subresource="status")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # as the Job controller stamps it
        job_status: dict[str, Any] = {"active": 0, "conditions": [{"type": job_condition, "status": "True", "reason": job_reason, "message": job_reason, "lastTransitionTime": now}]}
        if job_condition == "Complete":
            job_status |= {"succeeded": 1, "completionTime": now}
        else:
            job_status |= {"failed": 1}
        kube.patch("batch/v1", "Job", namespace, job, {"status": job_status}, subresource="status")


@contextlib.contextmanager
def running_cluster(tmp_path: Path, faults: FaultConfig | None = None, **config: Any) -> Iterator[Cluster]:
    """The embedded control plane with the CRDs installed and the operator running
    (`faults`: injected into the operator's requests from the start). As under `perennial dev`, the control
    plane serves HTTPS and requires a bearer token (`server.token`, `server.ca_file`,
    `server.write_kubeconfig(path)`): every client of the tests authenticates as the operator's do."""
    server = start_in_thread(token=new_token(), tls=self_signed())
    kube = connect(server=server.url, token=server.token, ca_file=server.ca_file)
    install_crds(kube)
    settings = dict(
        pvc_root=str(tmp_path / "pvc"),
        artifact_uri=f"file://{tmp_path}/artifacts",
        feedback_store_uri=f"file://{tmp_path}/feedback",
        trainer_image="perennial-trainer:test",
        resync_seconds=1.0,  # look for missing artifacts every second
        progress_seconds=1.0,  # read a running trainer's progress every second
    )
    settings.update(config)
    c = Cluster(server=server, kube=kube, config=OperatorConfig(**settings))
    # PERENNIAL_TEST_RBAC=<file>: the operator runs as a ServiceAccount with exactly the RBAC objects of that
    # YAML file (the Helm chart's rendered RBAC: tests/unit/test_chart_rbac.py), not with the server's token.
    rbac_file = os.environ.get("PERENNIAL_TEST_RBAC")
    if rbac_file:
        c.operator_token = apply_operator_rbac(server, kube, Path(rbac_file))
        server.server.authz_log = []
    # Set after the CRDs are in: faults target the operator's clients (kopf's and its own), never the test's.
    server.set_faults(faults)
    c.start_operator()
    try:
        yield c
    finally:
        try:
            c.stop_operator()
        finally:
            if rbac_file:
                record_authz(server)
            server.stop()


def apply_operator_rbac(server: ServerThread, kube: Kube, path: Path) -> str:
    """Create the ServiceAccount and RBAC objects of `path` (namespaces as needed); a token of its ServiceAccount."""
    import yaml

    docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict) and d.get("kind")]
    for ns in sorted({d["metadata"].get("namespace") for d in docs if d["metadata"].get("namespace")}):
        if kube.get("v1", "Namespace", None, ns) is None:
            kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    plurals = {"ServiceAccount": "serviceaccounts", "Role": "roles", "RoleBinding": "rolebindings",
               "ClusterRole": "clusterroles", "ClusterRoleBinding": "clusterrolebindings"}
    for d in docs:
        server.create(d["apiVersion"], plurals[d["kind"]], d, d["metadata"].get("namespace"))
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    return server.issue_service_account_token(sa["metadata"]["namespace"], sa["metadata"]["name"])


def record_authz(server: ServerThread, where: str = "hub") -> None:
    """PERENNIAL_TEST_AUTHZ_LOG=<file>: append every RBAC decision of `server` (JSON lines; `where`: which cluster)."""
    import json

    out = os.environ.get("PERENNIAL_TEST_AUTHZ_LOG")
    if not out or server.server.authz_log is None:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    with open(out, "a") as f:
        for user, a, d in server.server.authz_log:
            f.write(json.dumps({"where": where, "test": test, "user": user.name, "verb": a.verb, "group": a.api_group, "resource": a.resource,
                                "subresource": a.subresource, "namespace": a.namespace, "name": a.name,
                                "path": "" if a.resource_request else a.path, "allowed": d.allowed,
                                "rules": [str(r) for r in d.rules]}) + "\n")
