"""`lowrank quantize` and `compress --bits`: int8 / int4 folders from tiny random models, loaded and
served against references built from the dequantised weights (transformers' model in float64)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from conftest import save_tiny_model, save_tiny_tokenizer
from converters.calibrate import tokenize_file
from converters.cli import main
from converters.compress import CompressConfig, compress
from converters.lorc import LoRCConfig, lorc
from converters.quantize import QuantConfig, quantize_folder
from engine import LLM, SamplingParams, load_model
from engine.model.checkpoint import read_manifest
from engine.model.loader import load_tokenizer
from engine.model.cpu_serving import NativeDecoderLayer, decode_weight_bytes, to_cpu_serving
from engine.model.layers import QuantEmbedding, QuantLinear, QuantLowRankLinear
from kernels.cpu import build as cpu_native
from kernels.quant import Quantized, column_prefix, dequantize, quantize, row_prefix

VOCAB = 101
CONFIGS = {  # widths 64 / 96 / 128: groups of 32 divide all of them, 64 not 96
    "llama-gqa": LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                             bos_token_id=None, eos_token_id=None),
    "qwen2-bias": Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                              bos_token_id=None, eos_token_id=None),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Per config: a dense folder, a calibration text, and its svd-llm compression at 0.3."""
    root = tmp_path_factory.mktemp("quantize")
    text = root / "calib.txt"
    generator = torch.Generator().manual_seed(7)
    text.write_text(" ".join(f"t{i}" for i in torch.randint(2, VOCAB, (6000,), generator=generator).tolist()))
    made = {}
    for name, config in CONFIGS.items():
        dense = root / name / "dense"
        save_tiny_model(config, dense)
        save_tiny_tokenizer(dense, VOCAB)
        compressed = root / name / "svd-llm"
        compress(dense, compressed, CompressConfig(ratio=0.3, method="svd-llm", calib=str(text), samples=8, seq_len=64))
        made[name] = dense, compressed
    return text, made


def _reference(dense, matrices: dict[str, torch.Tensor]):
    """transformers' model of the dense folder in float64, each decoder linear's weight replaced."""
    model = AutoModelForCausalLM.from_pretrained(dense, torch_dtype=torch.float64).eval()
    with torch.no_grad():
        for name, weight in matrices.items():
            model.get_submodule(name).weight.copy_(weight)
    return model


def _stored(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _dequantized_matrices(quantized_folder, ranks: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Every decoder linear's [out, in] matrix as the float64 product of its dequantised stored
    matrices, factors cut to `ranks` by the format's prefix rule (kernels.quant)."""
    manifest, tensors = read_manifest(quantized_folder), _stored(quantized_folder)
    out = {}
    for name, m in manifest["modules"].items():
        def stored(leaf, cols):
            return Quantized(tensors[f"{name}.{leaf}_q"], tensors[f"{name}.{leaf}_scales"], m["bits"], m["group"], cols)
        if not m["factorized"]:
            out[name] = dequantize(stored("weight", m["shape"][1]), torch.float64)
            continue
        rank = (ranks or {}).get(name, m["rank"])
        A = column_prefix(stored("A", m["rank"]), rank)
        B = row_prefix(stored("B", m["shape"][1]), rank)
        out[name] = dequantize(A, torch.float64) @ dequantize(B, torch.float64)
    if head := manifest["quantization"]["head"]:
        name = head["module"]
        out[name] = dequantize(Quantized(tensors[f"{name}.weight_q"], tensors[f"{name}.weight_scales"], 8,
                                         head["group"], tensors[f"{name}.weight_scales"].shape[1] * head["group"]),
                               torch.float64)
    return out


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("bits", [8, 4])
def test_dense_folder_logits_equal_the_dequantised_reference(folders, tmp_path, config, bits):
    _, made = folders
    dense, _ = made[config]
    manifest = quantize_folder(dense, tmp_path / "q", QuantConfig(bits=bits, group=32, rounding="rtn"))
    recorded = manifest["quantization"]
    assert (recorded["bits"], recorded["group"], recorded["rounding"], recorded["scales"]) == (bits, 32, "rtn", "float32")
    assert manifest["quantization"]["bytes"]["after"] < manifest["quantization"]["bytes"]["before"]
    model = load_model(tmp_path / "q", device="cpu", dtype="float32")
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 7 * CONFIGS[config].num_hidden_layers + 1  # and the head, int8
    assert model.lm_head.bits == 8
    tied = CONFIGS[config].tie_word_embeddings
    assert isinstance(model.model.embed_tokens, QuantEmbedding) == tied  # a tied table is the head
    assert all(m.weight_q.dtype == (torch.int8 if bits == 8 else torch.uint8) for m in quantized if m is not model.lm_head)
    # the stored levels are the format's, from the dense weights
    tensors, source = _stored(tmp_path / "q"), _stored(dense)
    name = "model.layers.1.mlp.down_proj"
    expected = quantize(source[f"{name}.weight"], bits, 32)
    assert torch.equal(tensors[f"{name}.weight_q"], expected.q)
    assert torch.equal(tensors[f"{name}.weight_scales"], expected.scales)
    reference = _reference(dense, _dequantized_matrices(tmp_path / "q"))
    ids = torch.randint(0, VOCAB, (1, 24))
    with torch.no_grad():
        expected_logits = reference(ids).logits[0]
        ours = model.forward_sequences([ids[0].tolist()])[0].double()
    torch.testing.assert_close(ours, expected_logits, atol=1e-4, rtol=1e-4)
    to_cpu_serving(model)  # the packed CPU forms take the dequantised matrices
    with torch.no_grad():
        torch.testing.assert_close(model.forward_sequences([ids[0].tolist()])[0].double(), expected_logits,
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_factorised_folder_serves_every_ratio_with_the_prefix_rule(folders, tmp_path, bits):
    _, made = folders
    dense, compressed = made["qwen2-bias"]
    quantize_folder(compressed, tmp_path / "q", QuantConfig(bits=bits, group=32, rounding="rtn"))
    ids = torch.randint(0, VOCAB, (20,)).tolist()
    odd_prefix = False
    for ratio in (None, 0.35, 0.5, 0.7):
        floating = load_model(compressed, device="cpu", dtype="float32", ratio=ratio)
        model = load_model(tmp_path / "q", device="cpu", dtype="float32", ratio=ratio)
        ranks = {name: m.rank for name, m in model.named_modules() if isinstance(m, QuantLowRankLinear)}
        assert ranks and ranks == {name: m.rank for name, m in floating.named_modules() if hasattr(m, "rank")}
        odd_prefix |= any(r % 2 for r in ranks.values())
        for name, rank in ranks.items():  # int4: a prefix ending inside a byte holds level 0 past it
            module = model.get_submodule(name)
            stored = _stored(tmp_path / "q")
            full = Quantized(stored[f"{name}.A_q"], stored[f"{name}.A_scales"], bits, 32, module.A_q.shape[1] * (2 if bits == 4 else 1))
            assert torch.equal(module.A_q, column_prefix(full, rank).q)
        reference = _reference(dense, _dequantized_matrices(tmp_path / "q", ranks))
        with torch.no_grad():
            torch.testing.assert_close(model.forward_sequences([ids])[0].double(),
                                       reference(torch.tensor([ids])).logits[0], atol=1e-4, rtol=1e-4)
    assert odd_prefix  # the repacking path ran


def test_engine_greedy_with_int8_equals_the_reference(folders, tmp_path, cpu_kernels):
    _, made = folders
    dense, compressed = made["llama-gqa"]
    quantize_folder(compressed, tmp_path / "q", QuantConfig(bits=8, group=32))
    reference = _reference(dense, _dequantized_matrices(tmp_path / "q"))
    llm = LLM(tmp_path / "q", dtype="float32", device="cpu")
    if cpu_native.library() is not None:  # served from the levels: the native decoder layer reads int8 panels
        layer = llm.model.model.layers[0]
        assert isinstance(layer, NativeDecoderLayer) and layer.mlp.down_proj.packed[0].bits == 8
    prompts = [torch.randint(2, VOCAB, (n,)).tolist() for n in (5, 11, 17)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, out in zip(prompts, outputs):
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                          min_new_tokens=12, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == expected


def test_decode_weight_bytes_count_the_packed_levels_scales_and_norms(folders, tmp_path, cpu_kernels):
    """What bench/peers_cpu.py divides by: int8 panels of 16 columns, 4 levels of a column per word,
    a float32 scale per group and column, for every projection and the tied head; the norms."""
    if cpu_native.library() is None:
        pytest.skip("no native library: the quantised weights are served dequantised")
    _, made = folders
    dense, _ = made["llama-gqa"]
    quantize_folder(dense, tmp_path / "q", QuantConfig(bits=8, group=32))
    llm = LLM(tmp_path / "q", dtype="float32", device="cpu")
    c = CONFIGS["llama-gqa"]

    def packed(n, k, group):
        columns = -(-n // 16) * 16
        return columns * -(-k // 4) * 4 + columns * -(-k // group) * 4

    h, i, q, kv = c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = packed(q, h, 32) + 2 * packed(kv, h, 32) + packed(h, q, 32) + 2 * packed(i, h, 32) + packed(h, i, 32)
    head = packed(VOCAB, h, 64)  # converters.quantize.HEAD_GROUP divides the width 64
    norms = (2 * c.num_hidden_layers + 1) * h * 4
    assert decode_weight_bytes(llm.model) == c.num_hidden_layers * layer + head + norms


def test_keep_head_leaves_the_head_float_and_lookups_dequantise_rows(folders, tmp_path):
    _, made = folders
    dense, _ = made["llama-gqa"]
    quantize_folder(dense, tmp_path / "float-head", QuantConfig(bits=8, group=32, head=False))
    assert "model.embed_tokens.weight" in _stored(tmp_path / "float-head")
    assert load_model(tmp_path / "float-head", device="cpu").lm_head is None
    quantize_folder(dense, tmp_path / "q", QuantConfig(bits=4, group=32, rounding="rtn"))
    stored = _stored(tmp_path / "q")
    assert "model.embed_tokens.weight" not in stored and stored["model.embed_tokens.weight_q"].dtype == torch.int8
    model = load_model(tmp_path / "q", device="cpu", dtype="float32")
    ids = torch.tensor([[3, 0, 100], [7, 7, 1]])
    table = _dequantized_matrices(tmp_path / "q")["model.embed_tokens"]
    torch.testing.assert_close(model.model.embed_tokens(ids).double(), table[ids])
    assert model.lm_head.weight_q.data_ptr() == model.model.embed_tokens.weight_q.data_ptr()  # one table


def _kl_to(reference_model, model, ids) -> float:
    """Mean KL(reference || model) of next-token distributions over `ids`."""
    with torch.no_grad():
        p = reference_model.forward_sequences([ids])[0].double().log_softmax(-1)
        q = model.forward_sequences([ids])[0].double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_gptq_int4_is_closer_to_the_float_model_than_round_to_nearest(folders, tmp_path, config, cpu_kernels):
    text, made = folders
    _, compressed = made[config]
    for rounding in ("rtn", "gptq"):
        quantize_folder(compressed, tmp_path / rounding, QuantConfig(bits=4, group=32, rounding=rounding,
                                                                     calib=str(text), samples=8, seq_len=64))
    floating = load_model(compressed, device="cpu", dtype="float32")
    # The text GPTQ calibrated on: what its error feedback minimises (random ids, outside its inputs'
    # distribution, left the two within noise of each other, either way round by machine).
    ids = tokenize_file(load_tokenizer(compressed), text)[:256]
    kl = {r: _kl_to(floating, load_model(tmp_path / r, device="cpu", dtype="float32"), ids) for r in ("rtn", "gptq")}
    assert kl["gptq"] < kl["rtn"], kl
    assert read_manifest(tmp_path / "gptq")["quantization"]["rounding"] == "gptq"


def test_latent_kv_folder_quantises_and_serves(folders, tmp_path, cpu_kernels):
    text, made = folders
    dense, _ = made["llama-gqa"]
    lorc(dense, tmp_path / "latent", LoRCConfig(kv_ratio=0.5, schedule="uniform", calib=str(text), samples=8,
                                               seq_len=64))
    manifest = quantize_folder(tmp_path / "latent", tmp_path / "q", QuantConfig(bits=8, group=32))
    assert manifest["kv_latent"] and all(m["bits"] == 8 for m in manifest["modules"].values())
    model = load_model(tmp_path / "q", device="cpu", dtype="float32")
    assert model.model.layers[0].self_attn.latent
    reference = _reference(dense, _dequantized_matrices(tmp_path / "q"))
    prompt = torch.randint(2, VOCAB, (9,)).tolist()
    out = LLM(tmp_path / "q", dtype="float32", device="cpu").generate(
        [prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                      pad_token_id=0)[0, len(prompt):].tolist()
    assert out.outputs[0].token_ids == expected


def test_cli_quantize_and_compress_bits(folders, tmp_path, capsys):
    text, made = folders
    dense, compressed = made["llama-gqa"]
    assert main(["quantize", str(compressed), "--bits", "4", "--calib", str(text), "--samples", "4", "--seq-len", "32",
                 "--out", str(tmp_path / "q4")]) == 0
    printed = capsys.readouterr().out
    assert "int4 weights in groups of 32 (gptq, int8 head)" in printed and f"wrote {tmp_path / 'q4'}" in printed
    recorded = read_manifest(tmp_path / "q4")["quantization"]
    assert (recorded["group"], recorded["samples"], recorded["calib"]) == (32, 4, str(text))  # int4's defaults
    assert main(["compress", str(dense), "--ratio", "0.3", "--method", "svd-llm", "--calib", str(text),
                 "--samples", "8", "--seq-len", "64", "--bits", "8", "--group", "32", "--out", str(tmp_path / "c8")]) == 0
    manifest = read_manifest(tmp_path / "c8")
    assert manifest["method"] == "svd-llm" and manifest["quantization"]["bits"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c8", "q4"]  # no float folder left beside it
    # the same as compressing, then quantising
    quantize_folder(compressed, tmp_path / "again", QuantConfig(bits=8, group=32))
    assert _stored(tmp_path / "c8").keys() == _stored(tmp_path / "again").keys()
    for name, tensor in _stored(tmp_path / "again").items():
        assert torch.equal(_stored(tmp_path / "c8")[name], tensor), name


def _exit_status(argv) -> int:
    """`lowrank ARGV`'s exit status, whether main returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("argv, message", [
    (["--bits", "3"], "argument --bits: invalid choice: 3"),
    (["--bits", "8", "--group", "7"], "group must be an even integer >= 2, got 7"),
    (["--bits", "8", "--group", "64"], "group 64 does not divide the input width 96 of model.layers.0.mlp.down_proj (groups that divide every width: 16, 32)"),
    (["--bits", "8", "--group", "0"], "argument --group: expected a positive integer, got 0"),
    (["--bits", "8", "--group", "32", "--rounding", "awq"], "argument --rounding: invalid choice: 'awq'"),
    ([], "the following arguments are required: --bits"),
])
def test_cli_quantize_bad_arguments_exit_2_with_one_line(folders, tmp_path, capsys, argv, message):
    _, made = folders
    dense, _ = made["llama-gqa"]
    assert _exit_status(["quantize", str(dense), *argv, "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "q").exists()


def test_quantised_folders_refuse_every_earlier_stage(folders, tmp_path, capsys):
    text, made = folders
    dense, compressed = made["llama-gqa"]
    quantize_folder(compressed, tmp_path / "q", QuantConfig(bits=8, group=32))
    quantize_folder(dense, tmp_path / "qd", QuantConfig(bits=8, group=32))
    capsys.readouterr()  # the progress bars so far
    cases = [
        (["quantize", str(tmp_path / "q"), "--bits", "8", "--out", str(tmp_path / "x")], "quantise the unquantised folder"),
        (["heal", str(tmp_path / "q"), "--steps", "1", "--calib", str(text), "--out", str(tmp_path / "x")],
         "heal the unquantised folder"),
        (["compress", str(tmp_path / "qd"), "--ratio", "0.3", "--calib", str(text), "--out", str(tmp_path / "x")],
         "compress the unquantised folder"),
        (["compress", str(tmp_path / "qd"), "--kv-ratio", "0.5", "--calib", str(text), "--out", str(tmp_path / "x")],
         "factorise the K/V cache of the unquantised folder"),
        (["compress", str(dense), "--ratio", "0.3", "--group", "32", "--out", str(tmp_path / "x")],
         "--group belongs to quantisation: give --bits too"),
        (["compress", str(dense), "--ratio", "0.3", "--rounding", "gptq", "--out", str(tmp_path / "x")],
         "--rounding belongs to quantisation: give --bits too"),
        (["quantize", str(tmp_path / "q"), "--bits", "8", "--out", str(tmp_path / "q"), "--force"],
         "quantise the unquantised folder"),
        (["quantize", str(dense), "--bits", "8", "--group", "32", "--out", str(dense), "--force"], "is the folder being quantised"),
        (["quantize", str(dense), "--bits", "8", "--group", "32", "--out", str(tmp_path / "q")], "exists; pass --force"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
    assert not (tmp_path / "x").exists()


def test_a_failure_mid_write_leaves_no_folder(folders, tmp_path, monkeypatch):
    import converters.quantize as module

    _, made = folders
    dense, _ = made["llama-gqa"]
    calls = []

    def failing(w, bits, group):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return quantize(w, bits, group)

    monkeypatch.setattr(module, "quantize", failing)
    with pytest.raises(KeyboardInterrupt):
        quantize_folder(dense, tmp_path / "q", QuantConfig(bits=8, group=32))
    assert list(tmp_path.iterdir()) == []


def test_version_1_folders_still_load(folders, tmp_path):
    import shutil

    _, made = folders
    _, compressed = made["llama-gqa"]
    shutil.copytree(compressed, tmp_path / "v1")
    manifest = json.loads((tmp_path / "v1" / "lowrank.json").read_text()) | {"format_version": 1}
    (tmp_path / "v1" / "lowrank.json").write_text(json.dumps(manifest))
    ids = torch.randint(0, VOCAB, (12,)).tolist()
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "v1", device="cpu").forward_sequences([ids])[0],
                                   load_model(compressed, device="cpu").forward_sequences([ids])[0])
