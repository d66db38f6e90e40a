"""How DEALRec's selection (lambda 0: surrogate + influence + Algorithm 2) grows with the data: seconds and peak
memory per stage against the number of interactions, one fresh process per dataset, and the fitted growth exponent
``seconds ~ interactions^k`` (issue 25 item 6).

    python run_scripts/bench_scale.py --data-path /tmp/games_run/data --datasets ml-100k games \\
        --synthetic 0.25 1.0 --synthetic-path /tmp/scale_data --out docs/results/scale

``--synthetic F`` adds a seeded Book-like dataset (``make_synthetic_dataset.py``) with F times the paper's Book
(88,263 users, 86,272 items, 5,303,707 interactions), built once under ``--synthetic-path``. The surrogate is the
paper's size (hidden 64, 2 layers, length 50) with the sampled softmax (``--surrogate-loss``) on chunked windows
(``--windows``); the exponent is
fitted by least squares on log seconds against log interactions over the datasets from ``--fit-from`` on.
Writes ``results.jsonl`` (one line per dataset, appended as each ends: a long run resumes), ``table.md`` and
``scale.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from recbole_dealrec.utils import atomic_write

BOOK = {"users": 88263, "items": 86272, "interactions": 5303707}
#: The paper's surrogate (SASRec 64 x 2, length 50), one epoch budget per dataset set by --surrogate-epochs.
SURROGATE = {"hidden_size": 64, "inner_size": 256, "n_layers": 2, "n_heads": 2, "MAX_ITEM_LIST_LENGTH": 50,
             "stopping_step": 2, "train_batch_size": 1024, "eval_batch_size": 4096}


def synthetic_name(fraction: float) -> str:
    return f"book_like_{fraction:g}".replace(".", "p")


def build_synthetic(fraction: float, path: str) -> str:
    name = synthetic_name(fraction)
    if not os.path.isfile(os.path.join(path, name, f"{name}.inter")):
        subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "make_synthetic_dataset.py"),
                        "--name", name, "--output", path, "--users", str(round(BOOK["users"] * fraction)),
                        "--items", str(round(BOOK["items"] * fraction)),
                        "--interactions", str(round(BOOK["interactions"] * fraction))], check=True)
    return name


def run_one(args) -> dict:
    """One dataset's selection in this process: the stages' seconds and peak RSS."""
    from recbole_dealrec import pipeline
    from recbole_dealrec.config import DealrecConfig
    from recbole_dealrec.quick_start import check_run_config

    run_keys, surrogate_keys = json.loads(args.set or "{}"), json.loads(args.surrogate_set or "{}")
    config = DealrecConfig("SASRec", args.one, config_dict={
        **({"data_path": args.one_path} if args.one_path else {}), "output_dir": args.output_dir,
        "show_progress": False, "sampler": "dealrec", "dealrec_lambda": 0, "selection_ratio": args.ratio,
        **run_keys,
        "surrogate_config": {**SURROGATE, "epochs": args.surrogate_epochs, "surrogate_loss": args.surrogate_loss,
                             "surrogate_negatives": args.negatives, "surrogate_windows": args.windows,
                             **surrogate_keys}})
    method, model_class = check_run_config(config)
    setup = pipeline.setup_run(config, method, model_class)
    start = time.perf_counter()
    data = pipeline.load_data(setup)
    pipeline.select_users(setup, data)
    inter = data.dataset.inter_num
    return {"dataset": args.one, "interactions": int(inter), "users": int(data.dataset.user_num - 1),
            "items": int(data.dataset.item_num - 1), "seconds": setup.timer.seconds, "peak_gb": setup.timer.peak_gb,
            "total_s": time.perf_counter() - start, "surrogate_loss": args.surrogate_loss,
            "surrogate_windows": args.windows, "surrogate_epochs": args.surrogate_epochs,
            "set": run_keys, "surrogate_set": surrogate_keys}


def fit_exponent(rows: list[dict]) -> float:
    x = np.log([r["interactions"] for r in rows])
    y = np.log([r["total_s"] for r in rows])
    return float(np.polyfit(x, y, 1)[0])


def report(rows: list[dict], args) -> str:
    rows = sorted(rows, key=lambda r: r["interactions"])
    stages = sorted({s for r in rows for s in r["seconds"]})
    lines = ["| dataset | interactions | users | items | total s | peak GB | " + " | ".join(f"{s} s" for s in stages) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(stages)]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['interactions']:,} | {r['users']:,} | {r['items']:,} | {r['total_s']:.1f} | "
                     f"{max(r['peak_gb'].values()):.2f} | " + " | ".join(f"{r['seconds'].get(s, 0):.1f}" for s in stages) + " |")
    fitted = [r for r in rows if r["interactions"] >= args.fit_from]
    if len(fitted) >= 2:
        lines += ["", f"Growth exponent k (seconds ~ interactions^k, least squares over the {len(fitted)} datasets with "
                  f"at least {args.fit_from:,} interactions): **{fit_exponent(fitted):.2f}**"]
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["interactions"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["interactions"] for r in rows]
    for stage in sorted({s for r in rows for s in r["seconds"]}):
        left.plot(x, [r["seconds"].get(stage, np.nan) for r in rows], "o-", label=stage)
    left.plot(x, [r["total_s"] for r in rows], "k*-", label="total")
    right.plot(x, [max(r["peak_gb"].values()) for r in rows], "o-")
    for axis, label in ((left, "seconds"), (right, "peak RSS (GB)")):
        axis.set_xscale("log")
        axis.set_xlabel("interactions")
        axis.set_ylabel(label)
    left.set_yscale("log")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", default=None, help="folder holding the named --datasets (ml-100k: embedded)")
    parser.add_argument("--datasets", nargs="*", default=["ml-100k"])
    parser.add_argument("--synthetic", nargs="*", type=float, default=[], help="fractions of the paper's Book")
    parser.add_argument("--synthetic-path", default="saved/scale_data")
    parser.add_argument("--ratio", type=float, default=0.0224, help="budget as a share of the users (Games: 1,024)")
    parser.add_argument("--surrogate-epochs", type=int, default=1)
    parser.add_argument("--surrogate-loss", default="sampled", choices=["full", "sampled"])
    parser.add_argument("--negatives", type=int, default=100)
    parser.add_argument("--windows", default="chunked", choices=["sliding", "chunked"])
    parser.add_argument("--fit-from", type=int, default=250_000,
                        help="fit k over datasets with this many interactions (Games has 293,173: from Games on)")
    parser.add_argument("--output-dir", default="saved/bench_scale")
    parser.add_argument("--out", required=True, help="folder for results.jsonl, table.md and scale.png")
    parser.add_argument("--set", default=None, help='run keys as JSON, e.g. \'{"influence_batch_rows": 512, '
                        '"influence_hvp_cache_gb": 0}\' (the keys that bound memory)')
    parser.add_argument("--surrogate-set", default=None, help='surrogate_config keys as JSON, e.g. '
                        '\'{"train_batch_size": 512}\'')
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--one-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args)))
        return
    os.makedirs(args.out, exist_ok=True)
    results = os.path.join(args.out, "results.jsonl")
    done = {}
    if os.path.isfile(results):
        with open(results, encoding="utf-8") as handle:
            done = {r["dataset"]: r for r in map(json.loads, handle)}
    todo = [(name, None if name == "ml-100k" else args.data_path) for name in args.datasets]
    todo += [(build_synthetic(f, args.synthetic_path), args.synthetic_path) for f in args.synthetic]
    for name, path in todo:
        if name in done:
            continue
        command = [sys.executable, __file__, "--one", name, "--out", args.out, "--ratio", str(args.ratio),
                   "--surrogate-epochs", str(args.surrogate_epochs), "--surrogate-loss", args.surrogate_loss,
                   "--negatives", str(args.negatives), "--windows", args.windows, "--output-dir", args.output_dir]
        command += ["--set", args.set] if args.set else []
        command += ["--surrogate-set", args.surrogate_set] if args.surrogate_set else []
        if path:
            command += ["--one-path", path]
        done_run = subprocess.run(command, capture_output=True, text=True)
        if done_run.returncode:
            raise SystemExit(f"{name} failed:\n" + "\n".join(done_run.stderr.splitlines()[-15:]))
        output = done_run.stdout
        row = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
        done[name] = row
        with open(results, "a", encoding="utf-8") as handle:  # one line per dataset, appended as it ends
            handle.write(json.dumps(row) + "\n")
        print(f"{name}: {row['total_s']:.1f} s, peak {max(row['peak_gb'].values()):.2f} GB", flush=True)
    table = report(list(done.values()), args)
    with atomic_write(os.path.join(args.out, "table.md"), "w") as handle:
        handle.write(table + "\n")
    plot(list(done.values()), os.path.join(args.out, "scale.png"))
    print(table)


if __name__ == "__main__":
    main()
