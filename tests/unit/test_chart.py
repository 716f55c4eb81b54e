"""The Helm chart (charts/perennial): lint, render, validate every object, RBAC shape, values -> operator settings.

Offline: Helm's own Go SDK through `helm-python-sdk` (lint --strict, values.schema.json, rendering) and every
rendered object through `kubernetes-validate --strict` (unknown fields are errors) for the oldest Kubernetes the
chart supports, 1.30 (the serving pods' `lifecycle.preStop.sleep` is on by default since 1.30, and the CRDs' CEL
rules name a `fieldPath`, a field since 1.28; the chart's kubeVersion says >=1.30), and the newest the validator
bundles, 1.37. The operator-built workloads are validated on the same versions (KUBE_VERSIONS, used by their tests).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

from perennial import crdgen

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "perennial"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
NAMESPACE = "perennial-system"
#: the oldest Kubernetes the chart supports and the newest the validator bundles schemas of
KUBE_VERSIONS = ("1.30.0", "1.37.0")  # oldest supported (Chart.yaml kubeVersion), newest bundled
#: kinds no bundled schema covers (their CRDs are someone else's): checked by shape below instead
FOREIGN_KINDS = {"ServiceMonitor"}


def render(values: dict[str, Any] | None = None, name: str = "perennial") -> list[dict[str, Any]]:
    out = helm_python.Chart.load(str(CHART)).render(values or {}, name=name, namespace=NAMESPACE)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def values_of(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def test_ci_values_cover_the_modes_a_platform_team_needs():
    names = {p.name for p in CI_VALUES}
    assert {"all-namespaces-values.yaml", "one-namespace-values.yaml", "namespace-list-values.yaml", "keda-values.yaml",
            "servicemonitor-values.yaml", "member-region-values.yaml", "argocd-values.yaml"} <= names


@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=lambda p: p.name if p else "default")
def test_helm_lint_strict_is_clean(values_file):
    report = helm_python.lint(str(CHART), values_of(values_file) if values_file else None, strict=True, namespace=NAMESPACE)
    assert report["errors"] == [] and report["messages"] == [], report


def test_values_schema_refuses_what_the_operator_cannot_take():
    for bad in ({"mode": "hub"}, {"watch": {"namespaces": ["Not_A_Namespace"]}}, {"operator": {"logFormat": "xml"}},
                {"storage": {"artifactUri": "ftp://x/y"}}, {"jobs": {"trainerScratchSize": "lots"}}, {"unknownTopLevel": 1},
                {"image": {"digest": "sha256:short"}}, {"operator": {"workers": 0}},
                {"images": {"trainer": "t", "server": "s", "pullSecrets": ["registry"]}},
                {"images": {"trainer": "t", "server": "s", "pullSecrets": [{"name": "Not/A/Secret"}]}},
                {"argocd": {"resourceCustomizations": {"enabled": True, "namespace": "Argo_CD"}}},
                {"argocd": {"resourceCustomizations": {"enabled": "yes"}}}):
        report = helm_python.lint(str(CHART), bad, strict=True)
        assert report["errors"], bad


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=lambda p: p.name if p else "default")
def test_every_rendered_object_validates_strictly(values_file, version):
    docs = render(values_of(values_file) if values_file else None)
    assert docs
    for doc in docs:
        if doc["kind"] in FOREIGN_KINDS:
            continue
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError on any problem


def test_the_validated_versions_are_the_charts_oldest_and_the_newest_the_validator_bundles():
    versions = sorted(kv_utils.all_versions(), key=lambda v: tuple(int(x) for x in v.split(".")))
    assert versions[-1] == KUBE_VERSIONS[-1]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={KUBE_VERSIONS[0]}-0"
    # and why not older: 1.27 does not know a CEL rule's fieldPath
    crd = next(c for c in by_kind(render(), "CustomResourceDefinition") if c["metadata"]["name"] == "basemodels.perennial.ai")
    with pytest.raises(kubernetes_validate.ValidationError, match="fieldPath"):
        kubernetes_validate.validate(crd, "1.27.0", strict=True)


def test_a_broken_object_fails_validation():
    """The validation above can fail: an unknown field in the Deployment is refused."""
    dep = by_kind(render(), "Deployment")[0]
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, KUBE_VERSIONS[0], strict=True)


def test_service_monitor_shape():
    sm = by_kind(render(values_of(CHART / "ci" / "servicemonitor-values.yaml")), "ServiceMonitor")
    assert len(sm) == 1
    sm = sm[0]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    svc = by_kind(render(), "Service")[0]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert "metrics" in {p["name"] for p in svc["spec"]["ports"]}


# ---------------------------------------------------------------------------------------------------- the operator

def operator(docs: list[dict]) -> dict:
    (dep,) = by_kind(docs, "Deployment")
    return dep


def test_operator_deployment_one_replica_recreate_probes_restricted():
    dep = operator(render())
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["perennial"] and c["args"][:2] == ["run", "--standalone"]
    assert "--log-format=json" in c["args"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 8080, "health": 8081}
    assert "--metrics-port=8080" in c["args"] and "--health-port=8081" in c["args"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert pod["serviceAccountName"] == "perennial"


def test_namespaces_priority_class_and_pull_secrets_reach_the_pod():
    dep = operator(render(values_of(CHART / "ci" / "namespace-list-values.yaml")))
    pod = dep["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace=")] == ["--namespace=team-a", "--namespace=team-b"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    one = operator(render(values_of(CHART / "ci" / "one-namespace-values.yaml")))["spec"]["template"]["spec"]
    assert one["imagePullSecrets"] == [{"name": "registry"}]
    assert one["containers"][0]["image"].endswith("@sha256:" + "0123456789abcdef" * 4)
    assert {"name": "claim-perennial-feedback", "mountPath": "/mnt/pvc/perennial-feedback"} in one["containers"][0]["volumeMounts"]


def _config_env_vars() -> set[str]:
    return set(re.findall(r'"(PERENNIAL_[A-Z0-9_]+)"', (ROOT / "operator" / "perennial" / "config.py").read_text()))


def test_every_operator_setting_is_a_chart_value_and_every_env_var_the_chart_sets_is_read():
    """values -> the operator's real settings: each PERENNIAL_* variable config.py reads can be set from values
    (the full example sets every optional one), and the chart sets no variable the operator does not read."""
    full = {**values_of(CHART / "ci" / "one-namespace-values.yaml"),
            "jobs": {"trainerScratchSize": "1Gi", "trainerCheckpointSize": "1Gi", "sharedMemorySize": "1Gi",
                     "validationScratchSize": "1Gi", "downloadScratchSize": "1Gi", "trainingDeadlineSeconds": 1,
                     "validationDeadlineSeconds": 1, "downloadDeadlineSeconds": 1}}
    env = {e["name"]: e for e in operator(render(full))["spec"]["template"]["spec"]["containers"][0]["env"]}
    read = _config_env_vars()
    assert read, "config.py reads no PERENNIAL_* variable?"
    assert read <= set(env), f"settings the chart cannot set: {sorted(read - set(env))}"
    assert {n for n in env if n.startswith("PERENNIAL_")} <= read
    assert env["PERENNIAL_S3_ENDPOINT"]["value"] == "https://minio.example.com"
    assert env["PERENNIAL_EGRESS_CIDRS"]["value"] == "10.20.0.0/16"
    assert env["PERENNIAL_ARTIFACT_URI"]["value"] == "s3://models/adapters"
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_the_operator_reads_the_values_it_is_given(monkeypatch):
    """The env the chart renders, put in the environment, is what OperatorConfig holds."""
    from perennial.config import OperatorConfig

    env = operator(render(values_of(CHART / "ci" / "one-namespace-values.yaml")))["spec"]["template"]["spec"]["containers"][0]["env"]
    for e in env:
        if "value" in e:
            monkeypatch.setenv(e["name"], e["value"])
    cfg = OperatorConfig()
    assert cfg.artifact_uri == "s3://models/adapters" and cfg.s3_endpoint == "https://minio.example.com"
    assert cfg.trainer_image.startswith("registry.example.com/perennial-trainer@sha256:")
    assert cfg.trainer_scratch_size == "40Gi" and cfg.training_deadline_seconds == 86400
    assert cfg.egress_cidrs == ("10.20.0.0/16",) and cfg.dns_cidrs == ("169.254.20.10/32",)
    assert cfg.network_policies is True and cfg.workers == 16
    # the workload pods' pull secrets (images.pullSecrets), apart from the operator pod's own (imagePullSecrets)
    assert cfg.image_pull_secrets == ("registry", "mirror.example.com")
    assert cfg.pod_settings().image_pull_secrets == cfg.serving_settings().image_pull_secrets == cfg.image_pull_secrets
    default_env = {e["name"] for e in operator(render())["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "PERENNIAL_IMAGE_PULL_SECRETS" not in default_env


# ---------------------------------------------------------------------------------------------------- Argo CD

def test_argocd_option_emits_perennials_argocd_cm_keys_for_a_server_side_merge():
    """argocd.resourceCustomizations: the keys of argocd/argocd-cm.yaml (generated from argocd/, drift-checked) in a
    ConfigMap Argo CD server-side applies into its existing argocd-cm: never pruned, deleted or uninstalled, and
    labelled only as Argo CD labels argocd-cm (a label of ours would take app.kubernetes.io/part-of from Argo CD's)."""
    def argocd_cms(docs):
        return [d for d in by_kind(docs, "ConfigMap") if any(k.startswith("resource.customizations.") for k in d.get("data") or {})]

    assert argocd_cms(render()) == []
    (cm,) = argocd_cms(render(values_of(CHART / "ci" / "argocd-values.yaml")))
    assert (cm["metadata"]["name"], cm["metadata"]["namespace"]) == ("argocd-cm", "gitops")
    assert cm["data"] == yaml.safe_load((ROOT / "argocd" / "argocd-cm.yaml").read_text())["data"]
    assert len([k for k in cm["data"] if k.startswith("resource.customizations.health.perennial.ai_")]) == 5
    assert cm["metadata"]["labels"] == {"app.kubernetes.io/name": "argocd-cm", "app.kubernetes.io/part-of": "argocd"}
    assert cm["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep",
                                             "argocd.argoproj.io/sync-options": "ServerSideApply=true,Prune=false,Delete=false"}
    (named,) = argocd_cms(render({"argocd": {"resourceCustomizations": {"enabled": True, "configMapName": "argocd-cm-perennial",
                                                                        "namespace": "argocd"}}}))
    assert (named["metadata"]["name"], named["metadata"]["namespace"]) == ("argocd-cm-perennial", "argocd")


# ---------------------------------------------------------------------------------------------------- CRDs

def test_crd_templates_render_the_generated_crds_kept_on_uninstall():
    crds = {d["metadata"]["name"]: d for d in by_kind(render(), "CustomResourceDefinition")}
    want = {c["metadata"]["name"]: c for c in crdgen.all_crds()}
    assert set(crds) == set(want)
    for name, crd in crds.items():
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd["spec"] == want[name]["spec"], name  # template escaping kept every `{{` of the schemas' text
    no_keep = by_kind(render({"crds": {"enabled": True, "keep": False}}), "CustomResourceDefinition")
    assert no_keep and all("helm.sh/resource-policy" not in c["metadata"]["annotations"] for c in no_keep)
    assert by_kind(render({"crds": {"enabled": False, "keep": True}}), "CustomResourceDefinition") == []
    assert not (CHART / "crds").exists(), "a CRD both in crds/ and in templates/ makes `helm install` fail"


def test_crd_template_drift_is_caught(tmp_path):
    crdgen.write(tmp_path)
    assert crdgen.check(tmp_path) == []
    target = crdgen.chart_crd_dir(tmp_path) / "adapters.perennial.ai.yaml"
    target.write_text(target.read_text().replace("helm.sh/resource-policy: keep", "helm.sh/resource-policy: delete"))
    assert any("adapters.perennial.ai.yaml" in p for p in crdgen.check(tmp_path))


# ---------------------------------------------------------------------------------------------------- RBAC

def rbac_objects(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["apiVersion"].startswith("rbac.authorization.k8s.io/")]


def rules(docs: list[dict]) -> list[tuple[dict, dict]]:
    return [(d, r) for d in docs if d["kind"] in ("Role", "ClusterRole") for r in d.get("rules") or []]


@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=lambda p: p.name if p else "default")
def test_no_wildcard_in_any_rule(values_file):
    docs = render(values_of(values_file) if values_file else None)
    assert rules(docs)
    for role, rule in rules(docs):
        for key in ("verbs", "apiGroups", "resources", "resourceNames", "nonResourceURLs"):
            assert not any("*" in x for x in rule.get(key) or []), (role["metadata"]["name"], rule)
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


def cluster_wide_grants(docs: list[dict]) -> list[dict]:
    """Rules granted in every namespace: those of ClusterRoles bound by a ClusterRoleBinding."""
    bound = {b["roleRef"]["name"] for b in by_kind(docs, "ClusterRoleBinding")}
    return [r for role, r in rules(docs) if role["kind"] == "ClusterRole" and role["metadata"]["name"] in bound]


def reads_secrets(rule: dict) -> bool:
    return "" in rule["apiGroups"] and "secrets" in rule["resources"] and bool({"list", "watch", "get"} & set(rule["verbs"]))


def test_secrets_are_read_cluster_wide_only_when_the_option_asks():
    assert any(reads_secrets(r) for r in cluster_wide_grants(render({"rbac": {"create": True, "clusterWideSecrets": True}})))
    for f in ("namespace-list-values.yaml", "one-namespace-values.yaml", "member-region-values.yaml"):
        docs = render(values_of(CHART / "ci" / f))
        assert not any(reads_secrets(r) for r in cluster_wide_grants(docs)), f
        namespaces = values_of(CHART / "ci" / f)["watch"]["namespaces"]
        assert sorted(b["metadata"]["namespace"] for b in by_kind(docs, "RoleBinding")) == sorted(namespaces)
    with pytest.raises(helm_python.HelmError, match="rbac.clusterWideSecrets"):
        render({"rbac": {"create": True, "clusterWideSecrets": False}})


def test_namespaces_are_listed_cluster_wide_only_when_watching_a_list():
    """kopf watching a list of namespaces lists and watches Namespaces (it follows them appearing)."""
    def ns_rules(docs):
        return [r for r in cluster_wide_grants(docs) if "namespaces" in r["resources"]]
    assert ns_rules(render()) == []
    assert ns_rules(render(values_of(CHART / "ci" / "namespace-list-values.yaml"))) == [
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}]


def granted(docs: list[dict]) -> set[tuple[str, str, str]]:
    return {(g, res, v) for _, r in rules(docs) for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]}


def test_every_kind_the_operator_watches_is_listed_and_watched_and_multi_node_engines_are_created():
    """The manager's watches (optional ones too: where their CRD is served, a forbidden listing holds the caches back),
    the engines of multi-node TrainingRuns (JobSet, TrainJob): created like a Job, read after a 409, never changed;
    and LeaderWorkerSets (serving across nodes) handled like apps/v1 Deployments."""
    from perennial.controllers.manager import BUILTIN_WATCHES, OUR_KINDS

    have = granted(render())
    for w in BUILTIN_WATCHES:
        assert {(w.group, w.plural, "list"), (w.group, w.plural, "watch")} <= have, w
    for plural, _ in OUR_KINDS:
        assert {("perennial.ai", plural, "list"), ("perennial.ai", plural, "watch")} <= have
    for group, plural in (("jobset.x-k8s.io", "jobsets"), ("trainer.kubeflow.org", "trainjobs")):
        assert {v for g, r, v in have if (g, r) == (group, plural)} == {"get", "list", "watch", "create"}
    # serving colors across nodes: LeaderWorkerSets, applied and pruned like the colors' apps/v1 Deployments
    assert {v for g, r, v in have if (g, r) == ("leaderworkerset.x-k8s.io", "leaderworkersets")} == {
        v for g, r, v in have if (g, r) == ("apps", "deployments")}


def test_owners_finalizers_can_be_updated_for_block_owner_deletion():
    """Every child's ownerReference has blockOwnerDeletion true (resources/common.py); under the
    OwnerReferencesPermissionEnforcement admission plugin (OpenShift) that needs `update` on the owner's
    `<kind>/finalizers`: the four kinds that own children (Adapters own nothing), and nothing more."""
    from perennial.resources.common import owner_reference

    assert owner_reference({"apiVersion": "v", "kind": "K", "metadata": {"name": "n", "uid": "u"}})["blockOwnerDeletion"] is True
    finalizers = {(g, r, v) for g, r, v in granted(render()) if r.endswith("/finalizers")}
    assert finalizers == {("perennial.ai", f"{k}/finalizers", "update") for k in ("basemodels", "rewardspecs", "trainingruns", "deployments")}


def test_member_region_mode_has_rbac_and_no_operator():
    docs = render(values_of(CHART / "ci" / "member-region-values.yaml"))
    kinds = {d["kind"] for d in docs}
    assert kinds == {"ServiceAccount", "ClusterRole", "RoleBinding"}, kinds
    granted = {(g, res, v) for _, r in rules(docs) for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]}
    assert {("", "services/proxy", "create"), ("", "pods/proxy", "get"), ("apps", "deployments", "create")} <= granted
    assert not any(g == "perennial.ai" for g, _, _ in granted)


def test_keda_objects_are_read_always_and_written_only_with_keda():
    """A forbidden listing of ScaledObjects (403 comes before the 404 of a kind not served) would hold the caches
    back where KEDA is installed, or in a member cluster whatever is installed: reading is always granted."""
    def keda(docs):
        return {v for _, r in rules(docs) if "keda.sh" in r["apiGroups"] for v in r["verbs"]}
    for values in ({}, values_of(CHART / "ci" / "member-region-values.yaml")):
        assert keda(render(values)) == {"list", "watch"}
        assert keda(render({**values, "keda": {"enabled": True}})) == {"list", "watch", "get", "create", "patch", "delete"}


def test_checks_helm_test_and_argocd_post_sync():
    jobs = by_kind(render(values_of(CHART / "ci" / "namespace-list-values.yaml")), "Job")
    hooks = {j["metadata"]["name"]: j["metadata"]["annotations"] for j in jobs}
    assert hooks["perennial-test"]["helm.sh/hook"] == "test"
    assert hooks["perennial-postsync-check"]["argocd.argoproj.io/hook"] == "PostSync"
    for j in jobs:
        pod = j["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False  # the check needs no API access
        assert "perennial-metrics.perennial-system.svc:8081/healthz" in pod["containers"][0]["command"][-1]
    assert [j["metadata"]["name"] for j in by_kind(render(), "Job")] == ["perennial-test"]


def test_network_policy_admits_the_checks_and_the_selected_namespaces_on_the_two_ports():
    policies = {p["metadata"]["name"]: p for p in by_kind(render(values_of(CHART / "ci" / "namespace-list-values.yaml")), "NetworkPolicy")}
    assert set(policies) == {"perennial", "perennial-checks"}
    assert "ingress" not in policies["perennial-checks"]["spec"]  # the check pods take no connections
    np = policies["perennial"]
    (rule,) = np["spec"]["ingress"]
    assert {p["port"] for p in rule["ports"]} == {"metrics", "health"}
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in rule["from"]
    assert np["spec"]["policyTypes"] == ["Ingress"]


# ---------------------------------------------------------------------------------------------------- checkov

#: check id -> (values files where it is accepted, why). One line each; a finding that no longer occurs fails too.
CHECKOV_ACCEPTED: dict[str, tuple[frozenset[str], str]] = {
    # the operator must talk to the API server: its token is mounted (the check pods get none)
    "CKV_K8S_38": (frozenset({"default", "all-namespaces", "argocd", "keda", "namespace-list", "one-namespace", "servicemonitor"}),
                   "the operator's pod needs its service-account token; nothing else mounts one"),
    # the defaults name a release tag; `image.digest` pins (ci/one-namespace-values.yaml shows both findings gone)
    "CKV_K8S_43": (frozenset({"default", "all-namespaces", "argocd", "keda", "namespace-list", "servicemonitor"}),
                   "a tag by default; image.digest pins the image (one-namespace-values.yaml)"),
    "CKV_K8S_15": (frozenset({"default", "all-namespaces", "argocd", "keda", "namespace-list", "servicemonitor"}),
                   "IfNotPresent with an immutable release tag; pullPolicy Always is a value (one-namespace-values.yaml)"),
    # NetworkPolicies are opt-in (networkPolicy.enabled: a cluster without a CNI that enforces them gains nothing);
    # with them on (namespace-list-values.yaml) every pod of the chart is selected by one
    "CKV2_K8S_6": (frozenset({"default", "all-namespaces", "argocd", "keda", "one-namespace", "servicemonitor"}),
                   "NetworkPolicies are opt-in; namespace-list-values.yaml turns them on and the finding is gone"),
}


def test_checkov_on_the_rendered_chart_finds_nothing_but_the_accepted(tmp_path):
    import json
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_manifest_scan import checkov_binary

    binary = checkov_binary()
    for f in [None, *CI_VALUES]:
        stem = f.name.removesuffix("-values.yaml") if f else "default"
        # a release name per values file: graph checks (CKV2_K8S_6) must not match one release's pods with another's policies
        for i, doc in enumerate(render(values_of(f) if f else None, name=stem)):
            if doc["kind"] != "CustomResourceDefinition":  # schemas, not workloads; checkov has no checks for them
                (tmp_path / f"{stem}--{i:02d}-{doc['kind']}.yaml").write_text(yaml.safe_dump(doc))
    proc = subprocess.run([binary, "--directory", str(tmp_path), "--framework", "kubernetes", "--output", "json", "--compact",
                           "--skip-download"], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip(), f"checkov printed nothing (rc {proc.returncode}): {proc.stderr[-2000:]}"
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    failed: dict[str, set[str]] = {}
    passed = 0
    for r in reports:
        results = r.get("results") or {}
        passed += len(results.get("passed_checks") or [])
        for check in results.get("failed_checks") or []:
            failed.setdefault(check["check_id"], set()).add(Path(check["file_path"]).name.split("--")[0])
    assert passed > 100, f"checkov ran too few checks ({passed}): {proc.stderr[-2000:]}"
    unexpected = {c: sorted(v) for c, v in failed.items() if c not in CHECKOV_ACCEPTED or not v <= CHECKOV_ACCEPTED[c][0]}
    assert not unexpected, f"checkov findings neither fixed nor accepted: {unexpected}"
    stale = {c: sorted(w - failed.get(c, set())) for c, (w, _) in CHECKOV_ACCEPTED.items() if w - failed.get(c, set())}
    assert not stale, f"accepted findings that no longer occur (remove them): {stale}"
