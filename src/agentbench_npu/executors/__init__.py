"""Executors: where the trainer and engine workers run — this process (local) or Ray actors (ray)."""

from .base import Cluster, make_cluster, preflight

__all__ = ["Cluster", "make_cluster", "preflight"]
