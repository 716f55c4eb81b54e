"""RBAC authorization of service-account tokens in the embedded control plane (perennial.local.rbac).

Before: every authenticated request was allowed everything (one token); a service account could not exist.
"""

from __future__ import annotations

import pytest
import requests

from perennial.local import rbac
from perennial.local.apiserver import new_token, start_in_thread

SA = ("ops", "perennial")


@pytest.fixture
def server():
    s = start_in_thread(token=new_token())
    try:
        for ns in ("ops", "team-a", "team-b"):
            s.create("v1", "namespaces", {"metadata": {"name": ns}})
        yield s
    finally:
        s.stop()


def call(server, token, method, path, body=None, params=None, headers=None):
    return requests.request(method, server.url + path, json=body, params=params, timeout=10,
                            headers={"Authorization": f"Bearer {token}", **(headers or {})})


def admin(server, method, path, body=None):
    r = call(server, server.token, method, path, body)
    assert r.status_code < 300, r.text
    return r.json()


def bind(server, *, rules, namespace=None, cluster_role_for_namespace=False, name="r"):
    """A Role + RoleBinding in `namespace`, or a ClusterRole + ClusterRoleBinding (or RoleBinding to it)."""
    subject = [{"kind": "ServiceAccount", "name": SA[1], "namespace": SA[0]}]
    g = "/apis/rbac.authorization.k8s.io/v1"
    if namespace and not cluster_role_for_namespace:
        admin(server, "POST", f"{g}/namespaces/{namespace}/roles", {"metadata": {"name": name}, "rules": rules})
        ref = {"apiGroup": rbac.RBAC, "kind": "Role", "name": name}
    else:
        admin(server, "POST", f"{g}/clusterroles", {"metadata": {"name": name}, "rules": rules})
        ref = {"apiGroup": rbac.RBAC, "kind": "ClusterRole", "name": name}
    if namespace:
        admin(server, "POST", f"{g}/namespaces/{namespace}/rolebindings", {"metadata": {"name": name}, "roleRef": ref, "subjects": subject})
    else:
        admin(server, "POST", f"{g}/clusterrolebindings", {"metadata": {"name": name}, "roleRef": ref, "subjects": subject})


CM = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}}


def test_a_service_account_without_bindings_is_forbidden_with_kube_apiservers_status(server):
    token = server.issue_service_account_token(*SA)
    r = call(server, token, "GET", "/api/v1/namespaces/team-a/configmaps")
    assert r.status_code == 403
    assert r.json() == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Forbidden", "code": 403,
        "details": {"kind": "configmaps"},
        "message": 'configmaps is forbidden: User "system:serviceaccount:ops:perennial" cannot list resource "configmaps" '
                   'in API group "" in the namespace "team-a"'}
    # discovery and the public paths stay open to an authenticated identity; the debug endpoints do not
    assert call(server, token, "GET", "/api").status_code == 200
    assert call(server, token, "GET", "/apis").status_code == 200
    assert call(server, token, "GET", "/api/v1").status_code == 200
    assert call(server, token, "GET", "/version").status_code == 200
    assert call(server, token, "GET", "/debug/perennial/requests").status_code == 403
    # a wrong token is still 401, the server's own token still may do everything
    assert call(server, token + "x", "GET", "/api/v1/namespaces/team-a/configmaps").status_code == 401
    assert call(server, server.token, "GET", "/api/v1/namespaces/team-a/configmaps").status_code == 200
    assert server.count(code=403) >= 1  # counted like any other answer (debug paths are never counted)


def test_a_role_binding_grants_its_verbs_in_its_namespace_only(server):
    token = server.issue_service_account_token(*SA)
    bind(server, namespace="team-a", rules=[{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "create"]}])
    assert call(server, token, "POST", "/api/v1/namespaces/team-a/configmaps", CM).status_code == 201
    assert call(server, token, "GET", "/api/v1/namespaces/team-a/configmaps").status_code == 200
    assert call(server, token, "GET", "/api/v1/namespaces/team-a/configmaps/c").status_code == 200
    # not granted: other verbs, other namespaces, cluster-wide, other groups, other resources
    assert call(server, token, "GET", "/api/v1/namespaces/team-a/configmaps", params={"watch": "true"}).status_code == 403
    assert call(server, token, "DELETE", "/api/v1/namespaces/team-a/configmaps/c").status_code == 403
    assert call(server, token, "PATCH", "/api/v1/namespaces/team-a/configmaps/c", {"data": {}},
                headers={"Content-Type": "application/merge-patch+json"}).status_code == 403
    assert call(server, token, "GET", "/api/v1/namespaces/team-b/configmaps").status_code == 403
    assert call(server, token, "GET", "/api/v1/configmaps").status_code == 403
    assert call(server, token, "GET", "/api/v1/namespaces/team-a/secrets").status_code == 403
    assert call(server, token, "GET", "/apis/apps/v1/namespaces/team-a/deployments").status_code == 403


def test_cluster_role_bindings_grant_everywhere_and_a_role_binding_to_a_cluster_role_in_one_namespace(server):
    token = server.issue_service_account_token(*SA)
    bind(server, name="read-cm", rules=[{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}])
    assert call(server, token, "GET", "/api/v1/configmaps").status_code == 200
    assert call(server, token, "GET", "/api/v1/namespaces/team-b/configmaps").status_code == 200
    bind(server, name="read-pods", namespace="team-a", cluster_role_for_namespace=True,
         rules=[{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}])
    assert call(server, token, "GET", "/api/v1/namespaces/team-a/pods").status_code == 200
    assert call(server, token, "GET", "/api/v1/namespaces/team-b/pods").status_code == 403
    assert call(server, token, "GET", "/api/v1/pods").status_code == 403  # a RoleBinding never grants cluster-wide


def test_subresources_are_resources_of_their_own(server):
    token = server.issue_service_account_token(*SA)
    admin(server, "POST", "/api/v1/namespaces/team-a/pods", {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}})
    server.set_pod_log("team-a", "p", "hello\n")
    bind(server, namespace="team-a", rules=[{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}])
    assert call(server, token, "GET", "/api/v1/namespaces/team-a/pods/p").status_code == 200
    assert call(server, token, "GET", "/api/v1/namespaces/team-a/pods/p/log").status_code == 403
    assert call(server, token, "PATCH", "/api/v1/namespaces/team-a/pods/p/status", {"status": {}},
                headers={"Content-Type": "application/merge-patch+json"}).status_code == 403
    # the proxy subresource is authorized before any connection is tried
    assert call(server, token, "GET", "/api/v1/namespaces/team-a/pods/p:8080/proxy/healthz").status_code == 403
    bind(server, name="logs", namespace="team-a", rules=[{"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}])
    r = call(server, token, "GET", "/api/v1/namespaces/team-a/pods/p/log")
    assert r.status_code == 200 and r.text == "hello\n"


def test_resource_names_limit_named_requests_and_never_allow_lists(server):
    token = server.issue_service_account_token(*SA)
    for name in ("c", "d"):
        admin(server, "POST", "/api/v1/namespaces/team-a/configmaps", {**CM, "metadata": {"name": name}})
    bind(server, namespace="team-a", rules=[{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["c"],
                                            "verbs": ["get", "list", "watch", "create"]}])
    assert call(server, token, "GET", "/api/v1/namespaces/team-a/configmaps/c").status_code == 200
    assert call(server, token, "GET", "/api/v1/namespaces/team-a/configmaps/d").status_code == 403
    assert call(server, token, "GET", "/api/v1/namespaces/team-a/configmaps").status_code == 403
    assert call(server, token, "POST", "/api/v1/namespaces/team-a/configmaps", {**CM, "metadata": {"name": "c2"}}).status_code == 403
    # a list of exactly that name by field selector is authorized as that name
    r = call(server, token, "GET", "/api/v1/namespaces/team-a/configmaps", params={"fieldSelector": "metadata.name=c"})
    assert r.status_code == 200 and [i["metadata"]["name"] for i in r.json()["items"]] == ["c"]


def test_wildcards_and_subjects_by_group(server):
    token = server.issue_service_account_token(*SA)
    g = "/apis/rbac.authorization.k8s.io/v1"
    admin(server, "POST", f"{g}/clusterroles", {"metadata": {"name": "all-status"},
                                                 "rules": [{"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["*"]}]})
    admin(server, "POST", f"{g}/clusterrolebindings", {"metadata": {"name": "sas"}, "roleRef": {"apiGroup": rbac.RBAC, "kind": "ClusterRole", "name": "all-status"},
                                                        "subjects": [{"kind": "Group", "name": "system:serviceaccounts:ops", "apiGroup": rbac.RBAC}]})
    admin(server, "POST", "/apis/batch/v1/namespaces/team-a/jobs", {"metadata": {"name": "j"}, "spec": {"template": {"spec": {
        "restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}}})
    assert call(server, token, "GET", "/apis/batch/v1/namespaces/team-a/jobs/j/status").status_code == 200
    assert call(server, token, "GET", "/apis/batch/v1/namespaces/team-a/jobs/j").status_code == 403
    other = server.issue_service_account_token("team-b", "perennial")
    assert call(server, other, "GET", "/apis/batch/v1/namespaces/team-a/jobs/j/status").status_code == 403


@pytest.mark.parametrize(("method", "path", "query", "want"), [
    ("GET", "/api/v1/namespaces/a/pods", {}, ("list", "", "pods", "", "a", "")),
    ("GET", "/api/v1/namespaces/a/pods", {"watch": "true"}, ("watch", "", "pods", "", "a", "")),
    ("GET", "/api/v1/pods", {"watch": "1"}, ("watch", "", "pods", "", "", "")),
    ("GET", "/api/v1/namespaces/a/pods/p/log", {}, ("get", "", "pods", "log", "a", "p")),
    ("POST", "/api/v1/namespaces/a/services/https:s:443/proxy/v1/x", {}, ("create", "", "services", "proxy", "a", "https:s:443")),
    ("PATCH", "/apis/perennial.ai/v1alpha1/namespaces/a/trainingruns/t/status", {}, ("patch", "perennial.ai", "trainingruns", "status", "a", "t")),
    ("DELETE", "/apis/batch/v1/namespaces/a/jobs", {}, ("deletecollection", "batch", "jobs", "", "a", "")),
    ("GET", "/api/v1/namespaces/a", {}, ("get", "", "namespaces", "", "a", "a")),
    ("PUT", "/api/v1/namespaces/a/finalize", {}, ("update", "", "namespaces", "finalize", "a", "a")),
    ("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", {}, ("list", "apiextensions.k8s.io", "customresourcedefinitions", "", "", "")),
])
def test_request_attributes_as_kube_apiserver_names_them(method, path, query, want):
    a = rbac.attributes(method, path, query, lambda *_: True)
    assert (a.verb, a.api_group, a.resource, a.subresource, a.namespace, a.name) == want
    assert a.resource_request


# ------------------------------------------------------------------ OwnerReferencesPermissionEnforcement

def _owner(server) -> dict:
    return admin(server, "POST", "/apis/apps/v1/namespaces/team-a/deployments", {
        "metadata": {"name": "web"}, "spec": {"selector": {"matchLabels": {"a": "b"}},
                                              "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}})


def _child(owner: dict, block: bool | None, name: str = "c") -> dict:
    ref = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": owner["metadata"]["uid"], "controller": True}
    if block is not None:
        ref["blockOwnerDeletion"] = block
    return {**CM, "metadata": {"name": name, "ownerReferences": [ref]}}


def test_block_owner_deletion_needs_update_on_the_owners_finalizers(server):
    """As kube-apiserver's OwnerReferencesPermissionEnforcement admission plugin (OpenShift enables it): creating an
    object whose ownerReference has blockOwnerDeletion true needs `update` on `<owner resource>/finalizers` of that
    owner (by name); without blockOwnerDeletion, creating any ownerReference is allowed."""
    owner = _owner(server)
    bind(server, rules=[{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "get", "patch", "update"]}],
         namespace="team-a")
    token = server.issue_service_account_token(*SA)
    cms = "/api/v1/namespaces/team-a/configmaps"
    assert call(server, token, "POST", cms, _child(owner, None, "plain")).status_code == 201
    assert call(server, token, "POST", cms, _child(owner, False, "not-blocking")).status_code == 201
    r = call(server, token, "POST", cms, _child(owner, True, "blocking"))
    assert r.status_code == 403, r.text
    assert r.json()["reason"] == "Forbidden"
    assert r.json()["message"] == ('configmaps "blocking" is forbidden: cannot set blockOwnerDeletion if an ownerReference '
                                   "refers to a resource you can't set finalizers on: , <nil>")
    assert call(server, token, "GET", f"{cms}/blocking").status_code == 404
    # turning blockOwnerDeletion on in an update is refused the same way (a patch is an update)
    r = call(server, token, "PATCH", f"{cms}/not-blocking", {"metadata": {"ownerReferences": _child(owner, True)["metadata"]["ownerReferences"]}},
             headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 403 and "can't delete" in r.json()["message"], r.text  # first: changing ownerReferences needs delete
    # finalizers of another Deployment by name do not help; of this one they do
    bind(server, rules=[{"apiGroups": ["apps"], "resources": ["deployments/finalizers"], "verbs": ["update"], "resourceNames": ["other"]}],
         namespace="team-a", name="other")
    assert call(server, token, "POST", cms, _child(owner, True, "blocking")).status_code == 403
    bind(server, rules=[{"apiGroups": ["apps"], "resources": ["deployments/finalizers"], "verbs": ["update"], "resourceNames": ["web"]}],
         namespace="team-a", name="web")
    assert call(server, token, "POST", cms, _child(owner, True, "blocking")).status_code == 201
    # an update that changes the ownerReferences also needs `delete` on the object itself; one that keeps them does not
    patch = {"metadata": {"ownerReferences": _child(owner, True)["metadata"]["ownerReferences"]}}
    r = call(server, token, "PATCH", f"{cms}/not-blocking", patch, headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 403 and "cannot set an ownerRef on a resource you can't delete" in r.json()["message"], r.text
    assert call(server, token, "PATCH", f"{cms}/blocking", {"data": {"b": "2"}, **patch},
                headers={"Content-Type": "application/merge-patch+json"}).status_code == 200
    bind(server, rules=[{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["delete"]}], namespace="team-a", name="deleter")
    assert call(server, token, "PATCH", f"{cms}/not-blocking", patch, headers={"Content-Type": "application/merge-patch+json"}).status_code == 200
    # the admission decisions are logged like the requests' own (the chart's RBAC proof counts them)
    server.server.authz_log = []
    call(server, token, "POST", cms, _child(owner, True, "logged"))
    assert [(a.verb, a.resource, a.subresource, a.name, d.allowed) for _, a, d in server.server.authz_log] == [
        ("create", "configmaps", "", "", True), ("update", "deployments", "finalizers", "web", True)]
    # the server's own token (cluster admin) is not checked
    assert call(server, server.token, "POST", cms, _child(owner, True, "admin")).status_code == 201


def test_an_owner_of_a_kind_the_server_does_not_serve_cannot_be_blocked(server):
    bind(server, rules=[{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]}], namespace="team-a")
    token = server.issue_service_account_token(*SA)
    ref = {"apiVersion": "example.com/v1", "kind": "Gadget", "name": "g", "uid": "0000", "blockOwnerDeletion": True}
    r = call(server, token, "POST", "/api/v1/namespaces/team-a/configmaps", {**CM, "metadata": {"name": "x", "ownerReferences": [ref]}})
    assert r.status_code == 403 and "cannot find RESTMapping for APIVersion example.com/v1 Kind Gadget" in r.json()["message"], r.text
