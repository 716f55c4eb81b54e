"""What `perennial dev` prints about a Perennial Deployment: the block once it is Ready, then one line per change."""

from __future__ import annotations

import copy
from typing import Any

from perennial.devserving import (
    ServingAnnouncer,
    describe_change,
    describe_ready,
    token_command,
)


def deployment(ready: bool = True, served: list[dict[str, Any]] | None = None, **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "perennial.ai/v1alpha1", "kind": "Deployment",
        "metadata": {"name": "fruit-chat", "namespace": "default"},
        "spec": {"baseModelRef": {"name": "tiny"}, "adapters": [
            {"name": "fruit", "track": {"family": "fruit"}}, {"name": "fruit-sft", "adapterRef": {"name": "fruit-v1"}}]},
        "status": {"endpoint": "http://127.0.0.1:4321", "activeColor": "blue", "revision": "abc",
                   "servedAdapters": served if served is not None else [{"name": "fruit", "adapter": "fruit-v1"}],
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False", "reason": "Serving" if ready else "NoReadyReplicas",
                                   "message": "blue serves" if ready else "no ready replicas"}], **status},
    }


def test_ready_block_names_url_models_client_snippets_and_the_token_command():
    text = describe_ready(deployment(), "/state/kubeconfig")
    assert "serving (OpenAI API) at http://127.0.0.1:4321" in text
    assert "served name    fruit -> Adapter fruit-v1" in text
    assert "waiting for    fruit-sft" in text  # in the spec, not served yet
    assert 'OpenAI(base_url="http://127.0.0.1:4321/v1"' in text and 'model="fruit"' in text
    assert "curl http://127.0.0.1:4321/v1/chat/completions --json" in text and '"stream": true' in text
    assert "get secret fruit-chat-feedback-token -o jsonpath='{.data.token}' | base64 -d" in text
    assert "http://127.0.0.1:4321/v1/feedback" in text and "Authorization: Bearer $TOKEN" in text
    # the snippet is valid Python
    code = text.split("<<'EOF'\n", 1)[1].split("    EOF", 1)[0]
    compile("\n".join(line[4:] for line in code.splitlines()), "<snippet>", "exec")


def test_token_command_follows_a_token_secret_of_the_users():
    d = deployment()
    d["spec"]["feedback"] = {"tokenSecretRef": {"name": "my-token", "key": "secret"}}
    assert "get secret my-token -o jsonpath='{.data.secret}'" in token_command(d, "/k")


def test_changes_are_one_line_each_and_nothing_when_nothing_changed():
    old = deployment()
    assert describe_change(old, copy.deepcopy(old)) is None
    moved = deployment(served=[{"name": "fruit", "adapter": "fruit-v2"}, {"name": "fruit-sft", "adapter": "fruit-v1"}])
    assert describe_change(old, moved) == "Deployment default/fruit-chat now serves fruit -> fruit-v2, fruit-sft -> fruit-v1"
    switched = deployment(activeColor="green", revision="def")
    assert describe_change(old, switched) == "Deployment default/fruit-chat switched to green (revision def) (waiting for fruit-sft)"
    down = deployment(ready=False)
    assert describe_change(old, down) == "Deployment default/fruit-chat is not ready: NoReadyReplicas: no ready replicas"
    assert describe_change(down, deployment(ready=False)) is None
    assert "is ready again at http://127.0.0.1:4321" in (describe_change(down, old) or "")


class FakeKube:
    def __init__(self) -> None:
        self.objs: list[dict[str, Any]] = []
        self.local_url: str | None = "http://127.0.0.1:4321"

    def list(self, api_version: str, kind: str, namespace: str | None) -> list[dict[str, Any]]:
        assert (api_version, kind, namespace) == ("perennial.ai/v1alpha1", "Deployment", None)
        return copy.deepcopy(self.objs)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        assert (api_version, kind, namespace) == ("v1", "Service", "default")
        if name != "fruit-chat" or self.local_url is None:
            return None
        return {"metadata": {"name": name, "annotations": {"perennial.ai/local-url": self.local_url}}}


def test_the_url_printed_is_the_local_one_never_a_cluster_dns_name():
    """The status names the cluster DNS name until the local relay annotated the stable Service: nothing is printed
    before the local URL is known (a URL that answers nowhere on this machine was printed)."""
    kube, out = FakeKube(), []
    a = ServingAnnouncer(kube, "/k", out=out.append)
    kube.local_url = None
    kube.objs = [deployment(endpoint="http://fruit-chat.default.svc.cluster.local")]
    a.poll()
    assert out == []
    kube.local_url = "http://127.0.0.1:5555"
    a.poll()
    assert len(out) == 1 and "is serving (OpenAI API) at http://127.0.0.1:5555" in out[0] and "svc.cluster.local" not in out[0]
    kube.objs = [deployment(endpoint="http://127.0.0.1:5555")]  # the status catches up: nothing new to say
    a.poll()
    assert len(out) == 1


def test_the_announcer_prints_once_ready_then_each_change():
    kube, out = FakeKube(), []
    a = ServingAnnouncer(kube, "/k", out=out.append)
    kube.objs = [deployment(ready=False)]
    a.poll()
    assert out == []  # not ready: nothing yet
    kube.objs = [deployment()]
    a.poll()
    a.poll()
    assert len(out) == 1 and "is serving (OpenAI API) at" in out[0]
    kube.objs = [deployment(served=[{"name": "fruit", "adapter": "fruit-v2"}])]
    a.poll()
    assert out[1:] == ["Deployment default/fruit-chat now serves fruit -> fruit-v2 (waiting for fruit-sft)"]
    kube.objs = []
    a.poll()
    kube.objs = [deployment()]
    a.poll()  # deleted and created again: the whole block again
    assert len(out) == 3 and "is serving" in out[2]
