"""Numerics-critical ops: each has a pure-torch reference and faster backends chosen per call."""

from ._backend import AUTO, BackendUnavailableError, op_backends, registered_ops, use_backend

__all__ = ["AUTO", "BackendUnavailableError", "op_backends", "registered_ops", "use_backend"]
