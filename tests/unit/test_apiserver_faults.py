"""Fault injection and request accounting of the embedded API server, seen from raw HTTP clients."""

from __future__ import annotations

import json
import time

import pytest
import requests

from perennial.local.apiserver import start_in_thread
from perennial.local.faults import ALL_FAULTS, FaultConfig, FaultInjector, RequestCounter, client_of

KOPF = {"User-Agent": "kopf/1.45.0"}
OPERATOR = {"User-Agent": "perennial-operator/0.1.0"}
OTHER = {"User-Agent": "curl/8"}
CMS = "/api/v1/namespaces/default/configmaps"


@pytest.fixture
def srv():
    server = start_in_thread()
    yield server
    server.stop()


def _req(srv, method, path, body=None, headers=KOPF, ctype="application/json", **params):
    return requests.request(method, srv.url + path, data=None if body is None else json.dumps(body),
                            params=params or None, headers={**headers, "Content-Type": ctype}, timeout=10)


def _cm(srv, name="a", headers=OTHER):
    r = _req(srv, "POST", CMS, {"metadata": {"name": name}, "data": {"k": "v"}}, headers)
    assert r.status_code == 201, r.text
    return r.json()


def test_faults_are_off_by_default(srv):
    _cm(srv)
    codes = {_req(srv, "GET", f"{CMS}/a").status_code for _ in range(50)}
    assert codes == {200} and srv.fault_counts() == {}


def test_rate_zero_injects_nothing_even_when_faults_are_listed(srv):
    srv.set_faults(FaultConfig(rate=0.0, faults=ALL_FAULTS))
    _cm(srv)
    assert {_req(srv, "GET", f"{CMS}/a").status_code for _ in range(50)} == {200}
    assert srv.fault_counts() == {}


def test_500_is_an_internal_error_status(srv):
    _cm(srv)
    srv.set_faults(FaultConfig(rate=1.0, faults=("500",)))
    r = _req(srv, "GET", f"{CMS}/a")
    body = r.json()
    assert r.status_code == 500 and body["kind"] == "Status" and body["reason"] == "InternalError"
    assert srv.fault_counts() == {"500": 1}


def test_429_says_when_to_retry_in_the_header_and_the_status(srv):
    srv.set_faults(FaultConfig(rate=1.0, faults=("429",), retry_after_seconds=3))
    r = _req(srv, "GET", CMS)
    assert r.status_code == 429 and r.headers["Retry-After"] == "3"
    assert r.json()["reason"] == "TooManyRequests" and r.json()["details"]["retryAfterSeconds"] == 3


def test_409_only_hits_updates_and_patches_and_changes_nothing(srv):
    cm = _cm(srv)
    srv.set_faults(FaultConfig(rate=1.0, faults=("409",)))
    assert _req(srv, "POST", CMS, {"metadata": {"name": "b"}}).status_code == 201  # never on create
    assert _req(srv, "GET", f"{CMS}/a").status_code == 200
    r = _req(srv, "PATCH", f"{CMS}/a", {"data": {"k": "w"}}, ctype="application/merge-patch+json")
    assert r.status_code == 409 and r.json()["reason"] == "Conflict"
    assert 'configmaps "a"' in r.json()["message"]
    assert _req(srv, "PUT", f"{CMS}/a", {**cm, "data": {"k": "w"}}).status_code == 409
    srv.set_faults(None)
    assert _req(srv, "GET", f"{CMS}/a").json()["data"] == {"k": "v"}


def test_slow_delays_the_response(srv):
    _cm(srv)
    srv.set_faults(FaultConfig(rate=1.0, faults=("slow",), slow_ms=300))
    t0 = time.monotonic()
    r = _req(srv, "GET", f"{CMS}/a")
    assert r.status_code == 200 and time.monotonic() - t0 >= 0.3


def test_410_answers_a_watch_from_a_version_with_an_expired_event_and_spares_lists(srv):
    cm = _cm(srv)
    srv.set_faults(FaultConfig(rate=1.0, faults=("410",)))
    assert _req(srv, "GET", CMS).status_code == 200
    assert _req(srv, "GET", f"{CMS}/a", resourceVersion="1").status_code == 200
    r = _req(srv, "GET", CMS, watch="true", resourceVersion=cm["metadata"]["resourceVersion"])
    assert r.status_code == 200
    events = [json.loads(line) for line in r.text.splitlines()]
    assert len(events) == 1 and events[0]["type"] == "ERROR"
    assert events[0]["object"]["code"] == 410 and events[0]["object"]["reason"] == "Expired"
    # a watch without a version starts from the current state: nothing to expire
    srv.set_faults(FaultConfig(rate=1.0, faults=("410",)))
    r = _req(srv, "GET", CMS, watch="true", timeoutSeconds="1")
    assert [json.loads(line)["type"] for line in r.text.splitlines()] == ["ADDED"]
    assert srv.fault_counts() == {}


def test_watch_close_cuts_the_stream_mid_way(srv):
    _cm(srv)
    srv.set_faults(FaultConfig(rate=1.0, faults=("watch-close",), watch_close_after=(0.2, 0.2)))
    t0 = time.monotonic()
    lines = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError):  # no end of the chunked body: a cut
        with requests.get(srv.url + CMS, params={"watch": "true", "timeoutSeconds": "30"}, headers=KOPF,
                          stream=True, timeout=10) as r:
            for line in r.iter_lines():
                lines.append(json.loads(line)["type"])
    assert lines == ["ADDED"] and 0.2 <= time.monotonic() - t0 < 5
    assert srv.fault_counts() == {"watch-close": 1}


def test_the_filter_spares_other_user_agents(srv):
    _cm(srv)
    srv.set_faults(FaultConfig(rate=1.0, faults=("500",)))
    assert _req(srv, "GET", f"{CMS}/a", headers=OTHER).status_code == 200
    assert _req(srv, "GET", f"{CMS}/a", headers={"User-Agent": "kubectl/v1.32.0"}).status_code == 200
    assert _req(srv, "GET", f"{CMS}/a", headers=KOPF).status_code == 500
    assert _req(srv, "GET", f"{CMS}/a", headers=OPERATOR).status_code == 500
    srv.set_faults(FaultConfig(rate=1.0, faults=("500",), user_agents=("curl",)))
    assert _req(srv, "GET", f"{CMS}/a", headers=OTHER).status_code == 500
    assert _req(srv, "GET", f"{CMS}/a", headers=KOPF).status_code == 200


def test_discovery_is_never_faulted(srv):
    srv.set_faults(FaultConfig(rate=1.0, faults=("500",)))
    assert _req(srv, "GET", "/api").status_code == 200
    assert _req(srv, "GET", "/apis/apps/v1").status_code == 200


def _codes(srv, seed):
    srv.set_faults(FaultConfig(rate=0.5, faults=("500", "429", "slow"), slow_ms=1, seed=seed))
    return [_req(srv, "GET", f"{CMS}/a").status_code for _ in range(40)]


def test_seeded_runs_are_reproducible(srv):
    _cm(srv)
    first, again, other = _codes(srv, 7), _codes(srv, 7), _codes(srv, 8)
    assert first == again and first != other
    assert {200, 429, 500} <= set(first)


def test_faults_are_set_and_read_over_http(srv):
    _cm(srv)
    r = _req(srv, "PUT", "/debug/perennial/faults", {"rate": 1, "faults": ["429"], "seed": 1}, OTHER)
    assert r.status_code == 200 and r.json()["config"]["faults"] == ["429"]
    assert _req(srv, "GET", f"{CMS}/a").status_code == 429
    got = _req(srv, "GET", "/debug/perennial/faults", headers=OTHER).json()
    assert got["injected"] == {"429": 1} and got["config"]["rate"] == 1
    bad = _req(srv, "PUT", "/debug/perennial/faults", {"rate": 2}, OTHER)
    assert bad.status_code == 400 and "rate" in bad.json()["message"]
    assert _req(srv, "PUT", "/debug/perennial/faults", {"faults": ["teapot"]}, OTHER).status_code == 400
    assert _req(srv, "PUT", "/debug/perennial/faults", {}, OTHER).json()["config"]["rate"] == 0
    assert _req(srv, "GET", f"{CMS}/a").status_code == 200


def test_faults_at_start():
    server = start_in_thread(faults=FaultConfig(rate=1.0, faults=("500",)))
    try:
        assert _req(server, "GET", CMS).status_code == 500
    finally:
        server.stop()


def test_fault_config_round_trips_and_checks_its_fields():
    cfg = FaultConfig(rate=0.25, faults=("500", "slow"), seed=3, user_agents=("x",), watch_close_after=(1, 2))
    assert FaultConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError):
        FaultConfig.from_dict({"rates": 1})
    with pytest.raises(ValueError):
        FaultConfig(watch_close_after=(2, 1))


def test_injector_draws_only_applicable_faults():
    inj = FaultInjector(FaultConfig(rate=1.0, faults=("409", "410", "watch-close"), seed=1))
    assert inj.draw("kopf/1", "create", False) is None and inj.draw("kopf/1", "get", True) is None
    assert inj.draw("kopf/1", "list", False) is None
    assert inj.draw("kopf/1", "patch", False).kind == "409"
    assert inj.draw("kopf/1", "watch", False).kind == "watch-close"
    assert {inj.draw("kopf/1", "watch", True).kind for _ in range(30)} == {"410", "watch-close"}


# --------------------------------------------------------------------------- accounting


def test_requests_are_counted_by_client_verb_resource_and_code(srv):
    srv.reset_request_counts()
    _req(srv, "POST", CMS, {"metadata": {"name": "a"}})
    _req(srv, "POST", CMS, {"metadata": {"name": "a"}})  # 409 AlreadyExists
    _req(srv, "GET", f"{CMS}/a")
    _req(srv, "GET", CMS, headers=OPERATOR)
    _req(srv, "GET", "/api/v1/configmaps", headers=OPERATOR)
    _req(srv, "GET", CMS, watch="true", timeoutSeconds="0")
    _req(srv, "PUT", f"{CMS}/a", {"metadata": {"name": "a"}, "data": {"x": "1"}})
    _req(srv, "PATCH", f"{CMS}/a", {"data": {"x": "1"}}, ctype="application/merge-patch+json")
    _req(srv, "GET", "/api/v1/namespaces/default/pods/nope")
    _req(srv, "PATCH", "/api/v1/namespaces/default/status", {}, ctype="application/merge-patch+json",
         headers=OTHER)
    _req(srv, "DELETE", f"{CMS}/a")
    _req(srv, "DELETE", CMS, headers=OTHER)
    _req(srv, "GET", "/apis/apps/v1", headers=OTHER)
    snap = srv.request_counts()
    rows = {(r["client"], r["verb"], r["resource"], r["code"]): r["count"] for r in snap["requests"]}
    assert rows == {
        ("kopf", "create", "configmaps", 201): 1, ("kopf", "create", "configmaps", 409): 1,
        ("kopf", "get", "configmaps", 200): 1, ("perennial-operator", "list", "configmaps", 200): 2,
        ("kopf", "watch", "configmaps", 200): 1, ("kopf", "update", "configmaps", 200): 1,
        ("kopf", "patch", "configmaps", 200): 1, ("kopf", "get", "pods", 404): 1,
        ("other", "patch", "namespaces/status", 200): 1,
        ("kopf", "delete", "configmaps", 200): 1, ("other", "deletecollection", "configmaps", 200): 1,
        ("other", "get", "/apis/apps/v1", 200): 1,
    }
    assert snap["total"] == 13
    assert srv.count(client="kopf", verb="patch") == 1 and srv.count(resource="configmaps") == 10


def test_no_op_patch_is_counted_but_leaves_the_resource_version(srv):
    cm = _cm(srv)
    srv.reset_request_counts()
    r = _req(srv, "PATCH", f"{CMS}/a", {"data": {"k": "v"}}, ctype="application/merge-patch+json")
    assert r.json()["metadata"]["resourceVersion"] == cm["metadata"]["resourceVersion"]
    assert srv.count(verb="patch", resource="configmaps", code=200) == 1


def test_custom_resource_subresources_are_counted_with_their_group(srv):
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "things.t.io"},
           "spec": {"group": "t.io", "scope": "Namespaced", "names": {"kind": "Thing", "plural": "things"},
                    "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                                  "schema": {"openAPIV3Schema": {"type": "object",
                                                                 "x-kubernetes-preserve-unknown-fields": True}}}]}}
    srv.apply_crd(crd)
    path = "/apis/t.io/v1/namespaces/default/things"
    _req(srv, "POST", path, {"metadata": {"name": "x"}})
    srv.reset_request_counts()
    _req(srv, "PATCH", f"{path}/x/status", {"status": {"a": 1}}, ctype="application/merge-patch+json")
    assert srv.request_counts()["requests"] == [
        {"client": "kopf", "verb": "patch", "resource": "t.io/things/status", "code": 200, "count": 1}]


def test_request_counts_over_http_and_reset(srv):
    _req(srv, "GET", CMS)
    snap = _req(srv, "GET", "/debug/perennial/requests", headers=OTHER).json()
    assert snap["total"] >= 1 and {"client": "kopf", "verb": "list", "resource": "configmaps", "code": 200,
                                    "count": 1} in snap["requests"]
    assert _req(srv, "DELETE", "/debug/perennial/requests", headers=OTHER).json() == snap
    assert _req(srv, "GET", "/debug/perennial/requests", headers=OTHER).json() == {"total": 0, "requests": []}


def test_injected_faults_are_counted_with_their_codes(srv):
    srv.reset_request_counts()
    srv.set_faults(FaultConfig(rate=1.0, faults=("429",)))
    _req(srv, "GET", CMS)
    assert srv.count(client="kopf", verb="list", code=429) == 1


def test_client_of():
    known = ("kopf", "perennial-operator")
    assert [client_of(u, known) for u in ("kopf/1.45", "perennial-operator/0.1", "kubectl/v1", "")] == [
        "kopf", "perennial-operator", "other", "other"]


def test_counter_count_filters():
    c = RequestCounter()
    c.add("kopf", "patch", "a", 200)
    c.add("kopf", "patch", "a", 200)
    c.add("kopf", "get", "a", 404)
    assert c.count(verb="patch") == 2 and c.count(code=404) == 1 and c.count() == 3
    c.reset()
    assert c.snapshot() == {"total": 0, "requests": []}
