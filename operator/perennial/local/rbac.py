"""RBAC authorization of the embedded control plane, as kube-apiserver's RBAC authorizer decides.

A request that carries a service-account token (:meth:`APIServer.issue_service_account_token`) is allowed only
when a rule of a Role or ClusterRole bound to that identity allows it: ClusterRoleBindings everywhere,
RoleBindings in their namespace (to a Role of that namespace or to a ClusterRole). A rule matches on

* ``verbs`` (``get list watch create update patch delete deletecollection``; ``*`` any),
* ``apiGroups`` (``""`` is core; ``*`` any),
* ``resources``: ``pods``, ``pods/log``, ``services/proxy``, ``deployments/status`` (a subresource is its own
  resource: ``pods`` grants nothing on ``pods/log``); ``*`` any, ``*/status`` any resource's status,
* ``resourceNames`` (empty: all; otherwise only requests that name one of them: never list, watch without a
  ``metadata.name`` field selector, or create),
* ``nonResourceURLs`` for paths off the API (``/metrics``; a trailing ``*`` is a prefix).

Request attributes follow kube-apiserver's RequestInfo: the verb from the method (GET on a name ``get``, on a
collection ``list``, or ``watch`` with ``?watch=true``; POST ``create``, PUT ``update``, PATCH ``patch``,
DELETE ``delete``/``deletecollection``), the namespace from ``/namespaces/<ns>/``, the subresource after the
name. Discovery and the public paths (``/api``, ``/apis``, ``/openapi``, ``/version``, probes) are open to every
authenticated identity, as the ``system:discovery`` and ``system:public-info-viewer`` bindings make them.

Admission: :func:`owner_reference_checks` is kube-apiserver's OwnerReferencesPermissionEnforcement plugin (on in
OpenShift): a create or update that sets an ownerReference with ``blockOwnerDeletion: true`` needs ``update`` on the
owner's ``<resource>/finalizers`` (by name), and an update that changes ownerReferences needs ``delete`` on the object.

Not emulated: aggregated ClusterRoles (``aggregationRule``), impersonation, the escalation checks on writes of
RBAC objects, Node and Webhook authorizers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

RBAC = "rbac.authorization.k8s.io"
_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}
#: Subresources of a namespace (``/api/v1/namespaces/<ns>/status``), not a resource inside it.
_NAMESPACE_SUBRESOURCES = {"status", "finalize"}
#: Non-resource paths every authenticated identity may GET (system:discovery, system:basic-user, public info).
DISCOVERY_PREFIXES = ("/api", "/apis", "/openapi", "/version", "/healthz", "/livez", "/readyz")


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()

    @classmethod
    def service_account(cls, namespace: str, name: str) -> "User":
        return cls(f"system:serviceaccount:{namespace}:{name}",
                   ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"))


@dataclass(frozen=True)
class Attributes:
    """What a request does, as RBAC sees it."""

    verb: str
    path: str
    resource_request: bool
    api_group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""

    def describe(self) -> str:
        if not self.resource_request:
            return f"{self.verb} path {self.path!r}"
        what = self.resource + (f"/{self.subresource}" if self.subresource else "")
        return f"{self.verb} {what!r} in API group {self.api_group!r}" + (f" in namespace {self.namespace!r}" if self.namespace else "")


def attributes(method: str, path: str, query: Any, namespaced: Callable[[str, str, str], bool | None]) -> Attributes:
    """kube-apiserver's RequestInfo for `method path?query`; `namespaced(group, version, plural)` says whether a
    resource is namespaced (None: unknown)."""
    method = method.upper()
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        rest = []
    if not rest:
        return Attributes(verb=method.lower() if method != "HEAD" else "get", path=path, resource_request=False)
    namespace = ""
    if rest[0] == "namespaces" and len(rest) >= 2:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    watching = str(query.get("watch", "")).lower() in ("true", "1")
    if method in ("GET", "HEAD"):
        verb = "get" if name else ("watch" if watching else "list")
        if not name:
            # a watch or list of one object by field selector is authorized as that name (as kube does)
            for term in str(query.get("fieldSelector", "")).split(","):
                key, _, value = term.partition("=")
                if key.strip() == "metadata.name" and value.lstrip("="):
                    name = value.lstrip("=").strip()
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = _VERBS.get(method, method.lower())
    return Attributes(verb=verb, path=path, resource_request=True, api_group=group, resource=resource,
                      subresource=subresource, namespace=namespace, name=name)


def _resource_matches(rule_resources: Iterable[str], resource: str, subresource: str) -> bool:
    combined = f"{resource}/{subresource}" if subresource else resource
    for r in rule_resources:
        if r == "*" or r == combined:
            return True
        if subresource and (r == f"*/{subresource}" or r == f"{resource}/*"):
            return True
    return False


def rule_allows(rule: dict[str, Any], attrs: Attributes) -> bool:
    verbs = rule.get("verbs") or []
    if "*" not in verbs and attrs.verb not in verbs:
        return False
    if not attrs.resource_request:
        for url in rule.get("nonResourceURLs") or []:
            if url == "*" or url == attrs.path or (url.endswith("*") and attrs.path.startswith(url[:-1])):
                return True
        return False
    groups = rule.get("apiGroups") or []
    if "*" not in groups and attrs.api_group not in groups:
        return False
    if not _resource_matches(rule.get("resources") or [], attrs.resource, attrs.subresource):
        return False
    names = rule.get("resourceNames") or []
    return not names or attrs.name in names


def _subject_matches(subject: dict[str, Any], user: User, binding_namespace: str) -> bool:
    kind = subject.get("kind")
    if kind == "ServiceAccount":
        ns = subject.get("namespace") or binding_namespace
        return user.name == f"system:serviceaccount:{ns}:{subject.get('name')}"
    if kind == "User":
        return user.name == subject.get("name")
    if kind == "Group":
        return subject.get("name") in user.groups
    return False


@dataclass(frozen=True)
class RuleRef:
    """One rule of one role, as a binding grants it: ``ClusterRole/name#3`` (the 4th rule)."""

    kind: str
    namespace: str
    name: str
    index: int

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind}/{where}{self.name}#{self.index}"


@dataclass
class Decision:
    allowed: bool
    #: every rule that allows the request (through any binding)
    rules: list[RuleRef] = field(default_factory=list)


class Authorizer:
    """Reads the RBAC objects of the store on every decision (bindings change while the server runs).

    `objects(plural, namespace)` lists the stored objects of `rbac.authorization.k8s.io/<plural>` (namespace None:
    all of a cluster-scoped resource)."""

    def __init__(self, objects: Callable[[str, str | None], list[dict[str, Any]]]) -> None:
        self.objects = objects

    def _role(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        for obj in self.objects("clusterroles" if kind == "ClusterRole" else "roles", None if kind == "ClusterRole" else namespace):
            if obj["metadata"]["name"] == name:
                return obj
        return None

    def _granted(self, user: User) -> Iterable[tuple[str, RuleRef, dict[str, Any]]]:
        """(namespace the grant is limited to, or "" for everywhere; the rule's reference; the rule)."""
        for binding in self.objects("clusterrolebindings", None):
            if any(_subject_matches(s, user, "") for s in binding.get("subjects") or []):
                ref = binding.get("roleRef") or {}
                if ref.get("kind") == "ClusterRole":
                    role = self._role("ClusterRole", "", ref.get("name", ""))
                    for i, rule in enumerate((role or {}).get("rules") or []):
                        yield "", RuleRef("ClusterRole", "", ref["name"], i), rule
        for binding in self.objects("rolebindings", None):
            ns = binding["metadata"].get("namespace", "")
            if any(_subject_matches(s, user, ns) for s in binding.get("subjects") or []):
                ref = binding.get("roleRef") or {}
                kind = ref.get("kind")
                if kind not in ("Role", "ClusterRole"):
                    continue
                role = self._role(kind, ns, ref.get("name", ""))
                for i, rule in enumerate((role or {}).get("rules") or []):
                    yield ns, RuleRef(kind, ns if kind == "Role" else "", ref["name"], i), rule

    def decide(self, user: User, attrs: Attributes) -> Decision:
        if not attrs.resource_request and attrs.verb in ("get", "head") and any(
                attrs.path == p or attrs.path.startswith(p + "/") for p in DISCOVERY_PREFIXES):
            return Decision(True)
        found: list[RuleRef] = []
        for limit, ref, rule in self._granted(user):
            if limit and (not attrs.resource_request or attrs.namespace != limit):
                continue  # a RoleBinding grants only inside its namespace (and no non-resource URLs)
            if rule_allows(rule, attrs):
                found.append(ref)
        return Decision(bool(found), found)


def _blocking(refs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in refs if isinstance(r, dict) and r.get("blockOwnerDeletion") is True]


def owner_reference_checks(attrs: Attributes, new: dict[str, Any], old: dict[str, Any] | None,
                           resource_of: Callable[[str, str], str | None]) -> list[tuple[Attributes | None, str]]:
    """What OwnerReferencesPermissionEnforcement (kubernetes plugin/pkg/admission/gc) asks the authorizer before
    `attrs` (a create, or an update of `old`) stores `new`: [(attributes to authorize, message when denied)];
    attributes None: refused outright (`message`). `resource_of(apiVersion, kind)` is the plural serving that
    kind, or None.

    Nothing when the ownerReferences do not change (and for ``pods/status``). An update that changes them needs
    ``delete`` on the object itself (a create need not: the creator could have never created it); every
    ownerReference that is new with ``blockOwnerDeletion: true``, or turns it on, needs ``update`` on the owner's
    ``<resource>/finalizers`` by name in the object's namespace (an owner is always in its dependent's namespace)."""
    if attrs.api_group == "" and attrs.resource == "pods" and attrs.subresource == "status":
        return []
    new_refs = list((new.get("metadata") or {}).get("ownerReferences") or [])
    old_refs = list(((old or {}).get("metadata") or {}).get("ownerReferences") or []) if old is not None else []
    if (not new_refs if old is None else new_refs == old_refs):
        return []
    checks: list[tuple[Attributes | None, str]] = []
    if old is not None:
        checks.append((Attributes(verb="delete", path="", resource_request=True, api_group=attrs.api_group,
                                  resource=attrs.resource, subresource=attrs.subresource, namespace=attrs.namespace,
                                  name=attrs.name), "cannot set an ownerRef on a resource you can't delete: , <nil>"))
    was_blocking = {r.get("uid") for r in _blocking(old_refs)}
    for ref in _blocking(new_refs):
        if ref.get("uid") in was_blocking:
            continue
        api_version, kind = str(ref.get("apiVersion") or ""), str(ref.get("kind") or "")
        group = api_version.rpartition("/")[0]
        plural = resource_of(api_version, kind)
        if plural is None:
            checks.append((None, (f"cannot set blockOwnerDeletion in this case because cannot find RESTMapping for "
                                  f"APIVersion {api_version} Kind {kind}: , <nil>")))
            continue
        checks.append((Attributes(verb="update", path="", resource_request=True, api_group=group, resource=plural,
                                  subresource="finalizers", namespace=attrs.namespace, name=str(ref.get("name") or "")),
                       "cannot set blockOwnerDeletion if an ownerReference refers to a resource you can't set finalizers on: , <nil>"))
    return checks


def forbidden(user: User, attrs: Attributes) -> dict[str, Any]:
    """kube-apiserver's 403 Status for a denied request."""
    if attrs.resource_request:
        what = attrs.resource + (f"/{attrs.subresource}" if attrs.subresource else "")
        target = f'{what} "{attrs.name}"' if attrs.name else what
        scope = f' in the namespace "{attrs.namespace}"' if attrs.namespace else " at the cluster scope"
        message = (f'{target} is forbidden: User "{user.name}" cannot {attrs.verb} resource "{what}" in API group '
                   f'"{attrs.api_group}"{scope}')
        details: dict[str, Any] = {"kind": attrs.resource, **({"group": attrs.api_group} if attrs.api_group else {}),
                                   **({"name": attrs.name} if attrs.name else {})}
    else:
        message = f'forbidden: User "{user.name}" cannot {attrs.verb} path "{attrs.path}"'
        details = {}
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": "Forbidden", "details": details, "code": 403}
