"""Run a stream: cut the dataset into periods, then one full run (``run_recbole``) per round, resumable.

    check every key (the run's and the stream's) -> cut the periods -> check each round's budget
    -> write the round datasets -> run round 0, 1, ... (a finished round is reused) -> report

Everything lives under ``stream_output``: ``stream.json`` (what the stream is: the source's fingerprint, the cut,
the run's keys; a folder holding another stream is an error), ``datasets/<dataset>-r<k>/`` (the round datasets),
``rounds/r<k>/`` (each round's run: selection, checkpoints, ``result.json`` written when the round ends) and
``report.{md,json}``. A killed stream restarts at the first round without a ``result.json``; that round reruns
from its start and, with the same seed, makes the same selection.

``stream_update: scratch`` trains every round from zero (a fresh surrogate, its signals, the backend from its base
weights); ``incremental`` starts round r >= 1 from round r-1: the surrogate warm-started from its weights (item rows
matched by token), the backend from its tested weights, TIGER's item IDs read from it (every item keeps its ID), each
for ``stream_warm_epochs``. The signals are recomputed in every round: each is a function of the surrogate or the
backend, both of which changed. ``none`` tests round 0's backend again in every later round, untrained: the model
not updated, the reference an update must beat.

Round 0 is the same run whatever ``stream_update`` is (it starts from nothing, and ``stream_warm_epochs`` applies
from round 1): with ``stream_round0_from`` a stream copies a sibling's finished round 0 (same source, cut, model and
run keys, seed included) instead of running it again, bit for bit the run it would have made.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from logging import getLogger
from typing import Any, Optional, Sequence

import numpy as np
from recbole.utils import set_color

from recbole_dealrec import distributed
from recbole_dealrec.compat import init_logger
from recbole_dealrec.config import (PROPERTIES_DIR, DealrecConfig, StageArguments, check_known_keys, read_property_file,
                                    user_keys)
from recbole_dealrec.data.dataset import SPLITS
from recbole_dealrec.errors import ConfigError, check_integer
from recbole_dealrec.model.backend import GenerativeBackend
from recbole_dealrec.stream import periods
from recbole_dealrec.utils import atomic_write, dataset_fingerprint, stable_key

#: the stream's report, as <stream_output>/report.json and report.md
REPORT_FILE = "report"
#: the facts of a stream its round 0 does not depend on: a sibling differing only in these has the same round 0
ROUND0_FREE_FACTS = ("update", "warm_epochs")
#: stream_update's values: every round from zero; from the previous round's surrogate and backend; or round 0's
#: backend tested again in every later round, untrained (the model not updated)
STREAM_UPDATES = ("scratch", "incremental", "none")
UPDATE_WORDS = {"scratch": "Every round is trained from scratch.",
                "incremental": "Round r >= 1 starts from round r-1's surrogate and backend (incremental).",
                "none": "Round r >= 1 tests round 0's backend again, untrained (the model not updated)."}


@dataclasses.dataclass(frozen=True)
class StreamArguments(StageArguments):
    """The stream's keys of ``properties/stream.yaml`` (see the comments there)."""

    property_file = ("", "stream")

    stream_periods: Optional[int]
    stream_cut_times: Optional[list]
    stream_output: str
    stream_update: str
    stream_warm_epochs: Optional[int]
    stream_ihvp_warm_start: bool
    stream_round0_from: Optional[str]

    def check(self) -> None:
        if self.stream_update not in STREAM_UPDATES:
            raise ConfigError(f"stream_update={self.stream_update!r}: allowed {', '.join(STREAM_UPDATES)}")
        check_integer("stream_warm_epochs", self.stream_warm_epochs, 1, none_ok=True)

    @classmethod
    def of_run(cls, config) -> "StreamArguments":
        """The stream keys a run's config was given, over ``properties/stream.yaml``'s defaults (a run's config
        layers no stream file: only the stream reads these keys)."""
        defaults = read_property_file(os.path.join(PROPERTIES_DIR, "stream.yaml"))
        return cls.from_config({**defaults, **{k: config[k] for k in defaults if config[k] is not None}})

    @property
    def continues(self) -> bool:
        """Whether round r >= 1 starts the backend from round r-1's weights (incremental, none)."""
        return self.stream_update != "scratch"


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """Round ``index``: its dataset's name, each source interaction's split in it (object [n]: train / valid / test
    or "") and its candidates (users with a training interaction in period ``index``)."""

    index: int
    dataset: str
    labels: np.ndarray
    n_candidates: int

    def split_counts(self) -> dict[str, int]:
        return {split: int((self.labels == split).sum()) for split in SPLITS}


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    """The cut and its rounds, and the key naming the stream (source data, cut and the run's keys)."""

    cut: periods.PeriodCut
    rounds: tuple[RoundPlan, ...]
    key: str
    facts: dict


def plan_stream(config: DealrecConfig, args: StreamArguments) -> tuple[StreamPlan, Any]:
    """Cut the source dataset into periods and label every interaction for each round; return the plan and the
    source's interactions (as text). Raises ``ConfigError`` before any training on bad keys or periods."""
    name = config["dataset"]
    split_field = config["split_field"]
    periods.check_stream_keys(args.stream_periods, args.stream_cut_times, split_field, config["TIME_FIELD"], name)
    frame = periods.read_interactions(config)
    user_column = periods.column(frame, config["USER_ID_FIELD"])
    time_column = periods.column(frame, config["TIME_FIELD"]) if config["TIME_FIELD"] else None
    times = frame[time_column].astype(float).to_numpy() if time_column else None
    if split_field:
        split_column = periods.column(frame, split_field)
        if split_column is None:
            raise ConfigError(f"split_field={split_field}: dataset {name}'s .inter has no such column")
        cut = periods.cut_by_split(frame[split_column].to_numpy())
    else:
        if time_column is None:
            raise ConfigError(f"TIME_FIELD={config['TIME_FIELD']}: dataset {name}'s .inter has no such column; "
                              "periods need interaction times")
        cut = periods.cut_by_time(times, args.stream_periods, args.stream_cut_times)
    users = frame[user_column].to_numpy()
    order = periods.user_time_order(users, times, cut.period)
    # a user's first interaction is no sample's target: it never makes the user a candidate
    first_of_user = np.zeros(len(users), dtype=bool)
    first_of_user[order[np.r_[True, users[order][1:] != users[order][:-1]]]] = True
    rounds = []
    for index in range(cut.n_periods - 1):
        labels = periods.round_splits(users, cut.period, order, index)
        new_training = (labels == "train") & (cut.period == index) & ~first_of_user
        rounds.append(RoundPlan(index, f"{name}-r{index}", labels, int(len(np.unique(users[new_training])))))
    facts = {"dataset": name, "source_fingerprint": dataset_fingerprint(config), "cut": cut.source,
             "cut_times": list(cut.cut_times), "interactions_per_period": cut.counts(), "model": config["model"],
             "update": args.stream_update, "warm_epochs": args.stream_warm_epochs, "run_keys": round_keys(config)}
    return StreamPlan(cut, tuple(rounds), stable_key(facts), facts), frame


def round_keys(config: DealrecConfig) -> dict:
    """The keys the user gave the stream, but the stream's own: every round's run gets them."""
    stream_keys = set(StreamArguments.declared_keys())
    return {k: v for k, v in user_keys(config).items() if k not in stream_keys and k not in ("dataset", "model")}


def check_round_budgets(plan: StreamPlan, method) -> list[int]:
    """Each round's budget among its candidates (``ConfigError`` when a new period has fewer users than the
    budget), before any dataset is written."""
    budgets = []
    for round_plan in plan.rounds:
        n = round_plan.n_candidates
        where = (f"round {round_plan.index}'s new period {round_plan.index} has {n} users with a training "
                 "interaction; lower selection_num or cut fewer periods")
        if n == 0:
            raise ConfigError(f"selection_num={method.config['selection_num']}: {where}")
        try:
            budget = method.budget(n)  # the sampler's own budget checks (resolve_budget, check_budget)
            method.check_budget(budget, n)
        except ConfigError as error:
            raise ConfigError(f"{error}: {where}") from None
        budgets.append(budget)
    return budgets


def changed_facts(theirs: dict, ours: dict) -> list[str]:
    """The keys whose values differ between two mappings (one missing counts as differing), sorted."""
    return sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))


def claim_output(folder: str, plan: StreamPlan) -> None:
    """``stream_output`` holds this stream or nothing: write its ``stream.json``, or check the one there."""
    path = os.path.join(folder, "stream.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            found = json.load(handle)
        if found.get("key") != plan.key:
            changed = changed_facts(found.get("facts", {}), plan.facts)
            raise ConfigError(f"stream_output={folder}: holds a stream of another configuration (differs in "
                              f"{', '.join(changed) or 'its key'}); choose another stream_output or remove it")
        return
    if os.path.isdir(folder) and os.listdir(folder):
        raise ConfigError(f"stream_output={folder}: a folder that is not a stream's (no stream.json) and not empty; "
                          "choose another stream_output")
    with atomic_write(path, encoding="utf-8") as handle:
        json.dump({"key": plan.key, "facts": plan.facts}, handle, indent=1)


def run_stream(model: Optional[str] = None, dataset: Optional[str] = None,
               config_file_list: Optional[Sequence[str]] = None, config_dict: Optional[dict] = None,
               argv: Sequence[str] = ()) -> dict[str, Any]:
    """Every round of the stream, in order (see the module docstring); returns the report (also written)."""
    from recbole_dealrec.quick_start import check_run_config, run_recbole

    config = DealrecConfig(model, dataset, config_file_list, {**(config_dict or {})}, argv=argv)
    check_known_keys(config)
    if user_keys(config).get("candidate_period") is not None:
        raise ConfigError("candidate_period: the stream sets it to each round's new period; unset it")
    args = StreamArguments.of_run(config)
    method, model_class = check_run_config(config)  # every key of the rounds' runs, before any work
    if args.continues and not issubclass(model_class, GenerativeBackend):
        raise ConfigError(f"stream_update={args.stream_update}: continues a generative backend (BIGRec, TIGER) from "
                          f"round to round; the run's model is {config['model']} (use stream_update: scratch)")
    init_logger(config)  # one log for the whole stream (RecBole's logger keeps the first run's handlers)
    plan, frame = plan_stream(config, args)
    budgets = check_round_budgets(plan, method)
    folder = os.path.abspath(os.path.expanduser(args.stream_output))
    sibling = check_round0_source(args.stream_round0_from, folder, plan) if args.stream_round0_from else None
    logger = getLogger()
    distributed.init_from_env(config["distributed_timeout"], str(config["device"]))
    with distributed.main_first():
        if distributed.is_main():
            claim_output(folder, plan)
            layer = periods.dataset_layer(config, PROPERTIES_DIR)
            for round_plan in plan.rounds:
                write_round(folder, round_plan, plan, frame, config, layer)
            if sibling is not None:
                adopt_round0(sibling, folder, plan)
    results = []
    for round_plan, budget in zip(plan.rounds, budgets):
        path = os.path.join(folder, "rounds", f"r{round_plan.index}", "result.json")
        found = _read_json(path)
        if found is not None and found.get("stream_key") == plan.key:
            logger.info(set_color("[Stream]", "pink") + f" round {round_plan.index}: finished before, reused {path}")
            results.append(found)
            continue
        round_dict = {**round_keys(config), "data_path": os.path.join(folder, "datasets"),
                      "output_dir": os.path.dirname(path), "candidate_period": round_plan.index,
                      **round_files(folder, round_plan.index, model_class, args,
                                    results[-1] if results else None, config)}
        untrained = round_dict.get("epochs") == 0
        logger.info(set_color("[Stream]", "pink") + f" round {round_plan.index}: "
                    + ("tests the previous round's backend untrained" if untrained else
                       f"learns from periods 0..{round_plan.index}, selects {budget} of {round_plan.n_candidates} "
                       f"users of period {round_plan.index}")
                    + f", is evaluated on period {round_plan.index + 1}")
        result = run_recbole(config["model"], round_plan.dataset, config_dict=round_dict)
        record = round_record(round_plan, plan, budget, result, round_dict)
        if distributed.is_main():
            with atomic_write(path, encoding="utf-8") as handle:
                json.dump(record, handle, indent=1, default=_as_json)
        results.append(record)
    report = stream_report(plan, results)
    if distributed.is_main():
        write_report(folder, report)
        logger.info(set_color("[Stream]", "pink") + f" report: {os.path.join(folder, REPORT_FILE + '.md')}")
    return report


def check_round0_source(source: str, folder: str, plan: StreamPlan) -> str:
    """``stream_round0_from``: the folder of a stream whose finished round 0 is this stream's (its facts equal this
    stream's but for :data:`ROUND0_FREE_FACTS`); returns its absolute path, else ``ConfigError`` before any work."""
    source = os.path.abspath(os.path.expanduser(source))
    where = f"stream_round0_from={source}"
    if source == folder:
        raise ConfigError(f"{where}: is this stream's own stream_output; name a sibling stream's folder")
    found = _read_json(os.path.join(source, "stream.json"))
    if found is None:
        raise ConfigError(f"{where}: no stream.json there; name the stream_output of a stream run before")
    theirs = found.get("facts", {})
    changed = [k for k in changed_facts(theirs, plan.facts) if k not in ROUND0_FREE_FACTS]
    if changed:
        detail = ", ".join(k if k != "run_keys" else
                           f"run_keys ({', '.join(changed_facts(theirs.get(k, {}), plan.facts[k]))})" for k in changed)
        raise ConfigError(f"{where}: a stream of another configuration (differs in {detail}); round 0 is shared only "
                          f"by streams that differ in {' / '.join(ROUND0_FREE_FACTS)} alone")
    record = _read_json(os.path.join(source, "rounds", "r0", "result.json"))
    if record is None or record.get("stream_key") != found.get("key"):
        raise ConfigError(f"{where}: its round 0 has not finished (no rounds/r0/result.json); run that stream first")
    return source


def adopt_round0(source: str, folder: str, plan: StreamPlan) -> None:
    """Copy the sibling stream ``source``'s round 0 (checked by :func:`check_round0_source`) into ``folder`` as this
    stream's, unless this stream's round 0 has finished. Its ``result.json`` gets this stream's key, names files
    under ``folder`` and records ``copied_from``; every other file is copied byte for byte. An unfinished round 0
    of this stream is replaced; the copy is moved into place whole, so a killed copy leaves no round 0."""
    target = os.path.join(folder, "rounds", "r0")
    done = _read_json(os.path.join(target, "result.json"))
    if done is not None and done.get("stream_key") == plan.key:
        return
    staging = os.path.join(folder, "rounds", ".r0.copy")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(os.path.join(source, "rounds", "r0"), staging)
    with open(os.path.join(staging, "result.json"), encoding="utf-8") as handle:
        text = handle.read()
    # file names in the record: the sibling's folder becomes this one (JSON-escaped, as json.dump wrote them)
    record = json.loads(text.replace(json.dumps(source)[1:-1] + "/", json.dumps(folder)[1:-1] + "/"))
    record.update({"stream_key": plan.key, "copied_from": source})
    with atomic_write(os.path.join(staging, "result.json"), encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    getLogger().info(set_color("[Stream]", "pink") + f" round 0: copied from {source} (its round 0 is this stream's)")


def write_round(folder: str, round_plan: RoundPlan, plan: StreamPlan, frame, config, layer: dict) -> None:
    """Round ``round_plan``'s dataset under ``<folder>/datasets/``, unless the one there is this stream's."""
    target = os.path.join(folder, "datasets", round_plan.dataset)
    marker = os.path.join(target, ".stream_key")
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as handle:
            if handle.read().strip() == plan.key:
                return
    periods.write_round_dataset(frame, round_plan.labels, plan.cut.period, target, round_plan.dataset,
                                config["data_path"], config["dataset"], layer, round_plan.index)
    with atomic_write(marker, encoding="utf-8") as handle:
        handle.write(plan.key + "\n")
    getLogger().info(set_color("[Stream]", "pink") + f" wrote {target}: {round_plan.split_counts()} (rows per split)")


def round_files(folder: str, index: int, model_class: type, args: StreamArguments, previous: Optional[dict],
                config) -> dict:
    """The keys of round ``index``'s run that name files: what it exports (its surrogate, its iHVP solution, a
    generative backend's weights) and, in an incremental round, what it starts from (the previous round's exports,
    with ``stream_ihvp_warm_start`` CG from its iHVP solution, the backend's
    :meth:`~GenerativeBackend.continuation_keys`) and its epochs (``stream_warm_epochs``)."""
    own = os.path.join(folder, "rounds", f"r{index}")
    generative = issubclass(model_class, GenerativeBackend)
    keys = {"surrogate_export": os.path.join(own, "surrogate.pt"), "influence_ihvp_export": os.path.join(own, "ihvp.pt"),
            **({"backend_export": os.path.join(own, "backend.pt")} if generative else {})}
    if not args.continues or index == 0:
        return keys
    before = os.path.join(folder, "rounds", f"r{index - 1}")
    keys["backend_init"] = os.path.join(before, "backend.pt")
    keys.update(model_class.continuation_keys(previous["selection"]["folder"]))
    if args.stream_update == "none":  # test round r-1's backend (round 0's, by induction) untrained: no selection
        return {**keys, "epochs": 0, "sampler": "full", "selection_num": None, "selection_ratio": None}
    surrogate = os.path.join(before, "surrogate.pt")
    if os.path.isfile(surrogate):  # a sampler without signals from a surrogate trains none
        keys["surrogate_init"] = surrogate
    ihvp = os.path.join(before, "ihvp.pt")
    if args.stream_ihvp_warm_start and os.path.isfile(ihvp):  # written where the round computed influence
        keys["influence_ihvp_init"] = ihvp
    if args.stream_warm_epochs is not None:
        block = dict(config["surrogate_config"] or {})
        keys.update({"epochs": args.stream_warm_epochs,
                     "surrogate_config": {**block, "epochs": args.stream_warm_epochs}})
    return keys


def round_record(round_plan: RoundPlan, plan: StreamPlan, budget: int, result: dict, round_dict: dict) -> dict:
    """What ``result.json`` keeps of a round's run (plain numbers; the selection's summary without its ids)."""
    from recbole_dealrec.pipeline import plain_numbers

    selection = {k: v for k, v in (result.get("selection") or {}).items() if k != "user_ids"}
    return plain_numbers({
        "stream_key": plan.key, "round": round_plan.index, "dataset": round_plan.dataset,
        "learns_from_periods": list(range(round_plan.index + 1)), "evaluated_on_period": round_plan.index + 1,
        "rows": round_plan.split_counts(), "candidates": round_plan.n_candidates,
        "budget": selection.get("budget", budget),  # a round without training keeps every candidate
        "test_result": result.get("test_result"), "best_valid_result": result.get("best_valid_result"),
        "reference_results": result.get("reference_results"), "seconds": selection.get("seconds") or {},
        "reused_signals": _reused_signals(selection),
        "started_from": {k: round_dict[k] for k in ("surrogate_init", "backend_init", "tiger_semantic_ids_file",
                                                    "influence_ihvp_init") if k in round_dict},
        "selection": selection,
    })


def _reused_signals(selection: dict) -> dict[str, float]:
    """The signals a run reused from the cache (a resumed round), with what computing them took (kept with the
    entry: ``compute_seconds``)."""
    return {name: meta["compute_seconds"] for name, meta in (selection.get("signals") or {}).items()
            if isinstance(meta, dict) and meta.get("cached") and meta.get("compute_seconds") is not None}


def round_cost(record: dict) -> dict[str, float]:
    """The seconds of a round's work per stage: its run's own stages (each counted once), a signal reused from the
    cache at what computing it took. A record written before stages were counted once (no ``reused_signals``): its
    surrogate's seconds were also inside the first signal's stage, so they are left out."""
    seconds = dict(record.get("seconds") or {})
    if "reused_signals" not in record and any(stage.endswith(" signal") for stage in seconds):
        seconds.pop("surrogate", None)
    reused = _reused_signals(record.get("selection") or {})
    return {**seconds, **{f"{name} signal": value for name, value in reused.items()}}


def stream_report(plan: StreamPlan, results: list[dict]) -> dict:
    """The stream's per-round table: each round's metrics beside its reference rows, its rows and seconds."""
    return {"stream_key": plan.key, **plan.facts, "rounds": results}


def report_markdown(report: dict) -> str:
    """``report.md``: one row per round, the model's metrics and the reference rows on the same test users."""
    rounds = report["rounds"]
    metrics = list((rounds[0].get("test_result") or {}).keys()) if rounds else []
    references = list((rounds[0].get("reference_results") or {}).keys()) if rounds else []
    lines = [f"# Stream of {report['dataset']} ({report['model']}, cut by {report['cut']}: "
             f"{report['interactions_per_period']} interactions per period)", "",
             "Round r learns from periods 0..r, selects among the users of period r, is evaluated on period r+1. "
             + UPDATE_WORDS[report["update"]], ""]
    header = ["round", "candidates", "budget", "train / valid / test rows", "row", *metrics, "seconds"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in rounds:
        rows = record["rows"]
        seconds = sum(round_cost(record).values())
        for name, values in [(report["model"], record.get("test_result") or {}),
                             *((ref, (record.get("reference_results") or {}).get(ref, {})) for ref in references)]:
            first = name == report["model"]
            lines.append("| " + " | ".join([
                str(record["round"]) if first else "", str(record["candidates"]) if first else "",
                str(record["budget"]) if first else "",
                f"{rows['train']} / {rows['valid']} / {rows['test']}" if first else "", name,
                *(f"{values.get(m, float('nan')):.4f}" for m in metrics),
                (f"{seconds:.0f}" + (" (copied)" if record.get("copied_from") else "")) if first else ""]) + " |")
    return "\n".join(lines) + "\n"


def write_report(folder: str, report: dict) -> None:
    with atomic_write(os.path.join(folder, REPORT_FILE + ".json"), encoding="utf-8") as handle:
        json.dump(report, handle, indent=1, default=_as_json)
    with atomic_write(os.path.join(folder, REPORT_FILE + ".md"), encoding="utf-8") as handle:
        handle.write(report_markdown(report))


def _as_json(value: Any) -> Any:
    """JSON for what a run's summary may hold beyond plain numbers (numpy arrays, e.g. a signal's ids)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} in a round's record is not JSON")


def _read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)

