"""Selection report: what was chosen, from which scores, and how well it covers the data.

Saved beside the selection: ``report.json`` (always) and PNG plots (``report_plots``): score
distributions of all vs selected users, group sizes and picks of Algorithm 2, and coverage (history
lengths, item popularity).
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from recbole_dealrec.selection import Selection
from recbole_dealrec.utils import atomic_write


def _stats(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {"n": 0}
    q = np.quantile(x, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {"n": int(len(x)), "mean": float(x.mean()), "std": float(x.std()), "min": float(q[0]),
            "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]), "max": float(q[4])}


def coverage(train_dataset, selected: np.ndarray) -> dict[str, Any]:
    """Items covered, item popularity and history lengths of the selected users vs all users.

    Computed on the training rows' targets (every training interaction but each user's first).
    """
    uid = train_dataset.inter_feat[train_dataset.uid_field].numpy()
    iid = train_dataset.inter_feat[train_dataset.iid_field].numpy()
    popularity = np.bincount(iid, minlength=train_dataset.item_num)
    chosen = np.isin(uid, selected)
    users, lengths = np.unique(uid, return_counts=True)
    chosen_users = np.isin(users, selected)
    return {
        "items_covered": {"all": int(len(np.unique(iid))), "selected": int(len(np.unique(iid[chosen])))},
        "item_popularity": {"all": _stats(popularity[iid].astype(float)),
                            "selected": _stats(popularity[iid[chosen]].astype(float))},
        "history_length": {"all": _stats(lengths.astype(float)), "selected": _stats(lengths[chosen_users].astype(float))},
        "_lengths": (lengths, chosen_users),
        "_popularity": (popularity[iid], popularity[iid[chosen]]),
    }


def write_report(folder: str, selection: Selection, train_dataset, plots: bool = True) -> dict[str, Any]:
    """Write ``report.json`` (and PNGs when ``plots``) into ``folder``; return the JSON content."""
    cover = coverage(train_dataset, selection.user_ids)
    lengths, chosen_users = cover.pop("_lengths")
    pop_all, pop_selected = cover.pop("_popularity")
    scores = {}
    for name, user_scores in selection.scores.items():
        picked = np.isin(user_scores.user_ids, selection.user_ids)
        scores[name] = {"all": _stats(user_scores.values), "selected": _stats(user_scores.values[picked])}
    groups = {k: np.asarray(selection.info[k]).tolist() for k in ("bin_edges", "bin_sizes", "bin_picks") if k in selection.info}
    summary = {"selected_users": int(len(selection.user_ids)), "scores": scores, "groups": groups, "coverage": cover}
    with atomic_write(os.path.join(folder, "report.json")) as handle:
        json.dump(summary, handle, indent=2)
    if plots:
        _plot(folder, selection, groups, lengths, chosen_users, pop_all, pop_selected)
    return summary


def _save(figure, path: str) -> None:
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100, bbox_inches="tight")


def _plot(folder, selection, groups, lengths, chosen_users, pop_all, pop_selected) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if selection.scores:
        names = list(selection.scores)
        figure, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
        for axis, name in zip(axes[0], names):
            values = selection.scores[name].values
            picked = np.isin(selection.scores[name].user_ids, selection.user_ids)
            bins = np.histogram_bin_edges(values, bins=40)
            axis.hist(values, bins=bins, alpha=0.5, density=True, label=f"all ({len(values)})")
            axis.hist(values[picked], bins=bins, alpha=0.6, density=True, label=f"selected ({picked.sum()})")
            axis.set_title(f"{name} score")
            axis.legend()
        _save(figure, os.path.join(folder, "scores.png"))
        plt.close(figure)
    if groups:
        figure, axis = plt.subplots(figsize=(8, 3.5))
        index = np.arange(len(groups["bin_sizes"]))
        axis.bar(index, groups["bin_sizes"], label="group size", alpha=0.5)
        axis.bar(index, groups["bin_picks"], label="picked", alpha=0.8)
        axis.set_xlabel("group (by overall score, low to high)")
        axis.set_yscale("symlog")
        axis.legend()
        _save(figure, os.path.join(folder, "groups.png"))
        plt.close(figure)
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    bins = np.histogram_bin_edges(np.log1p(lengths), bins=30)
    left.hist(np.log1p(lengths), bins=bins, alpha=0.5, density=True, label="all users")
    left.hist(np.log1p(lengths[chosen_users]), bins=bins, alpha=0.6, density=True, label="selected")
    left.set_xlabel("log(1 + training samples per user)")
    left.legend()
    bins = np.histogram_bin_edges(np.log1p(pop_all), bins=30)
    right.hist(np.log1p(pop_all), bins=bins, alpha=0.5, density=True, label="all interactions")
    right.hist(np.log1p(pop_selected), bins=bins, alpha=0.6, density=True, label="selected users'")
    right.set_xlabel("log(1 + item popularity)")
    right.legend()
    _save(figure, os.path.join(folder, "coverage.png"))
    plt.close(figure)
