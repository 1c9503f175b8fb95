"""`moe-compile --budget auto`: an absolute budget from the target device's free memory, minus a stated headroom.

  free      where the target runs the model (its `device_kind`): CUDA, the current GPU's free memory
            (torch.cuda.mem_get_info); CPU, available RAM (psutil.virtual_memory().available, else MemAvailable
            from /proc/meminfo)
  headroom  --headroom SIZE or P% (of free); default 10% of free, at least 1 GiB
  budget    free - headroom, at most the target's device_memory and at most what holds every routed expert
            (dense + KV + workspace + 100% of routed-expert bytes)
The budget is then split like any absolute budget (compiler.memory: dense weights, KV cache, workspace, cache).
Measuring is the one impure step (`probe_free_memory`); `derive` is the arithmetic, for tests and for callers that
measured memory themselves. torch is imported only to measure a CUDA device.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from artifacts.errors import UserError
from artifacts.units import human_bytes, parse_bytes, parse_percent
from compiler.memory import outside_cache
from compiler.targets import Target

AUTO = "auto"
DEFAULT_HEADROOM_PCT = 10.0
MIN_HEADROOM = 2**30            # the default headroom is never less than 1 GiB


def is_auto(budget) -> bool:
    return str(budget).strip().lower() == AUTO


def check_headroom(budget, headroom: str | None) -> None:
    """Before any long work: --headroom goes with --budget auto only, and reads as a size or a percentage."""
    if headroom is None:
        return
    if not is_auto(budget):
        raise UserError(f"--headroom applies to --budget auto only (got --budget {budget}); drop --headroom")
    headroom_bytes(headroom, 0)


def headroom_bytes(headroom: str | None, free: int) -> tuple[int, str]:
    """(bytes, how they were set) for --headroom SIZE|P% (P% of `free`), or the default when None."""
    if headroom is None:
        return max(int(free * DEFAULT_HEADROOM_PCT / 100), MIN_HEADROOM), \
            f"{DEFAULT_HEADROOM_PCT:g}% of free, at least {human_bytes(MIN_HEADROOM)}"
    pct = parse_percent(headroom, "--headroom")
    if pct is not None:
        return int(free * pct / 100), f"{pct:g}% of free"
    return parse_bytes(headroom, "--headroom", unit_required=True), f"--headroom {str(headroom).strip()}"


@dataclass(frozen=True)
class AutoBudget:
    free_bytes: int           # what the probe measured
    headroom_bytes: int
    budget_bytes: int         # the absolute budget: dense + KV + workspace + expert cache
    source: str               # what was measured, e.g. "available RAM (psutil)"
    headroom: str = ""        # how the headroom was set
    dense_bytes: int = 0
    kv_bytes: int = 0
    workspace_bytes: int = 0
    cache_bytes: int = 0      # budget_bytes - dense - KV - workspace
    capped: str = ""          # why the budget is below free - headroom ("" when it is not)

    def _chain(self) -> str:
        uncapped = self.free_bytes - self.headroom_bytes - self.dense_bytes - self.kv_bytes - self.workspace_bytes
        cap = f", capped at {human_bytes(self.cache_bytes)} ({self.capped})" if self.capped else ""
        return (f"{human_bytes(self.free_bytes)} {self.source} - {human_bytes(self.headroom_bytes)} headroom "
                f"({self.headroom}) - {human_bytes(self.dense_bytes)} dense weights - {human_bytes(self.kv_bytes)} "
                f"KV cache - {human_bytes(self.workspace_bytes)} workspace = {human_bytes(uncapped)} for the expert "
                f"cache{cap}")

    def describe(self) -> str:
        """One line: how the budget was derived."""
        return f"budget auto: {self._chain()}; budget {human_bytes(self.budget_bytes)}"

    def to_dict(self) -> dict:
        return asdict(self) | {"description": self.describe()}


def derive(free: int, source: str, model: dict, target: Target, batch: int, context: int,
           headroom: str | None = None) -> AutoBudget:
    """The budget `free` bytes allow (pure). A UserError when it cannot hold one expert per MoE layer."""
    layers, expert = len(model["moe_layers"]), int(model["expert_bytes"])
    routed = int(model["routed_expert_bytes"])
    dense, kv, workspace = outside_cache(model, target, batch, context)
    fixed = dense + kv + workspace
    room, how = headroom_bytes(headroom, free)
    budget, capped = free - room, ""
    if budget > target.device_memory:
        budget, capped = target.device_memory, f"target {target.name}'s device_memory {human_bytes(target.device_memory)}"
    if budget > fixed + routed:
        budget, capped = fixed + routed, "100% of routed-expert bytes"
    auto = AutoBudget(int(free), room, int(budget), source, how, dense, kv, workspace, int(budget - fixed), capped)
    if auto.cache_bytes < layers * expert:
        raise UserError(f"--budget auto: {auto._chain()}: less than one expert per MoE layer ({layers} x "
                        f"{human_bytes(expert)}); free some memory, lower --headroom, or pass an explicit --budget")
    return auto


def auto_budget(model: dict, target: Target, batch: int, context: int, headroom: str | None = None,
                probe=None) -> AutoBudget:
    """Measure the target's free memory on this machine (`probe(device_kind, target_name)`, by default
    `probe_free_memory`) and derive the budget from it."""
    free, source = (probe or probe_free_memory)(target.device_kind, target.name)
    return derive(free, source, model, target, batch, context, headroom)


def probe_free_memory(device_kind: str, target_name: str = "") -> tuple[int, str]:
    """(free bytes, what was measured) where a target of `device_kind` runs the model, on this machine."""
    if device_kind == "cpu":
        return available_ram()
    return free_cuda_memory(target_name)


def available_ram() -> tuple[int, str]:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available), "available RAM (psutil)"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available RAM (/proc/meminfo MemAvailable)"
    except (OSError, ValueError, IndexError):
        pass
    raise UserError("--budget auto cannot read the available RAM here (no psutil, no MemAvailable in /proc/meminfo); "
                    "install psutil or pass an explicit --budget")


def free_cuda_memory(target_name: str = "") -> tuple[int, str]:
    try:
        import torch
        ok = torch.cuda.is_available()
    except ImportError:
        ok = False
    if not ok:
        which = f" ({target_name})" if target_name else ""
        raise UserError(f"--budget auto with a CUDA target{which} needs a visible GPU and none is visible; "
                        f"pass an explicit --budget (e.g. 12GiB or 25%), or a target with device_kind: cpu")
    dev = torch.cuda.current_device()
    free, _total = torch.cuda.mem_get_info(dev)
    return int(free), f"free memory of cuda:{dev} ({torch.cuda.get_device_name(dev)})"
