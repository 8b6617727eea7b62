"""Atomic folder writes survive errors, Ctrl-C and SIGKILL without leaving a half-written folder."""

import os
import signal
import subprocess
import sys

import pytest

from converters.atomic import atomic_folder

WRITER = """
import sys, time
from pathlib import Path
from converters.atomic import atomic_folder
with atomic_folder(Path(sys.argv[1])) as tmp:
    (tmp / "model.safetensors").write_bytes(b"half")
    print("writing", flush=True)
    time.sleep(60)
"""


def test_error_inside_leaves_nothing_and_success_renames(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "x").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "x").write_text("whole")
    assert (tmp_path / "out" / "x").read_text() == "whole"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_sigkill_mid_write_leaves_no_folder_and_the_next_writer_cleans_up(tmp_path):
    dest = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(dest)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir()] == [f"out.tmp-{proc.pid}"]  # only a dead temp
    live = tmp_path / f"out.tmp-{os.getppid()}"  # a writer that is still running elsewhere: kept
    live.mkdir()
    with atomic_folder(dest) as tmp:
        (tmp / "x").write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", live.name]
