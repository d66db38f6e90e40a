"""Shared fixtures: tiny RecBole configs on the embedded ml-100k, outputs under pytest's tmp_path."""
from __future__ import annotations

import os

import pytest
import torch

import recbole_dealrec  # noqa: F401  (applies the compatibility shims)

GAMES_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "games")

# Tiny SASRec: one layer, hidden 16, history 10 -> a few seconds per epoch on 2 cores.
TINY_SASREC = {
    "MAX_ITEM_LIST_LENGTH": 10,
    "hidden_size": 16,
    "inner_size": 32,
    "n_layers": 1,
    "n_heads": 1,
    "epochs": 1,
    "train_batch_size": 512,
    "eval_batch_size": 512,
    "show_progress": False,
}


# Smaller still, for surrogates trained inside influence / dealrec tests.
TINY_SURROGATE = {"hidden_size": 8, "inner_size": 16, "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 6,
                  "epochs": 1, "train_batch_size": 1024, "show_progress": False}


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models' ops are far too small for intra-op threads: on 2 shared cores OpenMP's spinning made
    them many times slower with 2 threads than with 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_config(tmp_path):
    """A config dict whose outputs (checkpoints, selections) go under tmp_path."""
    return {
        **TINY_SASREC,
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "output_dir": str(tmp_path / "out"),
    }


def cli_argv(config: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in config.items()]


# ---- a tiny random Llama with a byte-level tokenizer built in memory (no files from a hub) ----


def make_byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="<pad>")


def make_tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny_llm_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_llm")
    tok = make_byte_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def tiny_bigrec_config(llm_path: str, tmp) -> dict:
    return {
        "llm_path": llm_path,
        "MAX_ITEM_LIST_LENGTH": 10,
        "llm_max_length": 384,
        "num_beams": 2,
        "max_new_tokens": 8,
        "train_batch_size": 4,
        "eval_batch_size": 8,
        "epochs": 1,
        "gradient_accumulation_steps": 1,
        "warmup_steps": 0,
        "show_progress": False,
        "checkpoint_dir": str(tmp / "ckpt"),
        "output_dir": str(tmp / "out"),
    }




# A tiny TIGER: 2 RQ-VAE levels of 64 codes (+ the collision level), a 1+1-layer T5 of width 32.
TINY_TIGER = {
    "tiger_codebook_size": 64, "tiger_levels": 2, "tiger_rqvae_epochs": 20, "tiger_rqvae_hidden": [128],
    "tiger_rqvae_latent": 16, "tiger_d_model": 32, "tiger_d_kv": 8, "tiger_d_ff": 64, "tiger_num_layers": 1,
    "tiger_num_decoder_layers": 1, "tiger_num_heads": 2, "tiger_max_history": 5, "epochs": 1,
    "eval_user_subset": 16, "valid_user_subset": 16, "show_progress": False,
}
