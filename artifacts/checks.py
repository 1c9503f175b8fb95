"""Field checks for artifacts read from disk: every value a hand edit could break is checked before use, and the
error names the file and field (`plan.json: choices.alpha is nan; expected a finite number >= 0`)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from artifacts.errors import UserError


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def load_json(path: Path, what: str, remedy: str) -> Any:
    """Strict JSON (no NaN/Infinity); a missing, unreadable or garbled file is a one-line UserError."""
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except FileNotFoundError:
        raise UserError(f"{what} {path.parent} is incomplete: {path.name} is missing; {remedy}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path} is corrupt ({str(exc).splitlines()[0][:120]}); {remedy}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror}); {remedy}") from None


class Checker:
    """Checks values of one file; `where` prefixes every message, `remedy` ends it."""

    def __init__(self, where: str, remedy: str):
        self.where, self.remedy = where, remedy

    def fail(self, field: str, problem: str) -> None:
        raise UserError(f"{self.where}: {field} {problem}; {self.remedy}")

    def get(self, d: Any, key: str, field: str) -> Any:
        if not isinstance(d, dict):
            self.fail(field.rpartition(".")[0] or field, "is not an object")
        if key not in d:
            self.fail(field, "is missing")
        return d[key]

    def obj(self, v: Any, field: str) -> dict:
        if not isinstance(v, dict):
            self.fail(field, f"is {_show(v)}; expected an object")
        return v

    def lst(self, v: Any, field: str) -> list:
        if not isinstance(v, list):
            self.fail(field, f"is {_show(v)}; expected a list")
        return v

    def int_(self, v: Any, field: str, lo: int | None = None, hi: int | None = None) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(field, f"is {_show(v)}; expected an integer{_range(lo, hi)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            self.fail(field, f"is {v}; expected an integer{_range(lo, hi)}")
        return v

    def num(self, v: Any, field: str, lo: float | None = None, hi: float | None = None) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(field, f"is {_show(v)}; expected a finite number{_range(lo, hi)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            self.fail(field, f"is {v}; expected a number{_range(lo, hi)}")
        return float(v)

    def bool_(self, v: Any, field: str) -> bool:
        if not isinstance(v, bool):
            self.fail(field, f"is {_show(v)}; expected true or false")
        return v

    def choice(self, v: Any, field: str, options: tuple) -> Any:
        if v not in options:
            self.fail(field, f"is {_show(v)}; expected one of {', '.join(map(str, options))}")
        return v

    def ids(self, v: Any, field: str, n: int, unique: bool = True) -> list[int]:
        """A list of expert ids in 0..n-1."""
        out = [self.int_(x, f"{field}[{i}]", 0, n - 1) for i, x in enumerate(self.lst(v, field))]
        if unique and len(set(out)) != len(out):
            self.fail(field, "repeats an expert id")
        return out

    def model_section(self, header: Any) -> tuple[dict, list[int], int]:
        """The `model` section every artifact carries: (section, MoE layers, experts), with the fingerprint, layers
        (unique, >= 0), expert count (>= 1) and top_k (1..E) checked."""
        model = self.obj(self.get(self.obj(header, "the header"), "model", "model"), "model")
        if not isinstance(self.get(model, "fingerprint", "model.fingerprint"), str):
            self.fail("model.fingerprint", "is not a string")
        layers = [self.int_(x, f"model.moe_layers[{i}]", 0) for i, x in
                  enumerate(self.lst(self.get(model, "moe_layers", "model.moe_layers"), "model.moe_layers"))]
        if not layers or len(set(layers)) != len(layers):
            self.fail("model.moe_layers", "is empty or repeats a layer")
        e = self.int_(self.get(model, "num_experts", "model.num_experts"), "model.num_experts", 1)
        self.int_(self.get(model, "top_k", "model.top_k"), "model.top_k", 1, e)
        return model, layers, e

    def key_int(self, k: str, field: str, allowed) -> int:
        try:
            v = int(k)
        except (TypeError, ValueError):
            self.fail(field, f"has key {k!r}; expected an integer")
        if v not in allowed:
            self.fail(f"{field}[{k}]", f"is not one of the model's ({_short(sorted(allowed))})")
        return v


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _short(xs: list) -> str:
    return ", ".join(map(str, xs)) if len(xs) <= 8 else f"{xs[0]}..{xs[-1]}"


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" in {lo}..{hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""
