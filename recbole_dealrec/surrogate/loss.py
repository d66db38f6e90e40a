"""The surrogate's per-user loss as a ``[batch]`` vector, a pure function of the scored parameters.

Per-sample loss of one user = MEAN (``user_loss="mean"``, the paper's code: its per-user gradient is taken at
batch size 1, the mean over the user's positions) or SUM (``"sum"``) over the user's training prefixes
(RecBole's augmented rows) of the cross-entropy of the model's next-item logits (``full_sort_predict``, all
items) against the prefix's target. For SASRec / GRU4Rec with ``loss_type: CE`` this is exactly the training loss RecBole sums over
those rows. BERT4Rec trains on random cloze masks; its scoring loss is the deterministic next-item loss
of its own prediction head (mask appended after the history). The Hessian and the mean gradient are of
R = (1/n_users) * sum_u L_u, the empirical risk over users, the paper's samples. With the sum, a user's
loss (and so its score) grows with its history length; the mean compares users on equal terms.
Eval mode throughout: no dropout and no sampled negatives, so every call sees the same function.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

#: Allowed values of ``influence_user_loss``: how a user's prefix losses make its loss.
USER_LOSSES = ("mean", "sum")


@dataclasses.dataclass
class UserBatch:
    """The training rows of a few users. ``segment[r]`` = position of row r's user in ``user_ids``."""

    interaction: object  # recbole Interaction with the model's input fields and the target
    segment: torch.Tensor  # long [rows]
    user_ids: np.ndarray  # int64 [users], internal RecBole ids of the surrogate's dataset

    def __len__(self) -> int:
        return len(self.user_ids)

    def split(self) -> list["UserBatch"]:
        """One batch per user (the per-sample reference loop of the tests and benchmarks)."""
        out = []
        for index, uid in enumerate(self.user_ids):
            rows = torch.nonzero(self.segment == index, as_tuple=True)[0]
            out.append(UserBatch(self.interaction[rows], torch.zeros(len(rows), dtype=torch.long), self.user_ids[index:index + 1]))
        return out


def user_batches(train_dataset, max_rows: int, user_ids: Sequence[int] | None = None) -> list[UserBatch]:
    """Group the training rows by user into batches of whole users, about ``max_rows`` rows each.

    Users come in ascending id order (all users with training rows, or ``user_ids``).
    """
    inter = train_dataset.inter_feat
    uid = inter[train_dataset.uid_field].numpy()
    order = np.argsort(uid, kind="stable")
    uid_sorted = uid[order]
    users, starts, counts = np.unique(uid_sorted, return_index=True, return_counts=True)
    if user_ids is not None:
        wanted = np.isin(users, np.asarray(user_ids))
        users, starts, counts = users[wanted], starts[wanted], counts[wanted]
    batches, begin = [], 0
    while begin < len(users):
        end, rows = begin, 0
        while end < len(users) and (end == begin or rows + counts[end] <= max_rows):
            rows += counts[end]
            end += 1
        row_index = np.concatenate([order[s:s + c] for s, c in zip(starts[begin:end], counts[begin:end])])
        segment = np.repeat(np.arange(end - begin), counts[begin:end])
        batches.append(UserBatch(inter[torch.from_numpy(row_index)], torch.from_numpy(segment), users[begin:end]))
        begin = end
    return batches


class _Predict(torch.nn.Module):
    # functional_call runs a module's forward(); this one forwards to the model's full_sort_predict.
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, interaction) -> torch.Tensor:
        return self.model.full_sort_predict(interaction)


class SurrogateLoss:
    """``loss(params, batch: UserBatch) -> Tensor[users]``: the per-user loss (module docstring).

    ``params`` holds the scored parameters by their model names; every other parameter and buffer is
    held fixed at the trained values.
    """

    def __init__(self, model: torch.nn.Module, user_loss: str = "sum") -> None:
        if user_loss not in USER_LOSSES:
            raise ValueError(f"user_loss must be one of {list(USER_LOSSES)}, got {user_loss!r}")
        self.user_loss = user_loss
        self.model = model.eval()
        self.predict = _Predict(model)
        self.fixed = {f"model.{k}": v.detach() for k, v in model.named_parameters()}
        self.fixed.update({f"model.{k}": v for k, v in model.named_buffers()})
        self.target_field = model.POS_ITEM_ID

    def logits(self, params: dict[str, torch.Tensor], interaction) -> torch.Tensor:
        """Next-item logits of every row: ``[rows, n_items]``."""
        weights = {**self.fixed, **{f"model.{k}": v for k, v in params.items()}}
        return functional_call(self.predict, weights, (interaction,))

    def row_losses(self, params: dict[str, torch.Tensor], interaction) -> torch.Tensor:
        """Cross-entropy of every row's next-item logits: ``[rows]``."""
        return F.cross_entropy(self.logits(params, interaction), interaction[self.target_field], reduction="none")

    def gauss_newton_hvp(self, params: dict[str, torch.Tensor], batches: Sequence[UserBatch], n_total: int):
        """HVP with the Gauss-Newton Hessian G = (1/n) sum_rows J^T (diag(p) - p p^T) J, on flat vectors.

        The exact Hessian of a trained SASRec is indefinite (CG meets negative curvature at any small
        damping); G drops the second-order term of the network and is positive semi-definite, the usual
        choice of influence-function libraries for cross-entropy losses. ``influence_hessian`` picks it.
        """
        from recbole_dealrec.scoring.influence_core import flatten, unflatten

        fixed = {k: v.detach() for k, v in params.items()}

        def hvp(x: torch.Tensor) -> torch.Tensor:
            tangent = unflatten(x, fixed)
            out = torch.zeros_like(x)
            for batch in batches:
                def f(p):
                    return self.logits(p, batch.interaction)

                logits, jv = torch.func.jvp(f, (fixed,), (tangent,))
                prob = torch.softmax(logits.detach(), dim=-1)
                jv = jv.detach()
                weights = self.row_weights(batch).to(prob.dtype)[:, None]
                u = (prob * jv - prob * (prob * jv).sum(-1, keepdim=True)) * weights
                _, vjp_fn = torch.func.vjp(f, fixed)
                (grad,) = vjp_fn(u)
                out += flatten(grad).detach() / n_total
            return out

        return hvp

    def row_weights(self, batch: UserBatch) -> torch.Tensor:
        """Weight of each row in its user's loss: 1 (sum) or 1 / the user's number of rows (mean). ``[rows]``."""
        if self.user_loss == "sum":
            return torch.ones(len(batch.segment))
        counts = torch.bincount(batch.segment, minlength=len(batch)).to(torch.get_default_dtype())
        return 1.0 / counts[batch.segment]

    def __call__(self, params: dict[str, torch.Tensor], batch: UserBatch) -> torch.Tensor:
        rows = self.row_losses(params, batch.interaction)
        if self.user_loss == "mean":
            rows = rows * self.row_weights(batch).to(rows.dtype)
        return torch.zeros(len(batch), dtype=rows.dtype, device=rows.device).index_add(0, batch.segment, rows)


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
