"""TIGER: semantic IDs, constrained beam search, full-sort scores, exact batched effort, the backend contract
shared with BIGRec, run_recbole end to end, bad input."""
import numpy as np
import pytest
import torch

from conftest import TINY_SURROGATE, TINY_TIGER, tiny_bigrec_config
from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data import create_dataset, data_preparation
from recbole_dealrec.model.backend import GenerativeBackend
from recbole_dealrec.model.tiger.model import TIGER, UNREACHED
from recbole_dealrec.model.tiger.semantic_ids import RQVAE, add_collision_level, train_semantic_ids
from recbole_dealrec.quick_start import run_recbole
from recbole_dealrec.errors import ConfigError


@pytest.fixture(scope="module")
def tiger_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiger")
    config = DealrecConfig("TIGER", "ml-100k", config_dict={**TINY_TIGER, "output_dir": str(tmp / "out")})
    train, valid, test = data_preparation(config, create_dataset(config))
    torch.manual_seed(0)
    return config, train, TIGER(config, train.dataset).eval()


def test_a_model_built_with_its_semantic_ids_starts_where_one_reusing_them_does(tiger_setup, tmp_path):
    """Building the semantic IDs (the RQ-VAE draws from torch's RNG) leaves the caller's RNG as it found it: the T5
    of a run that builds the IDs starts from the same weights as the next run's, which reuses them."""
    _, train, _ = tiger_setup
    config = DealrecConfig("TIGER", "ml-100k", config_dict={**TINY_TIGER, "output_dir": str(tmp_path / "out")})
    built, reused = [], []
    for models in (built, reused):
        torch.manual_seed(7)
        model = TIGER(config, train.dataset)
        models.append((model.semantic_ids.facts["cached"], [p.detach().clone() for p in model.parameters()],
                       torch.rand(3)))  # and the draw after the model
    assert (built[0][0], reused[0][0]) == (False, True)
    assert all(torch.equal(a, b) for a, b in zip(built[0][1], reused[0][1])) and torch.equal(built[0][2], reused[0][2])


def test_rqvae_reconstruction_falls_and_ids_are_unique():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(12, 24, generator=generator)
    x = centres[torch.randint(12, (300,), generator=generator)] + 0.3 * torch.randn(300, 24, generator=generator)
    torch.manual_seed(0)
    model = RQVAE(24, [32], 8, levels=2, codebook_size=8, beta=0.25)
    model.kmeans_init(x, seed=0)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = float(model(x)[1])
    for _ in range(300):
        loss, _, _ = model(x)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    _, recon, codes = model(x)
    assert float(recon) < 0.5 * first
    ids = add_collision_level(codes.numpy(), 64)
    assert len(np.unique(ids, axis=0)) == len(ids)


def test_collision_level_counts_items_per_prefix_and_refuses_what_it_cannot_separate():
    codes = np.array([[1, 2], [1, 2], [0, 0], [1, 2], [0, 1]])
    np.testing.assert_array_equal(add_collision_level(codes, 4)[:, 2], [0, 1, 0, 2, 0])
    with pytest.raises(ConfigError, match="3 items share one semantic-ID prefix, more than tiger_codebook_size=2"):
        add_collision_level(codes, 2)


def test_semantic_ids_of_real_titles_are_unique_and_logged(tiger_setup):
    _, _, model = tiger_setup
    codes = model.semantic_ids.codes
    assert codes.shape == (model.n_items, 3) and (codes[0] == -1).all()
    assert len(np.unique(codes[1:], axis=0)) == model.n_items - 1
    facts = model.semantic_ids.facts
    assert facts["reconstruction_loss"] < facts["reconstruction_loss_first_epoch"]
    assert len(facts["codebook_usage"]) == 2 and 0 <= facts["collision_rate"] < 1


def test_identical_texts_collapse_the_codebook_with_a_clear_error(tiger_setup):
    config, _, _ = tiger_setup
    with pytest.raises(ConfigError, match="RQ-VAE collapsed"):
        train_semantic_ids(config, [""] + ["same text"] * 200)


def test_constrained_beam_search_only_returns_valid_ids(tiger_setup):
    _, train, model = tiger_setup
    interaction = train.dataset.inter_feat[torch.arange(0, 4000, 250)]
    items, scores = model.generate(interaction)
    assert items.shape == (16, model.num_beams) and (items > 0).all()
    for row in items:
        assert len(set(row.tolist())) == model.num_beams  # distinct items
    assert (scores[:, :-1] >= scores[:, 1:] - 1e-6).all()  # beams come best first
    # The constraint is what keeps them valid: the same untrained model, unconstrained, leaves the ID space.
    ids, mask = model.encoder_inputs(interaction)
    free = model.t5.generate(input_ids=ids, attention_mask=mask, num_beams=4, num_return_sequences=4,
                             max_new_tokens=model.id_length, min_new_tokens=model.id_length, do_sample=False)
    codes = [tuple(c) for c in free[:, 1:1 + model.id_length].tolist()]
    assert any(c not in model.item_of for c in codes)


def test_semantic_id_trie_tensors_match_the_prefix_dict(tiger_setup):
    _, _, model = tiger_setup
    trie = model.id_trie
    assert trie.n_ids == model.n_items - 1
    nodes = {(): 0}  # prefix -> node id at its depth, walking the tensor trie
    for depth in range(trie.length):
        child = trie.child[depth]
        for prefix, node in [(p, n) for p, n in nodes.items() if len(p) == depth]:
            allowed = (child[node] >= 0).nonzero().view(-1) + trie.first_token[depth]
            assert allowed.tolist() == model.trie[prefix]
            for token in allowed.tolist():
                target = int(child[node, token - trie.first_token[depth]])
                if depth == trie.length - 1:
                    assert model.item_of[prefix + (token,)] == target
                else:
                    nodes[prefix + (token,)] = target


@pytest.fixture(scope="module")
def trained_tiger(tmp_path_factory):
    """TINY_TIGER trained for 40 steps (its beams far from uniform), 40 beams (more than any prefix's children, so
    beams exhaust branches and move to others), and the collision level's codes 0 and 1 given one embedding (tied
    output rows): two items that differ only there score exactly alike (exact ties)."""
    tmp = tmp_path_factory.mktemp("tiger_trained")
    config = DealrecConfig("TIGER", "ml-100k", config_dict={**TINY_TIGER, "output_dir": str(tmp / "out"),
                                                             "tiger_num_beams": 40})
    train, _, _ = data_preparation(config, create_dataset(config))
    torch.manual_seed(0)
    model = TIGER(config, train.dataset)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        rows = torch.randint(len(train.dataset.inter_feat), (256,), generator=generator)
        loss = model.calculate_loss(train.dataset.inter_feat[rows])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    last = model.id_trie.first_token[-1]
    with torch.no_grad():
        model.t5.shared.weight[last + 1] = model.t5.shared.weight[last]
    return train, model


def test_tensor_beam_search_equals_the_hf_path(trained_tiger):
    train, model = trained_tiger
    interaction = train.dataset.inter_feat[torch.arange(0, 6000, 60)]
    fast_items, fast_scores = model.generate(interaction)
    slow_items, slow_scores = model.generate_reference(interaction)
    assert fast_items.shape == slow_items.shape == (100, 40)
    # the same scores, rank by rank (float rounding: the cross-attention is batched differently)
    torch.testing.assert_close(fast_scores, slow_scores, rtol=0, atol=1e-5)
    # the same items with the same scores; the order within a tie is neither path's to define, and an item tied
    # with the last kept score may be kept by one path and its twin by the other
    differing = 0
    for user in range(100):
        fast = dict(zip(fast_items[user].tolist(), fast_scores[user].tolist()))
        slow = dict(zip(slow_items[user].tolist(), slow_scores[user].tolist()))
        for item in fast.keys() & slow.keys():
            assert abs(fast[item] - slow[item]) < 1e-5
        for item in fast.keys() ^ slow.keys():
            assert abs(fast.get(item, slow.get(item)) - float(slow_scores[user, -1])) < 1e-5
            differing += 1
    assert differing < 0.02 * fast_items.numel()
    # the cases this is about happened: exact ties, and beams that took every item of a last-level prefix
    assert (slow_scores[:, :-1] == slow_scores[:, 1:]).any()
    prefix_items = {}
    for codes, item in model.item_of.items():
        prefix_items.setdefault(codes[:-1], set()).add(item)
    exhausted = sum(any(items <= set(row.tolist()) for items in prefix_items.values() if len(items) > 1)
                    for row in slow_items)
    assert exhausted > 0


def test_more_beams_than_items_is_a_clear_error(tmp_path):
    config = DealrecConfig("TIGER", "ml-100k", config_dict={**TINY_TIGER, "output_dir": str(tmp_path),
                                                             "tiger_num_beams": 5000})
    train, _, _ = data_preparation(config, create_dataset(config))
    with pytest.raises(ConfigError, match="tiger_num_beams must be at most the number of items"):
        TIGER(config, train.dataset)


def test_full_sort_predict_orders_beams_first_unreached_after_padding_last(tiger_setup):
    _, train, model = tiger_setup
    interaction = train.dataset.inter_feat[torch.arange(0, 800, 100)]
    scores = model.full_sort_predict(interaction)
    items, beam_scores = model.generate(interaction)
    assert scores.shape == (8, model.n_items) and torch.isinf(scores[:, 0]).all() and (scores[:, 0] < 0).all()
    for row in range(8):
        top = torch.topk(scores[row], model.num_beams).indices
        assert set(top.tolist()) == set(items[row].tolist())
        reached = torch.zeros(model.n_items, dtype=torch.bool)
        reached[items[row]] = True
        reached[0] = True
        assert (scores[row][~reached] == UNREACHED).all() and scores[row][items[row]].min() > UNREACHED
        torch.testing.assert_close(scores[row][items[row]], beam_scores[row])


def test_batched_tiger_effort_equals_a_per_sample_loop(tiger_setup):
    _, train, model = tiger_setup
    rows = model.effort_rows(train.dataset)[:12]
    batch = train.dataset.inter_feat[torch.from_numpy(rows)]
    for patterns in (None, [r"decoder\.block\.0\.layer\.2"]):
        fast = model.effort_norms([batch[torch.arange(0, 7)], batch[torch.arange(7, 12)]], patterns)
        loop = []
        for i in range(12):
            model.t5.zero_grad()
            model.calculate_loss(batch[torch.tensor([i])]).backward()
            names = [n for n, _ in model.t5.named_parameters()
                     if patterns is None or any(__import__("re").search(p, n) for p in patterns)]
            grads = dict(model.t5.named_parameters())
            loop.append(torch.sqrt(sum((grads[n].grad.double() ** 2).sum() for n in names if grads[n].grad is not None)))
        torch.testing.assert_close(fast.double(), torch.stack(loop), rtol=1e-6, atol=1e-6)
    model.t5.zero_grad()


@pytest.fixture(scope="module")
def bigrec_setup(tiny_llm_path, tmp_path_factory):
    from recbole_dealrec.model.bigrec import BIGRec

    tmp = tmp_path_factory.mktemp("bigrec_contract")
    config = DealrecConfig("BIGRec", "ml-100k", config_dict={**tiny_bigrec_config(tiny_llm_path, tmp), "llm_max_length": 160})
    train, _, _ = data_preparation(config, create_dataset(config))
    return config, train, BIGRec(config, train.dataset).eval()


@pytest.mark.parametrize("setup", ["tiger_setup", "bigrec_setup"])
def test_backend_contract(setup, request):
    config, train, model = request.getfixturevalue(setup)
    dataset = train.dataset
    assert isinstance(model, GenerativeBackend)
    rows = model.training_rows(dataset)
    assert rows is None or (len(rows) == len(np.unique(dataset.inter_feat[dataset.uid_field].numpy())))
    sample = dataset.inter_feat[torch.from_numpy(model.effort_rows(dataset)[:3])]
    loss = model.calculate_loss(sample)
    assert loss.ndim == 0 and torch.isfinite(loss)
    norms = model.effort_norms([sample], None)
    assert norms.shape == (3,) and torch.isfinite(norms).all() and (norms >= 0).all()
    state = model.trainable_state_dict()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert state and all(v.device.type == "cpu" for v in state.values())
    saved = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    model.load_trainable_state_dict(saved)
    for key, value in model.trainable_state_dict().items():
        torch.testing.assert_close(value, saved[key])
    assert len(trained) > 0
    scores = model.full_sort_predict(sample[torch.arange(2)])
    assert scores.shape == (2, model.n_items) and torch.isinf(scores[:, 0]).all()


def test_tiger_dealrec_end_to_end_exports_its_semantic_ids(tmp_path):
    config = {**TINY_TIGER, "sampler": "dealrec", "selection_num": 24, "dealrec_num_groups": 5,
              "surrogate_config": TINY_SURROGATE, "cg_max_iter": 3, "influence_power_iters": 3, "effort_batch_size": 64,
              "influence_params": [r"trm_encoder\.layer\.0\.multi_head_attention\.dense\.weight$"],
              "output_dir": str(tmp_path / "out"), "checkpoint_dir": str(tmp_path / "ckpt")}
    result = run_recbole("TIGER", config_dict=config)
    assert {"recall@10", "ndcg@20"} <= set(result["test_result"]) and result["selection"]["selected_users"] == 24
    assert result["selection"]["signals"]["effort"]["backend"] == "TIGER"
    rows = open(result["selection"]["folder"] + "/semantic_ids.tsv").read().splitlines()
    assert rows[0] == "item_id\tcodes" and len(rows) == 1683 and len(rows[1].split("\t")[1].split()) == 3
    assert len({r.split("\t")[1] for r in rows[1:]}) == 1682  # unique IDs
    assert list((tmp_path / "ckpt").rglob("TIGER-*.pth"))


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"tiger_num_beams": 5}, r"tiger_num_beams must be an integer >= max\(topk\) = 20"),
        ({"tiger_codebook_size": 4, "tiger_levels": 3}, r"give 256 semantic IDs for 1682 items"),
        ({"text_encoder_path": "/no/such/encoder"}, r"text_encoder_path='/no/such/encoder' is not a local encoder"),
        ({"tiger_rqvae_hidden": [0]}, r"tiger_rqvae_hidden must be a list of positive layer widths"),
        ({"title_field": None}, r"TIGER needs item texts"),
        ({"tiger_num_beam": 30}, r"unknown key 'tiger_num_beam'.*did you mean 'tiger_num_beams'"),
    ],
)
def test_bad_tiger_input_fails_before_training(tmp_path, extra, message):
    config = {**TINY_TIGER, "sampler": "random", "selection_num": 10, "output_dir": str(tmp_path / "out"),
              "checkpoint_dir": str(tmp_path / "ckpt"), **extra}
    with pytest.raises(ConfigError, match=message):
        run_recbole("TIGER", config_dict=config)
    assert not (tmp_path / "ckpt").exists()


def test_an_item_without_a_title_is_a_clear_error(tmp_path):
    import shutil

    import recbole

    source = __import__("os").path.join(__import__("os").path.dirname(recbole.__file__), "dataset_example", "ml-100k")
    target = tmp_path / "data" / "ml100k_notitle"
    target.mkdir(parents=True)
    shutil.copy(f"{source}/ml-100k.inter", target / "ml100k_notitle.inter")
    lines = open(f"{source}/ml-100k.item", encoding="utf-8").read().splitlines()
    header = lines[0].split("\t")
    title = [h.split(":")[0] for h in header].index("movie_title")
    broken = lines[1].split("\t")
    broken[title] = ""
    (target / "ml100k_notitle.item").write_text("\n".join([lines[0], "\t".join(broken), *lines[2:]]) + "\n")
    config = {**TINY_TIGER, "sampler": "random", "selection_num": 10, "title_field": "movie_title",
              "data_path": str(tmp_path / "data"), "output_dir": str(tmp_path / "out"),
              "load_col": {"inter": ["user_id", "item_id", "timestamp"]}}
    with pytest.raises(ValueError, match=r"1 of 1682 items have no 'movie_title'"):
        run_recbole("TIGER", "ml100k_notitle", config_dict=config)


def test_beam_search_in_chunks_of_users_equals_one_call(trained_tiger):
    """tiger_decode_rows bounds users x beams per beam-search call: chunks of users give one call's items and scores
    (each user's search is its own), here 3 users a chunk against all 100 at once."""
    train, model = trained_tiger
    interaction = train.dataset.inter_feat[torch.arange(0, 6000, 60)]
    whole_items, whole_scores = model.generate(interaction)
    rows = model.decode_rows
    try:
        model.decode_rows = 3 * model.num_beams + 1
        chunk_items, chunk_scores = model.generate(interaction)
    finally:
        model.decode_rows = rows
    assert rows >= 100 * model.num_beams  # the default searched all 100 users in one call
    # float rounding only (the decoder's matmuls see other batch shapes); near-ties may swap places
    torch.testing.assert_close(chunk_scores, whole_scores, rtol=0, atol=1e-5)
    assert (chunk_items == whole_items).float().mean() > 0.98


@pytest.mark.parametrize("value", [0, -5, 2.5, True, "many"])
def test_bad_decode_rows_is_a_clear_error(value):
    from recbole_dealrec.errors import ConfigError
    from recbole_dealrec.model.tiger.model import check_tiger_config

    # a wrong type is refused by the config itself (the property file's type), a wrong value by the model's check
    with pytest.raises(ConfigError, match="tiger_decode_rows must be an (integer >= 1|int )"):
        check_tiger_config(DealrecConfig("TIGER", "ml-100k", config_dict={**TINY_TIGER, "tiger_decode_rows": value}))
