"""Secrets stay secret: what the trainer knows never reaches status, Events, logs or the termination
message, and no process of a training pod but the trainer itself holds credentials in its environment.

The trainer runs for real (a subprocess of `python -m perennial_trainer`), as the pod runs it: uid 1000,
no capabilities, `no_new_privs` (through `setpriv` when these tests run as root), with the Secret as a
0440 file under `PERENNIAL_SECRETS_DIR` and credentials in its environment. The validation Job's pod is
played by the FakeKubelet: its log and termination message are what the real trainer wrote.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from harness import Cluster, FakeKubelet, wait_for

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

JUDGE_KEY = "sk-judge-QxWvTzRkPmNbLcYdHfGsJaUe"  # no digits: the echoing judge's answer must not parse as a score
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
POD_UID = 1000


def pod_command(args: list[str]) -> list[str]:
    """`python -m perennial_trainer ARGS` as the pod runs it: uid/gid 1000, no groups, no capabilities,
    no_new_privs. As root, the interpreter must be one uid 1000 may execute (the venv's may live under
    /root): the system Python 3.11 with the venv's site-packages and the sources on PYTHONPATH."""
    if os.geteuid() != 0:
        return [sys.executable, "-m", "perennial_trainer", *args]
    setpriv = shutil.which("setpriv")
    assert setpriv, "running as root, these tests need util-linux `setpriv` to run the trainer as uid 1000 like the pod"
    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3", sys.executable) if _runnable_as_pod(p)), None)
    assert python, "no Python interpreter that uid 1000 may execute"
    return [setpriv, f"--reuid={POD_UID}", f"--regid={POD_UID}", "--clear-groups", "--no-new-privs", "--inh-caps=-all",
            "--bounding-set=-all", python, "-m", "perennial_trainer", *args]


def _runnable_as_pod(python: str) -> bool:
    if not os.path.exists(python):
        return False
    probe = subprocess.run(["setpriv", f"--reuid={POD_UID}", f"--regid={POD_UID}", "--clear-groups", python, "-c",
                            "import sys; sys.exit(0 if sys.version_info[:2] == (%d, %d) else 1)" % sys.version_info[:2]],
                           capture_output=True, env=pod_base_env(), cwd="/")
    return probe.returncode == 0


def pod_base_env() -> dict[str, str]:
    import importlib.util

    site = [p for p in sys.path if p.endswith("site-packages")]
    # the packages of this checkout, wherever the editable install maps them
    roots = {str(Path(importlib.util.find_spec(m).submodule_search_locations[0]).parent)
             for m in ("perennial", "perennial_trainer", "perennial_records") if importlib.util.find_spec(m)}
    paths = [*sorted(roots), *site]
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": ":".join(paths), "PYTHONUNBUFFERED": "1"}


def pod_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, POD_UID, POD_UID)
    return path


@pytest.fixture
def pod_tmp():
    """A scratch directory uid 1000 can reach (pytest's own tmp_path lives under a 0700 directory)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="perennial-pod-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def secret_file(root: Path, name: str, key: str, value: str) -> Path:
    """A projected Secret key as the kubelet writes it: root-owned, group fsGroup (1000), mode 0440."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    p = d / key
    p.write_text(value)
    if os.geteuid() == 0:
        os.chown(p, 0, POD_UID)
    p.chmod(0o440)
    return p


class EchoJudge(http.server.ThreadingHTTPServer):
    """A hostile 'judge' endpoint: answers with the Authorization header it received."""

    def __init__(self):
        self.seen: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                auth = self.headers.get("Authorization", "")
                outer.seen.append(auth)
                body = json.dumps({"choices": [{"message": {"role": "assistant", "content": f"no score; you sent {auth}"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _container_env(job: dict) -> dict[str, str]:
    c = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def test_a_grader_that_reads_a_secret_cannot_publish_it(cluster: Cluster, pod_tmp: Path):
    """RewardSpec graders get the judge key in three ways (the trusted judge call, the mounted file, the
    environment); each tries to publish it through the validation Job: none reaches status, Events,
    logs or the termination message."""
    tmp_path = pod_tmp
    judge = EchoJudge()
    secrets_dir = tmp_path / "secrets"
    secret_file(secrets_dir, "judge", "api-key", JUDGE_KEY)
    reader = (
        "def grade(sample, item):\n"
        "    import os\n"
        f"    found = [open(p).read() for p in [{str(secrets_dir / 'judge' / 'api-key')!r}] if os.access(p, os.R_OK)]\n"
        "    raise RuntimeError('leak: ' + ' '.join(found + [os.environ.get('AWS_SECRET_ACCESS_KEY', '')]))\n"
    )
    spec = {
        "graders": [
            {"name": "judge", "type": "LLMJudge", "llmJudge": {
                "endpoint": f"http://127.0.0.1:{judge.server_address[1]}/v1", "model": "m", "rubric": "score it",
                "apiKeySecretRef": {"name": "judge", "key": "api-key"}, "maxRetries": 0, "timeoutSeconds": 10}},
            {"name": "reader", "type": "Python", "python": {"source": reader}},
        ],
        "tests": [{"name": "leaks", "completion": "anything", "expect": {"min": "1"}}],
    }
    cluster.kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "judge", "namespace": "default"},
                         "stringData": {"api-key": JUDGE_KEY}})
    kubelet = FakeKubelet(cluster)
    cluster.create("RewardSpec", "leaky", spec)
    # A Secret that did not opt in is never sent to an endpoint the RewardSpec's author chose
    c = cluster.wait_condition("RewardSpec", "leaky", "Ready", "False", "SecretNotAllowed")
    assert "perennial.ai/llm-judge-key" in c["message"]
    assert not cluster.kube.list("batch/v1", "Job", "default", "perennial.ai/rewardspec=leaky")
    cluster.kube.patch("v1", "Secret", "default", "judge", {"metadata": {"labels": {"perennial.ai/llm-judge-key": "true"}}})
    job = wait_for(lambda: next(iter(cluster.kube.list("batch/v1", "Job", "default", "perennial.ai/rewardspec=leaky")), None), message="validation Job")
    pod_spec = job["spec"]["template"]["spec"]
    secret_vol = next(v for v in pod_spec["volumes"] if v["name"] == "grader-secrets")
    assert secret_vol["projected"]["defaultMode"] == 0o440, "judge keys are mounted readable by owner and fsGroup only"

    # The pod: the real trainer, with what the Job gives it (its env, the ConfigMap as a file, the Secret as a file)
    cm = cluster.kube.get("v1", "ConfigMap", "default", next(v["configMap"]["name"] for v in pod_spec["volumes"] if "configMap" in v))
    work = pod_dir(tmp_path / "pod")
    spec_file = work / "rewardspec.yaml"
    spec_file.write_text(cm["data"]["rewardspec.yaml"])
    env = {**pod_base_env(), **_container_env(job), "HOME": str(work), "TMPDIR": str(work),
           "PERENNIAL_SECRETS_DIR": str(secrets_dir), "PERENNIAL_TERMINATION_LOG": str(work / "termination-log"),
           "AWS_SECRET_ACCESS_KEY": AWS_SECRET}
    args = pod_spec["containers"][0]["args"]
    assert args[:2] == ["grade", "--reward-spec"]
    proc = subprocess.run(pod_command(["grade", "--reward-spec", str(spec_file), *args[3:]]), env=env, cwd=str(work),
                          capture_output=True, text=True, timeout=120)
    logs = proc.stdout + proc.stderr
    termination = (work / "termination-log").read_text()
    assert proc.returncode == 1, logs  # the test fails (no score), the run itself is fine
    # the leak path was exercised: the judge received the key (and echoed it back)
    assert judge.seen == [f"Bearer {JUDGE_KEY}"]

    pod = kubelet.start(job["metadata"]["name"])
    kubelet.log(pod, logs)
    kubelet.finish(job["metadata"]["name"], pod, exit_code=proc.returncode, message=termination, job_condition="Failed", job_reason="BackoffLimitExceeded")
    cluster.wait_condition("RewardSpec", "leaky", "Validated", "False", "TestsFailed")
    status = cluster.get("RewardSpec", "leaky")["status"]
    events = wait_for(lambda: cluster.events("leaky") or None, message="Events of the RewardSpec")
    pod_log = cluster.kube.pod_log("default", pod)
    places = {"status": json.dumps(status), "events": json.dumps(events), "termination message": termination,
              "logs": logs, "pod log": pod_log, "status message": json.dumps(status.get("testResults"))}
    for where, text in places.items():
        for secret in (JUDGE_KEY, AWS_SECRET):
            assert secret not in text, f"a secret reached the {where}"
            assert secret[:-4] not in text, f"part of a secret reached the {where}"
    assert "[REDACTED]" in termination, termination  # what came back was redacted, not dropped by chance
    judge.shutdown()


# --------------------------------------------------------------------------- processes of a training pod


def _readable_by_pod_user(path: str) -> bool:
    """Whether a uid-1000 process (as a grader or helper of the pod runs) can read `path`."""
    probe = "import sys\ntry:\n    open(sys.argv[1], 'rb').read()\nexcept OSError:\n    sys.exit(3)\n"
    if os.geteuid() == 0:
        cmd = ["setpriv", f"--reuid={POD_UID}", f"--regid={POD_UID}", "--clear-groups", "/usr/bin/python3", "-c", probe, path]
    else:
        cmd = [sys.executable, "-c", probe, path]
    return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            if k not in out:
                out.add(k)
                todo.append(k)
    return out


def test_no_process_of_a_training_pod_but_the_trainer_holds_credentials(pod_tmp: Path):
    """A GRPO run (curve helper + sandboxed Python grader) with object-store keys in its environment:
    every other process of the pod is checked while the run goes on, and the grader itself looks for
    the key in every /proc/*/environ it can read (its reward is 1 if it finds one)."""
    from tinymodel import build_tiny_model
    from trainer_support import run_config, write_fruit_data

    tmp_path = pod_tmp
    work = pod_dir(tmp_path / "pod")
    base = build_tiny_model(tmp_path / "model")
    data = write_fruit_data(tmp_path / "data")
    for p in tmp_path.rglob("*"):
        p.chmod(p.stat().st_mode | 0o055)  # readable by uid 1000, as a read-only volume would be
    hunter = (
        "def grade(sample, item):\n"
        "    import os\n"
        "    if any(k.startswith(('AWS_', 'HF_TOKEN')) for k in os.environ):\n"
        "        return 1.0  # the sandboxed process itself holds a credential\n"
        "    for pid in os.listdir('/proc'):\n"
        "        try:\n"
        "            if b'" + AWS_SECRET[:12] + "' in open('/proc/%s/environ' % pid, 'rb').read():\n"
        "                return 1.0\n"
        "        except Exception:\n"
        "            pass\n"
        "    return 0.0\n"
    )
    rs = {"graders": [{"name": "hunter", "type": "Python", "python": {"source": hunter}}]}
    cfg = run_config(name="creds", method="GRPO", base=str(base), output=str(pod_dir(tmp_path / "out")), datasets=[{"name": "prompts", "uri": data["grpo"]}],
                     hp={"learningRate": "1e-4", "maxSteps": 3, "batchSize": 4, "numGenerations": 2, "maxCompletionLength": 4, "seed": 1},
                     reward_spec=rs)
    cfg_path = work / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**pod_base_env(), "HOME": str(work), "TMPDIR": str(work), "PERENNIAL_TERMINATION_LOG": str(work / "termination-log"),
           "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE", "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "HF_TOKEN": "hf_abcdefghijklmnopqrstuvwxyz"}
    proc = subprocess.Popen(pod_command(["train", "--config", str(cfg_path)]), env=env, cwd=str(work),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trainer: int | None = None
    trainer_environ_readable: bool | None = None
    seen: dict[int, str] = {}
    holders: dict[int, str] = {}
    out_chunks: list[str] = []
    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        for pid in _children(proc.pid) | {proc.pid}:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if not cmdline or "setpriv" in cmdline.split()[0]:
                continue  # setpriv exec()s the trainer: the same process, seen before its exec
            if "perennial_trainer train" in cmdline:
                # the trainer, or a fork of it not yet exec()ed (subprocess's fork-then-exec): the trainer's own
                # image; what it runs next is checked once it has exec()ed
                trainer = pid if trainer is None else trainer
                continue
            if trainer is not None and trainer_environ_readable is None:
                # once the trainer has started something (its start-up, before any other process of the pod
                # exists, is the only moment it is dumpable)
                trainer_environ_readable = _readable_by_pod_user(f"/proc/{trainer}/environ")
            seen[pid] = cmdline
            if AWS_SECRET.encode() in environ or b"AKIAIOSFODNN7EXAMPLE" in environ:
                holders[pid] = cmdline
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    reader.join(10)
    out = "".join(out_chunks)
    assert proc.returncode == 0, out[-3000:]
    helpers = seen
    # the trainer holds the credentials: non-dumpable from its first moment, so no uid-1000 process reads them
    assert trainer is not None and trainer_environ_readable is False, "the trainer's /proc/<pid>/environ is readable by uid 1000"
    assert any("perennial_trainer.curves" in c for c in helpers.values()), f"the curve helper was not seen: {helpers}\n{out[-4000:]}"
    assert list((tmp_path / "out").rglob("curves.png")), "the helper still draws with its minimal environment"
    assert not holders, f"processes other than the trainer hold credentials in their environment: {holders}"
    # (the sandbox's supervisor is usually caught by the scan too; its samples check their own environment
    # deterministically: the grader's reward is 1 if they hold a credential)
    rewards = [json.loads(line.split(" ", 1)[1]).get("meanReward") for line in out.splitlines() if line.startswith("PERENNIAL_PROGRESS ")]
    assert rewards and all(r in (0, 0.0, None) for r in rewards), f"the sandboxed grader held a credential or found one in some /proc/*/environ: {rewards}"
    assert AWS_SECRET not in out


def test_the_operator_scrubs_what_a_pod_that_did_not_redact_wrote(cluster: Cluster):
    """The operator does not trust the pod: a validation pod whose trainer did not redact (another image, a
    bug) writes the judge key into its termination message; status and Events never get it."""
    spec = {
        "graders": [{"name": "judge", "type": "LLMJudge", "llmJudge": {
            "endpoint": "http://judge.example:8000/v1", "model": "m", "rubric": "score it",
            "apiKeySecretRef": {"name": "judge", "key": "api-key"}}}],
        "tests": [{"name": "leaks", "completion": "anything", "expect": {"min": "1"}}],
    }
    cluster.kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "judge", "namespace": "default",
                                                                            "labels": {"perennial.ai/llm-judge-key": "true"}},
                         "stringData": {"api-key": JUDGE_KEY}})
    kubelet = FakeKubelet(cluster)
    cluster.create("RewardSpec", "unredacted", spec)
    job = wait_for(lambda: next(iter(cluster.kube.list("batch/v1", "Job", "default", "perennial.ai/rewardspec=unredacted")), None), message="validation Job")
    pod = kubelet.start(job["metadata"]["name"])
    leak = {"status": "Failed", "message": f"0/1 tests passed; key {JUDGE_KEY}",
            "results": [{"name": "leaks", "passed": False, "score": "0", "message": f"judge said: Bearer {JUDGE_KEY}"}]}
    kubelet.finish(job["metadata"]["name"], pod, exit_code=1, message=json.dumps(leak), job_condition="Failed", job_reason="BackoffLimitExceeded")
    cluster.wait_condition("RewardSpec", "unredacted", "Validated", "False", "TestsFailed")
    status = cluster.get("RewardSpec", "unredacted")["status"]
    events = wait_for(lambda: cluster.events("unredacted") or None, message="Events of the RewardSpec")
    for where, text in {"status": json.dumps(status), "events": json.dumps(events)}.items():
        assert JUDGE_KEY not in text and JUDGE_KEY[:-4] not in text, f"the judge key reached the {where}"
    assert "judge said: Bearer" in json.dumps(status["testResults"])  # the message came through, scrubbed
