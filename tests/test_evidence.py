"""Fast checks of the evidence experiments (benchmarks/evidence) and of the figure check.

The experiments themselves are too long for the test suite; these tests run their pieces at
tiny sizes: the data splits, the batched MAML inner loop, the training loop's controls, a
quick end-to-end run of two experiments, the rebuild from saved results, and the link between
every figure label and the data drawn under it.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.evidence import (  # noqa: E402
    __main__ as cli,
)
from benchmarks.evidence import (  # noqa: E402
    data,
    masking,
    mechanism,
    meta_learning,
    models,
    motion,
    runner,
    training,
    tuned,
)


def _load_check_doc_figures():
    path = REPO_ROOT / "benchmarks" / "check_doc_figures.py"
    spec = importlib.util.spec_from_file_location("_bench_check_doc_figures", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


check_doc_figures = _load_check_doc_figures()


# ------------------------------------------------------------------ data


def test_stratified_split_partitions_the_digits():
    split = data.stratified_split(3, train_per_class=20, val_per_class=10)
    _, labels = data.digits()
    assert torch.bincount(labels[split.train], minlength=10).tolist() == [20] * 10
    assert torch.bincount(labels[split.val], minlength=10).tolist() == [10] * 10
    everything = torch.cat([split.train, split.val, split.test])
    assert len(everything) == 1797 and len(set(everything.tolist())) == 1797


def test_symmetric_label_noise_changes_the_stated_share_to_other_classes():
    labels = torch.arange(500) % 10
    noisy, changed = data.symmetric_label_noise(labels, 0.4, seed=0)
    assert int(changed.sum()) == 200
    assert bool((noisy[changed] != labels[changed]).all())
    assert bool((noisy[~changed] == labels[~changed]).all())
    # Every wrong class is used: the noise is spread over the nine others.
    assert len(set(((noisy[changed] - labels[changed]) % 10).tolist())) == 9


def test_index_stream_gives_equal_batches_that_cover_each_epoch():
    batches = data.index_stream(10, 4, 5, seed=0)
    assert [len(b) for b in batches] == [4] * 5
    flat = torch.cat(batches).tolist()
    assert sorted(flat[:10]) == list(range(10))
    assert data.index_stream(10, 20, 2, seed=0)[0].tolist() == list(range(10))


def test_episodes_have_the_requested_shapes_and_labels():
    import numpy as np

    episodes = data.sample_episodes((6, 7, 8, 9), 3, 2, 5, 4, np.random.default_rng(0))
    assert episodes.support_x.shape == (4, 6, 64)
    assert episodes.query_x.shape == (4, 15, 64)
    assert episodes.support_y[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert sorted(set(episodes.query_y.flatten().tolist())) == [0, 1, 2]


def test_in_domain_text_split_has_the_requested_sizes():
    split = data.in_domain_text_split(5_000, 3_000, 500, seed=0)
    assert len(split.train) == 5_000 and len(split.val) == 3_000
    assert split.vocabulary_size > 50


# ------------------------------------------------------------------ meta-learning


def test_batched_inner_loop_equals_one_task_at_a_time():
    import numpy as np

    config = meta_learning.QUICK
    params = models.init_mlp_params([64, 16, 16, 3], torch.Generator().manual_seed(0))
    episodes = data.sample_episodes((0, 1, 2, 3), 3, 1, 5, 3, np.random.default_rng(0))
    kwargs = {"steps": 2, "lr": config["inner_lr"], "create_graph": False}
    batched = meta_learning.adapt(
        [p.expand(3, *p.shape) for p in params], episodes.support_x, episodes.support_y, **kwargs
    )
    for task in range(3):
        alone = meta_learning.adapt(
            [p.unsqueeze(0) for p in params],
            episodes.support_x[task : task + 1],
            episodes.support_y[task : task + 1],
            **kwargs,
        )
        for b, a in zip(batched, alone):
            torch.testing.assert_close(b[task : task + 1], a)


def test_the_outer_gradient_flows_through_drop_grad_in_the_inner_loop():
    import numpy as np

    params = models.init_mlp_params([64, 16, 16, 3], torch.Generator().manual_seed(0))
    episodes = data.sample_episodes((0, 1, 2, 3), 3, 1, 5, 2, np.random.default_rng(0))
    adapted = meta_learning.adapt(
        [p.expand(2, *p.shape) for p in params],
        episodes.support_x,
        episodes.support_y,
        steps=2,
        lr=0.5,
        create_graph=True,
        drop_rate=0.5,
        generator=torch.Generator().manual_seed(1),
    )
    logits = models.batched_mlp(adapted, episodes.query_x)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), episodes.query_y.flatten()).backward()
    for p in params:
        assert p.grad is not None and bool(torch.isfinite(p.grad).all())
        assert float(p.grad.abs().sum()) > 0


# ------------------------------------------------------------------ training loop


def test_training_is_reproducible_and_paired_by_seed():
    spec = {"steps": 6, "eval_every": 3, "dropgrad": {"drop_rate": 0.2}}
    first, second = training.train(spec, 0), training.train(spec, 0)
    assert first == second
    assert first["curves"]["step"] == [3, 6]
    assert training.train(spec, 1)["final"] != first["final"]


def test_matched_isotropic_noise_has_dropgrads_total_variance():
    p = 0.4
    params = [torch.zeros(3, requires_grad=True), torch.zeros(5, requires_grad=True)]
    params[0].grad = torch.tensor([1.0, 2.0, 3.0])
    params[1].grad = torch.tensor([0.0, 0.0, 0.0, 0.0, 4.0])
    noise = training.IsotropicNoise("matched", p, seed=0)
    variance = noise([q for q in params])
    # DropGrad's per-element variance is g^2 p / (1 - p); spread evenly over 8 elements.
    assert variance == pytest.approx(p / (1 - p) * (1 + 4 + 9 + 16) / 8)


def test_fixed_and_annealed_noise_keep_the_first_step_variance():
    params = [torch.zeros(4, requires_grad=True)]
    fixed = training.IsotropicNoise("fixed", 0.5, seed=0)
    annealed = training.IsotropicNoise("annealed", 0.5, seed=0)
    params[0].grad = torch.ones(4)
    first = fixed(params)
    params[0].grad = torch.ones(4)
    assert annealed(params) == pytest.approx(first)
    params[0].grad = torch.full((4,), 10.0)
    assert fixed(params) == pytest.approx(first)
    params[0].grad = torch.full((4,), 10.0)
    assert annealed(params) == pytest.approx(first / 2**training.NOISE_DECAY)


def test_label_noise_run_reports_memorization():
    spec = {"steps": 4, "eval_every": 2, "label_noise": 0.4, "train_per_class": 10}
    final = training.train(spec, 0)["final"]
    assert 0.0 <= final["memorized"] <= 1.0
    assert 0.0 <= final["noisy_true"] <= 1.0 - final["memorized"] + 1e-9


def _tiny_lm_config():
    from benchmarks.evidence import language_model

    return {**language_model.QUICK, "steps": 4, "eval_every": 2, "val_chars": 500}


def test_masking_runs_the_language_model_with_either_optimizer_and_target():
    from benchmarks.evidence import language_model

    config = {**masking.QUICK, "lm": _tiny_lm_config(), "lm_seeds": 1}
    jobs = {
        (j["setting"], j["arm"]): j
        for j in masking.plan(config, [])
        if j["setting"] in masking.LM_SETTINGS
    }
    assert len(jobs) == len(masking.LM_SETTINGS) * len(masking.arms(config))
    sgd = jobs[("lm_sgd_momentum", "update_row")]
    assert sgd["regularizer"]["optimizer"] == "sgd" and sgd["regularizer"]["momentum"] == 0.9
    final = masking.run(sgd)["final"]
    assert final["min_val_loss"] > 0 and final["rise_after_min"] >= 0
    # Experiment 5's Adam, gradient, element arm is experiment 6's DropGrad 0.2, run for run.
    ours = masking.run(jobs[("lm_adam", "gradient_element")])
    theirs = language_model.run(
        language_model.job("language_model", "x", "y", 0, {"drop_rate": 0.2}, config["lm"])
    )
    assert ours == theirs


def test_the_learning_rate_control_of_the_language_model_shrinks_adams_step():
    from benchmarks.evidence import language_model

    spec = language_model.ARMS["adam_lr_matched_0.2"]
    assert spec["lr_scale"] == pytest.approx(0.8**0.5)
    assert ("dropgrad_0.2", "adam_lr_matched_0.2") in language_model.PAIRS


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evidence")
    code = cli.main(["--quick", "--out", str(out), "--experiments", "mechanism", "motion"])
    assert code == 0
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_quick_run_writes_runs_tables_and_figures(quick_results: Path):
    runs = json.loads((quick_results / "mechanism" / "runs.json").read_text())
    assert {r["arm"] for r in runs} == set(mechanism.LABELS)
    meta = json.loads((quick_results / "motion" / "meta.json").read_text())
    assert meta["quick"] is True and meta["config"]["seeds"] == motion.QUICK["seeds"]
    tables = (quick_results / "tables.md").read_text()
    assert "Experiment 2: mechanism controls" in tables
    assert "Do dropped coordinates still move?" in tables
    for name in ("mechanism.png", "optimizer_motion.png"):
        assert (quick_results / "figures" / name).is_file()


def test_meta_records_the_checkout_as_it_was_before_results_were_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Writing into a tracked results directory dirties the checkout; the record must
    # name the state the runs were made from.
    states = iter(["abc1234", "abc1234+dirty"])
    monkeypatch.setattr(runner, "_git_state", lambda: next(states))
    code = cli.main(["--quick", "--out", str(tmp_path), "--experiments", "motion"])
    assert code == 0
    assert json.loads((tmp_path / "motion" / "meta.json").read_text())["git"] == "abc1234"


def test_motion_measures_what_each_optimizer_does_with_a_dropped_entry(quick_results: Path):
    rows = {row["arm"]: row for row in _csv(quick_results / "motion" / "summary.csv")}
    # Plain SGD cannot move a coordinate whose gradient is zero; momentum and Adam do.
    assert float(rows["sgd"]["dropped_moved_fraction_mean"]) == 0.0
    assert float(rows["sgd_momentum"]["dropped_moved_fraction_mean"]) > 0.9
    assert float(rows["adam"]["dropped_moved_fraction_mean"]) > 0.9


def test_motion_figure_labels_match_the_data_they_plot(quick_results: Path):
    record = json.loads((quick_results / "figures.json").read_text())["optimizer_motion.png"]
    moved = record["dropped entries that still moved (%)"]
    assert set(moved) == {"plain SGD", "SGD + momentum", "Adam"}
    # The bar labelled plain SGD is the one at zero (the earlier figure had these swapped).
    assert moved["plain SGD"] == [0.0]
    assert moved["SGD + momentum"][0] > 90 and moved["Adam"][0] > 90
    rows = {row["arm"]: row for row in _csv(quick_results / "motion" / "summary.csv")}
    for arm, label in motion.LABELS.items():
        expected = 100 * float(rows[arm]["dropped_moved_fraction_mean"])
        assert moved[label][0] == pytest.approx(expected, rel=1e-5)


def test_interval_figure_labels_match_the_comparisons(quick_results: Path):
    record = json.loads((quick_results / "figures.json").read_text())["mechanism.png"]
    rows = [
        r
        for r in _csv(quick_results / "mechanism" / "summary.csv")
        if r["kind"] == "comparison" and r["metric"] == "test_acc"
    ]
    panel = record["Δ held-out accuracy (%)"]
    assert len(panel) == len(mechanism.PAIRS) == len(rows)
    for row in rows:
        label = f"{mechanism.LABELS[row['arm']]} vs {mechanism.LABELS[row['reference']]}"
        mean, low, high = panel[label]
        assert mean == pytest.approx(100 * float(row["diff_mean"]), rel=1e-5, abs=1e-9)
        if row["ci_low"]:
            assert low == pytest.approx(100 * float(row["ci_low"]), rel=1e-5, abs=1e-9)
            assert high == pytest.approx(100 * float(row["ci_high"]), rel=1e-5, abs=1e-9)


def test_rebuilding_from_results_is_byte_identical(quick_results: Path):
    built = sorted(
        p
        for p in quick_results.rglob("*")
        if p.is_file() and p.name not in ("runs.json", "meta.json")
    )
    before = {p: p.read_bytes() for p in built}
    assert cli.main(["--from-results", "--out", str(quick_results)]) == 0
    assert {p: p.read_bytes() for p in built} == before


def test_resume_keeps_finished_runs_and_runs_only_missing_ones(quick_results: Path):
    path = quick_results / "motion" / "runs.json"
    runs = json.loads(path.read_text())
    path.write_text(json.dumps(runs[1:]) + "\n")
    code = cli.main(["--quick", "--resume", "--out", str(quick_results), "--experiments", "motion"])
    assert code == 0
    resumed = json.loads(path.read_text())

    # The rerun of the missing run gives the same result; only its duration differs.
    def strip(items):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in items]

    assert strip(resumed) == strip(sorted(runs, key=lambda r: r["id"]))
    meta = json.loads((quick_results / "motion" / "meta.json").read_text())
    assert meta["runs"] == len(runs) and meta["invocation"]["done"] is True


def test_arguments_are_checked(tmp_path: Path):
    with pytest.raises(SystemExit, match="--seeds must be at least 1, got 0"):
        cli.main(["--quick", "--out", str(tmp_path), "--seeds", "0"])
    with pytest.raises(SystemExit, match="--jobs must be at least 1, got 0"):
        cli.main(["--quick", "--out", str(tmp_path), "--jobs", "0"])


def test_rebuilding_an_empty_directory_fails(tmp_path: Path):
    assert cli.main(["--from-results", "--out", str(tmp_path)]) == 1


# ------------------------------------------------------------------ committed results

COMMITTED = REPO_ROOT / "benchmarks" / "results" / "evidence"
DOC_FIGURES = REPO_ROOT / "docs" / "figures"
committed_only = pytest.mark.skipif(
    not all((COMMITTED / name / "runs.json").is_file() for name in runner.EXPERIMENTS),
    reason="the committed full-run results are not in this checkout",
)


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed runs, copied and rebuilt from scratch in a temporary directory."""
    out = tmp_path_factory.mktemp("committed")
    for name in runner.EXPERIMENTS:
        (out / name).mkdir()
        for file in ("runs.json", "meta.json"):
            (out / name / file).write_bytes((COMMITTED / name / file).read_bytes())
    assert cli.main(["--from-results", "--out", str(out)]) == 0
    return out


def _committed_figures() -> dict[str, dict[str, dict[str, list[float]]]]:
    return json.loads((COMMITTED / "figures.json").read_text())


def _comparisons(name: str, metric: str) -> list[dict[str, str]]:
    return [
        row
        for row in _csv(COMMITTED / name / "summary.csv")
        if row["kind"] == "comparison" and row["metric"] == metric
    ]


def _assert_interval_panel(panel: dict[str, list[float]], expected: dict[str, list[float]]):
    """The labels drawn are exactly the expected ones, each with its own (mean, low, high)."""
    assert set(panel) == set(expected)
    for label, values in expected.items():
        assert panel[label] == pytest.approx(values, rel=1e-5, abs=1e-9), label


def _interval(row: dict[str, str], scale: float) -> list[float]:
    return [scale * float(row[k]) for k in ("diff_mean", "ci_low", "ci_high")]


@committed_only
def test_committed_tables_summaries_and_figures_rebuild_byte_identically(rebuilt: Path):
    files = ["tables.md", "figures.json", "calibration.csv"]
    files += [f"{name}/summary.csv" for name in runner.EXPERIMENTS]
    for file in files:
        assert (rebuilt / file).read_bytes() == (COMMITTED / file).read_bytes(), file
    for png in sorted((rebuilt / "figures").glob("*.png")):
        assert png.read_bytes() == (DOC_FIGURES / png.name).read_bytes(), png.name


@committed_only
def test_committed_interval_figures_label_each_comparison_with_its_own_arm():
    record = _committed_figures()
    meta = json.loads((COMMITTED / "masking" / "meta.json").read_text())
    for shots in (1, 5):
        setting = f"{shots}-shot"
        rows = [r for r in _comparisons("meta_learning", "test_acc") if r["setting"] == setting]
        expected = {meta_learning.LABELS[r["arm"]]: _interval(r, 100) for r in rows}
        panel = record["meta_learning.png"][f"{setting}: Δ meta-test accuracy"]
        _assert_interval_panel(panel, expected)
    for setting in masking.SETTINGS:
        title = masking.SETTING_LABELS[setting]
        rows = [r for r in _comparisons("masking", "test_acc") if r["setting"] == setting]
        expected = {masking.label(r["arm"], meta["config"]): _interval(r, 100) for r in rows}
        _assert_interval_panel(record["masking.png"][f"{title}: Δ held-out accuracy"], expected)
    from benchmarks.evidence import language_model

    lm_panels = record["masking_language_model.png"]
    assert len(lm_panels) == len(masking.LM_SETTINGS) * 2
    for setting in masking.LM_SETTINGS:
        for endpoint in (language_model.MIN_VAL, language_model.RISE):
            rows = [r for r in _comparisons("masking", endpoint.metric) if r["setting"] == setting]
            assert len(rows) == len(masking.arms(meta["config"])) - 1
            expected = {masking.label(r["arm"], meta["config"]): _interval(r, 1) for r in rows}
            title = f"{masking.SETTING_LABELS[setting]}: Δ {endpoint.label}"
            _assert_interval_panel(lm_panels[title], expected)
    expected = {
        f"{tuned.SETTING_LABELS[r['setting']]}: {tuned.LABELS[r['arm']]}": _interval(r, 100)
        for r in _comparisons("tuned", "test_acc")
    }
    _assert_interval_panel(record["tuned.png"]["Δ test accuracy vs tuned baseline"], expected)
    for metric, panel, scale in (
        ("test_acc", "Δ held-out accuracy (%)", 100),
        ("log_train_loss", "Δ ln final training loss", 1),
    ):
        expected = {
            f"{mechanism.LABELS[r['arm']]} vs {mechanism.LABELS[r['reference']]}": _interval(
                r, scale
            )
            for r in _comparisons("mechanism", metric)
        }
        _assert_interval_panel(record["mechanism.png"][panel], expected)


@committed_only
def test_committed_curve_figures_end_at_each_arms_own_final_value():
    record = _committed_figures()
    label_noise_runs = json.loads((COMMITTED / "label_noise" / "runs.json").read_text())
    from benchmarks.evidence import label_noise, language_model

    config = json.loads((COMMITTED / "label_noise" / "meta.json").read_text())["config"]
    present = {r["setting"] for r in label_noise_runs}
    panels = label_noise.panels(config, present)
    paths = {label_noise.path_title(s, config): s for s in present if s != "noise_0"}
    assert set(record["label_noise.png"]) == {title for title, _, _ in panels} | set(paths)
    for title, setting, key in panels + [(t, s, "test_acc") for t, s in paths.items()]:
        curves = record["label_noise.png"][title]
        arms = {r["arm"] for r in label_noise_runs if r["setting"] == setting}
        assert set(curves) == {label_noise.LABELS[arm] for arm in arms}
        for arm in arms:
            finals = [
                r["final"][key]
                for r in label_noise_runs
                if r["setting"] == setting and r["arm"] == arm
            ]
            expected = 100 * sum(finals) / len(finals)
            assert curves[label_noise.LABELS[arm]][-1] == pytest.approx(expected, rel=1e-6)
    lm_runs = json.loads((COMMITTED / "language_model" / "runs.json").read_text())
    curves = record["language_model.png"]["validation loss (nats/char)"]
    assert set(curves) == set(language_model.LABELS.values())
    for arm, label in language_model.LABELS.items():
        finals = [r["final"]["final_val_loss"] for r in lm_runs if r["arm"] == arm]
        assert curves[label][-1] == pytest.approx(sum(finals) / len(finals), rel=1e-6)
        minima = [r["final"]["min_val_loss"] for r in lm_runs if r["arm"] == arm]
        assert min(curves[label]) >= min(minima) - 1e-9


@committed_only
def test_committed_motion_bars_carry_their_own_optimizer_names():
    moved = _committed_figures()["optimizer_motion.png"]["dropped entries that still moved (%)"]
    rows = {row["arm"]: row for row in _csv(COMMITTED / "motion" / "summary.csv")}
    assert moved["plain SGD"] == [0.0]
    for arm, label in motion.LABELS.items():
        expected = 100 * float(rows[arm]["dropped_moved_fraction_mean"])
        assert moved[label][0] == pytest.approx(expected, rel=1e-5)


@committed_only
def test_committed_runs_are_complete():
    for name in runner.EXPERIMENTS:
        meta = json.loads((COMMITTED / name / "meta.json").read_text())
        assert meta["quick"] is False and meta["invocation"]["done"] is True, name
        runs = json.loads((COMMITTED / name / "runs.json").read_text())
        assert meta["runs"] == len(runs), name
    final = [
        r
        for r in json.loads((COMMITTED / "tuned" / "runs.json").read_text())
        if not r["setting"].startswith(tuned.SELECT_PREFIX)
    ]
    config = json.loads((COMMITTED / "tuned" / "meta.json").read_text())["config"]
    assert len(final) == len(config["settings"]) * len(tuned.STRENGTHS) * config["seeds"]
    config = json.loads((COMMITTED / "masking" / "meta.json").read_text())["config"]
    masking_runs = json.loads((COMMITTED / "masking" / "runs.json").read_text())
    n_arms = len(masking.arms(config))
    assert len(masking_runs) == (
        len(masking.SETTINGS) * n_arms * config["seeds"]
        + len(masking.LM_SETTINGS) * n_arms * config["lm_seeds"]
        + len(config["lm_lr_candidates"]) * len(config["lm_lr_check_seeds"])
    )
    from benchmarks.evidence import language_model

    config = json.loads((COMMITTED / "language_model" / "meta.json").read_text())["config"]
    lm_runs = json.loads((COMMITTED / "language_model" / "runs.json").read_text())
    assert len(lm_runs) == len(language_model.ARMS) * config["seeds"]


@committed_only
def test_committed_runs_used_the_current_full_settings():
    # A change to an experiment's settings (its seeds, say) must come with a new run.
    for name in runner.EXPERIMENTS:
        meta = json.loads((COMMITTED / name / "meta.json").read_text())
        full = json.loads(json.dumps(runner.experiment(name).FULL))
        assert meta["config"] == full, name


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
