"""The behaviour record a refactor must keep: the smoke grid's selections, signals and metrics, bit for bit.

    python run_scripts/behaviour_record.py write  [--out tests/data/behaviour_record.json]   # record (before)
    python run_scripts/behaviour_record.py check  [--record tests/data/behaviour_record.json] # compare (after)

``write`` runs the shipped smoke grid (``run_scripts/grids/smoke.yaml``) in a temporary folder and stores, per
cell: the SHA-256 of its ``selection.tsv`` (user tokens, ids and the scores behind the choice), its test and
validation metrics (unrounded), and the SHA-256 of every cached signal's values (``<stage>-<key>.npz`` of the
grid's cache, by stage; the key itself may change with a refactor, the values may not). ``check`` runs the grid
again and prints every difference (exit 1 if any). ``tests/test_experiment.py::test_smoke_grid_end_to_end``
compares the same record on its own run of the grid, so the test suite keeps it.

Records are kept per kind of CPU (:func:`machine_key`: float results differ in their last bits between CPU
kinds, and the grid's discrete steps can turn that into other users); ``write`` stores this kind's, ``check`` and
the test compare with it, or with the record written before records were keyed (the top-level entries).

Add ``--main-job`` to record / check the README main job's selection too (SmolLM2 effort: about 10 minutes on
2 cores; not in the test suite).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_GRID = os.path.join(ROOT, "run_scripts", "grids", "smoke.yaml")
MAIN_JOB_CONFIG = os.path.join(ROOT, "run_scripts", "configs", "bigrec_ml100k_cpu.yaml")
DEFAULT_RECORD = os.path.join(ROOT, "tests", "data", "behaviour_record.json")


def _sha(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def signal_hashes(output_dir: str) -> dict[str, list[str]]:
    """``{stage: sorted SHA-256 of each cached file's arrays}`` for every ``<stage>-<key>.npz`` in a ``cache`` folder
    below ``output_dir`` (the arrays' names, dtypes, shapes and bytes; not the file, whose metadata may differ)."""
    found: dict[str, list[str]] = {}
    for folder, _, files in os.walk(output_dir):
        for name in files:
            if not name.endswith(".npz") or "-" not in name or not os.path.basename(folder) == "cache":
                continue
            stage = name.rsplit("-", 1)[0]
            digest = hashlib.sha256()
            with np.load(os.path.join(folder, name), allow_pickle=False) as data:
                for array_name in sorted(data.files):  # values and user ids (a signal), or a model's arrays
                    array = data[array_name]
                    digest.update(array_name.encode() + str(array.dtype).encode() + str(array.shape).encode())
                    digest.update(np.ascontiguousarray(array).tobytes())
            digest = digest.hexdigest()
            found.setdefault(stage, []).append(digest)
    return {stage: sorted(hashes) for stage, hashes in sorted(found.items())}


def grid_record(records: list[dict], output_dir: str, root: str) -> dict[str, Any]:
    """The behaviour record of a finished smoke-grid run (``records``: its results lines)."""
    cells = {}
    for record in records:
        folder = record["selection_folder"]
        folder = folder if os.path.isabs(folder) else os.path.join(root, folder)
        cells[f"{record['block']}/{record['method']}/{record['cell']}"] = {
            "selection_tsv": _sha(os.path.join(folder, "selection.tsv")),
            "test": record["test"], "valid": record.get("valid"),
        }
    return {"cells": cells, "signals": signal_hashes(output_dir)}


def run_smoke_grid(workdir: str) -> dict[str, Any]:
    """Run the smoke grid in ``workdir`` (a fresh folder) and return its behaviour record.

    With one torch thread, as the test suite runs (``tests/conftest.py``): the number of intra-op threads changes
    how float sums are split, so a record is of one thread count.
    """
    import torch

    from recbole_dealrec.experiment.__main__ import main as experiment_main
    from recbole_dealrec.experiment.runner import read_results

    torch.set_num_threads(1)

    results, output_dir = os.path.join(workdir, "smoke.jsonl"), os.path.join(workdir, "out")
    cwd = os.getcwd()
    os.chdir(workdir)  # RecBole writes ./log
    try:
        experiment_main(["run", SMOKE_GRID, "--results", results, "--set", f"output_dir={output_dir}"])
    finally:
        os.chdir(cwd)
    records = read_results(results)
    if not records or any(r["status"] != "ok" for r in records):
        raise SystemExit(f"smoke grid failed: {[r.get('error') for r in records if r['status'] != 'ok']}")
    return grid_record(records, output_dir, workdir)


def run_main_job_selection(workdir: str) -> dict[str, str]:
    """The README main job (``run_recbole --model=BIGRec --sampler=dealrec``, its CPU config): its selection's hash."""
    out = os.path.join(workdir, "main")
    subprocess.run([sys.executable, "-m", "recbole_dealrec", "--model=BIGRec", "--sampler=dealrec",
                    f"--config_files={MAIN_JOB_CONFIG}", f"--output_dir={out}", "--show_progress=False"],
                   cwd=workdir, check=True)
    found = [os.path.join(folder, "selection.tsv") for folder, _, files in os.walk(out) if "selection.tsv" in files]
    if len(found) != 1:
        raise SystemExit(f"main job: expected one selection under {out}, found {found}")
    return {"selection_tsv": _sha(found[0])}


def machine_key() -> str:
    """The machine a record holds for: architecture, torch's CPU kernels (AVX2, AVX512, ...) and the CPU's name.
    Float results differ in their last bits between CPU kinds (other vector kernels, other summation orders), and
    the grid's discrete steps (Algorithm 2's bins, early stopping) can turn that into other users: a record is
    bit for bit on the kind of machine that wrote it."""
    import platform

    import torch

    model = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()} {model or platform.processor()}".strip()


def expected_record(record: dict, name: str) -> Any:
    """This machine kind's record of ``name`` (``smoke``, ``main_job``); else the one written before records were
    keyed by machine (its top-level entry)."""
    return record.get("machines", {}).get(machine_key(), {}).get(name, record.get(name))


def differences(expected: dict, actual: dict, path: str = "") -> list[str]:
    """Every leaf where ``actual`` differs from ``expected`` (exact equality; floats compared as stored). An
    expected ``null`` is not recorded on this kind: a value changed on purpose where no machine of the kind was at
    hand to re-record it (``write`` on one replaces it)."""
    if expected is None:
        return []
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        for key in sorted(set(expected) | set(actual)):
            if key not in actual:
                out.append(f"{path}/{key}: missing")
            elif key not in expected:
                out.append(f"{path}/{key}: not in the record")
            else:
                out.extend(differences(expected[key], actual[key], f"{path}/{key}"))
        return out
    return [] if expected == actual else [f"{path}: {expected!r} -> {actual!r}"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["write", "check"])
    parser.add_argument("--record", "--out", dest="record", default=DEFAULT_RECORD)
    parser.add_argument("--main-job", action="store_true", help="also the README main job's selection (~10 min)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        current = {"smoke": run_smoke_grid(workdir)}
        if args.main_job:
            current["main_job"] = run_main_job_selection(workdir)
    if args.action == "write":
        previous = json.load(open(args.record)) if os.path.isfile(args.record) else {}
        previous.setdefault("machines", {}).setdefault(machine_key(), {}).update(current)
        os.makedirs(os.path.dirname(args.record), exist_ok=True)
        tmp = args.record + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(previous, handle, indent=1, sort_keys=True)
        os.replace(tmp, args.record)
        print(f"wrote {args.record}: {len(current['smoke']['cells'])} cells, "
              f"{sum(map(len, current['smoke']['signals'].values()))} signals" + (", main job" if args.main_job else ""))
        return
    record = json.load(open(args.record))
    diffs = differences({k: expected_record(record, k) for k in current}, current)  # "about" says how each was made
    print("\n".join(diffs) if diffs else "behaviour identical to the record")
    raise SystemExit(1 if diffs else 0)


if __name__ == "__main__":
    main()
