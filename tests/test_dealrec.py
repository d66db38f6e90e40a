"""The dealrec sampler: end to end with tiny models, compute-once-select-many, join by id, bad input."""
import json

import numpy as np
import pytest

from conftest import TINY_SURROGATE, tiny_bigrec_config
from recbole_dealrec.quick_start import run_recbole
from recbole_dealrec.errors import ConfigError
from recbole_dealrec.selection import SAMPLERS, UserScores



def dealrec_config(llm_path, tmp, **extra):
    return {
        **tiny_bigrec_config(llm_path, tmp),
        "sampler": "dealrec", "selection_num": 16, "dealrec_num_groups": 5,
        "surrogate_config": TINY_SURROGATE, "cg_max_iter": 3, "influence_power_iters": 3, "influence_batch_rows": 8192,
        "influence_params": [r"trm_encoder\.layer\.0\.multi_head_attention\.dense\.weight$"],
        "eval_user_subset": 8, "valid_user_subset": 8, "effort_batch_size": 32, "llm_max_length": 160,
        **extra,
    }


@pytest.mark.filterwarnings("ignore:iHVP solve")
def test_run_recbole_bigrec_dealrec_writes_selection_subset_and_report(tiny_llm_path, tmp_path, monkeypatch):
    result = run_recbole("BIGRec", config_dict=dealrec_config(tiny_llm_path, tmp_path))
    assert {"recall@10", "ndcg@10"} <= set(result["test_result"])
    (folder,) = (tmp_path / "out" / "ml-100k").glob("dealrec-n16-seed2020-*")
    rows = (folder / "selection.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["user_id", "internal_uid", "influence", "effort", "overall"] and len(rows) == 17
    assert (folder / "ml-100k.inter").read_text().startswith("user_id:token\titem_id:token\ttimestamp:float\n")
    for png in ("scores.png", "groups.png", "coverage.png"):
        assert (folder / png).read_bytes()[:4] == b"\x89PNG"
    report = json.loads((folder / "report.json").read_text())
    assert sum(report["groups"]["bin_picks"]) == 16 and report["selected_users"] == 16
    assert report["scores"]["overall"]["all"]["n"] == 943
    first_ids = [r.split("\t")[1] for r in rows[1:]]

    # Compute once, select many: another lambda and seed re-select from the cache; no scorer may run.
    import recbole_dealrec.scoring.effort as effort
    import recbole_dealrec.scoring.influence as influence
    from recbole_dealrec.surrogate import train as surrogate_train

    def forbidden(*args, **kwargs):
        raise AssertionError("a score was recomputed")

    monkeypatch.setattr(influence, "influence_scores", forbidden)
    monkeypatch.setattr(effort, "effort_scores_for_users", forbidden)
    monkeypatch.setattr(surrogate_train, "get_trainer", forbidden)  # the surrogate is not retrained either
    again = run_recbole("BIGRec", config_dict=dealrec_config(tiny_llm_path, tmp_path, dealrec_lambda=1.0, epochs=0), saved=False)
    assert again["selection"]["signals"]["influence"]["cached"] and again["selection"]["signals"]["effort"]["cached"]
    assert again["selection"]["folder"] != str(folder)  # another lambda never overwrites this selection
    # Same seed, same scores, same lambda -> same ids; another lambda may differ but keeps the budget.
    same = run_recbole("BIGRec", config_dict=dealrec_config(tiny_llm_path, tmp_path, epochs=0), saved=False)
    rows_again = (folder / "selection.tsv").read_text().splitlines()
    assert [r.split("\t")[1] for r in rows_again[1:]] == first_ids
    assert same["selection"]["selected_users"] == again["selection"]["selected_users"] == 16


def make_method(**config):
    defaults = {"dealrec_lambda": 0.3, "dealrec_use_influence": True, "dealrec_selection": "stratified",
                "dealrec_num_groups": 4, "dealrec_hard_prune": 0.1, "selection_num": 5, "selection_ratio": None}
    method = SAMPLERS.get("dealrec")({**defaults, **config})
    method.check_config()
    return method


def test_join_by_id_shuffled_inputs_give_the_same_selection():
    rng = np.random.default_rng(0)
    ids = np.arange(10, 50)
    influence, effort = rng.normal(size=40), rng.random(40)
    method = make_method()
    base = method.select(ids, {"influence": UserScores(ids, influence), "effort": UserScores(ids, effort)}, 8,
                         np.random.default_rng(1))
    order_a, order_b = rng.permutation(40), rng.permutation(40)
    shuffled = method.select(
        ids[::-1].copy(),
        {"influence": UserScores(ids[order_a], influence[order_a]), "effort": UserScores(ids[order_b], effort[order_b])},
        8, np.random.default_rng(1),
    )
    np.testing.assert_array_equal(base.user_ids, shuffled.user_ids)
    with pytest.raises(ValueError, match="missing|differ"):
        method.select(ids, {"influence": UserScores(ids, influence), "effort": UserScores(ids + 1, effort)}, 8,
                      np.random.default_rng(1))


def test_ablations_need_fewer_signals_and_greedy_takes_the_top():
    assert make_method().required_signals() == ("influence", "effort")
    assert make_method(dealrec_lambda=0).required_signals() == ("influence",)
    assert make_method(dealrec_use_influence=False).required_signals() == ("effort",)
    ids = np.arange(1, 21)
    scores = np.linspace(0, 1, 20)
    greedy = make_method(dealrec_lambda=0, dealrec_selection="greedy")
    picked = greedy.select(ids, {"influence": UserScores(ids, scores)}, 3, np.random.default_rng(0))
    np.testing.assert_array_equal(picked.user_ids, [18, 19, 20])


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"dealrec_lambda": -0.1}, r"dealrec_lambda must be a number >= 0"),
        ({"dealrec_num_groups": 0}, r"dealrec_num_groups must be an integer >= 1"),
        ({"dealrec_hard_prune": 1.0}, r"dealrec_hard_prune must be a number in \[0, 1\)"),
        ({"dealrec_hard_prune": -0.1}, r"dealrec_hard_prune must be a number in \[0, 1\)"),
        ({"selection_num": 944}, r"selection_num=944 is above the number of users"),
        ({"selection_num": 900}, r"budget 900 is larger than the 849 users left after hard pruning"),
        ({"dealrec_selection": "best"}, r"dealrec_selection must be one of stratified, greedy"),
    ],
)
def test_bad_dealrec_input_fails_before_any_scoring(tmp_path, extra, message):
    config = {"sampler": "dealrec", "selection_num": 16, "output_dir": str(tmp_path / "out"),
              "checkpoint_dir": str(tmp_path / "ckpt"), **extra}
    with pytest.raises(ConfigError, match=message):
        run_recbole("SASRec", config_dict=config)
    assert not (tmp_path / "out" / "ml-100k" / "cache").exists()


def test_backend_only_keys_leave_the_surrogate_key_alone(tmp_path):
    """BIGRec's own keys (micro-batching, beams) never reach the surrogate: its cache and the influence scores
    keyed by it stay valid; a key RecBole's SASRec reads does change the key."""
    from recbole_dealrec.config import DealrecConfig
    from recbole_dealrec.surrogate.train import surrogate_key

    def key(**extra):
        cfg = dealrec_config("unused-llm-path", tmp_path, **extra)
        return surrogate_key(DealrecConfig("BIGRec", "ml-100k", config_dict=cfg))

    base = key()
    assert key(gradient_accumulation_steps=4, num_beams=3, warmup_steps=7) == base
    assert key(surrogate_config={**TINY_SURROGATE, "hidden_size": 16}) != base
