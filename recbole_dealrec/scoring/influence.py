"""DEALRec influence scores (Eq. 11) of every training user on the surrogate's empirical risk.

    v = mean gradient over users,  x = (H + damping I)^-1 v  (one iHVP, `ihvp_solver`),
    I(u) = <grad L_u, x>  for every user u, by forward-mode jvp in batches (no per-user backward).

L_u is the surrogate's per-user loss (``recbole_dealrec.surrogate.loss``): by ``influence_user_loss`` the MEAN
(default, the paper's code) or the sum of the user's prefix losses; H and v are of R = (1/n_users) sum_u L_u.
Removing user u changes R by about +I(u)/n: a high score marks a user whose removal would hurt. Scores are cached
under a key of the surrogate, the influence keys and the data.

The keys are those of ``properties/signal/influence.yaml`` (each commented there), read as one
:class:`InfluenceArguments`. ``influence_hessian`` picks the matrix of every HVP, LiSSA's stochastic steps and its
reported residual included: gauss_newton (positive semi-definite, safe for CG; default) or exact (the true Hessian
by double backprop, indefinite on a trained SASRec; the paper's choice with LiSSA).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from logging import getLogger
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from recbole.utils import set_color

from recbole_dealrec import distributed
from recbole_dealrec.config import StageArguments
from recbole_dealrec.errors import ConfigError, check_integer, check_number
from recbole_dealrec.scoring.cache import ScoredUsers
from recbole_dealrec.scoring.ihvp import SOLVERS, ensure_finite, largest_eigenvalue, lissa_damping_for, solve
from recbole_dealrec.gradients.params import flatten, select_parameters, unflatten
from recbole_dealrec.scoring.influence_core import (
    directional_derivatives,
    make_hvp,
    make_stochastic_hvp,
    mean_gradient,
)
from recbole_dealrec.scoring.signals import SIGNALS, Signal, SignalContext
from recbole_dealrec.model import get_model
from recbole_dealrec.surrogate import SurrogateLoss, SurrogateRun, UserBatch, user_batches
from recbole_dealrec.surrogate.loss import USER_LOSSES, KeptLinearizations, concat_user_batches, supports_sequence_mode
from recbole_dealrec.surrogate.train import surrogate_config, surrogate_key
from recbole_dealrec.utils import StageTimer, atomic_write, cache_dir, cache_entry_ok, stable_key

#: Allowed values of ``influence_target``: whose loss the scores are the influence on (``v`` of ``H^-1 v``).
TARGETS = ("train", "validation")

#: Keys that change where the outputs go or how fast they come, never the scores: not part of a cache key.
UNKEYED = ("influence_ihvp_export", "influence_hvp_cache_gb")

#: Users the Hessian is estimated on with ``influence_hessian_users: auto``.
AUTO_HESSIAN_USERS = 2000



@dataclasses.dataclass(frozen=True)
class InfluenceArguments(StageArguments):
    """The influence keys of ``properties/signal/influence.yaml`` (see the comments there), and ``seed``."""

    property_file = ("signal", "influence")
    declared_elsewhere = ("seed",)

    influence_params: Sequence[str]
    influence_user_loss: str
    influence_sequence_mode: bool
    influence_hessian: str
    influence_hessian_users: Union[int, str, None]
    ihvp_solver: str
    influence_damping: Union[float, str]
    influence_damping_ratio: float
    influence_power_iters: int
    ihvp_tol: float
    cg_max_iter: int
    lissa_scale: float
    lissa_depth: int
    lissa_repeats: int
    lissa_batch_users: int
    influence_batch_rows: int
    influence_target: str
    influence_ihvp_init: Optional[str]
    influence_ihvp_export: Optional[str]
    influence_hvp_cache_gb: float
    seed: int

    def check(self) -> None:
        if str(self.ihvp_solver).lower() not in SOLVERS:
            raise ConfigError(f"ihvp_solver must be one of {', '.join(SOLVERS)}, got {self.ihvp_solver!r}")
        patterns = self.influence_params
        if not isinstance(patterns, (list, tuple)) or not patterns or not all(isinstance(p, str) for p in patterns):
            raise ConfigError(f"influence_params must be a non-empty list of regex patterns, got {patterns!r}")
        if self.influence_user_loss not in USER_LOSSES:
            raise ConfigError(f"influence_user_loss must be one of {list(USER_LOSSES)}, got {self.influence_user_loss!r}")
        if self.influence_target not in TARGETS:
            raise ConfigError(f"influence_target must be one of {list(TARGETS)}, got {self.influence_target!r}")
        if self.influence_hessian not in ("gauss_newton", "exact"):
            raise ConfigError(f"influence_hessian must be gauss_newton or exact, got {self.influence_hessian!r}")
        damping = self.influence_damping
        if damping != "auto" and (not isinstance(damping, (int, float)) or isinstance(damping, bool) or damping < 0):
            raise ConfigError(f"influence_damping must be auto or a number >= 0, got {damping!r}")
        for key in ("influence_damping_ratio", "lissa_scale", "ihvp_tol"):
            check_number(key, getattr(self, key), 0, low_open=True)
        check_number("influence_hvp_cache_gb", self.influence_hvp_cache_gb, 0)
        subset = self.influence_hessian_users
        if subset not in (None, "auto") and (not isinstance(subset, int) or subset < 1):
            raise ConfigError(f"influence_hessian_users must be auto, ~ (all users) or an integer >= 1, got {subset!r}")
        for key in ("lissa_depth", "lissa_repeats", "lissa_batch_users", "cg_max_iter", "influence_batch_rows",
                    "influence_power_iters"):
            check_integer(key, getattr(self, key), 1)
        init = self.influence_ihvp_init
        if init is not None:
            if str(self.ihvp_solver).lower() != "cg":
                raise ConfigError(f"influence_ihvp_init is a start for ihvp_solver: cg only, got ihvp_solver="
                                  f"{self.ihvp_solver!r}; set ihvp_solver: cg or influence_ihvp_init: ~")
            if not os.path.isfile(str(init)):
                raise ConfigError(f"influence_ihvp_init={init!r}: no such file (one a run's influence_ihvp_export "
                                  "wrote); ~ = a cold start")


def check_influence_config(config: Mapping[str, Any]) -> None:
    """Validate the influence keys before any training starts."""
    InfluenceArguments.from_config(config)


def _user_sampler(singles: list[UserBatch], users_per_step: int):
    """Stochastic-HVP batches for LiSSA: ``users_per_step`` users drawn uniformly with the solver's generator."""

    def sample(generator: torch.Generator) -> UserBatch:
        picks = torch.randint(len(singles), (users_per_step,), generator=generator).tolist()
        return concat_user_batches([singles[p] for p in picks])

    return sample


def scored_in_sequence_mode(influence_sequence_mode: bool, windows: str, model) -> bool:
    """Whether the influence loss runs on one row per user window (sequence mode) rather than RecBole's prefix rows:
    with ``influence_sequence_mode``, and always with chunked windows (their prefix samples exist in sequence mode
    only); a surrogate without sequence mode (BERT4Rec, GRU4Rec) is scored on its prefix rows. Every pass that
    scores, or checks, the influence loss asks this (the scores, the Hessian, LiSSA's steps, the check's risk)."""
    return (bool(influence_sequence_mode) or windows == "chunked") and supports_sequence_mode(model)


def hessian_vector_product(args: InfluenceArguments, loss: SurrogateLoss, params, train_dataset,
                           batches: list[UserBatch], keep: Optional[KeptLinearizations] = None,
                           windows: str = "sliding"):
    """The HVP the solver uses: ``influence_hessian`` over all users, or over ``influence_hessian_users``
    users drawn with ``seed`` (an unbiased estimate of H that makes every HVP that much cheaper). Under
    torch.distributed each rank passes over its share of those users and the products are summed. ``keep``: the
    Gauss-Newton products keep their batches' linearisations within that budget (the same bits, faster).
    ``windows``: the rows ``batches`` were built with (``surrogate_windows``); the drawn users' batches are built
    alike, so the Hessian is of the loss the gradients are (chunked rows, not RecBole's sliding ones)."""
    n_users = sum(len(b) for b in batches)
    subset = args.influence_hessian_users
    if subset == "auto":
        subset = AUTO_HESSIAN_USERS
    if subset is not None and subset < n_users:
        users = np.concatenate([b.user_ids for b in batches])
        chosen = np.random.default_rng(int(args.seed)).choice(users, size=subset, replace=False)
        batches = user_batches(train_dataset, args.influence_batch_rows, user_ids=chosen,
                               sequence=batches[0].targets is not None, windows=windows)
        n_users = subset
    # One HVP per fixed block of user batches, added in block order: the same bits for any number of processes.
    def block_hvp(block: range):
        part = [batches[i] for i in block]
        if args.influence_hessian == "gauss_newton":
            return loss.gauss_newton_hvp(params, part, n_users, keep=keep)
        return make_hvp(loss, params, part, n_users)

    blocks = distributed.fixed_blocks(len(batches), distributed.REDUCTION_BLOCKS)
    hvps = {blocks[b]: block_hvp(blocks[b]) for b in distributed.owned_blocks(len(blocks))}
    return lambda x: distributed.ordered_sum(len(batches), lambda block: hvps[block](x), like=x)


def stochastic_hvp(args: InfluenceArguments, loss: SurrogateLoss, params, sample):
    """LiSSA's stochastic HVP ``(x [m], generator) -> H_B x [m]`` on a batch ``B`` of users drawn by ``sample``, with
    the same Hessian as :func:`hessian_vector_product` (``influence_hessian``), so that the residual LiSSA reports
    (against the full HVP) is of the matrix its steps used."""
    if args.influence_hessian != "gauss_newton":
        return make_stochastic_hvp(loss, params, sample)

    def sampler(x: torch.Tensor, generator=None) -> torch.Tensor:
        batch = sample(generator)
        return loss.gauss_newton_hvp(params, [batch], len(batch))(x)

    return sampler


def auto_damping(args: InfluenceArguments, hvp, m: int, dtype: torch.dtype) -> tuple[float, float]:
    """``influence_damping: auto``: (damping, largest eigenvalue of H), damping = ``influence_damping_ratio`` x
    the largest eigenvalue by ``influence_power_iters`` power-iteration HVPs. Relative to the spectrum: a damping
    fixed in absolute terms is far too small for one surrogate (CG stalls) and far too large for another (the
    scores turn into plain gradient dot products)."""
    top = largest_eigenvalue(hvp, m, iters=args.influence_power_iters, seed=args.seed, dtype=dtype)
    return float(args.influence_damping_ratio) * top, top


def _mean_gradient(loss: SurrogateLoss, params, batches: list[UserBatch], m: int) -> torch.Tensor:
    """``grad (1/n) sum_u L_u`` [m] over the users of ``batches``, in fixed blocks added in block order (the same
    bits for any number of processes)."""
    n_users = sum(len(b) for b in batches)

    def block_mean_gradient(block: range) -> torch.Tensor:
        part = [batches[i] for i in block]
        n_part = sum(len(b) for b in part)
        return flatten(mean_gradient(loss, params, part, n_part)) * (n_part / n_users)

    return distributed.ordered_sum(len(batches), block_mean_gradient, like=torch.zeros(m, dtype=flatten(params).dtype))


IHVP_ARTIFACT = "ihvp.pt"


def ihvp_bytes(solution: Mapping[str, torch.Tensor], train_dataset) -> bytes:
    """The iHVP solution by parameter name and the item tokens its item rows belong to, as the bytes of the
    ``ihvp.pt`` artifact of the influence cache entry (``influence_ihvp_export`` copies it)."""
    from recbole_dealrec.surrogate.train import item_tokens

    buffer = io.BytesIO()
    torch.save({"ihvp": {k: v.detach().cpu() for k, v in solution.items()}, "item_tokens": item_tokens(train_dataset)},
               buffer)
    return buffer.getvalue()


def load_ihvp(path: str, params: Mapping[str, torch.Tensor], train_dataset) -> tuple[torch.Tensor, int]:
    """``influence_ihvp_init`` as a flat start [m] for ``params`` (this run's scored parameters), item rows matched by
    token, new items' rows 0 (:func:`~recbole_dealrec.surrogate.train.carry_item_rows`); and the item rows carried."""
    from recbole_dealrec.surrogate.train import carry_item_rows, item_tokens

    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or set(saved) != {"ihvp", "item_tokens"}:
        raise ConfigError(f"influence_ihvp_init={path}: not a file influence_ihvp_export wrote")
    if set(saved["ihvp"]) != set(params):
        raise ConfigError(f"influence_ihvp_init={path}: its parameters ({sorted(saved['ihvp'])[:3]}...) are not the "
                          f"run's scored ones ({sorted(params)[:3]}...); another influence_params or surrogate")
    start, carried = carry_item_rows(saved["ihvp"], saved["item_tokens"], {k: torch.zeros_like(v) for k, v in params.items()},
                                     item_tokens(train_dataset), f"influence_ihvp_init={path}")
    return flatten({k: start[k] for k in params}), carried


def influence_scores(config: Mapping[str, Any], surrogate: SurrogateRun, show_progress: bool = False) -> ScoredUsers:
    """Influence score of every user with training samples in the surrogate's train data (``config``: a run's config,
    or anything :meth:`InfluenceArguments.from_config` reads)."""
    logger = getLogger()
    args = config if isinstance(config, InfluenceArguments) else InfluenceArguments.from_config(config)
    model = surrogate.model
    loss = SurrogateLoss(model, args.influence_user_loss, surrogate.negatives)
    params = select_parameters(model.named_parameters(), list(args.influence_params))
    windows = surrogate.windows
    sequence = scored_in_sequence_mode(args.influence_sequence_mode, windows, model)
    batches = user_batches(surrogate.train_dataset, args.influence_batch_rows, sequence=sequence, windows=windows)
    n_users = sum(len(b) for b in batches)
    m = sum(p.numel() for p in params.values())
    n_rows = sum(len(b.segment) for b in batches)
    logger.info(set_color("[Influence]", "pink") + f" {n_users} users, {m} scored parameters in {len(params)} tensors, "
                f"{n_rows} model rows per pass ({f'sequence mode, {windows} windows' if sequence else 'prefix mode'})")

    # Under torch.distributed every pass over the users is sharded in fixed blocks of user batches: the blocks'
    # sums are added in block order (v, every HVP) and the per-user scores gathered in batch order, so that the
    # scores are the same bits for any number of processes; the solver's steps then run identically on every rank.
    if args.influence_target == "validation":  # the held-out loss: one validation row per user, its own loss
        if surrogate.valid_dataset is None:
            raise ValueError("influence_target: validation needs the surrogate's validation dataset")
        target_batches = user_batches(surrogate.valid_dataset, args.influence_batch_rows, sequence=False)
    else:
        target_batches = batches
    # each part's seconds and peak are logged and kept in the metadata: where a large dataset's time goes
    timer = StageTimer()
    with timer("influence: mean gradient v"):
        v = _mean_gradient(loss, params, target_batches, m)
    ensure_finite(v, "mean gradient")
    keep = KeptLinearizations(args.influence_hvp_cache_gb) if args.influence_hvp_cache_gb > 0 else None
    hvp = hessian_vector_product(args, loss, params, surrogate.train_dataset, batches, keep, windows)
    solver = str(args.ihvp_solver).lower()
    damping = args.influence_damping
    if damping == "auto":
        with timer("influence: damping (power iteration)"):
            damping, top = auto_damping(args, hvp, m, v.dtype)
        logger.info(set_color("[Influence]", "pink") + f" damping {damping:.3e} = influence_damping_ratio "
                    f"{args.influence_damping_ratio} x largest Hessian eigenvalue {top:.3e} "
                    f"({args.influence_power_iters} power-iteration HVPs)")
    damping = float(damping)
    kwargs: dict[str, Any] = {}
    if solver == "cg":
        kwargs.update(max_iter=args.cg_max_iter, show_progress=show_progress)
        if args.influence_ihvp_init:
            kwargs["x0"], carried = load_ihvp(str(args.influence_ihvp_init), params, surrogate.train_dataset)
            logger.info(set_color("[Influence]", "pink") + f" CG starts from {args.influence_ihvp_init} "
                        f"({carried} item rows carried over by token)")
    elif solver == "lissa":
        scale = float(args.lissa_scale)
        generator = torch.Generator().manual_seed(int(args.seed))
        kwargs.update(scale=scale, depth=args.lissa_depth, repeats=args.lissa_repeats,
                      generator=generator, show_progress=show_progress,
                      hvp_sampler=stochastic_hvp(
                          args, loss, params, _user_sampler(user_batches(surrogate.train_dataset, 1, sequence=sequence, windows=windows),
                                        args.lissa_batch_users)
                      ))
        damping = lissa_damping_for(damping, scale)
    with timer("influence: iHVP solve"):
        result = solve(solver, v, hvp=hvp, damping=damping, tol=args.ihvp_tol, **kwargs)
    del hvp, kwargs  # the kept linearisations go with the HVP, before the scores pass over every user
    ensure_finite(result.x, "ihvp")
    logger.info(set_color("[Influence]", "pink") + f" {solver}: relative residual {result.residual}, "
                f"{result.iterations} iterations, damping {result.effective_damping}")
    if keep is not None and (keep.kept_batches or keep.recomputed_batches):
        logger.info(set_color("[Influence]", "pink") + f" the HVPs kept {keep.kept_batches} Hessian batches' "
                    f"linearisations ({keep.kept_bytes / 2**30:.2f} GB of influence_hvp_cache_gb "
                    f"{args.influence_hvp_cache_gb}); {keep.recomputed_batches} recomputed at every product"
                    + (" (the surrogate's traced tangent map gave other bits than eager forward mode)" if keep.other_bits else ""))

    direction = unflatten(result.x, params)
    with timer("influence: scores <grad L_u, H^-1 v>"):
        scores = distributed.map_blocks(batches, lambda part: directional_derivatives(loss, params, direction, part).double(),
                                        block_size=1).cpu().numpy()  # one batch a block: the batches are the fixed units
    n_local = len(distributed.owned_blocks(len(batches)))
    user_ids = np.concatenate([b.user_ids for b in batches])
    if distributed.active():
        logger.info(set_color("[Influence]", "pink") + f" rank {distributed.rank()} scored {n_local} of {len(batches)} user batches")
    tokens = surrogate.train_dataset.id2token(surrogate.train_dataset.uid_field, user_ids)
    meta = {"target": args.influence_target, "solver": solver, "residual": result.residual, "iterations": result.iterations,
            "effective_damping": result.effective_damping, "damping": damping, "converged": result.converged,
            "scored_parameters": m, "parameter_names": list(params), "n_users": n_users,
            "warm_start": bool(args.influence_ihvp_init), "part_seconds": dict(timer.seconds),
            "hvp_kept": None if keep is None else {"batches": keep.kept_batches, "recomputed": keep.recomputed_batches,
                                                   "gb": round(keep.kept_bytes / 2**30, 3), "other_bits": keep.other_bits},
            "mode": ("sequence" if windows == "sliding" else f"sequence ({windows})") if sequence else "prefix", "world_size": distributed.world_size()}
    artifacts = {IHVP_ARTIFACT: ihvp_bytes(direction, surrogate.train_dataset)} if distributed.is_main() else {}
    return ScoredUsers(np.asarray(tokens).astype(str), scores, meta, artifacts)


@SIGNALS.register("influence")
class Influence(Signal):
    name = "influence"
    description = "DEALRec Eq. 11: <grad L_u, H^-1 mean gradient> on the trained surrogate"
    depends_on = ("seed",)
    sharded = True
    uses_surrogate = True
    #: the iHVP solution, kept with the scores: a run that reuses them exports the bytes the computing run had
    artifacts = (IHVP_ARTIFACT,)

    def check_config(self, config) -> None:
        check_influence_config(config)

    def export(self, ctx: SignalContext, result: ScoredUsers) -> None:
        """``influence_ihvp_export``: a copy of the entry's iHVP solution (atomic; rank 0)."""
        target = ctx.config["influence_ihvp_export"]
        if target and distributed.is_main():
            with open(result.meta["artifacts"][IHVP_ARTIFACT], "rb") as source, atomic_write(str(target), "wb") as handle:
                shutil.copyfileobj(source, handle)

    def cache_payload(self, ctx: SignalContext) -> dict[str, Any]:
        """The keys' payload, but a warm start counts by its file's content (where it lies does not change the
        scores) and only when set, and the export not at all (the old keys stay valid)."""
        from recbole_dealrec.utils import file_checksum

        payload = super().cache_payload(ctx)
        init = payload.pop("influence_ihvp_init")
        for key in UNKEYED:
            payload.pop(key)
        if init:
            payload["ihvp_init"] = file_checksum(str(init))
        return payload

    def check_data(self, ctx: SignalContext) -> None:
        """``influence_params`` must match some parameter of the (untrained) surrogate, before it trains."""
        scfg = surrogate_config(ctx.config)
        model = get_model(scfg["model"])(scfg, ctx.train_dataset)
        try:
            select_parameters(model.named_parameters(), list(ctx.config["influence_params"]))
        except ValueError as error:
            raise ConfigError(f"influence_params={list(ctx.config['influence_params'])!r}: {error}") from None

    def compute(self, ctx: SignalContext) -> ScoredUsers:
        return influence_scores(ctx.config, ctx.surrogate(), show_progress=bool(ctx.config["show_progress"]))


#: What the selection report shows of a recorded retraining check (``python -m recbole_dealrec.diagnose influence``).
CHECK_SUMMARY_KEYS = ("target", "user_loss", "retrain", "group_size", "agreement", "agreement_random_groups",
                      "top_vs_bottom", "noise_sd", "spearman_score_history_length")


def influence_check_path(config) -> str:
    """The cache entry recording the retraining check of this config's surrogate and influence keys."""
    arguments = {k: v for k, v in dataclasses.asdict(InfluenceArguments.from_config(config)).items()
                 if k != "influence_hvp_cache_gb"}  # speed only (the export stays: the keys of recorded checks)
    key = stable_key({"surrogate": surrogate_key(config), "influence": arguments})
    return os.path.join(cache_dir(config), f"influence-check-{key}.json")


def record_influence_check(config, report: Mapping[str, Any], out: Optional[str] = None) -> str:
    """Keep the check's summary under :func:`influence_check_path`, for the selection reports of later runs."""
    path = influence_check_path(config)
    summary = {k: report[k] for k in CHECK_SUMMARY_KEYS if k in report}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path, checksum=True, encoding="utf-8") as handle:
        json.dump({**summary, "report_folder": out}, handle, indent=2)
    return path


def recorded_influence_check(config) -> Optional[dict[str, Any]]:
    """The recorded check of this config's surrogate and influence keys (:func:`record_influence_check`), or
    ``None`` when none was run."""
    path = influence_check_path(config)
    if not cache_entry_ok(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)

