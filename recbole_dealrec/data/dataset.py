"""Datasets: RecBole's own, plus a sequential dataset whose train/valid/test split is given in the data.

The paper's data come pre-split (split by global time, then one line per user and split). Their atomic
``.inter`` file carries a ``split`` token column (``train`` / ``valid`` / ``test``, config key ``split_field``);
:class:`PresplitSequentialDataset` turns it into RecBole's three datasets with the paper's protocol:

- train: every prefix sample whose target is a train interaction (RecBole's data augmentation);
- valid: one sample per user with valid items, history = train items, target = the first valid item;
- test: one sample per user with test items, history = train + valid items, targets = ALL the user's test
  items. Recall@K / NDCG@K then come from RecBole's own metric classes with several positives per row:
  Recall = hits / #targets, NDCG's ideal DCG over min(#targets, K) positions.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import weakref
from logging import getLogger
from typing import Any, Mapping, Optional

import numpy as np
import torch
from recbole.data import create_dataset as recbole_create_dataset
from recbole.data import data_preparation as recbole_data_preparation
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.data.dataset import SequentialDataset
from recbole.data.interaction import Interaction
from recbole.utils import FeatureType, ModelType

from recbole_dealrec.config import property_names
from recbole_dealrec.errors import ConfigError

SPLITS = ("train", "valid", "test")


def check_dataset_present(config: Mapping[str, Any]) -> None:
    """The dataset's ``.inter`` file exists (no read: the experiment runner checks every cell so before the first
    runs); the same error as :func:`check_dataset_files` otherwise."""
    if not os.path.isfile(os.path.join(config["data_path"], f"{config['dataset']}.inter")):
        check_dataset_files(config)


def check_dataset_files(config: Mapping[str, Any]) -> int:
    """Fail early, naming the path, when a dataset's ``.inter`` file is missing or has a malformed row; return the
    number of distinct users the file holds.

    RecBole would try to download any name it does not ship; outside ml-100k (embedded) that fails late.
    """
    name = config["dataset"]
    inter = os.path.join(config["data_path"], f"{name}.inter")
    if os.path.isfile(inter):
        return check_atomic_file(inter, config["field_separator"] or "\t", count_field=config["USER_ID_FIELD"])
    root = os.path.dirname(os.path.normpath(config["data_path"]))
    local = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []
    hint = ""
    if name in property_names("dataset"):
        hint = " (import it first, see README: python -m recbole_dealrec.data.importer --help)"
    raise FileNotFoundError(
        f"dataset '{name}': missing atomic file {inter}{hint}. Known datasets: ml-100k (embedded), "
        f"with plugin properties: {', '.join(property_names('dataset'))}; found under {root}: "
        f"{', '.join(local) or 'nothing'}. Set data_path to the folder that holds <dataset>/<dataset>.inter."
    )


def check_atomic_file(path: str, separator: str = "\t", count_field: Optional[str] = None) -> int:
    """Every row of an atomic file has the header's number of fields and a number in every ``float`` column.

    RecBole (pandas) fills missing fields with NaN, and a non-numeric ``float`` value fails without a file or line;
    this names both. Raises ConfigError on the first bad row. Returns the number of distinct values of the column
    ``count_field`` (0 without one).
    """
    distinct: set = set()
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\r\n").split(separator)
        types = [field.rsplit(":", 1)[1] if ":" in field else None for field in header]
        bad_header = [field for field, kind in zip(header, types) if kind not in ("token", "token_seq", "float", "float_seq")]
        if bad_header:
            raise ConfigError(f"{path} line 1: header fields must be name:type with type token, token_seq, float or "
                              f"float_seq, got {bad_header}")
        floats = [i for i, kind in enumerate(types) if kind == "float"]
        names = [field.rsplit(":", 1)[0] for field in header]
        counted = names.index(count_field) if count_field in names else None
        n_rows = 0
        for number, line in enumerate(handle, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            n_rows += 1
            fields = line.split(separator)
            if counted is not None and counted < len(fields):
                distinct.add(fields[counted])
            if len(fields) != len(header):
                raise ConfigError(f"{path} line {number}: {len(fields)} fields, the header has {len(header)} "
                                  f"({', '.join(header)})")
            for i in floats:
                try:
                    if fields[i]:
                        float(fields[i])
                except ValueError:
                    raise ConfigError(f"{path} line {number}: {header[i]} must be a number, got {fields[i]!r}") from None
    if n_rows == 0:
        raise ConfigError(f"{path}: a header and no rows: nothing to train on")
    return len(distinct)


def check_sequence_list_fields(config: Mapping[str, Any]) -> None:
    """``sequence_list_fields`` is auto, all or a list of the ``.inter`` file's loaded fields other than the user
    field (read from the file's header, before any loading): the lists built beside the item's and the time's."""
    value = config["sequence_list_fields"]
    if value in ("auto", "all"):
        return
    path = os.path.join(config["data_path"], f"{config['dataset']}.inter")
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\r\n").split(config["field_separator"] or "\t")
    fields = [f.rsplit(":", 1)[0] for f in header]
    load_col = config["load_col"]
    if isinstance(load_col, Mapping) and load_col.get("inter"):
        fields = [f for f in fields if f in load_col["inter"]]
    fields = [f for f in fields if f != config["USER_ID_FIELD"]]
    if not isinstance(value, (list, tuple)) or not value or any(f not in fields for f in value):
        raise ConfigError(f"sequence_list_fields={value!r}: allowed auto, all or a list of {config['dataset']}'s "
                          f"loaded interaction fields {fields}")


class ArraySequentialDataset(SequentialDataset):
    """RecBole's ``SequentialDataset`` with its prefix augmentation as array operations: the same rows, fields and
    values, bit for bit (tested against RecBole's), without its Python loop over every interaction and every list
    field (58% of loading Games; minutes on Book-sized data).

    Only the history lists ``sequence_list_fields`` asks for are built (``auto``: the item's and the time's, what
    the plugin's models, signals and exports read; a list: those and its fields; ``all``: RecBole's every field).
    Each list is ``[samples, MAX_ITEM_LIST_LENGTH]``: on Book-sized data an unread ``split_list`` or ``rating_list``
    is gigabytes.
    """

    #: fields whose value at each sample's last history place :meth:`data_augmentation` keeps (``history_end``)
    history_end_fields: tuple = ()

    def listed_fields(self) -> list[str]:
        """The interaction fields whose history lists are built, in the frame's order."""
        fields = [f for f in self.inter_feat if f != self.uid_field]
        value = self.config["sequence_list_fields"]
        if value == "all":
            return fields
        wanted = {self.iid_field, self.time_field} | (set() if value == "auto" else set(value))
        return [f for f in fields if f in wanted]

    def _aug_presets(self) -> None:
        super()._aug_presets()  # RecBole registers a list field for every field; the unlisted ones are dropped
        listed = set(self.listed_fields())
        for field in self.inter_feat:
            if field != self.uid_field and field not in listed:
                list_field = getattr(self, f"{field}_list_field")
                for properties in (self.field2type, self.field2source, self.field2seqlen):
                    properties.pop(list_field, None)
                delattr(self, f"{field}_list_field")

    #: the column that carries each prefix sample's first history row (an index into ``_history_values``) from the
    #: augmentation to the split, while the history lists are not built yet
    HISTORY_START = "_history_start"
    #: prefix samples per block when a history list is built (bounds the index block: 8 MB per 1,000 x 1,000)
    HISTORY_BLOCK_ROWS = 1 << 18

    def build(self) -> list[SequentialDataset]:
        """The train/valid/test splits, each with its own history lists, built after the split from each split's
        own rows: the whole augmented table never holds them (on Book-sized data the lists are gigabytes, and the
        train split copied them a second time). The train split's lists are never held whole: they are cut from
        the field's values whenever rows are taken (:class:`HistoryListInteraction`; 2.8 GB on Book-sized data,
        window 50). Every column and row equals building the lists before the split (tested)."""
        self._defer_history_lists = True
        try:
            datasets = self.split_prefix_samples()
        finally:
            self._defer_history_lists = False
        built: list[_BuiltList] = []
        for number, part in enumerate(datasets):
            part.build_history_lists(built, cut_on_access=number == 0)
        _last_built_lists[:] = built  # what the next dataset of this process may share
        shared = sorted({b.name for b in built if b.shared})
        if shared:
            getLogger().info(f"[Data] {self.config['dataset']}: history lists {', '.join(shared)} (window "
                             f"{self.config['MAX_ITEM_LIST_LENGTH']}) shared with the dataset built before in this "
                             "run (the same rows cut from the same values: held once)")
        self.release_history_lists()
        return datasets

    def split_prefix_samples(self) -> list[SequentialDataset]:
        """RecBole's split (``eval_args``) of the augmented rows."""
        return super().build()

    def release_history_lists(self) -> None:
        """Drop the whole augmented table's history lists (and their sources) once the splits are built: nothing
        reads this dataset's lists after (the run keeps it for its token maps and counts, which stay)."""
        suffix = self.config["LIST_SUFFIX"]
        lists = {f + suffix for f in self.listed_fields()} | {self.HISTORY_START}
        self.inter_feat = Interaction({k: v for k, v in self.inter_feat.interaction.items() if k not in lists})
        self._history_values = None

    def build_history_lists(self, built: Optional[list] = None, cut_on_access: bool = False) -> None:
        """Build this dataset's ``[rows, MAX_ITEM_LIST_LENGTH]`` history lists from each row's history start and
        length, in blocks of :attr:`HISTORY_BLOCK_ROWS` rows (no ``[rows, L]`` index or mask of the whole table);
        the lists follow the row's other columns, in :meth:`listed_fields` order, as RecBole's do.

        ``cut_on_access``: the lists are not built; the table becomes a :class:`HistoryListInteraction` that cuts
        them for the rows taken (the same values). Otherwise a list whose inputs (values, starts, lengths, shape)
        equal, bit for bit, those of a list the last :meth:`build` of this process made is that list's tensor, not a
        copy (:data:`_last_built_lists`); each list made or shared here is appended to ``built``."""
        if self.HISTORY_START not in self.inter_feat.interaction:
            return
        columns = dict(self.inter_feat.interaction)
        start = columns.pop(self.HISTORY_START)
        length = columns[self.item_list_length_field]
        to_cut = {}
        for field, value in self._history_values.items():
            list_field = getattr(self, f"{field}_list_field")
            list_len = self.field2seqlen[list_field]
            shape = (len(start), list_len) if isinstance(list_len, int) else (len(start),) + tuple(list_len)
            if (self.field2type[field] in [FeatureType.FLOAT, FeatureType.FLOAT_SEQ]
                    and field in self.config["numerical_features"]):
                shape += (2,)
            if cut_on_access:
                to_cut[list_field] = (value, shape[1:])
                continue
            same = next((b for b in _last_built_lists if b.made_from(value, start, length, shape)), None)
            made = same.tensor if same is not None else None
            if made is None:
                made = _history_list(value, start, length, shape, self.HISTORY_BLOCK_ROWS)
            if built is not None:
                built.append(_BuiltList(list_field, value, start, length, weakref.ref(made), same is not None))
            columns[list_field] = made
        if cut_on_access:
            self.inter_feat = HistoryListInteraction(columns, start, to_cut, self.item_list_length_field,
                                                     self.HISTORY_BLOCK_ROWS)
        else:
            self.inter_feat = Interaction(columns)
        self._history_values = None

    def data_augmentation(self) -> None:
        self.logger.debug("data_augmentation (array operations)")
        self._aug_presets()
        self._check_field("uid_field", "time_field")
        max_len = int(self.config["MAX_ITEM_LIST_LENGTH"])
        self.sort(by=[self.uid_field, self.time_field], ascending=True)
        uid = self.inter_feat[self.uid_field].numpy()
        n = len(uid)
        first = np.ones(n, dtype=bool)
        first[1:] = uid[1:] != uid[:-1]
        user_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))  # [n] each row's user's first row
        target = np.flatnonzero(~first)  # every row but a user's first is a target
        # RecBole's window: the history slides by one once it holds max_len items
        seq_start = np.maximum(user_start[target], target - max_len)
        length = target - seq_start
        new_data = self.inter_feat[torch.from_numpy(target)]
        self.history_end = {field: self.inter_feat[field][torch.from_numpy(target - 1)]
                            for field in self.history_end_fields}  # the row before a target ends its history
        # the listed fields' values at every interaction (sorted by user and time): the lists are cut from them
        self._history_values = {field: self.inter_feat[field] for field in self.listed_fields()}
        new_data.update(Interaction({self.item_list_length_field: torch.tensor(length, dtype=torch.int64),
                                     self.HISTORY_START: torch.from_numpy(seq_start)}))
        self.inter_feat = new_data
        if not getattr(self, "_defer_history_lists", False):  # augmented outside build(): the lists now
            self.build_history_lists()


@dataclasses.dataclass
class _BuiltList:
    """A history list a build made (or shared), with the inputs it was cut from."""

    name: str
    value: torch.Tensor  # [interactions, ...] the field's values, sorted by user and time
    start: torch.Tensor  # [rows] each row's first history interaction
    length: torch.Tensor  # [rows]
    made: Any  # weakref.ref to the [rows, L, ...] list: a dataset that is gone does not keep its lists alive
    shared: bool = False

    @property
    def tensor(self) -> Optional[torch.Tensor]:
        return self.made()

    def made_from(self, value: torch.Tensor, start: torch.Tensor, length: torch.Tensor, shape: tuple) -> bool:
        """Whether :func:`_history_list` on these inputs gives this list (equal inputs, bit for bit), still held."""
        tensor = self.tensor
        return (tensor is not None and tuple(tensor.shape) == tuple(shape) and tensor.dtype == value.dtype
                and self.value.shape == value.shape and self.start.shape == start.shape
                and torch.equal(self.start, start) and torch.equal(self.length, length)
                and (self.value is value or torch.equal(self.value, value)))


#: The history lists of the last :meth:`ArraySequentialDataset.build` in this process. The backend's and the
#: surrogate's datasets at one window length cut the same lists from one reading of the files: the second shares the
#: first's tensors (3 GB at Book size, window 50). Shared tensors are read, never written in place (RecBole's
#: loaders and the plugin's stages index them into new batches). One build's worth: the next build replaces it.
_last_built_lists: list[_BuiltList] = []


def _history_list(value: torch.Tensor, start: torch.Tensor, length: torch.Tensor, shape: tuple,
                  block_rows: int) -> torch.Tensor:
    """``out[r, j] = value[start[r] + j]`` for ``j < length[r]``, zero after (RecBole's padded history list).

    value: ``[interactions, ...]``; start, length: ``[rows]`` int64; shape: ``(rows, L, ...)``; returns ``shape``
    of ``value``'s dtype. Built ``block_rows`` rows at a time."""
    out = torch.zeros(shape, dtype=value.dtype)
    if len(value) == 0:
        return out
    places = torch.arange(shape[1])
    for begin in range(0, shape[0], block_rows):
        rows = slice(begin, begin + block_rows)
        keep = places[None, :] < length[rows, None]  # [block, L]
        index = (start[rows, None] + places[None, :]).clamp_(max=len(value) - 1)
        out[rows][keep] = value[index[keep]].reshape((-1,) + tuple(shape[2:]))
    return out


class HistoryListInteraction(Interaction):
    """A prefix-sample table whose history lists are cut from the listed fields' values when rows are taken,
    instead of held as ``[rows, L]`` tensors (on Book-sized data, window 50: 2.8 GB for the item's and the time's).

    ``table[rows]`` (any index an :class:`Interaction` takes) is a plain :class:`Interaction` of those rows with
    every list, the same values, columns and order as the built lists'; a whole list read by name
    (``table["item_id_list"]``) is cut for every row, correct but as large as the built list: it is counted in
    :attr:`whole_list_reads` (of the process: the tests check that no stage of a run reads a list whole).
    Sorting, shuffling and re-indexing move each row's history start with the row. The ``interaction`` dict holds
    the stored columns and the history start, not the lists: read columns by name (``columns``, ``table[name]``).
    """

    #: the stored column that holds each row's first history interaction (an index into a list's values)
    START = ArraySequentialDataset.HISTORY_START
    #: ``{list field: reads}`` of whole lists by name, by every table of this process
    whole_list_reads: dict[str, int] = {}

    def __init__(self, columns: dict, start: torch.Tensor, lists: dict, length_field: str, block_rows: int) -> None:
        """columns: the rows' other fields ``{name: [rows, ...]}``; start: ``[rows]`` int64; lists:
        ``{list field: (values [interactions, ...], row shape (L, ...))}``; length_field: the ``[rows]`` history
        lengths' column."""
        super().__init__({**columns, self.START: start})
        self.lists = dict(lists)
        self.length_field = length_field
        self.block_rows = block_rows

    @property
    def columns(self) -> list[str]:
        return [k for k in self.interaction if k != self.START] + list(self.lists)

    def __iter__(self):
        return iter(self.columns)

    def __contains__(self, item) -> bool:
        return item in self.lists or item in self.interaction

    def __getitem__(self, index):
        if isinstance(index, str):
            if index not in self.lists:
                return self.interaction[index]
            HistoryListInteraction.whole_list_reads[index] = HistoryListInteraction.whole_list_reads.get(index, 0) + 1
            return self._cut(self.interaction[self.START], self.interaction[self.length_field], index)
        rows = super().__getitem__(index)
        start = rows.interaction.pop(self.START)
        for name in self.lists:
            rows.interaction[name] = self._cut(start, rows[self.length_field], name)
        return rows

    def _cut(self, start: torch.Tensor, length: torch.Tensor, name: str) -> torch.Tensor:
        """``name``'s list for rows of these history starts and lengths (any shape ``S``): ``S + row shape``."""
        values, row_shape = self.lists[name]
        flat = _history_list(values, start.reshape(-1), length.reshape(-1), (start.numel(),) + tuple(row_shape),
                             self.block_rows)
        return flat.reshape(tuple(start.shape) + tuple(row_shape))

    def materialize(self) -> Interaction:
        """A plain :class:`Interaction` of every row, each list built whole."""
        return self[torch.arange(len(self))]

    def __setitem__(self, key, value) -> None:
        self.lists.pop(key, None)  # a list written whole is held from now on
        super().__setitem__(key, value)

    def __delitem__(self, key) -> None:
        if key in self.lists:
            del self.lists[key]
        else:
            super().__delitem__(key)

    def drop(self, column) -> None:
        self.__delitem__(column)

    def to(self, device, selected_field=None) -> Interaction:
        return self.materialize().to(device, selected_field)

    def cpu(self) -> Interaction:
        return self.materialize()

    def numpy(self) -> dict:
        return self.materialize().numpy()

    def repeat(self, sizes) -> Interaction:
        return self.materialize().repeat(sizes)

    def repeat_interleave(self, repeats, dim=0) -> Interaction:
        return self.materialize().repeat_interleave(repeats, dim)

    def add_prefix(self, prefix) -> None:
        raise TypeError("HistoryListInteraction.add_prefix: take the rows first (table[rows]), then add the prefix")

    def __str__(self) -> str:
        info = [f"The batch_size of interaction: {self.length} (history lists cut on access: {list(self.lists)})"]
        info += [f"    {k}, {tuple(v.shape)}, {v.device.type}, {v.dtype}" for k, v in self.interaction.items()]
        return "\n".join(info + ["\n"])


class PresplitSequentialDataset(ArraySequentialDataset):
    """Sequential dataset whose split comes from a token column (``split_field``) instead of ``eval_args``."""

    def __init__(self, config) -> None:
        self.split_field = config["split_field"]
        self.history_end_fields = (self.split_field,)  # the split of each history's last item (build)
        super().__init__(config)

    def split_prefix_samples(self) -> list[SequentialDataset]:
        """The paper's split by ``split_field`` (module docstring), instead of RecBole's ``eval_args``."""
        self._change_feat_format()  # to tensors, then RecBole's prefix augmentation
        # inter_feat is already augmented: one row per (user, target interaction), sorted by user and time,
        # with the target's split in `split_field` (the history's last split in `history_end`).
        token_id = self.field2token_id[self.split_field]
        missing = [s for s in SPLITS if s not in token_id]
        if missing:
            raise ValueError(f"{self.split_field} column has no {missing} rows; expected values {list(SPLITS)}")
        train_id, valid_id, test_id = (token_id[s] for s in SPLITS)
        uid = self.inter_feat[self.uid_field].numpy()
        split = self.inter_feat[self.split_field].numpy()
        last_history_split = self.history_end.pop(self.split_field).numpy()

        train_rows = np.flatnonzero(split == train_id)
        # The first valid (test) sample of a user is the one whose history ends outside the valid (test) items.
        valid_rows = np.flatnonzero((split == valid_id) & (last_history_split == train_id))
        first_test = (split == test_id) & (last_history_split != test_id)
        test_rows = np.flatnonzero(first_test)

        # All test targets of each test row's user: test rows of a user are contiguous, in time order.
        item = self.inter_feat[self.iid_field].numpy()
        is_test = split == test_id
        test_uid = uid[is_test]
        test_items = item[is_test]
        starts = np.searchsorted(test_uid, uid[test_rows], side="left")
        ends = np.searchsorted(test_uid, uid[test_rows], side="right")
        width = int((ends - starts).max()) if len(test_rows) else 1
        targets = torch.zeros((len(test_rows), width), dtype=torch.long)
        for row, (s, e) in enumerate(zip(starts, ends)):
            targets[row, : e - s] = torch.from_numpy(test_items[s:e])

        datasets = [self.copy(self.inter_feat[torch.from_numpy(rows)]) for rows in (train_rows, valid_rows, test_rows)]
        datasets[2].multi_targets = targets
        return datasets


class MultiTargetFullSortEvalDataLoader(FullSortEvalDataLoader):
    """Full-sort evaluation where a row's positives are all items in ``dataset.multi_targets[row]``."""

    def collate_fn(self, index):
        index = np.array(index)
        interaction = self.transform(self._dataset, self._dataset[index])
        targets = self._dataset.multi_targets[torch.from_numpy(index)]
        positive_u, column = torch.nonzero(targets, as_tuple=True)
        return interaction, None, positive_u, targets[positive_u, column]


def _recbole_dataset_class(config) -> type:
    """The class RecBole's ``create_dataset`` builds for this config (a model's own ``<Model>Dataset`` first)."""
    import recbole.data.dataset as datasets

    own = getattr(datasets, f"{config['model']}Dataset", None)
    if own is not None:
        return own
    return SequentialDataset if config["MODEL_TYPE"] == ModelType.SEQUENTIAL else datasets.Dataset


def _saved_dataset_file(config) -> bool:
    """Whether RecBole's ``create_dataset`` would try a saved dataset (``dataset_save_path``, or its default file
    in ``checkpoint_dir``): then RecBole's own function runs, with its check of the saved dataset's keys."""
    default = os.path.join(config["checkpoint_dir"], f"{config['dataset']}-SequentialDataset.pth")
    return bool(config["dataset_save_path"]) or os.path.exists(default)


#: The config keys RecBole's ``Dataset`` reads while loading, filtering and remapping the atomic files (its
#: ``properties/dataset/sample.yaml`` and what ``Dataset.__init__`` reads), and the plugin's ``split_field``;
#: ``MAX_ITEM_LIST_LENGTH`` is not one of them: it only shapes the prefix augmentation that ``build`` runs.
LOADING_KEYS = (
    "data_path", "dataset", "encoding", "field_separator", "seq_separator", "USER_ID_FIELD", "ITEM_ID_FIELD",
    "RATING_FIELD", "TIME_FIELD", "LABEL_FIELD", "seq_len", "threshold", "NEG_PREFIX", "numerical_features",
    "load_col", "unload_col", "unused_col", "additional_feat_suffix", "rm_dup_inter", "val_interval",
    "filter_inter_by_user_or_item", "user_inter_num_interval", "item_inter_num_interval", "alias_of_user_id",
    "alias_of_item_id", "alias_of_entity_id", "alias_of_relation_id", "preload_weight", "normalize_field",
    "normalize_all", "discretization", "ITEM_LIST_LENGTH_FIELD", "LIST_SUFFIX", "benchmark_filename", "split_field",
)

#: The last dataset loaded in this process, before its augmentation, by :func:`loading_key`: the backend's and the
#: surrogate's datasets (two window lengths) share one reading of the files. One entry: a grid's next dataset
#: replaces it.
_last_loaded: dict[str, Any] = {}


def loading_key(config, dataset_class: type) -> str:
    """Key of what a loaded dataset depends on: its class, the atomic files' bytes and :data:`LOADING_KEYS`."""
    from recbole_dealrec.utils import dataset_fingerprint, stable_key

    return stable_key({"class": dataset_class.__name__, "data": dataset_fingerprint(config),
                       "config": {k: config[k] for k in LOADING_KEYS}})


def _unbuilt_copy(dataset, config):
    """A copy of a loaded, not yet built ``dataset`` that builds with ``config`` (its window length): its own frames
    (RecBole's tensors share the frames' memory, so an in-place change of one built dataset would reach the
    next) and field-property dicts (the augmentation adds to them); the token maps shared (never changed)."""
    out = copy.copy(dataset)
    out.config = config
    out.max_item_list_len = config["MAX_ITEM_LIST_LENGTH"]
    for name in ("field2type", "field2source", "field2seqlen"):
        setattr(out, name, dict(getattr(dataset, name)))
    for name in dataset.feat_name_list:
        frame = getattr(dataset, name)
        setattr(out, name, None if frame is None else frame.copy(deep=True))
    return out


def _array_sequential_dataset(config, dataset_class: type):
    """``dataset_class(config)``, or a copy of the same files' dataset this process loaded last (the log says so)."""
    key = loading_key(config, dataset_class)
    if key in _last_loaded:
        getLogger().info(f"[Data] {config['dataset']}: reused the atomic files loaded in this run (window "
                         f"MAX_ITEM_LIST_LENGTH={config['MAX_ITEM_LIST_LENGTH']} built on them)")
        return _unbuilt_copy(_last_loaded[key], config)
    dataset = dataset_class(config)
    _last_loaded.clear()
    _last_loaded[key] = _unbuilt_copy(dataset, config)
    return dataset


def create_dataset(config):
    """RecBole's ``create_dataset``, or :class:`PresplitSequentialDataset` when ``split_field`` is set; a warning
    with counts when RecBole's filters dropped users, a ConfigError when they dropped every row. The files are
    read once per process for any number of window lengths (:func:`_array_sequential_dataset`)."""
    n_users_in_file = check_dataset_files(config)
    check_sequence_list_fields(config)
    for note in getattr(config, "inferred_columns", ()):  # a dataset without a property file (config.py)
        getLogger().info(f"[Data] inferred from the atomic files' headers: {note}")
    if config["split_field"]:
        if config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
            raise ConfigError("split_field (a pre-split dataset) works with sequential models only")
        dataset = _array_sequential_dataset(config, PresplitSequentialDataset)
    elif _recbole_dataset_class(config) is SequentialDataset and not _saved_dataset_file(config):
        dataset = _array_sequential_dataset(config, ArraySequentialDataset)
        if config["save_dataset"]:
            dataset.save()
    else:
        try:
            dataset = recbole_create_dataset(config)
        except ValueError as error:
            if "is empty" not in str(error):
                raise
            raise ConfigError(f"dataset '{config['dataset']}': no interaction left to train on (every row removed "
                              "by RecBole's filters: user_inter_num_interval, item_inter_num_interval, ...)") from None
    getLogger().info(dataset)
    kept = dataset.user_num - 1  # without RecBole's padding id
    if n_users_in_file and kept < n_users_in_file:
        getLogger().warning(f"[Data] {config['dataset']}: {n_users_in_file - kept} of {n_users_in_file} users in the "
                            f".inter file dropped by RecBole's filters (user_inter_num_interval, "
                            f"item_inter_num_interval, val_interval, ...): {kept} kept")
    return dataset


def check_loaded_data(config, dataset) -> None:
    """What cannot run is an error, what is suspicious a warning with counts (before the split): no interaction
    left (a header-only file, or every user filtered out), and rows repeated exactly (user, item, time: they
    inflate the metrics, a test target being also a training target)."""
    name = config["dataset"]
    if dataset.inter_num == 0:
        raise ConfigError(f"dataset '{name}': no interaction left to train on (an empty .inter file, or every row "
                          "removed by RecBole's filters: user_inter_num_interval, item_inter_num_interval, ...)")
    inter = dataset.inter_feat  # a DataFrame until RecBole's split turns it into an Interaction
    columns = inter.columns if hasattr(inter, "columns") else inter.interaction
    fields = [f for f in (dataset.uid_field, dataset.iid_field, dataset.time_field) if f and f in columns]
    rows = np.stack([np.asarray(inter[f], dtype=np.float64) for f in fields], axis=1)
    duplicates = len(rows) - len(np.unique(rows, axis=0))
    if duplicates:
        getLogger().warning(f"[Data] {name}: {duplicates} of {len(rows)} interactions repeat an earlier one exactly "
                            f"({', '.join(fields)}): repeated rows can put a test target among the training targets "
                            "and inflate Recall/NDCG; deduplicate the .inter file unless repeats are meant")


#: Score entries (rows x items) one full-sort evaluation batch of a sequential model may hold. RecBole's
#: ``eval_batch_size`` counts rows there (score entries for the other models), and the batch's score matrix, its
#: positives' matrix and the top-k's copies each grow with the item count: 4,096 rows x Book's 86k items are 1.4 GB
#: each, the surrogate's validation peaked at 11.4 GB. 72 x 2^20 entries = 288 MiB of float32 scores per matrix
#: (Book-sized: 875 rows, about 1.2 GB for the batch's matrices together; 2^27 left 2.1 GB on top of the data, the
#: stage's peak); ml-100k's and Games' 4,096 rows (Games: 71.0M entries) are under it and unchanged.
FULL_SORT_SCORE_ENTRIES = 72 << 20


def bounded_full_sort_rows(config, loader, item_num: int):
    """``loader``, or the same full-sort loader rebuilt with fewer rows per batch when a sequential model's
    ``eval_batch_size`` rows x ``item_num`` items exceed :data:`FULL_SORT_SCORE_ENTRIES` (logged). The metrics are
    per user, so the batch size changes the memory only."""
    if not isinstance(loader, FullSortEvalDataLoader) or not loader.is_sequential:
        return loader
    rows = max(1, FULL_SORT_SCORE_ENTRIES // item_num)
    configured = config["eval_batch_size"]
    if configured <= rows:
        return loader
    getLogger().info(f"[Data] {config['dataset']}: full-sort evaluation in batches of {rows} rows, not eval_batch_size "
                     f"{configured}: {configured} x {item_num} items would hold {configured * item_num * 4 / 2**30:.1f} "
                     f"GB of scores per matrix (FULL_SORT_SCORE_ENTRIES)")
    config["eval_batch_size"] = rows
    try:
        return type(loader)(config, loader.dataset, loader._sampler, shuffle=False)
    finally:
        config["eval_batch_size"] = configured


def data_preparation(config, dataset):
    """RecBole's ``data_preparation``; a pre-split test set gets the multi-target evaluation loader. A split that
    leaves no training, validation or test user is an error naming the split (RecBole would fail deep inside, or
    finish with ``test result: None``)."""
    check_loaded_data(config, dataset)
    train_data, valid_data, test_data = recbole_data_preparation(config, dataset)
    if getattr(test_data.dataset, "multi_targets", None) is not None:
        test_data = MultiTargetFullSortEvalDataLoader(config, test_data.dataset, test_data._sampler, shuffle=False)
    valid_data, test_data = (bounded_full_sort_rows(config, loader, dataset.item_num) for loader in (valid_data, test_data))
    sizes = []
    for name, loader in (("train", train_data), ("valid", valid_data), ("test", test_data)):
        part = loader.dataset
        sizes.append(f"{name} {len(part)} rows / {len(np.unique(part.inter_feat[part.uid_field].numpy()))} users")
    getLogger().info(f"[Data] {config['dataset']}: " + ", ".join(sizes))
    for name, loader in (("train", train_data), ("valid", valid_data), ("test", test_data)):
        if len(loader.dataset) == 0:
            raise ConfigError(f"dataset '{config['dataset']}': the split leaves no {name} rows ({', '.join(sizes)}); "
                              "users need at least 3 interactions under RecBole's leave-one-out split")
    return train_data, valid_data, test_data
