"""The low-rank GEMM kernel against its float64 reference (under TRITON_INTERPRET=1 on CPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels.lowrank_gemm import LowRankGEMM, lowrank_gemm_ref, lowrank_gemm_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (dtype, atol, rtol) for outputs of magnitude ~1; the 16-bit rows cover rounding t and y.
TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 1e-2, 1e-2),
    (torch.bfloat16, 5e-2, 2e-2),
]


def _ratio_rank(out_features: int, in_features: int, ratio: float = 0.4) -> int:
    """The rank that removes `ratio` of a dense out×in layer's parameters."""
    return int((1 - ratio) * out_features * in_features / (out_features + in_features))


# (in, out, r): odd and prime sizes, then production layers at ratio 0.4.
SHAPES = {
    "tiny-prime": (37, 53, 19),
    "odd": (97, 131, 61),
    "split-k": (1031, 67, 33),  # `in` long enough for the shrink to split it
    "smollm2-q": (576, 576, _ratio_rank(576, 576)),
    "smollm2-k": (576, 192, _ratio_rank(192, 576)),
    "smollm2-down": (1536, 576, _ratio_rank(576, 1536)),
    # Llama-3-8B gate (4096 -> 14336) and Qwen2-7B k (3584 -> 512, biased), shrunk 8x for the interpreter.
    "llama3-8b-gate/8": (512, 1792, _ratio_rank(1792, 512)),
    "qwen2-7b-k/8": (448, 64, _ratio_rank(64, 448)),
}


def _inputs(m: int, shape: tuple[int, int, int], dtype=torch.float32, bias=True, scale=True, leading=()):
    in_f, out_f, r = shape
    x = torch.randn(*leading, m, in_f, device=DEVICE)
    A = torch.randn(out_f, r, device=DEVICE) / r**0.5
    B = torch.randn(r, in_f, device=DEVICE) / in_f**0.5
    b = torch.randn(out_f, device=DEVICE) if bias else None
    s = torch.rand(r, device=DEVICE) * 2 if scale else None  # fp32, as SoCo's mask
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(A), cast(B), cast(b), s


def _expected(x, A, B, bias, scale, rank):
    """The reference in float64, cast to the inputs' dtype."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return lowrank_gemm_ref(d(x), d(A), d(B), d(bias), d(scale), rank).to(x.dtype)


@pytest.mark.parametrize("m", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference_over_shapes(m, shape):
    x, A, B, bias, scale = _inputs(m, shape)
    rank = shape[2] - 5  # serve a smaller model from the same tensors
    torch.testing.assert_close(lowrank_gemm_triton(x, A, B, bias, scale, rank), _expected(x, A, B, bias, scale, rank),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("bias, scale", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("m", [1, 17])
def test_matches_reference_over_dtypes(dtype, atol, rtol, bias, scale, m):
    x, A, B, b, s = _inputs(m, SHAPES["smollm2-down"], dtype, bias, scale)
    torch.testing.assert_close(lowrank_gemm_triton(x, A, B, b, s), _expected(x, A, B, b, s, None), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_non_contiguous_inputs_and_leading_dims(dtype, atol, rtol):
    in_f, out_f, r = SHAPES["odd"]
    wide = torch.randn(2, 5, 2 * in_f, device=DEVICE).to(dtype)
    x = wide[..., ::2]  # (2, 5, in) with a stride-2 last dim
    A = torch.randn(r, out_f, device=DEVICE).to(dtype).T / r**0.5  # column-major A
    B = torch.randn(in_f, r, device=DEVICE).to(dtype).T / in_f**0.5  # column-major B
    assert not (x.is_contiguous() or A.is_contiguous() or B.is_contiguous())
    y = lowrank_gemm_triton(x, A, B, rank=r - 1)
    assert y.shape == (2, 5, out_f)
    torch.testing.assert_close(y, _expected(x, A, B, None, None, r - 1), atol=atol, rtol=rtol)


@pytest.mark.parametrize("rank", [0, 1, 16, 61])
def test_rank_limit_uses_exactly_the_leading_components(rank):
    x, A, B, bias, scale = _inputs(5, SHAPES["odd"])
    y = lowrank_gemm_triton(x, A, B, bias, scale, rank)
    smaller = lowrank_gemm_ref(x.double(), A[:, :rank].double(), B[:rank].double(), bias.double(),
                               scale[:rank].double())
    torch.testing.assert_close(y, smaller.float(), atol=1e-5, rtol=1e-5)


def test_empty_batch():
    x, A, B, bias, _ = _inputs(0, SHAPES["tiny-prime"])
    assert lowrank_gemm_triton(x, A, B, bias).shape == (0, SHAPES["tiny-prime"][1])


@pytest.mark.slow
def test_real_llama3_8b_down_proj_decode():
    """One production layer at its real size: Llama-3-8B down_proj (14336 -> 4096) at ratio 0.4."""
    shape = (14336, 4096, _ratio_rank(4096, 14336))
    x, A, B, bias, scale = _inputs(1, shape, bias=False)
    torch.testing.assert_close(lowrank_gemm_triton(x, A, B, None, scale), _expected(x, A, B, None, scale, None),
                               atol=1e-4, rtol=1e-4)


def test_backward_formula_passes_gradcheck_in_float64():
    """The hand-written backward (on torch products) against finite differences, every input."""
    in_f, out_f, r = 7, 5, 4
    leaf = lambda *shape: torch.randn(*shape, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, A, B, bias = leaf(2, 3, in_f), leaf(out_f, r), leaf(r, in_f), leaf(out_f)
    scale = (torch.rand(r, dtype=torch.float64) + 0.5).requires_grad_()
    for rank in (r, r - 1):
        assert torch.autograd.gradcheck(lambda *t: LowRankGEMM.apply(*t, rank, False), (x, A, B, bias, scale))
        assert torch.autograd.gradcheck(lambda x, A, B: LowRankGEMM.apply(x, A, B, None, None, rank, False),
                                        (x, A, B))


@pytest.mark.parametrize("rank", [None, 40])
@pytest.mark.parametrize("trained", ["x+scale", "factors", "all"])
def test_kernel_gradients_match_the_reference(rank, trained):
    """What SoCo trains (x, the scale) and what healing trains (A, B, bias): the kernels' backward
    equals torch autograd through the reference."""
    x, A, B, bias, scale = _inputs(9, SHAPES["smollm2-k"], leading=(2,))
    names = {"x+scale": (0, 4), "factors": (1, 2, 3), "all": (0, 1, 2, 3, 4)}[trained]
    grads = []
    for op in (lowrank_gemm_triton, lowrank_gemm_ref):
        inputs = [t.clone().requires_grad_(i in names) for i, t in enumerate((x, A, B, bias, scale))]
        y = op(*inputs, rank)
        (y * torch.linspace(-1, 1, y.shape[-1], device=DEVICE)).sum().backward()
        grads.append([inputs[i].grad for i in names])
    for i, got, want in zip(names, *grads):
        torch.testing.assert_close(got, want, atol=1e-3 if i == 4 else 1e-4, rtol=1e-4)
    if rank is not None:  # components past the limit take no part
        by_name = dict(zip(names, grads[0]))
        if 4 in by_name:
            assert torch.all(by_name[4][rank:] == 0)
        if 1 in by_name:
            assert torch.all(by_name[1][:, rank:] == 0) and torch.all(by_name[2][rank:] == 0)


@pytest.mark.parametrize("build, message", [
    (lambda x, A, B: (x[:, :-1], A, B), "must be [..., in]"),
    (lambda x, A, B: (x, A[:, :-1], B), "A must be [out, r] and B [r, in]"),
    (lambda x, A, B: (x, A.half(), B), "share one floating dtype"),
    (lambda x, A, B: (x.double(), A.double(), B.double()), "the Triton kernel takes"),
    (lambda x, A, B: (x.to("meta"), A, B), "different devices"),
])
def test_bad_inputs_name_the_problem(build, message):
    x, A, B, _, _ = _inputs(2, SHAPES["tiny-prime"], bias=False, scale=False)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        lowrank_gemm_triton(*build(x, A, B))


def test_bad_rank_and_scale_are_refused():
    x, A, B, bias, scale = _inputs(2, SHAPES["tiny-prime"])
    with pytest.raises(ValueError, match="rank must be in"):
        lowrank_gemm_triton(x, A, B, bias, scale, rank=A.shape[1] + 1)
    with pytest.raises(ValueError, match="scale must be"):
        lowrank_gemm_triton(x, A, B, bias, scale[:3])


def test_dispatch_runs_the_kernel_here():
    """CI interprets Triton on CPU, so the engine's calls reach the kernel, not the reference."""
    backend = kernels.backend_for(DEVICE)
    assert backend.name == "triton"
    assert backend.runs_gemm(torch.ones(1, device=DEVICE))
    assert not backend.runs_gemm(torch.ones(1, dtype=torch.float64))  # no float64 kernel: the reference


def _backend_in_fresh_process(env_value: str, interpret: str = "0") -> subprocess.CompletedProcess:
    code = ("import torch, kernels; b = kernels.backend_for('cpu'); "
            "print(kernels.BACKEND, b.name, b.runs_gemm(torch.ones(1)), b.cpu_serving)")
    env = os.environ | {"LOWRANK_KERNELS": env_value, "TRITON_INTERPRET": interpret}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("value, interpret, expected", [
    ("auto", "0", "auto native False True"),  # CPU: the native kernels serve, the trainers' GEMM is the reference
    ("auto", "1", "auto native False True"),  # the interpreter alone does not choose the Triton path
    ("torch", "1", "torch torch False False"),  # the debugging override: plain modules, no kernel at all
    ("triton", "1", "triton triton True False"),
])
def test_backend_is_chosen_once_from_the_environment(value, interpret, expected):
    result = _backend_in_fresh_process(value, interpret)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error():
    result = _backend_in_fresh_process("triton", "0")
    assert result.returncode != 0 and "LOWRANK_KERNELS=triton on cpu needs TRITON_INTERPRET=1" in result.stderr


def test_unknown_backend_is_a_clear_error():
    result = _backend_in_fresh_process("cuda")
    assert result.returncode != 0 and "LOWRANK_KERNELS='cuda'" in result.stderr
