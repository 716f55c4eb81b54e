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
