"""BIGRec on RecBole's real ml-100k pipeline with a tiny random Llama (no downloads, no files from a hub).

The tiny LLM uses a byte-level tokenizer (one token per byte, no merges) built in memory, so every title
tokenises to a distinct sequence and decoding is exact.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

from conftest import make_byte_tokenizer, make_tiny_llama, tiny_bigrec_config  # noqa: F401
from recbole_dealrec.trainer import GenerativeTrainer as BIGRecTrainer
from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data import create_dataset, data_preparation
from recbole_dealrec.data.items import read_item_titles, user_samples
from recbole_dealrec.model.bigrec.prompts import build_prompt, format_prompt, tokenize_samples
from recbole_dealrec.model.bigrec.model import BIGRec, clean_generation
from recbole_dealrec.errors import ConfigError


@pytest.fixture(scope="module")
def tokenizer(tiny_llm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llm_path, local_files_only=True)


@pytest.fixture(scope="module")
def ml100k(tiny_llm_path, tmp_path_factory):
    """(config, dataset, train, valid, test) of ml-100k with BIGRec's config."""
    tmp = tmp_path_factory.mktemp("bigrec_run")
    config = DealrecConfig("BIGRec", "ml-100k", config_dict=tiny_bigrec_config(tiny_llm_path, tmp))
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    return config, dataset, train, valid, test


@pytest.fixture
def model(ml100k):
    config, _, train, _, _ = ml100k
    torch.manual_seed(0)
    return BIGRec(config, train.dataset)


# --------------------------------------------------------------------------- prompts


def test_prompt_format_and_truncation_drops_oldest_first(tokenizer):
    titles = [f"Movie number {i} (19{i:02d})" for i in range(30)]
    text, cut = build_prompt(titles[:3], "Target", tokenizer, None, "Do it.")
    assert not cut
    assert text == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nDo it.\n\n"
        '### Input:\n"Movie number 0 (1900)", "Movie number 1 (1901)", "Movie number 2 (1902)"\n\n'
        '### Response:\n"Target"'
    )
    full_len = len(tokenizer(text)["input_ids"]) + 1  # + eos
    text, cut = build_prompt(titles[:3], "Target", tokenizer, full_len, "Do it.")
    assert not cut

    budget = 600
    text, cut = build_prompt(titles, "Target", tokenizer, budget, "Do it.")
    assert cut
    n = len(tokenizer(text)["input_ids"]) + 1
    assert n <= budget
    kept = text.split("### Input:\n", 1)[1].split("\n\n### Response:", 1)[0]
    kept_titles = [t.strip('"') for t in kept.split('", "')]
    assert kept_titles == titles[-len(kept_titles):]  # newest kept, oldest dropped
    assert 0 < len(kept_titles) < len(titles)
    # one more (older) title would not fit
    longer = format_prompt(titles[-len(kept_titles) - 1:], "Do it.") + '"Target"'
    assert len(tokenizer(longer)["input_ids"]) + 1 > budget

    # prompts without response (generation) count only the prompt
    text, cut = build_prompt(titles, None, tokenizer, budget, "Do it.")
    assert cut and text.endswith("### Response:\n") and len(tokenizer(text)["input_ids"]) <= budget


def test_tokenize_samples_labels(tokenizer):
    prompts = [format_prompt(["A"]), format_prompt(["A", "Bb"])]
    batch = tokenize_samples(prompts, ['"X"', '"Yy"'], tokenizer, loss_on="all")
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 2
    n0 = len(tokenizer(prompts[0] + '"X"')["input_ids"]) + 1
    assert mask[0].sum() == n0 and ids[0, n0 - 1] == tokenizer.eos_token_id  # eos appended, right padding
    assert (labels[mask == 1] == ids[mask == 1]).all() and (labels[mask == 0] == -100).all()
    resp = tokenize_samples(prompts, ['"X"', '"Yy"'], tokenizer, loss_on="response")["labels"]
    assert (resp[0] != -100).sum() == 3 + 1 and (resp[1] != -100).sum() == 4 + 1
    with pytest.raises(ValueError, match="bigrec_loss_on"):
        tokenize_samples(prompts, ['"X"', '"Yy"'], tokenizer, loss_on="nope")


def test_read_item_titles_exact(ml100k):
    config, dataset, train, _, _ = ml100k
    titles = read_item_titles(config, train.dataset)
    assert len(titles) == train.dataset.item_num and titles[0] == ""
    iid = train.dataset.token2id(train.dataset.iid_field, ["1", "2"])
    assert [titles[i] for i in iid] == ["Toy Story", "GoldenEye"]
    assert all(titles[1:])


def test_training_loader(ml100k):
    config, dataset, train, valid, _ = ml100k
    users, histories, targets = user_samples(train.dataset)
    train_users = np.unique(train.dataset.inter_feat["user_id"].numpy())
    assert np.array_equal(users, train_users) and len(histories) == len(targets) == len(users)
    # the valid row's history (all training items, cut to MAX_ITEM_LIST_LENGTH) ends with the sample's
    # history + target: the sample is the user's last training row
    vfeat = valid.dataset.inter_feat
    vuid = vfeat["user_id"].numpy()
    pos = {u: i for i, u in enumerate(users)}
    for r in range(0, len(vuid), 50):
        u = vuid[r]
        vhist = vfeat["item_id_list"][r][: vfeat["item_length"][r]].tolist()
        mine = histories[pos[u]] + [int(targets[pos[u]])]
        k = min(len(vhist), len(mine))
        assert vhist[-k:] == mine[-k:]
        if len(vhist) < config["MAX_ITEM_LIST_LENGTH"]:  # history not cut: all earlier training items
            assert len(histories[pos[u]]) == len(vhist) - 1

    trainer = BIGRecTrainer.__new__(BIGRecTrainer)  # only the loader helper is needed
    trainer.config, trainer.logger, trainer.grad_accum = config, logging.getLogger(), 1
    trainer.model = BIGRec.__new__(BIGRec)  # training_rows reads only the class's protocol
    one = trainer.training_loader(train)
    assert len(one.dataset) == len(users)
    assert np.array_equal(np.sort(one.dataset.inter_feat["item_id"].numpy()), np.sort(targets))


# --------------------------------------------------------------------------- model + trainer


def test_training_step_lowers_loss_and_lora_checkpoint_roundtrip(ml100k, model, tmp_path):
    config, _, train, _, _ = ml100k
    batch = train.dataset[torch.arange(4)]
    trainer = BIGRecTrainer(config, model)
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    for g in trainer.optimizer.param_groups:
        g["lr"] = 1e-2
    model.eval()  # no dropout: the comparison is exact
    with torch.no_grad():
        before = model.calculate_loss(batch).item()
    for _ in range(5):
        trainer.optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        trainer.optimizer.step()
    with torch.no_grad():
        after = model.calculate_loss(batch).item()
    assert after < before

    trainer.saved_model_file = str(tmp_path / "BIGRec-test.pth")
    trainer._save_checkpoint(0, verbose=False)
    state = BIGRecTrainer.load_checkpoint(trainer.saved_model_file)
    assert state["weights"] and all("lora_" in k for k in state["weights"])
    n_lora = sum(v.numel() for v in state["weights"].values())
    assert n_lora == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # atomic write left nothing behind

    fresh = BIGRec(config, train.dataset)
    fresh_trainer = BIGRecTrainer(config, fresh)
    fresh_trainer.resume_checkpoint(trainer.saved_model_file)
    assert fresh_trainer.start_epoch == 1
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), fresh.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    fresh.eval()
    with torch.no_grad():
        assert fresh.calculate_loss(batch).item() == pytest.approx(after, rel=1e-6)


def test_full_sort_predict_and_grounding(ml100k, model):
    config, _, train, _, test = ml100k
    interaction = test.dataset[torch.arange(3)]
    scores = model.full_sort_predict(interaction)
    assert scores.shape == (3, train.dataset.item_num)
    assert torch.isinf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()

    titles = model.item_titles
    iid = train.dataset.token2id(train.dataset.iid_field, ["1", "50", "100"])
    forced = [titles[i] for i in iid]
    s = model.ground_texts([[t] for t in forced])
    assert s.argmax(1).tolist() == list(iid)
    # items sharing a title get equal scores (all of them ranked)
    first: dict[str, int] = {}
    dup = None
    for i, t in enumerate(titles[1:], 1):
        if t in first:
            dup = (first[t], i)
            break
        first[t] = i
    assert dup is not None  # ml-100k has repeated titles
    if dup is not None:
        a, b = dup
        s = model.ground_texts([[titles[a]], ["Toy Story"]])
        assert torch.equal(s[:, a], s[:, b]) and set(s[0].topk(2).indices.tolist()) == {a, b}
    assert clean_generation(' "Toy Story"\nmore') == "Toy Story"
    with pytest.raises(NotImplementedError, match="full_sort_predict"):
        model.predict(interaction)


def test_beam_search_with_the_prompt_cache_equals_plain_generate():
    """Prompts run once and their cache repeated per beam: the beams, tokens and scores of plain generate."""
    from recbole_dealrec.model.bigrec.llm import add_lora, beam_prompt_cache

    tok = make_byte_tokenizer()
    tok.padding_side = "left"
    llm = add_lora(make_tiny_llama(len(tok), seed=3))
    with torch.no_grad():  # a trained-looking adapter, so the cache must come through the LoRA layers
        for name, param in llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    llm.eval()
    enc = tok(["user one likes", "a longer prompt for the second user, who likes many things", "x"],
              padding=True, return_tensors="pt")
    kw = dict(num_beams=3, num_return_sequences=3, max_new_tokens=6, do_sample=False, pad_token_id=0,
              eos_token_id=2, output_scores=True, return_dict_in_generate=True)
    plain = llm.generate(**enc, **kw)
    cache = beam_prompt_cache(llm, enc["input_ids"], enc["attention_mask"], 3)
    assert len(cache) == 1
    cached = llm.generate(**enc, **cache, **kw)
    assert torch.equal(plain.sequences, cached.sequences)
    torch.testing.assert_close(plain.sequences_scores, cached.sequences_scores, rtol=1e-6, atol=1e-6)
    assert beam_prompt_cache(llm, enc["input_ids"], enc["attention_mask"], 1) == {}


def _eos_prone_llm(seed: int, vocab: int):
    """A tiny LoRA Llama whose end token is likely in some contexts only: prompts finish at different steps, some at
    ``max_new_tokens`` (a random head almost never picks the end token)."""
    from recbole_dealrec.model.bigrec.llm import add_lora

    llm = add_lora(make_tiny_llama(vocab, seed=seed))
    with torch.no_grad():
        for name, param in llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
        head = llm.get_output_embeddings().weight
        head[2] = head[5:40].mean(0) * 12
    return llm.eval()


BEAM_PROMPTS = ["user one likes", "a longer prompt for the second user, who likes many things", "x", "abc def",
                "zzz qq", "the end"]
#: prompts opening with the same template (as BIGRec's), of different lengths: a shared prefix and padding after it
TEMPLATE_PROMPTS = ["### Task: recommend.\n### Input: " + h for h in ("toy story", "heat, casino and more", "x",
                                                                       "a", "star wars, alien", "fargo")]


@pytest.mark.parametrize("seed,num_beams,max_new_tokens,early_stopping,prompts", [
    (4, 4, 20, False, BEAM_PROMPTS), (4, 3, 8, False, BEAM_PROMPTS), (4, 2, 5, False, BEAM_PROMPTS),
    (2, 4, 20, False, BEAM_PROMPTS), (2, 3, 9, True, BEAM_PROMPTS), (4, 4, 12, "never", BEAM_PROMPTS),
    (0, 3, 6, False, BEAM_PROMPTS), (4, 4, 20, False, TEMPLATE_PROMPTS), (2, 3, 9, True, TEMPLATE_PROMPTS),
    (1, 4, 16, False, TEMPLATE_PROMPTS),
])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_beam_search_leaving_prompts_equals_hf_generate(seed, num_beams, max_new_tokens, early_stopping, prompts,
                                                        share_prefix):
    """Each prompt leaves the batch when done, the prompts' shared prefix computed once: HF generate's beams (tokens
    up to each beam's end), scores and order, on prompts that end at different steps and at max_new_tokens."""
    from recbole_dealrec.model.bigrec.beam_search import beam_search, plain_beam_search_config
    from recbole_dealrec.model.bigrec.llm import beam_prompt_cache

    tok = make_byte_tokenizer()
    tok.padding_side = "left"
    llm = _eos_prone_llm(seed, len(tok))
    assert plain_beam_search_config(llm.generation_config)
    enc = tok(prompts, padding=True, return_tensors="pt")
    k, b, prompt_len = num_beams, len(prompts), enc["input_ids"].shape[1]
    ref = llm.generate(**enc, **beam_prompt_cache(llm, enc["input_ids"], enc["attention_mask"], k), num_beams=k,
                       num_return_sequences=k, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                       eos_token_id=2, early_stopping=early_stopping, output_scores=True, return_dict_in_generate=True)
    out = beam_search(llm, enc["input_ids"], enc["attention_mask"], k, max_new_tokens, eos_token_id=2,
                      pad_token_id=0, early_stopping=early_stopping, share_prefix=share_prefix)
    ref_tokens = ref.sequences[:, prompt_len:].reshape(b, k, -1)
    assert out.tokens.shape == ref_tokens.shape
    for r in range(b):
        for j in range(k):
            n = int(out.lengths[r, j])
            assert torch.equal(out.tokens[r, j, :n], ref_tokens[r, j, :n]), (r, j)
            assert (out.tokens[r, j, n:] == 0).all()
            # a beam ends at its end token or at max_new_tokens
            assert n == max_new_tokens or out.tokens[r, j, n - 1] == 2
    torch.testing.assert_close(out.scores, ref.sequences_scores.reshape(b, k), rtol=0, atol=1e-6)
    assert (out.steps <= max_new_tokens).all()
    if prompts is BEAM_PROMPTS and seed == 4 and max_new_tokens == 20 and not early_stopping:  # steps differ
        assert out.steps.min() < max_new_tokens == out.steps.max()


def test_beam_search_on_a_sliding_window_model_equals_hf_generate():
    """A cache that is not plain full attention (Mistral's sliding window, shorter than the prompts): the prompts
    run as given (a moved prefix would change what a window sees) and the beams are reordered as HF does."""
    from transformers import MistralConfig, MistralForCausalLM

    from recbole_dealrec.model.bigrec.beam_search import beam_search
    from recbole_dealrec.model.bigrec.llm import beam_prompt_cache

    tok = make_byte_tokenizer()
    tok.padding_side = "left"
    torch.manual_seed(0)
    llm = MistralForCausalLM(MistralConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=1024, pad_token_id=0, eos_token_id=2, bos_token_id=2,
        sliding_window=6)).eval()
    with torch.no_grad():
        head = llm.get_output_embeddings().weight
        head[2] = head[5:40].mean(0) * 12
    enc = tok(TEMPLATE_PROMPTS, padding=True, return_tensors="pt")
    ref = llm.generate(**enc, **beam_prompt_cache(llm, enc["input_ids"], enc["attention_mask"], 3), num_beams=3,
                       num_return_sequences=3, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=2,
                       output_scores=True, return_dict_in_generate=True)
    out = beam_search(llm, enc["input_ids"], enc["attention_mask"], 3, 10, eos_token_id=2, pad_token_id=0)
    b, prompt_len = len(TEMPLATE_PROMPTS), enc["input_ids"].shape[1]
    ref_tokens = ref.sequences[:, prompt_len:].reshape(b, 3, -1)
    for r in range(b):
        for j in range(3):
            n = int(out.lengths[r, j])
            assert torch.equal(out.tokens[r, j, :n], ref_tokens[r, j, :n]), (r, j)
    torch.testing.assert_close(out.scores, ref.sequences_scores.reshape(b, 3), rtol=0, atol=1e-6)


def test_shared_prefix_layout_moves_the_common_first_tokens_before_the_padding():
    from recbole_dealrec.model.bigrec.beam_search import shared_prefix_layout

    tok = make_byte_tokenizer()
    tok.padding_side = "left"
    enc = tok(TEMPLATE_PROMPTS, padding=True, return_tensors="pt")
    ids, mask, p = shared_prefix_layout(enc["input_ids"], enc["attention_mask"])
    prefix = tok("### Task: recommend.\n### Input: ")["input_ids"]
    assert p == len(prefix) and ids.shape == enc["input_ids"].shape
    assert (ids[:, :p] == torch.tensor(prefix)).all() and mask[:, :p].all()
    for r in range(len(TEMPLATE_PROMPTS)):  # each row's real tokens, in order, with the same position ids
        assert torch.equal(ids[r][mask[r].bool()], enc["input_ids"][r][enc["attention_mask"][r].bool()])
    assert mask[:, -1].all()  # each row ends with a real token (it starts the decoding)
    # nothing shared: unchanged
    plain = tok(BEAM_PROMPTS, padding=True, return_tensors="pt")
    ids, mask, p = shared_prefix_layout(plain["input_ids"], plain["attention_mask"])
    assert p == 0 and torch.equal(ids, plain["input_ids"])
    # identical prompts: all but the last token shared
    same = tok(["same prompt"] * 3, return_tensors="pt")
    assert shared_prefix_layout(same["input_ids"], same["attention_mask"])[2] == same["input_ids"].shape[1] - 1


def test_plain_beam_search_config_refuses_logits_processors():
    from transformers import GenerationConfig

    from recbole_dealrec.model.bigrec.beam_search import beam_search, plain_beam_search_config

    assert plain_beam_search_config(GenerationConfig())
    for setting in ({"repetition_penalty": 1.2}, {"no_repeat_ngram_size": 2}, {"min_new_tokens": 3},
                    {"num_beam_groups": 2, "diversity_penalty": 0.5}, {"bad_words_ids": [[5]]}):
        assert not plain_beam_search_config(GenerationConfig(**setting)), setting
    with pytest.raises(ValueError, match="num_beams >= 2"):
        beam_search(torch.nn.Identity(), torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3), 1, 4, 2, 0)


def test_model_generate_equals_the_hf_path(ml100k, model):
    """BIGRec.generate (prompts leave when done, the default) returns generate_reference's answers and scores; a model
    whose generation config asks for a logits processor keeps HF's path."""
    _, _, _, _, test = ml100k
    llm = model.llm
    with torch.no_grad():  # an end token likely in some contexts, so the rows end at different steps
        head = llm.get_output_embeddings().weight
        head[model.tokenizer.eos_token_id] = head[5:40].mean(0) * 12
    model.max_new_tokens = 12
    histories = model.histories(test.dataset[torch.arange(6)])
    texts, scores = model.generate(histories)
    ref_texts, ref_scores = model.generate_reference(histories)
    assert texts == ref_texts and len(texts) == 6 and all(len(t) == model.num_beams for t in texts)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-6)
    llm.generation_config.repetition_penalty = 1.3
    try:
        (texts, scores), (ref_texts, ref_scores) = model.generate(histories), model.generate_reference(histories)
        assert texts == ref_texts and torch.equal(scores, ref_scores)
    finally:
        llm.generation_config.repetition_penalty = 1.0


def test_grounding_with_several_beams_pure():
    """ground_beams: the weighted distance sum by hand; an exact title wins over any distance; shared titles tie."""
    from recbole_dealrec.model.bigrec.grounding import beam_weights, ground, ground_beams

    gen = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    items = torch.randn(7, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    items[4] = items[3]  # two items sharing a title (same embedding)
    valid = torch.tensor([[True, True, True], [True, False, True]])
    w = beam_weights(torch.tensor([[-0.1, -0.5, -2.0], [-1.0, 0.0, -1.0]]), valid)
    assert torch.allclose(w.sum(1), torch.ones(2, dtype=w.dtype)) and w[1, 1] == 0 and w[1, 0] == w[1, 2]
    scores = ground_beams(gen, w, items)
    by_hand = torch.stack([-(w[r, :, None] * torch.cdist(gen[r], items)).sum(0) for r in range(2)])
    assert torch.allclose(scores, by_hand)
    # one beam of weight one ranks as the paper's ground()
    one = ground_beams(gen[:, :1], torch.ones(2, 1), items)
    assert torch.equal(one.argsort(1, descending=True), ground(gen[:, 0], items).argsort(1, descending=True))
    # beam 2 (the lightest) spelled the title of items 3 and 4: they rank first, tied, above item 6 spelled by nobody
    exact = [[[], [], [3, 4]], [[], [], []]]
    scores = ground_beams(gen, w, items, exact)
    assert set(scores[0].topk(2).indices.tolist()) == {3, 4} and scores[0, 3] == scores[0, 4] > 1
    assert torch.equal(scores[1], by_hand[1])
    # two exact beams: the heavier beam's title first
    scores = ground_beams(gen, w, items, [[[1], [], [3, 4]], [[], [], []]])
    assert scores[0].argmax() == 1 and scores[0, 1] > scores[0, 3] == scores[0, 4]
    # no valid beam: all-zero weights, all items tie
    none = ground_beams(gen, beam_weights(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool)), items)
    assert (none == 0).all()
    # popularity (BIGRec's statistical information): normalised distance / (1 + normalised popularity)^gamma
    popularity = torch.tensor([0.0, 5, 1, 9, 9, 3, 2], dtype=torch.float64)
    assert torch.equal(ground_beams(gen, w, items, popularity=popularity, gamma=0.0), by_hand)
    scored = ground_beams(gen, w, items, popularity=popularity, gamma=2.0)
    distance = -by_hand
    norm = (distance - distance.min(1, keepdim=True).values) / (distance.max(1, keepdim=True).values - distance.min(1, keepdim=True).values)
    torch.testing.assert_close(scored, -norm / (1 + popularity / 9) ** 2)
    assert scored[0, 3] == scored[0, 4]  # a shared title still ties
    exact_pop = ground_beams(gen, w, items, exact, popularity=popularity, gamma=50.0)
    assert set(exact_pop[0].topk(2).indices.tolist()) == {3, 4}  # an exact title still wins


def test_model_grounds_every_beam(ml100k, model):
    """BIGRec.ground_texts: an exact title in a lower beam beats a near-miss top beam; with ``top`` only the
    top beam counts (the paper); answers are counted for the exact-title share."""
    titles = model.item_titles
    target = 50
    near_miss = titles[target][:-3]  # not a title: a few characters missing
    beams = [[near_miss, "zzz", titles[target]]]
    scores = torch.tensor([[-0.1, -0.2, -3.0]])
    s = model.ground_texts(beams, scores)
    same = [i for i, t in enumerate(titles) if t == titles[target]]
    assert set(s[0].topk(len(same)).indices.tolist()) == set(same)
    model.grounding_beams = "top"
    top = model.ground_texts(beams, scores)
    assert torch.equal(top, model.ground_texts([[near_miss]]))
    model.grounding_beams = "all"
    model._count_answers(beams + [[titles[3]]], torch.zeros(2, 3), [1, 2])
    stats = model.answer_stats()
    assert stats["answers"] == 2 and stats["exact_title_top_beam"] == 0.5 and stats["exact_title_any_beam"] == 1.0


def test_mean_pooling_embeddings(tiny_llm_path, tokenizer):
    """pooling=mean: the mean of the final hidden states over real tokens, whatever the padding."""
    from transformers import AutoModelForCausalLM

    from recbole_dealrec.model.bigrec.grounding import last_token_embeddings

    llm = AutoModelForCausalLM.from_pretrained(tiny_llm_path, local_files_only=True)
    texts = ["Toy Story (1995)", "Heat (1995) and more words"]
    batched = last_token_embeddings(llm, tokenizer, texts, batch_size=2, pooling="mean")
    for i, t in enumerate(texts):
        ids = tokenizer(t, return_tensors="pt")
        hidden = llm(**ids, output_hidden_states=True).hidden_states[-1][0]
        assert torch.allclose(batched[i], hidden.mean(0), atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        last_token_embeddings(llm, tokenizer, texts, pooling="max")


def test_dataset_instruction_reaches_prompt(ml100k, model):
    config = ml100k[0]
    assert "movies" in config["bigrec_instruction"] and model.instruction == config["bigrec_instruction"]
    assert config["bigrec_instruction"] in model.prompts([["Toy Story (1995)"]])[0]
    games = DealrecConfig("BIGRec", "games", config_dict={"data_path": "/nonexistent"})
    assert "game" in games["bigrec_instruction"]


def test_lr_schedule():
    from recbole_dealrec.trainer import lr_factor

    assert [lr_factor(s, 2, 6, "linear") for s in range(7)] == [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert [lr_factor(s, 2, 6, "constant") for s in range(4)] == [1 / 3, 2 / 3, 1.0, 1.0]
    assert lr_factor(0, 0, 5, "constant") == 1.0


def test_validation_on_selected_users_only(ml100k, model):
    """valid_on_selected_users: the validation loss is the mean over the trained users' first valid rows only."""
    config, _, train, valid, _ = ml100k
    trainer = BIGRecTrainer(config, model)
    users = np.unique(train.dataset.inter_feat["user_id"].numpy())[:5]
    every = trainer.validation_loss(valid)
    trainer.valid_users = users
    selected = trainer.validation_loss(valid)
    vd = valid.dataset
    uid = vd.inter_feat["user_id"].numpy()
    from recbole_dealrec.trainer import first_rows

    rows = [r for r in first_rows(vd) if uid[r] in set(users.tolist())]
    model.eval()
    with torch.no_grad():
        by_hand = np.mean([model.calculate_loss(vd[torch.tensor([r])]).item() for r in rows])
    assert len(rows) == 5 and selected == pytest.approx(by_hand, rel=1e-5) and selected != every


def test_item_embedding_disk_cache(ml100k, tiny_llm_path, tmp_path):
    _, _, train, _, _ = ml100k
    cfg = {**tiny_bigrec_config(tiny_llm_path, tmp_path), "bigrec_item_emb_cache": str(tmp_path / "emb")}
    config = DealrecConfig("BIGRec", "ml-100k", config_dict=cfg)
    first = BIGRec(config, train.dataset).item_embeddings()
    files = sorted(os.listdir(tmp_path / "emb"))
    assert len(files) == 2 and files[1] == files[0] + ".sha256"  # the embeddings and their checksum record
    assert first.shape[0] == train.dataset.item_num and not first[0].any()
    again = BIGRec(config, train.dataset)
    again.llm = None  # the cached file must be read, not recomputed
    assert torch.equal(again.item_embeddings(), first)


def test_missing_title_field_and_llm_path_errors(ml100k, tiny_llm_path, tmp_path):
    config, _, train, _, _ = ml100k
    for value in (None, "no_such_column"):
        bad = DealrecConfig(
            "BIGRec", "ml-100k", config_dict={**tiny_bigrec_config(tiny_llm_path, tmp_path), "title_field": value}
        )
        with pytest.raises(ValueError, match="title_field"):
            BIGRec(bad, train.dataset)
    bad = DealrecConfig(
        "BIGRec", "ml-100k", config_dict={**tiny_bigrec_config(str(tmp_path / "missing"), tmp_path)}
    )
    with pytest.raises(ConfigError, match="llm_path"):
        BIGRec(bad, train.dataset)


def test_fit_early_stops_on_valid_loss_and_resumes(ml100k, tiny_llm_path, tmp_path):
    base = tiny_bigrec_config(tiny_llm_path, tmp_path)
    config = DealrecConfig("BIGRec", "ml-100k", config_dict={**base, "epochs": 2, "gradient_accumulation_steps": 2,
                                                         "valid_on_selected_users": False})
    _, dataset, train, valid, test = ml100k
    from recbole_dealrec.data import prune_train_data

    train = prune_train_data(config, train, np.unique(train.dataset.inter_feat["user_id"].numpy())[:6])
    small_valid = valid.dataset.copy(valid.dataset.inter_feat[torch.arange(16)])
    torch.manual_seed(0)
    trainer = BIGRecTrainer(config, BIGRec(config, train.dataset))
    best, result = trainer.fit(train, small_valid, saved=True)
    assert np.isfinite(best) and result == {"valid_loss": pytest.approx(best, abs=1e-6)}
    assert os.path.isfile(trainer.saved_model_file) and os.path.isfile(trainer.last_model_file)
    assert BIGRecTrainer.load_checkpoint(trainer.last_model_file)["epoch"] == 1

    resumed = BIGRecTrainer(config, BIGRec(config, train.dataset))
    resumed.resume_checkpoint()  # newest -last.pth in checkpoint_dir
    assert resumed.start_epoch == 2 and resumed.best_valid_score == pytest.approx(best)
    assert resumed.fit(train, small_valid)[0] == pytest.approx(best)  # nothing left to train

    config["valid_user_subset"] = 7
    rows = []
    monkey = trainer.model.loss_and_count
    trainer.model.loss_and_count = lambda inter: rows.append(len(inter)) or monkey(inter)
    assert np.isfinite(trainer.validation_loss(valid)) and sum(rows) == 7
    config["eval_user_subset"] = 5
    sub_a = resumed.eval_subset(test)
    sub_b = BIGRecTrainer(config, resumed.model).eval_subset(test)
    assert len(sub_a.dataset) == 5
    assert torch.equal(sub_a.dataset.inter_feat["user_id"], sub_b.dataset.inter_feat["user_id"])

    # generation batched by prompt length: the subset's rows (the seeded draw) come sorted by prompt tokens, and
    # the metrics equal those of the dataset's own order
    config["eval_user_subset"] = 12
    ordered = BIGRecTrainer(config, resumed.model)
    sub = ordered.eval_subset(test)
    model = resumed.model
    lengths = [len(ids) for ids in model.tokenizer(model.prompts(model.histories(sub.dataset.inter_feat)))["input_ids"]]
    assert lengths == sorted(lengths) and len(set(lengths)) > 1
    plain = BIGRecTrainer(config, resumed.model)
    plain.model.eval_order = lambda dataset, rows: None  # the dataset's own order, same seeded rows
    plain_sub = plain.eval_subset(test)
    assert sorted(plain_sub.dataset.inter_feat["user_id"].tolist()) == sorted(sub.dataset.inter_feat["user_id"].tolist())
    assert plain_sub.dataset.inter_feat["user_id"].tolist() != sub.dataset.inter_feat["user_id"].tolist()
    by_length = ordered.evaluate(test, load_best_model=False)
    as_given = plain.evaluate(test, load_best_model=False)
    del plain.model.eval_order
    assert by_length == pytest.approx(as_given, abs=1e-9)


# --------------------------------------------------------------------------- end to end


def test_run_recbole_end_to_end(tiny_llm_path, tmp_path):
    from recbole_dealrec.quick_start import run_recbole

    result = run_recbole(
        model="BIGRec",
        config_dict={
            **tiny_bigrec_config(tiny_llm_path, tmp_path),
            "sampler": "random",
            "selection_num": 8,
            "eval_user_subset": 16,
        },
    )
    test_result = result["test_result"]
    assert "recall@10" in test_result and "ndcg@10" in test_result
    assert 0.0 <= test_result["recall@10"] <= 1.0
    assert np.isfinite(result["best_valid_score"])


def test_presplit_games_exact_titles_and_multi_target_subset(tiny_llm_path, tmp_path):
    """The paper's pre-split format (games): exact titles (quotes, spaces, duplicates), multi-target test rows."""
    from test_importer import TITLES, write_paper_folder

    from recbole_dealrec.data.importer import import_paper_dataset

    write_paper_folder(tmp_path / "paper")
    import_paper_dataset(str(tmp_path / "paper"), str(tmp_path / "data" / "games"))
    config = DealrecConfig(
        "BIGRec",
        "games",
        config_dict={**tiny_bigrec_config(tiny_llm_path, tmp_path), "data_path": str(tmp_path / "data"),
                     "eval_user_subset": 2, "topk": [2]},
    )
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    model = BIGRec(config, train.dataset)
    tokens = dataset.id2token("item_id", np.arange(1, dataset.item_num))
    assert {int(t): model.item_titles[i] for i, t in enumerate(tokens, 1)} == TITLES
    anno = [dataset.token2id("item_id", "2"), dataset.token2id("item_id", "3")]
    scores = model.ground_texts(["Anno 2070"])
    assert set(scores[0].topk(2).indices.tolist()) == set(anno) and scores[0, anno[0]] == scores[0, anno[1]]

    trainer = BIGRecTrainer(config, model)
    best, _ = trainer.fit(train, valid, saved=True)
    assert np.isfinite(best)
    sub = trainer.eval_subset(test)
    assert len(sub.dataset) == 2 and sub.dataset.multi_targets.shape[0] == 2
    result = trainer.evaluate(test, load_best_model=True)
    assert set(result) == {"recall@2", "ndcg@2"}


def test_gpu_check_script_syntax_and_cpu_dry_run(tiny_llm_path, tmp_path):
    """run_scripts/gpu_check.sh: bash -n, and its --cpu-dry-run (the tiny LLM in place of SmolLM2) runs through."""
    import json
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run_scripts", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    env = {**os.environ, "OUT": str(tmp_path / "out"), "LLM_PATH": tiny_llm_path}
    result = subprocess.run(["bash", script, "--cpu-dry-run"], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("GPU_CHECK "))
    summary = json.loads(line[len("GPU_CHECK "):])
    assert set(summary["test_result"]) == {"recall@10", "recall@20", "ndcg@10", "ndcg@20"}
    assert summary["answers"]["answers"] == 4 and {"influence signal", "effort signal", "training"} <= set(summary["stage_seconds"])
    assert subprocess.run(["bash", script, "--bogus"], capture_output=True).returncode == 2
