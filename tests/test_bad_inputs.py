"""The bad-input table: what a user plausibly gets wrong, across the four commands and the Python API.

Every case must end in exit code 2 (or a UserError from the API) with one line that names the problem, no
traceback, and nothing left behind: the output path does not exist afterwards and no temporary sibling remains.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from artifacts import Plan, Profile, UserError
from compiler.compile_plan import CompileConfig, compile_plan
from helpers import sample_texts, write_jsonl
from profiler.profile_model import ProfileConfig, profile


@dataclass
class Ctx:
    model: Path        # a tiny qwen3_moe checkpoint (float32, 8 experts top-2, context 64)
    profile: Path
    plan: Path
    calib: Path
    tmp: Path          # this case's scratch directory
    out: Path          # this case's output path (must not exist afterwards)


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    model = tiny_model("qwen3_moe")
    calib = write_jsonl(d / "calib.jsonl", sample_texts(6, 31))
    p = profile(model, str(calib), ProfileConfig(quant_tokens=0,
                                                 samples=6, seq_len=32, probe_tokens=64, sensitivity_tokens=64),
                progress=False)
    p.save(d / "profile")
    compile_plan(d / "profile", CompileConfig(budget="50%", search_tokens=32), log=lambda *a: None).save(d / "plan")
    return {"model": model, "profile": d / "profile", "plan": d / "plan", "calib": calib}


# ---- small builders of bad files --------------------------------------------------------------------------------
def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def model_with(c: Ctx, fn, name="m") -> Path:
    m = copy(c.model, c.tmp / name)
    fn(m)
    return m


def plan_with(c: Ctx, file: str, fn) -> Path:
    p = copy(c.plan, c.tmp / "plan")
    edit_json(p / file, fn)
    return p


def profile_with(c: Ctx, fn_header=None, stats=None) -> Path:
    p = copy(c.profile, c.tmp / "profile")
    if fn_header:
        edit_json(p / "profile.json", fn_header)
    if stats:
        from safetensors.numpy import load_file, save_file

        s = load_file(str(p / "stats.safetensors"))
        stats(s)
        save_file(s, str(p / "stats.safetensors"))
    return p


def text_file(c: Ctx, name: str, data: bytes) -> Path:
    (c.tmp / name).write_bytes(data)
    return c.tmp / name


def truncate_weights(m: Path) -> None:
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def shard_missing(m: Path) -> None:
    (m / "model.safetensors").rename(m / "model-00001-of-00002.safetensors")
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


def remote_code(m: Path) -> None:
    edit_json(m / "config.json", lambda d: d.update(model_type="acme_moe", auto_map={"AutoConfig": "acme.Cfg"}))
    (m / "acme.py").write_text(f"open({str(m / 'RAN')!r}, 'w').write('ran')\n")


def expert_shape(m: Path) -> None:
    """The config promises wider experts than the checkpoint holds."""
    edit_json(m / "config.json", lambda d: d.update(moe_intermediate_size=24))


def nan_stat(s):
    s["L0.importance_sum"][0] = np.nan


def target_file(c: Ctx, text: str) -> Path:
    return text_file(c, "target.yaml", text.encode())


GOOD_TARGET = ("name: t\ndevice_memory: 8GiB\ndevice_mem_bandwidth: 5GB/s\nlink_bandwidth: 50MB/s\n"
               "host_mem_bandwidth: 5GB/s\n")
NOT_UTF8 = b'{"text": "caf\xe9 \xff\xfe"}\n'

P, C, R, E, M = "moe-profile", "moe-compile", "moe-run", "moe-eval", "merge"

# (case id, command, argv(ctx) -> list, expected words in the one-line message)
CASES = [
    # ---- moe-profile -----------------------------------------------------------------------------------------
    ("profile-missing-model", P, lambda c: [c.tmp / "nope", "--calib", c.calib, "-o", c.out], "does not exist"),
    ("profile-no-config", P, lambda c: [model_with(c, lambda m: (m / "config.json").unlink()), "--calib", c.calib,
                                        "-o", c.out], "no config.json"),
    ("profile-corrupt-config", P, lambda c: [model_with(c, lambda m: (m / "config.json").write_text("{oops")),
                                             "--calib", c.calib, "-o", c.out], "not valid JSON"),
    ("profile-config-no-model-type", P, lambda c: [model_with(c, lambda m: edit_json(
        m / "config.json", lambda d: d.pop("model_type"))), "--calib", c.calib, "-o", c.out], "no model_type"),
    ("profile-remote-code", P, lambda c: [model_with(c, remote_code), "--calib", c.calib, "-o", c.out],
     "never runs code"),
    ("profile-no-weights", P, lambda c: [model_with(c, lambda m: (m / "model.safetensors").unlink()), "--calib",
                                         c.calib, "-o", c.out], "no model.safetensors"),
    ("profile-truncated-weights", P, lambda c: [model_with(c, truncate_weights), "--calib", c.calib, "-o", c.out],
     "truncated"),
    ("profile-garbage-weights", P, lambda c: [model_with(c, lambda m: (m / "model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")), "--calib", c.calib, "-o", c.out], "not a valid safetensors"),
    ("profile-missing-shard", P, lambda c: [model_with(c, shard_missing), "--calib", c.calib, "-o", c.out],
     "lacks shard model-00002-of-00002"),
    ("profile-expert-shape", P, lambda c: [model_with(c, expert_shape), "--calib", c.calib, "-o", c.out],
     "does not match its config"),
    ("profile-calib-missing", P, lambda c: [c.model, "--calib", c.tmp / "none.jsonl", "-o", c.out], "does not exist"),
    ("profile-calib-empty", P, lambda c: [c.model, "--calib", text_file(c, "e.jsonl", b""), "-o", c.out], "no text"),
    ("profile-calib-not-utf8", P, lambda c: [c.model, "--calib", text_file(c, "x.jsonl", NOT_UTF8), "-o", c.out],
     "not UTF-8"),
    ("profile-calib-bad-json", P, lambda c: [c.model, "--calib", text_file(c, "x.jsonl", b"{text: 1}\n"), "-o", c.out],
     "not valid JSON"),
    ("profile-calib-no-field", P, lambda c: [c.model, "--calib", text_file(c, "x.jsonl", b'{"body": "hi"}\n'),
                                             "-o", c.out], "--text-field"),
    ("profile-calib-csv", P, lambda c: [c.model, "--calib", text_file(c, "x.csv", b"text\nhi\n"), "-o", c.out],
     "unsupported calibration file type"),
    ("profile-samples-0", P, lambda c: [c.model, "--calib", c.calib, "-o", c.out, "--samples", 0], "--samples"),
    ("profile-seq-len-1", P, lambda c: [c.model, "--calib", c.calib, "-o", c.out, "--seq-len", 1], "--seq-len"),
    ("profile-seq-len-over-context", P, lambda c: [c.model, "--calib", c.calib, "-o", c.out, "--seq-len", 4096],
     "over the model's limit"),
    ("profile-batch-size-0", P, lambda c: [c.model, "--calib", c.calib, "-o", c.out, "--batch-size", 0],
     "--batch-size"),
    ("profile-probe-negative", P, lambda c: [c.model, "--calib", c.calib, "-o", c.out, "--probe-tokens", -1],
     "--probe-tokens"),
    ("profile-cluster-nan", P, lambda c: [c.model, "--calib", c.calib, "-o", c.out, "--cluster-threshold", "nan"],
     "--cluster-threshold"),
    ("profile-samples-not-int", P, lambda c: [c.model, "--calib", c.calib, "-o", c.out, "--samples", "many"],
     "invalid int value"),
    ("profile-out-is-file", P, lambda c: [c.model, "--calib", c.calib, "-o", c.calib], "is a file"),
    ("profile-out-foreign-dir", P, lambda c: [c.model, "--calib", c.calib, "-o", text_file(c, "n.txt", b"x").parent],
     "not a profile directory"),
    ("profile-out-under-file", P, lambda c: [c.model, "--calib", c.calib, "-o", c.calib / "p"], "is a file"),
    ("profile-tokenizer-missing", P, lambda c: [c.model, "--calib", c.calib, "-o", c.out, "--tokenizer",
                                                c.tmp / "tok"], "not a directory"),
    # ---- moe-profile merge -----------------------------------------------------------------------------------
    ("merge-same-twice", M, lambda c: [c.profile, c.profile, "-o", c.out], "same calibration tokens"),
    ("merge-one", M, lambda c: [c.profile, "-o", c.out], "at least two"),
    ("merge-missing", M, lambda c: [c.profile, c.tmp / "nope", "-o", c.out], "does not exist"),
    ("merge-nan", M, lambda c: [c.profile, profile_with(c, stats=nan_stat), "-o", c.out], "NaN"),
    # ---- moe-compile -----------------------------------------------------------------------------------------
    ("compile-missing-profile", C, lambda c: [c.tmp / "nope", "--budget", "25%", "-o", c.out], "does not exist"),
    ("compile-not-a-profile", C, lambda c: [c.tmp, "--budget", "25%", "-o", c.out], "profile.json is missing"),
    ("compile-corrupt-header", C, lambda c: [_corrupt(profile_with(c)), "--budget", "25%", "-o", c.out], "corrupt"),
    ("compile-experts-not-int", C, lambda c: [profile_with(c, lambda h: h["model"].update(num_experts="eight")),
                                              "--budget", "25%", "-o", c.out], "model.num_experts"),
    ("compile-layers-missing", C, lambda c: [profile_with(c, lambda h: h["model"].pop("moe_layers")),
                                             "--budget", "25%", "-o", c.out], "model.moe_layers is missing"),
    ("compile-top-k-too-big", C, lambda c: [profile_with(c, lambda h: h["model"].update(top_k=99)),
                                            "--budget", "25%", "-o", c.out], "model.top_k"),
    ("compile-nan-stats", C, lambda c: [profile_with(c, stats=nan_stat), "--budget", "25%", "-o", c.out], "NaN"),
    ("compile-newer-version", C, lambda c: [profile_with(c, lambda h: h.update(format_version=99)),
                                            "--budget", "25%", "-o", c.out], "format version 99"),
    ("compile-stats-missing", C, lambda c: [_unlink(profile_with(c), "stats.safetensors"), "--budget", "25%",
                                            "-o", c.out], "incomplete"),
    ("compile-budget-no-unit", C, lambda c: [c.profile, "--budget", "25", "-o", c.out], "did you mean 25%?"),
    ("compile-budget-words", C, lambda c: [c.profile, "--budget", "lots", "-o", c.out], "cannot read budget"),
    ("compile-budget-0pct", C, lambda c: [c.profile, "--budget", "0%", "-o", c.out], "(0, 100]"),
    ("compile-budget-150pct", C, lambda c: [c.profile, "--budget", "150%", "-o", c.out], "(0, 100]"),
    ("compile-budget-nan-pct", C, lambda c: [c.profile, "--budget", "nan%", "-o", c.out], "cannot read budget"),
    ("compile-budget-too-small", C, lambda c: [c.profile, "--budget", "1KiB", "-o", c.out], "below the"),
    ("compile-budget-too-big", C, lambda c: [c.profile, "--budget", "1TiB", "-o", c.out], "exceeds the target"),
    ("compile-budget-under-one-per-layer", C, lambda c: [c.profile, "--budget", "1%", "-o", c.out],
     "fewer than one per MoE layer"),
    ("compile-unknown-target", C, lambda c: [c.profile, "--budget", "25%", "--target", "abacus", "-o", c.out],
     "unknown target"),
    ("compile-target-zero-bandwidth", C, lambda c: [c.profile, "--budget", "25%", "--target", target_file(
        c, GOOD_TARGET.replace("50MB/s", "0MB/s")), "-o", c.out], "must be positive"),
    ("compile-target-python-tag", C, lambda c: [c.profile, "--budget", "25%", "--target", target_file(
        c, f"!!python/object/apply:os.system ['touch {c.tmp / 'RAN'}']\n"), "-o", c.out], "not valid YAML"),
    ("compile-target-not-mapping", C, lambda c: [c.profile, "--budget", "25%", "--target",
                                                 target_file(c, "- 1\n- 2\n"), "-o", c.out], "not a YAML mapping"),
    ("compile-target-missing-field", C, lambda c: [c.profile, "--budget", "25%", "--target", target_file(
        c, GOOD_TARGET.replace("link_bandwidth: 50MB/s\n", "")), "-o", c.out], "lacks field"),
    ("compile-max-error-nan", C, lambda c: [c.profile, "--budget", "25%", "--max-error", "nan", "-o", c.out],
     "--max-error"),
    ("compile-max-error-negative", C, lambda c: [c.profile, "--budget", "25%", "--max-error", "-1", "-o", c.out],
     "--max-error"),
    ("compile-tpot-zero", C, lambda c: [c.profile, "--budget", "25%", "--tpot-target", "0", "-o", c.out],
     "--tpot-target"),
    ("compile-both-goals", C, lambda c: [c.profile, "--budget", "25%", "--tpot-target", "5", "--max-error", "0.01",
                                         "-o", c.out], "not allowed with"),
    ("compile-search-tokens-0", C, lambda c: [c.profile, "--budget", "25%", "--search-tokens", 0, "-o", c.out],
     "--search-tokens"),
    ("compile-batch-0", C, lambda c: [c.profile, "--budget", "25%", "--batch", 0, "-o", c.out], "--batch"),
    ("compile-context-0", C, lambda c: [c.profile, "--budget", "25%", "--context", 0, "-o", c.out], "--context"),
    ("compile-out-is-file", C, lambda c: [c.profile, "--budget", "25%", "-o", c.calib], "is a file"),
    ("compile-out-foreign-dir", C, lambda c: [c.profile, "--budget", "25%", "-o", text_file(c, "n.txt", b"x").parent],
     "not a plan directory"),
    # ---- moe-run ---------------------------------------------------------------------------------------------
    ("run-plan-missing", R, lambda c: [c.model, "--plan", c.tmp / "nope", "--prompt", "x"], "does not exist"),
    ("run-plan-slots-over-experts", R, lambda c: [c.model, "--plan", plan_with(
        c, "cache_plan.json", lambda d: d["slots"].update({"0": 99})), "--prompt", "x"], "slots[0]"),
    ("run-plan-negative-initial", R, lambda c: [c.model, "--plan", plan_with(
        c, "cache_plan.json", lambda d: d["initial"].update({"0": [-1]})), "--prompt", "x"], "initial[0][0]"),
    ("run-plan-initial-out-of-range", R, lambda c: [c.model, "--plan", plan_with(
        c, "cache_plan.json", lambda d: d["initial"].update({"0": [8]})), "--prompt", "x"], "initial[0][0]"),
    ("run-plan-layer-unknown", R, lambda c: [c.model, "--plan", plan_with(
        c, "cache_plan.json", lambda d: d["slots"].update({"7": 1})), "--prompt", "x"], "slots[7]"),
    ("run-plan-nan-alpha", R, lambda c: [c.model, "--plan", _nan_alpha(c), "--prompt", "x"], "not valid JSON"),
    ("run-plan-negative-alpha", R, lambda c: [c.model, "--plan", plan_with(
        c, "plan.json", lambda d: d["choices"].update(alpha=-1)), "--prompt", "x"], "choices.alpha"),
    ("run-plan-negative-width", R, lambda c: [c.model, "--plan", plan_with(
        c, "plan.json", lambda d: d["choices"].update(width=-3)), "--prompt", "x"], "choices.width"),
    ("run-plan-bad-understudy", R, lambda c: [c.model, "--plan", plan_with(
        c, "substitution_map.json", lambda d: d["layers"]["0"]["substitutes"].update({"0": [[42, 0.5, 0.1]]})),
        "--prompt", "x"], "substitutes[0][0][0]"),
    ("run-plan-over-budget", R, lambda c: [c.model, "--plan", plan_with(
        c, "plan.json", lambda d: d["budget"].update(cache_bytes=1)), "--prompt", "x"], "more than the budget"),
    ("run-plan-incomplete", R, lambda c: [c.model, "--plan", _unlink(copy(c.plan, c.tmp / "plan"),
                                                                    "cache_plan.json"), "--prompt", "x"], "incomplete"),
    ("run-plan-other-model", R, lambda c: [c.model, "--plan", plan_with(
        c, "plan.json", lambda d: d["model"].update(fingerprint="0" * 32)), "--prompt", "x"], "another model"),
    ("run-lru-no-cache", R, lambda c: [c.model, "--policy", "lru", "--prompt", "x"], "needs a cache size"),
    ("run-cache-words", R, lambda c: [c.model, "--policy", "lru", "--cache", "many", "--prompt", "x"],
     "cannot read cache"),
    ("run-cache-0pct", R, lambda c: [c.model, "--policy", "lru", "--cache", "0%", "--prompt", "x"], "(0, 100]"),
    ("run-cache-too-many-slots", R, lambda c: [c.model, "--policy", "lru", "--cache", "99", "--prompt", "x"],
     "outside 1..8"),
    ("run-link-words", R, lambda c: [c.model, "--policy", "lru", "--cache", "2", "--link", "fast", "--prompt", "x"],
     "cannot read link"),
    ("run-link-zero", R, lambda c: [c.model, "--policy", "lru", "--cache", "2", "--link", "0MB/s", "--prompt", "x"],
     "link"),
    ("run-max-new-tokens-0", R, lambda c: [c.model, "--policy", "resident", "--max-new-tokens", 0, "--prompt", "x"],
     "--max-new-tokens"),
    ("run-temperature-negative", R, lambda c: [c.model, "--policy", "resident", "--temperature", -1, "--prompt", "x"],
     "--temperature"),
    ("run-top-p-0", R, lambda c: [c.model, "--policy", "resident", "--top-p", 0, "--prompt", "x"], "--top-p"),
    ("run-top-p-over-1", R, lambda c: [c.model, "--policy", "resident", "--top-p", 1.5, "--prompt", "x"], "--top-p"),
    ("run-alpha-nan", R, lambda c: [c.model, "--policy", "smoe", "--cache", 2, "--alpha", "nan", "--prompt", "x"],
     "--alpha"),
    ("run-stats-json-missing-dir", R, lambda c: [c.model, "--policy", "resident", "--prompt", "x", "--stats-json",
                                                 c.out / "s.json"], "does not exist"),
    ("run-stats-json-is-dir", R, lambda c: [c.model, "--policy", "resident", "--prompt", "x", "--stats-json", c.tmp],
     "is a directory"),
    ("run-prompt-over-context", R, lambda c: [c.model, "--policy", "resident", "--prompt", "y" * 60,
                                              "--max-new-tokens", 8], "over the model's limit"),
    ("run-no-cuda", R, lambda c: [c.model, "--policy", "resident", "--device", "cuda", "--prompt", "x"],
     "CUDA is not available") if not torch.cuda.is_available() else None,
    ("run-plan-policy-no-plan", R, lambda c: [c.model, "--policy", "plan", "--prompt", "x"], "needs a plan"),
    ("run-plan-and-cache", R, lambda c: [c.model, "--plan", c.plan, "--cache", 2, "--prompt", "x"],
     "conflicts with the plan"),
    # ---- moe-eval --------------------------------------------------------------------------------------------
    ("eval-json-missing-dir", E, lambda c: [c.model, "--data", c.calib, "--json", c.out / "e.json"], "does not exist"),
    ("eval-json-is-dir", E, lambda c: [c.model, "--data", c.calib, "--json", c.tmp], "is a directory"),
    ("eval-data-missing", E, lambda c: [c.model, "--data", c.tmp / "d.jsonl", "--json", c.out], "does not exist"),
    ("eval-data-not-utf8", E, lambda c: [c.model, "--data", text_file(c, "d.jsonl", NOT_UTF8), "--json", c.out],
     "not UTF-8"),
    ("eval-window-over-context", E, lambda c: [c.model, "--data", c.calib, "--window", 4096, "--json", c.out],
     "over the model's limit"),
    ("eval-window-1", E, lambda c: [c.model, "--data", c.calib, "--window", 1, "--json", c.out], "--window"),
    ("eval-unknown-policy", E, lambda c: [c.model, "--data", c.calib, "--policies", "fifo", "--json", c.out],
     "unknown policy"),
    ("eval-plan-missing", E, lambda c: [c.model, "--data", c.calib, "--plan", c.tmp / "nope", "--json", c.out],
     "does not exist"),
    ("eval-plan-named-like-policy", E, lambda c: [c.model, "--data", c.calib, "--plan", f"lru={c.plan}",
                                                  "--json", c.out], "must be new"),
    ("eval-tasks-malformed", E, lambda c: [c.model, "--data", c.calib, "--tasks", text_file(
        c, "t.jsonl", b'{"context": "a", "choices": ["b"], "answer": 3}\n'), "--json", c.out], "is not a task"),
    ("eval-max-tokens-1", E, lambda c: [c.model, "--data", c.calib, "--max-tokens", 1, "--json", c.out],
     "--max-tokens"),
    ("eval-batch-0", E, lambda c: [c.model, "--data", c.calib, "--batch", 0, "--json", c.out], "--batch"),
    ("eval-cache-too-many", E, lambda c: [c.model, "--data", c.calib, "--policies", "lru", "--cache", 99,
                                          "--json", c.out], "outside 1..8"),
]
CASES = [case for case in CASES if case is not None]


def _corrupt(p: Path) -> Path:
    (p / "profile.json").write_text("{not json")
    return p


def _unlink(p: Path, name: str) -> Path:
    (p / name).unlink()
    return p


def _nan_alpha(c: Ctx) -> Path:
    p = copy(c.plan, c.tmp / "plan")
    (p / "plan.json").write_text((p / "plan.json").read_text().replace('"alpha": ', '"alpha": NaN, "was": ', 1))
    return p


def _main(cmd: str):
    from compiler.cli import main as compile_main
    from evaluation.cli import main as eval_main
    from profiler.cli import main as profile_main
    from runtime.cli import main as run_main

    return {P: profile_main, M: lambda argv: profile_main(["merge", *argv]), C: compile_main, R: run_main,
            E: eval_main}[cmd]


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")] if parent.is_dir() else []


def test_table_is_large_enough():
    assert len(CASES) + len(API_CASES) >= 60


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, base, tmp_path, capsys):
    _, cmd, argv_of, words = case
    ctx = Ctx(**base, tmp=tmp_path / "work", out=tmp_path / "out")
    ctx.tmp.mkdir()
    argv = [str(a) for a in argv_of(ctx)]
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    try:
        code = _main(cmd)(argv)
    except SystemExit as exc:     # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert words in lines[0], lines[0]
    assert not ctx.out.exists() and _leftovers(tmp_path, "out") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (ctx.tmp / "m" / "RAN").exists() and not (ctx.tmp / "RAN").exists(), "code from an input ran"


# ---- the Python API ---------------------------------------------------------------------------------------------
def _api_generate_zero(c: Ctx):
    from runtime import Runtime

    with Runtime.load(c.model, policy="resident") as rt:
        rt.generate(["x"], max_new_tokens=0)


def _api_teacher_force_too_long(c: Ctx):
    from runtime import Runtime

    with Runtime.load(c.model, policy="resident") as rt:
        rt.teacher_force(torch.zeros(1, 65, dtype=torch.long))


def _api_runtime(**kw):
    def call(c: Ctx):
        from runtime import Runtime

        Runtime.load(c.model, **kw)
    return call


API_CASES = [
    ("api-unknown-policy", _api_runtime(policy="fifo"), "unknown policy"),
    ("api-unknown-dtype", _api_runtime(policy="resident", dtype="int8"), "unknown dtype"),
    ("api-plan-on-profile-dir", lambda c: Plan.load(c.profile), "not a plan"),
    ("api-profile-on-plan-dir", lambda c: Profile.load(c.plan), "not a profile"),
    ("api-generate-zero-tokens", _api_generate_zero, "--max-new-tokens"),
    ("api-teacher-force-too-long", _api_teacher_force_too_long, "over the model's limit"),
    ("api-in-memory-plan-bad-slots", lambda c: _bad_in_memory_plan(c), "slots[0]"),
]


def _bad_in_memory_plan(c: Ctx):
    from runtime import Runtime

    plan = Plan.load(c.plan)
    plan.slots[0] = 99
    Runtime.load(c.model, plan=plan)


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_bad_api_input(case, base, tmp_path):
    _, call, words = case
    ctx = Ctx(**base, tmp=tmp_path, out=tmp_path / "out")
    with pytest.raises(UserError) as info:
        call(ctx)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_remote_code_is_never_run(base, tmp_path):
    """A known model type with an auto_map loads with transformers' own classes; the directory's code never runs."""
    m = copy(base["model"], tmp_path / "m")
    edit_json(m / "config.json", lambda d: d.update(auto_map={"AutoConfig": "evil.Cfg",
                                                              "AutoModelForCausalLM": "evil.Model"}))
    (m / "evil.py").write_text(f"open({str(m / 'RAN')!r}, 'w').write('ran')\n")
    from runtime import Runtime

    with Runtime.load(m, policy="resident") as rt:
        rt.generate(["x"], max_new_tokens=2)
    assert not (m / "RAN").exists()
