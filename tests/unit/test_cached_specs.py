"""Typed specs parsed once while an object's spec stays the same (controllers.cached_specs)."""

from __future__ import annotations

import copy

import pytest

from perennial.api.rewardspec import RewardSpecSpec
from perennial.controllers.cached_specs import SpecCache

RUBRIC = {"graders": [{"name": "fmt", "type": "Regex", "regex": {"pattern": "^<answer>"}}]}


def obj(spec: dict, name: str = "rs", namespace: str = "default") -> dict:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


def test_an_equal_spec_is_parsed_once_and_gives_the_same_model(monkeypatch):
    cache = SpecCache(RewardSpecSpec)
    calls = []
    real = RewardSpecSpec.model_validate
    monkeypatch.setattr(RewardSpecSpec, "model_validate", classmethod(lambda cls, v: calls.append(v) or real(v)))
    first, err = cache.parse(obj(RUBRIC))
    again, _ = cache.parse(obj(copy.deepcopy(RUBRIC)))  # a new object (the next watch event), the same spec
    assert err is None and again is first and len(calls) == 1


def test_a_changed_spec_is_parsed_again():
    cache = SpecCache(RewardSpecSpec)
    first = cache.get(obj(RUBRIC))
    changed = copy.deepcopy(RUBRIC)
    changed["graders"][0]["regex"]["pattern"] = "^<b>"
    second = cache.get(obj(changed))
    assert second is not first and second.graders[0].regex.pattern == "^<b>"
    assert cache.get(obj(RUBRIC)).graders[0].regex.pattern == "^<answer>"


def test_an_invalid_spec_gives_its_error_each_time_and_objects_are_apart():
    cache = SpecCache(RewardSpecSpec)
    spec, err = cache.parse(obj({"graders": "nope"}, name="bad"))
    assert spec is None and err is not None and err.errors()
    spec2, err2 = cache.parse(obj({"graders": "nope"}, name="bad"))
    assert spec2 is None and err2 is err
    assert cache.get(obj(RUBRIC, name="good")) is not None  # another object, its own entry
    cache.forget("default", "bad")
    assert len(cache) == 1


def test_the_cache_is_bounded():
    cache = SpecCache(RewardSpecSpec, maxsize=3)
    for i in range(5):
        cache.get(obj(RUBRIC, name=f"rs-{i}"))
    assert len(cache) == 3


def test_a_spec_equal_in_python_but_not_in_json_is_parsed_again():
    # `{"const": 1} == {"const": True}` in Python; as JSON Schemas they differ (1 is not true). The API server bumps
    # the generation on the change: the cached parse of the older generation is not handed out.
    cache = SpecCache(RewardSpecSpec)

    def schema(value: object, generation: int) -> dict:
        o = obj({"graders": [{"name": "j", "type": "JSONSchema", "jsonSchema": {"schema": {"const": value}}}]})
        o["metadata"]["generation"] = generation
        return o

    assert cache.get(schema(1, 1)).graders[0].json_schema.schema_["const"] == 1
    parsed = cache.get(schema(True, 2)).graders[0].json_schema.schema_["const"]
    assert parsed is True


@pytest.mark.parametrize("a,b,equal", [
    ({"v": 1}, {"v": True}, False),
    ({"v": [1, {"w": 0}]}, {"v": [1, {"w": False}]}, False),
    ({"v": 1}, {"v": 1.0}, False),
    ({"v": [1, "x", {"w": None}]}, {"v": [1, "x", {"w": None}]}, True),
    ({"v": True}, {"v": True}, True),
    ({"a": 1, "b": 2}, {"b": 2, "a": 1}, True),  # key order is no difference
    ({"v": 1}, {"v": 2}, False),
])
def test_json_equal_tells_apart_what_pythons_equality_conflates(a, b, equal):
    from perennial.kube.client import json_equal

    assert json_equal(a, b) is equal and json_equal(b, a) is equal
