"""Streams side by side: several streams of one dataset and cut (other samplers, other ``stream_update``) in one
per-round table, with the reference rows, the seconds of every round, and plots.

``python -m recbole_dealrec.stream compare FOLDER [FOLDER ...] --out OUT`` writes ``OUT/streams.{md,json}`` and
``OUT/streams.png`` (the metric per round of each stream; the seconds per round of each stream).
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from recbole_dealrec.errors import ConfigError
from recbole_dealrec.stream.runner import round_cost
from recbole_dealrec.utils import atomic_write

#: the facts every compared stream must share: the same data cut the same way
SHARED_FACTS = ("dataset", "source_fingerprint", "cut", "cut_times", "interactions_per_period", "model")


#: RecBole's default seed: a stream given none ran with it
DEFAULT_SEED = 2020


def stream_label(report: dict) -> str:
    """``<sampler> / <update>`` (e.g. ``dealrec / incremental``): streams of one label and other seeds are its
    replicates."""
    return f"{report['run_keys'].get('sampler', 'full')} / {report['update']}"


def stream_seed(report: dict) -> int:
    """The seed the stream's runs derived every random step from (each seed a full-pipeline replicate)."""
    return int(report["run_keys"].get("seed", DEFAULT_SEED))


def load_streams(folders: Sequence[str]) -> list[dict]:
    """Each folder's ``report.json``; ``ConfigError`` when a folder holds none or the streams cut other data."""
    reports = []
    for folder in folders:
        path = os.path.join(folder, "report.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{folder}: no report.json (a finished python -m recbole_dealrec.stream run)")
        with open(path, encoding="utf-8") as handle:
            reports.append(json.load(handle))
    first = reports[0]
    for folder, report in zip(folders, reports):
        different = [k for k in SHARED_FACTS if report.get(k) != first.get(k)]
        if different:
            raise ConfigError(f"{folder}: another stream than {folders[0]}'s (differs in {', '.join(different)}); "
                              "compare streams of one dataset, cut and model")
    return reports


def compare_streams(folders: Sequence[str], metric: Optional[str] = None, reference: Optional[str] = None,
                    reports: Optional[Sequence[dict]] = None) -> dict:
    """Per round: each stream label's replicates (one per seed: metrics, seconds), their means, the reference rows
    (ranked on the round's test users, from the first stream of the first seed), and, for ``metric``, every label
    against the ``reference`` label paired by seed (``experiment.statistics.compare_to_reference``: t-interval,
    sign-flip p, Holm, MDE; a label with fewer than 2 paired seeds gets no interval). ``reports``: the folders'
    :func:`load_streams`, when the caller has read them already."""
    import numpy as np

    from recbole_dealrec.experiment.statistics import compare_to_reference

    reports = list(reports) if reports is not None else load_streams(folders)
    seen: dict = {}
    for folder, report in zip(folders, reports):
        key = (stream_label(report), stream_seed(report))
        if key in seen:
            raise ConfigError(f"{folder}: the same stream ({key[0]}, seed {key[1]}) as {seen[key]}")
        seen[key] = folder
    labels = list(dict.fromkeys(stream_label(r) for r in reports))
    n_rounds = min(len(r["rounds"]) for r in reports)
    rounds = []
    for index in range(n_rounds):
        streams = {}
        for label in labels:
            replicates = {stream_seed(r): r["rounds"][index] for r in reports if stream_label(r) == label}
            runs = [{"seed": seed, "test": rec["test_result"] or {}, "seconds": round_cost(rec),
                     "selected": rec["selection"].get("selected_users"), "candidates": rec["candidates"],
                     "started_from": rec.get("started_from", {})} for seed, rec in sorted(replicates.items())]
            names = sorted({m for run in runs for m in run["test"]})
            streams[label] = {
                "replicates": runs, "n": len(runs),
                "mean": {m: float(np.mean([run["test"][m] for run in runs if m in run["test"]])) for m in names},
                "mean_seconds": float(np.mean([sum(run["seconds"].values()) for run in runs])),
                "mean_training_seconds": float(np.mean([run["seconds"].get("training", 0.0) for run in runs]))}
        first = min(reports, key=stream_seed)["rounds"][index]
        row = {"round": index, "evaluated_on_period": first["evaluated_on_period"], "rows": first["rows"],
               "streams": streams, "references": first.get("reference_results") or {}}
        if metric and reference and len(labels) > 1:
            values = {label: {run["seed"]: run["test"][metric] for run in streams[label]["replicates"]
                              if metric in run["test"]} for label in labels}
            row["against_reference"] = compare_to_reference(values, reference=reference)
        rounds.append(row)
    facts = {k: reports[0][k] for k in SHARED_FACTS}
    return {**facts, "folders": [os.path.abspath(f) for f in folders], "metric": metric, "reference": reference,
            "rounds": rounds, "signal_drift": signal_drift(reports)}


def round_signal(report: dict, index: int, name: str) -> Optional[tuple]:
    """``(user tokens, values)`` of signal ``name`` in round ``index`` (the cache entry its selection recorded), or
    None when the round's sampler did not use it or the entry is gone."""
    import numpy as np

    path = (selection_record(report, index).get("signals", {}).get(name) or {}).get("path")
    if not path or not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as data:
        return data["user_id"].astype(str), data["values"]


def selection_record(report: dict, index: int) -> dict:
    """Round ``index``'s ``selection.json`` (the selection's summary: users, signals, budget)."""
    with open(os.path.join(report["rounds"][index]["selection"]["folder"], "selection.json"), encoding="utf-8") as handle:
        return json.load(handle)


def selected_users(report: dict, index: int) -> set:
    return set(selection_record(report, index)["users"])


def signal_drift(reports: Sequence[dict]) -> list[dict]:
    """How far an incremental round's signals and selection are from a fresh (scratch) computation of the same
    sampler and round: per round >= 1 and signal, Spearman's rho over the users both scored, the share of the
    scratch selection the incremental one also chose, and influence's CG steps in both (the incremental round's
    start from the previous round's iHVP solution)."""
    from scipy.stats import spearmanr

    by_label = {(stream_label(r), stream_seed(r)): r for r in reports}
    drift = []
    for report in reports:
        if report["update"] != "incremental":
            continue
        scratch = by_label.get((f"{report['run_keys'].get('sampler', 'full')} / scratch", stream_seed(report)))
        if scratch is None:
            continue
        for index in range(1, min(len(report["rounds"]), len(scratch["rounds"]))):
            row = {"stream": stream_label(report), "seed": stream_seed(report), "round": index}
            for name in sorted(report["rounds"][index]["selection"].get("signals") or {}):
                a, b = round_signal(report, index, name), round_signal(scratch, index, name)
                if a is None or b is None or a[1].ndim != 1:
                    continue
                position = {t: i for i, t in enumerate(b[0])}
                shared = [i for i, t in enumerate(a[0]) if t in position]
                rho = spearmanr(a[1][shared], b[1][[position[a[0][i]] for i in shared]]).statistic
                row[f"{name}_spearman"] = float(rho)
            # the work reused: CG steps from the previous round's iHVP solution against the fresh round's from zero
            steps = [(selection_record(r, index).get("signals", {}).get("influence") or {}).get("iterations")
                     for r in (report, scratch)]
            if None not in steps:
                row["influence_cg_steps"], row["influence_cg_steps_fresh"] = int(steps[0]), int(steps[1])
            mine, fresh = selected_users(report, index), selected_users(scratch, index)
            row["selection_overlap"] = len(mine & fresh) / max(len(fresh), 1)
            drift.append(row)
    return drift


def comparison_markdown(comparison: dict) -> str:
    """The per-round tables: each label's mean over its replicates (n), the reference rows, the labels against
    the reference label for the comparison's metric, and the signals' drift."""
    metric, reference = comparison["metric"], comparison["reference"]
    lines = [f"# Streams of {comparison['dataset']} ({comparison['model']}; periods cut by {comparison['cut']}, "
             f"{comparison['interactions_per_period']} interactions per period)", "",
             "Round r learns from periods 0..r and is evaluated on period r+1 (test users: those of period r+1 with "
             "a history). Each stream's seed is a full-pipeline replicate; a row is the mean over its n replicates. "
             "The reference rows are ranked on the same users.", ""]
    metrics = sorted({m for r in comparison["rounds"] for s in r["streams"].values() for m in s["mean"]})
    header = ["round", "test rows", "stream", "n", *metrics, "seconds", "of which training"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in comparison["rounds"]:
        first = True
        for name, stream in record["streams"].items():
            lines.append("| " + " | ".join([
                str(record["round"]) if first else "", str(record["rows"]["test"]) if first else "", name,
                str(stream["n"]), *(f"{stream['mean'].get(m, float('nan')):.4f}" for m in metrics),
                f"{stream['mean_seconds']:.0f}", f"{stream['mean_training_seconds']:.0f}"]) + " |")
            first = False
        for name, values in record["references"].items():
            lines.append("| " + " | ".join(["", "", f"*{name}*", "", *(f"{values.get(m, float('nan')):.4f}"
                                                                          for m in metrics), "", ""]) + " |")
    if any("against_reference" in r for r in comparison["rounds"]):
        lines += ["", f"Against **{reference}**, {metric}, paired by seed (95% t-interval of the mean difference, "
                  "exact sign-flip p, Holm over the streams compared; fewer than 2 paired seeds: no interval):", "",
                  "| round | stream | n | mean difference | 95% interval | sign-flip p | Holm p | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for record in comparison["rounds"]:
            for row in record.get("against_reference", []):
                if "error" in row:
                    lines.append(f"| {record['round']} | {row['method']} | {row['n']} | - | - | - | - | "
                                 f"no interval: {row['n']} paired seed(s) |")
                else:
                    lines.append(f"| {record['round']} | {row['method']} | {row['n']} | {row['mean_difference']:+.4f} | "
                                 f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}] | {row['sign_flip_p']:.3g} | "
                                 f"{row['holm_p']:.3g} | {row['verdict']} |")
    if comparison.get("signal_drift"):
        lines += ["", "Incremental vs a fresh computation (the scratch stream of the same sampler, seed and round): "
                  "Spearman's rho of each signal over the users both scored, the share of the fresh selection also "
                  "chosen, and influence's CG steps (incremental: from the previous round's iHVP solution; fresh: from "
                  "zero; the same tolerance).", ""]
        columns = sorted({k for row in comparison["signal_drift"] for k in row} - {"stream", "seed", "round"})
        lines += ["| stream | seed | round | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 3)]
        for row in comparison["signal_drift"]:
            lines.append(f"| {row['stream']} | {row['seed']} | {row['round']} | "
                         + " | ".join("-" if c not in row else str(row[c]) if isinstance(row[c], int) else f"{row[c]:.3f}"
                                      for c in columns) + " |")
    lines += ["", f"Plot: `streams.png` ({metric} per round of each stream, the mean over its replicates, and seconds "
              "per round)."]
    return "\n".join(lines) + "\n"


def plot_comparison(comparison: dict, metric: str, path: str) -> None:
    """Two panels: ``metric`` per round of each stream (references dashed), and seconds per round of each stream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in comparison["rounds"]]
    names = list(comparison["rounds"][0]["streams"]) if comparison["rounds"] else []
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        n = comparison["rounds"][0]["streams"][name]["n"]
        left.plot(rounds, [r["streams"][name]["mean"].get(metric, float("nan")) for r in comparison["rounds"]],
                  marker="o", label=f"{name} (n={n})")
        right.plot(rounds, [r["streams"][name]["mean_seconds"] for r in comparison["rounds"]], marker="o",
                   label=f"{name} (n={n})")
    for ref in (comparison["rounds"][0]["references"] if comparison["rounds"] else {}):
        left.plot(rounds, [r["references"].get(ref, {}).get(metric, float("nan")) for r in comparison["rounds"]],
                  linestyle="--", label=ref)
    left.set(xlabel="round (evaluated on period round + 1)", ylabel=metric, title=f"{metric} per round")
    right.set(xlabel="round", ylabel="seconds", title="seconds per round (all stages)")
    for axis in (left, right):
        axis.set_xticks(rounds)
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)


def write_comparison(folders: Sequence[str], out: str, metric: Optional[str] = None,
                     reference: Optional[str] = None) -> dict:
    """``out/streams.{json,md,png}``; returns the comparison. ``metric`` defaults to the last metric (e.g.
    recall@20), ``reference`` to the stream not updated (``... / none``) when there is one, else the first."""
    reports = load_streams(folders)
    metrics = sorted({m for r in reports for rec in r["rounds"] for m in (rec["test_result"] or {})})
    metric = metric or (metrics[-1] if metrics else "")
    if metrics and metric not in metrics:
        raise ConfigError(f"--metric={metric}: allowed {', '.join(metrics)}")
    labels = list(dict.fromkeys(stream_label(r) for r in reports))
    reference = reference or next((label for label in labels if label.endswith("/ none")), labels[0])
    if reference not in labels:
        raise ConfigError(f"--reference={reference!r}: allowed {', '.join(labels)}")
    comparison = compare_streams(folders, metric, reference, reports)
    os.makedirs(out, exist_ok=True)
    with atomic_write(os.path.join(out, "streams.json"), encoding="utf-8") as handle:
        json.dump(comparison, handle, indent=1)
    with atomic_write(os.path.join(out, "streams.md"), encoding="utf-8") as handle:
        handle.write(comparison_markdown(comparison))
    plot_comparison(comparison, metric, os.path.join(out, "streams.png"))
    return comparison
