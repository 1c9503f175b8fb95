"""Agreement with `resident`, the exact reference, in two senses kept apart:

top1_agreement    teacher-forced: over the predicted positions p of the perplexity pass (the same for every policy),
                    top1 = (1/P) * sum_p [argmax_v logits_policy[p, v] == argmax_v logits_resident[p, v]]
                  Each position sees the true text before it, so one disagreement does not carry into the next.
greedy_agreement  free-running: each prompt i is continued greedily; with c_i resident's continuation and g_i the
                  policy's (each up to and including EOS, at most `greedy_tokens` tokens),
                    greedy = (1/I) * sum_i prefix(g_i, c_i) / len(c_i)
                  where prefix is the length of the common prefix: the share of resident's tokens reproduced before
                  the first difference (after it the two texts continue from different contexts).
"""
from __future__ import annotations

from typing import Sequence

import torch


def top1_agreement(argmax: torch.Tensor, reference: torch.Tensor) -> float:
    """argmax, reference: [P] token ids at the same predicted positions."""
    assert argmax.shape == reference.shape and argmax.numel() > 0, "the same predicted positions for both"
    return float((argmax == reference).double().mean())


def continuation(row: Sequence[int], eos: int | None) -> list[int]:
    """A generated row up to and including its first EOS (later positions are padding)."""
    row = list(row)
    return row[: row.index(eos) + 1] if eos is not None and eos in row else row


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def greedy_agreement(continuations: list[list[int]], reference: list[list[int]]) -> float:
    """continuations[i], reference[i]: the policy's and resident's greedy continuation of prompt i."""
    assert len(continuations) == len(reference) > 0, "one continuation per prompt for both"
    return sum(common_prefix(g, c) / max(len(c), 1) for g, c in zip(continuations, reference)) / len(reference)
