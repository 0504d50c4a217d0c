"""DropGrad under torch.distributed: DDP and ZeroRedundancyOptimizer on two CPU processes.

Both ranks run every scenario in one process group (starting processes is the
slow part), write what they saw to a file, and the tests compare the files.
Each rank seeds torch differently, as data-parallel scripts usually do, so any
random decision that is not shared makes the replicas drift apart.
"""

from __future__ import annotations

import multiprocessing
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from dropgrad import DropGrad, LinearDropRateScheduler

WORLD_SIZE = 2
STEPS = 32
TORCH_SEED = 100
DROP_RATE = 0.3
SKIP_PROBABILITY = 0.25
# A generous bound: a deadlocked collective fails the run instead of hanging CI.
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
JOIN_TIMEOUT_S = 150

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _train(rank: int, make_optimizer: Any) -> dict[str, Any]:
    """Train a DDP model for STEPS steps on rank-specific data; return what the rank saw."""
    # Different on every rank, like `torch.manual_seed(seed + rank)` in a real script:
    # initial weights differ too, and DDP replaces them with rank 0's.
    torch.manual_seed(TORCH_SEED + rank)
    model = DistributedDataParallel(_make_model())
    opt = make_optimizer(model)
    skipped: list[bool] = []
    masked_grads: list[torch.Tensor] = []
    for _ in range(STEPS):
        inputs = torch.randn(16, 8)
        targets = torch.randn(16, 4)
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        opt.step()
        skipped.append(opt.last_step_skipped)
        # After a step that ran, .grad holds the masked gradient the update used.
        masked_grads.append(model.module[0].weight.grad.clone())
        opt.zero_grad()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "skipped": skipped,
        "masked_grads": masked_grads,
        # ZeroRedundancyOptimizer.state_dict() needs a consolidation first (see _zero),
        # so the seed is read from the generators directly.
        "seed": opt._generators.seed,
        "step_count": opt.step_count,
        "drop_rate": opt.drop_rate,
        "checkpoint": _checkpoint(opt, rank),
    }


def _checkpoint(opt: DropGrad, rank: int) -> dict[str, Any] | None:
    """DropGrad's own section of the state dict that rank 0 would save."""
    if isinstance(opt.optimizer, ZeroRedundancyOptimizer):
        # A collective: every rank calls it, then only rank 0 holds the full state.
        opt.optimizer.consolidate_state_dict(to=0)
        if rank != 0:
            return None
    return opt.state_dict()["dropgrad"]


def _ddp_shared_seed(rank: int) -> dict[str, Any]:
    def make(model: nn.Module) -> DropGrad:
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return DropGrad(inner, drop_rate=DROP_RATE, full_update_drop=SKIP_PROBABILITY)

    return _train(rank, make)


def _ddp_rank_seed(rank: int) -> dict[str, Any]:
    def make(model: nn.Module) -> DropGrad:
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return DropGrad(
            inner, drop_rate=DROP_RATE, full_update_drop=SKIP_PROBABILITY, seed=1000 + rank
        )

    return _train(rank, make)


def _zero(rank: int) -> dict[str, Any]:
    def make(model: nn.Module) -> DropGrad:
        inner = ZeroRedundancyOptimizer(
            model.parameters(), optimizer_class=torch.optim.Adam, lr=1e-2
        )
        schedule = LinearDropRateScheduler(0.1, 0.5, num_steps=STEPS)
        return DropGrad(inner, drop_rate_scheduler=schedule, full_update_drop=True)

    return _train(rank, make)


def _fsdp2(rank: int) -> dict[str, Any]:
    """FSDP2: each rank masks only its own shard, from a stream of its own."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(TORCH_SEED)
    # The last layer's dim 0 (5) does not divide by the world size: its shards
    # differ in size, so ranks consume different amounts of mask randomness.
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))
    fully_shard(model)
    opt = DropGrad(
        torch.optim.SGD(model.parameters(), lr=0.05),
        drop_rate=DROP_RATE,
        full_update_drop=SKIP_PROBABILITY,
    )
    torch.manual_seed(TORCH_SEED + rank)
    skipped: list[bool] = []
    local_masked: list[torch.Tensor] = []
    try:
        for _ in range(24):
            nn.functional.mse_loss(model(torch.randn(16, 8)), torch.randn(16, 5)).backward()
            opt.step()
            skipped.append(opt.last_step_skipped)
            local_masked.append(model[0].weight.grad.to_local().clone())
            opt.zero_grad()
    except Exception as error:  # both ranks fail at the same point, before any collective
        return {"error": f"{type(error).__name__}: {error}"}
    return {"error": None, "skipped": skipped, "local_masked": local_masked}


SCENARIOS = {
    "ddp_shared_seed": _ddp_shared_seed,
    "ddp_rank_seed": _ddp_rank_seed,
    "zero": _zero,
    # Last: a failure inside it leaves no later scenario in a half-finished state.
    "fsdp2": _fsdp2,
}


def _worker(rank: int, port: int, out_dir: str) -> None:
    out = Path(out_dir)
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=WORLD_SIZE,
            timeout=COLLECTIVE_TIMEOUT,
        )
        try:
            results = {name: scenario(rank) for name, scenario in SCENARIOS.items()}
        finally:
            dist.destroy_process_group()
        torch.save(results, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("distributed")
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    processes = [
        context.Process(target=_worker, args=(rank, port, str(out_dir)))
        for rank in range(WORLD_SIZE)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for rank in hung:
        processes[rank].kill()
        processes[rank].join()
    errors = {path.name: path.read_text() for path in sorted(out_dir.glob("*.error"))}
    assert not hung, f"ranks {hung} did not finish in {JOIN_TIMEOUT_S}s; errors: {errors}"
    assert not errors, f"worker errors: {errors}"
    assert [p.exitcode for p in processes] == [0] * WORLD_SIZE
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def _assert_identical_across_ranks(results: list[dict[str, Any]]) -> None:
    first, second = results
    assert first["seed"] == second["seed"]
    assert first["skipped"] == second["skipped"]
    for grad_0, grad_1 in zip(first["masked_grads"], second["masked_grads"]):
        assert torch.equal(grad_0, grad_1)
    for param_0, param_1 in zip(first["params"], second["params"]):
        assert torch.equal(param_0, param_1)


def test_ddp_replicas_stay_bit_identical(rank_results: list[dict[str, Any]]) -> None:
    results = [r["ddp_shared_seed"] for r in rank_results]
    _assert_identical_across_ranks(results)
    skipped = results[0]["skipped"]
    # Both kinds of randomness were exercised: some steps skipped, some masked.
    assert 0 < sum(skipped) < STEPS
    ran = [
        grad for grad, was_skipped in zip(results[0]["masked_grads"], skipped) if not was_skipped
    ]
    assert all(bool((grad == 0).any()) for grad in ran)
    assert results[0]["step_count"] == STEPS


def test_ddp_explicit_per_rank_seed_makes_replicas_drift(
    rank_results: list[dict[str, Any]],
) -> None:
    first, second = (r["ddp_rank_seed"] for r in rank_results)
    assert (first["seed"], second["seed"]) == (1000, 1001)
    # Gradients are all-reduced, so identical before masking; only the masks differ.
    assert any(not torch.equal(a, b) for a, b in zip(first["masked_grads"], second["masked_grads"]))
    drift = max(float((a - b).abs().max()) for a, b in zip(first["params"], second["params"]))
    assert drift > 0.0


def test_zero_redundancy_optimizer_ranks_agree(rank_results: list[dict[str, Any]]) -> None:
    results = [r["zero"] for r in rank_results]
    # A disagreement on a skip would have deadlocked ZeRO's parameter broadcast
    # (the fixture fails on the collective timeout); the runs must also match.
    _assert_identical_across_ranks(results)
    skipped = results[0]["skipped"]
    assert 0 < sum(skipped) < STEPS
    assert results[0]["drop_rate"] == pytest.approx(0.5)


def test_zero_checkpoint_after_consolidation(rank_results: list[dict[str, Any]]) -> None:
    section = rank_results[0]["zero"]["checkpoint"]
    assert section["step_count"] == STEPS
    assert section["skipped_count"] == sum(rank_results[0]["zero"]["skipped"])
    assert section["schedulers"][0]["step_count"] == STEPS
    assert rank_results[1]["zero"]["checkpoint"] is None


def test_fsdp2_ranks_mask_their_own_shards(rank_results: list[dict[str, Any]]) -> None:
    first, second = (r["fsdp2"] for r in rank_results)
    assert first["error"] is None, first["error"]
    assert first["skipped"] == second["skipped"]
    assert 0 < sum(first["skipped"]) < len(first["skipped"])
    ran = [i for i, was_skipped in enumerate(first["skipped"]) if not was_skipped]
    for index in ran:
        shard_0, shard_1 = first["local_masked"][index], second["local_masked"][index]
        # Different shards, different gradients...
        assert not torch.equal(shard_0, shard_1)
        # ...masked independently: each rank draws from its own stream.
        assert not torch.equal(shard_0 == 0, shard_1 == 0)
