"""DropGrad inside ``torch.compile(opt.step)``: the wrapped step compiles, nothing recompiles.

DropGrad's own work runs eagerly behind graph breaks; the wrapped optimizer's
step is traced. These tests use the ``aot_eager`` backend, which runs the traced
aten ops as they are, and SGD with momentum, whose traced step computes exactly
what its eager step does (a traced Adam does not: torch turns its scalars into
tensors, which rounds differently, with or without DropGrad). So a compiled run
can be compared bit for bit with an eager one. The speed with inductor is in
``benchmarks/step_overhead.py --compiled``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from dropgrad import DropGrad, LinearDropRateScheduler

STEPS = 50

CONFIGS: dict[str, dict[str, Any]] = {
    "scheduler+per-parameter": {
        "drop_rate": "linear",
        "params": {"out.weight": 0.5, "hidden.bias": 0.0},
    },
    "update": {"drop_rate": 0.3, "target": "update"},
    "row": {"drop_rate": 0.3, "granularity": "row"},
    "tensor": {"drop_rate": 0.3, "granularity": "tensor"},
    "gaussian": {"drop_rate": 0.2, "distribution": "gaussian"},
    "full-update-drop": {"drop_rate": 0.3, "full_update_drop": 0.4},
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def build(config: dict[str, Any], adam: bool = False) -> tuple[Net, DropGrad]:
    torch.manual_seed(0)
    net = Net()
    kwargs = dict(config)
    if kwargs.get("drop_rate") == "linear":
        kwargs["drop_rate"] = LinearDropRateScheduler(0.05, 0.6, STEPS // 2)
    if adam:
        base: torch.optim.Optimizer = torch.optim.Adam(net.named_parameters(), lr=1e-2)
    else:
        base = torch.optim.SGD(net.named_parameters(), lr=0.05, momentum=0.9, foreach=True)
    return net, DropGrad(base, seed=7, **kwargs)


def train(config: dict[str, Any], step: Callable[[DropGrad], Any] | None) -> tuple[Net, DropGrad]:
    net, opt = build(config)
    run = torch.compile(opt.step, backend="aot_eager") if step is None else None
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(8, 6, generator=generator)
        net(x).pow(2).mean().backward()
        if run is None:
            opt.step()
        else:
            run()
        opt.zero_grad()
    return net, opt


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_step_is_bit_identical_to_eager(name: str) -> None:
    eager_net, eager = train(CONFIGS[name], step=lambda opt: opt.step())
    compiled_net, compiled = train(CONFIGS[name], step=None)
    for a, b in zip(eager_net.parameters(), compiled_net.parameters()):
        assert torch.equal(a, b)
    assert (compiled.step_count, compiled.skipped_count) == (eager.step_count, eager.skipped_count)
    assert compiled.step_count == STEPS
    saved_eager, saved_compiled = eager.state_dict(), compiled.state_dict()
    assert saved_eager["param_groups"] == saved_compiled["param_groups"]
    for key, state in saved_eager["state"].items():
        for field, value in state.items():
            assert torch.equal(value, saved_compiled["state"][key][field]), (key, field)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_no_graph_is_compiled_after_warm_up(name: str) -> None:
    net, opt = build(CONFIGS[name])
    run = torch.compile(opt.step, backend="aot_eager")
    generator = torch.Generator().manual_seed(1)
    graphs_after = []
    for _ in range(STEPS):
        net(torch.randn(8, 6, generator=generator)).sum().backward()
        run()
        opt.zero_grad()
        graphs_after.append(counters["stats"]["unique_graphs"])
    # Warm-up: the first step, and the first skipped step under full update drop.
    assert graphs_after[-1] == graphs_after[STEPS // 2] <= 4
    assert graphs_after[-1] >= 1, "nothing was compiled, so nothing was tested"


def test_the_wrapped_optimizers_step_is_in_the_compiled_graph() -> None:
    graphs: list[torch.fx.GraphModule] = []

    def recording(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append(gm)
        return gm.forward

    net, opt = build({"drop_rate": 0.3}, adam=True)
    run = torch.compile(opt.step, backend=recording)
    net(torch.randn(8, 6)).sum().backward()
    run()
    targets = " ".join(str(node.target) for gm in graphs for node in gm.graph.nodes)
    # Adam's update (its last op, p.addcdiv_(m, denom, value=-step_size)) was traced,
    # not run eagerly.
    assert "addcdiv_" in targets, targets
    assert opt.step_count == 1


def test_a_closure_step_compiles_and_matches_eager() -> None:
    x = torch.randn(8, 6)
    nets_and_opts = [build({"drop_rate": 0.3}) for _ in range(2)]

    def closure_for(net: Net, opt: DropGrad) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = net(x).pow(2).mean()
            loss.backward()
            return loss

        return closure

    (eager_net, eager), (net, opt) = nets_and_opts
    run = torch.compile(opt.step, backend="aot_eager")
    for _ in range(3):
        assert torch.equal(run(closure_for(net, opt)), eager.step(closure_for(eager_net, eager)))
    for a, b in zip(net.parameters(), eager_net.parameters()):
        assert torch.equal(a, b)
    assert opt.step_count == eager.step_count == 3


def test_a_step_inside_a_cuda_graph_capture_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # What torch reports inside torch.cuda.graph(...); tests/test_cuda.py captures for real.
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    net, opt = build({"drop_rate": 0.3})
    net(torch.randn(8, 6)).sum().backward()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match=r"cannot be captured in a CUDA graph: the step"):
        opt.step()
    assert opt.step_count == 0
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
