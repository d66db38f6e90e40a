"""The config layer, fuzzed: for every key of the plugin's property files and every RecBole key a run reads, a
wrong type (and, for RecBole's keys, an out-of-range value) is a ConfigError naming the key, before any data is
read (``run_recbole`` turns it into one line and exit code 2)."""
from __future__ import annotations

import pytest

from recbole_dealrec.config import RECBOLE_KEY_RULES, declared_key_types
from recbole_dealrec.quick_start import run_recbole
from recbole_dealrec.errors import ConfigError

WRONG_TYPE = {"int": "zzz", "float": "zzz", "bool": "maybe", "str": 123, "list": {"a": 1}, "dict": [1, 2],
              "str or int": 1.5, "str or list": 1.5}
OUT_OF_RANGE = {"epochs": -1, "train_batch_size": 0, "eval_batch_size": 0, "learning_rate": -1, "weight_decay": -0.1,
                "seed": -5, "MAX_ITEM_LIST_LENGTH": 0, "stopping_step": 0, "eval_step": -1, "topk": [0],
                "metric_decimal_place": -1, "hidden_size": 0, "inner_size": 0, "n_layers": 0, "n_heads": 0,
                "embedding_size": 0, "hidden_dropout_prob": 1.5, "attn_dropout_prob": -0.5, "dropout_prob": 1,
                "loss_type": "MSE", "valid_metric": "", "data_path": "", "checkpoint_dir": ""}


def must_fail_before_the_data(key, value, tmp_path, monkeypatch):
    import recbole_dealrec.pipeline as pipeline

    def no_data(*args, **kwargs):
        raise AssertionError(f"{key}={value!r} was accepted: the data was about to be loaded")

    monkeypatch.setattr(pipeline, "create_dataset", no_data)
    with pytest.raises(ConfigError) as error:
        run_recbole("SASRec", config_dict={"output_dir": str(tmp_path / "out"), key: value})
    message = str(error.value)
    assert key in message and "\n" not in message, message


@pytest.mark.parametrize("key", sorted(k for k in declared_key_types() if k not in RECBOLE_KEY_RULES))
def test_every_property_key_rejects_a_wrong_type(key, tmp_path, monkeypatch):
    kind = declared_key_types()[key][0]
    must_fail_before_the_data(key, WRONG_TYPE[kind], tmp_path, monkeypatch)


@pytest.mark.parametrize("key", sorted(RECBOLE_KEY_RULES))
def test_every_recbole_key_a_run_reads_rejects_a_wrong_type_and_an_out_of_range_value(key, tmp_path, monkeypatch):
    types = RECBOLE_KEY_RULES[key][0]
    wrong = "zzz" if str not in types else 123
    must_fail_before_the_data(key, wrong, tmp_path, monkeypatch)
    if key in OUT_OF_RANGE:  # every key but the booleans has a range
        must_fail_before_the_data(key, OUT_OF_RANGE[key], tmp_path, monkeypatch)


def test_the_rules_cover_every_recbole_key_in_the_table_and_the_defaults_pass():
    assert set(OUT_OF_RANGE) == {k for k, rule in RECBOLE_KEY_RULES.items() if rule[0] != (bool,)}
    # the shipped defaults are valid values of their own declared types
    from recbole_dealrec.config import DealrecConfig, check_key_types

    keys = {"epochs": 3, "topk": [10, 20], "influence_damping": "auto", "reference_recent_window": 5,
            "selection_num": None, "learning_rate": 1, "seed": 0}
    check_key_types(keys)
    assert DealrecConfig("SASRec", "ml-100k", config_dict=keys)["influence_damping"] == "auto"


def test_selection_seed_is_checked_before_the_surrogate(tmp_path, monkeypatch):
    # it failed with a traceback only after the surrogate and influence had run
    must_fail_before_the_data("selection_seed", -1, tmp_path, monkeypatch)


def test_a_key_of_another_sampler_is_reported_not_ignored(caplog):
    from recbole_dealrec.config import DealrecConfig
    from recbole_dealrec.selection import check_selection_config

    with caplog.at_level("WARNING"):
        check_selection_config(DealrecConfig("SASRec", "ml-100k", config_dict={
            "sampler": "random", "selection_num": 5, "dealrec_lambda": 0.5}))
    assert "dealrec_lambda is a key of sampler(s) dealrec, not of sampler 'random'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_selection_config(DealrecConfig("SASRec", "ml-100k", config_dict={
            "sampler": "dealrec", "selection_num": 5, "dealrec_lambda": 0.5}))
    assert "does nothing" not in caplog.text


@pytest.mark.parametrize("key", ["output_dir", "checkpoint_dir", "test_user_results_file", "bigrec_generations_file"])
def test_an_unwritable_output_is_an_error_before_the_data(key, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    must_fail_before_the_data(key, str(blocker / "sub" / "out.npz"), tmp_path, monkeypatch)
