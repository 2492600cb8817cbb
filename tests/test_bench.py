"""``xenemu bench`` runs end to end and reports every figure (behaviour, never wall time): each
section as it finishes, files that ``--load``, ``--compare`` and ``--plot`` read back."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = [sys.executable, "-m", "xenemu", "bench"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, list[str], bool]:
    """One quick run: its JSON, the directory of its files, its streamed section lines, and
    whether the first section was printed while the benchmark was still running."""
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.Popen(
        [*BENCH, "--quick", "--json", "--out", str(out / "run.json"), "--csv", str(out / "run.csv")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None and proc.stdout is not None
    first = proc.stderr.readline()
    streamed = proc.poll() is None  # the first section came while later ones were still to run
    rest = proc.stderr.read()
    stdout = proc.stdout.read()
    assert proc.wait(600) == 0, rest
    return json.loads(stdout), out, [first, *rest.splitlines()], streamed


def test_sections_are_printed_as_they_finish(quick_run: tuple[dict[str, Any], Path, list[str], bool]) -> None:
    _results, _out, lines, streamed = quick_run
    assert streamed
    assert lines[0].startswith("memory: ") and "vITS:" in lines[1]
    assert lines[-1] == "audit after the run: clean"


def test_files_load_compare_and_plot(quick_run: tuple[dict[str, Any], Path, list[str], bool]) -> None:
    results, out, _lines, _streamed = quick_run
    assert json.loads((out / "run.json").read_text()) == results
    with (out / "run.csv").open() as f:
        rows = {row["figure"]: row["value"] for row in csv.DictReader(f)}
    assert rows["throughput[3].batch"] == "4096" and float(rows["vits.msis_per_s"]) > 0
    shown = subprocess.run([*BENCH, "--load", str(out / "run.json")], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "map+unmap throughput" in shown.stdout
    side = subprocess.run(
        [*BENCH, "--load", str(out / "run.json"), "--compare", str(out / "run.json"), "--plot", str(out / "run.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert side.returncode == 0, side.stderr
    assert "throughput[0].ops_per_s" in side.stdout
    assert (out / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    without = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['matplotlib'] = None; sys.argv = ['xenemu', *sys.argv[1:]]\n"
            "from xenemu.cli import main; main()",
            "bench",
            "--load",
            str(out / "run.json"),
            "--plot",
            str(out / "x.png"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        without.returncode == 2
        and without.stderr.strip() == "xenemu: --plot needs matplotlib: pip install 'xenemu[plot]'"
    )


def test_quick_bench_reports_every_figure(quick_run: tuple[dict[str, Any], Path, list[str], bool]) -> None:
    results = quick_run[0]
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
    live = results["live_migration"]
    assert live["guest_mib"] == 64 and live["audit_clean"] is True
    assert [row["rate_mib_s"] for row in live["rates"]] == [0.0, 10.0]
    for row in live["rates"]:  # every page crosses at least once; a page dirtied again crosses again
        assert row["pages_sent"] >= live["pages"] and row["rounds"] >= 2 and row["downtime_ms"] > 0
    idle, busy = live["rates"]
    assert idle["achieved_mib_s"] == 0 and idle["guest_pause_ms"] is None and busy["achieved_mib_s"] > 0
    assert busy["guest_pause_ms"] > 0 and busy["guest_other_pause_ms"] > 0  # its writes were refused at the stop
    assert set(live["targets"]) == {"rate_mib_s", "downtime_ms", "sent_ratio", "downtime_met", "sent_ratio_met"}
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
