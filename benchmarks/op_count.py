"""How many aten operations one optimizer step launches, with and without DropGrad.

Counts are what torch's profiler records for one step after two warm-up steps:
every ``aten::`` event, nested ones included (an in-place op that calls another
counts twice), on CPU with the default drop rate 0.1 and SGD, whose own step is
one ``add_`` per parameter. The counts do not depend on the machine's speed,
only on the torch version and the number of threads (blocks are cut the same
way whatever the thread count). DropGrad is counted twice: as a step runs it
(with the native CPU kernel when it could be built, which masks every float32
tensor of a step in one call), and on the torch-op path (pinned with
``DROPGRAD_BACKEND=torch``; it is also what runs with ``DROPGRAD_NATIVE=0`` or
no C compiler).

Usage::

    python benchmarks/op_count.py            # the README's cases
    python benchmarks/op_count.py --quick    # small cases, for CI
    python benchmarks/op_count.py --out DIR  # where results are written

Results go to ``DIR/op_count.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

# Run as a script, this file's folder is on sys.path: the parameters are the timing
# benchmark's, built the same way.
from step_overhead import make_parameters
from torch.profiler import ProfilerActivity, profile

from dropgrad import DropGrad, kernels

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
# (total parameter elements, number of tensors they are split into)
FULL_CASES = [
    (1_000_000, 1),
    (10_000_000, 1),
    (10_000_000, 10),
    (10_000_000, 200),
    (1_000_000, 1000),
]
QUICK_CASES = [(4_096, 1), (65_536, 1), (8_000, 80)]


def count_step_ops(optimizer: torch.optim.Optimizer) -> int:
    """aten events recorded while ``optimizer.step()`` runs once."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        optimizer.step()
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))


@contextmanager
def torch_op_backend() -> Iterator[None]:
    """Pin the torch-op mask backend (``DROPGRAD_BACKEND=torch``), then restore the setting."""
    before = os.environ.get("DROPGRAD_BACKEND")
    os.environ["DROPGRAD_BACKEND"] = "torch"
    try:
        yield
    finally:
        if before is None:
            del os.environ["DROPGRAD_BACKEND"]
        else:
            os.environ["DROPGRAD_BACKEND"] = before


def count_case(total: int, tensors: int) -> dict[str, Any]:
    params = make_parameters(total, tensors, torch.device("cpu"), torch.Generator().manual_seed(0))
    bare = torch.optim.SGD(params, lr=1e-3)
    wrapped = DropGrad(torch.optim.SGD(params, lr=1e-3), drop_rate=0.1, seed=0)
    for _ in range(2):  # warm-up: plans and buffers are built at the first step
        bare.step()
        wrapped.step()
    bare_ops, dropgrad_ops = count_step_ops(bare), count_step_ops(wrapped)
    with torch_op_backend():
        wrapped.step()  # warm-up: the torch-op path builds its own plans
        torch_path_ops = count_step_ops(wrapped)
    return {
        "numel": total,
        "tensors": tensors,
        "bare_ops": bare_ops,
        "dropgrad_ops": dropgrad_ops,
        "added_ops": dropgrad_ops - bare_ops,
        "torch_path_ops": torch_path_ops,
        "torch_path_added_ops": torch_path_ops - bare_ops,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| params/tensors | SGD (aten ops) | DropGrad + SGD (aten ops) | added by DropGrad "
        "| DropGrad + SGD, torch-op path | added on the torch-op path |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['numel']:,}/{row['tensors']:,} | {row['bare_ops']:,} "
            f"| {row['dropgrad_ops']:,} | {row['added_ops']:,} "
            f"| {row['torch_path_ops']:,} | {row['torch_path_added_ops']:,} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small cases, for CI")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    args = parser.parse_args(argv)
    rows = [count_case(*case) for case in (QUICK_CASES if args.quick else FULL_CASES)]
    header = (
        f"aten operations in one step (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU, drop rate 0.1, float32; "
        f"CPU mask kernel: {kernels.status()['native']}):"
    )
    table = markdown(rows)
    print(header, table, sep="\n\n")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "torch_version": torch.__version__,
        "cpu_mask_kernel": kernels.status()["native"],
        "quick": args.quick,
        "results": rows,
    }
    (args.out / "op_count.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "op_count.md").write_text(f"{header}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
