"""The paper's baselines (GraNd, EL2N, CCS, TF-DCon, RecRanker) on the signal registry: exactness of the fast
paths against plain references, selection contracts, end to end through run_recbole, caching, bad input."""
import logging

import numpy as np
import pytest
import torch

from conftest import TINY_SASREC, TINY_SURROGATE
from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data import create_dataset, data_preparation
from recbole_dealrec.quick_start import run_recbole
from recbole_dealrec.errors import ConfigError
from recbole_dealrec.scoring.cache import UserScores
from recbole_dealrec.gradients.params import select_parameters
from recbole_dealrec.scoring.training_dynamics import per_user_el2n, per_user_gradient_norms, per_user_gradient_norms_loop
from recbole_dealrec.selection import SAMPLERS
from recbole_dealrec.selection.clustering import proportional_quotas
from recbole_dealrec.surrogate import SurrogateLoss
from recbole_dealrec.model import get_model

BASELINES = ("grand", "el2n", "ccs", "tfdcon", "recranker")


def untrained(model_name, **extra):
    config = DealrecConfig(model_name, "ml-100k", config_dict={**TINY_SURROGATE, **extra})
    train, _, _ = data_preparation(config, create_dataset(config))
    torch.manual_seed(0)
    return get_model(model_name)(config, train.dataset).double().eval(), train.dataset


@pytest.mark.parametrize("model_name", ["SASRec", "BERT4Rec"])
def test_grand_batched_norms_equal_a_per_user_autograd_loop(model_name):
    model, dataset = untrained(model_name)
    loss = SurrogateLoss(model)
    params = select_parameters(model.named_parameters(), [".*"])
    users = np.array([5, 1, 9, 2, 30, 7, 8, 3])  # any order; several share a row count only by chance
    batched = per_user_gradient_norms(loss, params, dataset, users, max_rows=120)
    loop = per_user_gradient_norms_loop(loss, params, dataset, users)
    torch.testing.assert_close(batched, loop, rtol=1e-9, atol=1e-9)
    assert batched.min() > 0


def test_grand_groups_users_of_equal_length_exactly():
    # Users truncated to few rows share row counts: the vmap path stacks them; still equal to the loop.
    model, dataset = untrained("SASRec")
    loss = SurrogateLoss(model)
    params = select_parameters(model.named_parameters(), [r"item_embedding", r"trm_encoder\.layer\.0\.feed"])
    uid = dataset.inter_feat[dataset.uid_field].numpy()
    users, counts = np.unique(uid, return_counts=True)
    same = users[counts == np.bincount(counts).argmax()][:6]
    assert len(same) >= 3
    torch.testing.assert_close(per_user_gradient_norms(loss, params, dataset, same, max_rows=10_000),
                               per_user_gradient_norms_loop(loss, params, dataset, same), rtol=1e-9, atol=1e-9)


def test_el2n_equals_its_closed_form():
    model, dataset = untrained("SASRec")
    loss = SurrogateLoss(model)
    users = np.array([3, 1, 2, 10])
    fast = per_user_el2n(loss, dataset, users, max_rows=50)
    params = dict(model.named_parameters())
    uid = dataset.inter_feat[dataset.uid_field].numpy()
    for user, value in zip(users, fast):
        inter = dataset.inter_feat[torch.from_numpy(np.flatnonzero(uid == user))]
        prob = torch.softmax(loss.logits(params, inter).detach(), dim=-1)
        onehot = torch.nn.functional.one_hot(inter[model.POS_ITEM_ID], prob.shape[1]).double()
        torch.testing.assert_close(value, torch.linalg.norm(prob - onehot), rtol=1e-10, atol=1e-10)


def make(name, **config):
    defaults = {"selection_num": 10, "selection_ratio": None, "ccs_beta": 0.1, "ccs_num_strata": 5,
                "tfdcon_num_clusters": 4, "tfdcon_text_weight": 1.0, "recranker_num_clusters": 4,
                "recranker_importance_share": 0.6, "recranker_cluster_share": 0.6, "recranker_penalty": 0.95}
    method = SAMPLERS.get(name)({**defaults, **config})
    method.check_config()
    return method


def synthetic_signals(ids, seed=0):
    rng = np.random.default_rng(seed)
    n = len(ids)
    return {"grand": UserScores(ids, rng.gamma(2.0, size=n)), "el2n": UserScores(ids, rng.random(n)),
            "surrogate_embedding": UserScores(ids, rng.normal(size=(n, 6))),
            "text_embedding": UserScores(ids, rng.normal(size=(n, 5))),
            "interaction_count": UserScores(ids, rng.integers(1, 60, size=n).astype(float))}


def shuffled(signals, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for name, s in signals.items():
        order = rng.permutation(len(s.user_ids))
        out[name] = UserScores(s.user_ids[order], s.values[order])
    return out


@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_returns_the_budget_of_unique_existing_ids_joined_by_id(name):
    ids = np.arange(100, 260, 2)
    signals = synthetic_signals(ids)
    method = make(name)
    for budget in (1, 9, 40):
        first = method.select(ids, signals, budget, np.random.default_rng(7))
        assert len(first.user_ids) == budget == len(np.unique(first.user_ids))
        assert np.isin(first.user_ids, ids).all()
        # Same seed, same ids, whatever order the signals come in (joined by id, never by position).
        again = method.select(ids[::-1].copy(), shuffled(signals, budget), budget, np.random.default_rng(7))
        np.testing.assert_array_equal(first.user_ids, again.user_ids)
    with pytest.raises(ValueError, match="id sets differ"):
        method.select(ids, {k: UserScores(v.user_ids + 1, v.values) for k, v in signals.items()}, 5,
                      np.random.default_rng(0))


def test_grand_and_el2n_keep_the_highest_scores():
    ids = np.arange(1, 21)
    values = np.linspace(0, 1, 20)
    for name in ("grand", "el2n"):
        picked = make(name).select(ids, {name: UserScores(ids, values)}, 3, np.random.default_rng(0))
        np.testing.assert_array_equal(picked.user_ids, [18, 19, 20])


def test_ccs_with_beta_0_and_one_stratum_is_uniform_sampling():
    ids = np.arange(5, 305)
    signals = synthetic_signals(ids)
    ccs = make("ccs", ccs_beta=0.0, ccs_num_strata=1).select(ids, signals, 37, np.random.default_rng(11))
    uniform = SAMPLERS.get("random")({}).select(ids, {}, 37, np.random.default_rng(11))
    np.testing.assert_array_equal(ccs.user_ids, uniform.user_ids)


def test_ccs_never_picks_the_hard_pruned_users():
    ids = np.arange(1, 101)
    values = np.arange(100, dtype=float)  # user 100 is the hardest
    picked = make("ccs", ccs_beta=0.2).select(ids, {"el2n": UserScores(ids, values)}, 50, np.random.default_rng(0))
    assert picked.user_ids.max() <= 80 and picked.info["hard_pruned"] == 20


@pytest.mark.parametrize("name", ["tfdcon", "recranker"])
def test_clustering_is_deterministic_under_a_seed_and_changes_with_it(name):
    ids = np.arange(1, 401)
    signals = synthetic_signals(ids, seed=3)
    a = make(name).select(ids, signals, 30, np.random.default_rng(5))
    b = make(name).select(ids, signals, 30, np.random.default_rng(5))
    c = make(name).select(ids, signals, 30, np.random.default_rng(6))
    np.testing.assert_array_equal(a.user_ids, b.user_ids)
    np.testing.assert_array_equal(a.info["bin_sizes"], b.info["bin_sizes"])
    assert not np.array_equal(a.user_ids, c.user_ids)


def test_tfdcon_shares_the_budget_in_proportion_to_cluster_sizes():
    ids = np.arange(1, 201)
    rng = np.random.default_rng(0)
    # Two well-separated blobs of 150 and 50 users in both views.
    blob = np.r_[np.zeros(150), np.ones(50)]
    views = {"surrogate_embedding": UserScores(ids, np.c_[blob * 10, 1 - blob] + 0.01 * rng.normal(size=(200, 2))),
             "text_embedding": UserScores(ids, np.c_[blob, 1 - blob] + 0.01 * rng.normal(size=(200, 2)))}
    picked = make("tfdcon", tfdcon_num_clusters=2).select(ids, views, 20, np.random.default_rng(0))
    assert sorted(picked.info["bin_picks"].tolist()) == [5, 15]
    assert (picked.user_ids > 150).sum() == 5


def brute_force_quotas(sizes, budget):
    # Hamilton apportionment by enumeration on small inputs, with the caps met by re-sharing.
    sizes = np.asarray(sizes)
    quotas = np.zeros_like(sizes)
    for _ in range(min(budget, sizes.sum())):
        room = sizes - quotas
        ideal = budget * sizes / sizes.sum()
        gap = np.where(room > 0, ideal - quotas, -np.inf)
        quotas[int(np.argmax(gap))] += 1
    return quotas


@pytest.mark.parametrize("seed", range(20))
def test_proportional_quotas_sum_to_the_budget_respect_sizes_and_stay_proportional(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 30, size=rng.integers(1, 8))
    sizes[0] = max(sizes[0], 1)
    budget = int(rng.integers(1, sizes.sum() + 5))
    quotas = proportional_quotas(sizes, budget)
    assert quotas.sum() == min(budget, sizes.sum()) and (quotas <= sizes).all() and (quotas >= 0).all()
    if budget <= sizes.min() * len(sizes):  # no cap binds: every quota within 1 of the exact share
        assert (np.abs(quotas - budget * sizes / sizes.sum()) < 1).all()
    np.testing.assert_array_equal(np.sort(quotas), np.sort(brute_force_quotas(sizes, budget)))


def test_recranker_prefers_users_with_more_interactions():
    ids = np.arange(1, 1001)
    signals = synthetic_signals(ids)
    counts = np.where(ids <= 500, 2.0, 200.0)
    signals["interaction_count"] = UserScores(ids, counts)
    picked = make("recranker", recranker_num_clusters=3).select(ids, signals, 100, np.random.default_rng(0))
    assert (picked.user_ids > 500).sum() > 60


def test_a_constant_signal_warns_and_falls_back_to_uniform(caplog):
    ids = np.arange(1, 51)
    with caplog.at_level(logging.WARNING):
        picked = make("grand").select(ids, {"grand": UserScores(ids, np.ones(50))}, 10, np.random.default_rng(0))
    assert "same for every user" in caplog.text and picked.info["uniform_fallback"]
    uniform = SAMPLERS.get("random")({}).select(ids, {}, 10, np.random.default_rng(0))
    np.testing.assert_array_equal(picked.user_ids, uniform.user_ids)


def tiny_run(tmp_path, sampler, **extra):
    return {**TINY_SASREC, "sampler": sampler, "selection_num": 40, "surrogate_config": TINY_SURROGATE,
            "grand_epoch": 1, "el2n_epoch": 1, "tfdcon_num_clusters": 5, "recranker_num_clusters": 5,
            "ccs_num_strata": 5, "output_dir": str(tmp_path / "out"), "checkpoint_dir": str(tmp_path / "ckpt"), **extra}


def test_every_baseline_end_to_end_then_every_signal_reused(tmp_path, monkeypatch):
    first = {}
    for name in BASELINES:
        result = run_recbole("SASRec", config_dict=tiny_run(tmp_path, name))
        summary = result["selection"]
        assert summary["selected_users"] == 40 and {"recall@10", "ndcg@10"} <= set(result["test_result"])
        assert (tmp_path / "out" / "ml-100k" / summary["folder"].rsplit("/", 1)[1] / "report.json").exists()
        first[name] = (tmp_path / "out" / "ml-100k" / summary["folder"].rsplit("/", 1)[1] / "selection.tsv").read_text()
    # The surrogate was trained once for all five methods.
    surrogates = [p for p in (tmp_path / "out" / "ml-100k" / "cache").glob("surrogate-SASRec-*.pt") if "-run" not in p.name]
    assert len(surrogates) == 1

    from recbole_dealrec.scoring.signals import SIGNALS
    from recbole_dealrec.surrogate import train as surrogate_train

    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed")

    for name in SIGNALS.names():
        monkeypatch.setattr(SIGNALS.get(name), "compute", forbidden)
    monkeypatch.setattr(surrogate_train, "get_trainer", forbidden)
    monkeypatch.setattr(surrogate_train, "create_dataset", forbidden)  # not even loaded
    for name in BASELINES:
        again = run_recbole("SASRec", config_dict=tiny_run(tmp_path, name, epochs=0), saved=False)
        assert all(meta["cached"] for meta in again["selection"]["signals"].values())
        assert open(again["selection"]["folder"] + "/selection.tsv").read() == first[name]  # same seed, same ids


def test_hooked_snapshot_equals_a_seeded_rerun(tmp_path, caplog):
    from recbole_dealrec.surrogate import surrogate_snapshot, train_surrogate
    from recbole_dealrec.surrogate.train import snapshot_cached

    config = DealrecConfig("SASRec", "ml-100k", config_dict=tiny_run(tmp_path, "el2n", surrogate_config={**TINY_SURROGATE, "epochs": 2}))
    train_surrogate(config, snapshot_epochs=(1,))
    assert snapshot_cached(config, 0, 1)
    hooked = surrogate_snapshot(config, 0, 1).model.state_dict()
    for path in (tmp_path / "out").rglob("*-run0-epoch1.pt"):
        path.unlink()
    with caplog.at_level("WARNING"):
        rerun = surrogate_snapshot(config, 0, 1).model.state_dict()
    # an extra training of the surrogate is never silent
    assert "the snapshot after 1 epochs is not in the cache" in caplog.text and "training 1 extra epochs" in caplog.text
    for key, value in hooked.items():
        torch.testing.assert_close(rerun[key], value, rtol=0, atol=0)
    other_seed = surrogate_snapshot(config, 1, 1).model.state_dict()
    assert not torch.equal(other_seed["item_embedding.weight"], hooked["item_embedding.weight"])


@pytest.mark.parametrize(
    "sampler, extra, message",
    [
        ("ccs", {"ccs_betta": 0.2}, r"unknown key 'ccs_betta'.*did you mean 'ccs_beta'"),
        ("grand", {"grand_seed": 3}, r"unknown key 'grand_seed'.*did you mean 'grand_seeds'"),
        ("tfdcon", {"tfdcon_num_clusters": 944}, r"tfdcon_num_clusters=944 is larger than the 943 candidate users"),
        ("recranker", {"recranker_num_clusters": 0}, r"recranker_num_clusters must be an integer >= 1"),
        ("ccs", {"ccs_beta": 0.99, "selection_num": 40}, r"budget 40 is larger than the 10 users left after ccs_beta"),
        ("ccs", {"ccs_beta": 1.0}, r"ccs_beta must be a number in \[0, 1\)"),
        ("grand", {"grand_epoch": -1}, r"grand_epoch must be an integer >= 0"),
        ("el2n", {"el2n_seeds": 0}, r"el2n_seeds must be an integer >= 1"),
        ("tfdcon", {"title_field": None}, r"text_embedding signal needs item titles"),
        ("tfdcon", {"text_encoder_path": "/nonexistent"}, r"text_encoder_path='/nonexistent' is not a local encoder"),
    ],
)
def test_bad_baseline_input_fails_before_any_scoring(tmp_path, sampler, extra, message):
    with pytest.raises(ConfigError, match=message):
        run_recbole("SASRec", config_dict=tiny_run(tmp_path, sampler, **extra))
    assert not (tmp_path / "out" / "ml-100k" / "cache").exists()


def test_a_nan_signal_is_a_clear_error(tmp_path, monkeypatch):
    from recbole_dealrec.scoring.cache import ScoredUsers
    from recbole_dealrec.scoring.signals import SIGNALS

    def nan_counts(self, ctx):
        return ScoredUsers(ctx.candidate_tokens, np.full(len(ctx.candidates), np.nan), {})

    monkeypatch.setattr(SIGNALS.get("interaction_count"), "compute", nan_counts)
    with pytest.raises(ConfigError, match="signal 'interaction_count' has 943 non-finite values"):
        run_recbole("SASRec", config_dict=tiny_run(tmp_path, "recranker"))


def test_bert4rec_vectorised_test_data_equals_recbole_loop():
    from recbole.model.sequential_recommender.bert4rec import BERT4Rec

    import recbole_dealrec.compat as compat

    model, _ = untrained("BERT4Rec")
    seq = torch.randint(1, 50, (7, 6))
    lengths = torch.tensor([1, 2, 6, 3, 5, 6, 4])
    seq[torch.arange(6)[None, :] >= lengths[:, None]] = 0
    assert BERT4Rec.reconstruct_test_data is compat._bert4rec_reconstruct_test_data
    expected = torch.cat((seq, torch.zeros(7, 1, dtype=torch.long)), dim=-1)
    for row, last in enumerate(lengths):  # RecBole 1.2.1's own loop
        expected[row][last] = model.mask_token
    torch.testing.assert_close(model.reconstruct_test_data(seq, lengths), expected[:, 1:])


@pytest.mark.parametrize("sampler", BASELINES)
def test_every_baseline_fine_tunes_bigrec(sampler, tiny_llm_path, tmp_path_factory):
    from conftest import tiny_bigrec_config

    tmp = tmp_path_factory.getbasetemp() / "bigrec_baselines"  # one cache: the surrogate trains once
    config = {**tiny_bigrec_config(tiny_llm_path, tmp), **tiny_run(tmp, sampler), "selection_num": 12,
              "eval_user_subset": 4, "valid_user_subset": 4, "llm_max_length": 160, "MAX_ITEM_LIST_LENGTH": 10}
    result = run_recbole("BIGRec", config_dict=config)
    assert result["selection"]["selected_users"] == 12 and {"recall@10", "ndcg@10"} <= set(result["test_result"])
