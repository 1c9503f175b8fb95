"""Understudy's runtime: reading MoE checkpoints (families, expert store) and executing them with offloaded experts."""
from runtime.runtime import Runtime

__all__ = ["Runtime"]
