"""Pure parts of the Deployment controller (perennial.controllers.deployment) and its wiring in the manager:
adapter resolution and the promotion gate, the manifests applied to a color, the routes ConfigMap, the status
of the whole Deployment, the sidecar's address, and the mapping of serving children and pods to their parent."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from perennial.api.deployment import DeploymentSpec, PromotionGate
from perennial.controllers import children, rollout
from perennial.controllers import deployment as ctl
from perennial.controllers.manager import BUILTIN_WATCHES, Key, Manager
from perennial.resources import deployment as build

BODY = {"apiVersion": "perennial.ai/v1alpha1", "kind": "Deployment", "metadata": {"name": "chat", "namespace": "team", "uid": "u1", "generation": 3}}
BASE = {"metadata": {"name": "llama", "namespace": "team"}, "spec": {"source": {"uri": "hf://org/llama"}}, "status": {"resolvedUri": "hf://org/llama"}}
READY = {"conditions": [{"type": "Ready", "status": "True"}]}


def adapter(name: str, family: str = "support", version: int = 1, *, ready: bool = True, improvement: str | None = "0.2", **spec: Any) -> dict:
    status: dict[str, Any] = dict(READY) if ready else {"conditions": [{"type": "Ready", "status": "False"}]}
    if improvement is not None:
        status["improvement"] = improvement
    return {"metadata": {"name": name, "namespace": "team"}, "status": status,
            "spec": {"baseModelRef": {"name": "llama"}, "family": family, "version": version, "artifactUri": f"file:///a/{name}",
                     "lora": {"rank": 8}, **spec}}


def typed(**spec: Any) -> DeploymentSpec:
    return DeploymentSpec.model_validate({"baseModelRef": {"name": "llama"}, **spec})


def serving(spec: DeploymentSpec | None = None) -> build.Serving:
    spec = spec or typed()
    return build.Serving(body=BODY, spec=spec, base_model=BASE, region=build.regions(spec)[0], image="img:1")


# ----------------------------------------------------------------------------- adapters


def test_pinned_and_tracked_adapters_resolve_and_what_is_missing_is_said():
    spec = typed(adapters=[{"name": "pinned", "adapterRef": {"name": "p-v1"}}, {"name": "latest", "track": {"family": "support"}},
                           {"name": "gone", "adapterRef": {"name": "nope"}}, {"name": "early", "adapterRef": {"name": "loading"}}])
    found, problems = ctl.resolve_adapters(spec, [
        adapter("p-v1", "other"), adapter("s-v1", version=1), adapter("s-v3", version=3), adapter("s-v2", version=2),
        adapter("s-v4", version=4, ready=False), adapter("s-v5", version=5, improvement="-0.1"), adapter("loading", ready=False)])
    assert {k: v["metadata"]["name"] for k, v in found.items()} == {"pinned": "p-v1", "latest": "s-v3"}
    assert problems == ["gone: Adapter 'nope' does not exist", "early: Adapter 'loading' is not Ready"]


def test_a_tracked_family_without_a_promoted_adapter_serves_nothing_yet():
    spec = typed(adapters=[{"name": "latest", "track": {"family": "support"}}])
    found, problems = ctl.resolve_adapters(spec, [adapter("s-v1", improvement=None)])
    assert found == {} and "passed the promotion gate" in problems[0]
    unguarded = typed(adapters=[{"name": "latest", "track": {"family": "support", "requirePromotion": False}}])
    assert ctl.resolve_adapters(unguarded, [adapter("s-v1", improvement=None)])[0]["latest"]["metadata"]["name"] == "s-v1"


@pytest.mark.parametrize(("status", "gate", "passes"), [
    ({"improvement": "0.1"}, {}, True),
    ({"improvement": "-0.1"}, {}, False),
    ({}, {}, False),
    ({}, {"requireEvaluation": False}, True),
    ({"improvement": "0.1", "meanReward": "0.5"}, {"minImprovement": "0.2"}, False),
    ({"improvement": "0.3", "meanReward": "0.5"}, {"minMeanReward": "0.6"}, False),
    ({"improvement": "0.3", "meanReward": "0.7"}, {"minMeanReward": "0.6"}, True),
    ({"improvement": "0.3"}, {"minMeanReward": "0.6"}, False),
    ({"improvement": "nan"}, {}, False),
])
def test_promotion_gate(status, gate, passes):
    assert ctl.passes_gate({"status": status}, PromotionGate.model_validate(gate)) is passes


def test_adapter_info_gives_the_engine_a_local_path():
    info = ctl.adapter_info(adapter("a", artifactUri="pvc://artifacts/adapters/a"))
    assert info == rollout.AdapterInfo(name="a", uri="/mnt/pvc/artifacts/adapters/a", rank=8, base_model="llama")


def test_a_served_name_whose_adapter_went_away_keeps_what_it_serves():
    """An Adapter deleted or not Ready for a while must not take its served name away from clients."""
    spec = typed(adapters=[{"name": "support", "adapterRef": {"name": "s-v2"}}, {"name": "new", "adapterRef": {"name": "n-v1"}},
                           {"name": "fresh", "adapterRef": {"name": "f-v1"}}])
    current = {"revision": "r", "adapters": {"s-v1": {"uri": "/a/s-v1", "rank": 16}},
               "routes": {"support": [{"adapter": "s-v1", "weight": 100}], "gone": [{"adapter": "s-v1", "weight": 100}]}}
    out = ctl.desired_routes(spec, {"fresh": adapter("f-v1")}, current)
    assert out == {"fresh": ctl.adapter_info(adapter("f-v1")),
                   "support": rollout.AdapterInfo(name="s-v1", uri="/a/s-v1", rank=16, base_model="llama")}
    assert ctl.desired_routes(spec, {}, None) == {}


# ----------------------------------------------------------------------------- children


def test_a_color_at_the_desired_revision_is_the_whole_manifest_with_annotations():
    s = serving()
    rev = build.revision(s)
    m = ctl.color_manifest(s, "green", rollout.ColorTarget(rev, 2, {"perennial.ai/preview-started-at": "t", "perennial.ai/smoke": None}), rev,
                           current=None, autoscaled_active=False)
    assert m["spec"]["replicas"] == 2 and m["spec"]["template"]["metadata"]["labels"]["perennial.ai/revision"] == rev
    assert m["metadata"]["annotations"] == {"perennial.ai/preview-started-at": "t", "perennial.ai/smoke": None}
    assert children.without_nulls(m)["metadata"]["annotations"] == {"perennial.ai/preview-started-at": "t"}


def test_a_color_of_another_revision_is_only_scaled_and_annotated():
    """Its pod template belongs to an earlier spec: rebuilding it from this one would change the pods that serve."""
    s = serving()
    current = {"metadata": {"name": "chat-blue", "namespace": "team"}, "spec": {"replicas": 3}}
    m = ctl.color_manifest(s, "blue", rollout.ColorTarget("old", 0, {"perennial.ai/scale-down-at": None}), build.revision(s),
                           current=current, autoscaled_active=False)
    assert m == {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "chat-blue", "namespace": "team",
                 "annotations": {"perennial.ai/scale-down-at": None}}, "spec": {"replicas": 0}}
    assert ctl.color_manifest(s, "blue", rollout.ColorTarget("old", 0), build.revision(s), current=None, autoscaled_active=False) is None


def test_the_autoscaled_active_color_keeps_the_autoscalers_count():
    s = serving()
    rev = build.revision(s)
    current = {"metadata": {"name": "chat-blue", "namespace": "team"}, "spec": {"replicas": 5}}
    m = ctl.color_manifest(s, "blue", rollout.ColorTarget(rev, 5), rev, current=current, autoscaled_active=True)
    assert "replicas" not in m["spec"]
    m = ctl.color_manifest(s, "blue", rollout.ColorTarget(rev, 5), rev, current=current, autoscaled_active=False)
    assert m["spec"]["replicas"] == 5


def test_routes_config_map_holds_the_decided_document_byte_for_byte():
    s = serving()
    doc = {"revision": "abc", "base": {"name": "llama"}, "adapters": {"a": {"uri": "/x", "rank": 8}}, "routes": {"s": [{"adapter": "a", "weight": 100}]}}
    decision = rollout.AdapterDecision(routes=doc, progress={}, smoke=None, served=[], phase="Stable", message="", conditions=[], notes=[],
                                       requeue_after=None)
    cm = ctl.routes_manifest(s, decision)
    assert json.loads(cm["data"]["routes.json"]) == doc and cm["metadata"]["name"] == "chat-routes"
    assert cm["metadata"]["annotations"] == {"perennial.ai/routes-revision": "abc", "perennial.ai/adapter-rollouts": None}
    assert cm["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "perennial-operator" and cm["metadata"]["ownerReferences"][0]["uid"] == "u1"
    moving = {"s": {"adapter": "b", "from": "a", "startedAt": "t", "step": -1}}
    decision.progress = moving
    assert json.loads(ctl.routes_manifest(s, decision)["metadata"]["annotations"]["perennial.ai/adapter-rollouts"]) == moving


# ----------------------------------------------------------------------------- status


def result(name: str = "default", phase: str = "Stable", ready: int = 2, conditions: list | None = None, **kw: Any) -> ctl.RegionResult:
    st = rollout.RegionRollout(phase=phase, active_color="blue", revision="r1", ready_replicas=ready, desired_replicas=2, message=f"{name} ok")
    parts = conditions if conditions is not None else [
        rollout.ConditionPart("Ready", "True", "Serving", "blue serves"), rollout.ConditionPart("Progressing", "False", "RolloutComplete", ""),
        rollout.ConditionPart("Degraded", "False", "AsExpected", "")]
    return ctl.RegionResult(name=name, desired_revision="r1", manifests=[], rollout=st, conditions=parts, notes=[], requeue_after=None,
                            served=[rollout.ServedRoute("support", "s-v1")], selector="sel", endpoint="http://chat.team.svc.cluster.local", **kw)


def conds(status: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_status_of_one_serving_region():
    st = ctl.decide_status(BODY, [result(routes_revision="rr")], [], [])
    assert st["observedGeneration"] == 3 and st["phase"] == "Stable" and st["readySummary"] == "2/2"
    assert conds(st) == {"Ready": ("True", "Serving"), "Progressing": ("False", "RolloutComplete"), "Degraded": ("False", "AsExpected")}
    assert st["activeColor"] == "blue" and st["revision"] == "r1" and st["selector"] == "sel" and st["endpoint"].startswith("http://chat.")
    assert st["servedAdapters"] == [{"name": "support", "adapter": "s-v1"}] and st["servedSummary"] == "support=s-v1"
    assert st["regions"] == [{"name": "default", "phase": "Stable", "activeColor": "blue", "revision": "r1", "routesRevision": "rr",
                              "readyReplicas": 2, "desiredReplicas": 2, "endpoint": "http://chat.team.svc.cluster.local", "message": "default ok"}]


def test_a_remote_region_is_reported_unsupported_and_named():
    """An operator run without remote-cluster support (no `Clusters` in its context) names the region it cannot serve."""
    from perennial.api.deployment import Region

    st = ctl.decide_status(BODY, [result("eu")], [ctl.unsupported_region(Region(name="us", clusterSecretRef={"name": "us-kubeconfig"}))], [])
    c = {x["type"]: x for x in st["conditions"]}
    assert c["Ready"]["status"] == "False" and c["Ready"]["reason"] == "RegionUnsupported" and "us" in c["Ready"]["message"]
    assert c["Degraded"]["status"] == "True"
    assert st["regions"][1] == {"name": "us", "phase": "Pending", "message": f"Region us: {ctl.UNSUPPORTED_REGION}", "readyReplicas": 0, "desiredReplicas": 0}
    assert st["activeColor"] == "blue", "the regions that serve still show"


@pytest.mark.parametrize(("reason", "phase"), [("RegionUnreachable", "Unreachable"), ("ClusterSecretNotFound", "Degraded"),
                                               ("ClusterAuthUnsupported", "Degraded")])
def test_a_region_whose_cluster_cannot_be_worked_in_is_named_with_its_reason_and_cluster(reason: str, phase: str):
    st = ctl.decide_status(BODY, [result("eu")], [ctl.unreachable("us", "us-kubeconfig", "connection refused", reason)], [])
    c = {x["type"]: x for x in st["conditions"]}
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", reason) and "us" in c["Ready"]["message"]
    assert c["Degraded"]["status"] == "True" and "connection refused" in c["Degraded"]["message"]
    assert st["phase"] == phase
    us = st["regions"][1]
    assert (us["name"], us["phase"], us["cluster"]) == ("us", phase, "us-kubeconfig") and "connection refused" in us["message"]
    assert st["activeColor"] == "blue" and st["regions"][0]["name"] == "eu", "the region that serves still shows"


def test_adapters_without_an_object_make_the_deployment_degraded_not_unready():
    st = ctl.decide_status(BODY, [result()], [], ["gone: Adapter 'nope' does not exist"])
    assert conds(st)["Degraded"] == ("True", "AdapterNotReady") and conds(st)["Ready"] == ("True", "Serving")


def test_status_keeps_the_learning_loops_fields_and_the_transition_times():
    first = ctl.decide_status(BODY, [result()], [], [])
    body = {**BODY, "status": {**first, "newFeedbackRecords": 7}}
    again = ctl.decide_status(body, [result()], [], [])
    assert again["newFeedbackRecords"] == 7 and again["conditions"] == first["conditions"]


# ----------------------------------------------------------------------------- observing pods and Services


def test_pods_are_read_where_their_sidecar_listens_and_only_when_ready():
    pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "engine"}, {"name": "sidecar", "ports": [{"name": "http", "containerPort": 9090}]}]},
           "status": {"phase": "Running", "podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}
    assert ctl.sidecar_port(pod) == 9090 and ctl.pod_ready(pod)
    assert ctl.sidecar_port({"spec": {"containers": [{"name": "sidecar"}]}}) == 8080
    assert not ctl.pod_ready({**pod, "metadata": {"name": "p", "deletionTimestamp": "t"}})
    assert not ctl.pod_ready({**pod, "status": {**pod["status"], "conditions": [{"type": "Ready", "status": "False"}]}})

    async def unready() -> rollout.PodRoutes:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            return await ctl.pod_routes(session, {**pod, "status": {"phase": "Pending"}})

    assert asyncio.run(unready()) == rollout.PodRoutes("p", False, None)


def test_service_url_prefers_the_local_runtimes_address():
    assert ctl.service_url({"metadata": {"annotations": {"perennial.ai/local-url": "http://127.0.0.1:4000/"}}}, "chat", "team") == "http://127.0.0.1:4000"
    assert ctl.service_url({"metadata": {}}, "chat", "team") == "http://chat.team.svc.cluster.local"
    assert ctl.service_url(None, "chat-preview", "team") == "http://chat-preview.team.svc.cluster.local"


def test_smoke_test_against_nothing_fails_with_a_reason():
    passed, why = asyncio.run(ctl.smoke_test("http://127.0.0.1:9", ["m"], prompt="hi", expect_regex=None, max_tokens=4, timeout=2))
    assert not passed and "did not answer" in why


# ----------------------------------------------------------------------------- wiring


def test_unserved_optional_kinds_are_tried_again_later(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(children.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(children, "_unserved", {})
    children._unserved[ctl.KEDA] = now[0]
    assert children.is_unserved(*ctl.KEDA)
    now[0] += children.UNSERVED_RECHECK_SECONDS
    assert not children.is_unserved(*ctl.KEDA), "a CRD installed later is used"
    assert ctl.KEDA in children.OPTIONAL_KINDS


def test_serving_children_and_their_pods_wake_the_perennial_deployment():
    from perennial.config import OperatorConfig
    from perennial.controllers import all_controllers
    from perennial.controllers.base import Context
    from perennial.kube.cache import Cache

    watched = {(w.api_version, w.kind): w for w in BUILTIN_WATCHES}
    for kind in (("apps/v1", "Deployment"), ("v1", "Service"), ("policy/v1", "PodDisruptionBudget"),
                 ("autoscaling/v2", "HorizontalPodAutoscaler"), ("keda.sh/v1alpha1", "ScaledObject"), ("v1", "Pod")):
        assert watched[kind].labels == {"app.kubernetes.io/managed-by": build.MANAGED_BY}, kind
    assert watched[("keda.sh/v1alpha1", "ScaledObject")].optional
    m = Manager(all_controllers(), Context(clusters={}, cache=Cache(), config=OperatorConfig(), clock=lambda: 0.0))
    s = serving()
    rev = build.revision(s)
    child = {**build.deployment(s, "blue", rev, 1), "metadata": {**build.deployment(s, "blue", rev, 1)["metadata"], "ownerReferences": [
        {"apiVersion": "perennial.ai/v1alpha1", "kind": "Deployment", "name": "chat", "uid": "u1"}]}}
    assert m.keys_for(None, child) == {Key("Deployment", "team", "chat")}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "chat-blue-x", "namespace": "team",
                                                           "labels": build.deployment(s, "blue", rev, 1)["spec"]["template"]["metadata"]["labels"],
                                                           "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "chat-blue-5d8f7", "uid": "rs"}]}}
    assert m.keys_for(None, pod) == {Key("Deployment", "team", "chat")}
    assert m.keys_for(pod, None) == {Key("Deployment", "team", "chat")}, "a deleted pod wakes it too"
    stranger = {**pod, "metadata": {**pod["metadata"], "labels": {"perennial.ai/deployment": "chat"}}}
    assert m.keys_for(None, stranger) == set(), "only pods of this operator"


def test_a_blocked_deployment_that_serves_stays_ready_and_says_why_nothing_moves():
    new = ctl._blocked_status(BODY, "BaseModelNotFound", "BaseModel 'llama' does not exist yet")
    assert conds(new) == {"Ready": ("False", "BaseModelNotFound"), "Progressing": ("Unknown", "BaseModelNotFound"),
                          "Degraded": ("Unknown", "BaseModelNotFound")} and new["phase"] == "Pending"
    serving_body = {**BODY, "status": ctl.decide_status(BODY, [result()], [], [])}
    blocked = ctl._blocked_status(serving_body, "BaseModelNotReady", "BaseModel 'llama' is not Ready")
    assert conds(blocked) == {"Ready": ("True", "Serving"), "Progressing": ("Unknown", "BaseModelNotReady"), "Degraded": ("True", "BaseModelNotReady")}
    assert blocked["activeColor"] == "blue" and blocked["regions"] == serving_body["status"]["regions"] and blocked["phase"] == "Degraded"
    # what served went with the cause (LeaderWorkerSet's CRD removed takes its groups): Ready turns False, and it
    # stays so pass after pass (no flip back to Degraded=Unknown once Ready is False)
    gone = ctl._blocked_status(serving_body, ctl.LWS_NOT_INSTALLED, "LeaderWorkerSet is not installed", serving_gone=True)
    assert conds(gone) == {"Ready": ("False", ctl.LWS_NOT_INSTALLED), "Progressing": ("Unknown", ctl.LWS_NOT_INSTALLED),
                           "Degraded": ("True", ctl.LWS_NOT_INSTALLED)} and gone["phase"] == "Degraded"
    again = ctl._blocked_status({**serving_body, "status": gone}, ctl.LWS_NOT_INSTALLED, "LeaderWorkerSet is not installed", serving_gone=True)
    assert again["conditions"] == gone["conditions"] and again["phase"] == "Degraded"


@pytest.mark.parametrize(("answers", "skipped"), [
    ([500, 429, {"resources": [{"name": "scaledjobs"}]}], True),  # transient errors, then served without ScaledObjects
    ([0, 404], True),  # the group is not served at all
    ([{"resources": [{"name": "scaledobjects"}]}], False),  # KEDA installed: its listing is waited for
    ([403], False),  # cannot tell: READY_TIMEOUT_SECONDS bounds the wait
    (["<html>a proxy's page</html>"], False),  # a body that is no discovery document: cannot tell (never a crash
    ([{"resources": ["scaledobjects", 3, None]}], False),  # of the discovery task, which would leave it unknown for good)
])
def test_an_unserved_optional_resource_holds_no_reconcile_back(monkeypatch, answers, skipped):
    from perennial.config import OperatorConfig
    from perennial.controllers import all_controllers
    from perennial.controllers.base import Context
    from perennial.kube import ApiError
    from perennial.kube.cache import Cache

    asked = []

    class Kube:
        async def request(self, method: str, path: str, **_: Any) -> Any:
            asked.append(path)
            answer = answers[len(asked) - 1]
            if isinstance(answer, int):
                raise ApiError(answer, {"message": "injected"}, method, path, retry_after=0.01 if answer == 429 else None)
            return answer

    async def no_sleep(_: float) -> None:
        return None

    monkeypatch.setattr("perennial.controllers.manager.asyncio.sleep", no_sleep)
    m = Manager(all_controllers(), Context(clusters={"local": Kube()}, cache=Cache(), config=OperatorConfig(), clock=lambda: 0.0))  # type: ignore[dict-item]
    m._by_plural = {(w.group, w.plural): w for w in m.watched()}
    optional = [w for w in m._by_plural.values() if w.group == "keda.sh"]
    m._listed_once = {k for k, w in m._by_plural.items() if w.group != "keda.sh"}  # every other resource was listed
    asyncio.run(m._skip_unserved(optional))
    assert set(asked) == {"/apis/keda.sh/v1alpha1"} and len(asked) == len(answers)
    assert m._ready is skipped


def test_a_slow_smoke_test_lets_the_worker_go_and_its_end_wakes_the_deployment():
    """A smoke test longer than SMOKE_INLINE_SECONDS goes on in the background: the reconcile returns None (still
    running), the test's end wakes the Deployment, and the next reconcile gets its verdict once."""
    from perennial.controllers.base import Context

    async def scenario() -> None:
        woken: list[tuple[str, set]] = []
        ctx = Context.__new__(Context)
        ctx.tasks, ctx.wake = {}, lambda kind, keys: woken.append((kind, keys))
        release = asyncio.Event()

        async def slow() -> tuple[bool, str]:
            await release.wait()
            return True, ""

        key = ("smoke", ("team", "chat"), "default", "pods", "green", "r2")
        old = ctl.SMOKE_INLINE_SECONDS
        ctl.SMOKE_INLINE_SECONDS = 0.05
        try:
            assert await ctl.smoke_in_background(ctx, key, ("team", "chat"), slow) is None
            assert await ctl.smoke_in_background(ctx, key, ("team", "chat"), slow) is None, "one test per key, not two"
            release.set()
            for _ in range(100):
                if woken:
                    break
                await asyncio.sleep(0.01)
            assert woken == [("Deployment", {("team", "chat")})]
            assert await ctl.smoke_in_background(ctx, key, ("team", "chat"), slow) == (True, "")
            assert key not in ctx.tasks, "handed out once"
            # a test no decision asks for any more (the spec moved on) is cancelled; another region's is kept
            never, other = asyncio.Event(), ("smoke", ("team", "chat"), "us", "pods", "blue", "r3")

            async def hangs() -> tuple[bool, str]:
                await never.wait()
                return True, ""

            stale = ("smoke", ("team", "chat"), "default", "pods", "blue", "r3")
            assert await ctl.smoke_in_background(ctx, stale, ("team", "chat"), hangs) is None
            assert await ctl.smoke_in_background(ctx, other, ("team", "chat"), hangs) is None
            task = ctx.tasks[stale]
            ctl.forget_smoke_tests(ctx, ("team", "chat"), set(), {"default"})
            await asyncio.sleep(0)
            assert stale not in ctx.tasks and task.cancelled() and other in ctx.tasks
            ctl.forget_smoke_tests(ctx, ("team", "chat"))
            assert not ctx.tasks
        finally:
            ctl.SMOKE_INLINE_SECONDS = old

    asyncio.run(scenario())


def test_an_api_server_failure_on_the_way_to_another_clusters_pods_is_no_verdict_on_them():
    """Through another cluster's API server proxy, that server's own error (a 429, a 500, no endpoints yet: a
    `Status` body) never fails a smoke test (it would abort a good rollout): no verdict, asked again after a pause.
    The pod's own error answer (not a `Status`) is a verdict."""
    from perennial.controllers.base import Context
    from perennial.kube import ApiError

    class Kube:
        def __init__(self, exc: ApiError) -> None:
            self.exc = exc

        async def request(self, *args: object, **kwargs: object) -> str:
            raise self.exc

    async def scenario() -> None:
        status = ApiError(503, {"kind": "Status", "code": 503, "message": "no endpoints available for service \"chat-preview\""}, "POST", "/x")
        where = ctl.Where(kube=Kube(status), cache=None, remote=True, cluster="east")  # type: ignore[arg-type]
        code, text = await where.call("POST", service_name="chat-preview", namespace="team", path="/v1/chat/completions", body={}, timeout=1)
        assert code == ctl.INCONCLUSIVE and "east" in text
        pod_error = ApiError(500, {"error": {"message": "engine crashed"}}, "POST", "/x")
        code, text = await ctl.Where(kube=Kube(pod_error), cache=None, remote=True, cluster="east").call(  # type: ignore[arg-type]
            "POST", service_name="chat-preview", namespace="team", path="/v1/chat/completions", body={}, timeout=1)
        assert code == 500 and "engine crashed" in text

        async def post(body: dict) -> tuple[int, str]:
            return ctl.INCONCLUSIVE, "the API server answered 429"

        ctx = Context.__new__(Context)
        ctx.tasks, ctx.wake = {}, None
        key = ("smoke", ("team", "chat"), "east", "pods", "green", "r2")
        run = lambda: ctl.smoke_test(post, ["m"], prompt="hi", expect_regex=None, max_tokens=4, timeout=1)  # noqa: E731
        assert await ctl.smoke_in_background(ctx, key, ("team", "chat"), run) is None, "no verdict"
        assert isinstance(ctx.tasks[key], float), "held before it is asked again"
        assert await ctl.smoke_in_background(ctx, key, ("team", "chat"), run) is None and isinstance(ctx.tasks[key], float)
        ctl.forget_smoke_tests(ctx, ("team", "chat"))
        assert not ctx.tasks

    asyncio.run(scenario())


def test_a_status_another_controller_wrote_during_a_reconcile_is_never_overwritten_by_its_stale_copy():
    """The serving controller keeps the learning loop's status fields and conditions as it read them. When the loop
    writes its status while a serving reconcile runs (the cache gets the newer object, same generation, same
    metadata), the serving status must not be written against that newer version from the older copy: the loop's
    newer values would be silently reverted. The write goes against the version the reconcile read (a 409 then
    retries it with the current object)."""
    from perennial.config import OperatorConfig
    from perennial.controllers.base import Context, Controller, Outcome
    from perennial.kube import ApiError
    from perennial.kube.cache import Cache

    read = {**BODY, "metadata": {**BODY["metadata"], "resourceVersion": "10"},
            "status": {"observedGeneration": 3, "newFeedbackRecords": 5}}
    by_loop = {**read, "metadata": {**read["metadata"], "resourceVersion": "11"},
               "status": {"observedGeneration": 3, "newFeedbackRecords": 9}}
    patches: list[dict] = []

    class Kube:
        async def patch(self, api_version: str, kind: str, ns: str, name: str, body: dict, subresource: str | None = None) -> dict:
            patches.append(body)
            if body["metadata"]["resourceVersion"] != "11":
                raise ApiError(409, {"reason": "Conflict", "message": "the object has been modified"}, "PATCH", "/x")
            return {**by_loop, "status": {**by_loop["status"], **body["status"]}}

        async def create(self, obj: dict) -> dict:
            return obj

    cache = Cache()

    async def reconcile(obj: dict, ctx: Context) -> Outcome:
        cache.put(by_loop)  # the learning loop's status write arrives through the watch meanwhile
        return Outcome(ctl.decide_status(obj, [result()], [], []))

    controller = Controller("Deployment", "deployments", ctl.DeploymentStatus, reconcile)
    m = Manager([controller], Context(clusters={"local": Kube()}, cache=cache, config=OperatorConfig(), clock=lambda: 0.0))  # type: ignore[dict-item]
    cache.put(read)

    async def scenario() -> None:
        await m.process(Key("Deployment", "team", "chat"))
        await asyncio.sleep(0)

    asyncio.run(scenario())
    reverted = [p for p in patches if p["metadata"]["resourceVersion"] == "11" and p["status"].get("newFeedbackRecords") == 5]
    assert not reverted, f"the loop's newer newFeedbackRecords (9) was written back to the stale 5: {patches}"


def test_one_outage_of_a_regions_cluster_is_one_message_whichever_request_failed_last():
    """While a region's API server is down, each pass reports it from whichever of its watches (one per kind) failed
    last, or from the request of the pass that failed: the message (status and conditions) must not change with the
    kind or request, or every pass writes the status again (one write per 30 s per Deployment for the whole outage)."""
    from perennial.kube import ApiError
    from perennial.kube.informer import Reachability

    refused = "ClientConnectorError: Cannot connect to host 10.0.0.9:6443 ssl:<ssl.SSLContext object at 0x7f3a2c> [Connect call failed ('10.0.0.9', 6443)]"

    class Conn:
        server, synced = "https://10.0.0.9:6443", True

        def __init__(self, path: str) -> None:
            self.path = path

        def reachability(self) -> Reachability:
            return Reachability(False, 100.0, str(ApiError(0, {"message": refused}, "GET", self.path)), 200.0)

    a = ctl.cluster_problem("east", "east-cluster", Conn("/apis/apps/v1/namespaces/team/deployments"))
    b = ctl.cluster_problem("east", "east-cluster", Conn("/api/v1/namespaces/team/services"))
    assert a is not None and b is not None
    assert a.rollout.message == b.rollout.message and a.conditions == b.conditions
    assert "Cannot connect to host 10.0.0.9:6443" in a.rollout.message, "the cause is still said"
    mid_pass = ctl.unreachable("east", "east-cluster", ctl.outage(ApiError(0, {"message": refused}, "PATCH", "/apis/apps/v1/namespaces/team/deployments/chat-blue")))
    assert mid_pass.conditions == ctl.unreachable("east", "east-cluster", ctl.outage(ApiError(0, {"message": refused}, "POST", "/api/v1/namespaces/team/configmaps"))).conditions


def test_children_of_a_deployment_with_a_long_name_wake_it():
    """A name over 63 characters is shortened in the children's `perennial.ai/deployment` label: a pod's change (no
    ownerReference reaches the Deployment) and a child's change in another cluster (none crosses clusters) must still
    wake the Deployment by its full name."""
    from perennial.config import OperatorConfig
    from perennial.controllers import all_controllers
    from perennial.controllers.base import Context
    from perennial.kube.cache import Cache

    long = "chat-" + "x" * 70
    cache = Cache()
    m = Manager(all_controllers(), Context(clusters={}, cache=cache, config=OperatorConfig(), clock=lambda: 0.0))
    cache.put({**BODY, "metadata": {**BODY["metadata"], "name": long}})
    label = build.label_value(long)
    assert label != long
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "team", "labels": {
        "perennial.ai/deployment": label, "app.kubernetes.io/managed-by": build.MANAGED_BY}}}
    assert Key("Deployment", "team", long) in m.keys_for(None, pod)
    m._ready = True

    async def wake() -> None:
        m.wake("Deployment", {("team", label)})

    asyncio.run(wake())
    assert Key("Deployment", "team", long) in m.queue._queued


def test_a_color_s_leaderworkerset_and_its_pods_wake_the_perennial_deployment():
    """Across nodes (pipelineParallelSize > 1) a color is a LeaderWorkerSet: watched where installed (optional: its CRD
    may not be), its changes (the groups' readiness) and its leader and worker pods wake the Deployment."""
    from perennial.config import OperatorConfig
    from perennial.controllers import all_controllers
    from perennial.controllers.base import Context
    from perennial.kube.cache import Cache
    from perennial.resources import lws

    watched = {(w.api_version, w.kind): w for w in BUILTIN_WATCHES}
    w = watched[(lws.LWS_API, "LeaderWorkerSet")]
    assert w.optional and w.id == lws.LWS_RESOURCE and w.labels == {"app.kubernetes.io/managed-by": build.MANAGED_BY}
    m = Manager(all_controllers(), Context(clusters={}, cache=Cache(), config=OperatorConfig(), clock=lambda: 0.0))
    s = serving(typed(engine={"pipelineParallelSize": 2}))
    obj = lws.workload(s, "blue", build.revision(s), 1)
    child = {**obj, "metadata": {**obj["metadata"], "ownerReferences": [{"apiVersion": "perennial.ai/v1alpha1", "kind": "Deployment", "name": "chat", "uid": "u1"}]}}
    assert m.keys_for(None, child) == {Key("Deployment", "team", "chat")}
    for role in ("leaderTemplate", "workerTemplate"):
        labels = obj["spec"]["leaderWorkerTemplate"][role]["metadata"]["labels"]
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"chat-blue-0-{role}", "namespace": "team", "labels": labels,
                                                               "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "chat-blue", "uid": "ss"}]}}
        assert m.keys_for(None, pod) == {Key("Deployment", "team", "chat")}, role


# ----------------------------------------------------------------------------- status batching


def _conds(ready: str, progressing: str, degraded: str = "False", reason: str = "R") -> list[dict[str, Any]]:
    return [{"type": t, "status": v, "reason": reason if t != "Degraded" else "AsExpected", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}
            for t, v in (("Ready", ready), ("Progressing", progressing), ("Degraded", degraded))]


def test_status_steps_back_to_back_are_written_once_with_their_notes_and_bad_news_at_once():
    """`batched`: a status change that is a step on the way is held up to STATUS_BATCH_SECONDS (the Deployment is
    looked at again when the batch ends), the steps that follow join it, and the write carries every held note; a
    warning, Ready leaving True or Degraded turning True is written at once with what was held."""
    from perennial.config import OperatorConfig
    from perennial.controllers.base import Context, Note, Outcome
    from perennial.kube.cache import Cache

    clock = [100.0]
    ctx = Context(clusters={}, cache=Cache(), config=OperatorConfig(), clock=lambda: clock[0])
    new = {**BODY}  # no status yet
    progressing = {"observedGeneration": 3, "phase": "Progressing", "conditions": _conds("False", "True", reason="FirstRolloutInProgress")}
    serving = {"observedGeneration": 3, "phase": "Stable", "conditions": _conds("True", "False"), "endpoint": "http://a"}

    # the first step: held (nothing written: the status as it stands), looked at again when the batch ends
    out = ctl.batched(ctx, new, Outcome(progressing, [Note("PreviewCreated", "created blue")], 1800.0))
    assert out.status == {} and out.notes == [] and out.requeue_after == pytest.approx(ctl.STATUS_BATCH_SECONDS)
    # the next step within the batch (the switch): held too, its notes join; the batch ends once no step followed
    # for STATUS_BATCH_SECONDS
    clock[0] += 0.5
    out = ctl.batched(ctx, new, Outcome(serving, [Note("Switched", "blue serves")]))
    assert out.status == {} and out.notes == [] and out.requeue_after == pytest.approx(ctl.STATUS_BATCH_SECONDS)
    # a pass with nothing new in the batch does not make it longer
    clock[0] += 1.0
    out = ctl.batched(ctx, new, Outcome(serving, []))
    assert out.status == {} and out.requeue_after == pytest.approx(ctl.STATUS_BATCH_SECONDS - 1.0)
    # the batch ended: one write of the latest status, with every note
    clock[0] += ctl.STATUS_BATCH_SECONDS - 1.0
    out = ctl.batched(ctx, new, Outcome(serving, []))
    assert out.status == serving and [n.reason for n in out.notes] == ["PreviewCreated", "Switched"]
    written = {**BODY, "status": serving}
    # nothing changed: written as is (no write), nothing held
    assert ctl.batched(ctx, written, Outcome(serving, [])).status == serving
    # not a step of a rollout (Progressing False before and after): written at once
    assert ctl.batched(ctx, written, Outcome({**serving, "endpoint": "http://b"}, [])).status["endpoint"] == "http://b"

    # bad news during a rollout is never held: Ready leaving True (written at once, with what was held before it)
    rolling = {**BODY, "status": {**serving, "phase": "Progressing", "conditions": _conds("True", "True")}}
    step = {**serving, "phase": "Progressing", "conditions": _conds("True", "True"), "readyReplicas": 1}
    assert ctl.batched(ctx, rolling, Outcome(step, [Note("PreviewScalingUp", "up")])).status == rolling["status"]
    lost = {**step, "phase": "Degraded", "conditions": _conds("False", "True", reason="NoReadyReplicas")}
    out = ctl.batched(ctx, rolling, Outcome(lost, []))
    assert out.status == lost and [n.reason for n in out.notes] == ["PreviewScalingUp"]
    # Ready leaving True for a reason that is no warning (the stable Service deleted: a first rollout again), or for
    # Unknown: written at once too -- the status never says Ready while nothing serves
    for ready, reason in (("False", "FirstRolloutInProgress"), ("Unknown", "R")):
        restart = {**step, "phase": "Progressing", "conditions": _conds(ready, "True", reason=reason)}
        assert ctl.batched(ctx, rolling, Outcome(restart, [])).status == restart, (ready, reason)
    # Degraded turning True, and a warning note, likewise
    degraded = {**step, "conditions": _conds("True", "True", degraded="True")}
    assert ctl.batched(ctx, rolling, Outcome(degraded, [])).status == degraded
    assert ctl.batched(ctx, rolling, Outcome(step, [Note("ChildConflict", "taken", True)])).status == step
    # steps that keep coming are written STATUS_BATCH_MAX_SECONDS after the first at the latest
    start = clock[0]
    for i in range(10):
        out = ctl.batched(ctx, rolling, Outcome({**step, "readyReplicas": i}, []))
        if out.status != rolling["status"]:
            break
        clock[0] += ctl.STATUS_BATCH_SECONDS * 0.75
    assert out.status["readyReplicas"] == i and start + ctl.STATUS_BATCH_MAX_SECONDS <= clock[0] < start + ctl.STATUS_BATCH_MAX_SECONDS + ctl.STATUS_BATCH_SECONDS
    # a held change whose world went back to what is written: its notes are posted, nothing is written
    ctl.batched(ctx, rolling, Outcome(step, [Note("PreviewScalingUp", "up")]))
    out = ctl.batched(ctx, rolling, Outcome(rolling["status"], []))
    assert out.status == rolling["status"] and [n.reason for n in out.notes] == ["PreviewScalingUp"]
    # a Deployment gone forgets what was held for it
    assert ctl.batched(ctx, rolling, Outcome(step, [Note("PreviewScalingUp", "up")])).status == rolling["status"]
    ctl.gone(ctx, "team", "chat")
    assert ctl._memo(ctx, "held") == {}


def test_an_optional_kind_the_api_server_does_not_serve_is_asked_once_and_never_created(monkeypatch):
    """Many reconciles at once (an operator's start) with a NetworkPolicy child where the API server does not serve
    networking.k8s.io: one discovery request answers them all; no create is sent (each was a 404 before)."""
    from perennial.config import OperatorConfig
    from perennial.controllers.base import Context
    from perennial.kube import ApiError
    from perennial.kube.cache import Cache

    monkeypatch.setattr(children, "_unserved", {})
    asked: list[tuple[str, str]] = []

    class Kube:
        name = "local"

        async def request(self, method: str, path: str, *args: Any, **_: Any) -> Any:
            asked.append((method, path))
            await asyncio.sleep(0.01)
            raise ApiError(404, {"kind": "Status", "message": "not found"}, method, path)

        async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
            asked.append(("POST", obj["kind"]))
            await asyncio.sleep(0.01)
            raise ApiError(404, {"kind": "Status", "message": "not found"}, "POST", obj["kind"])

        async def apply(self, obj: dict[str, Any], current: Any) -> tuple[dict[str, Any], str]:
            assert current is None
            return await self.create(obj), "created"

    def policy(i: int) -> dict[str, Any]:
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": f"p{i}", "namespace": "team"}, "spec": {}}

    async def scenario() -> None:
        ctx = Context(clusters={"local": Kube()}, cache=Cache(), config=OperatorConfig(), clock=lambda: 0.0)  # type: ignore[dict-item]
        await asyncio.gather(*(children.apply_all(ctx, [policy(i)]) for i in range(16)))
        await children.apply_all(ctx, [policy(99)])

    asyncio.run(scenario())
    assert ("POST", "NetworkPolicy") not in asked, asked
    assert asked == [("GET", "/apis/networking.k8s.io/v1")]
    assert children.is_unserved("networking.k8s.io/v1", "NetworkPolicy")


def test_a_batch_with_more_notes_than_one_event_holds_posts_them_all():
    """The notes of a batch join one Event while they fit its message (1024 characters); the rest go in more Events
    (`Outcome.events`, posted after the status write), none cut off (a region removed: a note per child deleted)."""
    from perennial.config import OperatorConfig
    from perennial.controllers.base import Context, Note, Outcome
    from perennial.kube.cache import Cache

    clock = [0.0]
    ctx = Context(clusters={}, cache=Cache(), config=OperatorConfig(), clock=lambda: clock[0])
    rolling = {**BODY, "status": {"observedGeneration": 3, "phase": "Progressing", "conditions": _conds("True", "True")}}
    notes = [Note("ChildRemoved", f"Deleted Service chat-eu-{i}: no region has it any more " + "x" * 40) for i in range(30)]
    for i, n in enumerate(notes):
        held = ctl.batched(ctx, rolling, Outcome({**rolling["status"], "readyReplicas": i + 1}, [n]))
        assert held.notes == [] and held.events == []
    clock[0] += ctl.STATUS_BATCH_MAX_SECONDS
    out = ctl.batched(ctx, rolling, Outcome({**rolling["status"], "readyReplicas": 31}, []))
    groups = [out.notes] + [ns for obj, ns in out.events]
    assert all(obj is rolling for obj, _ in out.events) and len(groups) > 1
    assert [n for g in groups for n in g] == notes, "every note, in order"
    assert all(sum(len(n.reason) + len(n.message) + 4 for n in g) <= 1024 for g in groups)
