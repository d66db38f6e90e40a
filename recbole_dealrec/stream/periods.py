"""Cut a dataset into consecutive periods and write one pre-split RecBole dataset per round of the stream.

Periods come from the interactions' global time (``stream_periods``: N slices of equal interaction count;
``stream_cut_times``: the times where periods 1, 2, ... start) or, for a dataset in the paper's format (a
``split_field``, whose time column is only each user's position), from its train / valid / test cut: periods 0,
1 and 2.

Round ``r`` (0 .. N-2) is what a user has after period ``r`` arrived: the model learns from periods 0..r and is
evaluated on period r+1. Its dataset is pre-split (``split`` column, as :class:`PresplitSequentialDataset` reads):

- ``train``: every interaction of periods 0..r but the held-out validation ones;
- ``valid``: each user's last interaction of period r when the user has an earlier one (a history): the newest
  data, held out for early stopping, as RecBole's leave-one-out holds out the last item before the test;
- ``test``: period r+1's interactions of users with a history (cold users have nothing to rank from);
- later periods are left out.

A ``period`` token column carries each interaction's period, so ``candidate_period: r`` makes the selection
choose among the users who have a training sample in the new period.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import recbole
import yaml

from recbole_dealrec.config import DATASET_PROPERTY_FILE, read_property_file
from recbole_dealrec.data.dataset import SPLITS
from recbole_dealrec.data.pruning import PERIOD_FIELD
from recbole_dealrec.errors import ConfigError
from recbole_dealrec.utils import atomic_write, staged_folder

@dataclasses.dataclass(frozen=True)
class PeriodCut:
    """Each interaction's period (int64 [n_interactions], in the source file's row order) and how it was cut."""

    period: np.ndarray
    source: str  # "time" (the interactions' times) or "split" (the dataset's train / valid / test)
    cut_times: tuple[float, ...]  # where periods 1, 2, ... start (time); () for a split

    @property
    def n_periods(self) -> int:
        return int(self.period.max()) + 1

    def counts(self) -> list[int]:
        """Interactions per period."""
        return np.bincount(self.period, minlength=self.n_periods).tolist()


def check_stream_keys(stream_periods: Optional[int], stream_cut_times: Optional[Sequence[float]],
                      split_field: Optional[str], time_field: Optional[str], dataset: str) -> None:
    """The stream keys against each other and the dataset's fields, before anything is read (``ConfigError``)."""
    if split_field:
        if stream_periods is not None or stream_cut_times is not None:
            raise ConfigError(f"stream_periods / stream_cut_times: dataset {dataset} is pre-split "
                              f"(split_field={split_field}): its train / valid / test are the periods; unset them")
        return
    if not time_field:
        raise ConfigError(f"stream: dataset {dataset} has neither a time field (TIME_FIELD) nor a split_field: "
                          "periods need interaction times or a train / valid / test cut")
    if (stream_periods is None) == (stream_cut_times is None):
        raise ConfigError("stream_periods / stream_cut_times: give one of them (a number of equal-count periods, "
                          "or the times where periods 1, 2, ... start)")
    if stream_periods is not None and (isinstance(stream_periods, bool) or not isinstance(stream_periods, int)
                                       or stream_periods < 2):
        raise ConfigError(f"stream_periods={stream_periods!r}: allowed an integer >= 2 (one period to learn from, "
                          "the next to evaluate on)")
    if stream_cut_times is not None:
        cuts = list(stream_cut_times) if isinstance(stream_cut_times, (list, tuple)) else None
        if (not cuts or any(isinstance(c, bool) or not isinstance(c, (int, float)) for c in cuts)
                or any(b <= a for a, b in zip(cuts, cuts[1:]))):
            raise ConfigError(f"stream_cut_times={stream_cut_times!r}: allowed a non-empty list of strictly "
                              "increasing numbers (the times where periods 1, 2, ... start)")


def cut_by_time(times: np.ndarray, stream_periods: Optional[int] = None,
                stream_cut_times: Optional[Sequence[float]] = None) -> PeriodCut:
    """Periods by global time (float [n]): ``stream_periods`` slices of equal count (a slice ends before the
    first time of the next; equal times never straddle a cut), or periods starting at ``stream_cut_times``.
    An interaction at a cut time belongs to the later period. Raises ``ConfigError`` on an empty period."""
    times = np.asarray(times, dtype=np.float64)
    if stream_cut_times is not None:
        cuts = np.asarray(stream_cut_times, dtype=np.float64)
        key = f"stream_cut_times={list(stream_cut_times)}"
    else:
        ordered = np.sort(times, kind="stable")
        positions = [(k * len(times)) // stream_periods for k in range(1, stream_periods)]
        cuts = ordered[positions]
        key = f"stream_periods={stream_periods}"
    period = np.searchsorted(cuts, times, side="right").astype(np.int64)
    counts = np.bincount(period, minlength=len(cuts) + 1)
    if (counts == 0).any() or len(np.unique(cuts)) < len(cuts):
        raise ConfigError(f"{key}: period {int(np.flatnonzero(counts == 0)[0]) if (counts == 0).any() else ''} has "
                          f"no interaction (interactions per period: {counts.tolist()}; equal times are never split "
                          "between periods); choose fewer periods or other cut times")
    return PeriodCut(period, "time", tuple(float(c) for c in cuts))


def cut_by_split(split_tokens: np.ndarray) -> PeriodCut:
    """Periods 0 / 1 / 2 from a paper-format dataset's train / valid / test tokens (str [n])."""
    split_tokens = np.asarray(split_tokens).astype(str)
    unknown = sorted(set(np.unique(split_tokens)) - set(SPLITS))
    if unknown:
        raise ConfigError(f"split column: values {unknown[:5]} are not {list(SPLITS)}")
    index = {split: k for k, split in enumerate(SPLITS)}
    return PeriodCut(np.array([index[s] for s in split_tokens], dtype=np.int64), "split", ())


def round_splits(users: np.ndarray, period: np.ndarray, order: np.ndarray, round_index: int) -> np.ndarray:
    """The split of every interaction in round ``round_index``: ``train`` / ``valid`` / ``test``, or ``""`` (left
    out). ``users`` (any [n]) and ``period`` (int64 [n]) are per interaction; ``order`` (int64 [n]) is a
    permutation putting the interactions in each user's time order (see the module docstring)."""
    n = len(period)
    labels = np.full(n, "", dtype=object)
    users_sorted, period_sorted = users[order], period[order]
    seen = period_sorted <= round_index
    labels_sorted = np.where(seen, "train", "").astype(object)
    starts = np.flatnonzero(np.r_[True, users_sorted[1:] != users_sorted[:-1]])
    ends = np.r_[starts[1:], n]
    for start, end in zip(starts, ends):
        user_seen = np.flatnonzero(seen[start:end])
        if len(user_seen) == 0:
            continue  # a user who arrives later: cold in this round
        last = start + user_seen[-1]
        if period_sorted[last] == round_index and len(user_seen) >= 2:
            labels_sorted[last] = "valid"
        following = start + np.flatnonzero(period_sorted[start:end] == round_index + 1)
        labels_sorted[following] = "test"
    labels[order] = labels_sorted
    return labels


def user_time_order(users: np.ndarray, times: Optional[np.ndarray], period: np.ndarray) -> np.ndarray:
    """A permutation (int64 [n]) putting the interactions by user, then period, then time, then file row (the
    order RecBole gives each user's sequence; a paper-format file is already in it)."""
    rows = np.arange(len(period))
    keys = [rows] + ([np.asarray(times, dtype=np.float64)] if times is not None else []) + [period, users]
    return np.lexsort(keys)


def dataset_layer(config: Mapping[str, Any], properties_dir: str) -> dict:
    """The keys the source dataset's own files give (RecBole's dataset YAML, the plugin's, the dataset folder's),
    merged in the config's order: what a round dataset must keep (fields, separators, topk, the window)."""
    name = config["dataset"]
    files = [os.path.join(os.path.dirname(recbole.__file__), "properties", "dataset", f"{name}.yaml"),
             os.path.join(properties_dir, "dataset", f"{name}.yaml"),
             os.path.join(config["data_path"], DATASET_PROPERTY_FILE)]
    keys: dict = {}
    for path in files:
        if os.path.isfile(path):
            keys.update(read_property_file(path))
    return keys


def read_interactions(config: Mapping[str, Any]) -> pd.DataFrame:
    """The source ``.inter`` file as text (every value exactly as written; the file is only read)."""
    path = os.path.join(config["data_path"], f"{config['dataset']}.inter")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"stream: dataset {config['dataset']}: missing atomic file {path}")
    return pd.read_csv(path, sep=config["field_separator"] or "\t", dtype=str, keep_default_na=False,
                       na_filter=False, engine="c")


def column(frame: pd.DataFrame, field: str) -> Optional[str]:
    """The header name (``name:type``) of ``field`` in an atomic frame, or None."""
    return next((c for c in frame.columns if c.rsplit(":", 1)[0] == field), None)


def write_round_dataset(frame: pd.DataFrame, labels: np.ndarray, period: np.ndarray, folder: str, name: str,
                        source_folder: str, source_name: str, layer: Mapping[str, Any], round_index: int) -> None:
    """Write round ``round_index``'s dataset ``<folder>`` (named ``name``): its ``.inter`` (the source's rows kept
    in this round, their columns, ``split`` and ``period``), the source's other atomic files (copied, e.g. the
    titles of ``.item``) and its ``recbole_dealrec.yaml``. All or nothing (see ``utils.staged_folder``)."""
    separator = layer.get("field_separator") or "\t"
    split_field = layer.get("split_field")
    keep = labels != ""
    columns = [c for c in frame.columns if c.rsplit(":", 1)[0] not in {split_field, "split", PERIOD_FIELD}]
    out = frame.loc[keep, columns].copy()
    out["split:token"] = labels[keep]
    out[f"{PERIOD_FIELD}:token"] = period[keep].astype(str)
    load_col = dict(layer.get("load_col") or {})
    inter_fields = [f for f in (load_col.get("inter") or [c.rsplit(":", 1)[0] for c in columns])
                    if f not in {split_field, "split", PERIOD_FIELD}]
    load_col["inter"] = [*inter_fields, "split", PERIOD_FIELD]
    keys = {**layer, "load_col": load_col, "split_field": "split", "candidate_period": round_index}
    with staged_folder(folder) as staging:
        with atomic_write(os.path.join(staging, f"{name}.inter"), encoding="utf-8") as handle:
            out.to_csv(handle, sep=separator, index=False, lineterminator="\n")
        for entry in sorted(os.listdir(source_folder)):
            stem, dot, suffix = entry.partition(".")
            if stem == source_name and dot and suffix != "inter" and "." not in suffix:
                with open(os.path.join(source_folder, entry), "rb") as src, \
                        atomic_write(os.path.join(staging, f"{name}.{suffix}"), mode="wb") as dst:
                    dst.write(src.read())
        with atomic_write(os.path.join(staging, DATASET_PROPERTY_FILE), encoding="utf-8") as handle:
            handle.write(f"# Written by recbole_dealrec.stream: round {round_index} of dataset {source_name} "
                         "(train = periods up to the round, test = the next period).\n")
            yaml.safe_dump(keys, handle, sort_keys=False, allow_unicode=False)
