"""Semantics of the embedded API server, each asserted as kube-apiserver behaves."""

from __future__ import annotations

import copy
import itertools
import json
import re
import time

import pytest
import requests

from perennial.local import apiserver as apiserver_mod
from perennial.local.apiserver import APIServer, jsonpath, start_in_thread, write_kubeconfig

GROUP = "test.perennial.ai"
SCHEMA = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "required": ["method"],
            "x-kubernetes-validations": [
                {"rule": "!has(self.maxSteps) || self.maxSteps >= self.minSteps",
                 "message": "`maxSteps` must be greater than or equal to `minSteps`"},
                {"rule": "self.method == oldSelf.method", "message": "`method` is immutable"},
                {"rule": "size(self.tags) < 2 || self.tags[0] != self.tags[1]",
                 "messageExpression": "'duplicate tag ' + self.tags[0]"},
            ],
            "properties": {
                "method": {"type": "string", "enum": ["SFT", "DPO", "GRPO"]},
                "name": {"type": "string", "pattern": "^[a-z]*$", "maxLength": 10, "minLength": 1},
                "minSteps": {"type": "integer", "default": 1, "minimum": 0},
                "maxSteps": {"type": "integer", "maximum": 1000},
                "tags": {"type": "array", "maxItems": 2, "items": {"type": "string"}, "default": []},
                "note": {"type": "string", "nullable": True},
                "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "rate": {"x-kubernetes-int-or-string": True},
            },
        },
        "status": {
            "type": "object",
            "properties": {
                "phase": {"type": "string", "enum": ["Pending", "Done"]},
                "observedGeneration": {"type": "integer"},
                "conditions": {"type": "array", "items": {"type": "object", "properties": {
                    "type": {"type": "string"}, "status": {"type": "string"}}}},
            },
        },
    },
}


def widget_crd(*, status: bool = True, plural: str = "widgets", kind: str = "Widget",
               schema: dict | None = None) -> dict:
    version = {"name": "v1", "served": True, "storage": True,
               "schema": {"openAPIV3Schema": schema or SCHEMA},
               "additionalPrinterColumns": [
                   {"name": "Method", "type": "string", "jsonPath": ".spec.method"},
                   {"name": "Ready", "type": "string",
                    "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
                   {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]}
    if status:
        version["subresources"] = {"status": {}}
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{GROUP}"},
            "spec": {"group": GROUP, "scope": "Namespaced",
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "shortNames": ["wdg"],
                               "categories": ["perennial"]},
                     "versions": [version]}}


def widget(name: str = "w1", **spec) -> dict:
    return {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": name},
            "spec": {"method": "SFT", **spec}}


@pytest.fixture(scope="module")
def srv():
    server = start_in_thread()
    server.apply_crd(widget_crd())
    yield server
    server.stop()


class Client:
    def __init__(self, url: str) -> None:
        self.url = url
        self.s = requests.Session()

    def req(self, method: str, path: str, body=None, ctype: str = "application/json", **params):
        data = None if body is None else (body if isinstance(body, (str, bytes)) else json.dumps(body))
        return self.s.request(method, self.url + path, data=data, params=params or None,
                              headers={"Content-Type": ctype})

    def ok(self, method: str, path: str, body=None, ctype: str = "application/json", **params) -> dict:
        r = self.req(method, path, body, ctype, **params)
        assert r.status_code < 300, r.text
        return r.json()


@pytest.fixture
def c(srv) -> Client:
    return Client(srv.url)


_ns_counter = itertools.count()


@pytest.fixture
def ns(c, request) -> str:
    name = f"t{next(_ns_counter)}-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[5:40].strip("-")
    c.ok("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    return name


def W(ns: str, name: str = "") -> str:
    return f"/apis/{GROUP}/v1/namespaces/{ns}/widgets" + (f"/{name}" if name else "")


def CM(ns: str, name: str = "") -> str:
    return f"/api/v1/namespaces/{ns}/configmaps" + (f"/{name}" if name else "")


# --------------------------------------------------------------------------- discovery


def test_core_discovery_has_group_version_v1_and_subresources(c):
    assert c.ok("GET", "/api")["versions"] == ["v1"]
    rl = c.ok("GET", "/api/v1")
    assert rl["kind"] == "APIResourceList" and rl["groupVersion"] == "v1"
    by_name = {r["name"]: r for r in rl["resources"]}
    assert by_name["namespaces"]["namespaced"] is False
    assert by_name["configmaps"]["shortNames"] == ["cm"] and by_name["configmaps"]["singularName"] == "configmap"
    assert "watch" in by_name["pods"]["verbs"] and by_name["pods"]["kind"] == "Pod"
    assert {"pods/status", "pods/log"} <= set(by_name)
    assert c.ok("GET", "/version")["major"] == "1"


def test_group_discovery_lists_builtin_groups_and_crd_names(c):
    groups = {g["name"]: g for g in c.ok("GET", "/apis")["groups"]}
    for g in ("apps", "batch", "events.k8s.io", "autoscaling", "policy", "coordination.k8s.io",
              "rbac.authorization.k8s.io", "apiextensions.k8s.io", GROUP):
        assert g in groups, g
    assert groups["autoscaling"]["preferredVersion"]["groupVersion"] == "autoscaling/v2"
    rl = c.ok("GET", f"/apis/{GROUP}/v1")
    res = {r["name"]: r for r in rl["resources"]}
    assert res["widgets"]["categories"] == ["perennial"] and res["widgets"]["shortNames"] == ["wdg"]
    assert res["widgets/status"]["verbs"] == ["get", "patch", "update"]
    crds = {r["name"]: r for r in c.ok("GET", "/apis/apiextensions.k8s.io/v1")["resources"]}
    assert crds["customresourcedefinitions"]["namespaced"] is False
    assert c.ok("GET", "/apis/apps")["preferredVersion"]["version"] == "v1"


def test_openapi_v3_serves_crd_schema_with_gvk(c):
    root = c.ok("GET", "/openapi/v3")["paths"]
    url = root[f"apis/{GROUP}/v1"]["serverRelativeURL"]
    doc = c.ok("GET", url.split("?")[0])
    schema = doc["components"]["schemas"]["ai.perennial.test.v1.Widget"]
    assert schema["x-kubernetes-group-version-kind"] == [{"group": GROUP, "version": "v1", "kind": "Widget"}]
    assert schema["properties"]["spec"]["properties"]["method"]["enum"] == ["SFT", "DPO", "GRPO"]
    patch_op = doc["paths"][f"/apis/{GROUP}/v1/namespaces/{{namespace}}/widgets/{{name}}"]["patch"]
    assert any(p["name"] == "fieldValidation" for p in patch_op["parameters"])
    assert "api/v1" in root


# --------------------------------------------------------------------------- object semantics


def test_create_assigns_uid_timestamp_and_monotonic_string_resource_version(c, ns):
    a = c.ok("POST", CM(ns), {"metadata": {"name": "a"}})
    b = c.ok("POST", CM(ns), {"metadata": {"name": "b"}})
    assert a["metadata"]["uid"] != b["metadata"]["uid"]
    assert a["metadata"]["creationTimestamp"].endswith("Z")
    assert isinstance(a["metadata"]["resourceVersion"], str)
    assert int(b["metadata"]["resourceVersion"]) > int(a["metadata"]["resourceVersion"])
    assert a["kind"] == "ConfigMap" and a["apiVersion"] == "v1"


def test_create_existing_name_is_409_already_exists(c, ns):
    c.ok("POST", CM(ns), {"metadata": {"name": "a"}})
    r = c.req("POST", CM(ns), {"metadata": {"name": "a"}})
    assert r.status_code == 409
    assert r.json()["reason"] == "AlreadyExists"
    assert r.json()["message"] == 'configmaps "a" already exists'


def test_get_missing_is_404_status(c, ns):
    r = c.req("GET", W(ns, "nope"))
    assert r.status_code == 404
    body = r.json()
    assert body["kind"] == "Status" and body["reason"] == "NotFound"
    assert body["message"] == f'widgets.{GROUP} "nope" not found'
    assert body["details"] == {"name": "nope", "group": GROUP, "kind": "widgets"}


def test_create_in_missing_namespace_is_404(c):
    r = c.req("POST", CM("does-not-exist"), {"metadata": {"name": "a"}})
    assert r.status_code == 404 and r.json()["message"] == 'namespaces "does-not-exist" not found'


def test_generate_name(c, ns):
    obj = c.ok("POST", CM(ns), {"metadata": {"generateName": "job-"}})
    assert obj["metadata"]["name"].startswith("job-") and len(obj["metadata"]["name"]) == 9


def test_invalid_name_is_422(c, ns):
    r = c.req("POST", CM(ns), {"metadata": {"name": "Bad_Name"}})
    assert r.status_code == 422
    assert r.json()["message"].startswith('ConfigMap "Bad_Name" is invalid: metadata.name: Invalid value: "Bad_Name"')


def test_body_of_another_kind_is_400(c, ns):
    r = c.req("POST", CM(ns), {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a"}})
    assert r.status_code == 400 and r.json()["reason"] == "BadRequest"
    r = c.req("POST", W(ns), {**widget(), "apiVersion": f"{GROUP}/v2"})
    assert r.status_code == 400


def test_stale_resource_version_update_is_409_conflict(c, ns):
    obj = c.ok("POST", CM(ns), {"metadata": {"name": "a"}, "data": {"x": "1"}})
    c.ok("PUT", CM(ns, "a"), {**obj, "data": {"x": "2"}})
    r = c.req("PUT", CM(ns, "a"), {**obj, "data": {"x": "3"}})
    assert r.status_code == 409 and r.json()["reason"] == "Conflict"
    assert r.json()["message"] == ('Operation cannot be fulfilled on configmaps "a": the object has been modified; '
                                   "please apply your changes to the latest version and try again")


def test_no_op_update_keeps_resource_version(c, ns):
    obj = c.ok("POST", CM(ns), {"metadata": {"name": "a"}, "data": {"x": "1"}})
    again = c.ok("PATCH", CM(ns, "a"), {"data": {"x": "1"}}, "application/merge-patch+json")
    assert again["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]


def test_generation_bumps_only_on_spec_changes(c, ns):
    obj = c.ok("POST", W(ns), widget())
    assert obj["metadata"]["generation"] == 1
    obj = c.ok("PATCH", W(ns, "w1"), {"metadata": {"labels": {"a": "b"}}}, "application/merge-patch+json")
    assert obj["metadata"]["generation"] == 1
    obj = c.ok("PATCH", W(ns, "w1") + "/status", {"status": {"phase": "Done"}}, "application/merge-patch+json")
    assert obj["metadata"]["generation"] == 1
    obj = c.ok("PATCH", W(ns, "w1"), {"spec": {"maxSteps": 5}}, "application/merge-patch+json")
    assert obj["metadata"]["generation"] == 2


def test_a_value_that_changes_type_but_not_python_equality_is_a_change(c, ns):
    # 1 -> true -> 1.0 in a preserve-unknown-fields part: `1 == True == 1.0` in Python, three different JSON values
    # (a JSON Schema `const`, an affinity weight): each write is stored and bumps the generation, as in kube-apiserver
    obj = c.ok("POST", W(ns), widget(extra={"v": 1}))
    for value, gen in ((True, 2), (1.5, 3), (1, 4), (True, 5)):
        obj = c.ok("PATCH", W(ns, "w1"), {"spec": {"extra": {"v": value}}}, "application/merge-patch+json")
        assert obj["spec"]["extra"]["v"] is value or (obj["spec"]["extra"]["v"] == value and type(obj["spec"]["extra"]["v"]) is type(value))
        assert obj["metadata"]["generation"] == gen, value
    got = c.ok("GET", W(ns, "w1"))
    assert got["spec"]["extra"]["v"] is True and got["metadata"]["generation"] == 5
    again = c.ok("PATCH", W(ns, "w1"), {"spec": {"extra": {"v": True}}}, "application/merge-patch+json")
    assert again["metadata"]["resourceVersion"] == got["metadata"]["resourceVersion"]  # the same JSON: still a no-op


def test_status_subresource_split(c, ns):
    obj = c.ok("POST", W(ns), {**widget(), "status": {"phase": "Done"}})
    assert "status" not in obj  # status is dropped on create
    obj = c.ok("PUT", W(ns, "w1") + "/status",
               {**obj, "spec": {"method": "DPO"}, "metadata": {**obj["metadata"], "labels": {"x": "y"}},
                "status": {"phase": "Pending"}})
    assert obj["status"] == {"phase": "Pending"} and obj["spec"]["method"] == "SFT"
    assert "labels" not in obj["metadata"]
    obj = c.ok("PUT", W(ns, "w1"), {**obj, "spec": {**obj["spec"], "maxSteps": 3}, "status": {"phase": "Done"}})
    assert obj["status"] == {"phase": "Pending"} and obj["spec"]["maxSteps"] == 3


def test_status_is_validated_on_status_subresource(c, ns):
    c.ok("POST", W(ns), widget())
    r = c.req("PATCH", W(ns, "w1") + "/status", {"status": {"phase": "Bogus"}}, "application/merge-patch+json")
    assert r.status_code == 422
    assert 'status.phase: Unsupported value: "Bogus": supported values: "Pending", "Done"' in r.json()["message"]


# --------------------------------------------------------------------------- patches


def test_json_patch_test_op_failure_is_422(c, ns):
    c.ok("POST", CM(ns), {"metadata": {"name": "a"}})
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
           {"op": "add", "path": "/data", "value": {"k": "v"}}]
    r = c.req("PATCH", CM(ns, "a"), ops, "application/json-patch+json")
    assert r.status_code == 422 and r.json()["reason"] == "Invalid"
    cur = c.ok("GET", CM(ns, "a"))
    ops[0]["value"] = cur["metadata"]["resourceVersion"]
    assert c.ok("PATCH", CM(ns, "a"), ops, "application/json-patch+json")["data"] == {"k": "v"}


def test_merge_patch_with_stale_resource_version_is_409(c, ns):
    c.ok("POST", CM(ns), {"metadata": {"name": "a"}})
    r = c.req("PATCH", CM(ns, "a"), {"metadata": {"resourceVersion": "1"}, "data": {"a": "b"}},
              "application/merge-patch+json")
    assert r.status_code == 409


def test_strategic_merge_patch_merges_containers_and_env_by_name(c, ns):
    dep = {"metadata": {"name": "d"}, "spec": {"selector": {"matchLabels": {"app": "d"}}, "template": {
        "metadata": {"labels": {"app": "d"}}, "spec": {"containers": [
        {"name": "app", "image": "a:1", "env": [{"name": "A", "value": "1"}]},
        {"name": "sidecar", "image": "s:1"}]}}}}
    c.ok("POST", f"/apis/apps/v1/namespaces/{ns}/deployments", dep)
    patch = {"spec": {"template": {"spec": {"containers": [
        {"name": "app", "image": "a:2", "env": [{"name": "B", "value": "2"}]}]}}}}
    out = c.ok("PATCH", f"/apis/apps/v1/namespaces/{ns}/deployments/d", patch,
               "application/strategic-merge-patch+json")
    containers = out["spec"]["template"]["spec"]["containers"]
    assert [x["name"] for x in containers] == ["app", "sidecar"]
    assert containers[0]["image"] == "a:2"
    assert containers[0]["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]
    assert out["metadata"]["generation"] == 2


def test_strategic_merge_patch_on_custom_resource_is_415(c, ns):
    c.ok("POST", W(ns), widget())
    r = c.req("PATCH", W(ns, "w1"), {"spec": {"maxSteps": 2}}, "application/strategic-merge-patch+json")
    assert r.status_code == 415


def test_server_side_apply_creates_then_merges(c, ns):
    body = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  x: '1'\n"
    r = c.req("PATCH", CM(ns, "a"), body, "application/apply-patch+yaml", fieldManager="t")
    assert r.status_code == 201 and r.json()["data"] == {"x": "1"}
    out = c.ok("PATCH", CM(ns, "a"), {"data": {"y": "2"}}, "application/apply-patch+yaml", fieldManager="t")
    assert out["data"] == {"x": "1", "y": "2"}


def test_server_side_apply_requires_field_manager(c, ns):
    r = c.req("PATCH", CM(ns, "a"), {"metadata": {"name": "a"}}, "application/apply-patch+yaml")
    assert r.status_code == 400
    assert r.json()["message"] == "PATCH requests with apply patch type require fieldManager"


def test_protobuf_body_is_415(c, ns):
    r = c.req("POST", CM(ns), b"k8s\x00\x0a", "application/vnd.kubernetes.protobuf")
    assert r.status_code == 415 and r.json()["reason"] == "UnsupportedMediaType"


def test_label_values_are_validated(c, ns):
    r = c.req("POST", CM(ns), {"metadata": {"name": "a", "labels": {"perennial.ai/run": "x" * 64}}})
    assert r.status_code == 422
    assert r.json()["message"] == (f'ConfigMap "a" is invalid: metadata.labels: Invalid value: "{"x" * 64}": '
                                   "must be no more than 63 characters")
    r = c.req("POST", CM(ns), {"metadata": {"name": "a", "labels": {"app": "has space"}}})
    assert r.status_code == 422 and "a valid label must be an empty string" in r.json()["message"]


def test_owner_reference_needs_uid_and_one_controller(c, ns):
    r = c.req("POST", CM(ns), {"metadata": {"name": "a", "ownerReferences": [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "o"}]}})
    assert r.status_code == 422
    assert "metadata.ownerReferences[0].uid: Invalid value: \"\": uid must not be empty" in r.json()["message"]


def test_job_pod_template_is_immutable(c, ns):
    job = c.ok("POST", f"/apis/batch/v1/namespaces/{ns}/jobs",
               {"metadata": {"name": "j"}, "spec": {"template": {"spec": {"containers": [{"name": "t", "image": "a"}]}}}})
    job["spec"]["template"]["spec"]["containers"][0]["image"] = "b"
    r = c.req("PUT", f"/apis/batch/v1/namespaces/{ns}/jobs/j", job)
    assert r.status_code == 422
    assert r.json()["message"] == ('Job.batch "j" is invalid: spec.template: Invalid value: core.PodTemplateSpec{...}: '
                                   "field is immutable")
    c.ok("PATCH", f"/apis/batch/v1/namespaces/{ns}/jobs/j", {"spec": {"suspend": True}}, "application/merge-patch+json")


def test_scale_subresource_of_deployments(c, ns):
    dep = {"metadata": {"name": "d"}, "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "d"}},
                                               "template": {"metadata": {"labels": {"app": "d"}}}}}
    c.ok("POST", f"/apis/apps/v1/namespaces/{ns}/deployments", dep)
    scale = c.ok("GET", f"/apis/apps/v1/namespaces/{ns}/deployments/d/scale")
    assert scale["kind"] == "Scale" and scale["spec"] == {"replicas": 1}
    assert scale["status"]["selector"] == "app=d"
    out = c.ok("PATCH", f"/apis/apps/v1/namespaces/{ns}/deployments/d/scale", {"spec": {"replicas": 3}},
               "application/merge-patch+json")
    assert out["spec"]["replicas"] == 3
    assert c.ok("GET", f"/apis/apps/v1/namespaces/{ns}/deployments/d")["spec"]["replicas"] == 3


def _deployment(**container) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
            "spec": {"selector": {"matchLabels": {"app": "d"}},
                     "template": {"metadata": {"labels": {"app": "d"}},
                                  "spec": {"containers": [{"name": "c", "image": "i", **container}]}}}}


def test_builtin_unknown_fields_are_dropped_with_a_warning_or_refused_when_strict(c, ns):
    pytest.importorskip("kubernetes_validate")
    path = f"/apis/apps/v1/namespaces/{ns}/deployments"
    r = c.req("POST", path, _deployment(imagee="typo"), fieldValidation="Strict")
    assert r.status_code == 400
    assert r.json()["message"] == ('Deployment in version "v1" cannot be handled as a Deployment: strict decoding '
                                   'error: unknown field "spec.template.spec.containers[0].imagee"')
    r = c.req("POST", path, _deployment(imagee="typo"))
    assert r.status_code == 201
    assert "imagee" not in r.json()["spec"]["template"]["spec"]["containers"][0]
    assert r.headers["Warning"] == '299 - "unknown field \\"spec.template.spec.containers[0].imagee\\""'


def test_builtin_wrong_types_and_missing_required_fields(c, ns):
    pytest.importorskip("kubernetes_validate")
    path = f"/apis/apps/v1/namespaces/{ns}/deployments"
    r = c.req("POST", path, _deployment(ports=[{"containerPort": "80"}]))
    assert r.status_code == 400
    assert r.json()["message"].startswith('Deployment in version "v1" cannot be handled as a Deployment: json: '
                                          "cannot unmarshal string into Go struct field "
                                          ".spec.template.spec.containers[0].ports[0].containerPort")
    bad = _deployment()
    del bad["spec"]["template"]["spec"]["containers"][0]["name"]
    r = c.req("POST", path, bad)
    assert r.status_code == 422
    assert r.json()["message"] == ('Deployment.apps "d" is invalid: spec.template.spec.containers[0].name: '
                                   "Required value")


def test_service_names_must_be_dns_1035_labels(c, ns):
    r = c.req("POST", f"/api/v1/namespaces/{ns}/services", {"metadata": {"name": "1svc"}, "spec": {"ports": []}})
    assert r.status_code == 422 and "a DNS-1035 label must consist of" in r.json()["message"]


# --------------------------------------------------------------------------- deletion


def test_delete_with_finalizers_sets_deletion_timestamp_until_finalizers_go(c, ns):
    c.ok("POST", W(ns), {**widget(), "metadata": {"name": "w1", "finalizers": ["x/y"]}})
    out = c.ok("DELETE", W(ns, "w1"))
    assert out["metadata"]["deletionTimestamp"] and out["metadata"]["deletionGracePeriodSeconds"] == 0
    assert c.ok("GET", W(ns, "w1"))["metadata"]["deletionTimestamp"]
    r = c.req("PATCH", W(ns, "w1"), {"metadata": {"finalizers": ["x/y", "new/one"]}}, "application/merge-patch+json")
    assert r.status_code == 422 and "no new finalizers can be added" in r.json()["message"]
    c.ok("PATCH", W(ns, "w1"), {"metadata": {"finalizers": None}}, "application/merge-patch+json")
    assert c.req("GET", W(ns, "w1")).status_code == 404


def test_delete_without_finalizers_removes_immediately(c, ns):
    c.ok("POST", CM(ns), {"metadata": {"name": "a"}})
    out = c.ok("DELETE", CM(ns, "a"))
    assert out["status"] == "Success"
    assert c.req("GET", CM(ns, "a")).status_code == 404


def test_owner_deletion_garbage_collects_dependents_recursively(c, ns):
    owner = c.ok("POST", W(ns), widget())
    def ref(o: dict, controller: bool = True) -> list[dict]:
        return [{"apiVersion": o["apiVersion"], "kind": o["kind"], "name": o["metadata"]["name"],
                 "uid": o["metadata"]["uid"], "controller": controller, "blockOwnerDeletion": True}]

    child = c.ok("POST", f"/apis/batch/v1/namespaces/{ns}/jobs",
                 {"metadata": {"name": "job", "ownerReferences": ref(owner)}})
    c.ok("POST", f"/api/v1/namespaces/{ns}/pods", {"metadata": {"name": "pod", "ownerReferences": ref(child)}})
    other = c.ok("POST", CM(ns), {"metadata": {"name": "other-owner"}})
    c.ok("POST", CM(ns), {"metadata": {"name": "shared", "ownerReferences": ref(owner) + ref(other, False)}})
    c.ok("DELETE", W(ns, "w1"))
    assert c.req("GET", f"/apis/batch/v1/namespaces/{ns}/jobs/job").status_code == 404
    assert c.req("GET", f"/api/v1/namespaces/{ns}/pods/pod").status_code == 404
    assert c.req("GET", CM(ns, "shared")).status_code == 200  # another owner is alive


def test_deleting_namespace_deletes_its_objects(c, ns):
    c.ok("POST", CM(ns), {"metadata": {"name": "a"}})
    c.ok("POST", W(ns), {**widget(), "metadata": {"name": "w1", "finalizers": ["x/y"]}})
    c.ok("DELETE", f"/api/v1/namespaces/{ns}")
    assert c.req("GET", CM(ns, "a")).status_code == 404
    assert c.ok("GET", f"/api/v1/namespaces/{ns}")["status"]["phase"] == "Terminating"
    r = c.req("POST", CM(ns), {"metadata": {"name": "b"}})
    assert r.status_code == 403
    assert r.json()["message"] == (f'configmaps "b" is forbidden: unable to create new content in namespace {ns} '
                                   "because it is being terminated")
    c.ok("PATCH", W(ns, "w1"), {"metadata": {"finalizers": []}}, "application/merge-patch+json")
    assert c.req("GET", f"/api/v1/namespaces/{ns}").status_code == 404


# --------------------------------------------------------------------------- lists and selectors


def test_list_kinds_cluster_wide_and_namespaced(c, ns):
    c.ok("POST", CM(ns), {"metadata": {"name": "a"}})
    lst = c.ok("GET", CM(ns))
    assert lst["kind"] == "ConfigMapList" and lst["apiVersion"] == "v1"
    assert int(lst["metadata"]["resourceVersion"]) > 0 and [i["metadata"]["name"] for i in lst["items"]] == ["a"]
    everywhere = c.ok("GET", "/api/v1/configmaps")
    assert any(i["metadata"]["namespace"] == ns for i in everywhere["items"])
    assert c.ok("GET", f"/apis/{GROUP}/v1/widgets")["kind"] == "WidgetList"


@pytest.mark.parametrize("selector,expected", [
    ("app=a", ["a1", "a2"]), ("app==a", ["a1", "a2"]), ("app!=a", ["b", "none"]),
    ("app in (a,b)", ["a1", "a2", "b"]), ("app notin (a)", ["b", "none"]), ("tier", ["a1"]),
    ("!tier", ["a2", "b", "none"]), ("app=a,tier=web", ["a1"]),
])
def test_label_selectors(c, ns, selector, expected):
    for name, labels in [("a1", {"app": "a", "tier": "web"}), ("a2", {"app": "a"}), ("b", {"app": "b"}),
                         ("none", {})]:
        c.ok("POST", CM(ns), {"metadata": {"name": name, "labels": labels}})
    got = [i["metadata"]["name"] for i in c.ok("GET", CM(ns), labelSelector=selector)["items"]]
    assert got == expected


def test_field_selectors(c, ns):
    for name in ("a", "b"):
        c.ok("POST", CM(ns), {"metadata": {"name": name}})
    assert [i["metadata"]["name"] for i in c.ok("GET", CM(ns), fieldSelector="metadata.name=b")["items"]] == ["b"]
    names = {i["metadata"]["name"] for i in c.ok("GET", "/api/v1/configmaps",
                                                 fieldSelector=f"metadata.namespace={ns}")["items"]}
    assert names == {"a", "b"}
    assert [i["metadata"]["name"] for i in c.ok("GET", CM(ns), fieldSelector="metadata.name!=b")["items"]] == ["a"]


# --------------------------------------------------------------------------- watch


def _events(resp, n: int) -> list[dict]:
    out = []
    for line in resp.iter_lines():
        if line:
            out.append(json.loads(line))
            if len(out) == n:
                break
    return out


def test_watch_streams_added_modified_deleted(c, ns):
    r = requests.get(c.url + CM(ns), params={"watch": "true"}, stream=True, timeout=10)
    assert r.headers["Content-Type"].startswith("application/json")
    c.ok("POST", CM(ns), {"metadata": {"name": "a"}})
    c.ok("PATCH", CM(ns, "a"), {"data": {"k": "v"}}, "application/merge-patch+json")
    c.ok("DELETE", CM(ns, "a"))
    events = _events(r, 3)
    r.close()
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert events[1]["object"]["data"] == {"k": "v"}


def test_watch_without_resource_version_starts_with_synthetic_added_events(c, ns):
    c.ok("POST", CM(ns), {"metadata": {"name": "a"}})
    r = requests.get(c.url + CM(ns), params={"watch": "true", "sendInitialEvents": "true",
                                             "resourceVersionMatch": "NotOlderThan", "allowWatchBookmarks": "true"},
                     stream=True, timeout=10)
    events = _events(r, 2)
    r.close()
    assert events[0]["type"] == "ADDED" and events[0]["object"]["metadata"]["name"] == "a"
    assert events[1]["type"] == "BOOKMARK"
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_watch_resumes_from_resource_version(c, ns):
    first = c.ok("POST", CM(ns), {"metadata": {"name": "a"}})
    c.ok("POST", CM(ns), {"metadata": {"name": "b"}})
    r = requests.get(c.url + CM(ns), params={"watch": "1", "resourceVersion": first["metadata"]["resourceVersion"]},
                     stream=True, timeout=10)
    events = _events(r, 1)
    r.close()
    assert events[0]["type"] == "ADDED" and events[0]["object"]["metadata"]["name"] == "b"


def test_watch_with_too_old_resource_version_is_410(c, ns, monkeypatch):
    server = APIServer()
    store = server.store
    rt = store.lookup("", "v1", "configmaps")
    store.history[rt.key] = type(store.history[rt.key])(maxlen=2)
    for i in range(4):
        store.create(rt, "default", {"metadata": {"name": f"c{i}"}})
    import asyncio

    async def go():
        await server.start()
        try:
            def get():
                r = requests.get(server.url + "/api/v1/namespaces/default/configmaps",
                                 params={"watch": "true", "resourceVersion": "1"}, stream=True, timeout=10)
                return _events(r, 1)
            return await asyncio.to_thread(get)
        finally:
            await server.stop()

    (event,) = asyncio.run(go())
    assert event["type"] == "ERROR"
    assert event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"
    assert event["object"]["message"].startswith("too old resource version: 1")


def test_watch_honours_timeout_and_sends_bookmarks(c, ns, monkeypatch):
    monkeypatch.setattr(apiserver_mod, "BOOKMARK_INTERVAL", 0.2)
    t0 = time.monotonic()
    r = requests.get(c.url + CM(ns), params={"watch": "true", "timeoutSeconds": "1", "allowWatchBookmarks": "true"},
                     stream=True, timeout=10)
    lines = [json.loads(x) for x in r.iter_lines() if x]
    elapsed = time.monotonic() - t0
    assert 0.9 < elapsed < 5
    assert lines and all(e["type"] == "BOOKMARK" for e in lines)
    assert lines[0]["object"]["metadata"]["resourceVersion"]


def test_watch_stays_open_across_idle_periods(c, ns, monkeypatch):
    monkeypatch.setattr(apiserver_mod, "BOOKMARK_INTERVAL", 0.2)  # many idle turns of the watch loop
    r = requests.get(c.url + CM(ns), params={"watch": "true"}, stream=True, timeout=10)
    time.sleep(1.0)
    c.ok("POST", CM(ns), {"metadata": {"name": "late"}})
    (event,) = _events(r, 1)
    r.close()
    assert event["type"] == "ADDED" and event["object"]["metadata"]["name"] == "late"


def test_watch_cluster_scoped_namespaces(c):
    r = requests.get(c.url + "/api/v1/namespaces", params={"watch": "true", "fieldSelector": "metadata.name=w-ns"},
                     stream=True, timeout=10)
    c.ok("POST", "/api/v1/namespaces", {"metadata": {"name": "w-ns"}})
    c.ok("DELETE", "/api/v1/namespaces/w-ns")
    events = _events(r, 3)
    r.close()
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert events[1]["object"]["status"]["phase"] == "Terminating"


def test_watch_label_selector_sends_deleted_when_object_stops_matching(c, ns):
    c.ok("POST", CM(ns), {"metadata": {"name": "a", "labels": {"app": "x"}}})
    r = requests.get(c.url + CM(ns), params={"watch": "true", "labelSelector": "app=x"}, stream=True, timeout=10)
    c.ok("PATCH", CM(ns, "a"), {"metadata": {"labels": {"app": "y"}}}, "application/merge-patch+json")
    events = _events(r, 2)
    r.close()
    assert [e["type"] for e in events] == ["ADDED", "DELETED"]


# --------------------------------------------------------------------------- CRDs


def test_crd_creation_registers_resource_and_sets_conditions(c, ns):
    crd = c.ok("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
               widget_crd(plural="gizmos", kind="Gizmo"))
    assert crd["metadata"]["generation"] == 1
    got = c.ok("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/gizmos.{GROUP}")
    conds = {x["type"]: x["status"] for x in got["status"]["conditions"]}
    assert conds == {"NamesAccepted": "True", "Established": "True"}
    c.ok("POST", f"/apis/{GROUP}/v1/namespaces/{ns}/gizmos", {**widget("g"), "kind": "Gizmo"})
    c.ok("DELETE", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/gizmos.{GROUP}")
    assert c.req("GET", f"/apis/{GROUP}/v1/namespaces/{ns}/gizmos/g").status_code == 404
    assert "gizmos" not in {r["name"] for r in c.ok("GET", f"/apis/{GROUP}/v1")["resources"]}


def test_crd_with_broken_cel_rule_is_rejected(c):
    schema = copy.deepcopy(SCHEMA)
    schema["properties"]["spec"]["x-kubernetes-validations"] = [{"rule": "self.method =="}]
    r = c.req("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
              widget_crd(plural="brokens", kind="Broken", schema=schema))
    assert r.status_code == 422 and "compilation failed" in r.json()["message"]


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s["properties"]["spec"]["properties"].update(free={"description": "no type"}),
     "spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[free].type: Required value: "
     "must not be empty for specified object fields"),
    (lambda s: s["properties"]["spec"].update(additionalProperties={"type": "string"}),
     "spec.versions[0].schema.openAPIV3Schema.properties[spec].additionalProperties: Forbidden: "
     "additionalProperties and properties are mutual exclusive"),
    (lambda s: s["properties"]["spec"]["properties"]["tags"].update(uniqueItems=True),
     "spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[tags].uniqueItems: Forbidden: "
     "uniqueItems cannot be set to true since the runtime complexity becomes quadratic"),
    (lambda s: s["properties"]["spec"]["properties"].update(
        choice={"type": "string", "anyOf": [{"type": "string", "enum": ["a"]}]}),
     "spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[choice].anyOf[0].type: Forbidden: "
     "must be empty to be structural"),
    (lambda s: s["properties"]["spec"]["properties"]["method"].update(default="PPO"),
     "spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[method].default: Unsupported value: "
     '"PPO": supported values: "SFT", "DPO", "GRPO"'),
])
def test_crd_with_non_structural_schema_is_rejected(c, mutate, message):
    schema = copy.deepcopy(SCHEMA)
    mutate(schema)
    r = c.req("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
              widget_crd(plural="structs", kind="Struct", schema=schema))
    assert r.status_code == 422
    assert r.json()["message"] == f'CustomResourceDefinition.apiextensions.k8s.io "structs.{GROUP}" is invalid: {message}'


# --------------------------------------------------------------------------- schema validation


@pytest.mark.parametrize("spec,reason,message", [
    ({"method": "XYZ"}, "FieldValueNotSupported",
     'spec.method: Unsupported value: "XYZ": supported values: "SFT", "DPO", "GRPO"'),
    ({}, "FieldValueRequired", "spec.method: Required value"),
    ({"method": "SFT", "name": "ABC"}, "FieldValueInvalid",
     "spec.name: Invalid value: \"ABC\": spec.name in body should match '^[a-z]*$'"),
    ({"method": "SFT", "minSteps": "ten"}, "FieldValueTypeInvalid",
     'spec.minSteps: Invalid value: "string": spec.minSteps in body must be of type integer: "string"'),
    ({"method": "SFT", "tags": ["a", "b", "c"]}, "FieldValueTooMany",
     "spec.tags: Too many: 3: must have at most 2 items"),
    ({"method": "SFT", "name": "abcdefghijk"}, "FieldValueTooLong",
     "spec.name: Too long: may not be more than 10 bytes"),
    ({"method": "SFT", "name": ""}, "FieldValueInvalid",
     'spec.name: Invalid value: "": spec.name in body should be at least 1 chars long'),
    ({"method": "SFT", "maxSteps": 5000}, "FieldValueInvalid",
     "spec.maxSteps: Invalid value: 5000: spec.maxSteps in body should be less than or equal to 1000"),
    ({"method": "SFT", "minSteps": -1}, "FieldValueInvalid",
     "spec.minSteps: Invalid value: -1: spec.minSteps in body should be greater than or equal to 0"),
    ({"method": "SFT", "minSteps": 5, "maxSteps": 2}, "FieldValueInvalid",
     'spec: Invalid value: "object": `maxSteps` must be greater than or equal to `minSteps`'),
    ({"method": "SFT", "tags": ["a", "a"]}, "FieldValueInvalid", 'spec: Invalid value: "object": duplicate tag a'),
    ({"method": "SFT", "labels": {"a": 1}}, "FieldValueTypeInvalid",
     'spec.labels.a: Invalid value: "integer": spec.labels.a in body must be of type string: "integer"'),
    ({"method": "SFT", "note": None, "rate": True}, "FieldValueTypeInvalid",
     'spec.rate: Invalid value: "boolean": spec.rate in body must be of type integer,string: "boolean"'),
])
def test_schema_violation_is_422_with_apiserver_message(c, ns, spec, reason, message):
    r = c.req("POST", W(ns), {**widget(), "spec": spec})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["reason"] == "Invalid" and body["code"] == 422 and body["status"] == "Failure"
    assert body["message"] == f'Widget.{GROUP} "w1" is invalid: {message}'
    assert body["details"]["name"] == "w1" and body["details"]["group"] == GROUP
    assert body["details"]["kind"] == "Widget"
    cause = body["details"]["causes"][0]
    assert cause["reason"] == reason and message == f"{cause['field']}: {cause['message']}"


def test_several_violations_are_bracketed(c, ns):
    r = c.req("POST", W(ns), {**widget(), "spec": {"method": "XYZ", "name": "ABC"}})
    assert r.status_code == 422
    msg = r.json()["message"]
    assert msg.startswith(f'Widget.{GROUP} "w1" is invalid: [') and msg.endswith("]")
    assert len(r.json()["details"]["causes"]) == 2


def test_cel_transition_rule_uses_old_self_on_update(c, ns):
    c.ok("POST", W(ns), widget())
    r = c.req("PATCH", W(ns, "w1"), {"spec": {"method": "DPO"}}, "application/merge-patch+json")
    assert r.status_code == 422
    assert r.json()["message"] == f'Widget.{GROUP} "w1" is invalid: spec: Invalid value: "object": `method` is immutable'


def test_defaults_are_applied_and_unknown_fields_pruned(c, ns):
    obj = c.ok("POST", W(ns), {**widget(), "spec": {"method": "SFT", "bogus": 1, "note": None,
                                                    "extra": {"free": {"form": True}}, "rate": "50%"},
                               "junk": 1})
    assert obj["spec"] == {"method": "SFT", "minSteps": 1, "tags": [], "note": None,
                           "extra": {"free": {"form": True}}, "rate": "50%"}
    assert "junk" not in obj


def test_strict_field_validation_rejects_unknown_fields(c, ns):
    r = c.req("POST", W(ns), {**widget(), "spec": {"method": "SFT", "bogus": 1}}, fieldValidation="Strict")
    assert r.status_code == 400
    assert r.json()["message"] == ('Widget in version "v1" cannot be handled as a Widget: strict decoding error: '
                                   'unknown field "spec.bogus"')
    r = c.req("POST", W(ns), {**widget(), "spec": {"method": "SFT", "bogus": 1}}, fieldValidation="Warn")
    assert r.status_code == 201
    assert r.headers["Warning"] == '299 - "unknown field \\"spec.bogus\\""'


# --------------------------------------------------------------------------- tables


TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"


def test_table_output_uses_printer_columns(c, ns):
    c.ok("POST", W(ns), widget())
    c.ok("PATCH", W(ns, "w1") + "/status", {"status": {"conditions": [{"type": "Ready", "status": "True"}]}},
         "application/merge-patch+json")
    t = requests.get(c.url + W(ns), headers={"Accept": TABLE}).json()
    assert t["kind"] == "Table" and t["apiVersion"] == "meta.k8s.io/v1"
    assert [col["name"] for col in t["columnDefinitions"]] == ["Name", "Method", "Ready", "Age"]
    assert t["rows"][0]["cells"][:3] == ["w1", "SFT", "True"]
    assert t["rows"][0]["object"]["kind"] == "PartialObjectMetadata"


def test_table_output_for_builtins_mirrors_kubectl_columns(c, ns):
    c.ok("POST", CM(ns), {"metadata": {"name": "a"}, "data": {"x": "1", "y": "2"}})
    t = requests.get(c.url + CM(ns, "a"), headers={"Accept": TABLE}).json()
    assert [col["name"] for col in t["columnDefinitions"]] == ["Name", "Data", "Age"]
    assert t["rows"][0]["cells"][:2] == ["a", 2]
    c.ok("POST", f"/api/v1/namespaces/{ns}/pods", {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}})
    t = requests.get(c.url + f"/api/v1/namespaces/{ns}/pods", headers={"Accept": TABLE}).json()
    assert [col["name"] for col in t["columnDefinitions"] if col["priority"] == 0] == \
        ["Name", "Ready", "Status", "Restarts", "Age"]
    assert t["rows"][0]["cells"][:4] == ["p", "0/1", "Pending", 0]
    c.ok("POST", f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases", {"metadata": {"name": "l"}})
    t = requests.get(c.url + f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases", headers={"Accept": TABLE}).json()
    assert [col["name"] for col in t["columnDefinitions"]] == ["Name", "Age"]


def test_jsonpath_subset():
    obj = {"a": {"b": [{"t": "x", "v": 1}, {"t": "y", "v": 2}]}}
    assert jsonpath(obj, ".a.b[1].v") == 2
    assert jsonpath(obj, '.a.b[?(@.t=="y")].v') == 2
    assert jsonpath(obj, ".a.missing") is None


# --------------------------------------------------------------------------- pods, events, kubernetes client


def test_pod_logs_are_served_from_the_in_process_hook(srv, c, ns):
    c.ok("POST", f"/api/v1/namespaces/{ns}/pods", {"metadata": {"name": "p"}, "spec": {"containers": []}})
    srv.set_pod_log(ns, "p", "one\ntwo\n")
    srv.append_pod_log(ns, "p", "three\n")
    r = requests.get(c.url + f"/api/v1/namespaces/{ns}/pods/p/log")
    assert r.status_code == 200 and r.text == "one\ntwo\nthree\n"
    assert requests.get(c.url + f"/api/v1/namespaces/{ns}/pods/p/log", params={"tailLines": 1}).text == "three\n"
    assert requests.get(c.url + f"/api/v1/namespaces/{ns}/pods/q/log").status_code == 404


def test_pod_log_follow_streams_until_the_pod_ends(srv, c, ns):
    c.ok("POST", f"/api/v1/namespaces/{ns}/pods", {"metadata": {"name": "p"}, "spec": {"containers": []}})
    srv.set_pod_log(ns, "p", "step 1\n")
    r = requests.get(c.url + f"/api/v1/namespaces/{ns}/pods/p/log", params={"follow": "true"}, stream=True,
                     timeout=10)
    chunks = r.iter_content(chunk_size=None, decode_unicode=True)
    assert next(chunks) == "step 1\n"
    srv.append_pod_log(ns, "p", "step 2\n")
    assert next(chunks) == "step 2\n"
    c.ok("PATCH", f"/api/v1/namespaces/{ns}/pods/p/status", {"status": {"phase": "Succeeded"}},
         "application/merge-patch+json")
    assert list(chunks) == []  # the stream ends with the pod


def test_kubernetes_client_roundtrip(srv, ns):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    cfg = client.Configuration()
    cfg.host = srv.url
    api = client.ApiClient(cfg)
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="a"),
                                                             data={"k": "v"}))
    assert core.read_namespaced_config_map("a", ns).data == {"k": "v"}
    assert [x.metadata.name for x in core.list_namespaced_config_map(ns).items] == ["a"]
    core.patch_namespaced_config_map("a", ns, {"data": {"k": "w"}})
    assert core.read_namespaced_config_map("a", ns).data == {"k": "w"}
    core.create_namespaced_event(ns, client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name="a."), involved_object=client.V1ObjectReference(name="a"),
        reason="Tested", message="hello", type="Normal"))
    assert core.list_namespaced_event(ns).items[0].reason == "Tested"
    custom.create_namespaced_custom_object(GROUP, "v1", ns, "widgets", widget())
    with pytest.raises(ApiException) as exc:
        custom.create_namespaced_custom_object(GROUP, "v1", ns, "widgets", widget())
    assert exc.value.status == 409
    custom.patch_namespaced_custom_object_status(GROUP, "v1", ns, "widgets", "w1", {"status": {"phase": "Done"}})
    assert custom.get_namespaced_custom_object(GROUP, "v1", ns, "widgets", "w1")["status"] == {"phase": "Done"}
    core.delete_namespaced_config_map("a", ns)
    with pytest.raises(ApiException) as exc:
        core.read_namespaced_config_map("a", ns)
    assert exc.value.status == 404


def test_write_kubeconfig(tmp_path):
    import yaml

    path = write_kubeconfig(tmp_path / "cfg", "http://127.0.0.1:1234")
    cfg = yaml.safe_load(path.read_text())
    assert cfg["clusters"][0]["cluster"]["server"] == "http://127.0.0.1:1234"
    assert cfg["current-context"] == cfg["contexts"][0]["name"]


def test_transition_rules_correlate_list_items_by_map_keys():
    from perennial.local import validation

    schema = {"type": "object", "properties": {"regions": {
        "type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
        "items": {"type": "object", "properties": {"name": {"type": "string"}, "size": {"type": "integer"}},
                  "x-kubernetes-validations": [{"rule": "self.size >= oldSelf.size", "message": "may not shrink"}]}}}}
    old = {"regions": [{"name": "a", "size": 3}, {"name": "b", "size": 1}]}
    new = {"regions": [{"name": "b", "size": 2}, {"name": "a", "size": 2}, {"name": "c", "size": 0}]}
    errors = validation.validate(schema, new, old, root=False)
    assert [e.message for e in errors] == ['regions[1]: Invalid value: "object": may not shrink']


def test_concurrent_writers_from_threads_and_http_lose_no_watch_events(srv, c, ns):
    import threading

    r = requests.get(c.url + CM(ns), params={"watch": "true"}, stream=True, timeout=30)

    def http_writer(k: int) -> None:
        session = Client(c.url)
        for i in range(25):
            session.ok("POST", CM(ns), {"metadata": {"name": f"h{k}-{i}"}})

    def inproc_writer(k: int) -> None:
        for i in range(25):
            srv.create("v1", "configmaps", {"metadata": {"name": f"p{k}-{i}"}}, namespace=ns)

    threads = [threading.Thread(target=fn, args=(k,)) for k in range(4) for fn in (http_writer, inproc_writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = _events(r, 200)
    r.close()
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs) and len(set(rvs)) == 200
    assert {e["object"]["metadata"]["name"] for e in events} == {
        f"{p}{k}-{i}" for p in "hp" for k in range(4) for i in range(25)}


def test_multi_version_crd_serves_each_version_from_one_storage(c, ns):
    crd = widget_crd(plural="doodads", kind="Doodad")
    v1 = crd["spec"]["versions"][0]
    v1beta1 = {**copy.deepcopy(v1), "name": "v1beta1", "storage": False}
    crd["spec"]["versions"] = [v1, v1beta1]
    c.ok("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    c.ok("POST", f"/apis/{GROUP}/v1beta1/namespaces/{ns}/doodads",
         {**widget("d"), "apiVersion": f"{GROUP}/v1beta1", "kind": "Doodad"})
    got = c.ok("GET", f"/apis/{GROUP}/v1/namespaces/{ns}/doodads/d")
    assert got["apiVersion"] == f"{GROUP}/v1"
    out = c.ok("PATCH", f"/apis/{GROUP}/v1/namespaces/{ns}/doodads/d", {"spec": {"maxSteps": 4}},
               "application/merge-patch+json")
    assert out["spec"]["maxSteps"] == 4 and out["apiVersion"] == f"{GROUP}/v1"
    old = c.ok("GET", f"/apis/{GROUP}/v1beta1/namespaces/{ns}/doodads/d")
    assert old["apiVersion"] == f"{GROUP}/v1beta1" and old["spec"]["maxSteps"] == 4
    groups = {g["name"]: g for g in c.ok("GET", "/apis")["groups"]}
    assert groups[GROUP]["preferredVersion"]["version"] == "v1"


def test_deleting_a_crd_waits_for_the_finalizers_of_its_objects(c, ns):
    crd_path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/thingies.{GROUP}"
    c.ok("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", widget_crd(plural="thingies", kind="Thingy"))
    path = f"/apis/{GROUP}/v1/namespaces/{ns}/thingies"
    c.ok("POST", path, {**widget("t1"), "kind": "Thingy", "metadata": {"name": "t1", "finalizers": ["x/y"]}})
    c.ok("POST", path, {**widget("t2"), "kind": "Thingy"})
    c.ok("DELETE", crd_path)
    crd = c.ok("GET", crd_path)
    assert crd["metadata"]["deletionTimestamp"]
    assert {x["type"]: x["status"] for x in crd["status"]["conditions"]}["Terminating"] == "True"
    assert c.req("GET", f"{path}/t2").status_code == 404
    assert c.ok("GET", f"{path}/t1")["metadata"]["deletionTimestamp"]
    r = c.req("POST", path, {**widget("t3"), "kind": "Thingy"})
    assert r.status_code == 405
    c.ok("PATCH", f"{path}/t1", {"metadata": {"finalizers": None}}, "application/merge-patch+json")
    assert c.req("GET", crd_path).status_code == 404
    assert c.req("GET", path).status_code == 404


def test_go_unmarshal_type_names():
    # built-in kinds report wrong field types as Go's encoding/json does, not as CRD validation does
    from perennial.local.builtin_schema import _json_type

    assert [_json_type(v) for v in (True, 3, 1.5, "x", [], {}, None)] == ["bool", "number", "number", "string", "array", "object", "null"]


# --------------------------------------------------------------------------- defaulting, HPA versions, GC policies


def _job(name: str = "job", **spec) -> dict:
    return {"metadata": {"name": name}, "spec": {"template": {"spec": {
        "restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}, **spec}}


def test_builtins_are_defaulted_on_create_and_a_put_of_what_was_sent_is_a_no_op(c, ns):
    path = f"/apis/apps/v1/namespaces/{ns}/deployments"
    sent = _deployment(image="busybox:1")
    d = c.ok("POST", path, sent)
    assert d["spec"]["replicas"] == 1 and d["spec"]["strategy"]["type"] == "RollingUpdate"
    assert d["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] == "IfNotPresent"
    # a client that PUTs its own manifest back (without the defaults) changes nothing
    again = c.ok("PUT", f"{path}/d", {**sent, "metadata": {**sent["metadata"],
                                                           "resourceVersion": d["metadata"]["resourceVersion"]}})
    assert again["metadata"]["resourceVersion"] == d["metadata"]["resourceVersion"]
    assert again["metadata"]["generation"] == 1


def test_job_selector_is_generated_and_a_hand_written_one_refused(c, ns):
    path = f"/apis/batch/v1/namespaces/{ns}/jobs"
    job = c.ok("POST", path, _job())
    uid = job["metadata"]["uid"]
    assert job["spec"]["selector"] == {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    assert job["spec"]["template"]["metadata"]["labels"]["job-name"] == "job"
    r = c.req("POST", path, _job("mine", selector={"matchLabels": {"app": "x"}}))
    assert r.status_code == 422 and "`selector` not auto-generated" in r.json()["message"]
    manual = _job("manual", manualSelector=True, selector={"matchLabels": {"app": "x"}})
    manual["spec"]["template"]["metadata"] = {"labels": {"app": "x"}}
    assert c.ok("POST", path, manual)["spec"]["selector"] == {"matchLabels": {"app": "x"}}


def test_service_keeps_its_cluster_ip_when_replaced(c, ns):
    path = f"/api/v1/namespaces/{ns}/services"
    svc = c.ok("POST", path, {"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}})
    other = c.ok("POST", path, {"metadata": {"name": "t"}, "spec": {"ports": [{"port": 80}]}})
    assert svc["spec"]["clusterIP"] != other["spec"]["clusterIP"]
    assert svc["spec"]["ports"] == [{"port": 80, "protocol": "TCP", "targetPort": 80}]
    out = c.ok("PUT", f"{path}/s", {"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}})
    assert out["spec"]["clusterIP"] == svc["spec"]["clusterIP"]
    assert out["metadata"]["resourceVersion"] == svc["metadata"]["resourceVersion"]


HPA1 = "/apis/autoscaling/v1/namespaces/{ns}/horizontalpodautoscalers"
HPA2 = "/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers"


def test_hpa_is_served_as_v1_and_v2_from_one_storage(c, ns):
    groups = {g["name"]: g for g in c.ok("GET", "/apis")["groups"]}
    assert [v["version"] for v in groups["autoscaling"]["versions"]] == ["v2", "v1"]
    assert groups["autoscaling"]["preferredVersion"]["version"] == "v2"
    assert "horizontalpodautoscalers" in {r["name"] for r in c.ok("GET", "/apis/autoscaling/v1")["resources"]}
    ref = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "d"}
    v1 = c.ok("POST", HPA1.format(ns=ns), {"apiVersion": "autoscaling/v1", "kind": "HorizontalPodAutoscaler",
                                            "metadata": {"name": "h"},
                                            "spec": {"scaleTargetRef": ref, "maxReplicas": 4,
                                                     "targetCPUUtilizationPercentage": 50}})
    assert v1["apiVersion"] == "autoscaling/v1"
    assert v1["spec"] == {"scaleTargetRef": ref, "minReplicas": 1, "maxReplicas": 4,
                          "targetCPUUtilizationPercentage": 50}
    v2 = c.ok("GET", HPA2.format(ns=ns) + "/h")
    assert v2["apiVersion"] == "autoscaling/v2"
    assert v2["spec"]["metrics"] == [{"type": "Resource", "resource": {"name": "cpu", "target": {
        "type": "Utilization", "averageUtilization": 50}}}]
    c.ok("PATCH", HPA2.format(ns=ns) + "/h", {"spec": {"metrics": [
        {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}},
        {"type": "Pods", "pods": {"metric": {"name": "queue"}, "target": {"type": "AverageValue",
                                                                          "averageValue": "3"}}}]}},
         "application/merge-patch+json")
    v1 = c.ok("GET", HPA1.format(ns=ns) + "/h")
    assert v1["spec"]["targetCPUUtilizationPercentage"] == 70
    assert "autoscaling.alpha.kubernetes.io/metrics" in v1["metadata"]["annotations"]
    out = c.ok("PATCH", HPA1.format(ns=ns) + "/h", {"spec": {"targetCPUUtilizationPercentage": 90}},
               "application/merge-patch+json")
    assert out["apiVersion"] == "autoscaling/v1" and out["spec"]["targetCPUUtilizationPercentage"] == 90
    metrics = c.ok("GET", HPA2.format(ns=ns) + "/h")["spec"]["metrics"]
    assert [m.get("resource", {}).get("target", {}).get("averageUtilization") for m in metrics] == [90, None]
    assert [o["apiVersion"] for o in c.ok("GET", HPA1.format(ns=ns))["items"]] == ["autoscaling/v1"]
    no_op = c.ok("PUT", HPA1.format(ns=ns) + "/h", out)
    assert no_op["metadata"]["resourceVersion"] == out["metadata"]["resourceVersion"]


def _ref(o: dict, block: bool = True) -> list[dict]:
    return [{"apiVersion": o["apiVersion"], "kind": o["kind"], "name": o["metadata"]["name"],
             "uid": o["metadata"]["uid"], "controller": True, "blockOwnerDeletion": block}]


def test_foreground_deletion_waits_for_blocking_dependents(c, ns):
    owner = c.ok("POST", CM(ns), {"metadata": {"name": "owner"}})
    c.ok("POST", CM(ns), {"metadata": {"name": "blocker", "ownerReferences": _ref(owner),
                                       "finalizers": ["test/hold"]}})
    c.ok("POST", CM(ns), {"metadata": {"name": "plain", "ownerReferences": _ref(owner, block=False)}})
    out = c.ok("DELETE", CM(ns, "owner"), {"propagationPolicy": "Foreground"})
    assert out["metadata"]["deletionTimestamp"] and out["metadata"]["finalizers"] == ["foregroundDeletion"]
    assert c.req("GET", CM(ns, "plain")).status_code == 404  # dependents are deleted first
    assert c.ok("GET", CM(ns, "blocker"))["metadata"]["deletionTimestamp"]
    assert c.ok("GET", CM(ns, "owner"))["metadata"]["finalizers"] == ["foregroundDeletion"]
    c.ok("PATCH", CM(ns, "blocker"), {"metadata": {"finalizers": None}}, "application/merge-patch+json")
    assert c.req("GET", CM(ns, "blocker")).status_code == 404
    assert c.req("GET", CM(ns, "owner")).status_code == 404


def test_foreground_owner_goes_when_a_blocking_dependent_lets_go(c, ns):
    owner = c.ok("POST", CM(ns), {"metadata": {"name": "owner"}})
    c.ok("POST", CM(ns), {"metadata": {"name": "dep", "ownerReferences": _ref(owner), "finalizers": ["test/hold"]}})
    c.ok("DELETE", CM(ns, "owner"), propagationPolicy="Foreground")
    c.ok("PATCH", CM(ns, "dep"), {"metadata": {"ownerReferences": None}}, "application/merge-patch+json")
    assert c.req("GET", CM(ns, "owner")).status_code == 404


def test_orphan_deletion_strips_owner_references_and_keeps_dependents(c, ns):
    owner = c.ok("POST", CM(ns), {"metadata": {"name": "owner"}})
    other = c.ok("POST", CM(ns), {"metadata": {"name": "other"}})
    dep = c.ok("POST", CM(ns), {"metadata": {"name": "dep", "ownerReferences": _ref(owner) + [
        {**_ref(other)[0], "controller": False}]}})
    c.ok("DELETE", CM(ns, "owner"), {"propagationPolicy": "Orphan"})
    assert c.req("GET", CM(ns, "owner")).status_code == 404
    kept = c.ok("GET", CM(ns, "dep"))
    assert [r["name"] for r in kept["metadata"]["ownerReferences"]] == ["other"]
    assert int(kept["metadata"]["resourceVersion"]) > int(dep["metadata"]["resourceVersion"])


def test_deleting_a_batch_v1_job_orphans_its_pods_unless_told_otherwise(c, ns):
    jobs = f"/apis/batch/v1/namespaces/{ns}/jobs"
    pods = f"/api/v1/namespaces/{ns}/pods"
    for name in ("a", "b"):
        job = c.ok("POST", jobs, _job(name))
        c.ok("POST", pods, {"metadata": {"name": f"{name}-pod", "ownerReferences": _ref(job)},
                            "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
    r = c.req("DELETE", f"{jobs}/a")
    assert r.status_code == 200 and "child pods are preserved by default" in r.headers.get("Warning", "")
    assert "ownerReferences" not in c.ok("GET", f"{pods}/a-pod")["metadata"]
    c.ok("DELETE", f"{jobs}/b", {"propagationPolicy": "Background"})
    assert c.req("GET", f"{pods}/b-pod").status_code == 404


def test_unknown_propagation_policy_is_422(c, ns):
    c.ok("POST", CM(ns), {"metadata": {"name": "a"}})
    r = c.req("DELETE", CM(ns, "a"), {"propagationPolicy": "Sideways"})
    assert r.status_code == 422 and 'Unsupported value: "Sideways"' in r.json()["message"]


def test_validation_ratchets_unchanged_values_like_kube_apiserver():
    """A stricter schema does not reject writes that leave an old, now-invalid value as it was (a status
    write does not re-validate the spec); changing that value is validated."""
    server = start_in_thread()
    try:
        loose = copy.deepcopy(SCHEMA)
        server.apply_crd(widget_crd(schema=loose))
        c = Client(server.url)
        c.ok("POST", W("default"), widget("old", method="SFT", note="a rather long note"))
        strict = copy.deepcopy(SCHEMA)
        strict["properties"]["spec"]["properties"]["note"] = {"type": "string", "maxLength": 4}
        server.apply_crd(widget_crd(schema=strict))
        status = c.req("PATCH", W("default", "old") + "/status", {"status": {"phase": "Done"}}, "application/merge-patch+json")
        assert status.status_code == 200, status.text
        changed = c.req("PATCH", W("default", "old"), {"spec": {"note": "another long note"}}, "application/merge-patch+json")
        assert changed.status_code == 422 and "spec.note" in changed.text
    finally:
        server.stop()
