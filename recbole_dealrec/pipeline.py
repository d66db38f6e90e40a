"""The stages of one run, in order, each a function with a typed input and output:

    setup_run -> load_data -> select_users -> fine_tune -> test_model -> run_result

``quick_start.run_recbole`` calls them; none reaches back into an earlier one (each gets what it needs as
arguments). What differs under torch.distributed is decided in one place, :class:`RunPolicy`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from logging import getLogger
from typing import Any, ContextManager, Optional

import numpy as np
from recbole.utils import get_environment, init_seed, set_color

from recbole_dealrec import distributed
from recbole_dealrec.compat import init_logger
from recbole_dealrec.config import DealrecConfig, user_keys
from recbole_dealrec.data import candidate_user_ids, create_dataset, data_preparation, prune_train_data
from recbole_dealrec.errors import ConfigError
from recbole_dealrec.evaluation import (capture_user_results, reference_results, save_user_results, target_train_counts,
                                        with_user_results)
from recbole_dealrec.export import export_path, export_selection, save_selection, selection_dir
from recbole_dealrec.model.backend import GenerativeBackend, load_backend_state, save_backend_state, state_digest
from recbole_dealrec.scoring.influence import recorded_influence_check
from recbole_dealrec.scoring.signals import compute_signals
from recbole_dealrec.selection import SelectionMethod, selection_rng
from recbole_dealrec.selection.base import Selection
from recbole_dealrec.selection.report import write_report
from recbole_dealrec.trainer import get_trainer
from recbole_dealrec.utils import StageTimer


@dataclasses.dataclass(frozen=True)
class RunPolicy:
    """What each process does in a run (one process: everything).

    A generative backend (BIGRec, TIGER) trains and tests on every rank (data-parallel). A RecBole model (SASRec
    ...) is trained and tested by rank 0 alone: the other ranks stop after the selection, which every rank made
    identically (same seed, same gathered scores). Rank 0 alone writes files.
    """

    generative: bool

    @property
    def writes_outputs(self) -> bool:
        return distributed.is_main()

    @property
    def stops_after_selection(self) -> bool:
        return not distributed.is_main() and not self.generative

    def model_stage(self) -> ContextManager:
        """Around building, training and testing the model: a RecBole model runs on rank 0 alone."""
        return contextlib.nullcontext() if self.generative else distributed.solo()

    def same_start(self, model) -> None:
        """Every rank starts from rank 0's weights (the others' RNG went another way)."""
        if distributed.active():
            model.load_trainable_state_dict(distributed.broadcast_object(model.trainable_state_dict()))

    def all_users(self, per_user: dict) -> dict:
        """Every rank tested its share of the users: all of them, in the one-process order."""
        if not distributed.active():
            return per_user
        gathered = {key: [part for part in distributed.gather_objects(per_user.get(key)) if part is not None]
                    for key in ("user_ids", "hits", "n_targets", "target_item", "loss")}  # the same keys on every rank
        return {key: distributed.unshard_strided(parts) for key, parts in gathered.items() if parts}


@dataclasses.dataclass
class RunSetup:
    """The run's config, its selection method and model class, and its policy."""

    config: DealrecConfig
    method: SelectionMethod
    model_class: type
    policy: RunPolicy
    timer: StageTimer


@dataclasses.dataclass
class RunData:
    """RecBole's dataset and its three loaders (the train loader before any pruning)."""

    dataset: Any
    train_data: Any
    valid_data: Any
    test_data: Any


@dataclasses.dataclass
class SelectedUsers:
    """The selection, the train loader pruned to it (the full one for a method that keeps every user) and its
    summary (what was kept; ``folder`` where it was saved)."""

    selection: Selection
    train_data: Any
    summary: dict


@dataclasses.dataclass
class FineTuned:
    """The trained model and its trainer, with RecBole's best validation score and result."""

    model: Any
    trainer: Any
    best_valid_score: Any
    best_valid_result: Optional[dict]


@dataclasses.dataclass
class Tested:
    """RecBole's test result, the per-user results behind it and the reference rows on the same users."""

    test_result: Optional[dict]
    per_user: dict
    references: dict


def setup_run(config: DealrecConfig, method: SelectionMethod, model_class: type) -> RunSetup:
    """Join the process group (under torchrun: gloo on CPU, NCCL on GPU), seed, and start RecBole's logger."""
    distributed.init_from_env(config["distributed_timeout"], str(config["device"]))
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)
    return RunSetup(config, method, model_class, RunPolicy(issubclass(model_class, GenerativeBackend)), StageTimer())


def load_data(setup: RunSetup) -> RunData:
    """RecBole's dataset and loaders; ``topk`` checked against the items."""
    config = setup.config
    with setup.timer("data"):
        dataset = create_dataset(config)
        train_data, valid_data, test_data = data_preparation(config, dataset)
    n_items = dataset.item_num - 1  # without RecBole's padding id 0
    if max(config["topk"]) > n_items:
        raise ConfigError(f"topk={config['topk']}: a cut-off above the dataset's {n_items} items; set topk "
                          f"(properties/dataset/<dataset>.yaml, {config['dataset']}'s recbole_dealrec.yaml or --topk=[...])")
    return RunData(dataset, train_data, valid_data, test_data)


def select_users(setup: RunSetup, data: RunData) -> SelectedUsers:
    """The signals the method declared, its selection within the budget, the pruned loader; rank 0 saves the
    selection (with its report) to its folder."""
    config, method, timer = setup.config, setup.method, setup.timer
    logger = getLogger()
    candidates = candidate_user_ids(data.train_data.dataset, config["candidate_period"])
    method.bind_data(data.train_data.dataset)
    budget = method.budget(len(candidates))
    method.check_budget(budget, len(candidates))
    signals, signal_meta = compute_signals(method.required_signals(), config, data.train_data.dataset, candidates,
                                           timer)
    with timer("selection"):
        selection = method.select(candidates, signals, budget, selection_rng(config))
    outside = np.setdiff1d(selection.user_ids, candidates)
    if len(outside):  # e.g. a selection_file naming users outside candidate_period's
        raise ConfigError(f"sampler={method.name}: {len(outside)} selected users are not candidates (candidate_period="
                          f"{config['candidate_period']}: users with a training sample in that period), e.g. "
                          f"{data.train_data.dataset.id2token(data.train_data.dataset.uid_field, outside[:1])[0]!r}")
    train_data, n_before = data.train_data, len(data.train_data.dataset)
    if method.prunes or config["candidate_period"] is not None:  # full keeps every candidate, no other user
        train_data = prune_train_data(config, train_data, selection.user_ids)
    logger.info(set_color("[Selection]", "pink") + f" sampler={method.name}: kept {len(selection.user_ids)} of "
                f"{len(candidates)} users, {len(train_data.dataset)} of {n_before} training samples")
    folder = selection_dir(config, budget, method.folder_settings(), signal_meta)
    facts = {"sampler": method.name, "dataset": config["dataset"], "model": config["model"], "budget": budget,
             "candidate_users": int(len(candidates)), "train_samples_before": int(n_before), "signals": signal_meta,
             "world_size": distributed.world_size()}
    if setup.policy.stops_after_selection:
        logger.info(set_color("[Distributed]", "pink") + f" rank {distributed.rank()}: selection done; rank 0 "
                    "saves it and trains the model")
        summary = {**facts, "selected_users": int(len(selection.user_ids)), "user_ids": selection.user_ids}
    elif setup.policy.writes_outputs:
        summary = save_selection(folder, selection, train_data.dataset, facts,
                                 run_config={"model": config["model"], **user_keys(config)})
        check = recorded_influence_check(config) if "influence" in selection.scores else None
        summary["report"] = write_report(folder, selection, data.train_data.dataset, plots=bool(config["report_plots"]),
                                         influence_check=check)
        logger.info(set_color("[Selection]", "pink") + f" saved to {folder}")
    else:
        summary = {**facts, "selected_users": int(len(selection.user_ids))}
    summary["folder"] = folder
    distributed.barrier()
    return SelectedUsers(selection, train_data, summary)


def fine_tune(setup: RunSetup, data: RunData, selected: SelectedUsers, saved: bool) -> FineTuned:
    """Build the model (rank 0 first: it builds what the model caches, e.g. semantic IDs) and train it on the
    selected users with its trainer, in this run's own checkpoint folder."""
    config = setup.config
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    with distributed.main_first(), distributed.solo():
        model = setup.model_class(config, selected.train_data.dataset).to(config["device"])
    if config["backend_init"]:  # continue from an earlier run's weights (a stream's next round)
        digest = load_backend_state(model, str(config["backend_init"]))
        getLogger().info(set_color("[Backend]", "pink") + f" starts from {config['backend_init']} ({digest[:12]})")
    setup.policy.same_start(model)
    if setup.policy.generative:
        selected.summary["backend_start_digest"] = state_digest(model.trainable_state_dict())
    getLogger().info(model)
    if setup.policy.generative and setup.policy.writes_outputs:
        model.export(selected.summary["folder"])  # e.g. TIGER's item semantic IDs, beside the selection
    config["checkpoint_dir"] = distributed.broadcast_object(
        run_checkpoint_dir(config) if distributed.is_main() else None)
    with distributed.main_first():  # rank 0 first: RecBole creates its folders without exist_ok
        trainer = with_user_results(get_trainer(config["MODEL_TYPE"], config["model"]))(config, model)
    with setup.timer("training"):
        best_valid_score, best_valid_result = trainer.fit(
            selected.train_data, data.valid_data, saved=saved, show_progress=config["show_progress"])
    last = getattr(trainer, "last_model_file", None)
    if last and os.path.isfile(last):  # only a resume needs it, and this training finished
        os.unlink(last)
    return FineTuned(model, trainer, best_valid_score, best_valid_result)


def test_model(setup: RunSetup, data: RunData, selected: SelectedUsers, tuned: FineTuned, saved: bool) -> Tested:
    """RecBole's test evaluation with per-user results (always: the reference rows are ranked on the same users;
    losses only when asked), the reference rows, and the selection exports asked for."""
    config, timer, policy = setup.config, setup.timer, setup.policy
    user_results_file = config["test_user_results_file"]
    capture = capture_user_results(tuned.trainer, data.dataset.uid_field, max(config["topk"]),
                                   with_loss=bool(user_results_file and config["test_user_loss"]))
    with timer("test evaluation"), capture as per_user:
        test_result = tuned.trainer.evaluate(data.test_data, load_best_model=saved,
                                             show_progress=config["show_progress"])
    per_user = policy.all_users(per_user)
    if "target_item" in per_user:  # the sensitivity columns need to know which targets are cold
        per_user["target_train_count"] = target_train_counts(data.train_data.dataset, per_user["target_item"])
    references = {}
    if policy.writes_outputs:
        if user_results_file:
            save_user_results(user_results_file, per_user, data.dataset)
        if test_result is not None:
            with timer("reference rows"):
                references = reference_results(config, data.train_data.dataset, data.valid_data.dataset,
                                               data.test_data, user_ids=per_user.get("user_ids"))
        folder = selected.summary["folder"]
        for fmt in config["selection_export"]:
            with timer(f"export {fmt}"):
                exported = export_selection(folder, fmt, export_path(folder, fmt))
            getLogger().info(set_color("[Selection]", "pink") + f" exported as {fmt}: {exported['counts']} records, "
                             f"{exported['paths']['train']}")
    return Tested(test_result, per_user, references)


def export_backend(setup: RunSetup, selected: SelectedUsers, tuned: FineTuned) -> None:
    """``backend_export``: rank 0 writes the tested (best by validation) trainable weights, a later run's
    ``backend_init``; the summary records their digest."""
    path = setup.config["backend_export"]
    if path and setup.policy.writes_outputs:
        selected.summary["backend_export"] = {"path": os.path.abspath(str(path)),
                                              "digest": save_backend_state(tuned.model, str(path))}
        getLogger().info(set_color("[Backend]", "pink") + f" trained weights saved to {path}")


def run_result(setup: RunSetup, selected: SelectedUsers, tuned: FineTuned, tested: Tested, saved: bool
               ) -> dict[str, Any]:
    """Log the end of the run (timings, environment, metrics beside the reference rows) and return its result."""
    config, logger = setup.config, getLogger()
    summary = selected.summary
    summary["seconds"] = setup.timer.seconds
    checkpoint = tuned.trainer.saved_model_file
    summary["checkpoint"] = checkpoint if saved and os.path.isfile(checkpoint) else None
    summary["peak_rss_gb"] = setup.timer.peak_gb
    logger.info(set_color("[Time]", "pink") + f" all stages (s): {setup.timer.seconds}")
    logger.info(set_color("[Memory]", "pink") + f" peak RSS per stage (GB): {setup.timer.peak_gb}")
    if distributed.active():
        logger.info(set_color("[Distributed]", "pink") + f" rank {distributed.rank()}: "
                    f"{distributed.collective_seconds():.1f} s in collectives")
    # RecBole's metrics are numpy scalars (printed as np.float64(...)): plain floats for logs and JSON
    test_result, best_valid_result = plain_numbers(tested.test_result), plain_numbers(tuned.best_valid_result)
    logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    if setup.policy.writes_outputs:
        logger.info(summary_block(config, test_result, tested.references, summary, tested.per_user))
    return {
        "best_valid_score": tuned.best_valid_score,
        "valid_score_bigger": tuned.trainer.valid_metric_bigger,
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "reference_results": tested.references,
        "evaluation_facts": tuned.model.evaluation_facts() if isinstance(tuned.model, GenerativeBackend) else {},
        "selection": summary,
        **({"rank": distributed.rank()} if distributed.active() else {}),
    }


def selection_only_result(selected: SelectedUsers) -> dict[str, Any]:
    """The result of a rank that stops after the selection (see :class:`RunPolicy`)."""
    return {"selection": selected.summary, "rank": distributed.rank()}


def run_checkpoint_dir(config) -> str:
    """This run's own checkpoint folder: a fresh one inside the ``checkpoint_dir`` the user set, else inside
    ``<output_dir>/<dataset>/checkpoints/``. RecBole names checkpoints by model and second, which two runs started
    together in one folder would share (and one would test the other's weights)."""
    import tempfile
    import time

    given = user_keys(config).get("checkpoint_dir")
    root = str(given) if given else os.path.join(config["output_dir"], config["dataset"], "checkpoints")
    os.makedirs(root, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{config['model']}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=root)


def summary_block(config, test_result: Optional[dict], references: dict, summary: dict, per_user: dict) -> str:
    """The end of a run, readable: the model's metrics beside the reference rows on the same test users, what
    was kept, and where the outputs are."""
    metrics = list((test_result or {}).keys())
    width = max([len("model") + 2] + [len(name) for name in references])
    lines = [f"{'':<{width}}  " + "  ".join(f"{m:>10}" for m in metrics)]
    for name, values in [(f"{config['model']}", test_result or {}), *references.items()]:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{values.get(m, float('nan')):>10.4f}" for m in metrics))
    n_users = len(per_user.get("user_ids", ()))
    head = (f"Result on {n_users} test users (references ranked on the same users: popularity over all training "
            f"rows, over the recent window ({config['reference_recent_window']}), random):")
    kept = (f"kept {summary.get('selected_users')} of {summary.get('candidate_users')} users, "
            f"{summary.get('kept_train_samples', '?')} of {summary.get('train_samples_before')} training samples "
            f"(sampler {summary.get('sampler')})")
    folder = summary.get("folder")
    where = [f"selection: {folder}", f"report: {os.path.join(folder, 'report.json') if folder else '-'}",
             f"checkpoint: {summary.get('checkpoint') or '-'}"]
    return "\n".join([head, *lines, kept, *where])


def plain_numbers(value: Any) -> Any:
    """``value`` with every numpy scalar inside (dict values, list items) turned into a plain Python number."""
    if isinstance(value, dict):
        return {k: plain_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_numbers(v) for v in value)
    return value.item() if isinstance(value, np.generic) else value
