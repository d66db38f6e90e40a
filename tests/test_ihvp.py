"""Tests for recbole_dealrec.scoring.ihvp: iHVP solvers on real (tiny) Hessians.

Model: L2-regularised multinomial logistic regression, 6 features x 3 classes
(+ bias) = 21 parameters, 50 samples, float64 -- convex, so its Hessian is
positive definite and can be formed densely.  A small tanh MLP provides a
non-convex Hessian for the dense-Hessian check.
"""

import logging

import math

import pytest
import torch
import torch.nn.functional as F

from recbole_dealrec.scoring.ihvp import (
    SolveResult,
    conjugate_gradient,
    deterministic_sampler,
    dense_hessian,
    exact_solve,
    lissa,
    lissa_damping_for,
    relative_residual,
    solve,
)
from recbole_dealrec.gradients.params import flatten, unflatten
from recbole_dealrec.scoring.influence_core import make_hvp, make_stochastic_hvp, mean_gradient

# torch's first forward-mode call scripts its jvp decompositions (torch-internal warning)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

N, D, C = 50, 6, 3
L2 = 1e-2
DT = torch.float64


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=DT)
    y = torch.randint(0, C, (N,), generator=g)
    params = {
        "W": 0.5 * torch.randn(C, D, generator=g, dtype=DT),
        "b": 0.1 * torch.randn(C, generator=g, dtype=DT),
    }
    return x, y, params


def logreg_loss(params, batch):
    """Per-sample CE + L2 penalty (the penalty is part of every sample's loss)."""
    x, y = batch
    logits = x @ params["W"].T + params["b"]
    reg = 0.5 * L2 * (params["W"].pow(2).sum() + params["b"].pow(2).sum())
    return F.cross_entropy(logits, y, reduction="none") + reg


def _batches(x, y, size=16):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]


@pytest.fixture(scope="module")
def problem():
    x, y, params = _data()
    batches = _batches(x, y)
    hvp = make_hvp(logreg_loss, params, batches, N)
    m = flatten(params).numel()
    H = dense_hessian(hvp, m, DT)
    v = flatten(mean_gradient(logreg_loss, params, batches, N))
    eig = torch.linalg.eigvalsh(H)
    return dict(x=x, y=y, params=params, batches=batches, hvp=hvp, H=H, v=v, eig=eig, m=m)


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# --------------------------------------------------------------------------- dense Hessian

@pytest.mark.parametrize("mode", ["forward-over-reverse", "double-backward"])
def test_dense_hessian_matches_autograd_on_mlp(mode):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (20,), generator=g)
    params = {"w1": torch.randn(4, 3, generator=g, dtype=DT),
              "w2": torch.randn(2, 4, generator=g, dtype=DT)}

    def mlp_loss(p, batch):
        xb, yb = batch
        return F.cross_entropy(torch.tanh(xb @ p["w1"].T) @ p["w2"].T, yb, reduction="none")

    hvp = make_hvp(mlp_loss, params, _batches(x, y, 7), 20, mode=mode)
    H = dense_hessian(hvp, 20, DT)

    def mean_loss(flat):
        return mlp_loss(unflatten(flat, params), (x, y)).mean()

    H_ref = torch.autograd.functional.hessian(mean_loss, flatten(params))
    torch.testing.assert_close(H, H_ref, rtol=1e-10, atol=1e-12)
    # non-convex model: Hessian really is indefinite here, so the check is not trivial
    assert torch.linalg.eigvalsh(H).min() < 0


def test_problem_hessian_matches_autograd(problem):
    def mean_loss(flat):
        return logreg_loss(unflatten(flat, problem["params"]), (problem["x"], problem["y"])).mean()

    H_ref = torch.autograd.functional.hessian(mean_loss, flatten(problem["params"]))
    torch.testing.assert_close(problem["H"], H_ref, rtol=1e-10, atol=1e-12)
    assert problem["eig"].min() > 0  # convex + L2


# --------------------------------------------------------------------------- CG / exact

@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_cg_matches_exact(problem, damping):
    x_ref = exact_solve(problem["H"], problem["v"], damping)
    res = conjugate_gradient(problem["hvp"], problem["v"], damping=damping, tol=1e-10)
    assert isinstance(res, SolveResult)
    assert res.converged and res.effective_damping == damping
    assert _rel(res.x, x_ref) < 1e-7
    assert res.residual < 1e-8
    assert res.residual == pytest.approx(
        relative_residual(problem["hvp"], res.x, problem["v"], damping), rel=1e-6)
    assert res.iterations <= problem["m"] + 5


@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_cg_warm_start_reaches_the_same_solution_in_fewer_steps(problem, damping):
    x_ref = exact_solve(problem["H"], problem["v"], damping)
    cold = conjugate_gradient(problem["hvp"], problem["v"], damping=damping, tol=1e-8)
    # from the solution itself: no step, the true residual reported
    at = conjugate_gradient(problem["hvp"], problem["v"], damping=damping, tol=1e-8, x0=x_ref)
    assert at.converged and at.iterations == 0 and at.residual < 1e-8 and torch.equal(at.x, x_ref)
    # from the solution of a nearby system (v moved by 1%): the same solution, to the same tolerance, sooner
    generator = torch.Generator().manual_seed(5)
    near = exact_solve(problem["H"], problem["v"] + 0.01 * problem["v"].norm() * torch.randn(
        problem["m"], generator=generator, dtype=DT) / math.sqrt(problem["m"]), damping)
    warm = conjugate_gradient(problem["hvp"], problem["v"], damping=damping, tol=1e-8, x0=near)
    assert warm.converged and warm.residual < 1e-8 and _rel(warm.x, x_ref) < 1e-6
    assert warm.iterations < cold.iterations
    # from anywhere: still the solution
    far = conjugate_gradient(problem["hvp"], problem["v"], damping=damping, tol=1e-10,
                             x0=torch.randn(problem["m"], generator=generator, dtype=DT))
    assert _rel(far.x, x_ref) < 1e-7
    with pytest.raises(ValueError, match="x0 must have v's shape"):
        conjugate_gradient(problem["hvp"], problem["v"], x0=torch.zeros(problem["m"] + 1, dtype=DT))


def test_exact_via_dispatcher_from_hvp_and_hessian(problem):
    a = solve("exact", problem["v"], hvp=problem["hvp"], damping=0.1)
    b = solve("EXACT", problem["v"], hessian=problem["H"], damping=0.1)
    torch.testing.assert_close(a.x, b.x)
    assert a.residual < 1e-10 and a.converged and a.effective_damping == 0.1


def test_cg_non_positive_curvature_raises():
    H = torch.diag(torch.tensor([2.0, 1.0, -3.0], dtype=DT))
    with pytest.raises(ValueError, match="damping"):
        conjugate_gradient(lambda z: H @ z, torch.ones(3, dtype=DT))
    # enough damping makes it positive definite and solvable
    res = conjugate_gradient(lambda z: H @ z, torch.ones(3, dtype=DT), damping=4.0)
    torch.testing.assert_close(res.x, exact_solve(H, torch.ones(3, dtype=DT), 4.0))


def test_cg_nan_hvp_raises_naming_ihvp():
    with pytest.raises(FloatingPointError, match="ihvp"):
        conjugate_gradient(lambda z: z * float("nan"), torch.ones(4, dtype=DT))


def test_cg_zero_rhs():
    res = conjugate_gradient(lambda z: z, torch.zeros(5, dtype=DT))
    assert res.converged and torch.count_nonzero(res.x) == 0


# --------------------------------------------------------------------------- LiSSA

def test_lissa_fixed_point_and_effective_damping(problem):
    """Deterministic full-batch LiSSA solves (H + damping*scale I) x = v."""
    lam_max = float(problem["eig"].max())
    scale = 1.5 * lam_max
    eff = 0.05
    damping = lissa_damping_for(eff, scale)
    res = solve("lissa", problem["v"], hvp=problem["hvp"], damping=damping, scale=scale,
                depth=400)
    assert res.effective_damping == pytest.approx(eff)
    x_ref = exact_solve(problem["H"], problem["v"], eff)
    assert _rel(res.x, x_ref) < 1e-6
    # the reported residual is w.r.t. the effective damping ...
    assert res.residual < 1e-6 and res.converged
    # ... and would be large w.r.t. the raw `damping` argument (different system)
    assert relative_residual(problem["hvp"], res.x, problem["v"], damping) > 1e-2


def test_lissa_matches_cg_with_same_effective_damping(problem):
    H = problem["H"]
    lam_max = float(problem["eig"].max())
    scale, eff = 1.2 * lam_max, 0.02
    res_l = lissa(deterministic_sampler(lambda z: H @ z), problem["v"],
                  damping=lissa_damping_for(eff, scale), scale=scale, depth=3000,
                  residual_hvp=lambda z: H @ z)
    res_c = conjugate_gradient(lambda z: H @ z, problem["v"], damping=eff, tol=1e-12)
    assert _rel(res_l.x, res_c.x) < 1e-8
    assert res_l.iterations == 3000 and res_l.converged


def test_lissa_stochastic_minibatch(problem):
    x, y = problem["x"], problem["y"]

    def sample_batch(gen):
        idx = torch.randperm(N, generator=gen)[:25]
        return x[idx], y[idx]

    sampler = make_stochastic_hvp(logreg_loss, problem["params"], sample_batch)
    lam_max = float(problem["eig"].max())
    scale, eff = 2.0 * lam_max, 0.05
    kw = dict(damping=lissa_damping_for(eff, scale), scale=scale, depth=300, repeats=4)
    res = lissa(sampler, problem["v"], generator=torch.Generator().manual_seed(0),
                residual_hvp=problem["hvp"], tol=0.3, **kw)
    x_ref = exact_solve(problem["H"], problem["v"], eff)
    assert _rel(res.x, x_ref) < 0.15
    assert res.residual is not None and res.residual < 0.3
    # seeded -> reproducible (short runs suffice to check that)
    kw["depth"], kw["repeats"] = 20, 1
    a = lissa(sampler, problem["v"], generator=torch.Generator().manual_seed(1), **kw)
    b = lissa(sampler, problem["v"], generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    assert a.residual is None and a.converged  # no exact hvp supplied


def test_lissa_divergence_raises(problem):
    H = problem["H"]
    lam_max = float(problem["eig"].max())
    with pytest.raises(FloatingPointError, match="scale"):
        lissa(deterministic_sampler(lambda z: H @ z), problem["v"], damping=0.01,
              scale=0.4 * lam_max, depth=5000)


def test_lissa_progress_callback(problem):
    H = problem["H"]
    calls = []
    lissa(deterministic_sampler(lambda z: H @ z), problem["v"], scale=25.0, depth=5,
          repeats=2, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (10, 10) and len(calls) == 10


# --------------------------------------------------------------------------- dispatcher

def test_unknown_method_names_config_key(problem):
    with pytest.raises(ValueError, match="ihvp_solver") as e:
        solve("newton", problem["v"], hvp=problem["hvp"])
    for allowed in ("lissa", "cg", "exact"):
        assert allowed in str(e.value)


def test_non_convergence_warns_and_logs(problem, caplog):
    with caplog.at_level(logging.INFO):
        with pytest.warns(RuntimeWarning, match="did not converge"):
            res = solve("cg", problem["v"], hvp=problem["hvp"], max_iter=2)
    assert not res.converged and res.residual > 1e-6
    assert any(r.levelno == logging.WARNING and "did not converge" in r.getMessage()
               for r in caplog.records)


def test_converged_solve_logs_residual_without_warning(problem, caplog, recwarn):
    with caplog.at_level(logging.INFO):
        res = solve("cg", problem["v"], hvp=problem["hvp"], damping=1e-3)
    assert res.converged
    assert any("relative residual" in r.getMessage() for r in caplog.records)
    assert not [w for w in recwarn if "did not converge" in str(w.message)]
