"""bench/gpu.sh's dry run: every stage's plumbing at tiny sizes on the CPU (the Triton tests under
the interpreter), what comes back within the device tool's limits, and the report built from it,
so the script is known to work when a GPU is lent (rarely, for minutes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FILES, MAX_FILE_BYTES = 8, 16 << 20  # what the device tool brings back from $OUT


def test_the_dry_run_completes_every_stage_and_the_report_reads_it(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("LOWRANK_KERNELS", "TRITON_INTERPRET")}
    env |= {"GPU_DRY_RUN": "1", "OUT": str(out), "SYNTH": str(tmp_path / "synthetic"), "PY": sys.executable}
    result = subprocess.run(["bash", "bench/gpu.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = (out / "log.txt").read_text() if (out / "log.txt").is_file() else ""
    assert result.returncode == 0, result.stdout + result.stderr + log[-3000:]
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages] == ["env", "tests", "kernels", "latent", "engine", "tensor-parallel"]
    assert all(s["rc"] == 0 and not s["timed_out"] for s in stages), (stages, log[-3000:])
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert {p.name for p in files} == {"env.json", "stages.jsonl", "tests.xml", "kernels.json", "latent.json",
                                       "engine.json", "tp.json", "log.txt"}
    tp = json.loads((out / "tp.json").read_text())
    assert tp["tp"] == 2 and tp["measured"]["dense"]["per_layer_values"] == 2 * 128  # tiny-llama: hidden 128
    assert len(files) <= MAX_FILES and all(p.stat().st_size <= MAX_FILE_BYTES for p in files)
    assert all(p.parent == out for p in files)
    env_record = json.loads((out / "env.json").read_text())
    assert env_record["dry_run"] and env_record["ceilings"]["copy_GBps"] > 0
    engine = json.loads((out / "engine.json").read_text())["benchmarks"]
    assert {b["extra_info"]["contender"] for b in engine} == {"ours-dense", "ours-r0.4", "ours-r0.4-kv0.5", "hf-dense"}

    report = tmp_path / "report.md"
    subprocess.run([sys.executable, "bench/gpu_report.py", str(out), "--out", str(report)], cwd=REPO, check=True)
    text = report.read_text()
    for heading in ("## Stages", "## CUDA tests", "## Low-rank GEMM", "## Latent decode attention", "## Engine"):
        assert heading in text
    assert "0 failed, 0 errors" in text and "| ours-r0.4-kv0.5 |" in text and "No figures" not in text
    assert "| smollm2.q | 8 |" in text  # the kernel table has its row (it needs all three contenders)


def test_the_report_says_what_is_missing(tmp_path):
    (tmp_path / "stages.jsonl").write_text('{"stage": "tests", "rc": 124, "seconds": 150.0, "budget": 150, '
                                           '"timed_out": true}\n')
    report = tmp_path / "report.md"
    subprocess.run([sys.executable, "bench/gpu_report.py", str(tmp_path), "--out", str(report)], cwd=REPO, check=True)
    text = report.read_text()
    assert "| tests | 124 | 150.0 | 150 | yes |" in text and "No tests.xml" in text
    assert text.count("No figures") == 3


def test_a_stage_cut_by_its_budget_still_writes_what_finished(tmp_path):
    """SIGTERM from `timeout` ends pytest like Ctrl-C (bench/pytest_sigterm.py): the JUnit XML of the
    tests that ran is still written."""
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_fast():\n    pass\n\n"
                                           "def test_hangs():\n    time.sleep(60)\n")
    env = os.environ | {"PYTHONPATH": str(REPO / "bench")}
    xml = tmp_path / "out.xml"
    result = subprocess.run(["timeout", "--kill-after=20", "8", sys.executable, "-m", "pytest", "-q",
                             "-p", "pytest_sigterm", "-p", "no:cacheprovider", "-o", "addopts=",
                             f"--junitxml={xml}", str(tmp_path / "test_slow.py")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 124, result.stdout + result.stderr  # timed out, ended by the plugin's interrupt
    assert xml.is_file() and 'name="test_fast"' in xml.read_text()
