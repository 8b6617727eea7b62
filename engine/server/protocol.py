"""OpenAI's request bodies as pydantic models, and the error shape every failure is answered in.

Unknown fields are ignored (clients send fields we do not use); known fields are validated here
or by `SamplingParams`, and any failure becomes a 400 naming the field (`param`) and the value.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.sampling_params import SamplingParams, shown


class APIError(Exception):
    """An error to answer as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "BadRequestError",
             413: "BadRequestError", 500: "InternalServerError", 503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "BadRequestError"),
                          "param": self.param, "code": self.status}}

    def response(self) -> Response:
        """As JSON in ASCII (escapes, never a UTF-8 encoder that fails on what a message quotes)."""
        return Response(json.dumps(self.body()), status_code=self.status, media_type="application/json")


MAX_NESTING = 32  # levels of JSON arrays / objects in a body: no field of ours nests past a few


def check_body(value: Any) -> None:
    """Refuse what no field can use: nesting past MAX_NESTING (which the validators' own recursion could
    not survive) and strings (or keys) holding a lone UTF-16 surrogate, which JSON's \\ud800 escapes
    can carry but UTF-8 cannot: no tokenizer or response encoder takes one. Walked with a stack."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise APIError(400, f"{path or 'body'}: a string holds a lone UTF-16 surrogate (not valid "
                                        f"Unicode text)", path or None) from None
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth >= MAX_NESTING:
            field = path.split(".", 1)[0] or None  # the top-level field: the full path is as deep as the nesting
            raise APIError(400, f"{field or 'body'}: nested more than {MAX_NESTING} levels deep", field)
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in reversed(list(pairs)):  # reversed: the first offender is reported first
            where = f"{path}.{key}" if path else str(key)
            stack.append((child, where, depth + 1))
            if isinstance(key, str):
                stack.append((key, where, depth + 1))


# OpenAI fields this engine does not implement, each with the values that ask for nothing: a request
# that sets one otherwise is refused (as vLLM does), since ignoring it would answer another question.
UNSUPPORTED = {
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "logit_bias": lambda v: not v,
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
    "prediction": lambda v: v is None,
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: not v,
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields completions and chat share (OpenAI's, plus vLLM's common extensions)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Extensions vLLM also accepts.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    @model_validator(mode="before")
    @classmethod
    def _check_raw_body(cls, data: Any) -> Any:
        """Raised as APIError, not ValueError: pydantic lets it through, so it keeps its own `param`."""
        check_body(data)
        for name, harmless in UNSUPPORTED.items() if isinstance(data, dict) else ():
            if name in data and not harmless(data[name]):
                raise APIError(400, f"{name} is not supported by this server (got {shown(data[name])}); "
                                    f"leave it out", name)
        return data

    def sampling_params(self, max_tokens: int, logprobs: int | None, vocab_size: int) -> SamplingParams:
        """The engine's settings, checked against the model's vocabulary; an invalid value raises
        APIError(400) naming the field."""
        given: dict[str, Any] = {
            "max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p, "n": self.n,
            "stop": self.stop, "seed": self.seed, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "top_k": self.top_k, "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty, "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos, "stop_token_ids": self.stop_token_ids, "logprobs": logprobs,
        }
        try:
            params = SamplingParams(**{k: v for k, v in given.items() if v is not None})
            params.check_vocab(vocab_size)
            return params
        except ValueError as exc:  # SamplingParams names the field first: "top_p must be in (0, 1], got 2.0"
            raise APIError(400, str(exc), param=str(exc).split(" ", 1)[0]) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict]  # required: without tool calls, a message is its content

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content: str | list[dict]) -> str | list[dict]:
        """Images, audio and files would be dropped unseen: refuse them rather than answer without them."""
        for part in content if isinstance(content, list) else ():
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts ({{'type': 'text', 'text': ...}}) are supported, got "
                                 f"{part.get('type')!r}")
        return content

    def text(self) -> str:
        """Content as text: a string, or its text parts joined."""
        return self.content if isinstance(self.content, str) else "".join(part["text"] for part in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> "ChatRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return self
