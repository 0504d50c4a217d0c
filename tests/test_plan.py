"""A step's plan: where a tensor's elements sit in the whole parameter (the
coordinates keyed masks use), and the batch that masks a step's tensors."""

from __future__ import annotations

import pytest
import torch

from dropgrad import drop_grad
from dropgrad._plan import Batch, Located, _dense_index, locate


def test_dense_index_of_a_box_inside_a_larger_tensor() -> None:
    global_shape = torch.Size([4, 6, 5])
    whole = torch.arange(4 * 6 * 5).view(global_shape)
    box = _dense_index(torch.Size([2, 3, 2]), (1, 2, 3), global_shape, torch.device("cpu"))
    assert torch.equal(box, whole[1:3, 2:5, 3:5])


def test_dense_index_of_a_zero_dimensional_tensor() -> None:
    index = _dense_index(torch.Size([]), (), torch.Size([]), torch.device("cpu"))
    assert index.shape == () and int(index) == 0


def test_locate_dense_tensor() -> None:
    located = locate(torch.zeros(7, 3))
    assert (located.start, located.index, located.first_row) == (0, None, 0)
    assert located.row_count() == 7
    assert locate(torch.zeros(())).row_count() == 1


def test_locate_sparse_values_by_dense_position() -> None:
    # Two sparse dims and one dense dim: value (n, j) sits at (i0[n], i1[n], j).
    indices = torch.tensor([[0, 2, 3], [1, 0, 2]])
    values = torch.arange(6, dtype=torch.float32).view(3, 2)
    sparse = torch.sparse_coo_tensor(indices, values, (4, 3, 2), check_invariants=True).coalesce()
    located = locate(sparse)
    dense_positions = torch.arange(4 * 3 * 2).view(4, 3, 2)
    expected = torch.stack([dense_positions[i, j] for i, j in indices.t().tolist()])
    assert located.index is not None and torch.equal(located.index, expected)
    assert located.row_index is not None
    assert torch.equal(located.row_index, torch.tensor([[0, 0], [2, 2], [3, 3]]))


def test_batch_masks_an_index_target_as_the_dense_mask() -> None:
    """A scattered subset of a parameter is masked as its elements are in the whole."""
    whole = torch.randn(10, 8)
    expected = drop_grad(whole, 0.4, seed=5, step=2, index=3)
    rows = torch.tensor([1, 4, 9])
    part = whole[rows].clone()
    index = (rows.view(-1, 1) * 8 + torch.arange(8)).contiguous()
    batch = Batch(1.0)
    batch.add(3, Located(part, index=index), 0.4, "element")
    batch.mask_(seed=5, step=2, distribution="bernoulli")
    assert torch.equal(part, expected[rows])


@pytest.mark.parametrize("distribution", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_batch_buckets_give_each_parameter_its_own_mask(distribution: str, scale: float) -> None:
    """Tensors of several dtypes and rates, consecutive runs and index tensors, in one
    batch: each masked as the functional form masks its parameter, times the scale;
    tensors with no rate are only scaled."""
    generator = torch.Generator().manual_seed(1)
    wholes = [
        torch.randn(300, generator=generator),
        torch.randn(7, 5, generator=generator, dtype=torch.float64),
        torch.randn(40, generator=generator),
        torch.randn(6, 4, generator=generator),
        torch.randn(9, generator=generator, dtype=torch.float64),
    ]
    rates = [0.4, 0.4, 0.2, 0.4, None]
    expected = [
        w * scale
        if rate is None
        else drop_grad(w, rate, distribution=distribution, seed=7, step=3, index=i) * scale
        for i, (w, rate) in enumerate(zip(wholes, rates))
    ]
    got = [w.clone() for w in wholes]
    batch = Batch(scale)
    batch.add(0, Located(got[0][:100]), rates[0], "element")
    batch.add(0, Located(got[0][100:], start=100), rates[0], "element")  # a second shard
    batch.add(1, Located(got[1]), rates[1], "element")
    batch.add(2, Located(got[2]), rates[2], "element")
    rows = torch.tensor([0, 2, 5])
    part = got[3][rows]  # a copy: written back below
    batch.add(3, Located(part, index=rows.view(-1, 1) * 4 + torch.arange(4)), rates[3], "element")
    batch.add(4, Located(got[4]), rates[4], "element")
    batch.mask_(seed=7, step=3, distribution=distribution)
    got[3][rows] = part
    for number, (actual, wanted) in enumerate(zip(got, expected)):
        if number == 3:
            actual, wanted = actual[rows], wanted[rows]
        assert torch.equal(actual, wanted), number
