"""`lowrank compress` on the real SmolLM2, end to end for a handful of steps, and its input errors."""

import json

import pytest

from conftest import REPO
from converters.cli import main
from engine import load_model
from engine.eval.perplexity import perplexity

TRAIN = REPO.parent / "shared" / "corpus" / "pydocs" / "train.txt"


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    """The head of the calibration corpus (never the held-out text), small enough to tokenize fast."""
    path = tmp_path_factory.mktemp("calib") / "train-head.txt"
    path.write_text(TRAIN.read_text(encoding="utf-8")[:200_000])
    return path


def test_compress_soco_end_to_end_on_the_real_model(real_model_dir, calib_text, tmp_path, capsys, cpu_kernels):
    out = tmp_path / "soco"
    args = ["compress", str(real_model_dir), "--ratio", "0.3", "--method", "soco", "--calib", str(calib_text),
            "--samples", "4", "--seq-len", "64", "--steps", "6", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "layer" in printed and "q_proj" in printed and "ratio" in printed
    manifest = json.loads((out / "lowrank.json").read_text())
    assert manifest["method"] == "soco" and abs(manifest["achieved_ratio"] - 0.3) <= 0.005
    assert manifest["soco"]["history"] and manifest["calibration"]["tokens"] == 4 * 64
    model = load_model(out, device="cpu")
    result = perplexity(model, list(range(100, 300)), ctx=100, stride=100, progress=False)
    assert result.perplexity == result.perplexity and result.perplexity > 1  # finite, not NaN
    assert main(args) == 2  # the folder exists now: refused without --force
    assert "exists; pass --force" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--ratio", "1.5"], "ratio must be in (0, 1)"),
    (["--ratio", "0.3", "--samples", "100000"], "fewer than samples × seq_len"),
])
def test_compress_input_errors_exit_2(real_model_dir, calib_text, tmp_path, capsys, extra, message):
    args = ["compress", str(real_model_dir), "--method", "svd-llm", "--calib", str(calib_text),
            "--out", str(tmp_path / "o"), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_compress_missing_model_exits_2(tmp_path, capsys):
    assert main(["compress", str(tmp_path / "nope"), "--ratio", "0.3", "--out", str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err
