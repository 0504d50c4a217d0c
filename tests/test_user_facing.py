"""What a user meets: clean errors, the wrapped optimizer's own methods, global step
hooks, full update drop with unmasked parameters, and the API reference."""

from __future__ import annotations

import copy
import pickle
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import schedulefree  # a plain import: CI installs it, and a skip would hide a gap
import torch
from torch import nn
from torch.optim import optimizer as torch_optimizer

import dropgrad
from dropgrad import DropGrad

REPO_ROOT = Path(__file__).resolve().parents[1]


def small_opt(**kwargs: object) -> DropGrad:
    model = nn.Linear(4, 3)
    return DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.2, **kwargs)


# ---------------------------------------------------------------- clean errors


@pytest.mark.parametrize(
    ("group", "type_name"),
    [(torch.zeros(3), "Tensor"), (None, "NoneType"), ("params", "str"), ([1, 2], "list")],
)
def test_add_param_group_needs_a_dict(group: object, type_name: str) -> None:
    opt = small_opt()
    with pytest.raises(TypeError, match=f"^param_group must be a dict, got {type_name}$"):
        opt.add_param_group(group)  # type: ignore[arg-type]
    assert len(opt.param_groups) == 1


def test_add_param_group_checks_target_and_granularity() -> None:
    opt = small_opt()
    extra = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"^param_group\['target'\] must be one of"):
        opt.add_param_group({"params": [extra], "target": "weights"})
    opt.add_param_group({"params": [extra], "granularity": "row"})
    assert opt.param_groups[-1]["granularity"] == "row"


def test_numpy_bool_is_a_bool_for_full_update_drop() -> None:
    opt = small_opt(full_update_drop=np.True_)
    assert opt.full_update_drop is True
    opt.full_update_drop = np.False_
    assert opt.full_update_drop is False


# ---------------------------------------------------------------- pass-through


def test_schedule_free_train_and_eval_pass_through() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    opt = DropGrad(schedulefree.AdamWScheduleFree(model.parameters(), lr=1e-2), drop_rate=0.1)
    assert hasattr(opt, "train") and hasattr(opt, "eval")
    inputs, targets = torch.randn(64, 5), torch.randn(64, 1)
    opt.train()
    for _ in range(5):
        nn.functional.mse_loss(model(inputs), targets).backward()
        opt.step()
        opt.zero_grad()
    opt.eval()
    # eval() swaps in Schedule-Free's averaged weights: the wrapped optimizer's own state.
    assert opt.optimizer.param_groups[0]["train_mode"] is False
    assert opt.step_count == 5


def test_unknown_attributes_and_private_names_do_not_fall_through() -> None:
    opt = small_opt()
    assert not hasattr(opt, "no_such_thing")
    with pytest.raises(AttributeError, match="neither has the wrapped SGD"):
        opt.no_such_thing  # noqa: B018
    opt.optimizer._private_marker = 1  # type: ignore[attr-defined]
    assert not hasattr(opt, "_private_marker")


def test_pickle_and_deepcopy_still_work() -> None:
    opt = small_opt(seed=3)
    restored = pickle.loads(pickle.dumps(opt))
    copied = copy.deepcopy(opt)
    for other in (restored, copied):
        assert other.seed == 3 and other.drop_rate == 0.2
        assert other.optimizer is not opt.optimizer


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_zero_redundancy_optimizer_methods_pass_through() -> None:
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        model = nn.Linear(4, 2)
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.1)
        opt = DropGrad(zero, drop_rate=0.3, seed=1)
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
        opt.consolidate_state_dict(to=0)
        assert opt.state_dict()["param_groups"][0]["dropgrad"]["step_count"] == 1
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- global step hooks


def test_global_step_hooks_fire_once_per_training_step() -> None:
    calls: list[tuple[str, object]] = []
    pre = torch_optimizer.register_optimizer_step_pre_hook(
        lambda optimizer, *_: calls.append(("pre", optimizer))
    )
    post = torch_optimizer.register_optimizer_step_post_hook(
        lambda optimizer, *_: calls.append(("post", optimizer))
    )
    try:
        opt = small_opt(full_update_drop=0.5, seed=2)
        base_calls: list[int] = []
        opt.optimizer.register_step_pre_hook(lambda *_: base_calls.append(1))
        skipped = 0
        for _ in range(8):
            for p in opt.param_groups[0]["params"]:
                p.grad = torch.ones_like(p)
            opt.step()
            skipped += opt.last_step_skipped
        assert calls == [("pre", opt), ("post", opt)] * 8
        # The wrapped optimizer's own hooks fire whenever its step runs.
        assert len(base_calls) == 8 - skipped and 0 < skipped < 8
    finally:
        pre.remove()
        post.remove()
    assert not torch_optimizer._global_optimizer_pre_hooks


# ---------------------------------------------------------------- full update drop


def test_unmasked_parameters_are_scaled_under_full_update_drop() -> None:
    """Rate None leaves a gradient unmasked, but a step that runs divides it by 1 - q."""
    weight, bias = nn.Parameter(torch.zeros(6, 3)), nn.Parameter(torch.zeros(6))
    base = torch.optim.SGD([weight, bias], lr=0.0)
    opt = DropGrad(base, drop_rate=None, params={weight: 0.5}, full_update_drop=0.25, seed=4)
    seen: list[torch.Tensor] = []
    base.register_step_pre_hook(lambda *_: seen.append(bias.grad.clone()))
    for _ in range(6):
        weight.grad, bias.grad = torch.ones(6, 3), torch.full((6,), 3.0)
        opt.step()
    assert seen, "every step was skipped"
    for grad in seen:
        assert torch.equal(grad, torch.full((6,), 3.0) / 0.75)


# ---------------------------------------------------------------- the API reference


def test_every_public_name_is_in_the_api_reference() -> None:
    reference = (REPO_ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^::: dropgrad\.(\w+)", reference, re.MULTILINE))
    assert set(dropgrad.__all__) - {"__version__"} <= documented


def test_citation_and_changelog_name_the_package_version() -> None:
    citation = (REPO_ROOT / "CITATION.cff").read_text()
    assert re.search(rf"^version: {re.escape(dropgrad.__version__)}$", citation, re.M)
    changelog = (REPO_ROOT / "CHANGELOG.md").read_text()
    first_entry = re.search(r"^## (\S+)$", changelog, re.M)
    assert first_entry is not None and first_entry.group(1) == dropgrad.__version__


def test_does_it_help_quotes_only_numbers_the_analysis_gives() -> None:
    # The README's summary must stay in step with docs/analysis.md as that grows: every
    # number it quotes (a rate, an effect, an interval end, a count) appears there.
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Does it help?")
    summary = readme[start : readme.index("\n## ", start)]
    analysis = (REPO_ROOT / "docs" / "analysis.md").read_text(encoding="utf-8")
    number = re.compile(r"(?<![\w.])[−+-]?\d[\d,]*(?:\.\d+)?")

    def normalized(token: str) -> str:
        return token.replace("−", "-").lstrip("+")

    given = {normalized(token) for token in number.findall(analysis)}
    quoted = [normalized(token) for token in number.findall(summary)]
    assert len(quoted) > 10
    assert [token for token in quoted if token not in given] == []
