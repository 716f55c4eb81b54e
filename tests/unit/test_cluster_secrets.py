"""Cluster Secrets (kubeconfig and Argo CD formats) -> client configuration; refusals with clear messages."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from perennial.kube.aio import AsyncKube
from perennial.kube.clusters import (
    Clusters,
    ClusterSecretError,
    RemoteCluster,
    configuration,
    parse_cluster_secret,
    secret_data,
)
from perennial.kube.informer import Backoff, parent_of
from perennial.local.tls import self_signed

TOKEN = "s3cr3t-token-value-0123456789abcdef"
CERT = self_signed()
CLIENT = self_signed("client.local")


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def secret(data: dict[str, str], labels: dict[str, str] | None = None, rv: str = "1", name: str = "east") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": "prod", "resourceVersion": rv, "labels": labels or {}},
            "data": {k: b64(v) for k, v in data.items()}}


def kubeconfig(cluster: dict[str, Any] | None = None, user: dict[str, Any] | None = None, **top: Any) -> str:
    doc = {"apiVersion": "v1", "kind": "Config",
           "clusters": [{"name": "east", "cluster": cluster if cluster is not None else
                         {"server": "https://10.0.0.1:6443", "certificate-authority-data": b64(CERT.cert_pem)}}],
           "users": [{"name": "op", "user": user if user is not None else {"token": TOKEN}}],
           "contexts": [{"name": "east", "context": {"cluster": "east", "user": "op", "namespace": "prod"}}],
           "current-context": "east"}
    doc.update(top)
    return yaml.safe_dump(doc)


def argocd(config: dict[str, Any], server: str = "https://10.0.0.2:6443") -> dict[str, Any]:
    return secret({"name": "west", "server": server, "config": json.dumps(config)},
                  labels={"argocd.argoproj.io/secret-type": "cluster"}, name="west")


def refused(sec: dict[str, Any]) -> ClusterSecretError:
    with pytest.raises(ClusterSecretError) as info:
        parse_cluster_secret(sec)
    assert TOKEN not in info.value.message and "s3cr3t" not in str(info.value)
    return info.value


# -- accepted ----------------------------------------------------------------------------------------------


def test_kubeconfig_with_token_and_ca(tmp_path: Path) -> None:
    creds = parse_cluster_secret(secret({"kubeconfig": kubeconfig()}))
    assert (creds.server, creds.source, creds.token, creds.ca_pem) == ("https://10.0.0.1:6443", "kubeconfig", TOKEN, CERT.cert_pem)
    assert TOKEN not in repr(creds)
    cfg = configuration(creds, tmp_path)
    assert cfg.host == "https://10.0.0.1:6443" and cfg.verify_ssl
    assert Path(cfg.ssl_ca_cert).read_bytes() == CERT.cert_pem
    assert stat.S_IMODE(os.stat(cfg.ssl_ca_cert).st_mode) == 0o600
    # the header AsyncKube sends
    assert AsyncKube(cfg)._authorization() == f"Bearer {TOKEN}"


def test_kubeconfig_client_certificate_basic_auth_and_server_name(tmp_path: Path) -> None:
    user = {"client-certificate-data": b64(CLIENT.cert_pem), "client-key-data": b64(CLIENT.key_pem)}
    cluster = {"server": "https://10.0.0.1:6443/", "certificate-authority-data": b64(CERT.cert_pem), "tls-server-name": "api.east"}
    creds = parse_cluster_secret(secret({"kubeconfig": kubeconfig(cluster, user)}))
    cfg = configuration(creds, tmp_path)
    assert cfg.host == "https://10.0.0.1:6443"
    assert Path(cfg.cert_file).read_bytes() == CLIENT.cert_pem and Path(cfg.key_file).read_bytes() == CLIENT.key_pem
    assert stat.S_IMODE(os.stat(cfg.key_file).st_mode) == 0o600
    assert cfg.tls_server_name == "api.east"
    assert AsyncKube(cfg)._tls_options() == {"server_hostname": "api.east"}
    basic = parse_cluster_secret(secret({"kubeconfig": kubeconfig(user={"username": "u", "password": "p"})}))
    (tmp_path / "basic").mkdir()
    assert AsyncKube(configuration(basic, tmp_path / "basic"))._authorization() == "Basic " + b64("u:p")


def test_kubeconfig_with_one_context_and_no_current_context() -> None:
    doc = yaml.safe_load(kubeconfig())
    del doc["current-context"]
    assert parse_cluster_secret(secret({"kubeconfig": yaml.safe_dump(doc)})).token == TOKEN


def test_argocd_secret_bearer_token_and_tls(tmp_path: Path) -> None:
    sec = argocd({"bearerToken": TOKEN, "tlsClientConfig": {"insecure": False, "caData": b64(CERT.cert_pem), "serverName": "api.west"}})
    creds = parse_cluster_secret(sec)
    assert (creds.server, creds.source, creds.display_name, creds.token) == ("https://10.0.0.2:6443", "argocd", "west", TOKEN)
    cfg = configuration(creds, tmp_path)
    assert Path(cfg.ssl_ca_cert).read_bytes() == CERT.cert_pem and cfg.tls_server_name == "api.west"


def test_argocd_secret_client_certificate_and_insecure(tmp_path: Path) -> None:
    sec = argocd({"tlsClientConfig": {"insecure": True, "certData": b64(CLIENT.cert_pem), "keyData": b64(CLIENT.key_pem)}})
    cfg = configuration(parse_cluster_secret(sec), tmp_path)
    assert cfg.verify_ssl is False and Path(cfg.cert_file).read_bytes() == CLIENT.cert_pem
    assert AsyncKube(cfg)._authorization() is None


def test_string_data_and_an_unlabelled_argocd_shape() -> None:
    sec = {"metadata": {"name": "x", "namespace": "prod"},
           "stringData": {"server": "https://h:443", "config": json.dumps({"bearerToken": TOKEN})}}
    assert parse_cluster_secret(sec).token == TOKEN
    assert secret_data(sec) == sec["stringData"]


# -- refused -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data, reason, words", [
    ({"other": "x"}, "ClusterSecretInvalid", "no key `kubeconfig`"),
    ({"kubeconfig": f"clusters: [\n  token: {TOKEN}\n   bad"}, "ClusterSecretInvalid", "not valid YAML (line"),
    ({"kubeconfig": "just a string"}, "ClusterSecretInvalid", "a YAML mapping"),
    ({"kubeconfig": kubeconfig(user={"exec": {"command": "aws", "args": ["eks", "get-token"]}})}, "ClusterAuthUnsupported", "exec plugin"),
    ({"kubeconfig": kubeconfig(user={"auth-provider": {"name": "gcp"}})}, "ClusterAuthUnsupported", "auth provider"),
    ({"kubeconfig": kubeconfig(user={"tokenFile": "/var/run/token"})}, "ClusterAuthUnsupported", "`tokenFile`"),
    ({"kubeconfig": kubeconfig(user={"client-certificate": "/home/me/.kube/c.crt", "client-key": "/home/me/k"})},
     "ClusterAuthUnsupported", "`client-certificate`"),
    ({"kubeconfig": kubeconfig(cluster={"server": "https://h", "certificate-authority": "/home/me/ca.crt"})},
     "ClusterAuthUnsupported", "certificate-authority-data"),
    ({"kubeconfig": kubeconfig(cluster={"server": "http://10.0.0.1:8080"})}, "ClusterSecretInvalid", "https://"),
    ({"kubeconfig": kubeconfig(cluster={"server": f"https://admin:{TOKEN}@10.0.0.1"})}, "ClusterSecretInvalid", "credentials in the URL"),
    ({"kubeconfig": kubeconfig(cluster={"server": f"http://admin:{TOKEN}@10.0.0.1"})}, "ClusterSecretInvalid", "credentials in the URL"),
    ({"kubeconfig": kubeconfig(cluster={"server": "https://10.0.0.1:99999999"})}, "ClusterSecretInvalid", "not a valid URL"),
    ({"kubeconfig": kubeconfig(cluster={"server": "https://h", "certificate-authority-data": "not base64!"})},
     "ClusterSecretInvalid", "base64-encoded PEM"),
    ({"kubeconfig": kubeconfig(user={})}, "ClusterSecretInvalid", "no credentials"),
    ({"kubeconfig": kubeconfig(user={"client-certificate-data": b64(CLIENT.cert_pem)})}, "ClusterSecretInvalid", "both"),
    ({"kubeconfig": kubeconfig(**{"current-context": "nope"})}, "ClusterSecretInvalid", "'nope'"),
    ({"kubeconfig": kubeconfig(user={"token": TOKEN, "as": "admin"})}, "ClusterAuthUnsupported", "impersonation"),
])
def test_kubeconfig_refusals(data: dict[str, str], reason: str, words: str) -> None:
    err = refused(secret(data))
    assert err.reason == reason and words in err.message and "prod/east" in err.message


@pytest.mark.parametrize("config, server, reason, words", [
    ({"execProviderConfig": {"command": "argocd-k8s-auth", "args": ["gcp"]}, "tlsClientConfig": {}}, None, "ClusterAuthUnsupported", "execProviderConfig"),
    ({"awsAuthConfig": {"clusterName": "c", "roleARN": "arn"}}, None, "ClusterAuthUnsupported", "awsAuthConfig"),
    ({"bearerToken": TOKEN}, "https://kubernetes.default.svc", "ClusterSecretInvalid", "own cluster"),
    ({"bearerToken": TOKEN}, "http://10.0.0.2", "ClusterSecretInvalid", "https://"),
    ({"bearerToken": TOKEN, "tlsClientConfig": {"caData": b64("not a pem")}}, None, "ClusterSecretInvalid", "caData"),
    ({"tlsClientConfig": {"insecure": True}}, None, "ClusterSecretInvalid", "no credentials"),
    ({"bearerToken": TOKEN, "proxyUrl": "http://proxy"}, None, "ClusterAuthUnsupported", "proxyUrl"),
])
def test_argocd_refusals(config: dict[str, Any], server: str | None, reason: str, words: str) -> None:
    err = refused(argocd(config, server or "https://10.0.0.2:6443"))
    assert err.reason == reason and words in err.message


def test_argocd_bad_json_and_missing_keys() -> None:
    labels = {"argocd.argoproj.io/secret-type": "cluster"}
    err = refused(secret({"server": "https://h", "config": '{"bearerToken": "' + TOKEN + '", oops}'}, labels))
    assert err.reason == "ClusterSecretInvalid" and "not valid JSON" in err.message
    err = refused(secret({"server": "https://h"}, labels))
    assert "no key `config`" in err.message
    bad = secret({"kubeconfig": "x"})
    bad["data"]["kubeconfig"] = "%%%"
    assert "not valid base64" in refused(bad).message


def test_no_secret_value_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Parsing (good and bad), configuring, connecting and closing: the token and key never reach a log line."""
    caplog.set_level(logging.DEBUG)
    for sec in (secret({"kubeconfig": kubeconfig(user={"token": TOKEN, "exec": {"command": "x"}})}),
                secret({"kubeconfig": f"{TOKEN}: [unclosed"}),
                argocd({"bearerToken": TOKEN, "execProviderConfig": {"command": TOKEN}})):
        with pytest.raises(ClusterSecretError) as info:
            parse_cluster_secret(sec)
        logging.getLogger("test").warning("Refused: %s", info.value)
    creds = parse_cluster_secret(argocd({"bearerToken": TOKEN, "tlsClientConfig": {"insecure": True}}))
    configuration(creds, tmp_path)
    text = caplog.text
    assert TOKEN not in text and "s3cr3t" not in text
    assert "insecure" in text  # the warning about an unverified server is there (and only names the server)


def test_parent_of_maps_children_by_label() -> None:
    obj = {"metadata": {"name": "chat-blue", "namespace": "prod", "labels": {"perennial.ai/deployment": "chat"}}}
    assert parent_of(obj) == ("prod", "chat")
    assert parent_of({"metadata": {"name": "x", "namespace": "prod"}}) is None


def test_backoff_grows_jittered_and_bounded() -> None:
    import random

    b = Backoff(initial=0.5, maximum=4.0, rng=random.Random(1))
    delays = [b.delay(n) for n in range(1, 10)]
    assert all(0.25 <= d <= 4.0 for d in delays)
    assert delays[0] <= 0.5 and min(delays[4:]) >= 2.0  # 0.5 * 2**4 capped at 4, halved by jitter at worst
    assert len(set(delays)) == len(delays)  # jittered
    assert 2.0 <= b.delay(100_000) <= 4.0  # hours of outage later: still the cap (it overflowed at attempt 1026)


async def test_registry_rebuilds_on_secret_change_and_closes_unused() -> None:
    """Clusters: one RemoteCluster per Secret shared by its owners, rebuilt when its values change, closed (its
    private directory removed) when no owner uses it; a bad Secret is an error for that Secret only."""
    clusters = Clusters(resources=(), backoff=Backoff(initial=0.05, maximum=0.1))
    good = secret({"kubeconfig": kubeconfig()}, rv="1")
    try:
        first = await clusters.sync_owner(("prod", "a"), {"east": good})
        east = first["east"]
        assert isinstance(east, RemoteCluster) and east.owners == {("prod", "a")}
        directory = Path(east._dir)
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700 and (directory / "ca.crt").exists()
        again = await clusters.sync_owner(("prod", "b"), {"east": good, "gone": None})
        assert again["east"] is east and east.owners == {("prod", "a"), ("prod", "b")}
        assert isinstance(again["gone"], ClusterSecretError) and again["gone"].reason == "ClusterSecretNotFound"
        touched = secret({"kubeconfig": kubeconfig()}, rv="2")  # a new resourceVersion, the same values
        touched["metadata"]["annotations"] = {"note": "x"}
        assert (await clusters.sync_owner(("prod", "a"), {"east": touched}))["east"] is east
        changed = await clusters.sync_owner(("prod", "a"), {"east": secret({"kubeconfig": kubeconfig(user={"token": "other"})}, rv="3")})
        assert changed["east"] is not east and not directory.exists()
        east = changed["east"]
        await clusters.release(("prod", "a"))
        assert clusters.get("prod", "east") is east  # b still uses it
        bad = await clusters.sync_owner(("prod", "b"), {"east": secret({"kubeconfig": kubeconfig(user={"exec": {"command": "x"}})}, rv="3")})
        assert isinstance(bad["east"], ClusterSecretError) and clusters.get("prod", "east") is None
        assert not Path(east._dir).exists()
    finally:
        await clusters.close()


class FakeKube:
    """An API server's answers, scripted: listings; watches that deliver one event and break mid-stream (the third
    with a 410 first); once `refuse` is set, refused connections."""

    name = "fake"

    def __init__(self) -> None:
        self.lists = 0
        self.queries: list[dict[str, Any]] = []
        self.refuse = False

    async def request(self, method: str, path: str, body: Any = None, *, query: dict[str, Any] | None = None, **_: Any) -> Any:
        self.lists += 1
        return {"metadata": {"resourceVersion": "5"}, "items": [
            {"metadata": {"name": "chat-routes", "namespace": "prod", "resourceVersion": "5", "labels": {"perennial.ai/deployment": "chat"}}}]}

    async def watch(self, path: str, *, query: dict[str, Any], read_timeout: float, on_open: Any):
        from perennial.kube.client import ApiError

        self.queries.append(dict(query))
        if self.refuse:  # the server went away: the watch is refused (no stream opened)
            raise ApiError(0, {"message": "ClientConnectorError: refused"}, "GET", path)
        on_open()
        rv = str(int(query["resourceVersion"]) + 1)
        yield {"type": "MODIFIED", "object": {"metadata": {"name": "chat-routes", "namespace": "prod", "resourceVersion": rv,
                                                          "labels": {"perennial.ai/deployment": "chat"}}}}
        if len(self.queries) == 3:
            yield {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}
        raise ApiError(0, {"message": "ClientPayloadError: Response payload is not completed"}, "GET", path)


async def _until(predicate: Any, timeout: float = 20.0) -> None:
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_informer_resumes_cut_watches_without_calling_the_cluster_unreachable() -> None:
    """A watch the server accepted, then cut mid-stream, resumes from the last resourceVersion it delivered and is no
    outage (reachability stays True, no failure counted); a 410 relists; a refused watch is an outage."""
    from perennial.kube.cache import Cache
    from perennial.kube.informer import Informer

    kube = FakeKube()
    cache = Cache()
    health: list[bool | None] = []
    informer = Informer(kube, "v1", "ConfigMap", cache, namespace="prod", timeout_seconds=5,  # type: ignore[arg-type]
                        backoff=Backoff(initial=0.01, maximum=0.02), on_health=lambda i: health.append(i.reachability().reachable))
    informer.start()
    try:
        await _until(lambda: len(kube.queries) >= 5)
        assert [q["resourceVersion"] for q in kube.queries[:3]] == ["5", "6", "7"]  # each resumed where the last ended
        assert all(q["allowWatchBookmarks"] == "true" and q["labelSelector"] == "perennial.ai/deployment" and q["timeoutSeconds"] == 5
                   for q in kube.queries)
        assert cache.get("v1", "ConfigMap", "prod", "chat-routes")["metadata"]["resourceVersion"] == "8"
        assert informer.failures == 0 and health == [True]  # cut streams: never unreachable
        # the third watch ended in 410: relisted (the 2nd listing), watched from its version
        assert informer.relists_after_expiry == 1 and kube.lists == 2 and kube.queries[3]["resourceVersion"] == "5"
        kube.refuse = True  # refused: unreachable
        await _until(lambda: informer.failures >= 1)
        assert health == [True, False] and informer.reachability().reachable is False
        assert informer.max_open_watches == 1 and informer.open_watches == 0
    finally:
        await informer.stop()
