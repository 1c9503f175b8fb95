"""moe-eval: resident perplexity equals HF's; every policy over the same tokens; bad input."""
import json
import math

import pytest
import torch
import transformers

from evaluation.cli import main
from evaluation.data import token_stream, windows
from evaluation.run_eval import EvalConfig, evaluate
from helpers import sample_texts, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("ev") / "dev.jsonl", sample_texts(6, 40, seed=3))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    p = tmp_path_factory.mktemp("tasks") / "t.jsonl"
    p.write_text("".join(json.dumps({"context": f"the router {i}", "choices": ["cache", "layer", "expert"],
                                     "answer": i % 3}) + "\n" for i in range(4)))
    return p


def _hf_perplexity(path, data, window, max_tokens):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    for w in windows(token_stream(str(data), tok, max_tokens), window):
        ids = torch.from_numpy(w)[None]
        with torch.no_grad():
            out = model(ids, labels=ids)
        nll += float(out.loss) * (len(w) - 1)
        n += len(w) - 1
    return math.exp(nll / n)


def test_resident_perplexity_equals_hf(tiny_model, data, tasks):
    path = tiny_model("qwen2_moe")
    cfg = EvalConfig(policies=("resident", "lru"), cache="2", max_tokens=150, window=48, tasks=str(tasks), prompts=2,
                     prompt_len=6, gen_tokens=4)
    r = evaluate(path, str(data), None, cfg, progress=False)
    ref = _hf_perplexity(path, data, 48, 150)
    assert abs(r["policies"]["resident"]["perplexity"] - ref) / ref <= 1e-4
    lru = r["policies"]["lru"]
    assert lru["perplexity"] == pytest.approx(r["policies"]["resident"]["perplexity"], rel=1e-5)  # lossless
    assert lru["agreement"] == 1.0 and lru["loads_per_token"] > 0 and 0 < lru["hit_rate"] < 1
    assert r["tokens"] == 150 and r["policies"]["resident"]["nll_tokens"] == 150 - 4  # 4 windows of 48, 48, 48, 6


@pytest.mark.parametrize("argv,message", [
    (["--policies", "resident,fifo"], "unknown policy"),
    (["--policies", "plan"], "needs --plan"),
])
def test_bad_policy(tiny_model, data, tmp_path, capsys, argv, message):
    model = str(tiny_model("olmoe"))
    capsys.readouterr()
    code = main([model, "--data", str(data), "--json", str(tmp_path / "o.json"), "--max-tokens", "64", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]


def test_no_tokens(tiny_model, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    model = str(tiny_model("olmoe"))
    capsys.readouterr()
    code = main([model, "--data", str(empty), "--json", str(tmp_path / "o.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "tokens" in err[0]


def test_plan_for_another_model(tiny_model, data, tmp_path, capsys):
    from compiler.compile_plan import CompileConfig, compile_plan
    from profiler.profile_model import ProfileConfig, profile

    prof = profile(tiny_model("qwen3_moe"), str(data), ProfileConfig(samples=2, seq_len=32), progress=False)
    prof.save(tmp_path / "prof")
    compile_plan(tmp_path / "prof", CompileConfig(search_tokens=16), log=lambda *a: None).save(tmp_path / "plan")
    model = str(tiny_model("olmoe"))
    capsys.readouterr()
    code = main([model, "--data", str(data), "--plan", str(tmp_path / "plan"), "--json",
                 str(tmp_path / "o.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "another model" in err[0]


def test_two_named_plans_in_one_run(tiny_model, data, tasks, tmp_path, capsys):
    from compiler.compile_plan import CompileConfig, compile_plan
    from profiler.profile_model import ProfileConfig, profile

    path = tiny_model("qwen3_moe")
    prof = profile(path, str(data), ProfileConfig(samples=4, seq_len=32), progress=False)
    prof.save(tmp_path / "prof")
    compile_plan(tmp_path / "prof", CompileConfig(budget="50%", search_tokens=16), log=lambda *a: None).save(tmp_path / "a")
    compile_plan(tmp_path / "prof", CompileConfig(budget="25%", max_error=0.0, search_tokens=16),
                 log=lambda *a: None).save(tmp_path / "b")
    capsys.readouterr()
    out = tmp_path / "o.json"
    code = main([str(path), "--data", str(data), "--plan", str(tmp_path / "a"), "--plan", f"strict={tmp_path / 'b'}",
                 "--json", str(out), "--max-tokens", "64", "--window", "32", "--tasks", str(tasks), "--quiet"])
    assert code == 0
    r = json.loads(out.read_text())
    assert list(r["policies"]) == ["resident", "lru", "smoe", "plan", "strict"]
    strict = r["policies"]["strict"]
    # the strict plan (no predicted error allowed) replaces nothing: its perplexity is resident's
    assert strict["substitution_rate"] == 0 and strict["drop_rate"] == 0
    assert strict["perplexity"] == pytest.approx(r["policies"]["resident"]["perplexity"], rel=1e-5)
    assert strict["cache_capacity_bytes"] < r["policies"]["plan"]["cache_capacity_bytes"]   # 25% vs 50%
    code = main([str(path), "--data", str(data), "--plan", f"lru={tmp_path / 'a'}", "--json", str(out)])
    assert code == 2 and "name must be new" in capsys.readouterr().err
