"""A RecBole ``Config`` that layers the plugin's property files after RecBole's own.

Priority, lowest first: RecBole's internal properties < ``properties/overall.yaml`` <
``properties/model/<Model>.yaml`` < ``properties/dataset/<dataset>.yaml`` < the dataset folder's own
``<data_path>/<dataset>/recbole_dealrec.yaml`` (written by the importer) < ``properties/sampler/<sampler>.yaml``
< ``config_files`` < ``config_dict`` < command line. Unlike RecBole's ``Config``, the command line is read only
from the ``argv`` given (the CLI passes its own), never from the process's ``sys.argv``, and values are parsed
as Python literals only (RecBole ``eval``s them).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import os
import re
from functools import lru_cache
from typing import Any, ClassVar, Mapping, Optional, Sequence

import recbole
import yaml
from recbole.config import Config
from recbole.utils import ModelType

from recbole_dealrec.errors import ConfigError

PROPERTIES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "properties")
if not os.path.isdir(PROPERTIES_DIR):  # source checkout: properties/ sits beside the package
    PROPERTIES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "properties")

DEFAULT_DATASET = "ml-100k"
DEFAULT_SAMPLER = "full"
#: Keys that change no number a run computes: where outputs go (``data_path``: the data's own digest is keyed
#: instead), logging, plots, devices and the process layout. Every cache key and the grid's cell key leave them out.
RESULT_NEUTRAL_KEYS = frozenset({
    "output_dir", "checkpoint_dir", "data_path", "show_progress", "state", "log_wandb", "wandb_project", "report_plots",
    "device", "gpu_id", "local_rank", "single_spec", "worker", "save_dataset", "save_dataloaders", "dataset_save_path",
    "dataloaders_save_path", "distributed_timeout"})
#: Property file a dataset folder may hold (the importer writes it): the dataset's keys, no hand-written YAML.
DATASET_PROPERTY_FILE = "recbole_dealrec.yaml"
#: Keys RecBole's ``Config`` reads that no RecBole property file names.
RECBOLE_BUILTIN_KEYS = frozenset({"model", "dataset", "config_files", "local_rank", "nproc", "world_size", "offset",
                                  "ip", "port", "single_spec", "unchecked_keys"})


def property_names(kind: str) -> list[str]:
    """Names that have a property file under ``properties/<kind>/`` (e.g. datasets, samplers)."""
    folder = os.path.join(PROPERTIES_DIR, kind)
    return sorted(f[: -len(".yaml")] for f in os.listdir(folder) if f.endswith(".yaml"))


def parse_literal(text: str):
    """A command-line / config-dict string as a Python literal (``ast.literal_eval``), ``true``/``false`` as
    booleans, else the string itself. Never runs code."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        return text


class DealrecConfig(Config):
    """RecBole ``Config`` with the plugin's model lookup and property layers."""

    def __init__(
        self,
        model=None,
        dataset: Optional[str] = None,
        config_file_list: Optional[Sequence[str]] = None,
        config_dict: Optional[dict] = None,
        argv: Sequence[str] = (),
    ) -> None:
        self._argv = list(argv)
        super().__init__(model, dataset, list(config_file_list or []), config_dict)

    def _load_config_files(self, file_list) -> dict:
        # RecBole's version gives a bare traceback (``<unicode string>``) for a missing file or invalid YAML.
        config = {}
        for path in file_list or []:
            config.update(read_property_file(path, self.yaml_loader))
        return config

    def _update_internal_config_dict(self, file):
        config = read_property_file(file, self.yaml_loader)
        self.internal_config_dict.update(config)
        return config

    def _load_cmd_line(self) -> dict:
        # RecBole's version parses the whole process's sys.argv; ours parses only what the CLI hands over.
        cmd_config_dict = {}
        for arg in self._argv:
            if not arg.startswith("--") or "=" not in arg:
                raise ConfigError(f"command-line argument '{arg}' is not of the form --key=value")
            key, value = arg[2:].split("=", 1)
            if key in cmd_config_dict and cmd_config_dict[key] != value:
                raise ConfigError(f"command-line key '{key}' given twice with different values")
            cmd_config_dict[key] = value
        return self._convert_config_dict(cmd_config_dict)

    def _convert_config_dict(self, config_dict):
        # RecBole eval()s every string value of the command line and of config dicts (and the surrogate's
        # config passes the run's file config back as a config dict): a value in a shared property file could
        # run code. Only Python literals are parsed (numbers, booleans, None, lists/tuples/dicts of them,
        # quoted strings); anything else stays the string it was.
        for key, value in config_dict.items():
            if isinstance(value, str):
                config_dict[key] = parse_literal(value)
        return config_dict

    def _set_default_parameters(self):
        super()._set_default_parameters()
        # RecBole reads its embedded ml-100k whatever data_path says; a data_path the user gave is where the data is
        given = self.external_config_dict.get("data_path")
        if self.dataset == DEFAULT_DATASET and given:
            folder = os.path.join(os.path.expanduser(str(given)), self.dataset)
            if not os.path.isfile(os.path.join(folder, f"{self.dataset}.inter")):
                raise ConfigError(f"data_path {given!r} has no {self.dataset}/{self.dataset}.inter (leave data_path "
                                  f"unset for RecBole's embedded {self.dataset})")
            self.final_config_dict["data_path"] = folder

    def _get_model_and_dataset(self, model, dataset):
        # the first step after RecBole merged the user's keys (files < dict < command line): check them now
        check_key_types(self.external_config_dict)
        if model is None:
            model = self.external_config_dict.get("model")
            if model is None:
                raise ConfigError("no model given: pass --model=<Model> (e.g. SASRec, BIGRec)")
        from recbole_dealrec.model import get_model  # the models read datasets; the data stage reads this module

        model_class = get_model(model) if isinstance(model, str) else model
        model_name = model if isinstance(model, str) else model.__name__
        dataset = dataset or self.external_config_dict.get("dataset") or DEFAULT_DATASET
        return model_name, model_class, dataset

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        self._update_plugin_layer(os.path.join(PROPERTIES_DIR, "overall.yaml"))
        for name in property_names("signal"):  # every signal's defaults: any sampler may need any signal
            self._update_plugin_layer(os.path.join(PROPERTIES_DIR, "signal", f"{name}.yaml"))
        self._update_plugin_layer(os.path.join(PROPERTIES_DIR, "model", f"{model}.yaml"))
        dataset_keys = self._update_plugin_layer(os.path.join(PROPERTIES_DIR, "dataset", f"{dataset}.yaml"))
        data_path = self.external_config_dict.get("data_path") or self.internal_config_dict.get("data_path")
        if data_path:
            folder_file = os.path.join(os.path.expanduser(str(data_path)), dataset, DATASET_PROPERTY_FILE)
            dataset_keys = {**dataset_keys, **self._update_plugin_layer(folder_file)}
        recbole_dataset_file = os.path.join(os.path.dirname(recbole.__file__), "properties", "dataset", f"{dataset}.yaml")
        self.inferred_columns: list[str] = []
        if ("load_col" not in self.external_config_dict and "load_col" not in dataset_keys
                and not os.path.isfile(recbole_dataset_file)):
            # a plain RecBole atomic dataset without a YAML: RecBole would load only user_id and item_id
            folder = os.path.join(os.path.expanduser(str(data_path or "dataset/")), dataset)
            inferred, self.inferred_columns = infer_atomic_columns(
                folder, dataset, {**self.internal_config_dict, **self.external_config_dict},
                set(self.external_config_dict), sequential=getattr(model_class, "type", None) == ModelType.SEQUENTIAL)
            self.internal_config_dict.update(inferred)
            dataset_keys = {**dataset_keys, **inferred}
        # RecBole compares "Dataset" keys to decide whether a saved dataset can be reused.
        self.parameters["Dataset"] += [k for k in dataset_keys if k not in self.parameters["Dataset"]]
        sampler = self.external_config_dict.get("sampler") or self.internal_config_dict.get("sampler")
        self._update_plugin_layer(os.path.join(PROPERTIES_DIR, "sampler", f"{sampler or DEFAULT_SAMPLER}.yaml"))

    def _update_plugin_layer(self, path: str) -> dict:
        if not os.path.isfile(path):
            return {}
        return self._update_internal_config_dict(path) or {}


#: how :func:`infer_atomic_columns` finds a field the config names but the header lacks: (key, atomic file, types,
#: name pattern, required)
INFERRED_FIELDS = (
    ("USER_ID_FIELD", "inter", ("token",), r"user|^uid$", True),
    ("ITEM_ID_FIELD", "inter", ("token",), r"item|^iid$", True),
    ("TIME_FIELD", "inter", ("float",), r"time|date|^ts$", False),  # required by sequential models (below)
    ("RATING_FIELD", "inter", ("float",), r"rating|score", False),
    ("title_field", "item", ("token", "token_seq"), r"title|name", False),
)


def atomic_header(path: str, separator: str = "\t") -> list[tuple[str, str]]:
    """The (name, type) fields of an atomic file's header line."""
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\r\n").split(separator)
    return [tuple(field.rsplit(":", 1)) if ":" in field else (field, "") for field in header]


def infer_atomic_columns(folder: str, dataset: str, config: Mapping[str, Any], given: set,
                         sequential: bool) -> tuple[dict, list[str]]:
    """The keys a RecBole atomic dataset needs, from its files' headers, for a dataset no property file describes.

    ``load_col``: the user, item, time, rating and split columns of ``.inter`` and every column of ``.item`` and
    ``.user`` (when present). A field key
    (user, item, time, rating, title: :data:`INFERRED_FIELDS`) whose configured name is not a column and that the
    user did not set (``given``) becomes the one column of its type whose name matches (e.g. ``uid:token`` ->
    USER_ID_FIELD); a required one with no such column is a one-line ConfigError naming the key and the header. A
    missing ``.inter`` is left to the data stage's check (it names the path). Returns ``(keys, log lines)``.
    """
    separator = config.get("field_separator") or "\t"
    headers = {suffix: atomic_header(path, separator) for suffix in ("inter", "item", "user")
               if os.path.isfile(path := os.path.join(folder, f"{dataset}.{suffix}"))}
    if "inter" not in headers:
        return {}, []
    keys: dict[str, Any] = {}
    notes = []
    for key, suffix, types, pattern, required in INFERRED_FIELDS:
        fields = headers.get(suffix)
        name = config.get(key)
        if fields is None or (name and name in dict(fields)):
            continue
        required = required or (key == "TIME_FIELD" and sequential)
        shown = ", ".join(f"{n}:{t}" for n, t in fields)
        if key in given:
            if name is None:
                continue
            raise ConfigError(f"{key}={name!r} is not a column of {dataset}.{suffix} (header: {shown})")
        matches = [n for n, t in fields if t in types and re.search(pattern, n, flags=re.IGNORECASE)]
        if len(matches) == 1:
            keys[key] = matches[0]
            notes.append(f"{key}: {matches[0]!r} (the {suffix} file has no {name!r} column)")
        elif required:
            what = "a sequential model orders each user's interactions by it; " if key == "TIME_FIELD" else ""
            raise ConfigError(f"{key}: {dataset}.{suffix} has no {name!r} column and no single {'/'.join(types)} column "
                              f"named like it (header: {shown}); {what}set {key} to the column (or add one)")
    # .inter: the fields the run reads only (a sequential dataset copies every loaded .inter column into a
    # [rows, MAX_ITEM_LIST_LENGTH] list: loading the others would multiply its memory); .item / .user: every column
    fields = {**config, **keys}
    wanted = [fields.get(k) for k in ("USER_ID_FIELD", "ITEM_ID_FIELD", "TIME_FIELD", "RATING_FIELD", "split_field")]
    inter_names = [name for name, _ in headers["inter"]]
    load_col = {"inter": [name for name in inter_names if name in wanted]}
    load_col.update({suffix: [name for name, _ in header] for suffix, header in headers.items() if suffix != "inter"})
    keys["load_col"] = load_col
    left = [name for name in inter_names if name not in load_col["inter"]]
    notes.insert(0, f"{dataset} has no property file: load_col {load_col}"
                 + (f" (not loaded from .inter: {', '.join(left)}; set load_col to load them)" if left else ""))
    return keys, notes


def read_property_file(path: str, loader=yaml.SafeLoader) -> dict:
    """A YAML property file as a dict; a missing file, invalid YAML or a non-mapping is a ConfigError naming the file
    (and the line)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path} cannot be read: {error}") from None
    try:
        config = yaml.load(text, Loader=loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config file {path}{where}: invalid YAML ({problem})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f"config file {path}: expected key: value lines (a mapping), got a {type(config).__name__}")
    return config


@lru_cache(maxsize=None)
def recbole_keys() -> frozenset:
    """Every key of RecBole's own property files (overall, models, datasets, quick-start defaults)."""
    import recbole

    keys = set()
    root = os.path.join(os.path.dirname(recbole.__file__), "properties")
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".yaml"):
                with open(os.path.join(folder, name), encoding="utf-8") as handle:
                    keys.update((yaml.safe_load(handle) or {}).keys())
    return frozenset(keys)


@lru_cache(maxsize=None)
def plugin_keys() -> tuple[frozenset, frozenset, frozenset]:
    """``(every key of every property file, the keys of the sampler and signal files, the plugin's own key
    prefixes)``: the prefixes of plugin keys (``ccs_``, ``tiger_``, ``effort_``, ...) that no RecBole key has."""
    keys, selection_keys = set(), set()
    for kind in ("", "model", "dataset", "sampler", "signal"):
        folder = os.path.join(PROPERTIES_DIR, kind)
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".yaml"):
                continue
            with open(os.path.join(folder, name), encoding="utf-8") as handle:
                file_keys = list((yaml.safe_load(handle) or {}).keys())
            keys.update(file_keys)
            if kind in ("sampler", "signal"):
                selection_keys.update(file_keys)
    recbole_prefixes = {k.split("_", 1)[0] + "_" for k in recbole_keys() if "_" in k}
    prefixes = {k.split("_", 1)[0] + "_" for k in keys - recbole_keys() if "_" in k} - recbole_prefixes
    return frozenset(keys | recbole_keys()), frozenset(selection_keys), frozenset(prefixes)


@lru_cache(maxsize=None)
def property_file_keys(kind: str, name: str) -> tuple[str, ...]:
    """The keys ``properties/<kind>/<name>.yaml`` declares, in file order (``()`` when there is no such file):
    a sampler's or signal's keys are declared there once, and read from there by the code."""
    path = os.path.join(PROPERTIES_DIR, kind, f"{name}.yaml")
    return tuple(read_property_file(path)) if os.path.isfile(path) else ()


@dataclasses.dataclass(frozen=True)
class StageArguments:
    """A stage's typed arguments (kronfluence's ``*Arguments``): one field per key of its property file, read from a
    run's config by :meth:`from_config` and checked there. The values' defaults live in the property file alone; a
    test holds every subclass's fields equal to :meth:`declared_keys`."""

    #: ``(kind, name)`` of the property file that declares the fields (``("signal", "influence")``)
    property_file: ClassVar[tuple[str, str]]
    #: fields declared by other property files (``seed``)
    declared_elsewhere: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def declared_keys(cls) -> tuple[str, ...]:
        return property_file_keys(*cls.property_file) + cls.declared_elsewhere

    @classmethod
    def from_config(cls, config: Mapping[str, Any]):
        """The arguments of ``config`` (a RecBole config or a mapping holding every field), checked."""
        args = cls(**{field.name: config[field.name] for field in dataclasses.fields(cls)})
        args.check()
        return args

    def check(self) -> None:
        """Raise ``ConfigError`` naming the key of a bad value (override)."""


@lru_cache(maxsize=None)
def model_only_keys(model: str, other_model: str) -> frozenset:
    """Keys of ``properties/model/<model>.yaml`` that neither RecBole nor ``other_model``'s file defines: keys only
    ``model`` reads (e.g. BIGRec's ``gradient_accumulation_steps``, ``num_beams``), which ``other_model`` never sees.
    """
    def file_keys(name: str) -> set:
        path = os.path.join(PROPERTIES_DIR, "model", f"{name}.yaml")
        return set(read_property_file(path)) if os.path.isfile(path) else set()

    return frozenset(file_keys(model) - recbole_keys() - file_keys(other_model))


def user_keys(config: Config) -> dict:
    """The keys the user gave (property files, config dict, command line; later ones win), not the defaults."""
    return {**config.file_config_dict, **config.variable_config_dict, **config.cmd_config_dict}


def check_known_keys(config: Config) -> None:
    """Every key the user gave (files, config dict, command line) must be one a property file of RecBole or of the
    plugin defines: a misspelled key fails with the closest known key instead of being ignored. A key RecBole reads
    that no property file names can be let through by listing it in ``unchecked_keys``."""
    known, _, _ = plugin_keys()
    allowed = known | RECBOLE_BUILTIN_KEYS | set(config["unchecked_keys"] or [])
    for key in user_keys(config):
        if key in allowed:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown key {key!r}: no property file of RecBole or of the plugin defines it{hint} "
                          "(a key RecBole reads that no property file names: add it to `unchecked_keys`)")


# ---- every key a run is given: its type (and, for RecBole's own keys a run reads, its range), before the data

_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "list": (list, tuple), "dict": (dict,)}
_DECLARED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):\s*(.*?)\s+#\s*\(([a-z ]+)\)")

#: RecBole keys a run reads, with (allowed types, range check, the allowed values in words); None allowed where
#: RecBole's default is None
RECBOLE_KEY_RULES: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "epochs": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "train_batch_size": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "eval_batch_size": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "learning_rate": ((int, float), lambda v: v > 0, "a number > 0"),
    "weight_decay": ((int, float), lambda v: v >= 0, "a number >= 0"),
    "seed": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "MAX_ITEM_LIST_LENGTH": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "stopping_step": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "eval_step": ((int,), lambda v: v >= 0, "an integer >= 0 (0 = no validation)"),
    "topk": ((list, tuple, int), lambda v: all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                                               for k in (v if isinstance(v, (list, tuple)) else [v])) and v != [],
             "a list of integers >= 1"),
    "metric_decimal_place": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "hidden_size": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "inner_size": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "n_layers": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "n_heads": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "embedding_size": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "hidden_dropout_prob": ((int, float), lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "attn_dropout_prob": ((int, float), lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "dropout_prob": ((int, float), lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "loss_type": ((str,), lambda v: v in ("CE", "BPR"), "CE or BPR"),
    "show_progress": ((bool,), lambda v: True, "True or False"),
    "reproducibility": ((bool,), lambda v: True, "True or False"),
    "shuffle": ((bool,), lambda v: True, "True or False"),
    "valid_metric": ((str,), lambda v: bool(v), "a metric name such as MRR@10"),
    "data_path": ((str,), lambda v: bool(v), "a folder path"),
    "checkpoint_dir": ((str,), lambda v: bool(v), "a folder path"),
}


@lru_cache(maxsize=None)
def declared_key_types() -> dict[str, tuple[str, bool, frozenset]]:
    """``key -> (declared type, whether None is allowed, words allowed besides the type)`` of every top-level key of
    the plugin's property files, from the ``# (type)`` comment that documents it (``int``, ``float``, ``bool``,
    ``str``, ``list``, ``dict``, or ``A or B``): the property file is the one place a key and its type are declared.
    None is allowed where some file's default is ``~``, where the comment documents ``~ = ...``, and for every
    ``str`` key (unset: none); a word default of a
    numeric key (``auto``) is allowed too."""
    kinds: dict[str, str] = {}
    none_ok: dict[str, bool] = {}
    words: dict[str, set] = {}
    for root, _, files in os.walk(PROPERTIES_DIR):
        for name in sorted(files):
            if not name.endswith(".yaml"):
                continue
            with open(os.path.join(root, name), encoding="utf-8") as handle:
                for line in handle:
                    match = _DECLARED.match(line)
                    if not match or not all(t in _TYPES for t in match.group(3).split(" or ")):
                        continue
                    key, default, kind = match.group(1), yaml.safe_load(match.group(2)), match.group(3)
                    kinds[key] = kind
                    # an unset str key means "none" (title_field: ~ = no titles); a number must be a number
                    # ... and a key whose comment documents "~ = ..." (influence_hessian_users: ~ = all users)
                    none_ok[key] = (none_ok.get(key, False) or default is None or kind == "str"
                                    or "~ =" in line[match.end():])
                    if isinstance(default, str) and "str" not in kind.split(" or "):
                        words.setdefault(key, set()).add(default)
    return {key: (kind, none_ok[key], frozenset(words.get(key, ()))) for key, kind in kinds.items()}


def _article(kind: str) -> str:
    return "an" if kind[0] in "aeiou" else "a"


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # True is an int to Python, not to a user
    return isinstance(value, types)


def check_key_types(keys: dict) -> None:
    """Every key the user gave (``keys``: files, config dict, command line) has the type its property file declares
    (``None`` where a default is ``None``, a word default such as ``auto``), and every RecBole key a run reads its
    type and range (:data:`RECBOLE_KEY_RULES`). Raises ``ConfigError`` naming the key, the value and what is
    allowed. :class:`DealrecConfig` runs it on the user's keys before RecBole reads them (RecBole's own reading of
    a bad value is a traceback from deep inside, or a run on nonsense)."""
    declared = declared_key_types()
    for key, value in keys.items():
        if key in RECBOLE_KEY_RULES:
            types, in_range, allowed = RECBOLE_KEY_RULES[key]
            if not _type_ok(value, types) or not in_range(value):
                raise ConfigError(f"{key} must be {allowed}, got {value!r}")
        elif key in declared:
            kind, none_ok, words = declared[key]
            if (value is None and none_ok) or (isinstance(value, str) and value in words):
                continue
            if not _type_ok(value, tuple(t for k in kind.split(" or ") for t in _TYPES[k])):
                extra = "".join([*(f" or {w!r}" for w in sorted(words)), " or ~ (none)" if none_ok else ""])
                raise ConfigError(f"{key} must be {_article(kind)} {kind}{extra} (its property file's type), got {value!r} "
                                  f"({type(value).__name__})")
