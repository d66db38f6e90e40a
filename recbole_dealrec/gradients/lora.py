"""Effort score (DEALRec, SIGIR'24, Eq. 12).

The effort score of a training sample is the L2 norm of the gradient of the
LLM's loss on that sample with respect to the LoRA parameters:

    effort(s) = || d L(s) / d theta_LoRA ||_2 ,

where ``L(s)`` is the mean token cross-entropy over the sample's label tokens
(positions with label ``-100`` are ignored; the paper's code uses
``labels = input_ids`` over the whole prompt, which the caller can pass).

Exact per-sample norms in one batched backward
------------------------------------------------
LoRA's ``lora_A`` / ``lora_B`` are ``nn.Linear`` layers ``y = x W^T``.  For a
batch we backpropagate the *sum* of the per-sample mean losses (never a batch
token mean, which would mix samples), so the gradient w.r.t. a layer's output
``y[b]`` is exactly sample ``b``'s own ``dL_b/dy_b`` (samples never interact
in a causal LM forward).  Sample ``b``'s weight gradient is then

    G_b = sum_t g[b, t]^T x[b, t]        (shape [out, in]),

which we materialise with one ``einsum`` per layer (cheap: one side of every
LoRA matrix is the rank ``r``).  Forward hooks record each scored layer's
input ``x`` and output ``y``; ``torch.autograd.grad(total, ys)`` returns the
``g`` s directly (no parameter ``.grad`` is touched).  Positions with
``attention_mask == 0`` are zeroed explicitly, so padding (left or right)
contributes nothing.

Scoring runs in eval mode (LoRA dropout off: the score must be a deterministic
function of the sample) and with ``requires_grad`` only on the scored LoRA
parameters, so autograd stops at the earliest scored layer (e.g. scoring only
the last layer's ``v_proj.lora_B`` backpropagates through the last layer
only).  Modes and ``requires_grad`` flags are restored afterwards.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_STAGE = "effort scores"


# --------------------------------------------------------------------------- params


def lora_parameter_names(model: nn.Module) -> list[str]:
    """Names of all LoRA parameters of ``model`` (those with ``lora_`` in their name)."""
    return [n for n, _ in model.named_parameters() if "lora_" in n]


def last_layer_lora_pattern(model: nn.Module, target: str = "v_proj", part: str = "lora_B") -> str:
    """Regex selecting ``part`` of the ``target`` LoRA in the last decoder layer.

    The paper scores only the last layer's ``v_proj.lora_B``; for a 2-layer
    Llama this returns ``r"layers\\.1\\..*v_proj\\.lora_B"`` (the module path
    between the layer index and ``target`` is kept generic).
    """
    idx = [
        int(m.group(1))
        for n in lora_parameter_names(model)
        if (m := re.search(r"layers\.(\d+)\.", n)) and target in n and part in n
    ]
    if not idx:
        raise ValueError(
            f"{_STAGE}: no LoRA parameter matches layers.<i>...{target}...{part}; "
            f"LoRA parameters: {_fmt_names(lora_parameter_names(model))}"
        )
    return rf"layers\.{max(idx)}\..*{re.escape(target)}\.{re.escape(part)}"


def _fmt_names(names: Sequence[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "") if names else "(none)"


def _select_params(model: nn.Module, param_patterns: Sequence[str] | None) -> dict[str, nn.Parameter]:
    """LoRA params whose name matches any pattern (``re.search``); all LoRA params if None."""
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    if not lora:
        raise ValueError(f"{_STAGE}: the model has no LoRA parameters (wrap it with add_lora first)")
    if param_patterns is None:
        return lora
    if isinstance(param_patterns, str):  # a lone string would otherwise iterate by character
        param_patterns = [param_patterns]
    selected: dict[str, nn.Parameter] = {}
    for pat in param_patterns:
        hits = {n: p for n, p in lora.items() if re.search(pat, n)}
        if not hits:
            raise ValueError(
                f"{_STAGE}: parameter pattern {pat!r} matches no LoRA parameter; "
                f"LoRA parameters are: {_fmt_names(list(lora))}"
            )
        selected.update(hits)
    return selected


def _owning_linears(model: nn.Module, params: Mapping[str, nn.Parameter]) -> dict[nn.Module, dict[str, bool]]:
    """Map each scored parameter to its owning ``nn.Linear``: {module: {'weight': bool, 'bias': bool}}."""
    owners: dict[nn.Module, dict[str, bool]] = {}
    modules = dict(model.named_modules())
    for name in params:
        mod_name, _, attr = name.rpartition(".")
        mod = modules.get(mod_name)
        if not isinstance(mod, nn.Linear) or attr not in ("weight", "bias"):
            raise ValueError(
                f"{_STAGE}: LoRA parameter {name!r} is not the weight/bias of an nn.Linear "
                f"(e.g. LoRA on embeddings or DoRA magnitudes); restrict `param_patterns` to lora_A/lora_B"
            )
        owners.setdefault(mod, {"weight": False, "bias": False})[attr] = True
    return owners


@contextmanager
def _scoring_state(model: nn.Module, params: Mapping[str, nn.Parameter]) -> Iterator[None]:
    """Eval mode + requires_grad only on ``params``; restore both on exit."""
    ckpt = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5
    if ckpt is None:
        ckpt = getattr(model, "is_gradient_checkpointing", False)
    if ckpt:
        # Checkpointing re-runs forwards during backward, so the recorded layer
        # outputs would not be the ones autograd differentiates.
        raise ValueError(f"{_STAGE}: disable gradient checkpointing before scoring")
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    scored = {id(p) for p in params.values()}
    try:
        model.eval()  # LoRA dropout off
        for p in model.parameters():
            p.requires_grad_(id(p) in scored)
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in flags.items():
            p.requires_grad_(flag)


# --------------------------------------------------------------------------- loss


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _prepare(batch: Mapping[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) on ``device``; labels of padded positions forced to -100."""
    input_ids = torch.as_tensor(batch["input_ids"], device=device)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else torch.as_tensor(mask, device=device).reshape(input_ids.shape)
    labels = batch.get("labels")
    labels = input_ids.clone() if labels is None else torch.as_tensor(labels, device=device).reshape(input_ids.shape).clone()
    # Padding must contribute nothing, even when labels were copied from input_ids.
    labels[mask == 0] = IGNORE_INDEX
    # A token is a target only if the token before it is real: with left
    # padding the first real token would otherwise be "predicted" from a pad
    # position, which the unpadded sample never does (its first token has no
    # prediction).  No-op for right padding.
    labels[:, 1:][mask[:, :-1] == 0] = IGNORE_INDEX
    return input_ids, mask.long(), labels.long()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only ([b, T] -> [b, T]), as ``generate`` does.

    Makes a left-padded sample see exactly the positions it has unpadded
    (matters for absolute position embeddings; harmless for RoPE).
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per sample over label tokens: [b, T, V], [b, T] -> [b].

    Causal shift as in HF (``logits[:, t]`` predicts ``labels[:, t+1]``).  A
    sample without any label token gets loss 0 (and thus gradient 0).
    """
    shift_logits = logits[:, :-1, :].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    b, t, v = shift_logits.shape
    tok = F.cross_entropy(
        shift_logits.reshape(-1, v), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(b, t)
    n_tok = (shift_labels != IGNORE_INDEX).sum(-1)
    return tok.sum(-1) / n_tok.clamp_min(1).to(tok.dtype)


def _forward_loss(model: nn.Module, input_ids, mask, labels) -> torch.Tensor:
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        use_cache=False,
    )
    return per_sample_loss(out.logits, labels)


# --------------------------------------------------------------------------- checks


def _check_finite(norms: torch.Tensor) -> None:
    if not torch.isfinite(norms).all():
        bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
        raise FloatingPointError(f"{_STAGE}: non-finite gradient norm for samples at positions {bad[:20]}")


def _warn_if_all_zero(norms: torch.Tensor) -> None:
    if norms.numel() > 0 and bool((norms == 0).all()):
        msg = (
            f"{_STAGE}: all {norms.numel()} gradient norms are exactly 0. With a fresh LoRA "
            "(lora_B initialised to 0) every lora_A gradient is 0 by construction; score lora_B "
            "or use a (briefly) trained adapter."
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        logger.warning(msg)


def _progress(it: Iterable, show: bool, desc: str) -> Iterable:
    if not show:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with transformers
        return it
    return tqdm(it, desc=desc)


# --------------------------------------------------------------------------- batched


class _Recorder:
    """Forward hooks storing (module, input, output) of every call of the scored Linears."""

    def __init__(self, owners: Mapping[nn.Module, Mapping[str, bool]]):
        self.owners = owners
        self.calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self.handles = [m.register_forward_hook(self._hook) for m in owners]

    def _hook(self, module: nn.Module, inputs, output) -> None:
        # Only outputs in the autograd graph can be differentiated (e.g. a
        # LoRA of an inactive adapter is not called at all; under no_grad
        # nothing is recorded).
        if isinstance(output, torch.Tensor) and output.requires_grad:
            self.calls.append((module, inputs[0], output))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.calls.clear()


def _per_sample_grads(
    recorder: _Recorder, total: torch.Tensor, masks: Sequence[torch.Tensor | None]
) -> dict[tuple[nn.Module, str], torch.Tensor]:
    """Per-sample gradients of the scored Linears from the recorded calls: {(module, 'weight' | 'bias'):
    [b, out, in] | [b, out]}. ``masks[i]`` [b, t_i] zeroes call i's padded positions (None: no padding)."""
    calls = recorder.calls
    acc: dict[tuple[nn.Module, str], torch.Tensor] = {}
    if not calls or not total.requires_grad:
        return acc
    grads = torch.autograd.grad(total, [y for _, _, y in calls], allow_unused=True)
    # Per module, the per-sample gradient is the sum over its calls (a module
    # called twice per forward gets one gradient), so accumulate before norming.
    for (module, x, _), g, mask in zip(calls, grads, masks):
        if g is None:
            continue
        b = g.shape[0]
        cdt = torch.float64 if g.dtype == torch.float64 else torch.float32
        x = x.detach().to(cdt).reshape(b, -1, x.shape[-1])
        g = g.to(cdt).reshape(b, -1, g.shape[-1])
        if mask is not None:
            # Zero padded positions explicitly (their g is 0 in exact
            # arithmetic; where() also guards against NaN/inf activations on
            # fully masked rows).
            keep = mask.bool().unsqueeze(-1)
            x = torch.where(keep, x, torch.zeros((), dtype=cdt, device=x.device))
            g = torch.where(keep, g, torch.zeros((), dtype=cdt, device=g.device))
        which = recorder.owners[module]
        if which["weight"]:
            gw = torch.einsum("bto,bti->boi", g, x)  # [b, out, in]; r is small so this is cheap
            acc[module, "weight"] = acc[module, "weight"] + gw if (module, "weight") in acc else gw
        if which["bias"]:
            gb = g.sum(1)  # [b, out]
            acc[module, "bias"] = acc[module, "bias"] + gb if (module, "bias") in acc else gb
    return acc


def _sq_norms(grads: Mapping[tuple[nn.Module, str], torch.Tensor], b: int, device) -> torch.Tensor:
    """Squared per-sample norms [b] (float64) of per-sample gradients (:func:`_per_sample_grads`)."""
    sq = torch.zeros(b, dtype=torch.float64, device=device)
    for g in grads.values():
        sq += g.pow(2).flatten(1).sum(1).to(torch.float64)
    return sq


def _batch_sq_norms(
    recorder: _Recorder, total: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Squared per-sample gradient norms [b] (float64) of the scored Linears (one forward of the whole batch)."""
    masks = [mask if x.reshape(mask.shape[0], -1, x.shape[-1]).shape[1] == mask.shape[1] else None
             for _, x, _ in recorder.calls]
    return _sq_norms(_per_sample_grads(recorder, total, masks), mask.shape[0], mask.device)


# --------------------------------------------------------------------------- shared prompt prefix


def shared_prefix_columns(input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> int:
    """How many first columns a batch can compute on one row: s = p - 1 for the p first columns every row holds
    as the same real token with the same label (0 when p < 2 or one row). The prediction made at column p - 1 is
    of a row's own token, so column p - 1 stays with the rows."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0) & (labels == labels[:1]).all(0) & mask.bool().all(0)
    return max(int(same.long().cumprod(0).sum()) - 1, 0)


def _last_value_projection(model: nn.Module, owners: Mapping[nn.Module, Mapping[str, bool]]) -> nn.Module | None:
    """The last decoder layer's ``self_attn.v_proj`` when every scored Linear lies inside it (the paper's scored
    tensor: its ``lora_B``), else None. Only then does a prefix shared by every row need recomputing per row in the
    values of the last layer alone: every earlier activation of the prefix holds no scored parameter."""
    try:
        value_proj = model.get_decoder().layers[-1].self_attn.v_proj
    except (AttributeError, IndexError, TypeError):
        return None
    inside = {id(m) for m in value_proj.modules()}
    return value_proj if owners and all(id(m) in inside for m in owners) else None


def _shared_prefix_sq_norms(
    model: nn.Module, recorder: _Recorder, value_proj: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor,
    labels: torch.Tensor, s: int,
) -> torch.Tensor | None:
    """Squared per-sample norms [b] (float64), the first ``s`` columns (shared by every row,
    :func:`shared_prefix_columns`) run once: the same numbers as :func:`_batch_sq_norms` up to float rounding, for
    about (T - s) / T of its forward.

    The prefix runs on one row with the KV cache. Its own loss terms (it predicts its own tokens 1..s) are the same
    for every row: their gradient ``G_prefix`` is taken once. The rows then run on columns s.. over the prefix's
    cache, whose last-layer values are recomputed per row from the prefix's (one row's) ``v_proj`` inputs, so the
    gradient of each row's loss reaches the scored tensor through the prefix's values too. A row's gradient of its
    mean loss is ``(G_prefix + G_row) / n_row`` (n_row: its label tokens). None when the model's cache is not plain
    full attention or does not hold the values as ``v_proj`` computes them (then the caller runs the whole batch).
    """
    from recbole_dealrec.compat import plain_kv_cache, transformers_cache_key

    b, width = input_ids.shape
    key = transformers_cache_key()
    position_ids = position_ids_from_mask(mask)
    captured: list[torch.Tensor] = []
    handle = value_proj.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
    recorder.calls.clear()
    try:
        with torch.enable_grad():
            out = model(input_ids=input_ids[:1, :s], attention_mask=mask[:1, :s], position_ids=position_ids[:1, :s],
                        use_cache=True)
    finally:
        handle.remove()
    cache = getattr(out, key, None)
    if cache is None or not plain_kv_cache(cache) or len(captured) != 1:
        recorder.calls.clear()
        return None
    logits = out.logits.float() if out.logits.dtype in (torch.float16, torch.bfloat16) else out.logits
    prefix_loss = F.cross_entropy(logits[0], labels[0, 1 : s + 1], ignore_index=IGNORE_INDEX, reduction="sum")
    g_prefix = _per_sample_grads(recorder, prefix_loss, [None] * len(recorder.calls))  # each [1, ...]
    recorder.calls.clear()
    for layer in cache.layers:  # the rows' backward must not run into the one prefix row's graph
        layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
    x_prefix = captured[0]  # [1, s, hidden]: the last layer's v_proj input over the prefix
    cached = cache.layers[-1].values  # [1, kv_heads, s, head_dim]
    with torch.no_grad():
        check = value_proj(x_prefix)
    if check.numel() != cached.numel() or not torch.allclose(
            check.view(1, s, cached.shape[1], cached.shape[3]).transpose(1, 2), cached, rtol=1e-4, atol=1e-6):
        return None
    cache.batch_repeat_interleave(b)
    with torch.enable_grad():
        values = value_proj(x_prefix.expand(b, -1, -1))  # recorded: the rows' own prefix values, in the graph
        cache.layers[-1].values = values.view(b, s, cached.shape[1], cached.shape[3]).transpose(1, 2)
        out = model(input_ids=input_ids[:, s:], attention_mask=mask, position_ids=position_ids[:, s:],
                    use_cache=True, **{key: cache})
        logits = out.logits[:, :-1]
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        row_labels = labels[:, s + 1 :]
        row_sums = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), row_labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="none").view(b, -1).sum(-1)
        n_labels = (labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp_min(1).to(row_sums.dtype)
        masks = [None] + [mask[:, s:]] * (len(recorder.calls) - 1)  # the prefix values' call, then the rows'
        grads = _per_sample_grads(recorder, (row_sums / n_labels).sum(), masks)
    recorder.calls.clear()
    for name, g in g_prefix.items():  # + G_prefix / n_row
        scale = (1.0 / n_labels).to(g.dtype).view(b, *([1] * (g.dim() - 1)))
        grads[name] = grads[name] + g * scale if name in grads else g.expand(b, *g.shape[1:]) * scale
    return _sq_norms(grads, b, mask.device)


def effort_scores(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    param_patterns: Sequence[str] | None = None,
    show_progress: bool = False,
    share_prefix: bool = True,
) -> torch.Tensor:
    """Per-sample effort scores (paper Eq. 12), exact, one backward per batch.

    Args:
        model: a (peft) causal LM with LoRA adapters; the active adapter is scored.
        batches: dicts with ``input_ids`` [b, T], ``attention_mask`` [b, T]
            (optional: all ones) and ``labels`` [b, T] (``-100`` = ignored;
            optional: ``input_ids``, i.e. the whole prompt as in the paper's
            code).  Labels at padded positions are ignored regardless, and so
            is a label right after a pad (the first real token of a
            left-padded row), so a sample's loss equals its unpadded loss;
            left and right padding both work (positions are counted over real
            tokens).
        param_patterns: regexes (``re.search`` on parameter names) restricting
            the scored LoRA parameters, e.g. ``[last_layer_lora_pattern(model)]``
            for the paper's last-layer ``v_proj.lora_B``; None = all LoRA params.
        share_prefix: when every scored parameter lies in the last layer's ``v_proj`` (the paper's tensor), the
            first tokens every sample of a batch shares (BIGRec's template and instruction: about half of a
            128-token prompt) run once per batch (:func:`_shared_prefix_sq_norms`); False: every token of every
            sample runs (the same norms up to float rounding, tested).
    Returns:
        float64 CPU tensor [n_samples] of gradient L2 norms, in batch order.
    Raises:
        ValueError: a pattern matches no LoRA parameter (the message lists them).
        FloatingPointError: a norm is NaN/inf.
    Note:
        A fresh LoRA has ``lora_B = 0``, hence every ``lora_A`` gradient is
        exactly 0 and only ``lora_B`` carries signal; if all norms are 0 a
        warning is emitted (``warnings`` + ``logging``).  Scoring runs in eval
        mode (dropout off) and restores train/eval modes and ``requires_grad``.
    """
    params = _select_params(model, param_patterns)
    owners = _owning_linears(model, params)
    device = _model_device(model)
    value_proj = _last_value_projection(model, owners) if share_prefix else None
    out: list[torch.Tensor] = []
    with _scoring_state(model, params):
        recorder = _Recorder(owners)
        try:
            for batch in _progress(batches, show_progress, "effort scores"):
                input_ids, mask, labels = _prepare(batch, device)
                shared = shared_prefix_columns(input_ids, mask, labels) if value_proj is not None else 0
                sq = (_shared_prefix_sq_norms(model, recorder, value_proj, input_ids, mask, labels, shared)
                      if shared > 0 else None)
                if sq is None:
                    recorder.calls.clear()
                    with torch.enable_grad():
                        total = _forward_loss(model, input_ids, mask, labels).sum()
                        sq = _batch_sq_norms(recorder, total, mask)
                recorder.calls.clear()  # free activations before the next batch
                norms = sq.sqrt().cpu()
                _check_finite(norms)
                out.append(norms)
        finally:
            recorder.remove()
    norms = torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
    _warn_if_all_zero(norms)
    return norms


def effort_scores_loop(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    param_patterns: Sequence[str] | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """Reference implementation: one unpadded sample at a time, ``torch.autograd.grad``.

    Same arguments/return as :func:`effort_scores` (float64 [n_samples]).  Each
    sample is stripped of its padding (``attention_mask == 0`` positions) and
    run alone; slow, meant for tests and benchmarks.
    """
    params = _select_params(model, param_patterns)
    _owning_linears(model, params)  # same validation as the batched path
    plist = list(params.values())
    device = _model_device(model)
    out: list[float] = []
    with _scoring_state(model, params):
        for batch in _progress(batches, show_progress, "effort scores (loop)"):
            input_ids, mask, labels = _prepare(batch, device)
            for i in range(input_ids.shape[0]):
                keep = mask[i].bool()
                if not bool(keep.any()):  # an all-padding row has no loss
                    out.append(0.0)
                    continue
                ids_i, lab_i = input_ids[i][keep][None], labels[i][keep][None]
                mask_i = torch.ones_like(ids_i)
                with torch.enable_grad():
                    loss = _forward_loss(model, ids_i, mask_i, lab_i)[0]
                    if not loss.requires_grad:
                        out.append(0.0)
                        continue
                    grads = torch.autograd.grad(loss, plist, allow_unused=True)
                sq = sum(float(g.detach().to(torch.float64).pow(2).sum()) for g in grads if g is not None)
                out.append(math.sqrt(sq))
    norms = torch.tensor(out, dtype=torch.float64)
    _check_finite(norms)
    _warn_if_all_zero(norms)
    return norms


__all__ = [
    "IGNORE_INDEX",
    "effort_scores",
    "effort_scores_loop",
    "last_layer_lora_pattern",
    "lora_parameter_names",
    "per_sample_loss",
    "position_ids_from_mask",
]
