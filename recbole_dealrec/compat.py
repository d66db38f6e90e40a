"""RecBole 1.2.1 on today's numpy / pandas / torch: every shim in one place.

Imported by ``recbole_dealrec/__init__.py`` before anything touches RecBole. Each shim fixes one
measured breakage (see README, "Compatibility") and is a no-op on the stack RecBole was written for.
``recbole.quick_start`` is never imported: it imports ray 2.6.3, which needs ``pkg_resources`` and has no
Python 3.12 wheels; the plugin ships its own quick start.
"""
from __future__ import annotations

import csv
import types
import warnings

import numpy as np
import pandas as pd
import torch

_APPLIED = False


def _numpy_aliases() -> None:
    # numpy 2 removed these aliases; RecBole's Config.compatibility_settings reads np.float_ & co. on
    # every Config(), and Dataset._fill_nan reads np.float.
    for alias, target in {
        "float_": np.float64,
        "complex_": np.complex128,
        "unicode_": np.str_,
        "bool8": np.bool_,
    }.items():
        if not hasattr(np, alias):
            setattr(np, alias, target)


class _ModuleProxy(types.ModuleType):
    """A module as one RecBole module sees it: every name of ``wrapped``, except those the subclass defines."""

    wrapped: types.ModuleType

    def __init__(self) -> None:
        super().__init__(self.wrapped.__name__)

    def __getattr__(self, name: str):
        return getattr(self.wrapped, name)


class _PandasProxy(_ModuleProxy):
    """``pandas`` as seen by ``recbole.data.dataset.dataset``, with a fixed ``read_csv``.

    Atomic files are never quoted, but pandas' default quoting would swallow tabs up to the next ``"`` in
    a title such as ``Ivan "Ironman" Stewart's``: read with ``QUOTE_NONE``. And RecBole fills missing sequence cells with ``df[field].fillna("", inplace=True)``, a chained in-place
    call that is a silent no-op under pandas 3 copy-on-write; the next ``.split`` then fails on NaN.
    Filling the ``*seq`` columns right after reading gives RecBole the strings it expects.
    """

    wrapped = pd

    @staticmethod
    def read_csv(*args, **kwargs):
        kwargs.setdefault("quoting", csv.QUOTE_NONE)
        df = pd.read_csv(*args, **kwargs)
        for column in df.columns:
            # At this point the columns are still the header's "field:type" strings.
            if str(column).rsplit(":", 1)[-1].endswith("seq"):
                df[column] = df[column].fillna("")
        return df


def _fill_nan(self) -> None:
    """``Dataset._fill_nan`` without chained in-place ``fillna`` (a no-op under pandas 3)."""
    from recbole.utils import FeatureType

    for feat_name in self.feat_name_list:
        feat = getattr(self, feat_name)
        for field in feat:
            ftype = self.field2type[field]
            if ftype == FeatureType.TOKEN:
                feat[field] = feat[field].fillna(value=0)
            elif ftype == FeatureType.FLOAT:
                feat[field] = feat[field].fillna(value=feat[field].mean())
            else:
                dtype = np.int64 if ftype == FeatureType.TOKEN_SEQ else np.float64
                feat[field] = feat[field].apply(
                    lambda x: np.array([], dtype=dtype) if isinstance(x, float) else x
                )


def _remap(self, remap_list) -> None:
    """``Dataset._remap`` with ``Series.map(len)`` where RecBole wrote ``Series.agg(len)``.

    pandas 3 ``Series.agg(len)`` returns the length of the whole Series instead of one length per row,
    which splits every ``token_seq`` field (e.g. ml-100k's titles) into a single piece.
    """
    from recbole.utils import FeatureType

    if len(remap_list) == 0:
        return
    tokens, split_point = self._concat_remaped_tokens(remap_list)
    new_ids_list, mp = pd.factorize(tokens)
    new_ids_list = np.split(new_ids_list + 1, split_point)
    mp = np.array(["[PAD]"] + list(mp))
    token_id = {t: i for i, t in enumerate(mp)}
    for (feat, field, ftype), new_ids in zip(remap_list, new_ids_list):
        if field not in self.field2id_token:
            self.field2id_token[field] = mp
            self.field2token_id[field] = token_id
        if ftype == FeatureType.TOKEN:
            feat[field] = new_ids
        elif ftype == FeatureType.TOKEN_SEQ:
            split_point = np.cumsum(feat[field].map(len).to_numpy())[:-1]
            feat[field] = pd.Series(np.split(new_ids, split_point), index=feat.index, dtype=object)


class _TorchProxy(_ModuleProxy):
    """``torch`` as seen by ``recbole.trainer.trainer``: ``load`` reads tensors only (``weights_only=True``).

    RecBole pickles its whole ``Config`` into every checkpoint and reloads it with ``torch.load``, which would run
    whatever a checkpoint file holds; :func:`_save_checkpoint` writes the model's name instead, so RecBole's own
    best-model reload and ``resume_checkpoint`` need nothing but tensors and numbers.
    """

    wrapped = torch

    @staticmethod
    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return torch.load(*args, **kwargs)


def _save_checkpoint(self, epoch, verbose=True, **kwargs):
    # RecBole's Trainer._save_checkpoint with {"model": name} in place of the pickled Config (see _TorchProxy).
    if not self.config["single_spec"] and self.config["local_rank"] != 0:
        return
    saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
    state = {
        "config": {"model": self.config["model"]},
        "epoch": epoch,
        "cur_step": self.cur_step,
        "best_valid_score": float(self.best_valid_score),
        "state_dict": self.model.state_dict(),
        "other_parameter": self.model.other_parameter(),
        "optimizer": self.optimizer.state_dict(),
    }
    torch.save(state, saved_model_file)  # default protocol: the weights-only unpickler reads no protocol-4 frames
    if verbose:
        self.logger.info(f"Saving current: {saved_model_file}")


def _bert4rec_reconstruct_test_data(self, item_seq, item_seq_len):
    # Same output as RecBole's version (mask token after each history, then the first column dropped), without
    # its Python loop over rows, whose data-dependent indexing torch.func.vmap cannot run (per-user GraNd).
    padding = torch.zeros(item_seq.size(0), 1, dtype=torch.long, device=item_seq.device)
    item_seq = torch.cat((item_seq, padding), dim=-1)
    positions = torch.arange(item_seq.size(1), device=item_seq.device)
    return torch.where(positions[None, :] == item_seq_len[:, None], self.mask_token, item_seq)[:, 1:]


# ---- transformers' KV-cache API (used by BIGRec's beam search and the shared-prefix effort scores)


def transformers_cache_key() -> str:
    """The name transformers gives the KV cache (model output field and ``generate`` argument).

    ``cache`` from transformers 5.x on (``past_key_values`` still works there but warns), ``past_key_values``
    before.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def plain_kv_cache(cache) -> bool:
    """Whether every layer of a KV cache is a plain ``DynamicLayer`` (full attention, every token kept): only then
    can a shared prefix's keys and values be computed on one row and repeated (a sliding window counts places)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def init_logger(config) -> None:
    """RecBole's ``init_logger``, its folders (``./log`` and ``./log/<model>``) made first: RecBole makes each with a
    check, then a create (``ensure_dir``), so two runs started together in one folder race and one fails with
    ``FileExistsError: './log'``."""
    import os

    from recbole.utils import init_logger as recbole_init_logger

    os.makedirs(os.path.join("log", str(config["model"])), exist_ok=True)
    recbole_init_logger(config)


def apply() -> None:
    """Apply every shim once (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    _numpy_aliases()
    # RecBole's own chained fillna (now harmless, see _PandasProxy) and its deprecated GradScaler call warn
    # on every run; the warnings say nothing a user can act on.
    warnings.filterwarnings("ignore", category=pd.errors.ChainedAssignmentError, module="recbole")
    warnings.filterwarnings("ignore", category=FutureWarning, module="recbole.trainer.trainer")
    import recbole.data.dataset.dataset as dataset_module
    import recbole.trainer.trainer as trainer_module

    dataset_module.pd = _PandasProxy()
    dataset_module.Dataset._fill_nan = _fill_nan
    dataset_module.Dataset._remap = _remap
    trainer_module.torch = _TorchProxy()
    trainer_module.Trainer._save_checkpoint = _save_checkpoint
    # Importing RecBole's sequential models runs sine.py, which calls
    # torch.autograd.set_detect_anomaly(True) for the whole process: every backward pass then runs
    # checks that slow training several-fold and turn NaN gradients into RuntimeErrors. Import it now and
    # switch anomaly detection back off.
    import recbole.model.sequential_recommender  # noqa: F401
    from recbole.model.sequential_recommender.bert4rec import BERT4Rec

    torch.autograd.set_detect_anomaly(False)
    BERT4Rec.reconstruct_test_data = _bert4rec_reconstruct_test_data
    _APPLIED = True
