"""`lowrank` on damaged folders and bad arguments: one line on stderr naming the problem, exit 2,
checked before the long work where it can be, and nothing half-written."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from conftest import REPO, save_tiny_model, save_tiny_tokenizer
from converters.cli import main

TINY = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    save_tiny_model(TINY, folder)
    save_tiny_tokenizer(folder, TINY.vocab_size)
    return folder


@pytest.fixture
def broken(good, tmp_path):
    """A copy of the tiny folder with one file replaced: broken(name, bytes) -> the folder."""
    def make(name: str, content: bytes | None) -> Path:
        folder = tmp_path / "broken"
        folder.mkdir()
        for f in good.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        if content is None:
            (folder / name).write_bytes((good / name).read_bytes()[: (good / name).stat().st_size // 2])
        else:
            (folder / name).write_bytes(content)
        return folder
    return make


def one_line_error(capsys, command: str, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"lowrank {command}: error: "), err
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def run(command: str, folder: Path, tmp_path: Path) -> list[str]:
    return {
        "eval": ["eval", str(folder), "--text", str(folder / "config.json"), "--ctx", "16"],
        "generate": ["generate", str(folder), "t5 t6", "--max-tokens", "2", "--device", "cpu"],
        "compress": ["compress", str(folder), "--ratio", "0.3", "--method", "svd", "--out", str(tmp_path / "out")],
        "serve": ["serve", str(folder), "--port", "0", "--device", "cpu"],
    }[command]


DAMAGE = [
    ("model.safetensors", None, "model.safetensors"),  # truncated to half
    ("model.safetensors", b"not safetensors at all", "model.safetensors"),
    ("config.json", b"[1, 2]", "not an object"),
    ("config.json", b'"llama"', "not an object"),
    ("config.json", json.dumps(TINY.to_dict() | {"hidden_size": "64"}).encode(), "hidden_size"),
    ("config.json", json.dumps(TINY.to_dict() | {"num_hidden_layers": 2.5}).encode(), "num_hidden_layers"),
    ("config.json", json.dumps(TINY.to_dict() | {"rms_norm_eps": "small"}).encode(), "config.json"),
    ("tokenizer.json", b"{not json", "tokenizer"),
]


@pytest.mark.parametrize("command", ["eval", "generate", "compress", "serve"])
@pytest.mark.parametrize("name, content, needle", DAMAGE, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(DAMAGE)])
def test_a_damaged_folder_is_one_line_and_exit_2(broken, tmp_path, capsys, monkeypatch, command, name, content,
                                                  needle):
    import engine.server.process as serve_module

    def started(*_, **__):  # had the load succeeded, serve would run here until a signal: fail instead
        raise AssertionError("the damaged folder loaded and the server started")

    monkeypatch.setattr(serve_module._BoundedShutdownServer, "run", started)
    folder = broken(name, content)
    assert main(run(command, folder, tmp_path)) == 2
    one_line_error(capsys, command, needle)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_eval_json_into_a_missing_folder_fails_before_evaluating(tmp_path, capsys):
    """Checked first: the model folder does not even exist, and the error is still about --json."""
    target = tmp_path / "no" / "such" / "result.json"
    assert main(["eval", str(tmp_path / "missing-model"), "--json", str(target)]) == 2
    one_line_error(capsys, "eval", "--json", "does not exist")


def test_eval_json_is_written_whole(good, tmp_path, capsys):
    target = tmp_path / "result.json"
    assert main(["eval", str(good), "--text", str(good / "config.json"), "--ctx", "16", "--json", str(target),
                 "--device", "cpu"]) == 0
    assert json.loads(target.read_text())["perplexity"] > 1
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


@pytest.mark.parametrize("argv, needle", [
    (["eval", "m", "--batch-size", "0"], "--batch-size"),
    (["eval", "m", "--ctx", "-4"], "--ctx"),
    (["eval", "m", "--max-chars", "x"], "--max-chars"),
    (["generate", "m", "p", "--max-tokens", "0"], "--max-tokens"),
    (["compress", "m", "--ratio", "0.3", "--steps", "0", "--out", "o"], "--steps"),
    (["serve", "m", "--port", "99999"], "--port"),
    (["serve", "m", "--port", "-1"], "--port"),
    (["serve", "m", "--max-num-seqs", "0"], "--max-num-seqs"),
    (["serve", "m", "--shutdown-grace", "inf"], "--shutdown-grace"),
    (["serve", "m", "--max-sequences-per-request", "0"], "--max-sequences-per-request"),
    (["eval", "m", "--kv-cache-dtype", "fp8"], "--kv-cache-dtype"),
])
def test_a_bad_argument_is_one_line_and_exit_2(capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    one_line_error(capsys, argv[0], needle)


def test_serve_on_a_busy_port_fails_before_loading_the_model(tmp_path, capsys):
    """The model folder does not exist: had the load come first, that would be the error."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(tmp_path / "missing-model"), "--port", str(port)]) == 2
    one_line_error(capsys, "serve", f"127.0.0.1:{port}")


def test_serve_on_a_damaged_folder_in_a_real_process_prints_one_line(broken):
    """As a user sees it: no traceback, no warning noise, exit 2."""
    folder = broken("model.safetensors", None)
    proc = subprocess.run([sys.executable, "-m", "converters.cli", "serve", str(folder), "--port", "0",
                           "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowrank serve: error: ") and "model.safetensors" in lines[0], \
        proc.stderr
