import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import DATA, FIXTURE  # noqa: E402
from tiny_models import build_tiny  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family) -> path of a saved tiny checkpoint of that family (built once per session)."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_tiny(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def fixture_model():
    if not (FIXTURE / "config.json").is_file():
        pytest.skip(f"shared fixture {FIXTURE} not present")
    return FIXTURE


@pytest.fixture(scope="session")
def small_profile(fixture_model, tmp_path_factory):
    """A quick profile of the shared fixture (no sensitivity or quantization passes), for policies that need one."""
    from profiler.profile_model import ProfileConfig, profile

    d = tmp_path_factory.mktemp("small-profile") / "profile"
    profile(fixture_model, str(DATA / "calib.jsonl"), ProfileConfig(samples=2, seq_len=32, probe_tokens=64,
            sensitivity_tokens=0, quant_tokens=0), progress=False).save(d)
    return d


@pytest.fixture(scope="session")
def tiny_profile(tiny_model, tmp_path_factory):
    """A profile of a tiny qwen3_moe built from config (substitution sensitivity, no quantization pass): what the
    compiler's tests compile from. Read-only: tests that change a profile copy it first."""
    from helpers import sample_texts, write_jsonl
    from profiler.profile_model import ProfileConfig, profile

    d = tmp_path_factory.mktemp("tiny-profile")
    calib = write_jsonl(d / "c.jsonl", sample_texts(6, 31))
    profile(tiny_model("qwen3_moe"), str(calib), ProfileConfig(samples=6, seq_len=32, probe_tokens=64, quant_tokens=0),
            progress=False).save(d / "profile")
    return d / "profile"
