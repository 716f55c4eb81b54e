"""What Kubernetes enforces for the pods that run untrusted code, read off the built manifests; the
trainer's redaction by value; the hf:// download that works although the image is offline by default."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from perennial.api.basemodel import BaseModelSpec
from perennial.api.rewardspec import RewardSpecSpec
from perennial.api.trainingrun import TrainingRunSpec
from perennial.config import OperatorConfig
from perennial.resources import basemodel, rewardspec, trainingrun
from perennial.resources.networkpolicy import PRIVATE_V4, EgressSettings
from perennial.resources.podsecurity import (
    PodSettings,
    add_quantities,
    image_is_pinned,
    quantity_bytes,
)

REPO = Path(__file__).resolve().parents[2]
DIGEST = "ghcr.io/perennial-ai/perennial-trainer@sha256:" + "0123456789abcdef" * 4


def owner(kind: str, name: str) -> dict:
    return {"apiVersion": "perennial.ai/v1alpha1", "kind": kind, "metadata": {"name": name, "namespace": "team", "uid": f"uid-{name}"}}


JUDGE = {"name": "judge", "type": "LLMJudge", "llmJudge": {"endpoint": "http://judge.models.svc:8000/v1", "model": "m", "rubric": "r",
                                                         "apiKeySecretRef": {"name": "judge-key", "key": "token"}}}
EXTERNAL_JUDGE = {"name": "ext", "type": "LLMJudge", "llmJudge": {"endpoint": "https://api.example.com/v1", "model": "m", "rubric": "r"}}
REWARD = {"graders": [{"name": "fmt", "type": "Regex", "regex": {"pattern": "^<a>"}}, JUDGE, EXTERNAL_JUDGE],
          "tests": [{"name": "t", "completion": "<a>", "expect": {"min": "0"}}]}
RUN = {
    "method": "GRPO", "baseModelRef": {"name": "base"}, "rewardSpecRef": {"name": "rs"},
    "datasets": [{"name": "prompts", "uri": "pvc://data/prompts.jsonl"}, {"name": "more", "uri": "s3://bucket/more.jsonl"}],
    "output": {"adapterFamily": "fam"},
}


def training_job(output: str = "pvc://artifacts/adapters/team/run", pods: PodSettings = PodSettings(), image: str = DIGEST) -> tuple[dict, dict]:
    body = owner("TrainingRun", "run")
    spec = TrainingRunSpec.model_validate(RUN)
    rs = RewardSpecSpec.model_validate(REWARD)
    config = trainingrun.run_config(body, spec, base_model_uri="pvc://base-weights/model", output=output,
                                    parent_adapter_uri="pvc://artifacts/adapters/team/parent", reward_spec=rs, eval_reward_spec=None, feedback_store_uri=None)
    job = trainingrun.job(body, spec, config, image=image, credential_secrets=["store-creds"], judge_keys=trainingrun.judge_secrets(rs), pods=pods)
    return job, config


def validation_job() -> dict:
    return rewardspec.validation_job(owner("RewardSpec", "rs"), RewardSpecSpec.model_validate(REWARD), DIGEST)


def download_job(uri: str = "hf://org/tiny") -> dict:
    spec = BaseModelSpec.model_validate({"source": {"uri": uri, "credentialsSecretRef": {"name": "hf"}}, "cache": {"enabled": True, "size": "10Gi"}})
    return basemodel.download_job(owner("BaseModel", "base"), spec, DIGEST, PodSettings(download_deadline_seconds=1234))


def jobs() -> dict[str, dict]:
    return {"training": training_job()[0], "validation": validation_job(), "download": download_job()}


@pytest.mark.parametrize("which", ["training", "validation", "download"])
def test_every_job_pod_is_restricted_read_only_bounded_and_has_a_deadline(which: str):
    job = jobs()[which]
    assert job["spec"]["activeDeadlineSeconds"] > 0
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    disk = []
    for v in pod["volumes"]:
        if "emptyDir" in v:
            assert v["emptyDir"].get("sizeLimit"), f"emptyDir {v['name']} is unbounded"
            if v["emptyDir"].get("medium") != "Memory":
                disk.append(v["emptyDir"]["sizeLimit"])
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
        res = c["resources"]
        need = quantity_bytes(add_quantities(*disk, "1Gi"))
        assert quantity_bytes(res["requests"]["ephemeral-storage"]) == quantity_bytes(res["limits"]["ephemeral-storage"]) == need
        # what must be writable is an emptyDir: /tmp, and HOME and caches below it
        env = {e["name"]: e.get("value") for e in c["env"]}
        tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
        assert next(v for v in pod["volumes"] if v["name"] == tmp["name"])["emptyDir"]
        for var in ("HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "TMPDIR"):
            assert env[var].startswith("/tmp"), var
        assert c["image"] == DIGEST  # a digest is used as given


def test_download_deadline_comes_from_the_operator_config(monkeypatch):
    assert download_job()["spec"]["activeDeadlineSeconds"] == 1234
    monkeypatch.setenv("PERENNIAL_DOWNLOAD_DEADLINE_SECONDS", "99")
    monkeypatch.setenv("PERENNIAL_TRAINER_SCRATCH_SIZE", "3Gi")
    monkeypatch.setenv("PERENNIAL_TRAINER_IMAGE", DIGEST)
    cfg = OperatorConfig()
    assert cfg.pod_settings().download_deadline_seconds == 99 and cfg.trainer_image == DIGEST and image_is_pinned(cfg.trainer_image)
    job, _ = training_job(pods=cfg.pod_settings())
    tmp = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "tmp")
    assert tmp["emptyDir"]["sizeLimit"] == "3Gi"


def test_images_pin_by_digest():
    assert image_is_pinned(DIGEST)
    assert not image_is_pinned("ghcr.io/perennial-ai/perennial-trainer:0.1.0")
    assert not image_is_pinned("repo@sha256:short")
    # a run's own image (runPolicy.image) accepts a digest too, and reaches the Job unchanged
    spec = TrainingRunSpec.model_validate({**RUN, "runPolicy": {"image": DIGEST}})
    assert spec.run_policy.image == DIGEST


def test_training_inputs_are_read_only_and_the_output_is_writable_only_in_its_own_directory():
    job, _ = training_job()
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    by_claim = {v["claimName"]: (name, v) for name, v in claims.items()}
    # the shared weight cache and the datasets: read-only, at the volume too
    for claim in ("base-weights", "data"):
        name, vol = by_claim[claim]
        assert vol["readOnly"] is True and mounts[f"/mnt/pvc/{claim}"]["readOnly"] is True
    # the artifacts claim holds the parent (input) and the output: read-only root, writable subPath for this run
    assert mounts["/mnt/pvc/artifacts"]["readOnly"] is True
    out = mounts["/mnt/pvc/artifacts/adapters/team/run"]
    assert out["subPath"] == "adapters/team/run" and not out.get("readOnly")
    order = [m["mountPath"] for m in c["volumeMounts"]]
    assert order.index("/mnt/pvc/artifacts") < order.index("/mnt/pvc/artifacts/adapters/team/run")
    assert by_claim["artifacts"][1]["readOnly"] is False
    assert mounts["/etc/perennial"]["readOnly"] is True and mounts["/var/run/secrets/perennial"]["readOnly"] is True


def test_secret_files_are_mounted_0440():
    for job in (training_job()[0], validation_job()):
        vol = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "grader-secrets")
        assert vol["projected"]["defaultMode"] == 0o440
        assert all("mode" not in i or i["mode"] == 0o440 for s in vol["projected"]["sources"] for i in s["secret"]["items"])


def test_download_job_turns_the_images_offline_default_off():
    env = {e["name"]: e["value"] for e in download_job()["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_HUB_OFFLINE"] == "0"
    dockerfile = (REPO / "trainer_image" / "Dockerfile").read_text()
    assert "HF_HUB_OFFLINE=1" in dockerfile  # why the override is needed: training stays offline


class FakeHub(http.server.ThreadingHTTPServer):
    """The few Hub API routes `snapshot_download` uses, serving one tiny repo."""

    FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\0" * 16}
    SHA = "a" * 40

    def __init__(self):
        self.requests: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, head: bool) -> None:
                hub.requests.append(f"{self.command} {self.path}")
                path = self.path.split("?")[0]
                code, body, headers = 404, b"{}", {"X-Error-Code": "EntryNotFound"}
                if path.startswith("/api/models/org/tiny/tree/"):
                    code, headers = 200, {"Content-Type": "application/json"}
                    body = json.dumps([{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()} for f, d in hub.FILES.items()]).encode()
                elif path.startswith("/api/models/org/tiny"):
                    code, headers = 200, {"Content-Type": "application/json"}
                    body = json.dumps({"id": "org/tiny", "sha": hub.SHA, "siblings": [{"rfilename": f} for f in hub.FILES]}).encode()
                else:
                    for f, data in hub.FILES.items():
                        if path == f"/org/tiny/resolve/{hub.SHA}/{f}" or path == f"/org/tiny/resolve/main/{f}":
                            code, body = 200, data
                            headers = {"X-Repo-Commit": hub.SHA, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def do_GET(self):
                self._answer(False)

            def do_HEAD(self):
                self._answer(True)

            def log_message(self, *a):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _image_env() -> dict[str, str]:
    """The ENV lines of the trainer image that matter here (as the container starts with them)."""
    env: dict[str, str] = {}
    for line in (REPO / "trainer_image" / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        for token in line.replace("ENV", " ").replace("\\", " ").split():
            if token.startswith("HF_HUB_OFFLINE="):
                env["HF_HUB_OFFLINE"] = token.split("=", 1)[1]
    return env


def test_hf_download_works_with_the_download_jobs_environment(tmp_path: Path):
    """The download Job's program, with the image's environment overlaid by the Job's, against a local
    stand-in for the Hub: the weights arrive (with HF_HUB_OFFLINE=1 left alone: LocalEntryNotFoundError)."""
    hub = FakeHub()
    job = download_job()
    c = job["spec"]["template"]["spec"]["containers"][0]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": os.pathsep.join(sys.path), **_image_env()}
    assert env.get("HF_HUB_OFFLINE") == "1"
    for e in c["env"]:
        env[e["name"]] = e["value"].replace("/tmp", str(tmp_path / "scratch")).replace("/cache", str(tmp_path / "cache"))
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{hub.server_address[1]}"
    env["PERENNIAL_TERMINATION_LOG"] = str(tmp_path / "termination-log")
    args = [a.replace("/cache", str(tmp_path / "cache")) for a in c["args"]]
    proc = subprocess.run([sys.executable, *c["command"][1:], *args], env=env, capture_output=True, text=True, timeout=120)
    hub.shutdown()
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = tmp_path / "cache" / "model"
    assert (model / "config.json").read_bytes() == FakeHub.FILES["config.json"]
    assert (model / "model.safetensors").stat().st_size == 16
    assert any("/resolve/" in r for r in hub.requests)


# --------------------------------------------------------------------------- NetworkPolicies


def _policy(settings: EgressSettings = EgressSettings()) -> dict:
    _, config = training_job(output="s3://bucket/adapters/team/run")
    return trainingrun.network_policy(owner("TrainingRun", "run"), config, settings)


def test_training_network_policy_denies_ingress_and_allows_only_named_egress():
    pol = _policy()
    spec = pol["spec"]
    assert pol["metadata"]["ownerReferences"][0]["uid"] == "uid-run"
    assert spec["policyTypes"] == ["Ingress", "Egress"] and spec["ingress"] == []
    job, _ = training_job()
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    rules = spec["egress"]
    dns = rules[0]
    assert {p["port"] for p in dns["ports"]} == {53} and dns["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
    by_port = {}
    for r in rules[1:]:
        for p in r["ports"]:
            by_port.setdefault(p["port"], []).extend(r["to"])
    # in-cluster judge: its namespace on its port; external judge and object store: public internet on 443 only
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "models"}}} in by_port[8000]
    public = [p for p in by_port[443] if "ipBlock" in p and p["ipBlock"]["cidr"] == "0.0.0.0/0"]
    assert public and set(PRIVATE_V4) <= set(public[0]["ipBlock"]["except"]) and "169.254.0.0/16" in public[0]["ipBlock"]["except"]
    assert set(by_port) == {8000, 443}


def test_network_policy_uses_the_operators_egress_cidrs_for_external_hosts():
    pol = _policy(EgressSettings(egress_cidrs=("10.20.0.0/16",), dns_cidrs=("169.254.20.10/32",)))
    rules = pol["spec"]["egress"]
    assert {"ipBlock": {"cidr": "169.254.20.10/32"}} in rules[0]["to"]
    external = [r for r in rules[1:] if any(p["port"] == 443 for p in r["ports"])]
    assert external and all(t == {"ipBlock": {"cidr": "10.20.0.0/16"}} for r in external for t in r["to"])


def test_validation_network_policy_allows_only_the_judges():
    spec = RewardSpecSpec.model_validate({**REWARD, "graders": [REWARD["graders"][0], {**JUDGE, "llmJudge": {**JUDGE["llmJudge"], "endpoint": "http://10.1.2.3:9000/v1"}}]})
    pol = rewardspec.validation_network_policy(owner("RewardSpec", "rs"), spec, EgressSettings())
    rules = pol["spec"]["egress"]
    assert pol["spec"]["ingress"] == [] and len(rules) == 2
    assert rules[1] == {"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}], "ports": [{"protocol": "TCP", "port": 9000}]}
    job = validation_job()
    assert pol["spec"]["podSelector"]["matchLabels"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    # a spec without judges: DNS only
    bare = rewardspec.validation_network_policy(owner("RewardSpec", "rs"), RewardSpecSpec.model_validate({"graders": [REWARD["graders"][0]]}), EgressSettings())
    assert len(bare["spec"]["egress"]) == 1


# --------------------------------------------------------------------------- redaction (trainer)


def test_redactor_replaces_every_spelling_of_env_and_file_secrets(tmp_path: Path):
    from perennial_trainer.redact import REDACTED, Redactor, known_secrets

    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "token").write_text("judge-token-123456\n")
    (tmp_path / "gcp.json").write_text(json.dumps({"type": "service_account", "private_key": "-----BEGIN KEY-----abcdefgh"}))
    env = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG", "PATH": "/usr/local/bin:/usr/bin", "HOME": "/tmp/home",
           "PERENNIAL_TERMINATION_LOG": "/dev/termination-log", "SHORT": "abc", "MY_SVC_SERVICE_HOST": "10.0.0.12",
           "SSL_CERT_FILE": str(tmp_path / "gcp.json"), "SDK_VERSION": "528.0.0"}
    red = Redactor(known_secrets(env, str(tmp_path)))
    aws = env["AWS_SECRET_ACCESS_KEY"]
    import base64
    import urllib.parse

    for spelling in (aws, json.dumps(aws)[1:-1], urllib.parse.quote(aws, safe=""), base64.b64encode(aws.encode()).decode(), "judge-token-123456",
                     "-----BEGIN KEY-----abcdefgh"):
        out = red.redact(f"before {spelling} after")
        assert spelling not in out and REDACTED in out, spelling
    # what is not secret stays: paths, settings, short values, service addresses
    kept = f"PATH /usr/local/bin:/usr/bin HOME /tmp/home /dev/termination-log abc 10.0.0.12 service_account {tmp_path}/gcp.json 528.0.0"
    assert red.redact(kept) == kept


def test_termination_message_and_json_files_are_redacted(tmp_path: Path, monkeypatch):
    from perennial_trainer import redact
    from perennial_trainer.progress import atomic_write_json, write_termination

    monkeypatch.setenv("HF_TOKEN", "hf_secretsecretsecret")
    monkeypatch.setenv("PERENNIAL_SECRETS_DIR", str(tmp_path / "none"))
    redact.reset()
    try:
        text = write_termination({"status": "Failed", "reason": "X", "message": "token hf_secretsecretsecret rejected"}, str(tmp_path / "t"))
        assert "hf_secretsecretsecret" not in text and json.loads(text)["message"] == "token [REDACTED] rejected"
        atomic_write_json(tmp_path / "m.json", {"note": "hf_secretsecretsecret"})
        assert "hf_secretsecretsecret" not in (tmp_path / "m.json").read_text()
    finally:
        redact.reset()


def test_fd_redaction_covers_the_process_and_its_children(tmp_path: Path):
    """`install_fd_redaction` (the trainer entrypoint's): what this process, C code writing to fd 2 and
    child processes that inherit stdout write is redacted before it leaves."""
    code = (
        "import os, subprocess, sys\n"
        "from perennial_trainer.redact import install_fd_redaction\n"
        "assert install_fd_redaction()\n"
        "print('py', os.environ['AWS_SECRET_ACCESS_KEY'])\n"
        "os.write(2, ('fd2 ' + os.environ['AWS_SECRET_ACCESS_KEY'] + '\\n').encode())\n"
        "subprocess.run([sys.executable, '-c', 'import os; print(\"child\", os.environ[\"AWS_SECRET_ACCESS_KEY\"])'])\n"
        "print('partial', os.environ['AWS_SECRET_ACCESS_KEY'], end='')\n"
    )
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENGbPxRfiCY"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    both = proc.stdout + proc.stderr
    assert "wJalrXUtnFEMI" not in both
    assert both.count("[REDACTED]") == 4 and "child [REDACTED]" in proc.stdout and "fd2 [REDACTED]" in proc.stderr


def test_helper_processes_get_a_minimal_environment(tmp_path: Path, monkeypatch):
    """The curve helper lives for the whole run; a same-uid grader can read its /proc/<pid>/environ."""
    from perennial_trainer.curves import CurvePlotter

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENGbPxRfiCY")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    plotter = CurvePlotter(str(tmp_path / "curves.png"))
    try:
        assert plotter.proc is not None
        environ = Path(f"/proc/{plotter.proc.pid}/environ").read_bytes()
        assert b"wJalrXUtnFEMI" not in environ and b"hf_abcdefghijklmnop" not in environ
        names = {kv.split(b"=", 1)[0].decode() for kv in environ.split(b"\0") if kv}
        assert names <= {"PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "HOME", "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH",
                         "OMP_NUM_THREADS", "MPLBACKEND", "MPLCONFIGDIR"}, names
        plotter.send([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}])
        plotter.wait()
        assert (tmp_path / "curves.png").stat().st_size > 0  # still draws
    finally:
        plotter.cancel()


def test_the_rewardspec_controller_never_copies_a_referenced_secret_from_a_pod_into_status():
    """Defence that does not trust the pod: a termination message carrying the judge key verbatim (a pod that
    did not redact) reaches status scrubbed, and bounded."""
    import base64

    from perennial.controllers import rewardspec as rs
    from perennial.resources.podsecurity import secret_values

    key = "sk-live-0123456789abcdef"
    spec = {"graders": [JUDGE], "tests": [{"name": "t", "completion": "x", "expect": {"min": "1"}}]}
    body = {**owner("RewardSpec", "rs"), "spec": spec, "metadata": {**owner("RewardSpec", "rs")["metadata"], "generation": 1}}
    secret = {"data": {"token": base64.b64encode(key.encode()).decode()}}
    job = {"metadata": {"name": "rs-validate", "uid": "j"}, "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}
    leak = json.dumps({"status": "Failed", "message": f"judge said {key}", "results": [
        {"name": "t", "passed": False, "score": "0", "message": "x" * 2000 + key}, {"name": key, "passed": False, "score": key, "message": key}]})
    pod = {"metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
           "status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 1, "message": leak}}}]}}
    world = rs.World(job, [pod], secret_values(secret, ["token"]))
    decision = rs.decide(body, world, "trainer:1", "2026-01-01T00:10:00Z")
    text = json.dumps(decision.status)
    assert key not in text and "[REDACTED]" in text
    assert all(len(r["message"]) <= 1024 for r in decision.status["testResults"])
    # no Secret observed: the same message is copied (so the scrub above is what removed it)
    assert key in json.dumps(rs.decide(body, rs.World(job, [pod]), "trainer:1", "2026-01-01T00:10:00Z").status)


def test_the_trainingrun_controller_scrubs_the_secrets_its_job_was_given():
    """Every Secret the training Job's pod receives (envFrom credentials, projected judge keys) is known to
    the controller from the Job itself; what the pod writes back is scrubbed of them."""
    import base64

    from perennial.controllers import trainingrun as tr

    job, _ = training_job()
    creds = {"data": {"AWS_SECRET_ACCESS_KEY": base64.b64encode(b"wJalrXUtnFEMI/K7MDENG").decode(), "AWS_ACCESS_KEY_ID": base64.b64encode(b"AKIAIOSFODNN7EX").decode()}}
    judge = {"data": {"token": base64.b64encode(b"sk-judge-abcdef123").decode(), "unused": base64.b64encode(b"not-given-to-pod").decode()}}

    class Cache:
        def get(self, api, kind, ns, name):
            return {"store-creds": creds, "judge-key": judge}.get(name) if kind == "Secret" else None

    secrets = tr.pod_secret_values(Cache(), "team", job)
    assert set(secrets) == {"wJalrXUtnFEMI/K7MDENG", "AKIAIOSFODNN7EX", "sk-judge-abcdef123"}
    message = json.dumps({"status": "Failed", "reason": "StorageUnavailable", "message": "denied for AKIAIOSFODNN7EX / wJalrXUtnFEMI/K7MDENG"})
    pod = {"status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 1, "message": message}}}]}}
    failed_job = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]}}
    reason, text = tr.failure(tr.Observed(failed_job, pod, secrets))
    assert reason == "StorageUnavailable" and "AKIA" not in text and "wJalr" not in text and "[REDACTED]" in text
    assert "wJalr" in tr.failure(tr.Observed(failed_job, pod))[1]  # the scrub is what removed it


def test_a_judge_key_secret_must_opt_in_before_a_rewardspec_may_send_it_anywhere():
    from perennial.controllers import rewardspec as rs

    spec = {"graders": [JUDGE], "tests": [{"name": "t", "completion": "x", "expect": {"min": "0"}}]}
    body = {**owner("RewardSpec", "rs"), "spec": spec, "metadata": {**owner("RewardSpec", "rs")["metadata"], "generation": 1}}
    refused = rs.decide(body, rs.World(not_allowed=["judge-key"]), "trainer:1", "2026-01-01T00:00:00Z")
    ready = {c["type"]: c for c in refused.status["conditions"]}["Ready"]
    assert ready["status"] == "False" and ready["reason"] == "SecretNotAllowed" and rs.JUDGE_KEY_LABEL in ready["message"]
    assert refused.children == []  # no validation Job, no key mounted anywhere
    allowed = rs.decide(body, rs.World(), "trainer:1", "2026-01-01T00:00:00Z")
    assert any(c["kind"] == "Job" for c in allowed.children)
    assert rs.dependencies(body) == [("v1", "Secret", "team", "judge-key")]


def test_a_failed_download_reports_without_its_token(tmp_path: Path, monkeypatch):
    from perennial_trainer import redact
    from perennial_trainer.download import main

    token = "hf_tokentokentokentoken"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("PERENNIAL_TERMINATION_LOG", str(tmp_path / "termination-log"))
    redact.reset()
    try:
        assert main(["--source", f"file://{tmp_path}/{token}/missing", "--dest", str(tmp_path / "d")]) == 1
    finally:
        redact.reset()
    text = (tmp_path / "termination-log").read_text()
    assert "DownloadFailed" in text and token not in text and "[REDACTED]" in text
