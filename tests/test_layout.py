"""The layout's promises that no other test would notice breaking: light imports stay light, and
the test and benchmark suites collect together."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)


def test_the_rank_rule_imports_neither_triton_nor_the_kernels():
    """`rank_budget` is what a converter or a script reads to size a model: no GPU stack behind it."""
    result = _fresh("import json, sys; import engine.model.rank_budget; "
                    "print(json.dumps([m for m in ('triton', 'kernels', 'engine.core') if m in sys.modules]))")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_tests_and_bench_collect_together():
    """Suites that shared a file name (bench/test_engine.py beside tests/test_engine.py) broke collection."""
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             "tests/test_engine.py", "tests/test_latent_attention.py", "bench/bench_engine.py",
                             "bench/bench_latent_attention.py"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "bench/bench_engine.py::test_generate" in result.stdout and "tests/test_engine.py::" in result.stdout
