"""Runs the experiments' jobs, in one process or a pool, and rebuilds tables and figures.

An experiment module provides:

``FULL``, ``QUICK``
    configurations (dicts with a ``"seeds"`` entry);
``STAGES``
    functions ``plan(config, runs) -> jobs``; a later stage sees the runs of the earlier ones
    (the tuned comparison selects its settings before it runs its final seeds);
``run(job) -> result``
    one training run, a top-level function so a process pool can call it;
``summarize(runs, config) -> (rows, markdown_lines)`` and
``plot(runs, rows, config, where) -> [FigureRecord]``;
``unavailable() -> str | None`` (optional): why the experiment cannot run here.

A job is a JSON-serializable dict with at least ``experiment``, ``id``, ``setting``, ``arm``
and ``seed``. Every run uses one thread and its own seeded generators, so its result does not
depend on the number of processes or the order in which runs finish.
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from . import report

__all__ = ["EXPERIMENTS", "execute", "experiment", "rebuild", "run"]

#: In the order their sections appear in ``tables.md``.
EXPERIMENTS = (
    "meta_learning",
    "meta_learning_closer",
    "glyphs",
    "mechanism",
    "label_noise",
    "tuned",
    "masking",
    "language_model",
    "transformer_lm",
    "motion",
    "controls",
)


def experiment(name: str) -> ModuleType:
    return importlib.import_module(f"{__package__}.{name}")


def execute(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job and return its result with the job's identity and its duration."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    result = experiment(job["experiment"]).run(job)
    identity = {k: job[k] for k in ("experiment", "id", "setting", "arm", "seed")}
    return {**identity, **result, "seconds": round(time.perf_counter() - started, 3)}


def _run_jobs(jobs: list[dict[str, Any]], n_jobs: int, description: str) -> list[dict[str, Any]]:
    from tqdm import tqdm

    # Longest first, so the pool does not wait on one long run at the end.
    jobs = sorted(jobs, key=lambda j: -float(j.get("cost", 1.0)))
    results: list[dict[str, Any]] = []
    with tqdm(total=len(jobs), desc=description, unit="run", file=sys.stderr) as progress:
        if n_jobs <= 1:
            threads = torch.get_num_threads()
            try:
                for job in jobs:
                    results.append(execute(job))
                    progress.update()
            finally:
                torch.set_num_threads(threads)
        else:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(n_jobs) as pool:
                for result in pool.imap_unordered(execute, jobs):
                    results.append(result)
                    progress.update()
    return results


def _git_state() -> str:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{commit}+dirty" if dirty else commit or "unknown"


def _write(
    out: Path,
    name: str,
    runs: list[dict[str, Any]],
    config: dict[str, Any],
    invocation: dict[str, Any],
) -> None:
    ordered = sorted(runs, key=lambda r: r["id"])
    directory = out / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "runs.json").write_text(json.dumps(ordered) + "\n")
    meta = {
        "command": invocation["command"],
        "quick": invocation["quick"],
        "config": config,
        "runs": len(ordered),
        "cpu_seconds_in_runs": round(sum(r["seconds"] for r in ordered), 1),
        "invocation": {k: invocation[k] for k in ("experiments", "jobs", "wall_seconds", "done")},
        "git": invocation["git"],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def run(
    names: Sequence[str],
    configs: dict[str, dict[str, Any]],
    out: Path,
    *,
    n_jobs: int,
    command: str,
    quick: bool,
    resume: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Run every stage of every named experiment, writing ``<out>/<name>/runs.json``.

    The files are rewritten after every stage, so a run that stops part-way keeps the runs
    of the stages it finished (``meta.json`` then says ``"done": false``). With ``resume``
    the runs already in ``<out>/<name>/runs.json`` are kept and only jobs whose ``id`` is
    missing are run; since every run is deterministic, the result is the same as one
    uninterrupted run.
    """
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    if resume:
        for name in names:
            path = out / name / "runs.json"
            if path.is_file():
                runs[name] = json.loads(path.read_text())
    started = time.time()
    n_stages = max(len(experiment(name).STAGES) for name in names)
    # The checkout's state before anything is written: the results directory may be
    # tracked (the committed results are), and writing it would mark the checkout dirty.
    invocation = {
        "command": command,
        "quick": quick,
        "experiments": list(names),
        "jobs": n_jobs,
        "git": _git_state(),
    }
    for stage in range(n_stages):
        jobs = []
        for name in names:
            stages = experiment(name).STAGES
            if stage < len(stages):
                have = {r["id"] for r in runs[name]}
                jobs += [j for j in stages[stage](configs[name], runs[name]) if j["id"] not in have]
        if jobs:
            description = f"stage {stage + 1}/{n_stages}"
            for result in _run_jobs(jobs, n_jobs, description):
                runs[result["experiment"]].append(result)
        invocation["wall_seconds"] = round(time.time() - started, 1)
        for name in names:
            # Done when this experiment's own last stage has run, whatever the others do.
            done = stage + 1 >= len(experiment(name).STAGES)
            _write(out, name, runs[name], configs[name], {**invocation, "done": done})
    return runs


def rebuild(out: Path, figure_dir: Path) -> list[str]:
    """Rebuild every summary CSV, ``tables.md``, ``figures.json`` and figure from ``out``, and
    the calibration of the claimed nulls (``calibration.csv``; :func:`controls.calibrate`).

    Only the committed runs and configurations are read, so the output is byte-identical
    whenever the runs are. Returns the names of the experiments found.
    """
    found = [name for name in EXPERIMENTS if (out / name / "runs.json").is_file()]
    lines = [
        "# Generated tables",
        "",
        "Written by `python -m benchmarks.evidence`; do not edit by hand. Δ is the mean paired",
        "difference to the reference arm with the same seed and its 95% t-interval; p is the",
        "two-sided exact sign-flip test and p TOST the paired equivalence test against the stated",
        "margin, each with its Holm-adjusted value (one family per endpoint of an experiment) in",
        "brackets. Seeds are counted as better, worse or tied (exactly equal). Verdicts follow",
        "`benchmarks/evidence/stats.py`.",
        "",
    ]
    records: dict[str, Any] = {}
    for name in found:
        module = experiment(name)
        runs = json.loads((out / name / "runs.json").read_text())
        config = json.loads((out / name / "meta.json").read_text())["config"]
        rows, markdown = module.summarize(runs, config)
        report.write_csv(out / name / "summary.csv", rows)
        lines += markdown + [""]
        for record in module.plot(runs, rows, config, figure_dir):
            records[record.file] = record.panels
    from .controls import calibrate

    calibrated, markdown = calibrate(out)
    if calibrated:
        report.write_csv(out / "calibration.csv", calibrated)
        lines += markdown + [""]
    (out / "tables.md").write_text("\n".join(lines).rstrip("\n") + "\n")
    (out / "figures.json").write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    return found
