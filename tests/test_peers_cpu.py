"""bench/peers_cpu.py's parsing and report, on llama.cpp's own output format (the peer itself is
built and run outside CI: `bash bench/peers/llama_cpp.sh`, minutes of compiling)."""

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import peers_cpu  # noqa: E402

BATCHED_BENCH = """
main: n_kv_max = 13568, n_batch = 2048, n_ubatch = 512, flash_attn = 0, is_pp_shared = 0, n_gpu_layers = -1

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    64 |    128 |    1 |    192 |    0.093 |   688.17 |    1.668 |    76.74 |    1.761 |   109.03 |
|    64 |    128 |   16 |   3072 |    1.541 |   664.51 |   12.756 |   160.55 |   14.297 |   214.87 |

llama_perf_context_print:        load time =      88.26 ms
"""


def test_batched_bench_table_parses_to_decode_tok_s_per_batch():
    assert peers_cpu.parse_batched_bench(BATCHED_BENCH) == {1: 76.74, 16: 160.55}


def test_report_has_a_row_per_contender_and_the_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(peers_cpu, "RESULTS", tmp_path)
    rows = {
        "ours dense fp32": {"kind": "ours", "bytes": 270e6, "decode_bytes": 540e6, "decode_tok_s": {"1": 25.0, "16": 220.0},
                            "ppl_stride512": 12.78, "ppl_stride256": 11.9},
        "ours dense int8 a8kv8": {"kind": "ours", "bytes": 145e6, "decode_tok_s": {"1": 70.0, "16": 500.0},
                                  "ppl_stride512": 12.9},
        "llama.cpp F16": {"kind": "llama.cpp", "bytes": 271e6, "decode_tok_s": {"1": 49.6, "16": 184.4},
                          "ppl_llama": 11.5},
        "llama.cpp Q8_0": {"kind": "llama.cpp", "bytes": 145e6, "decode_tok_s": {"1": 72.1, "16": 184.3},
                           "ppl_llama": 11.52},
    }
    record = {"environment": {"cpu": "test CPU", "date": "2026-12-03", "commit": "abc"}, "threads": 2,
              "dram_bandwidth_gb_s": 20.0, "prompt_len": 64, "new_tokens": 128, "rounds": 3, "rows": rows}
    peers_cpu.write_report(record)
    table = (tmp_path / "peers-cpu.md").read_text()
    for name in rows:
        assert f"| {name} |" in table
    assert "| 1.0000 |" in table and "| 1.0017 |" in table  # each against its own reference
    assert "| ours dense fp32 | 270 | 540 | 25.0 | 220.0 | 13.5 |" in table  # bandwidth from the bytes decode reads
    assert (tmp_path / "peers-cpu.png").stat().st_size > 0
