"""kopf controllers, one module per kind, all registered on `REGISTRY`."""

# Importing a controller module registers its handlers.
from . import adapter, basemodel, rewardspec, trainingrun  # noqa: E402,F401
from .base import REGISTRY

__all__ = ["REGISTRY"]
