"""The trainer of every generative backend (:class:`recbole_dealrec.model.backend.GenerativeBackend`: BIGRec, TIGER).

It names no concrete model. Differences from RecBole's ``Trainer``:

- the rows fed are the backend's ``training_rows``: one sample per user for BIGRec (each user's LAST
  training row: history = all earlier training items, target = the last one), every prefix for TIGER;
- gradient accumulation (``gradient_accumulation_steps``); only the parameters that require grad are
  optimised (LoRA for BIGRec, all for TIGER);
- early stopping on the VALIDATION LM LOSS (one row per user: history = training items, target = the first
  valid item), lower is better, patience ``stopping_step``; generation runs only at test time;
- checkpoints hold only the backend's ``trainable_state_dict`` (LoRA weights for BIGRec) plus epoch/optimizer
  state, written atomically into ``checkpoint_dir``: ``<Model>-<time>.pth`` (best validation loss) and
  ``<Model>-<time>-last.pth`` (every epoch, for :meth:`GenerativeTrainer.resume_checkpoint`);
- ``eval_user_subset`` / ``valid_user_subset``: evaluate on / compute the validation loss over a fixed seeded
  subset (``seed``) of that many evaluation rows / validation users (CPU runs);
- ``valid_on_selected_users`` (the DEALRec code's protocol): the validation loss covers only the users whose
  samples were trained on (the selected ones);
- ``warmup_steps`` / ``lr_schedule``: linear warm-up over the first optimizer steps, then a constant or linearly
  decaying (to 0 at the last planned step, as the HF Trainer BIGRec used) learning rate;
- ``epochs: 0`` trains nothing: the test evaluates the initial weights (zero-shot);
- under ``torchrun`` (``recbole_dealrec.distributed``) every rank walks the same seeded global batches and
  trains on its share of each; the loss of a share is weighted by its number of loss terms over the global
  batch's, and the gradients are all-reduced before every optimizer step, so the step is the one-process step
  on the same global batch (up to float order; dropout masks differ). Validation and test evaluation are
  sharded by users and merged exactly (RecBole's collected top-k of every rank, put back in order, evaluated
  once). Rank 0 alone writes checkpoints; every rank keeps the best weights in memory.
"""
from __future__ import annotations

import glob
import os
from time import time
from typing import Optional

import numpy as np
import torch
from recbole.data.utils import get_dataloader
from recbole.evaluator import Evaluator
from recbole.trainer import Trainer
from recbole.utils import early_stopping, set_color
from torch.nn.utils.clip_grad import clip_grad_norm_
from tqdm import tqdm

from recbole_dealrec import distributed
from recbole_dealrec.data.batching import LengthGroupedLoader, grouped_by_length
from recbole_dealrec.data.user_rows import rows_by_user
from recbole_dealrec.errors import ConfigError, check_integer
from recbole_dealrec.utils import atomic_write

CHECKPOINT_FORMAT = "recbole-dealrec/generative-v1"
LR_SCHEDULES = ("constant", "linear")


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based): linear warm-up from 1/(warmup+1) to 1 over
    ``warmup_steps`` steps, then 1 (``constant``) or a linear decay reaching 0 after ``total_steps`` (``linear``)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "linear" and total_steps > warmup_steps:
        return max(0.0, (total_steps - step) / (total_steps - warmup_steps))
    return 1.0


def first_rows(dataset) -> np.ndarray:
    """Row index of each user's first row in ``dataset`` (sorted by user id)."""
    return rows_by_user(dataset).first()


def check_trainer_config(config) -> None:
    """The generative trainer's own keys (run by ``check_run_config`` before any data is read, and again here)."""
    grad_accum, warmup = config["gradient_accumulation_steps"], config["warmup_steps"]
    check_integer("gradient_accumulation_steps", grad_accum, 1, none_ok=True)
    check_integer("warmup_steps", warmup, 0, none_ok=True)
    if (config["lr_schedule"] or "constant") not in LR_SCHEDULES:
        raise ConfigError(f"`lr_schedule` must be one of {list(LR_SCHEDULES)}, got {config['lr_schedule']!r}")
    check_integer("length_grouped_batches", config["length_grouped_batches"], 0,
                  "0 = RecBole's shuffled batches", none_ok=True)


class RankMergingEvaluator(Evaluator):
    """RecBole's evaluator that, under torch.distributed, first gathers every rank's collected rows (``rec.*``: top-k
    hits, ranks, scores; each rank evaluated its share) back into the unsharded order, so the metrics are the
    one-process metrics exactly. One process: RecBole's evaluator as it is."""

    def evaluate(self, dataobject):
        if distributed.active():
            for key in [k for k in dataobject._data_dict if k.startswith("rec.")]:
                dataobject[key] = distributed.unshard_strided(distributed.gather_objects(dataobject[key].cpu()))
        return super().evaluate(dataobject)


class GenerativeTrainer(Trainer):
    """RecBole trainer for generative backends: trained-weights-only optimisation and checkpoints,
    validation-loss early stopping."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.evaluator = RankMergingEvaluator(config)
        check_trainer_config(config)
        self.grad_accum = int(config["gradient_accumulation_steps"] or 1)
        # The validation score is a loss: lower is better (run_recbole reports the trainer's valid_metric_bigger).
        self.valid_metric_bigger = False
        self.best_valid_score = np.inf
        self.best_epoch: Optional[int] = None
        self._best_weights: Optional[dict] = None  # in-memory copy (used when nothing is saved)
        self._subset_cache: dict[int, object] = {}
        self.warmup_steps = int(config["warmup_steps"] or 0)
        self.lr_schedule = config["lr_schedule"] or "constant"
        self.optimizer_steps = 0  # optimizer steps taken so far (drives the learning-rate schedule)
        self.total_steps = 0  # planned optimizer steps: epochs x steps per epoch (set by fit)
        self.valid_users: Optional[np.ndarray] = None  # users whose validation rows count (set by fit)

    # ------------------------------------------------------------------ setup

    def _build_optimizer(self, **kwargs):
        kwargs.setdefault("params", [p for p in self.model.parameters() if p.requires_grad])
        return super()._build_optimizer(**kwargs)

    @property
    def last_model_file(self) -> str:
        base, ext = os.path.splitext(self.saved_model_file)
        return base + "-last" + (ext or ".pth")

    def training_loader(self, train_data):
        """A train loader over the backend's ``training_rows`` (BIGRec: each user's last training row), in batches
        of similar length when ``length_grouped_batches`` > 0 and the backend pads (its ``sample_lengths``)."""
        dataset = train_data.dataset
        rows = self.model.training_rows(dataset)
        if rows is not None and len(rows) != len(dataset):
            kept = dataset.copy(dataset.inter_feat[torch.from_numpy(rows)])
            self.logger.info(
                set_color(f"[{self.config['model']}]", "pink")
                + f" one sample per user: {len(rows)} training samples (each user's last) of {len(dataset)} rows"
            )
            train_data = get_dataloader(self.config, "train")(
                self.config, kept, train_data._sampler, shuffle=self.config["shuffle"]
            )
        group = self.config["length_grouped_batches"]
        group = self.grad_accum if group is None else int(group)  # ~: one window per optimizer step
        dataset = train_data.dataset
        return grouped_by_length(train_data, group, int(self.config["seed"]), bool(self.config["shuffle"]),
                                 lambda: self.model.sample_lengths(dataset, np.arange(len(dataset))))

    # ------------------------------------------------------------------ training

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self.model.train()
        if isinstance(train_data, LengthGroupedLoader):
            train_data.set_epoch(epoch_idx)
        loss_func = loss_func or self.model.calculate_loss
        iter_data = (
            tqdm(train_data, total=len(train_data), ncols=100, desc=set_color(f"Train {epoch_idx:>5}", "pink"))
            if show_progress
            else train_data
        )
        params = [p for p in self.model.parameters() if p.requires_grad]
        total_loss, n_batches, pending = 0.0, 0, 0
        self.optimizer.zero_grad(set_to_none=True)
        for interaction in iter_data:
            interaction = interaction.to(self.device)
            loss = self._share_loss(interaction) if distributed.active() else loss_func(interaction)
            if loss is not None:  # None: this rank's share of a batch smaller than the group is empty
                self._check_nan(loss)
                (loss / self.grad_accum).backward()
                total_loss += loss.item()
            n_batches += 1
            pending += 1
            if pending == self.grad_accum:
                self._optimizer_step(params)
                pending = 0
            if show_progress:
                iter_data.set_postfix(loss=f"{loss.item():.4f}")
        if pending:  # a last, partial accumulation window
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(self.grad_accum / pending)
            self._optimizer_step(params)
        self.model.log_pass(f"train epoch {epoch_idx}")
        if distributed.active():  # each rank summed its weighted shares: the sum over ranks is the batches' loss
            total_loss = float(distributed.all_reduce_sum(torch.tensor(total_loss, dtype=torch.float64)))
        return total_loss / max(n_batches, 1)

    def _share_loss(self, interaction) -> Optional[torch.Tensor]:
        """This rank's part of the global batch ``interaction``: its loss times its share of the batch's loss terms,
        so that the sum over ranks is the global batch's loss (``None`` when the share is empty)."""
        local = distributed.batch_share(interaction)
        loss, count = self.model.loss_and_count(local) if len(local) else (None, 0)
        weight = distributed.share_of_total(count)
        return None if loss is None else loss * weight

    def _optimizer_step(self, params) -> None:
        distributed.all_reduce_gradients(params)  # under torch.distributed: the global batch's gradient
        if self.clip_grad_norm:
            clip_grad_norm_(params, **self.clip_grad_norm)
        factor = lr_factor(self.optimizer_steps, self.warmup_steps, self.total_steps, self.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate * factor
        self.optimizer.step()
        self.optimizer_steps += 1
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def validation_loss(self, valid_data, show_progress: bool = False) -> float:
        """LM loss over one valid row per user (the first: history = train items, target = first valid item): the
        mean over every loss term (row, or BIGRec's target token) of those rows, whatever the batching (so also
        when the rows are sharded over ranks)."""
        dataset = valid_data.dataset if hasattr(valid_data, "dataset") else valid_data
        rows = first_rows(dataset)
        if self.valid_users is not None:
            uid = dataset.inter_feat[dataset.uid_field].numpy()
            rows = rows[np.isin(uid[rows], self.valid_users)]
        n = self.config["valid_user_subset"]
        if n is not None and 0 < n < len(rows):  # a fixed seeded subset of users (the same every epoch)
            rng = np.random.default_rng(int(self.config["seed"]))
            rows = np.sort(rng.choice(rows, size=int(n), replace=False))
        rows = distributed.shard_strided(rows)
        was_training = self.model.training
        self.model.eval()
        batch_size = int(self.config["eval_batch_size"])
        starts = range(0, len(rows), batch_size)
        if show_progress:
            starts = tqdm(starts, total=len(starts), ncols=100, desc=set_color("Valid loss ", "pink"))
        total, count = 0.0, 0
        try:
            for s in starts:
                index = torch.from_numpy(rows[s : s + batch_size])
                interaction = dataset[index].to(self.device)
                loss, terms = self.model.loss_and_count(interaction)
                total += loss.item() * terms
                count += terms
        finally:
            self.model.train(was_training)
        self.model.log_pass("validation")
        if distributed.active():
            total, count = distributed.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
        return total / count if count else float("nan")

    def _valid_epoch(self, valid_data, show_progress=False):
        loss = self.validation_loss(valid_data, show_progress=show_progress)
        return loss, {"valid_loss": round(loss, 6)}

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        """Train on the backend's training rows; early-stop on the validation loss; save trained-weights-only checkpoints.

        Returns:
            ``(best validation loss, {"valid_loss": best validation loss})`` (``(inf, None)`` without validation).
        """
        train_data = self.training_loader(train_data)
        self.eval_collector.data_collect(train_data)
        if self.config["valid_on_selected_users"]:
            train = train_data.dataset
            self.valid_users = np.unique(train.inter_feat[train.uid_field].numpy())
        self.total_steps = self.epochs * -(-len(train_data) // self.grad_accum)
        for epoch_idx in range(self.start_epoch, self.epochs):
            start = time()
            train_loss = self._train_epoch(train_data, epoch_idx, show_progress=show_progress)
            self.train_loss_dict[epoch_idx] = train_loss
            if verbose:
                self.logger.info(self._generate_train_loss_output(epoch_idx, start, time(), train_loss))
            self._add_train_loss_to_tensorboard(epoch_idx, train_loss)

            stop_flag = False
            if self.eval_step <= 0 or not valid_data:
                self._mark_best(epoch_idx, None, saved, verbose)
            elif (epoch_idx + 1) % self.eval_step == 0:
                valid_start = time()
                valid_score, valid_result = self._valid_epoch(valid_data, show_progress=show_progress)
                self.best_valid_score, self.cur_step, stop_flag, update_flag = early_stopping(
                    valid_score, self.best_valid_score, self.cur_step, max_step=self.stopping_step, bigger=False
                )
                if verbose:
                    self.logger.info(
                        set_color(f"epoch {epoch_idx} evaluating", "green")
                        + f" [{set_color('time', 'blue')}: {time() - valid_start:.2f}s, "
                        + f"{set_color('valid_loss', 'blue')}: {valid_score:.6f}]"
                    )
                self.tensorboard.add_scalar("Valid_loss", valid_score, epoch_idx)
                if update_flag:
                    self._mark_best(epoch_idx, valid_result, saved, verbose)
                if callback_fn:
                    callback_fn(epoch_idx, valid_score)
            if saved:
                self._save_checkpoint(epoch_idx, verbose=False, saved_model_file=self.last_model_file, last=True)
            if stop_flag:
                if verbose:
                    self.logger.info(f"Finished training, best eval result in epoch {self.best_epoch}")
                break
        return self.best_valid_score, self.best_valid_result

    def _mark_best(self, epoch_idx, valid_result, saved, verbose) -> None:
        self.best_epoch = epoch_idx
        self.best_valid_result = valid_result
        self._best_weights = self.model.trainable_state_dict()
        if saved:
            self._save_checkpoint(epoch_idx, verbose=verbose)

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        """Atomically save the trained weights (+ optimizer/epoch state) to ``saved_model_file`` (the best checkpoint)
        or, with ``last=True``, to the ``-last.pth`` checkpoint used for resuming."""
        if not distributed.is_main():
            return  # rank 0 alone writes (every rank holds the same weights)
        path = kwargs.pop("saved_model_file", self.saved_model_file)
        last = kwargs.pop("last", False)
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": self.config["model"],
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": float(self.best_valid_score),
            "best_epoch": self.best_epoch,
            "best_file": self.saved_model_file,
            "weights": self.model.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_steps": self.optimizer_steps,
            "train_loss": {int(k): float(v) for k, v in self.train_loss_dict.items()},  # per epoch, for the record
            "last": bool(last),
        }
        with atomic_write(path, "wb") as handle:
            torch.save(state, handle)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {path}")

    @staticmethod
    def load_checkpoint(path: str) -> dict:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a recbole-dealrec generative-backend checkpoint (format {CHECKPOINT_FORMAT})")
        return state

    def latest_checkpoint(self) -> Optional[str]:
        """Newest ``<Model>-*-last.pth`` in ``checkpoint_dir`` (None if there is none)."""
        files = glob.glob(os.path.join(self.checkpoint_dir, f"{self.config['model']}-*-last.pth"))
        return max(files, key=os.path.getmtime) if files else None

    def resume_checkpoint(self, resume_file=None):
        """Continue training from a checkpoint (default: the newest ``-last.pth`` one in ``checkpoint_dir``)."""
        resume_file = str(resume_file) if resume_file is not None else self.latest_checkpoint()
        if resume_file is None:
            raise FileNotFoundError(f"no {self.config['model']}-*-last.pth checkpoint in {self.checkpoint_dir}")
        state = self.load_checkpoint(resume_file)
        self.model.load_trainable_state_dict(state["weights"])
        if state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = int(state["epoch"]) + 1
        self.optimizer_steps = int(state.get("optimizer_steps", 0))
        self.cur_step = int(state["cur_step"])
        self.best_valid_score = float(state["best_valid_score"])
        self.best_epoch = state.get("best_epoch")
        best_file = state.get("best_file")
        self.saved_model_file = best_file if best_file and os.path.isfile(best_file) else resume_file
        if self.best_valid_score < np.inf:
            self.best_valid_result = {"valid_loss": round(self.best_valid_score, 6)}
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")

    # ------------------------------------------------------------------ evaluation

    def eval_subset(self, eval_data):
        """``eval_data`` restricted to ``eval_user_subset`` rows drawn with ``seed`` (the same rows every call), in
        the model's evaluation order (``GenerativeBackend.eval_order``; e.g. BIGRec's prompts by length)."""
        key = id(eval_data)
        if key not in self._subset_cache:
            dataset = eval_data.dataset
            n = self.config["eval_user_subset"]
            subset = n is not None and 0 < n < len(dataset)
            if subset:
                rng = np.random.default_rng(int(self.config["seed"]))
                rows = np.sort(rng.choice(len(dataset), size=int(n), replace=False))
            else:
                rows = np.arange(len(dataset))
            ordered = self.model.eval_order(dataset, rows)
            if not subset and ordered is None and not distributed.active():
                return eval_data
            rows = distributed.shard_strided(rows if ordered is None else ordered)
            sub = dataset.copy(dataset.inter_feat[torch.from_numpy(rows)])
            targets = getattr(dataset, "multi_targets", None)
            if targets is not None:
                sub.multi_targets = targets[torch.from_numpy(rows)]
            loader = type(eval_data)(self.config, sub, eval_data._sampler, shuffle=False)
            if subset:
                self.logger.info(set_color(f"[{self.config['model']}]", "pink")
                                 + f" eval_user_subset: evaluating {n} of {len(dataset)} rows")
            if distributed.active():
                self.logger.info(set_color("[Distributed]", "pink") + f" rank {distributed.rank()} evaluates "
                                 f"{len(rows)} of the rows")
            self._subset_cache[key] = (eval_data, loader)  # keep eval_data alive so its id stays unique
        return self._subset_cache[key][1]

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        """RecBole's full-sort evaluation (generation + grounding) with the best LoRA weights."""
        if not eval_data:
            return
        if load_best_model:
            checkpoint_file = model_file or self.saved_model_file
            if distributed.active() and not model_file and self._best_weights is not None:
                self.model.load_trainable_state_dict(self._best_weights)  # rank 0's checkpoint, held by every rank
            elif model_file or os.path.isfile(checkpoint_file):
                self.model.load_trainable_state_dict(self.load_checkpoint(checkpoint_file)["weights"])
                self.logger.info(f"Loading trained weights from {checkpoint_file}")
            elif self._best_weights is not None:
                self.model.load_trainable_state_dict(self._best_weights)
            elif self.epochs == 0:
                self.logger.info("epochs=0: nothing trained, evaluating the initial weights (zero-shot)")
            else:
                raise FileNotFoundError(f"no checkpoint {checkpoint_file} to load the best model from")
        result = super().evaluate(self.eval_subset(eval_data), load_best_model=False, show_progress=show_progress)
        self.model.log_pass("evaluation")
        return result


def get_trainer(model_type, model_name: str) -> type:
    """Trainer class: :class:`GenerativeTrainer` for the plugin's generative backends, else RecBole's lookup."""
    from recbole.utils import get_trainer as recbole_get_trainer

    from recbole_dealrec.model.backend import generative_backends

    if model_name in generative_backends():
        return GenerativeTrainer
    return recbole_get_trainer(model_type, model_name)
