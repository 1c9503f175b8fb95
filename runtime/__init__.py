"""Understudy's runtime: reading MoE checkpoints (families, expert store) and executing them."""
