"""Gradient machinery shared by the stages that score samples (no stage of its own, imports no stage):

- ``gradients.params``: choose the scored parameters by pattern, and flatten / unflatten parameter dicts;
- ``gradients.lora``: per-sample gradient norms of a causal LM's loss w.r.t. its LoRA tensors (one batched
  backward with hooks on the owning linear layers), the engine behind BIGRec's effort scores.
"""
