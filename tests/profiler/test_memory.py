"""Profiling holds the dense weights plus one layer's routed experts, never all experts at once: it profiles a model
whose routed experts are larger than the memory the test allows it (anonymous memory, measured)."""
import json
import threading
import time

import numpy as np
import transformers
from safetensors.numpy import load_file, save_file

from helpers import sample_texts, write_jsonl
from profiler.profile_model import ProfileConfig, profile
from tiny_models import COMMON, build_tiny


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon")


class PeakRss:
    """Samples anonymous resident memory (not the mmap'd checkpoint's page cache) every few ms."""

    def __enter__(self):
        self.base = self.peak = _rss_anon_kib()
        self._stop = False
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, _rss_anon_kib())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()

    @property
    def grown_bytes(self) -> int:
        return (self.peak - self.base) * 1024


MARGIN = 24 * 2**20       # bytes (see the test)


def _big_experts(tmp_path, layers: int, experts: int, hidden: int, intermediate: int):
    """A qwen3_moe checkpoint whose routed experts are [intermediate x hidden] float32 (random, 1/sqrt(fan-in)):
    HF builds and saves it with 4-wide experts, then the experts alone are rewritten at full size with safetensors
    (seconds, where HF's init of the full model would take longer)."""
    cfg = transformers.Qwen3MoeConfig(**{**COMMON, "num_hidden_layers": layers, "hidden_size": hidden},
                                      intermediate_size=64, moe_intermediate_size=4, num_experts=experts,
                                      num_experts_per_tok=2, head_dim=16)
    path = build_tiny("qwen3_moe", tmp_path / "big", config=cfg)
    weights = load_file(str(path / "model.safetensors"))
    rng = np.random.default_rng(0)
    for name in weights:
        if ".mlp.experts." in name:
            shape = (hidden, intermediate) if "down_proj" in name else (intermediate, hidden)     # [out, in]
            weights[name] = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[1]))
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": intermediate}))
    return path


def test_routed_experts_larger_than_the_memory_allowed(tmp_path):
    """12 MoE layers x 64 experts of 384 KiB: 288 MiB of routed experts, 24 MiB a layer. The profile (every pass:
    observation, loss sensitivity, quantization) may grow the process's anonymous memory by the dense weights, one
    layer of experts and MARGIN, under a fifth of the routed bytes. MARGIN is for what a run holds whatever its
    experts (modules, tokenizer, statistics, allocator): 12 MiB measured with this model's experts 4 wide (5 MiB in
    all), and 12-14 MiB over one layer with them 512 and 1024 wide."""
    layers, experts, hidden, inter = 12, 64, 64, 512
    big = _big_experts(tmp_path, layers, experts, hidden, inter)
    calib = write_jsonl(tmp_path / "c.jsonl", sample_texts(4, 31))
    run = ProfileConfig(samples=4, seq_len=32, batch_size=4, probe_tokens=16, sensitivity_tokens=32, quant_tokens=32)
    profile(build_tiny("qwen3_moe", tmp_path / "warm"), str(calib), run, progress=False)  # imports, allocator warm-up

    expert_bytes = 3 * hidden * inter * 4                                        # float32
    layer_bytes, routed_bytes = experts * expert_bytes, layers * experts * expert_bytes
    with PeakRss() as mem:
        p = profile(big, str(calib), run, progress=False)
    model = p.header["model"]
    assert model["routed_expert_bytes"] == routed_bytes == 288 * 2**20 and p.quant_sensitivity is not None
    allowed = model["dense_bytes"] + layer_bytes + MARGIN
    print(f"peak anonymous memory grew by {mem.grown_bytes / 2**20:.1f} MiB; allowed {allowed / 2**20:.1f} MiB "
          f"(dense {model['dense_bytes'] / 2**20:.1f} + one layer of experts {layer_bytes / 2**20:.0f} + margin "
          f"{MARGIN / 2**20:.0f}); routed experts {routed_bytes / 2**20:.0f} MiB")
    assert mem.grown_bytes < allowed < routed_bytes / 5, (mem.grown_bytes, allowed, routed_bytes)
