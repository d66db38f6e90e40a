"""GraNd and EL2N (Paul et al., NeurIPS'21): difficulty of each user early in the surrogate's training.

The unit is the user, as for influence: L_u = the surrogate's per-user loss (``SurrogateLoss``: the sum over
the user's training prefixes of the cross-entropy of the next item: full softmax, or the surrogate's sampled one),
in eval mode.

- GraNd(u) = E_runs || grad_theta L_u(theta_t) ||_2 over the parameters matched by ``grand_params``
  (default all, as the original; DeepCore used the last layer only).
- EL2N(u)  = E_runs sqrt( sum_prefixes || softmax(f(x)) - onehot(y) ||_2^2 ), the L2 norm of the error of
  all the user's next-item predictions (one class per item, or per candidate with the sampled softmax).

theta_t = the surrogate after ``grand_epoch`` / ``el2n_epoch`` epochs (0 = the seeded initialisation, the
original GraNd). Run 0 is the main surrogate training (its weights are saved by a hook as it passes that
epoch); runs 1 .. ``*_seeds``-1 retrain that many epochs with seed ``seed + run`` (the original averages 10).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from recbole.data.interaction import Interaction
from tqdm import tqdm

from recbole_dealrec import distributed
from recbole_dealrec.errors import ConfigError, check_integer
from recbole_dealrec.scoring.cache import ScoredUsers
from recbole_dealrec.gradients.params import select_parameters
from recbole_dealrec.scoring.signals import SIGNALS, Signal, SignalContext
from recbole_dealrec.data.user_rows import rows_by_user
from recbole_dealrec.gradients.per_sample import per_sample_squared_grad_norms, squared_norm
from recbole_dealrec.surrogate import SurrogateLoss, user_batches


#: per-user gradients held at once by :func:`per_user_gradient_norms` (x 4 bytes): bounds its memory.
GRADIENT_FLOATS_PER_CALL = 50_000_000


def _rows_by_user(train_dataset, user_ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(users [U] as given, row indices of each user)``; every user must have training rows."""
    grouped = rows_by_user(train_dataset)
    users = grouped.users
    position = np.searchsorted(users, user_ids)
    if np.any(position >= len(users)) or np.any(users[np.minimum(position, len(users) - 1)] != user_ids):
        raise ValueError("GraNd/EL2N asked for users without training rows")
    return user_ids, [grouped.rows_of(p) for p in position]


#: The surrogate's item table, by its parameter name: the one parameter whose per-user gradient is sparse.
ITEM_TABLE = "item_embedding.weight"


def local_item_rows(item_seq: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each user's item rows touched by its sampled loss, and its indices re-pointed into them.

    ``item_seq`` long ``[users, rows, L]`` (the inputs) and ``items`` long ``[users, rows, 1 + negatives]`` (target and
    negatives) of users with the same row count. Returns ``(rows [users, K], local_seq, local_items)``: the sorted
    distinct item ids each user touches, row 0 (padding) always first, right-padded with 0 to the chunk's largest K
    (padding slots are never pointed at, so their gradient is 0), and the inputs as positions in that list. A
    user's loss computed on ``table[rows[u]]`` with the local indices equals its loss on the whole table, and the
    gradient of that local table holds exactly the non-zero rows of the dense gradient, each once.
    """
    users = item_seq.shape[0]
    flat = torch.cat([torch.zeros(users, 1, dtype=item_seq.dtype), item_seq.reshape(users, -1),
                      items.reshape(users, -1)], dim=1)
    ordered = flat.sort(dim=1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = first.cumsum(1) - 1  # each sorted entry's slot among its user's distinct ids
    sentinel = int(ordered.max()) + 1  # fills the slots past a user's K, keeping each row sorted for searchsorted
    distinct = torch.full((users, int(first.sum(1).max())), sentinel, dtype=flat.dtype)
    distinct.scatter_(1, slot, ordered)  # equal ids write the same slot with the same value
    local = torch.searchsorted(distinct, flat[:, 1:])
    rows = distinct.masked_fill(distinct == sentinel, 0)
    split = item_seq[0].numel()
    return rows, local[:, :split].reshape(item_seq.shape), local[:, split:].reshape(items.shape)


def per_user_gradient_norms(
    loss: SurrogateLoss, params: dict[str, torch.Tensor], train_dataset, user_ids: np.ndarray, max_rows: int,
    show_progress: bool = False, sparse_item_rows: bool = True,
) -> torch.Tensor:
    """``|| grad_params L_u ||_2`` for every user in ``user_ids`` (int64 [U]): float64 ``[U]``, in that order.

    Exact per-user gradients without a per-user backward: users with the same number of training rows are
    stacked (no padding) and one ``vmap(grad)`` gives all their gradients (a user alone with its row count gets
    one plain backward over its rows); about ``max_rows`` rows per call, and at most
    ``GRADIENT_FLOATS_PER_CALL`` gradient entries held at once. The full softmax touches every row of the item
    table, so that gradient is dense; with sampled negatives a user touches only its inputs, targets and
    negatives, and ``sparse_item_rows`` (the default) differentiates a per-user table of those rows
    (:func:`local_item_rows`) instead of the whole table: the same norms, from K x hidden gradient entries per user
    instead of n_items x hidden, for the users whose rows can touch at most half of the table (for the others the
    dense path is the cheaper). ``sparse_item_rows=False`` is the dense path always (benchmarks).
    """
    _, rows = _rows_by_user(train_dataset, np.asarray(user_ids, dtype=np.int64))
    fields = (loss.model.ITEM_SEQ, loss.model.ITEM_SEQ_LEN, loss.target_field, loss.model.USER_ID)
    inter = train_dataset.inter_feat
    sparse = sparse_item_rows and loss.negatives is not None and ITEM_TABLE in params
    fixed = {k: v.detach() for k, v in params.items()}
    shared = {k: v for k, v in fixed.items() if k != ITEM_TABLE}  # the local path's parameters besides the table

    def user_loss(p, user_fields):
        # user_fields: the rows' fields, then (sampled softmax) their candidates and hits
        row_fields, candidates = user_fields[:len(fields)], user_fields[len(fields):] or None
        return loss.row_losses(p, Interaction(dict(zip(fields, row_fields))), candidates).sum()

    def local_loss(p, table, user_fields):
        # the same loss on the user's own rows of the item table (indices already re-pointed into them)
        return user_loss({**p, ITEM_TABLE: table}, user_fields)

    def with_candidates(user_fields):
        # sampled negatives: drawn here, outside vmap (a user's rows are its prefix samples in order)
        if loss.negatives is None:
            return user_fields
        flat = Interaction({f: v.reshape(-1, *v.shape[2:]) for f, v in zip(fields, user_fields)})
        n_users, count = user_fields[0].shape[:2]
        candidates = loss.row_candidates(flat, np.tile(np.arange(count), n_users))
        return (*user_fields, *(c.reshape(n_users, count, -1) for c in candidates))

    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}

    def single(user_fields):
        # One user alone (a row count nobody else has): a plain backward, already batched over its rows, is
        # cheaper than vmap's per-sample machinery; the same gradient.
        grads = torch.autograd.grad(user_loss(leaves, user_fields), list(leaves.values()))
        return squared_norm(dict(zip(leaves, grads)))

    def local_norms(user_fields, table_rows, seq, items):
        # [users] squared norms from each user's local item table (vmapped with its re-pointed indices)
        user_fields = (seq, *user_fields[1:len(fields)], items, *user_fields[len(fields) + 1:])
        tables = fixed[ITEM_TABLE][table_rows]  # [users, K, hidden]

        def norm_sq(p, table, one_user):
            grads = torch.func.grad(local_loss, argnums=(0, 1))(p, table, one_user)
            return squared_norm(grads[0]) + squared_norm({ITEM_TABLE: grads[1]})

        return torch.func.vmap(norm_sq, in_dims=(None, 0, 0))(shared, tables, user_fields)

    counts = np.array([len(r) for r in rows])
    n_params = sum(p.numel() for p in params.values())
    if sparse:
        n_items, hidden = fixed[ITEM_TABLE].shape
        touched_at_most = 1 + inter[:0][fields[0]].shape[1] + 1 + loss.negatives.count  # distinct ids per row, 0 included
    out = torch.zeros(len(rows), dtype=torch.float64)
    chunks = []
    for count in np.unique(counts):
        members = np.flatnonzero(counts == count)
        # the local table only where it is at most half the whole one even if every id the rows hold is distinct
        local = sparse and 2 * int(count) * touched_at_most <= n_items
        per_user = n_params - n_items * hidden + int(count) * touched_at_most * hidden if local else n_params
        step = max(1, min(max_rows // int(count), GRADIENT_FLOATS_PER_CALL // per_user))
        chunks += [(members[i:i + step], local) for i in range(0, len(members), step)]
    for members, local in tqdm(chunks, desc="per-user gradient norms", disable=not show_progress):
        index = torch.from_numpy(np.stack([rows[m] for m in members]))  # [users, rows each]
        taken = inter[index.reshape(-1)]  # the rows first: a train table's lists are cut for the rows taken
        user_fields = with_candidates(tuple(taken[f].reshape(index.shape + taken[f].shape[1:]) for f in fields))
        if local:
            table_rows = local_item_rows(user_fields[0], user_fields[len(fields)])
            out[torch.from_numpy(members)] = local_norms(user_fields, *table_rows).detach()
        elif len(members) == 1:
            out[int(members[0])] = single(tuple(f[0] for f in user_fields)).detach()
        else:
            out[torch.from_numpy(members)] = per_sample_squared_grad_norms(user_loss, fixed, user_fields).detach()
    return out.sqrt()


def per_user_gradient_norms_loop(
    loss: SurrogateLoss, params: dict[str, torch.Tensor], train_dataset, user_ids: np.ndarray
) -> torch.Tensor:
    """Reference for :func:`per_user_gradient_norms`: one backward per user (tests and benchmarks only)."""
    out = []
    for batch in user_batches(train_dataset, 1, user_ids=np.asarray(user_ids)):
        leaf = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        grads = torch.autograd.grad(loss(leaf, batch).sum(), list(leaf.values()))
        out.append(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    order = {u: i for i, u in enumerate(np.sort(np.asarray(user_ids)).tolist())}
    return torch.stack(out)[[order[int(u)] for u in user_ids]]


@torch.no_grad()
def per_user_el2n(loss: SurrogateLoss, train_dataset, user_ids: np.ndarray, max_rows: int) -> torch.Tensor:
    """``sqrt(sum_prefixes ||softmax(logits) - onehot(target)||^2)`` per user: float64 ``[U]``, in ``user_ids`` order.

    Per prefix, ``||p - e_y||^2 = sum_j p_j^2 - 2 p_y + 1``: no one-hot matrix is built.
    """
    params = {k: v.detach() for k, v in loss.model.named_parameters()}
    order = {u: i for i, u in enumerate(np.sort(np.asarray(user_ids)).tolist())}
    values = torch.zeros(len(order), dtype=torch.float64)
    for batch in user_batches(train_dataset, max_rows, user_ids=np.asarray(user_ids)):
        prob = torch.softmax(loss.target_logits(params, batch), dim=-1)
        target = loss.target_items(batch)
        err = ((prob ** 2).sum(-1) - 2 * prob.gather(1, target[:, None]).squeeze(1) + 1).double()
        per_user = torch.zeros(len(batch), dtype=torch.float64).index_add(0, batch.segment, err)
        values[[order[int(u)] for u in batch.user_ids]] = per_user
    return values.clamp(min=0).sqrt()[[order[int(u)] for u in user_ids]]


def _check_epoch_and_seeds(config: Mapping, prefix: str) -> None:
    epoch, seeds = config[f"{prefix}_epoch"], config[f"{prefix}_seeds"]
    check_integer(f"{prefix}_epoch", epoch, 0, "0 = at initialisation")
    check_integer(f"{prefix}_seeds", seeds, 1, "runs averaged; the original: 10")


USER_BLOCK = 512  # users per block of a sharded pass (see distributed.map_blocks)


#: GraNd and EL2N score a user's data the way data_diet scores examples: the user's loss is the SUM of its prefix
#: losses (every training example counted once, as the surrogate was trained), not influence's per-user
#: ``influence_user_loss`` weighting.
USER_LOSS = "sum"


class _EarlyTrainingSignal(Signal):
    prefix: str
    uses_surrogate = True
    depends_on = ("influence_batch_rows",)  # rows per batch of the surrogate passes (properties/signal/influence.yaml)
    sharded = True  # each rank scores a contiguous share of the users (the snapshots are trained data-parallel)

    def check_config(self, config) -> None:
        _check_epoch_and_seeds(config, self.prefix)
        check_integer("influence_batch_rows", config["influence_batch_rows"], 1, f"rows per batch of {self.name}'s passes")

    def snapshot_epochs(self, config) -> tuple[int, ...]:
        return (int(config[f"{self.prefix}_epoch"]),)

    def score_run(self, ctx: SignalContext, surrogate, user_ids: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, ctx: SignalContext) -> ScoredUsers:
        config = ctx.config
        epoch, runs = int(config[f"{self.prefix}_epoch"]), int(config[f"{self.prefix}_seeds"])
        total = None
        for run in range(runs):
            surrogate = ctx.snapshot(run, epoch)
            # fixed blocks of users (each its own batches): the same scores for any number of processes
            scores = distributed.map_blocks(ctx.surrogate_ids(surrogate), lambda block: self.score_run(ctx, surrogate, block),
                                            block_size=USER_BLOCK,
                                            progress=f"{self.name} run {run}" if config["show_progress"] else None)
            total = scores if total is None else total + scores
        meta = {"epoch": epoch, "runs": runs, "n_users": int(len(ctx.candidates)),
                "world_size": distributed.world_size()}
        return ScoredUsers(ctx.candidate_tokens, (total / runs).numpy(), meta)


@SIGNALS.register("grand")
class GraNd(_EarlyTrainingSignal):
    name = "grand"
    prefix = "grand"
    description = "GraNd: per-user loss gradient norm of the surrogate early in training, averaged over seeds"

    def check_config(self, config) -> None:
        super().check_config(config)
        patterns = config["grand_params"]
        if not isinstance(patterns, (list, tuple)) or not patterns or not all(isinstance(p, str) for p in patterns):
            raise ConfigError(f"grand_params must be a non-empty list of regex patterns, got {patterns!r}")

    def score_run(self, ctx, surrogate, user_ids) -> torch.Tensor:
        loss = SurrogateLoss(surrogate.model, USER_LOSS, surrogate.negatives)
        params = select_parameters(surrogate.model.named_parameters(), list(ctx.config["grand_params"]))
        return per_user_gradient_norms(loss, params, surrogate.train_dataset, user_ids,
                                       int(ctx.config["influence_batch_rows"]))


@SIGNALS.register("el2n")
class EL2N(_EarlyTrainingSignal):
    name = "el2n"
    prefix = "el2n"
    description = "EL2N: L2 norm of softmax - one-hot of the surrogate's next-item predictions early in training"

    def score_run(self, ctx, surrogate, user_ids) -> torch.Tensor:
        return per_user_el2n(SurrogateLoss(surrogate.model, USER_LOSS, surrogate.negatives), surrogate.train_dataset, user_ids,
                             int(ctx.config["influence_batch_rows"]))
