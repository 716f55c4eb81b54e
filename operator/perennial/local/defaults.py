"""Defaulting of built-in kinds, as kube-apiserver 1.32 applies it when it decodes a request body.

The behaviour of Kubernetes' ``pkg/apis/{core,apps,batch,autoscaling}/v1|v2/defaults.go`` plus the
defaults its registry strategies add (a Service's cluster IP and IP families, a Job's generated
selector), written as plain functions over manifest dicts. Every function only fills fields the
client left out: a value the client sent is never changed. They mutate the dict they are given
(the store passes its own deep copy) and return it.
"""

from __future__ import annotations

from typing import Any, Callable

DEFAULT_MODE = 420  # 0644: secret, configMap, downwardAPI and projected volumes

_PROBE = {"timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3}
_POD_SPEC = {"restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
             "schedulerName": "default-scheduler"}
_CONTAINER = {"terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"}
_MODE_VOLUMES = ("secret", "configMap", "downwardAPI", "projected")
# Every volume source of a v1.Volume: a volume naming none of them becomes an emptyDir.
_VOLUME_SOURCES = frozenset((
    "hostPath", "emptyDir", "gcePersistentDisk", "awsElasticBlockStore", "gitRepo", "secret", "nfs", "iscsi",
    "glusterfs", "persistentVolumeClaim", "rbd", "flexVolume", "cinder", "cephfs", "flocker", "downwardAPI", "fc",
    "azureFile", "configMap", "vsphereVolume", "quobyte", "azureDisk", "photonPersistentDisk", "projected",
    "portworxVolume", "scaleIO", "storageos", "csi", "ephemeral", "image"))
_DEPLOYMENT = {"replicas": 1, "revisionHistoryLimit": 10, "progressDeadlineSeconds": 600}
_JOB = {"backoffLimit": 6, "completionMode": "NonIndexed", "suspend": False}
# autoscaling/v2 HPAScalingRules filled in when a behavior is given (scale-down keeps no stabilization
# window: the controller's --horizontal-pod-autoscaler-downscale-stabilization flag decides it).
HPA_SCALE_UP = {"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
                "policies": [{"type": "Pods", "value": 4, "periodSeconds": 15},
                             {"type": "Percent", "value": 100, "periodSeconds": 15}]}
HPA_SCALE_DOWN = {"selectPolicy": "Max", "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]}
HPA_DEFAULT_CPU_UTILIZATION = 80

JOB_NAME_LABELS = ("job-name", "batch.kubernetes.io/job-name")
CONTROLLER_UID_LABELS = ("controller-uid", "batch.kubernetes.io/controller-uid")


def _fill(obj: dict, defaults: dict) -> dict:
    for k, v in defaults.items():
        if k not in obj or obj[k] is None:
            obj[k] = _copy(v)
    return obj


def _copy(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_copy(x) for x in v]
    return v


def _dicts(value: Any) -> list[dict]:
    return [x for x in value if isinstance(x, dict)] if isinstance(value, list) else []


def _sub(obj: dict, key: str) -> dict | None:
    """``obj[key]`` when it is a dict (absent or wrongly typed parts are left to validation)."""
    value = obj.get(key)
    return value if isinstance(value, dict) else None


def image_tag(image: str) -> str:
    """The tag of an image reference (``latest`` when it has neither tag nor digest)."""
    if "@" in image:
        return ""
    last = image.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else "latest"


# --------------------------------------------------------------------------- core/v1


def probe(p: dict) -> dict:
    _fill(p, _PROBE)
    http = _sub(p, "httpGet")
    if http is not None:
        _fill(http, {"path": "/", "scheme": "HTTP"})
    return p


def container(c: dict) -> dict:
    if not c.get("imagePullPolicy") and isinstance(c.get("image"), str):
        c["imagePullPolicy"] = "Always" if image_tag(c["image"]) == "latest" else "IfNotPresent"
    _fill(c, _CONTAINER)
    for port in _dicts(c.get("ports")):
        _fill(port, {"protocol": "TCP"})
    for key in ("livenessProbe", "readinessProbe", "startupProbe"):
        p = _sub(c, key)
        if p is not None:
            probe(p)
    for env in _dicts(c.get("env")):
        field_ref = _sub(_sub(env, "valueFrom") or {}, "fieldRef")
        if field_ref is not None:
            _fill(field_ref, {"apiVersion": "v1"})
    return c


def volume(v: dict) -> dict:
    if not _VOLUME_SOURCES.intersection(v):
        v["emptyDir"] = {}
    for key in _MODE_VOLUMES:
        src = _sub(v, key)
        if src is not None:
            _fill(src, {"defaultMode": DEFAULT_MODE})
    projected = _sub(v, "projected")
    for source in _dicts((projected or {}).get("sources")):
        token = _sub(source, "serviceAccountToken")
        if token is not None:
            _fill(token, {"expirationSeconds": 3600})
    for field in _dicts(((_sub(v, "downwardAPI") or {}).get("items"))):
        ref = _sub(field, "fieldRef")
        if ref is not None:
            _fill(ref, {"apiVersion": "v1"})
    host_path = _sub(v, "hostPath")
    if host_path is not None:
        _fill(host_path, {"type": ""})
    claim = _sub(_sub(_sub(v, "ephemeral") or {}, "volumeClaimTemplate") or {}, "spec")
    if claim is not None:
        _fill(claim, {"volumeMode": "Filesystem"})
    return v


def pod_spec(spec: dict, *, pod: bool = False) -> dict:
    """SetDefaults_PodSpec (and, for a Pod itself, what SetDefaults_Pod adds)."""
    _fill(spec, _POD_SPEC)
    if not isinstance(spec.get("securityContext"), dict):
        spec["securityContext"] = {}
    for key in ("containers", "initContainers", "ephemeralContainers"):
        for c in _dicts(spec.get(key)):
            container(c)
    for v in _dicts(spec.get("volumes")):
        volume(v)
    if pod:
        _fill(spec, {"enableServiceLinks": True})
        for c in _dicts(spec.get("containers")) + _dicts(spec.get("initContainers")):
            resources = _sub(c, "resources")
            limits = _sub(resources or {}, "limits")
            if resources is not None and limits:
                requests = resources.setdefault("requests", {})
                if isinstance(requests, dict):
                    _fill(requests, limits)
        if spec.get("hostNetwork") is True:
            for c in _dicts(spec.get("containers")) + _dicts(spec.get("initContainers")):
                for port in _dicts(c.get("ports")):
                    if not port.get("hostPort") and "containerPort" in port:
                        port["hostPort"] = port["containerPort"]
    return spec


def _template(obj: dict) -> dict | None:
    spec = _sub(obj, "spec")
    template = _sub(spec or {}, "template")
    tspec = _sub(template or {}, "spec")
    if tspec is not None:
        pod_spec(tspec)
    return template


def pod(obj: dict) -> dict:
    spec = _sub(obj, "spec")
    if spec is not None:
        pod_spec(spec, pod=True)
    return obj


def service(obj: dict, old: dict | None = None, allocate_ip: Callable[[], str] | None = None,
            allocate_node_port: Callable[[], int] | None = None) -> dict:
    """SetDefaults_Service plus the registry's cluster IP, IP family and node port allocation.

    On update the allocated values of ``old`` are kept when the client left them out.
    """
    spec = obj.setdefault("spec", {})
    if not isinstance(spec, dict):
        return obj
    old_spec = (old or {}).get("spec") or {}
    _fill(spec, {"type": "ClusterIP", "sessionAffinity": "None"})
    if spec["sessionAffinity"] == "None":
        spec.pop("sessionAffinityConfig", None)
    elif spec["sessionAffinity"] == "ClientIP":
        cfg = spec.setdefault("sessionAffinityConfig", {})
        _fill(cfg.setdefault("clientIP", {}), {"timeoutSeconds": 10800})
    kind = spec["type"]
    old_ports = {(p.get("port"), p.get("protocol", "TCP")): p for p in _dicts(old_spec.get("ports"))}
    for port in _dicts(spec.get("ports")):
        _fill(port, {"protocol": "TCP"})
        if port.get("targetPort") in (None, 0, "") and "port" in port:
            port["targetPort"] = port["port"]
        if kind in ("NodePort", "LoadBalancer") and not port.get("nodePort"):
            before = old_ports.get((port.get("port"), port["protocol"]), {}).get("nodePort")
            if before:
                port["nodePort"] = before
            elif allocate_node_port is not None:
                port["nodePort"] = allocate_node_port()
    if kind in ("NodePort", "LoadBalancer"):
        _fill(spec, {"externalTrafficPolicy": "Cluster"})
    if kind in ("NodePort", "LoadBalancer", "ClusterIP"):
        _fill(spec, {"internalTrafficPolicy": "Cluster"})
    if kind == "LoadBalancer":
        _fill(spec, {"allocateLoadBalancerNodePorts": True})
    if kind == "ExternalName":
        return obj
    for k in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
        if k not in spec and k in old_spec:
            spec[k] = _copy(old_spec[k])
    if not spec.get("clusterIP") and allocate_ip is not None:
        spec["clusterIP"] = (spec.get("clusterIPs") or [None])[0] or allocate_ip()
    if spec.get("clusterIP") and not spec.get("clusterIPs"):
        spec["clusterIPs"] = [spec["clusterIP"]]
    _fill(spec, {"ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack"})
    return obj


def persistent_volume_claim(obj: dict) -> dict:
    spec = _sub(obj, "spec")
    if spec is not None:
        _fill(spec, {"volumeMode": "Filesystem"})
    status = obj.setdefault("status", {})
    if isinstance(status, dict):
        _fill(status, {"phase": "Pending"})
    return obj


# --------------------------------------------------------------------------- apps/v1


def deployment(obj: dict) -> dict:
    spec = _sub(obj, "spec")
    if spec is None:
        return obj
    _fill(spec, _DEPLOYMENT)
    strategy = spec.setdefault("strategy", {})
    if isinstance(strategy, dict):
        _fill(strategy, {"type": "RollingUpdate"})
        if strategy["type"] == "RollingUpdate":
            rolling = strategy.setdefault("rollingUpdate", {})
            if isinstance(rolling, dict):
                _fill(rolling, {"maxUnavailable": "25%", "maxSurge": "25%"})
    _template(obj)
    return obj


def replica_set(obj: dict) -> dict:
    spec = _sub(obj, "spec")
    if spec is not None:
        _fill(spec, {"replicas": 1})
        template = _template(obj)
        labels = (template or {}).get("metadata", {}).get("labels")
        if labels and not (obj.get("metadata") or {}).get("labels"):
            obj.setdefault("metadata", {})["labels"] = dict(labels)
    return obj


# --------------------------------------------------------------------------- batch/v1


def job(obj: dict, old: dict | None = None) -> dict:
    """SetDefaults_Job, and on create the Job strategy's generated selector (unless ``manualSelector``)."""
    spec = obj.setdefault("spec", {})
    if not isinstance(spec, dict):
        return obj
    meta = obj.setdefault("metadata", {})
    if "completions" not in spec and "parallelism" not in spec:
        spec["completions"] = 1
    _fill(spec, {"parallelism": 1})
    if "backoffLimit" not in spec and spec.get("backoffLimitPerIndex") is not None:
        spec["backoffLimit"] = 2147483647
    _fill(spec, _JOB)
    _fill(spec, {"podReplacementPolicy": "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed"})
    for rule in _dicts((_sub(spec, "podFailurePolicy") or {}).get("rules")):
        for pattern in _dicts(rule.get("onPodConditions")):
            _fill(pattern, {"status": "True"})
    template = _template(obj)
    if old is None and spec.get("manualSelector") is not True and meta.get("uid"):
        template = spec.setdefault("template", {}) if template is None else template
        tmeta = template.setdefault("metadata", {})
        labels = tmeta.setdefault("labels", {})
        for key in JOB_NAME_LABELS:
            labels.setdefault(key, meta.get("name", ""))
        for key in CONTROLLER_UID_LABELS:
            labels.setdefault(key, meta["uid"])
        selector = spec.setdefault("selector", {})
        if isinstance(selector, dict):
            selector.setdefault("matchLabels", {}).setdefault(CONTROLLER_UID_LABELS[1], meta["uid"])
    labels = ((template or {}).get("metadata") or {}).get("labels")
    if labels and not meta.get("labels"):
        meta["labels"] = dict(labels)
    return obj


# --------------------------------------------------------------------------- autoscaling/v2


def _scaling_rules(given: Any, defaults: dict) -> dict:
    out = _copy(defaults)
    if isinstance(given, dict):
        out.update({k: v for k, v in given.items() if v is not None})
    return out


def horizontal_pod_autoscaler(obj: dict) -> dict:
    spec = _sub(obj, "spec")
    if spec is None:
        return obj
    _fill(spec, {"minReplicas": 1})
    if not spec.get("metrics"):
        spec["metrics"] = [{"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization", "averageUtilization": HPA_DEFAULT_CPU_UTILIZATION}}}]
    behavior = _sub(spec, "behavior")
    if behavior is not None:
        behavior["scaleUp"] = _scaling_rules(behavior.get("scaleUp"), HPA_SCALE_UP)
        behavior["scaleDown"] = _scaling_rules(behavior.get("scaleDown"), HPA_SCALE_DOWN)
    return obj


# --------------------------------------------------------------------------- networking.k8s.io/v1


def network_policy(obj: dict) -> dict:
    """kubernetes pkg/apis/networking/v1/defaults.go: a port's protocol is TCP unless given; no policyTypes (unset
    or empty) is ["Ingress"], plus "Egress" when there are egress rules. `podSelector` absent: Go's decoding zero-fills
    the struct (an empty selector: every pod of the namespace), as kube-apiserver stores and returns it."""
    spec = _sub(obj, "spec")
    if spec is None:
        return obj
    if spec.get("podSelector") is None:
        spec["podSelector"] = {}
    for direction in ("ingress", "egress"):
        rules = spec.get(direction)
        for rule in rules if isinstance(rules, list) else []:
            ports = rule.get("ports") if isinstance(rule, dict) else None
            for port in ports if isinstance(ports, list) else []:
                if isinstance(port, dict) and port.get("protocol") is None:
                    port["protocol"] = "TCP"
            for key in ("ports", "from", "to"):
                if isinstance(rule, dict) and rule.get(key) == []:
                    del rule[key]  # stored as protobuf, an empty list comes back absent (omitempty)
        if rules == []:
            del spec[direction]
    if not spec.get("policyTypes"):
        spec["policyTypes"] = ["Ingress", "Egress"] if spec.get("egress") else ["Ingress"]
    return obj


# --------------------------------------------------------------------------- dispatch

_BY_KIND: dict[tuple[str, str], Callable[..., dict]] = {
    ("", "pods"): pod,
    ("", "persistentvolumeclaims"): persistent_volume_claim,
    ("apps", "deployments"): deployment,
    ("apps", "replicasets"): replica_set,
    ("autoscaling", "horizontalpodautoscalers"): horizontal_pod_autoscaler,
    ("networking.k8s.io", "networkpolicies"): network_policy,
}


def apply(group: str, plural: str, obj: dict, old: dict | None = None, *,
          allocate_ip: Callable[[], str] | None = None,
          allocate_node_port: Callable[[], int] | None = None) -> dict:
    """Default a built-in object of ``group``/``plural`` in place (``old``: the stored object, on update)."""
    if plural == "services" and group == "":
        return service(obj, old, allocate_ip, allocate_node_port)
    if plural == "jobs" and group == "batch":
        return job(obj, old)
    fn = _BY_KIND.get((group, plural))
    return fn(obj) if fn is not None else obj
