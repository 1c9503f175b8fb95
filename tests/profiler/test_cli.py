"""moe-profile's command line: bad input is one line on stderr, exit code 2, and no profile left behind."""
import subprocess
import sys

import pytest
import transformers

from artifacts import Profile
from helpers import sample_texts, write_jsonl
from profiler.cli import main
from tiny_models import save_byte_tokenizer


def _run(capsys, *argv):
    capsys.readouterr()  # drop what set-up printed
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


@pytest.fixture()
def calib(tmp_path):
    return write_jsonl(tmp_path / "c.jsonl", sample_texts(4, 31))


def _shard(tmp_path, n):
    return write_jsonl(tmp_path / f"c{n}.jsonl", sample_texts(4, 31, seed=n))


def test_profile_and_merge_commands(tiny_model, calib, tmp_path, capsys):
    out, out2 = tmp_path / "p", tmp_path / "p2"
    code, _ = _run(capsys, tiny_model("olmoe"), "--calib", calib, "-o", out, "--samples", 2, "--seq-len", 32, "--quiet")
    assert code == 0 and Profile.load(out).num_experts == 8
    code, _ = _run(capsys, tiny_model("olmoe"), "--calib", _shard(tmp_path, 1), "-o", out2, "--samples", 2,
                   "--seq-len", 32, "--quiet")
    code, _ = _run(capsys, "merge", out, out2, "-o", tmp_path / "m", "--quiet")
    merged = Profile.load(tmp_path / "m")
    assert code == 0 and merged.stat(0, "tokens")[0] == 2 * Profile.load(out).stat(0, "tokens")[0]
    code, err = _run(capsys, "merge", out, out, "-o", tmp_path / "twice")     # the same data twice is refused
    assert code == 2 and len(err) == 1 and "same calibration tokens" in err[0] and not (tmp_path / "twice").exists()


def test_missing_model_directory(calib, tmp_path, capsys):
    code, err = _run(capsys, tmp_path / "nope", "--calib", calib, "-o", tmp_path / "p")
    assert code == 2 and len(err) == 1 and "does not exist" in err[0]
    assert not (tmp_path / "p").exists()


def test_not_a_moe_model(calib, tmp_path, capsys):
    dense = tmp_path / "dense"
    cfg = transformers.LlamaConfig(vocab_size=260, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(dense)
    save_byte_tokenizer(dense)
    code, err = _run(capsys, dense, "--calib", calib, "-o", tmp_path / "p")
    assert code == 2 and len(err) == 1 and "not a supported Mixture-of-Experts" in err[0] and "qwen2_moe" in err[0]
    assert not (tmp_path / "p").exists()


def test_empty_calibration_set(tiny_model, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = _run(capsys, tiny_model("olmoe"), "--calib", empty, "-o", tmp_path / "p", "--seq-len", 32)
    assert code == 2 and len(err) == 1 and "no text" in err[0]
    assert not (tmp_path / "p").exists()


def test_sequence_length_over_model_limit(tiny_model, calib, tmp_path, capsys):
    code, err = _run(capsys, tiny_model("olmoe"), "--calib", calib, "-o", tmp_path / "p", "--seq-len", 65)
    assert code == 2 and len(err) == 1 and "over the model's limit of 64" in err[0]
    assert not (tmp_path / "p").exists() and not list(tmp_path.glob(".p.tmp-*"))


def test_missing_calibration_file_and_wrong_field(tiny_model, calib, tmp_path, capsys):
    code, err = _run(capsys, tiny_model("olmoe"), "--calib", tmp_path / "nope.jsonl", "-o", tmp_path / "p", "--seq-len", 32)
    assert code == 2 and len(err) == 1
    code, err = _run(capsys, tiny_model("olmoe"), "--calib", calib, "-o", tmp_path / "p", "--text-field", "body", "--seq-len", 32)
    assert code == 2 and len(err) == 1 and "--text-field" in err[0]


def test_output_that_is_not_a_profile_is_not_overwritten(tiny_model, calib, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("x")
    code, err = _run(capsys, tiny_model("olmoe"), "--calib", calib, "-o", precious)
    assert code == 2 and (precious / "thesis.tex").exists()


def test_console_script_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "profiler.cli", str(tmp_path / "nope"), "--calib", "x", "-o",
                        str(tmp_path / "p")], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_negative_sensitivity_tokens(tiny_model, calib, tmp_path, capsys):
    code, err = _run(capsys, tiny_model("olmoe"), "--calib", calib, "-o", tmp_path / "p", "--seq-len", 32,
                     "--sensitivity-tokens", -1)
    assert code == 2 and len(err) == 1 and "--sensitivity-tokens" in err[0]
    assert not (tmp_path / "p").exists()


def test_merge_keeps_sensitivity_only_when_every_shard_has_it(tiny_model, calib, tmp_path, capsys):
    model = tiny_model("olmoe")
    for n, (name, extra) in enumerate((("a", []), ("a2", []), ("b", ["--sensitivity-tokens", 0]))):
        code, _ = _run(capsys, model, "--calib", _shard(tmp_path, n), "-o", tmp_path / name, "--samples", 2,
                       "--seq-len", 32, "--quiet", *extra)
        assert code == 0
    assert Profile.load(tmp_path / "a").sensitivity is not None and Profile.load(tmp_path / "b").sensitivity is None
    code, _ = _run(capsys, "merge", tmp_path / "a", tmp_path / "a2", "-o", tmp_path / "aa", "--quiet")
    aa, a, a2 = Profile.load(tmp_path / "aa"), Profile.load(tmp_path / "a"), Profile.load(tmp_path / "a2")
    assert code == 0 and (aa.sensitivity["pair_count"] == a.sensitivity["pair_count"] + a2.sensitivity["pair_count"]).all()
    code, _ = _run(capsys, "merge", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "ab", "--quiet")
    assert code == 0 and Profile.load(tmp_path / "ab").sensitivity is None
