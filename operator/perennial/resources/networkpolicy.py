"""NetworkPolicies of the pods that run untrusted code: training and RewardSpec validation (pure builders).

One NetworkPolicy per TrainingRun / per validation Job, owned by its TrainingRun / RewardSpec (garbage-
collected with it), selecting exactly that owner's pods. Per owner rather than per namespace because what
a pod may reach depends on its spec (the judge endpoints of its RewardSpecs, its artifact and dataset
stores), and a namespace-wide policy would have to allow the union of every run's destinations to every
run. It is created together with the Job (before it, in the same reconcile), so a pod never starts
without it.

What each pod may do:

* ingress: nothing (no one connects to a trainer or a validation pod);
* egress: DNS (UDP/TCP 53 to the cluster DNS: pods of `kube-system`, or the operator-configured CIDRs of
  a node-local DNS cache), and for each destination the spec names (artifact store, datasets, feedback
  store, base-model source, LLM-judge endpoints) its port only, to:
  - the Service's namespace when the host is an in-cluster name (`svc.ns`, `svc.ns.svc`,
    `svc.ns.svc.cluster.local`);
  - that address when the host is an IP literal;
  - otherwise (an external host name) the operator's `PERENNIAL_EGRESS_CIDRS` when set (an egress proxy
    or gateway, the object store's range), else the public internet: `0.0.0.0/0` and `::/0` minus private,
    link-local (cloud metadata `169.254.169.254`), loopback and shared ranges, so a pod can reach a public
    endpoint on the named port but nothing inside the cluster or the VPC.

The limit: a NetworkPolicy cannot name a host, only addresses, namespaces and ports. An external
hostname cannot be pinned by a plain NetworkPolicy: with `PERENNIAL_EGRESS_CIDRS` unset, a pod may reach
any public address on the destination's port (443 for `s3://`, `gs://`, `hf://`, `https://`). For
hostname-exact egress use an FQDN-aware policy engine (Cilium's `toFQDNs`, Calico's domain names) or an
egress proxy whose address is configured in `PERENNIAL_EGRESS_CIDRS`. The policy is enforced only when
the cluster's network plugin implements NetworkPolicy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from .common import child_name, labels, owned_metadata

#: Ranges a pod may never reach through the "public internet" rule.
PRIVATE_V4 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "127.0.0.0/8", "0.0.0.0/8")
PRIVATE_V6 = ("fc00::/7", "fe80::/10", "::1/128")

_DEFAULT_PORTS = {"https": 443, "s3": 443, "gs": 443, "gcs": 443, "hf": 443, "az": 443, "abfs": 443, "abfss": 443, "http": 80}
_LOCAL_SCHEMES = {"", "file", "pvc", "local"}


@dataclass(frozen=True)
class EgressSettings:
    """Operator-wide egress settings (`OperatorConfig.egress_settings()`)."""

    #: where external host names may be reached (an egress proxy, the object store's range); empty: the
    #: public internet minus private ranges
    egress_cidrs: tuple[str, ...] = ()
    #: extra DNS server addresses (a node-local DNS cache such as 169.254.20.10/32)
    dns_cidrs: tuple[str, ...] = ()
    #: namespace of the cluster DNS
    dns_namespace: str = "kube-system"
    #: the S3 endpoint the trainer uses for `s3://` (from the operator's config), if not AWS's
    s3_endpoint: str | None = None


@dataclass(frozen=True)
class Destination:
    host: str
    port: int


@dataclass
class Destinations:
    items: list[Destination] = field(default_factory=list)

    def add(self, uri: str | None, settings: EgressSettings) -> None:
        if not uri:
            return
        parsed = urlparse(uri)
        scheme = parsed.scheme.lower()
        if scheme in _LOCAL_SCHEMES or uri.startswith("/"):
            return
        if scheme == "s3" and settings.s3_endpoint:
            self.add(settings.s3_endpoint, settings)
            return
        host = {"hf": "huggingface.co", "gs": "storage.googleapis.com", "gcs": "storage.googleapis.com"}.get(scheme, parsed.hostname or "")
        if scheme == "s3":
            host = "s3.amazonaws.com"
        try:
            port = parsed.port if scheme in ("http", "https") else None
        except ValueError:
            port = None
        port = port or _DEFAULT_PORTS.get(scheme, 443)
        d = Destination(host.lower(), port)
        if d not in self.items:
            self.items.append(d)


def _service_namespace(host: str) -> str | None:
    """`svc.ns[.svc[.cluster.local]]` -> ns; None for anything else."""
    parts = host.split(".")
    if len(parts) == 2 and parts[1] not in ("com", "net", "org", "io", "ai", "dev", "co"):
        return parts[1]
    if len(parts) >= 3 and parts[2] == "svc":
        return parts[1]
    return None


def _peers(d: Destination, settings: EgressSettings) -> list[dict[str, Any]]:
    try:
        ip = ipaddress.ip_address(d.host)
    except ValueError:
        ip = None
    if ip is not None:
        return [{"ipBlock": {"cidr": f"{ip}/{ip.max_prefixlen}"}}]
    ns = _service_namespace(d.host)
    if ns:
        return [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}]
    if d.host in ("localhost",):
        return []
    if settings.egress_cidrs:
        return [{"ipBlock": {"cidr": c}} for c in settings.egress_cidrs]
    return [{"ipBlock": {"cidr": "0.0.0.0/0", "except": list(PRIVATE_V4)}}, {"ipBlock": {"cidr": "::/0", "except": list(PRIVATE_V6)}}]


def egress_rules(destinations: Iterable[Destination], settings: EgressSettings) -> list[dict[str, Any]]:
    dns_ports = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
    dns_peers: list[dict[str, Any]] = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": settings.dns_namespace}}}]
    dns_peers += [{"ipBlock": {"cidr": c}} for c in settings.dns_cidrs]
    rules: list[dict[str, Any]] = [{"to": dns_peers, "ports": dns_ports}]
    # one rule per (peers, port): rules with the same peers share their ports
    merged: dict[str, dict[str, Any]] = {}
    import json

    for d in destinations:
        peers = _peers(d, settings)
        if not peers:
            continue
        key = json.dumps(peers, sort_keys=True)
        rule = merged.setdefault(key, {"to": peers, "ports": []})
        port = {"protocol": "TCP", "port": d.port}
        if port not in rule["ports"]:
            rule["ports"].append(port)
    rules += list(merged.values())
    return rules


def network_policy(owner: dict[str, Any], name: str, pod_labels: dict[str, str], destinations: Iterable[Destination],
                   settings: EgressSettings, component: str) -> dict[str, Any]:
    """A NetworkPolicy selecting the pods with `pod_labels`: no ingress, egress to DNS and `destinations`."""
    owner_name = owner["metadata"]["name"]
    selector = {k: v for k, v in pod_labels.items() if k.startswith("perennial.ai/") or k == "app.kubernetes.io/component"}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": owned_metadata(owner, name, labels(owner["kind"], owner_name, component)),
        "spec": {
            "podSelector": {"matchLabels": selector},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": egress_rules(destinations, settings),
        },
    }


def policy_name(owner: str, suffix: str = "egress") -> str:
    return child_name(owner, suffix)


def training_destinations(config: dict[str, Any], settings: EgressSettings) -> list[Destination]:
    """Where a trainer may connect: the URIs of its run config and the judge endpoints of its RewardSpecs."""
    dests = Destinations()
    spec = config.get("spec") or {}
    for uri in (config.get("baseModelUri"), config.get("parentAdapterUri"), config.get("outputUri"), config.get("feedbackStoreUri")):
        dests.add(uri, settings)
    for d in spec.get("datasets") or []:
        dests.add(d.get("uri"), settings)
        dests.add((d.get("feedback") or {}).get("storeUri"), settings)
    for rs in (config.get("rewardSpec"), config.get("evalRewardSpec")):
        for uri in judge_endpoints(rs):
            dests.add(uri, settings)
    return dests.items


def judge_endpoints(reward_spec: dict[str, Any] | None) -> list[str]:
    return [g["llmJudge"]["endpoint"] for g in (reward_spec or {}).get("graders") or [] if (g.get("llmJudge") or {}).get("endpoint")]


def validation_destinations(reward_spec: dict[str, Any], settings: EgressSettings) -> list[Destination]:
    dests = Destinations()
    for uri in judge_endpoints(reward_spec):
        dests.add(uri, settings)
    return dests.items
