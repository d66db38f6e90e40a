"""Experiment grids: a YAML of axes (datasets, models, samplers with their keys, budgets, lambdas, surrogates,
seeds) and shared property files, expanded into cells, each one ``run_recbole`` call.

A grid file::

    name: smoke                      # the grid's name; its results file refuses another grid's records
    config_files: [base.yaml]        # shared property files (relative to the grid file's folder)
    settings: {epochs: 1}            # keys for every cell
    datasets: [ml-100k]              # axes (lists); a block's own axes replace these
    models: [SASRec]
    samplers:                        # label -> keys; the label is the method's name in tables and figures
      Random: {sampler: random}
      DEALRec: {sampler: dealrec, dealrec_lambda: 0.3}
    budgets: [64]                    # int = selection_num (n-shot), float in (0, 1) = selection_ratio
    lambdas: [~]                     # dealrec_lambda for DEALRec-family samplers (~ = the sampler's own)
    surrogates: [~]                  # surrogate_model for samplers that score with one (~ = default)
    seeds: [2020]
    report_reference: Random         # the sampler label Table 2 compares every method with (default: Random)
    blocks:                          # sub-grids; the cells are the union of their products
      - name: table2
        report: [table2]             # report forms the block feeds
        seeds: [2020, 2021, 2022]

An axis value of ``~`` leaves the key unset; a sampler entry's own keys win over the axes (an ablation's
``dealrec_lambda: 0`` stays 0 under a lambda axis), and the axes over ``settings``. ``budgets`` and ``lambdas`` do not multiply the cells of samplers
they do not apply to (``full`` has no budget; only ``dealrec`` reads a lambda; ``random`` and ``full`` use no
surrogate), so a product never holds two runs of the same settings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
from typing import Any, Mapping, Optional, Sequence

from recbole_dealrec.config import DEFAULT_DATASET, RESULT_NEUTRAL_KEYS, read_property_file
from recbole_dealrec.errors import ConfigError
from recbole_dealrec.utils import folder_digest, stable_key

AXES = ("datasets", "models", "samplers", "budgets", "lambdas", "surrogates", "seeds")
GRID_KEYS = frozenset({"name", "description", "config_files", "settings", "blocks", "replicates", "report_reference",
                       *AXES})
#: what a cell's seed reseeds: ``full`` = the whole pipeline (the surrogate, hence every signal on it, the
#: selection and the backend: a replicate); ``shared_surrogate`` = all but the surrogate, whose own seed
#: (``surrogate_config.seed``, when the grid fixes it) stays: one surrogate and its signals for every seed, cheap,
#: but the seeds' spread is then no replicate-level spread of a method that reads signals
REPLICATE_MODES = ("full", "shared_surrogate")
BLOCK_KEYS = frozenset({"name", "report", "config_files", "settings", *AXES})
REPORT_FORMS = ("table2", "table3", "table4", "figure4", "figure5", "figure6", "figure7")
DEFAULT_AXES: dict[str, list] = {"datasets": [None], "budgets": [None], "lambdas": [None], "surrogates": [None],
                                 "seeds": [None]}


def _sampler_traits(sampler: str) -> tuple[bool, bool, bool]:
    """What the grid needs to know of a sampler, from what the method declares: (takes a budget, the key the
    ``lambdas`` axis sets or None, reads a signal of the surrogate)."""
    from recbole_dealrec.scoring.signals import registered_signals
    from recbole_dealrec.selection import SAMPLERS

    method = SAMPLERS.get(sampler)
    signals = registered_signals()
    return (method.takes_budget, method.lambda_key,
            any(signals.get(name).uses_surrogate for name in method.signals))


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run: ``run_recbole(model, dataset, config_files, settings)``; ``key`` hashes all of it."""

    grid: str
    block: str
    tags: tuple[str, ...]
    method: str  # the sampler label of the grid (a table row)
    model: str
    dataset: Optional[str]
    config_files: tuple[str, ...]
    settings: dict
    key: str
    replicates: str = "full"  # the grid's REPLICATE_MODES entry: what the cell's seed reseeds
    report_reference: Optional[str] = None  # the grid's sampler label Table 2 compares with (None: the default)

    def seeds(self) -> dict[str, Any]:
        """The seeds of the cell's stages (recorded with its result): the run's, the surrogate's (hence its
        signals'), the selection's; the backend's initialisation is the run's."""
        surrogate = (self.settings.get("surrogate_config") or {}).get("seed", self.settings.get("seed"))
        selection = self.settings.get("selection_seed")
        return {"seed": self.settings.get("seed"), "surrogate_seed": surrogate,
                "selection_seed": self.settings.get("seed") if selection is None else selection}

    def describe(self) -> str:
        shown = {k: v for k, v in self.settings.items() if k in ("selection_num", "selection_ratio", "dealrec_lambda",
                                                                 "surrogate_model", "seed")}
        return f"[{self.block}] {self.method} {self.model} on {self.dataset or 'default dataset'} {shown}"


@dataclasses.dataclass(frozen=True)
class Grid:
    name: str
    path: str
    cells: tuple[Cell, ...]
    replicates: str = "full"


def _file_digest(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()[:16]


def _data_digest(data_path: str, dataset: str) -> str:
    """The contents of ``<data_path>/<dataset>/<dataset>.*`` (what a cell reads): part of its key, so a grid run
    again on other data in the same place, or under the same name elsewhere, does not find its cells done. The
    location itself is not part of it (a data folder may move)."""
    folder = os.path.join(os.path.expanduser(data_path), dataset)
    if not os.path.isdir(folder):
        return f"missing:{dataset}"  # the cell's pre-data check names the missing file
    return folder_digest(folder, lambda name: name.startswith(dataset + ".") or name == "recbole_dealrec.yaml")[:16]


def _as_list(block_name: str, axis: str, value: Any) -> list:
    if isinstance(value, (list, tuple)):
        values = list(value)
    else:
        values = [value]
    if not values:
        raise ConfigError(f"grid block {block_name!r}: axis {axis!r} is empty, so the product has no cells")
    return values


def _samplers(block_name: str, value: Any) -> list[tuple[str, dict]]:
    """``[(label, keys)]`` from a mapping label -> keys or a list of sampler names."""
    if isinstance(value, Mapping):
        items = list(value.items())
    else:
        items = [(name, {}) for name in _as_list(block_name, "samplers", value)]
    if not items:
        raise ConfigError(f"grid block {block_name!r}: axis 'samplers' is empty, so the product has no cells")
    out = []
    for label, keys in items:
        keys = dict(keys or {})
        if not isinstance(label, str):
            raise ConfigError(f"grid block {block_name!r}: sampler label {label!r} must be a string")
        keys.setdefault("sampler", label)
        out.append((label, keys))
    return out


def _budget_keys(block_name: str, budget: Any) -> dict:
    if budget is None:
        return {}
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise ConfigError(f"grid block {block_name!r}: budget {budget!r} must be an int >= 1 (selection_num) "
                          "or a float in (0, 1) (selection_ratio)")
    if isinstance(budget, int):
        return {"selection_num": budget}
    if budget >= 1:
        raise ConfigError(f"grid block {block_name!r}: budget {budget!r}: a float budget is a ratio in (0, 1)")
    return {"selection_ratio": budget}


def _check_keys(where: str, given: Mapping, allowed: frozenset) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


#: Where a cell reads and writes, not what it computes (the data's contents are in the cell's key and in every
#: cache key by their checksum): left out of the cell's key, so moving data or outputs keeps finished cells.
UNKEYED_SETTINGS = RESULT_NEUTRAL_KEYS


def load_grid(path: str, overrides: Optional[Mapping[str, Any]] = None) -> Grid:
    """Read and expand a grid file; bad structure fails here, naming the key (run keys are checked by
    :func:`check_cells`)."""
    spec = read_property_file(path)
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{path}: a grid file is a mapping of keys, got {type(spec).__name__}")
    return expand_grid(spec, path, overrides)


def expand_grid(spec: Mapping[str, Any], path: str = "<grid>", overrides: Optional[Mapping[str, Any]] = None) -> Grid:
    """The cells of a grid spec (see the module docstring), in file order: block by block, then the axes'
    product in the order ``AXES`` lists them. Identical settings within a grid are one cell. ``overrides``
    (e.g. ``llm_path`` on another machine) replace the grid's and blocks' ``settings``; the axes still win."""
    _check_keys(f"grid {path}", spec, GRID_KEYS)
    replicates = spec.get("replicates", "full")
    if replicates not in REPLICATE_MODES:
        raise ConfigError(f"grid {path}: `replicates` must be one of {list(REPLICATE_MODES)}, got {replicates!r}")
    reference = None if spec.get("report_reference") is None else str(spec["report_reference"])
    name = spec.get("name")
    if not name or not isinstance(name, str):
        raise ConfigError(f"grid {path}: `name` (a string) is required; it ties a results file to its grid")
    base_dir = os.path.dirname(os.path.abspath(path)) if path != "<grid>" else os.getcwd()
    blocks = spec.get("blocks") or [{"name": "main"}]
    if not isinstance(blocks, list):
        raise ConfigError(f"grid {path}: `blocks` must be a list of mappings")
    cells: dict[str, Cell] = {}
    seen_blocks: set[str] = set()
    for index, block in enumerate(blocks):
        if not isinstance(block, Mapping):
            raise ConfigError(f"grid {path}: block {index} must be a mapping, got {block!r}")
        block_name = str(block.get("name") or f"block{index}")
        if block_name in seen_blocks:
            raise ConfigError(f"grid {path}: two blocks are named {block_name!r}")
        seen_blocks.add(block_name)
        _check_keys(f"grid {path}, block {block_name!r}", block, BLOCK_KEYS)
        tags = tuple(_as_list(block_name, "report", block.get("report", [])) if block.get("report") else ())
        bad = [t for t in tags if t not in REPORT_FORMS]
        if bad:
            raise ConfigError(f"grid block {block_name!r}: report {bad} unknown; allowed: {list(REPORT_FORMS)}")
        axes = {axis: block[axis] if axis in block else spec.get(axis, DEFAULT_AXES.get(axis)) for axis in AXES}
        if axes["models"] is None:
            raise ConfigError(f"grid block {block_name!r}: `models` is required (e.g. [SASRec] or [TIGER])")
        if axes["samplers"] is None:
            raise ConfigError(f"grid block {block_name!r}: `samplers` is required (e.g. [random, dealrec])")
        files = []
        for file in [*(spec.get("config_files") or []), *(block.get("config_files") or [])]:
            full = file if os.path.isabs(file) else os.path.join(base_dir, file)
            if not os.path.isfile(full):
                raise ConfigError(f"grid block {block_name!r}: config file {file!r} not found (looked at {full})")
            files.append(os.path.normpath(full))
        shared = {**(spec.get("settings") or {}), **(block.get("settings") or {}), **(overrides or {})}
        product = itertools.product(
            _as_list(block_name, "datasets", axes["datasets"]),
            _as_list(block_name, "models", axes["models"]),
            _samplers(block_name, axes["samplers"]),
            _as_list(block_name, "budgets", axes["budgets"]),
            _as_list(block_name, "lambdas", axes["lambdas"]),
            _as_list(block_name, "surrogates", axes["surrogates"]),
            _as_list(block_name, "seeds", axes["seeds"]),
        )
        for dataset, model, (label, sampler_keys), budget, lam, surrogate, seed in product:
            takes_budget, lambda_key, uses_surrogate = _sampler_traits(sampler_keys["sampler"])
            axis_keys: dict[str, Any] = {}
            if takes_budget and not {"selection_num", "selection_ratio"} & set(sampler_keys):
                axis_keys.update(_budget_keys(block_name, budget))
            if lam is not None and lambda_key:
                axis_keys[lambda_key] = lam
            if surrogate is not None and uses_surrogate:
                axis_keys["surrogate_model"] = surrogate
            if seed is not None:
                axis_keys["seed"] = seed
            # axes override the shared settings; a sampler entry's own keys (an ablation's lambda 0) win over both
            settings = {**shared, **axis_keys, **sampler_keys}
            if replicates == "full" and seed is not None and uses_surrogate:
                # a replicate: the cell's seed is the surrogate's too (so every signal on it), not the grid's
                settings["surrogate_config"] = {**(settings.get("surrogate_config") or {}), "seed": seed}
            payload = {"model": model, "dataset": dataset,
                       "settings": {k: v for k, v in settings.items() if k not in UNKEYED_SETTINGS},
                       "config_files": [[os.path.basename(f), _file_digest(f)] for f in files]}
            if settings.get("data_path"):  # the embedded ml-100k (no data_path) is fixed by the RecBole version
                payload["data"] = _data_digest(str(settings["data_path"]), dataset or DEFAULT_DATASET)
            key = stable_key(payload)
            if key in cells:  # the same run reached from two blocks: one cell, both blocks' report forms
                old = cells[key]
                cells[key] = dataclasses.replace(old, tags=tuple(dict.fromkeys(old.tags + tags)))
                continue
            cells[key] = Cell(name, block_name, tags, str(label), str(model), dataset, tuple(files), settings, key,
                              replicates, reference)
    if reference is not None and reference not in {cell.method for cell in cells.values()}:
        raise ConfigError(f"grid {path}: report_reference {reference!r} is not a sampler label of the grid; allowed: "
                          f"{sorted({cell.method for cell in cells.values()})}")
    return Grid(name, path, tuple(cells.values()), replicates)


def check_cells(cells: Sequence[Cell], data: bool = True) -> None:
    """Every check a run makes before reading data, for every cell, before the first runs: unknown keys, a
    sampler/budget/model combination that cannot run, and (``data``) the dataset's file missing. Raises
    ``ConfigError`` naming the cell."""
    from recbole_dealrec.config import DealrecConfig
    from recbole_dealrec.data.dataset import check_dataset_present
    from recbole_dealrec.quick_start import check_run_config

    for cell in cells:
        try:
            config = DealrecConfig(cell.model, cell.dataset, list(cell.config_files), dict(cell.settings))
            check_run_config(config)
            if data:
                check_dataset_present(config)
        except (ConfigError, ValueError, KeyError, TypeError, FileNotFoundError) as error:  # RecBole's raise these
            raise ConfigError(f"grid cell {cell.describe()} cannot run: {error}") from None
