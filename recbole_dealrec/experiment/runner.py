"""Run a grid's cells in this process through ``run_recbole``, one JSON line per cell in a results file.

Resumable: a cell whose key already has an ``ok`` record is skipped (a failed one is run again). Signals are
reused across cells through the plugin's cache (``<output_dir>/<dataset>/cache``), so a grid's cells sharing an
``output_dir`` compute each surrogate, influence and effort score once. A failing cell is recorded with its error
and the grid goes on.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from logging import getLogger
from typing import Any, Optional

from tqdm import tqdm

from recbole_dealrec.experiment.grid import Cell, Grid, check_cells
from recbole_dealrec.errors import ConfigError

RECORD_VERSION = 1


def code_version() -> dict:
    """The package version and, in a git checkout, the commit and whether the tree had local changes."""
    import recbole_dealrec

    out: dict[str, Any] = {"package": getattr(recbole_dealrec, "__version__", None)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(recbole_dealrec.__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            out["commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10)
            out["dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def read_results(path: str) -> list[dict]:
    """Every record of a results file (JSON lines); a torn last line (a killed run) is skipped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                getLogger().warning(f"{path}: last line is incomplete (an interrupted write); ignored")
                continue
            raise ConfigError(f"{path}:{number}: not a JSON record; is this a grid's results file?") from None
    return records


def append_record(path: str, record: dict) -> None:
    """Append one JSON line and fsync it: a crash loses at most the line being written, never earlier ones."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    line = json.dumps(record, sort_keys=True, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB; Linux reports KiB). Cells run in one process, so a
    cell's figure is the peak over it and every earlier cell."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _number(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def user_results_path(results_path: str, cell: Cell) -> str:
    """Where a Figure-6 cell's per-user test results go: ``<results stem>-users/<cell key>.npz``."""
    return os.path.join(os.path.splitext(os.path.abspath(results_path))[0] + "-users", f"{cell.key}.npz")


def run_cell(cell: Cell, user_results: Optional[str] = None, user_loss: bool = False) -> dict:
    """Run one cell; return its record (``status`` ``ok`` or ``failed`` with the error). ``user_results``: also
    write each test user's hits and target item there (the run's ``test_user_results_file``), with ``user_loss``
    the trained model's loss on each user's test sample too (Figure 6: one extra forward per test user)."""
    from recbole_dealrec.quick_start import run_recbole

    settings = dict(cell.settings)
    if user_results:
        settings.update(test_user_results_file=user_results, test_user_loss=bool(user_loss))
    record: dict[str, Any] = {
        "version": RECORD_VERSION, "grid": cell.grid, "cell": cell.key, "block": cell.block, "tags": list(cell.tags),
        "method": cell.method, "model": cell.model, "dataset": cell.dataset, "settings": cell.settings,
        "config_files": list(cell.config_files), "replicates": cell.replicates, "seeds": cell.seeds(),
        **({"report_reference": cell.report_reference} if cell.report_reference is not None else {}),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "code": code_version(),
    }
    start = time.perf_counter()
    try:
        result = run_recbole(cell.model, cell.dataset, list(cell.config_files), settings)
    except Exception as error:  # a failing cell is a result, not the grid's end
        record.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    else:
        selection = result["selection"]
        seconds = selection.get("seconds", {})
        signals = selection.get("signals") or {}
        signal_seconds = {name: meta.get("compute_seconds") for name, meta in signals.items() if isinstance(meta, dict)}
        record.update(
            status="ok",
            test=({k: _number(v) for k, v in result["test_result"].items()}),
            valid=({k: _number(v) for k, v in (result["best_valid_result"] or {}).items()}),
            # trivial rankings on the cell's own test users (popularity, recent popularity, random)
            references={name: {k: _number(v) for k, v in metrics.items()}
                        for name, metrics in (result.get("reference_results") or {}).items()},
            best_valid_score=_number(result["best_valid_score"]),
            evaluation_facts=result.get("evaluation_facts") or {},
            seconds=seconds,
            # what the selection cost, cached or not: each signal's own compute time (kept with its cache entry)
            # plus the selection step; fine-tuning apart
            signal_seconds=signal_seconds,
            selection_seconds=round(sum(v or 0.0 for v in signal_seconds.values()) + seconds.get("selection", 0.0), 2),
            fine_tuning_seconds=seconds.get("training"),
            selection_folder=selection.get("folder"),
            selected_users=selection.get("selected_users"),
            kept_train_samples=selection.get("kept_train_samples"),
            checkpoint=selection.get("checkpoint"),
            # relative to the results file, so a results folder can move (the report resolves it)
            user_results=user_results and os.path.join(*user_results.split(os.sep)[-2:]),
        )
    record["wall_seconds"] = round(time.perf_counter() - start, 2)
    record["peak_rss_mb"] = _peak_rss_mb()
    gc.collect()
    return record


def run_grid(grid: Grid, results_path: str, retry_failed: bool = True, check: bool = True,
             only_blocks: Optional[list[str]] = None) -> list[dict]:
    """Run every cell of ``grid`` not yet ``ok`` in ``results_path``; return the records this call appended.

    Before the first cell: the results file must belong to this grid (by name), and (``check``) every cell's
    keys pass the run's own pre-data checks. ``only_blocks`` runs those blocks only (a long grid in parts).
    Several processes may run one grid on one results file (one per core): each claims a cell with a lock file
    (``<results>.locks/<cell>``) and skips cells another has finished or holds.
    """
    existing = read_results(results_path)
    others = sorted({r.get("grid") for r in existing if r.get("grid") != grid.name}, key=str)
    if others:
        raise ConfigError(f"{results_path} holds records of grid(s) {others}, not of {grid.name!r}; "
                          "give this grid its own results file")
    cells = list(grid.cells)
    if only_blocks:
        unknown = sorted(set(only_blocks) - {c.block for c in cells})
        if unknown:
            raise ConfigError(f"--blocks {unknown}: no such block in grid {grid.name!r}; blocks: "
                              f"{sorted({c.block for c in cells})}")
        cells = [c for c in cells if c.block in only_blocks]
    if check:
        check_cells(cells)
    logger = getLogger()
    logger.info(f"grid {grid.name!r}: {len(cells)} cells, "
                f"{len(cells) - len(_todo(cells, existing, retry_failed))} already done")
    appended = []
    progress = tqdm(total=len(cells), desc=f"grid {grid.name}", unit="cell", file=sys.stderr)
    for cell in cells:
        # re-read before every cell: other workers on the same results file may have finished it meanwhile
        if cell not in _todo([cell], read_results(results_path), retry_failed):
            progress.update()
            continue
        lock = _lock(results_path, cell)
        if lock is None:  # another live worker is running it
            progress.update()
            continue
        try:
            tqdm.write(f"cell {cell.key}: {cell.describe()}", file=sys.stderr)
            # every cell keeps its per-user results (the report's bootstrap over users); Figure 6 cells their losses
            record = run_cell(cell, user_results_path(results_path, cell), user_loss="figure6" in cell.tags)
            append_record(results_path, record)
        finally:
            os.unlink(lock)
        appended.append(record)
        status = record["status"] if record["status"] == "ok" else f"FAILED ({record['error']})"
        tqdm.write(f"cell {cell.key}: {status} in {record['wall_seconds']:.0f} s", file=sys.stderr)
        progress.update()
    progress.close()
    return appended


def _todo(cells: list[Cell], records: list[dict], retry_failed: bool) -> list[Cell]:
    done = {r["cell"] for r in records if r.get("status") == "ok" or (not retry_failed and r.get("status"))}
    return [c for c in cells if c.key not in done]


def _lock(results_path: str, cell: Cell) -> Optional[str]:
    """Claim ``cell`` for this process (a file created exclusively beside the results); ``None`` when a live
    process holds it. A lock left by a dead process is taken over. Lets several workers share one grid."""
    folder = os.path.abspath(results_path) + ".locks"
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, cell.key)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as handle:
                    pid = int(handle.read().strip() or 0)
                os.kill(pid, 0)
                return None  # alive
            except (ProcessLookupError, ValueError):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # stale: its process is gone
            except (PermissionError, FileNotFoundError):
                return None
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return path
    return None
