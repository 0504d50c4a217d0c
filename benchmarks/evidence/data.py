"""Data for the experiments: scikit-learn's digits and the text of Python's help topics.

Nothing is downloaded. Every split and every random choice here takes an explicit seed, so a
run is fixed by its seed and configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

N_CLASSES = 10


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    return (images / 16.0).astype(np.float32), labels.astype(np.int64)


def digits() -> tuple[Tensor, Tensor]:
    """All 1,797 images as ``(1797, 64)`` float32 in ``[0, 1]`` and their labels."""
    images, labels = _digits_arrays()
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())


@dataclass(frozen=True)
class Split:
    """Row indices into :func:`digits` for the training, validation and test sets."""

    train: Tensor
    val: Tensor
    test: Tensor


def stratified_split(seed: int, train_per_class: int, val_per_class: int = 0) -> Split:
    """``train_per_class`` and ``val_per_class`` images of every digit, drawn with ``seed``.

    Every image not drawn is in the test set, so the three sets partition the data.
    """
    _, labels = _digits_arrays()
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(N_CLASSES):
        chosen = rng.permutation(np.flatnonzero(labels == c))
        train.append(chosen[:train_per_class])
        val.append(chosen[train_per_class : train_per_class + val_per_class])
    train_index = np.sort(np.concatenate(train))
    val_index = np.sort(np.concatenate(val))
    test_mask = np.ones(len(labels), dtype=bool)
    test_mask[train_index] = False
    test_mask[val_index] = False
    return Split(
        torch.from_numpy(train_index),
        torch.from_numpy(val_index),
        torch.from_numpy(np.flatnonzero(test_mask)),
    )


def symmetric_label_noise(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Replace the labels of ``round(fraction * n)`` examples by a different class.

    The examples are chosen uniformly without replacement and each new label is uniform over
    the nine other classes. Returns the noisy labels and a boolean mask of the changed ones.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    changed = np.zeros(n, dtype=bool)
    changed[rng.choice(n, int(round(fraction * n)), replace=False)] = True
    noisy = labels.numpy().copy()
    offsets = rng.integers(1, N_CLASSES, size=n)
    noisy[changed] = (noisy[changed] + offsets[changed]) % N_CLASSES
    return torch.from_numpy(noisy), torch.from_numpy(changed)


def index_stream(n: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """``steps`` minibatches of ``batch_size`` indices, read off successive permutations.

    Every batch has the same size; an epoch boundary can fall inside a batch. With
    ``batch_size >= n`` every batch is the whole set.
    """
    if batch_size >= n:
        return [torch.arange(n)] * steps
    generator = torch.Generator().manual_seed(seed)
    needed = batch_size * steps
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-needed // n))])
    return list(order[:needed].view(steps, batch_size))


# ---------------------------------------------------------------- few-shot episodes


@dataclass(frozen=True)
class Episodes:
    """A stack of few-shot episodes; labels are ``0 .. n_way - 1`` within each episode.

    Shapes: ``support_x`` is ``(E, n_way * k_shot, 64)``, ``query_x`` is
    ``(E, n_way * n_query, 64)``, the labels drop the last dimension.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __len__(self) -> int:
        return len(self.support_x)

    def slice(self, start: int, stop: int) -> Episodes:
        return Episodes(
            self.support_x[start:stop],
            self.support_y[start:stop],
            self.query_x[start:stop],
            self.query_y[start:stop],
        )


def sample_episodes(
    classes: tuple[int, ...],
    n_way: int,
    k_shot: int,
    n_query: int,
    count: int,
    rng: np.random.Generator,
    *,
    rows: np.ndarray | None = None,
) -> Episodes:
    """``count`` episodes over ``classes``: ``n_way`` classes, disjoint support and query images.

    The classes of an episode are drawn without replacement and shuffled, so the label a
    digit gets differs between episodes. ``rows`` restricts the images to those indices.
    """
    images, labels = _digits_arrays()
    allowed = np.ones(len(labels), dtype=bool)
    if rows is not None:
        allowed[:] = False
        allowed[rows] = True
    pools = {c: np.flatnonzero((labels == c) & allowed) for c in classes}
    support_rows = np.empty((count, n_way, k_shot), dtype=np.int64)
    query_rows = np.empty((count, n_way, n_query), dtype=np.int64)
    for e in range(count):
        chosen = rng.choice(np.asarray(classes), n_way, replace=False)
        for way, c in enumerate(chosen):
            rows = rng.choice(pools[int(c)], k_shot + n_query, replace=False)
            support_rows[e, way] = rows[:k_shot]
            query_rows[e, way] = rows[k_shot:]
    x = torch.from_numpy(images)
    ways = torch.arange(n_way)
    return Episodes(
        x[torch.from_numpy(support_rows.reshape(count, -1))],
        ways.repeat_interleave(k_shot).expand(count, -1).clone(),
        x[torch.from_numpy(query_rows.reshape(count, -1))],
        ways.repeat_interleave(n_query).expand(count, -1).clone(),
    )


# ---------------------------------------------------------------- text


@lru_cache(maxsize=1)
def pydoc_text() -> str:
    """The help topics shipped with Python, joined in sorted order of their names."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n".join(topics[key] for key in sorted(topics))


@dataclass(frozen=True)
class TextSplit:
    train: Tensor
    val: Tensor
    vocabulary_size: int


def in_domain_text_split(train_chars: int, val_chars: int, block: int, seed: int) -> TextSplit:
    """Training and validation text drawn from the same documents.

    The corpus is cut into blocks of ``block`` characters, the blocks are shuffled with
    ``seed``, and the first blocks make up ``train_chars`` characters of training text and the
    next ``val_chars`` of validation text. Both therefore sample the whole corpus (every topic
    can appear on both sides), unlike a split at one position, which puts different topics
    in training and validation.
    """
    text = pydoc_text()
    vocabulary = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocabulary)}
    encoded = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    n_blocks = len(encoded) // block
    order = np.random.default_rng(seed).permutation(n_blocks)
    n_train, n_val = -(-train_chars // block), -(-val_chars // block)
    if n_train + n_val > n_blocks:
        raise ValueError(f"the corpus has {n_blocks} blocks of {block}; asked for more")
    blocks = encoded[: n_blocks * block].view(n_blocks, block)
    train = blocks[torch.from_numpy(np.sort(order[:n_train]))].flatten()[:train_chars]
    val = blocks[torch.from_numpy(np.sort(order[n_train : n_train + n_val]))].flatten()
    return TextSplit(train, val[:val_chars], len(vocabulary))
