"""Train Understudy's embedded demo model: a tiny Qwen2-MoE causal LM, from scratch, on CPU.

The committed checkpoint in ``demo/model/`` is exactly what this script writes with its defaults:

    python demo/train_demo.py            # ~7 minutes on one CPU thread

Architecture (``Qwen2MoeForCausalLM``): byte-level BPE vocabulary of 4096, hidden 128, 4 layers, 4 attention heads
with 2 KV heads, 16 routed experts (top-4, ``norm_topk_prob=False``) plus one sigmoid-gated shared expert, tied
embeddings. The routed experts are 96 wide (not 128) so that the bf16 checkpoint directory stays under 8 MB.
Training: float32, AdamW with linear warmup and cosine decay, batches of 16 random 128-token windows drawn from the
EOS-joined token stream of ``demo/data/train.jsonl``, with the load-balancing auxiliary loss (coefficient 0.01).
The output directory is self-contained: bf16 safetensors, config, generation config, tokenizer files, and
``training_info.json`` whose ``dev_ppl_fp32`` is the perplexity of the *saved* (bf16) weights, reloaded and run in
float32 on ``demo/data/dev.jsonl`` (non-overlapping 128-token windows), next to a unigram baseline.
"""

import argparse
import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).resolve().parent
EOS = "<|endoftext|>"  # token id 0: bos, eos and pad alike
ARCH = dict(
    vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    num_experts=16, num_experts_per_tok=4, moe_intermediate_size=96, norm_topk_prob=False,
    shared_expert_intermediate_size=256, intermediate_size=256, decoder_sparse_step=1,
    max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    router_aux_loss_coef=0.01,
)
SEQ, BATCH, LR, WARMUP, WEIGHT_DECAY = 128, 16, 3e-3, 0.05, 0.1


def default_tokenizer():
    """The shared fixture tokenizer, or the committed demo model's copy of it (same vocabulary and ids)."""
    for path in (Path("/work/shared/fixtures/data/tokenizer.json"), HERE / "model" / "tokenizer.json"):
        if path.exists():
            return str(path)
    raise FileNotFoundError("no tokenizer.json found; pass --tokenizer")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(HERE / "data"), help="folder with train.jsonl and dev.jsonl")
    p.add_argument("--out", default=str(HERE / "model"), help="output checkpoint directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the shared fixture tokenizer)")
    p.add_argument("--steps", type=int, default=850)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def token_stream(tokenizer, path):
    """All paragraphs of a jsonl file, tokenized and joined with EOS after each one, as one 1-D tensor."""
    ids = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            ids += tokenizer(json.loads(line)["text"])["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def lr_factor(step, total):
    """Linear warmup over the first WARMUP fraction of the steps, then cosine decay to zero."""
    warm = max(1, int(WARMUP * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@torch.no_grad()
def perplexity(model, stream):
    """Token-weighted perplexity over consecutive non-overlapping SEQ-token windows of the stream."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(stream) - 1, SEQ):
        window = stream[start:start + SEQ][None]
        if window.shape[1] < 2:
            break
        loss = model(input_ids=window, labels=window, output_router_logits=False).loss
        total_nll += loss.item() * (window.shape[1] - 1)
        total_tokens += window.shape[1] - 1
    return math.exp(total_nll / total_tokens)


def unigram_perplexity(train, dev, vocab_size):
    """Add-one smoothed unigram model of the training stream, scored on the dev stream (the level to beat)."""
    counts = Counter(train.tolist())
    denom = len(train) + vocab_size
    nll = -sum(math.log((counts[t] + 1) / denom) for t in dev[1:].tolist())
    return math.exp(nll / (len(dev) - 1))


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=args.tokenizer or default_tokenizer(), bos_token=EOS, eos_token=EOS, pad_token=EOS)
    train = token_stream(tokenizer, Path(args.data) / "train.jsonl")
    dev = token_stream(tokenizer, Path(args.data) / "dev.jsonl")
    print(f"train tokens {len(train):,}  dev tokens {len(dev):,}")

    config = transformers.Qwen2MoeConfig(**ARCH, output_router_logits=True)
    model = transformers.Qwen2MoeForCausalLM(config)  # float32, initialised from the seed above
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters {params:,}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.steps))
    batches = torch.Generator().manual_seed(args.seed)
    model.train()
    started = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, len(train) - SEQ, (BATCH,), generator=batches)
        input_ids = torch.stack([train[s:s + SEQ] for s in starts.tolist()])
        output = model(input_ids=input_ids, labels=input_ids)  # loss includes 0.01 * load-balancing loss
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {output.loss.item():.3f}  aux {output.aux_loss.item():.3f}  "
                  f"lr {schedule.get_last_lr()[0]:.2e}  {time.time() - started:6.0f}s", flush=True)
    minutes = (time.time() - started) / 60

    model.config.output_router_logits = False  # inference default, as in the reference fixture
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    info = dict(arch="qwen2moe", steps=args.steps, minutes=round(minutes, 2), params=params, seed=args.seed,
                threads=args.threads, seq=SEQ, batch=BATCH, lr=LR, train_tokens=len(train),
                dev_tokens=len(dev), dev_ppl_fp32=perplexity(reloaded, dev),
                dev_unigram_ppl=unigram_perplexity(train, dev, config.vocab_size))
    (out / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
