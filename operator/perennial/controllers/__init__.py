"""kopf controllers, one module per kind, all registered on `REGISTRY`."""

from .base import REGISTRY

# Importing a controller module registers its handlers.
from . import adapter, basemodel, rewardspec, trainingrun  # noqa: E402,F401

__all__ = ["REGISTRY"]
