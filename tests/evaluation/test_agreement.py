"""The two agreements with resident: teacher-forced top-1, and greedy up to the first difference."""
import pytest
import torch

from evaluation.agreement import common_prefix, continuation, greedy_agreement, top1_agreement


def test_top1_is_the_share_of_equal_argmax():
    ref = torch.tensor([5, 6, 7, 8])
    assert top1_agreement(ref.clone(), ref) == 1.0
    assert top1_agreement(torch.tensor([5, 0, 7, 0]), ref) == 0.5


def test_greedy_counts_the_common_prefix_only():
    ref = [[1, 2, 3, 4], [1, 2, 3, 4]]
    # one token differs at position 2: the tokens after it count for nothing, even where they match again
    assert greedy_agreement([[1, 2, 9, 4], [1, 2, 3, 4]], ref) == pytest.approx((2 / 4 + 1) / 2)
    assert greedy_agreement([[9, 2, 3, 4], [1, 2, 3, 4]], ref) == pytest.approx(0.5)
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3


def test_continuations_end_at_eos():
    eos = 2
    assert continuation([5, 2, 0, 0], eos) == [5, 2]        # padding after EOS is not part of it
    assert continuation([5, 6, 7], eos) == [5, 6, 7]
    # both stop at the same EOS: full agreement, whatever padding the two batches carry after it
    assert greedy_agreement([continuation([5, 2, 0], eos)], [continuation([5, 2, 0, 0, 0], eos)]) == 1.0
