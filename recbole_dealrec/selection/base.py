"""The selection interface, its registry and the budget keys shared by every method."""
from __future__ import annotations

import abc
import dataclasses
import numbers
from typing import Any, ClassVar, Mapping, Optional

import numpy as np

from recbole_dealrec.config import property_file_keys
from recbole_dealrec.errors import ConfigError, check_number
from recbole_dealrec.registry import Registry
from recbole_dealrec.scoring.cache import UserScores


@dataclasses.dataclass
class Selection:
    """What a method chose: sorted internal user ids, the scores it used (for export and plots), extras."""

    user_ids: np.ndarray
    scores: dict[str, UserScores] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


class SelectionMethod(abc.ABC):
    """Base class of every selection method.

    ``signals`` names the per-user scores the method needs (e.g. ``("influence", "effort")``); the quick start
    computes exactly those, so a method that needs none (Random) trains nothing extra.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    signals: ClassVar[tuple[str, ...]] = ()
    #: the key a grid's ``lambdas`` axis sets for this method (DEALRec's ``dealrec_lambda``), if any
    lambda_key: ClassVar[Optional[str]] = None
    #: whether the method keeps a subset of the users (``full`` keeps them all: the train data is left as it is)
    prunes: ClassVar[bool] = True
    #: whether the method takes a budget (``selection_num`` / ``selection_ratio``); one that does not sets its own
    takes_budget: ClassVar[bool] = True

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config

    def bind_data(self, train_dataset) -> None:
        """Called once the data is loaded, before any scoring (a method that reads user tokens maps them here)."""

    def budget(self, n_candidates: int) -> int:
        """The number of users to keep among ``n_candidates`` (default: ``selection_num`` / ``selection_ratio``)."""
        return resolve_budget(self.config, n_candidates)

    @classmethod
    def own_keys(cls) -> tuple[str, ...]:
        """The method's own config keys: those its ``properties/sampler/<name>.yaml`` declares."""
        return property_file_keys("sampler", cls.name)

    def folder_settings(self) -> dict[str, Any]:
        """What names the method's selection folder besides its signals: its own keys' values (override to add
        e.g. the contents of a file the method reads)."""
        return {k: self.config[k] for k in self.own_keys()}

    def required_signals(self) -> tuple[str, ...]:
        """Signals this run needs (an ablation may need fewer than ``signals``)."""
        return self.signals

    def check_config(self) -> None:
        """Validate the method's own keys before any long work starts (override where needed)."""

    def check_budget(self, budget: int, n_candidates: int) -> None:
        """Validate the budget against the candidates before any scoring (override where needed)."""

    @abc.abstractmethod
    def select(
        self,
        candidates: np.ndarray,
        signals: Mapping[str, UserScores],
        budget: int,
        rng: np.random.Generator,
    ) -> Selection:
        """Choose ``budget`` users among ``candidates`` (int64 [n], sorted internal user ids)."""


SAMPLERS: Registry[type[SelectionMethod]] = Registry("sampler")


def joined_values(candidates: np.ndarray, signal: UserScores, name: str) -> np.ndarray:
    """``signal``'s values ([n] or [n, d]) in the order of ``candidates`` [n]: the one alignment by user id of every
    method (never by position); both must hold the same users."""
    position = {u: i for i, u in enumerate(signal.user_ids.tolist())}
    missing = [u for u in candidates.tolist() if u not in position]
    extra = sorted(set(position) - set(candidates.tolist()))
    if missing or extra:
        raise ValueError(f"signal '{name}' covers {len(position)} users, the candidates are {len(candidates)}: id sets "
                         f"differ ({len(missing)} candidates missing, e.g. {missing[:5]}; {len(extra)} users only in "
                         f"the signal, e.g. {extra[:5]})")
    return signal.values[[position[u] for u in candidates.tolist()]]


class TopScoreSelection(SelectionMethod):
    """The ``budget`` users with the highest value of one signal (ties: lower user id), as GraNd and EL2N keep
    ``scores.argsort()[-size:]``. A signal equal for every user ranks nothing: a warning, then a uniform draw."""

    def select(self, candidates, signals, budget, rng) -> Selection:
        from recbole_dealrec.selection.clustering import warn_constant
        from recbole_dealrec.selection.stratified import greedy_top

        (name,) = self.signals
        ids = np.sort(candidates)
        values = joined_values(ids, signals[name], name)
        if np.all(values == values[0]):
            warn_constant(name, "drawing the budget uniformly with selection_seed instead")
            picked = np.sort(rng.choice(len(ids), size=budget, replace=False))
            fallback = True
        else:
            picked, fallback = greedy_top(values, budget), False
        return Selection(user_ids=ids[picked], scores={name: UserScores(ids, values)},
                         info={"signal": name, "rule": "top", "uniform_fallback": fallback})


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_selection_config(config: Mapping[str, Any]) -> SelectionMethod:
    """Validate ``sampler``, ``selection_ratio`` and ``selection_num``; return the method, built.

    Runs before the dataset is loaded, so bad input fails before any long work.
    """
    method = SAMPLERS.get(config["sampler"])(config)
    ratio, num = config["selection_ratio"], config["selection_num"]
    if ratio is not None and num is not None:
        raise ConfigError(
            f"give either selection_ratio or selection_num, not both (got {ratio!r} and {num!r})"
        )
    check_number("selection_ratio", ratio, 0, 1, low_open=True, high_open=False, none_ok=True)
    if num is not None and (not _is_int(num) or num < 1):
        raise ConfigError(f"selection_num must be an integer >= 1, got {num!r}")
    if method.takes_budget and ratio is None and num is None:
        raise ConfigError(
            f"sampler '{method.name}' needs a budget: set selection_num (e.g. 1024) or selection_ratio in (0, 1]"
        )
    if not method.takes_budget and (ratio is not None or num is not None):
        raise ConfigError(
            f"sampler '{method.name}' sets its own budget: drop selection_num / selection_ratio (got {num!r} / "
            f"{ratio!r}) or use one of the pruning methods that take one"
        )
    seed = config["selection_seed"]
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise ConfigError(f"selection_seed must be an integer >= 0 or ~ (use `seed`), got {seed!r}")
    warn_other_samplers_keys(config, method.name)
    method.check_config()
    return method


def warn_other_samplers_keys(config: Mapping[str, Any], sampler: str) -> None:
    """A key of another sampler's property file (``dealrec_lambda`` with ``--sampler=random``) does nothing in this
    run: say so in the log rather than ignore it silently."""
    import logging
    import os

    from recbole_dealrec.config import PROPERTIES_DIR, read_property_file, user_keys

    if not hasattr(config, "file_config_dict"):
        return  # a plain mapping (tests): no record of what the user gave
    folder = os.path.join(PROPERTIES_DIR, "sampler")
    shared = set(read_property_file(os.path.join(PROPERTIES_DIR, "overall.yaml")))  # the budget keys ...
    own = set(read_property_file(os.path.join(folder, f"{sampler}.yaml"))) if os.path.isfile(
        os.path.join(folder, f"{sampler}.yaml")) else set()
    others: dict[str, list[str]] = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".yaml") and name[:-5] != sampler:
            for key in set(read_property_file(os.path.join(folder, name))) - shared:
                others.setdefault(key, []).append(name[:-5])
    for key in sorted(set(user_keys(config)) & set(others) - own):
        logging.getLogger().warning(f"{key} is a key of sampler(s) {', '.join(others[key])}, not of sampler "
                                    f"'{sampler}': it does nothing in this run")


def resolve_budget(config: Mapping[str, Any], n_candidates: int) -> int:
    """Number of users to keep. ``selection_ratio`` rounds down but keeps at least one user."""
    ratio, num = config["selection_ratio"], config["selection_num"]
    if num is not None:
        if num > n_candidates:
            raise ConfigError(
                f"selection_num={num} is above the number of users with training samples ({n_candidates})"
            )
        return int(num)
    if ratio is not None:
        return max(1, int(np.floor(ratio * n_candidates)))
    return n_candidates


def selection_rng(config: Mapping[str, Any]) -> np.random.Generator:
    """The generator every random step of a selection draws from: ``selection_seed``, else ``seed``."""
    seed = config["selection_seed"]
    return np.random.default_rng(config["seed"] if seed is None else seed)
