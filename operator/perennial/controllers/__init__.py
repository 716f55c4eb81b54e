"""Controllers, one module per kind; `runtime.build_registry` wires them (nothing registers at import)."""

from __future__ import annotations

from .base import Controller


def all_controllers() -> list[Controller]:
    from . import adapter, basemodel, deployment, learning, rewardspec, trainingrun

    return [basemodel.CONTROLLER, rewardspec.CONTROLLER, trainingrun.CONTROLLER, adapter.CONTROLLER, deployment.CONTROLLER,
            learning.make_controller(None)]


__all__ = ["Controller", "all_controllers"]
