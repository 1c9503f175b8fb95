"""Model fingerprint: what identifies "the same model" cheaply and robustly.

fingerprint = sha256( canonical JSON of the resolved MoE architecture + vocab/hidden sizes
                        (+ the routed experts' packed format, for a quantized checkpoint)
                      || float32 bytes of every MoE layer's router weight (and biases) )
The routers are small (E x H per layer) yet determined by training, so two different checkpoints of one
architecture differ, while a bf16 and a float32 copy of the same weights (exact conversion) agree. A quantized
checkpoint's experts are not an exact conversion of anyone's, so its format is part of its identity: a plan profiled
on the bf16 release does not run on the MXFP4 or fp8 one (unquantized fingerprints are unchanged by this).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

from runtime.checkpoint import Checkpoint
from runtime.expert_store import packed_format
from runtime.families.arch import MoEArch


def model_fingerprint(arch: MoEArch, config, ckpt: Checkpoint) -> str:
    h = hashlib.sha256()
    ident = {"arch": dataclasses.asdict(arch), "vocab_size": getattr(config, "vocab_size", None),
             "hidden_size": getattr(config, "hidden_size", None)}
    ident["arch"].pop("max_positions", None)
    packed = packed_format(ckpt, arch)
    if packed is not None:
        ident["expert_format"] = packed.name
    h.update(json.dumps(ident, sort_keys=True).encode())
    for layer in arch.moe_layers:
        prefix = arch.expert_key_prefix(layer) + arch.router_attr + "."
        for name in sorted(k for k in ckpt.keys() if k.startswith(prefix)):
            h.update(name.encode())
            h.update(ckpt.view(name).to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]
