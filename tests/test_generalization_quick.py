"""Fast checks of the generalization benchmark and of the documentation figure check."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO_ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


generalization = _load("generalization")
check_doc_figures = _load("check_doc_figures")


# ------------------------------------------------------------------ DropConnect layer


def test_dropconnect_draws_a_different_mask_for_each_example():
    torch.manual_seed(0)
    layer = generalization.PerExampleDropConnectLinear(64, 8, p=0.5)
    x = torch.randn(1, 64).expand(2, 64)
    out = layer(x)
    # With one shared mask the two identical rows would give identical outputs.
    assert not torch.allclose(out[0], out[1])


def test_dropconnect_is_the_plain_linear_layer_in_eval_mode():
    torch.manual_seed(0)
    layer = generalization.PerExampleDropConnectLinear(16, 4, p=0.5).eval()
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_dropconnect_mask_keeps_the_expected_fraction_of_weights():
    torch.manual_seed(0)
    p, n = 0.3, 200
    layer = generalization.PerExampleDropConnectLinear(32, 32, p=p)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.zero_()
    # A one-hot input reads one weight column: each output is mask/(1-p) for one weight.
    x = torch.zeros(n, 32)
    x[:, 0] = 1.0
    kept = (layer(x) != 0).float().mean().item()
    trials = n * 32
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / trials)


# ------------------------------------------------------------------ DropGrad wiring


def test_step_schedule_moves_through_its_three_rates():
    model = torch.nn.Linear(2, 2)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = generalization.make_dropgrad({"schedule": "step"}, base, model, total_steps=9, seed=0)
    rates = []
    for _ in range(9):
        rates.append(opt.drop_rate)
        opt.step()
    assert rates == [0.4] * 3 + [0.2] * 3 + [0.0] * 3


def test_weight_and_bias_rates_go_to_the_right_parameters():
    model = torch.nn.Linear(2, 2)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    spec = {"weight_rate": 0.2, "bias_rate": 0.0}
    opt = generalization.make_dropgrad(spec, base, model, total_steps=1, seed=0)
    assert opt._param_rates[model.weight] == 0.2
    assert opt._param_rates[model.bias] == 0.0


def test_a_spec_without_dropgrad_returns_the_optimizer_itself():
    model = torch.nn.Linear(2, 2)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    assert generalization.make_dropgrad({"dropout": True}, base, model, 1, 0) is base


# ------------------------------------------------------------------ runs and statistics


def _digits_job(method: str, epochs: int = 1) -> dict:
    config = {**generalization.QUICK_CONFIG["digits"], "epochs": epochs}
    return {
        "kind": "digits",
        "experiment": "digits",
        "model": "mlp",
        "optimizer": "adam",
        "method": method,
        "spec": generalization.DIGITS_METHODS[method],
        "seed": 0,
        "config": config,
    }


def test_digits_run_is_reproducible_and_uses_a_small_training_split():
    first = generalization.run_job(_digits_job("dropgrad_0.1"))
    second = generalization.run_job(_digits_job("dropgrad_0.1"))
    assert first["final"] == second["final"]
    assert first["n_train"] == 200
    assert first["n_train"] + first["n_test"] == 1797
    assert len(first["curves"]["test_acc"]) == 1


def test_digits_split_is_stratified_and_holds_out_the_rest():
    x_train, y_train, x_test, _ = generalization.digits_split(3, per_class=20)
    assert torch.bincount(y_train, minlength=10).tolist() == [20] * 10
    assert len(x_train) + len(x_test) == 1797
    assert float(x_train.min()) >= 0.0 and float(x_train.max()) <= 1.0


def test_paired_summary_statistics():
    runs = [
        {"model": "m", "optimizer": "o", "method": method, "seed": seed, "final": {"acc": value}}
        for method, values in {"none": [0.5, 0.6, 0.7], "x": [0.6, 0.6, 0.9]}.items()
        for seed, value in enumerate(values)
    ]
    rows = generalization.paired_summary(runs, "acc", "none", ("model", "optimizer"))
    x = next(r for r in rows if r["method"] == "x")
    assert x["n_seeds"] == 3
    assert x["mean"] == pytest.approx(0.7)
    assert x["std"] == pytest.approx(math.sqrt(0.03))
    # Paired differences are 0.1, 0.0, 0.2.
    assert x["diff_mean"] == pytest.approx(0.1)
    assert x["diff_std"] == pytest.approx(0.1)
    assert x["diff_ci95"] == pytest.approx(4.302652729749464 * 0.1 / math.sqrt(3))
    assert x["n_better"] == 2
    baseline = next(r for r in rows if r["method"] == "none")
    assert "diff_mean" not in baseline


def test_quick_motion_run_writes_results_and_figure_under_out(tmp_path):
    code = generalization.main(
        ["--quick", "--out", str(tmp_path), "--seeds", "1", "--workers", "1"]
        + ["--experiments", "motion"]
    )
    assert code == 0
    summary = {
        row["optimizer"]: row for row in json.loads((tmp_path / "motion_runs.json").read_text())
    }
    # Plain SGD cannot move a coordinate whose gradient is zero; momentum and Adam do.
    assert summary["sgd"]["dropped_moved_fraction"] == 0.0
    assert summary["sgd_momentum"]["dropped_moved_fraction"] > 0.9
    assert summary["adam"]["dropped_moved_fraction"] > 0.9
    assert (tmp_path / "figures" / "optimizer_motion.png").is_file()
    assert "Do dropped coordinates still move?" in (tmp_path / "tables.md").read_text()
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["quick"] is True and meta["config"]["seeds"] == 1


def test_seeds_must_be_positive(tmp_path):
    with pytest.raises(SystemExit, match="--seeds must be at least 1"):
        generalization.main(["--quick", "--out", str(tmp_path), "--seeds", "0"])


# ------------------------------------------------------------------ figure check


def test_documentation_figures_all_exist():
    assert check_doc_figures.main([]) == 0


def test_missing_images_are_reported(tmp_path, capsys):
    (tmp_path / "present.png").write_bytes(b"png")
    (tmp_path / "doc.md").write_text(
        "![ok](present.png)\n"
        "![gone](missing.png)\n"
        '<img src="also_missing.png" alt="x">\n'
        "![ref][logo]\n"
        "![remote](https://example.org/x.png)\n"
        "```\n![in code](not_checked.png)\n```\n"
        "[logo]: missing_ref.png\n"
    )
    assert check_doc_figures.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "doc.md:2: missing image missing.png" in err
    assert "doc.md:3: missing image also_missing.png" in err
    assert "doc.md:4: missing image missing_ref.png" in err
    assert "present.png" not in err
    assert "not_checked" not in err
    assert "example.org" not in err


def test_all_images_present_passes(tmp_path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(b"png")
    (tmp_path / "doc.md").write_text('![a](figures/a.png "title")\n')
    assert check_doc_figures.main([str(tmp_path / "doc.md")]) == 0


def test_nothing_to_check_is_an_error(tmp_path, capsys):
    assert check_doc_figures.main([str(tmp_path)]) == 2
    assert "no Markdown files found" in capsys.readouterr().err
    assert check_doc_figures.main([str(tmp_path / "absent.md")]) == 2
