"""Compare saved selections side by side from their ``report.json`` / ``selection.json`` (coverage of history
lengths and items, the signals' scores), one row per selection folder.

    python run_scripts/compare_selections.py <output_dir>/<dataset>/*-n1024-*
"""
from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="selection folders (each holds report.json and selection.json)")
    args = parser.parse_args()
    rows = []
    for folder in args.folders:
        if not os.path.isfile(os.path.join(folder, "report.json")):
            continue
        with open(os.path.join(folder, "report.json"), encoding="utf-8") as handle:
            report = json.load(handle)
        with open(os.path.join(folder, "selection.json"), encoding="utf-8") as handle:
            selection = json.load(handle)
        cover = report["coverage"]
        rows.append((selection["sampler"], selection["selected_users"], selection["kept_train_samples"],
                     cover["history_length"]["selected"]["mean"], cover["history_length"]["selected"]["median"],
                     cover["items_covered"]["selected"], cover["item_popularity"]["selected"]["median"],
                     cover["history_length"]["all"]["mean"], cover["items_covered"]["all"],
                     cover["item_popularity"]["all"]["median"], os.path.basename(folder.rstrip("/"))))
    print("| sampler | users | train samples | history length mean / median (all: mean) | items covered (all) "
          "| item popularity median (all) | folder |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows):
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} / {r[4]:.0f} ({r[7]:.2f}) | {r[5]} ({r[8]}) | "
              f"{r[6]:.0f} ({r[9]:.0f}) | {r[10]} |")


if __name__ == "__main__":
    main()
