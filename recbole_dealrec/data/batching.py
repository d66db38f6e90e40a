"""Training batches of rows of similar length: each batch pads to its longest row, so grouping rows by length
removes most of the padding (Hugging Face's ``group_by_length``), seeded so that runs stay reproducible. Used by
the generative trainer (``length_grouped_batches``) and the surrogate (``surrogate_length_grouped_batches``)."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np


def length_grouped_batches(lengths: np.ndarray, batch_size: int, group: int,
                           generator: np.random.Generator) -> list[np.ndarray]:
    """Batches of row positions (``[<= batch_size]`` each) covering ``range(len(lengths))`` once: the rows
    shuffled, then each window of ``group`` batches' worth of rows sorted by ``lengths`` (longest first, stable)
    and cut into batches, the window's batches in shuffled order (as Hugging Face's LengthGroupedSampler). A
    window keeps the rows a plain shuffle would give it, so with ``group`` = the gradient-accumulation steps each
    optimizer step sums the same rows' gradients; only the padding inside each batch shrinks."""
    order = generator.permutation(len(lengths))
    window = batch_size * group
    batches = []
    for start in range(0, len(order), window):
        rows = order[start:start + window]
        rows = rows[np.argsort(-lengths[rows], kind="stable")]
        cut = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        batches.extend(cut[i] for i in generator.permutation(len(cut)))
    return batches


class LengthGroupedLoader:
    """A RecBole train loader's rows in batches of similar length (:func:`length_grouped_batches`), seeded by
    ``(seed, epoch)``: the same batches in every run and every rank, and after a resume. Everything else (the
    dataset, the collate step) is the wrapped loader's."""

    def __init__(self, loader, lengths: np.ndarray, group: int, seed: int):
        self.loader, self.lengths, self.group, self.seed = loader, np.asarray(lengths), group, seed
        self.batch_size = int(loader.step)
        self.epoch = 0

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self):
        generator = np.random.default_rng([self.seed, self.epoch])
        for rows in length_grouped_batches(self.lengths, self.batch_size, self.group, generator):
            yield self.loader.collate_fn(rows.tolist())


def grouped_by_length(loader, group: int, seed: int, shuffle: bool,
                      lengths: Callable[[], Optional[np.ndarray]]):
    """``loader`` in batches grouped by length (:class:`LengthGroupedLoader`), or ``loader`` itself where grouping
    cannot shrink a batch's padding: a window of at most one batch, no shuffling, or ``lengths()`` (each row's
    tokens, asked only when needed: BIGRec tokenises for it) is ``None``."""
    if group <= 1 or not shuffle:
        return loader
    values = lengths()
    return loader if values is None else LengthGroupedLoader(loader, values, group, seed)
