"""Perplexity windows, the number itself against a transformers computation, and `lowrank eval`."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from conftest import save_tiny_model
from converters.cli import main
from engine import load_model
from engine.eval.perplexity import load_text, make_windows, perplexity


@pytest.mark.parametrize("n, ctx, stride", [(1000, 512, 512), (1000, 512, 128), (512, 512, 512), (7, 4, 3), (2, 2, 1)])
def test_windows_score_every_token_but_the_first_exactly_once_when_strided(n, ctx, stride):
    windows = make_windows(n, ctx, stride)
    scored = [t for w in windows for t in range(w.first_scored, w.end)]
    assert len(scored) == len(set(scored))
    assert all(w.end - w.begin <= ctx and w.begin < w.first_scored for w in windows)
    if stride == ctx:  # disjoint windows: each window's first token has no context
        assert sorted(scored) == [t for t in range(n) if t % ctx != 0]
    else:
        assert sorted(scored) == list(range(1, n))
        assert all(w.first_scored - w.begin >= min(ctx - stride, w.first_scored) for w in windows)


@pytest.mark.parametrize("ctx, stride, batch_size", [(16, 16, 3), (16, 5, 2)])
def test_perplexity_matches_transformers_loss(ctx, stride, batch_size, tmp_path):
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    hf = save_tiny_model(config, tmp_path)
    ids = torch.randint(0, 61, (75,))
    nll, count = 0.0, 0
    for w in make_windows(len(ids), ctx, stride):  # transformers' logits, windows computed independently
        with torch.no_grad():
            logits = hf(ids[None, w.begin : w.end]).logits[0]
        k = w.first_scored - w.begin
        nll += F.cross_entropy(logits[k - 1 : -1], ids[w.first_scored : w.end], reduction="sum").item()
        count += w.end - w.first_scored
    got = perplexity(load_model(tmp_path, device="cpu"), ids, ctx, stride, batch_size, progress=False)
    assert got.scored_tokens == count
    assert got.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_bad_text_files_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_text(tmp_path / "binary.txt")
    with pytest.raises(ValueError, match="is a directory"):
        load_text(tmp_path)


def test_eval_cli_on_the_real_model_writes_json(real_model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("import os\n\nprint(os.getcwd())\n" * 40)
    out = tmp_path / "ppl.json"
    assert main(["eval", str(real_model_dir), "--text", str(text), "--ctx", "64", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["ctx"] == 64 and record["windows"] >= 2
    assert 1.0 < record["perplexity"] < 5.0  # a repeated snippet is highly predictable
    assert f"perplexity {record['perplexity']:.4f}" in capsys.readouterr().out


def test_eval_cli_errors_exit_2(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert main(["eval", str(tmp_path), "--text", str(tmp_path / "empty.txt")]) == 2
    assert main(["eval", str(tmp_path / "nope"), "--text", str(tmp_path / "empty.txt")]) == 2
    err = capsys.readouterr().err
    assert "is empty" in err and "error:" in err
