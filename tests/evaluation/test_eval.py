"""moe-eval: resident perplexity equals HF's; every policy over the same tokens; agreements with resident; default
tasks from the held-out data; bad input."""
import json
import math
import random

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


def cloze_texts(n: int, seed: int) -> list[str]:
    """Texts of 58 bytes (tokens with the byte tokenizer) whose sentence ends in a cloze word."""
    rng = random.Random(seed)
    words = ["cache", "layer", "router", "token", "expert", "score", "python", "window"]
    return [f"{ctx.strip():<44} {rng.choice(words):>6}. and so" for ctx in sample_texts(n, 44, seed=seed)]


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
    lru, res = r["policies"]["lru"], r["policies"]["resident"]
    assert lru["perplexity"] == pytest.approx(res["perplexity"], rel=1e-5)  # lossless
    assert res["top1_agreement"] == 1.0 and res["greedy_agreement"] == 1.0
    assert lru["top1_agreement"] == 1.0 and lru["greedy_agreement"] == 1.0 and lru["greedy_tokens"] == 4
    assert lru["loads_per_token"] > 0 and 0 < lru["hit_rate"] < 1
    assert r["tokens"] == 150 and res["nll_tokens"] == 150 - 4  # 4 windows of 48, 48, 48, 6
    assert [c for _, c in res["window_nll"]] == [47, 47, 47, 5] == [c for _, c in lru["window_nll"]]
    assert sum(s for s, _ in res["window_nll"]) / res["nll_tokens"] == pytest.approx(math.log(res["perplexity"]))
    assert r["tasks"]["source"] == str(tasks) and r["tasks"]["count"] == 4 and lru["task_accuracy"] is not None


def test_resident_is_the_reference_even_when_not_asked_for(tiny_model, data):
    cfg = EvalConfig(policies=("lru",), cache="2", max_tokens=64, window=32, tasks="none", prompts=2, prompt_len=6,
                     gen_tokens=4)
    r = evaluate(tiny_model("qwen2_moe"), str(data), None, cfg, progress=False)
    assert list(r["policies"]) == ["lru"] and r["reference"] == "resident"
    lru = r["policies"]["lru"]                     # lossless: it agrees with resident everywhere
    assert lru["top1_agreement"] == 1.0 and lru["greedy_agreement"] == 1.0


def test_default_tasks_come_from_the_held_out_data(tiny_model, tmp_path):
    path = tiny_model("qwen2_moe")
    # 64 tokens are the first 2 texts (58 bytes + EOS each); the texts after them are held out for the tasks
    stream, stream2 = cloze_texts(2, seed=1), cloze_texts(2, seed=2)
    held, held2 = cloze_texts(8, seed=3), cloze_texts(8, seed=4)
    cfg = EvalConfig(policies=("resident",), max_tokens=64, window=32, max_tasks=3, prompts=2, prompt_len=6,
                     gen_tokens=2)

    def run(name, texts):
        return evaluate(path, str(write_jsonl(tmp_path / name, texts)), None, cfg, progress=False)

    a, b, c = run("a.jsonl", stream + held), run("b.jsonl", stream + held2), run("c.jsonl", stream2 + held)
    assert a["tasks"]["source"] == "held-out data" and a["tasks"]["count"] == 3
    assert a["policies"]["resident"]["task_accuracy"] is not None
    assert a["tasks"]["sha256"] != b["tasks"]["sha256"]          # other held-out text, other tasks
    assert a["policies"]["resident"]["perplexity"] == b["policies"]["resident"]["perplexity"]  # same stream
    assert a["tasks"]["sha256"] == c["tasks"]["sha256"]          # the stream's texts give no tasks
    assert a["policies"]["resident"]["perplexity"] != c["policies"]["resident"]["perplexity"]


def test_tasks_none_skips_tasks(tiny_model, data, tmp_path, capsys):
    out = tmp_path / "o.json"
    code = main([str(tiny_model("qwen2_moe")), "--data", str(data), "--policies", "resident,lru", "--cache", "2",
                 "--max-tokens", "64", "--window", "32", "--tasks", "none", "--json", str(out), "--quiet"])
    assert code == 0
    r = json.loads(out.read_text())
    assert r["tasks"] is None and r["policies"]["lru"]["task_accuracy"] is None
    table = capsys.readouterr().out
    assert "no tasks" in table and "+0.00 [+0.00, +0.00]" in table    # lru is lossless: no change vs resident


def test_data_without_cloze_sentences(tiny_model, data, tmp_path, capsys):
    capsys.readouterr()
    code = main([str(tiny_model("qwen2_moe")), "--data", str(data), "--max-tokens", "64", "--json",
                 str(tmp_path / "o.json"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no cloze sentences" in err[0] and "--tasks none" in err[0]


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

    prof = profile(tiny_model("qwen3_moe"), str(data), ProfileConfig(quant_tokens=0,
                                                                     samples=2, seq_len=32), progress=False)
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
    prof = profile(path, str(data), ProfileConfig(quant_tokens=0, samples=4, seq_len=32), progress=False)
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
