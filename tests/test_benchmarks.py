"""The step-overhead benchmark runs end to end in quick mode and writes its reports.

Only the shape of the output is checked: timings depend on the machine and are
never asserted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dropgrad import kernels

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_overhead.py"
CONTENDERS = {"bare", "dropgrad", "update", "published"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("step_overhead")
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--compiled", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return completed, out


def test_quick_run_exits_cleanly(quick_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    completed, _ = quick_run
    assert completed.returncode == 0, completed.stderr
    assert "DropGrad / bare" in completed.stdout
    assert "torch " in completed.stdout and "threads" in completed.stdout


def test_quick_run_writes_json_with_expected_keys(
    quick_run: tuple[subprocess.CompletedProcess, Path],
) -> None:
    _, out = quick_run
    report = json.loads((out / "step_overhead.json").read_text())
    assert set(report) == {"machine", "settings", "results", "compiled_results", "peak_memory"}
    # --compiled: torch.compile(opt.step) of Adam, bare and inside DropGrad, per case.
    compiled = report["compiled_results"]
    assert [row["case"] for row in compiled] == [row["case"] for row in report["results"][::2]]
    for row in compiled:
        ms = row["median_ms"]
        assert set(ms) == {"bare", "dropgrad"} and min(ms.values()) > 0
        assert row["ratio_to_bare"]["dropgrad"] == ms["dropgrad"] / ms["bare"]
    assert {"cpu_model", "logical_cores", "torch_version", "torch_threads"} <= set(
        report["machine"]
    )
    assert report["settings"]["quick"] is True
    # Three cases, each with Adam and SGD.
    results = report["results"]
    assert len(results) == 6
    assert {row["optimizer"] for row in results} == {"Adam", "SGD"}
    for row in results:
        assert set(row["median_ms"]) == CONTENDERS
        assert set(row["ratio_to_bare"]) == CONTENDERS - {"bare"}
        for name, ratio in row["ratio_to_bare"].items():
            expected = row["median_ms"][name] / row["median_ms"]["bare"]
            assert ratio == pytest.approx(expected)
            assert math.isfinite(ratio) and ratio > 0
    memory = report["peak_memory"]
    assert set(memory["step_peak_rise_mib"]) == CONTENDERS
    assert set(memory["extra_over_bare_mib"]) == CONTENDERS - {"bare"}
    rises = memory["step_peak_rise_mib"]
    assert all(rise >= 0 for rise in rises.values())
    assert memory["extra_over_bare_mib"]["dropgrad"] == pytest.approx(
        rises["dropgrad"] - rises["bare"]
    )


def test_quick_run_writes_markdown_and_png(
    quick_run: tuple[subprocess.CompletedProcess, Path],
) -> None:
    _, out = quick_run
    markdown = (out / "step_overhead.md").read_text()
    assert "| optimizer | params/tensors |" in markdown
    assert markdown.count("| Adam |") == 3 and markdown.count("| SGD |") == 3
    assert "Peak memory" in markdown
    png = (out / "step_overhead.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_op_count_quick_run_writes_its_reports(tmp_path: Path) -> None:
    script = SCRIPT.parent / "op_count.py"
    completed = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads((tmp_path / "op_count.json").read_text())
    assert report["quick"] is True
    rows = report["results"]
    assert [(row["numel"], row["tensors"]) for row in rows] == [
        (4_096, 1),
        (65_536, 1),
        (8_000, 80),
    ]
    for row in rows:
        # SGD's own step on CPU is one add_ per parameter.
        assert row["bare_ops"] == row["tensors"]
        assert row["added_ops"] == row["dropgrad_ops"] - row["bare_ops"]
        assert row["torch_path_added_ops"] == row["torch_path_ops"] - row["bare_ops"] > 0
        # The torch-op path hashes, compares and scales with separate ops; the native
        # kernel derives the keys and masks all of a bucket's tensors in one call, with
        # no aten op at all. Without it, both counts are the torch-op path's.
        if kernels.backend_available("native"):
            assert row["added_ops"] == 0
        else:
            assert row["torch_path_added_ops"] == row["added_ops"]
    assert report["cpu_mask_kernel"] == kernels.status()["native"]
    assert (tmp_path / "op_count.md").read_text().count("\n| ") == len(rows) + 1
