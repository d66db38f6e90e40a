"""The retraining check of the influence score: does ``I(u)`` predict what removing users does to the surrogate?

    python -m recbole_dealrec.diagnose influence --out FOLDER [--config_files=a.yaml] [--key=value ...]

The surrogate is the run's own (``surrogate_model``, ``surrogate_config``), trained by the plugin's code path on
all training users from a seeded initialisation; its influence scores are the run's (the influence keys). Then
``check_groups`` random groups of ``check_group_size`` users, and the top and the bottom that many by score, are
each removed and the surrogate retrained from the same initialisation for the same epochs
(``check_retrain: fixed_epochs``) or with RecBole's early stopping on validation (``early_stopping``). For each
group the prediction ``sum_{u in S} I(u) / n`` (DEALRec Eq. 11: removing ``u`` changes the target by about
``+I(u)/n``) is set against the measured change of the target the scores are of (``influence_target``): the
empirical risk ``R = (1/n) sum_u L_u`` over ALL training users (``train``; ``influence_user_loss`` makes ``L_u``)
or the mean loss of the users' validation rows (``validation``). The seed noise floor is the standard deviation of
the target over
``check_seeds`` retrainings on all users with other seeds. Written to ``FOLDER``: ``influence_check.json``,
``influence_check.md`` and a scatter plot.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from logging import getLogger
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from recbole.utils import init_seed, set_color

from recbole_dealrec.compat import init_logger
from recbole_dealrec.config import (PROPERTIES_DIR, DealrecConfig, StageArguments, check_known_keys, read_property_file,
                                    user_keys)
from recbole_dealrec.data import create_dataset, data_preparation, prune_train_data, training_user_ids
from recbole_dealrec.errors import ConfigError, check_integer
from recbole_dealrec.model import get_model
from recbole_dealrec.scoring.influence import (InfluenceArguments, influence_scores, record_influence_check,
                                              scored_in_sequence_mode)
from recbole_dealrec.surrogate import SurrogateLoss, SurrogateRun, user_batches
from recbole_dealrec.surrogate.loss import check_windows, sampled_negatives
from recbole_dealrec.surrogate.train import private_checkpoint_dir, training_data_and_loss, surrogate_config, surrogate_trainer
from recbole_dealrec.utils import atomic_write

RETRAIN_MODES = ("fixed_epochs", "early_stopping")
BOOTSTRAP_DRAWS = 2000


@dataclasses.dataclass(frozen=True)
class CheckArguments(StageArguments):
    """The check's keys of ``properties/diagnose.yaml`` (see the comments there), and ``seed``."""

    property_file = ("", "diagnose")
    declared_elsewhere = ("seed",)

    check_groups: int
    check_group_size: int
    check_seeds: int
    check_retrain: str
    seed: int

    def check(self) -> None:
        check_integer("check_groups", self.check_groups, 1)
        check_integer("check_group_size", self.check_group_size, 1)
        check_integer("check_seeds", self.check_seeds, 2, "the noise floor is a standard deviation")
        if self.check_retrain not in RETRAIN_MODES:
            raise ConfigError(f"check_retrain must be one of {list(RETRAIN_MODES)}, got {self.check_retrain!r}")


# ---------------------------------------------------------------------------------------------- the statistics

def removal_agreement(predicted: Sequence[float], measured: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """How well ``predicted`` [groups] changes match ``measured`` [groups]: Pearson and Spearman with 95% percentile
    bootstrap intervals over groups (``BOOTSTRAP_DRAWS`` resamples, seeded)."""
    from scipy import stats

    x, y = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if len(x) < 3:
        raise ValueError("the agreement of predicted and measured changes needs at least 3 groups")
    out: dict[str, Any] = {"pearson": float(stats.pearsonr(x, y)[0]), "spearman": float(stats.spearmanr(x, y)[0])}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {"pearson": [], "spearman": []}
    for _ in range(BOOTSTRAP_DRAWS):
        pick = rng.integers(len(x), size=len(x))
        if np.ptp(x[pick]) == 0 or np.ptp(y[pick]) == 0:
            continue  # a resample of one repeated group has no correlation
        draws["pearson"].append(float(np.corrcoef(x[pick], y[pick])[0, 1]))
        draws["spearman"].append(float(stats.spearmanr(x[pick], y[pick])[0]))
    for name, values in draws.items():
        out[f"{name}_95"] = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else None
    return out


# ---------------------------------------------------------------------------------------------- the surrogate

def empirical_risk(model: torch.nn.Module, train_dataset, user_loss: str, batch_rows: int, sequence: bool,
                   negatives=None, windows: str = "sliding") -> float:
    """``R = (1/n) sum_u L_u`` over every user of ``train_dataset`` (``user_loss``: mean or sum of a user's prefix
    losses; ``negatives``: the sampled softmax the scores are of, None = full; ``sequence``, ``windows``: the rows
    the scores are of, :func:`~recbole_dealrec.scoring.influence.scored_in_sequence_mode`), in eval mode."""
    loss = SurrogateLoss(model, user_loss, negatives)
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in user_batches(train_dataset, batch_rows, sequence=sequence, windows=windows):
            losses = loss({}, batch).double()
            total, n = total + float(losses.sum()), n + len(losses)
    return total / n


def retrain(scfg: DealrecConfig, config, train_data, valid_data, mode: str, seed: int) -> torch.nn.Module:
    """The surrogate trained on ``train_data`` from the initialisation of ``seed`` (the same weights and the same
    shuffling stream for every group), for ``epochs`` epochs (``fixed_epochs``) or with early stopping on
    validation, keeping the best epoch (``early_stopping``); returned in eval mode."""
    given = {k: v for k, v in user_keys(scfg).items() if k != "model"}
    scfg = DealrecConfig(scfg["model"], scfg["dataset"], config_dict={**given, "seed": seed})
    if mode == "fixed_epochs":
        scfg["stopping_step"] = int(scfg["epochs"]) + 1
    init_seed(seed, scfg["reproducibility"])
    model = get_model(scfg["model"])(scfg, train_data.dataset).to(scfg["device"])
    fit_data, loss_func = training_data_and_loss(scfg, model, train_data)
    with private_checkpoint_dir(config, scfg):
        trainer = surrogate_trainer(scfg, model, loss_func=loss_func)
        trainer.fit(fit_data, valid_data, saved=mode == "early_stopping", show_progress=False)
        if mode == "early_stopping" and trainer.best_state is not None:
            model.load_state_dict(trainer.best_state)
    return model.eval()


def influence_check(config: DealrecConfig, args: CheckArguments,
                    progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Run the check (module docstring) and return its report: per group the predicted and measured change, the
    agreement, the noise floor and the top-vs-bottom comparison."""
    say = progress or (lambda text: getLogger().info(set_color("[Check]", "pink") + " " + text))
    influence = InfluenceArguments.from_config(config)
    scfg = surrogate_config(config)
    init_seed(args.seed, scfg["reproducibility"])
    train_data, valid_data, _ = data_preparation(scfg, create_dataset(scfg))
    full_dataset = train_data.dataset
    # the quantity the scores predict the change of: the training risk over all users, or the validation loss
    validation = influence.influence_target == "validation"
    target_dataset = valid_data.dataset if validation else full_dataset
    windows = "sliding" if validation else check_windows(scfg["surrogate_windows"])

    def risk(model) -> float:  # of the rows the scores are of: one validation row per user, or the training rows
        sequence = not validation and scored_in_sequence_mode(influence.influence_sequence_mode, windows, model)
        return empirical_risk(model, target_dataset, influence.influence_user_loss, influence.influence_batch_rows,
                              sequence, sampled_negatives(scfg, model), windows)

    say(f"training the surrogate on all users (seed {args.seed}, {args.check_retrain})")
    full_model = retrain(scfg, config, train_data, valid_data, args.check_retrain, args.seed)
    base_risk = risk(full_model)
    scored = influence_scores(influence, SurrogateRun(config=scfg, model=full_model, train_dataset=full_dataset,
                                                      key="influence-check", valid_dataset=valid_data.dataset))
    users = np.asarray(full_dataset.token2id(full_dataset.uid_field, list(scored.tokens)), dtype=np.int64)
    scores = np.asarray(scored.scores, dtype=np.float64)
    everyone = training_user_ids(full_dataset)
    n = len(everyone)
    size = args.check_group_size
    if 2 * size > n or args.check_groups * size > n:
        raise ConfigError(f"check_group_size={size}: groups of that size do not fit in the {n} training users")
    rng = np.random.default_rng(args.seed)
    order = np.argsort(-scores, kind="stable")
    groups = {f"random {g + 1}": np.sort(rng.choice(users, size=size, replace=False)) for g in range(args.check_groups)}
    groups["top"], groups["bottom"] = np.sort(users[order[:size]]), np.sort(users[order[-size:]])
    score_of = dict(zip(users.tolist(), scores.tolist()))
    rows = []
    for name, removed in groups.items():
        kept = np.setdiff1d(everyone, removed)
        say(f"group {name}: retraining without its {size} users")
        model = retrain(scfg, config, prune_train_data(scfg, train_data, kept), valid_data, args.check_retrain, args.seed)
        rows.append({"group": name, "predicted": float(sum(score_of[u] for u in removed.tolist()) / n),
                     "measured": risk(model) - base_risk, "users": removed.tolist()})
    noise = []
    for offset in range(1, args.check_seeds + 1):
        say(f"noise floor: all users, seed {args.seed + offset}")
        noise.append(risk(retrain(scfg, config, train_data, valid_data, args.check_retrain, args.seed + offset)))
    noise_sd = float(np.std([base_risk, *noise], ddof=1))
    by_name = {r["group"]: r for r in rows}
    top, bottom = by_name["top"], by_name["bottom"]
    history = np.bincount(full_dataset.inter_feat[full_dataset.uid_field].numpy(), minlength=full_dataset.user_num)
    from scipy import stats

    return {
        "surrogate": scfg["model"], "dataset": config["dataset"], "retrain": args.check_retrain, "seed": args.seed,
        "n_users": n, "group_size": size, "user_loss": influence.influence_user_loss,
        "target": influence.influence_target, "risk_all_users": base_risk,
        "groups": rows,
        "agreement": removal_agreement([r["predicted"] for r in rows], [r["measured"] for r in rows], args.seed),
        "agreement_random_groups": removal_agreement([r["predicted"] for r in rows if r["group"].startswith("random")],
                                                     [r["measured"] for r in rows if r["group"].startswith("random")],
                                                     args.seed) if args.check_groups >= 3 else None,
        "noise_sd": noise_sd, "noise_seeds": args.check_seeds,
        "top_vs_bottom": {
            "predicted_order_right": bool((top["predicted"] > bottom["predicted"]) == (top["measured"] > bottom["measured"])),
            "measured_difference": top["measured"] - bottom["measured"],
            "in_noise_sds": (top["measured"] - bottom["measured"]) / noise_sd if noise_sd > 0 else None,
        },
        "spearman_score_history_length": float(stats.spearmanr(scores, history[users])[0]),
    }


def write_check_report(report: Mapping[str, Any], out: str) -> dict[str, str]:
    """``influence_check.json``, ``influence_check.md`` and ``influence_check.png`` (predicted vs measured) in
    ``out``, each written atomically."""
    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, f"influence_check.{name}") for name in ("json", "md", "png")}
    with atomic_write(paths["json"]) as handle:
        json.dump(report, handle, indent=1)
    a, top = report["agreement"], report["top_vs_bottom"]

    def interval(values):
        return f"[{values[0]:+.2f}, {values[1]:+.2f}]" if values else "-"

    lines = [f"# Influence retraining check: {report['surrogate']} on {report['dataset']}", "",
             f"{report['n_users']} training users; groups of {report['group_size']} removed, the surrogate retrained "
             f"({report['retrain']}, seed {report['seed']}); influence target `{report.get('target', 'train')}`: R = the "
             f"{'validation loss' if report.get('target') == 'validation' else 'training risk over all users'} with "
             f"the `{report['user_loss']}` per-user loss: {report['risk_all_users']:.6f}; seed noise floor of R (SD over "
             f"{report['noise_seeds'] + 1} seeds): {report['noise_sd']:.2e}.", "",
             "| group | predicted change of R | measured change of R | measured / noise SD |", "|---|---|---|---|"]
    for r in report["groups"]:
        ratio = f"{r['measured'] / report['noise_sd']:+.2f}" if report["noise_sd"] else "-"
        lines.append(f"| {r['group']} | {r['predicted']:+.3e} | {r['measured']:+.3e} | {ratio} |")
    lines += ["", f"- Pearson(predicted, measured) over all groups: {a['pearson']:+.2f} {interval(a.get('pearson_95'))}; "
              f"Spearman: {a['spearman']:+.2f} {interval(a.get('spearman_95'))} (95% bootstrap over groups)."]
    if report.get("agreement_random_groups"):
        rg = report["agreement_random_groups"]
        lines.append(f"- Random groups alone: Pearson {rg['pearson']:+.2f} {interval(rg.get('pearson_95'))}, Spearman "
                     f"{rg['spearman']:+.2f} {interval(rg.get('spearman_95'))}.")
    lines.append(f"- Top vs bottom by score: the predicted order is {'right' if top['predicted_order_right'] else 'reversed'}; "
                 f"measured difference {top['measured_difference']:+.3e}"
                 + (f" = {top['in_noise_sds']:+.2f} noise SDs." if top["in_noise_sds"] is not None else "."))
    lines.append(f"- Spearman(score, history length): {report['spearman_score_history_length']:+.2f}.")
    with atomic_write(paths["md"]) as handle:
        handle.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    for r in report["groups"]:
        colour = "tab:red" if r["group"] == "top" else "tab:blue" if r["group"] == "bottom" else "gray"
        ax.scatter(r["predicted"], r["measured"], color=colour, s=18)
    ax.axhline(report["noise_sd"], color="gray", lw=0.6, ls=":")
    ax.axhline(-report["noise_sd"], color="gray", lw=0.6, ls=":")
    ax.set_xlabel("predicted change of R"), ax.set_ylabel("measured change of R")
    ax.set_title("red: top, blue: bottom; dotted: ±1 seed SD", fontsize=8)
    fig.tight_layout()
    with atomic_write(paths["png"], "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recbole_dealrec.diagnose",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["influence"])
    parser.add_argument("--out", required=True, help="folder for influence_check.{json,md,png}")
    parser.add_argument("--dataset", "-d", default=None)
    parser.add_argument("--config_files", default=None, help="comma- or space-separated property files")
    known, rest = parser.parse_known_args(argv)
    files = [f for f in (known.config_files or "").replace(",", " ").split() if f]
    defaults = read_property_file(os.path.join(PROPERTIES_DIR, "diagnose.yaml"))
    try:
        # the run's config (SASRec as the run's model: its surrogate and influence keys are what is checked)
        config = DealrecConfig("SASRec", known.dataset, files, config_dict={"sampler": "dealrec"}, argv=rest)
        check_known_keys(config)  # a misspelled key fails here, not after the retrainings
        args = CheckArguments.from_config({**defaults, **{k: config[k] for k in defaults if config[k] is not None},
                                           "seed": config["seed"]})
        init_logger(config)
        report = influence_check(config, args)
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    paths = write_check_report(report, known.out)
    # the selection reports of runs on this surrogate with these influence keys show it (influence_check)
    paths["recorded"] = record_influence_check(config, report, os.path.abspath(known.out))
    print(json.dumps({"agreement": report["agreement"], "top_vs_bottom": report["top_vs_bottom"], **paths}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
