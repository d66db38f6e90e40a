"""``run_recbole`` for the plugin: RecBole's quick start with a pruning step before training.

dataset -> signals a selection method declared (``scoring.signals``: surrogate -> influence, GraNd, EL2N,
embeddings; backend LLM -> effort) -> selection
(saved with its report) -> pruned train loader -> training -> test.
This is the only module that wires the stages together; ``recbole.quick_start`` is never imported
(it pulls in ray).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from logging import getLogger
from typing import Any, Optional, Sequence

import numpy as np

from recbole.utils import get_environment, init_logger, init_seed, set_color

from recbole_dealrec import distributed
from recbole_dealrec.config import DealrecConfig, check_known_keys, user_keys
from recbole_dealrec.data import create_dataset, data_preparation, prune_train_data, training_user_ids
from recbole_dealrec.evaluation import capture_user_results, check_reference_config, reference_results, save_user_results
from recbole_dealrec.export import check_export_config, export_path, export_selection, save_selection, selection_dir
from recbole_dealrec.registry import ConfigError
from recbole_dealrec.report import write_report
from recbole_dealrec.scoring.signals import check_signal_config, compute_signals
from recbole_dealrec.selection import SAMPLERS, check_selection_config, selection_rng
from recbole_dealrec.model import get_model, get_trainer
from recbole_dealrec.model.backend import GenerativeBackend
from recbole_dealrec.trainer import check_trainer_config
from recbole_dealrec.utils import StageTimer


def run_recbole(
    model: Optional[str] = None,
    dataset: Optional[str] = None,
    config_file_list: Optional[Sequence[str]] = None,
    config_dict: Optional[dict] = None,
    argv: Sequence[str] = (),
    saved: bool = True,
) -> dict[str, Any]:
    """Select training users with ``sampler``, train ``model`` on them, evaluate on the untouched test set.

    Returns RecBole's result dict (``best_valid_score``, ``valid_score_bigger``, ``best_valid_result``,
    ``test_result``) plus ``selection`` (a summary of what was kept and where it was saved) and
    ``evaluation_facts`` (a generative backend's facts about its test answers, e.g. BIGRec's exact-title share).
    """
    config = DealrecConfig(model, dataset, config_file_list, config_dict, argv=argv)
    method, model_class = check_run_config(config)
    needed = method.required_signals()
    # under torchrun: join the process group (gloo on CPU, NCCL on GPU); signals are then scored in shards
    distributed.init_from_env(config["distributed_timeout"], str(config["device"]))
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)

    timer = StageTimer()
    with timer("data"):
        dataset_obj = create_dataset(config)
        train_data, valid_data, test_data = data_preparation(config, dataset_obj)

    n_items = dataset_obj.item_num - 1  # without RecBole's padding id 0
    if max(config["topk"]) > n_items:
        raise ConfigError(f"topk={config['topk']}: a cut-off above the dataset's {n_items} items; set topk "
                          f"(properties/dataset/<dataset>.yaml, {config['dataset']}'s recbole_dealrec.yaml or --topk=[...])")
    candidates = training_user_ids(train_data.dataset)
    method.bind_data(train_data.dataset)
    budget = method.budget(len(candidates))
    method.check_budget(budget, len(candidates))
    signals, signal_meta = compute_signals(needed, config, train_data.dataset, candidates, timer)
    with timer("selection"):
        selection = method.select(candidates, signals, budget, selection_rng(config))
    full_train_dataset = train_data.dataset
    n_before = len(full_train_dataset)
    if method.prunes:
        train_data = prune_train_data(config, train_data, selection.user_ids)
    logger.info(
        set_color("[Selection]", "pink")
        + f" sampler={method.name}: kept {len(selection.user_ids)} of {len(candidates)} users, "
        f"{len(train_data.dataset)} of {n_before} training samples"
    )
    folder = selection_dir(config, budget, method.folder_settings(), signal_meta)
    facts = {"sampler": method.name, "dataset": config["dataset"], "model": config["model"], "budget": budget,
             "candidate_users": int(len(candidates)), "train_samples_before": int(n_before), "signals": signal_meta,
             "world_size": distributed.world_size()}
    generative = issubclass(model_class, GenerativeBackend)
    if not distributed.is_main() and not generative:
        # Every rank made the same selection (same seed, same gathered scores); rank 0 alone writes it, then trains
        # RecBole's own model and tests it on its own (many-process training is built for the generative backends).
        logger.info(set_color("[Distributed]", "pink") + f" rank {distributed.rank()}: selection done; rank 0 "
                    "saves it and trains the model")
        distributed.barrier()
        return {"selection": {**facts, "selected_users": int(len(selection.user_ids)), "folder": folder,
                              "user_ids": selection.user_ids}, "rank": distributed.rank()}
    if distributed.is_main():
        summary = save_selection(folder, selection, train_data.dataset, facts,
                                 run_config={"model": config["model"], **user_keys(config)})
        summary["report"] = write_report(folder, selection, full_train_dataset, plots=bool(config["report_plots"]))
        logger.info(set_color("[Selection]", "pink") + f" saved to {folder}")
    else:
        summary = {**facts, "selected_users": int(len(selection.user_ids))}
    summary["folder"] = folder
    distributed.barrier()
    # A RecBole model (SASRec ...) as the run's model: rank 0 trains and tests it alone (the others returned).
    with contextlib.nullcontext() if generative else distributed.solo():
        init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
        with distributed.main_first(), distributed.solo():  # rank 0 first builds what the model caches (semantic IDs)
            model_obj = model_class(config, train_data.dataset).to(config["device"])
        if distributed.active():  # every rank starts from rank 0's weights (the others' RNG went another way)
            model_obj.load_trainable_state_dict(distributed.broadcast_object(model_obj.trainable_state_dict()))
        logger.info(model_obj)
        if generative and distributed.is_main():
            model_obj.export(folder)  # e.g. TIGER's item semantic IDs, beside the selection
        config["checkpoint_dir"] = distributed.broadcast_object(
            run_checkpoint_dir(config) if distributed.is_main() else None)
        with distributed.main_first():  # rank 0 first: RecBole creates its folders without exist_ok
            trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model_obj)
        with timer("training"):
            best_valid_score, best_valid_result = trainer.fit(
                train_data, valid_data, saved=saved, show_progress=config["show_progress"]
            )
        last = getattr(trainer, "last_model_file", None)
        if last and os.path.isfile(last):  # only a resume needs it, and this training finished
            os.unlink(last)
        user_results_file = config["test_user_results_file"]
        # per-user results always (the reference rows are reported on the same users); losses only when asked
        capture = capture_user_results(trainer, dataset_obj.uid_field, max(config["topk"]),
                                       with_loss=bool(user_results_file and config["test_user_loss"]))
        with timer("test evaluation"), capture as per_user:
            test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
        if distributed.active():  # every rank tested its share of the users: all of them, in the one-process order
            gathered = {key: [part for part in distributed.gather_objects(per_user.get(key)) if part is not None]
                        for key in ("user_ids", "hits", "n_targets", "target_item", "loss")}  # the same keys on every rank
            per_user = {key: distributed.unshard_strided(parts) for key, parts in gathered.items() if parts}
        if user_results_file and distributed.is_main():
            save_user_results(user_results_file, per_user, dataset_obj)
        references = {}
        if distributed.is_main() and test_result is not None:
            with timer("reference rows"):
                references = reference_results(config, full_train_dataset, valid_data.dataset, test_data,
                                               user_ids=per_user.get("user_ids"))
        if distributed.is_main():
            for fmt in config["selection_export"]:
                with timer(f"export {fmt}"):
                    exported = export_selection(folder, fmt, export_path(folder, fmt))
                logger.info(set_color("[Selection]", "pink") + f" exported as {fmt}: {exported['counts']} records, "
                            f"{exported['paths']['train']}")
        summary["seconds"] = timer.seconds
        summary["checkpoint"] = trainer.saved_model_file if saved and os.path.isfile(trainer.saved_model_file) else None

        logger.info(set_color("[Time]", "pink") + f" all stages (s): {timer.seconds}")
        if distributed.active():
            logger.info(set_color("[Distributed]", "pink") + f" rank {distributed.rank()}: "
                        f"{distributed.collective_seconds():.1f} s in collectives")

        # RecBole's metrics are numpy scalars (printed as np.float64(...)): plain floats for logs and JSON
        test_result, best_valid_result = plain_numbers(test_result), plain_numbers(best_valid_result)
        environment_tb = get_environment(config)
        logger.info("The running environment of this training is as follows:\n" + environment_tb.draw())
        logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
        logger.info(set_color("test result", "yellow") + f": {test_result}")
        if distributed.is_main():
            logger.info(summary_block(config, test_result, references, summary, per_user))
        return {
            "best_valid_score": best_valid_score,
            "valid_score_bigger": config["valid_metric_bigger"],
            "best_valid_result": best_valid_result,
            "test_result": test_result,
            "reference_results": references,
            "evaluation_facts": model_obj.evaluation_facts() if isinstance(model_obj, GenerativeBackend) else {},
            "selection": summary,
            **({"rank": distributed.rank()} if distributed.active() else {}),
        }


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


def check_run_config(config: DealrecConfig):
    """Every check that needs no data, in the order a run meets them: unknown keys, the sampler and budget keys,
    the model's own keys (a backend's beam width, ID space, titles), the signals' keys. Raises ``ConfigError``;
    returns ``(selection method, model class)``. The experiment runner calls it on every cell before the first."""
    check_known_keys(config)
    method = check_selection_config(config)
    model_class = get_model(config["model"])
    if issubclass(model_class, GenerativeBackend):
        model_class.check_config(config)
        check_trainer_config(config)
    else:
        valid_metric = str(config["valid_metric"])
        if "@" in valid_metric and int(valid_metric.split("@")[1]) not in config["topk"]:
            raise ConfigError(f"valid_metric={valid_metric} needs its cut-off in topk={config['topk']}; set both")
    check_signal_config(method.required_signals(), config)
    check_export_config(config)
    check_reference_config(config)
    check_outputs_writable(config)
    return method, model_class


#: keys naming an output folder, and keys naming an output file (whose folder must be writable)
OUTPUT_FOLDER_KEYS = ("output_dir", "checkpoint_dir", "llm_cache_dir", "bigrec_item_emb_cache")
OUTPUT_FILE_KEYS = ("test_user_results_file", "bigrec_generations_file")


def check_outputs_writable(config) -> None:
    """Every place the run will write, checked before the first long stage by writing (and removing) a probe file
    in it, or in its nearest existing parent: an output found unwritable after training would lose the metrics.
    (A permission bit says little to root; a probe says what the file system does.)"""
    places = [(key, config[key]) for key in OUTPUT_FOLDER_KEYS if config[key]]
    places += [(key, os.path.dirname(os.path.abspath(os.path.expanduser(str(config[key])))))
               for key in OUTPUT_FILE_KEYS if config[key]]
    for key, folder in places:
        folder = os.path.abspath(os.path.expanduser(str(folder)))
        existing = folder
        while not os.path.exists(existing):  # the nearest existing parent: the run creates the rest
            existing = os.path.dirname(existing)
        try:
            if not os.path.isdir(existing):
                raise NotADirectoryError(f"{existing!r} is a file")
            handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=existing)
            os.close(handle)
            os.unlink(probe)
        except OSError as error:
            raise ConfigError(f"{key}: the run cannot write {folder!r} ({error.strerror or error})") from None


def run_checkpoint_dir(config) -> str:
    """This run's own checkpoint folder: a fresh one inside the ``checkpoint_dir`` the user set, else inside
    ``<output_dir>/<dataset>/checkpoints/``. RecBole names checkpoints by model and second, which two runs started
    together in one folder would share (and one would test the other's weights)."""
    given = user_keys(config).get("checkpoint_dir")
    root = str(given) if given else os.path.join(config["output_dir"], config["dataset"], "checkpoints")
    os.makedirs(root, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{config['model']}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=root)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry ``run_recbole`` / ``python -m recbole_dealrec``: RecBole's run_recbole.py arguments."""
    parser = argparse.ArgumentParser(
        prog="run_recbole",
        description="RecBole with a pruning step: --model=M --sampler=S [--dataset=D] [--config_files=a.yaml,b.yaml] "
        "[--key=value ...] (any RecBole or plugin config key)",
    )
    parser.add_argument("--model", "-m", default=None, help="plugin or RecBole model name (e.g. SASRec, BIGRec)")
    parser.add_argument("--dataset", "-d", default=None, help="dataset name (default: the embedded ml-100k)")
    parser.add_argument("--config_files", default=None, help="comma- or space-separated property files")
    parser.add_argument("--list-samplers", action="store_true", help="print the known samplers and exit")
    args, rest = parser.parse_known_args(argv)
    if args.list_samplers:
        import recbole_dealrec.selection  # noqa: F401

        for name in SAMPLERS.names():
            print(f"{name:<10} {SAMPLERS.get(name).description}")
        return
    files = [f for f in (args.config_files or "").replace(",", " ").split() if f]
    try:
        run_recbole(args.model, args.dataset, files, argv=rest)
    except (ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as error:
        # Bad input (a key, a value, a file): one clear line, no traceback; real bugs keep theirs.
        parser.exit(2, f"run_recbole: error: {error}\n")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
