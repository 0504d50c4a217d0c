"""One training run of a digits classifier, configured by a JSON-serializable spec.

Experiments 2 to 5 differ only in the spec they pass, so they share this loop. Keys of a spec
(every key has the default shown in ``DEFAULT_SPEC``):

``model``, ``hidden``, ``dropout``
    ``"mlp"`` (64-hidden-hidden-10) or ``"cnn"``; Dropout rate after each hidden layer.
``optimizer``, ``lr``, ``momentum``, ``weight_decay``
    ``"adam"`` or ``"sgd"`` (momentum 0 is plain SGD); weight decay is the optimizer's own
    coupled L2 term.
``batch_size``, ``steps``, ``eval_every``
    Minibatches are read off successive permutations of the training set
    (:func:`data.index_stream`); a batch size at least the training-set size is full-batch.
``train_per_class``, ``val_per_class``, ``label_noise``
    The seed's stratified split; a fraction of training labels replaced by another class.
``dropgrad``
    ``None``, or keyword arguments for ``DropGrad`` (``drop_rate``, ``distribution``,
    ``target``, ``granularity``, ``full_update_drop``); the run's seed is added.
``noise``
    ``None``, or ``{"kind": ..., "drop_rate": p}``: isotropic Gaussian noise added to every
    gradient element before the step, with the total variance DropGrad at rate ``p`` would
    add. ``"matched"`` matches it at every step,
    ``sigma_t^2 = p / (1 - p) * |g_t|^2 / d``; ``"fixed"`` keeps the variance matched at the
    first step, ``sigma_0``; ``"annealed"`` decays it as ``sigma_0^2 / (1 + t)^0.55``
    (Neelakantan et al., 2015).

A seed fixes the split, the label noise, the initial weights, the batch order and the
random streams of DropGrad, Dropout and the noise, so two specs run with one seed are paired.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data, models

DEFAULT_SPEC: dict[str, Any] = {
    "model": "mlp",
    "hidden": 128,
    "dropout": 0.0,
    "optimizer": "adam",
    "lr": 1e-3,
    "momentum": 0.0,
    "weight_decay": 0.0,
    "batch_size": 20,
    "steps": 600,
    "eval_every": 50,
    "train_per_class": 20,
    "val_per_class": 0,
    "label_noise": 0.0,
    "dropgrad": None,
    "noise": None,
}

#: Exponent of the annealed noise schedule (Neelakantan et al., 2015).
NOISE_DECAY = 0.55


def cnn(dropout: float = 0.0) -> nn.Sequential:
    """Two 3x3 convolutions (8 and 16 channels), 2x2 max-pooling, then 256 -> 64 -> 10."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(16 * 4 * 4, 64),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(64, 10),
    )


def build_model(spec: dict[str, Any]) -> nn.Module:
    if spec["model"] == "mlp":
        return models.mlp(spec["hidden"], spec["dropout"])
    if spec["model"] == "cnn":
        return cnn(spec["dropout"])
    raise ValueError(f"unknown model {spec['model']!r}")


def build_optimizer(spec: dict[str, Any], model: nn.Module, seed: int) -> torch.optim.Optimizer:
    params = model.parameters()
    if spec["optimizer"] == "adam":
        base: torch.optim.Optimizer = torch.optim.Adam(
            params, lr=spec["lr"], weight_decay=spec["weight_decay"]
        )
    elif spec["optimizer"] == "sgd":
        base = torch.optim.SGD(
            params, lr=spec["lr"], momentum=spec["momentum"], weight_decay=spec["weight_decay"]
        )
    else:
        raise ValueError(f"unknown optimizer {spec['optimizer']!r}")
    if not spec["dropgrad"]:
        return base
    from dropgrad import DropGrad

    return DropGrad(base, **spec["dropgrad"], seed=seed)


class IsotropicNoise:
    """Adds ``N(0, sigma_t^2)`` to every gradient element; see the module docstring."""

    def __init__(self, kind: str, drop_rate: float, seed: int) -> None:
        if kind not in ("matched", "fixed", "annealed"):
            raise ValueError(f"unknown noise kind {kind!r}")
        self.kind = kind
        self.ratio = drop_rate / (1.0 - drop_rate)
        self.generator = torch.Generator().manual_seed(seed + 7_919)
        self.initial_variance: float | None = None
        self.step = 0

    def __call__(self, params: list[Tensor]) -> float:
        """Perturb the gradients of ``params`` in place; return the variance used."""
        grads = [p.grad for p in params if p.grad is not None]
        count = sum(g.numel() for g in grads)
        matched = self.ratio * float(sum(g.pow(2).sum() for g in grads)) / count
        if self.initial_variance is None:
            self.initial_variance = matched
        if self.kind == "matched":
            variance = matched
        elif self.kind == "fixed":
            variance = self.initial_variance
        else:
            variance = self.initial_variance / (1.0 + self.step) ** NOISE_DECAY
        std = math.sqrt(variance)
        for g in grads:
            g.add_(torch.randn(g.shape, generator=self.generator), alpha=std)
        self.step += 1
        return variance


@torch.no_grad()
def _evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    """Mean cross-entropy and the predicted classes, in evaluation mode."""
    model.eval()
    logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), logits.argmax(1)


def train(spec: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train as ``spec`` says (missing keys take ``DEFAULT_SPEC``); return final values and curves.

    Curves are recorded every ``eval_every`` steps and at the last step: training loss and
    accuracy on the labels trained on, test (and validation) loss and accuracy, and with
    label noise the share of the relabelled examples predicted as their noisy label
    (``memorized``) and as their true label (``noisy_true``).
    """
    torch.set_num_threads(1)
    spec = {**DEFAULT_SPEC, **spec}
    x_all, y_all = data.digits()
    split = data.stratified_split(seed, spec["train_per_class"], spec["val_per_class"])
    x_train, y_true = x_all[split.train], y_all[split.train]
    y_train, relabelled = y_true, torch.zeros(len(y_true), dtype=torch.bool)
    if spec["label_noise"] > 0:
        y_train, relabelled = data.symmetric_label_noise(y_true, spec["label_noise"], seed)
    torch.manual_seed(seed)
    model = build_model(spec)
    optimizer = build_optimizer(spec, model, seed)
    params = [p for p in model.parameters()]
    noise = None
    if spec["noise"]:
        noise = IsotropicNoise(spec["noise"]["kind"], spec["noise"]["drop_rate"], seed)
    batches = data.index_stream(len(y_train), spec["batch_size"], spec["steps"], seed)
    curves: dict[str, list[float]] = {}

    def record(step: int) -> None:
        values: dict[str, float] = {"step": step}
        loss, predicted = _evaluate(model, x_train, y_train)
        values["train_loss"] = loss
        values["train_acc"] = (predicted == y_train).float().mean().item()
        clean = ~relabelled
        values["clean_train_acc"] = (predicted[clean] == y_train[clean]).float().mean().item()
        if bool(relabelled.any()):
            on_noisy = predicted[relabelled]
            values["memorized"] = (on_noisy == y_train[relabelled]).float().mean().item()
            values["noisy_true"] = (on_noisy == y_true[relabelled]).float().mean().item()
        for name, index in (("test", split.test), ("val", split.val)):
            if len(index):
                loss, predicted = _evaluate(model, x_all[index], y_all[index])
                values[f"{name}_loss"] = loss
                values[f"{name}_acc"] = (predicted == y_all[index]).float().mean().item()
        for key, value in values.items():
            curves.setdefault(key, []).append(value)

    for step, batch in enumerate(batches, start=1):
        optimizer.zero_grad()
        F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
        if noise is not None:
            noise(params)
        optimizer.step()
        if step % spec["eval_every"] == 0 or step == spec["steps"]:
            record(step)
    final = {key: values[-1] for key, values in curves.items() if key != "step"}
    final["collapsed"] = not math.isfinite(final["train_loss"]) or final["clean_train_acc"] < 0.5
    return {"final": final, "curves": curves}


def job(experiment: str, setting: str, arm: str, seed: int, spec: dict[str, Any]) -> dict[str, Any]:
    """A runner job that trains ``spec`` with ``seed``; its cost estimate is the step count."""
    full = {**DEFAULT_SPEC, **spec}
    return {
        "experiment": experiment,
        "id": f"{setting}/{arm}/{seed:03d}",
        "setting": setting,
        "arm": arm,
        "seed": seed,
        "spec": full,
        "cost": full["steps"] * (3.0 if full["model"] == "cnn" else 1.0),
    }


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    return train(job["spec"], job["seed"])
