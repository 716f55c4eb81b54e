"""The control plane's fast paths give the answers of the slow paths they replace.

* a ``/status`` write skips pruning and defaulting the rest of an object (its ``spec``) when the schema of
  the request admitted exactly that stored object and that schema's admission is idempotent: every write
  here is replayed on a second server whose fast path is off, and both must store and answer the same;
* ``json_copy`` copies JSON data as ``copy.deepcopy`` does;
* the CEL rules of one schema node share one activation: same results and messages as one by one.
"""

from __future__ import annotations

import copy
import random

import pytest

from perennial.local import validation
from perennial.local.apiserver import APIServer
from perennial.local.patches import json_copy
from perennial.local.store import APIError

GROUP = "fast.perennial.ai"

SCHEMA_V1 = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "required": ["method"],
            "x-kubernetes-validations": [
                {"rule": "self.method == oldSelf.method", "message": "`method` is immutable"},
                {"rule": "!has(self.maxSteps) || self.maxSteps >= self.minSteps",
                 "message": "`maxSteps` must be greater than or equal to `minSteps`"},
            ],
            "properties": {
                "method": {"type": "string", "enum": ["SFT", "DPO", "GRPO"]},
                "note": {"type": "string"},
                "legacy": {"type": "string"},
                "minSteps": {"type": "integer", "default": 1},
                "maxSteps": {"type": "integer"},
                "options": {"type": "object", "default": {}, "properties": {
                    "seed": {"type": "integer", "default": 7}}},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
        },
        "status": {
            "type": "object",
            "properties": {
                "phase": {"type": "string", "enum": ["Pending", "Done"]},
                "observedGeneration": {"type": "integer"},
                "conditions": {"type": "array", "items": {"type": "object", "properties": {
                    "type": {"type": "string"}, "status": {"type": "string"},
                    "lastTransitionTime": {"type": "string", "format": "date-time"}}}},
            },
        },
    },
}


def schema_v2() -> dict:
    """A new version of the schema: `legacy` gone (pruned), a new defaulted field, `note` stricter (a stored
    long note is now invalid), a new default inside `options`."""
    s = copy.deepcopy(SCHEMA_V1)
    props = s["properties"]["spec"]["properties"]
    del props["legacy"]
    props["note"] = {"type": "string", "maxLength": 4}
    props["priority"] = {"type": "integer", "default": 5}
    props["options"]["properties"]["shuffle"] = {"type": "boolean", "default": True}
    return s


def unidempotent_schema() -> dict:
    """A default that carries a field its own schema prunes: pruning then defaulting is not idempotent."""
    s = copy.deepcopy(SCHEMA_V1)
    s["properties"]["spec"]["properties"]["options"] = {
        "type": "object", "default": {"seed": 1, "junk": "x"}, "properties": {"seed": {"type": "integer"}}}
    return s


def crd(schema: dict) -> dict:
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"gadgets.{GROUP}"},
            "spec": {"group": GROUP, "scope": "Namespaced",
                     "names": {"kind": "Gadget", "plural": "gadgets", "singular": "gadget"},
                     "versions": [{"name": "v1", "served": True, "storage": True,
                                   "schema": {"openAPIV3Schema": copy.deepcopy(schema)},
                                   "subresources": {"status": {}}}]}}


class _Forgetful(dict):
    """An admission record that remembers nothing: every /status write takes the slow path."""

    def __setitem__(self, key, value) -> None:
        pass


def _normal(obj: dict) -> dict:
    out = copy.deepcopy(obj)
    out["metadata"].pop("uid", None)
    out["metadata"].pop("creationTimestamp", None)
    return out


class Twins:
    """Two servers, fast path on and off; every call runs on both and must agree (result or error)."""

    def __init__(self) -> None:
        self.fast, self.slow = APIServer(), APIServer()
        self.slow.store._admitted = _Forgetful()
        self.fast_hits = 0

    def both(self, fn):
        out = []
        for server in (self.fast, self.slow):
            try:
                out.append(("ok", _normal(fn(server))))
            except APIError as exc:
                out.append(("error", exc.code, exc.message))
        assert out[0] == out[1]
        stored_fast = {k: _normal(v) for k, v in self.fast.store.objects[(GROUP, "gadgets")].items()}
        stored_slow = {k: _normal(v) for k, v in self.slow.store.objects[(GROUP, "gadgets")].items()}
        assert stored_fast == stored_slow
        return out[0]

    def apply_crd(self, schema: dict) -> None:
        for server in (self.fast, self.slow):
            server.apply_crd(crd(schema))

    def create(self, name: str, **spec):
        body = {"apiVersion": f"{GROUP}/v1", "kind": "Gadget", "metadata": {"name": name}, "spec": spec}
        return self.both(lambda s: s.create(f"{GROUP}/v1", "gadgets", copy.deepcopy(body), namespace="default"))

    def status(self, name: str, status: dict):
        return self.both(lambda s: s.patch(f"{GROUP}/v1", "gadgets", name, {"status": copy.deepcopy(status)},
                                           namespace="default", subresource="status"))

    def patch(self, name: str, patch: dict):
        return self.both(lambda s: s.patch(f"{GROUP}/v1", "gadgets", name, copy.deepcopy(patch),
                                           namespace="default"))


@pytest.fixture
def twins(monkeypatch) -> Twins:
    t = Twins()
    real = validation.admit

    def counting(schema, obj, old=validation._MISSING, **kwargs):
        if kwargs.get("settled"):
            t.fast_hits += 1
        return real(schema, obj, old, **kwargs)

    monkeypatch.setattr(validation, "admit", counting)
    t.apply_crd(SCHEMA_V1)
    return t


def cond(phase: str = "True") -> dict:
    return {"type": "Ready", "status": phase, "lastTransitionTime": "2026-01-01T00:00:00Z"}


def test_status_write_fast_path_is_taken_and_agrees(twins):
    twins.create("a", method="SFT", note="hello", legacy="x", tags=["t"])
    out = twins.status("a", {"phase": "Done", "conditions": [cond()]})
    assert out[0] == "ok" and out[1]["status"]["phase"] == "Done"
    assert out[1]["spec"] == {"method": "SFT", "note": "hello", "legacy": "x", "tags": ["t"], "minSteps": 1,
                              "options": {"seed": 7}}
    assert out[1]["metadata"]["generation"] == 1
    assert twins.fast_hits >= 1  # the fast server took the fast path (the slow one never can)
    # a second status write, an invalid one, a no-op one: all the same on both
    twins.status("a", {"phase": "Pending", "observedGeneration": 1})
    bad = twins.status("a", {"phase": "Sideways"})
    assert bad[0] == "error" and bad[1] == 422 and "status.phase" in bad[2]
    twins.status("a", {"phase": "Pending", "observedGeneration": 1})


def test_status_write_after_a_schema_change_prunes_defaults_and_ratchets_like_kube(twins):
    """The stored spec was admitted by the old schema: a /status write under the new one prunes it (`legacy`),
    defaults it (`priority`, `options.shuffle`) and ratchets its now-invalid `note` (unchanged, so not an
    error), as kube-apiserver's status strategy with CRDValidationRatcheting does."""
    twins.create("a", method="SFT", note="a rather long note", legacy="x")
    twins.apply_crd(schema_v2())
    hits = twins.fast_hits
    out = twins.status("a", {"phase": "Done"})
    assert out[0] == "ok", out
    assert twins.fast_hits == hits  # a new schema: the stored spec is not settled under it
    spec = out[1]["spec"]
    assert "legacy" not in spec and spec["priority"] == 5 and spec["options"] == {"seed": 7, "shuffle": True}
    assert spec["note"] == "a rather long note"
    # now admitted by the new schema: the next status write is fast again, and agrees
    before = twins.status("a", {"phase": "Pending"})
    assert twins.fast_hits > hits
    # a changed spec is validated in full: the stricter note is refused, the immutable method too
    changed = twins.patch("a", {"spec": {"note": "still far too long"}})
    assert changed[0] == "error" and changed[1] == 422 and "spec.note" in changed[2]
    method = twins.patch("a", {"spec": {"method": "DPO"}})
    assert method[0] == "error" and "`method` is immutable" in method[2]
    fine = twins.patch("a", {"spec": {"note": "ok"}})
    assert fine[0] == "ok" and fine[1]["spec"]["note"] == "ok" and (
        fine[1]["metadata"]["generation"] == before[1]["metadata"]["generation"] + 1)


def test_status_write_under_a_non_idempotent_schema_takes_the_slow_path(twins):
    schema = unidempotent_schema()
    assert validation.admission_idempotent(SCHEMA_V1) is True
    assert validation.admission_idempotent(schema) is False
    twins.apply_crd(schema)
    created = twins.create("a", method="SFT")
    assert created[1]["spec"]["options"] == {"seed": 1, "junk": "x"}  # the default as given
    out = twins.status("a", {"phase": "Done"})
    assert out[1]["spec"]["options"] == {"seed": 1}  # admitted again: pruned, as the slow path does


def test_random_status_and_spec_writes_agree(twins):
    rng = random.Random(1234)
    names = [f"g{i}" for i in range(6)]
    for name in names:
        twins.create(name, method=rng.choice(["SFT", "DPO"]), note="n" * rng.randint(1, 9), legacy="l")
    for step in range(120):
        name = rng.choice(names)
        r = rng.random()
        if r < 0.5:
            status = {"phase": rng.choice(["Pending", "Done", "Bad"]), "observedGeneration": rng.randint(1, 3)}
            if rng.random() < 0.5:
                status["conditions"] = [cond(rng.choice(["True", "False"]))]
            if rng.random() < 0.2:
                status["unknownField"] = 1
            twins.status(name, status)
        elif r < 0.8:
            patch = rng.choice([{"spec": {"note": "n" * rng.randint(1, 9)}}, {"spec": {"maxSteps": rng.randint(0, 3)}},
                                {"spec": {"options": {"seed": rng.randint(0, 9)}}}, {"spec": {"tags": ["a"]}},
                                {"metadata": {"labels": {"k": str(step)}}}])
            twins.patch(name, patch)
        elif r < 0.9:
            twins.apply_crd(rng.choice([SCHEMA_V1, schema_v2()]))
        else:
            twins.both(lambda s, n=name: s.store.get(s._rt(GROUP, "v1", "gadgets"), "default", n))
    assert twins.fast_hits > 10


# --------------------------------------------------------------------------- json_copy


def test_json_copy_is_a_deep_copy_of_json_data():
    rng = random.Random(7)

    def gen(depth: int):
        kind = rng.randrange(8 if depth < 4 else 5)
        return [lambda: rng.randint(-5, 5), lambda: rng.random(), lambda: rng.choice([True, False]), lambda: None,
                lambda: "s" * rng.randint(0, 3),
                lambda: [gen(depth + 1) for _ in range(rng.randint(0, 3))],
                lambda: {f"k{i}": gen(depth + 1) for i in range(rng.randint(0, 3))},
                lambda: {"nested": [gen(depth + 1)]}][kind]()

    for _ in range(200):
        value = {"root": gen(0)}
        copied = json_copy(value)
        assert copied == copy.deepcopy(value)
        assert repr(copied) == repr(value)  # same types (True stays True, 1.0 stays 1.0)

    original = {"a": [{"b": 1}], "c": {"d": [1, 2]}}
    copied = json_copy(original)
    copied["a"][0]["b"] = 2
    copied["c"]["d"].append(3)
    assert original == {"a": [{"b": 1}], "c": {"d": [1, 2]}}
    odd = {"s": {1, 2}}  # not JSON: deep-copied all the same
    assert json_copy(odd)["s"] is not odd["s"] and json_copy(odd) == odd


# --------------------------------------------------------------------------- CEL activations


@pytest.mark.parametrize("value,old", [
    ({"method": "SFT", "minSteps": 3, "maxSteps": 2, "tags": ["x", "x"]}, {"method": "DPO", "minSteps": 1}),
    ({"method": "SFT", "minSteps": 1, "maxSteps": 2, "tags": ["x", "y"]}, {"method": "SFT"}),
    ({"method": "SFT", "minSteps": 1, "tags": []}, validation._MISSING),
    ({"method": "GRPO", "minSteps": "nope"}, {"method": "GRPO"}),
])
def test_rules_of_one_node_sharing_an_activation_answer_as_one_by_one(value, old):
    rules = [
        {"rule": "self.method == oldSelf.method", "message": "`method` is immutable"},
        {"rule": "!has(self.maxSteps) || self.maxSteps >= self.minSteps", "fieldPath": ".maxSteps"},
        {"rule": "size(self.tags) < 2 || self.tags[0] != self.tags[1]",
         "messageExpression": "'duplicate tag ' + self.tags[0]"},
        {"rule": "self.minSteps > 0", "reason": "FieldValueForbidden", "message": "must be positive"},
        {"rule": "self.missing.size() > 0"},  # an evaluation error
    ]
    shared: list[validation.FieldError] = []
    activations: dict = {}
    for rule in rules:
        validation._check_rule(rule, value, old, "spec", shared, activations)
    alone: list[validation.FieldError] = []
    for rule in rules:
        validation._check_rule(rule, value, old, "spec", alone)
    assert [e.as_cause() for e in shared] == [e.as_cause() for e in alone]
    assert shared  # the cases all have at least one error (the evaluation error at least)


# --------------------------------------------------------------------------- encoding once


def test_encoded_once_answers_the_bytes_of_encoding_each_time():
    from perennial.local.apiserver import _dumps

    server = APIServer()
    store = server.store
    cms = store.lookup("", "v1", "configmaps")
    objs = [store.create(cms, "default", {"metadata": {"name": f"c{i}"}, "data": {"k": "é\u2028" * i}})
            for i in range(3)]
    items, rv = store.list(cms, "default")
    expected = _dumps({"kind": "ConfigMapList", "apiVersion": "v1", "metadata": {"resourceVersion": str(rv)},
                       "items": items})
    assert server._list_text(cms, items, rv) == expected
    for etype in ("ADDED", "MODIFIED", "DELETED"):
        assert server._event_line(cms, etype, objs[1]) == (_dumps({"type": etype, "object": objs[1]}) + "\n").encode()
    assert server._encode(cms, objs[2]) is server._encode(cms, objs[2])  # encoded once
    # a write stores a new object: its new JSON, not the old one's
    new = store.patch(cms, "default", "c1", "merge", {"data": {"k": "v"}})[0]
    assert json_loads(server._encode(cms, new))["data"] == {"k": "v"}
    assert json_loads(server._encode(cms, objs[1]))["data"] == objs[1]["data"]
    # another version's view of the same stored object (autoscaling/v1 of a stored v2 HPA) is its own entry
    v2, v1 = store.lookup("autoscaling", "v2", "horizontalpodautoscalers"), store.lookup(
        "autoscaling", "v1", "horizontalpodautoscalers")
    hpa = store.create(v1, "default", {"metadata": {"name": "h"}, "spec": {
        "scaleTargetRef": {"kind": "Deployment", "name": "d", "apiVersion": "apps/v1"}, "maxReplicas": 3,
        "targetCPUUtilizationPercentage": 50}})
    assert server._encode(v1, hpa) == _dumps(store.view(v1, hpa))
    assert server._encode(v2, hpa) == _dumps(hpa) != server._encode(v1, hpa)


def json_loads(text: str):
    import json

    return json.loads(text)


# --------------------------------------------------------------------------- CEL: rules of a node as one list, scalar outcomes

NODE_RULES = {
    "type": "object",
    "x-kubernetes-validations": [
        {"rule": "self.kind == 'A' ? has(self.a) : !has(self.a)", "message": "`a` goes with kind A"},
        {"rule": "self.kind == 'B' ? has(self.b) : !has(self.b)"},
        {"rule": "self.n > 0", "messageExpression": "'n must be positive, not ' + string(self.n)"},
        {"rule": "self.missing > 0"},  # an evaluation error unless the key is there
        {"rule": "self.n == oldSelf.n", "message": "`n` is immutable"},  # a transition rule
        {"rule": "self.kind", "message": "not a boolean"},  # a rule whose value is not a bool
        {"rule": "size(self.kind) < 3 // a comment at the end"},
    ],
    "properties": {
        "kind": {"type": "string"}, "a": {"type": "string"}, "b": {"type": "string"},
        "n": {"type": "integer"}, "missing": {"type": "integer"},
        "weight": {"type": "string", "x-kubernetes-validations": [
            {"rule": "!self.matches('^[0-9.]+$') || double(self) <= 10.0", "message": "at most 10"}]},
        "flag": {"x-kubernetes-int-or-string": True, "x-kubernetes-validations": [
            {"rule": "type(self) == int", "message": "must be an integer"}]},
    },
}


def _one_by_one(monkeypatch, schema, value, old):
    """validate() with every rule evaluated alone, nothing remembered or shared."""
    with monkeypatch.context() as m:
        m.setattr(validation, "_passed_together", lambda rules, value: frozenset())
        m.setattr(validation, "_eval", lambda rule, data, activations=None: validation._eval_now(rule, data, None))
        return [e.as_cause() for e in validation.validate(schema, value, old)]


def test_rules_evaluated_together_and_remembered_scalars_answer_as_one_by_one(monkeypatch):
    rng = random.Random(99)
    batches = 0
    real_together = validation._passed_together

    def counting(rules, value):
        nonlocal batches
        out = real_together(rules, value)
        batches += bool(out)
        return out

    monkeypatch.setattr(validation, "_passed_together", counting)
    for _ in range(300):
        value = {"kind": rng.choice(["A", "B", "C", "LONG"]), "n": rng.randint(-1, 2),
                 "weight": rng.choice(["1", "5.5", "11", "x", "10"]), "flag": rng.choice([1, "1", 2, "two"])}
        for key in ("a", "b", "missing"):
            if rng.random() < 0.5:
                value[key] = 1 if key == "missing" else "x"
        old = rng.choice([validation._MISSING, {**value, "n": rng.randint(-1, 2)}])
        fast = [e.as_cause() for e in validation.validate(NODE_RULES, value, old)]
        assert fast == _one_by_one(monkeypatch, NODE_RULES, value, old), value
    assert batches > 0  # the list evaluation did settle rules


def test_remembered_scalar_outcomes_tell_types_apart():
    schema = {"x-kubernetes-int-or-string": True,
              "x-kubernetes-validations": [{"rule": "type(self) == int", "message": "must be an integer"}]}
    number = {"type": "number", "x-kubernetes-validations": [{"rule": "type(self) == int", "message": "int"}]}
    assert validation.validate(schema, 1) == []
    assert [e.detail for e in validation.validate(schema, "1")] == ['Invalid value: "1": must be an integer']
    assert validation.validate(number, 1) == []
    assert [e.detail for e in validation.validate(number, 1.0)] == ["Invalid value: 1: int"]  # 1.0 == 1 in Python
    assert [e.detail for e in validation.validate(number, 1.5)] == ["Invalid value: 1.5: int"]
    assert validation.validate(schema, 1) == []  # 1 remembered apart from "1", 1.0 and 1.5


def test_admission_and_status_writes_leave_the_callers_objects_alone():
    body = {"apiVersion": f"{GROUP}/v1", "kind": "Gadget", "metadata": {"name": "a"},
            "spec": {"method": "SFT", "unknown": 1}}
    before = copy.deepcopy(body)
    obj, unknown, errors = validation.admit(SCHEMA_V1, body)
    assert body == before and unknown == ["spec.unknown"] and obj["spec"]["minSteps"] == 1 and not errors
    server = APIServer()
    server.apply_crd(crd(SCHEMA_V1))
    created = server.create(f"{GROUP}/v1", "gadgets", copy.deepcopy(body), namespace="default")
    stored = copy.deepcopy(created)
    patch_body = {"status": {"phase": "Done", "junk": 1}, "spec": {"method": "DPO"}}
    kept = copy.deepcopy(patch_body)
    out = server.store.update(server._rt(GROUP, "v1", "gadgets"), "default", "a",
                              {**copy.deepcopy(created), **patch_body}, subresource="status")
    assert patch_body == kept and created == stored  # neither the body nor the old stored object changed
    assert out["status"] == {"phase": "Done"} and out["spec"]["method"] == "SFT"


# --------------------------------------------------------------------------- the server thread's loop


def test_server_thread_loop_is_uvloop_when_installed_unless_asked_for_asyncio(monkeypatch):
    import asyncio

    from perennial.local import apiserver

    uvloop = pytest.importorskip("uvloop")
    loop = apiserver._new_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    monkeypatch.setenv("PERENNIAL_CONTROL_PLANE_LOOP", "asyncio")
    loop = apiserver._new_loop()
    try:
        assert isinstance(loop, asyncio.SelectorEventLoop) and not isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
