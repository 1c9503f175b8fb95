"""`moe-run --chat`: an interactive conversation, streamed, with the model's chat template.

Lines typed are user turns; the reply streams as it is decoded. Commands: /stats (the cache figures so far),
/reset (a new conversation), /exit (or end of input).
"""
from __future__ import annotations

import sys

from artifacts.errors import UserError
from runtime import chat


def chat_loop(rt, template_spec: str | None, stdin=None, stdout=None) -> None:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    template = chat.load_template(template_spec)
    if not chat.has_template(rt.tokenizer, template):
        raise UserError("this model has no chat template; pass --chat-template FILE (or chatml)")
    interactive = stdin.isatty()
    messages: list[dict] = []
    if interactive:
        print("chat: type a message; /stats, /reset, /exit", file=sys.stderr)
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/exit":
            break
        if line.strip() == "/stats":
            print(rt.stats.summary(), file=stdout)
            continue
        if line.strip() == "/reset":
            messages.clear()
            continue
        messages.append({"role": "user", "content": line})
        ids = rt.tokenizer(chat.render(rt.tokenizer, messages, template), add_special_tokens=False)["input_ids"]
        limit = rt.lm.arch.max_positions
        if limit is not None and len(ids) + rt.config.sampling.max_new_tokens > limit:
            print(f"[the conversation is over the model's context of {limit} tokens; /reset to start again]",
                  file=stdout)
            messages.pop()
            continue
        reply = []
        for text in rt.stream(ids):
            reply.append(text)
            stdout.write(text)
            stdout.flush()
        stdout.write("\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
