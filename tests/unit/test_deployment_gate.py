"""The promotion gate a Deployment's `track` applies to the Adapters of a family (controllers.deployment.passes_gate)."""

from __future__ import annotations

from perennial.api.deployment import PromotionGate
from perennial.controllers import deployment as ctl


def adapter(improvement: str | None, mean: str | None = "0.9", promoted: tuple[str, str] | None = None) -> dict:
    status: dict = {k: v for k, v in (("improvement", improvement), ("meanReward", mean)) if v is not None}
    if promoted:
        status["conditions"] = [{"type": "Promoted", "status": promoted[0], "reason": promoted[1], "message": "",
                                 "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    return {"metadata": {"name": "a"}, "status": status}


def test_the_gate_on_held_out_numbers():
    gate = PromotionGate(minImprovement="0.05", minMeanReward="0.5")
    assert ctl.passes_gate(adapter("0.1"), gate)
    assert not ctl.passes_gate(adapter("0.01"), gate)
    assert not ctl.passes_gate(adapter("0.1", "0.4"), gate)


def test_an_adapter_rolled_back_by_the_learning_loop_never_passes_again():
    """Its numbers passed, but its live approval dropped: `Promoted` False/`RolledBack` keeps `track` off it."""
    gate = PromotionGate()
    assert ctl.passes_gate(adapter("0.2", promoted=("True", "GatePassed")), gate)
    assert not ctl.passes_gate(adapter("0.2", promoted=("False", "RolledBack")), gate)


def test_the_status_names_a_served_adapter_only_once_the_pods_applied_it():
    """A new served name is in the routes document at once, but the pods load its adapter first: until every ready pod
    reports that document, the status keeps what it reported (a client waiting for the status got 404s)."""
    from perennial.controllers.rollout import PodRoutes, ServedRoute

    desired = [ServedRoute("fruit", "fruit-v1")]
    before = [{"name": "other", "adapter": "x-v1"}]
    loading = [PodRoutes("p0", True, "rev1"), PodRoutes("p1", True, "rev2")]
    assert ctl.served_now(desired, loading, "rev2", before) == [ServedRoute("other", "x-v1")]
    assert ctl.served_now(desired, [PodRoutes("p0", True, "rev2")], "rev2", before) == desired
    assert ctl.served_now(desired, [], "rev2", before) == desired, "no pod reports: the document's"
    assert ctl.served_now(desired, [PodRoutes("p0", False, None)], "rev2", None) == desired
    assert ctl.served_now(desired, loading, "rev2", None) == []
    assert ctl.served_now(desired, loading, "rev2", [{"name": "fruit", "adapter": "fruit-v1", "canaryAdapter": "fruit-v2", "canaryWeight": 10}]) == [
        ServedRoute("fruit", "fruit-v1", "fruit-v2", 10)]
