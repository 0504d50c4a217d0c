"""Networks used by the experiments: a digits MLP, a character GRU and a functional MLP for MAML."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mlp(hidden: int = 128, dropout: float = 0.0, n_in: int = 64, n_out: int = 10) -> nn.Sequential:
    """``n_in -> hidden -> hidden -> n_out`` with ReLU, and Dropout after each hidden layer."""
    return nn.Sequential(
        nn.Linear(n_in, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, n_out),
    )


class CharGRU(nn.Module):
    """Embedding, one GRU layer, Dropout on its outputs, and a linear read-out."""

    def __init__(self, vocabulary: int, embed: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, embed)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocabulary)

    def forward(self, tokens: Tensor) -> Tensor:
        states, _ = self.gru(self.embed(tokens))
        return self.head(self.dropout(states))


# ---------------------------------------------------------------- MAML's functional MLP


def init_mlp_params(sizes: list[int], generator: torch.Generator) -> list[Tensor]:
    """Weights ``(in, out)`` and biases ``(1, out)`` for every layer, as ``nn.Linear`` draws them.

    The layout puts the task dimension first once expanded, so that a meta-batch of tasks runs
    as one batched matrix product (:func:`batched_mlp`).
    """
    params: list[Tensor] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        bound = 1.0 / math.sqrt(n_in)
        weight = (torch.rand(n_in, n_out, generator=generator) * 2 - 1) * bound
        bias = (torch.rand(1, n_out, generator=generator) * 2 - 1) * bound
        params += [weight.requires_grad_(), bias.requires_grad_()]
    return params


def batched_mlp(
    params: list[Tensor],
    x: Tensor,
    *,
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Forward ``x`` of shape ``(T, N, in)`` through per-task parameters ``(T, in, out)``.

    ReLU between layers; ``dropout > 0`` drops hidden units with masks drawn from
    ``generator`` (inverted dropout, so the expected activation is unchanged).
    """
    n_layers = len(params) // 2
    for layer in range(n_layers):
        x = torch.baddbmm(params[2 * layer + 1], x, params[2 * layer])
        if layer < n_layers - 1:
            x = F.relu(x)
            if dropout > 0.0:
                keep = torch.rand(x.shape, generator=generator) >= dropout
                x = x * keep / (1.0 - dropout)
    return x
