"""The stream (recbole_dealrec.stream): periods cut exactly by time or by a paper-format split, each round's
pre-split dataset, its candidates, bad input before any training, and a resumable run on real RecBole data."""
from __future__ import annotations

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
    ({"stream_periods": 3, "selection_num": 39}, r"^selection_num=39: round \d's new period \d has \d+ users"),
    ({"stream_periods": 3, "candidate_period": 1}, r"^candidate_period: the stream sets it"),
    ({"stream_periods": 3, "split_field": "split"}, r"^stream_periods / stream_cut_times: dataset toy is pre-split"),
    ({"stream_periods": 3, "stream_perods": 3}, r"^unknown key 'stream_perods'.*did you mean 'stream_periods'"),
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
    plan, frame = plan_stream(config, StreamArguments.from_config(config))
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
