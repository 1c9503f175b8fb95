"""Hardware targets: data (YAML), not code. A preset by name (compiler/targets/NAME.yaml) or a file.

Fields (sizes and rates as strings, e.g. "16GiB", "25GB/s", "10us"):
  device_memory          all memory the runtime may use on the device
  device_mem_bandwidth   device memory bandwidth: a batch-1 expert GEMV streams its weights, so
                         t_expert_device = expert_bytes / device_mem_bandwidth
  link_bandwidth, link_latency   host-to-device copies: t_load = expert_bytes / link_bandwidth + link_latency
  host_mem_bandwidth     host expert compute, also memory-bound: t_expert_host = expert_bytes / host_mem_bandwidth
  workspace              activations and allocator slack reserved on the device
  device_kind            optional, "cuda" (default) or "cpu": where the model runs, i.e. whose free memory
                         `moe-compile --budget auto` measures (free GPU memory, or available RAM)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from artifacts.errors import UserError
from artifacts.units import parse_bytes, parse_rate, parse_seconds

PRESETS_DIR = Path(__file__).parent / "targets"
DEVICE_KINDS = ("cuda", "cpu")


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    device_memory: int
    device_mem_bandwidth: float
    link_bandwidth: float
    link_latency: float
    host_mem_bandwidth: float
    workspace: int
    device_kind: str = "cuda"          # optional (added later): plans and files without it mean a CUDA device

    def checked(self, path) -> "Target":
        """Rates and sizes a cost model can divide by: positive device memory and bandwidths."""
        if self.device_memory <= 0:
            raise UserError(f"target file {path}: device_memory must be positive")
        for name in ("device_mem_bandwidth", "link_bandwidth", "host_mem_bandwidth"):
            if not getattr(self, name) > 0:
                raise UserError(f"target file {path}: {name} must be positive (e.g. 25GB/s)")
        if self.device_kind not in DEVICE_KINDS:
            raise UserError(f"target file {path}: device_kind must be one of {', '.join(DEVICE_KINDS)} "
                            f"(got {self.device_kind!r})")
        return self

    def t_load(self, nbytes: float) -> float:
        return nbytes / self.link_bandwidth + self.link_latency

    def t_device(self, nbytes: float) -> float:
        return nbytes / self.device_mem_bandwidth

    def t_host(self, nbytes: float) -> float:
        return nbytes / self.host_mem_bandwidth

    @classmethod
    def from_dict(cls, d: dict) -> "Target":
        """The target a plan recorded (plan.json "target"), without looking it up again by name (older plans lack
        the optional fields: their defaults)."""
        return cls(**{f: d[f] for f in cls.__dataclass_fields__ if f in d or f not in _OPTIONAL})

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "device_memory": self.device_memory,
                "device_mem_bandwidth": self.device_mem_bandwidth, "link_bandwidth": self.link_bandwidth,
                "link_latency": self.link_latency, "host_mem_bandwidth": self.host_mem_bandwidth,
                "workspace": self.workspace, "device_kind": self.device_kind}


_OPTIONAL = ("device_kind",)


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_target(name_or_file: str) -> Target:
    path = Path(name_or_file)
    if not path.is_file():
        path = PRESETS_DIR / f"{name_or_file}.yaml"
        if not path.is_file():
            raise UserError(f"unknown target {name_or_file!r}; use a preset ({', '.join(presets())}) or a YAML file")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))   # data only: safe_load builds no Python objects
        if not isinstance(d, dict):
            raise UserError(f"target file {path} is not a YAML mapping of fields; see compiler/targets/*.yaml")
        return Target(name=str(d.get("name", path.stem)), description=str(d.get("description", "")),
                      device_memory=parse_bytes(d["device_memory"], "device_memory"),
                      device_mem_bandwidth=parse_rate(d["device_mem_bandwidth"], "device_mem_bandwidth"),
                      link_bandwidth=parse_rate(d["link_bandwidth"], "link_bandwidth"),
                      link_latency=parse_seconds(d.get("link_latency", "0us")),
                      host_mem_bandwidth=parse_rate(d["host_mem_bandwidth"], "host_mem_bandwidth"),
                      workspace=parse_bytes(d.get("workspace", "256MiB"), "workspace"),
                      device_kind=str(d.get("device_kind", "cuda")).strip().lower()).checked(path)
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError, TypeError) as exc:
        raise UserError(f"target file {path} is not valid YAML ({exc.__class__.__name__}); see compiler/targets/") from None
    except KeyError as exc:
        raise UserError(f"target file {path} lacks field {exc}; see compiler/targets/*.yaml for the fields") from None
