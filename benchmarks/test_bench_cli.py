"""``fastrlhf bench`` end to end on a tiny sweep: table, CSVs, JSON and plots are written and agree.

Timed with the benchmark fixture (one round) so that ``--benchmark-only`` runs it too; what it
checks is the runner: fresh-process measurements, skip reasons, output checks and ratios.
"""

import csv
import importlib.util
import json

from fastrlhf import bench


def test_cli_end_to_end(benchmark, tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["logprobs-fwdbwd", "grpo", "--mode", "cpu", "--n", "64,128", "--v", "4096",
            "--impl", "fastrlhf,fastrlhf[inplace],torch,liger,flash-attn", "--min-time", "0.01",
            "--out", str(out)]
    rc = benchmark.pedantic(bench.main, args=(argv,), rounds=1, iterations=1)
    assert rc == 0
    table = capsys.readouterr().out
    assert "## grpo" in table and "## logprobs-fwdbwd" in table and "speedup" in table

    data = json.loads((out / "results.json").read_text())
    meta, rows = data["meta"], data["results"]
    assert meta["command"].startswith("fastrlhf bench logprobs-fwdbwd grpo")
    assert meta["versions"]["torch"] and meta["timestamp"] and meta["peak_bandwidth_gbps"] > 0
    # 2 shapes x (5 implementations of logprobs-fwdbwd + 4 of grpo, which flash-attn lacks): none dropped
    assert len(rows) == 2 * (5 + 4)
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)

    by = {(r["op"], r["N"], r["impl"]): r for r in rows}
    for op in ("logprobs-fwdbwd", "grpo"):
        for n in (64, 128):
            for impl in ("fastrlhf", "fastrlhf[inplace]", "torch"):
                r = by[(op, n, impl)]
                assert r["status"] == "ok", r
                assert r["check"] == "ok", r
                assert r["time_ms"] > 0 and r["gbps"] > 0 and r["peak_mem_mb"] is not None
            # The logits' gradient [N, V] fp32 is the only V-sized tensor fastrlhf allocates (none
            # in place); the torch composition adds its log-softmax and more. RSS resolution is
            # ~0.25 MiB (per-CPU RSS counters), hence the margins.
            grad_mb = n * 4096 * 4 / 2**20
            assert abs(by[(op, n, "fastrlhf")]["peak_mem_mb"] - grad_mb) < 0.4
            assert by[(op, n, "fastrlhf[inplace]")]["peak_mem_mb"] < 0.4
            assert by[(op, n, "torch")]["peak_mem_mb"] > 2 * grad_mb - 0.4
            for impl in ("liger", "flash-attn") if op == "logprobs-fwdbwd" else ("liger",):  # CUDA-only: a reason
                r = by[(op, n, impl)]
                assert r["status"] == "skipped" and r["reason"], r

    ratios = data["ratios"]
    assert {r["baseline"] for r in ratios} == {"torch"}
    assert all(r["speedup"] > 0 for r in ratios)
    if importlib.util.find_spec("matplotlib") is not None:  # plots are optional (the bench extra)
        assert (out / "grpo_V4096.png").stat().st_size > 0
        assert (out / "logprobs-fwdbwd_V4096.png").stat().st_size > 0
