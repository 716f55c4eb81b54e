"""Defaulting of built-in kinds (local/defaults.py), as kube-apiserver 1.32 defaults them."""

from __future__ import annotations

import copy
import itertools

import pytest

from perennial.local import defaults
from perennial.local.store import hpa_v1_to_v2, hpa_v2_to_v1


def _get(obj, path: str):
    cur = obj
    for part in path.split("."):
        cur = cur[int(part)] if isinstance(cur, list) else cur[part]
    return cur


def _pod_spec(**extra) -> dict:
    return {"containers": [{"name": "c", "image": "busybox:1.36"}], **extra}


def _deployment(**spec) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
            "spec": {"selector": {"matchLabels": {"a": "b"}},
                     "template": {"metadata": {"labels": {"a": "b"}}, "spec": _pod_spec()}, **spec}}


CASES = [
    # (group, plural, manifest, {dotted path: expected default})
    ("apps", "deployments", _deployment(), {
        "spec.replicas": 1, "spec.revisionHistoryLimit": 10, "spec.progressDeadlineSeconds": 600,
        "spec.strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}},
        "spec.template.spec.restartPolicy": "Always", "spec.template.spec.terminationGracePeriodSeconds": 30,
        "spec.template.spec.dnsPolicy": "ClusterFirst", "spec.template.spec.schedulerName": "default-scheduler",
        "spec.template.spec.securityContext": {},
        "spec.template.spec.containers.0.terminationMessagePath": "/dev/termination-log",
        "spec.template.spec.containers.0.terminationMessagePolicy": "File",
        "spec.template.spec.containers.0.imagePullPolicy": "IfNotPresent",
    }),
    ("apps", "deployments", _deployment(strategy={"type": "Recreate"}), {"spec.strategy": {"type": "Recreate"}}),
    ("", "pods", {"metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "a", "image": "busybox"}, {"name": "b", "image": "busybox:latest"},
        {"name": "c", "image": "reg:5000/img"}, {"name": "d", "image": "img@sha256:abc"},
        {"name": "e", "image": "img:1", "imagePullPolicy": "Never",
         "resources": {"limits": {"cpu": "1"}, "requests": {"memory": "1Gi"}},
         "ports": [{"containerPort": 80}], "env": [{"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}],
         "livenessProbe": {"httpGet": {"port": 80}}, "readinessProbe": {"exec": {"command": ["true"]},
                                                                        "periodSeconds": 5}}]}}, {
        "spec.enableServiceLinks": True, "spec.restartPolicy": "Always",
        "spec.containers.0.imagePullPolicy": "Always", "spec.containers.1.imagePullPolicy": "Always",
        "spec.containers.2.imagePullPolicy": "Always", "spec.containers.3.imagePullPolicy": "IfNotPresent",
        "spec.containers.4.imagePullPolicy": "Never",
        "spec.containers.4.resources.requests": {"memory": "1Gi", "cpu": "1"},
        "spec.containers.4.ports.0.protocol": "TCP",
        "spec.containers.4.env.0.valueFrom.fieldRef.apiVersion": "v1",
        "spec.containers.4.livenessProbe": {"httpGet": {"port": 80, "path": "/", "scheme": "HTTP"},
                                            "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1,
                                            "failureThreshold": 3},
        "spec.containers.4.readinessProbe.periodSeconds": 5,
    }),
    ("", "pods", {"metadata": {"name": "p"}, "spec": _pod_spec(volumes=[
        {"name": "s", "secret": {"secretName": "s"}}, {"name": "m", "configMap": {"name": "m", "defaultMode": 256}},
        {"name": "d", "downwardAPI": {"items": [{"path": "n", "fieldRef": {"fieldPath": "metadata.name"}}]}},
        {"name": "p", "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]}},
        {"name": "e"}, {"name": "c", "persistentVolumeClaim": {"claimName": "c"}}])}, {
        "spec.volumes.0.secret.defaultMode": 420, "spec.volumes.1.configMap.defaultMode": 256,
        "spec.volumes.2.downwardAPI": {"defaultMode": 420, "items": [
            {"path": "n", "fieldRef": {"fieldPath": "metadata.name", "apiVersion": "v1"}}]},
        "spec.volumes.3.projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"path": "t", "expirationSeconds": 3600}}]},
        "spec.volumes.4": {"name": "e", "emptyDir": {}},
        "spec.volumes.5": {"name": "c", "persistentVolumeClaim": {"claimName": "c"}},
    }),
    ("batch", "jobs", {"metadata": {"name": "j", "uid": "u-1"},
                       "spec": {"template": {"spec": _pod_spec(restartPolicy="Never")}}}, {
        "spec.completions": 1, "spec.parallelism": 1, "spec.backoffLimit": 6, "spec.completionMode": "NonIndexed",
        "spec.suspend": False, "spec.podReplacementPolicy": "TerminatingOrFailed",
        "spec.selector": {"matchLabels": {"batch.kubernetes.io/controller-uid": "u-1"}},
        "spec.template.metadata.labels": {"job-name": "j", "batch.kubernetes.io/job-name": "j",
                                          "controller-uid": "u-1", "batch.kubernetes.io/controller-uid": "u-1"},
        "metadata.labels": {"job-name": "j", "batch.kubernetes.io/job-name": "j",
                            "controller-uid": "u-1", "batch.kubernetes.io/controller-uid": "u-1"},
        "spec.template.spec.restartPolicy": "Never",
    }),
    ("batch", "jobs", {"metadata": {"name": "j", "uid": "u-1", "labels": {"mine": "yes"}},
                       "spec": {"parallelism": 3, "backoffLimitPerIndex": 1, "completionMode": "Indexed",
                                "completions": 3,
                                "podFailurePolicy": {"rules": [{"action": "Ignore",
                                                                "onPodConditions": [{"type": "DisruptionTarget"}]}]},
                                "template": {"metadata": {"labels": {"app": "x"}}, "spec": _pod_spec()}}}, {
        "spec.parallelism": 3, "spec.backoffLimit": 2147483647, "spec.podReplacementPolicy": "Failed",
        "spec.podFailurePolicy.rules.0.onPodConditions.0.status": "True", "metadata.labels": {"mine": "yes"},
        "spec.template.metadata.labels.app": "x",
    }),
    ("batch", "jobs", {"metadata": {"name": "j", "uid": "u-1"},
                       "spec": {"manualSelector": True, "selector": {"matchLabels": {"app": "x"}},
                                "template": {"metadata": {"labels": {"app": "x"}}, "spec": _pod_spec()}}}, {
        "spec.selector": {"matchLabels": {"app": "x"}}, "spec.template.metadata.labels": {"app": "x"},
        "metadata.labels": {"app": "x"},
    }),
    ("", "services", {"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}, {"port": 81, "targetPort": "http",
                                                                                   "protocol": "UDP"}]}}, {
        "spec.type": "ClusterIP", "spec.sessionAffinity": "None", "spec.internalTrafficPolicy": "Cluster",
        "spec.ports": [{"port": 80, "protocol": "TCP", "targetPort": 80},
                       {"port": 81, "targetPort": "http", "protocol": "UDP"}],
        "spec.clusterIP": "10.96.0.1", "spec.clusterIPs": ["10.96.0.1"], "spec.ipFamilies": ["IPv4"],
        "spec.ipFamilyPolicy": "SingleStack",
    }),
    ("", "services", {"metadata": {"name": "s"}, "spec": {"clusterIP": "None", "sessionAffinity": "ClientIP"}}, {
        "spec.clusterIP": "None", "spec.clusterIPs": ["None"],
        "spec.sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10800}},
    }),
    ("", "services", {"metadata": {"name": "s"}, "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}}, {
        "spec.externalTrafficPolicy": "Cluster", "spec.allocateLoadBalancerNodePorts": True,
        "spec.ports.0.nodePort": 30000,
    }),
    ("autoscaling", "horizontalpodautoscalers", {"metadata": {"name": "h"}, "spec": {"maxReplicas": 3}}, {
        "spec.minReplicas": 1,
        "spec.metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization", "averageUtilization": 80}}}],
    }),
    ("autoscaling", "horizontalpodautoscalers", {"metadata": {"name": "h"}, "spec": {
        "maxReplicas": 3, "behavior": {"scaleDown": {"stabilizationWindowSeconds": 60}}}}, {
        "spec.behavior": {
            "scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
                        "policies": [{"type": "Pods", "value": 4, "periodSeconds": 15},
                                     {"type": "Percent", "value": 100, "periodSeconds": 15}]},
            "scaleDown": {"stabilizationWindowSeconds": 60, "selectPolicy": "Max",
                          "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]}},
    }),
    ("", "persistentvolumeclaims", {"metadata": {"name": "c"}, "spec": {"accessModes": ["ReadWriteOnce"]}}, {
        "spec.volumeMode": "Filesystem", "status.phase": "Pending",
    }),
]


@pytest.mark.parametrize("group,plural,manifest,expected", CASES,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_defaults(group, plural, manifest, expected):
    ips = (f"10.96.0.{n}" for n in itertools.count(1))
    ports = itertools.count(30000)
    out = defaults.apply(group, plural, copy.deepcopy(manifest), allocate_ip=lambda: next(ips),
                         allocate_node_port=lambda: next(ports))
    for path, value in expected.items():
        assert _get(out, path) == value, path


def _leaves(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, prefix + (i,))
    else:
        yield prefix, obj


@pytest.mark.parametrize("group,plural,manifest,expected", CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_defaults_only_add_fields(group, plural, manifest, expected):
    """Every value the client sent is still there, unchanged: defaulting only fills gaps."""
    out = defaults.apply(group, plural, copy.deepcopy(manifest), allocate_ip=lambda: "10.96.0.9",
                         allocate_node_port=lambda: 30001)
    for path, value in _leaves(manifest):
        if isinstance(value, (dict, list)) and not value:
            continue
        assert _get(out, ".".join(map(str, path))) == value, path
    assert defaults.apply(group, plural, copy.deepcopy(out), allocate_ip=lambda: "other",
                          allocate_node_port=lambda: 1) == out  # idempotent


def test_service_update_keeps_the_allocated_addresses():
    old = defaults.service({"metadata": {"name": "s"}, "spec": {"type": "NodePort", "ports": [{"port": 80}]}},
                           allocate_ip=lambda: "10.96.0.7", allocate_node_port=lambda: 30007)
    new = defaults.service({"metadata": {"name": "s"}, "spec": {"type": "NodePort", "ports": [{"port": 80}]}}, old,
                           allocate_ip=lambda: "10.96.0.8", allocate_node_port=lambda: 30008)
    assert new["spec"]["clusterIP"] == "10.96.0.7" and new["spec"]["clusterIPs"] == ["10.96.0.7"]
    assert new["spec"]["ports"][0]["nodePort"] == 30007


def test_job_selector_is_generated_only_on_create():
    job = {"metadata": {"name": "j", "uid": "u"}, "spec": {"template": {"spec": _pod_spec()}}}
    assert "selector" not in defaults.job(copy.deepcopy(job), old=job)["spec"]


def test_image_tag():
    assert [defaults.image_tag(i) for i in ("a", "a:1", "r:5000/a", "r:5000/a:2", "a@sha256:x")] == [
        "latest", "1", "latest", "2", ""]


# --------------------------------------------------------------------------- autoscaling/v1 <-> v2

HPA_V2 = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "h"},
          "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "d"},
                   "minReplicas": 1, "maxReplicas": 5,
                   "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                       "type": "Utilization", "averageUtilization": 60}}}]},
          "status": {"currentReplicas": 2, "desiredReplicas": 3, "currentMetrics": [
              {"type": "Resource", "resource": {"name": "cpu", "current": {"averageUtilization": 70}}}]}}


def test_hpa_v2_cpu_target_is_v1_target_cpu_utilization_percentage():
    v1 = hpa_v2_to_v1(HPA_V2)
    assert v1["apiVersion"] == "autoscaling/v1"
    assert v1["spec"] == {"scaleTargetRef": HPA_V2["spec"]["scaleTargetRef"], "minReplicas": 1, "maxReplicas": 5,
                          "targetCPUUtilizationPercentage": 60}
    assert v1["status"] == {"currentReplicas": 2, "desiredReplicas": 3, "currentCPUUtilizationPercentage": 70}
    assert "annotations" not in v1["metadata"]
    assert hpa_v1_to_v2(v1) == HPA_V2


def test_hpa_v1_without_target_has_no_metrics_and_v2_defaulting_adds_cpu_80():
    v2 = hpa_v1_to_v2({"apiVersion": "autoscaling/v1", "metadata": {"name": "h"}, "spec": {"maxReplicas": 2}})
    assert "metrics" not in v2["spec"]
    assert defaults.horizontal_pod_autoscaler(v2)["spec"]["metrics"][0]["resource"]["target"][
        "averageUtilization"] == 80


def test_hpa_what_v1_cannot_say_round_trips_through_annotations():
    v2 = copy.deepcopy(HPA_V2)
    v2["spec"]["metrics"].insert(0, {"type": "Pods", "pods": {"metric": {"name": "queue"},
                                                              "target": {"type": "AverageValue", "averageValue": "5"}}})
    v2["spec"]["behavior"] = {"scaleDown": {"stabilizationWindowSeconds": 30}}
    v2["status"]["conditions"] = [{"type": "AbleToScale", "status": "True"}]
    v1 = hpa_v2_to_v1(v2)
    assert v1["spec"]["targetCPUUtilizationPercentage"] == 60
    assert set(v1["metadata"]["annotations"]) == {"autoscaling.alpha.kubernetes.io/metrics",
                                                  "autoscaling.alpha.kubernetes.io/behavior",
                                                  "autoscaling.alpha.kubernetes.io/conditions"}
    assert hpa_v1_to_v2(v1) == v2
    v1["spec"]["targetCPUUtilizationPercentage"] = 40  # a v1 client changes the CPU target only
    back = hpa_v1_to_v2(v1)
    assert back["spec"]["metrics"][0]["type"] == "Pods"
    assert back["spec"]["metrics"][1]["resource"]["target"]["averageUtilization"] == 40
    del v1["spec"]["targetCPUUtilizationPercentage"]  # ... or drops it
    assert [m["type"] for m in hpa_v1_to_v2(v1)["spec"]["metrics"]] == ["Pods"]
