"""The native CPU kernels built for other x86 vector extensions than this CPU's widest, checked here.

The kernels take their vector width and GEMM tile heights from the compiler's target (lowrank_cpu.h,
gemm.c: 16 lanes and 16-row tiles with AVX-512, 8 and 6 with AVX2 (4 for int8 / int4 weights), 4
and 3 with SSE (2)), and their integer products from VNNI where it is there (AVX-512 VNNI, 12-row
tiles; AVX-VNNI, 2-row). `-march=native` builds only this CPU's branch, so CI would never run the
others: this suite builds the library again for each level the CPU can execute and runs the same
comparisons through it.
"""

import os
import platform
import shutil

import pytest
import torch

from conftest import dense_attention_ref, shuffled_paged_pools
from kernels.cpu import build as cpu_native
from kernels.cpu.attention import native_paged_decode
from kernels.cpu.gemm import pack, packed_linear, packed_lowrank

pytestmark = [pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 vector extensions"),
              pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler"),
              pytest.mark.skipif(os.environ.get(cpu_native.DISABLE_ENV) == "0",
                                 reason=f"{cpu_native.DISABLE_ENV}=0 turns the native kernels off")]

LEVELS = {  # name -> (the compiler's target flags, the CPU flags it needs to run)
    "x86-64": (("-march=x86-64",), set()),  # SSE2: 4 lanes, 3-row tiles
    "x86-64-v3": (("-march=x86-64-v3",), {"avx2", "fma"}),  # 8 lanes, 6-row tiles
    "x86-64-v3+avxvnni": (("-march=x86-64-v3", "-mavxvnni"), {"avx2", "fma", "avx_vnni"}),  # + 2-row VNNI tiles
    "x86-64-v4": (("-march=x86-64-v4",), {"avx512f", "avx512bw", "avx512vl", "avx512dq"}),  # 16 lanes, 16-row
    # and 8 x 2-panel tiles
    "x86-64-v4+vnni": (("-march=x86-64-v4", "-mavx512vnni"),
                       {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}),  # + 12-row VNNI tiles
}
_built: dict[str, object] = {}


@pytest.fixture(params=LEVELS)
def isa(request, monkeypatch, tmp_path_factory):
    """The kernel library built for one -march level, standing in for the native build."""
    march = request.param
    target, needed = LEVELS[march]
    missing = needed - set(cpu_native._cpu_flags().split())
    if missing:
        pytest.skip(f"this CPU cannot run {march} code (no {', '.join(sorted(missing))})")
    if march not in _built:
        monkeypatch.setattr(cpu_native, "FLAGS", tuple(g for f in cpu_native.FLAGS
                                                       for g in (target if f == "-march=native" else (f,))))
        try:
            _built[march] = cpu_native.load(cpu_native.build(directory=tmp_path_factory.mktemp(march)))
        except cpu_native.BuildError as e:
            pytest.skip(f"this compiler cannot build for {march}: {e}")
    monkeypatch.setattr(cpu_native, "library", lambda: _built[march])
    return march


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 7, 16, 17, 40, 130])
def test_gemms_match_float64(isa, rows):
    for out_f, in_f, rank in [(96, 40, 7), (37, 131, 16), (200, 64, 33)]:
        w, bias = torch.randn(out_f, in_f), torch.randn(out_f)
        A, B = torch.randn(out_f, rank), torch.randn(rank, in_f)
        x = torch.randn(rows, in_f)
        dense = (x.double() @ w.double().T) + bias.double()
        torch.testing.assert_close(packed_linear(x, pack(w, "native"), bias).double(), dense, atol=1e-4, rtol=1e-4)
        low = (x.double() @ B.double().T) @ A.double().T + bias.double()
        got = packed_lowrank(x, pack(B, "native"), pack(A, "native"), bias).double()
        torch.testing.assert_close(got, low, atol=1e-4 * rank ** 0.5, rtol=1e-4)


@pytest.mark.parametrize("bits,group", [(8, 32), (4, 32), (4, 2)])
@pytest.mark.parametrize("rows", [1, 3, 5, 16, 17, 130])
def test_quantized_gemms_match_float64(isa, rows, bits, group):
    from test_cpu_quant import check_quantized_gemms

    check_quantized_gemms(rows, bits, group)


@pytest.mark.parametrize("window", [None, 7])
def test_decode_attention_matches_float64(isa, window):
    lengths, hkv, group, head_dim = [1, 33, 70, 16], 2, 3, 32
    (k_cache, v_cache), tables = shuffled_paged_pools(lengths, [(hkv, head_dim)] * 2, "cpu", 16)
    q = torch.randn(len(lengths), hkv * group, head_dim)
    ks = [k_cache[tables[i].long()].flatten(0, 1)[:n] for i, n in enumerate(lengths)]
    vs = [v_cache[tables[i].long()].flatten(0, 1)[:n] for i, n in enumerate(lengths)]
    got = native_paged_decode(q, k_cache, v_cache, tables, torch.tensor(lengths, dtype=torch.int32), window)
    want = dense_attention_ref(q, ks, vs, [1] * len(lengths), window)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 32)])
@pytest.mark.parametrize("rows", [4, 5, 13, 130])
def test_int8_activation_gemms_match_float64(isa, rows, bits, group):
    from test_cpu_quant import check_int8_activation_gemms

    assert bool(cpu_native.constant("VNNI")) == isa.endswith("vnni")  # the build took the branch it names
    check_int8_activation_gemms(rows, bits, group)


@pytest.mark.parametrize("window", [None, 7])
def test_int8_cache_decode_attention_matches_float64(isa, window):
    from test_kv_int8 import check_native_int8_decode

    check_native_int8_decode([1, 33, 70, 16], 3, 32, 16, window)


def test_float16_conversions_round_as_torch_does(isa):
    from test_kv_float16 import check_native_conversions

    check_native_conversions()  # F16C / AVX-512F instructions, or the SSE2 build's bit manipulation


@pytest.mark.parametrize("window", [None, 7])
def test_float16_cache_decode_attention_matches_float64(isa, window):
    from test_kv_float16 import check_native_float16_decode

    check_native_float16_decode([1, 33, 70, 16], 3, 32, 16, window)


def test_native_decoder_layer_matches_the_per_operation_path(isa, tmp_path):
    from test_cpu_decoder import _decode_batch, _model, _run_both

    model = _model("qwen2-bias", tmp_path, 0.5)
    (got, got_caches), (want, want_caches) = _run_both(model, *_decode_batch(model, [7, 1, 33, 16, 17], 4))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    for got_cache, want_cache in zip(got_caches, want_caches):
        torch.testing.assert_close(got_cache, want_cache, atol=2e-5, rtol=2e-5, equal_nan=True)
