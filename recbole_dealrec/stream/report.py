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
from recbole_dealrec.utils import atomic_write

#: the facts every compared stream must share: the same data cut the same way
SHARED_FACTS = ("dataset", "source_fingerprint", "cut", "cut_times", "interactions_per_period", "model")


def stream_label(report: dict) -> str:
    """``<sampler> / <update>`` (e.g. ``dealrec / incremental``)."""
    return f"{report['run_keys'].get('sampler', 'full')} / {report['update']}"


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


def compare_streams(folders: Sequence[str]) -> dict:
    """Per round: each stream's metrics and seconds, and the reference rows (ranked on the round's test users)."""
    reports = load_streams(folders)
    n_rounds = min(len(r["rounds"]) for r in reports)
    rounds = []
    for index in range(n_rounds):
        records = [r["rounds"][index] for r in reports]
        rounds.append({
            "round": index, "evaluated_on_period": records[0]["evaluated_on_period"], "rows": records[0]["rows"],
            "streams": {stream_label(r): {"test": rec["test_result"], "seconds": rec.get("seconds") or {},
                                          "selected": rec["selection"].get("selected_users"),
                                          "candidates": rec["candidates"], "started_from": rec.get("started_from", {})}
                        for r, rec in zip(reports, records)},
            "references": records[0].get("reference_results") or {},
        })
    facts = {k: reports[0][k] for k in SHARED_FACTS}
    return {**facts, "folders": [os.path.abspath(f) for f in folders], "rounds": rounds,
            "signal_drift": signal_drift(reports)}


def round_folder(report: dict, index: int) -> str:
    """Round ``index``'s folder of a stream (``rounds/r<k>``), from its selection's place."""
    return os.path.dirname(os.path.dirname(report["rounds"][index]["selection"]["folder"]))


def round_signal(report: dict, index: int, name: str) -> Optional[tuple]:
    """``(user tokens, values)`` of signal ``name`` in round ``index`` (its cache entry), or None."""
    import glob

    import numpy as np

    found = glob.glob(os.path.join(round_folder(report, index), "*", "cache", f"{name}-*.npz"))
    if len(found) != 1:
        return None
    with np.load(found[0], allow_pickle=False) as data:
        return data["user_id"].astype(str), data["values"]


def selected_users(report: dict, index: int) -> set:
    with open(os.path.join(report["rounds"][index]["selection"]["folder"], "selection.json"), encoding="utf-8") as handle:
        return set(json.load(handle)["users"])


def signal_drift(reports: Sequence[dict]) -> list[dict]:
    """How far an incremental round's signals and selection are from a fresh (scratch) computation of the same
    sampler and round: per round >= 1 and signal, Spearman's rho over the users both scored, and the share of
    the scratch selection the incremental one also chose."""
    from scipy.stats import spearmanr

    by_label = {stream_label(r): r for r in reports}
    drift = []
    for report in reports:
        if report["update"] != "incremental":
            continue
        scratch = by_label.get(f"{report['run_keys'].get('sampler', 'full')} / scratch")
        if scratch is None:
            continue
        for index in range(1, min(len(report["rounds"]), len(scratch["rounds"]))):
            row = {"stream": stream_label(report), "round": index}
            for name in sorted(report["rounds"][index]["selection"].get("signals") or {}):
                a, b = round_signal(report, index, name), round_signal(scratch, index, name)
                if a is None or b is None or a[1].ndim != 1:
                    continue
                position = {t: i for i, t in enumerate(b[0])}
                shared = [i for i, t in enumerate(a[0]) if t in position]
                rho = spearmanr(a[1][shared], b[1][[position[a[0][i]] for i in shared]]).statistic
                row[f"{name}_spearman"] = float(rho)
            mine, fresh = selected_users(report, index), selected_users(scratch, index)
            row["selection_overlap"] = len(mine & fresh) / max(len(fresh), 1)
            drift.append(row)
    return drift


def comparison_markdown(comparison: dict, metric: str) -> str:
    """The per-round table: one line per stream and reference row; seconds = the round's stages, summed."""
    lines = [f"# Streams of {comparison['dataset']} ({comparison['model']}; periods cut by {comparison['cut']}, "
             f"{comparison['interactions_per_period']} interactions per period)", "",
             "Round r learns from periods 0..r and is evaluated on period r+1 (test users: those of period r+1 with "
             "a history). One replicate per stream: no interval; the reference rows are ranked on the same users.", ""]
    metrics = sorted({m for r in comparison["rounds"] for s in r["streams"].values() for m in (s["test"] or {})})
    header = ["round", "test rows", "stream", *metrics, "seconds", "of which training"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in comparison["rounds"]:
        first = True
        for name, stream in record["streams"].items():
            seconds = stream["seconds"]
            lines.append("| " + " | ".join([
                str(record["round"]) if first else "", str(record["rows"]["test"]) if first else "", name,
                *(f"{(stream['test'] or {}).get(m, float('nan')):.4f}" for m in metrics),
                f"{sum(seconds.values()):.0f}", f"{seconds.get('training', 0.0):.0f}"]) + " |")
            first = False
        for name, values in record["references"].items():
            lines.append("| " + " | ".join(["", "", f"*{name}*", *(f"{values.get(m, float('nan')):.4f}" for m in metrics),
                                            "", ""]) + " |")
    if comparison.get("signal_drift"):
        lines += ["", "Incremental vs a fresh computation (the scratch stream of the same sampler, same round): Spearman's "
                  "rho of each signal over the users both scored, and the share of the fresh selection also chosen.", ""]
        columns = sorted({k for row in comparison["signal_drift"] for k in row} - {"stream", "round"})
        lines += ["| stream | round | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)]
        for row in comparison["signal_drift"]:
            lines.append(f"| {row['stream']} | {row['round']} | "
                         + " | ".join(f"{row[c]:.3f}" if c in row else "-" for c in columns) + " |")
    lines += ["", f"Plot: `streams.png` ({metric} per round of each stream, and seconds per round)."]
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
        left.plot(rounds, [(r["streams"][name]["test"] or {}).get(metric, float("nan")) for r in comparison["rounds"]],
                  marker="o", label=name)
        right.plot(rounds, [sum(r["streams"][name]["seconds"].values()) for r in comparison["rounds"]], marker="o",
                   label=name)
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


def write_comparison(folders: Sequence[str], out: str, metric: Optional[str] = None) -> dict:
    """``out/streams.{json,md,png}``; returns the comparison."""
    comparison = compare_streams(folders)
    metrics = sorted({m for r in comparison["rounds"] for s in r["streams"].values() for m in (s["test"] or {})})
    metric = metric or (metrics[-1] if metrics else "")
    if metrics and metric not in metrics:
        raise ConfigError(f"--metric={metric}: allowed {', '.join(metrics)}")
    os.makedirs(out, exist_ok=True)
    with atomic_write(os.path.join(out, "streams.json"), encoding="utf-8") as handle:
        json.dump(comparison, handle, indent=1)
    with atomic_write(os.path.join(out, "streams.md"), encoding="utf-8") as handle:
        handle.write(comparison_markdown(comparison, metric))
    plot_comparison(comparison, metric, os.path.join(out, "streams.png"))
    return comparison
