"""Training batches grouped by length (``length_grouped_batches``): every row once, each window the rows a plain
shuffle gives it, seeded, less padding; and an epoch's summed loss equal to the ungrouped batches' (TIGER, BIGRec)."""
import numpy as np
import pytest
import torch

from conftest import TINY_SURROGATE, TINY_TIGER, tiny_bigrec_config
from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data import create_dataset, data_preparation
from recbole_dealrec.errors import ConfigError
from recbole_dealrec.model.tiger.model import TIGER
from recbole_dealrec.data.batching import LengthGroupedLoader, length_grouped_batches
from recbole_dealrec.trainer import GenerativeTrainer


@pytest.mark.parametrize("n, batch, group", [(1000, 32, 5), (257, 16, 4), (10, 4, 50), (64, 8, 1)])
def test_grouped_batches_cover_every_row_once_window_by_window(n, batch, group):
    lengths = np.random.default_rng(1).integers(1, 40, size=n)
    batches = length_grouped_batches(lengths, batch, group, np.random.default_rng(7))
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(n)) and all(len(b) <= batch for b in batches)
    # window w holds exactly the rows the same seeded shuffle puts there
    plain = np.random.default_rng(7).permutation(n)
    window = batch * group
    for start in range(0, n, window):
        assert sorted(rows[start:start + window].tolist()) == sorted(plain[start:start + window].tolist())
    # seeded: the same generator state gives the same batches; another seed others
    again = length_grouped_batches(lengths, batch, group, np.random.default_rng(7))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    if group > 1 and n > window:
        padded = sum(len(b) * lengths[b].max() for b in batches)
        plain_padded = sum(len(b) * lengths[b].max() for b in np.array_split(plain, -(-n // batch)))
        assert padded < plain_padded


def trainer_and_loaders(model_name, settings, model_class):
    config = DealrecConfig(model_name, "ml-100k", config_dict=settings)
    train, _, _ = data_preparation(config, create_dataset(config))
    torch.manual_seed(0)
    model = model_class(config, train.dataset).eval()
    grouped = GenerativeTrainer(config, model).training_loader(train)
    plain = GenerativeTrainer(DealrecConfig(model_name, "ml-100k", config_dict={**settings,
                                                                                "length_grouped_batches": 0}),
                              model).training_loader(train)
    return model, grouped, plain


def summed_loss(model, loader) -> tuple[float, int, int]:
    """``(sum over the epoch's batches of loss x loss terms, rows, padded tokens)``."""
    total, rows = 0.0, 0
    with torch.no_grad():
        for interaction in loader:
            loss, terms = model.loss_and_count(interaction)
            total += float(loss) * terms
            rows += len(interaction)
    return total, rows


def test_tiger_epoch_loss_is_the_ungrouped_one(tmp_path):
    settings = {**TINY_TIGER, "output_dir": str(tmp_path), "train_batch_size": 64}
    model, grouped, plain = trainer_and_loaders("TIGER", settings, TIGER)
    assert isinstance(grouped, LengthGroupedLoader) and not isinstance(plain, LengthGroupedLoader)
    grouped_total, grouped_rows = summed_loss(model, grouped)
    plain_total, plain_rows = summed_loss(model, plain)
    assert grouped_rows == plain_rows == len(plain.dataset)
    assert grouped_total == pytest.approx(plain_total, rel=1e-6)
    # seeded by (seed, epoch): the same batches again for an epoch, others for the next
    grouped.set_epoch(3)
    first = [b["item_id"].tolist() for b in grouped]
    second = [b["item_id"].tolist() for b in grouped]
    grouped.set_epoch(4)
    assert first == second != [b["item_id"].tolist() for b in grouped]


def test_grouped_tiger_batches_pad_to_little_more_than_the_rows_own_tokens(tmp_path):
    settings = {**TINY_TIGER, "output_dir": str(tmp_path), "train_batch_size": 64, "tiger_max_history": 50}
    model, grouped, plain = trainer_and_loaders("TIGER", settings, TIGER)
    own = int(model.sample_lengths(plain.dataset, np.arange(len(plain.dataset))).sum())

    def encoder_tokens(loader):
        return sum(model.encoder_inputs(b)[0].numel() for b in loader)
    grouped_tokens, plain_tokens = encoder_tokens(grouped), encoder_tokens(plain)
    assert grouped_tokens < 1.02 * own < plain_tokens


def test_trimmed_tiger_inputs_give_the_padded_losses(tmp_path):
    """The batch pads to its longest row, not to tiger_max_history: the per-row losses are unchanged."""
    model, _, plain = trainer_and_loaders("TIGER", {**TINY_TIGER, "output_dir": str(tmp_path)}, TIGER)
    interaction = next(iter(plain))
    ids, mask = model.encoder_inputs(interaction)
    assert ids.shape[1] == min(int(interaction["item_length"].max()), model.max_history) * model.id_length
    width = model.max_history * model.id_length
    padded = torch.nn.functional.pad(ids, (0, width - ids.shape[1]))
    labels = model.item_tokens[interaction[model.POS_ITEM_ID]]
    with torch.no_grad():
        short = model.t5(input_ids=ids, attention_mask=mask, labels=labels).logits
        long = model.t5(input_ids=padded, attention_mask=(padded != 0).long(), labels=labels).logits
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-5)


def test_bigrec_epoch_loss_is_the_ungrouped_one(tiny_llm_path, tmp_path):
    from recbole_dealrec.model.bigrec import BIGRec

    settings = {**tiny_bigrec_config(tiny_llm_path, tmp_path), "llm_max_length": 160,
                "length_grouped_batches": 4, "train_batch_size": 4}
    model, grouped, plain = trainer_and_loaders("BIGRec", settings, BIGRec)
    assert isinstance(grouped, LengthGroupedLoader)
    grouped_total, grouped_rows = summed_loss(model, grouped)
    plain_total, plain_rows = summed_loss(model, plain)
    assert grouped_rows == plain_rows
    assert grouped_total == pytest.approx(plain_total, rel=1e-5)


def test_bad_group_size_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="length_grouped_batches"):
        trainer_and_loaders("TIGER", {**TINY_TIGER, "output_dir": str(tmp_path), "length_grouped_batches": -1},
                            TIGER)


def test_surrogate_sequence_loss_cut_to_the_longest_row_and_grouped_equals_the_padded_one(tmp_path):
    from recbole.utils import get_model

    from recbole_dealrec.surrogate.loss import TARGET_SEQ_FIELD, _SequencePredict, sequence_training_loss
    from recbole_dealrec.surrogate.train import surrogate_config, training_data_and_loss

    settings = {"surrogate_config": {**TINY_SURROGATE, "MAX_ITEM_LIST_LENGTH": 50, "train_batch_size": 64},
                "output_dir": str(tmp_path), "show_progress": False}
    scfg = surrogate_config(DealrecConfig("SASRec", "ml-100k", config_dict=settings))
    train, _, _ = data_preparation(scfg, create_dataset(scfg))
    torch.manual_seed(0)
    model = get_model("SASRec")(scfg, train.dataset).eval()
    scfg["surrogate_length_grouped_batches"] = 0
    plain, _ = training_data_and_loss(scfg, model, train)
    scfg["surrogate_length_grouped_batches"] = 1000  # one window: the shortest rows share batches
    grouped, _ = training_data_and_loss(scfg, model, train)
    assert isinstance(grouped, LengthGroupedLoader) and not isinstance(plain, LengthGroupedLoader)

    def padded_loss(interaction):  # every position of the row, as before the cut
        target_seq = interaction[TARGET_SEQ_FIELD]
        rows, positions = torch.nonzero(target_seq, as_tuple=True)
        logits = _SequencePredict(model)(interaction[model.ITEM_SEQ], rows, positions)
        return torch.nn.functional.cross_entropy(logits, target_seq[rows, positions], reduction="sum")

    with torch.no_grad():
        batch = min(grouped, key=lambda b: int(b[model.ITEM_SEQ_LEN].max()))  # its shortest batch: cut the most
        assert int(batch[model.ITEM_SEQ_LEN].max()) < batch[model.ITEM_SEQ].shape[1]
        targets = int((batch[TARGET_SEQ_FIELD] > 0).sum())
        torch.testing.assert_close(sequence_training_loss(model, batch) * targets, padded_loss(batch))
        totals = []
        for loader in (plain, grouped):
            totals.append(sum(float(sequence_training_loss(model, b)) * int((b[TARGET_SEQ_FIELD] > 0).sum())
                              for b in loader))
    assert totals[0] == pytest.approx(totals[1], rel=1e-6)


@pytest.mark.parametrize("n, chunk", [(37, 8), (37, 64), (1, 1), (200, 1024)])
def test_fused_linear_cross_entropy_equals_the_plain_one(n, chunk):
    from recbole_dealrec.surrogate.loss import fused_linear_cross_entropy

    generator = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(50, (n,), generator=generator)
    plain = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets)
    fused = fused_linear_cross_entropy(hidden, weight, targets, chunk=chunk)
    torch.testing.assert_close(fused, plain)
    for a, b in zip(torch.autograd.grad(3.0 * fused, (hidden, weight)), torch.autograd.grad(3.0 * plain, (hidden, weight))):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy(hidden, weight, targets, chunk=chunk), plain.detach())
    # weighted: sum(w * ce) / sum(w), its gradient included
    w = torch.rand(n, generator=generator, dtype=torch.float64) + 0.1
    plain = (torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="none") * w).sum() / w.sum()
    fused = fused_linear_cross_entropy(hidden, weight, targets, w, chunk=chunk)
    torch.testing.assert_close(fused, plain)
    for a, b in zip(torch.autograd.grad(fused, (hidden, weight)), torch.autograd.grad(plain, (hidden, weight))):
        torch.testing.assert_close(a, b)


def test_surrogate_user_weighting_equals_a_hand_computation(tmp_path):
    """surrogate_user_weighting: user = sum_t ce_t / c_u(t) / sum_t 1 / c_u(t), with c_u = the user's number of
    prefix samples (its training rows); prefix = the plain mean over the targets."""
    from recbole.utils import get_model

    from recbole_dealrec.surrogate.loss import TARGET_SEQ_FIELD, _SequencePredict, sequence_training_loss
    from recbole_dealrec.surrogate.train import surrogate_config, training_data_and_loss

    settings = {"surrogate_config": {**TINY_SURROGATE, "MAX_ITEM_LIST_LENGTH": 20, "train_batch_size": 50},
                "output_dir": str(tmp_path), "show_progress": False, "surrogate_user_weighting": "user"}
    scfg = surrogate_config(DealrecConfig("SASRec", "ml-100k", config_dict=settings))
    train, _, _ = data_preparation(scfg, create_dataset(scfg))
    torch.manual_seed(0)
    model = get_model("SASRec")(scfg, train.dataset).eval()
    loader, loss_func = training_data_and_loss(scfg, model, train)
    prefixes = np.bincount(train.dataset.inter_feat["user_id"].numpy())  # c_u: the user's prefix samples
    batch = next(iter(loader))
    with torch.no_grad():
        rows, positions = torch.nonzero(batch[TARGET_SEQ_FIELD], as_tuple=True)
        logits = _SequencePredict(model)(batch[model.ITEM_SEQ], rows, positions)
        ce = torch.nn.functional.cross_entropy(logits, batch[TARGET_SEQ_FIELD][rows, positions], reduction="none")
        w = 1.0 / torch.from_numpy(prefixes[batch["user_id"][rows].numpy()]).float()
        torch.testing.assert_close(loss_func(batch), (ce * w).sum() / w.sum())
        torch.testing.assert_close(sequence_training_loss(model, batch, "prefix"), ce.mean())
    with pytest.raises(ConfigError, match="surrogate_user_weighting must be one of"):
        scfg["surrogate_user_weighting"] = "users"
        training_data_and_loss(scfg, model, train)
