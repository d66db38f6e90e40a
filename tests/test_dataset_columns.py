"""A plain RecBole atomic dataset without any YAML: its columns and field names come from the files' headers
(``recbole_dealrec.config.infer_atomic_columns``), or a one-line error names the key; the real RecBole pipeline
then loads and evaluates it."""
from __future__ import annotations

import pytest

from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.errors import ConfigError
from recbole_dealrec.quick_start import run_recbole


def write_dataset(root, name: str, header: str, item_header: str | None = None) -> None:
    """30 users x 6 interactions over 17 items, in the columns the header names (user, item, time, rating)."""
    folder = root / name
    folder.mkdir()
    fields = header.split("\t")
    rows = []
    for u in range(30):
        for t in range(6):
            values = {"token": None, "float": None}
            row = []
            for field in fields:
                kind = field.rsplit(":", 1)[1]
                if kind == "token":
                    row.append(str(u) if not values["token"] else str((u * 3 + t) % 17))
                    values["token"] = True
                else:
                    row.append(str(t) if not values["float"] else str(1 + t % 5))
                    values["float"] = True
            rows.append("\t".join(row))
    (folder / f"{name}.inter").write_text("\n".join([header, *rows]) + "\n")
    if item_header:
        (folder / f"{name}.item").write_text("\n".join([item_header, *(f"{i}\tgame {i}" for i in range(17))]) + "\n")


def run(tmp_path, name: str, **config):
    config = {"checkpoint_dir": str(tmp_path), "output_dir": str(tmp_path), "epochs": 0, "data_path": str(tmp_path),
              "topk": [3], "valid_metric": "mrr@3", "sampler": "random", "selection_num": 5, **config}
    return run_recbole(config.pop("model", "SASRec"), name, config_dict=config)


def test_recboles_default_names_without_a_yaml_load_every_column(tmp_path, caplog):
    """Before: RecBole loaded user_id and item_id only, and the sequential split died with
    ``[timestamp] is not exist in interaction``."""
    write_dataset(tmp_path, "plain", "user_id:token\titem_id:token\ttimestamp:float\trating:float\tweight:float",
                  "item_id:token\ttitle:token_seq")
    config = DealrecConfig("SASRec", "plain", config_dict={"data_path": str(tmp_path)})
    # the other .inter column stays out (a sequential dataset would copy it into a list per row)
    assert config["load_col"] == {"inter": ["user_id", "item_id", "timestamp", "rating"], "item": ["item_id", "title"]}
    assert "not loaded from .inter: weight" in config.inferred_columns[0]
    assert config["title_field"] == "title"
    with caplog.at_level("INFO"):
        result = run(tmp_path, "plain")
    assert "inferred from the atomic files' headers" in caplog.text
    assert set(result["test_result"]) >= {"recall@3", "ndcg@3"}


def test_other_names_are_found_by_type_and_name(tmp_path):
    write_dataset(tmp_path, "renamed", "uid:token\tproduct_item:token\tevent_time:float\tscore:float")
    config = DealrecConfig("SASRec", "renamed", config_dict={"data_path": str(tmp_path)})
    assert (config["USER_ID_FIELD"], config["ITEM_ID_FIELD"], config["TIME_FIELD"], config["RATING_FIELD"]) == (
        "uid", "product_item", "event_time", "score")
    result = run(tmp_path, "renamed")
    assert set(result["test_result"]) >= {"recall@3"}


@pytest.mark.parametrize("header, given, message", [
    ("who:token\titem_id:token\ttimestamp:float", {},
     r"^USER_ID_FIELD: nouser.inter has no 'user_id' column and no single token column named like it \(header: "
     r"who:token, item_id:token, timestamp:float\); set USER_ID_FIELD to the column"),
    ("user_id:token\titem_id:token", {},
     r"^TIME_FIELD: nouser.inter has no 'timestamp' column .*a sequential model orders each user's interactions by it"),
    ("user_id:token\titem_id:token\ttimestamp:float", {"USER_ID_FIELD": "customer"},
     r"^USER_ID_FIELD='customer' is not a column of nouser.inter \(header: user_id:token, item_id:token, timestamp:float\)$"),
])
def test_a_field_that_cannot_be_found_is_one_line_naming_the_key(tmp_path, header, given, message):
    write_dataset(tmp_path, "nouser", header)
    with pytest.raises(ConfigError, match=message) as error:
        DealrecConfig("SASRec", "nouser", config_dict={"data_path": str(tmp_path), **given})
    assert "\n" not in str(error.value)


def test_a_dataset_with_a_property_file_or_load_col_is_left_as_it_is(tmp_path):
    write_dataset(tmp_path, "given", "user_id:token\titem_id:token\ttimestamp:float\trating:float")
    config = DealrecConfig("SASRec", "given", config_dict={"data_path": str(tmp_path),
                                                           "load_col": {"inter": ["user_id", "item_id", "timestamp"]}})
    assert config["load_col"] == {"inter": ["user_id", "item_id", "timestamp"]}
    assert DealrecConfig("SASRec", "ml-100k")["load_col"] == {"inter": ["user_id", "item_id", "timestamp"]}
