"""The stream (recbole_dealrec.stream): periods cut exactly by time or by a paper-format split, each round's
pre-split dataset, its candidates, bad input before any training, and a resumable run on real RecBole data."""
from __future__ import annotations

import collections
import glob
import json
import os
import shutil

import numpy as np
import pytest

from recbole_dealrec.errors import ConfigError
from recbole_dealrec.stream import periods, run_stream
from tests.conftest import TINY_SASREC


def test_equal_count_periods_cut_at_the_sorted_times_and_keep_equal_times_together():
    times = np.array([5, 1, 3, 2, 4, 6, 8, 7, 9, 10], dtype=float)
    cut = periods.cut_by_time(times, stream_periods=3)
    assert cut.cut_times == (4.0, 7.0)  # sorted times[3], times[6]
    assert cut.period.tolist() == [1, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    # equal times at a cut all go to the later period
    tied = periods.cut_by_time(np.array([1, 2, 2, 2, 3, 4], dtype=float), stream_periods=2)
    assert tied.period.tolist() == [0, 1, 1, 1, 1, 1] and tied.cut_times == (2.0,)
    explicit = periods.cut_by_time(times, stream_cut_times=[3, 9])
    assert explicit.period.tolist() == [1, 0, 1, 0, 1, 1, 1, 1, 2, 2] and explicit.counts() == [2, 6, 2]


@pytest.mark.parametrize("kwargs", [{"stream_periods": 4}, {"stream_cut_times": [9, 10]}])
def test_an_empty_period_is_an_error(kwargs):
    times = np.array([1, 1, 1, 1, 2, 9], dtype=float)  # 4 periods: the cuts at 1, 1, 2 leave one empty
    with pytest.raises(ConfigError, match=r"^stream_(periods|cut_times)=.*has no interaction"):
        periods.cut_by_time(times if "stream_periods" in kwargs else times[:5], **kwargs)


def test_a_paper_split_gives_periods_0_1_2():
    cut = periods.cut_by_split(np.array(["train", "valid", "test", "train"]))
    assert cut.period.tolist() == [0, 1, 2, 0] and cut.source == "split"
    with pytest.raises(ConfigError, match="are not"):
        periods.cut_by_split(np.array(["train", "later"]))


def test_a_round_holds_out_each_users_last_new_interaction_and_tests_on_the_next_period():
    # user a: periods 0 0 1 1 2; b: 0 1 (one new interaction after a history); c: 1 only (no history before it);
    # d: 2 only (cold in rounds 0 and 1); rows deliberately out of order
    users = np.array(["a", "b", "a", "c", "a", "a", "d", "b", "a"])
    period = np.array([1, 1, 0, 1, 2, 0, 2, 0, 1])
    times = np.array([3, 4, 1, 5, 6, 2, 7, 1, 3.5])
    order = periods.user_time_order(users, times, period)
    round0 = periods.round_splits(users, period, order, 0)
    # round 0: a's rows of period 0 (times 1, 2): the last is held out; b's lone period-0 row has no history;
    # c is cold (no test rows), a's period-2 row lies beyond the round
    assert round0.tolist() == ["test", "test", "train", "", "", "valid", "", "train", "test"]
    round1 = periods.round_splits(users, period, order, 1)
    # round 1: a's last period-1 row (time 3.5) is valid, its period-2 row test; b's period-1 row valid; c alone
    assert round1.tolist() == ["train", "valid", "train", "train", "test", "train", "", "train", "valid"]


def write_dataset(folder, name: str, n_users: int = 40, per_user: int = 12, n_items: int = 30, seed: int = 0):
    """A hand-made atomic dataset: users arrive over time, each with interactions at increasing times."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for u in range(n_users):
        start = rng.integers(0, 50)
        for k, t in enumerate(np.sort(rng.choice(np.arange(start, start + 100), per_user, replace=False))):
            rows.append(f"u{u}\ti{rng.integers(n_items)}\t{float(t)}")
    (folder / f"{name}.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(rows) + "\n")
    (folder / f"{name}.item").write_text("item_id:token\ttitle:token\n"
                                         + "\n".join(f"i{i}\tItem {i}" for i in range(n_items)) + "\n")
    return rows


def stream_dict(tmp_path, **extra) -> dict:
    return {**TINY_SASREC, "data_path": str(tmp_path / "data"), "stream_output": str(tmp_path / "stream"),
            "sampler": "random", "selection_num": 8, "topk": [5, 10], "valid_metric": "NDCG@5",
            "reference_rows": [], **extra}


def test_stream_runs_every_round_on_its_cut_and_resumes(tmp_path):
    rows = write_dataset(tmp_path / "data" / "toy", "toy")
    before = (tmp_path / "data" / "toy" / "toy.inter").read_bytes()
    config = stream_dict(tmp_path, stream_periods=3)
    report = run_stream("SASRec", "toy", config_dict=config)
    assert (tmp_path / "data" / "toy" / "toy.inter").read_bytes() == before  # the source is only read
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    times = np.array([float(r.split("\t")[2]) for r in rows])
    cut = periods.cut_by_time(times, stream_periods=3)
    assert report["interactions_per_period"] == cut.counts()
    stream = tmp_path / "stream"
    for record in report["rounds"]:
        r = record["round"]
        inter = (stream / "datasets" / f"toy-r{r}" / f"toy-r{r}.inter").read_text().splitlines()
        kept = [line.split("\t") for line in inter[1:]]
        assert inter[0] == "user_id:token\titem_id:token\ttimestamp:float\tsplit:token\tperiod:token"
        assert all(int(p) <= r for *_, s, p in kept if s in ("train", "valid"))
        assert all(int(p) == r + 1 for *_, s, p in kept if s == "test")
        # the selection chose among the users with a training sample in the new period
        selection = record["selection"]
        ids = json.loads((open(os.path.join(selection["folder"], "selection.json")).read()))["users"]
        new_period_users = {u for u, _, _, s, p in kept if s == "train" and int(p) == r}
        assert len(ids) == 8 and set(ids) <= new_period_users
        assert record["candidates"] == selection["candidate_users"]
    first = {r["round"]: r["test_result"] for r in report["rounds"]}
    # a killed stream: round 1 never finished; the rerun reuses round 0, reruns round 1 to the same selection
    selection_file = os.path.join(report["rounds"][1]["selection"]["folder"], "selection.json")
    chosen = json.loads(open(selection_file).read())["users"]
    os.unlink(stream / "rounds" / "r1" / "result.json")
    shutil.rmtree(report["rounds"][1]["selection"]["folder"])
    again = run_stream("SASRec", "toy", config_dict=config)
    assert {r["round"]: r["test_result"] for r in again["rounds"]}[0] == first[0]
    assert json.loads(open(selection_file).read())["users"] == chosen
    table = (stream / "report.md").read_text()
    assert "| 0 | " in table and "| 1 | " in table


@pytest.mark.parametrize("extra, message", [
    ({"stream_periods": 1}, r"^stream_periods=1: allowed an integer >= 2"),
    ({}, r"^stream_periods / stream_cut_times: give one of them"),
    ({"stream_periods": 2, "stream_cut_times": [50]}, r"^stream_periods / stream_cut_times: give one of them"),
    ({"stream_cut_times": [60, 50]}, r"^stream_cut_times=\[60, 50\]: allowed a non-empty list of strictly increasing"),
    ({"stream_periods": 3, "selection_num": 39}, r"^selection_num=39 is above the number of users with training samples \(\d+\): round \d's new period \d has \d+ users"),
    ({"stream_periods": 3, "candidate_period": 1}, r"^candidate_period: the stream sets it"),
    ({"stream_periods": 3, "split_field": "split"}, r"^stream_periods / stream_cut_times: dataset toy is pre-split"),
    ({"stream_periods": 3, "stream_perods": 3}, r"^unknown key 'stream_perods'.*did you mean 'stream_periods'"),
    ({"stream_periods": 3, "stream_ihvp_warm_start": "yes"}, r"^stream_ihvp_warm_start must be a bool \(its property file's type\), got 'yes'"),
])
def test_bad_stream_input_fails_before_any_round(tmp_path, extra, message):
    write_dataset(tmp_path / "data" / "toy", "toy")
    with pytest.raises(ConfigError, match=message):
        run_stream("SASRec", "toy", config_dict=stream_dict(tmp_path, **extra))
    assert not (tmp_path / "stream" / "rounds").exists()


def test_a_stream_needs_a_time_field_or_a_split(tmp_path):
    folder = tmp_path / "data" / "notime"
    folder.mkdir(parents=True)
    (folder / "notime.inter").write_text("user_id:token\titem_id:token\n" + "".join(f"u{i % 5}\ti{i}\n"
                                                                                   for i in range(40)))
    with pytest.raises(ConfigError, match=r"(neither a time field|TIME_FIELD)"):
        run_stream("SASRec", "notime", config_dict=stream_dict(tmp_path, stream_periods=2, TIME_FIELD=None))


def test_a_stream_output_of_another_configuration_is_an_error(tmp_path):
    write_dataset(tmp_path / "data" / "toy", "toy")
    run_stream("SASRec", "toy", config_dict=stream_dict(tmp_path, stream_periods=2))
    with pytest.raises(ConfigError, match=r"^stream_output=.*holds a stream of another configuration \(differs in "
                                          r".*cut_times"):
        run_stream("SASRec", "toy", config_dict=stream_dict(tmp_path, stream_cut_times=[60]))


def test_a_paper_format_dataset_streams_its_valid_period_as_the_new_data(tmp_path):
    from recbole_dealrec.config import DealrecConfig
    from recbole_dealrec.data.importer import import_paper_dataset
    from recbole_dealrec.stream.runner import StreamArguments, plan_stream
    from tests.test_importer import SEQUENCES, write_paper_folder

    write_paper_folder(tmp_path / "paper")
    import_paper_dataset(str(tmp_path / "paper"), str(tmp_path / "data" / "games"))
    config = DealrecConfig("SASRec", "games", config_dict={"data_path": str(tmp_path / "data")})
    plan, frame = plan_stream(config, StreamArguments.of_run(config))
    assert plan.cut.source == "split" and len(plan.rounds) == 2
    users = frame["user_id:token"].astype(int).to_numpy()
    for round_plan in plan.rounds:
        r = round_plan.index
        for uid, parts in SEQUENCES.items():
            got = round_plan.labels[users == uid].tolist()  # the user's rows in file (= time) order
            learned = [item for part in parts[:r + 1] for item in part]
            new = parts[r]
            expected = ["train"] * len(learned)
            if new and len(learned) >= 2:
                expected[-1] = "valid"  # the newest interaction, held out
            expected += ["test"] * len(parts[r + 1]) if learned else []
            expected += [""] * (sum(map(len, parts)) - len(expected))
            assert got == expected, (r, uid)
    # round 1's candidates: users with a training (not held-out) interaction in the valid period that is a target
    assert plan.rounds[1].n_candidates == sum(1 for parts in SEQUENCES.values() if len(parts[1]) >= 2)


def test_candidate_period_outside_a_round_dataset_names_the_missing_column(tiny_config):
    from recbole_dealrec.quick_start import run_recbole

    with pytest.raises(ConfigError, match=r"^candidate_period=0: the dataset has no 'period' column"):
        run_recbole("SASRec", config_dict={**tiny_config, "sampler": "random", "selection_num": 5,
                                           "candidate_period": 0})


def test_incremental_rounds_continue_from_the_previous_round(tmp_path):
    """TIGER with DEALRec's signals: round 1 warm-starts the surrogate from round 0's (item rows by token), starts CG
    from round 0's iHVP solution, starts TIGER from round 0's tested weights (bit for bit) and reads round 0's item
    IDs (every item keeps its ID)."""
    import torch

    from recbole_dealrec.config import DealrecConfig
    from recbole_dealrec.data import create_dataset, data_preparation
    from recbole_dealrec.model.backend import state_digest
    from recbole_dealrec.stream.runner import round_cost
    from recbole_dealrec.surrogate.train import initial_surrogate, item_tokens, surrogate_config
    from tests.conftest import TINY_SURROGATE, TINY_TIGER

    write_dataset(tmp_path / "data" / "toy", "toy", n_users=48, n_items=120)
    config = {**stream_dict(tmp_path, stream_periods=3, stream_update="incremental", stream_warm_epochs=1,
                            stream_ihvp_warm_start=True),
              **TINY_TIGER, "tiger_codebook_size": 16, "title_field": "title", "sampler": "dealrec", "dealrec_lambda": 0.5,
              "surrogate_config": TINY_SURROGATE}
    report = run_stream("TIGER", "toy", config_dict=config)
    first, second = report["rounds"]
    rounds = tmp_path / "stream" / "rounds"
    assert first["started_from"] == {}
    assert second["started_from"] == {
        "surrogate_init": str(rounds / "r0" / "surrogate.pt"), "backend_init": str(rounds / "r0" / "backend.pt"),
        "tiger_semantic_ids_file": os.path.join(first["selection"]["folder"], "semantic_ids.tsv"),
        "influence_ihvp_init": str(rounds / "r0" / "ihvp.pt")}
    # CG starts from round 0's iHVP solution (round 0 itself from zero), and every round exports its own
    influence = [r["selection"]["signals"]["influence"] for r in (first, second)]
    assert [i["warm_start"] for i in influence] == [False, True] and all(i["converged"] for i in influence)
    assert (rounds / "r1" / "ihvp.pt").is_file()
    # the backend starts round 1 with the weights round 0 was tested with, bit for bit
    assert second["selection"]["backend_start_digest"] == first["selection"]["backend_export"]["digest"]
    assert first["selection"]["backend_start_digest"] != first["selection"]["backend_export"]["digest"]
    saved = torch.load(rounds / "r0" / "backend.pt", weights_only=True)
    assert state_digest(saved["state"]) == first["selection"]["backend_export"]["digest"]

    def ids(folder):
        lines = open(os.path.join(folder, "semantic_ids.tsv")).read().splitlines()[1:]
        return dict(line.split("\t") for line in lines)
    old, new = ids(first["selection"]["folder"]), ids(second["selection"]["folder"])
    assert {t: new[t] for t in old} == old and len(set(new.values())) == len(new)  # old IDs kept; all unique
    assert len(new) > len(old)  # the items first seen in period 2 got IDs

    # each stage counted once: the surrogate, trained inside influence's stage, is not in that stage's seconds
    assert round_cost(second) == second["seconds"] and second["reused_signals"] == {}
    computed = {name: meta["compute_seconds"] for name, meta in second["selection"]["signals"].items()}
    assert second["seconds"]["influence signal"] < computed["influence"]
    # a resumed round whose signals come from the cache counts them at what computing them took
    os.unlink(rounds / "r1" / "result.json")
    resumed = run_stream("TIGER", "toy", config_dict=config)["rounds"][1]
    assert resumed["reused_signals"] == computed and resumed["test_result"] == second["test_result"]
    assert {k: round_cost(resumed)[f"{k} signal"] for k in computed} == computed
    assert resumed["seconds"]["influence signal"] < computed["influence"]

    # the drift of the signals from a fresh computation: against itself exact, against the scratch stream measured
    from recbole_dealrec.stream.report import signal_drift

    scratch_report = run_stream("TIGER", "toy", config_dict={**config, "stream_update": "scratch",
                                                            "stream_output": str(tmp_path / "scratch")})
    itself = signal_drift([{**scratch_report, "update": "incremental"}, scratch_report])
    steps = second["selection"]["signals"]["influence"]["iterations"]
    fresh_steps = scratch_report["rounds"][1]["selection"]["signals"]["influence"]["iterations"]
    assert itself == [{"stream": "dealrec / incremental", "seed": 2020, "round": 1, "influence_spearman": 1.0,
                       "effort_spearman": 1.0, "selection_overlap": 1.0, "influence_cg_steps": fresh_steps,
                       "influence_cg_steps_fresh": fresh_steps}]
    (drift,) = signal_drift([report, scratch_report])
    assert -1 <= drift["influence_spearman"] < 1 and 0 <= drift["selection_overlap"] <= 1
    assert (drift["influence_cg_steps"], drift["influence_cg_steps_fresh"]) == (steps, fresh_steps)

    # the warm-started surrogate starts from round 0's rows, matched by item token; a fresh one does not
    round1 = {"data_path": str(tmp_path / "stream" / "datasets"), "surrogate_config": TINY_SURROGATE,
              "title_field": "title"}
    previous = torch.load(rounds / "r0" / "surrogate.pt", weights_only=True)
    for init, equal in ((str(rounds / "r0" / "surrogate.pt"), True), (None, False)):
        scfg = surrogate_config(DealrecConfig("TIGER", "toy-r1", config_dict={**round1, "surrogate_init": init}))
        train_data, _, _ = data_preparation(scfg, create_dataset(scfg))
        model = initial_surrogate(scfg, train_data.dataset)
        tokens, position = item_tokens(train_data.dataset), {t: i for i, t in enumerate(previous["item_tokens"])}
        rows = [i for i, t in enumerate(tokens) if i and t in position]
        table = model.state_dict()["item_embedding.weight"]
        carried = torch.equal(table[rows], previous["state"]["item_embedding.weight"][[position[tokens[i]] for i in rows]])
        assert carried is equal
        others = [k for k in previous["state"] if k != "item_embedding.weight"]
        assert all(torch.equal(model.state_dict()[k], previous["state"][k]) for k in others) is equal


def _all_samplers():
    import recbole_dealrec.selection  # noqa: F401  (registers every sampler)
    from recbole_dealrec.selection import SAMPLERS

    return SAMPLERS.names()


@pytest.mark.parametrize("sampler", _all_samplers())
def test_every_sampler_chooses_among_the_new_periods_users_only(tmp_path, sampler):
    """candidate_period for every sampler: the selection and the pruned training rows are the new period's users';
    no sampler's stages read the train table's history lists whole."""
    from recbole_dealrec import pipeline
    from recbole_dealrec.config import DealrecConfig
    from recbole_dealrec.quick_start import check_run_config
    from recbole_dealrec.stream.runner import StreamArguments, plan_stream, write_round
    from recbole_dealrec.stream import periods as stream_periods
    from recbole_dealrec.config import PROPERTIES_DIR
    from recbole_dealrec.data.dataset import HistoryListInteraction
    from tests.conftest import TINY_SURROGATE, TINY_TIGER

    write_dataset(tmp_path / "data" / "toy", "toy", n_users=48, n_items=120)
    source = DealrecConfig("TIGER", "toy", config_dict={"data_path": str(tmp_path / "data"), "stream_periods": 3})
    plan, frame = plan_stream(source, StreamArguments.of_run(source))
    layer = stream_periods.dataset_layer(source, PROPERTIES_DIR)
    write_round(str(tmp_path / "stream"), plan.rounds[1], plan, frame, source, layer)
    keys = {**TINY_TIGER, "tiger_codebook_size": 16, "title_field": "title", "surrogate_config": TINY_SURROGATE,
            "data_path": str(tmp_path / "stream" / "datasets"), "output_dir": str(tmp_path / "out"),
            "topk": [5, 10], "valid_metric": "NDCG@5", "sampler": sampler, "candidate_period": 1,
            "recranker_num_clusters": 4, "tfdcon_num_clusters": 4}  # below the toy's 46 candidates
    new_period = {u for u, label, p in zip(frame["user_id:token"], plan.rounds[1].labels, plan.cut.period)
                  if label == "train" and p == 1}
    if sampler == "file":
        listed = tmp_path / "users.txt"
        listed.write_text("\n".join(sorted(new_period)[:4]) + "\n")
        keys["selection_file"] = str(listed)
    elif sampler != "full":
        keys["selection_num"] = 6
    config = DealrecConfig("TIGER", "toy-r1", config_dict=keys)
    method, model_class = check_run_config(config)
    setup = pipeline.setup_run(config, method, model_class)
    HistoryListInteraction.whole_list_reads.clear()
    data = pipeline.load_data(setup)
    selected = pipeline.select_users(setup, data)
    # issue 25: no stage reads a train table's history lists whole (they are cut for the rows each stage takes)
    assert isinstance(data.train_data.dataset.inter_feat, HistoryListInteraction)
    assert HistoryListInteraction.whole_list_reads == {}
    dataset = data.train_data.dataset
    chosen = set(dataset.id2token(dataset.uid_field, selected.selection.user_ids).tolist())
    assert chosen and chosen <= new_period
    kept = selected.train_data.dataset
    assert set(kept.id2token(kept.uid_field, np.unique(kept.inter_feat[kept.uid_field].numpy())).tolist()) == chosen
    if sampler == "full":
        assert len(chosen) == selected.summary["candidate_users"] < len(set(frame["user_id:token"]))


def _backend_config(model: str, tmp, llm_path: str) -> dict:
    from tests.conftest import TINY_TIGER, tiny_bigrec_config

    if model == "BIGRec":
        return {**tiny_bigrec_config(llm_path, tmp), "eval_user_subset": 8, "valid_user_subset": 8}
    return {**TINY_TIGER, "checkpoint_dir": str(tmp / "ckpt"), "output_dir": str(tmp / "out")}


@pytest.mark.parametrize("model", ["BIGRec", "TIGER"])
def test_backend_init_starts_a_generative_backend_from_the_exported_weights(tmp_path, tiny_llm_path, model):
    """Every generative backend: a run's backend_export is the next run's start, bit for bit; weights of another
    size are a one-line error before training."""
    import torch

    from recbole_dealrec.model.backend import state_digest
    from recbole_dealrec.quick_start import run_recbole

    base = {**_backend_config(model, tmp_path, tiny_llm_path), "sampler": "random", "selection_num": 16,
            "reference_rows": []}
    first = run_recbole(model, config_dict={**base, "backend_export": str(tmp_path / "a.pt")})
    exported = first["selection"]["backend_export"]
    assert exported["digest"] == state_digest(torch.load(tmp_path / "a.pt", weights_only=True)["state"])
    assert first["selection"]["backend_start_digest"] != exported["digest"]  # it trained
    second = run_recbole(model, config_dict={**base, "backend_init": str(tmp_path / "a.pt"), "seed": 7})
    assert second["selection"]["backend_start_digest"] == exported["digest"]
    other = {"lora_r": 4} if model == "BIGRec" else {"tiger_d_ff": 32}
    with pytest.raises(ConfigError, match=r"^backend_init=.*a\.pt: its weights do not fit the run's " + model):
        run_recbole(model, config_dict={**base, **other, "backend_init": str(tmp_path / "a.pt")})


@pytest.mark.parametrize("extra, message", [
    ({"backend_init": "x.pt"}, r"^backend_init: only a generative backend \(BIGRec, TIGER\)"),
    ({"backend_export": "x.pt"}, r"^backend_export: only a generative backend \(BIGRec, TIGER\)"),
    ({"surrogate_init": "/nonexistent/s.pt"}, r"^surrogate_init='/nonexistent/s.pt': no such file"),
])
def test_continuation_keys_are_checked_before_the_data(tiny_config, extra, message):
    from recbole_dealrec.quick_start import run_recbole

    with pytest.raises(ConfigError, match=message):
        run_recbole("SASRec", config_dict={**tiny_config, "sampler": "random", "selection_num": 5, **extra})


def test_a_stream_without_updates_tests_round_0s_backend_untrained(tmp_path):
    from tests.conftest import TINY_TIGER

    write_dataset(tmp_path / "data" / "toy", "toy", n_users=48, n_items=120)
    config = {**stream_dict(tmp_path, stream_periods=4, stream_update="none"), **TINY_TIGER,
              "tiger_codebook_size": 16, "title_field": "title", "dealrec_lambda": 0.5}
    rounds = run_stream("TIGER", "toy", config_dict=config)["rounds"]
    trained = rounds[0]["selection"]["backend_export"]["digest"]
    for record in rounds[1:]:
        assert record["selection"]["backend_start_digest"] == trained == record["selection"]["backend_export"]["digest"]
        assert record["selection"]["sampler"] == "full"  # no selection: nothing trains
    with pytest.raises(ConfigError, match=r"^stream_update=none: continues a generative backend .* SASRec"):
        run_stream("SASRec", "toy", config_dict=stream_dict(tmp_path, stream_periods=4, stream_update="none",
                                                            stream_output=str(tmp_path / "other")))


def test_streams_compare_side_by_side_paired_by_seed_and_refuse_another_cut(tmp_path, capsys):
    from recbole_dealrec.stream.__main__ import main

    write_dataset(tmp_path / "data" / "toy", "toy")
    reports, folders = {}, []
    for sampler in ("random", "full"):
        for seed in (1, 2):
            folder = tmp_path / f"{sampler}{seed}"
            reports[sampler, seed] = run_stream("SASRec", "toy", config_dict=stream_dict(
                tmp_path, stream_periods=3, sampler=sampler, seed=seed, stream_output=str(folder),
                selection_num=8 if sampler == "random" else None))
            folders.append(str(folder))
    main(["compare", *folders, "--out", str(tmp_path / "cmp"), "--metric", "recall@10",
          "--reference", "full / scratch"])
    table = (tmp_path / "cmp" / "streams.md").read_text()
    comparison = json.loads((tmp_path / "cmp" / "streams.json").read_text())
    assert [sorted(r["streams"]) for r in comparison["rounds"]] == [["full / scratch", "random / scratch"]] * 2
    for record in comparison["rounds"]:
        r = record["round"]
        runs = record["streams"]["random / scratch"]["replicates"]
        assert [run["test"] for run in runs] == [reports["random", s]["rounds"][r]["test_result"] for s in (1, 2)]
        (row,) = record["against_reference"]
        differences = [reports["random", s]["rounds"][r]["test_result"]["recall@10"]
                       - reports["full", s]["rounds"][r]["test_result"]["recall@10"] for s in (1, 2)]
        assert row["method"] == "random / scratch" and row["n"] == 2 and row["seeds"] == [1, 2]
        assert row["mean_difference"] == pytest.approx(np.mean(differences), abs=1e-12)
    assert "| 0 | " in table and "Against **full / scratch**, recall@10" in table
    assert (tmp_path / "cmp" / "streams.png").stat().st_size
    run_stream("SASRec", "toy", config_dict=stream_dict(tmp_path, stream_periods=2, stream_output=str(tmp_path / "two")))
    with pytest.raises(SystemExit):
        main(["compare", folders[0], str(tmp_path / "two"), "--out", str(tmp_path / "cmp2")])
    assert "another stream than" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", folders[0], folders[0], "--out", str(tmp_path / "cmp3")])
    assert "the same stream (random / scratch, seed 1)" in capsys.readouterr().err

@pytest.mark.parametrize("warm_start", [False, True])
def test_an_incremental_round_starts_cg_from_the_previous_solution_only_when_asked(tmp_path, warm_start):
    """stream_ihvp_warm_start (off by default): round r's influence_ihvp_init is round r-1's exported solution."""
    from recbole_dealrec.model.registry import MODELS
    from recbole_dealrec.stream.runner import StreamArguments, round_files

    config = {**stream_dict(tmp_path, stream_periods=3, stream_update="incremental"), "surrogate_config": None}
    if warm_start:
        config["stream_ihvp_warm_start"] = True
    args = StreamArguments.of_run(collections.defaultdict(lambda: None, config))  # a config reads None for a key not given
    assert args.stream_ihvp_warm_start is warm_start
    (tmp_path / "s" / "rounds" / "r0").mkdir(parents=True)
    (tmp_path / "s" / "rounds" / "r0" / "ihvp.pt").write_bytes(b"x")
    keys = round_files(str(tmp_path / "s"), 1, MODELS.get("TIGER"), args, {"selection": {"folder": str(tmp_path)}},
                       config)
    assert keys["influence_ihvp_export"] == str(tmp_path / "s" / "rounds" / "r1" / "ihvp.pt")  # always exported
    assert keys.get("influence_ihvp_init") == (str(tmp_path / "s" / "rounds" / "r0" / "ihvp.pt") if warm_start else None)


SHIPPED_STREAMS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "run_scripts", "streams", "*.yaml")))


def test_every_shipped_stream_config_is_checked():
    assert {os.path.basename(p) for p in SHIPPED_STREAMS} >= {"cpu_ml100k_tiger.yaml", "cpu_games_tiger.yaml"}


@pytest.mark.parametrize("path", SHIPPED_STREAMS)
@pytest.mark.parametrize("sampler, update", [("dealrec", "scratch"), ("dealrec", "incremental"), ("dealrec", "none"),
                                             ("random", "scratch"), ("random", "incremental"), ("full", "incremental")])
def test_shipped_stream_configs_pass_every_pre_data_check(path, sampler, update):
    """Every YAML under run_scripts/streams/ passes the stream's and the rounds' runs' checks as it is, with each
    sampler and update its README runs (Games' data is imported on the machine that runs it: a config without its
    own cut is checked on the embedded ml-100k's keys only; one with a cut is also planned on it)."""
    from recbole_dealrec.config import DealrecConfig
    from recbole_dealrec.quick_start import check_run_config
    from recbole_dealrec.stream.runner import StreamArguments, check_round_budgets, plan_stream

    extra = {"selection_num": None} if sampler == "full" else {}
    config = DealrecConfig("TIGER", None, [path],
                           {"sampler": sampler, "stream_update": update, **extra})
    args = StreamArguments.of_run(config)
    method, _ = check_run_config(config)
    if args.stream_periods is not None or args.stream_cut_times is not None:
        plan, _ = plan_stream(config, args)
        assert len(check_round_budgets(plan, method)) == len(plan.rounds) >= 1


def test_a_stream_copies_a_siblings_round_0_bit_for_bit_the_run_it_would_make(tmp_path):
    """stream_round0_from: an incremental stream that copies a scratch sibling's round 0 ends exactly as the
    incremental stream that ran its own (round 0 and round 1: metrics, selection, the backend round 1 starts from);
    a source of another configuration, no stream, its own folder or an unfinished round 0 is an error first."""
    from tests.conftest import TINY_TIGER

    write_dataset(tmp_path / "data" / "toy", "toy", n_users=48, n_items=120)
    base = {**stream_dict(tmp_path, stream_periods=3), **TINY_TIGER, "tiger_codebook_size": 16, "title_field": "title"}
    scratch = run_stream("TIGER", "toy", config_dict={**base, "stream_output": str(tmp_path / "scratch")})
    fresh = run_stream("TIGER", "toy", config_dict={**base, "stream_update": "incremental",
                                                   "stream_output": str(tmp_path / "fresh")})
    copied_config = {**base, "stream_update": "incremental", "stream_round0_from": str(tmp_path / "scratch"),
                     "stream_output": str(tmp_path / "copied")}
    copied = run_stream("TIGER", "toy", config_dict=copied_config)
    for record in (fresh, copied):
        assert record["rounds"][0]["test_result"] == scratch["rounds"][0]["test_result"]
    (first, second), (fresh_first, fresh_second) = copied["rounds"], fresh["rounds"]
    assert first["copied_from"] == str(tmp_path / "scratch") and "copied_from" not in fresh_first
    assert first["stream_key"] == copied["stream_key"] != scratch["stream_key"]
    assert first["selection"]["folder"].startswith(str(tmp_path / "copied" / "rounds" / "r0"))
    assert second["started_from"]["backend_init"] == str(tmp_path / "copied" / "rounds" / "r0" / "backend.pt")
    assert second["test_result"] == fresh_second["test_result"]
    assert second["selection"]["backend_start_digest"] == fresh_second["selection"]["backend_start_digest"]
    chosen = [json.loads(open(os.path.join(r["selection"]["folder"], "selection.json")).read())["users"]
              for r in (second, fresh_second)]
    assert chosen[0] == chosen[1]
    assert "(copied)" in (tmp_path / "copied" / "report.md").read_text()
    assert run_stream("TIGER", "toy", config_dict=copied_config)["rounds"] == copied["rounds"]  # resumes, no copy

    def refused(source, message, **extra):
        output = tmp_path / "refused"
        with pytest.raises(ConfigError, match=message):
            run_stream("TIGER", "toy", config_dict={**copied_config, "stream_round0_from": str(source),
                                                    "stream_output": str(output), **extra})
        assert not (output / "rounds").exists()
    refused(tmp_path / "scratch", r"^stream_round0_from=.*scratch: a stream of another configuration \(differs in "
                                  r"run_keys \(seed\)\)", seed=7)
    refused(tmp_path / "data", r"^stream_round0_from=.*data: no stream.json there")
    refused(tmp_path / "refused", r"^stream_round0_from=.*refused: is this stream's own stream_output")
    os.unlink(tmp_path / "scratch" / "rounds" / "r0" / "result.json")
    refused(tmp_path / "scratch", r"^stream_round0_from=.*scratch: its round 0 has not finished")


def test_a_round_recorded_before_stages_were_counted_once_leaves_its_nested_surrogate_out():
    from recbole_dealrec.stream.runner import round_cost

    legacy = {"seconds": {"data": 1.0, "surrogate": 5.0, "influence signal": 9.0, "training": 3.0}}
    assert round_cost(legacy) == {"data": 1.0, "influence signal": 9.0, "training": 3.0}
    assert round_cost({"seconds": {"surrogate": 5.0, "training": 3.0}}) == {"surrogate": 5.0, "training": 3.0}
    assert round_cost({**legacy, "reused_signals": {}}) == legacy["seconds"]  # counted once already
    # a legacy round resumed from the cache: its signal counts at its compute seconds
    resumed = {"seconds": {"influence signal": 0.1, "training": 3.0},
               "selection": {"signals": {"influence": {"cached": True, "compute_seconds": 20.0}}}}
    assert round_cost(resumed) == {"influence signal": 20.0, "training": 3.0}
