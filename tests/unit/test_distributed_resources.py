"""Multi-node training groups (`resources.nodes` > 1): the engine chosen by the CRDs the cluster serves, and the
manifests of each engine validated strictly — the indexed Job and its headless Service against Kubernetes' own
schemas (kubernetes-validate --strict), the JobSet and the TrainJob against the models Kubeflow Trainer publishes
(PyPI `kubeflow-trainer-api` 2.3.0: TrainJob trainer.kubeflow.org/v1alpha1 and JobSet jobset.x-k8s.io/v1alpha2,
generated from those projects' OpenAPI), with unknown fields refused; and how a group's status reads."""

from __future__ import annotations

import copy

import pytest

from perennial.api import TrainingRunSpec
from perennial.resources import distributed as dist
from perennial.resources import trainingrun as tr

BODY = {"apiVersion": "perennial.ai/v1alpha1", "kind": "TrainingRun",
        "metadata": {"name": "big", "namespace": "team", "uid": "u-9"}}
BASE = {
    "method": "SFT", "baseModelRef": {"name": "m"}, "datasets": [{"name": "d", "uri": "pvc://data/train.jsonl"}],
    "output": {"adapterFamily": "fam", "artifactUri": "pvc://artifacts/out"},
}
KUBE_VERSIONS = ("1.30.0", "1.37.0")  # 1.28-1.29 schemas wrongly require podFailurePolicy `onPodConditions`
BOTH = {dist.JOBSET_RESOURCE, dist.TRAINJOB_RESOURCE}


def spec(**resources) -> TrainingRunSpec:
    return TrainingRunSpec.model_validate({**BASE, "resources": {"gpus": 8, **resources}})


def single_job(s: TrainingRunSpec) -> dict:
    config = tr.run_config(BODY, s, base_model_uri="pvc://models/m", output="pvc://artifacts/out/team/big", parent_adapter_uri=None,
                           reward_spec=None, eval_reward_spec=None, feedback_store_uri=None)
    return tr.job(BODY, s, config, image="trainer:1", credential_secrets=["hf"], judge_keys=[])


def assert_trainer_parses(cmd: list[str]) -> None:
    """The trainer's own parser takes the command line (perennial_trainer.cli)."""
    from perennial_trainer.cli import _parser

    assert cmd[0] == "perennial-trainer"
    a = _parser().parse_args(cmd[1:])
    assert a.command == "train" and a.nnodes > 1 and a.nproc_per_node >= 1 and a.rdzv_endpoint and a.rdzv_id


def group(s: TrainingRunSpec, engine: str, secret_keys=None) -> list[dict]:
    return dist.group(BODY, s, single_job(s), engine, network_policies=True, secret_keys=secret_keys or {"hf": ["HF_TOKEN"]})


@pytest.mark.parametrize("nodes,engine,served,want", [
    (1, "Auto", BOTH, "Job"),
    (1, "TrainJob", set(), "Job"),  # one node never needs a group
    (2, "Auto", set(), "IndexedJob"),
    (2, "Auto", {dist.JOBSET_RESOURCE}, "JobSet"),
    (2, "Auto", {dist.TRAINJOB_RESOURCE}, "TrainJob"),
    (2, "Auto", BOTH, "TrainJob"),
    (4, "JobSet", BOTH, "JobSet"),
    (4, "IndexedJob", BOTH, "IndexedJob"),
])
def test_engine_follows_what_the_cluster_serves(nodes, engine, served, want):
    assert dist.choose_engine(spec(nodes=nodes, distributed={"engine": engine}), served) == want


@pytest.mark.parametrize("engine,served", [("JobSet", {dist.TRAINJOB_RESOURCE}), ("TrainJob", {dist.JOBSET_RESOURCE}), ("TrainJob", set())])
def test_an_engine_named_but_not_served_is_refused(engine, served):
    with pytest.raises(dist.EngineNotInstalled, match=f"'{engine}'.*does not serve"):
        dist.choose_engine(spec(nodes=2, distributed={"engine": engine}), served)


@pytest.mark.parametrize("started,served", [("IndexedJob", BOTH), ("JobSet", BOTH), ("JobSet", {dist.JOBSET_RESOURCE}), ("TrainJob", BOTH)])
def test_a_started_run_keeps_its_engine_whatever_was_installed_since(started, served):
    assert dist.choose_engine(spec(nodes=2), served, started=started) == started


@pytest.mark.parametrize("engine,started,served,unknown", [
    ("JobSet", None, set(), {dist.JOBSET_RESOURCE}),  # named, and discovery has not answered for it yet
    ("Auto", None, set(), {dist.TRAINJOB_RESOURCE}),  # the first choice unknown: the run would start on the second
    ("Auto", None, {dist.JOBSET_RESOURCE}, {dist.TRAINJOB_RESOURCE}),
    ("Auto", None, set(), {dist.JOBSET_RESOURCE}),  # TrainJob known not served, JobSet unknown: not IndexedJob yet
    ("Auto", "JobSet", set(), {dist.JOBSET_RESOURCE}),  # started on it: not refused as removed before it is known
])
def test_an_engine_the_cluster_may_or_may_not_serve_waits_for_discovery(engine, started, served, unknown):
    with pytest.raises(dist.EngineUnknown, match="not known yet"):
        dist.choose_engine(spec(nodes=2, distributed={"engine": engine}), served, started=started, unknown=unknown)


@pytest.mark.parametrize("engine,served,unknown,want", [
    ("Auto", {dist.TRAINJOB_RESOURCE}, {dist.JOBSET_RESOURCE}, "TrainJob"),  # the first choice is served: the rest does not matter
    ("IndexedJob", set(), dist.OPTIONAL_ENGINE_RESOURCES, "IndexedJob"),
    ("TrainJob", {dist.TRAINJOB_RESOURCE}, {dist.JOBSET_RESOURCE}, "TrainJob"),
])
def test_what_does_not_depend_on_an_unknown_resource_goes_on(engine, served, unknown, want):
    assert dist.choose_engine(spec(nodes=2, distributed={"engine": engine}), served, unknown=unknown) == want
    assert dist.choose_engine(spec(nodes=1, distributed={"engine": engine}), set(), unknown=dist.OPTIONAL_ENGINE_RESOURCES) == "Job"


@pytest.mark.parametrize("started", ["TrainJob", "JobSet"])
def test_a_started_run_whose_engine_was_removed_is_refused_not_moved(started):
    with pytest.raises(dist.EngineNotInstalled, match=f"started on {started}.*no longer serves"):
        dist.choose_engine(spec(nodes=2), set(), started=started)


def test_one_node_is_the_plain_job_unchanged():
    s = spec()
    assert group(s, "Job") == [single_job(s)]


def test_indexed_job_group_is_valid_and_joins_through_c10d():
    import kubernetes_validate

    s = spec(nodes=3, distributed={"env": [{"name": "NCCL_SOCKET_IFNAME", "value": "eth0"}], "rendezvousPort": 29500})
    peers, svc, job = group(s, "IndexedJob")
    for version in KUBE_VERSIONS:
        for obj in (peers, svc, job):
            kubernetes_validate.validate(obj, version, strict=True)
    js = job["spec"]
    assert (js["completionMode"], js["completions"], js["parallelism"]) == ("Indexed", 3, 3)
    pod = js["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"] == job["metadata"]["name"] == "big-train"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    # the Service selects exactly the group's pods
    labels = js["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())
    c = pod["containers"][0]
    cmd = [*c["command"], *c["args"]]
    # the trainer's own launcher (torchrun inside): its parser takes exactly these
    assert cmd == ["perennial-trainer", "train", "--config", tr.CONFIG_FILE, "--nproc-per-node", "8", "--nnodes", "3",
                   "--rdzv-endpoint", "big-train-0.big-train.team.svc:29500", "--rdzv-id", "u-9"]
    assert_trainer_parses(cmd)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["PERENNIAL_NODES"] == "3"
    # every pod: the GPUs, the shared memory, the permanent-error rule that fails the whole Job
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert any(v["name"] == "dshm" and v["emptyDir"]["medium"] == "Memory" for v in pod["volumes"])
    assert js["podFailurePolicy"]["rules"][0]["action"] == "FailJob"
    # one restart of the group fails up to every pod once
    assert js["backoffLimit"] == s.run_policy.backoff_limit * 3 and "backoffLimitPerIndex" not in js
    # the peers may reach each other on any port (rendezvous, NCCL), nothing else is opened
    assert peers["spec"]["ingress"] == [{"from": [{"podSelector": peers["spec"]["podSelector"]}]}]
    assert peers["spec"]["egress"] == [{"to": [{"podSelector": peers["spec"]["podSelector"]}]}]


def _strict(schema: dict) -> dict:
    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


def kubeflow_validator(model):
    """A strict JSON Schema validator of a Kubeflow Trainer API model (unknown fields refused: the API server
    would prune them silently), and the model itself."""
    import jsonschema

    schema = model.model_json_schema(by_alias=True)
    # The generator renders Kubernetes' scalar wrappers as objects (its oneOf classes); Kubernetes' own OpenAPI
    # has Quantity a string (or a number) and IntOrString an integer or a string.
    defs = schema["$defs"]
    for name, scalar in (("IoK8sApimachineryPkgApiResourceQuantity", {"type": ["string", "number"]}),
                         ("IoK8sApimachineryPkgUtilIntstrIntOrString", {"type": ["string", "integer"]})):
        if name in defs:
            defs[name] = scalar
    return jsonschema.Draft202012Validator(_strict(schema))


def _errors(validator, obj) -> list[str]:
    """Every failed leaf (inside anyOf too), with its path."""
    def leaves(e):
        if e.context:
            for c in e.context:
                yield from leaves(c)
        else:
            yield e

    out = []
    for e in validator.iter_errors(obj):
        for leaf in leaves(e):
            if "is not of type 'null'" not in leaf.message:
                out.append(f"{list(leaf.absolute_path)}: {leaf.message[:200]}")
    return sorted(out)


def test_jobset_group_matches_the_jobset_schema_and_restarts_as_a_whole():
    import kubernetes_validate
    from kubeflow_trainer_api.models import JobsetV1alpha2JobSet

    s = spec(nodes=4)
    peers, js = group(s, "JobSet")
    validator = kubeflow_validator(JobsetV1alpha2JobSet)
    assert not _errors(validator, js)
    JobsetV1alpha2JobSet.from_dict(js)
    assert (js["apiVersion"], js["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    # the replicated Job is a valid batch/v1 Job template (Kubernetes' own schema, strict)
    rj = js["spec"]["replicatedJobs"][0]
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x", "namespace": "team"}, "spec": rj["template"]["spec"]}
    kubernetes_validate.validate(job, KUBE_VERSIONS[-1], strict=True)
    # one pod fails -> its Job fails (no retry of its own) -> the JobSet recreates the whole group, maxRestarts times;
    # a permanent trainer error (the Job's podFailurePolicy FailJob) fails the JobSet at once
    assert rj["replicas"] == 1 and rj["template"]["spec"]["backoffLimit"] == 0
    assert rj["template"]["spec"]["completions"] == rj["template"]["spec"]["parallelism"] == 4
    fp = js["spec"]["failurePolicy"]
    assert fp["maxRestarts"] == s.run_policy.backoff_limit
    assert fp["rules"] == [{"name": "PermanentTrainerError", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}]
    assert js["spec"]["network"]["enableDNSHostnames"] is True
    c = rj["template"]["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][c["args"].index("--rdzv-endpoint") + 1] == "big-train-node-0-0.big-train.team.svc:29400"
    assert_trainer_parses([*c["command"], *c["args"]])
    assert js["metadata"]["ownerReferences"][0]["uid"] == "u-9"
    # the strict schema is not a rubber stamp
    bad = copy.deepcopy(js)
    bad["spec"]["failurePolicy"]["maxRestart"] = bad["spec"]["failurePolicy"].pop("maxRestarts")
    assert _errors(validator, bad)
    bad = copy.deepcopy(js)
    bad["spec"]["replicatedJobs"][0]["replicas"] = "1"
    assert _errors(validator, bad)


def test_trainjob_matches_the_trainjob_schema_and_carries_the_pod_settings():
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    s = spec(nodes=2, gpus=4, nodeSelector={"gpu": "h100"}, distributed={"trainingRuntime": "torch-distributed-cuda", "env": [{"name": "NCCL_DEBUG", "value": "WARN"}]})
    peers, tj = group(s, "TrainJob", {"hf": ["HF_TOKEN", "not a name", "AWS_REGION"]})
    validator = kubeflow_validator(TrainerV1alpha1TrainJob)
    assert not _errors(validator, tj)
    TrainerV1alpha1TrainJob.from_dict(tj)
    assert (tj["apiVersion"], tj["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    sp = tj["spec"]
    assert sp["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": "torch-distributed-cuda"}
    t = sp["trainer"]
    assert (t["numNodes"], t["numProcPerNode"]) == (2, 4)
    assert t["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 4
    assert t["command"] == ["perennial-trainer"]
    # pod 0's address and port as the TrainJob's torch runtime gives them (expanded by the kubelet)
    assert t["args"][t["args"].index("--rdzv-endpoint") + 1] == "$(PET_MASTER_ADDR):$(PET_MASTER_PORT)"
    assert_trainer_parses([*t["command"], *t["args"]])
    assert {"name": "NCCL_DEBUG", "value": "WARN"} in t["env"]
    # the credentials Secret the pod took whole (envFrom), key by key: a trainer takes `env` only
    assert [e for e in t["env"] if "valueFrom" in e] == [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": "hf", "key": k}}} for k in ("AWS_REGION", "HF_TOKEN")]
    with pytest.raises(ValueError, match="Secret 'hf'"):
        dist.group(BODY, s, single_job(s), "TrainJob", network_policies=True, secret_keys={})
    pod = sp["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {"gpu": "h100"}
    assert {v["name"] for v in pod["spec"]["volumes"]} >= {"run-config", "dshm", "checkpoints", "tmp"}
    assert pod["spec"]["containers"][0]["name"] == "node" and pod["spec"]["containers"][0]["volumeMounts"]
    assert pod["metadata"]["labels"]["perennial.ai/trainingrun"] == "big"  # its pods wake the run
    bad = copy.deepcopy(tj)
    bad["spec"]["trainer"]["numNode"] = 2
    assert _errors(validator, bad)


# ----------------------------------------------------------------------------- observing


def _cond(t, status="True", reason="", message="", at="2026-01-01T00:10:00Z"):
    return {"type": t, "status": status, "reason": reason, "message": message, "lastTransitionTime": at}


@pytest.mark.parametrize("obj,want", [
    ({"kind": "JobSet", "status": {"restarts": 2, "conditions": [_cond("Completed")]}},
     {"conditions": [_cond("Complete")], "completionTime": "2026-01-01T00:10:00Z", "failed": 2}),
    ({"kind": "JobSet", "status": {"restarts": 3, "conditions": [_cond("Failed", reason="FailedJobs", message="jobset failed")]}},
     {"conditions": [_cond("Failed", reason="FailedJobs", message="jobset failed")], "failed": 3}),
    ({"kind": "JobSet", "status": {"conditions": [_cond("Failed", "False")]}}, {"failed": 0}),
    ({"kind": "TrainJob", "status": {"conditions": [_cond("Complete")], "jobsStatus": [{"name": "node", "failed": 1}]}},
     {"conditions": [_cond("Complete")], "completionTime": "2026-01-01T00:10:00Z", "failed": 1}),
    ({"kind": "TrainJob", "status": {"conditions": [_cond("Failed", reason="DeadlineExceeded")]}},
     {"conditions": [_cond("Failed", reason="DeadlineExceeded")], "failed": 0}),
    ({"kind": "Job", "status": {"active": 2}}, {"active": 2}),
])
def test_group_status_reads_as_a_jobs(obj, want):
    assert dist.job_like_status(obj) == want


def _pod(name, index, phase, message="", created="2026-01-01T00:00:00Z"):
    st = {"phase": phase}
    if phase in ("Succeeded", "Failed"):
        st["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {"exitCode": 0 if phase == "Succeeded" else 1, "message": message}}}]
    return {"metadata": {"name": name, "creationTimestamp": created, "labels": {dist.COMPLETION_INDEX: str(index)}}, "status": st}


def test_representative_pod():
    ok0 = _pod("g-0", 0, "Succeeded", '{"status": "Succeeded"}')
    ok1 = _pod("g-1", 1, "Succeeded")
    dead1 = _pod("g-1-old", 1, "Failed", '{"status": "Failed", "reason": "DatasetNotFound"}')
    dead0 = _pod("g-0-old", 0, "Failed", "")
    run0 = _pod("g-0-new", 0, "Running", created="2026-01-01T00:05:00Z")
    run1 = _pod("g-1-new", 1, "Running", created="2026-01-01T00:05:00Z")
    # a failed group speaks through the worker that left the trainer's word
    assert dist.representative_pod([run0, dead0, dead1], "Failed")["metadata"]["name"] == "g-1-old"
    # a complete group: the pod with the result, even when earlier attempts failed
    assert dist.representative_pod([dead1, ok1, ok0], "Complete")["metadata"]["name"] == "g-0"
    # running: pod 0 (rank 0's progress), the live one, not the failed earlier attempt
    assert dist.representative_pod([dead0, run1, run0])["metadata"]["name"] == "g-0-new"
    assert dist.representative_pod([]) is None


@pytest.mark.parametrize("obj,want", [
    ({"kind": "Job", "spec": {}}, "Job"),
    ({"kind": "Job", "spec": {"completionMode": "Indexed", "completions": 2}}, "IndexedJob"),
    ({"kind": "JobSet"}, "JobSet"), ({"kind": "TrainJob"}, "TrainJob"), (None, None),
])
def test_engine_of(obj, want):
    assert dist.engine_of(obj) == want
