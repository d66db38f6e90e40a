"""surrogate_loss: sampled (issue 25): the seeded negatives, the per-user loss against a hand-built reference, the
fast paths (sequence mode, jvp scores, GraNd's vmap, EL2N) against plain loops, and the end-to-end run on ml-100k."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data import create_dataset, data_preparation
from recbole_dealrec.errors import ConfigError
from recbole_dealrec.gradients.params import select_parameters
from recbole_dealrec.model import get_model
from recbole_dealrec.scoring.influence_core import directional_derivatives, per_sample_gradient_dot_loop
from recbole_dealrec.scoring.training_dynamics import (local_item_rows, per_user_el2n, per_user_gradient_norms,
                                                       per_user_gradient_norms_loop)
from recbole_dealrec.surrogate import SurrogateLoss, user_batches
from recbole_dealrec.surrogate.loss import (TARGET_SEQ_FIELD, SampledNegatives, check_surrogate_loss, sample_index_of,
                                            sampled_negatives, sequence_train_dataset, sequence_training_loss)

from conftest import TINY_SURROGATE as TINY

NEGATIVES = 7


def untrained():
    config = DealrecConfig("SASRec", "ml-100k", config_dict={**TINY, "surrogate_loss": "sampled",
                                                             "surrogate_negatives": NEGATIVES})
    train, _, _ = data_preparation(config, create_dataset(config))
    torch.manual_seed(0)
    model = get_model("SASRec")(config, train.dataset).double().eval()
    return config, model, train.dataset


def test_negatives_are_a_seeded_function_of_the_sample():
    draws = SampledNegatives(n_items=50, count=2000, seed=3)
    users, index = np.array([1, 1, 2]), np.array([0, 1, 0])
    first = draws.draw(users, index)
    assert first.shape == (3, 2000) and first.dtype == np.int64
    assert first.min() >= 1 and first.max() <= 49  # never the padding id 0
    assert len(np.unique(first)) == 49  # every real item can be drawn
    # the same sample, alone or in another batch: the same negatives (no dependence on the batch)
    np.testing.assert_array_equal(draws.draw(users[2:], index[2:]), first[2:])
    np.testing.assert_array_equal(draws.draw(users[::-1], index[::-1]), first[::-1])
    assert (first[0] != first[1]).any() and (first[0] != first[2]).any()
    assert (SampledNegatives(50, 2000, seed=4).draw(users, index) != first).any()  # another seed
    assert (draws.draw(users, index, salt=1) != first).any()  # another training epoch
    # roughly uniform: no item drawn more than twice its share over 6,000 draws
    assert np.bincount(first.ravel(), minlength=50)[1:].max() < 2 * 6000 / 49
    items, hits = draws.candidates(np.array([5, 6, 7]), users, index)
    assert items.shape == (3, 2001) and items[:, 0].tolist() == [5, 6, 7]
    assert torch.equal(hits[:, 1:], items[:, 1:] == items[:, :1]) and hits[:, 1:].any() and not hits[:, 0].any()


def test_local_item_rows_point_into_each_users_distinct_items():
    item_seq = torch.tensor([[[0, 0, 5], [0, 5, 9]], [[3, 4, 2], [4, 2, 8]]])  # user 1: no padding in its inputs
    items = torch.tensor([[[9, 30, 5], [12, 30, 1]], [[8, 1, 3], [6, 7, 7]]])
    rows, seq, cand = local_item_rows(item_seq, items)
    assert rows[0].tolist()[:6] == [0, 1, 5, 9, 12, 30] and rows[1].tolist() == [0, 1, 2, 3, 4, 6, 7, 8]
    assert rows[0, 6:].tolist() == [0, 0]  # padding slots, never pointed at
    for u in range(2):
        assert torch.equal(rows[u][seq[u]], item_seq[u]) and torch.equal(rows[u][cand[u]], items[u])
        assert (seq[u] < 6 + 2 * u).all() and (cand[u] < 6 + 2 * u).all()
    assert (seq[1] > 0).all()  # row 0 (padding) stays slot 0 even where the user has no padding


def test_sample_index_counts_each_users_targets_in_order():
    segment = torch.tensor([0, 0, 1, 0, 2, 1, 1])
    assert sample_index_of(segment).tolist() == [0, 1, 0, 2, 0, 1, 2]
    assert sample_index_of(segment.numpy()).dtype == np.int64


def reference_user_losses(model, dataset, negatives, users):
    """One user at a time, one prefix at a time: SASRec's own forward on the prefix row, logits of the target and
    its hashed negatives (the prefix's index among the user's rows), accidental hits dropped, summed CE."""
    uid = dataset.inter_feat["user_id"].numpy()
    out = []
    for user in users:
        rows = dataset.inter_feat[torch.from_numpy(np.flatnonzero(uid == user))]
        hidden = model.forward(rows["item_id_list"], rows["item_length"])  # [prefixes, d]
        total = 0.0
        for k in range(len(rows)):
            target = int(rows["item_id"][k])
            drawn = torch.from_numpy(negatives.draw([user], [k])[0])
            items = torch.cat([torch.tensor([target]), drawn[drawn != target]])
            logits = model.item_embedding.weight[items] @ hidden[k]
            total = total + F.cross_entropy(logits[None], torch.tensor([0]))
        out.append(total)
    return torch.stack(out)


def test_sampled_loss_equals_a_hand_built_reference_in_both_modes():
    config, model, dataset = untrained()
    negatives = sampled_negatives(config, model)
    assert negatives == SampledNegatives(int(model.n_items), NEGATIVES, int(config["seed"]))
    users = np.array([1, 2, 3, 33, 100, 600])
    loss = SurrogateLoss(model, "sum", negatives)
    expected = reference_user_losses(model, dataset, negatives, users)
    for sequence in (False, True):
        batches = user_batches(dataset, 200, user_ids=users, sequence=sequence)
        assert len(batches) > 1
        got = torch.cat([loss({}, b) for b in batches])
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        # a user alone gives the same loss as in its batch
        torch.testing.assert_close(torch.cat([loss({}, one) for b in batches for one in b.split()]), expected,
                                   rtol=1e-10, atol=1e-10)
    full = SurrogateLoss(model, "sum")({}, user_batches(dataset, 10_000, user_ids=users)[0])
    assert (full > expected).all()  # 1 + 7 candidates: a far smaller partition function than 1,683 items


def test_sampled_scores_and_hvp_equal_per_user_loops():
    config, model, dataset = untrained()
    loss = SurrogateLoss(model, "mean", sampled_negatives(config, model))
    users = np.arange(1, 11)
    sequence = user_batches(dataset, 300, user_ids=users, sequence=True)
    prefix = user_batches(dataset, 300, user_ids=users)
    params = select_parameters(model.named_parameters(), [".*"])
    generator = torch.Generator().manual_seed(1)
    direction = {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in params.items()}
    fast = directional_derivatives(loss, params, direction, sequence)
    assert fast.abs().max() > 1e-3
    loop = per_sample_gradient_dot_loop(loss, params, direction, prefix, lambda b: b.split())
    torch.testing.assert_close(fast, loop, rtol=1e-9, atol=1e-9)
    small = select_parameters(model.named_parameters(), [r"trm_encoder\.layer\.0\.multi_head_attention\.dense\.bias$"])
    x = torch.randn(8, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(loss.gauss_newton_hvp(small, sequence, 10)(x), loss.gauss_newton_hvp(small, prefix, 10)(x),
                               rtol=1e-8, atol=1e-12)


def test_sampled_grand_and_el2n_equal_plain_references():
    config, model, dataset = untrained()
    loss = SurrogateLoss(model, "sum", sampled_negatives(config, model))
    users = np.array([1, 2, 3, 33, 100, 600, 7, 8])
    params = select_parameters(model.named_parameters(), [r"item_embedding", r"trm_encoder\.layer\.0\.feed"])
    loop = per_user_gradient_norms_loop(loss, params, dataset, users)
    # the sparse path (each user's own item rows, the default), the dense one, and the loop: the same norms, also
    # for users alone with their row count and in vmapped chunks of several (max_rows 400 vs 10,000)
    for max_rows in (400, 10_000):
        torch.testing.assert_close(per_user_gradient_norms(loss, params, dataset, users, max_rows), loop,
                                   rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(per_user_gradient_norms(loss, params, dataset, users, max_rows,
                                                           sparse_item_rows=False), loop, rtol=1e-8, atol=1e-10)
    # only the item table, and every parameter but it
    for patterns in ([r"item_embedding"], [r"^(?!item_embedding)"]):
        some = select_parameters(model.named_parameters(), patterns)
        torch.testing.assert_close(per_user_gradient_norms(loss, some, dataset, users, 10_000),
                                   per_user_gradient_norms_loop(loss, some, dataset, users), rtol=1e-8, atol=1e-10)
    el2n = per_user_el2n(loss, dataset, users, 400)
    for user, value in zip(users, el2n):
        [batch] = user_batches(dataset, 10_000, user_ids=[user])
        prob = torch.softmax(loss.target_logits({}, batch), dim=-1)  # [prefixes, 1 + negatives]
        expected = ((prob - F.one_hot(torch.zeros(len(prob), dtype=torch.long), prob.shape[1])) ** 2).sum().sqrt()
        torch.testing.assert_close(value, expected.double(), rtol=1e-10, atol=1e-10)


def test_sampled_training_loss_is_the_mean_over_the_prefix_samples():
    config, model, dataset = untrained()
    negatives = sampled_negatives(config, model)
    users = np.array([1, 2, 3, 33])
    uid = dataset.inter_feat["user_id"].numpy()
    small = dataset.copy(dataset.inter_feat[torch.from_numpy(np.flatnonzero(np.isin(uid, users)))])
    seq = sequence_train_dataset(small)
    n_targets = int((seq.inter_feat[TARGET_SEQ_FIELD] > 0).sum())
    with torch.no_grad():
        # salt 0 is the scoring draw: the training loss with it is the scoring loss's mean over prefix samples
        total = sequence_training_loss(model, seq.inter_feat, negatives=negatives, salt=0) * n_targets
        epoch = sequence_training_loss(model, seq.inter_feat, negatives=negatives, salt=1) * n_targets
    torch.testing.assert_close(total, reference_user_losses(model, small, negatives, users).sum(), rtol=1e-10, atol=1e-10)
    assert not torch.isclose(total, epoch)


@pytest.mark.parametrize("change, message", [
    ({"surrogate_loss": "sampeld"}, "surrogate_loss must be one of ['auto', 'full', 'sampled']"),
    ({"surrogate_loss": "sampled", "surrogate_negatives": 0}, "surrogate_negatives must be an integer >= 1"),
    ({"surrogate_loss": "sampled", "surrogate_negatives": 2.5}, "surrogate_negatives must be an integer >= 1"),
    ({"surrogate_loss": "auto", "surrogate_sampled_min_items": True}, "surrogate_sampled_min_items must be an integer"),
])
def test_bad_sampled_keys_are_one_line_errors(change, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_surrogate_loss({"surrogate_negatives": 100, "surrogate_sampled_min_items": 50000, **change})


@pytest.mark.parametrize("min_items, sampled", [(50000, False), (1682, True), (1683, False)])
def test_auto_samples_from_the_item_threshold_on(min_items, sampled):
    """surrogate_loss: auto (the default) = the full softmax below surrogate_sampled_min_items items (ml-100k: 1,682),
    the sampled one from there on; a surrogate without sequence mode stays on the full one."""
    config = DealrecConfig("SASRec", "ml-100k", config_dict={**TINY, "surrogate_sampled_min_items": min_items})
    assert config["surrogate_loss"] == "auto"
    train, _, _ = data_preparation(config, create_dataset(config))
    model = get_model("SASRec")(config, train.dataset)
    negatives = sampled_negatives(config, model)
    assert (negatives is not None) == sampled
    bert = DealrecConfig("BERT4Rec", "ml-100k", config_dict={**TINY, "surrogate_sampled_min_items": 1})
    assert sampled_negatives(bert, get_model("BERT4Rec")(bert, train.dataset)) is None


def test_sampled_needs_a_sequence_mode_sasrec():
    config = DealrecConfig("BERT4Rec", "ml-100k", config_dict={**TINY, "surrogate_loss": "sampled"})
    train, _, _ = data_preparation(config, create_dataset(config))
    model = get_model("BERT4Rec")(config, train.dataset)
    with pytest.raises(ConfigError, match="surrogate_loss: sampled needs surrogate_sequence_mode: True and a SASRec"):
        sampled_negatives(config, model)


@pytest.mark.filterwarnings("ignore:iHVP solve")
def test_sampled_surrogate_end_to_end_is_keyed_and_reproducible(tmp_path):
    """A surrogate trained on the sampled softmax: its own cache key, scores bit-identical on a second training
    from scratch, and different from the full softmax's."""
    from recbole_dealrec.scoring.influence import influence_scores
    from recbole_dealrec.surrogate import surrogate_key, train_surrogate

    def config(out, loss):
        return DealrecConfig("SASRec", "ml-100k", config_dict={
            **TINY, "output_dir": str(tmp_path / out), "checkpoint_dir": str(tmp_path / out / "ckpt"),
            "surrogate_config": {**TINY, "epochs": 2, "surrogate_loss": loss, "surrogate_negatives": 20},
            "influence_batch_rows": 4096, "cg_max_iter": 3, "influence_power_iters": 3,
            "influence_params": [r"trm_encoder\.layer\.0\.multi_head_attention\.dense\.weight$"]})

    sampled, again, full = config("a", "sampled"), config("b", "sampled"), config("c", "full")
    assert surrogate_key(sampled) == surrogate_key(again) != surrogate_key(full)
    first, second = train_surrogate(sampled), train_surrogate(again)
    assert first.negatives == SampledNegatives(int(first.model.n_items), 20, int(first.config["seed"]))
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name]), name
    scores = influence_scores(sampled, first).scores
    np.testing.assert_array_equal(scores, influence_scores(again, second).scores)
    assert np.isfinite(scores).all() and scores.std() > 0
    reference = train_surrogate(full)
    assert reference.negatives is None
    assert not torch.equal(reference.model.item_embedding.weight, first.model.item_embedding.weight)


# ---------------------------------------------------------------------------------- surrogate_windows: chunked

def test_chunked_rows_cover_every_prefix_sample_once():
    """_sequence_rows: sliding = RecBole's rows; chunked = the first window, then one row per block of L new samples
    and the user's last row for the rest, its targets at the new positions only."""
    from recbole_dealrec.surrogate.loss import _sequence_rows

    lengths = np.minimum(np.arange(1, 15), 4)  # a user with 14 prefix samples, window 4
    assert _sequence_rows(lengths, 4, "sliding") == ([3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [4] + [1] * 10, [0] + [3] * 10)
    rows, counts, starts = _sequence_rows(lengths, 4, "chunked")
    assert rows == [3, 7, 11, 13] and counts == [4, 4, 4, 2] and starts == [0, 0, 0, 2]
    assert sum(counts) == 14
    short = np.arange(1, 4)  # within the window: one row either way
    assert _sequence_rows(short, 4, "chunked") == _sequence_rows(short, 4, "sliding") == ([2], [3], [0])


def test_chunked_loss_equals_a_hand_built_reference():
    """Every prefix sample once as a target, in order (the prefix rows' targets), and its loss that of SASRec run on
    the sample's block alone (history back to the block's start): built by hand from the item sequence."""
    config, model, dataset = untrained()
    max_len = int(config["MAX_ITEM_LIST_LENGTH"])
    users = np.array([1, 2, 600])
    uid = dataset.inter_feat["user_id"].numpy()
    [chunked] = user_batches(dataset, 10_000, user_ids=users, sequence=True, windows="chunked")
    [sliding] = user_batches(dataset, 10_000, user_ids=users, sequence=True)
    [prefix] = user_batches(dataset, 10_000, user_ids=users)
    assert torch.equal(chunked.targets, prefix.interaction["item_id"]) and len(chunked.segment) < len(sliding.segment)
    full = SurrogateLoss(model, "sum")
    expected = []
    for user in users:
        rows = dataset.inter_feat[torch.from_numpy(np.flatnonzero(uid == user))]
        items = torch.cat([rows["item_id_list"][0, :1], rows["item_id"]])  # the user's whole item sequence
        total = 0.0
        c = len(rows)
        for k in range(c):  # prefix sample k: history items[start..k], target items[k + 1]
            start = 0 if k < max_len else (k // max_len) * max_len  # its block of L samples
            if start + max_len > c:
                start = max(0, c - max_len)  # past the last whole block: the user's last row, its last L items
            history = items[start:k + 1]
            seq = torch.zeros(1, max_len, dtype=torch.long)
            seq[0, :len(history)] = history
            logits = model.full_sort_predict({"item_id_list": seq, "item_length": torch.tensor([len(history)])})
            total = total + F.cross_entropy(logits, items[k + 1:k + 2])
        expected.append(total)
    torch.testing.assert_close(full({}, chunked), torch.stack(expected), rtol=1e-10, atol=1e-10)
    short = [u for u in users if (uid == u).sum() <= max_len]
    if short:  # within the window the three agree
        [a] = user_batches(dataset, 10_000, user_ids=short, sequence=True, windows="chunked")
        torch.testing.assert_close(full({}, a), full({}, user_batches(dataset, 10_000, user_ids=short)[0]))
    # the batched jvp equals the per-user loop on chunked rows, with sampled negatives too
    loss = SurrogateLoss(model, "mean", sampled_negatives(config, model))
    params = select_parameters(model.named_parameters(), [".*"])
    generator = torch.Generator().manual_seed(2)
    direction = {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in params.items()}
    batches = user_batches(dataset, 100, user_ids=np.arange(1, 9), sequence=True, windows="chunked")
    torch.testing.assert_close(directional_derivatives(loss, params, direction, batches),
                               per_sample_gradient_dot_loop(loss, params, direction, batches, lambda b: b.split()),
                               rtol=1e-9, atol=1e-9)


def test_chunked_training_rows_carry_every_sample_once():
    config, model, dataset = untrained()
    users = np.array([1, 2, 3, 33])
    uid = dataset.inter_feat["user_id"].numpy()
    small = dataset.copy(dataset.inter_feat[torch.from_numpy(np.flatnonzero(np.isin(uid, users)))])
    chunked, sliding = sequence_train_dataset(small, "chunked"), sequence_train_dataset(small)
    assert int((chunked.inter_feat[TARGET_SEQ_FIELD] > 0).sum()) == len(small) and len(chunked) < len(sliding)
    [batch] = user_batches(small, 10_000, sequence=True, windows="chunked")
    with torch.no_grad():
        total = sequence_training_loss(model, chunked.inter_feat) * len(small)
    torch.testing.assert_close(total, SurrogateLoss(model, "sum")({}, batch).sum(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("weighted", [False, True])
def test_fused_sampled_cross_entropy_equals_autograd(weighted):
    """The chunked once-differentiable training loss: value and both gradients equal plain autograd over
    candidate_logits, accidental hits included, across chunk boundaries."""
    from recbole_dealrec.surrogate.loss import candidate_logits, fused_sampled_cross_entropy

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(1, 11, (37,), generator=generator)
    items, hits = SampledNegatives(11, 6, seed=1).candidates(targets.numpy(), np.arange(37), np.zeros(37, dtype=np.int64))
    assert hits.any()
    w = torch.rand(37, generator=generator, dtype=torch.float64) if weighted else None
    fused = fused_sampled_cross_entropy(hidden, weight, items, hits, w, chunk=8)
    losses = F.cross_entropy(candidate_logits(hidden, weight, items, hits), torch.zeros(37, dtype=torch.long),
                             reduction="none")
    plain = losses.mean() if w is None else (losses * w).sum() / w.sum()
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    expected = torch.autograd.grad(plain, (hidden, weight))
    got = torch.autograd.grad(fused_sampled_cross_entropy(hidden, weight, items, hits, w, chunk=8), (hidden, weight))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_every_pass_of_the_influence_loss_uses_the_surrogates_windows():
    """The rows each pass builds (the scores', the Hessian's drawn users', the check's risk) are the surrogate's
    windows: with chunked windows, the HVP on ``influence_hessian_users`` drawn users equals the Gauss-Newton
    product on those users' chunked rows, not on RecBole's sliding ones (it did, before: a Hessian of another loss,
    and on long users hundreds of rows each)."""
    import os

    from recbole_dealrec.config import PROPERTIES_DIR, read_property_file
    from recbole_dealrec.diagnose import empirical_risk
    from recbole_dealrec.scoring.influence import InfluenceArguments, hessian_vector_product, scored_in_sequence_mode

    config, model, dataset = untrained()
    loss = SurrogateLoss(model, "mean", sampled_negatives(config, model))
    params = select_parameters(model.named_parameters(), [r"trm_encoder\.layer\.0\.multi_head_attention\.dense\.bias$"])
    users = np.arange(1, 41)
    chunked = user_batches(dataset, 10_000, user_ids=users, sequence=True, windows="chunked")
    defaults = read_property_file(os.path.join(PROPERTIES_DIR, "signal", "influence.yaml"))
    args = InfluenceArguments.from_config({**defaults, "influence_hessian_users": 12, "influence_batch_rows": 10_000,
                                           "influence_hvp_cache_gb": 0, "seed": 3})
    drawn = np.random.default_rng(3).choice(users, size=12, replace=False)  # the users the HVP draws (seed)
    x = torch.randn(sum(p.numel() for p in params.values()), generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    products = {}
    for windows in ("chunked", "sliding"):
        rows = user_batches(dataset, 10_000, user_ids=drawn, sequence=True, windows=windows)
        products[windows] = loss.gauss_newton_hvp(params, rows, 12)(x)
    assert not torch.allclose(products["chunked"], products["sliding"])  # long users: the windows differ
    hvp = hessian_vector_product(args, loss, params, dataset, chunked, windows="chunked")
    torch.testing.assert_close(hvp(x), products["chunked"], rtol=1e-12, atol=1e-14)
    # the scores' rows: chunked windows are scored in sequence mode even without influence_sequence_mode
    assert scored_in_sequence_mode(False, "chunked", model) and not scored_in_sequence_mode(False, "sliding", model)
    # the check's risk is of the same rows: the mean of the users' chunked losses
    small = dataset.copy(dataset.inter_feat[torch.from_numpy(np.flatnonzero(np.isin(
        dataset.inter_feat["user_id"].numpy(), users)))])
    with torch.no_grad():
        expected = float(sum(loss({}, b).double().sum() for b in chunked)) / len(users)
    risk = empirical_risk(model, small, "mean", 10_000, True, sampled_negatives(config, model), "chunked")
    assert risk == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_rows_gives_advanced_indexings_bits_in_every_mode(dtype):
    """The candidates' gather (F.embedding) against plain ``weight[items]``: the forward, the gradient (repeated
    items accumulate in the same order), forward-mode jvp and the double backward of the exact Hessian, bit for bit."""
    from recbole_dealrec.surrogate.loss import candidate_logits, gather_rows

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 8, generator=gen, dtype=dtype)
    hidden = torch.randn(30, 8, generator=gen, dtype=dtype)
    items = torch.randint(1, 40, (30, 11), generator=gen)  # many repeats: the accumulation order matters
    hits = items == items[:, :1]
    hits[:, 0] = False

    def plain(h, w):
        return torch.einsum("td,tcd->tc", h, w[items]).masked_fill(hits, float("-inf"))

    def fast(h, w):
        return candidate_logits(h, w, items, hits)

    assert torch.equal(gather_rows(weight, items), weight[items])

    def loss(fn, h, w):
        return F.cross_entropy(fn(h, w), torch.zeros(30, dtype=torch.long), reduction="sum")

    grads = {}
    for name, fn in (("plain", plain), ("fast", fast)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        g_h, g_w = torch.autograd.grad(loss(fn, h, w), (h, w), create_graph=True)
        tangent = torch.randn(40, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
        (hvp_w,) = torch.autograd.grad((g_w * tangent).sum(), (w,))
        _, jv = torch.func.jvp(lambda w_: fn(hidden, w_), (weight,), (tangent,))
        grads[name] = (g_h.detach(), g_w.detach(), hvp_w, jv)
    for a, b in zip(grads["plain"], grads["fast"]):
        assert torch.equal(a, b)
