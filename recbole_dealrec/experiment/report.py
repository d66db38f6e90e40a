"""Tables and figures in the paper's forms from a grid's results file (JSON lines, one record per cell).

- Table 2 (``table2``): methods x test metrics per (dataset, model, budget): mean and std over seeds; the best
  in bold and the second underlined only where the paired (by seed) 95% t-interval of their difference with the
  methods below excludes zero, ties marked as ties; the paper's one-sample t-test of the best method's per-seed
  values against the second best's mean (scipy), in its own labelled column; and a comparison of every method
  with the reference method (the grid's ``report_reference``, recorded in each record, else ``random``):
  ``statistics.compare_to_reference`` (n, means, mean difference, t-interval, sign-flip p, Holm-adjusted p,
  MDE, a hierarchical bootstrap interval where per-user results with target items exist, a verdict).
- Table 3 (``table3``): each method against full fine-tuning (``sampler: full``): metrics, fine-tuning and
  selection seconds, % change.
- Table 4 (``table4``): DEALRec with each surrogate: metrics, surrogate and influence seconds.
- Figure 4 (``figure4``): ablations beside DEALRec (the ``table2`` DEALRec cells of the same budget).
- Figure 5 (``figure5``): metric and seconds vs the number of selected users, full fine-tuning as a line.
- Figure 6 (``figure6``): test users in three groups by the Random model's test loss, each method per group.
- Figure 7 (``figure7``): metric vs ``dealrec_lambda``.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any, Collection, Iterable, Optional, Sequence

import numpy as np

from recbole_dealrec.experiment import statistics as stats_
from recbole_dealrec.utils import atomic_write

SIGNIFICANCE_LEVEL = 0.01
#: The method every Table-2 method is compared with, unless the records carry the grid's ``report_reference``.
DEFAULT_REFERENCE = "random"
#: Keys of a per-user results file that hold each user's target item (the bootstrap's clusters).
TARGET_KEYS = ("target_item", "target_items", "cluster")


def ok_records(records: Iterable[dict]) -> list[dict]:
    """The finished cells, the latest record of each cell key (a re-run replaces an earlier one). A cell run on
    the default dataset (``dataset`` not set) is named after its selection folder ``<output_dir>/<dataset>/...``."""
    latest: dict[str, dict] = {}
    for record in records:
        if record.get("status") == "ok":
            if not record.get("dataset") and record.get("selection_folder"):
                record = {**record, "dataset": os.path.basename(os.path.dirname(record["selection_folder"]))}
            latest[record["cell"]] = record
    return list(latest.values())


def metric_names(records: Sequence[dict]) -> list[str]:
    """Test metrics in a stable order: recall, then ndcg, then others; by cut-off."""
    names = {k for r in records for k in r.get("test", {})}

    def order(name: str) -> tuple:
        base, _, k = name.partition("@")
        rank = {"recall": 0, "ndcg": 1}.get(base, 2)
        return rank, base, int(k) if k.isdigit() else 0

    return sorted(names, key=order)


def keeps_every_user(record: dict) -> bool:
    """Whether the record's sampler declares that it keeps every user (``full``: the full fine-tuning row)."""
    from recbole_dealrec.selection import SAMPLERS

    sampler = record["settings"].get("sampler")
    return sampler in SAMPLERS.names() and not SAMPLERS.get(sampler).prunes


def budget_of(record: dict) -> str:
    s = record["settings"]
    if keeps_every_user(record):
        return "full"
    if s.get("selection_num") is not None:
        return f"{s['selection_num']}-shot"
    if s.get("selection_ratio") is not None:
        return f"r={s['selection_ratio']}"
    if record.get("selected_users") is not None:  # a budget the sampler does not take (a selection file): its size
        return f"{record['selected_users']} users"
    return "?"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1; 0 for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def seed_cv(values: Sequence[float]) -> Optional[float]:
    """Coefficient of variation over seeds (sample std / mean): the replicate noise a comparison must beat.
    None with fewer than 2 values or a mean of 0."""
    if len(values) < 2:
        return None
    mean, sd = mean_std(values)
    return sd / mean if mean > 0 else None


def one_sample_ttest(best: Sequence[float], second_mean: float) -> Optional[float]:
    """p-value of the one-sample t-test of ``best`` (per-seed values) against the second best's mean; ``None``
    with fewer than 2 values or no spread (the test is undefined)."""
    from scipy import stats

    arr = np.asarray(best, dtype=np.float64)
    if len(arr) < 2 or np.all(arr == arr[0]):
        return None
    return float(stats.ttest_1samp(arr, popmean=second_mean).pvalue)


def _groups(records: Sequence[dict], key) -> dict:
    out: dict = defaultdict(list)
    for r in records:
        out[key(r)].append(r)
    return dict(out)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: Optional[float], digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _seed_maps(records: Sequence[dict], metric: str) -> tuple[dict, Optional[str]]:
    """``{seed: value}`` of one method's records for ``metric``, and an error when two records share a seed (two
    settings under one method label: the seeds cannot pair)."""
    out: dict = {}
    for r in records:
        if metric in r["test"]:
            seed = r["settings"].get("seed")
            if seed in out:
                return out, f"{r['method']}: two records of seed {seed} (two settings under one label), cannot pair"
            out[seed] = float(r["test"][metric])
    return out, None


def _separated(above: dict, below: dict, level: float = 0.95) -> bool:
    """Whether the paired (by seed) t-interval of ``above`` - ``below`` lies above zero."""
    try:
        _, low, _ = stats_.t_interval(stats_.paired_differences(above, below).diffs, level)
    except ValueError:
        return False
    return low > 0


def _cached_user_results(record: dict, results_dir: str, cache: dict):
    """The record's per-user results (read once per path into ``cache``), or why they cannot be read (a str)."""
    path = os.path.join(results_dir, record["user_results"])
    if path not in cache:
        try:
            with np.load(path, allow_pickle=False) as data:
                cache[path] = {key: data[key] for key in data.files}
        except OSError as error:
            cache[path] = f"cannot read {record['user_results']}: {type(error).__name__}"
    return cache[path]


def _user_values(records: Sequence[dict], metric: str, results_dir: str, cache: dict) -> tuple[dict, Optional[str]]:
    """``{seed: (per-user metric [users], target item per user [users], user ids [users])}`` of one method's
    records that carry per-user results (users sorted by ``user_id``), and why some could not be used."""
    from recbole_dealrec.evaluation import per_user_metrics

    base, _, cut = metric.partition("@")
    out, note = {}, None
    for r in records:
        if not r.get("user_results"):
            continue
        users = _cached_user_results(r, results_dir, cache)
        if isinstance(users, str):
            note = users
            continue
        clusters = next((users[key] for key in TARGET_KEYS if key in users), None)
        if clusters is None:
            note = "per-user results hold no target items to cluster users by"
            continue
        if base not in ("recall", "ndcg") or not cut.isdigit() or int(cut) > users["hits"].shape[1]:
            note = f"{metric} not computable from the per-user hits"
            continue
        order = np.argsort(users["user_id"], kind="stable")
        values = per_user_metrics(users["hits"], users["n_targets"], int(cut))[metric]
        out[r["settings"].get("seed")] = (values[order], np.asarray(clusters)[order], users["user_id"][order])
    return out, note


def _comparison_block(group: Sequence[dict], metrics: Sequence[str], results_dir: str, cache: dict,
                      title: str) -> tuple[str, dict]:
    """Markdown of every method against the group's reference, per metric, and the rows behind it."""
    by_method = _groups(group, lambda r: r["method"])
    asked = {r.get("report_reference") for r in group} - {None}
    if len(asked) > 1:
        return f"**warning** ({title}): records disagree on `report_reference` ({sorted(map(str, asked))})", {}
    reference = asked.pop() if asked else DEFAULT_REFERENCE
    samplers = {m: sorted({str(r["settings"].get("sampler")) for r in rs}) for m, rs in by_method.items()}
    rows_md, out, warnings = [], {}, {}
    for k in metrics:
        values, errors = {}, {}
        for m, rs in by_method.items():
            values[m], errors[m] = _seed_maps(rs, k)
        values = {m: v for m, v in values.items() if v}
        try:
            ref = stats_.find_reference(list(values), reference, samplers)
        except ValueError as error:
            warnings.setdefault(str(error), []).append(k)
            continue
        if errors[ref]:
            warnings.setdefault(f"reference {errors[ref]}", []).append(k)
            continue
        read, notes = {}, {}
        for m in values:
            read[m], notes[m] = _user_values(by_method[m], k, results_dir, cache)
        # the bootstrap pairs users: a method's seed counts where its users are the reference's, in the same order
        user_values = {m: {s: (v, c) for s, (v, c, ids) in read[m].items()
                           if s in read[ref] and np.array_equal(ids, read[ref][s][2])} for m in read}
        compared = {m: v for m, v in values.items() if not errors[m] or m == ref}
        rows = stats_.compare_to_reference(compared, ref,
                                           user_values=user_values if any(user_values.values()) else None)
        rows += [{"method": m, "reference": ref, "n": "-", "error": errors[m]} for m in values if errors[m]]
        out[k] = rows
        for row in rows:
            if "error" in row:
                rows_md.append([k, row["method"], row["n"], *["-"] * 8, f"**warning:** {row['error']}"])
                continue
            if row["bootstrap"] is not None:
                boot = f"[{row['bootstrap'][0]:+.4f}, {row['bootstrap'][1]:+.4f}]"
            else:
                note = notes.get(row["method"]) or notes.get(ref)
                boot = f"n/a ({note})" if note else row["bootstrap_note"]
            verdict = row["verdict"] if row["verdict"].startswith("no ") else f"**{row['verdict']}**"
            rows_md.append([k, row["method"], row["n"], _fmt(row["mean_method"]), _fmt(row["mean_reference"]),
                            f"{row['mean_difference']:+.4f}", f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]",
                            f"{row['sign_flip_p']:.3g}", f"{row['holm_p']:.3g}", _fmt(row["mde"]), boot, verdict])
    header = ["metric", "method", "n", "mean (method)", "mean (reference)", "mean difference", "95% t-interval",
              "sign-flip p", "Holm-adjusted p", "MDE (80% power)", "hierarchical bootstrap 95%", "verdict"]
    parts = [f"Against **{ref}** ({title}):\n\n" + _markdown(header, rows_md)] if rows_md else []
    parts += [f"**warning** ({title}; {', '.join(ks)}): {message}" for message, ks in warnings.items()]
    return "\n\n".join(parts), out


REPLICATE_MODE_TEXT = {
    "full": "full pipeline (a seed reseeds the surrogate, every signal, the selection and the backend)",
    "shared_surrogate": "shared surrogate (a seed reseeds the selection and the backend; one surrogate and its signals "
                        "for every seed, so a signal-based method's spread is the backend's alone)",
    None: "not recorded (cells run before replicate modes; the grids then fixed the surrogate's seed)",
}


def replicate_modes_line(records: Sequence[dict]) -> str:
    """What a seed of these cells replicates, in words; a labelled warning when they mix modes."""
    modes = sorted({r.get("replicates") for r in records}, key=str)
    if len(modes) == 1:
        return f"Replicates: {REPLICATE_MODE_TEXT.get(modes[0], modes[0])}."
    return ("**warning**: these cells mix replicate modes (" + ", ".join(str(m) for m in modes) + "): their seeds "
            "are not replicates of one kind, and the intervals below mix them.")


def reference_rows(group: Sequence[dict], metrics: Sequence[str]) -> dict[str, list]:
    """The reference rows (popularity, recent popularity, random: ``references`` of each record, ranked on the
    cell's own test users) of a group of cells: name -> [number of cells, then "mean ± std" per metric]."""
    out: dict[str, list] = {}
    names = [n for r in group for n in (r.get("references") or {})]
    for name in dict.fromkeys(names):
        cells = [r["references"][name] for r in group if name in (r.get("references") or {})]
        texts = []
        for k in metrics:
            values = [c[k] for c in cells if k in c]
            m, sd = mean_std(values) if values else (None, None)
            texts.append("-" if m is None else f"{m:.4f} ± {sd:.4f}" if len(values) > 1 else f"{m:.4f}")
        out[name] = [len(cells), *texts]
    return out


def sensitivity_k(metrics: Sequence[str]) -> Optional[int]:
    """The cut-off of the sensitivity columns: the first Recall@K of the table's metrics (None without one)."""
    return next((int(m.split("@")[1]) for m in metrics if m.startswith("recall@") and m.split("@")[1].isdigit()), None)


def sensitivity_cells(records: Sequence[dict], k: int, results_dir: str, cache: dict) -> list[str]:
    """``[top-target share@k, Recall@k without cold targets]`` of one method's cells, each "mean (n)" over the
    cells whose per-user results allow it (``evaluation.sensitivity``), "-" where none does."""
    from recbole_dealrec.evaluation import sensitivity

    values: dict[str, list[float]] = {f"top_target_share@{k}": [], f"recall@{k}_warm": []}
    for r in records:
        if not r.get("user_results"):
            continue
        users = _cached_user_results(r, results_dir, cache)
        if isinstance(users, str) or users["hits"].shape[1] < k:
            continue
        for name, value in sensitivity(users, k).items():
            if np.isfinite(value):
                values[name].append(value)
    return [f"{np.mean(v):.3f} ({len(v)})" if v else "-" for v in values.values()]


def table2(records: Sequence[dict], results_dir: str = ".") -> tuple[str, list[dict]]:
    """Markdown and the facts behind it (per group and metric: best, second, the paper's p-value, whether the
    best is separated from every other method, the methods tied for best, the comparison with the reference).
    ``results_dir``: the folder the records' per-user results are relative to."""
    rows_out, facts, blocks = [], [], []
    chosen = [r for r in records if "table2" in r.get("tags", [])]
    metrics = metric_names(chosen)
    cache: dict = {}
    for (dataset, model, budget), group in sorted(_groups(chosen, lambda r: (r["dataset"], r["model"], budget_of(r))).items(),
                                                   key=lambda kv: tuple(map(str, kv[0]))):
        by_method = _groups(group, lambda r: r["method"])
        values = {m: {k: [r["test"][k] for r in rs if k in r["test"]] for k in metrics} for m, rs in by_method.items()}
        seeds = {m: {k: _seed_maps(rs, k)[0] for k in metrics} for m, rs in by_method.items()}
        marks: dict[tuple[str, str], str] = {}
        group_facts = []
        for k in metrics:
            ranked = sorted((m for m in values if values[m][k]), key=lambda m: -mean_std(values[m][k])[0])
            if not ranked:
                continue
            leader, rest = ranked[0], ranked[1:]
            fact = {"dataset": dataset, "model": model, "budget": budget, "metric": k, "best": leader,
                    "best_mean": mean_std(values[leader][k])[0], "n_seeds": len(values[leader][k])}
            clear = bool(rest) and all(_separated(seeds[leader][k], seeds[m][k]) for m in rest)
            fact["best_separated"] = clear
            fact["tied_for_best"] = [leader] + [m for m in rest if not _separated(seeds[leader][k], seeds[m][k])]
            if clear:
                marks[(leader, k)] = "best"
                if all(_separated(seeds[rest[0]][k], seeds[m][k]) for m in rest[1:]):
                    marks[(rest[0], k)] = "second"
            elif rest:
                for m in fact["tied_for_best"]:
                    marks[(m, k)] = "tie"
            if rest:
                second_mean = mean_std(values[rest[0]][k])[0]
                p = one_sample_ttest(values[leader][k], second_mean)
                fact.update(second=rest[0], second_mean=second_mean, p_value=p,
                            significant=p is not None and p < SIGNIFICANCE_LEVEL)
            group_facts.append(fact)
        block, comparisons = _comparison_block(group, metrics, results_dir, cache, f"{dataset} / {model} / {budget}")
        for fact in group_facts:
            fact["comparison"] = comparisons.get(fact["metric"])
        facts += group_facts
        if block:
            blocks.append(block)
        k_sens = sensitivity_k(metrics)
        sens_header = [f"top-target share@{k_sens}", f"recall@{k_sens} w/o cold targets"] if k_sens else []
        cv_header = [f"seed CV (recall@{k_sens})"] if k_sens else []
        header = ["dataset", "model", "budget", "method", "seeds", *metrics, *cv_header, *sens_header]
        for method in by_method:
            cells = []
            for k in metrics:
                if not values[method][k]:
                    cells.append("-")
                    continue
                m, s = mean_std(values[method][k])
                text = f"{m:.4f} ± {s:.4f}" if len(values[method][k]) > 1 else f"{m:.4f}"
                mark = marks.get((method, k))
                text = f"**{text}**" if mark == "best" else f"<u>{text}</u>" if mark == "second" else (
                    f"{text} (tie)" if mark == "tie" else text)
                cells.append(text)
            sens = sensitivity_cells(by_method[method], k_sens, results_dir, cache) if k_sens else []
            cv = [_fmt(seed_cv(values[method][f"recall@{k_sens}"]), 2)] if k_sens else []
            rows_out.append([dataset, model, budget, method, len(by_method[method]), *cells, *cv, *sens])
        for name, cells_of in reference_rows(group, metrics).items():
            rows_out.append([dataset, model, budget, f"*{name}* (reference)", cells_of[0], *cells_of[1:],
                             *(["-"] * (len(cv_header) + len(sens_header)))])
    if not rows_out:
        return "", facts
    text = replicate_modes_line(chosen) + "\n\n" + _markdown(header, rows_out)
    text += ("\n\nMean ± sample std over seeds. **Bold**: the highest mean, and the 95% t-interval of its paired "
             "(by seed) difference with every other method excludes zero; <u>underlined</u>: the second, likewise "
             "above every method below it. Where the highest mean is not separated so, nothing is bold and the "
             "methods whose interval with it includes zero (or that have fewer than 2 seeds paired with it) are "
             "marked (tie); equal means are ties, whatever their order. *Reference* rows (the cells' runs rank "
             "their own test users by training popularity, by popularity over the recent window, and at random; "
             "seeds = cells) say what a trivial ranking reaches on the same users; cells run before the plugin "
             "reported them have none. *Seed CV*: sample std / mean of the first Recall over the seeds (how noisy "
             "one replicate is). Sensitivity columns, mean over the cells (n) whose per-user results allow "
             "them: *top-target share*, the share of the hits that come from the single most-hit target item (near "
             "1: the number measures one item's popularity); *recall w/o cold targets*, Recall without the test "
             "users whose target never occurs in training (cells run before the plugin saved each target's "
             "training count show -).")
    tested = [f for f in facts if f.get("p_value") is not None]
    if tested:
        text += "\n\n" + _markdown(["dataset", "model", "budget", "metric", "best", "second",
                                     "paper's one-sample t-test (p)"],
                                    [[f["dataset"], f["model"], f["budget"], f["metric"], f["best"], f["second"],
                                      f"{f['p_value']:.3g}" + (" \\*" if f["significant"] else "")] for f in tested])
        text += (f"\n\nThe paper's test, for comparison with it: a one-sample t-test of the best mean's per-seed "
                 f"values against the second's mean (\\* p < {SIGNIFICANCE_LEVEL}); it treats the second's mean "
                 f"as exact and pairs nothing, so it is not the basis of the marks above.")
    if blocks:
        text += "\n\n### Against the reference method\n\n" + "\n\n".join(blocks) + "\n\n" + COMPARISON_NOTE
    return text, facts


COMPARISON_NOTE = (
    "Each method minus the reference, paired by seed (n = seeds run by both). 95% t-interval: the mean "
    "difference's t-interval (df = n - 1). Sign-flip p: two-sided paired permutation test of the mean difference, "
    "exact over all 2^n sign patterns for n <= 20 (its smallest value is 2 / 2^n: 0.25 with 3 seeds, so with "
    "few seeds an interval that excludes zero rests on the t-interval's normal model, not on this test); "
    "Holm-adjusted p: Holm-Bonferroni over the methods compared with the reference for that metric. MDE: the "
    "smallest true difference a two-sided paired t-test at 5% detects with 80% power given the observed sd of the "
    "differences and n (noncentral t). Hierarchical bootstrap: a second 95% interval, resampling seeds, then "
    "within each seed the test users in clusters of the same target item (needs per-user results with target "
    "items). Verdict: better / worse by the size of the gap and its interval where the t-interval excludes zero; "
    "otherwise no difference was detected and effects outside the interval are excluded at 95%.")


def _mean_metrics(records: Sequence[dict], metrics: Sequence[str]) -> list[Optional[float]]:
    return [float(np.mean([r["test"][k] for r in records if k in r["test"]])) if any(k in r["test"] for r in records)
            else None for k in metrics]


def _pct(value: Optional[float], reference: Optional[float]) -> str:
    if value is None or not reference:
        return "-"
    return f"{100.0 * (value - reference) / reference:+.1f}%"


def table3(records: Sequence[dict]) -> str:
    """Each method against full fine-tuning of the same dataset and model: the cells tagged ``table3``, and where a
    dataset and model has a full cell tagged so, its Table 2 cells too (a grid runs full fine-tuning once, in a
    block of its own, and compares the replicated methods with it); means over the seeds (n)."""
    with_full = {(r["dataset"], r["model"]) for r in records if "table3" in r.get("tags", []) and keeps_every_user(r)}
    chosen = [r for r in records if "table3" in r.get("tags", [])
              or ("table2" in r.get("tags", []) and (r["dataset"], r["model"]) in with_full)]
    metrics = metric_names(chosen)
    rows = []
    for (dataset, model), group in _groups(chosen, lambda r: (r["dataset"], r["model"])).items():
        full = [r for r in group if keeps_every_user(r)]
        ref_metrics = _mean_metrics(full, metrics) if full else [None] * len(metrics)
        ref_time = float(np.mean([r["fine_tuning_seconds"] or 0 for r in full])) if full else None
        for (method, budget), rs in _groups(group, lambda r: (r["method"], budget_of(r))).items():
            means = _mean_metrics(rs, metrics)
            tune = float(np.mean([r["fine_tuning_seconds"] or 0 for r in rs]))
            select = float(np.mean([r["selection_seconds"] or 0 for r in rs]))
            row = [dataset, model, method, budget, str(len({r["settings"].get("seed") for r in rs})), *[_fmt(m) for m in means],
                   f"{tune:.0f}", f"{select:.0f}"]
            if budget != "full":
                row += [" / ".join(_pct(m, ref) for m, ref in zip(means, ref_metrics)), _pct(tune + select, ref_time)]
            else:
                row += ["reference", "reference"]
            rows.append(row)
    if not rows:
        return ""
    header = ["dataset", "model", "method", "budget", "seeds", *metrics, "fine-tuning s", "selection s",
              f"% change vs full ({', '.join(metrics)})", "% change of time (fine-tuning + selection)"]
    return _markdown(header, rows) + ("\n\nSelection seconds: every signal's own compute time (kept with its cache "
                                      "entry, so a cell that reused it still reports it) plus the selection step.")


def table4(records: Sequence[dict]) -> str:
    chosen = [r for r in records if "table4" in r.get("tags", [])]
    metrics = metric_names(chosen)
    rows = []
    for (dataset, model, surrogate), rs in _groups(
            chosen, lambda r: (r["dataset"], r["model"], r["settings"].get("surrogate_model") or "SASRec")).items():
        surrogate_s = max((r.get("seconds", {}).get("surrogate") or 0.0) for r in rs)
        influence_s = max((r.get("signal_seconds", {}).get("influence") or 0.0) for r in rs)
        rows.append([dataset, model, surrogate, len(rs), *[_fmt(m) for m in _mean_metrics(rs, metrics)],
                     f"{surrogate_s:.0f}", f"{influence_s:.0f}"])
    if not rows:
        return ""
    return _markdown(["dataset", "model", "surrogate", "cells", *metrics, "surrogate training s",
                      "influence s (incl. surrogate)"], rows)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def figure4(records: Sequence[dict], out_dir: str) -> list[str]:
    """Grouped bars: each ablation and the method it ablates (its table-2 cells of the same budget: DEALRec's),
    mean over seeds."""
    ablations = [r for r in records if "figure4" in r.get("tags", [])]
    paths = []
    for (dataset, model), group in _groups(ablations, lambda r: (r["dataset"], r["model"])).items():
        budgets = {budget_of(r) for r in group}
        ablated = {r["settings"].get("sampler") for r in group}  # the method the ablations take parts out of
        reference = [r for r in records if "table2" in r.get("tags", []) and r["settings"].get("sampler") in ablated
                     and r["dataset"] == dataset and r["model"] == model and budget_of(r) in budgets]
        rs = reference + [r for r in group if r not in reference]
        metrics = metric_names(rs)
        methods = list(dict.fromkeys(r["method"] for r in rs))
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(1.8 + 1.5 * len(metrics), 3.2))
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            means = _mean_metrics([r for r in rs if r["method"] == method], metrics)
            ax.bar(np.arange(len(metrics)) + i * width, [m or 0 for m in means], width, label=method)
        ax.set_xticks(np.arange(len(metrics)) + width * (len(methods) - 1) / 2, metrics)
        ax.set_title(f"Ablation: {model} on {dataset}")
        ax.legend(fontsize=8)
        paths.append(_save(fig, os.path.join(out_dir, f"figure4_ablation_{dataset}_{model}.png")))
    return paths


def _sweep(records: Sequence[dict], tag: str, x_of, xlabel: str, name: str, title: str, out_dir: str,
           with_time: bool = False) -> list[str]:
    chosen = [r for r in records if tag in r.get("tags", [])]
    paths = []
    for (dataset, model), group in _groups(chosen, lambda r: (r["dataset"], r["model"])).items():
        full = [r for r in records if keeps_every_user(r) and r["dataset"] == dataset
                and r["model"] == model]
        points = [r for r in group if not keeps_every_user(r) and x_of(r) is not None]
        metrics = metric_names(points)[:2]
        if not points or not metrics:
            continue
        plt = _pyplot()
        panels = len(metrics) + (1 if with_time else 0)
        fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.0), squeeze=False)
        for method, rs in _groups(points, lambda r: r["method"]).items():
            xs = sorted({x_of(r) for r in rs})
            for ax, k in zip(axes[0], metrics):
                ax.plot(xs, [np.mean([r["test"][k] for r in rs if x_of(r) == x]) for x in xs], marker="o", label=method)
            if with_time:
                axes[0][-1].plot(xs, [np.mean([(r["fine_tuning_seconds"] or 0) + (r["selection_seconds"] or 0)
                                               for r in rs if x_of(r) == x]) for x in xs], marker="o", label=method)
        for ax, k in zip(axes[0], metrics):
            if full:
                ax.axhline(np.mean([r["test"][k] for r in full]), color="gray", linestyle="--", label="full")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(k)
        if with_time:
            if full:
                axes[0][-1].axhline(np.mean([r["fine_tuning_seconds"] or 0 for r in full]), color="gray",
                                    linestyle="--", label="full")
            axes[0][-1].set_xlabel(xlabel)
            axes[0][-1].set_ylabel("selection + fine-tuning s")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{title}: {model} on {dataset}")
        paths.append(_save(fig, os.path.join(out_dir, f"{name}_{dataset}_{model}.png")))
    return paths


GROUPS = ("easy", "medium", "hard")


def difficulty_groups(records: Sequence[dict], results_dir: str) -> list[dict]:
    """Figure 6's numbers: per (dataset, model), the test users split into three equal groups by the loss of the
    ``figure6`` Random cell's model on their test sample (lowest loss = easy), and each ``figure6`` method's mean
    per-user metrics in each group. Cells without per-user results are left out."""
    from recbole_dealrec.evaluation import load_user_results, per_user_metrics

    chosen = [r for r in records if "figure6" in r.get("tags", []) and r.get("user_results")]
    rows = []
    for (dataset, model), group in _groups(chosen, lambda r: (r["dataset"], r["model"])).items():
        reference = sorted((r for r in group if r["settings"].get("sampler") == DEFAULT_REFERENCE),
                           key=lambda r: r["settings"].get("seed") or 0)
        if not reference:
            continue
        ref = load_user_results(os.path.join(results_dir, reference[0]["user_results"]))
        order = np.argsort(ref["loss"], kind="stable")
        group_of = {}
        for g, part in enumerate(np.array_split(order, len(GROUPS))):
            group_of.update({str(ref["user_id"][i]): g for i in part})
        for r in group:
            users = load_user_results(os.path.join(results_dir, r["user_results"]))
            k_max = users["hits"].shape[1]
            ks = sorted({min(10, k_max), k_max})
            metrics = {}
            for k in ks:
                metrics.update(per_user_metrics(users["hits"], users["n_targets"], k))
            labels = np.array([group_of.get(str(u), -1) for u in users["user_id"]])
            for g, name in enumerate(GROUPS):
                mask = labels == g
                rows.append({"dataset": dataset, "model": model, "method": r["method"], "seed": r["settings"].get("seed"),
                             "group": name, "users": int(mask.sum()),
                             "loss_range": [float(ref["loss"][order][0]), float(ref["loss"][order][-1])],
                             **{m: float(v[mask].mean()) if mask.any() else float("nan") for m, v in metrics.items()}})
    return rows


def figure6(rows: Sequence[dict], out_dir: str) -> tuple[str, list[str]]:
    if not rows:
        return "", []
    metrics = [k for k in rows[0] if "@" in k]
    text = _markdown(["dataset", "model", "method", "group", "users", *metrics],
                     [[r["dataset"], r["model"], r["method"], r["group"], r["users"], *[_fmt(r[m]) for m in metrics]]
                      for r in rows])
    paths = []
    for (dataset, model), group in _groups(rows, lambda r: (r["dataset"], r["model"])).items():
        methods = list(dict.fromkeys(r["method"] for r in group))
        plt = _pyplot()
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.0), squeeze=False)
        width = 0.8 / len(methods)
        for ax, m in zip(axes[0], metrics):
            for i, method in enumerate(methods):
                values = [np.mean([r[m] for r in group if r["method"] == method and r["group"] == g]) for g in GROUPS]
                ax.bar(np.arange(len(GROUPS)) + i * width, values, width, label=method)
            ax.set_xticks(np.arange(len(GROUPS)) + width * (len(methods) - 1) / 2, GROUPS)
            ax.set_ylabel(m)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"Users by difficulty (loss of the Random model): {model} on {dataset}")
        paths.append(_save(fig, os.path.join(out_dir, f"figure6_groups_{dataset}_{model}.png")))
    return text, paths


def write_report(records: Sequence[dict], out_dir: str, results_dir: str = ".",
                 cell_keys: Optional[Collection[str]] = None) -> dict:
    """Write ``report.md`` and the figures under ``out_dir``; return ``{"report": path, "figures": [...],
    "table2_facts": [...]}``. ``results_dir``: the results file's folder (per-user results are relative to it).
    ``cell_keys``: the grid's current cells; records of other cells (a sampler whose keys changed since they ran)
    stay in the results file but are left out of the tables and counted in the report, so one method label never
    mixes two settings."""
    os.makedirs(out_dir, exist_ok=True)
    superseded = 0
    if cell_keys is not None:
        kept = [r for r in records if r.get("cell") in cell_keys]
        superseded, records = len(records) - len(kept), kept
    ok = ok_records(records)
    failed = [r for r in records if r.get("status") == "failed" and r["cell"] not in {o["cell"] for o in ok}]
    t2, facts = table2(ok, results_dir)
    figures = figure4(ok, out_dir)
    figures += _sweep(ok, "figure5", lambda r: r.get("selected_users"), "selected users", "figure5_ratio",
                      "Selection budget", out_dir, with_time=True)
    f6_text, f6_paths = figure6(difficulty_groups(ok, results_dir), out_dir)
    figures += f6_paths
    figures += _sweep(ok, "figure7", lambda r: r["settings"].get("dealrec_lambda"), "lambda", "figure7_lambda",
                      "Lambda", out_dir)
    grids = sorted({str(r.get("grid")) for r in records})
    parts = [f"# Results of grid {', '.join(grids)}", "",
             f"{len(ok)} finished cells, {len(failed)} failed (not re-run since)."
             + (f" {superseded} records of cells no longer in the grid (their keys changed) are left out."
                if superseded else "")]
    for title, body in (("Table 2: methods", t2), ("Table 3: few-shot vs full fine-tuning", table3(ok)),
                        ("Table 4: surrogates", table4(ok))):
        if body:
            parts += ["", f"## {title}", "", body]
    if f6_text:
        parts += ["", "## Figure 6: users by difficulty", "",
                  "Test users split into three equal groups by the test loss of the Random cell's model (easy = "
                  "lowest); each method's mean per-user metrics in each group.", "", f6_text]
    if figures:
        parts += ["", "## Figures", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in figures]
    if failed:
        parts += ["", "## Failed cells", ""] + [f"- `{r['cell']}` {r['method']} {r['model']}: {r['error']}"
                                               for r in failed]
    seconds = [r.get("wall_seconds") or 0 for r in ok]
    parts += ["", f"Cells' wall time: {sum(seconds) / 60:.1f} min in all."]
    path = os.path.join(out_dir, "report.md")
    with atomic_write(path, encoding="utf-8") as handle:
        handle.write("\n".join(parts) + "\n")
    return {"report": path, "figures": figures, "table2_facts": facts}
