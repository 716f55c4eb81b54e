"""The embedded API server driven by real clients: kopf 1.45 and kubectl 1.32."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from harness import wait_for

from perennial.local.apiserver import start_in_thread, write_kubeconfig

GROUP = "itest.perennial.ai"

CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"gadgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"kind": "Gadget", "plural": "gadgets", "singular": "gadget", "shortNames": ["gdg"],
                  "categories": ["perennial"]},
        "versions": [{
            "name": "v1alpha1", "served": True, "storage": True,
            "subresources": {"status": {}},
            "additionalPrinterColumns": [
                {"name": "Method", "type": "string", "jsonPath": ".spec.method"},
                {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            ],
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "description": "A Gadget is a test kind.",
                "properties": {
                    "spec": {
                        "type": "object", "description": "What the gadget should do.", "required": ["method"],
                        "properties": {
                            "method": {"type": "string", "enum": ["SFT", "DPO", "GRPO"],
                                       "description": "Training method of the gadget."},
                            "steps": {"type": "integer", "minimum": 1, "default": 10},
                        },
                    },
                    "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                },
            }},
        }],
    },
}

GADGET = {"apiVersion": f"{GROUP}/v1alpha1", "kind": "Gadget",
          "metadata": {"name": "g1", "namespace": "default"}, "spec": {"method": "SFT"}}


@pytest.fixture
def server():
    srv = start_in_thread()
    srv.apply_crd(CRD)
    yield srv
    srv.stop()


# --------------------------------------------------------------------------- kopf


def test_kopf_operator_finalizer_child_and_garbage_collection(server):
    kopf = pytest.importorskip("kopf")
    from kubernetes import client

    registry = kopf.OperatorRegistry()
    url = server.url
    created: list[float] = []

    @kopf.on.login(registry=registry)
    def login(**_):
        return kopf.ConnectionInfo(server=url, scheme="Bearer", token="x", insecure=True)

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_):
        settings.posting.enabled = True
        settings.watching.server_timeout = 30
        settings.persistence.finalizer = "itest.perennial.ai/finalizer"

    @kopf.on.create(GROUP, "v1alpha1", "gadgets", registry=registry)
    def on_create(body, namespace, name, **_):
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-child"},
              "data": {"method": body["spec"]["method"]}}
        kopf.adopt(cm, owner=body)
        api = client.CoreV1Api(_api_client(url))
        api.create_namespaced_config_map(namespace, cm)
        created.append(time.monotonic())
        kopf.info(body, reason="Created", message=f"Created ConfigMap {name}-child")

    @kopf.on.delete(GROUP, "v1alpha1", "gadgets", registry=registry)
    def on_delete(**_):
        pass

    stop, ready = threading.Event(), threading.Event()

    def run() -> None:
        import asyncio

        asyncio.run(kopf.operator(registry=registry, standalone=True, clusterwide=True,
                                  stop_flag=stop, ready_flag=ready))

    logging.getLogger("kopf").setLevel(logging.WARNING)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert ready.wait(15), "kopf did not become ready"
        api = client.CustomObjectsApi(_api_client(url))
        core = client.CoreV1Api(_api_client(url))
        t0 = time.monotonic()
        api.create_namespaced_custom_object(GROUP, "v1alpha1", "default", "gadgets", GADGET)
        cm = wait_for(lambda: _try(lambda: core.read_namespaced_config_map("g1-child", "default")))
        assert cm.data == {"method": "SFT"}
        owner = api.get_namespaced_custom_object(GROUP, "v1alpha1", "default", "gadgets", "g1")
        assert cm.metadata.owner_references[0].uid == owner["metadata"]["uid"]
        assert "itest.perennial.ai/finalizer" in owner["metadata"]["finalizers"]
        print(f"create -> child ConfigMap in {1000 * (created[0] - t0):.1f} ms")
        # kopf posts its handler events through the core v1 Events API
        events = wait_for(lambda: core.list_namespaced_event(
            "default", field_selector="involvedObject.name=g1,involvedObject.kind=Gadget").items)
        assert events[0].reason == "Created" and events[0].source.component == "kopf"

        api.delete_namespaced_custom_object(GROUP, "v1alpha1", "default", "gadgets", "g1")
        wait_for(lambda: _gone(lambda: api.get_namespaced_custom_object(GROUP, "v1alpha1", "default",
                                                                        "gadgets", "g1")))
        wait_for(lambda: _gone(lambda: core.read_namespaced_config_map("g1-child", "default")))
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(15)
    assert not thread.is_alive()


def _api_client(url: str):
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = url
    return client.ApiClient(cfg)


def _try(fn):
    from kubernetes.client.exceptions import ApiException

    try:
        return fn()
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _gone(fn) -> bool:
    return _try(fn) is None


# --------------------------------------------------------------------------- kubectl

kubectl_bin = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(kubectl_bin is None, reason="kubectl is not on PATH")


@pytest.fixture
def kubectl(server, tmp_path: Path):
    cfg = write_kubeconfig(tmp_path / "kubeconfig", server.url)
    env = {**os.environ, "KUBECONFIG": str(cfg), "HOME": str(tmp_path)}

    def run(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([kubectl_bin, "--cache-dir", str(tmp_path / "cache"), *args], input=input,
                              capture_output=True, text=True, env=env, timeout=30)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    return run


@needs_kubectl
@pytest.mark.kubectl
def test_kubectl_apply_get_describe_explain_delete(server, kubectl, tmp_path: Path):
    manifest = tmp_path / "gadget.yaml"
    manifest.write_text(yaml.safe_dump(GADGET))
    assert "gadget.itest.perennial.ai/g1 created" in kubectl("apply", "-f", str(manifest)).stdout
    assert "unchanged" in kubectl("apply", "-f", str(manifest)).stdout
    changed = dict(GADGET, spec={"method": "DPO"})
    manifest.write_text(yaml.safe_dump(changed))
    assert "configured" in kubectl("apply", "-f", str(manifest)).stdout
    obj = json.loads(kubectl("get", "gadget", "g1", "-o", "json").stdout)
    assert obj["spec"] == {"method": "DPO", "steps": 10}  # defaulted by the schema
    assert obj["metadata"]["generation"] == 2

    # a ConfigMap through client-side apply (strategic merge patch on re-apply)
    cm = tmp_path / "cm.yaml"
    cm.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
                                  "data": {"a": "1"}}))
    kubectl("apply", "-f", str(cm))
    cm.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
                                  "data": {"b": "2"}}))
    proc = kubectl("apply", "-f", str(cm))
    assert "configured" in proc.stdout and "warning" not in proc.stderr.lower(), proc.stderr
    assert json.loads(kubectl("get", "cm", "cfg", "-o", "json").stdout)["data"] == {"b": "2"}

    # invalid objects are rejected with the apiserver's message
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dict(GADGET, metadata={"name": "bad"}, spec={"method": "XYZ"})))
    proc = kubectl("apply", "-f", str(bad), check=False)
    assert proc.returncode != 0
    assert 'spec.method: Unsupported value: "XYZ": supported values: "SFT", "DPO", "GRPO"' in proc.stderr

    table = kubectl("get", "gadgets").stdout
    assert table.split("\n")[0].split() == ["NAME", "METHOD", "READY", "AGE"]
    assert table.split("\n")[1].split()[:2] == ["g1", "DPO"]
    assert "g1" in kubectl("get", "perennial").stdout  # category
    assert "g1" in kubectl("get", "gdg", "-A").stdout  # short name, all namespaces
    assert "cfg" in kubectl("get", "configmaps").stdout

    described = kubectl("describe", "gadget", "g1").stdout
    assert "Method:  DPO" in described and "Name:" in described

    explained = kubectl("explain", "gadget.spec").stdout
    assert "Training method of the gadget." in explained
    assert "method\t<string> -required-" in explained

    kubectl("wait", "--for=jsonpath={.spec.method}=DPO", "gadget/g1", "--timeout=5s")
    assert "deleted" in kubectl("delete", "-f", str(manifest)).stdout
    assert "NotFound" in kubectl("get", "gadget", "g1", check=False).stderr


@needs_kubectl
@pytest.mark.kubectl
def test_kubectl_imperative_create_sends_protobuf_and_works(server, kubectl):
    kubectl("create", "namespace", "team")
    kubectl("-n", "team", "create", "configmap", "c", "--from-literal=a=b")
    kubectl("-n", "team", "create", "secret", "generic", "hf-token", "--from-literal=token=abc")
    cm = json.loads(kubectl("-n", "team", "get", "cm", "c", "-o", "json").stdout)
    assert cm["data"] == {"a": "b"} and "generateName" not in cm["metadata"]
    secret = json.loads(kubectl("-n", "team", "get", "secret", "hf-token", "-o", "json").stdout)
    assert secret["data"] == {"token": "YWJj"} and secret["type"] == "Opaque"
    kubectl("delete", "namespace", "team")
    assert "NotFound" in kubectl("get", "namespace", "team", check=False).stderr


@needs_kubectl
@pytest.mark.kubectl
def test_kubectl_server_side_apply_and_watch(server, kubectl, tmp_path: Path):
    manifest = tmp_path / "gadget.yaml"
    manifest.write_text(yaml.safe_dump(GADGET))
    kubectl("apply", "--server-side", "-f", str(manifest))
    assert json.loads(kubectl("get", "gadget", "g1", "-o", "json").stdout)["spec"]["method"] == "SFT"
    kubectl("patch", "gadget", "g1", "--type=merge", "-p", '{"spec":{"method":"GRPO"}}')
    assert json.loads(kubectl("get", "gadget", "g1", "-o", "json").stdout)["spec"]["method"] == "GRPO"
    proc = kubectl("get", "gadgets", "-w", "--request-timeout=2s", check=False)
    assert "g1" in proc.stdout

    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                  "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                           "template": {"metadata": {"labels": {"app": "web"}},
                                        "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}}
    manifest.write_text(yaml.safe_dump(deployment))
    kubectl("apply", "-f", str(manifest))
    kubectl("scale", "deployment", "web", "--replicas=3")
    assert json.loads(kubectl("get", "deploy", "web", "-o", "json").stdout)["spec"]["replicas"] == 3


# --------------------------------------------------------------------------- faults seen by the kubernetes client


def test_kubernetes_client_sees_each_injected_fault(server):
    from kubernetes import client, watch
    from kubernetes.client.exceptions import ApiException

    from perennial.local.faults import FaultConfig

    api_client = _api_client(server.url)
    api_client.user_agent = "perennial-operator/test"
    core = client.CoreV1Api(api_client)
    spared = client.CoreV1Api(_api_client(server.url))  # OpenAPI-Generator/...: not a target
    cm = core.create_namespaced_config_map("default", {"metadata": {"name": "f"}, "data": {"k": "v"}})

    def fails(kind: str, call, **cfg) -> ApiException:
        server.set_faults(FaultConfig(rate=1.0, faults=(kind,), **cfg))
        with pytest.raises(ApiException) as exc:
            call()
        return exc.value

    err = fails("500", lambda: core.read_namespaced_config_map("f", "default"))
    assert err.status == 500 and json.loads(err.body)["reason"] == "InternalError"
    err = fails("429", lambda: core.list_namespaced_config_map("default"), retry_after_seconds=2)
    assert err.status == 429 and err.headers["Retry-After"] == "2"
    err = fails("409", lambda: core.patch_namespaced_config_map("f", "default", {"data": {"k": "w"}}))
    assert err.status == 409 and json.loads(err.body)["reason"] == "Conflict"
    assert spared.patch_namespaced_config_map("f", "default", {"data": {"k": "w"}}).data == {"k": "w"}

    server.set_faults(FaultConfig(rate=1.0, faults=("410",)))
    with pytest.raises(ApiException) as exc:
        for _ in watch.Watch().stream(core.list_namespaced_config_map, "default",
                                      resource_version=cm.metadata.resource_version, timeout_seconds=5):
            pass
    assert exc.value.status == 410

    server.set_faults(FaultConfig(rate=1.0, faults=("watch-close",), watch_close_after=(0.1, 0.1)))
    seen = []
    with pytest.raises(Exception) as cut:
        for event in watch.Watch().stream(core.list_namespaced_config_map, "default", timeout_seconds=30):
            seen.append(event["type"])
    assert seen == ["ADDED"] and "ProtocolError" in type(cut.value).__name__ + repr(cut.value)

    server.set_faults(FaultConfig(rate=1.0, faults=("slow",), slow_ms=300))
    t0 = time.monotonic()
    assert core.read_namespaced_config_map("f", "default").data == {"k": "w"}
    assert time.monotonic() - t0 >= 0.3
    assert server.fault_counts() == {"slow": 1}
    server.set_faults(None)


@needs_kubectl
@pytest.mark.kubectl
def test_kubectl_get_hpa_created_through_autoscaling_v1(server, kubectl):
    server.create("autoscaling/v1", "horizontalpodautoscalers", {
        "metadata": {"name": "h"}, "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                                               "name": "d"},
                                            "maxReplicas": 4, "targetCPUUtilizationPercentage": 55}}, "default")
    out = kubectl("get", "hpa").stdout
    assert "Deployment/d" in out and "cpu: <unknown>/55%" in out
    got = json.loads(kubectl("get", "horizontalpodautoscalers.v1.autoscaling", "h", "-o", "json").stdout)
    assert got["apiVersion"] == "autoscaling/v1" and got["spec"]["targetCPUUtilizationPercentage"] == 55
    got = json.loads(kubectl("get", "hpa", "h", "-o", "json").stdout)
    assert got["apiVersion"] == "autoscaling/v2" and got["spec"]["minReplicas"] == 1
