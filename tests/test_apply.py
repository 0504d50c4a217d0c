"""Where a tensor's elements sit in the whole parameter: the coordinates keyed masks use."""

from __future__ import annotations

import torch

from dropgrad import drop_grad
from dropgrad._apply import Located, Planned, _dense_index, locate, mask_all


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


def test_mask_all_on_an_index_target_matches_the_dense_mask() -> None:
    """A scattered subset of a parameter is masked as its elements are in the whole."""
    whole = torch.randn(10, 8)
    expected = drop_grad(whole, 0.4, seed=5, step=2, index=3)
    rows = torch.tensor([1, 4, 9])
    part = whole[rows].clone()
    index = (rows.view(-1, 1) * 8 + torch.arange(8)).contiguous()
    plan = Planned(index=3, param=whole, rate=0.4, target="gradient", granularity="element")
    mask_all(
        [(plan, Located(part, index=index))], seed=5, step=2, distribution="bernoulli", scale=1.0
    )
    assert torch.equal(part, expected[rows])
