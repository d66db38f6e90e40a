"""The influence retraining check: its statistics, the influence machinery against exact leave-group-out retraining
on a convex model, and the check on a tiny surrogate (deterministic under a seed)."""
import json
import os
import numpy as np
import pytest
import torch

from recbole_dealrec.diagnose import CheckArguments, influence_check, removal_agreement, write_check_report
from recbole_dealrec.errors import ConfigError
from recbole_dealrec.gradients.params import flatten, unflatten
from recbole_dealrec.scoring.ihvp import solve
from recbole_dealrec.scoring.influence_core import directional_derivatives, make_hvp, mean_gradient


def logistic_problem(seed: int = 0, n: int = 300, n_valid: int = 400, d: int = 5, ridge: float = 1e-2):
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(n + n_valid, d, generator=g, dtype=torch.float64)
    y = torch.bernoulli(torch.sigmoid(x @ w_true), generator=g)
    train, valid = (x[:n], y[:n]), (x[n:], y[n:])

    def sample_losses(params, index):  # l_i(w) = BCE_i + ridge/2 ||w||^2: R = mean_i l_i is strongly convex
        w = params["w"]
        logits = train[0][index] @ w
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, train[1][index], reduction="none")
        return bce + 0.5 * ridge * (w ** 2).sum()

    def valid_loss(w):
        return float(torch.nn.functional.binary_cross_entropy_with_logits(valid[0] @ w, valid[1]))

    _VALID["data"] = valid

    def fit(kept: np.ndarray) -> torch.Tensor:  # Newton to convergence on the kept samples
        w = torch.zeros(d, dtype=torch.float64)
        index = torch.from_numpy(kept)
        for _ in range(50):
            w = w.detach().requires_grad_(True)
            objective = sample_losses({"w": w}, index).mean()
            grad = torch.autograd.grad(objective, w, create_graph=True)[0]
            hess = torch.stack([torch.autograd.grad(grad[i], w, retain_graph=True)[0] for i in range(d)])
            w = (w - torch.linalg.solve(hess, grad)).detach()
        return w

    return sample_losses, valid_loss, fit, n


def test_influence_predicts_leave_group_out_retraining_on_a_convex_model():
    """The plugin's influence machinery (mean gradient, exact HVP, iHVP solve, jvp scores) on L2 logistic
    regression: for a held-out target the predicted change of the validation loss matches exact retraining without
    each group; for the training risk at the optimum the scores are ~0 (its gradient v vanishes there)."""
    sample_losses, valid_loss, fit, n = logistic_problem()
    everyone = np.arange(n)
    w_star = fit(everyone)
    params = {"w": w_star}
    batches = [torch.from_numpy(everyone)]
    hvp = make_hvp(sample_losses, params, batches, n)
    w_leaf = w_star.clone().requires_grad_(True)
    g_valid = torch.autograd.grad(torch.tensor(0.0, dtype=torch.float64) + _valid_bce(w_leaf), w_leaf)[0]
    result = solve("cg", g_valid, hvp=hvp, damping=0.0, max_iter=50)
    scores = directional_derivatives(sample_losses, params, unflatten(result.x, params), batches).numpy()
    rng = np.random.default_rng(0)
    order = np.argsort(-scores)
    groups = [rng.choice(n, size=20, replace=False) for _ in range(12)] + [order[:20], order[-20:]]
    base = valid_loss(w_star)
    predicted = [scores[g].sum() / n for g in groups]
    measured = [valid_loss(fit(np.setdiff1d(everyone, g))) - base for g in groups]
    agreement = removal_agreement(predicted, measured, seed=0)
    assert agreement["spearman"] >= 0.9 and agreement["pearson"] >= 0.9, agreement
    assert (predicted[-2] > predicted[-1]) and (measured[-2] > measured[-1])  # top vs bottom in the right order
    # DEALRec's Eq. 11 on the training risk itself: at the optimum v = grad R = 0, so every score is ~0
    v = flatten(mean_gradient(sample_losses, params, batches, n))
    assert float(v.norm()) < 1e-10
    at_optimum = directional_derivatives(sample_losses, params, unflatten(solve("cg", v, hvp=hvp, damping=0.0,
                                                                                 max_iter=50).x, params), batches)
    assert float(at_optimum.abs().max()) < 1e-8


_VALID = {}


def _valid_bce(w):
    x, y = _VALID["data"]
    return torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y)


def test_removal_agreement_against_scipy_and_a_perfect_line():
    from scipy import stats

    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    y = 2 * x + rng.normal(scale=0.1, size=12)
    out = removal_agreement(x, y, seed=1)
    assert out["pearson"] == pytest.approx(stats.pearsonr(x, y)[0])
    assert out["spearman"] == pytest.approx(stats.spearmanr(x, y)[0])
    assert out["pearson_95"][0] <= out["pearson"] <= out["pearson_95"][1]
    assert removal_agreement(x, y, seed=1) == out  # the bootstrap is seeded
    assert removal_agreement(x, 3 * x, seed=1)["spearman_95"] == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError):
        removal_agreement(x[:2], y[:2])


@pytest.mark.parametrize("keys, message", [({"check_seeds": 1}, "check_seeds must be an integer >= 2"),
                                           ({"check_retrain": "never"}, "check_retrain must be one of")])
def test_bad_check_keys(keys, message):
    base = {"check_groups": 3, "check_group_size": 10, "check_seeds": 2, "check_retrain": "fixed_epochs", "seed": 0}
    with pytest.raises(ConfigError, match=message):
        CheckArguments.from_config({**base, **keys})


def test_the_check_on_a_tiny_surrogate_is_deterministic(tiny_config, tmp_path):
    from recbole_dealrec.config import DealrecConfig

    settings = {
        **tiny_config, "sampler": "dealrec", "influence_hessian_users": 100, "cg_max_iter": 5,
        "influence_power_iters": 3, "show_progress": False,
        "surrogate_config": {"hidden_size": 8, "inner_size": 16, "n_layers": 1, "n_heads": 1,
                             "MAX_ITEM_LIST_LENGTH": 6, "epochs": 1, "train_batch_size": 1024}}
    config = DealrecConfig("SASRec", "ml-100k", config_dict=settings)
    args = CheckArguments(check_groups=3, check_group_size=20, check_seeds=2, check_retrain="fixed_epochs", seed=7)
    first = influence_check(config, args)
    assert influence_check(config, args) == first  # same seed, same report, bit for bit
    assert [g["group"] for g in first["groups"]] == ["random 1", "random 2", "random 3", "top", "bottom"]
    assert all(len(g["users"]) == 20 for g in first["groups"]) and first["noise_sd"] > 0
    assert {"pearson", "spearman", "pearson_95", "spearman_95"} <= set(first["agreement"])
    paths = write_check_report(first, str(tmp_path / "check"))
    assert "Spearman" in open(paths["md"]).read() and open(paths["png"], "rb").read(4) == b"\x89PNG"

    # recorded under the surrogate's and the influence keys' key; a DEALRec selection on them reports it
    from recbole_dealrec.quick_start import run_recbole
    from recbole_dealrec.scoring.influence import record_influence_check, recorded_influence_check

    assert recorded_influence_check(config) is None
    record_influence_check(config, first, str(tmp_path / "check"))
    recorded = recorded_influence_check(config)
    assert recorded["agreement"] == first["agreement"] and recorded["top_vs_bottom"] == first["top_vs_bottom"]
    flipped = {"sum": "mean", "mean": "sum"}[config["influence_user_loss"]]
    other = DealrecConfig("SASRec", "ml-100k", config_dict={**settings, "influence_user_loss": flipped})
    assert recorded_influence_check(other) is None  # other scores: not this check's
    result = run_recbole("SASRec", config_dict={**settings,
                                                "selection_num": 50, "dealrec_lambda": 0, "epochs": 1,
                                                "show_progress": False, "report_plots": False}, saved=False)
    report = json.load(open(os.path.join(result["selection"]["folder"], "report.json")))
    assert report["influence_check"]["agreement"] == first["agreement"]
