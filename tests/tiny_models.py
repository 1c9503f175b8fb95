"""Tiny MoE checkpoints of every supported family, built from config and saved with save_pretrained."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

COMMON = dict(vocab_size=260, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_config(family: str):
    if family == "mixtral":
        return transformers.MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=16,
                                           shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                           mlp_only_layers=[1], qkv_bias=True)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=16, num_experts=8,
                                           num_experts_per_tok=2, norm_topk_prob=True, head_dim=8)
    if family == "olmoe":
        return transformers.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2)
    if family == "deepseek_v2":
        return transformers.DeepseekV2Config(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=64, moe_intermediate_size=16,
                                             n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                             first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                                             qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, n_group=2,
                                             topk_group=1, topk_method="group_limited_greedy",
                                             routed_scaling_factor=1.5)
    if family == "deepseek_v3":
        return transformers.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=64, moe_intermediate_size=16,
                                             n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                             first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
                                             qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, n_group=2,
                                             topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "gpt_oss":
        return transformers.GptOssConfig(**COMMON, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                                         head_dim=8, sliding_window=16,
                                         layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    raise KeyError(family)


FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss")


def save_byte_tokenizer(out: Path) -> None:
    """A byte-level tokenizer with no merges (one token per byte): ids 0-2 special, bytes from 3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token=None).save_pretrained(out)


def build_tiny(family: str, out: Path, seed: int = 0, tweak=None, config=None, **save_kwargs) -> Path:
    """Save a randomly initialised tiny model of `family` (and a byte tokenizer) to `out`; `tweak(model)` may edit
    weights first; `config` overrides the family's tiny config."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config or tiny_config(family), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "e_score_correction_bias" in name:
                continue
            if p.dim() >= 2 and ("experts" in name or "gate" in name or "router" in name):
                p.normal_(0.0, 0.2)  # routed experts and routers large enough to matter at this size
            elif p.dim() == 1 and "bias" in name:
                p.normal_(0.0, 0.05)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0.0, 0.05)
    if tweak is not None:
        with torch.no_grad():
            tweak(model)
    model.save_pretrained(out, **save_kwargs)
    save_byte_tokenizer(out)
    return Path(out)
