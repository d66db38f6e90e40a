"""Saving a selection with the run's outputs: plain files, written atomically."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from recbole_dealrec.data.pruning import kept_train_interactions, write_inter_file
from recbole_dealrec.selection import Selection
from recbole_dealrec.utils import atomic_write, stable_key


def selection_dir(config: Mapping[str, Any], budget: int, method_keys: Sequence[str], signal_meta: Mapping[str, Any]) -> str:
    """``<output_dir>/<dataset>/<sampler>-n<budget>-seed<seed>-<key>``: one folder per selection setting.

    ``<key>`` hashes everything else the selection depends on: the method's own keys (``method_keys``: lambda,
    K, hard prune, ...) and the cache file of every signal it read (whose name is a key of the signal's
    settings, the surrogate and the data), so a grid over any of them never overwrites its own outputs.
    """
    seed = config["selection_seed"] if config["selection_seed"] is not None else config["seed"]
    key = stable_key({"method": {k: config[k] for k in method_keys},
                      "signals": {name: os.path.basename(meta["path"]) for name, meta in signal_meta.items()}})
    return os.path.join(config["output_dir"], config["dataset"], f"{config['sampler']}-n{budget}-seed{seed}-{key[:8]}")


def save_selection(folder: str, selection: Selection, pruned_train_dataset, meta: Mapping[str, Any]) -> dict:
    """Write ``selection.tsv`` (user token, internal id, scores), ``<dataset>.inter`` and ``selection.json``.

    The ``.inter`` file holds the kept training interactions in RecBole's atomic format, so the subset can
    be loaded as a dataset of its own (``--dataset=<dataset> --data_path=<folder>/..``).
    """
    dataset = pruned_train_dataset
    tokens = dataset.id2token(dataset.uid_field, selection.user_ids)
    columns = {}
    for name, scores in selection.scores.items():
        position = {uid: i for i, uid in enumerate(scores.user_ids.tolist())}
        columns[name] = [scores.values[position[u]] if u in position else np.nan for u in selection.user_ids.tolist()]
    with atomic_write(os.path.join(folder, "selection.tsv")) as handle:
        handle.write("\t".join(["user_id", "internal_uid", *columns]) + "\n")
        for row, (token, uid) in enumerate(zip(tokens, selection.user_ids)):
            values = [repr(float(columns[name][row])) for name in columns]
            handle.write("\t".join([str(token), str(int(uid)), *values]) + "\n")
    interactions = kept_train_interactions(dataset)
    write_inter_file(os.path.join(folder, f"{dataset.dataset_name}.inter"), interactions)
    summary = {**meta, "selected_users": int(len(selection.user_ids)),
               "kept_train_samples": int(len(dataset)), "kept_train_interactions": int(len(interactions["user_id"])),
               "info": selection.info}
    with atomic_write(os.path.join(folder, "selection.json")) as handle:
        json.dump(summary, handle, indent=2, default=_json_default)
    return summary


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
