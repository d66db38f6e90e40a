"""The surrogate's per-user loss as a ``[batch]`` vector, a pure function of the scored parameters.

Per-sample loss of one user = MEAN (``user_loss="mean"``, the paper's code: its per-user gradient is taken at
batch size 1, the mean over the user's positions) or SUM (``"sum"``) over the user's training prefixes
(RecBole's augmented rows) of the cross-entropy of the model's next-item logits (``full_sort_predict``, all
items) against the prefix's target. For SASRec / GRU4Rec with ``loss_type: CE`` this is exactly the training loss RecBole sums over
those rows. BERT4Rec trains on random cloze masks; its scoring loss is the deterministic next-item loss
of its own prediction head (mask appended after the history). The Hessian and the mean gradient are of
R = (1/n_users) * sum_u L_u, the empirical risk over users, the paper's samples. With the sum, a user's
loss (and so its score) grows with its history length; the mean compares users on equal terms.
Eval mode throughout: no dropout, so every call sees the same function. With ``surrogate_loss: sampled``
(:class:`SampledNegatives`) the softmax of every target runs over the target and ``surrogate_negatives`` items that
are a fixed, seeded hash of (user, the target's index among the user's prefix samples): the same negatives in
every batch, every pass and every process, so the per-user loss, its gradients and the scores stay deterministic.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from recbole_dealrec.data.user_rows import rows_by_user
from recbole_dealrec.errors import ConfigError, check_choice, check_integer
from recbole_dealrec.utils import resident_bytes as _resident_bytes

#: Allowed values of ``influence_user_loss``: how a user's prefix losses make its loss.
USER_LOSSES = ("mean", "sum")
#: Allowed values of ``surrogate_loss``: the softmax of the surrogate's next-item loss (``auto``: sampled from
#: ``surrogate_sampled_min_items`` items on, where the surrogate supports it; full otherwise).
SURROGATE_LOSSES = ("auto", "full", "sampled")

def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): a bijective, well-mixed hash."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@dataclasses.dataclass(frozen=True)
class SampledNegatives:
    """The sampled softmax of ``surrogate_loss: sampled``: every target's softmax runs over the target and
    ``count`` items drawn uniformly from ids ``1 .. n_items - 1`` (0 is RecBole's padding) by a hash of
    (``seed``, ``salt``, the user's internal id, the target's index among the user's prefix samples, the draw).

    A pure function of the sample: the negatives do not depend on the batch, the pass or the process, so the
    per-sample loss is one deterministic function (what influence functions need). ``salt`` 0 is the scoring
    loss; training draws epoch ``e`` with salt ``e + 1`` (fresh negatives every epoch, reproducible from the
    seed). A negative equal to the target (an accidental hit) is masked out of the softmax. Its cost per target
    is ``count + 1`` dot products instead of ``n_items``."""

    n_items: int
    count: int
    seed: int

    def draw(self, user_ids, sample_index, salt: int = 0) -> np.ndarray:
        """Negatives of each target: int64 ``[targets, count]`` from ``user_ids`` and ``sample_index`` (integer
        ``[targets]`` each, arrays or CPU tensors). Numpy throughout: no torch op runs, so a call inside a
        ``torch.func`` transform sees plain arrays."""
        user_ids, sample_index = np.asarray(user_ids, dtype=np.uint64), np.asarray(sample_index, dtype=np.uint64)
        base = _splitmix64(np.array([(int(self.seed) * 1_000_003 + int(salt)) % 2 ** 64], dtype=np.uint64))
        with np.errstate(over="ignore"):
            per_sample = _splitmix64(_splitmix64(((user_ids << np.uint64(32)) ^ sample_index) ^ base))
            draws = _splitmix64(per_sample[:, None] + np.arange(1, self.count + 1, dtype=np.uint64)[None, :]
                                * np.uint64(0xD1B54A32D192ED03))
        return (draws % np.uint64(self.n_items - 1) + np.uint64(1)).astype(np.int64)

    def candidates(self, targets, user_ids, sample_index, salt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(items, hits)``: long ``[targets, 1 + count]``, the target first, then its negatives; bool
        ``[targets, 1 + count]``, True where a negative is the target itself (masked out of the softmax)."""
        targets = np.asarray(targets, dtype=np.int64)
        items = np.concatenate([targets[:, None], self.draw(user_ids, sample_index, salt)], axis=1)
        hits = items == targets[:, None]
        hits[:, 0] = False
        return torch.from_numpy(items), torch.from_numpy(hits)


def candidate_logits(hidden: torch.Tensor, weight: torch.Tensor, items: torch.Tensor, hits: torch.Tensor) -> torch.Tensor:
    """Logits of each target's candidates (:meth:`SampledNegatives.candidates`): ``hidden`` ``[targets, d]``,
    ``weight`` ``[n_items, d]``, ``items`` / ``hits`` ``[targets, C]``; ``[targets, C]``, accidental hits at -inf.
    The label of every row is 0 (the target comes first)."""
    logits = torch.einsum("td,tcd->tc", hidden, gather_rows(weight, items))
    return logits.masked_fill(hits, float("-inf"))


def gather_rows(weight: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """``weight[items]``: the rows of ``weight`` ``[n_items, d]`` at ``items`` (long, any shape), ``[*items.shape, d]``.
    By ``F.embedding``, whose kernels give the same bits as advanced indexing forward, backward and in forward mode,
    ~1.7x faster on the sampled softmax's ``[targets, 101]`` candidates (aten::index was half of a scores pass)."""
    return F.embedding(items, weight)


def sample_index_of(segment) -> np.ndarray:
    """Index of each target among its user's targets, in order: ``segment`` integer ``[targets]`` (a user's targets
    in the order of its prefix samples, contiguous or not) -> int64 ``[targets]``."""
    segment = np.asarray(segment, dtype=np.int64)
    order = np.argsort(segment, kind="stable")
    counts = np.bincount(segment)
    first = np.cumsum(counts) - counts
    index = np.empty(len(segment), dtype=np.int64)
    index[order] = np.arange(len(segment)) - first[segment[order]]
    return index


def check_surrogate_loss(config) -> str:
    """``surrogate_loss`` (``None`` = full), ``surrogate_negatives`` and ``surrogate_sampled_min_items``, or a
    ConfigError naming the allowed values."""
    value = check_choice("surrogate_loss", config["surrogate_loss"], SURROGATE_LOSSES, "full")
    if value != "full":
        check_integer("surrogate_negatives", config["surrogate_negatives"], 1, "negatives per target of the sampled softmax")
        check_integer("surrogate_sampled_min_items", config["surrogate_sampled_min_items"], 1,
                      "the item count from which surrogate_loss: auto samples")
    return value


def sampled_negatives(scfg, model: torch.nn.Module) -> Optional[SampledNegatives]:
    """The surrogate's :class:`SampledNegatives` (``scfg``: its RecBole config), or None for the full softmax.
    ``sampled`` needs a causal CE surrogate in sequence mode (SASRec): the loss it trains on is then the loss
    the signals score. ``auto`` samples for such a surrogate on ``surrogate_sampled_min_items`` items or more."""
    value = check_surrogate_loss(scfg)
    causal = supports_sequence_mode(model)
    if value == "auto":
        fits = causal and scfg["surrogate_sequence_mode"] and scfg["loss_type"] in (None, "CE")
        value = "sampled" if fits and model.n_items - 1 >= int(scfg["surrogate_sampled_min_items"]) else "full"
    if value != "sampled":
        return None
    check_sampled_surrogate(causal, scfg["model"], scfg["surrogate_sequence_mode"], scfg["loss_type"])
    return SampledNegatives(int(model.n_items), int(scfg["surrogate_negatives"]), int(scfg["seed"]))


def check_sampled_surrogate(causal: bool, model_name: str, sequence_mode, loss_type) -> None:
    """``surrogate_loss: sampled`` trains in sequence mode only (a causal surrogate, SASRec, with CE), so that the
    loss it trains on is the loss the signals score: a ConfigError otherwise (``loss_type`` None = CE)."""
    if not causal or not sequence_mode or loss_type not in (None, "CE"):
        raise ConfigError("surrogate_loss: sampled needs surrogate_sequence_mode: True and a SASRec surrogate with "
                          f"loss_type CE (got {model_name}, surrogate_sequence_mode {sequence_mode}, loss_type "
                          f"{loss_type}); use surrogate_loss: full otherwise")


@dataclasses.dataclass
class UserBatch:
    """The training rows of a few users. ``segment[r]`` = position of row r's user in ``user_ids``.

    Prefix mode (``targets`` None): every row is one prefix sample, its target the row's next item.
    Sequence mode: a row may carry several targets, one per position of its history (a causal model's output
    at position ``p`` sees exactly the history of the prefix sample ending there); ``target_rows``,
    ``positions`` and ``targets`` (long [targets] each) list them.
    """

    interaction: object  # recbole Interaction with the model's input fields and the target
    segment: torch.Tensor  # long [rows]
    user_ids: np.ndarray  # int64 [users], internal RecBole ids of the surrogate's dataset
    target_rows: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None
    targets: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.user_ids)

    def select(self, rows: torch.Tensor, user_ids: np.ndarray, segment: torch.Tensor) -> "UserBatch":
        """The batch of ``rows`` (ascending), re-labelled with ``segment`` / ``user_ids``, with their targets."""
        if self.targets is None:
            return UserBatch(self.interaction[rows], segment, user_ids)
        new_row = torch.full((len(self.segment),), -1, dtype=torch.long)
        new_row[rows] = torch.arange(len(rows))
        keep = new_row[self.target_rows] >= 0
        return UserBatch(self.interaction[rows], segment, user_ids, new_row[self.target_rows[keep]],
                         self.positions[keep], self.targets[keep])

    def split(self) -> list["UserBatch"]:
        """One batch per user (the per-sample reference loop of the tests and benchmarks)."""
        out = []
        for index in range(len(self.user_ids)):
            rows = torch.nonzero(self.segment == index, as_tuple=True)[0]
            out.append(self.select(rows, self.user_ids[index:index + 1], torch.zeros(len(rows), dtype=torch.long)))
        return out


def concat_user_batches(parts: Sequence[UserBatch]) -> UserBatch:
    """One batch of the users of ``parts`` (in order; a user drawn twice counts twice)."""
    from recbole.data.interaction import cat_interactions

    offsets = np.cumsum([0] + [len(p.segment) for p in parts])
    segment = torch.cat([p.segment + sum(len(q) for q in parts[:i]) for i, p in enumerate(parts)])
    batch = UserBatch(cat_interactions([p.interaction for p in parts]), segment,
                      np.concatenate([p.user_ids for p in parts]))
    if parts and parts[0].targets is not None:
        batch.target_rows = torch.cat([p.target_rows + int(o) for p, o in zip(parts, offsets)])
        batch.positions = torch.cat([p.positions for p in parts])
        batch.targets = torch.cat([p.targets for p in parts])
    return batch


def supports_sequence_mode(model: torch.nn.Module) -> bool:
    """Causal self-attention surrogates whose per-position outputs equal the prefix samples' (SASRec)."""
    from recbole.model.sequential_recommender.sasrec import SASRec

    return isinstance(model, SASRec)


#: Allowed values of ``surrogate_windows``: which model rows carry a user's prefix samples in sequence mode.
WINDOWS = ("sliding", "chunked")


def check_windows(value) -> str:
    """``surrogate_windows`` (``None`` = sliding), or a ConfigError naming the allowed values."""
    return check_choice("surrogate_windows", value, WINDOWS, "sliding")


def _sequence_rows(lengths: np.ndarray, max_len: int, windows: str = "sliding") -> tuple[list[int], list[int], list[int]]:
    """For one user's prefix rows (history lengths, in order): ``(kept rows, number of targets per kept row, position
    of each kept row's first target)``; a row's targets sit at consecutive positions from there.

    Rows 1..min(c, L) (history lengths 1, 2, ...) are all read off the row of length min(c, L). Beyond the window:
    ``sliding`` keeps every row (its history the last L items, RecBole's prefix sample exactly) with its one target
    at the last position; ``chunked`` keeps only the rows ending each further block of L samples (history = the
    block), a target at every position, and the user's last row for the rest (its new positions only): every prefix
    sample once, its context back to its block's start instead of L items, ~L times fewer rows for long users.
    Anything else (an unexpected length pattern) keeps every row with one target: always the prefix samples' loss.
    """
    c = len(lengths)
    first = min(c, max_len)
    if not np.array_equal(lengths[:first], np.arange(1, first + 1)):
        return list(range(c)), [1] * c, [int(n) - 1 for n in lengths]
    if windows == "sliding" or c == first:
        return [first - 1, *range(first, c)], [first] + [1] * (c - first), [0] + [max_len - 1] * (c - first)
    rows, counts, starts = [first - 1], [first], [0]
    end = first - 1  # the last prefix sample covered so far
    while end < c - 1:
        row = min(end + max_len, c - 1)  # a full block of L new samples, or the user's last row
        new = row - end
        rows.append(row)
        counts.append(new)
        starts.append(max_len - new)
        end = row
    return rows, counts, starts


def user_batches(train_dataset, max_rows: int, user_ids: Sequence[int] | None = None,
                 sequence: bool = False, windows: str = "sliding") -> list[UserBatch]:
    """Group the training rows by user into batches of whole users, about ``max_rows`` prefix samples each.

    Users come in ascending id order (all users with training rows, or ``user_ids``). With ``sequence``, each
    user's first ``MAX_ITEM_LIST_LENGTH`` prefix samples become one row with one target per position (see
    :class:`UserBatch`); the loss is the same, the model runs once per user instead of once per prefix.
    ``windows`` (sequence mode): the rows beyond the window, :func:`_sequence_rows`.
    """
    windows = check_windows(windows)
    inter = train_dataset.inter_feat
    grouped = rows_by_user(train_dataset)
    order, users, starts, counts = grouped.order, grouped.users, grouped.starts, grouped.counts
    if user_ids is not None:
        wanted = np.isin(users, np.asarray(user_ids))
        users, starts, counts = users[wanted], starts[wanted], counts[wanted]
    if sequence:
        length_field = train_dataset.item_list_length_field
        seq_field = train_dataset.item_id_list_field
        lengths_all = inter[length_field].numpy()
        max_len = inter[:0][seq_field].shape[1]  # no rows taken: a train table's lists are cut for the rows taken
        target_field = train_dataset.iid_field
    batches, begin = [], 0
    while begin < len(users):
        end, rows = begin, 0
        while end < len(users) and (end == begin or rows + counts[end] <= max_rows):
            rows += counts[end]
            end += 1
        if not sequence:
            row_index = np.concatenate([order[s:s + c] for s, c in zip(starts[begin:end], counts[begin:end])])
            segment = np.repeat(np.arange(end - begin), counts[begin:end])
            batches.append(UserBatch(inter[torch.from_numpy(row_index)], torch.from_numpy(segment), users[begin:end]))
        else:
            kept, segment, n_targets, first_position = [], [], [], []
            for k, (s, c) in enumerate(zip(starts[begin:end], counts[begin:end])):
                rows_of_user = order[s:s + c]
                keep, per_row, start = _sequence_rows(lengths_all[rows_of_user], max_len, windows)
                kept.extend(rows_of_user[keep].tolist())
                segment.extend([k] * len(keep))
                n_targets.extend(per_row)
                first_position.extend(start)
            part = inter[torch.tensor(kept, dtype=torch.long)]
            n_targets = torch.tensor(n_targets, dtype=torch.long)
            target_rows = torch.repeat_interleave(torch.arange(len(kept)), n_targets)
            # each row's targets at consecutive positions from its first (0 for a window, the last for a single)
            first_target = torch.cumsum(n_targets, 0) - n_targets
            offset = torch.arange(len(target_rows)) - first_target[target_rows]
            length = part[length_field]
            positions = torch.tensor(first_position, dtype=torch.long)[target_rows] + offset
            seq = part[seq_field]
            next_in_row = seq[target_rows, (positions + 1).clamp_max(seq.shape[1] - 1)]
            targets = torch.where(positions == length[target_rows] - 1, part[target_field][target_rows], next_in_row)
            batches.append(UserBatch(part, torch.tensor(segment, dtype=torch.long), users[begin:end],
                                     target_rows, positions, targets))
        begin = end
    return batches


class _Predict(torch.nn.Module):
    # functional_call runs a module's forward(); this one forwards to the model's full_sort_predict.
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, interaction) -> torch.Tensor:
        return self.model.full_sort_predict(interaction)


#: Field of a sequence-mode training row holding the next-item target at every position (0 = no target).
TARGET_SEQ_FIELD = "target_seq"
#: Field of a sequence-mode training row: each position's target's index among its user's prefix samples (the
#: sample's identity for :class:`SampledNegatives`).
TARGET_INDEX_FIELD = "target_index"
#: Field of a sequence-mode training row: how many prefix samples (targets) its user has in all.
USER_TARGETS_FIELD = "user_targets"
#: Allowed values of ``surrogate_user_weighting``: how the surrogate's training loss weights a target.
USER_WEIGHTINGS = ("prefix", "user")


def check_user_weighting(value) -> str:
    """``surrogate_user_weighting`` (``None`` = ``prefix``), or a ConfigError naming the allowed values."""
    return check_choice("surrogate_user_weighting", value, USER_WEIGHTINGS, "prefix")


def sequence_train_dataset(train_dataset, windows: str = "sliding"):
    """The surrogate's training rows in sequence mode: a copy of ``train_dataset`` with one row per user window
    (plus the rows beyond it that ``windows`` keeps, as :func:`user_batches`) and a ``target_seq`` field [rows, L]
    holding each position's target, so one forward trains on every prefix sample the row stands for."""
    [batch] = user_batches(train_dataset, max_rows=len(train_dataset) + 1, sequence=True, windows=windows)
    rows = batch.interaction
    target_seq = torch.zeros_like(rows[train_dataset.item_id_list_field])
    target_seq[batch.target_rows, batch.positions] = batch.targets
    rows[TARGET_SEQ_FIELD] = target_seq
    target_index = torch.zeros_like(target_seq)  # each target's index among its user's prefix samples
    target_index[batch.target_rows, batch.positions] = torch.from_numpy(sample_index_of(batch.segment[batch.target_rows]))
    rows[TARGET_INDEX_FIELD] = target_index
    per_user = torch.bincount(batch.segment[batch.target_rows], minlength=len(batch.user_ids))
    rows[USER_TARGETS_FIELD] = per_user[batch.segment]
    return train_dataset.copy(rows)


def sequence_training_loss(model: torch.nn.Module, interaction, user_weighting: str = "prefix",
                           negatives: Optional[SampledNegatives] = None, salt: int = 1) -> torch.Tensor:
    """Cross-entropy over every target of sequence-mode rows (:func:`sequence_train_dataset`), in train mode
    (dropout on): the full softmax, or with ``negatives`` the sampled one (drawn with ``salt``). ``user_weighting``:
    ``prefix`` = the mean over the targets, the CE loss RecBole's SASRec trains with over the same prefix samples;
    ``user`` = each target weighted 1 / its user's number of prefix samples (the weighted mean), so that every
    user counts alike: the objective of ``influence_user_loss: mean``."""
    # The batch is cut to its longest row: trailing padding changes no real position's output (causal attention,
    # positions counted from the start, padded keys masked), only the cost.
    width = max(1, int(interaction[model.ITEM_SEQ_LEN].max()))
    target_seq = interaction[TARGET_SEQ_FIELD][:, :width]
    rows, positions = torch.nonzero(target_seq, as_tuple=True)
    hidden = _sequence_hidden(model, interaction[model.ITEM_SEQ][:, :width], rows, positions)
    weights = None
    if check_user_weighting(user_weighting) == "user":
        weights = 1.0 / interaction[USER_TARGETS_FIELD][rows].to(hidden.dtype)
    targets = target_seq[rows, positions]
    if negatives is None:
        return fused_linear_cross_entropy(hidden, model.item_embedding.weight, targets, weights)
    items, hits = negatives.candidates(targets.cpu(), interaction[model.USER_ID][rows].cpu(),
                                       interaction[TARGET_INDEX_FIELD][rows, positions].cpu(), salt)
    items, hits = items.to(hidden.device), hits.to(hidden.device)
    return fused_sampled_cross_entropy(hidden, model.item_embedding.weight, items, hits, weights)


class _GradientInForward(torch.autograd.Function):
    """Base of the fused losses: the forward saves the gradients of the loss's sum into ``(hidden, weight)`` and
    its denominator ``ctx.n``; the backward only scales them (every other input gets none)."""

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output / ctx.n
        return (grad_hidden * scale if ctx.needs_input_grad[0] else None,
                grad_weight * scale if ctx.needs_input_grad[1] else None) + (None,) * (len(ctx.needs_input_grad) - 2)


class _FusedSampledCrossEntropy(_GradientInForward):
    """Mean (or weighted mean) sampled-softmax cross-entropy of ``hidden`` against each target's candidates
    (:func:`candidate_logits`, label 0), chunk by chunk: the forward takes the loss and at once its gradients
    (softmax minus one-hot over the candidates) into ``hidden`` and, by ``index_add``, into the rows of ``weight``
    the candidates touch, so the ``[targets, candidates, d]`` gathered embeddings exist one chunk at a time (a
    training batch of 1,024 rows x 50 positions x 101 candidates x 64 floats would be 1.3 GB, twice with its
    gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, items, hits, chunk, sample_weights):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = hidden.new_zeros(())
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight) if needs_grad else None
        for start in range(0, len(items), chunk):
            h, cand = hidden[start:start + chunk], items[start:start + chunk]
            emb = gather_rows(weight, cand)  # [c, C, d]
            logits = torch.einsum("td,tcd->tc", h, emb).masked_fill(hits[start:start + chunk], float("-inf"))
            lse = torch.logsumexp(logits, dim=1)
            losses = lse - logits[:, 0]
            w = None if sample_weights is None else sample_weights[start:start + chunk]
            total = total + (losses.sum() if w is None else (losses * w).sum())
            if needs_grad:
                grad = (logits - lse[:, None]).exp_()  # softmax over the candidates; a masked hit is 0
                grad[:, 0] -= 1.0
                if w is not None:
                    grad.mul_(w[:, None])
                grad_hidden[start:start + chunk] = torch.einsum("tc,tcd->td", grad, emb)
                grad_weight.index_add_(0, cand.reshape(-1), (grad[:, :, None] * h[:, None, :]).reshape(-1, h.shape[1]))
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.n = len(items) if sample_weights is None else sample_weights.sum()
        return total / ctx.n


def fused_sampled_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, items: torch.Tensor, hits: torch.Tensor,
                                sample_weights: Optional[torch.Tensor] = None, chunk: int = 2048) -> torch.Tensor:
    """``F.cross_entropy(candidate_logits(hidden, weight, items, hits), 0)`` (mean; with ``sample_weights``
    ``[targets]`` the weighted mean): ``hidden`` ``[targets, d]``, ``weight`` ``[n_items, d]``, ``items`` / ``hits``
    ``[targets, C]``; a scalar, in chunks of ``chunk`` targets. Once-differentiable (the gradient is taken in the
    forward)."""
    if sample_weights is not None:
        sample_weights = sample_weights.detach().to(hidden.dtype)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedSampledCrossEntropy.apply(hidden, weight, items, hits, chunk, sample_weights)
    losses = F.cross_entropy(candidate_logits(hidden, weight, items, hits), torch.zeros_like(items[:, 0]),
                             reduction="none")
    return losses.mean() if sample_weights is None else (losses * sample_weights).sum() / sample_weights.sum()


class SequenceTrainingLoss:
    """The surrogate's training loss in sequence mode, as RecBole's trainer takes one (``loss(interaction)``);
    :meth:`set_epoch` (called by the trainer hook as each epoch starts) salts the sampled negatives, so every
    epoch sees fresh ones and a rerun the same ones."""

    def __init__(self, model: torch.nn.Module, user_weighting: str = "prefix",
                 negatives: Optional[SampledNegatives] = None) -> None:
        self.model, self.user_weighting, self.negatives = model, user_weighting, negatives
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, interaction) -> torch.Tensor:
        return sequence_training_loss(self.model, interaction, self.user_weighting, self.negatives, self.epoch + 1)


class _FusedLinearCrossEntropy(_GradientInForward):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, without the ``[targets, classes]`` logits
    ever existing whole: chunk by chunk, the forward takes the logits, their log-sum-exp and at once the
    gradient (softmax minus one-hot), accumulating the gradients of ``hidden`` and ``weight``; the backward only
    scales them. The full softmax's memory traffic (logits, log-softmax and its backward over 17k items per
    target on Games) was most of a surrogate epoch."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, sample_weights):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        n = len(targets)
        total = hidden.new_zeros(())
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight) if needs_grad else None
        for start in range(0, n, chunk):
            h = hidden[start:start + chunk]
            t = targets[start:start + chunk]
            logits = h @ weight.t()  # [c, classes]
            lse = torch.logsumexp(logits, dim=1)
            losses = lse - logits.gather(1, t[:, None])[:, 0]
            w = None if sample_weights is None else sample_weights[start:start + chunk]
            total = total + (losses.sum() if w is None else (losses * w).sum())
            if needs_grad:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(len(t), device=t.device), t] -= 1.0
                if w is not None:
                    grad.mul_(w[:, None])
                grad_hidden[start:start + chunk] = grad @ weight
                grad_weight.addmm_(grad.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.n = n if sample_weights is None else sample_weights.sum()  # the mean's denominator
        return total / ctx.n


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               sample_weights: Optional[torch.Tensor] = None, chunk: int = 1024) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets)`` (mean; with ``sample_weights`` ``[targets]`` the weighted
    mean ``sum(w * ce) / sum(w)``), in chunks of ``chunk`` targets: ``hidden`` ``[targets, d]``, ``weight``
    ``[classes, d]``, ``targets`` long ``[targets]``; a scalar. Once-differentiable (the gradient is taken in the
    forward)."""
    if len(targets) == 0:
        return (hidden.sum() + weight.sum()) * 0.0 / 0.0
    if sample_weights is not None:
        sample_weights = sample_weights.detach().to(hidden.dtype)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk, sample_weights)
    total = hidden.new_zeros(())
    for i in range(0, len(targets), chunk):
        losses = F.cross_entropy(hidden[i:i + chunk] @ weight.t(), targets[i:i + chunk], reduction="none")
        total = total + (losses.sum() if sample_weights is None else (losses * sample_weights[i:i + chunk]).sum())
    return total / (len(targets) if sample_weights is None else sample_weights.sum())


def sequence_row_lengths(dataset) -> np.ndarray:
    """Items in each row of a sequence-mode training ``dataset`` (:func:`sequence_train_dataset`): what its
    batch pads to. ``[rows]`` int."""
    return dataset.inter_feat[dataset.item_list_length_field].numpy()


def _sequence_hidden(m: torch.nn.Module, item_seq: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """SASRec.forward without its final gather: the encoder's output at each asked ``(row, position)``,
    ``[targets, hidden]``."""
    position_ids = torch.arange(item_seq.size(1), dtype=torch.long, device=item_seq.device)
    input_emb = m.item_embedding(item_seq) + m.position_embedding(position_ids.unsqueeze(0).expand_as(item_seq))
    input_emb = m.dropout(m.LayerNorm(input_emb))
    output = m.trm_encoder(input_emb, m.get_attention_mask(item_seq), output_all_encoded_layers=True)[-1]
    return output[rows, positions]


class _SequencePredict(torch.nn.Module):
    # The logits of every item at the asked positions (functional_call runs forward()).
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, item_seq, rows, positions) -> torch.Tensor:
        hidden = _sequence_hidden(self.model, item_seq, rows, positions)
        return hidden @ self.model.item_embedding.weight.transpose(0, 1)  # [targets, n_items]


class _CandidatePredict(torch.nn.Module):
    # The sampled softmax's logits [targets, 1 + negatives]: of the asked positions (sequence rows) or of every
    # row's last position (prefix rows, rows None), against each target's candidates.
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, item_seq, item_seq_len, rows, positions, items, hits) -> torch.Tensor:
        if rows is None:
            hidden = self.model.forward(item_seq, item_seq_len)
        else:
            hidden = _sequence_hidden(self.model, item_seq, rows, positions)
        return candidate_logits(hidden, self.model.item_embedding.weight, items, hits)


class KeptLinearizations:
    """A memory budget shared by HVP closures (:meth:`SurrogateLoss.gauss_newton_hvp`) for the linearisations they
    keep. A batch's cost is the resident memory its linearisation added, measured once as it is built; batches are
    kept in the order they are first met until the budget is spent (a batch that does not fit is recomputed every
    time, as every later one), and only while the kept product is the recomputed one bit for bit."""

    def __init__(self, gb: float) -> None:
        self.left_bytes = float(gb) * 2**30
        self.kept_batches = 0
        self.recomputed_batches = 0
        self.kept_bytes = 0
        self.other_bits = False  # a kept product differed from the recomputed one: nothing kept from then on

    def take(self, nbytes: int, same_bits: bool = True) -> bool:
        """Keep a batch that added ``nbytes`` and whose kept product equals the recomputed one bit for bit: True
        while both hold (else the budget closes: the next batches are recomputed, as a model whose linearisation
        gave other bits gives them on every batch)."""
        if same_bits and 0 < self.left_bytes and nbytes <= self.left_bytes:
            self.left_bytes -= max(nbytes, 0)
            self.kept_bytes += max(nbytes, 0)
            self.kept_batches += 1
            return True
        self.left_bytes = 0
        self.recomputed_batches += 1
        self.other_bits = self.other_bits or not same_bits
        return False


class SurrogateLoss:
    """``loss(params, batch: UserBatch) -> Tensor[users]``: the per-user loss (module docstring).

    ``params`` holds the scored parameters by their model names; every other parameter and buffer is
    held fixed at the trained values.
    """

    def __init__(self, model: torch.nn.Module, user_loss: str = "sum",
                 negatives: Optional[SampledNegatives] = None) -> None:
        if user_loss not in USER_LOSSES:
            raise ValueError(f"user_loss must be one of {list(USER_LOSSES)}, got {user_loss!r}")
        self.user_loss = user_loss
        self.negatives = negatives  # None: the full softmax over every item
        self.model = model.eval()
        self.predict = _Predict(model)
        self.sequence_predict = _SequencePredict(model) if supports_sequence_mode(model) else None
        self.candidate_predict = _CandidatePredict(model)
        self.fixed = {f"model.{k}": v.detach() for k, v in model.named_parameters()}
        self.fixed.update({f"model.{k}": v for k, v in model.named_buffers()})
        self.target_field = model.POS_ITEM_ID

    def logits(self, params: dict[str, torch.Tensor], interaction) -> torch.Tensor:
        """Next-item logits of every row: ``[rows, n_items]``."""
        weights = {**self.fixed, **{f"model.{k}": v for k, v in params.items()}}
        return functional_call(self.predict, weights, (interaction,))

    def target_logits(self, params: dict[str, torch.Tensor], batch: UserBatch) -> torch.Tensor:
        """Next-item logits of every target of the batch (a target per row in prefix mode): ``[targets, n_items]``,
        or with sampled negatives ``[targets, 1 + negatives]`` (the target first)."""
        if batch.targets is not None and self.sequence_predict is None:
            raise ValueError(f"{type(self.model).__name__} has no sequence mode: build its batches with sequence=False")
        weights = {**self.fixed, **{f"model.{k}": v for k, v in params.items()}}
        item_seq = batch.interaction[self.model.ITEM_SEQ]
        if self.negatives is not None:
            # the batch's ids as numpy through tolist(): inside a torch.func transform (jvp, grad, vmap) .numpy()
            # refuses every tensor, and torch ops would return wrapped tensors
            segment = np.array(batch.segment.tolist(), dtype=np.int64)
            targets = np.array(self.true_targets(batch).tolist(), dtype=np.int64)
            if batch.targets is not None:
                segment = segment[np.array(batch.target_rows.tolist(), dtype=np.int64)]
            items, hits = self.negatives.candidates(targets, batch.user_ids[segment], sample_index_of(segment))
            items, hits = items.to(item_seq.device), hits.to(item_seq.device)
            rows, positions = (None, None) if batch.targets is None else (batch.target_rows, batch.positions)
            return functional_call(self.candidate_predict, weights, (
                item_seq, batch.interaction[self.model.ITEM_SEQ_LEN], rows, positions, items, hits))
        if batch.targets is None:
            return self.logits(params, batch.interaction)
        return functional_call(self.sequence_predict, weights, (item_seq, batch.target_rows, batch.positions))

    def true_targets(self, batch: UserBatch) -> torch.Tensor:
        """The next item of every target of the batch: long ``[targets]``."""
        return batch.interaction[self.target_field] if batch.targets is None else batch.targets

    def target_items(self, batch: UserBatch) -> torch.Tensor:
        """The label of every row of :meth:`target_logits`: the next item, or 0 (the target's column) when sampled."""
        targets = self.true_targets(batch)
        return torch.zeros_like(targets) if self.negatives is not None else targets

    def target_segment(self, batch: UserBatch) -> torch.Tensor:
        """The user (position in ``batch.user_ids``) of every target: ``[targets]``."""
        return batch.segment if batch.targets is None else batch.segment[batch.target_rows]

    def row_candidates(self, interaction, sample_index) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The sampled negatives of prefix rows (``sample_index``: each row's index among its user's prefix
        samples, long ``[rows]``) for :meth:`row_losses`: ``(items, hits)`` ``[rows, 1 + negatives]``, or None (full
        softmax). Kept apart from the loss so that a ``vmap`` over users never runs the (numpy) hash."""
        if self.negatives is None:
            return None
        device = interaction[self.target_field].device
        items, hits = self.negatives.candidates(interaction[self.target_field].cpu(),
                                                interaction[self.model.USER_ID].cpu(), sample_index)
        return items.to(device), hits.to(device)

    def row_losses(self, params: dict[str, torch.Tensor], interaction, candidates=None) -> torch.Tensor:
        """Cross-entropy of every prefix row's next-item logits: ``[rows]``; ``candidates`` from
        :meth:`row_candidates` (needed with sampled negatives)."""
        if self.negatives is None:
            return F.cross_entropy(self.logits(params, interaction), interaction[self.target_field], reduction="none")
        if candidates is None:
            raise ValueError("row_losses with sampled negatives needs the rows' candidates (row_candidates)")
        weights = {**self.fixed, **{f"model.{k}": v for k, v in params.items()}}
        items, hits = candidates
        logits = functional_call(self.candidate_predict, weights, (
            interaction[self.model.ITEM_SEQ], interaction[self.model.ITEM_SEQ_LEN], None, None, items, hits))
        return F.cross_entropy(logits, torch.zeros_like(items[:, 0]), reduction="none")

    def gauss_newton_hvp(self, params: dict[str, torch.Tensor], batches: Sequence[UserBatch], n_total: int,
                         keep: Optional[KeptLinearizations] = None):
        """HVP with the Gauss-Newton Hessian G = (1/n) sum_rows J^T (diag(p) - p p^T) J, on flat vectors.

        The exact Hessian of a trained SASRec is indefinite (CG meets negative curvature at any small
        damping); G drops the second-order term of the network and is positive semi-definite, the usual
        choice of influence-function libraries for cross-entropy losses. ``influence_hessian`` picks it.

        ``keep``: a memory budget for batches' linearisations, kept across calls (the solvers call one HVP dozens
        of times on the same batches): the logits' tangent map (``torch.func.linearize``), their ``vjp`` and the
        softmax, so a later product on that batch runs neither of the two primal forward passes nor the softmax.
        A batch is kept only if its first kept product equals the recomputed one bit for bit (checked then), so the
        products never depend on the budget. None: recompute every time (LiSSA: a fresh batch each step).
        """
        from recbole_dealrec.gradients.params import flatten, unflatten

        fixed = {k: v.detach() for k, v in params.items()}
        kept: dict[int, tuple] = {}

        def product(prob, weights, jv, vjp_fn) -> torch.Tensor:
            # J^T (diag(p) - p p^T) (J x), each target weighted by its user's loss form
            u = (prob * jv - prob * (prob * jv).sum(-1, keepdim=True)) * weights
            (grad,) = vjp_fn(u)
            return flatten(grad).detach() / n_total

        def recomputed(f, batch: UserBatch, tangent) -> torch.Tensor:
            logits, jv = torch.func.jvp(f, (fixed,), (tangent,))
            prob = torch.softmax(logits.detach(), dim=-1)
            weights = self.row_weights(batch).to(prob.dtype)[:, None]
            _, vjp_fn = torch.func.vjp(f, fixed)
            return product(prob, weights, jv.detach(), vjp_fn)

        def hvp(x: torch.Tensor) -> torch.Tensor:
            tangent = unflatten(x, fixed)
            out = torch.zeros_like(x)
            for index, batch in enumerate(batches):
                def f(p):
                    return self.target_logits(p, batch)

                if index in kept:
                    jvp_fn, vjp_fn, prob, weights = kept[index]
                    out += product(prob, weights, jvp_fn(tangent).detach(), vjp_fn)
                elif keep is not None and keep.left_bytes > 0:
                    before = _resident_bytes()
                    with warnings.catch_warnings():  # torch.fx's constant folding inside linearize, harmless
                        warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
                        _, jvp_fn = torch.func.linearize(f, fixed)
                        logits, vjp_fn = torch.func.vjp(f, fixed)
                        prob = torch.softmax(logits.detach(), dim=-1)
                        weights = self.row_weights(batch).to(prob.dtype)[:, None]
                        fast = product(prob, weights, jvp_fn(tangent).detach(), vjp_fn)  # materialises it
                    # Checked once against the recomputed product: kept only when the bits agree. A traced tangent
                    # map can run other kernels than eager forward mode (GRU4Rec's recurrent cell does), and the
                    # scores must not depend on the budget.
                    exact = recomputed(f, batch, tangent)
                    out += exact
                    if keep.take(_resident_bytes() - before, same_bits=torch.equal(fast, exact)):
                        kept[index] = (jvp_fn, vjp_fn, prob, weights)
                else:
                    out += recomputed(f, batch, tangent)
            return out

        return hvp

    def row_weights(self, batch: UserBatch) -> torch.Tensor:
        """Weight of each target in its user's loss: 1 (sum) or 1 / the user's number of prefix samples (mean).
        ``[targets]``."""
        segment = self.target_segment(batch)
        if self.user_loss == "sum":
            return torch.ones(len(segment))
        counts = torch.bincount(segment, minlength=len(batch)).to(torch.get_default_dtype())
        return 1.0 / counts[segment]

    def __call__(self, params: dict[str, torch.Tensor], batch: UserBatch) -> torch.Tensor:
        losses = F.cross_entropy(self.target_logits(params, batch), self.target_items(batch), reduction="none")
        if self.user_loss == "mean":
            losses = losses * self.row_weights(batch).to(losses.dtype)
        return torch.zeros(len(batch), dtype=losses.dtype, device=losses.device).index_add(
            0, self.target_segment(batch), losses)


@torch.no_grad()
def user_representations(model: torch.nn.Module, train_dataset, user_ids: np.ndarray, batch_size: int = 1024) -> torch.Tensor:
    """The surrogate's representation of each user: its sequence output for the user's whole training
    history (the user's last training row), the vector the model scores every item with. ``[users, hidden]``.

    ``user_ids`` (int64 [users], internal ids of ``train_dataset``, every one with training rows) sets the
    order. SASRec-like models return it from ``forward(item_seq, item_seq_len)``; BERT4Rec from its next-item
    head (mask appended after the history), as in its ``full_sort_predict``.
    """
    from recbole_dealrec.data.items import last_rows

    model.eval()
    rows = last_rows(train_dataset)
    uid = train_dataset.inter_feat[train_dataset.uid_field].numpy()[rows]
    position = {int(u): i for i, u in enumerate(uid)}
    missing = [int(u) for u in user_ids if int(u) not in position]
    if missing:
        raise ValueError(f"{len(missing)} users have no training rows, e.g. {missing[:5]}")
    wanted = torch.from_numpy(rows[[position[int(u)] for u in user_ids]])
    out = []
    for start in range(0, len(wanted), batch_size):
        inter = train_dataset.inter_feat[wanted[start:start + batch_size]]
        seq, seq_len = inter[model.ITEM_SEQ], inter[model.ITEM_SEQ_LEN]
        if hasattr(model, "reconstruct_test_data"):  # BERT4Rec: bidirectional, mask token after the history
            hidden = model.forward(model.reconstruct_test_data(seq, seq_len))
            out.append(model.gather_indexes(hidden, seq_len - 1))
        else:
            out.append(model.forward(seq, seq_len))
    return torch.cat(out) if out else torch.zeros(0, model.hidden_size if hasattr(model, "hidden_size") else 0)
