"""Experiment grids on top of ``run_recbole``: expand a YAML grid into cells, run them with resume, report the
paper's tables and figures. ``python -m recbole_dealrec.experiment run <grid.yaml>`` / ``report <results>``."""
from recbole_dealrec.experiment.grid import Cell, Grid, check_cells, expand_grid, load_grid
from recbole_dealrec.experiment.report import write_report
from recbole_dealrec.experiment.runner import read_results, run_grid

__all__ = ["Cell", "Grid", "check_cells", "expand_grid", "load_grid", "read_results", "run_grid", "write_report"]
