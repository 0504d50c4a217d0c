"""The additions to the evidence experiments: the step-size control and matched memorization
of experiment 3, declared seeds, equivalence bounds, the positive controls and calibration,
the tuned selection's lead, and experiment 1b's first-order step and image split."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.evidence import (  # noqa: E402
    controls,
    data,
    label_noise,
    meta_learning,
    meta_learning_closer,
    models,
    report,
    stats,
    tuned,
)


def _run(memorized: list[float], accuracy: list[float]) -> dict:
    return {"curves": {"memorized": memorized, "test_acc": accuracy}}


def test_matched_accuracy_interpolates_at_the_first_crossing():
    reference = _run([0.1, 0.5, 0.9, 0.6, 1.0], [0.9, 0.8, 0.6, 0.7, 0.5])
    # 0.7 lies halfway between 0.5 and 0.9: halfway between 0.8 and 0.6.
    assert label_noise.matched_accuracy(reference, 0.7) == (pytest.approx(0.7), True)
    # Reached at the first evaluation: its value, no interpolation.
    assert label_noise.matched_accuracy(reference, 0.05) == (0.9, True)
    # Never reached: the final accuracy, flagged.
    assert label_noise.matched_accuracy(_run([0.1, 0.2], [0.9, 0.8]), 0.5) == (0.8, False)


def test_an_arm_on_the_references_path_scores_zero_at_matched_memorization():
    def run(setting, arm, seed, memorized, accuracy):
        return {
            "setting": setting,
            "arm": arm,
            "seed": seed,
            "final": {"memorized": memorized[-1], "test_acc": accuracy[-1]},
            "curves": {"memorized": memorized, "test_acc": accuracy},
        }

    runs = []
    for seed in range(3):
        runs.append(run("noise_40", "none", seed, [0.2, 0.6, 1.0], [0.9, 0.7, 0.5]))
        # Slower, on the same path: ends where none was at 60% memorized.
        runs.append(run("noise_40", "dropgrad_0.4", seed, [0.1, 0.3, 0.6], [0.9, 0.8, 0.7]))
    (c,) = label_noise.matched_comparisons(runs, [("noise_40", "dropgrad_0.4")])
    assert c.diff_mean == pytest.approx(0.0, abs=1e-12) and c.n == 3


def test_the_step_size_controls_scale_adams_learning_rate():
    assert label_noise.CONTROLS["adam_lr_0.4"]["lr"] == pytest.approx(1e-3 * math.sqrt(0.6))
    assert label_noise.CONTROLS["adam_lr_0.2"]["lr"] == pytest.approx(1e-3 * math.sqrt(0.8))
    jobs = label_noise.plan(label_noise.FULL, [])
    settings = {j["setting"] for j in jobs}
    assert settings == {"noise_0", "noise_40", label_noise.LONG}
    long = [j for j in jobs if j["setting"] == label_noise.LONG]
    assert {j["arm"] for j in long} == set(label_noise.LONG_ARMS)
    assert all(j["spec"]["steps"] == label_noise.FULL["long_steps"] for j in long)
    # The first arms keep their ids, so a resumed run adds the new ones only.
    assert "noise_40/dropgrad_0.4/000" in {j["id"] for j in jobs}


def test_equivalence_bound_is_the_smallest_margin_tost_passes():
    diffs = [0.3, -0.1, 0.2, 0.5, 0.0, 0.1]
    bound = stats.equivalence_bound(diffs)
    assert stats.tost_p(diffs, bound * 1.0001) < 0.05 < stats.tost_p(diffs, bound * 0.9999)
    assert math.isnan(stats.equivalence_bound([1.0]))


def _runs(values: dict[str, list[float]]) -> list[dict]:
    return [
        {"setting": "s", "arm": arm, "seed": seed, "final": {"x": value}}
        for arm, series in values.items()
        for seed, value in enumerate(series)
    ]


def test_a_verdict_that_moves_with_added_seeds_is_marked_exploratory():
    endpoint = report.Endpoint("x", "x", margin=0.5)
    # The first 4 seeds alone are undetermined; all 12 are better.
    arm = [0.1, -0.1, 0.2, -0.05] + [1.0] * 8
    runs = _runs({"none": [0.0] * 12, "arm": arm})
    (c,) = report.compare_family(runs, endpoint, [("s", "arm", "none")], declared=4)
    assert c.verdict == "better"
    assert c.extra["exploratory"] and c.extra["declared_verdict"] != "better"
    assert "exploratory" in report.fmt_verdict(c, endpoint)
    # Without added seeds nothing is marked.
    (c,) = report.compare_family(runs, endpoint, [("s", "arm", "none")], declared=12)
    assert "exploratory" not in c.extra


def test_an_equivalence_verdict_states_its_tightest_bound():
    endpoint = report.Endpoint("x", "x (%)", margin=0.01, scale=100)
    runs = _runs({"none": [0.5] * 6, "arm": [0.501, 0.499, 0.5005, 0.4995, 0.5, 0.5002]})
    (c,) = report.compare_family(runs, endpoint, [("s", "arm", "none")])
    assert c.verdict == "equivalent"
    text = report.fmt_verdict(c, endpoint)
    assert text.startswith("equivalent (±1.0; tightest ±") and f"{100 * c.bound90:.2f}" in text


def test_tuned_selection_reports_the_winners_lead_in_validation_images():
    config = {**tuned.QUICK, "selection_seeds": [1000, 1001]}
    runs = []
    for order, (arm, _) in enumerate(tuned.grid("mlp_adam", "none")):
        for seed in config["selection_seeds"]:
            accuracy = {0: 0.90, 1: 0.91, 2: 0.905}[order]
            runs.append(
                {
                    "setting": tuned.SELECT_PREFIX + "mlp_adam",
                    "arm": arm,
                    "seed": seed,
                    "final": {"val_acc": accuracy, "val_loss": 0.3},
                }
            )
    (row,) = [r for r in tuned.selection(runs, config) if r["arm"] == "none"]
    images = config["val_per_class"] * 10 * 2
    assert row["validation_images"] == images
    assert row["lead_images"] == round(0.005 * images)


def test_calibration_ties_the_margin_to_half_the_working_controls_effect(tmp_path: Path):
    import json

    rng = np.random.default_rng(0)
    seeds = range(20)

    def write(name: str, runs: list[dict]) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "runs.json").write_text(json.dumps(runs))

    def runs_of(setting: str, arms: dict[str, float]) -> list[dict]:
        return [
            {
                "setting": setting,
                "arm": arm,
                "seed": s,
                "final": {"test_acc": 0.9 + shift + 0.001 * float(rng.normal())},
            }
            for arm, shift in arms.items()
            for s in seeds
        ]

    write(
        "label_noise",
        runs_of("noise_0", {"none": 0.0, "dropout_0.3": 0.02, "dropgrad_0.2": 0.0}),
    )
    rows, lines = controls.calibrate(tmp_path)
    (claim,) = [r for r in rows if r["kind"] == "calibrated"]
    assert claim["control"] == "dropout_0.3"
    assert claim["margin"] == pytest.approx(0.01, rel=0.1)
    assert claim["verdict"].startswith("equivalent")
    # Without a working control there is no calibrated verdict.
    (tmp_path / "label_noise" / "runs.json").write_text(
        json.dumps(runs_of("noise_0", {"none": 0.0, "dropout_0.3": 0.0, "dropgrad_0.2": 0.0}))
    )
    rows, _ = controls.calibrate(tmp_path)
    (claim,) = [r for r in rows if r["kind"] == "calibrated"]
    assert claim["verdict"] == "none (no working control)" and math.isnan(claim["margin"])


def test_controls_add_dropout_and_weight_decay_to_the_language_model():
    from benchmarks.evidence import language_model

    config = {**language_model.QUICK, "steps": 2, "eval_every": 1, "val_chars": 300}
    job = language_model.job(
        "controls", "x", "y", 0, {"optimizer": "sgd", "lr": 0.1, "weight_decay": 1e-4}, config
    )
    plain = language_model.job("controls", "x", "y", 0, {"optimizer": "sgd", "lr": 0.1}, config)
    assert language_model.run(job)["final"] != language_model.run(plain)["final"]
    arms = {
        j["arm"] for j in controls.plan(controls.QUICK, []) if j["setting"] == "lm_sgd_momentum"
    }
    assert arms == set(controls.LM_ARMS)


def test_closer_maml_splits_the_test_classes_images_in_two():
    val, test = meta_learning_closer.image_halves(meta_learning_closer.FULL)
    assert not set(val) & set(test)
    _, labels = data.digits()
    assert set(labels[torch.from_numpy(val)].tolist()) == {6, 7, 8, 9}
    episodes = meta_learning_closer.episodes(meta_learning_closer.FULL, val, 5, 1)
    x, _ = data.digits()
    allowed = x[torch.from_numpy(val)]
    for image in episodes.query_x.reshape(-1, 64)[:20]:
        assert bool((allowed == image).all(1).any())


def test_the_published_gaussian_draws_unit_mean_noise_of_standard_deviation_p():
    for p in (0.1, 0.2):
        rate = meta_learning_closer.ARMS[f"gaussian_std_{p}"]["rate"]
        assert rate / (1 - rate) == pytest.approx(p**2)


def test_first_order_step_is_the_query_gradient_at_the_adapted_parameters():
    config = meta_learning_closer.FULL
    generator = torch.Generator().manual_seed(0)
    params = models.init_mlp_params([64, 8, 8, 3], generator)
    episode = data.sample_episodes((0, 1, 2, 3), 3, 1, 2, 2, np.random.default_rng(0))
    adapted = meta_learning.adapt(
        [p.expand(2, *p.shape) for p in params],
        episode.support_x,
        episode.support_y,
        steps=2,
        lr=config["inner_lr"],
        create_graph=False,
    )
    loss = F.cross_entropy(
        models.batched_mlp(adapted, episode.query_x).flatten(0, 1), episode.query_y.flatten()
    )
    grads = torch.autograd.grad(loss, adapted)
    # Without the second-order graph, backpropagating to the meta-parameters gives the same.
    loss2 = F.cross_entropy(
        models.batched_mlp(
            meta_learning.adapt(
                [p.expand(2, *p.shape) for p in params],
                episode.support_x,
                episode.support_y,
                steps=2,
                lr=config["inner_lr"],
                create_graph=False,
            ),
            episode.query_x,
        ).flatten(0, 1),
        episode.query_y.flatten(),
    )
    loss2.backward()
    for p, g in zip(params, grads):
        assert torch.allclose(p.grad, g.sum(0), atol=1e-6)
