"""Flows that only the chart's RBAC makes interesting (tests/integration/test_chart_rbac.py runs them, one rule removed).

1. A hub operator serves a region in a member cluster whose only grant is the chart's member-region RBAC.

The member cluster's API server authorizes the hub's token (a ServiceAccount token of the member cluster, as
NOTES.txt tells the platform team to make) with the RBAC objects `helm install --set mode=member-region` renders
there, or, under tests/integration/test_chart_rbac.py, those of PERENNIAL_TEST_MEMBER_RBAC (one rule removed).
The flow: children applied there, the smoke test through the API server's services/proxy, the sidecars' routes
through pods/proxy, a pod-level rollout to the other color, and deletion cleaning the region.

2. The operator, as the chart's ServiceAccount, starts where KEDA is installed (it then watches ScaledObjects).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import helm_python
import pytest
import yaml
from conftest import record_managers
from harness import API, Cluster, apply_operator_rbac, record_authz, running_cluster, wait_for
from test_deployment_regions import NS, SPEC, World, Pods, run_pods, serve_home

from perennial.cli import install_crds
from perennial.config import OperatorConfig
from perennial.kube import connect
from perennial.local.apiserver import new_token, start_in_thread, write_kubeconfig
from perennial.local.tls import self_signed

ROOT = Path(__file__).resolve().parents[2]
MANAGED = "app.kubernetes.io/managed-by=perennial-operator"


RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


def chart_rbac_file(tmp_path: Path, env: str, values: dict, name: str) -> Path:
    """The RBAC objects of `env`'s file when set, else those the chart renders for `values`."""
    given = os.environ.get(env)
    if given:
        return Path(given)
    out = helm_python.Chart.load(str(ROOT / "charts" / "perennial")).render(values, name="perennial", namespace="perennial-system")
    docs = [d for p, t in sorted(out.items()) if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] in RBAC_KINDS]))
    return path


def member_rbac(tmp_path: Path) -> Path:
    return chart_rbac_file(tmp_path, "PERENNIAL_TEST_MEMBER_RBAC", {"mode": "member-region", "watch": {"namespaces": [NS]},
                                                                    "rbac": {"create": True, "clusterWideSecrets": False}}, "member-rbac")


KEDA_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "scaledobjects.keda.sh"},
    "spec": {"group": "keda.sh", "scope": "Namespaced",
             "names": {"kind": "ScaledObject", "listKind": "ScaledObjectList", "plural": "scaledobjects", "singular": "scaledobject"},
             "versions": [{"name": "v1alpha1", "served": True, "storage": True, "subresources": {"status": {}},
                           "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
}


def test_the_operator_starts_where_keda_is_installed(tmp_path: Path):
    """KEDA's CRD is installed before the operator starts (the chart's defaults: keda.enabled false): the operator
    lists and watches ScaledObjects as the chart's ServiceAccount, reconciles, and is denied nothing."""
    server = start_in_thread(token=new_token(), tls=self_signed())
    try:
        kube = connect(server=server.url, token=server.token, ca_file=server.ca_file)
        install_crds(kube)
        server.apply_crd(KEDA_CRD)
        token = apply_operator_rbac(server, kube, chart_rbac_file(tmp_path, "PERENNIAL_TEST_RBAC", {}, "operator-rbac"))
        server.server.authz_log = []
        cluster = Cluster(server=server, kube=kube, config=OperatorConfig(pvc_root=str(tmp_path / "pvc"), artifact_uri=f"file://{tmp_path}/a",
                                                                          feedback_store_uri=f"file://{tmp_path}/f"), operator_token=token)
        cluster.start_operator()
        try:
            cluster.create("BaseModel", "base", {"source": {"uri": "hf://org/model"}})
            cluster.wait_condition("BaseModel", "base", "Ready", "True", timeout=60)
            wait_for(lambda: any(a.resource == "scaledobjects" and a.verb == "watch" for _, a, _ in server.server.authz_log),
                     timeout=60, message="the operator watching ScaledObjects")
        finally:
            cluster.stop_operator()
        denied = sorted({a.describe() for _, a, d in server.server.authz_log if not d.allowed})
        assert not denied, f"denied to the operator: {denied}"
    finally:
        record_authz(server, where="hub")
        server.stop()


def test_a_region_serves_with_the_charts_member_region_rbac(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    managers = record_managers(monkeypatch)
    region = start_in_thread(token=new_token(), tls=self_signed())
    pods: list[Pods] = []
    try:
        admin = connect(server=region.url, token=region.token, ca_file=region.ca_file)
        if admin.get("v1", "Namespace", None, NS) is None:
            admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        token = apply_operator_rbac(region, admin, member_rbac(tmp_path))
        region.server.authz_log = []
        kubeconfig = write_kubeconfig(tmp_path / "east.kubeconfig", region.url, token=token, ca_pem=region.server.tls.cert_pem,
                                      namespace=NS).read_text()
        with running_cluster(tmp_path) as hub:
            hub.kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "east-cluster", "namespace": NS},
                             "type": "Opaque", "data": {"kubeconfig": base64.b64encode(kubeconfig.encode()).decode()}})
            artifact = tmp_path / "artifacts" / "support-v1"
            artifact.mkdir(parents=True)
            (artifact / "adapter_config.json").write_text("{}")
            hub.create("BaseModel", "base", {"source": {"uri": "hf://org/model"}})
            hub.create("Adapter", "support-v1", {"baseModelRef": {"name": "base"}, "family": "support", "version": 1,
                                                 "artifactUri": "s3://models/support-v1", "lora": {"rank": 8}})
            hub.wait_condition("BaseModel", "base", "Ready", "True")
            pods = [Pods(hub.kube, "chat-routes"), Pods(admin, "chat-routes")]
            w = World(hub, region, admin, *pods, managers)

            hub.create("Deployment", "chat", SPEC)
            serve_home(w)
            run_pods(admin, "chat-blue", w.east)
            hub.wait_condition("Deployment", "chat", "Ready", "True", "Serving", timeout=90)
            assert w.region_status("east")["phase"] == "Stable", w.status()
            assert admin.get("v1", "Secret", NS, "chat-feedback-token") is not None
            smoke = [h for m, p, h in w.east.requests if m == "POST" and p.endswith("/v1/chat/completions")]
            assert smoke, "the smoke test never reached the region's preview Service through its API server"

            # a change of the pods: a rollout to green in both clusters
            hub.kube.patch(API, "Deployment", NS, "chat", {"spec": {"engine": {"extraArgs": ["--enforce-eager"]}}})
            run_pods(hub.kube, "chat-green", w.home)
            run_pods(admin, "chat-green", w.east)
            wait_for(lambda: w.region_status("east").get("activeColor") == "green", timeout=90, message="east switched to green")
            hub.wait_condition("Deployment", "chat", "Ready", "True", "Serving", timeout=90)

            # deleted: its children in the region go too, then the finalizer lets it go
            hub.kube.delete(API, "Deployment", NS, "chat")
            wait_for(lambda: hub.get("Deployment", "chat") is None, timeout=90, message="the Deployment is gone")
            kinds = (("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ConfigMap"), ("policy/v1", "PodDisruptionBudget"))
            left = [(k, o["metadata"]["name"]) for a, k in kinds for o in admin.list(a, k, NS, MANAGED)]
            assert not left, left
        denied = [(d.verb, d.resource, d.subresource) for u, d_attrs, dec in region.server.authz_log
                  for d in [d_attrs] if not dec.allowed]
        assert not denied, f"the member cluster denied the hub: {sorted(set(denied))}"
    finally:
        for u, a, dec in (region.server.authz_log or []):
            if not dec.allowed:
                print("DENIED in the member cluster:", a.describe())
        record_authz(region, where="region")
        for p in pods:
            p.close()
        region.stop()


def test_the_operator_watching_a_namespace_list_needs_only_its_rolebindings(tmp_path: Path):
    """watch.namespaces=[team-a, team-b]: the operator (`perennial run -n team-a -n team-b`) reconciles there with
    the RoleBindings the chart renders and its one cluster-wide grant (CRDs), and is denied nothing."""
    import threading

    from perennial.runtime import run

    values = {"watch": {"namespaces": ["team-a", "team-b"]}, "rbac": {"create": True, "clusterWideSecrets": False}}
    server = start_in_thread(token=new_token(), tls=self_signed())
    stop, ready = threading.Event(), threading.Event()
    try:
        kube = connect(server=server.url, token=server.token, ca_file=server.ca_file)
        install_crds(kube)
        for ns in ("team-a", "team-b", "elsewhere"):
            kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        rbac = chart_rbac_file(tmp_path, "PERENNIAL_TEST_NAMESPACED_RBAC", values, "namespaced-rbac")
        assert not [d for d in yaml.safe_load_all(rbac.read_text()) if d["kind"] == "ClusterRoleBinding" and d["roleRef"]["name"] == "perennial"]
        token = apply_operator_rbac(server, kube, rbac)
        server.server.authz_log = []
        config = OperatorConfig(pvc_root=str(tmp_path / "pvc"), artifact_uri=f"file://{tmp_path}/a", feedback_store_uri=f"file://{tmp_path}/f")
        thread = threading.Thread(target=run, kwargs=dict(server=server.url, token=token, ca_file=server.ca_file, config=config,
                                                          namespaces=["team-a", "team-b"], standalone=True, health_endpoint=None,
                                                          metrics_port=None, stop_flag=stop, ready_flag=ready), daemon=True)
        thread.start()
        assert ready.wait(60), "operator did not start"
        spec = {"source": {"uri": "hf://org/model"}}
        for ns in ("team-a", "team-b", "elsewhere"):
            kube.create({"apiVersion": API, "kind": "BaseModel", "metadata": {"name": "base", "namespace": ns}, "spec": spec})
        for ns in ("team-a", "team-b"):
            wait_for(lambda ns=ns: any(c["type"] == "Ready" and c["status"] == "True" for c in
                                       ((kube.get(API, "BaseModel", ns, "base") or {}).get("status") or {}).get("conditions") or []),
                     timeout=60, message=f"BaseModel {ns}/base Ready")
        stop.set()
        thread.join(30)
        assert not (kube.get(API, "BaseModel", "elsewhere", "base").get("status") or {}), "a namespace it does not watch was reconciled"
        denied = sorted({a.describe() for _, a, d in server.server.authz_log if not d.allowed})
        assert not denied, f"denied to the operator: {denied}"
        assert {a.namespace for _, a, d in server.server.authz_log if a.verb == "watch" and a.resource == "basemodels"} == {"team-a", "team-b"}
    finally:
        stop.set()
        record_authz(server, where="namespaced")
        server.stop()
