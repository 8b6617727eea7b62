"""glibc's malloc settings for CPU serving (engine.core.cpu_memory): a freed large tensor's memory is reused."""

import platform
import resource

import pytest
import torch

from engine.core.cpu_memory import keep_freed_memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


def _page_faults_of(make, rounds: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        make()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc
def test_a_freed_large_tensor_is_reused_without_fresh_pages():
    assert keep_freed_memory()
    size = 6 << 20  # a prefill activation of SmolLM2's MLP at batch 16: above glibc's default mmap threshold

    def make():
        torch.empty(size // 4).fill_(1.0)  # touch every page, then free

    make(), make()  # the heap grows to hold it
    pages = size // resource.getpagesize()
    # glibc by default faults ~7x `pages` here (fresh pages most rounds); a reused heap at most one regrowth
    assert _page_faults_of(make, 10) <= 2 * pages


@glibc
def test_the_engine_sets_it_up_on_cpu(tmp_path, cpu_kernels):
    from transformers import LlamaConfig

    from conftest import save_tiny_model, save_tiny_tokenizer
    from engine import LLM

    keep_freed_memory.cache_clear()
    save_tiny_model(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1), tmp_path)
    save_tiny_tokenizer(tmp_path, 50)
    LLM(tmp_path, dtype=torch.float32, device="cpu", kv_cache_memory=1 << 20)
    assert keep_freed_memory.cache_info().currsize == 1  # called by the runner
