"""The per-sample gradient engine of the surrogate and of TIGER: one ``vmap(grad)`` over a batch of samples, no
per-sample backward (``torch.func``, as opacus' functorch path). BIGRec's LLM has its own faster path for LoRA
weights (``gradients.lora``: hooks on the owning linear layers), tested against a per-sample loop."""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor


def squared_norm(grads: Mapping[str, Tensor]) -> Tensor:
    """``sum_k ||grads[k]||^2`` in float64 (a scalar), over the tensors in their order."""
    return sum((g.double() ** 2).sum() for g in grads.values())


def per_sample_squared_grad_norms(loss: Callable[..., Tensor], params: Mapping[str, Tensor], *samples: Tensor
                                  ) -> Tensor:
    """``||grad_params loss(params, *sample_i)||^2`` for every sample ``i``: float64 ``[b]``.

    ``loss(params, *sample)`` is a scalar of one sample; ``samples`` are its batched inputs, each ``[b, ...]``
    (a tuple of tensors counts as one input, batched along its tensors' first dimension). ``params``: the
    differentiated tensors (detached), by name.
    """
    def norm_sq(p, *sample):
        return squared_norm(torch.func.grad(loss)(p, *sample))

    return torch.func.vmap(norm_sq, in_dims=(None,) + (0,) * len(samples))(dict(params), *samples)
