"""Command line: ``python -m benchmarks.evidence``, run from the repository root.

Examples::

    python -m benchmarks.evidence --jobs 16       # full run: results and docs/figures
    python -m benchmarks.evidence --quick         # CI smoke run, to a temporary directory
    python -m benchmarks.evidence --from-results  # rebuild tables and figures, no training
    python -m benchmarks.evidence --experiments meta_learning motion --jobs 2
    python -m benchmarks.evidence --experiments tuned --resume --jobs 2  # finish a cut-off run

Cost of the full run: 3,034 training runs. The first 1,908 (experiments 1 to 6 and the
motion measurement) took about 2,800 CPU-seconds on the 2-core Intel Xeon that made the
first committed run (see "Reproducing the numbers" in docs/analysis.md); the 550 added later
(experiment 3's controls and longer horizon, experiments 1b and 7, the positive controls)
recorded about 4,300 s on a shared machine, and the last 576 (experiment 1b's seeds 20-59
and tuned first-order arms, experiment 1c on font glyphs, a third seed of experiment 5's
learning-rate check) about 6,200 s. Each run uses one
thread, so ``--jobs 2`` takes about half as long as ``--jobs 1``. ``--quick`` uses about 30
CPU-seconds. Experiment 1c needs Debian's ``fonts-noto-core`` and is skipped without it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from . import runner

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "evidence"
DOC_FIGURES = REPO_ROOT / "docs" / "figures"


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.evidence",
        description="Experiments behind docs/analysis.md: run them, or rebuild their reports.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny settings for CI (< 60 s)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results directory (default {_display(DEFAULT_OUT)}; a temporary one with --quick)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="worker processes, one thread each (default 1)"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per arm, for every experiment"
    )
    parser.add_argument(
        "--experiments",
        nargs="+",
        choices=runner.EXPERIMENTS,
        default=list(runner.EXPERIMENTS),
        help="experiments to run (default: all)",
    )
    parser.add_argument(
        "--from-results",
        action="store_true",
        help="rebuild summaries, tables.md and figures from the runs.json files in --out",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in --out and run only the missing ones",
    )
    return parser.parse_args(argv)


def figure_dir(out: Path) -> Path:
    """The document's figures for the default results directory, else ``<out>/figures``."""
    return DOC_FIGURES if out.resolve() == DEFAULT_OUT.resolve() else out / "figures"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}")
    if args.seeds is not None and args.seeds < 1:
        raise SystemExit(f"--seeds must be at least 1, got {args.seeds}")
    if args.out is not None:
        out = args.out
    elif args.quick:
        out = Path(tempfile.mkdtemp(prefix="evidence-quick-"))
    else:
        out = DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    if not args.from_results:
        names, configs = [], {}
        for name in args.experiments:
            module = runner.experiment(name)
            reason = getattr(module, "unavailable", lambda: None)()
            if reason:
                print(f"skipping {name}: {reason}", file=sys.stderr)
                continue
            config = json.loads(json.dumps(module.QUICK if args.quick else module.FULL))
            if args.seeds is not None:
                config["seeds"] = args.seeds
                if "lm_seeds" in config:  # experiment 5's language-model settings
                    config["lm_seeds"] = args.seeds
            names.append(name)
            configs[name] = config
        if names:
            command = " ".join(
                ["python -m benchmarks.evidence", *(sys.argv[1:] if argv is None else argv)]
            )
            runner.run(
                names,
                configs,
                out,
                n_jobs=args.jobs,
                command=command,
                quick=args.quick,
                resume=args.resume,
            )
    found = runner.rebuild(out, figure_dir(out))
    if not found:
        print(f"no results in {out}", file=sys.stderr)
        return 1
    print(f"tables: {out / 'tables.md'}; figures: {figure_dir(out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
