"""Versioned artifact schemas shared by the profiler, compiler and runtime. Depends on numpy and safetensors only."""
from artifacts.errors import UserError
from artifacts.plan import Plan
from artifacts.profile import Profile

__all__ = ["Plan", "Profile", "UserError"]
