"""The OpenAI request bodies the server accepts (pydantic: a wrong field is a 400 that names it)
and their translation to :class:`SamplingParams`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from kvoffload.config import MAX_LOGPROBS, SamplingParams
from kvoffload.errors import ConfigError

COMPLETIONS_MAX_TOKENS = 16       # OpenAI's default for /v1/completions


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share. Unknown fields are accepted and ignored (clients send
    ``user``, ``logit_bias``... ), as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)   # vLLM's name for llama.cpp's repeat_penalty
    repeat_penalty: float | None = Field(None, gt=0)
    repeat_last_n: int | None = Field(None, ge=0)
    ignore_eos: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: int | None = Field(COMPLETIONS_MAX_TOKENS, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def chat_messages(self) -> list[dict[str, Any]]:
        out = []
        for m in self.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else \
                "".join(p.text for p in m.content)
            out.append({"role": m.role, "content": content or ""})
        return out


class RequestError(Exception):
    """A 4xx answer: ``status``, one-line ``message``, the offending field in ``param``."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def sampling_params(req: _Sampling, defaults: dict[str, Any], max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None, seed_offset: int = 0) -> SamplingParams:
    """The request's sampling; a field it leaves out takes the model's default (``defaults``,
    from its ``generation_config.json``), else :class:`SamplingParams`'s."""
    kw: dict[str, Any] = {}
    for name in ("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty", "repeat_last_n"):
        value = getattr(req, name)
        if value is None:
            value = defaults.get(name)
        if value is not None:
            kw[name] = value
    if kw.get("top_k") == -1:           # vLLM's "off"
        kw["top_k"] = 0
    rp = req.repeat_penalty if req.repeat_penalty is not None else req.repetition_penalty
    rp = rp if rp is not None else defaults.get("repeat_penalty")
    if rp is not None:
        kw["repeat_penalty"] = float(rp)
    if req.seed is not None:
        kw["seed"] = req.seed + seed_offset
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        return SamplingParams(max_tokens=max_tokens, stop=tuple(s for s in stop if s), ignore_eos=req.ignore_eos,
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs, **kw)
    except ConfigError as e:
        word = str(e).split(" ", 1)[0]
        param = {"repeat_penalty": "repeat_penalty", "max_tokens": "max_tokens"}.get(word, word)
        raise RequestError(400, str(e), param if param in type(req).model_fields else None) from None
