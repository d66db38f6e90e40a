"""Experiment grids: expansion, checks before the first cell, resume, failing cells, report tables and figures."""
from __future__ import annotations

import glob
import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from conftest import TINY_SASREC
from recbole_dealrec.experiment import expand_grid, load_grid, read_results, run_grid, write_report
from recbole_dealrec.experiment.__main__ import main as experiment_main
from recbole_dealrec.experiment.report import one_sample_ttest, seed_cv, table2, table3
from recbole_dealrec.errors import ConfigError

SMOKE_GRID = os.path.join(os.path.dirname(__file__), "..", "run_scripts", "grids", "smoke.yaml")


def spec(**extra):
    base = {
        "name": "g",
        "settings": {"epochs": 1},
        "models": ["SASRec"],
        "samplers": {"Random": {"sampler": "random"}, "DEALRec": {"sampler": "dealrec"}, "Full": {"sampler": "full"}},
        "budgets": [10, 0.5],
        "lambdas": [0.0, 1.0],
        "seeds": [1, 2],
    }
    return {**base, **extra}


def test_expansion_product_and_axes_that_do_not_apply():
    cells = expand_grid(spec()).cells
    by_method = {m: [c for c in cells if c.method == m] for m in ("Random", "DEALRec", "Full")}
    assert len(by_method["Random"]) == 2 * 2  # budgets x seeds; no lambda axis
    assert len(by_method["DEALRec"]) == 2 * 2 * 2  # budgets x lambdas x seeds
    assert len(by_method["Full"]) == 2  # seeds only: full has no budget
    assert all("selection_num" not in c.settings and "selection_ratio" not in c.settings for c in by_method["Full"])
    assert {c.settings.get("selection_ratio") for c in by_method["Random"]} == {None, 0.5}
    assert {c.settings["dealrec_lambda"] for c in by_method["DEALRec"]} == {0.0, 1.0}
    assert all("dealrec_lambda" not in c.settings for c in by_method["Random"])
    assert len({c.key for c in cells}) == len(cells)


def test_cell_keys_are_stable_and_ignore_where_outputs_go():
    first = [c.key for c in expand_grid(spec()).cells]
    reordered = dict(reversed(list(spec().items())))
    assert [c.key for c in expand_grid(reordered).cells] == first
    moved = expand_grid(spec(), overrides={"output_dir": "/elsewhere", "show_progress": True}).cells
    assert [c.key for c in moved] == first
    changed = expand_grid(spec(), overrides={"epochs": 2}).cells
    assert not set(c.key for c in changed) & set(first)
    # a fixed spec has a fixed key: a results file stays valid across sessions and machines
    one = expand_grid({"name": "g", "models": ["SASRec"], "samplers": ["random"], "budgets": [5], "seeds": [1]})
    assert one.cells[0].key == expand_grid({"name": "g", "models": ["SASRec"], "samplers": ["random"],
                                            "budgets": [5], "seeds": [1]}).cells[0].key


def test_blocks_override_axes_and_share_cells():
    grid = expand_grid(spec(blocks=[
        {"name": "a", "report": ["table2"], "samplers": ["random"], "budgets": [10], "seeds": [1]},
        {"name": "b", "report": ["figure5"], "samplers": ["random"], "budgets": [10, 20], "seeds": [1]},
    ]))
    assert len(grid.cells) == 2  # random-10-seed1 reached from both blocks is one cell
    shared = [c for c in grid.cells if c.settings["selection_num"] == 10][0]
    assert shared.tags == ("table2", "figure5") and shared.block == "a"


@pytest.mark.parametrize("bad, message", [
    ({"nmae": "x"}, r"unknown key\(s\) \['nmae'\]"),
    ({"seeds": []}, r"axis 'seeds' is empty"),
    ({"samplers": {}}, r"axis 'samplers' is empty"),
    ({"budgets": [1.5]}, r"a float budget is a ratio"),
    ({"name": None}, r"`name`"),
    ({"blocks": [{"name": "a", "report": ["table9"]}]}, r"report \['table9'\] unknown"),
    ({"blocks": [{"name": "a", "lambda": [1]}]}, r"unknown key\(s\) \['lambda'\]"),
    ({"report_reference": "Randon"}, r"report_reference 'Randon' is not a sampler label of the grid; allowed: "),
])
def test_bad_grid_structure_fails_naming_the_key(bad, message):
    with pytest.raises(ConfigError, match=message):
        expand_grid(spec(**bad))


def tiny_grid(tmp_path, **extra):
    body = {
        "name": "tiny",
        "settings": {**TINY_SASREC, "output_dir": str(tmp_path / "out"), "checkpoint_dir": str(tmp_path / "ckpt")},
        "models": ["SASRec"], "samplers": {"Random": {"sampler": "random"}}, "budgets": [50], "seeds": [1, 2],
        **extra,
    }
    return expand_grid(body)


def test_bad_cells_fail_before_the_first_cell_runs(tmp_path):
    results = str(tmp_path / "r.jsonl")
    bad_key = tiny_grid(tmp_path, samplers={"Random": {"sampler": "random", "selection_nmu": 3}})
    with pytest.raises(ConfigError, match=r"grid cell .*Random.*unknown key 'selection_nmu'"):
        run_grid(bad_key, results)
    cannot = tiny_grid(tmp_path, samplers={"CCS": {"sampler": "ccs", "ccs_beta": 2.0}})
    with pytest.raises(ConfigError, match=r"grid cell .*CCS.*cannot run.*ccs_beta"):
        run_grid(cannot, results)
    assert not os.path.exists(results)


def broken_data(root) -> None:
    """A dataset ``broken`` whose .inter file exists (the grid's pre-check passes) with a bad row (the run fails)."""
    (root / "broken").mkdir()
    (root / "broken" / "broken.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t1\t1\n2\t2\n")


def test_a_cell_whose_data_is_missing_fails_the_pre_check(tmp_path):
    grid = tiny_grid(tmp_path, datasets=["no-data"], settings={**TINY_SASREC, "data_path": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"cannot run: dataset 'no-data': missing atomic file"):
        run_grid(grid, str(tmp_path / "r.jsonl"))
    assert not (tmp_path / "r.jsonl").exists()


def test_run_resume_failing_cell_and_foreign_results(tmp_path):
    results = str(tmp_path / "r.jsonl")
    broken_data(tmp_path)
    blocks = [
        {"name": "ok"},
        # passes every pre-data check, fails on reading the data: recorded, and the grid goes on
        {"name": "broken", "seeds": [3], "datasets": ["broken"],
         "settings": {**TINY_SASREC, "data_path": str(tmp_path)}},
    ]
    grid = tiny_grid(tmp_path, report_reference="Random", blocks=blocks)
    appended = run_grid(grid, results)
    assert [r["status"] for r in appended] == ["ok", "ok", "failed"]
    broken = appended[2]
    assert "broken.inter line 3" in broken["error"] and "Traceback" in broken["traceback"]
    ok = appended[0]
    assert set(ok["test"]) >= {"recall@10", "ndcg@10"} and ok["selected_users"] == 50
    assert ok["seconds"]["training"] > 0 and ok["fine_tuning_seconds"] == ok["seconds"]["training"]
    assert ok["peak_rss_mb"] > 0 and ok["code"]["package"] and os.path.isdir(ok["selection_folder"])
    assert ok["settings"]["seed"] == 1 and ok["grid"] == "tiny"
    # the grid's report_reference travels with every record (the report's comparisons read it), unkeyed
    assert ok["report_reference"] == "Random" and "report_reference" not in ok["settings"]
    assert [c.key for c in grid.cells] == [c.key for c in tiny_grid(tmp_path, blocks=blocks).cells]
    assert len(read_results(results)) == 3

    # resume: finished cells are skipped, the failed one is tried again (and fails again)
    again = run_grid(grid, results)
    assert [r["cell"] for r in again] == [broken["cell"]]
    assert run_grid(grid, results, retry_failed=False) == []

    # a torn last line (a killed run) is ignored, not fatal
    with open(results, "a") as handle:
        handle.write('{"grid": "tiny", "cell"')
    assert len(read_results(results)) == 4

    other = expand_grid({**{"name": "other"}, "models": ["SASRec"], "samplers": ["random"], "budgets": [5]})
    with pytest.raises(ConfigError, match=r"holds records of grid\(s\) \['tiny'\], not of 'other'"):
        run_grid(other, results)


def test_the_cli_exits_non_zero_for_failed_cells_and_an_empty_report(tmp_path, capsys):
    import yaml

    grid = tmp_path / "broken.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "broken", "settings": {**TINY_SASREC, "output_dir": str(tmp_path / "out"), "data_path": str(tmp_path)},
        "models": ["SASRec"], "samplers": {"Random": {"sampler": "random"}}, "budgets": [50], "seeds": [1],
        "datasets": ["broken"]}))  # passes every pre-data check, fails on reading the data
    broken_data(tmp_path)
    results = str(tmp_path / "r.jsonl")
    with pytest.raises(SystemExit) as done:
        experiment_main(["run", str(grid), "--results", results])
    assert done.value.code == 1 and "1 of 1 cells run failed" in capsys.readouterr().err
    # a report over a results file without one finished cell is an error, not an empty report
    with pytest.raises(SystemExit) as done:
        experiment_main(["report", results, "--out", str(tmp_path / "report")])
    assert done.value.code == 2 and "holds no finished cell (1 records)" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit) as done:
        experiment_main(["report", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "report")])
    assert done.value.code == 2 and not (tmp_path / "report").exists()


def test_per_user_test_results_reproduce_recbole_metrics(tmp_path):
    """The per-user hits captured during RecBole's own evaluation average to its Recall/NDCG; the per-user loss
    is the trained model's loss on that user's test row alone."""
    from recbole_dealrec.evaluation import load_user_results, per_user_metrics
    from recbole_dealrec.quick_start import run_recbole

    path = str(tmp_path / "users.npz")
    config = {**TINY_SASREC, "output_dir": str(tmp_path / "out"), "checkpoint_dir": str(tmp_path / "ckpt"),
              "sampler": "random", "selection_num": 100, "test_user_results_file": path, "test_user_loss": True}
    result = run_recbole("SASRec", config_dict=config)
    users = load_user_results(path)
    assert len(users["user_id"]) == len(set(users["user_id"])) == 943 and users["hits"].shape == (943, 20)
    for k in (10, 20):  # metrics unrounded (metric_decimal_place 12)
        metrics = per_user_metrics(users["hits"], users["n_targets"], k)
        assert metrics[f"recall@{k}"].mean() == pytest.approx(result["test_result"][f"recall@{k}"], abs=1e-10)
        assert metrics[f"ndcg@{k}"].mean() == pytest.approx(result["test_result"][f"ndcg@{k}"], abs=1e-10)
    # SASRec's CE loss of a user's test row = -log softmax(logits)[target]: positive, and lower where the target
    # made the top 20 than where it did not
    assert np.all(users["loss"] > 0)
    hit = users["hits"].any(1)
    assert 0 < hit.sum() < len(hit) and users["loss"][hit].mean() < users["loss"][~hit].mean()


def synthetic(method, values, metric="recall@10", tags=("table2",), report_reference=None, **settings):
    out = []
    for seed, value in enumerate(values):
        cell = f"{method}-{seed}-{settings}"
        out.append({"status": "ok", "grid": "s", "cell": cell, "method": method, "model": "M", "dataset": "d",
                    "tags": list(tags), "settings": {"sampler": method.lower(), "selection_num": 8, "seed": seed,
                                                     **settings},
                    "test": {metric: value, "ndcg@10": value / 2}, "fine_tuning_seconds": 10.0,
                    "selection_seconds": 2.0, "selected_users": settings.get("selection_num", 8),
                    "seconds": {"training": 10.0}, "wall_seconds": 12.0})
        if report_reference is not None:
            out[-1]["report_reference"] = report_reference
    return out


def test_table2_marks_and_ttest_match_scipy():
    best, second = [0.30, 0.32, 0.31], [0.20, 0.22, 0.21]
    records = synthetic("A", best) + synthetic("B", second) + synthetic("C", [0.1, 0.1, 0.11])
    text, facts = table2(records)
    fact = [f for f in facts if f["metric"] == "recall@10"][0]
    assert fact["best"] == "A" and fact["second"] == "B"
    # the t statistic by hand, the p-value from scipy's t distribution
    mean, sd = np.mean(best), np.std(best, ddof=1)
    t = (mean - np.mean(second)) / (sd / math.sqrt(3))
    assert fact["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), df=2), rel=1e-9)
    assert fact["significant"] == (fact["p_value"] < 0.01)
    assert one_sample_ttest([0.2], 0.1) is None and one_sample_ttest([0.2, 0.2], 0.1) is None
    row_a = [line for line in text.splitlines() if "| A |" in line][0]
    row_b = [line for line in text.splitlines() if "| B |" in line][0]
    assert "**0.3100 ± 0.0100**" in row_a and "<u>0.2100 ± 0.0100</u>" in row_b
    # the seed CV column: sample std / mean of recall@10 over the seeds
    assert "| seed CV (recall@10) |" in text
    assert f"| {np.std(best, ddof=1) / np.mean(best):.2f} |" in row_a
    assert seed_cv([0.2]) is None and seed_cv([0.0, 0.0]) is None
    assert "**" not in [line for line in text.splitlines() if "| C |" in line][0]


def test_budget_label_of_every_kind_of_selection():
    from recbole_dealrec.experiment.report import budget_of

    (record,) = synthetic("Random", [0.1])
    assert budget_of(record) == "8-shot"
    record["settings"] = {"sampler": "random", "selection_ratio": 0.1}
    assert budget_of(record) == "r=0.1"
    record["settings"] = {"sampler": "file", "selection_file": "users.tsv"}  # a file's selection: its size
    record["selected_users"] = 1024
    assert budget_of(record) == "1024 users"
    record["settings"] = {"sampler": "full"}
    assert budget_of(record) == "full"


def test_table3_percent_change_against_full():
    full = synthetic("Full", [0.2], tags=("table3",))
    full[0]["settings"] = {"sampler": "full", "seed": 0}
    full[0]["fine_tuning_seconds"] = 100.0
    few = synthetic("DEALRec", [0.25], tags=("table3",))
    text = table3(full + few)
    row = [line for line in text.splitlines() if "| DEALRec |" in line][0]
    assert "+25.0%" in row  # recall 0.25 vs 0.2
    assert "-88.0%" in row  # time (10 + 2) vs 100
    # a grid runs full fine-tuning once and replicates the methods in Table 2: those join Table 3, means over seeds (n)
    replicated = synthetic("Random", [0.1, 0.3, 0.2])
    other = synthetic("Random", [0.9])
    for record in other:
        record["model"] = "GRU4Rec"  # no full cell of its own: not in Table 3
    text = table3(full + few + replicated + other)
    row = [line for line in text.splitlines() if "| Random |" in line]
    assert len(row) == 1 and "| 3 | 0.2000 |" in row[0] and "+0.0%" in row[0]
    assert "| DEALRec | 8-shot | 1 |" in text and "GRU4Rec" not in text


def test_report_writes_tables_and_figures(tmp_path):
    records = synthetic("DEALRec", [0.3, 0.31]) + synthetic("Random", [0.2, 0.25])
    records += synthetic("w/o effort", [0.25], tags=("figure4",), dealrec_lambda=0)
    for n, v in ((4, 0.1), (16, 0.3)):
        records += synthetic("Random", [v], tags=("figure5",), selection_num=n)
    for lam, v in ((0.1, 0.2), (1.0, 0.3)):
        records += synthetic("DEALRec", [v], tags=("figure7",), dealrec_lambda=lam)
    records.append({"status": "failed", "cell": "x", "method": "EL2N", "model": "M", "error": "boom", "grid": "s"})
    out = write_report(records, str(tmp_path / "rep"))
    text = open(out["report"]).read()
    assert "## Table 2" in text and "boom" in text
    names = sorted(os.path.basename(p) for p in out["figures"])
    assert names == ["figure4_ablation_d_M.png", "figure5_ratio_d_M.png", "figure7_lambda_d_M.png"]
    for path in out["figures"]:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_of_a_grid_leaves_out_cells_no_longer_in_it(tmp_path):
    """A sampler whose keys changed since its cells ran: under the grid's current cells its old records stay in the
    file but out of the tables (one label never pairs two settings' seeds), and the report says how many."""
    old = synthetic("DEALRec", [0.1, 0.1, 0.1], influence_target="train")
    new = synthetic("DEALRec", [0.3, 0.31, 0.32], influence_target="validation")
    both = old + new + synthetic("Random", [0.2, 0.21, 0.22])
    mixed = open(write_report(both, str(tmp_path / "mixed"))["report"]).read()
    assert "two records of seed 0 (two settings under one label), cannot pair" in mixed
    current = {r["cell"] for r in both if r not in old}
    text = open(write_report(both, str(tmp_path / "rep"), cell_keys=current)["report"]).read()
    assert "3 records of cells no longer in the grid" in text and "cannot pair" not in text
    assert "0.3100" in [line for line in text.splitlines() if "| DEALRec |" in line][0]


def test_report_cli_with_a_grid_keys_cells_by_its_settings(tmp_path, capsys):
    """``report --grid`` reports the records of that grid's cells as its ``--set`` settings make them; a grid and
    settings that match no finished record are an error naming the cause, not an empty report."""
    cell = load_grid(SMOKE_GRID).cells[0]
    records = synthetic("Random", [0.2]) + synthetic("Random", [0.3])
    records[0]["cell"] = cell.key
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    experiment_main(["report", str(results), "--out", str(tmp_path / "rep"), "--grid", SMOKE_GRID])
    assert "1 records of cells no longer in the grid" in (tmp_path / "rep" / "report.md").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:  # another setting: other keys, none finished
        experiment_main(["report", str(results), "--out", str(tmp_path / "rep2"), "--grid", SMOKE_GRID,
                         "--set", "epochs=99"])
    assert done.value.code == 2 and "holds no finished cell of grid" in capsys.readouterr().err
    assert not (tmp_path / "rep2").exists()


def _behaviour_record_tool():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "run_scripts", "behaviour_record.py")
    spec = importlib.util.spec_from_file_location("behaviour_record", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_behaviour_record_differences_skip_only_what_a_kind_did_not_record():
    differences = _behaviour_record_tool().differences
    expected = {"cells": {"a": {"test": None, "sel": "x"}, "b": {"test": {"r": 0.5}}}}
    assert differences(expected, {"cells": {"a": {"test": {"r": 0.1}, "sel": "x"}, "b": {"test": {"r": 0.5}}}}) == []
    assert differences(expected, {"cells": {"a": {"test": {"r": 0.1}, "sel": "y"}, "b": {"test": {"r": 0.25}}}}) == [
        "/cells/a/sel: 'x' -> 'y'", "/cells/b/test/r: 0.5 -> 0.25"]
    assert differences(expected, {"cells": {"b": {"test": {"r": 0.5}}}}) == ["/cells/a: missing"]


def test_smoke_grid_end_to_end(tmp_path, monkeypatch):
    """The shipped smoke grid (tiny TIGER on ml-100k), run by the CLI, then reported."""
    monkeypatch.chdir(tmp_path)  # RecBole writes ./log
    results, report = str(tmp_path / "smoke.jsonl"), str(tmp_path / "report")
    grid = load_grid(SMOKE_GRID)
    assert {"table2", "table3", "table4", "figure4", "figure5", "figure7"} <= {t for c in grid.cells for t in c.tags}
    experiment_main(["run", SMOKE_GRID, "--results", results, "--report", report, "--set", f"output_dir={tmp_path / 'out'}"])
    records = read_results(results)
    assert len(records) == len(grid.cells) and all(r["status"] == "ok" for r in records), \
        [r.get("error") for r in records]
    dealrec = [r for r in records if r["method"] == "DEALRec" and "table2" in r["tags"]]
    # the surrogate's seed is fixed in the grid: the first DEALRec cell trains it, the second seed's cell reuses
    # it from the cache (its influence scores differ: the Hessian's user subset is drawn with the run's seed)
    assert dealrec[0]["settings"]["seed"] != dealrec[1]["settings"]["seed"]
    surrogates = [json.load(open(os.path.join(r["selection_folder"], "selection.json")))["signals"]["influence"]
                  ["surrogate"] for r in dealrec]
    assert surrogates[0] == surrogates[1]  # one surrogate for both seeds (and the Figure-6 cell's extra keys)
    # the cells' signals were timed where they were computed and reported again where they were reused
    ablation = [r for r in records if r["method"] == "w/o effort"][0]
    assert ablation["signal_seconds"]["influence"] == dealrec[0]["signal_seconds"]["influence"]
    text = open(os.path.join(report, "report.md")).read()
    for heading in ("## Table 2", "## Table 3", "## Table 4", "figure4_ablation", "figure5_ratio", "figure7_lambda"):
        assert heading in text
    assert "| GRU4Rec |" in text and "## Figure 6" in text and "figure6_groups" in text
    # the statistics against the reference method and the reference rows (every cell ranked its own test users)
    assert "### Against the reference method" in text and "sign-flip p" in text and "MDE (80% power)" in text
    assert "top-target share@10" in text and "recall@10 w/o cold targets" in text  # the sensitivity columns
    for name in ("popularity", "recent_popularity", "random"):
        assert f"| *{name}* (reference) |" in text
        assert all(set(r["references"][name]) == set(r["test"]) for r in records)
    from recbole_dealrec.evaluation import load_user_results, per_user_metrics

    for record in records:  # every cell keeps its per-user results, with the target item a bootstrap clusters by
        users = load_user_results(os.path.join(str(tmp_path), record["user_results"]))
        assert len(users["target_item"]) == len(users["user_id"]) > 0

    for record in [r for r in records if "figure6" in r["tags"]]:
        users = load_user_results(os.path.join(str(tmp_path), record["user_results"]))
        recall = per_user_metrics(users["hits"], users["n_targets"], 10)["recall@10"]
        assert len(recall) == 64 and recall.mean() == pytest.approx(record["test"]["recall@10"], abs=1e-10)
        assert np.isfinite(users["loss"]).all()
    # the behaviour record (run_scripts/behaviour_record.py write, before the stage refactor): every cell's
    # selection, metrics and every cached signal, bit for bit
    record_tool = _behaviour_record_tool()
    expected = record_tool.expected_record(json.load(open(record_tool.DEFAULT_RECORD)), "smoke")  # this CPU kind's
    assert record_tool.differences(expected, record_tool.grid_record(records, str(tmp_path / "out"), str(tmp_path))) == []
    # resume: nothing left to run
    experiment_main(["run", SMOKE_GRID, "--results", results, "--set", f"output_dir={tmp_path / 'out'}"])
    assert len(read_results(results)) == len(records)
    assert json.loads(open(results).readline())["grid"] == "smoke"


SHIPPED_GRIDS = sorted(os.path.basename(p)[:-len(".yaml")]
                       for p in glob.glob(os.path.join(os.path.dirname(SMOKE_GRID), "*.yaml")))


def test_every_shipped_grid_is_checked():
    assert {"smoke", "cpu_games_tiger", "cpu_games_sasrec_replicates", "gpu_games_bigrec"} <= set(SHIPPED_GRIDS)


@pytest.mark.parametrize("name", SHIPPED_GRIDS)
def test_shipped_grids_pass_every_pre_data_check(name):
    """Every shipped grid (every YAML under run_scripts/grids/), the GPU ones included, expands and passes the
    runs' own checks as it is (the Games grids' data is imported on the machine that runs them: its presence is
    not checked here)."""
    from recbole_dealrec.experiment import check_cells

    grid = load_grid(os.path.join(os.path.dirname(SMOKE_GRID), f"{name}.yaml"))
    assert grid.name == name and len(grid.cells) >= 2
    check_cells(grid.cells, data=grid.cells[0].dataset in (None, "ml-100k"))
    tags = {t for c in grid.cells for t in c.tags}
    if name.startswith("gpu"):
        assert tags == {"table2", "table3", "table4", "figure4", "figure5", "figure6", "figure7"}
        assert {c.settings.get("seed") for c in grid.cells if "table2" in c.tags} == {2020, 2021, 2022}


def _report_text(records, tmp_path, results_dir=None):
    out = write_report(records, str(tmp_path / "rep"), results_dir or str(tmp_path))
    return open(out["report"]).read(), out["table2_facts"]


def _row(text, *cells):
    """The table lines that begin with these cells."""
    return [line for line in text.splitlines() if line.startswith("| " + " | ".join(cells) + " |")]


def test_report_compares_every_method_with_the_reference(tmp_path):
    records = (synthetic("DEALRec", [0.30, 0.31, 0.35]) + synthetic("Random", [0.20, 0.25, 0.22])
               + synthetic("Noisy", [0.60, 0.10, 0.40]))
    text, facts = _report_text(records, tmp_path)
    for column in ("| n |", "mean (method)", "mean (reference)", "mean difference", "95% t-interval", "sign-flip p",
                   "Holm-adjusted p", "MDE (80% power)", "hierarchical bootstrap 95%", "verdict",
                   "paper's one-sample t-test (p)"):
        assert column in text, column
    assert "Against **Random**" in text
    [row] = _row(text, "recall@10", "DEALRec")
    cells = [c.strip() for c in row.strip("|").split("|")]
    d = np.array([0.10, 0.06, 0.13])
    ci = stats.ttest_1samp(d, 0).confidence_interval()
    assert cells[2] == "3" and cells[5] == f"{d.mean():+.4f}" and cells[6] == f"[{ci.low:+.4f}, {ci.high:+.4f}]"
    assert cells[7] == "0.25" and cells[10] == "n/a (no per-user results)"
    # 3 seeds: the sign-flip p is at least 0.25, so the t-interval's verdict says the permutation test disagrees
    assert cells[11] == (f"**better than Random by {d.mean():.4f} [{ci.low:.4f}, {ci.high:.4f}] (95%); not significant "
                         f"by the sign-flip test after Holm (p = {float(cells[8]):.3g})**")
    [noisy] = _row(text, "recall@10", "Noisy")
    assert "no difference detected; no effect outside [" in noisy
    # Noisy has the highest mean but its intervals with DEALRec and Random include zero: nothing bold, all tied
    [main] = _row(text, "d", "M", "8-shot", "Noisy")
    assert "**" not in main and "0.3667 ± 0.2517 (tie)" in main
    assert "(tie)" in _row(text, "d", "M", "8-shot", "DEALRec")[0]
    fact = [f for f in facts if f["metric"] == "recall@10"][0]
    assert fact["best"] == "Noisy" and not fact["best_separated"]
    assert set(fact["tied_for_best"]) == {"Noisy", "DEALRec", "Random"}
    assert [r["method"] for r in fact["comparison"]] == ["DEALRec", "Noisy"]


def test_table2_equal_means_are_ties_whatever_the_order():
    for order in (("A", "B"), ("B", "A")):
        records = [r for m in order for r in synthetic(m, [0.3, 0.32, 0.31])] + synthetic("Random", [0.1, 0.11, 0.1])
        text, facts = table2(records)
        for method in ("A", "B"):
            [row] = _row(text, "d", "M", "8-shot", method)
            assert "**" not in row and "<u>" not in row and "0.3100 ± 0.0100 (tie)" in row
        assert "<u>" not in _row(text, "d", "M", "8-shot", "Random")[0]


def test_report_warns_instead_of_numbers(tmp_path):
    # no reference: one labelled warning line, no comparison numbers
    text, _ = _report_text(synthetic("A", [0.3, 0.31]) + synthetic("B", [0.2, 0.21]), tmp_path)
    assert "**warning** (d / M / 8-shot; recall@10, ndcg@10): reference method 'random' absent (methods: A, B)" in text
    assert "Against **" not in text
    # report_reference names another reference; one seed only: a warning row without numbers
    records = (synthetic("A", [0.3, 0.31], report_reference="B") + synthetic("B", [0.2, 0.21], report_reference="B")
               + synthetic("C", [0.5], report_reference="B"))
    text, _ = _report_text(records, tmp_path)
    assert "Against **B**" in text and "better than B by 0.1000" in text
    [row] = _row(text, "recall@10", "C")
    assert "**warning:** C vs B: 1 replicate(s) paired by seed" in row and "0.5" not in row.split("warning")[0]


def test_report_hierarchical_bootstrap_from_per_user_results(tmp_path):
    from recbole_dealrec.evaluation import per_user_metrics
    from recbole_dealrec.experiment.statistics import hierarchical_bootstrap_interval

    rng = np.random.default_rng(0)
    users = np.array([f"u{i}" for i in range(300)])
    targets = rng.integers(0, 30, len(users)).astype(str)
    os.makedirs(tmp_path / "r-users")
    records, per_user = [], {}
    for method, rate in (("Random", 0.2), ("DEALRec", 0.35)):
        for seed in range(3):
            hits = np.zeros((len(users), 20), dtype=bool)
            hits[np.arange(len(users)), rng.integers(0, 20, len(users))] = rng.random(len(users)) < rate + 0.02 * seed
            order = rng.permutation(len(users))  # each file in its own user order: the report aligns them
            keys = {"user_id": users[order], "hits": hits[order], "n_targets": np.ones(len(users), dtype=np.int64),
                    "target_item": targets[order]}
            np.savez(tmp_path / "r-users" / f"{method}{seed}.npz", **keys)
            metrics = per_user_metrics(hits, keys["n_targets"], 10)
            per_user[method, seed] = metrics["recall@10"]
            [record] = synthetic(method, [float(metrics["recall@10"].mean())])
            record["settings"]["seed"] = seed
            record["cell"] += str(seed)
            record["test"]["ndcg@10"] = float(metrics["ndcg@10"].mean())
            record["user_results"] = os.path.join("r-users", f"{method}{seed}.npz")
            records.append(record)
    text, _ = _report_text(records, tmp_path)
    [row] = _row(text, "recall@10", "DEALRec")
    _, low, high = hierarchical_bootstrap_interval([per_user["DEALRec", s] for s in range(3)],
                                                   [per_user["Random", s] for s in range(3)],
                                                   [targets] * 3, n_boot=2000, seed=0)
    assert f"| [{low:+.4f}, {high:+.4f}] |" in row
    # per-user results without target items: no clusters, so no interval
    for seed in range(3):
        path = tmp_path / "r-users" / f"Random{seed}.npz"
        data = dict(np.load(path))
        del data["target_item"]
        np.savez(path, **data)
    text, _ = _report_text(records, tmp_path)
    assert "n/a (per-user results hold no target items to cluster users by)" in _row(text, "recall@10", "DEALRec")[0]


def test_a_seed_is_a_full_pipeline_replicate_unless_the_grid_shares_the_surrogate(tmp_path):
    from recbole_dealrec.surrogate import train_surrogate
    from recbole_dealrec.config import DealrecConfig
    from conftest import TINY_SURROGATE

    body = {"name": "r", "settings": {**TINY_SASREC, "surrogate_config": {**TINY_SURROGATE, "seed": 7}},
            "models": ["SASRec"], "samplers": {"Random": {"sampler": "random"}, "EL2N": {"sampler": "el2n"}},
            "budgets": [50], "seeds": [1, 2]}
    full = expand_grid(body).cells
    assert {c.replicates for c in full} == {"full"}
    el2n = [c for c in full if c.method == "EL2N"]
    assert [c.settings["surrogate_config"]["seed"] for c in el2n] == [1, 2]  # the cell's seed, not the grid's 7
    assert [c.seeds() for c in el2n] == [{"seed": s, "surrogate_seed": s, "selection_seed": s} for s in (1, 2)]
    random = [c for c in full if c.method == "Random"]
    assert all(c.settings["surrogate_config"]["seed"] == 7 for c in random)  # no surrogate: nothing to reseed
    shared = expand_grid({**body, "replicates": "shared_surrogate"}).cells
    assert all(c.settings["surrogate_config"]["seed"] == 7 for c in shared) and shared[0].replicates == "shared_surrogate"
    with pytest.raises(ConfigError, match=r"`replicates` must be one of \['full', 'shared_surrogate'\]"):
        expand_grid({**body, "replicates": "some"})

    def weights(cell, where):
        config = DealrecConfig("SASRec", "ml-100k", config_dict={**cell.settings, "output_dir": str(tmp_path / where)})
        return train_surrogate(config).model.state_dict()

    first, again, other = weights(el2n[0], "a"), weights(el2n[0], "b"), weights(el2n[1], "c")
    assert all((first[k] == again[k]).all() for k in first)  # the same replicate: the same surrogate, bit for bit
    assert any((first[k] != other[k]).any() for k in first)  # another replicate: another surrogate


def test_the_report_says_which_replicates_ran_and_warns_when_they_mix(tmp_path):
    def record(method, seed, mode, value):
        return {"status": "ok", "cell": f"{method}{seed}{mode}", "method": method, "model": "SASRec",
                "dataset": "ml-100k", "tags": ["table2"], "replicates": mode, "test": {"recall@10": value},
                "settings": {"sampler": method.lower(), "selection_num": 50, "seed": seed}}

    same = [record(m, s, "full", v + s / 100) for m, v in (("Random", 0.1), ("DEALRec", 0.2)) for s in (1, 2, 3)]
    text, _ = table2(same)
    assert "Replicates: full pipeline" in text and "mix" not in text
    mixed = same[:-1] + [record("DEALRec", 3, "shared_surrogate", 0.23)]
    text, _ = table2(mixed)
    assert "**warning**: these cells mix replicate modes (full, shared_surrogate)" in text
