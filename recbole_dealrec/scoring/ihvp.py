"""Inverse-Hessian-vector-product (iHVP) solvers on flat 1-D tensors.

The solvers here know nothing about models, losses or data: they only see a
Hessian-vector-product callable (``HVP``: ``[m] -> [m]``) or, for LiSSA, a
*stochastic* HVP sampler.  This keeps "what the loss is" (see
``influence_core``) apart from "how ``H^-1 v`` is solved", as in
torch-influence / kronfluence.

Damping conventions -- read this before comparing solvers
---------------------------------------------------------
Every solver returns a :class:`SolveResult` whose ``effective_damping`` is the
``lambda`` of the system that was *actually* solved::

    (H + effective_damping * I) x = v

* ``exact_solve`` / ``"exact"`` and ``conjugate_gradient`` / ``"cg"``:
  ``effective_damping = damping``.
* ``lissa`` / ``"lissa"``: the recursion (Algorithm 1 of the DEALRec paper,
  Koh & Liang 2017) ``h_t = v + (1 - damping) h_{t-1} - H h_{t-1} / scale``
  has fixed point ``h* = scale (H + damping*scale I)^-1 v`` and the returned
  estimate is ``h_T / scale``, hence
  ``effective_damping = damping * scale``.
  To make LiSSA solve the same system as CG with damping ``lam``, pass
  ``damping = lam / scale`` (see :func:`lissa_damping_for`).

The recursion converges iff every eigenvalue ``mu`` of ``H`` satisfies
``0 < mu / scale + damping < 2``, i.e. ``scale > lambda_max(H) / (2 - damping)``
and ``lambda_min(H) + damping * scale > 0``.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "HVP",
    "HVPSampler",
    "SolveResult",
    "SOLVERS",
    "ensure_finite",
    "relative_residual",
    "dense_hessian",
    "exact_solve",
    "conjugate_gradient",
    "lissa",
    "lissa_damping_for",
    "deterministic_sampler",
    "solve",
]

# RecBole configures the root logger, so log there (not to a module logger that
# a RecBole run would not have handlers for).
logger = logging.getLogger()

HVP = Callable[[Tensor], Tensor]
"""Exact Hessian-vector product on flat vectors: ``x [m] -> H x [m]``."""

HVPSampler = Callable[[Tensor, Optional[torch.Generator]], Tensor]
"""Stochastic HVP: ``(x [m], generator) -> H_B x [m]`` for a random minibatch
``B`` drawn with ``generator`` (``E[H_B] = H``)."""

SOLVERS = ("cg", "exact", "lissa")

# Default convergence tolerances on the relative residual; LiSSA is a
# stochastic method and never reaches CG-level accuracy.
_DEFAULT_TOL = {"cg": 1e-6, "exact": 1e-4, "lissa": 1e-2}


@dataclass
class SolveResult:
    """Outcome of an iHVP solve of ``(H + effective_damping I) x = v``.

    Attributes:
        x: solution estimate, shape ``[m]``.
        residual: ``||(H + effective_damping I) x - v|| / ||v||`` (exact HVP),
            or ``None`` when no exact HVP was available to compute it.
        iterations: HVP calls spent in the iteration (CG steps, or
            ``depth * repeats`` for LiSSA; 0 for the exact solver).
        effective_damping: the damping of the system actually solved.
        converged: ``residual <= tol`` (CG: its recursive residual; LiSSA
            without a residual HVP: ``True`` = "did not diverge").
        method: solver name.
    """

    x: Tensor
    residual: Optional[float]
    iterations: int
    effective_damping: float
    converged: bool
    method: str = ""


def ensure_finite(t: Union[Tensor, dict], stage: str) -> None:
    """Raise ``FloatingPointError`` naming ``stage`` if ``t`` (a tensor or a
    dict of tensors) contains NaN or inf.

    Failing loudly here beats silently ranking samples by NaN scores.
    """
    items = t.items() if isinstance(t, dict) else [("", t)]
    for name, value in items:
        if not torch.is_tensor(value) or torch.isfinite(value).all():
            continue
        n_nan = int(torch.isnan(value).sum())
        n_inf = int(torch.isinf(value).sum())
        where = f" (tensor '{name}')" if name else ""
        raise FloatingPointError(
            f"Non-finite values in {stage}{where}: {n_nan} NaN, {n_inf} inf "
            f"out of {value.numel()} entries. Check the learning rate / "
            f"parameters of the scored model, or increase the iHVP damping."
        )


def relative_residual(hvp: HVP, x: Tensor, v: Tensor, damping: float) -> float:
    """``||(H + damping I) x - v|| / ||v||`` using one call of ``hvp``.

    ``x``, ``v``: ``[m]``.  If ``v == 0`` the absolute residual is returned.
    """
    r = hvp(x) + damping * x - v
    v_norm = float(torch.linalg.vector_norm(v))
    r_norm = float(torch.linalg.vector_norm(r))
    return r_norm / v_norm if v_norm > 0 else r_norm


def dense_hessian(
    hvp: HVP, m: int, dtype: torch.dtype = torch.float64, device=None
) -> Tensor:
    """Form the ``[m, m]`` Hessian column by column (``m`` HVP calls).

    The result is symmetrised, ``(H + H^T) / 2``, to remove round-off
    asymmetry so that ``exact_solve`` sees a symmetric matrix.  Only for small
    ``m`` (tests, tiny models).
    """
    eye = torch.eye(m, dtype=dtype, device=device)
    cols = [hvp(eye[i]).to(dtype) for i in range(m)]
    h = torch.stack(cols, dim=1)
    return 0.5 * (h + h.T)


def exact_solve(hessian: Tensor, v: Tensor, damping: float = 0.0) -> Tensor:
    """Solve ``(hessian + damping I) x = v`` directly.

    ``hessian``: ``[m, m]``; ``v``: ``[m]``; returns ``x``: ``[m]``.
    """
    m = v.shape[0]
    if hessian.shape != (m, m):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({m}, {m})")
    a = hessian + damping * torch.eye(m, dtype=hessian.dtype, device=hessian.device)
    x = torch.linalg.solve(a, v.to(hessian.dtype))
    ensure_finite(x, "ihvp")
    return x


def conjugate_gradient(
    hvp: HVP,
    v: Tensor,
    damping: float = 0.0,
    max_iter: Optional[int] = None,
    tol: float = 1e-6,
    show_progress: bool = False,
    x0: Optional[Tensor] = None,
) -> SolveResult:
    """Conjugate gradient on ``(H + damping I) x = v`` from ``x_0 = 0``, or from ``x0`` [m] (a warm start: an
    earlier solution of a nearby system; one HVP more for its residual, and the same stopping rule, so the result
    meets the same tolerance), with a tqdm bar per step with ``show_progress``.

    ``damping`` is the effective damping (added to every eigenvalue of ``H``).
    ``max_iter=None`` means ``min(m, 1000)`` (CG is exact after ``m`` steps in
    exact arithmetic).  Stops when the recursive relative residual
    ``||r_k|| / ||v|| <= tol``; the reported ``residual`` is the *true* one,
    recomputed with one extra HVP call.

    Raises ``ValueError`` on non-positive curvature ``p^T (H + damping I) p <= 0``
    (CG requires a positive-definite system; increase the damping), and
    ``FloatingPointError`` if the HVP produces NaN/inf.
    """
    if v.dim() != 1:
        raise ValueError(f"v must be a flat [m] vector, got shape {tuple(v.shape)}")
    m = v.shape[0]
    if max_iter is None:
        max_iter = min(m, 1000)
    v_norm = float(torch.linalg.vector_norm(v))
    x = torch.zeros_like(v)
    if v_norm == 0.0:
        return SolveResult(x, 0.0, 0, float(damping), True, "cg")

    def a_mul(p: Tensor) -> Tensor:
        return hvp(p) + damping * p

    if x0 is None:
        r = v.clone()  # r = v - A x with x = 0
    else:
        if x0.shape != v.shape:
            raise ValueError(f"x0 must have v's shape {tuple(v.shape)}, got {tuple(x0.shape)}")
        x = x0.to(v.dtype).clone()
        r = v - a_mul(x)
    p = r.clone()
    rs = torch.dot(r, r)
    it = 0
    converged = math.sqrt(float(rs)) / v_norm <= tol
    if converged:  # the start already meets the tolerance
        max_iter = 0
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iter, desc="iHVP (CG)", ncols=100)
    for it in range(1, max_iter + 1):
        ap = a_mul(p)
        pap = torch.dot(p, ap)
        if not torch.isfinite(pap):
            raise FloatingPointError(
                f"Non-finite curvature p^T A p in ihvp (CG iteration {it}); "
                f"the Hessian-vector product returned NaN/inf."
            )
        if pap <= 0:
            raise ValueError(
                f"Conjugate gradient met non-positive curvature p^T (H + damping I) p = "
                f"{float(pap):.3e} at iteration {it}: the damped Hessian is not positive "
                f"definite (damping={damping}). Raise the damping (e.g. ihvp damping) "
                f"above -lambda_min(H), or use a convex loss."
            )
        alpha = rs / pap
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = torch.dot(r, r)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(residual=f"{math.sqrt(float(rs_new)) / v_norm:.2e}")
        if math.sqrt(float(rs_new)) / v_norm <= tol:
            converged = True
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    if bar is not None:
        bar.close()
    ensure_finite(x, "ihvp")
    residual = relative_residual(hvp, x, v, damping)
    return SolveResult(x, residual, it, float(damping), converged, "cg")


def largest_eigenvalue(hvp: HVP, m: int, iters: int = 20, seed: int = 0, dtype=torch.float32,
                       device=None) -> float:
    """Largest eigenvalue of a positive semi-definite H (e.g. the Gauss-Newton Hessian) by power iteration:
    ``iters`` HVPs from a seeded random start, the last Rayleigh quotient ``x^T H x`` (``||x|| = 1``)."""
    generator = torch.Generator().manual_seed(int(seed))
    x = torch.randn(m, generator=generator, dtype=dtype).to(device)
    x = x / torch.linalg.vector_norm(x)
    value = 0.0
    for _ in range(max(1, iters)):
        hx = hvp(x)
        ensure_finite(hx, "power iteration")
        value = float(torch.dot(x, hx))
        norm = torch.linalg.vector_norm(hx)
        if float(norm) == 0.0:
            return 0.0
        x = hx / norm
    return value


def lissa_damping_for(effective_damping: float, scale: float) -> float:
    """LiSSA ``damping`` argument that makes it solve
    ``(H + effective_damping I) x = v`` (``= effective_damping / scale``)."""
    return effective_damping / scale


def deterministic_sampler(hvp: HVP) -> HVPSampler:
    """Adapt an exact ``hvp`` to the ``hvp_sampler(x, generator)`` signature."""

    def sampler(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return hvp(x)

    return sampler


def lissa(
    hvp_sampler: HVPSampler,
    v: Tensor,
    damping: float = 0.01,
    scale: float = 25.0,
    depth: int = 5000,
    repeats: int = 1,
    generator: Optional[torch.Generator] = None,
    residual_hvp: Optional[HVP] = None,
    tol: float = 1e-2,
    divergence_factor: float = 1e8,
    show_progress: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
) -> SolveResult:
    """LiSSA (Algorithm 1 of DEALRec; Agarwal et al. 2017, Koh & Liang 2017).

    Recursion, started at ``h_0 = v`` and run ``depth`` times per repeat::

        h_t = v + (1 - damping) h_{t-1} - HVP_t(h_{t-1}) / scale

    with ``HVP_t = hvp_sampler(., generator)`` a fresh stochastic HVP each step.
    The estimate is ``h_T / scale``, averaged over ``repeats`` independent runs.

    Fixed point: ``h* = scale (H + damping*scale I)^-1 v``, so the solver
    estimates ``(H + damping*scale I)^-1 v``:
    ``effective_damping = damping * scale`` (NOT ``damping``; compare with CG
    via :func:`lissa_damping_for`).  Requires
    ``scale > lambda_max(H) / (2 - damping)``; the error contracts like
    ``(1 - (lambda_min(H) + damping*scale) / scale)^t``.

    Args:
        hvp_sampler: ``(x [m], generator) -> [m]`` stochastic HVP of the mean loss.
        v: right-hand side ``[m]``.
        residual_hvp: optional exact HVP; if given, ONE extra call computes
            ``residual = ||(H + effective_damping I) x - v|| / ||v||`` and
            ``converged = residual <= tol``.  Otherwise ``residual=None`` and
            ``converged=True`` only means "did not diverge".
        divergence_factor: the run is declared divergent when an iterate is
            non-finite or ``||h_t|| > divergence_factor * ||v|| / max(damping, 1e-12)``
            (a convergent run is bounded by ``||v|| / damping`` for PSD ``H``).
        show_progress: show a ``tqdm`` bar; ``progress(done, total)`` is called
            every step if given.

    Raises:
        FloatingPointError: divergence (scale too small / damping too small).
    """
    if v.dim() != 1:
        raise ValueError(f"v must be a flat [m] vector, got shape {tuple(v.shape)}")
    if scale <= 0 or depth < 1 or repeats < 1:
        raise ValueError(f"lissa needs scale > 0, depth >= 1, repeats >= 1 "
                         f"(got scale={scale}, depth={depth}, repeats={repeats})")
    eff = float(damping) * float(scale)
    v_norm = float(torch.linalg.vector_norm(v))
    if v_norm == 0.0:
        return SolveResult(torch.zeros_like(v), 0.0, 0, eff, True, "lissa")
    bound = divergence_factor * v_norm / max(float(damping), 1e-12)

    total = depth * repeats
    bar = None
    if show_progress:
        from tqdm import tqdm  # optional dependency, only imported when asked for

        bar = tqdm(total=total, desc="LiSSA", leave=False)

    estimate = torch.zeros_like(v)
    done = 0
    try:
        for rep in range(repeats):
            h = v.clone()
            for t in range(1, depth + 1):
                hv = hvp_sampler(h, generator)
                h = v + (1.0 - damping) * h - hv / scale
                h_norm = float(torch.linalg.vector_norm(h))
                if not math.isfinite(h_norm) or h_norm > bound:
                    raise FloatingPointError(
                        f"LiSSA diverged at repeat {rep}, step {t} (||h_t|| = {h_norm:.3e}): "
                        f"scale={scale} is too small for the largest Hessian eigenvalue "
                        f"(needs scale > lambda_max(H) / (2 - damping)); increase the LiSSA "
                        f"scale. If the Hessian is indefinite, also increase damping "
                        f"(effective damping = damping * scale = {eff:.3e})."
                    )
                done += 1
                if bar is not None:
                    bar.update(1)
                if progress is not None:
                    progress(done, total)
            estimate += h / scale
    finally:
        if bar is not None:
            bar.close()
    x = estimate / repeats
    ensure_finite(x, "ihvp")
    residual = None
    converged = True
    if residual_hvp is not None:
        residual = relative_residual(residual_hvp, x, v, eff)
        converged = residual <= tol
    return SolveResult(x, residual, total, eff, converged, "lissa")


def solve(
    method: str,
    v: Tensor,
    *,
    hvp: Optional[HVP] = None,
    hvp_sampler: Optional[HVPSampler] = None,
    hessian: Optional[Tensor] = None,
    damping: Optional[float] = None,
    tol: Optional[float] = None,
    **kwargs,
) -> SolveResult:
    """Dispatch to an iHVP solver by name (config key ``ihvp_solver``).

    ``method`` in ``{'lissa', 'cg', 'exact'}`` (case-insensitive).
    ``damping`` keeps each solver's own meaning (see module docstring; LiSSA's
    effective damping is ``damping * scale``); ``None`` uses the solver default.
    Inputs: ``cg`` needs ``hvp``; ``exact`` needs ``hessian [m, m]`` or ``hvp``
    (then the dense Hessian is formed, ``m`` HVP calls); ``lissa`` needs
    ``hvp_sampler`` or ``hvp`` (deterministic) and uses ``hvp`` as
    ``residual_hvp`` unless given.  Extra ``kwargs`` go to the solver.

    Logs the relative residual at INFO; if the solve did not converge
    (residual above ``tol``) emits ``warnings.warn`` and a logger warning.
    """
    key = str(method).lower().strip()
    if key not in SOLVERS:
        raise ValueError(
            f"Unknown ihvp_solver '{method}'; allowed values for ihvp_solver: "
            f"{', '.join(repr(s) for s in SOLVERS)}."
        )
    tol = _DEFAULT_TOL[key] if tol is None else float(tol)

    if key == "cg":
        if hvp is None:
            raise ValueError("ihvp_solver='cg' needs an exact `hvp` callable.")
        result = conjugate_gradient(hvp, v, damping=0.0 if damping is None else damping,
                                    tol=tol, **kwargs)
    elif key == "exact":
        if kwargs:
            raise TypeError(f"unexpected arguments for ihvp_solver='exact': {sorted(kwargs)}")
        d = 0.0 if damping is None else float(damping)
        if hessian is None:
            if hvp is None:
                raise ValueError("ihvp_solver='exact' needs `hessian` or an `hvp` callable.")
            hessian = dense_hessian(hvp, v.shape[0], dtype=v.dtype, device=v.device)
        x = exact_solve(hessian, v, d)
        h = hessian
        residual = relative_residual(lambda z: h @ z, x, v.to(h.dtype), d)
        result = SolveResult(x, residual, 0, d, residual <= tol, "exact")
    else:  # lissa
        sampler = hvp_sampler
        if sampler is None:
            if hvp is None:
                raise ValueError("ihvp_solver='lissa' needs `hvp_sampler` or `hvp`.")
            sampler = deterministic_sampler(hvp)
        kwargs.setdefault("residual_hvp", hvp)
        if damping is not None:
            kwargs["damping"] = damping
        result = lissa(sampler, v, tol=tol, **kwargs)

    if result.residual is None:
        logger.info(
            "iHVP solve (%s): %d iterations, effective damping %.3e, residual not computed "
            "(no exact hvp given)", key, result.iterations, result.effective_damping)
    else:
        logger.info(
            "iHVP solve (%s): relative residual %.3e after %d iterations "
            "(effective damping %.3e)", key, result.residual, result.iterations,
            result.effective_damping)
    if not result.converged:
        msg = (f"iHVP solve (ihvp_solver='{key}') did not converge: relative residual "
               f"{result.residual:.3e} > tol {tol:.1e} after {result.iterations} iterations "
               f"(effective damping {result.effective_damping:.3e}). Influence scores may be "
               f"inaccurate; increase iterations/depth or damping.")
        logger.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return result
