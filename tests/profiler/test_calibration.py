"""Calibration data from every supported source gives the same token windows."""
import json

import numpy as np
import pytest

from artifacts.errors import UserError
from artifacts.texts import read_texts
from profiler.calibration import build_calibration, load_tokenizer
from tiny_models import save_byte_tokenizer

TEXTS = ["first paragraph of text", "second one, a bit longer than the first", "third"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    save_byte_tokenizer(d)
    return load_tokenizer(str(d))


def test_sources_agree(tmp_path, tok):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    txt = tmp_path / "d.txt"
    txt.write_text("\n\n".join(TEXTS))
    sources = [jsonl, txt]
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "d.parquet")
    sources.append(tmp_path / "d.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "ds"))
    sources.append(tmp_path / "ds")
    windows = [build_calibration(str(s), tok, samples=100, seq_len=8, seed=0).tokens for s in sources]
    assert all(np.array_equal(w, windows[0]) for w in windows)
    assert windows[0].shape == (sum(len(t) + 1 for t in TEXTS) // 8, 8)


def test_sampling_is_seeded_and_recorded(tmp_path, tok):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t * 5}) + "\n" for t in TEXTS))
    a = build_calibration(str(jsonl), tok, samples=3, seq_len=8, seed=1)
    b = build_calibration(str(jsonl), tok, samples=3, seq_len=8, seed=1)
    c = build_calibration(str(jsonl), tok, samples=3, seq_len=8, seed=2)
    assert np.array_equal(a.tokens, b.tokens) and not np.array_equal(a.tokens, c.tokens)
    assert a.source["samples"] == 3 and a.source["seed"] == 1 and len(a.source["tokens_sha256"]) == 64


def test_unknown_file_type(tmp_path):
    (tmp_path / "d.csv").write_text("text\nhello\n")
    with pytest.raises(UserError, match="unsupported calibration file type"):
        read_texts(str(tmp_path / "d.csv"))
