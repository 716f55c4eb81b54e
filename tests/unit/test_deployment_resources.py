"""The serving children of a Perennial Deployment (perennial.resources.deployment), read off the built
manifests: pod shape (probes, GPUs, volumes, token by reference, no SA token, restricted), names and
labels of the contract, Services/PDB/HPA/KEDA following the active color, routes.json, the revision;
every built-in kind validated with kubernetes-validate --strict, the ScaledObject against KEDA's schema."""

from __future__ import annotations

import argparse
import base64
import copy
import json
import re

import pytest
from perennial.api.deployment import DeploymentSpec
from perennial.resources import deployment as d
from perennial.resources.podsecurity import add_quantities, quantity_bytes

DIGEST = "ghcr.io/perennial-ai/perennial-server@sha256:" + "0123456789abcdef" * 4
TOKEN = "s3cr3t-feedback-token-value-0042"


def body(name: str = "chat") -> dict:
    return {"apiVersion": "perennial.ai/v1alpha1", "kind": "Deployment", "metadata": {"name": name, "namespace": "team", "uid": f"uid-{name}"}}


def base_model(uri: str = "hf://meta/llama-70b", resolved: str | None = "pvc://llama-weights/model", **spec) -> dict:
    bm = {"metadata": {"name": "llama", "namespace": "team"},
          "spec": {"source": {"uri": uri, "credentialsSecretRef": {"name": "hf-token"}},
                   "resources": {"gpus": 4, "cpu": "16", "memory": "320Gi", "sharedMemory": "16Gi"}, **spec}}
    if resolved:
        bm["status"] = {"resolvedUri": resolved}
    return bm


def adapter(name: str, uri: str = "pvc://artifacts/adapters/team/run", rank: int = 16, base: str = "llama") -> dict:
    return {"apiVersion": "perennial.ai/v1alpha1", "kind": "Adapter", "metadata": {"name": name, "namespace": "team"},
            "spec": {"baseModelRef": {"name": base}, "family": "support", "version": 1, "artifactUri": uri, "lora": {"rank": rank}}}


SPEC = {
    "baseModelRef": {"name": "llama"},
    "adapters": [{"name": "support", "adapterRef": {"name": "support-v1"}}],
    "engine": {"tensorParallelSize": 4, "maxLoraRank": 32},
    "feedback": {"spoolSize": "3Gi", "storeUri": "pvc://feedback/store/chat"},
}


def serving(spec: dict | None = None, bm: dict | None = None, adapters: tuple = (), region: int = 0, **kw) -> d.Serving:
    typed = DeploymentSpec.model_validate(spec or SPEC)
    return d.Serving(body=body(), spec=typed, base_model=bm or base_model(), region=d.regions(typed)[region], image=DIGEST,
                     adapters=adapters or (adapter("support-v1"),), **kw)


def pod_of(s: d.Serving, color: str = "blue") -> dict:
    return d.deployment(s, color, d.revision(s), 2)["spec"]["template"]


def containers(pod: dict) -> dict[str, dict]:
    return {c["name"]: c for c in pod["spec"]["containers"]}


def volumes(pod: dict) -> dict[str, dict]:
    return {v["name"]: v for v in pod["spec"]["volumes"]}


def mounts(c: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in c["volumeMounts"]}


def cpu_spec() -> dict:
    return {**SPEC, "engine": {"type": "Transformers"}}


# ----------------------------------------------------------------------------- pod shape


def test_probes_tell_a_loading_model_from_a_dead_one():
    pod = pod_of(serving())
    engine, sidecar = containers(pod)["engine"], containers(pod)["sidecar"]
    start = engine["startupProbe"]
    # a 70B model loads for minutes: liveness waits for the startup probe, whose budget is half an hour
    assert start["periodSeconds"] * start["failureThreshold"] >= 1800
    live = engine["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] <= 120, "a dead engine must be restarted within two minutes"
    # the engine listens on 127.0.0.1 only: kubelet's httpGet (pod IP) cannot reach it, the probe runs inside
    assert "httpGet" not in start and "127.0.0.1:8000/health" in start["exec"]["command"][-1]
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # the CPU engine loads faster, but still is not killed while loading
    cpu = containers(pod_of(serving(cpu_spec())))["engine"]["startupProbe"]
    assert 300 <= cpu["periodSeconds"] * cpu["failureThreshold"] < 1800


def test_engine_probe_command_really_checks_the_engine():
    """The probe program itself: exit 0 when /health answers 200, 1 when it answers 503 or nothing listens
    (run against an ephemeral port: the program's `127.0.0.1:8000` rewritten, the rest as built)."""
    import http.server
    import subprocess
    import sys
    import threading

    cmd = containers(pod_of(serving()))["engine"]["startupProbe"]["exec"]["command"]
    assert cmd[0] == "python3" and cmd[-1].count("http://127.0.0.1:8000/health") == 1
    status = {"code": 200}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status["code"] if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    code = cmd[-1].replace("127.0.0.1:8000", f"127.0.0.1:{srv.server_address[1]}")

    def run() -> int:
        return subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode

    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert run() == 0
        status["code"] = 503  # a loading (or broken) engine
        assert run() == 1
    finally:
        srv.shutdown()
        srv.server_close()
    assert run() == 1  # nothing listens


def test_gpus_shared_memory_and_resources():
    pod = pod_of(serving())
    engine, sidecar = containers(pod)["engine"], containers(pod)["sidecar"]
    res = engine["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == 4
    assert res["requests"]["memory"] == res["limits"]["memory"] == "320Gi" and res["requests"]["cpu"] == "16"
    assert "nvidia.com/gpu" not in sidecar["resources"]["requests"]
    shm = volumes(pod)["dshm"]["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": "16Gi"} and mounts(engine)["/dev/shm"]["name"] == "dshm"
    # vLLM with no GPUs named anywhere gets tensorParallelSize GPUs; fewer GPUs than that is refused
    bm = base_model()
    del bm["spec"]["resources"]["gpus"]
    assert containers(pod_of(serving(bm=bm)))["engine"]["resources"]["limits"]["nvidia.com/gpu"] == 4
    with pytest.raises(ValueError, match="tensorParallelSize"):
        pod_of(serving({**SPEC, "engine": {"tensorParallelSize": 8}}))
    # the CPU engine never uses a GPU: it asks for none of the BaseModel's (they stay free for vLLM replicas)
    cpu = containers(pod_of(serving(cpu_spec())))["engine"]["resources"]
    assert not any("gpu" in k for k in {**cpu["requests"], **cpu["limits"]}) and cpu["limits"]["memory"] == "320Gi"
    # the engine's own resources win over the BaseModel's
    own = {**SPEC, "engine": {"tensorParallelSize": 2, "resources": {"gpus": 2, "gpuResourceName": "amd.com/gpu", "memory": "64Gi"}}}
    r = containers(pod_of(serving(own)))["engine"]["resources"]
    assert r["limits"]["amd.com/gpu"] == 2 and "nvidia.com/gpu" not in r["limits"]


def test_restricted_no_service_account_token_read_only_root_bounded_disks():
    pod = pod_of(serving())
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["seccompProfile"] == {"type": "RuntimeDefault"} and psc["runAsUser"] == d.SERVER_UID
    disk = {name: v["emptyDir"]["sizeLimit"] for name, v in volumes(pod).items() if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"}
    assert all(v["emptyDir"].get("sizeLimit") for v in volumes(pod).values() if "emptyDir" in v), "an emptyDir is unbounded"
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True and sc["runAsUser"] == d.SERVER_UID
        # what the container writes is an emptyDir, and it asks for exactly that much disk plus logs
        written = [disk[m["name"]] for m in c["volumeMounts"] if m["name"] in disk and not m.get("readOnly")]
        need = quantity_bytes(add_quantities(*written, "1Gi"))
        eph = c["resources"]
        assert quantity_bytes(eph["requests"]["ephemeral-storage"]) == quantity_bytes(eph["limits"]["ephemeral-storage"]) == need, c["name"]
        assert mounts(c)["/tmp"]["name"] in disk
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["HOME"].startswith("/tmp") and env["XDG_CACHE_HOME"].startswith("/tmp")
    assert volumes(pod)["spool"]["emptyDir"]["sizeLimit"] == "3Gi"  # feedback.spoolSize


def test_only_the_sidecar_ports_are_exposed_and_services_never_route_to_the_admin_port():
    s = serving()
    pod = pod_of(s)
    engine, sidecar = containers(pod)["engine"], containers(pod)["sidecar"]
    assert "ports" not in engine
    assert sidecar["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                                {"name": d.ADMIN_PORT_NAME, "containerPort": d.ADMIN_PORT, "protocol": "TCP"}]
    assert (d.ADMIN_PORT_NAME, d.ADMIN_PORT) == ("admin", 9090)
    for svc in (d.stable_service(s, "blue"), d.preview_service(s, "green")):
        assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}]
        assert svc["spec"]["type"] == "ClusterIP"
    # the sidecar listens on it (its own parser) and Prometheus is pointed at it
    ns = _parser().parse_args(sidecar["args"])
    assert ns.admin_port == d.ADMIN_PORT and ns.port == 8080
    annotations = pod["metadata"]["annotations"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (str(d.ADMIN_PORT), "/metrics")
    policy = d.network_policy(s)
    # both ports reachable at the pod (the admin port by Prometheus and by the operator, in another region through
    # that cluster's API server proxy, which is no pod); no Service names the admin port
    assert policy["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8080}]}, {"ports": [{"protocol": "TCP", "port": d.ADMIN_PORT}]}]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    # a platform team narrows the admin port to its Prometheus and API servers
    peers = ({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}, {"ipBlock": {"cidr": "10.0.0.0/28"}})
    narrow = d.network_policy(serving(settings=d.ServingSettings(admin_ingress_from=peers)))
    assert narrow["spec"]["ingress"][1] == {"from": list(peers), "ports": [{"protocol": "TCP", "port": d.ADMIN_PORT}]}
    assert narrow["spec"]["ingress"][0] == {"ports": [{"protocol": "TCP", "port": 8080}]}


def test_feedback_token_is_a_file_from_the_secret_in_the_sidecar_only_and_no_secret_value_is_in_env():
    s = serving()
    manifest = d.deployment(s, "blue", d.revision(s), 1)
    pod = manifest["spec"]["template"]
    engine, sidecar = containers(pod)["engine"], containers(pod)["sidecar"]
    vol = volumes(pod)["feedback-token"]
    assert vol["secret"] == {"secretName": "chat-feedback-token", "defaultMode": 0o440, "items": [{"key": "token", "path": "token"}]}
    assert mounts(sidecar)[d.TOKEN_DIR] == {"name": "feedback-token", "mountPath": d.TOKEN_DIR, "readOnly": True}
    assert all(m["name"] != "feedback-token" for m in engine["volumeMounts"])
    args = sidecar["args"]
    assert args[args.index("--token-file") + 1] == d.TOKEN_FILE == f"{d.TOKEN_DIR}/token"
    # the generated Secret carries the caller's value; the Deployment never does
    secret = d.token_secret(s, TOKEN)
    assert secret["metadata"]["name"] == "chat-feedback-token" and base64.b64decode(secret["data"]["token"]).decode() == TOKEN
    assert TOKEN not in json.dumps(manifest)
    for c in (engine, sidecar):
        for e in c["env"]:
            assert "secretKeyRef" not in e.get("valueFrom", {}), f"{c['name']}: secret value in env {e['name']}"
        for ef in c.get("envFrom", []):
            assert set(ef) == {"secretRef"}  # by reference
    # a user's tokenSecretRef is mounted instead (its key as the file `token`)
    own = serving({**SPEC, "feedback": {**SPEC["feedback"], "tokenSecretRef": {"name": "my-token", "key": "bearer"}}})
    assert volumes(pod_of(own))["feedback-token"]["secret"]["items"] == [{"key": "bearer", "path": "token"}]
    assert volumes(pod_of(own))["feedback-token"]["secret"]["secretName"] == "my-token"
    with pytest.raises(ValueError, match="16 characters"):
        d.token_secret(s, "short")
    # the user's Secret is never written in the operator's cluster; a remote region gets the Deployment's own copy
    # (Deployments sharing a tokenSecretRef would else fight over one Secret there), which its pods mount
    with pytest.raises(ValueError, match="user's"):
        d.token_secret(own, TOKEN)
    remote_spec = {**SPEC, "feedback": {"tokenSecretRef": {"name": "my-token", "key": "bearer"}},
                   "regions": [{"name": "ap", "clusterSecretRef": {"name": "ap"}}]}
    copy_ = d.token_secret(serving(remote_spec), TOKEN)
    assert copy_["metadata"]["name"] == "chat-feedback-token" and set(copy_["data"]) == {"token"} and "ownerReferences" not in copy_["metadata"]
    assert volumes(pod_of(serving(remote_spec)))["feedback-token"]["secret"]["secretName"] == "chat-feedback-token"


def test_model_cache_adapters_spool_routes_and_store_volumes():
    pod = pod_of(serving())
    engine, sidecar = containers(pod)["engine"], containers(pod)["sidecar"]
    vols = volumes(pod)
    claims = {v["persistentVolumeClaim"]["claimName"]: v for v in vols.values() if "persistentVolumeClaim" in v}
    # the BaseModel's cache: read-only at the volume and the mount, the engine's --model below it
    assert claims["llama-weights"]["persistentVolumeClaim"]["readOnly"] is True
    assert mounts(engine)["/mnt/pvc/llama-weights"]["readOnly"] is True and "/mnt/pvc/llama-weights" not in mounts(sidecar)
    assert engine["args"][engine["args"].index("--model") + 1] == "/mnt/pvc/llama-weights/model"
    # adapters' claim read-only in both containers (same path); the adapters emptyDir written by the sidecar only
    assert claims["artifacts"]["persistentVolumeClaim"]["readOnly"] is True
    assert mounts(engine)["/mnt/pvc/artifacts"]["readOnly"] is True and mounts(sidecar)["/mnt/pvc/artifacts"]["readOnly"] is True
    assert mounts(engine)[d.ADAPTERS_DIR]["readOnly"] is True and not mounts(sidecar)[d.ADAPTERS_DIR].get("readOnly")
    assert "emptyDir" in vols["adapters"]
    # routes: the ConfigMap, read-only, as a directory (a subPath mount would never see updates)
    assert vols["routes"]["configMap"]["name"] == "chat-routes"
    rm = mounts(sidecar)[d.ROUTES_DIR]
    assert rm["readOnly"] is True and "subPath" not in rm and d.ROUTES_FILE == f"{d.ROUTES_DIR}/routes.json"
    # the feedback store claim: writable by the sidecar only below the store's directory
    assert claims["feedback"]["persistentVolumeClaim"]["readOnly"] is False
    store = mounts(sidecar)["/mnt/pvc/feedback/store/chat"]
    assert store["subPath"] == "store/chat" and not store.get("readOnly") and "/mnt/pvc/feedback" not in mounts(engine)
    assert sidecar["args"][sidecar["args"].index("--store-uri") + 1] == "/mnt/pvc/feedback/store/chat"



@pytest.mark.parametrize("store", ["pvc://llama-weights/", "pvc://llama-weights", "pvc://llama-weights/model", "pvc://llama-weights/model/x",
                                   "pvc://artifacts/", "pvc://artifacts/adapters", "pvc://artifacts/adapters/team/run"])
def test_the_feedback_store_never_makes_what_the_engine_loads_writable(store):
    """The sidecar is the pod's internet-facing container: a store on the claim of the model or an adapter, at or
    around what the engine loads, gave it write access to the weights (and `pvc://artifacts/` two mounts at one path)."""
    with pytest.raises(ValueError, match="storeUri"):
        pod_of(serving({**SPEC, "feedback": {"spoolSize": "3Gi", "storeUri": store}}))


@pytest.mark.parametrize("store", ["pvc://artifacts/feedback", "pvc://llama-weights/feedback", "pvc://artifacts/adapters-feedback"])
def test_a_feedback_store_beside_what_the_engine_loads_is_fine(store):
    pod = pod_of(serving({**SPEC, "feedback": {"spoolSize": "3Gi", "storeUri": store}}))
    sidecar = containers(pod)["sidecar"]
    paths = [m["mountPath"] for m in sidecar["volumeMounts"]]
    assert len(paths) == len(set(paths))
    claim, path = store[len("pvc://"):].split("/", 1)
    assert mounts(sidecar)[f"/mnt/pvc/{claim}/{path}"]["subPath"] == path

def test_source_credentials_by_reference_for_an_uncached_hub_model():
    bm = base_model(resolved=None)
    bm["spec"]["source"]["revision"] = "abc123"
    pod = pod_of(serving(bm=bm))
    engine, sidecar = containers(pod)["engine"], containers(pod)["sidecar"]
    assert engine["envFrom"] == [{"secretRef": {"name": "hf-token"}}] and "envFrom" not in sidecar
    env = {e["name"]: e["value"] for e in engine["env"] if "value" in e}
    assert env["HF_HUB_OFFLINE"] == "0" and env["HF_HOME"] == d.MODEL_DOWNLOAD_DIR
    assert volumes(pod)["model-download"]["emptyDir"]["sizeLimit"] == "50Gi"  # the BaseModel's cache size
    args = engine["args"]
    assert args[args.index("--model") + 1] == "meta/llama-70b"
    assert json.loads(args[args.index("--engine-spec") + 1])["extraArgs"][-2:] == ["--revision", "abc123"]
    # the CPU engine cannot pin a revision; object stores need the cache
    with pytest.raises(ValueError, match="cache"):
        pod_of(serving(cpu_spec(), bm=bm))
    with pytest.raises(ValueError, match="cache.enabled"):
        pod_of(serving(bm=base_model("s3://bucket/llama", resolved=None)))


def test_topology_spread_node_selector_and_scheduling():
    spec = {**SPEC, "regions": [{"name": "eu", "nodeSelector": {"topology.kubernetes.io/region": "eu-west-1"}},
                                {"name": "us", "nodeSelector": {"topology.kubernetes.io/region": "us-east-1"}}]}
    bm = base_model()
    bm["spec"]["resources"]["nodeSelector"] = {"nvidia.com/gpu.product": "H100"}
    bm["spec"]["resources"]["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    s = serving(spec, bm=bm, region=1)
    pod = pod_of(s, "green")
    ps = pod["spec"]
    assert ps["nodeSelector"] == {"nvidia.com/gpu.product": "H100", "topology.kubernetes.io/region": "us-east-1"}
    assert ps["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    spread = {c["topologyKey"]: c for c in ps["topologySpreadConstraints"]}
    assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for c in spread.values():
        assert c["whenUnsatisfiable"] == "ScheduleAnyway" and c["maxSkew"] == 1
        assert c["labelSelector"]["matchLabels"] == d.selector(s, "green")


# ----------------------------------------------------------------------------- command lines against the real parsers


def _parser() -> argparse.ArgumentParser:
    from perennial_server.cli import build_parser

    return build_parser()


def test_engine_command_lines_parse_with_the_servers_own_parsers():
    from perennial_server.vllm import _spec, build_vllm_command, build_vllm_env

    s = serving()
    engine = containers(pod_of(s))["engine"]
    assert engine["command"] == ["perennial-server"]
    ns = _parser().parse_args(engine["args"])
    assert ns.command == "vllm" and ns.runtime_lora is True and ns.served_model_name == "llama" and ns.port == 8000
    cmd = build_vllm_command(_spec(ns.engine_spec), ns.model, served_model_name=ns.served_model_name, max_model_len=ns.max_model_len,
                             port=ns.port, runtime_lora=ns.runtime_lora)
    # vLLM binds localhost, runtime LoRA on, the spec's limits applied
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and "--enable-lora" in cmd
    assert cmd[cmd.index("--max-lora-rank") + 1] == "32" and cmd[cmd.index("--tensor-parallel-size") + 1] == "4"
    assert cmd[cmd.index("--max-model-len") + 1] == "4096"
    assert build_vllm_env(ns.runtime_lora, {})["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    cpu = containers(pod_of(serving(cpu_spec())))["engine"]
    ns = _parser().parse_args(cpu["args"])
    assert ns.command == "engine" and ns.host == "127.0.0.1" and ns.port == 8000 and ns.model == "/mnt/pvc/llama-weights/model"
    assert ns.served_model_name == "llama" and ns.lora_modules == []  # adapters come at runtime through the sidecar
    assert ns.threads == 16  # torch threads = the CPU request, not the node's cores


def test_sidecar_command_line_parses_with_the_sidecars_own_parser():
    from perennial_server.config import sidecar_config_from_args

    s = serving()
    rev = d.revision(s)
    sidecar = containers(d.deployment(s, "blue", rev, 1)["spec"]["template"])["sidecar"]
    ns = _parser().parse_args(sidecar["args"])
    cfg = sidecar_config_from_args(ns)
    assert cfg.routes_file == d.ROUTES_FILE and cfg.adapters_dir == d.ADAPTERS_DIR
    assert (cfg.upstream, cfg.host, cfg.port) == ("http://127.0.0.1:8000", "0.0.0.0", 8080)
    assert (cfg.deployment, cfg.namespace, cfg.revision, cfg.region, cfg.base_model_name) == ("chat", "team", rev, "default", "llama")
    assert cfg.token_file == d.TOKEN_FILE and cfg.spool_dir == d.SPOOL_DIR and cfg.redaction_enabled is True
    env = {e["name"]: e for e in sidecar["env"]}
    assert env["PERENNIAL_POD"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # feedback off: nothing captured, no store
    off = serving({**SPEC, "feedback": {"enabled": False}})
    ns = _parser().parse_args(containers(pod_of(off))["sidecar"]["args"])
    assert sidecar_config_from_args(ns).sample_percent == 0 and ns.store_uri == ""


def test_sidecar_adapter_roots_come_from_the_operators_settings():
    """Local adapter paths the sidecar may load: its adapters dir and the pod's claims (PERENNIAL_PVC_ROOT), and
    only with the operator's settings more (a file:// artifact store on the machine of `perennial dev`)."""
    from perennial_server.config import sidecar_config_from_args

    s = serving()
    sidecar = containers(pod_of(s))["sidecar"]
    assert "--adapter-roots" not in sidecar["args"]
    assert {e["name"]: e.get("value") for e in sidecar["env"]}["PERENNIAL_PVC_ROOT"] == d.PVC_ROOT
    local = serving(settings=d.ServingSettings(adapter_roots=("/home/me/.perennial/artifacts",)))
    cfg = sidecar_config_from_args(_parser().parse_args(containers(pod_of(local))["sidecar"]["args"]))
    assert cfg.local_adapter_roots()[-1] == "/home/me/.perennial/artifacts" and cfg.local_adapter_roots()[0] == d.ADAPTERS_DIR
    with pytest.raises(ValueError, match="absolute"):
        d.sidecar_args(serving(settings=d.ServingSettings(adapter_roots=("relative",))), "r")


def test_extra_args_may_not_take_over_the_operators_flags():
    for flag in ("--port", "--host=0.0.0.0", "--model", "--served-model-name"):
        with pytest.raises(ValueError, match="extraArgs"):
            pod_of(serving({**SPEC, "engine": {**SPEC["engine"], "extraArgs": [flag, "x"]}}))


# ----------------------------------------------------------------------------- names, labels, owners


def test_names_labels_and_owner_per_region_layout():
    s = serving()
    rev = d.revision(s)
    dep = d.deployment(s, "green", rev, 3)
    assert dep["metadata"]["name"] == "chat-green" and dep["spec"]["replicas"] == 3
    labels = dep["metadata"]["labels"]
    assert labels == {"app.kubernetes.io/managed-by": "perennial-operator", "app.kubernetes.io/name": "perennial-server", "perennial.ai/deployment": "chat",
                      "perennial.ai/region": "default", "perennial.ai/color": "green", "perennial.ai/revision": rev}
    assert dep["spec"]["template"]["metadata"]["labels"] == labels
    # the selector is immutable: no revision in it
    assert dep["spec"]["selector"]["matchLabels"] == {k: v for k, v in labels.items() if k not in ("perennial.ai/revision", "app.kubernetes.io/managed-by")}
    assert dep["metadata"]["ownerReferences"][0]["uid"] == "uid-chat" and dep["metadata"]["ownerReferences"][0]["kind"] == "Deployment"
    assert d.stable_service(s, "blue")["metadata"]["name"] == "chat" and d.preview_service(s, "green")["metadata"]["name"] == "chat-preview"
    assert d.pdb(s, "blue")["metadata"]["name"] == "chat-blue" and d.routes_config_map(s, {})["metadata"]["name"] == "chat-routes"
    assert d.selector_string(s, "blue") == "app.kubernetes.io/name=perennial-server,perennial.ai/deployment=chat,perennial.ai/region=default,perennial.ai/color=blue"
    # replicas None: the autoscaler's (server-side apply leaves the field to the HPA)
    assert "replicas" not in d.deployment(s, "blue", rev, None)["spec"]
    # several regions in the operator's cluster: <name>-<region>-...; a remote region: <name>-..., no ownerReference
    spec = {**SPEC, "regions": [{"name": "eu"}, {"name": "us"}, {"name": "ap", "clusterSecretRef": {"name": "ap-cluster"}}]}
    eu, ap = serving(spec, region=0), serving(spec, region=2)
    assert d.deployment(eu, "blue", "r", 1)["metadata"]["name"] == "chat-eu-blue"
    assert d.stable_service(eu, "blue")["metadata"]["name"] == "chat-eu" and d.preview_service(eu, "blue")["metadata"]["name"] == "chat-eu-preview"
    assert d.routes_config_map(eu, {})["metadata"]["name"] == "chat-eu-routes"
    remote = [d.deployment(ap, "blue", "r", 1), d.stable_service(ap, "blue"), d.preview_service(ap, "green"), d.pdb(ap, "blue"),
              d.routes_config_map(ap, {}), d.token_secret(ap, TOKEN), d.network_policy(ap), d.hpa(serving({**spec, "autoscaling": {"enabled": True}}, region=2), "blue")]
    assert [m["metadata"]["name"] for m in remote[:5]] == ["chat-blue", "chat", "chat-preview", "chat-blue", "chat-routes"]
    for m in remote:
        assert "ownerReferences" not in m["metadata"], m["kind"]
        assert m["metadata"]["labels"]["perennial.ai/deployment"] == "chat" and m["metadata"]["labels"]["perennial.ai/region"] == "ap"
    # the caller can say so explicitly too
    assert "ownerReferences" not in d.deployment(serving(owned=False), "blue", "r", 1)["metadata"]
    # a single region in the operator's cluster next to remote ones keeps the short names
    one_local = serving({**SPEC, "regions": [{"name": "eu"}, {"name": "ap", "clusterSecretRef": {"name": "c"}}]})
    assert d.stable_service(one_local, "blue")["metadata"]["name"] == "chat"


def test_long_names_fit_and_stay_distinct():
    long = "a" * 60
    names = {d.deployment_name(long, c) for c in d.COLORS} | {d.preview_service_name(long), d.routes_config_map_name(long), d.stable_service_name(long)}
    assert len(names) == 5 and all(len(n) <= 63 for n in names)
    assert d.label_value("x" * 100) != d.label_value("x" * 99 + "y") and len(d.label_value("x" * 100)) <= 63
    with pytest.raises(ValueError, match="RFC 1035"):
        d.stable_service_name("1chat")


# ----------------------------------------------------------------------------- Services, PDB, autoscalers follow colors


def test_services_and_pdbs_select_one_color():
    s = serving()
    assert d.stable_service(s, "green")["spec"]["selector"] == d.selector(s, "green")
    assert d.preview_service(s, "blue")["spec"]["selector"] == d.selector(s, "blue")
    for color in d.COLORS:
        p = d.pdb(s, color)
        assert p["spec"]["maxUnavailable"] == 1 and p["spec"]["selector"]["matchLabels"] == d.selector(s, color)
    with pytest.raises(ValueError, match="color"):
        d.stable_service(s, "red")
    assert d.other_color("blue") == "green" and d.other_color("green") == "blue"


@pytest.mark.parametrize("metric,name,target,expected", [
    ("RequestsInFlight", "vllm:num_requests_running", "8", "8"),
    ("QueueLength", "vllm:num_requests_waiting", "2", "2"),
    ("GPUCacheUsage", "vllm:kv_cache_usage_perc", "0.8", "800m"),
])
def test_hpa_targets_the_active_color_with_a_pods_metric(metric, name, target, expected):
    s = serving({**SPEC, "autoscaling": {"enabled": True, "metric": metric, "target": target, "minReplicas": 2, "maxReplicas": 8}})
    for active in d.COLORS:
        h = d.autoscaler(s, active)
        assert h["apiVersion"] == "autoscaling/v2" and h["kind"] == "HorizontalPodAutoscaler" and h["metadata"]["name"] == "chat"
        assert h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"chat-{active}"}
        assert (h["spec"]["minReplicas"], h["spec"]["maxReplicas"]) == (2, 8)
        assert h["spec"]["metrics"] == [{"type": "Pods", "pods": {"metric": {"name": name}, "target": {"type": "AverageValue", "averageValue": expected}}}]
        up, down = h["spec"]["behavior"]["scaleUp"], h["spec"]["behavior"]["scaleDown"]
        # slow by default: a GPU replica takes minutes to load
        assert up["stabilizationWindowSeconds"] >= 60 and down["stabilizationWindowSeconds"] >= 600
        assert all(p["periodSeconds"] >= 60 for p in up["policies"] + down["policies"])
        assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 600}]


def test_hpa_on_cpu_uses_the_engine_containers_utilization():
    s = serving({**cpu_spec(), "autoscaling": {"enabled": True, "metric": "CPU", "target": "70"}})
    (m,) = d.hpa(s, "blue")["spec"]["metrics"]
    assert m == {"type": "ContainerResource", "containerResource": {"name": "cpu", "container": "engine", "target": {"type": "Utilization", "averageUtilization": 70}}}
    with pytest.raises(ValueError, match="percent"):
        d.hpa(serving({**cpu_spec(), "autoscaling": {"enabled": True, "metric": "CPU", "target": "0.5"}}), "blue")
    with pytest.raises(ValueError, match="3 decimals"):
        d.hpa(serving({**SPEC, "autoscaling": {"enabled": True, "target": "0.0001"}}), "blue")
    assert d.autoscaler(serving(), "blue") is None  # autoscaling off


KEDA = {"enabled": True, "provider": "KEDA", "minReplicas": 0, "maxReplicas": 6, "metric": "QueueLength", "target": "4",
        "prometheusAddress": "http://prometheus.monitoring.svc:9090",
        "wakeQuery": 'sum(rate(nginx_ingress_controller_requests{host="chat.example.com"}[1m]))'}


def _promql_pod_regex(query: str) -> re.Pattern:
    raw = re.search(r'pod=~"((?:[^"\\]|\\.)*)"', query).group(1)
    return re.compile(raw.replace("\\\\", "\\"))  # the PromQL string literal's escapes


def test_keda_scaled_object_targets_the_active_color_and_scales_to_zero_slowly():
    s = serving({**SPEC, "autoscaling": KEDA})
    so = d.autoscaler(s, "green")
    assert so["apiVersion"] == "keda.sh/v1alpha1" and so["kind"] == "ScaledObject" and so["metadata"]["name"] == "chat"
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat-green"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 6)
    # to zero only after a quiet period longer than a model load (the startup probe's budget)
    start = containers(pod_of(s))["engine"]["startupProbe"]
    assert spec["cooldownPeriod"] > start["periodSeconds"] * start["failureThreshold"]
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == d.behavior(s)
    trigger, wake = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["threshold"] == "4"
    # from zero the engine's metrics do not exist: the user's demand query wakes it (only: never beyond one replica)
    assert wake["metadata"]["query"] == KEDA["wakeQuery"] and wake["metadata"]["activationThreshold"] == "0"
    assert float(wake["metadata"]["threshold"]) >= 1e9
    assert len(d.autoscaler(serving({**SPEC, "autoscaling": {**KEDA, "minReplicas": 1, "wakeQuery": None}}), "green")["spec"]["triggers"]) == 1
    query = trigger["metadata"]["query"]
    assert query.startswith("sum(vllm:num_requests_waiting{") and 'namespace="team"' in query
    pods = _promql_pod_regex(query)
    assert pods.fullmatch("chat-green-7d9f8c6b5-x2k9q")
    for other in ("chat-blue-7d9f8c6b5-x2k9q", "chat-green-x-blue-7d9f8c6b5-x2k9q", "chatty-green-7d9f8c6b5-x2k9q"):
        assert not pods.fullmatch(other), other
    # a dot in a name is a literal dot in the regex
    dotted = d.Serving(body=body("chat.v2"), spec=s.spec, base_model=s.base_model, region=s.region, image=DIGEST, adapters=s.adapters)
    assert not _promql_pod_regex(d.keda_query(dotted, "blue")).fullmatch("chatXv2-blue-7d9f8c6b5-x2k9q")
    for m, name in d.VLLM_METRICS.items():
        q = d.keda_query(serving({**SPEC, "autoscaling": {**KEDA, "metric": m}}), "blue")
        assert q.startswith(f"sum({name}{{")
    with pytest.raises(ValueError, match="prometheusAddress"):
        d.scaled_object(serving({**SPEC, "autoscaling": {**KEDA, "prometheusAddress": None}}), "blue")
    with pytest.raises(ValueError, match="vLLM metric"):
        d.scaled_object(serving({**SPEC, "autoscaling": {**KEDA, "metric": "CPU"}}), "blue")
    with pytest.raises(ValueError, match="minReplicas"):
        d.hpa(serving({**SPEC, "autoscaling": {**KEDA, "provider": "KEDA"}}), "blue")


# ----------------------------------------------------------------------------- routes.json


def test_routes_json_has_the_contracts_shape_and_a_revision():
    s = serving(adapters=(adapter("support-v1"), adapter("support-v2", uri="s3://bucket/a/v2", rank=8)))
    routes = {"support": [d.RouteTarget("support-v1")], "support-preview": [d.RouteTarget("support-v2")]}
    cm = d.routes_config_map(s, routes)
    doc = json.loads(cm["data"]["routes.json"])
    assert doc == {
        "revision": doc["revision"],
        "base": {"name": "llama"},
        "adapters": {"support-v1": {"uri": "/mnt/pvc/artifacts/adapters/team/run", "rank": 16},
                     "support-v2": {"uri": "s3://bucket/a/v2", "rank": 8}},
        "routes": {"support": [{"adapter": "support-v1", "weight": 100}], "support-preview": [{"adapter": "support-v2", "weight": 100}]},
    }
    assert re.fullmatch(r"[0-9a-f]{10}", doc["revision"]) and cm["metadata"]["annotations"]["perennial.ai/routes-revision"] == doc["revision"]
    # the revision follows the content: a moved name, a weight, an adapter kept loaded
    moved = d.routes_document(s, {"support": [d.RouteTarget("support-v2")]})
    canary = d.routes_document(s, {"support": [d.RouteTarget("support-v1", 90), d.RouteTarget("support-v2", 10)]})
    kept = d.routes_document(s, {"support": [d.RouteTarget("support-v2")]}, loaded=["support-v1"])
    assert len({doc["revision"], moved["revision"], canary["revision"], kept["revision"]}) == 4
    assert list(kept["adapters"]) == ["support-v1", "support-v2"] and list(moved["adapters"]) == ["support-v2"]
    assert d.routes_document(s, routes)["revision"] == doc["revision"]  # deterministic
    with pytest.raises(ValueError, match="not among"):
        d.routes_document(s, {"support": [d.RouteTarget("nope")]})
    with pytest.raises(ValueError, match="differ"):
        d.routes_document(s, {"llama": [d.RouteTarget("support-v1")]})
    with pytest.raises(ValueError, match="weights"):
        d.routes_document(s, {"support": [d.RouteTarget("support-v1", 0)]})


def test_adapter_fit_problems():
    s = serving(adapters=(adapter("ok"), adapter("big", rank=64), adapter("other", base="mistral")))
    assert d.adapter_problems(s, ["ok"]) == []
    assert any("maxLoraRank" in p for p in d.adapter_problems(s, ["big"]))
    assert any("mistral" in p for p in d.adapter_problems(s, ["other"]))
    many = serving({**SPEC, "engine": {**SPEC["engine"], "maxLoras": 1}}, adapters=(adapter("a"), adapter("b")))
    assert any("maxLoras" in p for p in d.adapter_problems(many, ["a", "b"]))


# ----------------------------------------------------------------------------- revision


def test_revision_covers_what_needs_new_pods_and_nothing_else():
    s = serving()
    rev = d.revision(s)
    assert re.fullmatch(r"[0-9a-f]{10}", rev) and d.revision(serving()) == rev
    # the same for both colors (the template's color is left out), and for the apps/v1 objects built with it
    assert d.deployment(s, "blue", rev, 1)["spec"]["template"]["metadata"]["labels"]["perennial.ai/revision"] == rev
    # no new pods: another adapter on the same claim, replicas, autoscaling, rollout settings, paused
    same = [
        serving(adapters=(adapter("support-v9", uri="pvc://artifacts/adapters/team/other"),)),
        serving({**SPEC, "replicas": 7}),
        serving({**SPEC, "autoscaling": {"enabled": True, "maxReplicas": 9}}),
        serving({**SPEC, "strategy": {"blueGreen": {"scaleDownDelaySeconds": 5}}, "paused": True}),
        serving({**SPEC, "adapters": [{"name": "x", "track": {"family": "f"}}]}),
    ]
    for other in same:
        assert d.revision(other) == rev
    bm_res = base_model()
    bm_res["spec"]["resources"]["memory"] = "400Gi"
    changed = {
        "base model": serving(bm=base_model(resolved="pvc://llama-weights/model-v2")),
        "image": d.Serving(body=body(), spec=s.spec, base_model=s.base_model, region=s.region, image=DIGEST.replace("0123", "9999"), adapters=s.adapters),
        "engine type": serving(cpu_spec()),
        "engine args": serving({**SPEC, "engine": {**SPEC["engine"], "extraArgs": ["--enforce-eager"]}}),
        "engine limits": serving({**SPEC, "engine": {**SPEC["engine"], "maxLoras": 8}}),
        "resources": serving(bm=bm_res),
        "node selector": serving({**SPEC, "regions": [{"name": "default", "nodeSelector": {"pool": "h100"}}]}),
        "adapter claim": serving(adapters=(adapter("support-v1", uri="pvc://other-claim/a"),)),
        "feedback settings": serving({**SPEC, "feedback": {**SPEC["feedback"], "samplePercent": 10}}),
    }
    revs = {what: d.revision(o) for what, o in changed.items()}
    for what, r in revs.items():
        assert r != rev, f"a change of {what} must change the revision"
    assert len(set(revs.values())) == len(revs)


# ----------------------------------------------------------------------------- validation against the schemas


def every_manifest() -> dict[str, dict]:
    """Every kind the builders make, for representative specs (used by the scan test too)."""
    s = serving()
    rev = d.revision(s)
    cpu = serving({**cpu_spec(), "autoscaling": {"enabled": True, "metric": "CPU", "target": "75"}},
                  bm=base_model("file:///models/tiny", resolved=None))
    hub = serving({**SPEC, "autoscaling": {"enabled": True, "metric": "GPUCacheUsage", "target": "0.75"},
                   "feedback": {"storeUri": "s3://feedback/chat", "storeCredentialsSecretRef": {"name": "store-creds"}, "workers": 2}},
                  bm=base_model(resolved=None), adapters=(adapter("support-v1", uri="s3://bucket/a"),))
    remote = serving({**SPEC, "autoscaling": KEDA, "regions": [{"name": "ap", "clusterSecretRef": {"name": "ap"}}]})
    return {
        "serving-deployment": d.deployment(s, "blue", rev, 2),
        "serving-deployment-autoscaled": d.deployment(s, "green", rev, None),
        "serving-deployment-cpu": d.deployment(cpu, "blue", d.revision(cpu), 1),
        "serving-deployment-hub": d.deployment(hub, "green", d.revision(hub), 1),
        "serving-deployment-remote": d.deployment(remote, "blue", d.revision(remote), 1),
        "serving-service": d.stable_service(s, "blue"),
        "serving-preview-service": d.preview_service(s, "green"),
        "serving-pdb": d.pdb(s, "blue"),
        "serving-hpa-pods": d.hpa(hub, "blue"),
        "serving-hpa-cpu": d.hpa(cpu, "green"),
        "serving-routes": d.routes_config_map(s, {"support": [d.RouteTarget("support-v1")]}),
        "serving-token": d.token_secret(s, TOKEN),
        "serving-network-policy": d.network_policy(s),
        "serving-network-policy-hub": d.network_policy(hub),
        "serving-network-policy-remote": d.network_policy(remote),
        "serving-scaled-object": d.scaled_object(remote, "green"),
    }


@pytest.mark.parametrize("version", ["1.30.0", "1.33.0", "1.37.0"])  # 1.30: the chart's kubeVersion floor (test_chart.KUBE_VERSIONS)
def test_every_built_in_manifest_is_valid_kubernetes(version):
    import kubernetes_validate  # its Kubernetes schemas, strict: unknown fields are errors

    checked = 0
    for name, m in every_manifest().items():
        if m["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(m, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name} ({m['kind']}) is not valid Kubernetes {version}: {e}")
        checked += 1
    assert checked >= 14


def test_kubernetes_validate_catches_a_broken_serving_deployment():
    """The strict validation above can fail: an unknown field in the pod is refused."""
    import kubernetes_validate

    broken = copy.deepcopy(every_manifest()["serving-deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["failureTreshold"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30.0", strict=True)


def keda_scaled_object_schema() -> dict:
    """KEDA's ScaledObject schema, strict: the models `cloudcoil-models-keda` generates from KEDA's CRDs
    (PyPI), as JSON Schema, with unknown fields refused (the API server would prune them silently)."""
    from cloudcoil.models.keda.v1alpha1 import ScaledObjectSpec

    schema = ScaledObjectSpec.model_json_schema(by_alias=True)

    def strict(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for v in node.values():
                strict(v)
        elif isinstance(node, list):
            for v in node:
                strict(v)

    strict(schema)
    return schema


def test_scaled_object_matches_kedas_schema():
    import jsonschema
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    schema = keda_scaled_object_schema()
    validator = jsonschema.Draft202012Validator(schema)
    objects = [d.scaled_object(serving({**SPEC, "autoscaling": {**KEDA, "metric": m}}), c) for m in d.VLLM_METRICS for c in d.COLORS]
    for so in objects:
        errors = sorted(validator.iter_errors(so["spec"]), key=str)
        assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
        ScaledObject.model_validate(so)  # and the typed model (apiVersion, kind, metadata, required fields) takes it
        # trigger metadata is a map of strings in KEDA's schema: no numbers sneak in
        assert all(isinstance(v, str) for v in so["spec"]["triggers"][0]["metadata"].values())
    # the strict schema is not a rubber stamp
    bad = copy.deepcopy(objects[0]["spec"])
    bad["advanced"]["horizontalPodAutoscalerConfig"]["behaviour"] = bad["advanced"]["horizontalPodAutoscalerConfig"].pop("behavior")
    assert list(validator.iter_errors(bad))
    bad = copy.deepcopy(objects[0]["spec"])
    bad["triggers"][0]["metadata"]["threshold"] = 4
    assert list(validator.iter_errors(bad))
