"""The only code that talks to the Kubernetes API server."""

from .client import ApiError, Kube, connect

__all__ = ["ApiError", "Kube", "connect"]
