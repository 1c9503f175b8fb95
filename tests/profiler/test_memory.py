"""Profiling holds the dense weights plus one layer's routed experts, never all experts at once."""
import threading
import time

import transformers

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


def test_peak_memory_is_one_layer_of_experts(tmp_path):
    cfg = transformers.Qwen3MoeConfig(**{**COMMON, "num_hidden_layers": 6, "hidden_size": 64},
                                      intermediate_size=64, moe_intermediate_size=2048, num_experts=8,
                                      num_experts_per_tok=2, head_dim=16)
    big = build_tiny("qwen3_moe", tmp_path / "big", config=cfg)
    calib = write_jsonl(tmp_path / "c.jsonl", sample_texts(4, 31))
    run = ProfileConfig(samples=4, seq_len=32, batch_size=4, probe_tokens=16)
    profile(build_tiny("qwen3_moe", tmp_path / "warm"), str(calib), run, progress=False)  # imports, allocator warm-up

    expert_bytes = 3 * 64 * 2048 * 4                 # float32
    layer_bytes, all_bytes = 8 * expert_bytes, 6 * 8 * expert_bytes
    with PeakRss() as mem:
        p = profile(big, str(calib), run, progress=False)
    assert p.header["model"]["routed_expert_bytes"] == all_bytes
    # one layer's experts (plus their transient bf16->fp32 reads and activations) but far from all of them
    print(f"peak anonymous memory grew by {mem.grown_bytes / 2**20:.1f} MiB; one layer of experts is "
          f"{layer_bytes / 2**20:.1f} MiB, all of them {all_bytes / 2**20:.1f} MiB")
    assert mem.grown_bytes < 2.5 * layer_bytes < all_bytes / 2, (mem.grown_bytes, layer_bytes, all_bytes)
