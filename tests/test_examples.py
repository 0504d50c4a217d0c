"""The example scripts run end to end (in smoke mode) and report sensible numbers."""

from __future__ import annotations

import math
import re
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
HELD_OUT_SIZE = 450
SMOKE_BATCHES = 5

# Each script and the runs its table must list, in order.
RUNS = {
    "basic_usage.py": [
        "plain Adam",
        "DropGrad, drop_rate=0.1",
        "DropGrad, weights 0.1 / biases 0.01",
    ],
    "lr_scheduler_integration.py": [
        "plain Adam + cosine LR",
        "DropGrad 0.1 + cosine LR",
        "DropGrad 0.2 -> 0 + cosine LR",
    ],
    "full_update_drop.py": [
        "plain Adam",
        "DropGrad 0.1, full_update_drop=True",
        "DropGrad 0.1, full_update_drop=0.25",
    ],
}


def run_main(script: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Call ``main(argv)`` of an example in this process and return its results."""
    # The scripts import their shared helpers as a top-level module, as they do
    # when started with ``python examples/<script>``.
    monkeypatch.syspath_prepend(str(EXAMPLES_DIR))
    namespace = runpy.run_path(str(EXAMPLES_DIR / script))
    threads = torch.get_num_threads()
    # As under ``python examples/<script>``: one thread, since the model is tiny.
    torch.set_num_threads(1)
    try:
        # The examples seed torch's global RNG; keep that from leaking into other tests.
        with torch.random.fork_rng():
            return namespace["main"](argv)
    finally:
        torch.set_num_threads(threads)


def check_metrics(result: dict[str, Any]) -> None:
    assert 0.0 <= result["accuracy"] <= 1.0
    # Accuracy is a count of correct held-out digits over their number.
    correct = result["accuracy"] * HELD_OUT_SIZE
    assert correct == pytest.approx(round(correct), abs=1e-3)
    assert math.isfinite(result["loss"]) and result["loss"] > 0.0


@pytest.fixture(scope="module")
def smoke_runs() -> dict[str, subprocess.CompletedProcess[str]]:
    """Each script run as ``python examples/<script> --smoke``, all started at once."""
    # Starting the interpreters together overlaps their slow torch and sklearn imports.
    processes = {
        script: subprocess.Popen(
            [sys.executable, str(EXAMPLES_DIR / script), "--smoke"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for script in RUNS
    }
    completed: dict[str, subprocess.CompletedProcess[str]] = {}
    try:
        for script, process in processes.items():
            stdout, stderr = process.communicate(timeout=300)
            completed[script] = subprocess.CompletedProcess(
                process.args, process.returncode, stdout, stderr
            )
    finally:
        # A timeout above must not leave the other scripts running.
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.communicate()
    return completed


@pytest.mark.parametrize("script", sorted(RUNS))
def test_smoke_run_prints_table(
    script: str, smoke_runs: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    completed = smoke_runs[script]
    assert completed.returncode == 0, completed.stderr
    # A warning here would mean the example misuses an API, e.g. the LR scheduler order.
    assert "Warning" not in completed.stderr, completed.stderr
    lines = completed.stdout.splitlines()
    assert "(smoke run)" in lines[0]
    assert re.match(r"run\s+held-out loss\s+held-out accuracy", lines[1])
    rows = lines[3 : 3 + len(RUNS[script])]
    assert len(rows) == len(RUNS[script])
    for name, line in zip(RUNS[script], rows):
        assert line.startswith(name)
        loss, accuracy = (float(cell) for cell in line[len(name) :].split()[:2])
        assert 0.0 <= accuracy <= 1.0
        assert math.isfinite(loss) and loss > 0.0
    assert lines[-1].startswith("Shows: ")


@pytest.mark.parametrize("script", sorted(RUNS))
def test_main_results_are_reproducible(script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    first = run_main(script, ["--smoke", "--seed", "3"], monkeypatch)
    again = run_main(script, ["--smoke", "--seed", "3"], monkeypatch)
    other = run_main(script, ["--smoke", "--seed", "4"], monkeypatch)
    for name in RUNS[script]:
        check_metrics(first[name])
        assert first[name] == again[name]
        assert first[name]["loss"] != other[name]["loss"]


def test_lr_and_drop_rate_schedules(monkeypatch: pytest.MonkeyPatch) -> None:
    epochs = 3
    results = run_main(
        "lr_scheduler_integration.py", ["--smoke", "--epochs", str(epochs)], monkeypatch
    )
    schedule = results["schedule"]
    assert [entry["epoch"] for entry in schedule] == list(range(epochs))
    total_steps = epochs * SMOKE_BATCHES
    for epoch, entry in enumerate(schedule):
        # CosineAnnealingLR steps once per epoch with T_max = epochs.
        expected_lr = 3e-3 * (1 + math.cos(math.pi * epoch / epochs)) / 2
        assert entry["lr"] == pytest.approx(expected_lr, rel=1e-9)
        # The drop-rate scheduler moves once per optimizer step, 0.2 down to 0.
        steps_done = epoch * SMOKE_BATCHES
        assert entry["drop_rate"] == pytest.approx(0.2 * (1 - steps_done / total_steps), rel=1e-9)


def test_full_update_drop_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    epochs = 4
    results = run_main("full_update_drop.py", ["--smoke", "--epochs", str(epochs)], monkeypatch)
    steps = epochs * SMOKE_BATCHES
    plain, skip_true, skip_quarter = (results[name] for name in RUNS["full_update_drop.py"])
    assert (plain["skipped"], plain["steps"]) == (0, steps)
    for result in (skip_true, skip_quarter):
        assert result["steps"] == steps
        assert 0 <= result["skipped"] <= steps
        assert result["skipped / steps"] == f"{result['skipped']} / {steps}"
    assert skip_true["expected skips"] == f"{0.1 * steps:.1f}"
    assert skip_quarter["expected skips"] == f"{0.25 * steps:.1f}"


def test_epochs_must_be_positive(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit, match="2"):
        run_main("basic_usage.py", ["--epochs", "0"], monkeypatch)
    assert "--epochs must be at least 1, got 0" in capsys.readouterr().err
