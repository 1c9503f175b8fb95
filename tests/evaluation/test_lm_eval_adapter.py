"""lm-evaluation-harness adapter (--model understudy): lm-eval's own CLI over local tasks of the three request types,
lossless and under a plan; in process, lossless log-likelihoods, rolling log-likelihoods and greedy generations equal
HF transformers' on the same weights (float32); bad model_args are one-line UserErrors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

import torch  # noqa: E402
import transformers  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from artifacts.errors import UserError  # noqa: E402
from evaluation.lm_eval_adapter import UnderstudyLM  # noqa: E402
from helpers import DATA, FIXTURE, ROOT  # noqa: E402

pytestmark = pytest.mark.skipif(not (FIXTURE / "config.json").is_file(), reason=f"shared fixture {FIXTURE} not present")

TASKS = ("us_mc", "us_ppl", "us_gen")
LIMIT = 3


def _dev_texts(n: int) -> list[str]:
    texts = [json.loads(line)["text"] for line in (DATA / "dev.jsonl").read_text().splitlines()]
    return [t for t in texts if len(t.split()) > 12][:n]


def _write_tasks(d) -> None:
    """Three tasks over local jsonl files: multiple choice (the word after 8 words of a dev paragraph against 3
    distractors), loglikelihood_rolling (dev paragraphs), generate_until (continue 6 words of a paragraph)."""
    texts = _dev_texts(8)
    mc = []
    for i, t in enumerate(texts[:6]):
        words = t.split()
        others = [w for w in ("water", "cache", "module", "king") if w != words[8]][:3]
        mc.append({"context": " ".join(words[:8]), "choices": others[:i % 4] + [words[8]] + others[i % 4:],
                   "answer": i % 4})
    rows = {"mc": mc, "text": [{"text": t[:120]} for t in texts[:3]],
            "gen": [{"prompt": " ".join(t.split()[:6]), "target": t.split()[6]} for t in texts[:2]]}
    for name, items in rows.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (d / "us_mc.yaml").write_text(
        "task: us_mc\n" + common.format(d / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (d / "us_ppl.yaml").write_text(
        "task: us_ppl\n" + common.format(d / "text.jsonl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (d / "us_gen.yaml").write_text(
        "task: us_gen\n" + common.format(d / "gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
        'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 4\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")


def _launch(tmp, name: str, model_args: str) -> tuple[subprocess.Popen, object]:
    """lm-eval's CLI (through moe-lm-eval, which registers the model) in a subprocess."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(tmp / "hf-datasets"), "TOKENIZERS_PARALLELISM": "false"}
    out = tmp / name
    cmd = [sys.executable, "-m", "evaluation.lm_eval_cli", "--model", "understudy", "--model_args", model_args,
           "--include_path", str(tmp), "--tasks", ",".join(TASKS), "--limit", str(LIMIT), "--output_path", str(out)]
    with open(tmp / f"{name}.log", "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), out


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Both CLI runs, started up front so that they overlap each other and the in-process tests (lm-eval's CLI
    spends most of its start indexing its own task library): lossless under smoe, and under a compiled plan."""
    from compiler.compile_plan import CompileConfig, compile_plan
    from profiler.profile_model import ProfileConfig, profile

    tmp = tmp_path_factory.mktemp("lm_eval")
    _write_tasks(tmp)
    runs = {"lossless": _launch(tmp, "lossless", f"model={FIXTURE},policy=smoe,cache=25%,lossless=True,dtype=float32")}
    prof = profile(FIXTURE, str(DATA / "calib.jsonl"), ProfileConfig(quant_tokens=0,
                                                                     samples=2, seq_len=16, probe_tokens=64,
                                                                     sensitivity_tokens=0), progress=False)
    prof.save(tmp / "prof")
    compile_plan(tmp / "prof", CompileConfig(search_tokens=16, predict_tokens=64), log=lambda *a: None).save(
        tmp / "plan")
    runs["plan"] = _launch(tmp, "plan", f"model={FIXTURE},plan={tmp / 'plan'},dtype=float32,batch_size=2")
    yield {name: (proc, out, tmp / f"{name}.log") for name, (proc, out) in runs.items()}
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()


def _finish(run) -> dict:
    proc, out, log = run
    code = proc.wait(timeout=300)
    assert code == 0, log.read_text()[-3000:]
    (path,) = out.rglob("results_*.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def lm(cli_runs):
    return UnderstudyLM(model=str(FIXTURE), policy="smoe", cache="25%", lossless=True, dtype="float32")


@pytest.fixture(scope="module")
def hf():
    tok = transformers.AutoTokenizer.from_pretrained(FIXTURE)
    return tok, transformers.AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()


def _hf_score(hf, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) and is_greedy by HF's model, split as lm-eval splits (trailing spaces of the
    context go to the continuation; an empty context is the BOS token)."""
    tok, model = hf
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok(context)["input_ids"] if context else [tok.bos_token_id]
    whole = tok(context + continuation)["input_ids"] if context else ctx + tok(continuation)["input_ids"]
    cont = torch.tensor(whole[len(ctx):])
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0, len(ctx) - 1:]            # [len(cont), V]
    ll = torch.log_softmax(logits, dim=-1)[torch.arange(len(cont)), cont].sum()
    return float(ll), bool((logits.argmax(-1) == cont).all())


def test_loglikelihood_equals_hf(lm, hf):
    text = _dev_texts(2)[1]
    words = text.split()
    ctx = " ".join(words[:6])
    greedy = lm.generate_until([Instance("generate_until", {}, (ctx, {"until": ["\n"], "max_gen_toks": 3}), 0)],
                               disable_tqdm=True)[0]
    pairs = [(ctx, " " + words[6]), (ctx, " " + " ".join(words[6:9])), (ctx + " ", words[6]), (ctx, greedy),
             ("", " ".join(words[:4]))]
    ours = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    for p, (ll, is_greedy) in zip(pairs, ours):
        ref_ll, ref_greedy = _hf_score(hf, *p)
        assert ll == pytest.approx(ref_ll, abs=1e-4), p
        assert is_greedy == ref_greedy, p
    assert ours[3][1] is True                             # its own greedy continuation


def test_rolling_and_generation_equal_hf(lm, hf):
    tok, model = hf
    text = _dev_texts(1)[0][:200]
    (ll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ids = [tok.bos_token_id] + tok(text)["input_ids"]     # the prefix token, then every token predicted once
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0]
    assert ll == pytest.approx(float(torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), ids[1:]].sum()),
                               abs=1e-3)
    prompt = " ".join(text.split()[:5])
    (ours,) = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": [","], "max_gen_toks": 10}), 0)],
                                disable_tqdm=True)
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False)
    assert ours == tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).split(",")[0]


def test_windows_cover_every_token_once(cli_runs, hf):
    """A text over max_length is scored in lm-eval's disjoint windows, batch_size windows side by side (right-padded):
    the sum equals HF's sum over the same windows."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tok, model = hf
    text = _dev_texts(1)[0][:160]
    small = UnderstudyLM(model=str(FIXTURE), policy="smoe", cache="25%", lossless=True, dtype="float32",
                         max_length=16, batch_size=3)
    (ll,) = small.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ref = 0.0
    for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(tok(text)["input_ids"], tok.bos_token_id,
                                                                         16, 1)):
        seq = ctx + cont[:-1]
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, len(ctx) - 1:]
        ref += float(torch.log_softmax(logits, -1)[torch.arange(len(cont)), cont].sum())
    assert ll == pytest.approx(ref, abs=1e-3)


@pytest.mark.parametrize("args, message", [
    ({}, "model=DIR"),
    ({"model": str(FIXTURE), "bogus": 1}, "unknown model_args bogus"),
    ({"model": str(FIXTURE), "batch_size": "auto"}, "no automatic batch size"),
    ({"model": str(FIXTURE), "lossless": "maybe"}, "lossless must be True or False"),
    ({"model": str(FIXTURE), "policy": "fifo"}, "unknown policy"),
    ({"model": str(FIXTURE), "policy": "smoe"}, "needs a cache size"),
    ({"model": str(FIXTURE), "policy": "resident", "max_length": 4096}, "max_length must be 2 to 1024"),
])
def test_bad_model_args(args, message):
    with pytest.raises(UserError, match=message) as exc:
        UnderstudyLM.create_from_arg_obj(args, {"batch_size": 1, "device": None})
    assert "\n" not in str(exc.value)


def test_arg_string_keeps_the_comma_of_a_link():
    lm = UnderstudyLM.create_from_arg_string(f"model={FIXTURE},policy=resident,link=50MB/s,20us,max_length=64",
                                             {"batch_size": 1, "device": "cpu"})
    assert lm.rt.config.link == "50MB/s,20us" and lm.max_length == 64 and lm.batch_size == 1


def _check(result: dict) -> dict:
    r = result["results"]
    assert r["us_mc"]["sample_len"] == LIMIT and 0 <= r["us_mc"]["acc,none"] <= 1 and "acc_norm,none" in r["us_mc"]
    assert r["us_ppl"]["word_perplexity,none"] > 1 and r["us_ppl"]["bits_per_byte,none"] > 0
    assert "exact_match,none" in r["us_gen"]
    info = result["config"]["understudy"]
    assert info["stats"]["decode_positions"] > 0 and info["stats"]["loads"] > 0   # experts moved: offloaded
    return info


def test_cli_lossless(cli_runs):
    info = _check(_finish(cli_runs["lossless"]))
    assert info["policy"] == "smoe (lossless)" and info["lossless"] is True
    assert info["stats"]["substitution_rate"] == 0 and info["stats"]["drop_rate"] == 0


def test_cli_plan(cli_runs):
    result = _finish(cli_runs["plan"])
    info = _check(result)
    assert info["policy"] == "plan" and info["plan"].endswith("plan") and info["budget"] is not None
    assert result["config"]["model_args"]["batch_size"] == 2
