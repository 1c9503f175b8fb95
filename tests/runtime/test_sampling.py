"""Sampling rules against transformers' own logits processors, and text streaming with stop strings."""
import pytest
import torch
from transformers import AutoTokenizer
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from helpers import FIXTURE
from runtime.config import SamplingConfig
from runtime.sampling import RowSampler, select
from runtime.textstream import TextStream

V = 50


def _logits(seed=0):
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 3


def test_repetition_penalty_equals_hf():
    prompt, gen = [3, 7, 7, 11], [20, 3]
    s = RowSampler(SamplingConfig(repetition_penalty=1.3), prompt, V, torch.device("cpu"))
    for t in gen:
        s.record(t)
    x = _logits()
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + gen]), x[None].clone())[0]
    assert torch.allclose(s.penalised(x), ref)


def test_frequency_and_presence_penalties_as_openai_defines_them():
    """mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence (generated tokens only)."""
    s = RowSampler(SamplingConfig(frequency_penalty=0.5, presence_penalty=0.25), [4, 4, 9], V, torch.device("cpu"))
    for t in (4, 5, 5):
        s.record(t)
    x = _logits(1)
    want = x.clone()
    want[4] -= 1 * 0.5 + 0.25
    want[5] -= 2 * 0.5 + 0.25
    assert torch.allclose(s.penalised(x), want)       # prompt token 9 untouched: OpenAI counts generated tokens


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.9, 8, 0.6)])
def test_distribution_equals_hf_warpers(temperature, top_k, top_p):
    x = _logits(2)
    s = RowSampler(SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p), [], V, torch.device("cpu"))
    ref = TemperatureLogitsWarper(temperature)(None, x[None].clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    assert torch.allclose(s.probs(x), torch.softmax(ref[0], -1), atol=1e-6)


def test_seeded_sampling_is_reproducible_and_greedy_is_argmax():
    x = torch.stack([_logits(i) for i in range(3)])
    cfg = SamplingConfig(temperature=1.0, seed=7)
    a = select(x, [RowSampler(cfg, [], V, torch.device("cpu")) for _ in range(3)])
    b = select(x, [RowSampler(cfg, [], V, torch.device("cpu")) for _ in range(3)])
    assert torch.equal(a, b)
    g = select(x, [RowSampler(SamplingConfig(), [], V, torch.device("cpu")) for _ in range(3)])
    assert torch.equal(g, x.argmax(-1))
    k1 = select(x, [RowSampler(SamplingConfig(temperature=1.0, top_k=1), [], V, torch.device("cpu"))
                    for _ in range(3)])
    assert torch.equal(k1, g)


@pytest.fixture(scope="module")
def tok():
    if not (FIXTURE / "tokenizer.json").is_file():
        pytest.skip("shared fixture not present")
    return AutoTokenizer.from_pretrained(str(FIXTURE))


def _stream(tok, text, stop):
    ts, parts = TextStream(tok, stop), []
    for i in tok(text, add_special_tokens=False)["input_ids"]:
        parts.append(ts.push(i))
    parts.append(ts.flush())
    return parts, ts


def test_stream_without_stop_reproduces_the_text(tok):
    text = "The cache holds experts; naïve ümlauts and emoji 🙂 survive streaming."
    parts, ts = _stream(tok, text, ())
    assert "".join(parts) == tok.decode(tok(text, add_special_tokens=False)["input_ids"]) and not ts.stopped
    assert all("\ufffd" not in p for p in parts)           # no half characters released


@pytest.mark.parametrize("stop", [("returns",), ("zzz", "fun"), (" value of",)])
def test_stop_string_ends_the_text_before_it(tok, stop):
    text = "the function returns the value of the function object"
    parts, ts = _stream(tok, text, stop)
    first = min(text.find(s) for s in stop if s in text)
    assert "".join(parts) == text[:first] and ts.stopped
    # nothing past the stop string was ever released, even for a moment
    released = ""
    for p in parts:
        released += p
        assert text.startswith(released) and len(released) <= first


def test_partial_stop_string_is_held_then_released(tok):
    parts, ts = _stream(tok, "the function returns", ("function call",))
    assert "".join(parts) == "the function returns" and not ts.stopped
