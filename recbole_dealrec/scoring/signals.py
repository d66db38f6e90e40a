"""One registry of per-user signals (``SIGNALS``): every score or vector a selection method may need.

A signal is a named scorer with its own config check (run before any data is read), the config keys its
values depend on (its cache key) and ``compute(ctx)`` over the candidate users. A selection method declares
the signals it needs; :func:`compute_signals` computes each once per run (or reuses it from
``<output_dir>/<dataset>/cache``) and hands them over keyed by user id. Signals that read the surrogate share
one :class:`SignalContext`, so the surrogate is trained at most once per run, and only when a signal is not
cached. Adding a signal is one small class registered here (see ``recbole_dealrec/scoring/*``).
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar, Mapping, Optional, Sequence

import numpy as np

from recbole_dealrec import distributed
from recbole_dealrec.config import property_file_keys
from recbole_dealrec.errors import ConfigError
from recbole_dealrec.registry import Registry, import_submodules
from recbole_dealrec.scoring.cache import ScoredUsers, UserScores, cached_user_scores
from recbole_dealrec.utils import StageTimer, dataset_fingerprint, stable_key


class SignalContext:
    """What signals compute from, built lazily and shared: the run's config and train data, the candidate
    users, the data fingerprint, the trained surrogate and its early-epoch snapshots."""

    def __init__(self, config, train_dataset, candidates: np.ndarray, snapshot_epochs: Sequence[int] = (),
                 timer: StageTimer | None = None) -> None:
        self.config = config
        self.timer = timer or StageTimer()
        self.train_dataset = train_dataset
        self.candidates = np.sort(np.asarray(candidates, dtype=np.int64))
        self.candidate_tokens = np.asarray(
            train_dataset.id2token(train_dataset.uid_field, self.candidates)).astype(str)
        self.snapshot_epochs = tuple(sorted(set(int(e) for e in snapshot_epochs)))
        self._data_key: Optional[str] = None
        self._surrogate_key: Optional[str] = None
        self._surrogate = None

    @property
    def data_key(self) -> str:
        if self._data_key is None:
            self._data_key = dataset_fingerprint(self.config)
        return self._data_key

    @property
    def users_key(self) -> str:
        return stable_key({"users": self.candidate_tokens.tolist()})

    @property
    def surrogate_key(self) -> str:
        if self._surrogate_key is None:
            from recbole_dealrec.surrogate import surrogate_key

            self._surrogate_key = surrogate_key(self.config)
        return self._surrogate_key

    def surrogate(self):
        """The surrogate trained on all training data (trained once per run, or loaded from the cache)."""
        if self._surrogate is None:
            from recbole_dealrec.surrogate import train_surrogate

            # under torch.distributed the ranks train it together (data-parallel) or load it; rank 0 caches it
            with self.timer("surrogate"):
                self._surrogate = train_surrogate(self.config, snapshot_epochs=self.snapshot_epochs)
        return self._surrogate

    def snapshot(self, run: int, epoch: int):
        """The surrogate of seeded run ``run`` after ``epoch`` epochs (run 0 = the main training's own)."""
        from recbole_dealrec.surrogate.train import snapshot_cached, surrogate_snapshot

        if (run == 0 and epoch > 0 and epoch in self.snapshot_epochs and self._surrogate is None
                and not snapshot_cached(self.config, run, epoch)):
            self.surrogate()  # trains the main surrogate if needed, saving its early snapshots on the way
        return surrogate_snapshot(self.config, run, epoch)

    def surrogate_ids(self, surrogate) -> np.ndarray:
        """The candidates as internal ids of the surrogate's own dataset (joined by token, never by position)."""
        dataset = surrogate.train_dataset
        return np.asarray(dataset.token2id(dataset.uid_field, list(self.candidate_tokens)), dtype=np.int64)


class Signal(abc.ABC):
    """A per-user signal. Its values depend on the keys :meth:`key_names` gives (part of its cache key): those of
    its ``properties/signal/<name>.yaml`` and ``depends_on``."""

    name: ClassVar[str]
    description: ClassVar[str]
    #: keys declared elsewhere (``seed``, ``dataset``, a dataset's ``title_field``) the values depend on
    depends_on: ClassVar[tuple[str, ...]] = ()
    uses_surrogate: ClassVar[bool] = False
    #: computed by every rank of a torch.distributed run, each on its share of the users (else rank 0 alone)
    sharded: ClassVar[bool] = False
    #: by-products :meth:`compute` returns beside the values (``ScoredUsers.artifacts``), cached with them
    artifacts: ClassVar[tuple[str, ...]] = ()

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Validate this signal's keys before any data is read (override where needed)."""

    def check_data(self, ctx: "SignalContext") -> None:
        """Checks that need the loaded data (e.g. parameter patterns against the surrogate's names), run for every
        signal before any is computed or any model trained (override where needed)."""

    def snapshot_epochs(self, config: Mapping[str, Any]) -> tuple[int, ...]:
        """Epochs of the main surrogate training whose weights this signal reads (GraNd, EL2N)."""
        return ()

    @classmethod
    def key_names(cls) -> tuple[str, ...]:
        """The config keys the values depend on: the signal's property file's, then ``depends_on``."""
        return property_file_keys("signal", cls.name) + cls.depends_on

    def cache_payload(self, ctx: SignalContext) -> dict[str, Any]:
        payload = {k: ctx.config[k] for k in self.key_names()}
        payload.update(data=ctx.data_key, users=ctx.users_key)
        if self.uses_surrogate:
            payload["surrogate"] = ctx.surrogate_key
        return payload

    @abc.abstractmethod
    def compute(self, ctx: SignalContext) -> ScoredUsers:
        """Values for every candidate user (``ctx.candidate_tokens``), with facts for the metadata."""

    def export(self, ctx: SignalContext, result: ScoredUsers) -> None:
        """After the values are computed or reused: write what the run's keys ask for from them (its
        ``meta['artifacts']``), the same bytes whichever happened (override where needed)."""


SIGNALS: Registry[type[Signal]] = Registry("signal")


def registered_signals() -> Registry[type[Signal]]:
    import recbole_dealrec.scoring as package

    import_submodules(package.__name__, package.__path__)  # each signal's module registers it on import
    return SIGNALS


def check_signal_config(names: Sequence[str], config) -> None:
    """Validate the keys of every needed signal before any data is read or model trained."""
    registry = registered_signals()
    for name in names:
        signal = registry.get(name)()
        signal.check_config(config)
        if signal.uses_surrogate:
            from recbole_dealrec.surrogate import surrogate_config

            surrogate_config(config)  # a non-sequential surrogate_model fails here


def _check_values(name: str, values: np.ndarray) -> None:
    if not np.all(np.isfinite(values)):
        bad = int((~np.isfinite(values)).sum())
        raise ConfigError(f"signal '{name}' has {bad} non-finite values (NaN or inf): the surrogate or LLM it "
                          "comes from diverged; check its training log and keys")


def compute_signals(
    names: Sequence[str], config, train_dataset, candidates: np.ndarray, timer: StageTimer | None = None
) -> tuple[dict[str, UserScores], dict[str, Any]]:
    """``({name: UserScores}, {name: facts})`` over ``candidates`` (internal ids of ``train_dataset``).

    Each signal is computed once (or reused from the cache); its user tokens are mapped to this dataset's
    ids here, so values from a model trained on its own copy of the dataset are never joined by position.
    """
    registry = registered_signals()
    timer = timer or StageTimer()
    signals = {name: registry.get(name)() for name in names}
    epochs = [e for s in signals.values() for e in s.snapshot_epochs(config)]
    ctx = SignalContext(config, train_dataset, candidates, snapshot_epochs=epochs, timer=timer)
    for signal in signals.values():
        signal.check_data(ctx)
    if distributed.active() and any(s.uses_surrogate for s in signals.values()):
        ctx.surrogate()  # every rank at once: rank 0 trains (or loads) it, the others then load it from the cache
    out: dict[str, UserScores] = {}
    meta: dict[str, Any] = {}
    for name, signal in signals.items():
        with timer(f"{name} signal"):
            result = cached_user_scores(config, name, signal.cache_payload(ctx), lambda s=signal: s.compute(ctx),
                                        collective=signal.sharded, artifacts=signal.artifacts)
            signal.export(ctx, result)
        _check_values(name, np.asarray(result.scores, dtype=np.float64))
        ids = np.asarray(train_dataset.token2id(train_dataset.uid_field, list(result.tokens)), dtype=np.int64)
        values = np.asarray(result.scores, dtype=np.float64 if np.ndim(result.scores) == 1 else np.float32)
        # a signal may score more users than the candidates (influence scores every user of the empirical risk):
        # the selection sees the candidates' values only (candidate_period); a missing candidate stays an error
        among = np.isin(ids, candidates)
        out[name], meta[name] = UserScores(ids[among], values[among]), result.meta
    return out, meta
