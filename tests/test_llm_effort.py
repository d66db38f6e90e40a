"""Tests for LLM loading, effort scores (DEALRec Eq. 12) and BIGRec grounding.

Everything runs on a tiny random Llama built from a config and a word-level
tokenizer built in memory: no files from a hub, no downloads.  The real
SmolLM2 conversion runs only under the opt-in ``slow`` marker.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import pytest
import torch

from recbole_dealrec.model.bigrec.grounding import (
    ground,
    last_token_embeddings,
    last_token_index,
    with_adapter_disabled,
)
from recbole_dealrec.model.bigrec.llm import (
    CACHE_ENV_VAR,
    add_lora,
    default_cache_dir,
    default_llm_path,
    load_causal_lm,
    resolve_llm_path,
)
from recbole_dealrec.gradients.lora import (
    effort_scores,
    effort_scores_loop,
    last_layer_lora_pattern,
    lora_parameter_names,
    per_sample_loss,
    shared_prefix_columns,
)

WORDS = (
    "the a of and to in is it for on with as at by an be this that from or "
    "game play super mario zelda legend sonic hedgehog racing kart party "
    "user bought item title next recommend please answer "
).split()

TEXTS = [
    "the user bought super mario kart",
    "legend of zelda",
    "sonic the hedgehog racing party game for the user to play",
    "play",
    "recommend the next item title please",
]


def make_tokenizer(padding_side: str = "right", with_pad: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = dict(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", padding_side=padding_side)
    if with_pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(**kwargs)


def make_llama(seed: int = 0, dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: v_proj out (16) != in (32)
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=2,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def perturb_lora_b(model, seed: int = 1, scale: float = 0.2) -> None:
    """Make lora_B nonzero so that lora_A gradients are nonzero too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def make_batches(tokenizer, texts, batch_size: int, mask_prompt: int = 0, with_labels: bool = True):
    """Padded batches; labels ignore the first ``mask_prompt`` real tokens of each sample."""
    batches = []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(texts[s : s + batch_size], padding=True, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if with_labels:
            labels = enc["input_ids"].clone()
            labels[enc["attention_mask"] == 0] = -100
            if mask_prompt:
                real_rank = enc["attention_mask"].cumsum(-1)  # 1-based rank of real tokens
                labels[(real_rank <= mask_prompt) & (enc["attention_mask"] == 1)] = -100
            batch["labels"] = labels
        batches.append(batch)
    return batches


@pytest.fixture
def lora_model():
    model = add_lora(make_llama(), r=4, alpha=8, dropout=0.1)
    perturb_lora_b(model)
    return model


# --------------------------------------------------------------------------- effort scores


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("patterns", [None, "last"])
def test_batched_effort_matches_loop(lora_model, padding_side, patterns):
    tok = make_tokenizer(padding_side)
    if patterns == "last":
        patterns = [last_layer_lora_pattern(lora_model)]
        assert patterns[0].startswith(r"layers\.1\.")
    batches = make_batches(tok, TEXTS, batch_size=3, mask_prompt=2)
    assert (batches[0]["attention_mask"] == 0).any()  # padding really present
    lora_model.train()  # scoring must switch dropout off and restore the mode
    flags = {n: p.requires_grad for n, p in lora_model.named_parameters()}
    batched = effort_scores(lora_model, batches, param_patterns=patterns)
    loop = effort_scores_loop(lora_model, batches, param_patterns=patterns)
    assert batched.dtype == torch.float64 and batched.shape == (len(TEXTS),)
    # "play" is one token, all ignored by mask_prompt=2: no label token -> loss 0 -> norm 0
    assert batched[3] == 0 and (batched[[0, 1, 2, 4]] > 0).all()
    torch.testing.assert_close(batched, loop, rtol=1e-9, atol=1e-12)
    assert lora_model.training
    assert flags == {n: p.requires_grad for n, p in lora_model.named_parameters()}
    assert all(p.grad is None for p in lora_model.parameters())


PREFIXED = [  # BIGRec-like: every prompt opens with the same instruction
    "recommend the next item title please the user bought super mario kart",
    "recommend the next item title please legend of zelda",
    "recommend the next item title please sonic the hedgehog racing party game",
    "recommend the next item title please play",
    "recommend the next item title please play",  # two identical rows
]


def _tokens_run(model):
    """A counter of the token positions the model's embedding layer sees (what a forward actually computes)."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    return seen, handle


@pytest.mark.parametrize("fresh", [True, False])
@pytest.mark.parametrize("mask_prompt", [0, 3, 8])
def test_shared_prefix_effort_matches_every_row_and_the_loop(fresh, mask_prompt):
    """The paper's tensor with the batch's shared prompt prefix run once: the norms of the full batch and of the
    one-sample loop (fresh LoRA: lora_B = 0; trained: nonzero), whether the prefix's labels count (mask_prompt 0),
    partly (3) or not (8), with far fewer token positions computed."""
    model = add_lora(make_llama(), r=4, alpha=8, dropout=0.1)
    if not fresh:
        perturb_lora_b(model)
    patterns = [last_layer_lora_pattern(model)]
    batches = make_batches(make_tokenizer("right"), PREFIXED, batch_size=5, mask_prompt=mask_prompt)
    ids, mask, labels = batches[0]["input_ids"], batches[0]["attention_mask"], batches[0]["labels"]
    assert shared_prefix_columns(ids, mask, labels) == 5  # 6 shared words; the 6th predicts each row's own
    seen, handle = _tokens_run(model)
    shared = effort_scores(model, batches, patterns)
    handle.remove()
    every = effort_scores(model, batches, patterns, share_prefix=False)
    loop = effort_scores_loop(model, batches, patterns)
    assert sum(seen) == 5 + 5 * (ids.shape[1] - 5) < ids.numel()
    torch.testing.assert_close(shared, every, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(shared, loop, rtol=1e-6, atol=1e-9)
    assert shared[3] == shared[4] and (shared[:3] > 0).all()  # (row 3 has no label left at mask_prompt 8)


def test_shared_prefix_falls_back_where_it_does_not_apply(lora_model):
    """No shared prefix (left padding puts padding first; one row), or scored tensors outside the last v_proj (all
    LoRA): the whole batch runs, and the norms are the loop's."""
    last = [last_layer_lora_pattern(lora_model)]
    cases = [(make_batches(make_tokenizer("left"), PREFIXED[:4], batch_size=4), last),
             (make_batches(make_tokenizer("right"), PREFIXED[:1], batch_size=1), last),
             (make_batches(make_tokenizer("right"), PREFIXED, batch_size=5), None)]
    for batches, patterns in cases:
        seen, handle = _tokens_run(lora_model)
        norms = effort_scores(lora_model, batches, patterns)
        handle.remove()
        assert sum(seen) == sum(b["input_ids"].numel() for b in batches)
        torch.testing.assert_close(norms, effort_scores_loop(lora_model, batches, patterns), rtol=1e-6, atol=1e-9)


def test_truncated_backward_equals_the_full_backward(lora_model):
    """Scoring the last layer's lora_B runs the backward through one layer only; its per-sample norms must equal
    those of a full backward (every LoRA tensor requiring grad, one sample at a time) restricted to that tensor."""
    tok = make_tokenizer("right")
    pattern = last_layer_lora_pattern(lora_model)
    batches = make_batches(tok, TEXTS, batch_size=3, mask_prompt=2)
    truncated = effort_scores(lora_model, batches, param_patterns=[pattern])
    lora_model.eval()
    lora = {n: p for n, p in lora_model.named_parameters() if "lora_" in n}
    for p in lora.values():
        p.requires_grad_(True)
    scored = [n for n in lora if re.search(pattern, n)]
    assert len(scored) == 1 and len(lora) > 1
    full = []
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            keep = batch["attention_mask"][i].bool()
            ids, labels = batch["input_ids"][i][keep][None], batch["labels"][i][keep][None]
            loss = per_sample_loss(lora_model(input_ids=ids).logits, labels)[0]
            if not (labels[0, 1:] != -100).any():  # no label token: loss 0, norm 0
                full.append(0.0)
                continue
            grads = dict(zip(lora, torch.autograd.grad(loss, list(lora.values()), allow_unused=True)))
            full.append(float(sum(grads[n].double().pow(2).sum() for n in scored).sqrt()))
    torch.testing.assert_close(truncated, torch.tensor(full, dtype=torch.float64), rtol=1e-6, atol=1e-9)


def test_batch_composition_does_not_matter(lora_model):
    tok = make_tokenizer("left")
    a = effort_scores(lora_model, make_batches(tok, TEXTS, batch_size=5, with_labels=False))
    b = effort_scores(lora_model, make_batches(tok, TEXTS, batch_size=2, with_labels=False))
    c = effort_scores_loop(lora_model, make_batches(tok, TEXTS, batch_size=1, with_labels=False))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)


def test_restricting_pattern_changes_scores(lora_model):
    tok = make_tokenizer()
    batches = make_batches(tok, TEXTS, batch_size=5)
    full = effort_scores(lora_model, batches)
    last = effort_scores(lora_model, batches, param_patterns=[r"layers\.1\.self_attn\.v_proj\.lora_B"])
    assert (last <= full).all() and (last[full > 0] < full[full > 0]).all()


def test_loss_matches_hf_loss():
    model = make_llama()
    tok = make_tokenizer()
    enc = tok(TEXTS[0], return_tensors="pt")
    labels = enc["input_ids"].clone()
    labels[:, :3] = -100
    with torch.no_grad():
        out = model(**enc, labels=labels)
    # HF upcasts logits to float32 for its loss
    torch.testing.assert_close(per_sample_loss(out.logits, labels)[0], out.loss.double(), rtol=1e-6, atol=1e-6)


def test_pattern_matching_nothing_raises(lora_model):
    tok = make_tokenizer()
    batches = make_batches(tok, TEXTS[:2], batch_size=2)
    with pytest.raises(ValueError, match="lora_A") as info:
        effort_scores(lora_model, batches, param_patterns=[r"no_such_module"])
    assert "no_such_module" in str(info.value)
    with pytest.raises(ValueError):
        effort_scores_loop(lora_model, batches, param_patterns=[r"no_such_module"])


def test_fresh_lora_a_gradients_are_zero():
    model = add_lora(make_llama())  # fresh: lora_B == 0
    tok = make_tokenizer()
    texts = [t for t in TEXTS if len(t.split()) > 1]  # every sample has a target token
    batches = make_batches(tok, texts, batch_size=3)
    with pytest.warns(RuntimeWarning, match="all .* gradient norms are exactly 0"):
        a = effort_scores(model, batches, param_patterns=["lora_A"])
    assert torch.equal(a, torch.zeros(len(texts), dtype=torch.float64))
    with pytest.warns(RuntimeWarning):
        a_loop = effort_scores_loop(model, batches, param_patterns=["lora_A"])
    assert torch.equal(a_loop, a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lora_B carries signal: no warning
        b = effort_scores(model, batches, param_patterns=["lora_B"])
    assert (b > 0).all()
    torch.testing.assert_close(b, effort_scores(model, batches), rtol=1e-12, atol=0)


def test_nonfinite_norm_raises(lora_model):
    tok = make_tokenizer()
    with torch.no_grad():
        next(p for n, p in lora_model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="effort scores"):
        effort_scores(lora_model, make_batches(tok, TEXTS[:2], batch_size=2))


def test_lora_parameter_names_and_defaults():
    model = add_lora(make_llama())
    names = lora_parameter_names(model)
    assert len(names) == 2 * 2 * 2  # 2 layers x {q,v} x {A,B}
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.05)
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}


# --------------------------------------------------------------------------- grounding


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_last_token_embeddings_padding_invariant(padding_side):
    model = make_llama()
    tok = make_tokenizer(padding_side)
    batched = last_token_embeddings(model, tok, TEXTS, batch_size=len(TEXTS))
    alone = torch.cat([last_token_embeddings(model, tok, [t], batch_size=1) for t in TEXTS])
    assert batched.shape == (len(TEXTS), 32)
    torch.testing.assert_close(batched, alone, rtol=1e-10, atol=1e-10)
    # and the embedding is the final hidden state of the last real token
    enc = tok(TEXTS[1], return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc, output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(batched[1], ref)


def test_last_token_index_both_sides():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_with_adapter_disabled_gives_base_model():
    base = make_llama()
    tok = make_tokenizer()
    ref = last_token_embeddings(base, tok, TEXTS[:3])
    model = add_lora(base)
    perturb_lora_b(model)
    with with_adapter_disabled(model) as m:
        off = last_token_embeddings(m, tok, TEXTS[:3])
    on = last_token_embeddings(model, tok, TEXTS[:3])
    torch.testing.assert_close(off, ref)
    assert not torch.allclose(on, ref)
    with with_adapter_disabled(base) as m:  # plain model: unchanged
        assert m is base


def test_ground_ranks_identical_title_first_and_keeps_duplicates():
    model = make_llama()
    tok = make_tokenizer("left")
    titles = ["super mario kart", "legend of zelda", "sonic the hedgehog", "legend of zelda", "party game"]
    item_emb = last_token_embeddings(model, tok, titles, batch_size=2)
    gen = last_token_embeddings(model, tok, ["super mario kart", "legend of zelda"], batch_size=2)
    scores = ground(gen, item_emb)
    assert scores.shape == (2, len(titles))
    assert scores[0].argmax().item() == 0
    assert scores[0, 0] == pytest.approx(0.0, abs=1e-6)
    # duplicate titles: both ranked, identical scores, both at the top for the second query
    assert torch.equal(scores[:, 1], scores[:, 3])
    assert set(scores[1].topk(2).indices.tolist()) == {1, 3}


def test_ground_is_negative_l2():
    g = torch.Generator().manual_seed(0)
    gen, items = torch.randn(3, 8, generator=g), torch.randn(6, 8, generator=g)
    items[4] = items[2]
    scores = ground(gen, items)
    ref = -((gen[:, None, :].double() - items[None].double()) ** 2).sum(-1).sqrt()
    torch.testing.assert_close(scores, ref)
    assert torch.equal(scores[:, 2], scores[:, 4])
    with pytest.raises(ValueError):
        ground(gen, items[:, :4])


# --------------------------------------------------------------------------- loading


def save_tiny(path, with_pad: bool = False) -> str:
    make_llama(dtype=torch.float32).save_pretrained(path)
    make_tokenizer(with_pad=with_pad).save_pretrained(path)
    return str(path)


def test_load_causal_lm_tiny(tmp_path):
    path = save_tiny(tmp_path / "tiny")
    assert resolve_llm_path(path) == path
    model, tok = load_causal_lm(path)
    assert model.config.model_type == "llama" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token == tok.eos_token == "</s>"  # pad falls back to eos
    assert tok.padding_side == "left"
    assert model.config.pad_token_id is not None
    lora = add_lora(model)
    enc = tok(TEXTS[:2], padding=True, return_tensors="pt")
    out = lora(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100))
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_resolve_llm_path_errors(tmp_path):
    from recbole_dealrec.errors import ConfigError

    with pytest.raises(ConfigError, match="llm_path.*no such local folder"):
        resolve_llm_path(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="llm_path.*no config.json"):
        resolve_llm_path(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="llm_path"):
        load_causal_lm(str(tmp_path / "missing"))


def test_non_causal_config_raises(tmp_path):
    from transformers import BertConfig

    path = tmp_path / "bert"
    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(path)
    with pytest.raises(ValueError, match="llm_path") as info:
        resolve_llm_path(str(path))
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="llm_path"):
        load_causal_lm(str(path))


def test_default_cache_dir_and_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "cache"))
    assert default_cache_dir() == str(tmp_path / "cache")
    # a complete converted folder is reused as-is (no conversion)
    from recbole_dealrec.model.bigrec import llm

    target = tmp_path / "cache" / llm.DEFAULT_MODEL_DIRNAME
    save_tiny(target)
    (target / llm._COMPLETE_MARKER).write_text(json.dumps({}))
    assert default_llm_path() == str(target)
    assert resolve_llm_path(None) == str(target)
    assert resolve_llm_path("default") == str(target)


def test_converting_the_default_llm_leaves_the_callers_rng_as_it_found_it(tmp_path, monkeypatch):
    """A run that converts the LLM (first use) starts its LoRA from the same draw as a run that reuses the cache.
    The GGUF reading draws from torch's RNG (seen with SmolLM2: the converting run's LoRA differed); a converter
    that draws stands in for it here, the real one runs under the slow marker."""
    from recbole_dealrec.model.bigrec import llm

    def drawing_converter(gguf_path, out_dir):
        torch.rand(100)
        save_tiny(out_dir)

    monkeypatch.setattr(llm, "_convert_gguf", drawing_converter)
    monkeypatch.setattr(llm, "default_gguf_path", lambda: str(tmp_path / "model.gguf"))
    draws = []
    for _ in ("converted", "reused"):
        torch.manual_seed(3)
        default_llm_path(str(tmp_path / "cache"))
        draws.append(torch.rand(4))
    assert (tmp_path / "cache" / llm.DEFAULT_MODEL_DIRNAME / llm._COMPLETE_MARKER).is_file()
    assert torch.equal(draws[0], draws[1])


@pytest.mark.slow
def test_converting_smollm2_leaves_the_callers_rng_as_it_found_it(tmp_path):
    torch.manual_seed(3)
    default_llm_path(str(tmp_path / "cache"))
    converted = torch.rand(4)
    torch.manual_seed(3)
    torch.testing.assert_close(torch.rand(4), converted, rtol=0, atol=0)


@pytest.mark.slow
def test_default_smollm2_lora_forward_backward():
    path = default_llm_path()
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    model, tok = load_causal_lm(path)
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    model = add_lora(model)
    enc = tok(["The user bought Super Mario Kart.", "Next: The Legend of Zelda"], padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    model.train()
    out = model(**enc, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)
    batches = [dict(enc, labels=labels)]
    scores = effort_scores(model, batches, param_patterns=[last_layer_lora_pattern(model)])
    assert scores.shape == (2,) and (scores > 0).all()
