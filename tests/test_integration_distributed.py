"""DropGrad under torch.distributed: DDP and ZeroRedundancyOptimizer on two CPU processes.

Both ranks run every scenario in one process group (starting processes is the
slow part), write what they saw to a file, and the tests compare the files.
Each rank seeds torch differently, as data-parallel scripts usually do, so any
random decision that is not shared makes the replicas drift apart.
"""

from __future__ import annotations

import copy
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
        # so the seed is read from the attribute.
        "seed": opt.seed,
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
    return opt.state_dict()["param_groups"][0]["dropgrad"]


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


FSDP_STEPS = 6
FSDP_RESUME_AT = 3


def _fsdp_model() -> nn.Module:
    torch.manual_seed(TORCH_SEED)
    # The last layer's dim 0 (5) does not divide by the world size, so its shards
    # differ in size; the first layer's 16 rows split evenly.
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))


def _fsdp_optimizer(model: nn.Module) -> DropGrad:
    return DropGrad(
        torch.optim.Adam(model.parameters(), lr=1e-2),
        drop_rate_scheduler=LinearDropRateScheduler(0.2, 0.6, num_steps=FSDP_STEPS),
        full_update_drop=SKIP_PROBABILITY,
        seed=1234,
    )


def _fsdp_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    # The same batch on every rank: FSDP averages the ranks' gradients, and
    # (g + g) / 2 == g exactly, so the sharded run's gradients equal those of
    # one process on this batch bit for bit; only the masks could differ.
    generator = torch.Generator().manual_seed(TORCH_SEED + step)
    return torch.randn(16, 8, generator=generator), torch.randn(16, 5, generator=generator)


def _fsdp_train(model: nn.Module, opt: DropGrad, steps: range) -> list[bool]:
    skipped = []
    for step in steps:
        inputs, targets = _fsdp_batch(step)
        nn.functional.mse_loss(model(inputs), targets).backward()
        opt.step()
        skipped.append(opt.last_step_skipped)
        opt.zero_grad()
    return skipped


def _fsdp2(rank: int) -> dict[str, Any]:
    """FSDP2 with uneven shards against one process, and a DCP state-dict round trip."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    try:
        # One process, no sharding: the run the sharded one must reproduce.
        single = _fsdp_model()
        single_skipped = _fsdp_train(single, _fsdp_optimizer(single), range(FSDP_STEPS))

        model = _fsdp_model()
        fully_shard(model)
        opt = _fsdp_optimizer(model)
        skipped = _fsdp_train(model, opt, range(FSDP_RESUME_AT))
        # Round trip through torch.distributed.checkpoint's state-dict API into a
        # fresh model and optimizer, as a resumed job would.
        # Copies, as a save to disk would make: the state dicts share storage with
        # the live model and optimizer, which keep training below.
        model_state = copy.deepcopy(get_model_state_dict(model))
        optim_state = copy.deepcopy(get_optimizer_state_dict(model, opt))
        resumed_model = _fsdp_model()
        fully_shard(resumed_model)
        resumed_opt = DropGrad(
            torch.optim.Adam(resumed_model.parameters(), lr=1e-2),
            drop_rate_scheduler=LinearDropRateScheduler(0.2, 0.6, num_steps=FSDP_STEPS),
            full_update_drop=SKIP_PROBABILITY,
            seed=99,  # replaced by the checkpoint's
        )
        set_model_state_dict(resumed_model, model_state)
        set_optimizer_state_dict(resumed_model, resumed_opt, optim_state)
        restored = {
            "step_count": resumed_opt.step_count,
            "seed": resumed_opt.seed,
            "scheduler_steps": resumed_opt.drop_rate_scheduler.step_count,
        }
        rest = range(FSDP_RESUME_AT, FSDP_STEPS)
        skipped += _fsdp_train(model, opt, rest)
        resumed_skipped = _fsdp_train(resumed_model, resumed_opt, rest)
        full = [p.full_tensor().clone() for p in model.parameters()]
        resumed_full = [p.full_tensor().clone() for p in resumed_model.parameters()]
        # Update masking by rows on the shards: each rank masks its rows of the
        # parameter's change with the rows' global decisions.
        update_runs = []
        for shard in (False, True):
            update_model = _fsdp_model()
            if shard:
                fully_shard(update_model)
            update_opt = DropGrad(
                torch.optim.AdamW(update_model.parameters(), lr=1e-2),
                drop_rate=0.5,
                target="update",
                granularity="row",
                seed=77,
            )
            _fsdp_train(update_model, update_opt, range(FSDP_STEPS))
            update_runs.append(
                [
                    (p.full_tensor() if shard else p.detach()).clone()
                    for p in update_model.parameters()
                ]
            )
    except Exception as error:  # both ranks fail at the same point, before any collective
        return {"error": f"{type(error).__name__}: {error}\n{traceback.format_exc()}"}
    return {
        "error": None,
        "skipped": skipped,
        "single_skipped": single_skipped,
        "resumed_skipped": resumed_skipped,
        "params": full,
        "single_params": [p.detach().clone() for p in single.parameters()],
        "resumed_params": resumed_full,
        "restored": restored,
        "update_single": update_runs[0],
        "update_sharded": update_runs[1],
    }


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


def test_fsdp2_is_bit_identical_to_one_process(rank_results: list[dict[str, Any]]) -> None:
    for result in (r["fsdp2"] for r in rank_results):
        assert result["error"] is None, result["error"]
        assert result["skipped"] == result["single_skipped"]
        assert 0 < sum(result["skipped"]) < FSDP_STEPS
        for sharded, single in zip(result["params"], result["single_params"]):
            assert torch.equal(sharded, single)


def test_fsdp2_distributed_checkpoint_round_trip_resumes_exactly(
    rank_results: list[dict[str, Any]],
) -> None:
    for result in (r["fsdp2"] for r in rank_results):
        assert result["error"] is None, result["error"]
        # set_optimizer_state_dict's zero-gradient state-creation step was not counted.
        assert result["restored"] == {
            "step_count": FSDP_RESUME_AT,
            "seed": 1234,
            "scheduler_steps": FSDP_RESUME_AT,
        }
        assert result["resumed_skipped"] == result["skipped"][FSDP_RESUME_AT:]
        for resumed, uninterrupted in zip(result["resumed_params"], result["params"]):
            assert torch.equal(resumed, uninterrupted)


def test_fsdp2_update_masking_by_rows_is_bit_identical_to_one_process(
    rank_results: list[dict[str, Any]],
) -> None:
    for result in (r["fsdp2"] for r in rank_results):
        assert result["error"] is None, result["error"]
        for sharded, single in zip(result["update_sharded"], result["update_single"]):
            assert torch.equal(sharded, single)
