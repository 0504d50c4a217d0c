"""Functional API: drop_grad (out of place, differentiable) and drop_grad_ (in place)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

from dropgrad import drop_grad, drop_grad_
from dropgrad.functional import DISTRIBUTIONS, check_distribution
from dropgrad.kernels import LANE_LEVELS, quantize_rate

from ._helpers import random_tensor, seeded_generator

SEED = 314
DropFunction = Callable[..., torch.Tensor]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64]


def generator(seed: int = SEED) -> torch.Generator:
    return seeded_generator(seed)


def assert_bit_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert torch.equal(
        actual.contiguous().reshape(-1).view(torch.uint8),
        expected.contiguous().reshape(-1).view(torch.uint8),
    )


def scaled_mask(shape: tuple[int, ...], rate: float, seed: int = SEED) -> torch.Tensor:
    """The multiplier drop_grad applies with ``generator(seed)``: 0 or 1/(1-q) per element."""
    return drop_grad(torch.ones(shape, dtype=torch.float64), rate, generator=generator(seed))


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_drop_grad_leaves_its_input_alone(distribution: str, rate: float) -> None:
    tensor = random_tensor(50, 3)
    original = tensor.clone()
    result = drop_grad(tensor, rate, distribution=distribution, generator=generator())
    assert_bit_identical(tensor, original)
    assert result.data_ptr() != tensor.data_ptr()


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (), (7,), (4, 0, 3), (3, 5, 2)])
def test_dtype_and_shape_are_preserved(
    distribution: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    tensor = random_tensor(*shape, dtype=dtype)
    for function in (drop_grad, drop_grad_):
        result = function(tensor.clone(), 0.4, distribution=distribution, generator=generator())
        assert result.dtype == dtype
        assert result.shape == shape
        assert result.layout == torch.strided


def test_drop_grad_masks_and_rescales() -> None:
    tensor = random_tensor(1 << 12, dtype=torch.float64)
    result = drop_grad(tensor, 0.25, generator=generator())
    kept = result != 0
    assert 0 < int(kept.sum()) < tensor.numel()
    assert torch.equal(result[kept], tensor[kept] * (4 / 3))


def assert_in_place_matches(tensor: torch.Tensor, rate: float) -> None:
    out_of_place_generator, in_place_generator = generator(), generator()
    out_of_place = drop_grad(tensor, rate, generator=out_of_place_generator)
    in_place = tensor.clone()
    returned = drop_grad_(in_place, rate, generator=in_place_generator)
    assert returned is in_place
    assert_bit_identical(out_of_place, in_place)
    assert torch.equal(out_of_place_generator.get_state(), in_place_generator.get_state())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rate", [0.0, 1e-6, 0.1, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("shape", [(0,), (), (5,), (33, 17), (3, 0, 2)], ids=str)
def test_drop_grad_equals_drop_grad_on_a_clone(
    dtype: torch.dtype, rate: float, shape: tuple[int, ...]
) -> None:
    assert_in_place_matches(random_tensor(*shape, dtype=dtype), rate)


def test_drop_grad_equals_drop_grad_on_a_clone_across_in_place_chunks() -> None:
    assert_in_place_matches(torch.ones(2 * (1 << 20) + 3), 0.5)


def test_drop_grad_equals_drop_grad_on_a_non_contiguous_clone() -> None:
    tensor = random_tensor(30, 41).t()
    out_of_place = drop_grad(tensor, 0.5, generator=generator())
    in_place = tensor.clone()  # keeps the transposed strides
    assert not in_place.is_contiguous()
    drop_grad_(in_place, 0.5, generator=generator())
    assert_bit_identical(out_of_place, in_place)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_gaussian_drop_grad_equals_drop_grad_on_a_clone(dtype: torch.dtype) -> None:
    tensor = random_tensor(40, 25, dtype=dtype)
    out_of_place = drop_grad(tensor, 0.3, distribution="gaussian", generator=generator())
    in_place = drop_grad_(tensor.clone(), 0.3, distribution="gaussian", generator=generator())
    assert_bit_identical(out_of_place, in_place)
    assert not torch.equal(out_of_place, tensor)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("function", [drop_grad, drop_grad_])
def test_trivial_rates(distribution: str, function: DropFunction) -> None:
    special = torch.tensor([math.inf, -math.inf, math.nan, 2.5, -1.0])
    source = generator()
    state = source.get_state()
    unchanged = function(special.clone(), 0.0, distribution=distribution, generator=source)
    assert torch.equal(source.get_state(), state)
    assert_bit_identical(unchanged, special)
    zeros = function(special.clone(), 1.0, distribution=distribution, generator=source)
    assert_bit_identical(zeros, torch.zeros_like(special))


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=str)
@pytest.mark.parametrize("rate", [0.3, 0.8])
def test_drop_grad_passes_gradcheck(dtype: torch.dtype, rate: float) -> None:
    tensor = random_tensor(6, 5, dtype=dtype).requires_grad_()
    # A freshly seeded generator per call makes the mask a fixed function of nothing.
    assert torch.autograd.gradcheck(lambda x: drop_grad(x, rate, generator=generator()), (tensor,))
    assert torch.autograd.gradgradcheck(
        lambda x: drop_grad(x, rate, generator=generator()), (tensor,)
    )


@pytest.mark.parametrize("rate", [0.0, 1e-6, 0.3, 0.7, 1.0])
def test_backward_multiplies_by_the_scaled_mask(rate: float) -> None:
    tensor = random_tensor(64, 8, dtype=torch.float64).requires_grad_()
    upstream = random_tensor(64, 8, dtype=torch.float64, seed=1)
    result = drop_grad(tensor, rate, generator=generator())
    assert result.requires_grad
    result.backward(upstream)
    assert tensor.grad is not None
    assert torch.equal(tensor.grad, upstream * scaled_mask((64, 8), rate))


def test_backward_for_gaussian_multiplies_by_the_noise() -> None:
    tensor = random_tensor(64, dtype=torch.float64).requires_grad_()
    result = drop_grad(tensor, 0.3, distribution="gaussian", generator=generator())
    noise = drop_grad(
        torch.ones(64, dtype=torch.float64), 0.3, distribution="gaussian", generator=generator()
    )
    result.sum().backward()
    assert tensor.grad is not None
    assert torch.equal(tensor.grad, noise)
    assert noise.std().item() > 0.1


def test_meta_learning_inner_loop_differentiates_through_the_mask() -> None:
    rate, learning_rate = 0.4, 0.1
    curvature = torch.linspace(0.5, 2.0, 30, dtype=torch.float64)
    weights = random_tensor(30, dtype=torch.float64).requires_grad_()

    inner_loss = 0.5 * (curvature * weights**2).sum()
    (gradient,) = torch.autograd.grad(inner_loss, weights, create_graph=True)
    adapted = weights - learning_rate * drop_grad(gradient, rate, generator=generator())
    outer_loss = 0.5 * (adapted**2).sum()
    outer_loss.backward()

    # adapted = (1 - lr * m * a) * w, so d(outer)/dw = adapted * (1 - lr * m * a).
    mask = scaled_mask((30,), rate)
    factor = 1 - learning_rate * mask * curvature
    expected = factor * weights.detach() * factor
    torch.testing.assert_close(weights.grad, expected, rtol=1e-12, atol=0)
    # The dropped coordinates get no inner update, so their gradient is just w.
    dropped = mask == 0
    assert dropped.any() and (~dropped).any()
    assert weights.grad is not None
    assert torch.equal(weights.grad[dropped], weights.detach()[dropped])


def uncoalesced_sparse(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    indices = torch.tensor([[3, 0, 3, 1, 2, 0, 4], [1, 2, 1, 0, 2, 2, 3]])
    values = random_tensor(7, dtype=dtype)
    return torch.sparse_coo_tensor(indices, values, (5, 4), check_invariants=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64], ids=str)
@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_sparse_input_gives_coalesced_sparse_output(dtype: torch.dtype, rate: float) -> None:
    sparse = uncoalesced_sparse(dtype)
    assert not sparse.is_coalesced()
    with warnings.catch_warnings():
        # torch warns once per process when a sparse tensor is built without
        # saying whether to check invariants; drop_grad says so.
        warnings.filterwarnings("error", message=".*[Ss]parse invariant")
        result = drop_grad(sparse, rate, generator=generator())
    assert result.layout == torch.sparse_coo
    assert result.is_coalesced()
    assert result.dtype == dtype
    assert result.shape == sparse.shape
    coalesced = sparse.coalesce()
    assert torch.equal(result.indices(), coalesced.indices())
    expected_values = drop_grad(coalesced.values(), rate, generator=generator())
    assert_bit_identical(result.values(), expected_values)
    assert not sparse.is_coalesced()


def test_sparse_masking_is_a_mask_on_the_dense_values() -> None:
    sparse = uncoalesced_sparse(torch.float64)
    result = drop_grad(sparse, 0.5, generator=generator(7)).to_dense()
    dense = sparse.to_dense()
    kept = result != 0
    assert 0 < int(kept.sum()) < int((dense != 0).sum())
    assert torch.equal(result[kept], dense[kept] * 2.0)


def test_sparse_gradient_flows_through_the_values() -> None:
    indices = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]])
    values = random_tensor(4, dtype=torch.float64).requires_grad_()
    sparse = torch.sparse_coo_tensor(indices, values, (4, 4), check_invariants=True)
    drop_grad(sparse, 0.5, generator=generator()).to_dense().sum().backward()
    assert values.grad is not None
    assert torch.equal(values.grad, scaled_mask((4,), 0.5))


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_default_generator_is_the_global_rng(distribution: str) -> None:
    tensor = random_tensor(1000)
    torch.manual_seed(5)
    first = drop_grad(tensor, 0.3, distribution=distribution)
    second = drop_grad(tensor, 0.3, distribution=distribution)
    torch.manual_seed(5)
    again = drop_grad(tensor, 0.3, distribution=distribution)
    torch.manual_seed(5)
    in_place = drop_grad_(tensor.clone(), 0.3, distribution=distribution)
    assert_bit_identical(again, first)
    assert_bit_identical(in_place, first)
    assert not torch.equal(second, first)
    explicit = drop_grad(tensor, 0.3, distribution=distribution, generator=generator(5))
    assert_bit_identical(explicit, first)


def test_drop_grad_in_place_rejects_sparse_tensors() -> None:
    sparse = uncoalesced_sparse()
    with pytest.raises(TypeError, match="drop_grad_ needs a dense tensor.*tensor.values\\(\\)"):
        drop_grad_(sparse, 0.5)
    with pytest.raises(TypeError, match="drop_grad_ needs a dense tensor"):
        drop_grad_(sparse.coalesce(), 0.0)


@pytest.mark.parametrize("function", [drop_grad, drop_grad_])
@pytest.mark.parametrize("distribution", ["uniform", "Bernoulli", "", None, 0])
def test_unknown_distribution_is_rejected(function: DropFunction, distribution: Any) -> None:
    message = "^distribution must be one of \\('bernoulli', 'gaussian'\\), got " + repr(
        distribution
    )
    with pytest.raises(ValueError, match=message):
        function(torch.ones(3), 0.5, distribution=distribution)
    with pytest.raises(ValueError, match=message):
        check_distribution(distribution)


def test_check_distribution_returns_the_name() -> None:
    assert [check_distribution(name) for name in DISTRIBUTIONS] == ["bernoulli", "gaussian"]


@pytest.mark.parametrize("function", [drop_grad, drop_grad_])
@pytest.mark.parametrize(
    ("rate", "error", "message"),
    [
        (True, TypeError, "^drop_rate must be a float in \\[0, 1\\], got bool True$"),
        ("0.5", TypeError, "^drop_rate must be a float in \\[0, 1\\], got str '0.5'$"),
        (None, TypeError, "^drop_rate must be a float in \\[0, 1\\], got NoneType None$"),
        (math.nan, ValueError, "^drop_rate must be in \\[0, 1\\], got nan$"),
        (math.inf, ValueError, "^drop_rate must be in \\[0, 1\\], got inf$"),
        (-0.1, ValueError, "^drop_rate must be in \\[0, 1\\], got -0.1$"),
        (1.01, ValueError, "^drop_rate must be in \\[0, 1\\], got 1.01$"),
    ],
)
def test_bad_rates_are_rejected(
    function: DropFunction, rate: Any, error: type[Exception], message: str
) -> None:
    tensor = torch.ones(4)
    with pytest.raises(error, match=message):
        function(tensor, rate)
    assert torch.equal(tensor, torch.ones(4))


@pytest.mark.parametrize("rate", [0.02, 0.3, 0.9])
def test_drop_grad_statistics(rate: float) -> None:
    count = 1 << 18
    threshold, keep_scale = quantize_rate(rate)
    realized = threshold / LANE_LEVELS
    result = drop_grad(torch.ones(count, dtype=torch.float64), rate, generator=generator())
    assert set(result.unique().tolist()) == {0.0, keep_scale}
    fraction = (result == 0).double().mean().item()
    assert abs(fraction - realized) <= 5 * math.sqrt(realized * (1 - realized) / count)
    # Mean of count multipliers with mean 1 and variance q / (1 - q).
    assert abs(result.mean().item() - 1.0) <= 5 * math.sqrt(realized / (1 - realized) / count)


@pytest.mark.parametrize("function", [drop_grad, drop_grad_])
def test_integer_tensors_are_refused(function: Callable[..., torch.Tensor]) -> None:
    with pytest.raises(TypeError, match="tensor must be floating point or complex, got dtype"):
        function(torch.ones(4, dtype=torch.int64), 0.5)
