"""What `perennial dev` prints about the Perennial Deployments it serves: once one is Ready, the URL clients use,
its model names, an `openai` client snippet, a curl line and how to rate an answer; then each change of what
it serves (an adapter moved in place, a rollout, not ready any more).

`describe_ready` and `describe_change` are pure (tested on status objects); `ServingAnnouncer` polls the API
server in a daemon thread and prints them.
"""

from __future__ import annotations

import json
import logging
import shlex
import threading
from collections.abc import Callable, Mapping
from typing import Any

from .resources import conditions as cond

API = "perennial.ai/v1alpha1"
#: Where the local runtime relays a Service (perennial.local.proxy): the URL that answers on this machine.
LOCAL_URL = "perennial.ai/local-url"
POLL_SECONDS = 2.0
EXAMPLE_PROMPT = "What colour is a banana?"

log = logging.getLogger("perennial.dev")


def _ns_name(obj: Mapping[str, Any]) -> tuple[str, str]:
    return obj["metadata"].get("namespace") or "default", obj["metadata"]["name"]


def base_name(obj: Mapping[str, Any]) -> str:
    spec = obj.get("spec") or {}
    return (spec.get("engine") or {}).get("servedModelName") or (spec.get("baseModelRef") or {}).get("name", "")


def served(obj: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(served name, Adapter) now, as the status says (a canary shows both adapters)."""
    out = []
    for r in (obj.get("status") or {}).get("servedAdapters") or []:
        adapter = r.get("adapter", "")
        if r.get("canaryAdapter"):
            adapter = f"{adapter} + {r['canaryAdapter']} ({r.get('canaryWeight', 0)}%)"
        out.append((r["name"], adapter))
    return out


def waiting_for(obj: Mapping[str, Any]) -> list[str]:
    """Served names of the spec that serve nothing yet."""
    have = {n for n, _ in served(obj)}
    return [a["name"] for a in (obj.get("spec") or {}).get("adapters") or [] if a.get("name") not in have]


def token_command(obj: Mapping[str, Any], kubeconfig: str) -> str:
    """The kubectl line that prints the feedback token (the generated Secret's, or the one the spec names)."""
    from .resources.deployment import TOKEN_KEY, token_secret_name

    ns, name = _ns_name(obj)
    ref = ((obj.get("spec") or {}).get("feedback") or {}).get("tokenSecretRef") or {}
    secret, key = (ref["name"], ref.get("key", TOKEN_KEY)) if ref.get("name") else (token_secret_name(name), TOKEN_KEY)
    return (f"kubectl --kubeconfig {shlex.quote(kubeconfig)} -n {ns} get secret {secret} "
            f"-o jsonpath='{{.data.{key}}}' | base64 -d")


def is_ready(obj: Mapping[str, Any]) -> bool:
    status = obj.get("status") or {}
    return cond.is_true(status.get("conditions"), "Ready") and bool(status.get("endpoint"))


def describe_ready(obj: Mapping[str, Any], kubeconfig: str) -> str:
    """The block printed when a Deployment becomes Ready: URL, model names, how to call it and rate an answer."""
    ns, name = _ns_name(obj)
    status = obj.get("status") or {}
    url = status["endpoint"].rstrip("/")
    names = served(obj)
    model = names[0][0] if names else base_name(obj)
    lines = [f"Deployment {ns}/{name} is serving (OpenAI API) at {url}",
             f"  base model     {base_name(obj)}"]
    lines += [f"  served name    {n} -> Adapter {a}" for n, a in names]
    if pending := waiting_for(obj):
        lines.append(f"  waiting for    {', '.join(pending)} (no Ready Adapter yet: loaded into the running pods once there is one)")
    request = {"model": model, "messages": [{"role": "user", "content": EXAMPLE_PROMPT}], "max_tokens": 16}
    body, stream = json.dumps(request), json.dumps({**request, "stream": True})
    lines += [
        "  try it:",
        f"    curl {url}/v1/chat/completions --json {shlex.quote(body)}",
        f"    curl -N {url}/v1/chat/completions --json {shlex.quote(stream)}",
        "    .venv/bin/python - <<'EOF'",
        "    from openai import OpenAI",
        f"    client = OpenAI(base_url=\"{url}/v1\", api_key=\"unused\")  # the sidecar asks no key for completions",
        f"    r = client.chat.completions.create(model=\"{model}\", messages=[{{\"role\": \"user\", \"content\": \"{EXAMPLE_PROMPT}\"}}], max_tokens=16)",
        "    print(r.id, r.choices[0].message.content)",
        "    EOF",
        "  rate an answer (response_id: the answer's `id`):",
        f"    TOKEN=$({token_command(obj, kubeconfig)})",
        f"    curl -H \"Authorization: Bearer $TOKEN\" --json '{{\"response_id\": \"chatcmpl-...\", \"thumbs\": \"up\"}}' {url}/v1/feedback",
        f"  rollouts:       kubectl get pdeploy {name} -w; kubectl describe pdeploy {name}",
    ]
    return "\n".join(lines)


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """One line when what a Ready Deployment serves changed (adapters, active color, readiness); None otherwise."""
    ns, name = _ns_name(new)
    if not is_ready(new):
        if not is_ready(old):
            return None
        c = cond.get((new.get("status") or {}).get("conditions"), "Ready") or {}
        return f"Deployment {ns}/{name} is not ready: {c.get('reason', 'Unknown')}: {c.get('message', '')}".rstrip(": ")
    parts = [] if is_ready(old) else [f"is ready again at {(new.get('status') or {}).get('endpoint')}"]
    if served(old) != served(new):
        parts.append("now serves " + ", ".join(f"{n} -> {a}" for n, a in served(new)))
    o, n = (old.get("status") or {}), (new.get("status") or {})
    if (o.get("activeColor"), o.get("revision")) != (n.get("activeColor"), n.get("revision")):
        parts.append(f"switched to {n.get('activeColor')} (revision {n.get('revision')})")
    if (o.get("endpoint") or "") != (n.get("endpoint") or ""):
        parts.append(f"at {n.get('endpoint')}")
    if not parts:
        return None
    pending = waiting_for(new)
    return f"Deployment {ns}/{name} " + "; ".join(parts) + (f" (waiting for {', '.join(pending)})" if pending else "")


def with_local_endpoint(obj: Mapping[str, Any], local_url: str | None) -> dict[str, Any]:
    """`obj` with `status.endpoint` the URL that answers on this machine: the stable Service's local URL; without one
    (the relay not up yet), an endpoint that is no local address is left out (a cluster DNS name answers nowhere here)."""
    status = dict(obj.get("status") or {})
    if local_url:
        status["endpoint"] = local_url
    elif not str(status.get("endpoint") or "").startswith(("http://127.", "http://localhost", "http://[::1]")):
        status.pop("endpoint", None)
    return {**obj, "status": status}


class ServingAnnouncer:
    """Polls every Perennial Deployment and prints `describe_ready` once it is Ready, then `describe_change`."""

    def __init__(self, kube: Any, kubeconfig: str, out: Callable[[str], None] | None = None, poll_seconds: float = POLL_SECONDS) -> None:
        self.kube, self.kubeconfig, self.poll_seconds = kube, kubeconfig, poll_seconds
        self.out = out or (lambda text: print(text, flush=True))
        self._stop = threading.Event()
        self._seen: dict[tuple[str, str], dict[str, Any]] = {}  # Ready once: the last object printed about
        self._thread = threading.Thread(target=self._run, name="perennial-dev-serving", daemon=True)

    def start(self) -> ServingAnnouncer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def local_url(self, obj: Mapping[str, Any]) -> str | None:
        """The local URL of the stable Service (`<name>`, or `<name>-<region>` for node-pool regions), if relayed."""
        ns, name = _ns_name(obj)
        regions = [r["name"] for r in (obj.get("status") or {}).get("regions") or [] if isinstance(r, dict) and r.get("name")]
        for svc_name in [name] + [f"{name}-{r}" for r in regions]:
            svc = self.kube.get("v1", "Service", ns, svc_name) or {}
            url = (svc.get("metadata", {}).get("annotations") or {}).get(LOCAL_URL)
            if url:
                return str(url).rstrip("/")
        return None

    def poll(self) -> None:
        objs = self.kube.list(API, "Deployment", None)
        for raw in objs:
            ready = cond.is_true((raw.get("status") or {}).get("conditions"), "Ready")
            obj = with_local_endpoint(raw, self.local_url(raw) if ready else None)
            key = _ns_name(obj)
            last = self._seen.get(key)
            if last is None:
                if is_ready(obj):
                    self.out("\n" + describe_ready(obj, self.kubeconfig) + "\n")
                    self._seen[key] = obj
            elif (line := describe_change(last, obj)) is not None:
                self.out(line)
                self._seen[key] = obj
        for key in set(self._seen) - {_ns_name(o) for o in objs}:
            del self._seen[key]

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - the API server may be restarting; never kill the dev process
                log.debug("Could not read the Deployments: %s", exc)
