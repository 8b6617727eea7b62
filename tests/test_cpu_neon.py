"""The native CPU kernels' aarch64 branch (NEON), cross-compiled and run in an emulator.

On aarch64 the kernels take 4 lanes, 6-row float and 4-row quantised GEMM tiles, no VNNI, a
shift-and-mask byte unpacking where x86 has pshufb, and __fp16 conversions for a float16 cache
(lowrank_cpu.h, gemm.c, elementwise.c): code that no x86 build compiles, and there is no ARM
machine in CI. tests/aarch64_emulator.py builds the kernels for aarch64 with zig's clang (and with
GCC where Debian's cross compiler is installed) and runs them in unicorn's ARM64 emulator. The
comparisons against float64 are those tests/test_cpu_isa.py runs on every x86 level (the quantised
and int8-cache checks are the same functions, their kernel calls redirected to the emulator), plus
RMSNorm, RoPE, the float16 conversions and a whole decoder layer over each cache format. Needs
`ziglang` and `unicorn` (the dev extra); ~5 s per compiler, the build included.
"""

import math
import shutil

import pytest
import torch

import test_cpu_quant
from conftest import dense_attention_ref, shuffled_paged_pools
from engine.model.rope import apply_rope
from kernels import quant
from kernels.cpu import attention as cpu_attention
from kernels.cpu import build as cpu_native
from kernels.cpu.decoder_layer import LayerDescription, LinearDescription, layout_mismatches
from kernels.cpu.gemm import PackedWeight, WeightDescription, pack, pack_quantized

pytest.importorskip("ziglang", reason="no zig cross compiler (pip install ziglang): the aarch64 build is not checked")
pytest.importorskip("unicorn", reason="no ARM64 emulator (pip install unicorn): the aarch64 build is not checked")
from aarch64_emulator import GCC, Machine, build  # noqa: E402  (imports unicorn)


class NeonKernels:
    """kernels.cpu's entry points, with their signatures, computed by the aarch64 build in the emulator
    (every tensor copied in, the result copied out, the threads argument 1: the build has no OpenMP)."""

    def __init__(self, machine: Machine):
        self.m = machine

    def put(self, t: torch.Tensor | None) -> int | None:
        return None if t is None else self.m.put(t)

    def weight(self, packed: PackedWeight) -> WeightDescription:
        return WeightDescription(self.put(packed.data), self.put(packed.scales), packed.bits, packed.group,
                                 packed.activations)

    def packed_linear(self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows, n = x.shape[0], packed.out_features
        y = self.m.alloc(4 * rows * n)
        self.m.lowrank_cpu_linear(x=self.put(x), M=rows, K=packed.in_features, w=self.m.put(self.weight(packed)), N=n,
                                  bias=self.put(bias), y=y, threads=1)
        return self.m.get(y, (rows, n))

    def packed_lowrank(self, x: torch.Tensor, packed_B: PackedWeight, packed_A: PackedWeight,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
        rows, rank, n = x.shape[0], packed_B.out_features, packed_A.out_features
        y = self.m.alloc(4 * rows * n)
        self.m.lowrank_cpu_lowrank(x=self.put(x), M=rows, K=packed_B.in_features, b=self.m.put(self.weight(packed_B)),
                                   R=rank, a=self.m.put(self.weight(packed_A)), N=n, bias=self.put(bias),
                                   scratch=self.m.alloc(4 * rows * rank), y=y, threads=1)
        return self.m.get(y, (rows, n))

    def native_paged_decode(self, q, k_cache, v_cache, block_tables, context_lens, sliding_window=None, scales=None):
        out = self.m.alloc(4 * q.numel())
        k_scales, v_scales = scales or (None, None)
        status = self.m.lowrank_cpu_paged_decode(
            q=self.put(q), k_cache=self.put(k_cache), v_cache=self.put(v_cache),
            cache_bits=cpu_attention.cache_bits(k_cache, v_cache, scales), k_scales=self.put(k_scales),
            v_scales=self.put(v_scales), block_tables=self.put(block_tables.int()), table_stride=block_tables.shape[1],
            context_lens=self.put(context_lens.int()), B=q.shape[0], Hq=q.shape[1], Hkv=k_cache.shape[2],
            D=q.shape[2], block_size=k_cache.shape[1], num_blocks=k_cache.shape[0], window=sliding_window or 0,
            scale=1.0 / math.sqrt(q.shape[2]), out=out, threads=1)
        assert status == 0, f"lowrank_cpu_paged_decode returned {status}"
        return self.m.get(out, tuple(q.shape))


@pytest.fixture(scope="module", params=["clang", "gcc"])
def machine(request, tmp_path_factory):
    """The kernels built by zig's clang, and by GCC (what `cc` is on an ARM Linux host) where it is installed."""
    if request.param == "gcc" and shutil.which(GCC) is None:
        pytest.skip(f"no {GCC} (apt install gcc-aarch64-linux-gnu): only clang's aarch64 build is checked")
    executable, warnings = build(tmp_path_factory.mktemp(f"aarch64-{request.param}"), request.param)
    print(warnings)  # shown with -s: what the compiler says of the aarch64 branch
    return Machine(executable)


@pytest.fixture
def neon(machine, monkeypatch):
    """The emulated aarch64 library standing in for the native one: constants and packing read it
    (cpu_native.library), and the shared x86 checks call it through NeonKernels."""
    machine.reset()
    kernels = NeonKernels(machine)
    monkeypatch.setattr(cpu_native, "library", lambda: machine)
    for name in ("packed_linear", "packed_lowrank"):
        monkeypatch.setattr(test_cpu_quant, name, getattr(kernels, name))
    monkeypatch.setattr(cpu_attention, "native_paged_decode", kernels.native_paged_decode)
    return kernels


def test_the_build_takes_the_neon_branch_and_agrees_on_the_abi(neon):
    assert cpu_native.constant("LANES") == 4 and cpu_native.constant("VNNI") == 0
    assert cpu_native.constant("PANEL") == 16
    assert layout_mismatches() == []  # the ctypes mirrors describe the aarch64 structs too


@pytest.mark.parametrize("rows", [1, 3, 5, 6, 7, 13, 17, 130])  # 6-row tiles, their remainders, two row blocks
def test_gemms_match_float64(neon, rows):
    for out_f, in_f, rank in [(37, 40, 7), (20, 67, 16), (48, 96, 33)]:  # partial panels, K not a multiple of 4
        w, bias = torch.randn(out_f, in_f), torch.randn(out_f)
        A, B = torch.randn(out_f, rank), torch.randn(rank, in_f)
        x = torch.randn(rows, in_f)
        dense = x.double() @ w.double().T + bias.double()
        torch.testing.assert_close(neon.packed_linear(x, pack(w), bias).double(), dense, atol=1e-4, rtol=1e-4)
        low = (x.double() @ B.double().T) @ A.double().T + bias.double()
        got = neon.packed_lowrank(x, pack(B), pack(A), bias).double()
        torch.testing.assert_close(got, low, atol=1e-4 * rank ** 0.5, rtol=1e-4)
        torch.testing.assert_close(neon.packed_linear(x, pack(w)).double(), dense - bias.double(), atol=1e-4,
                                   rtol=1e-4)  # no bias: NULL


@pytest.mark.parametrize("bits,group", [(8, 32), (8, 64), (4, 32), (4, 2), (8, 6)])  # (8, 6): groups end in words
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16, 17, 130])  # 4-row tiles, their remainders, two row blocks
def test_quantized_gemms_match_float64(neon, rows, bits, group):
    test_cpu_quant.check_quantized_gemms(rows, bits, group)


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 32)])
def test_int8_activation_weights_take_the_float_path(neon, bits, group):
    test_cpu_quant.check_int8_activation_gemms(13, bits, group)  # no VNNI: the float32 product


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("window", [None, 7])
def test_decode_attention_matches_float64(neon, window, dtype):
    lengths, hkv, group, head_dim = [1, 33, 70, 16], 2, 3, 32
    pools, tables = shuffled_paged_pools(lengths, [(hkv, head_dim)] * 2, "cpu", 16)
    k_cache, v_cache = (pool.to(dtype) for pool in pools)
    q = torch.randn(len(lengths), hkv * group, head_dim)
    ks = [k_cache[tables[i].long()].flatten(0, 1)[:n] for i, n in enumerate(lengths)]
    vs = [v_cache[tables[i].long()].flatten(0, 1)[:n] for i, n in enumerate(lengths)]
    got = neon.native_paged_decode(q, k_cache, v_cache, tables, torch.tensor(lengths), window)
    torch.testing.assert_close(got.double(), dense_attention_ref(q, ks, vs, [1] * len(lengths), window),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 7])
def test_int8_cache_decode_attention_matches_float64(neon, window):
    from test_kv_int8 import check_native_int8_decode

    check_native_int8_decode([1, 33, 70, 16], 3, 32, 16, window)


def _rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """float64 RMSNorm of x (float64), as engine.model.layers.RMSNorm computes it."""
    return w.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("tokens,channels", [(1, 8), (3, 70), (5, 576)])
def test_rms_norm_matches_float64(neon, tokens, channels):
    x, w = 3 * torch.randn(tokens, channels), torch.randn(channels)
    y = neon.m.alloc(4 * x.numel())
    neon.m.lowrank_cpu_rmsnorm(x=neon.put(x), w=neon.put(w), T=tokens, C=channels, eps=1e-5, y=y, threads=1)
    torch.testing.assert_close(neon.m.get(y, x.shape).double(), _rms_norm_ref(x.double(), w, 1e-5), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("tokens,heads,dim", [(1, 1, 2), (3, 2, 36), (5, 3, 64)])
def test_rope_matches_float64(neon, tokens, heads, dim):
    x = torch.randn(tokens, heads, dim)
    angles = torch.randn(tokens, dim // 2).repeat(1, 2) * 10
    cos, sin = angles.cos(), angles.sin()
    y = neon.m.alloc(4 * x.numel())
    neon.m.lowrank_cpu_rope(x=neon.put(x), cos_table=neon.put(cos), sin_table=neon.put(sin), T=tokens, H=heads,
                            D=dim, y=y, threads=1)
    torch.testing.assert_close(neon.m.get(y, x.shape).double(), apply_rope(x.double(), cos.double(), sin.double()),
                               atol=1e-5, rtol=1e-5)


# The decoder layer's projections, every format the kernel reads: (bits,) dense, (bits of B, bits of A) factorised
FORMATS = {"q": (32,), "k": (32, 32), "v": (8,), "o": (4,), "gate": (8, 4), "up": (32,), "down": (32, 32)}
BIASED = ("q", "k", "v", "down")


def _weight(neon: NeonKernels, w: torch.Tensor, bits: int) -> tuple[WeightDescription, torch.Tensor]:
    """w [out, in] packed as `bits` on the heap -> (its description, the float64 weight the kernel must reproduce)."""
    if bits == 32:
        return neon.weight(pack(w)), w.double()
    qw = quant.quantize(w, bits, 16)
    return neon.weight(pack_quantized(qw)), quant.dequantize(qw, torch.float64)


def _projection(neon: NeonKernels, out_f: int, in_f: int, name: str, rank: int = 8):
    """A random projection in FORMATS[name] -> (its LinearDescription, float64 weight [out, in], bias or None)."""
    bias = torch.randn(out_f) if name in BIASED else None
    if len(FORMATS[name]) == 1:
        weight, w = _weight(neon, torch.randn(out_f, in_f) / in_f ** 0.5, *FORMATS[name])
        return LinearDescription(weight, WeightDescription(), WeightDescription(), neon.put(bias), 0), w, bias
    (down, B), (up, A) = (_weight(neon, torch.randn(rows, cols) / cols ** 0.5, bits)
                          for (rows, cols), bits in zip([(rank, in_f), (out_f, rank)], FORMATS[name]))
    return LinearDescription(WeightDescription(), down, up, neon.put(bias), rank), A @ B, bias


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8], ids=["float32", "float16", "int8"])
@pytest.mark.parametrize("window", [None, 5])
def test_decoder_layer_matches_float64(neon, window, cache_dtype):
    from test_kv_int8 import int8_pools

    C, I, Hq, Hkv, D, block_size, eps, m = 64, 96, 4, 2, 16, 4, 1e-5, neon.m
    lengths = [1, 10, 33, 16]  # tokens per sequence, the new one included: it lands at a block's start or inside
    T = len(lengths)
    shapes = {"q": (Hq * D, C), "k": (Hkv * D, C), "v": (Hkv * D, C), "o": (C, Hq * D), "gate": (I, C),
              "up": (I, C), "down": (C, I)}
    projections = {name: _projection(neon, *shapes[name], name) for name in shapes}
    norms = [1 + 0.1 * torch.randn(C) for _ in range(2)]
    layer = LayerDescription(*(projections[name][0] for name in shapes), neon.put(norms[0]), neon.put(norms[1]), eps,
                             C, I, Hq, Hkv, D, window or 0)
    pools, tables = shuffled_paged_pools(lengths, [(Hkv, D)] * 2, "cpu", block_size)
    caches = (int8_pools(pools) if cache_dtype == torch.int8  # (levels or floats, scales or None) each
              else [(pool.to(cache_dtype), None) for pool in pools])
    slots = torch.tensor([int(tables[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size
                          for i, n in enumerate(lengths)])
    cos, sin = (f(torch.randn(T, D // 2).repeat(1, 2) * 10) for f in (torch.cos, torch.sin))
    x = torch.randn(T, C)
    (k_at, k_scales_at), (v_at, v_scales_at) = at = [(m.put(cache), neon.put(scales)) for cache, scales in caches]
    status = m.lowrank_cpu_decoder_layer(
        L=m.put(layer), x=(x_at := m.put(x)), T=T, cos_table=m.put(cos), sin_table=m.put(sin), slots=m.put(slots),
        k_cache=k_at, v_cache=v_at, cache_bits=cpu_attention.CACHE_BITS[cache_dtype], k_scales=k_scales_at,
        v_scales=v_scales_at, num_blocks=pools[0].shape[0], block_size=block_size, block_tables=m.put(tables),
        table_stride=tables.shape[1], context_lens=m.put(torch.tensor(lengths).int()), threads=1)
    assert status == 0, f"lowrank_cpu_decoder_layer returned {status}"

    def project(name: str, h: torch.Tensor) -> torch.Tensor:
        _, w, bias = projections[name]
        return h @ w.T + (0 if bias is None else bias.double())

    h = _rms_norm_ref(x.double(), norms[0], eps)
    q = apply_rope(project("q", h).view(T, Hq, D), cos.double(), sin.double())
    new = {"k": apply_rope(project("k", h).view(T, Hkv, D), cos.double(), sin.double()),
           "v": project("v", h).view(T, Hkv, D)}
    seen = []  # each cache as the kernel left it, float64 [slots, Hkv, D]
    for (cache, scales), (cache_at, scales_at), want in zip(caches, at, new.values()):
        got_cache = m.get(cache_at, tuple(cache.shape), cache.dtype).flatten(0, 1)
        kept = torch.ones(got_cache.shape[0], dtype=torch.bool)
        kept[slots] = False  # every other slot unchanged, NaN included
        torch.testing.assert_close(got_cache[kept], cache.flatten(0, 1)[kept], atol=0, rtol=0, equal_nan=True)
        if scales is None:
            seen.append(got_cache.double())
            rtol = 1e-5 if cache_dtype == torch.float32 else 2 ** -11  # float16: rounded to nearest
            torch.testing.assert_close(seen[-1][slots], want, atol=1e-5, rtol=rtol)
        else:
            got_scales = m.get(scales_at, tuple(scales.shape)).flatten(0, 1)
            torch.testing.assert_close(got_scales[kept], scales.flatten(0, 1)[kept], atol=0, rtol=0, equal_nan=True)
            seen.append(got_cache.double() * got_scales.double().unsqueeze(-1))
            step = got_scales[slots].double().unsqueeze(-1)  # rounded to the nearest level: within half a step
            assert ((seen[-1][slots] - want).abs() <= 0.5 * step + 1e-5).all()
    blocks = [tables[i, :-(-n // block_size)].long() for i, n in enumerate(lengths)]
    keys, values = ([cache.view(-1, block_size, Hkv, D)[b].flatten(0, 1)[:n] for b, n in zip(blocks, lengths)]
                    for cache in seen)
    x1 = x.double() + project("o", dense_attention_ref(q, keys, values, [1] * T, window).reshape(T, -1))
    h = _rms_norm_ref(x1, norms[1], eps)
    want = x1 + project("down", torch.nn.functional.silu(project("gate", h)) * project("up", h))
    torch.testing.assert_close(m.get(x_at, (T, C)).double(), want, atol=1e-4, rtol=1e-4)


def test_float16_conversions_match_torch(neon):
    """aarch64 converts through __fp16 (fcvt): every float16 widened, and every halfway case between
    two float16 values (ties to even), subnormals, overflow, infinities and NaN narrowed, as torch does."""
    m = neon.m
    halves = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    widened = m.alloc(4 * halves.numel())
    m.lowrank_cpu_half_to_float(h=m.put(halves), n=halves.numel(), f=widened)
    got = m.get(widened, tuple(halves.shape))
    torch.testing.assert_close(got, halves.float(), atol=0, rtol=0, equal_nan=True)

    finite = halves[halves.isfinite()].double().unique()  # sorted
    floats = torch.cat([finite, (finite[1:] + finite[:-1]) / 2, 3 * torch.randn(1000, dtype=torch.float64),
                        torch.tensor([65504.0, 65519.99, 65520.0, 1e6, 2.0 ** -25, 2.0 ** -26, 1e-30, -0.0,
                                      float("inf"), float("-inf"), float("nan")], dtype=torch.float64)]).float()
    narrowed = m.alloc(2 * floats.numel())
    m.lowrank_cpu_float_to_half(f=m.put(floats), n=floats.numel(), h=narrowed)
    got = m.get(narrowed, tuple(floats.shape), torch.float16)
    want = floats.to(torch.float16)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~want.isnan()].view(torch.int16), want[~want.isnan()].view(torch.int16))  # -0.0 too
