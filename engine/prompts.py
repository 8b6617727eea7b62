"""What a prompt may be, checked in one place for `LLM` and the server: token ids inside the
vocabulary, at least one token, room left for the completion, and conversations rendered through
the model's chat template. A `PromptError` names the request field at fault, which the server
turns into OpenAI's 400 body."""

from __future__ import annotations


class PromptError(ValueError):
    """A prompt the engine cannot take; `param` is the request field it came from."""

    def __init__(self, message: str, param: str = "prompt"):
        super().__init__(message)
        self.param = param


def check_token_ids(ids: list[int], vocab_size: int, param: str = "prompt") -> None:
    """Every id in [0, vocab_size): checked before anything decodes them."""
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise PromptError(f"prompt token ids must be in [0, {vocab_size}), got {bad[:5]}", param)


def completion_room(num_prompt_tokens: int, max_model_len: int, max_tokens: int | None = None,
                    param: str = "prompt") -> int:
    """The completion's token budget: `max_tokens`, or all the room the context leaves when None.
    An empty prompt, or one that leaves no room for `max_tokens` (at least one), is a PromptError
    quoting the lengths."""
    if num_prompt_tokens == 0:
        raise PromptError("the prompt is empty: at least one token is needed", param)
    room = max_model_len - num_prompt_tokens
    if max_tokens is None:
        max_tokens = room
    if room < 1 or max_tokens > room:
        wanted = max(max_tokens, 1)
        raise PromptError(f"This model's maximum context length is {max_model_len} tokens (max_model_len). However, "
                          f"you requested {num_prompt_tokens + wanted} tokens ({num_prompt_tokens} in the prompt, "
                          f"{wanted} for the completion). Reduce the prompt or max_tokens.", param)
    return max_tokens


def render_chat(tokenizer, conversation: list[dict], instead: str, param: str = "messages") -> str:
    """The conversation as the model's chat template writes it, ready for the assistant's turn.
    `instead` says what to use when the model has no template."""
    if tokenizer.chat_template is None:
        raise PromptError(f"this model has no chat template: {instead}", param)
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # templates raise_exception() on what they refuse (roles out of order, ...)
        raise PromptError(f"the model's chat template refuses these messages: {exc}", param) from None
