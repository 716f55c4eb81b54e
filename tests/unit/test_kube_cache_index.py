"""The operator's cache answers a label-selected list from an index (as client-go's indexers do), not by reading every
object of the kind: a Deployment's reconcile lists its pods by label, so with a scan each reconcile cost grew with every
pod of the namespace (quadratic in the number of Deployments)."""

from __future__ import annotations

import random
from typing import Any

from perennial.kube.cache import Cache


class Probe(dict):
    """An object that counts how often it is read."""

    reads = 0

    def __getitem__(self, key: Any) -> Any:
        self.reads += 1
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.reads += 1
        return super().get(key, default)


def pod(ns: str, name: str, labels: dict[str, str], rv: int = 1) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": ns, "name": name, "labels": labels, "resourceVersion": str(rv)}}


def brute(objs: dict[tuple[str, str], dict[str, Any]], ns: str | None, labels: dict[str, str]) -> set[tuple[str, str]]:
    return {k for k, o in objs.items() if (ns is None or k[0] == ns) and all((o["metadata"].get("labels") or {}).get(a) == b for a, b in labels.items())}


def test_label_selected_list_matches_a_scan_through_puts_relabels_and_removes():
    rng = random.Random(7)
    cache = Cache()
    live: dict[tuple[str, str], dict[str, Any]] = {}
    values = ["a", "b", "c"]
    for step in range(3000):
        ns, name = rng.choice(["default", "other"]), f"p{rng.randrange(60)}"
        if rng.random() < 0.2 and (ns, name) in live:
            cache.remove(live.pop((ns, name)))
        else:
            labels = {k: rng.choice(values) for k in ("app", "color", "rev") if rng.random() < 0.8}
            obj = pod(ns, name, labels, rv=step + 1)
            cache.put(obj)
            live[(ns, name)] = obj
        if step % 50 == 0:
            for sel in ({"app": "a"}, {"app": "b", "color": "c"}, {"rev": "a", "color": "a", "app": "a"}, {"missing": "x"}):
                for where in ("default", "other", None):
                    got = [(o["metadata"]["namespace"], o["metadata"]["name"]) for o in cache.list("v1", "Pod", where, labels=sel)]
                    assert len(got) == len(set(got)), "each object once"
                    assert set(got) == brute(live, where, sel), (step, sel, where)
    # an object whose labels changed is found only under its new labels; a label removed is no longer matched
    cache.put(pod("default", "x", {"app": "a", "color": "blue"}, rv=10_000))
    cache.put(pod("default", "x", {"app": "a"}, rv=10_001))
    assert "x" not in [o["metadata"]["name"] for o in cache.list("v1", "Pod", "default", labels={"color": "blue"})]
    assert "x" in [o["metadata"]["name"] for o in cache.list("v1", "Pod", "default", labels={"app": "a"})]
    # an older resourceVersion never replaces the cached object, nor its index entries
    cache.put(pod("default", "x", {"app": "a", "color": "blue"}, rv=10_000))
    assert "x" not in [o["metadata"]["name"] for o in cache.list("v1", "Pod", "default", labels={"color": "blue"})]


def test_label_selected_list_reads_only_the_objects_that_carry_a_selected_label():
    cache = Cache()
    others = []
    for i in range(500):
        obj = Probe(pod("default", f"other-{i}", {"app": "server", "deployment": f"d{i}"}))
        cache.put(obj)
        others.append(obj)
    mine = [pod("default", f"mine-{i}", {"app": "server", "deployment": "chat"}) for i in range(3)]
    for obj in mine:
        cache.put(obj)
    for obj in others:
        obj.reads = 0
    got = cache.list("v1", "Pod", "default", labels={"app": "server", "deployment": "chat"})
    assert sorted(o["metadata"]["name"] for o in got) == ["mine-0", "mine-1", "mine-2"]
    assert sum(o.reads for o in others) == 0, "the other Deployments' pods were read: the list scanned the namespace"
