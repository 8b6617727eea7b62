"""A token's raw bytes, for OpenAI's logprobs `bytes` field: what the token adds to the UTF-8 output.

Decoding a token alone gives U+FFFD when it holds part of a multi-byte character, so the bytes come
from the vocabulary: a byte-level BPE token (GPT-2, Llama 3, SmolLM2, Qwen2) spells its bytes in
GPT-2's byte-to-character alphabet, and a SentencePiece byte-fallback token is `<0xNN>`. Any other
token's bytes are its decoded text's UTF-8.
"""

from __future__ import annotations

import json
import re

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable bytes stand for themselves, the rest for 256 + i."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenBytes:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.alphabet = gpt2_byte_alphabet() if _is_byte_level(tokenizer) else None

    def __call__(self, token_id: int) -> bytes:
        token = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(token, str):
            if self.alphabet is not None and all(c in self.alphabet for c in token):
                return bytes(self.alphabet[c] for c in token)
            if match := _BYTE_FALLBACK.fullmatch(token):
                return bytes([int(match.group(1), 16)])
        return self.tokenizer.decode([token_id]).encode()


def _is_byte_level(tokenizer) -> bool:
    """Whether the fast tokenizer's decoder maps tokens back through the byte-level alphabet."""
    try:
        decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder")
    except (AttributeError, ValueError):
        return False
    return "ByteLevel" in json.dumps(decoder)
