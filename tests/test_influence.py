"""Influence scores on RecBole surrogates (real ml-100k pipeline, tiny models)."""
import os
import random
import numpy as np
import pytest
import torch

from recbole_dealrec.config import PROPERTIES_DIR, DealrecConfig, read_property_file
from recbole_dealrec.data import create_dataset, data_preparation, training_user_ids
from recbole_dealrec.errors import ConfigError
from recbole_dealrec.scoring.ihvp import conjugate_gradient, dense_hessian, exact_solve, lissa, lissa_damping_for
from recbole_dealrec.scoring.influence import check_influence_config, influence_scores
from recbole_dealrec.scoring.signals import compute_signals
from recbole_dealrec.gradients.params import select_parameters
from recbole_dealrec.scoring.influence_core import directional_derivatives, make_hvp, per_sample_gradient_dot_loop
from recbole_dealrec.surrogate import SurrogateLoss, surrogate_config, train_surrogate, user_batches
from recbole_dealrec.model import get_model

from conftest import TINY_SURROGATE as TINY


def untrained(model_name):
    config = DealrecConfig(model_name, "ml-100k", config_dict=TINY)
    train, _, _ = data_preparation(config, create_dataset(config))
    torch.manual_seed(0)
    model = get_model(model_name)(config, train.dataset).double().eval()
    return model, train.dataset


@pytest.mark.parametrize("model_name", ["SASRec", "BERT4Rec"])
def test_batched_scores_equal_per_user_backward_loop(model_name):
    model, dataset = untrained(model_name)
    loss = SurrogateLoss(model)
    params = select_parameters(model.named_parameters(), [".*"])
    generator = torch.Generator().manual_seed(1)
    direction = {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in params.items()}
    batches = user_batches(dataset, 300, user_ids=np.arange(1, 13))
    assert sum(len(b) for b in batches) == 12 and len(batches) > 1
    batched = directional_derivatives(loss, params, direction, batches)
    loop = per_sample_gradient_dot_loop(loss, params, direction, batches, lambda b: b.split())
    assert batched.abs().max() > 1e-3
    torch.testing.assert_close(batched, loop, rtol=1e-9, atol=1e-9)


def test_per_user_loss_is_the_sum_of_recbole_ce_over_the_users_prefixes():
    model, dataset = untrained("SASRec")
    batch = user_batches(dataset, 10_000, user_ids=[3, 5])[0]
    per_user = SurrogateLoss(model)({}, batch)
    for index in range(2):
        rows = batch.interaction[torch.nonzero(batch.segment == index, as_tuple=True)[0]]
        # RecBole's own CE training loss is the batch mean over rows.
        expected = model.calculate_loss(rows) * len(rows)
        torch.testing.assert_close(per_user[index], expected)


@pytest.mark.parametrize("model_name", ["SASRec", "BERT4Rec"])
def test_mean_user_loss_divides_by_the_users_prefixes_and_its_scores_match_a_loop(model_name):
    """influence_user_loss: mean = the sum over prefixes / their number; batched jvp scores == per-user loop."""
    model, dataset = untrained(model_name)
    batches = user_batches(dataset, 300, user_ids=np.arange(1, 9))
    total, mean = SurrogateLoss(model, "sum"), SurrogateLoss(model, "mean")
    for batch in batches:
        counts = torch.bincount(batch.segment, minlength=len(batch)).double()
        torch.testing.assert_close(mean({}, batch), total({}, batch) / counts)
    params = select_parameters(model.named_parameters(), [".*"])
    generator = torch.Generator().manual_seed(2)
    direction = {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in params.items()}
    batched = directional_derivatives(mean, params, direction, batches)
    loop = per_sample_gradient_dot_loop(mean, params, direction, batches, lambda b: b.split())
    torch.testing.assert_close(batched, loop, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="user_loss must be one of"):
        SurrogateLoss(model, "median")


def test_mean_user_loss_gauss_newton_equals_the_exact_gauss_newton_of_the_weighted_rows():
    """The Gauss-Newton HVP of the mean loss weights each row by 1/(its user's rows), as its exact Hessian does."""
    model, dataset = untrained("SASRec")
    loss = SurrogateLoss(model, "mean")
    params = select_parameters(model.named_parameters(), [r"trm_encoder\.layer\.0\.multi_head_attention\.dense\.bias$"])
    batches = user_batches(dataset, 400, user_ids=np.arange(1, 11))
    ggn = dense_hessian(loss.gauss_newton_hvp(params, batches, n_total=10), 8)
    name, value = next(iter(params.items()))
    dense = torch.zeros(8, 8, dtype=torch.float64)
    for batch in batches:
        prob = torch.softmax(loss.logits(params, batch.interaction).detach(), -1)
        jac = torch.func.jacfwd(lambda w: loss.logits({name: w}, batch.interaction))(value.detach())
        weight = loss.row_weights(batch).double()
        jp = torch.einsum("rkm,rk->rm", jac, prob)
        dense += (torch.einsum("r,rkm,rk,rkn->mn", weight, jac, prob, jac) - (jp * weight[:, None]).T @ jp) / 10
    torch.testing.assert_close(ggn, dense, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("model_name,softmax,user_loss,sequence,dtype", [
    ("SASRec", "full", "sum", True, torch.float32), ("SASRec", "full", "mean", False, torch.float64),
    ("SASRec", "sampled", "sum", True, torch.float32), ("SASRec", "sampled", "mean", False, torch.float64),
    ("BERT4Rec", "full", "sum", False, torch.float32), ("GRU4Rec", "full", "sum", False, torch.float32)])
def test_gauss_newton_hvp_keeping_linearisations_gives_the_recomputed_bits(model_name, softmax, user_loss, sequence, dtype):
    """influence_hvp_cache_gb: a product on a kept batch (its linearize / vjp / softmax reused) is the recomputed
    product bit for bit, on every later call, for every surrogate loss form, and a spent budget recomputes. The
    transformers' batches are kept; a model whose traced tangent map gives other bits (GRU4Rec's recurrent cell, on
    the smoke grid) is caught on the first product and recomputed from then on, with the same bits."""
    from recbole_dealrec.surrogate.loss import KeptLinearizations, sampled_negatives

    config = DealrecConfig(model_name, "ml-100k", config_dict={
        **TINY, **({"surrogate_loss": "sampled", "surrogate_negatives": 7} if softmax == "sampled" else {}),
        **({"train_neg_sample_args": None, "embedding_size": 8} if model_name == "GRU4Rec" else {})})
    train, _, _ = data_preparation(config, create_dataset(config))
    torch.manual_seed(0)
    model = get_model(model_name)(config, train.dataset).to(dtype).eval()
    loss = SurrogateLoss(model, user_loss, sampled_negatives(config, model) if softmax == "sampled" else None)
    params = select_parameters(model.named_parameters(), [".*"])
    batches = user_batches(train.dataset, 300, user_ids=np.arange(1, 13), sequence=sequence)
    assert len(batches) > 1
    keep = KeptLinearizations(gb=4.0)
    recomputed, kept = loss.gauss_newton_hvp(params, batches, 12), loss.gauss_newton_hvp(params, batches, 12, keep=keep)
    generator = torch.Generator().manual_seed(3)
    m = sum(p.numel() for p in params.values())
    for _ in range(3):  # the first call builds and keeps, the later ones reuse
        x = torch.randn(m, generator=generator, dtype=dtype)
        expected = recomputed(x)
        assert expected.abs().max() > 0 and torch.equal(kept(x), expected)
    if model_name == "GRU4Rec":
        assert keep.kept_batches == len(batches) or (keep.other_bits and keep.kept_batches == 0)
    else:
        assert keep.kept_batches == len(batches) and keep.recomputed_batches == 0 and not keep.other_bits
    spent = KeptLinearizations(gb=0.0)  # nothing fits: every batch recomputed, the same product
    assert torch.equal(loss.gauss_newton_hvp(params, batches, 12, keep=spent)(x), expected)
    assert spent.kept_batches == 0


def test_kept_linearisations_budget_closes_at_the_first_batch_that_does_not_fit():
    from recbole_dealrec.surrogate.loss import KeptLinearizations

    keep = KeptLinearizations(gb=1000 / 2**30)  # 1,000 bytes
    assert keep.take(600) and not keep.take(500) and not keep.take(1)  # closed: later batches are recomputed
    assert (keep.kept_batches, keep.recomputed_batches, keep.kept_bytes, keep.left_bytes) == (1, 2, 600, 0)
    other = KeptLinearizations(gb=1.0)  # a batch whose kept product gave other bits closes the budget too
    assert not other.take(10, same_bits=False) and not other.take(10) and other.other_bits and other.kept_batches == 0


@pytest.mark.parametrize("hessian", ["gauss_newton", "exact"])
def test_lissa_steps_use_the_hessian_its_residual_is_checked_against(hessian):
    """The stochastic HVP on a batch of every user equals the full HVP of the same influence_hessian."""
    from recbole_dealrec.scoring.influence import InfluenceArguments, hessian_vector_product, stochastic_hvp

    model, dataset = untrained("SASRec")
    loss = SurrogateLoss(model, "mean")
    params = select_parameters(model.named_parameters(), [r"trm_encoder\.layer\.0\.multi_head_attention\.dense\.bias$"])
    users = np.arange(1, 7)
    [everyone] = user_batches(dataset, 10_000, user_ids=users)
    defaults = read_property_file(os.path.join(PROPERTIES_DIR, "signal", "influence.yaml"))
    args = InfluenceArguments.from_config({**defaults, "influence_hessian": hessian, "influence_hessian_users": None,
                                           "influence_batch_rows": 10_000, "seed": 0})
    full = hessian_vector_product(args, loss, params, dataset, [everyone])
    step = stochastic_hvp(args, loss, params, lambda generator: everyone)
    x = torch.randn(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(step(x, None), full(x), rtol=1e-8, atol=1e-10)


def small_problem():
    model, dataset = untrained("SASRec")
    loss = SurrogateLoss(model)
    # One 8-parameter tensor: small enough to form both Hessians densely.
    params = select_parameters(model.named_parameters(), [r"trm_encoder\.layer\.0\.multi_head_attention\.dense\.bias$"])
    batches = user_batches(dataset, 400, user_ids=np.arange(1, 21))
    return model, loss, params, batches


def test_gauss_newton_hvp_equals_explicit_jacobian_product():
    model, loss, params, batches = small_problem()
    ggn = loss.gauss_newton_hvp(params, batches, n_total=20)
    name, value = next(iter(params.items()))
    dense = torch.zeros(value.numel(), value.numel(), dtype=torch.float64)
    for batch in batches:
        prob = torch.softmax(loss.logits(params, batch.interaction).detach(), -1)  # [rows, items]
        jac = torch.func.jacfwd(lambda w: loss.logits({name: w}, batch.interaction))(value.detach())  # [rows, items, m]
        # sum_r J_r^T (diag(p_r) - p_r p_r^T) J_r
        jp = torch.einsum("rkm,rk->rm", jac, prob)
        dense += (torch.einsum("rkm,rk,rkn->mn", jac, prob, jac) - jp.T @ jp) / 20
    torch.testing.assert_close(dense_hessian(ggn, value.numel()), dense, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("hessian", ["gauss_newton", "exact"])
def test_cg_and_lissa_agree_with_the_exact_inverse(hessian):
    model, loss, params, batches = small_problem()
    hvp = loss.gauss_newton_hvp(params, batches, 20) if hessian == "gauss_newton" else make_hvp(loss, params, batches, 20)
    m = sum(p.numel() for p in params.values())
    dense = dense_hessian(hvp, m)
    v = torch.randn(m, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lam_min, lam_max = torch.linalg.eigvalsh(dense)[[0, -1]].tolist()
    damping = max(0.0, -lam_min) + 0.05 * lam_max  # positive definite for both Hessians
    exact = exact_solve(dense, v, damping)
    cg = conjugate_gradient(hvp, v, damping=damping, tol=1e-10)
    torch.testing.assert_close(cg.x, exact, rtol=1e-6, atol=1e-8)
    scale = 1.5 * (lam_max + damping)
    # LiSSA on the dense matrix: 3000 surrogate HVPs would be slow; the HVP itself is checked above.
    result = lissa(lambda x, g: dense @ x, v, damping=lissa_damping_for(damping, scale), scale=scale, depth=3000)
    torch.testing.assert_close(result.x, exact, rtol=1e-4, atol=1e-6)


@pytest.fixture
def run_config(tmp_path):
    return DealrecConfig("SASRec", "ml-100k", config_dict={
        **TINY, "output_dir": str(tmp_path / "out"), "checkpoint_dir": str(tmp_path / "ckpt"),
        "surrogate_config": {**TINY, "epochs": 2}, "influence_batch_rows": 4096, "cg_max_iter": 3, "influence_power_iters": 3,
        # The paper's choice of scored parameters: one attention output projection.
        "influence_params": [r"trm_encoder\.layer\.0\.multi_head_attention\.dense\.weight$"],
    })


def influence_signal(config):
    train, _, _ = data_preparation(config, create_dataset(config))
    scores, meta = compute_signals(["influence"], config, train.dataset, training_user_ids(train.dataset))
    return scores["influence"], meta["influence"]


@pytest.mark.filterwarnings("ignore:iHVP solve")
def test_influence_end_to_end_cached_and_reused(run_config, monkeypatch):
    def seeded():
        random.seed(11), np.random.seed(11), torch.manual_seed(11)

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(4).tolist()

    seeded()
    first, first_meta = influence_signal(run_config)
    after_computing = draws()  # the surrogate trained (RecBole's init_seed) and the scores computed: RNGs untouched
    assert len(first.user_ids) == 943 and np.isfinite(first.values).all() and first.values.std() > 0
    assert first_meta["cached"] is False and first_meta["residual"] is not None
    # Second time: nothing is recomputed (neither the scorer nor the surrogate's trainer is callable).
    import recbole_dealrec.scoring.influence as influence
    from recbole_dealrec.surrogate import train as surrogate_train

    surrogate = train_surrogate(run_config)
    monkeypatch.setattr(influence, "influence_scores", None)
    monkeypatch.setattr(surrogate_train, "get_trainer", None)
    seeded()
    second, second_meta = influence_signal(run_config)
    assert second_meta["cached"] is True and draws() == after_computing
    np.testing.assert_array_equal(second.user_ids, first.user_ids)
    np.testing.assert_array_equal(second.values, first.values)
    again = train_surrogate(run_config)
    for k, v in surrogate.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[k], v)
    # The surrogate checkpoint holds tensors only.
    path = next((run_config["output_dir"] and __import__("pathlib").Path(run_config["output_dir"])).rglob("surrogate-*.pt"))
    assert all(isinstance(t, torch.Tensor) for t in torch.load(path, weights_only=True).values())


def test_bad_influence_input(run_config):
    model, _ = untrained("SASRec")
    with pytest.raises(ValueError, match=r"item_embedding\.weight"):
        select_parameters(model.named_parameters(), ["no_such_parameter"])
    run_config["ihvp_solver"] = "newton"
    with pytest.raises(ConfigError, match=r"ihvp_solver must be one of lissa, cg, exact|ihvp_solver must be one of"):
        check_influence_config(run_config)
    run_config["ihvp_solver"] = "cg"
    run_config["surrogate_model"] = "BPR"
    with pytest.raises(ConfigError, match=r"surrogate_model 'BPR' is not a sequential"):
        surrogate_config(run_config)


def test_nan_gradient_names_the_stage():
    model, dataset = untrained("SASRec")
    with torch.no_grad():
        model.item_embedding.weight[5, 0] = float("nan")
    loss = SurrogateLoss(model)
    params = select_parameters(model.named_parameters(), ["item_embedding"])
    from recbole_dealrec.scoring.influence_core import mean_gradient

    with pytest.raises(FloatingPointError, match="mean gradient|loss"):
        mean_gradient(loss, params, user_batches(dataset, 500, user_ids=np.arange(1, 5)), 4)


def test_unconverged_solve_warns_with_its_residual():
    model, loss, params, batches = small_problem()
    from recbole_dealrec.scoring.ihvp import solve

    hvp = loss.gauss_newton_hvp(params, batches, 20)
    # Random v: the all-ones direction of this bias is removed by LayerNorm (an exact eigenvector).
    v = torch.randn(sum(p.numel() for p in params.values()), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="residual"):
        solve("cg", v, hvp=hvp, damping=1e-6, tol=1e-12, max_iter=1)


@pytest.mark.filterwarnings("ignore:iHVP solve")
def test_bert4rec_surrogate_with_stochastic_lissa_is_reproducible(tmp_path):
    config = DealrecConfig("SASRec", "ml-100k", config_dict={
        **TINY, "output_dir": str(tmp_path / "out"), "checkpoint_dir": str(tmp_path / "ckpt"),
        "surrogate_model": "BERT4Rec", "surrogate_config": TINY, "ihvp_solver": "lissa", "lissa_depth": 25,
        "lissa_scale": 50.0, "influence_damping": 0.5, "lissa_batch_users": 4, "influence_hessian": "exact",
        "influence_params": [r"output_bias$"],
    })
    check_influence_config(config)
    surrogate = train_surrogate(config)
    assert type(surrogate.model).__name__ == "BERT4Rec"
    first = influence_scores(config, surrogate)
    second = influence_scores(config, surrogate)
    assert len(first.tokens) == 943 and np.isfinite(first.scores).all() and first.scores.std() > 0
    np.testing.assert_array_equal(first.scores, second.scores)  # the LiSSA draws come from `seed`
    assert first.meta["solver"] == "lissa" and first.meta["residual"] is not None


@pytest.mark.parametrize("user_loss", ["sum", "mean"])
def test_sequence_mode_equals_the_prefix_rows(user_loss):
    """One row per user window gives the prefix rows' per-user loss, jvp scores and Gauss-Newton HVP, also for users
    longer than MAX_ITEM_LIST_LENGTH (6 here: every ml-100k user is longer), and needs far fewer model rows."""
    model, dataset = untrained("SASRec")
    users = np.array([1, 2, 3, 33, 100, 600])
    prefix = user_batches(dataset, 200, user_ids=users)
    sequence = user_batches(dataset, 200, user_ids=users, sequence=True)
    assert [b.user_ids.tolist() for b in prefix] == [b.user_ids.tolist() for b in sequence]
    assert sum(len(b.targets) for b in sequence) == sum(len(b.segment) for b in prefix)
    assert sum(len(b.segment) for b in sequence) < sum(len(b.segment) for b in prefix)
    loss = SurrogateLoss(model, user_loss)
    for p, q in zip(prefix, sequence):
        torch.testing.assert_close(loss({}, q), loss({}, p), rtol=1e-10, atol=1e-10)
    params = select_parameters(model.named_parameters(), [".*"])
    generator = torch.Generator().manual_seed(4)
    direction = {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in params.items()}
    fast = directional_derivatives(loss, params, direction, sequence)
    torch.testing.assert_close(fast, directional_derivatives(loss, params, direction, prefix), rtol=1e-9, atol=1e-9)
    loop = per_sample_gradient_dot_loop(loss, params, direction, sequence, lambda b: b.split())
    torch.testing.assert_close(fast, loop, rtol=1e-9, atol=1e-9)
    small = select_parameters(model.named_parameters(), [r"trm_encoder\.layer\.0\.multi_head_attention\.dense\.bias$"])
    x = torch.randn(8, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(loss.gauss_newton_hvp(small, sequence, 6)(x), loss.gauss_newton_hvp(small, prefix, 6)(x),
                               rtol=1e-8, atol=1e-12)


def test_sequence_mode_short_users_make_one_row_each():
    """A user whose history fits the window is one model row carrying all its prefix targets."""
    config = DealrecConfig("SASRec", "ml-100k", config_dict={**TINY, "MAX_ITEM_LIST_LENGTH": 50})
    train, _, _ = data_preparation(config, create_dataset(config))
    torch.manual_seed(0)
    model = get_model("SASRec")(config, train.dataset).double().eval()
    uid = train.dataset.inter_feat["user_id"].numpy()
    counts = np.bincount(uid)
    short = np.flatnonzero((counts > 0) & (counts <= 50))[:5]
    [batch] = user_batches(train.dataset, 10_000, user_ids=short, sequence=True)
    assert len(batch.segment) == len(short) and len(batch.targets) == counts[short].sum()
    [prefix] = user_batches(train.dataset, 10_000, user_ids=short)
    loss = SurrogateLoss(model, "mean")
    torch.testing.assert_close(loss({}, batch), loss({}, prefix), rtol=1e-10, atol=1e-10)


def test_power_iteration_finds_the_largest_gauss_newton_eigenvalue():
    from recbole_dealrec.scoring.ihvp import largest_eigenvalue

    model, loss, params, batches = small_problem()
    hvp = loss.gauss_newton_hvp(params, batches, 20)
    top = torch.linalg.eigvalsh(dense_hessian(hvp, 8))[-1].item()
    assert largest_eigenvalue(hvp, 8, iters=60, dtype=torch.float64) == pytest.approx(top, rel=1e-3)


def test_sequence_mode_training_loss_covers_the_same_prefix_samples():
    """The sequence-mode training rows carry every prefix sample once: in eval mode, the summed sequence loss
    equals RecBole's own CE loss summed over the prefix rows."""
    from recbole_dealrec.surrogate.loss import TARGET_SEQ_FIELD, sequence_train_dataset, sequence_training_loss

    model, dataset = untrained("SASRec")
    users = np.array([1, 2, 3, 33])
    uid = dataset.inter_feat["user_id"].numpy()
    prefix_rows = dataset.inter_feat[torch.from_numpy(np.flatnonzero(np.isin(uid, users)))]
    small = dataset.copy(prefix_rows)
    seq = sequence_train_dataset(small)
    n_targets = int((seq.inter_feat[TARGET_SEQ_FIELD] > 0).sum())
    assert n_targets == len(small) and len(seq) < len(small)
    with torch.no_grad():
        total = sequence_training_loss(model, seq.inter_feat) * n_targets
        expected = model.calculate_loss(small.inter_feat) * len(small)
    torch.testing.assert_close(total, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("target", ["train", "validation"])
def test_scores_on_each_target_equal_a_per_user_loop(run_config, target):
    """influence_target: the batched scores (v by fixed blocks, CG, jvp) equal a plain reference: v as the mean of
    per-user gradients of the target's loss (each user's training prefixes, or its one validation row), x by the
    exact inverse of the dense Gauss-Newton Hessian, and one backward per training user."""
    from recbole_dealrec.scoring.ihvp import dense_hessian, exact_solve

    pattern = [r"trm_encoder\.layer\.0\.multi_head_attention\.dense\.bias$"]  # 16 parameters: a dense H is cheap
    config = DealrecConfig("SASRec", "ml-100k", config_dict={
        **{k: run_config[k] for k in ("output_dir", "checkpoint_dir")}, **TINY, "surrogate_config": {**TINY, "epochs": 2},
        "influence_params": pattern, "influence_target": target, "influence_damping": 0.01, "cg_max_iter": 32,
        "ihvp_tol": 1e-6, "influence_hessian_users": None, "influence_sequence_mode": False})
    surrogate = train_surrogate(config)
    scored = influence_scores(config, surrogate)
    assert scored.meta["target"] == target
    # each part's seconds are kept (no power iteration: the damping is fixed here)
    assert list(scored.meta["part_seconds"]) == ["influence: mean gradient v", "influence: iHVP solve",
                                                 "influence: scores <grad L_u, H^-1 v>"]
    model = surrogate.model.double()
    loss = SurrogateLoss(model, config["influence_user_loss"])
    params = select_parameters(model.named_parameters(), pattern)
    train_batches = user_batches(surrogate.train_dataset, 4096)
    n_train = sum(len(b) for b in train_batches)

    def per_user_gradients(batches):
        out = []
        for batch in batches:
            for single in batch.split():
                leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
                (g,) = torch.autograd.grad(loss(leaves, single).sum(), list(leaves.values()))
                out.append(g.reshape(-1).double())
        return torch.stack(out)

    train_gradients = per_user_gradients(train_batches)  # [users, 16]
    v = (per_user_gradients(user_batches(surrogate.valid_dataset, 4096)) if target == "validation"
         else train_gradients).mean(0)
    dense = dense_hessian(loss.gauss_newton_hvp(params, train_batches, n_train), v.numel())
    expected = train_gradients @ exact_solve(dense, v, 0.01)
    # The plugin solves in float32 by CG to a relative residual of ihvp_tol: a score's error scales with the largest
    # score (the solution's norm), not with the score itself; near-zero scores get an absolute tolerance (1e-7 had
    # passed on one CPU kind by the luck of float32 rounding and failed on another, at 4e-6 of a 1.6% of the users)
    scale = float(expected.abs().max())
    assert scale > 1e-4
    torch.testing.assert_close(torch.as_tensor(scored.scores, dtype=torch.float64), expected, rtol=1e-4,
                               atol=1e-3 * scale)


@pytest.mark.filterwarnings("ignore:iHVP solve")
def test_ihvp_export_then_warm_start_gives_the_cold_scores_in_fewer_steps(run_config, tmp_path):
    """influence_ihvp_export / influence_ihvp_init: CG from the exported solution solves the same system to the same
    tolerance (the scores a cold start gives, up to it) in fewer steps; the warm start counts in the cache key by the
    file's content."""
    run_config.final_config_dict.update(cg_max_iter=200, ihvp_tol=1e-6, influence_ihvp_export=str(tmp_path / "a.pt"))
    cold, cold_meta = influence_signal(run_config)
    assert os.path.isfile(tmp_path / "a.pt") and not cold_meta["warm_start"] and cold_meta["iterations"] > 3
    run_config.final_config_dict.update(influence_ihvp_init=str(tmp_path / "a.pt"), influence_ihvp_export=None)
    warm, warm_meta = influence_signal(run_config)
    assert warm_meta["cached"] is False and warm_meta["warm_start"]  # not the cold entry: another key
    # the export is the entry's artifact: a run that reuses the cold entry exports the same bytes, whatever the cache
    run_config.final_config_dict.update(influence_ihvp_init=None, influence_ihvp_export=str(tmp_path / "b.pt"))
    again, again_meta = influence_signal(run_config)
    assert again_meta["cached"] is True
    assert (tmp_path / "b.pt").read_bytes() == (tmp_path / "a.pt").read_bytes()
    # an entry that lost its artifact is not reused: it is computed again, the same scores and the same bytes
    os.unlink(again_meta["artifacts"]["ihvp.pt"])
    (tmp_path / "b.pt").unlink()
    redone, redone_meta = influence_signal(run_config)
    assert redone_meta["cached"] is False and (tmp_path / "b.pt").read_bytes() == (tmp_path / "a.pt").read_bytes()
    np.testing.assert_array_equal(redone.values, cold.values)
    assert warm_meta["iterations"] <= 1 and warm_meta["residual"] <= 1e-6
    np.testing.assert_array_equal(warm.user_ids, cold.user_ids)
    np.testing.assert_allclose(warm.values, cold.values, rtol=0, atol=1e-4 * np.abs(cold.values).max())


def test_ihvp_init_carries_item_rows_by_token_and_rejects_bad_input(tmp_path, run_config):
    from recbole_dealrec.scoring.influence import ihvp_bytes, load_ihvp

    model, dataset = untrained("SASRec")
    params = select_parameters(model.named_parameters(), [r"^item_embedding", r"layer\.0\.multi_head_attention\.dense\.bias$"])
    solution = {k: torch.arange(v.numel(), dtype=v.dtype).reshape(v.shape) + 1.0 for k, v in params.items()}
    (tmp_path / "x.pt").write_bytes(ihvp_bytes(solution, dataset))
    start, carried = load_ihvp(str(tmp_path / "x.pt"), params, dataset)
    torch.testing.assert_close(start, torch.cat([t.reshape(-1) for t in solution.values()]))
    # an earlier run whose items were these, reversed, without the last: rows follow the tokens, the new item's is 0
    saved = torch.load(tmp_path / "x.pt", weights_only=True)
    tokens = saved["item_tokens"]
    table = saved["ihvp"]["item_embedding.weight"]
    kept = [0] + list(range(len(tokens) - 2, 0, -1))
    torch.save({"ihvp": {**saved["ihvp"], "item_embedding.weight": table[kept]},
                "item_tokens": [tokens[i] for i in kept]}, tmp_path / "older.pt")
    start, carried = load_ihvp(str(tmp_path / "older.pt"), params, dataset)
    rows = start[:table.numel()].reshape(table.shape)
    assert carried == len(tokens) - 2
    torch.testing.assert_close(rows[:-1], table[:-1]) and torch.testing.assert_close(rows[-1], torch.zeros_like(rows[-1]))
    with pytest.raises(ConfigError, match=r"influence_ihvp_init=.*its parameters"):
        load_ihvp(str(tmp_path / "x.pt"), {"item_embedding.weight": params["item_embedding.weight"]}, dataset)
    run_config["influence_ihvp_init"] = str(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match=r"^influence_ihvp_init='.*missing.pt': no such file"):
        check_influence_config(run_config)
    run_config.final_config_dict.update(influence_ihvp_init=str(tmp_path / "x.pt"), ihvp_solver="lissa")
    with pytest.raises(ConfigError, match=r"^influence_ihvp_init is a start for ihvp_solver: cg only"):
        check_influence_config(run_config)
