"""benchmarks/overhead.py's step interleaving: decodes on their own threads run one at a time, in a fixed cycle,
one step per turn; a decode that ends or fails leaves the cycle without stalling the others."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from overhead import Turn, inside_each, take_turns  # noqa: E402


def _job(name: str, steps: int, log: list, fail_at: int | None = None):
    def job(turns):
        turn = Turn(turns, name)
        for i in range(steps + 1):          # the first step ends the (untimed) prefill
            log.append((name, i))
            if i == fail_at:
                raise ValueError(f"{name} failed")
            turn.step()
        return len(turn.windows)
    return job


def test_decodes_take_one_step_each_in_a_cycle():
    log: list = []
    out = take_turns({"a": _job("a", 3, log), "b": _job("b", 1, log), "c": _job("c", 2, log)})
    assert out == {"a": 3, "b": 1, "c": 2}                      # every step after the first is timed
    assert log == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("c", 1), ("a", 2), ("c", 2), ("a", 3)]


def test_a_failing_decode_leaves_and_its_error_is_raised_after_the_others():
    log: list = []
    with pytest.raises(ValueError, match="b failed"):
        take_turns({"a": _job("a", 2, log), "b": _job("b", 3, log, fail_at=1), "c": _job("c", 2, log)})
    assert [e for e in log if e[0] != "b"] == [("a", 0), ("c", 0), ("a", 1), ("c", 1), ("a", 2), ("c", 2)]


def test_spans_are_summed_per_window():
    spans = [(0.0, 1.0), (2.0, 2.5), (2.6, 3.0), (5.0, 6.0), (7.0, 7.5)]      # (start, end), in time order
    assert inside_each(spans, [(1.5, 3.0), (4.0, 6.5), (8.0, 9.0)]) == pytest.approx([0.9, 1.0, 0.0])
