"""Selection report: what was chosen, from which scores, and how well it covers the data.

Saved beside the selection: ``report.json`` (always) and PNG plots (``report_plots``): score
distributions of all vs selected users, group sizes and picks (Algorithm 2 / CCS bins, TF-DCon / RecRanker
clusters), and coverage (history
lengths, item popularity).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import numpy as np

from recbole_dealrec.selection.base import Selection
from recbole_dealrec.utils import atomic_write


def _stats(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {"n": 0}
    q = np.quantile(x, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {"n": int(len(x)), "mean": float(x.mean()), "std": float(x.std()), "min": float(q[0]),
            "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]), "max": float(q[4])}


def coverage(train_dataset, selected: np.ndarray) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Items covered, item popularity and history lengths of the selected users vs all users.

    Computed on the training rows' targets (every training interaction but each user's first). Returns the
    JSON summary and the raw arrays the plots use.
    """
    uid = train_dataset.inter_feat[train_dataset.uid_field].numpy()
    iid = train_dataset.inter_feat[train_dataset.iid_field].numpy()
    popularity = np.bincount(iid, minlength=train_dataset.item_num)
    chosen = np.isin(uid, selected)
    users, lengths = np.unique(uid, return_counts=True)
    chosen_users = np.isin(users, selected)
    arrays = {"length_all": lengths, "length_selected": lengths[chosen_users],
              "popularity_all": popularity[iid], "popularity_selected": popularity[iid[chosen]]}
    summary = {
        "items_covered": {"all": int(len(np.unique(iid))), "selected": int(len(np.unique(iid[chosen])))},
        "item_popularity": {"all": _stats(arrays["popularity_all"].astype(float)),
                            "selected": _stats(arrays["popularity_selected"].astype(float))},
        "history_length": {"all": _stats(lengths.astype(float)),
                           "selected": _stats(arrays["length_selected"].astype(float))},
    }
    return summary, arrays


def write_report(folder: str, selection: Selection, train_dataset, plots: bool = True,
                 influence_check: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Write ``report.json`` (and PNGs when ``plots``) into ``folder``; return the JSON content.
    ``influence_check``: the recorded retraining check of the influence scores behind the selection (how well
    they predicted removal), shown as ``influence_check``."""
    cover, arrays = coverage(train_dataset, selection.user_ids)
    scores = {}
    for name, user_scores in selection.scores.items():
        picked = np.isin(user_scores.user_ids, selection.user_ids)
        scores[name] = {"all": _stats(user_scores.values), "selected": _stats(user_scores.values[picked])}
    groups = {k: np.asarray(selection.info[k]).tolist() for k in ("bin_edges", "bin_sizes", "bin_picks") if k in selection.info}
    summary = {"selected_users": int(len(selection.user_ids)), "scores": scores, "groups": groups, "coverage": cover}
    if influence_check is not None:
        summary["influence_check"] = dict(influence_check)
    with atomic_write(os.path.join(folder, "report.json")) as handle:
        json.dump(summary, handle, indent=2)
    if plots:
        _plot(folder, selection, groups, arrays)
    return summary


def _save(figure, path: str) -> None:
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100, bbox_inches="tight")


def _hist_all_vs_selected(axis, values: np.ndarray, selected: np.ndarray, bins: int, labels: tuple[str, str]) -> None:
    edges = np.histogram_bin_edges(values, bins=bins)
    axis.hist(values, bins=edges, alpha=0.5, density=True, label=labels[0])
    axis.hist(selected, bins=edges, alpha=0.6, density=True, label=labels[1])
    axis.legend()


def _plot(folder, selection, groups, arrays) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if selection.scores:
        names = list(selection.scores)
        figure, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
        for axis, name in zip(axes[0], names):
            values = selection.scores[name].values
            picked = np.isin(selection.scores[name].user_ids, selection.user_ids)
            _hist_all_vs_selected(axis, values, values[picked], 40, (f"all ({len(values)})", f"selected ({picked.sum()})"))
            axis.set_title(f"{name} score")
        _save(figure, os.path.join(folder, "scores.png"))
        plt.close(figure)
    if groups:
        figure, axis = plt.subplots(figsize=(8, 3.5))
        index = np.arange(len(groups["bin_sizes"]))
        axis.bar(index, groups["bin_sizes"], label="group size", alpha=0.5)
        axis.bar(index, groups["bin_picks"], label="picked", alpha=0.8)
        axis.set_xlabel("group (score bin, low to high; or cluster)")
        axis.set_yscale("symlog")
        axis.legend()
        _save(figure, os.path.join(folder, "groups.png"))
        plt.close(figure)
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    _hist_all_vs_selected(left, np.log1p(arrays["length_all"]), np.log1p(arrays["length_selected"]), 30,
                          ("all users", "selected"))
    left.set_xlabel("log(1 + training samples per user)")
    _hist_all_vs_selected(right, np.log1p(arrays["popularity_all"]), np.log1p(arrays["popularity_selected"]), 30,
                          ("all interactions", "selected users'"))
    right.set_xlabel("log(1 + item popularity)")
    _save(figure, os.path.join(folder, "coverage.png"))
    plt.close(figure)
