"""Continuous batching: rows join and leave a running batch and still decode what they decode alone."""
import pytest

from runtime import Runtime
from runtime.config import SamplingConfig
from runtime.engine import Engine, QueueFull

PROMPTS = ["The function returns", "In the beginning the river", "A", "def main():\n    x ="]


@pytest.fixture(scope="module")
def alone(fixture_model):
    """Each prompt's greedy continuation decoded on its own (lossless: the cache cannot change the tokens)."""
    with Runtime.load(fixture_model, policy="lru", cache=8, lossless=True) as rt:
        return {(p, n): rt.generate([p], max_new_tokens=n)[0] for p in PROMPTS for n in (14, 20)}


def _collect(out, i):
    out[i] = []
    return out[i].append


def test_rows_joining_and_leaving_decode_as_alone(fixture_model, alone):
    with Runtime.load(fixture_model, policy="lru", cache=8, lossless=True) as rt:
        eng, out = Engine(rt, max_batch=3), {}
        for i, p in enumerate(PROMPTS[:2]):
            eng.submit(rt.encode_one(p), SamplingConfig(max_new_tokens=20), _collect(out, i))
        for _ in range(3):
            eng.step()
        assert eng.running == 2
        for i, p in enumerate(PROMPTS[2:], 2):   # join a running batch; one waits for a free row
            eng.submit(rt.encode_one(p), SamplingConfig(max_new_tokens=14), _collect(out, i))
        peak = 0
        while eng.step():
            peak = max(peak, eng.running)
            assert eng.running <= 3
        assert peak == 3
        for i, p in enumerate(PROMPTS):
            n = 20 if i < 2 else 14
            assert "".join(d.text for d in out[i]) == alone[(p, n)]
            last = out[i][-1]
            assert last.finish_reason in ("stop", "length") and all(d.finish_reason is None for d in out[i][:-1])
            assert last.prompt_tokens == len(rt.encode_one(p)) and 1 <= last.completion_tokens <= n
        assert rt.stats.peak_cache_bytes <= rt.cache.capacity_bytes


def test_stream_equals_generate_and_stops_on_a_stop_string(fixture_model, alone):
    with Runtime.load(fixture_model, policy="lru", cache=8, lossless=True) as rt:
        full = alone[(PROMPTS[1], 20)]
        assert "".join(rt.stream(PROMPTS[1], max_new_tokens=20)) == full
        stop = full.split()[2]
        cut = full[:full.find(stop)]
        assert "".join(rt.stream(PROMPTS[1], max_new_tokens=20, stop=[stop])) == cut
        assert rt.last_finish_reason == "stop"
        assert rt.generate([PROMPTS[1]], max_new_tokens=20, stop=[stop]) == [cut]


def test_cancel_frees_the_row_at_the_next_step(fixture_model):
    with Runtime.load(fixture_model, policy="lru", cache=8) as rt:
        eng, out = Engine(rt, max_batch=2), {}
        a = eng.submit(rt.encode_one(PROMPTS[0]), SamplingConfig(max_new_tokens=200), _collect(out, 0))
        eng.submit(rt.encode_one(PROMPTS[1]), SamplingConfig(max_new_tokens=200), _collect(out, 1))
        eng.step()
        eng.step()
        eng.cancel(a)
        eng.step()
        assert eng.running == 1 and out[0][-1].finish_reason == "cancelled" and len(a.out_ids) < 200
        eng.close()
        assert out[1][-1].finish_reason == "cancelled" and eng.running == 0


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(fixture_model):
    with Runtime.load(fixture_model, policy="lru", cache=8) as rt:
        eng, out = Engine(rt, max_batch=2), {}
        good = rt.executor

        def broken(layer, x, routing):
            raise OSError(5, "Input/output error")

        rt._install(broken)
        eng.submit(rt.encode_one(PROMPTS[0]), SamplingConfig(max_new_tokens=5), _collect(out, 0))
        assert eng.step() is False
        assert out[0][-1].finish_reason == "error" and "Input/output error" in out[0][-1].error
        rt._install(good)
        eng.submit(rt.encode_one(PROMPTS[0]), SamplingConfig(max_new_tokens=5), _collect(out, 1))
        while eng.step():
            pass
        assert out[1][-1].finish_reason in ("stop", "length")


def test_queue_bound_and_requests_that_can_never_run(fixture_model):
    with Runtime.load(fixture_model, policy="lru", cache=8) as rt:
        eng = Engine(rt, max_batch=1, max_waiting=1)
        eng.submit([5, 6], SamplingConfig(max_new_tokens=4), lambda d: None)
        with pytest.raises(QueueFull):
            eng.submit([5, 6], SamplingConfig(max_new_tokens=4), lambda d: None)
        from artifacts.errors import UserError
        with pytest.raises(UserError, match="limit of"):
            Engine(rt).submit([5] * 1000, SamplingConfig(max_new_tokens=100), lambda d: None)
        with pytest.raises(UserError, match="empty"):
            Engine(rt).submit([], SamplingConfig(), lambda d: None)


def test_ignore_eos_decodes_every_token(fixture_model):
    with Runtime.load(fixture_model, policy="resident") as rt:
        ids, mask = rt.encode(["The function returns"])
        out = rt.generate_ids(ids, mask, max_new_tokens=40, ignore_eos=True)
        assert out.shape[1] == 40
        eng, got = Engine(rt), []
        eng.submit(rt.encode_one("The function returns"), SamplingConfig(max_new_tokens=40, ignore_eos=True),
                   got.append)
        while eng.step():
            pass
        assert got[-1].completion_tokens == 40 and got[-1].finish_reason == "length"
