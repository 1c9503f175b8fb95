"""Build an HF causal LM whose MoE blocks are ours, with dense weights loaded and routed experts left in a store.

The model is instantiated on the meta device (nothing allocated), each MoE block is replaced by `MoEBlock`
(explicitly, by module path), then only the dense tensors are materialised and read from the checkpoint.
Routed experts are never materialised here: they stay in the `ExpertStore`. A quantized checkpoint's
`quantization_config` does not change the skeleton (transformers builds plain modules from a config); its dense fp8
weights are dequantized into the compute dtype as they load.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from artifacts.errors import UserError
from runtime.checkpoint import Checkpoint
from runtime.families import MoEArch, resolve_arch
from runtime.formats import FP8_DTYPES, dequant_fp8_blocks, fp8_block, scale_inv_name
from runtime.moe_block import MoEBlock


@dataclass
class LoadedModel:
    model: nn.Module
    arch: MoEArch
    config: object
    ckpt: Checkpoint
    blocks: dict[int, MoEBlock]   # model layer index -> our block
    dtype: torch.dtype
    device: torch.device
    generation_eos: int | list[int] | None = None   # generation_config.json's eos_token_id (chat models' end of turn)
    routers: torch.Tensor | None = None   # [L x E, H] the MoE layers' router weights in layer order (`_stack_routers`)


def load_config(model_dir: str | Path):
    """The model's config, read locally and without running any code from the directory: a config whose
    model_type transformers does not know (it would need the directory's `auto_map` Python) is refused."""
    path = Path(model_dir)
    if not path.is_dir():
        raise UserError(f"model directory {path} does not exist; pass a local HF checkpoint directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{path} has no config.json; pass an HF checkpoint directory (save_pretrained output)")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{cfg_file} is not valid JSON ({exc.__class__.__name__}); re-download or re-save the "
                        "checkpoint") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise UserError(f"{cfg_file} has no model_type; is this an HF transformers checkpoint?")
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        if "auto_map" in raw:
            raise UserError(f"{path} needs its own Python code (config.json auto_map, model_type "
                            f"{raw['model_type']!r}); Understudy never runs code from a model directory: use a "
                            "checkpoint of a model type transformers supports") from None
        raise UserError(f"cannot read {cfg_file}: {str(exc).splitlines()[0][:200]}") from None


def load_tokenizer(where: str | Path):
    """The tokenizer of a local directory, without running code from it; None where it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(where), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _module(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return root.get_submodule(parent_path), name


COMPUTE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                  "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, checkpoint: torch.dtype, device: torch.device) -> torch.dtype:
    """The run's compute dtype: explicit, else the checkpoint's where the device computes it (bf16 and fp32 on
    CPU; fp16 too on CUDA), else float32 on CPU and bf16 on CUDA (fp8 or fp16 checkpoints)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        ok = (torch.float32, torch.bfloat16) + ((torch.float16,) if device.type == "cuda" else ())
        if checkpoint in ok:
            return checkpoint
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return COMPUTE_DTYPES[dtype]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None) -> LoadedModel:
    config = load_config(model_dir)
    arch = resolve_arch(config)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
    ckpt = Checkpoint(model_dir)
    dtype = resolve_dtype(dtype, ckpt.float_dtype(), device)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    blocks: dict[int, MoEBlock] = {}
    for layer in arch.moe_layers:
        parent, name = _module(model, arch.block_path.format(l=layer))
        block = MoEBlock(getattr(parent, name), arch, layer)
        setattr(parent, name, block)
        blocks[layer] = block
    model.to_empty(device=device)
    routers = _stack_routers(blocks, arch)

    _load_dense(model, ckpt, arch)
    # Non-persistent buffers (rotary inv_freq) are not in the checkpoint: let HF compute them.
    for module in model.modules():
        if getattr(module, "_non_persistent_buffers_set", None) and not list(module.parameters(recurse=False)):
            model._init_weights(module)
    model.eval()
    return LoadedModel(model=model, arch=arch, config=config, ckpt=ckpt, blocks=blocks, dtype=dtype, device=device,
                       generation_eos=_generation_eos(Path(model_dir)), routers=routers)


def _stack_routers(blocks: dict[int, MoEBlock], arch: MoEArch) -> torch.Tensor | None:
    """Make every MoE block's router weight [E, H] a view of one buffer [L x E, H], in MoE layer order, before the
    dense weights load into it (no memory added: the empty weights it replaces are freed): a layer's router rows and
    the next MoE layer's are then adjacent, and one matmul can compute both (`pair_routers`). A view has the shape,
    strides and dtype of the weight it replaces, so the router computes as before. None (nothing changed) where the
    routers have a bias (GPT-OSS) or differ in shape, dtype or device."""
    routers = [getattr(b, arch.router_attr) for _, b in sorted(blocks.items())]
    ws = [r.weight for r in routers]
    if not ws or arch.router.logit_bias or any(
            w.dim() != 2 or (w.shape, w.dtype, w.device) != (ws[0].shape, ws[0].dtype, ws[0].device) for w in ws):
        return None
    e = ws[0].shape[0]
    buf = torch.empty((len(ws) * e, ws[0].shape[1]), dtype=ws[0].dtype, device=ws[0].device)   # [L x E, H]
    for i, w in enumerate(ws):
        w.data = buf[i * e:(i + 1) * e]
    return buf


def pair_routers(lm: LoadedModel, on: bool = True) -> bool:
    """Pair each MoE block with the next MoE layer's (`MoEBlock.pair`: one matmul for its routing and the next
    layer's prediction, over their adjacent router rows), or unpair them all (`on` False). Returns whether the
    blocks are paired (not where the routers are not stacked, `_stack_routers`)."""
    layers = sorted(lm.blocks)
    if lm.routers is None or not on:
        for l in layers:
            lm.blocks[l].pair(None)
        return False
    e = lm.routers.shape[0] // len(layers)                              # each router's rows
    for i, (l, nxt) in enumerate(zip(layers, layers[1:])):
        lm.blocks[l].pair(lm.routers[i * e:(i + 2) * e], lm.blocks[nxt])
    return True


def _generation_eos(model_dir: Path) -> int | list[int] | None:
    """eos_token_id of the directory's generation_config.json (read as data), if it has a valid one."""
    try:
        eos = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(eos, int) or (isinstance(eos, list) and all(isinstance(e, int) for e in eos))
    return eos if ok else None


def _disk_name(name: str, arch: MoEArch) -> str:
    """In-memory parameter name -> checkpoint tensor name (only MoE block prefixes may differ)."""
    for layer in arch.moe_layers:
        mem = arch.block_path.format(l=layer) + "."
        if name.startswith(mem):
            return arch.disk_block_path.format(l=layer) + "." + name[len(mem):]
    return name


@torch.no_grad()
def _load_dense(model: nn.Module, ckpt: Checkpoint, arch: MoEArch) -> None:
    state = model.state_dict(keep_vars=True)
    missing = []
    for name, tensor in state.items():
        disk = _disk_name(name, arch)
        if disk in ckpt:
            src = ckpt.view(disk)
            if tuple(src.shape) != tuple(tensor.shape):
                raise UserError(f"checkpoint tensor {disk} has shape {tuple(src.shape)}, the config expects "
                                f"{tuple(tensor.shape)}; the checkpoint does not match its config.json")
            if tensor.dtype.is_floating_point and not src.dtype.is_floating_point:
                raise UserError(f"checkpoint tensor {disk} is {str(src.dtype).replace('torch.', '')}, a quantized "
                                "dense weight Understudy does not read (it reads fp8 with weight_scale_inv)")
            tensor.data.copy_(_dequantized(ckpt, disk, src, tensor.dtype) if src.dtype in FP8_DTYPES
                              else src.to(tensor.dtype))
        else:
            missing.append(name)
    if missing:
        tied = getattr(model.config, "tie_word_embeddings", False)
        if tied and all(n.startswith("lm_head.") for n in missing):
            model.tie_weights()
        else:
            raise UserError(f"checkpoint {ckpt.dir} lacks {len(missing)} dense tensors (first: {missing[0]}); "
                            "is the checkpoint complete?")


def _dequantized(ckpt: Checkpoint, name: str, src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A dense fp8 weight (DeepSeek-V3 / Qwen3-FP8 checkpoints) dequantized at load into the compute dtype:
    w = fp8 x weight_scale_inv per block (runtime.formats.dequant_fp8_blocks), as transformers dequantizes it."""
    scale, block = scale_inv_name(name), fp8_block(ckpt.quantization, f"checkpoint tensor {name}")
    grid = tuple(-(-n // b) for n, b in zip(src.shape, block))       # [ceil(R/br), ceil(C/bc)]
    ok = src.dim() == 2 and scale in ckpt and ckpt.shape(scale) == grid
    if not ok or not ckpt.info(scale).dtype.is_floating_point or ckpt.info(scale).dtype.itemsize < 2:
        raise UserError(f"checkpoint tensor {name} is {str(src.dtype).replace('torch.', '')} without a float "
                        f"{scale} of shape {list(grid)}; Understudy reads block-scaled fp8 weights (DeepSeek-V3 / "
                        "Qwen3-FP8 layout)")
    return dequant_fp8_blocks(src, ckpt.view(scale), block, dtype)


def next_layer_router(lm: LoadedModel):
    """The approximate next-layer gate: layer l+1's router applied to layer l's MoE input (cheap: E x H).
    route(l, x) -> (next MoE layer, its Routing) or None for the last MoE layer."""
    layers = list(lm.arch.moe_layers)
    nxt = dict(zip(layers, layers[1:]))

    def route(layer: int, x: torch.Tensor):
        if layer not in nxt:
            return None
        return nxt[layer], lm.blocks[nxt[layer]].route(x, mixture=False)   # ids and scores are all it is read for

    return route
