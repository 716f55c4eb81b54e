"""The compiled yes/no check of built-in kinds is never looser than the exact jsonschema check."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from perennial.local import builtin_schema as bs

META = {"name": "x", "namespace": "default", "labels": {"a": "b"}, "annotations": {"c": "d"},
        "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "o", "uid": "u", "controller": True}]}
CONTAINER = {"name": "c", "image": "img:1", "args": ["a"], "env": [{"name": "E", "value": "1"}],
             "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}, "ports": [{"containerPort": 8000, "protocol": "TCP"}],
             "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
             "volumeMounts": [{"name": "v", "mountPath": "/v", "readOnly": True}]}
POD_SPEC = {"containers": [CONTAINER], "restartPolicy": "Never", "volumes": [{"name": "v", "emptyDir": {"sizeLimit": "1Gi"}}]}
SAMPLES = [
    {"apiVersion": "v1", "kind": "Event", "metadata": META, "involvedObject": {"kind": "TrainingRun", "name": "r", "uid": "u"},
     "reason": "Created", "message": "m", "type": "Normal", "count": 1, "firstTimestamp": "2026-11-29T10:00:00Z",
     "source": {"component": "perennial"}},
    {"apiVersion": "v1", "kind": "Pod", "metadata": META, "spec": POD_SPEC,
     "status": {"phase": "Running", "containerStatuses": [{"name": "c", "ready": True, "restartCount": 0, "image": "i", "imageID": "",
                                                          "state": {"terminated": {"exitCode": 1, "message": "m"}}}]}},
    {"apiVersion": "batch/v1", "kind": "Job", "metadata": META,
     "spec": {"backoffLimit": 2, "activeDeadlineSeconds": 60, "template": {"metadata": {"labels": {"a": "b"}}, "spec": POD_SPEC},
              "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [10, 11]}}]}},
     "status": {"conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": "2026-11-29T10:00:00Z"}], "succeeded": 1}},
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": META, "data": {"k": "v"}},
    {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": META,
     "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}},
    {"apiVersion": "v1", "kind": "Service", "metadata": META, "spec": {"selector": {"a": "b"}, "ports": [{"port": 80, "targetPort": 8000}]}},
    {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": META,
     "spec": {"replicas": 2, "selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}, "spec": POD_SPEC}}},
]


def _paths(node: Any, at: tuple = ()) -> list[tuple]:
    out = [at]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, at + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, at + (i,))
    return out


def _mutate(obj: dict, rng: random.Random) -> dict:
    obj = copy.deepcopy(obj)
    path = rng.choice(_paths(obj)[1:])
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    choice = rng.randrange(4)
    if choice == 0 and isinstance(parent, dict):
        del parent[last]  # a required field may go
    elif choice == 1 and isinstance(parent[last], dict):
        parent[last]["bogusField"] = 1  # unknown field
    else:  # a value of another JSON type: the cases a looser check would let through
        parent[last] = rng.choice([True, False, 1, 1.0, 1.5, -1, "1", "", None, [], {}, [1], {"a": 1}, 2**40])
    return obj


@pytest.fixture(scope="module")
def fast_checks() -> dict:
    if bs._schema_dir() is None:
        pytest.fail("kubernetes-validate's schemas are a dev dependency: install perennial[dev]")
    checks = {}
    for sample in SAMPLES:
        key = (sample["kind"], sample["apiVersion"])
        bs._compile_fast(key, bs._schema_path(*key))
        assert bs._fast[key] is not None, f"{key} did not compile"
        checks[key] = bs._fast[key]
    return checks


def test_the_fast_check_accepts_valid_objects_and_is_never_looser(fast_checks: dict) -> None:
    rng = random.Random(7)
    accepted = refused = 0
    for sample in SAMPLES:
        key = (sample["kind"], sample["apiVersion"])
        assert fast(fast_checks[key], sample), key  # each sample is valid: the fast path takes it
        assert not list(bs._validator(*key).iter_errors(sample))
        for _ in range(150):
            obj = _mutate(sample, rng)
            if fast(fast_checks[key], obj):
                accepted += 1
                errors = [e.message for e in bs._validator(*key).iter_errors(obj)]
                assert not errors, f"fast check accepted what jsonschema refuses: {errors} in {obj}"
            else:
                refused += 1
    assert accepted > 50 and refused > 50, (accepted, refused)  # both sides of the comparison were exercised


def test_check_reports_the_same_findings_with_and_without_the_fast_path(fast_checks: dict) -> None:
    bad = {**SAMPLES[0], "count": "x", "bogus": 1}
    with_fast = bs.check(bad)
    saved = dict(bs._fast)
    try:
        bs._fast.clear()
        bs._fast.update({k: None for k in saved})
        exact = bs.check(bad)
    finally:
        bs._fast.update(saved)
    assert with_fast == exact and exact.unknown == ["bogus"] and exact.type_errors


def fast(check: Any, obj: dict) -> bool:
    try:
        check(obj)
        return True
    except Exception:  # noqa: BLE001
        return False
