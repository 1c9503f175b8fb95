"""Chat messages -> the prompt text, with the model's chat template (or one the user names).

Templates are Jinja rendered by transformers' sandboxed environment: data from the model directory, never code.
"""
from __future__ import annotations

from pathlib import Path

from artifacts.errors import UserError

# ChatML (Qwen's and many others' format), offered by name for models that ship no template.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NAMED = {"chatml": CHATML}


def load_template(spec: str | None) -> str | None:
    """A --chat-template value: None (the model's own), a name (chatml) or a Jinja file."""
    if spec is None:
        return None
    if spec in NAMED:
        return NAMED[spec]
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--chat-template {spec}: no such file; pass a Jinja template file or one of "
                        f"{', '.join(NAMED)}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--chat-template {spec}: cannot read it ({exc.__class__.__name__})") from None


def has_template(tokenizer, template: str | None) -> bool:
    return template is not None or bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages: list[dict], template: str | None = None) -> str:
    """The prompt for `messages` ([{role, content}]), ending where the assistant's reply begins."""
    if tokenizer is None:
        raise UserError("this model has no tokenizer, so it cannot chat")
    if not has_template(tokenizer, template):
        raise UserError("this model has no chat template; start the server with --chat-template FILE (or "
                        f"{', '.join(NAMED)}), or use /v1/completions with a raw prompt")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             chat_template=template)
    except Exception as exc:   # noqa: BLE001 - a template error is the template's or the messages' fault
        raise UserError(f"the chat template failed on these messages: {str(exc).splitlines()[0][:200]}") from None
