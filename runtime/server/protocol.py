"""The OpenAI wire format: request bodies (validated by pydantic) and the response objects built from engine output.

Fields follow OpenAI's /v1/completions and /v1/chat/completions; `top_k`, `repetition_penalty` and `ignore_eos` are
accepted as extensions (as vLLM and llama.cpp's server accept them). Unknown fields are ignored, as OpenAI-compatible servers do.
"""
from __future__ import annotations

import secrets
import time
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from runtime.config import SamplingConfig

DEFAULT_MAX_TOKENS = 16           # OpenAI's default for /v1/completions


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    ignore_eos: bool = False
    user: str | None = None

    def sampling(self, max_tokens: int | None) -> SamplingConfig:
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return SamplingConfig(max_new_tokens=max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS,
                              temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              seed=self.seed if self.seed is not None else secrets.randbits(31),
                              repetition_penalty=self.repetition_penalty, frequency_penalty=self.frequency_penalty,
                              presence_penalty=self.presence_penalty, stop=tuple(s for s in stop if s),
                              ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, le=0)    # not served: only null (or 0) is accepted


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[ContentPart], None] = None

    def as_dict(self) -> dict:
        c = self.content
        text = "" if c is None else c if isinstance(c, str) else "".join(p.text for p in c)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = Field(default=False)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, text: str, finish: str, use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], "usage": use}


def completion_chunk(rid: str, model: str, text: str, finish: str | None, use: dict | None = None) -> dict:
    d = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
         "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if use is not None:
        d["usage"] = use
    return d


def chat(rid: str, model: str, text: str, finish: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}], "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, use: dict | None = None,
               choices: bool = True) -> dict:
    d = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else []}
    if use is not None:
        d["usage"] = use
    return d


def error(message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
