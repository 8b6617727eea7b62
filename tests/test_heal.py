"""Healing on tiny random models: it lowers the KL to the teacher, trains only what it should,
keeps every rank prefix servable, resumes exactly, and never leaves a half-written folder."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

import converters.heal as heal_module
from conftest import save_tiny_model, save_tiny_tokenizer
from converters.cli import main
from converters.compress import CompressConfig, compress
from converters.distill import distill_kl
from converters.heal import HealConfig, heal
from engine import load_model
from engine.model.checkpoint import MANIFEST, read_manifest, weight_files
from engine.model.loader import serving_ranks

VOCAB = 97
# A larger init than transformers' 0.02, so the teacher's next-token distributions are far from uniform.
CONFIG = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.15)
STEPS = 80
LR = {"full": 3e-2, "lora": 5e-2}  # a tiny model learns fast: larger steps than the real one's defaults


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A dense teacher, a calibration text (word-level tokens) and its svd-llm compression at 0.3."""
    root = tmp_path_factory.mktemp("heal")
    dense = root / "dense"
    save_tiny_model(CONFIG, dense)
    save_tiny_tokenizer(dense, VOCAB)
    generator = torch.Generator().manual_seed(7)
    # A Markov-ish text (each token follows the previous with a few likely successors) the model can learn on.
    successors = torch.randint(0, VOCAB, (VOCAB, 4), generator=generator)

    def markov(n: int) -> list[int]:
        ids = [int(torch.randint(0, VOCAB, (), generator=generator))]
        for _ in range(n - 1):
            ids.append(int(successors[ids[-1], torch.randint(0, 4, (), generator=generator)]))
        return ids

    calib = root / "calib.txt"
    calib.write_text(" ".join(f"t{i}" for i in markov(40_000)))
    compressed = root / "svdllm-0.3"
    compress(dense, compressed, CompressConfig(ratio=0.3, method="svd-llm", calib=str(calib), samples=8, seq_len=64))
    held_out = torch.tensor([markov(48) for _ in range(6)])  # fresh text of the same kind, never trained on
    return {"dense": dense, "calib": calib, "compressed": compressed, "held_out": held_out, "root": root}


def _config(folders, **kw) -> HealConfig:
    return HealConfig(**({"steps": STEPS, "batch_size": 2, "seq_len": 32, "lr": LR[kw.get("mode", "full")],
                          "calib": str(folders["calib"]), "checkpoint_every": 5} | kw))


def _kl(folder, teacher_dir, windows, ratio=None) -> float:
    student = load_model(folder, device="cpu", dtype=torch.float32, ratio=ratio)
    teacher = load_model(teacher_dir, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        s = torch.cat(student.forward_sequences(list(windows))).log_softmax(-1)
        t = torch.cat(teacher.forward_sequences(list(windows))).log_softmax(-1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def _tensors(folder) -> dict[str, torch.Tensor]:
    return {k: v for f in weight_files(folder) for k, v in load_file(f).items()}


def test_distill_kl_matches_autograd_through_full_logits():
    """The fused, chunked KL equals the plain one in value and in the gradient it passes back."""
    hidden_s = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    hidden_t = torch.randn(37, 16, dtype=torch.float64)
    head = torch.randn(50, 16, dtype=torch.float64)
    fused = distill_kl(hidden_s, hidden_t, head, chunk=8)
    (grad_fused,) = torch.autograd.grad(fused * 3, hidden_s)
    logp_s, logp_t = (hidden_s @ head.T).log_softmax(-1), (hidden_t @ head.T).log_softmax(-1)
    plain = torch.nn.functional.kl_div(logp_s, logp_t, log_target=True, reduction="batchmean")
    (grad_plain,) = torch.autograd.grad(plain * 3, hidden_s)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(grad_fused, grad_plain)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_healing_lowers_the_kl_to_the_teacher(folders, tmp_path, cpu_kernels, mode):
    out = tmp_path / "healed"
    manifest = heal(folders["compressed"], out, _config(folders, mode=mode))
    before = _kl(folders["compressed"], folders["dense"], folders["held_out"])
    after = _kl(out, folders["dense"], folders["held_out"])
    assert after < 0.8 * before, (before, after)
    record = manifest["healing"]
    assert record["config"]["mode"] == mode and record["teacher"]["path"] == str(folders["dense"])
    assert set(record["step_seconds"]) == {"teacher", "student", "backward", "optimizer"}
    assert read_manifest(out)["healing"]["final_kl"] == record["final_kl"]
    assert not out.with_name(f"{out.name}.partial").exists()  # the checkpoint goes once the folder is written


@pytest.mark.parametrize("options, changed", [
    ({"train_norms": False}, {"A", "B"}),
    ({}, {"A", "B", "norm"}),
    ({"mode": "lora", "train_norms": False}, {"A", "B"}),
])
def test_only_the_student_factors_and_chosen_options_change(folders, tmp_path, cpu_kernels, options, changed):
    teacher_before = _tensors(folders["dense"])
    before = _tensors(folders["compressed"])
    out = tmp_path / "healed"
    heal(folders["compressed"], out, _config(folders, steps=3, **options))
    after = _tensors(out)
    assert set(after) == set(before)
    kinds = set()
    for name, tensor in after.items():
        if not torch.equal(tensor, before[name]):
            kinds.add(name.rsplit(".", 1)[-1] if name.endswith((".A", ".B")) else "norm" if "norm" in name else name)
    assert kinds == changed
    assert all(torch.equal(t, teacher_before[k]) for k, t in _tensors(folders["dense"]).items())  # teacher untouched


def test_nested_healing_keeps_every_prefix_servable_and_better(folders, tmp_path, cpu_kernels):
    """One run over [0.3, 0.6]: every ratio loads with the ranks the global rule gives (the stored scores
    are unchanged), and every one of those prefixes is closer to the teacher than before healing."""
    out = tmp_path / "nested"
    manifest = heal(folders["compressed"], out, _config(folders, steps=40, max_ratio=0.6))
    assert manifest["healing"]["ratios"][1] == 0.6
    trained_ratios = [h["ratio"] for h in manifest["healing"]["history"]]
    assert min(trained_ratios) >= 0.3 - 1e-3 and max(trained_ratios) <= 0.6 and len(set(trained_ratios)) > 1
    files_before, files_after = weight_files(folders["compressed"]), weight_files(out)
    original = read_manifest(folders["compressed"])
    for ratio in (0.3, 0.4, 0.5, 0.6):
        assert serving_ranks(out, manifest, files_after, ratio) == serving_ranks(
            folders["compressed"], original, files_before, ratio)
        before = _kl(folders["compressed"], folders["dense"], folders["held_out"], ratio)
        after = _kl(out, folders["dense"], folders["held_out"], ratio)
        assert after < before, (ratio, before, after)


def test_resume_ends_in_the_same_weights_as_one_run(folders, tmp_path, cpu_kernels):
    config = _config(folders, steps=7, checkpoint_every=2, max_ratio=0.5)
    heal(folders["compressed"], tmp_path / "whole", config)
    split = tmp_path / "split"
    assert heal(folders["compressed"], split, config, stop_after=3) is None
    assert not split.exists() and (tmp_path / "split.partial" / heal_module.CHECKPOINT).is_file()
    heal(folders["compressed"], split, config, resume=True, stop_after=2)  # 5 of 7 done
    heal(folders["compressed"], split, config, resume=True)
    whole, parts = _tensors(tmp_path / "whole"), _tensors(split)
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    record = read_manifest(split)["healing"]
    assert record["resumed_at"] == 5
    assert read_manifest(tmp_path / "whole")["healing"]["final_kl"] == record["final_kl"]


def test_resume_refuses_a_checkpoint_of_other_settings(folders, tmp_path, cpu_kernels):
    heal(folders["compressed"], tmp_path / "o", _config(folders, steps=4), stop_after=2)
    with pytest.raises(ValueError, match="other settings .*config.* drop --resume"):
        heal(folders["compressed"], tmp_path / "o", _config(folders, steps=4, lr=1e-4), resume=True)


def test_interrupt_mid_healing_leaves_no_output_folder(folders, tmp_path, cpu_kernels, monkeypatch):
    calls = []
    real = heal_module.distill_kl

    def interrupting(*args, **kw):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(heal_module, "distill_kl", interrupting)
    out = tmp_path / "healed"
    with pytest.raises(KeyboardInterrupt):
        heal(folders["compressed"], out, _config(folders, steps=12))
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed.partial"]  # the step-5 checkpoint, nothing else
    monkeypatch.setattr(heal_module, "distill_kl", real)
    heal(folders["compressed"], out, _config(folders, steps=12), resume=True)
    assert read_manifest(out)["healing"]["resumed_at"] == 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the CUDA test below runs the compiled kernels")
def test_healing_runs_through_the_triton_kernels(folders, tmp_path):
    """Two steps with the dispatch on the Triton kernels (the interpreter here, the GPU's compiler there)."""
    import kernels

    assert kernels.backend_for("cpu").runs_gemm(torch.ones(1))
    manifest = heal(folders["compressed"], tmp_path / "o", _config(folders, steps=2))
    assert all(h["kl"] == h["kl"] for h in manifest["healing"]["history"])  # finite


def test_a_wrong_teacher_is_refused(folders, tmp_path, cpu_kernels):
    other = tmp_path / "other"
    save_tiny_model(LlamaConfig(**(CONFIG.to_dict() | {"initializer_range": 0.3})), other)
    with pytest.raises(Exception, match="not the model this folder was compressed from"):
        heal(folders["compressed"], tmp_path / "o", _config(folders), teacher=other)


def test_heal_cli_end_to_end(folders, tmp_path, capsys, cpu_kernels):
    out = tmp_path / "cli"
    args = ["heal", str(folders["compressed"]), "--steps", "3", "--calib", str(folders["calib"]),
            "--heal-batch-size", "2", "--heal-seq-len", "32", "--max-ratio", "0.5", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "healed 3 steps (full, serves ratios 0.30" in printed and "-0.5000)" in printed and f"wrote {out}" in printed
    assert json.loads((out / MANIFEST).read_text())["healing"]["config"]["max_ratio"] == 0.5
    assert main(args) == 2 and "exists; pass --force" in capsys.readouterr().err


def test_compress_with_healing_in_one_command(folders, tmp_path, capsys, cpu_kernels):
    out = tmp_path / "soco-healed"
    args = ["compress", str(folders["dense"]), "--ratio", "0.3", "--max-ratio", "0.5", "--method", "soco",
            "--steps", "8", "--samples", "4", "--seq-len", "32", "--calib", str(folders["calib"]),
            "--heal-steps", "4", "--heal-batch-size", "2", "--heal-seq-len", "32", "--out", str(out)]
    assert main(args + ["--stop-after", "2"]) == 0
    assert "run the same command with --resume" in capsys.readouterr().out
    assert not out.exists() and (tmp_path / "soco-healed.partial" / "compressed" / MANIFEST).is_file()
    assert main(args + ["--resume"]) == 0
    manifest = read_manifest(out)
    assert manifest["method"] == "soco" and manifest["healing"]["resumed_at"] == 2
    assert not (tmp_path / "soco-healed.partial").exists()
    load_model(out, device="cpu", ratio=0.45)


def test_compress_heal_and_quantise_in_one_command(folders, tmp_path, capsys, cpu_kernels):
    out = tmp_path / "healed-int8"
    args = ["compress", str(folders["dense"]), "--ratio", "0.3", "--method", "svd-llm", "--samples", "4",
            "--seq-len", "32", "--calib", str(folders["calib"]), "--heal-steps", "4", "--heal-batch-size", "2",
            "--heal-seq-len", "32", "--bits", "8", "--group", "32", "--out", str(out)]
    assert main(args + ["--stop-after", "2"]) == 0  # stopped mid-healing: nothing quantised, nothing written
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["healed-int8.partial"]
    assert main(args + ["--resume"]) == 0
    printed = capsys.readouterr().out
    assert "healed 4 steps" in printed and "int8 weights in groups of 32 (rtn, int8 head)" in printed
    manifest = read_manifest(out)
    assert manifest["healing"]["resumed_at"] == 2 and manifest["quantization"]["bits"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed-int8"]  # no float folder, no partial left
    load_model(out, device="cpu", ratio=0.4)


@pytest.mark.parametrize("argv, message", [
    (["heal", "{compressed}", "--steps", "0", "--out", "{o}"], "--steps: expected a positive integer, got 0"),
    (["heal", "{compressed}", "--steps", "2", "--max-ratio", "0.2", "--out", "{o}"],
     "--max-ratio 0.2 is below the folder's ratio 0.3"),
    (["heal", "{compressed}", "--steps", "2", "--max-ratio", "1.5", "--out", "{o}"], "expected a ratio in (0, 1)"),
    (["heal", "{dense}", "--steps", "2", "--out", "{o}"], "is not a compressed folder"),
    (["heal", "{compressed}", "--steps", "2", "--out", "{compressed}", "--force"], "would replace the folder being healed"),
    (["heal", "{compressed}", "--steps", "2", "--heal-lr", "-1", "--out", "{o}"], "expected a positive number"),
    (["heal", "{compressed}", "--steps", "2", "--teacher", "{o}", "--out", "{o}"], "is not a model folder"),
    (["compress", "{dense}", "--ratio", "0.3", "--max-ratio", "0.5", "--out", "{o}"], "give --heal-steps too"),
    (["compress", "{dense}", "--ratio", "0.3", "--heal-steps", "2", "--max-ratio", "0.2", "--out", "{o}"],
     "--max-ratio 0.2 is below --ratio 0.3"),
    (["compress", "{dense}", "--kv-ratio", "0.3", "--heal-steps", "2", "--out", "{o}"], "give --ratio too"),
    (["compress", "{dense}", "--ratio", "0.3", "--heal-lr", "0.1", "--stop-after", "2", "--out", "{o}"],
     "--heal-lr, --stop-after belong to healing: give --heal-steps too"),
    (["heal", "{compressed}", "--steps", "2", "--hidden-weight", "inf", "--out", "{o}"], "a finite number >= 0"),
    (["heal", "{compressed}", "--steps", "2", "--out", "{parent}", "--force"], "would replace the folder being healed"),
    (["heal", "{compressed}", "--steps", "2", "--calib", "{short}", "--out", "{o}"], "fewer than one window of 256"),
])
def test_bad_heal_arguments_exit_2_with_one_line(folders, tmp_path, capsys, argv, message):
    short = tmp_path / "short.txt"
    short.write_text("t1 t2 t3")
    paths = {"compressed": folders["compressed"], "dense": folders["dense"], "o": tmp_path / "o",
             "parent": folders["compressed"].parent, "short": short}
    argv = [a.format(**paths) for a in argv]
    if "--calib" not in argv:
        argv += ["--calib", str(folders["calib"])]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_a_folder_with_only_its_kv_cache_factorised_is_refused(folders, tmp_path, capsys):
    kv = tmp_path / "kv"
    assert main(["compress", str(folders["dense"]), "--kv-ratio", "0.5", "--calib", str(folders["calib"]),
                 "--samples", "4", "--seq-len", "32", "--out", str(kv)]) == 0
    capsys.readouterr()
    assert main(["heal", str(kv), "--steps", "2", "--calib", str(folders["calib"]), "--out", str(tmp_path / "o")]) == 2
    assert "only its K/V cache factorised" in capsys.readouterr().err


def _exit_code(argv) -> int:
    """main's return value, or argparse's exit status for a malformed argument."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu.sh runs it)")
def test_healing_on_cuda_lowers_the_kl_through_the_compiled_kernels(folders, tmp_path):
    out = tmp_path / "cuda"
    heal(folders["compressed"], out, _config(folders, device="cuda", checkpoint_every=40), stop_after=40)
    heal(folders["compressed"], out, _config(folders, device="cuda", checkpoint_every=40), resume=True)
    before = _kl(folders["compressed"], folders["dense"], folders["held_out"])
    assert _kl(out, folders["dense"], folders["held_out"]) < 0.8 * before
