"""Logprobs' raw `bytes` of a token that holds part of a UTF-8 character (its text alone is U+FFFD)."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from engine.server.token_bytes import TokenBytes, gpt2_byte_alphabet


def test_gpt2_alphabet_is_a_bijection_over_all_bytes():
    alphabet = gpt2_byte_alphabet()
    assert sorted(alphabet.values()) == list(range(256)) and len(alphabet) == 256
    assert alphabet["a"] == ord("a") and alphabet["Ġ"] == ord(" ")


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (no merges), as a byte-level BPE spells them: "é" is two tokens."""
    vocab = {c: i for i, c in enumerate(gpt2_byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_byte_level_tokens_give_their_own_bytes():
    tokenizer = byte_level_tokenizer()
    ids = tokenizer("né €")["input_ids"]
    token_bytes = TokenBytes(tokenizer)
    parts = [token_bytes(i) for i in ids]
    assert b"".join(parts) == "né €".encode()
    assert b"\xc3" in parts and tokenizer.decode([ids[parts.index(b"\xc3")]]) == "\ufffd"  # the case that lost its bytes


def test_byte_fallback_and_plain_tokens():
    vocab = {"<unk>": 0, "<0xE2>": 1, "hello": 2, "▁world": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    token_bytes = TokenBytes(tokenizer)
    assert token_bytes(1) == b"\xe2"
    assert token_bytes(2) == b"hello"
