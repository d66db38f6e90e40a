"""``run_recbole`` for the plugin: RecBole's quick start with a pruning step before training.

dataset -> signals a selection method declared (``scoring.signals``: surrogate -> influence, GraNd, EL2N,
embeddings; backend LLM -> effort) -> selection (saved with its report) -> pruned train loader -> training -> test.
The stages are the functions of :mod:`recbole_dealrec.pipeline`; this module checks a run's config before any
of them and calls them in order. ``recbole.quick_start`` is never imported (it pulls in ray).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any, Optional, Sequence

from recbole_dealrec import distributed, pipeline
from recbole_dealrec.config import DealrecConfig, check_known_keys
from recbole_dealrec.errors import ConfigError
from recbole_dealrec.evaluation import check_reference_config
from recbole_dealrec.export import check_export_config
from recbole_dealrec.model import get_model
from recbole_dealrec.model.backend import GenerativeBackend
from recbole_dealrec.scoring.signals import check_signal_config
from recbole_dealrec.selection import SAMPLERS, check_selection_config
from recbole_dealrec.surrogate.train import check_surrogate_config
from recbole_dealrec.trainer import check_trainer_config


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
    ``test_result``) plus ``reference_results`` (popularity, recent popularity and random ranking on the same test
    users), ``selection`` (a summary of what was kept and where it was saved) and ``evaluation_facts`` (a
    generative backend's facts about its test answers, e.g. BIGRec's exact-title share). The stages are those of
    :mod:`recbole_dealrec.pipeline`.
    """
    config = DealrecConfig(model, dataset, config_file_list, config_dict, argv=argv)
    method, model_class = check_run_config(config)  # every check that needs no data, before any long work
    setup = pipeline.setup_run(config, method, model_class)
    data = pipeline.load_data(setup)
    selected = pipeline.select_users(setup, data)
    if setup.policy.stops_after_selection:
        return pipeline.selection_only_result(selected)
    with setup.policy.model_stage():
        tuned = pipeline.fine_tune(setup, data, selected, saved)
        tested = pipeline.test_model(setup, data, selected, tuned, saved)
        pipeline.export_backend(setup, selected, tuned)
        return pipeline.run_result(setup, selected, tuned, tested, saved)


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
        init = config["backend_init"]
        if init is not None and not os.path.isfile(str(init)):
            raise ConfigError(f"backend_init={init!r}: no such file (one a run's backend_export wrote)")
    else:
        for key in ("backend_init", "backend_export"):
            if config[key] is not None:
                raise ConfigError(f"{key}: only a generative backend (BIGRec, TIGER) starts from or saves its "
                                  f"trainable weights this way; the run's model is {config['model']}")
        valid_metric = str(config["valid_metric"])
        if "@" in valid_metric and int(valid_metric.split("@")[1]) not in config["topk"]:
            raise ConfigError(f"valid_metric={valid_metric} needs its cut-off in topk={config['topk']}; set both")
    check_signal_config(method.required_signals(), config)
    check_surrogate_config(config)
    check_export_config(config)
    check_reference_config(config)
    check_outputs_writable(config)
    return method, model_class


#: keys naming an output folder, and keys naming an output file (whose folder must be writable)
OUTPUT_FOLDER_KEYS = ("output_dir", "checkpoint_dir", "llm_cache_dir", "bigrec_item_emb_cache")
OUTPUT_FILE_KEYS = ("test_user_results_file", "bigrec_generations_file", "backend_export", "surrogate_export")


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
