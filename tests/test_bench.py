"""``xenemu bench`` runs end to end and reports every figure (behaviour, never wall time)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_quick_bench_reports_every_figure() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "xenemu", "bench", "--quick", "--json"], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)
    assert [row["batch"] for row in results["throughput"]] == [1, 16, 256, 4096]
    for row in results["throughput"]:
        assert row["ops_per_s"] > 0 and row["echo_ops_per_s"] > 0 and row["ratio"] > 0
        # exactly one flush per call, or per continuation segment (1,024 ops)
        segments = max(1, row["batch"] // 1024)
        assert row["flushes_added_per_call"] == row["flushes_modified_per_call"] == segments / 2
    assert set(results["latency_us"]) == {"p50", "p99", "echo_p50", "echo_p99", "p50_ratio"}
    assert [r["live_mappings"] for r in results["scaling"]] == [1_000, 10_000, 50_000]
    assert [r["entries_on_frame"] for r in results["m2b"]] == [1, 1_000]
    assert results["bytes_per_live_mapping"] > 0
    assert "bytes_per_untouched_guest_frame" in results
    assert set(results["fairness_us"]) == {"alone_p50", "alone_p99", "flood_p50", "flood_p99"}
    assert set(results["balloon_frames_per_s"]) == {"invalidate", "swap_mfn"}
    hostile = results["hostile_us"]
    assert set(hostile) == {"alone_p99", "invalid", "failing", "sparse", "lifecycle", "sparse_bytes_per_mapping_peak"}
    assert all(set(hostile[k]) == {"p50", "p99"} for k in ("invalid", "failing", "sparse"))
    assert results["audit_clean"] is True
    migration = results["migration"]
    assert migration["guest_mib"] == 64 and migration["image_mib"] > 64 and migration["audit_clean"] is True
    assert migration["save_s_per_gib"] > 0 and migration["restore_s_per_gib"] > 0
    vits = results["vits"]
    assert vits["guest_commands_per_s"] > 0 and vits["msis_per_s"] > 0
    assert set(vits["victim_ms"]) == {
        "alone_p50",
        "alone_p99",
        "flood_p50",
        "flood_p99",
        "passes_per_call_alone",
        "passes_per_call_flood",
    }
    table = vits["physical_per_guest_command"]
    assert set(table) == {"lazy", "eager", "off"}
    # eager sends an INV for every enable it traps; lazy turns 256 enables into one INVALL per collection
    assert table["eager"]["enable-all-invall"] > 10 * table["lazy"]["enable-all-invall"]
