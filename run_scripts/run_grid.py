"""Run an experiment grid and write its report: the same as ``python -m recbole_dealrec.experiment``.

    python run_scripts/run_grid.py run run_scripts/grids/smoke.yaml --results /tmp/smoke.jsonl --report /tmp/smoke
    python run_scripts/run_grid.py report docs/results/cpu_games_tiger/results.jsonl --out docs/results/cpu_games_tiger
"""
import sys

from recbole_dealrec.experiment.__main__ import main

if __name__ == "__main__":
    main(sys.argv[1:])
