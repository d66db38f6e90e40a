"""``python -m recbole_dealrec.experiment run <grid.yaml> [--results R]`` and ``report <results.jsonl> --out D``."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from recbole_dealrec.errors import ConfigError


def default_results_path(grid_path: str) -> str:
    """``<grid folder>/results/<grid file name>.jsonl``."""
    stem = os.path.splitext(os.path.basename(grid_path))[0]
    return os.path.join(os.path.dirname(os.path.abspath(grid_path)), "results", f"{stem}.jsonl")


def parse_overrides(items: Sequence[str]) -> dict:
    from recbole_dealrec.config import parse_literal

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        out[key] = parse_literal(value)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recbole_dealrec.experiment",
                                     description="Run an experiment grid and report its tables and figures.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run every cell not yet done (resumes)")
    run.add_argument("grid", help="grid YAML (see recbole_dealrec/experiment/grid.py)")
    run.add_argument("--results", default=None, help="results file, JSON lines (default: <grid dir>/results/<grid>.jsonl)")
    run.add_argument("--blocks", default=None, help="comma-separated block names: run only these")
    run.add_argument("--no-retry-failed", action="store_true", help="skip cells recorded as failed too")
    run.add_argument("--list", action="store_true", help="print the cells (done or not) and exit")
    run.add_argument("--report", default=None, help="write the report to this folder after the run")
    set_help = "a setting for every cell (a Python literal; e.g. --set llm_path=/models/llama); repeatable"
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    report = commands.add_parser("report", help="tables and figures from a results file")
    report.add_argument("results", help="results file (JSON lines)")
    report.add_argument("--out", required=True, help="output folder (report.md + PNG figures)")
    report.add_argument("--grid", default=None,
                        help="report only this grid file's current cells (as `run --report` does)")
    report.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"with --grid: the run's --set settings (they are part of the cells' keys); {set_help}")
    args = parser.parse_args(argv)

    from recbole_dealrec.experiment import load_grid, read_results, run_grid, write_report

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.command == "run":
            grid = load_grid(args.grid, parse_overrides(args.set))
            results = args.results or default_results_path(args.grid)
            if args.list:
                done = {r["cell"] for r in read_results(results) if r.get("status") == "ok"}
                for cell in grid.cells:
                    print(f"{'done' if cell.key in done else 'todo'} {cell.key} {cell.describe()}")
                return
            blocks = [b for b in (args.blocks or "").split(",") if b] or None
            appended = run_grid(grid, results, retry_failed=not args.no_retry_failed, only_blocks=blocks)
            if args.report:
                # the grid's current cells only: a sampler whose keys changed keeps its old records out of its row
                print(write_report(read_results(results), args.report, os.path.dirname(os.path.abspath(results)),
                                   cell_keys={cell.key for cell in grid.cells})["report"])
            failed = [r for r in appended if r.get("status") != "ok"]
            if failed:  # a grid with failed cells is not a success, whatever the report shows
                parser.exit(1, f"experiment: {len(failed)} of {len(appended)} cells run failed (their errors are in "
                               f"{results}; `run` again retries them)\n")
        else:
            if not os.path.isfile(args.results):
                raise ConfigError(f"results file {args.results!r} not found")
            records = read_results(args.results)
            if not any(r.get("status") == "ok" for r in records):
                raise ConfigError(f"results file {args.results!r} holds no finished cell ({len(records)} records): "
                                  "nothing to report")
            cell_keys = None
            if args.grid:
                cell_keys = {cell.key for cell in load_grid(args.grid, parse_overrides(args.set)).cells}
                if not any(r.get("status") == "ok" and r.get("cell") in cell_keys for r in records):
                    raise ConfigError(f"results file {args.results!r} holds no finished cell of grid {args.grid!r} "
                                      "as given (a cell's key covers its settings and data: give the run's --set "
                                      "settings and data_path): nothing to report")
            print(write_report(records, args.out, os.path.dirname(os.path.abspath(args.results)),
                               cell_keys=cell_keys)["report"])
    except ConfigError as error:
        parser.exit(2, f"experiment: error: {error}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
