"""Statistical checks of DropGrad's keyed mask bits.

Every mask bit is a function of (seed, step, parameter, element), computed by
hashing (see ``dropgrad/_random.py``). These checks ask whether the bits behave
like independent uniform ones where DropGrad relies on it:

* ``uniform``: the 16-bit lane values of one stream, over all 65536 values;
* ``neighbours``: the two lanes of one 32-bit word (elements ``2w`` and ``2w+1``);
* ``parameters``: the same element of parameters ``k`` and ``k + 1`` in one step;
* ``steps``: the same element of one parameter at steps ``s`` and ``s + 1``;
* ``seeds``: the same element under seeds that differ in one high bit;
* ``avalanche``: flipping one bit of the hash input flips each output bit with
  probability 1/2 (the worst of the 32 x 32 input/output bit pairs is reported);
* ``drop runs``: at drop rate 0.1, the lengths of runs of consecutive drops
  against the geometric law independent drops would give.

Each joint test is a chi-square over the top 8 bits of the two lanes (65536
cells); a chi-square statistic is reported as ``z = (X - df) / sqrt(2 df)``,
which is roughly standard normal for independent uniform bits. Fixed seeds, so
the output is reproducible.

Usage::

    python benchmarks/mask_quality.py            # 2**24 samples per test
    python benchmarks/mask_quality.py --quick    # 2**18 samples, for CI
    python benchmarks/mask_quality.py --out DIR  # writes DIR/mask_quality.json and .md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from dropgrad._random import MASK_DOMAIN, stream_key, words_reference
from dropgrad.kernels._reference import lanes_reference

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SEED = 20261122


def chi_square_z(counts: torch.Tensor) -> float:
    """z-score of the chi-square statistic of ``counts`` against equal cell probabilities."""
    counts = counts.to(torch.float64)
    expected = counts.sum() / counts.numel()
    statistic = float(((counts - expected) ** 2 / expected).sum())
    df = counts.numel() - 1
    return (statistic - df) / math.sqrt(2 * df)


def lanes(seed: int, step: int, index: int, count: int, first: int = 0) -> torch.Tensor:
    key = stream_key(seed, MASK_DOMAIN, step, index)
    return lanes_reference(key, torch.arange(first, first + count, dtype=torch.int64))


def joint_z(first: torch.Tensor, second: torch.Tensor) -> float:
    cells = (first >> 8) * 256 + (second >> 8)
    return chi_square_z(torch.bincount(cells, minlength=65536))


def scalar_lowbias32(value: int) -> int:
    """The word hash (Wellons' lowbias32) on one Python integer, as documented."""
    mask = (1 << 32) - 1
    x = value & mask
    x ^= x >> 16
    x = (x * 0x7FEB352D) & mask
    x ^= x >> 15
    x = (x * 0x846CA68B) & mask
    return x ^ (x >> 16)


def avalanche_worst(samples: int) -> float:
    """Largest distance from 1/2 of any input-bit / output-bit flip probability."""
    generator = torch.Generator().manual_seed(SEED)
    inputs = torch.randint(0, 2**32, (samples,), dtype=torch.int64, generator=generator)
    key = stream_key(SEED, MASK_DOMAIN, 0, 0)
    # words_reference hashes b + a * w; with a = 1, b = 0 it hashes w itself.
    identity = type(key)(a=1, b=0)
    base = words_reference(identity, inputs)
    worst = 0.0
    for bit in range(32):
        flipped = words_reference(identity, inputs ^ (1 << bit))
        changed = base ^ flipped
        for out_bit in range(32):
            probability = float(((changed >> out_bit) & 1).double().mean())
            worst = max(worst, abs(probability - 0.5))
    # Spot-check against the hash written out on one Python integer.
    assert int(base[0]) == scalar_lowbias32(int(inputs[0]))
    return worst


def drop_runs(samples: int, rate: float = 0.1) -> dict[str, Any]:
    """Observed against expected counts of maximal runs of drops of length 1, 2, 3, >= 4."""
    threshold = round(rate * 65536)
    realized = threshold / 65536
    dropped = lanes(SEED, 0, 0, samples) < threshold
    padded = torch.cat([torch.tensor([False]), dropped, torch.tensor([False])]).to(torch.int8)
    edges = padded[1:] - padded[:-1]
    starts = torch.nonzero(edges == 1).view(-1)
    ends = torch.nonzero(edges == -1).view(-1)
    lengths = ends - starts
    observed = [int((lengths == k).sum()) for k in (1, 2, 3)] + [int((lengths >= 4).sum())]
    runs = len(lengths)
    # Independent drops: a run has length k with probability q^(k-1) (1 - q).
    probabilities = [realized ** (k - 1) * (1 - realized) for k in (1, 2, 3)]
    probabilities.append(realized**3)
    expected = [runs * p for p in probabilities]
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    return {
        "observed": observed,
        "expected": [round(e, 1) for e in expected],
        "chi2_df3": statistic,
    }


def run(samples: int) -> dict[str, Any]:
    base = lanes(SEED, 0, 0, samples)
    results: dict[str, Any] = {"samples": samples}
    results["uniform_z"] = chi_square_z(torch.bincount(base, minlength=65536))
    results["neighbours_z"] = joint_z(base[0::2], base[1::2])
    results["parameters_z"] = joint_z(base, lanes(SEED, 0, 1, samples))
    results["steps_z"] = joint_z(base, lanes(SEED, 1, 0, samples))
    results["seeds_z"] = joint_z(base, lanes(SEED ^ (1 << 63), 0, 0, samples))
    results["shifted_stream_z"] = joint_z(base[1:], lanes(SEED, 0, 1, samples - 1, first=0))
    results["avalanche_worst_deviation"] = avalanche_worst(min(samples, 1 << 16))
    results["drop_runs"] = drop_runs(samples)
    return results


def markdown(results: dict[str, Any]) -> str:
    runs = results["drop_runs"]
    rows = [
        ("lane values, 65536 cells", f"{results['uniform_z']:+.2f}"),
        ("two lanes of one word", f"{results['neighbours_z']:+.2f}"),
        ("parameters k and k+1, same step", f"{results['parameters_z']:+.2f}"),
        ("steps s and s+1, same parameter", f"{results['steps_z']:+.2f}"),
        ("seeds differing in bit 63", f"{results['seeds_z']:+.2f}"),
        ("parameter k+1 shifted by one element", f"{results['shifted_stream_z']:+.2f}"),
    ]
    lines = [
        f"Keyed mask bits, {results['samples']} samples per test (chi-square z-scores; "
        "|z| < 4 is what independent uniform bits give almost always).",
        "",
        "| test | z |",
        "|---|---:|",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
        f"Avalanche: worst input-bit/output-bit flip probability deviates from 1/2 by "
        f"{results['avalanche_worst_deviation']:.4f}.",
        f"Runs of drops at rate 0.1 (lengths 1, 2, 3, >= 4): observed {runs['observed']}, "
        f"expected {runs['expected']}, chi-square {runs['chi2_df3']:.2f} on 3 df.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="2**18 samples per test (CI)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    args = parser.parse_args(argv)
    results = run(1 << (18 if args.quick else 24))
    text = markdown(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mask_quality.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "mask_quality.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
