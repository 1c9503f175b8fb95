"""moe-serve with real clients: the openai package and raw HTTP against a server on 127.0.0.1.

Servers run in-process (uvicorn on a thread, a real socket) so each test gets a fresh runtime; one test starts
the `moe-serve` command itself."""
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from compiler.compile_plan import CompileConfig, compile_plan  # noqa: E402
from helpers import DATA, ROOT  # noqa: E402
from profiler.profile_model import ProfileConfig, profile  # noqa: E402
from runtime import Runtime  # noqa: E402
from runtime.chat import CHATML  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.server.app import ServeConfig, build_app  # noqa: E402

PROMPT = "The function returns"
NAME = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(model, max_batch=3, max_waiting=64, chat_template=CHATML, api_key=None, max_body=1 << 20, **run):
    rt = Runtime.load(model, **run)
    engine = Engine(rt, max_batch=max_batch, max_waiting=max_waiting).start()
    app = build_app(engine, ServeConfig(NAME, api_key=api_key, max_body_bytes=max_body, chat_template=chat_template))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(10)
        engine.close()
        rt.close()


def client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def plan_dir(fixture_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    profile(fixture_model, str(DATA / "calib.jsonl"),
            ProfileConfig(quant_tokens=0,
                          samples=8, seq_len=64, probe_tokens=128, sensitivity_tokens=128), progress=False
            ).save(d / "profile")
    compile_plan(d / "profile", CompileConfig(budget="50%", search_tokens=128), log=lambda *a: None).save(d / "plan")
    return d / "plan"


def test_greedy_completion_equals_runtime_generate(fixture_model, plan_dir):
    with Runtime.load(fixture_model, plan=plan_dir) as rt:
        want = rt.generate([PROMPT], max_new_tokens=24)[0]
        n_prompt = len(rt.encode_one(PROMPT))
    with serve(fixture_model, plan=plan_dir) as (url, engine):
        r = client(url).completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0)
        assert r.choices[0].text == want
        assert r.usage.prompt_tokens == n_prompt and r.usage.total_tokens == n_prompt + r.usage.completion_tokens
        assert r.choices[0].finish_reason in ("stop", "length") and 1 <= r.usage.completion_tokens <= 24
        plan_budget = engine.rt.plan.cache_budget_bytes
        assert engine.rt.stats.peak_cache_bytes <= plan_budget


def test_resident_output_equals_hf_generate(fixture_model):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(fixture_model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(fixture_model, dtype=torch.bfloat16).eval()
    ids = tok(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = hf.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    eos = hf.config.eos_token_id
    out = out.tolist()
    out = out[:out.index(eos)] if eos in out else out
    with serve(fixture_model, policy="resident") as (url, _):
        r = client(url).completions.create(model=NAME, prompt=ids[0].tolist(), max_tokens=20, temperature=0)
    assert r.choices[0].text == tok.decode(out, skip_special_tokens=True)


def test_streaming_chat_stop_strings_and_sampling(fixture_model, plan_dir):
    with serve(fixture_model, plan=plan_dir, lossless=True) as (url, _):
        c = client(url)
        whole = c.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
        chunks = list(c.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
        # stop strings, plain and streamed
        stop = whole.split()[2]
        cut = whole[:whole.find(stop)]
        r = c.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
        assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
        streamed = c.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop,
                                        stream=True)
        assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == cut
        # chat with the template; streamed equals whole; usage present
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."}]
        reply = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0)
        assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens >= 1
        parts = list(c.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0, stream=True))
        assert parts[0].choices[0].delta.role == "assistant"
        assert "".join(p.choices[0].delta.content or "" for p in parts) == reply.choices[0].message.content
        # seeded sampling reproduces (top-k/top-p/penalties are checked against HF's processors in test_sampling)
        s1 = c.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=3).choices[0].text
        s2 = c.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=3).choices[0].text
        assert s1 == s2
        k = c.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0.8, top_p=0.9, seed=1,
                                 frequency_penalty=0.5, extra_body={"top_k": 5, "repetition_penalty": 1.2})
        assert k.usage.completion_tokens >= 1
        assert [m.id for m in c.models.list().data] == [NAME]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(fixture_model):
    with serve(fixture_model, policy="lru", cache="50%", max_batch=1, max_waiting=1, chat_template=None,
               max_body=4096) as (url, _):
        c = client(url)
        post = lambda body, **kw: httpx.post(url + "/v1/completions", timeout=30, **({"json": body} | kw)
                                             if not isinstance(body, bytes) else {"content": body, **kw})
        cases = [
            (post(b"{not json", headers={"content-type": "application/json"}), 400, None),
            (post({"model": "nope", "prompt": "a"}), 404, "model_not_found"),
            (post({"model": NAME, "prompt": "a", "max_tokens": 0}), 400, None),
            (post({"model": NAME, "prompt": "a", "temperature": -1}), 400, None),
            (post({"model": NAME, "prompt": "a", "n": 2}), 400, None),
            (post({"model": NAME, "prompt": "word " * 1000, "max_tokens": 16}, headers={}), 413, None),
            (post({"model": NAME, "prompt": [5] * 1020, "max_tokens": 16}), 400, None),
            (post({"model": NAME, "prompt": [10**9]}), 400, None),
            (post({"model": NAME}), 400, None),
            (httpx.post(url + "/v1/chat/completions", json={"model": NAME, "messages": [
                {"role": "user", "content": "hi"}]}), 400, None),
        ]
        for r, status, code in cases:
            assert r.status_code == status, r.text
            err = r.json()["error"]
            assert err["message"] and err["type"] and (code is None or err["code"] == code)
        assert "chat template" in cases[-1][0].json()["error"]["message"]
        assert "limit" in cases[6][0].json()["error"]["message"]
        # a bounded queue: one row runs, one waits, the next is refused with 429
        long = c.completions.create(model=NAME, prompt=PROMPT, max_tokens=300, temperature=0, stream=True,
                                    extra_body={"ignore_eos": True})
        next(iter(long))
        waiting = threading.Thread(target=lambda: c.completions.create(model=NAME, prompt="A", max_tokens=2))
        waiting.start()
        deadline = time.time() + 10
        while httpx.get(url + "/health").json()["waiting"] < 1:
            assert time.time() < deadline
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model=NAME, prompt="B", max_tokens=2)
        long.close()
        waiting.join(30)
        assert httpx.get(url + "/health").json()["status"] == "ok"
        assert c.completions.create(model=NAME, prompt=PROMPT, max_tokens=4).usage.completion_tokens >= 1


def test_api_key(fixture_model):
    with serve(fixture_model, policy="lru", cache="50%", api_key="s3cret") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert client(url, "s3cret").models.list().data[0].id == NAME
        assert httpx.get(url + "/health").status_code == 200


def test_load_and_a_client_that_goes_away(fixture_model, plan_dir):
    """8 clients x 5 requests, batched; then a client drops mid-stream and its row is freed at once."""
    with serve(fixture_model, plan=plan_dir, max_batch=3) as (url, engine):
        c = client(url)
        errors, answered, peak = [], [], [0]

        def user(i):
            for j in range(5):
                try:
                    r = c.completions.create(model=NAME, prompt=f"{PROMPT} {i} {j}", max_tokens=8, temperature=0)
                    answered.append(r.usage.completion_tokens)
                except Exception as exc:   # noqa: BLE001
                    errors.append(repr(exc))

        threads = [threading.Thread(target=user, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        deadline = time.time() + 120
        while any(t.is_alive() for t in threads):
            peak[0] = max(peak[0], engine.running)
            assert time.time() < deadline, "load test did not finish"
            time.sleep(0.005)
        assert not errors and len(answered) == 40 and all(n >= 1 for n in answered)
        assert 1 < peak[0] <= 3                                   # requests were decoded together
        metrics = httpx.get(url + "/metrics").text
        value = lambda name: float(next(l.split()[-1] for l in metrics.splitlines() if l.startswith(name + " ")))
        assert value("understudy_cache_peak_bytes") <= value("understudy_cache_budget_bytes")
        assert value("understudy_requests_running") == 0
        shares = [float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("understudy_pair_share{")]
        assert len(shares) == 5 and abs(sum(shares) - 1) < 1e-9
        mix = [float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("understudy_precision_share{")]
        assert mix and abs(sum(mix) - 1) < 1e-9
        assert 'understudy_requests_total{endpoint="/v1/completions",status="200"} 40.0' in metrics
        assert "understudy_time_to_first_token_seconds_count 40.0" in metrics
        assert 'understudy_cache_slots_used{layer="0"}' in metrics
        pairs = {l.split('"')[1]: float(l.split()[-1]) for l in metrics.splitlines()
                 if l.startswith("understudy_pairs_total{")}
        assert set(pairs) == {"exact", "understudy", "drop", "host", "miss"} and sum(pairs.values()) > 0

        with httpx.stream("POST", url + "/v1/completions", json={"model": NAME, "prompt": PROMPT,
                                                                 "max_tokens": 500, "stream": True,
                                                                 "ignore_eos": True}) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            assert engine.running == 1
        deadline = time.time() + 10
        while engine.running:
            assert time.time() < deadline, "the row of a client that went away was not freed"
            time.sleep(0.02)
        assert engine.rt.stats.tokens < 40 * 8 + 500          # it stopped long before its 500 tokens
        assert engine.rt.stats.peak_cache_bytes <= engine.rt.plan.cache_budget_bytes


def test_moe_serve_command(fixture_model, plan_dir, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "runtime.server.cli", str(fixture_model), "--plan", str(plan_dir),
                             "--port", str(port), "--served-model-name", NAME], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline
            time.sleep(0.2)
        r = client(f"http://127.0.0.1:{port}").completions.create(model=NAME, prompt=PROMPT, max_tokens=6)
        assert r.usage.completion_tokens >= 1
        # the port is taken now: a second server says so in one line, exit 2, before loading anything
        dup = subprocess.run([sys.executable, "-m", "runtime.server.cli", str(fixture_model), "--plan",
                              str(plan_dir), "--port", str(port)], cwd=ROOT, capture_output=True, text=True)
        assert dup.returncode == 2 and len(dup.stderr.strip().splitlines()) == 1 and "--port" in dup.stderr
    finally:
        proc.terminate()
        proc.wait(20)
    err = proc.stderr.read()
    assert "expert cache:" in err and "Traceback" not in err
