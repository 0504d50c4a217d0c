"""Calibrated nulls: positive controls where a "no effect" verdict lacked one, and margins
tied to them.

An equivalence verdict within ±1.0 point says little in a setting where nothing moves held-out
accuracy by a point. This experiment adds Dropout and weight-decay arms to the settings whose
equivalence claims had no regularizer beside them, and :func:`calibrate` re-judges every
claimed null against a margin tied to the positive control of its own setting.

Settings (declared before they ran, 20 seeds for the digits, 10 for the GRU)
    ``digits_adam`` and ``digits_sgd_momentum``: the digits settings of experiment 5 (the
    MLP, 200 training images, 600 steps of 20; Adam at 0.001 or SGD with momentum 0.9 at
    0.05). The Adam setting is also experiment 2's; ``none`` repeats those experiments'
    baselines run by run. ``lm_sgd_momentum``: the GRU of experiment 5 with SGD and momentum
    at 0.1.

Arms
    ``none``; Dropout (0.3 after each hidden layer of the MLP, 0.2 on the GRU's outputs);
    weight decay (the optimizer's coupled L2 term: 0.001 for the MLP, the value tuned weight
    decay selected with the MLP and Adam in experiment 4; 0.0001 for the GRU).

Endpoints
    Those of the experiments the settings come from: final held-out accuracy (digits) and the
    minimum validation loss (GRU); each control against ``none``, one Holm family per
    endpoint.

Calibration (:func:`calibrate`, run on every experiment's committed runs)
    For each setting in which a "no effect" verdict was claimed, every positive control of
    that setting is compared with ``none`` (one Holm family over all controls). A control
    *works* when its Holm-adjusted sign-flip p is below 0.05 in the favourable direction.
    The calibrated margin is half the mean effect of the setting's strongest working
    control; each claimed null is then tested by TOST against it (one Holm family over all
    claims with a margin), and the tightest bound the data support (``stats.bound90``) is
    given beside it. A setting without a working control gets no calibrated verdict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import language_model, masking, report, stats, training
from .figures import FigureRecord

FULL: dict[str, Any] = {
    "seeds": 20,
    "lm_seeds": 10,
    "steps": 600,
    "eval_every": 50,
    "lm_sgd_lr": 0.1,
    "lm": {k: v for k, v in language_model.FULL.items() if k != "seeds"},
}
QUICK: dict[str, Any] = {
    **FULL,
    "seeds": 2,
    "lm_seeds": 2,
    "steps": 20,
    "eval_every": 10,
    "lm": {k: v for k, v in language_model.QUICK.items() if k != "seeds"},
}

DIGIT_SETTINGS = {
    "digits_adam": {"optimizer": "adam", "lr": 1e-3},
    "digits_sgd_momentum": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
}
DIGIT_ARMS: dict[str, dict[str, Any]] = {
    "none": {},
    "dropout_0.3": {"dropout": 0.3},
    "weight_decay_0.001": {"weight_decay": 1e-3},
}
LM_SETTING = "lm_sgd_momentum"
LM_ARMS: dict[str, dict[str, Any]] = {
    "none": {},
    "dropout_0.2": {"dropout": 0.2},
    "weight_decay_0.0001": {"weight_decay": 1e-4},
}
LABELS = {
    "none": "none",
    "dropout_0.3": "Dropout 0.3",
    "dropout_0.2": "Dropout 0.2",
    "weight_decay_0.001": "weight decay 0.001",
    "weight_decay_0.0001": "weight decay 0.0001",
}
SETTING_LABELS = {
    "digits_adam": "digits MLP, Adam",
    "digits_sgd_momentum": "digits MLP, SGD + momentum",
    LM_SETTING: "GRU, SGD + momentum",
}


def plan(config: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    common = {"steps": config["steps"], "eval_every": config["eval_every"]}
    jobs = [
        training.job("controls", setting, arm, seed, {**common, **base, **spec})
        for setting, base in DIGIT_SETTINGS.items()
        for arm, spec in DIGIT_ARMS.items()
        for seed in range(config["seeds"])
    ]
    base = {"optimizer": "sgd", "lr": config["lm_sgd_lr"], "momentum": 0.9}
    jobs += [
        language_model.job("controls", LM_SETTING, arm, seed, {**base, **spec}, config["lm"])
        for arm, spec in LM_ARMS.items()
        for seed in range(config["lm_seeds"])
    ]
    return jobs


def run(job: dict[str, Any]) -> dict[str, Any]:
    return language_model.run(job) if "regularizer" in job else training.run_job(job)


STAGES = (plan,)


def summarize(runs: list[dict[str, Any]], config: dict[str, Any]) -> tuple[list[dict], list[str]]:
    rows: list[dict[str, Any]] = []
    lines = ["## Positive controls for the settings of experiments 2 and 5", ""]
    for endpoint, settings, arms in (
        (masking.TEST_ACC, list(DIGIT_SETTINGS), DIGIT_ARMS),
        (language_model.MIN_VAL, [LM_SETTING], LM_ARMS),
    ):
        pairs = [(s, arm, "none") for s in settings for arm in arms if arm != "none"]
        comparisons = report.compare_family(runs, endpoint, pairs)
        rows += report.comparison_rows(comparisons)
        lines += [report.endpoint_note(endpoint, len(comparisons)), ""]
        for setting in settings:
            table = report.by_seed(runs, endpoint, setting)
            arm_rows = [report.arm_row(setting, a, *table[a], endpoint) for a in arms if a in table]
            rows += [{"kind": "arm", **row} for row in arm_rows]
            lines += [f"**{SETTING_LABELS[setting]}**", ""]
            lines += report.comparison_table(
                arm_rows, comparisons, endpoint, LABELS, setting=setting
            )
            lines.append("")
    return rows, lines


def plot(
    runs: list[dict[str, Any]], rows: list[dict[str, Any]], config: dict[str, Any], where: Any
) -> list[FigureRecord]:
    return []


# ---------------------------------------------------------------- calibration

#: ``(experiment, setting, arm, reference)``
Ref = tuple[str, str, str, str]


def _claims() -> list[dict[str, Any]]:
    """Every setting where a null was claimed: its endpoint, claims and positive controls.

    Fixed before the controls ran: each equivalence verdict on a primary endpoint of
    DropGrad or gradient dropout in the committed tables, and every Dropout or weight-decay
    arm of the same setting.
    """
    from . import label_noise, meta_learning, tuned

    table = [
        {
            "setting": "digits MLP, Adam, 200 images (exp. 2, 5)",
            "endpoint": masking.TEST_ACC,
            "claims": [
                ("mechanism", "mlp_digits", "adam_dropgrad", "adam"),
                ("masking", "adam", "gradient_element", "none"),
                ("masking", "adam", "update_element", "none"),
            ],
            "controls": [
                ("controls", "digits_adam", "dropout_0.3", "none"),
                ("controls", "digits_adam", "weight_decay_0.001", "none"),
            ],
        },
        {
            "setting": "digits MLP, SGD + momentum, 200 images (exp. 5)",
            "endpoint": masking.TEST_ACC,
            "claims": [
                ("masking", "sgd_momentum", "gradient_element", "none"),
                ("masking", "sgd_momentum", "update_element", "none"),
            ],
            "controls": [
                ("controls", "digits_sgd_momentum", "dropout_0.3", "none"),
                ("controls", "digits_sgd_momentum", "weight_decay_0.001", "none"),
            ],
        },
        {
            "setting": "digits MLP, Adam, 500 images, clean labels (exp. 3)",
            "endpoint": label_noise.FINAL,
            "claims": [
                ("label_noise", "noise_0", "dropgrad_0.2", "none"),
                ("label_noise", "noise_0", "dropgrad_0.4", "none"),
            ],
            "controls": [("label_noise", "noise_0", "dropout_0.3", "none")],
        },
    ]
    for setting in tuned.SETTINGS:
        table.append(
            {
                "setting": f"{tuned.SETTING_LABELS[setting]}, tuned (exp. 4)",
                "endpoint": tuned.TEST_ACC,
                "claims": [("tuned", setting, "dropgrad", "none")],
                "controls": [
                    ("tuned", setting, "dropout", "none"),
                    ("tuned", setting, "weight_decay", "none"),
                ],
            }
        )
    table += [
        {
            "setting": "GRU, Adam (exp. 6)",
            "endpoint": language_model.MIN_VAL,
            "claims": [
                ("language_model", "char_gru", "dropgrad_0.1", "none"),
                ("language_model", "char_gru", "dropgrad_0.2", "none"),
                ("masking", "lm_adam", "update_element", "none"),
            ],
            "controls": [("language_model", "char_gru", "dropout_0.2", "none")],
        },
        {
            "setting": "GRU, SGD + momentum (exp. 5)",
            "endpoint": language_model.MIN_VAL,
            "claims": [
                ("masking", "lm_sgd_momentum", "gradient_element", "none"),
                ("masking", "lm_sgd_momentum", "update_element", "none"),
            ],
            "controls": [
                ("controls", LM_SETTING, "dropout_0.2", "none"),
                ("controls", LM_SETTING, "weight_decay_0.0001", "none"),
            ],
        },
    ]
    for shots in (1, 5):
        table.append(
            {
                "setting": f"MAML, {shots}-shot (exp. 1)",
                "endpoint": meta_learning.TEST_ACC,
                "claims": [
                    ("meta_learning", f"{shots}-shot", "bernoulli_0.1", "none"),
                    ("meta_learning", f"{shots}-shot", "ramp_0_to_0.2", "none"),
                ],
                "controls": [("meta_learning", f"{shots}-shot", "dropout_0.2", "none")],
            }
        )
    return table


def _label(experiment: str, arm: str) -> str:
    from . import runner

    module = runner.experiment(experiment)
    labels = getattr(module, "LABELS", {})
    if experiment == "masking":
        return masking.label(arm, {"drop_rate": 0.2})
    return labels.get(arm, arm)


def _compare(runs: list[dict[str, Any]], ref: Ref, endpoint: report.Endpoint) -> stats.Comparison:
    _, setting, arm, reference = ref
    table = report.by_seed(runs, endpoint, setting)
    comparison = stats.compare(
        table[arm][0],
        table[reference][0],
        arm=arm,
        reference=reference,
        metric=endpoint.metric,
        margin=endpoint.margin,
        higher_is_better=endpoint.higher_is_better,
        arm_collapsed=table[arm][1],
        reference_collapsed=table[reference][1],
    )
    comparison.extra["setting"] = setting
    return comparison


def calibrate(out: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The calibration table from every experiment's runs in ``out`` (see the docstring)."""
    runs: dict[str, list[dict[str, Any]]] = {}

    def load(name: str) -> list[dict[str, Any]]:
        if name not in runs:
            path = out / name / "runs.json"
            runs[name] = json.loads(path.read_text()) if path.is_file() else []
        return runs[name]

    def available(ref: Ref) -> bool:
        present = {(r["setting"], r["arm"]) for r in load(ref[0])}
        return (ref[1], ref[2]) in present and (ref[1], ref[3]) in present

    entries = []
    for entry in _claims():
        claims = [c for c in entry["claims"] if available(c)]
        controls = [c for c in entry["controls"] if available(c)]
        if claims:
            entries.append({**entry, "claims": claims, "controls": controls})
    control_comparisons = []
    for entry in entries:
        entry["control_results"] = [
            _compare(load(ref[0]), ref, entry["endpoint"]) for ref in entry["controls"]
        ]
        control_comparisons += entry["control_results"]
    stats.with_holm(control_comparisons)
    claim_comparisons = []
    for entry in entries:
        endpoint = entry["endpoint"]
        working = [
            c for c in entry["control_results"] if c.verdict == "better" and not c.any_collapsed
        ]
        strongest = max(working, key=lambda c: abs(c.diff_mean), default=None)
        entry["strongest"] = strongest
        margin = abs(strongest.diff_mean) / 2 if strongest else float("nan")
        entry["margin"] = margin
        entry["claim_results"] = []
        for ref in entry["claims"]:
            c = _compare(load(ref[0]), ref, endpoint)
            c.margin = margin if strongest else endpoint.margin
            table = report.by_seed(load(ref[0]), endpoint, ref[1])
            seeds = sorted(set(table[ref[2]][0]) & set(table[ref[3]][0]))
            diffs = [table[ref[2]][0][s] - table[ref[3]][0][s] for s in seeds]
            c.p_tost = float("nan") if not strongest else stats.tost_p(diffs, margin)
            entry["claim_results"].append(c)
            if strongest:
                claim_comparisons.append(c)
    for c, adjusted in zip(claim_comparisons, stats.holm([c.p_tost for c in claim_comparisons])):
        c.p_tost_holm = adjusted
    rows: list[dict[str, Any]] = []
    lines = [
        "## Calibrated nulls: margins tied to each setting's positive control",
        "",
        "A positive control works when its Holm-adjusted sign-flip p (one family over the "
        f"{len(control_comparisons)} controls below) is below 0.05 in the favourable "
        "direction. The calibrated margin is half the mean effect of the strongest working "
        "control of the setting; each claimed null is tested by TOST against it (one Holm "
        f"family over the {len(claim_comparisons)} claims that have a margin). The tightest "
        "bound is the largest absolute end of the claim's 90% interval: the smallest margin "
        "an unadjusted TOST would pass.",
        "",
        "| Setting | Positive controls: Δ vs none [95% CI], verdict | Calibrated margin "
        "| Claimed null | Δ vs none [95% CI] | tightest bound | p TOST at the margin (Holm) "
        "| calibrated verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        endpoint = entry["endpoint"]
        controls_text = "; ".join(
            f"{_label(ref[0], ref[2])} {report.fmt_diff(c, endpoint)} {c.verdict}"
            for ref, c in zip(entry["controls"], entry["control_results"])
        )
        if not entry["controls"]:
            controls_text = "none run"
        margin_text = (
            f"±{entry['margin'] * endpoint.scale:.{endpoint.digits + 1}f}"
            if entry["strongest"]
            else "no working positive control"
        )
        for ref, c in zip(entry["claims"], entry["claim_results"]):
            if entry["strongest"]:
                ok = c.p_tost_holm < stats.ALPHA
                verdict = (
                    f"equivalent (±{entry['margin'] * endpoint.scale:.{endpoint.digits + 1}f})"
                )
                verdict = verdict if ok else "not shown"
                p_text = f"{report.fmt_p(c.p_tost)} ({report.fmt_p(c.p_tost_holm)})"
            else:
                verdict, p_text = "none (no working control)", "—"
            bound = report.fmt_bound(c, endpoint)
            lines.append(
                f"| {entry['setting']} | {controls_text} | {margin_text} "
                f"| {_label(ref[0], ref[2])} | {report.fmt_diff(c, endpoint)} | {bound} "
                f"| {p_text} | {verdict} |"
            )
            rows.append(
                {
                    "kind": "calibrated",
                    "setting_label": entry["setting"],
                    "experiment": ref[0],
                    "setting": ref[1],
                    "arm": ref[2],
                    "reference": ref[3],
                    "metric": endpoint.metric,
                    "control": entry["strongest"].arm if entry["strongest"] else "",
                    "control_diff": entry["strongest"].diff_mean if entry["strongest"] else "",
                    "margin": entry["margin"],
                    "diff_mean": c.diff_mean,
                    "ci_low": c.ci_low,
                    "ci_high": c.ci_high,
                    "bound90": c.bound90,
                    "p_tost": c.p_tost,
                    "p_tost_holm": c.p_tost_holm,
                    "verdict": verdict,
                }
            )
            controls_text = margin_text = "″"
    for entry in entries:
        for ref, c in zip(entry["controls"], entry["control_results"]):
            rows.append({"kind": "control", "experiment": ref[0], **c.as_row()})
    return rows, lines
