"""Bad input: a clear error naming the key and the allowed values, before any training starts."""
import os
import subprocess

import numpy as np

import pytest

from conftest import TINY_SASREC
from recbole_dealrec.evaluation import load_user_results
from recbole_dealrec.quick_start import run_recbole
from recbole_dealrec.errors import ConfigError


def run(tmp_path, **config):
    config = {"checkpoint_dir": str(tmp_path), "output_dir": str(tmp_path), "epochs": 0, **config}
    return run_recbole(config.pop("model", "SASRec"), config.pop("dataset", None), config_dict=config)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"sampler": "nope"}, r"unknown sampler 'nope'; known samplers: .*full.*random"),
        ({"model": "NoSuchModel"}, r"unknown model 'NoSuchModel'; known models: .*BERT4Rec.*SASRec"),
        ({"sampler": "random", "selection_ratio": 0}, r"selection_ratio must be a number in \(0, 1\], got 0"),
        ({"sampler": "random", "selection_ratio": 1.5}, r"selection_ratio must be a number in \(0, 1\], got 1.5"),
        ({"sampler": "random", "selection_num": 0}, r"selection_num must be an integer >= 1, got 0"),
        ({"sampler": "random", "selection_num": 944}, r"selection_num=944 is above the number of users .*\(943\)"),
        ({"sampler": "random", "selection_num": 10, "selection_ratio": 0.1}, r"either selection_ratio or selection_num"),
        ({"sampler": "random"}, r"needs a budget: set selection_num"),
        ({"sampler": "full", "selection_num": 10}, r"sampler 'full' sets its own budget"),
        ({"sampler": "random", "selection_num": 10, "surrogate_user_weighting": "users"},
         r"surrogate_user_weighting must be one of \['prefix', 'user'\], got 'users'"),
        ({"sampler": "random", "selection_num": 10, "surrogate_length_grouped_batches": -1},
         r"surrogate_length_grouped_batches must be an integer >= 0"),
        ({"sampler": "random", "selection_num": 10, "surrogate_windows": "chunks"},
         r"surrogate_windows must be one of \['sliding', 'chunked'\], got 'chunks'"),
        ({"sampler": "dealrec", "selection_num": 10, "surrogate_windows": "chunked", "surrogate_sequence_mode": False},
         r"surrogate_windows: chunked needs surrogate_sequence_mode: True"),
        ({"sampler": "random", "selection_num": 10, "sequence_list_fields": ["rating"]},  # in the file, not loaded
         r"sequence_list_fields=\['rating'\]: allowed auto, all or a list of ml-100k's loaded interaction "
         r"fields \['item_id', 'timestamp'\]"),
        ({"sampler": "random", "selection_num": 10, "sequence_list_fields": ["user_id"]},
         r"sequence_list_fields=\['user_id'\]: allowed auto, all or a list of"),
        ({"sampler": "random", "selection_num": 10, "sequence_list_fields": "most"},
         r"sequence_list_fields='most': allowed auto, all or a list of"),
        ({"sampler": "random", "selection_num": 10, "surrogate_loss": "sample"},
         r"surrogate_loss must be one of \['auto', 'full', 'sampled'\], got 'sample'"),
        ({"sampler": "dealrec", "selection_num": 10, "surrogate_config": {"surrogate_loss": "sampled",
                                                                          "surrogate_negatives": -3}},
         r"surrogate_negatives must be an integer >= 1"),
        ({"sampler": "dealrec", "selection_num": 10, "surrogate_model": "BERT4Rec",
          "surrogate_config": {"surrogate_loss": "sampled"}},
         r"surrogate_loss: sampled needs surrogate_sequence_mode: True and a SASRec surrogate .*got BERT4Rec"),
        ({"sampler": "dealrec", "selection_num": 10, "surrogate_loss": "sampled", "surrogate_sequence_mode": False},
         r"surrogate_loss: sampled needs surrogate_sequence_mode: True"),
    ],
)
def test_bad_config_values(tmp_path, config, message):
    with pytest.raises(ConfigError, match=message):
        run(tmp_path, **config)
    assert not list(tmp_path.glob("*.pth"))  # nothing was trained


def test_unknown_dataset_names_the_path_and_known_names(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.inter.*Known datasets: ml-100k \(embedded\).*games"):
        run(tmp_path, dataset="nope", data_path=str(tmp_path))


def test_missing_games_files_name_the_path_and_the_importer(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/games/games\.inter \(import it first"):
        run(tmp_path, dataset="games", data_path=str(tmp_path))


def test_cli_reports_bad_input_in_one_line(tmp_path):
    result = subprocess.run(
        ["run_recbole", "--model=SASRec", "--sampler=random", "--selection_ratio=2", f"--output_dir={tmp_path}"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "run_recbole: error: selection_ratio must be a number in (0, 1], got 2" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_code_payload_in_a_property_file_or_on_the_command_line_stays_a_string(tmp_path):
    from recbole_dealrec.config import DealrecConfig

    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    yaml_file = tmp_path / "hostile.yaml"
    yaml_file.write_text(f'bigrec_instruction: "{payload}"\n')
    config = DealrecConfig("SASRec", None, [str(yaml_file)], {"sampler": payload},
                           argv=[f"--title_field={payload}", "--epochs=3", "--topk=[5, 10]", "--report_plots=false"])
    assert config["sampler"] == payload and config["title_field"] == payload
    assert config["epochs"] == 3 and config["topk"] == [5, 10] and config["report_plots"] is False
    # The surrogate's config re-reads the run's file config as a config dict: still no code runs.
    from recbole_dealrec.surrogate import surrogate_config

    file_only = DealrecConfig("SASRec", None, [str(yaml_file)])
    assert surrogate_config(file_only)["bigrec_instruction"] == payload
    # In a key of another type it is a string, hence a type error naming the key: still no code runs.
    with pytest.raises(ConfigError, match="selection_seed must be an int"):
        DealrecConfig("SASRec", None, argv=[f"--selection_seed={payload}"])
    assert not marker.exists()
    # The payload is live: RecBole's own conversion runs it.
    from recbole.config import Config

    Config._convert_config_dict(None, {"sampler": payload})
    assert marker.exists()


# --------------------------------------------------------------------------- bad input before long work


def test_unknown_key_names_the_closest_and_unchecked_keys_lets_one_through(tmp_path):
    from recbole_dealrec.config import DealrecConfig, check_known_keys

    with pytest.raises(ConfigError, match=r"unknown key 'selction_num'.*did you mean 'selection_num'"):
        run(tmp_path, sampler="random", selction_num=10)
    check_known_keys(DealrecConfig("SASRec", None, config_dict={"my_recbole_key": 1, "unchecked_keys": ["my_recbole_key"]}))
    assert not (tmp_path / "ml-100k").exists()  # nothing written


def test_influence_params_matching_nothing_fails_before_the_surrogate_trains(tmp_path):
    with pytest.raises(ConfigError, match=r"influence_params=\['nomatch'\].*Available parameters: item_embedding"):
        run(tmp_path, sampler="dealrec", selection_num=10, influence_params=["nomatch"])
    assert not list(tmp_path.rglob("surrogate-*"))  # no surrogate was trained or cached


@pytest.mark.parametrize("make, message", [
    (lambda d: None, r"no such local folder"),
    (lambda d: d.mkdir(), r"folder has no config.json"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"hidden_size": 8}')), r"has no `model_type`"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": ')), r"is not valid JSON"),
])
def test_bad_llm_path_fails_before_any_scoring(tmp_path, make, message):
    folder = tmp_path / "llm"
    make(folder)
    with pytest.raises(ConfigError, match=rf"`llm_path` = .*{message}"):
        run(tmp_path, sampler="dealrec", selection_num=10, llm_path=str(folder))
    assert not list(tmp_path.rglob("surrogate-*")) and not list(tmp_path.rglob("*.npz"))


def test_bigrec_without_titles_fails_before_data(tmp_path):
    with pytest.raises(ConfigError, match="BIGRec needs item titles: set title_field"):
        run(tmp_path, model="BIGRec", sampler="random", selection_num=10, title_field=None)


@pytest.mark.parametrize("text, message", [
    ("epochs: [1, 2\n", r"bad\.yaml line 2, column 1: invalid YAML"),
    ("- 1\n- 2\n", r"bad\.yaml: expected key: value lines \(a mapping\), got a list"),
])
def test_invalid_yaml_names_the_file_and_line(tmp_path, text, message):
    from recbole_dealrec.config import DealrecConfig

    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message):
        DealrecConfig("SASRec", None, [str(bad)])
    with pytest.raises(ConfigError, match=r"config file .*missing\.yaml does not exist"):
        DealrecConfig("SASRec", None, [str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("row, message", [
    ("1\t2\t3", r"toy\.inter line 3: 3 fields, the header has 4"),
    ("1\t2\t3\t4\t5", r"toy\.inter line 3: 5 fields, the header has 4"),
    ("1\t2\t3\tyesterday", r"toy\.inter line 3: timestamp:float must be a number, got 'yesterday'"),
])
def test_malformed_inter_rows_name_file_and_line(tmp_path, row, message):
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "toy.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t5\t10\n" + row + "\n")
    with pytest.raises(ConfigError, match=message):
        run(tmp_path, dataset="toy", data_path=str(tmp_path), load_col={"inter": ["user_id", "item_id", "timestamp"]})


def test_cli_one_line_exit_2_for_input_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    for args, message in (
        (["--selction_num=10"], "unknown key 'selction_num'"),
        ([f"--config_files={bad}"], "bad.yaml line 2, column 1: invalid YAML"),
    ):
        result = subprocess.run(["run_recbole", "--model=SASRec", "--sampler=random", f"--output_dir={tmp_path}", *args],
                                cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- no shared files, caches that heal


def test_each_run_has_its_own_checkpoint_folder_under_output_dir(tmp_path):
    config = {"output_dir": str(tmp_path), "epochs": 1, "sampler": "random", "selection_num": 30,
              "MAX_ITEM_LIST_LENGTH": 5, "hidden_size": 8, "inner_size": 8, "n_layers": 1, "n_heads": 1,
              "train_batch_size": 4096, "show_progress": False}
    first = run_recbole("SASRec", None, config_dict=config)["selection"]["checkpoint"]
    second = run_recbole("SASRec", None, config_dict=config)["selection"]["checkpoint"]
    root = tmp_path / "ml-100k" / "checkpoints"
    assert first and second and os.path.dirname(first) != os.path.dirname(second)
    assert {os.path.dirname(os.path.dirname(p)) for p in (first, second)} == {str(root)}
    assert not (tmp_path / "saved").exists()
    import torch

    state = torch.load(first, weights_only=True)  # tensors and numbers only: no pickled Config to run
    assert state["config"] == {"model": "SASRec"} and "state_dict" in state


def test_truncated_cache_file_is_discarded_and_recomputed(tmp_path, caplog):
    import logging

    import numpy as np

    from recbole_dealrec.scoring.cache import ScoredUsers, cached_user_scores

    config = {"output_dir": str(tmp_path), "dataset": "toy"}
    calls = []

    def compute():
        calls.append(1)
        return ScoredUsers(np.array(["a", "b"]), np.array([1.0, 2.0]), {})

    first = cached_user_scores(config, "sig", {"k": 1}, compute)
    again = cached_user_scores(config, "sig", {"k": 1}, compute)
    assert len(calls) == 1 and again.meta["cached"]
    path = first.meta["path"]
    with open(path, "r+b") as handle:  # a power cut mid-copy: the file loses its tail
        handle.truncate(os.path.getsize(path) // 2)
    with caplog.at_level(logging.WARNING):
        healed = cached_user_scores(config, "sig", {"k": 1}, compute)
    assert len(calls) == 2 and not healed.meta["cached"] and np.array_equal(healed.scores, [1.0, 2.0])
    assert any(path in r.getMessage() and "recomputed" in r.getMessage() for r in caplog.records)
    assert cached_user_scores(config, "sig", {"k": 1}, compute).meta["cached"] and len(calls) == 2


def test_a_cache_entry_under_another_keys_name_is_refused(tmp_path, caplog):
    # intact bytes are not enough: the record names the file (hence the key) it was written for
    import logging
    import shutil

    import numpy as np

    from recbole_dealrec.scoring.cache import ScoredUsers, cached_user_scores

    config = {"output_dir": str(tmp_path), "dataset": "toy"}

    def scores(value):
        return lambda: ScoredUsers(np.array(["a", "b"]), np.array([value, value]), {})

    one = cached_user_scores(config, "sig", {"k": 1}, scores(1.0)).meta["path"]
    two = cached_user_scores(config, "sig", {"k": 2}, scores(2.0)).meta["path"]
    for suffix in ("", ".sha256"):  # key 1's entry copied, with its record, over key 2's
        shutil.copyfile(one + suffix, two + suffix)
    with caplog.at_level(logging.WARNING):
        again = cached_user_scores(config, "sig", {"k": 2}, scores(2.0))
    assert not again.meta["cached"] and np.array_equal(again.scores, [2.0, 2.0])
    assert any("not under its own name" in r.getMessage() for r in caplog.records)


def test_two_runs_in_parallel_in_one_output_dir_each_use_their_own_surrogate(tmp_path):
    """Started together (same second), with different seeds: each run's selection equals the one it makes alone."""

    def args(seed, out):
        return ["run_recbole", "--model=SASRec", "--sampler=el2n", "--selection_num=50", f"--seed={seed}",
                f"--output_dir={out}", "--epochs=1", "--show_progress=False", "--el2n_epoch=1",
                "--surrogate_config={'hidden_size': 8, 'inner_size': 8, 'n_layers': 1, 'n_heads': 1, "
                "'MAX_ITEM_LIST_LENGTH': 5, 'epochs': 2, 'train_batch_size': 4096}",
                "--MAX_ITEM_LIST_LENGTH=5", "--hidden_size=8", "--inner_size=8", "--n_layers=1", "--n_heads=1",
                "--train_batch_size=4096"]

    shared = tmp_path / "shared"
    procs = [subprocess.Popen(args(seed, shared), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for seed in (1, 2)]
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
    for seed in (1, 2):
        alone = tmp_path / f"alone{seed}"
        subprocess.run(args(seed, alone), cwd=tmp_path, check=True, capture_output=True)
        [mine] = [p for p in (shared / "ml-100k").glob(f"el2n-n50-seed{seed}-*/selection.tsv")]
        [ref] = list((alone / "ml-100k").glob(f"el2n-n50-seed{seed}-*/selection.tsv"))
        assert mine.read_text() == ref.read_text()
    assert len(list((shared / "ml-100k" / "checkpoints").iterdir())) == 2  # one folder per run


def test_two_runs_sharing_a_checkpoint_dir_each_test_their_own_weights(tmp_path):
    """Started together (same second) with one --checkpoint_dir: each run trains into a folder of its own inside it
    and tests its own weights (RecBole names checkpoints <Model>-<second>.pth: before, one run tested the other's)."""

    def args(seed, ckpt, out):
        return ["run_recbole", "--model=SASRec", "--sampler=random", "--selection_num=200", f"--seed={seed}",
                f"--checkpoint_dir={ckpt}", f"--output_dir={out}", f"--test_user_results_file={out}/users.npz",
                "--epochs=2", "--show_progress=False", "--MAX_ITEM_LIST_LENGTH=5", "--hidden_size=8",
                "--inner_size=8", "--n_layers=1", "--n_heads=1", "--train_batch_size=4096"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    shared = tmp_path / "shared_ckpt"
    procs = [subprocess.Popen(args(seed, shared, tmp_path / f"together{seed}"), cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
    assert len([d for d in shared.iterdir() if d.is_dir()]) == 2  # one folder per run inside the given one
    for seed in (1, 2):
        subprocess.run(args(seed, tmp_path / f"ckpt{seed}", tmp_path / f"alone{seed}"), cwd=tmp_path, env=env,
                       check=True, capture_output=True)
        together = load_user_results(str(tmp_path / f"together{seed}" / "users.npz"))
        alone = load_user_results(str(tmp_path / f"alone{seed}" / "users.npz"))
        np.testing.assert_array_equal(together["hits"], alone["hits"])
    one, two = (load_user_results(str(tmp_path / f"alone{s}" / "users.npz")) for s in (1, 2))
    assert not np.array_equal(one["hits"], two["hits"])  # the two seeds' models differ: the check can fail


def embedded_ml100k() -> str:
    import recbole

    return os.path.join(os.path.dirname(recbole.__file__), "dataset_example", "ml-100k")


def test_a_data_path_the_user_gives_for_ml_100k_is_read_not_the_embedded_copy(tmp_path):
    from recbole_dealrec.config import DealrecConfig
    from recbole_dealrec.data import create_dataset

    mine = tmp_path / "mine" / "ml-100k"
    mine.mkdir(parents=True)
    for name in os.listdir(embedded_ml100k()):
        text = open(os.path.join(embedded_ml100k(), name), encoding="utf-8").read()
        if name.endswith(".inter"):  # the user's copy: the first 20,000 interactions only
            text = "\n".join(text.splitlines()[:20001]) + "\n"
        (mine / name).write_text(text, encoding="utf-8")
    config = DealrecConfig("SASRec", "ml-100k", config_dict={"data_path": str(tmp_path / "mine")})
    assert config["data_path"] == str(mine)
    assert create_dataset(config).inter_num == 20000
    with pytest.raises(ConfigError, match=r"data_path '.*elsewhere' has no ml-100k/ml-100k.inter"):
        DealrecConfig("SASRec", "ml-100k", config_dict={"data_path": str(tmp_path / "elsewhere")})


def toy(folder, rows: int) -> None:
    folder.mkdir(parents=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    lines += [f"{u}\t{(u * 7 + t) % 40}\t{t}" for u in range(rows) for t in range(8)]
    (folder / "toy.inter").write_text("\n".join(lines) + "\n")


def test_two_datasets_of_one_name_never_share_a_selection_or_a_grid_cell(tmp_path):
    from recbole_dealrec.experiment import expand_grid

    toy(tmp_path / "a" / "toy", 30)
    toy(tmp_path / "b" / "toy", 31)
    folders, keys = [], []
    for where in ("a", "b"):
        settings = {**TINY_SASREC, "data_path": str(tmp_path / where),
                    "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "topk": [5], "valid_metric": "mrr@5",
                    "output_dir": str(tmp_path / "out"), "checkpoint_dir": str(tmp_path / "ckpt")}
        result = run_recbole("SASRec", "toy", config_dict={**settings, "sampler": "random", "selection_num": 10,
                                                            "epochs": 0}, saved=False)
        folders.append(result["selection"]["folder"])
        grid = expand_grid({"name": "g", "datasets": ["toy"], "models": ["SASRec"], "samplers": ["random"],
                            "budgets": [10], "seeds": [1], "settings": settings})
        keys.append(grid.cells[0].key)
    assert folders[0] != folders[1] and keys[0] != keys[1]
    moved = tmp_path / "moved"
    os.rename(tmp_path / "a", moved)  # the same data elsewhere: the same grid cell
    assert expand_grid({"name": "g", "datasets": ["toy"], "models": ["SASRec"], "samplers": ["random"], "budgets": [10],
                        "seeds": [1], "settings": {**settings, "data_path": str(moved)}}).cells[0].key == keys[0]


@pytest.mark.parametrize("rows, message", [
    ([], r"toy.inter: a header and no rows"),
    ([f"{u}\t{u % 5}\t{t}" for u in range(20) for t in range(2)], r"the split leaves no (valid|test) rows"),
])
def test_degenerate_data_is_a_clear_error_after_loading(tmp_path, rows, message):
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "toy.inter").write_text("\n".join(["user_id:token\titem_id:token\ttimestamp:float", *rows]) + "\n")
    with pytest.raises(ConfigError, match=message):
        run(tmp_path, dataset="toy", data_path=str(tmp_path), load_col={"inter": ["user_id", "item_id", "timestamp"]},
            topk=[3], valid_metric="mrr@3", sampler="random", selection_num=2)


def test_fully_duplicated_interactions_are_a_warning_with_counts(tmp_path, caplog):
    folder = tmp_path / "toy"
    folder.mkdir()
    rows = [f"{u}\t{(u * 3 + t) % 17}\t{t}" for u in range(30) for t in range(6)]
    (folder / "toy.inter").write_text("\n".join(["user_id:token\titem_id:token\ttimestamp:float", *rows, *rows[:40]]) + "\n")
    with caplog.at_level("WARNING"):
        run(tmp_path, dataset="toy", data_path=str(tmp_path), load_col={"inter": ["user_id", "item_id", "timestamp"]},
            topk=[3], valid_metric="mrr@3", sampler="random", selection_num=5)
    assert "40 of 220 interactions repeat an earlier one exactly" in caplog.text


def test_users_dropped_by_recboles_filters_are_a_warning_with_counts(tmp_path, caplog):
    folder = tmp_path / "toy"
    folder.mkdir()
    rows = [f"{u}\t{(u * 3 + t) % 17}\t{t}" for u in range(30) for t in range(6 if u < 25 else 3)]
    (folder / "toy.inter").write_text("\n".join(["user_id:token\titem_id:token\ttimestamp:float", *rows]) + "\n")
    with caplog.at_level("WARNING"):
        run(tmp_path, dataset="toy", data_path=str(tmp_path), load_col={"inter": ["user_id", "item_id", "timestamp"]},
            topk=[3], valid_metric="mrr@3", sampler="random", selection_num=5, user_inter_num_interval="[5,inf)")
    assert "5 of 30 users in the .inter file dropped by RecBole's filters" in caplog.text
