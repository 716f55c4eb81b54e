"""Remote clusters against two embedded control planes: a hub (holding the cluster Secret) and a region.

The informers of `perennial.kube.clusters` list and watch the region's children, survive the region's API
server going away (reported unreachable, bounded retries, no crash), resume when it comes back on the same
port, relist after 410 Expired, and never hold more than one watch per kind.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from perennial.kube import Kube, connect
from perennial.kube.clusters import Clusters, ClusterSecretError, RemoteCluster
from perennial.kube.informer import Backoff
from perennial.local.apiserver import ServerThread, new_token, start_in_thread
from perennial.local.faults import FaultConfig
from perennial.local.tls import ServingCert, self_signed

NS = "prod"
OWNER = (NS, "chat")
LABELS = {"perennial.ai/deployment": "chat", "app.kubernetes.io/managed-by": "perennial-operator"}
# KEDA is not installed in the region: its ScaledObjects are not served there (a 404 listing is no outage)
RESOURCES = (("v1", "ConfigMap"), ("apps/v1", "Deployment"), ("keda.sh/v1alpha1", "ScaledObject"))
BACKOFF = Backoff(initial=0.2, maximum=1.0)


async def until(predicate: Callable[[], Any], timeout: float = 30.0, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}; last value: {last!r}")


def configmap(name: str, data: dict[str, str] | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": NS, "labels": LABELS if labels is None else labels},
            "data": data or {}}


def restart(server: ServerThread) -> ServerThread:
    """The same API server (same store, certificate, token) on the same port, after `server.stop()`."""
    return ServerThread(server.server, "127.0.0.1", server.server.port)


def watchers(server: ServerThread) -> dict[tuple[str, str], int]:
    """Open watches on the server, by (group, plural)."""
    with server.store.lock:
        return {k: len(v) for k, v in server.store.watchers.items() if v}


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def argocd_secret(name: str, server: ServerThread, tls: dict[str, Any]) -> dict[str, Any]:
    config = {"bearerToken": server.token, "tlsClientConfig": tls}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": NS, "labels": {"argocd.argoproj.io/secret-type": "cluster"}},
            "data": {"name": b64("east"), "server": b64(server.url), "config": b64(json.dumps(config))}}


@pytest.fixture(params=["kubeconfig", "argocd"])
def hub_and_region(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[ServerThread, Kube, ServerThread]]:
    """The hub holds the region's cluster Secret (a kubeconfig, or Argo CD's format) as the operator reads it."""
    hub = start_in_thread(token=new_token(), tls=self_signed())
    region = start_in_thread(token=new_token(), tls=self_signed())
    try:
        region.create("v1", "namespaces", {"metadata": {"name": NS}})
        hub_kube = connect(server=hub.url, token=hub.token, ca_file=hub.ca_file)
        hub_kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        if request.param == "kubeconfig":
            kubeconfig = region.write_kubeconfig(tmp_path / "region.kubeconfig", namespace=NS).read_text()
            hub_kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "region-east", "namespace": NS},
                             "type": "Opaque", "data": {"kubeconfig": b64(kubeconfig)}})
        else:
            hub_kube.create(argocd_secret("region-east", region, {"insecure": False, "caData": b64(region.server.tls.cert_pem)}))
        yield hub, hub_kube, region
    finally:
        region.stop()
        hub.stop()


async def connected(hub_kube: Kube, clusters: Clusters) -> RemoteCluster:
    secret = await asyncio.to_thread(hub_kube.get, "v1", "Secret", NS, "region-east")
    result = (await clusters.sync_owner(OWNER, {"region-east": secret}))["region-east"]
    assert isinstance(result, RemoteCluster), result
    return result


def names(cluster: RemoteCluster, api_version: str = "v1", kind: str = "ConfigMap") -> dict[str, dict[str, str]]:
    return {o["metadata"]["name"]: o.get("data") or {} for o in cluster.cache.list(api_version, kind, NS)}


def truth(region: ServerThread) -> dict[str, dict[str, str]]:
    return {o["metadata"]["name"]: o.get("data") or {} for o in region.list("v1", "configmaps", NS)
            if (o["metadata"].get("labels") or {}).get("perennial.ai/deployment")}


async def test_lists_watches_survives_a_stopped_api_server_and_resumes(hub_and_region) -> None:
    _hub, hub_kube, region = hub_and_region
    region.create("v1", "configmaps", configmap("chat-routes", {"v": "1"}), NS)
    region.create("v1", "configmaps", configmap("unrelated", labels={}), NS)
    woken: list[set[tuple[str, str]]] = []
    clusters = Clusters(wake=woken.append, resources=RESOURCES, backoff=BACKOFF, watch_timeout_seconds=30)
    restarted: ServerThread | None = None
    try:
        cluster = await connected(hub_kube, clusters)
        await until(lambda: cluster.synced, message="the first listing")
        assert names(cluster) == {"chat-routes": {"v": "1"}}  # only Perennial's children (label selector)
        assert cluster.reachability().reachable is True and cluster.reachability().last_success is not None
        assert cluster.informers[("keda.sh/v1alpha1", "ScaledObject")].served is False
        assert OWNER in set().union(*woken)

        # watched: created, modified, deleted in the region
        await until(lambda: watchers(region).get(("", "configmaps")) == 1, message="the ConfigMap watch")
        region.create("v1", "configmaps", configmap("chat-east-blue", {"v": "a"}), NS)
        region.patch("v1", "configmaps", "chat-routes", {"data": {"v": "2"}}, NS)
        await until(lambda: names(cluster) == {"chat-routes": {"v": "2"}, "chat-east-blue": {"v": "a"}}, message="watch events")
        woken.clear()
        region.delete("v1", "configmaps", "chat-east-blue", NS)
        await until(lambda: "chat-east-blue" not in names(cluster), message="a deletion")
        assert OWNER in set().union(*woken)  # a child's change wakes its Perennial Deployment by label

        # the region's API server goes away: unreachable, the last known world kept, retries backed off
        informer = cluster.informers[("v1", "ConfigMap")]
        woken.clear()
        region.stop()
        await until(lambda: cluster.reachability().reachable is False, message="unreachable")
        assert cluster.reachability().last_error and cluster.reachability().last_error_at is not None
        assert OWNER in set().union(*woken)  # losing the cluster wakes its owners
        assert names(cluster) == {"chat-routes": {"v": "2"}}
        failures_before, down_since = informer.failures, time.monotonic()
        # changes while it is down (in-process, as another client would make them)
        region.patch("v1", "configmaps", "chat-routes", {"data": {"v": "3"}}, NS)
        region.create("v1", "configmaps", configmap("chat-east-green", {"v": "g"}), NS)
        await asyncio.sleep(3.0)
        attempts = informer.failures - failures_before
        elapsed = time.monotonic() - down_since
        assert 1 <= attempts <= 2 + elapsed / BACKOFF.smallest, (attempts, elapsed)  # backed off, not a hot loop
        assert all(i._task is not None and not i._task.done() for i in cluster.informers.values())  # no crash

        # back on the same port: reachable again, resumed from the last resourceVersion, converged
        lists_before = informer.lists
        region = restarted = restart(region)
        await until(lambda: cluster.reachability().reachable is True, message="reachable again")
        await until(lambda: names(cluster) == truth(region), message="convergence after the restart")
        assert names(cluster) == {"chat-routes": {"v": "3"}, "chat-east-green": {"v": "g"}}
        assert informer.lists == lists_before  # resumed, not relisted
        region.delete("v1", "configmaps", "chat-routes", NS)
        await until(lambda: names(cluster) == {"chat-east-green": {"v": "g"}}, message="watching after the restart")
        assert [i.max_open_watches for i in cluster.informers.values()] == [1, 1, 0]  # ScaledObjects: not served
        await until(lambda: watchers(region) == {("", "configmaps"): 1, ("apps", "deployments"): 1}, message="one watch per kind")
    finally:
        await clusters.close()
        if restarted is not None:
            restarted.stop()
    assert cluster.watch_count() == 0


async def test_relists_after_410_and_resumes_after_closed_watches(hub_and_region) -> None:
    """The region answers half of the watches with 410 Expired or cuts them mid-stream: the informer relists or
    resumes, never holds two watches of one kind, and its cache converges to the region's world."""
    _hub, hub_kube, region = hub_and_region
    # watches time out after 2 s (the server ends them): new watch requests, each a chance for a fault
    clusters = Clusters(resources=RESOURCES, backoff=Backoff(initial=0.05, maximum=0.2), watch_timeout_seconds=2)
    try:
        cluster = await connected(hub_kube, clusters)
        await until(lambda: cluster.synced, message="the first listing")
        region.set_faults(FaultConfig(rate=0.5, faults=("410", "watch-close"), seed=7, user_agents=("perennial-operator",),
                                      watch_close_after=(0.05, 0.3)))
        informer = cluster.informers[("v1", "ConfigMap")]
        most = 0
        for i in range(40):
            region.create("v1", "configmaps", configmap(f"chat-{i}", {"i": str(i)}), NS)
            if i % 3 == 0:
                region.patch("v1", "configmaps", f"chat-{i}", {"data": {"i": f"{i}!"}}, NS)
            if i % 4 == 0 and i:
                region.delete("v1", "configmaps", f"chat-{i - 1}", NS)
            most = max([most, *watchers(region).values()])
            await asyncio.sleep(0.05)
        await until(lambda: informer.relists_after_expiry >= 1 and region.fault_counts().get("watch-close", 0) >= 1,
                    message="a 410 relist and a cut watch")
        await until(lambda: names(cluster) == truth(region), message="convergence under faults")
        assert region.fault_counts().get("410", 0) >= 1
        # cut and expired watches are no outage: the cluster never looked unreachable
        assert [i.failures for i in cluster.informers.values()] == [0, 0, 0] and cluster.reachability().reachable
        region.set_faults(None)
        # after the faults, a change still arrives by the watch
        region.create("v1", "configmaps", configmap("chat-last", {"i": "last"}), NS)
        await until(lambda: "chat-last" in names(cluster), message="a watch event after the faults")
        assert names(cluster) == truth(region)
        assert most <= 1 and [i.max_open_watches for i in cluster.informers.values()] == [1, 1, 0]
    finally:
        await clusters.close()


async def test_an_unreachable_cluster_from_the_start_and_a_secret_gone_bad(tmp_path: Path) -> None:
    """A Secret naming a port where nothing listens: a RemoteCluster that reports unreachable and stays unsynced
    (the controller must not act on its empty cache); an exec-plugin kubeconfig is refused for that Secret only."""
    dead = start_in_thread(token=new_token(), tls=self_signed())
    text = dead.write_kubeconfig(tmp_path / "dead.kubeconfig").read_text()
    dead.stop()
    clusters = Clusters(resources=RESOURCES, backoff=BACKOFF)
    secret = {"metadata": {"name": "gone", "namespace": NS, "resourceVersion": "1"},
              "data": {"kubeconfig": base64.b64encode(text.encode()).decode()}}
    bad = {"metadata": {"name": "exec", "namespace": NS, "resourceVersion": "1"},
           "data": {"kubeconfig": base64.b64encode(text.replace("token:", "exec: {command: aws}\n    x:").encode()).decode()}}
    try:
        results = await clusters.sync_owner(OWNER, {"gone": secret, "exec": bad})
        cluster = results["gone"]
        assert isinstance(cluster, RemoteCluster)
        assert isinstance(results["exec"], ClusterSecretError) and results["exec"].reason == "ClusterAuthUnsupported"
        await until(lambda: cluster.reachability().reachable is False, message="unreachable")
        assert not cluster.synced and cluster.reachability().last_success is None
        assert "connect" in (cluster.reachability().last_error or "").lower()
    finally:
        await clusters.close()


async def test_a_deletion_missed_while_down_is_dropped_by_the_relist(hub_and_region) -> None:
    """An object deleted while the region was down, and the region's history gone (its watch from the old
    resourceVersion answers 410 Expired): the relist's listing no longer has it, so the cache drops it."""
    _hub, hub_kube, region = hub_and_region
    region.create("v1", "configmaps", configmap("chat-doomed", {"v": "1"}), NS)
    region.create("v1", "configmaps", configmap("chat-kept", {"v": "1"}), NS)
    clusters = Clusters(resources=RESOURCES, backoff=BACKOFF, watch_timeout_seconds=30)
    restarted: ServerThread | None = None
    try:
        cluster = await connected(hub_kube, clusters)
        await until(lambda: set(names(cluster)) == {"chat-doomed", "chat-kept"}, message="the first listing")
        informer = cluster.informers[("v1", "ConfigMap")]
        region.stop()
        await until(lambda: cluster.reachability().reachable is False, message="unreachable")
        region.delete("v1", "configmaps", "chat-doomed", NS)
        region.set_faults(FaultConfig(rate=1.0, faults=("410",), user_agents=("perennial-operator",)))
        region = restarted = restart(region)
        await until(lambda: informer.relists_after_expiry >= 1, message="a 410 relist")
        region.set_faults(None)
        await until(lambda: names(cluster) == truth(region), message="convergence after the relist")
        assert names(cluster) == {"chat-kept": {"v": "1"}}
        # every kind's informer answers again (each retries on its own backoff: the ConfigMaps' relist may come first)
        await until(lambda: cluster.reachability().reachable is True, message="reachable again")
    finally:
        await clusters.close()
        if restarted is not None:
            restarted.stop()


def app_deployment(name: str, deployment: str = "chat") -> dict[str, Any]:
    labels = {**LABELS, "perennial.ai/deployment": deployment, "perennial.ai/color": "blue"}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "sidecar", "image": "perennial-server:test"}]}}}}


async def test_apply_and_delete_children_in_the_region(hub_and_region) -> None:
    """Children applied in the region; the finalizer's cleanup: every child of `chat` there goes (no ownerReference
    crosses clusters), another Deployment's children stay, and the watch shows them gone."""
    _hub, hub_kube, region = hub_and_region
    region.create("apps/v1", "deployments", app_deployment("chat-blue"), NS)
    region.create("v1", "configmaps", configmap("chat-routes"), NS)
    region.create("v1", "configmaps", configmap("other-routes", labels={**LABELS, "perennial.ai/deployment": "other"}), NS)
    clusters = Clusters(resources=RESOURCES, backoff=BACKOFF)
    try:
        cluster = await connected(hub_kube, clusters)
        await until(lambda: cluster.synced and len(cluster.children("chat")) == 2, message="the children listed")
        assert {o["metadata"]["name"] for o in cluster.children("other")} == {"other-routes"}
        # apply: created there, then nothing to do, then a patch; the cache has each at once (write-through)
        cm = configmap("chat-east-routes", {"routes.json": "{}"})
        assert (await cluster.apply(cm))[1] == "created"
        assert (await cluster.apply(cm))[1] == "unchanged"
        written, action = await cluster.apply(configmap("chat-east-routes", {"routes.json": '{"a": 1}'}))
        assert action == "updated" and cluster.cache.get("v1", "ConfigMap", NS, "chat-east-routes")["data"] == written["data"]
        assert region.get("v1", "configmaps", "chat-east-routes", NS)["data"] == {"routes.json": '{"a": 1}'}
        await until(lambda: len(cluster.children("chat")) == 3, message="the applied child watched")
        assert await cluster.delete_children("chat") == 3
        await until(lambda: not cluster.children("chat"), message="the children gone from the cache")
        assert [o["metadata"]["name"] for o in region.list("apps/v1", "deployments", NS)] == []
        assert set(truth(region)) == {"other-routes"}
        assert await cluster.delete_children("chat") == 0
        assert {o["metadata"]["name"] for o in cluster.children("other")} == {"other-routes"}
    finally:
        await clusters.close()


def named_cert(dns_name: str) -> ServingCert:
    """A serving certificate for `dns_name` only (not for the address the server listens on)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return ServingCert(cert_pem=cert.public_bytes(serialization.Encoding.PEM),
                       key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))


async def test_tls_server_name_verifies_a_certificate_for_another_name() -> None:
    """A region whose certificate names `api.east.test`, reached at 127.0.0.1: with Argo CD's `serverName` the TLS
    handshake verifies that name and the cluster is watched; without it verification fails (unreachable, and the
    error says why) — the certificate is verified either way, never skipped."""
    cert = named_cert("api.east.test")
    region = start_in_thread(token=new_token(), tls=cert)
    clusters = Clusters(resources=(("v1", "ConfigMap"),), backoff=BACKOFF)
    try:
        region.create("v1", "namespaces", {"metadata": {"name": NS}})
        region.create("v1", "configmaps", configmap("chat-routes"), NS)
        named = argocd_secret("named", region, {"caData": b64(cert.cert_pem), "serverName": "api.east.test"})
        plain = argocd_secret("plain", region, {"caData": b64(cert.cert_pem)})
        for s in (named, plain):
            s["metadata"]["resourceVersion"] = "1"
        results = await clusters.sync_owner(OWNER, {"named": named, "plain": plain})
        good, bad = results["named"], results["plain"]
        assert isinstance(good, RemoteCluster) and isinstance(bad, RemoteCluster)
        await until(lambda: good.synced and "chat-routes" in names(good), message="watched through serverName")
        await until(lambda: bad.reachability().reachable is False, message="verification failure")
        assert "certificate" in (bad.reachability().last_error or "").lower() and not bad.synced
    finally:
        await clusters.close()
        region.stop()
