"""The embedded control plane serves networking.k8s.io/v1 NetworkPolicies as every real API server does.

Checked against Kubernetes' OpenAPI schema (the one `builtin_schema` uses for every built-in) and defaulted as
kube-apiserver defaults them (kubernetes pkg/apis/networking/v1/defaults.go): `policyTypes` unset is ["Ingress"],
plus "Egress" when there are egress rules; a port's `protocol` unset is TCP. A generation, bumped by spec changes.
"""

from __future__ import annotations

import json

import pytest
import requests
from perennial.local.apiserver import start_in_thread

NP = "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies"


@pytest.fixture(scope="module")
def url():
    server = start_in_thread()
    yield server.url
    server.stop()


def call(url: str, method: str, path: str, body=None, ctype: str = "application/json", **params) -> requests.Response:
    return requests.request(method, url + path, data=None if body is None else json.dumps(body), params=params or None,
                            headers={"Content-Type": ctype}, timeout=30)


def ok(url: str, method: str, path: str, body=None, ctype: str = "application/json", **params) -> dict:
    r = call(url, method, path, body, ctype, **params)
    assert r.status_code < 300, r.text
    return r.json()


@pytest.fixture
def ns(url, request) -> str:
    name = "np-" + str(abs(hash(request.node.name)) % 10**8)
    ok(url, "POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    return name


def policy(name: str, **spec) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name},
            "spec": {"podSelector": {"matchLabels": {"app": "a"}}, **spec}}


def test_discovery_serves_networkpolicies(url):
    groups = {g["name"]: g for g in ok(url, "GET", "/apis")["groups"]}
    assert groups["networking.k8s.io"]["preferredVersion"]["groupVersion"] == "networking.k8s.io/v1"
    resources = {r["name"]: r for r in ok(url, "GET", "/apis/networking.k8s.io/v1")["resources"]}
    np = resources["networkpolicies"]
    assert np["kind"] == "NetworkPolicy" and np["namespaced"] is True and "netpol" in np.get("shortNames", [])
    assert {"get", "list", "watch", "create", "patch", "update", "delete"} <= set(np["verbs"])


def test_policy_types_and_port_protocol_are_defaulted_as_kube_apiserver_does(url, ns):
    path = NP.format(ns=ns)
    # no policyTypes, no egress: Ingress only; ports without protocol: TCP
    a = ok(url, "POST", path, policy("ingress-only", ingress=[{"ports": [{"port": 8080}, {"port": "dns", "protocol": "UDP"}]}]))
    assert a["spec"]["policyTypes"] == ["Ingress"]
    assert a["spec"]["ingress"][0]["ports"] == [{"port": 8080, "protocol": "TCP"}, {"port": "dns", "protocol": "UDP"}]
    assert a["metadata"]["generation"] == 1
    # egress rules: Ingress and Egress
    b = ok(url, "POST", path, policy("both", egress=[{"ports": [{"port": 53}], "to": [{"namespaceSelector": {}}]}]))
    assert b["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert b["spec"]["egress"][0]["ports"] == [{"port": 53, "protocol": "TCP"}]
    # empty lists come back absent, as from kube-apiserver (protobuf storage, omitempty): no rule is no rule
    e = ok(url, "POST", path, policy("deny", policyTypes=["Ingress", "Egress"], ingress=[], egress=[{"to": [], "ports": []}]))
    assert e["spec"] == {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Ingress", "Egress"], "egress": [{}]}
    # given: kept as written, even with egress rules
    c = ok(url, "POST", path, policy("egress", policyTypes=["Egress"], egress=[{}]))
    assert c["spec"]["policyTypes"] == ["Egress"]
    # an empty list is no policy types: defaulted (len(obj.Spec.PolicyTypes) == 0)
    d = ok(url, "POST", path, policy("empty", policyTypes=[]))
    assert d["spec"]["policyTypes"] == ["Ingress"]


def test_a_patch_that_changes_nothing_after_defaulting_keeps_the_object(url, ns):
    path = NP.format(ns=ns)
    made = ok(url, "POST", path, policy("p", ingress=[{"ports": [{"port": 8080}]}]))
    same = ok(url, "PATCH", f"{path}/p", {"spec": {"ingress": [{"ports": [{"port": 8080}]}]}}, "application/merge-patch+json")
    assert same["metadata"]["resourceVersion"] == made["metadata"]["resourceVersion"]
    moved = ok(url, "PATCH", f"{path}/p", {"spec": {"ingress": [{"ports": [{"port": 9090}]}]}}, "application/merge-patch+json")
    assert moved["metadata"]["generation"] == 2 and moved["spec"]["ingress"][0]["ports"] == [{"port": 9090, "protocol": "TCP"}]
    assert [o["metadata"]["name"] for o in ok(url, "GET", path)["items"]] == ["p"]


def test_networkpolicies_are_checked_against_the_openapi_schema(url, ns):
    pytest.importorskip("kubernetes_validate")
    path = NP.format(ns=ns)
    r = call(url, "POST", path, policy("typo", ingres=[{}]), fieldValidation="Strict")
    assert r.status_code == 400
    assert 'unknown field "spec.ingres"' in r.json()["message"]
    r = call(url, "POST", path, policy("typed", ingress=[{"ports": [{"port": [80]}]}]))
    assert r.status_code == 400, r.text
    bad = policy("noselector")
    del bad["spec"]["podSelector"]
    # OpenAPI says required, but Go's decoding zero-fills it: an empty selector (every pod), as kube-apiserver stores it
    assert ok(url, "POST", path, bad)["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
