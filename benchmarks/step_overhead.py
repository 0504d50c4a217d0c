"""How much time and memory DropGrad adds to an optimizer step.

Three contenders take turns, step by step, in one process, so that whatever
else the machine is doing slows them alike:

* ``bare``: the optimizer alone;
* ``dropgrad``: ``DropGrad`` around it (the gradient is masked);
* ``update``: ``DropGrad(..., target="update")``, which masks the change the
  optimizer makes and copies the parameters first;
* ``published``: the formulation first published for DropGrad,
  ``grad.mul_(torch.bernoulli(torch.full_like(grad, 1 - p))).div_(1 - p)``,
  as a small wrapper defined below.

The reported time of a contender is the median over the timed steps; ratios are
to the bare optimizer. A second measurement runs one step of each contender
around SGD on a single large parameter, each in a fresh process, and reports
how much the step raised the peak memory (peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA).

Usage::

    python benchmarks/step_overhead.py            # full run, a few minutes
    python benchmarks/step_overhead.py --quick    # tiny sizes, for CI
    python benchmarks/step_overhead.py --out DIR  # where results are written
    python benchmarks/step_overhead.py --device cuda  # AdamW fused and foreach on a GPU
    python benchmarks/step_overhead.py --compiled  # also torch.compile(opt.step), Adam foreach

Results go to ``DIR/step_overhead.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dropgrad import DropGrad, kernels

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
CONTENDERS = ("bare", "dropgrad", "update", "published")
LABELS = {"dropgrad": "DropGrad", "update": "DropGrad update", "published": "published"}
OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
CPU_OPTIMIZERS: dict[str, OptimizerFactory] = {
    "Adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "SGD": lambda params: torch.optim.SGD(params, lr=1e-3),
}
# On a GPU the baseline that matters is the fastest AdamW: fused, then foreach.
CUDA_OPTIMIZERS: dict[str, OptimizerFactory] = {
    "AdamW fused": lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True),
    "AdamW foreach": lambda params: torch.optim.AdamW(params, lr=1e-3, foreach=True),
}


def optimizers_for(device: torch.device) -> dict[str, OptimizerFactory]:
    return CUDA_OPTIMIZERS if device.type == "cuda" else CPU_OPTIMIZERS


# (total parameter elements, number of tensors they are split into)
FULL_CASES = [(10_000_000, 10), (10_000_000, 200), (1_000_000, 1000)]
# Small enough that no op reaches torch's parallel grain (32768 elements).
QUICK_CASES = [(16_000, 4), (16_000, 40), (8_000, 80)]
FULL_MEMORY_NUMEL = 100_000_000
QUICK_MEMORY_NUMEL = 1_000_000


class PublishedDropGrad:
    """The published DropGrad formulation: two full-size temporaries per gradient."""

    def __init__(self, optimizer: torch.optim.Optimizer, drop_rate: float) -> None:
        self.optimizer = optimizer
        self.drop_rate = drop_rate

    @torch.no_grad()
    def step(self) -> None:
        keep_prob = 1 - self.drop_rate
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    mask = torch.bernoulli(torch.full_like(param.grad, keep_prob))
                    param.grad.mul_(mask).div_(keep_prob)
        self.optimizer.step()


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, torch version and thread count of this run."""
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": cpu_model,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        # Which CPU mask kernel DropGrad's steps use: the native one, or torch ops and why.
        "cpu_mask_kernel": kernels.status()["native"],
    }


def make_parameters(
    total: int, tensors: int, device: torch.device, generator: torch.Generator
) -> list[torch.nn.Parameter]:
    """``tensors`` float32 parameters with ``total`` elements in all, gradients filled in."""
    params = []
    for _ in range(tensors):
        param = torch.nn.Parameter(torch.empty(total // tensors, device=device))
        param.data.normal_(generator=generator)
        param.grad = torch.empty_like(param).normal_(generator=generator)
        params.append(param)
    return params


def build_contender(
    name: str, optimizer_name: str, params: list[torch.nn.Parameter], drop_rate: float
) -> Any:
    device = params[0].device
    factories = {**optimizers_for(device), "SGD": CPU_OPTIMIZERS["SGD"]}
    optimizer = factories[optimizer_name](params)
    if name == "dropgrad":
        return DropGrad(optimizer, drop_rate=drop_rate, seed=0)
    if name == "update":
        return DropGrad(optimizer, drop_rate=drop_rate, seed=0, target="update")
    if name == "published":
        return PublishedDropGrad(optimizer, drop_rate)
    return optimizer


def interleaved_medians(
    steppers: dict[str, Callable[[], Any]],
    grads: dict[str, list[torch.Tensor]],
    fresh_grads: list[torch.Tensor],
    steps: int,
    warmup: int,
    device: torch.device,
) -> dict[str, float]:
    """Median milliseconds of each stepper, the steppers taking turns every step, each
    stepping on a fresh copy of ``fresh_grads`` written (untimed) into its ``grads``."""
    times: dict[str, list[float]] = {name: [] for name in steppers}
    order = list(steppers)
    for step in range(warmup + steps):
        # Rotating who goes first keeps any position effect (caches, turbo) off one contender.
        order = order[1:] + order[:1]
        for name in order:
            torch._foreach_copy_(grads[name], fresh_grads)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            steppers[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def time_case(
    total: int,
    tensors: int,
    optimizer_name: str,
    *,
    steps: int,
    warmup: int,
    drop_rate: float,
    device: torch.device,
) -> dict[str, Any]:
    """Median step time of each contender, the contenders taking turns every step.

    Before every step the gradients are overwritten with the same fresh values,
    untimed, as a backward pass would. Masking them again and again instead
    would leave a growing share of exact zeros that never see a gradient, and
    Adam's ``sqrt`` is several times slower on zeros than on positive numbers,
    which would charge the wrapped optimizer's slowdown to the wrappers.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    fresh_grads = [
        torch.empty(total // tensors, device=device).normal_(generator=generator)
        for _ in range(tensors)
    ]
    contenders = {}
    grads = {}
    for name in CONTENDERS:
        params = make_parameters(total, tensors, device, generator)
        contenders[name] = build_contender(name, optimizer_name, params, drop_rate)
        grads[name] = [param.grad for param in params]
    steppers = {name: contender.step for name, contender in contenders.items()}
    medians = interleaved_medians(steppers, grads, fresh_grads, steps, warmup, device)
    return {
        "case": f"{format_count(total)}/{tensors}",
        "total_params": total,
        "tensors": tensors,
        "optimizer": optimizer_name,
        "steps": steps,
        "median_ms": medians,
        "ratio_to_bare": {
            name: medians[name] / medians["bare"] for name in CONTENDERS if name != "bare"
        },
    }


def time_compiled_case(
    total: int, tensors: int, *, steps: int, warmup: int, drop_rate: float, device: torch.device
) -> dict[str, Any]:
    """``torch.compile(opt.step)`` (inductor) of Adam (foreach) bare and inside DropGrad,
    taking turns step by step as in :func:`time_case`; compilation happens in warm-up."""
    # Every case compiles the same step functions for new optimizers: start afresh, or
    # dynamo's per-function cache fills up and later cases would run eagerly.
    torch._dynamo.reset()
    generator = torch.Generator(device=device).manual_seed(0)
    fresh_grads = [
        torch.empty(total // tensors, device=device).normal_(generator=generator)
        for _ in range(tensors)
    ]
    steppers: dict[str, Callable[[], Any]] = {}
    grads = {}
    for name in ("bare", "dropgrad"):
        params = make_parameters(total, tensors, device, generator)
        optimizer: Any = torch.optim.Adam(params, lr=1e-3, foreach=True)
        if name == "dropgrad":
            optimizer = DropGrad(optimizer, drop_rate=drop_rate, seed=0)
        steppers[name] = torch.compile(optimizer.step)
        grads[name] = [param.grad for param in params]
    medians = interleaved_medians(steppers, grads, fresh_grads, steps, warmup, device)
    return {
        "case": f"{format_count(total)}/{tensors}",
        "total_params": total,
        "tensors": tensors,
        "optimizer": "Adam foreach, torch.compile(opt.step)",
        "steps": steps,
        "median_ms": medians,
        "ratio_to_bare": {"dropgrad": medians["dropgrad"] / medians["bare"]},
    }


def compiled_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| compiled step | params/tensors | bare (ms) | DropGrad (ms) | DropGrad / bare |",
        "|---|---|---:|---:|---:|",
    ]
    for row in results:
        ms = row["median_ms"]
        lines.append(
            f"| {row['optimizer']} | {row['case']} | {ms['bare']:.2f} | {ms['dropgrad']:.2f} "
            f"| {row['ratio_to_bare']['dropgrad']:.2f} |"
        )
    return "\n".join(lines)


def format_count(count: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if count >= size and count % size == 0:
            return f"{count // size}{unit}"
    return str(count)


# ----------------------------------------------------------------- peak memory


def memory_child(variant: str, numel: int, device_name: str) -> None:
    """Run one SGD step of ``variant`` and print how much it raised the peak memory (bytes)."""
    device = torch.device(device_name)
    generator = torch.Generator(device=device).manual_seed(0)
    param = torch.nn.Parameter(torch.empty(numel, device=device))
    param.data.normal_(generator=generator)
    param.grad = torch.empty_like(param).normal_(generator=generator)
    step = build_contender(variant, "SGD", [param], drop_rate=0.1).step
    # One-time setup, like importing torch, stays out of the step's figure: the native CPU
    # kernel is built (or loaded) and checked on first use, and that check runs a few torch
    # kernels for the first time, whose code pages alone raise the peak RSS by several MiB.
    native_status = kernels.status()["native"]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.max_memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        after = torch.cuda.max_memory_allocated(device)
    else:
        # ru_maxrss is in KiB on Linux; the parameter and gradient are already resident.
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "variant": variant,
                "peak_before": before,
                "peak_after": after,
                "native": native_status,
            }
        )
    )


def measure_peak_memory(numel: int, device: torch.device) -> dict[str, Any]:
    """Peak-memory rise of one step for each contender, each in a fresh process."""
    rises = {}
    for variant in CONTENDERS:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--memory-child",
            variant,
            "--memory-numel",
            str(numel),
            "--device",
            str(device),
        ]
        completed = subprocess.run(command, capture_output=True, text=True, check=True)
        report = json.loads(completed.stdout.strip().splitlines()[-1])
        rises[variant] = report["peak_after"] - report["peak_before"]
    mib = 1024 * 1024
    return {
        "numel": numel,
        "dtype": "float32",
        "device": str(device),
        "method": "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "peak RSS (ru_maxrss) of a fresh process",
        "step_peak_rise_mib": {name: rise / mib for name, rise in rises.items()},
        "extra_over_bare_mib": {
            name: (rises[name] - rises["bare"]) / mib for name in CONTENDERS if name != "bare"
        },
    }


# ------------------------------------------------------------------- reporting


def markdown_table(results: list[dict[str, Any]]) -> str:
    wrapped = [name for name in CONTENDERS if name != "bare"]
    header = ["optimizer", "params/tensors", "bare (ms)"]
    header += [f"{LABELS[name]} (ms)" for name in wrapped]
    header += [f"{LABELS[name]} / bare" for name in wrapped]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for row in results:
        ms, ratio = row["median_ms"], row["ratio_to_bare"]
        cells = [row["optimizer"], row["case"], f"{ms['bare']:.2f}"]
        cells += [f"{ms[name]:.2f}" for name in wrapped]
        cells += [f"{ratio[name]:.2f}" for name in wrapped]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_lines(memory: dict[str, Any]) -> str:
    rise, extra = memory["step_peak_rise_mib"], memory["extra_over_bare_mib"]
    rises = ", ".join(f"{LABELS.get(name, name)} {rise[name]:.1f} MiB" for name in CONTENDERS)
    extras = ", ".join(
        f"{LABELS[name]} {extra[name]:.1f} MiB" for name in CONTENDERS if name != "bare"
    )
    return (
        f"Peak memory of one SGD step on one {format_count(memory['numel'])}-element float32 "
        f"parameter ({memory['method']}): rise during the step: {rises}; "
        f"extra over bare: {extras}."
    )


def machine_line(machine: dict[str, Any]) -> str:
    return (
        f"Machine: {machine['cpu_model']}, {machine['logical_cores']} logical cores "
        f"({machine['usable_cores']} usable); torch {machine['torch_version']}, "
        f"{machine['torch_threads']} threads; Python {machine['python_version']}; "
        f"CPU mask kernel: {machine['cpu_mask_kernel']}."
    )


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{row['optimizer']}\n{row['case']}" for row in results]
    positions = range(len(results))
    wrapped = [name for name in CONTENDERS if name != "bare"]
    width = 0.8 / len(wrapped)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.6 * len(results)), 4.0))
    for number, name in enumerate(wrapped):
        offset = (number - (len(wrapped) - 1) / 2) * width
        values = [row["ratio_to_bare"][name] for row in results]
        bars = axes.bar([p + offset for p in positions], values, width, label=LABELS[name])
        axes.bar_label(bars, fmt="%.2f", fontsize=8)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks(list(positions), labels)
    axes.set_ylabel("step time / bare optimizer step time")
    axes.set_title("Optimizer step time with gradient dropping (median, lower is better)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (CI)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    parser.add_argument("--drop-rate", type=float, default=0.1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory part")
    parser.add_argument(
        "--compiled", action="store_true", help="also time torch.compile(opt.step) of Adam"
    )
    parser.add_argument("--memory-numel", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_child:
        memory_child(args.memory_child, args.memory_numel, args.device)
        return 0

    device = torch.device(args.device)
    cases = QUICK_CASES if args.quick else FULL_CASES
    steps = args.steps or (5 if args.quick else 25)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    machine = machine_info()
    print(machine_line(machine), flush=True)
    settings_line = (
        f"Median of {steps} steps after {warmup} warm-up steps, drop rate {args.drop_rate}, "
        "float32, contenders interleaved step by step."
    )
    print(settings_line)

    results = []
    for total, tensors in cases:
        for optimizer_name in optimizers_for(device):
            results.append(
                time_case(
                    total,
                    tensors,
                    optimizer_name,
                    steps=steps,
                    warmup=warmup,
                    drop_rate=args.drop_rate,
                    device=device,
                )
            )
    table = markdown_table(results)
    print(table, flush=True)
    compiled: list[dict[str, Any]] = []
    if args.compiled:
        for total, tensors in cases:
            compiled.append(
                time_compiled_case(
                    total,
                    tensors,
                    steps=steps,
                    # Compilation happens in the first steps; time none of them.
                    warmup=max(warmup, 3),
                    drop_rate=args.drop_rate,
                    device=device,
                )
            )
        print(compiled_table(compiled), flush=True)

    memory = None
    if not args.no_memory:
        numel = args.memory_numel or (QUICK_MEMORY_NUMEL if args.quick else FULL_MEMORY_NUMEL)
        memory = measure_peak_memory(numel, device)
        print(memory_lines(memory))

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine,
        "settings": {
            "quick": args.quick,
            "steps": steps,
            "warmup": warmup,
            "drop_rate": args.drop_rate,
            "device": str(device),
            "dtype": "float32",
        },
        "results": results,
        "compiled_results": compiled,
        "peak_memory": memory,
    }
    (args.out / "step_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = [machine_line(machine), settings_line, "", table]
    if compiled:
        markdown += ["", compiled_table(compiled)]
    if memory is not None:
        markdown += ["", memory_lines(memory)]
    (args.out / "step_overhead.md").write_text("\n".join(markdown) + "\n")
    plot(results, args.out / "step_overhead.png")
    print(f"Wrote {args.out / 'step_overhead.json'}, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
