"""How many aten operations one optimizer step launches, with and without DropGrad.

Counts are what torch's profiler records for one step after two warm-up steps:
every ``aten::`` event, nested ones included (an in-place op that calls another
counts twice), on CPU with the default drop rate 0.1 and SGD, whose own step is
one ``add_`` per parameter. The counts do not depend on the machine's speed,
only on the torch version and the number of threads (blocks are cut the same
way whatever the thread count). DropGrad is counted three times: as a step runs it
(with the native CPU kernel when it could be built, which masks every float32
tensor of a step in one call), on the torch-op path (pinned with
``DROPGRAD_BACKEND=torch``; it is also what runs with ``DROPGRAD_NATIVE=0`` or
no C compiler), and on the Triton path that CUDA steps take, forced onto the CPU
tensors through Triton's interpreter (``TRITON_INTERPRET=1``,
``DROPGRAD_BACKEND=triton``; where Triton is missing those columns are empty).

On the Triton path the counts leave out what runs inside the kernel's launch:
under the interpreter the launch itself copies its tensor arguments to and from
host arrays (``triton_ops_inside_launches`` in the JSON), which a launch on a GPU
does not do. What
is counted is the step's own work around the launches, after one warm-up step
(which builds the cached launch table): the ops DropGrad adds per step and per
launch (one launch per bucket), and among them the copies (``copy_``, ``to``,
``_to_copy``, ``pin_memory``) and value reads (``item``), which on a GPU would be
host-to-device copies and host synchronisations.

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
from torch.profiler import ProfilerActivity, profile, record_function

from dropgrad import DropGrad, kernels
from dropgrad.kernels import _triton

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
def environment(**variables: str) -> Iterator[None]:
    """Set environment variables (``DROPGRAD_BACKEND`` and the like), then restore them."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


#: Ops that move data: on a GPU, host-to-device copies; and the ops that read a value back.
COPY_OPS = ("aten::copy_", "aten::to", "aten::_to_copy", "aten::pin_memory", "aten::_pin_memory")
READ_OPS = ("aten::item", "aten::_local_scalar_dense")
LAUNCH = "triton launch"


class LabelledKernel:
    """The jitted kernel, each launch recorded as one profiler range, ``LAUNCH``."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        def launch(*args: Any, **kwargs: Any) -> None:
            with record_function(LAUNCH):
                self.kernel[grid](*args, **kwargs)

        return launch


@contextmanager
def interpreted_triton() -> Iterator[None]:
    """Force the Triton backend onto CPU tensors through Triton's interpreter, with a
    kernel jitted for it (one jitted for a GPU may already be loaded) whose launches
    are labelled; afterwards the backend is as it was."""
    before = _triton._kernel_cache
    with environment(TRITON_INTERPRET="1", DROPGRAD_BACKEND="triton"):
        _triton._kernel_cache = {}
        try:
            _triton._kernel_cache["kernel"] = LabelledKernel(_triton._load_kernel())
            yield
        finally:
            _triton._kernel_cache = before


def _in_launch(event: Any) -> bool:
    while event is not None:
        if event.name == LAUNCH:
            return True
        event = event.cpu_parent
    return False


def count_triton_step(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """One step on the interpreted Triton path: aten ops outside the launches (all,
    copies, value reads), the launches, and the interpreter's ops inside them."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        optimizer.step()
    events = list(prof.events())
    aten = [event for event in events if event.name.startswith("aten::")]
    outside = [event.name for event in aten if not _in_launch(event)]
    return {
        "ops": len(outside),
        "copies": sum(name in COPY_OPS for name in outside),
        "reads": sum(name in READ_OPS for name in outside),
        "launches": sum(event.name == LAUNCH for event in events),
        "inside_launches": len(aten) - len(outside),
    }


def triton_available() -> bool:
    with environment(TRITON_INTERPRET="1"):
        return _triton.accepts([torch.ones(1)], "bernoulli")


def count_case(total: int, tensors: int, triton: bool) -> dict[str, Any]:
    params = make_parameters(total, tensors, torch.device("cpu"), torch.Generator().manual_seed(0))
    bare = torch.optim.SGD(params, lr=1e-3)
    wrapped = DropGrad(torch.optim.SGD(params, lr=1e-3), drop_rate=0.1, seed=0)
    for _ in range(2):  # warm-up: plans and buffers are built at the first step
        bare.step()
        wrapped.step()
    bare_ops, dropgrad_ops = count_step_ops(bare), count_step_ops(wrapped)
    with environment(DROPGRAD_BACKEND="torch"):
        wrapped.step()  # warm-up: the torch-op path builds its own plans
        torch_path_ops = count_step_ops(wrapped)
    row: dict[str, Any] = {
        "numel": total,
        "tensors": tensors,
        "bare_ops": bare_ops,
        "dropgrad_ops": dropgrad_ops,
        "added_ops": dropgrad_ops - bare_ops,
        "torch_path_ops": torch_path_ops,
        "torch_path_added_ops": torch_path_ops - bare_ops,
        "triton_path_ops": None,
        "triton_path_added_ops": None,
        "triton_launches": None,
        "triton_added_ops_per_launch": None,
        "triton_copies": None,
        "triton_reads": None,
        "triton_ops_inside_launches": None,
    }
    if triton:
        with interpreted_triton():
            wrapped.step()  # warm-up: builds the launch table the later steps reuse
            counted = count_triton_step(wrapped)
        added = counted["ops"] - bare_ops
        row.update(
            triton_path_ops=counted["ops"],
            triton_path_added_ops=added,
            triton_launches=counted["launches"],
            triton_added_ops_per_launch=added / max(counted["launches"], 1),
            triton_copies=counted["copies"],
            triton_reads=counted["reads"],
            triton_ops_inside_launches=counted["inside_launches"],
        )
    return row


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.2f}".rstrip("0").rstrip(".") if isinstance(value, float) else f"{value:,}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| params/tensors | SGD (aten ops) | DropGrad + SGD (aten ops) | added by DropGrad "
        "| DropGrad + SGD, torch-op path | added on the torch-op path "
        "| added on the Triton path (launches) | per launch | copies, value reads |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['numel']:,}/{row['tensors']:,} | {row['bare_ops']:,} "
            f"| {row['dropgrad_ops']:,} | {row['added_ops']:,} "
            f"| {row['torch_path_ops']:,} | {row['torch_path_added_ops']:,} "
            f"| {_cell(row['triton_path_added_ops'])} ({_cell(row['triton_launches'])}) "
            f"| {_cell(row['triton_added_ops_per_launch'])} "
            f"| {_cell(row['triton_copies'])}, {_cell(row['triton_reads'])} |"
        )
    return "\n".join(lines)


def _triton_version() -> str:
    import triton

    return str(triton.__version__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small cases, for CI")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    args = parser.parse_args(argv)
    triton = triton_available()
    cases = QUICK_CASES if args.quick else FULL_CASES
    rows = [count_case(*case, triton=triton) for case in cases]
    header = (
        f"aten operations in one step (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU, drop rate 0.1, float32; "
        f"CPU mask kernel: {kernels.status()['native']}). The Triton path runs on these CPU "
        "tensors under Triton's interpreter (TRITON_INTERPRET=1, DROPGRAD_BACKEND=triton"
        + (f", Triton {_triton_version()}" if triton else "; Triton is missing here: n/a")
        + "); its counts leave out the interpreter's own ops inside each launch, and "
        "count the copies (copy_, to, _to_copy, pin_memory) and value reads (item) "
        "among the ops added:"
    )
    table = markdown(rows)
    print(header, table, sep="\n\n")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "torch_version": torch.__version__,
        "cpu_mask_kernel": kernels.status()["native"],
        "triton_version": _triton_version() if triton else None,
        "quick": args.quick,
        "results": rows,
    }
    (args.out / "op_count.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "op_count.md").write_text(f"{header}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
