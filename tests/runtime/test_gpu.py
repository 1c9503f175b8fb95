"""On CUDA: pinned host store, copies on a side stream with events, and lossless outputs equal to HF's."""
import pytest
import torch
import transformers

from runtime import Runtime

pytestmark = pytest.mark.gpu


def test_lossless_on_cuda_matches_hf(fixture_model):
    ids = torch.randint(1, 4096, (1, 32), generator=torch.Generator().manual_seed(0)).cuda()
    with Runtime.load(fixture_model, policy="smoe", cache="25%", lossless=True, device="cuda",
                      dtype=torch.float32) as rt:
        assert rt.store.mode == "host" and rt.loader._stream is not None
        ours = rt.forward(ids)
        rt.generate(["The function returns"], max_new_tokens=16)
        assert rt.stats.to_dict()["loads"] > 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(fixture_model, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        ref = hf(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-4
