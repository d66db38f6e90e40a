"""Semantic IDs for TIGER (Rajput et al., NeurIPS'23): item text -> sentence embedding -> RQ-VAE codes.

Each item's text (``tiger_text_fields``: the title, plus e.g. Games' categories) is embedded by a local
sentence encoder (``text_encoder_path``, default all-MiniLM-L6-v2). An RQ-VAE (MLP encoder ``tiger_rqvae_hidden``
to a ``tiger_rqvae_latent``-d latent, ``tiger_levels`` residual codebooks of ``tiger_codebook_size`` codes,
k-means initialised on the first batch, unused codes restarted on random items' residuals after every epoch,
commitment ``tiger_rqvae_beta``) is trained on ALL items: items are
not training samples, pruning never touches them. Items sharing all ``tiger_levels`` codes get one more code
(their rank among those items, as in the TIGER paper), so every item has a unique ID of ``tiger_levels + 1``
codes. The codes are cached under a key of everything they depend on and reused across runs and samplers.

Loss = MSE(x, decoder(z_q)) + sum_levels ||sg[r_l] - e_l||^2 + beta ||r_l - sg[e_l]||^2, straight-through.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from logging import getLogger
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from recbole_dealrec.errors import ConfigError, check_integer
from recbole_dealrec.utils import atomic_write, cache_dir, cache_entry_ok, rng_untouched, stable_key

RQVAE_KEYS = ("tiger_text_fields", "text_encoder_path", "text_encoder_max_length", "tiger_levels",
              "tiger_codebook_size", "tiger_rqvae_hidden", "tiger_rqvae_latent", "tiger_rqvae_beta",
              "tiger_rqvae_epochs", "tiger_rqvae_batch_size", "tiger_rqvae_lr", "seed")


class RQVAE(nn.Module):
    """Residual-quantised autoencoder: ``codes(x) -> int64 [n, levels]``."""

    def __init__(self, in_dim: int, hidden: Sequence[int], latent: int, levels: int, codebook_size: int, beta: float):
        super().__init__()
        dims = [in_dim, *hidden, latent]
        enc, dec = [], []
        for a, b in zip(dims[:-1], dims[1:]):
            enc += [nn.Linear(a, b), nn.ReLU()]
        for a, b in zip(dims[::-1][:-1], dims[::-1][1:]):
            dec += [nn.Linear(a, b), nn.ReLU()]
        self.encoder = nn.Sequential(*enc[:-1])
        self.decoder = nn.Sequential(*dec[:-1])
        self.codebooks = nn.Parameter(torch.zeros(levels, codebook_size, latent))
        self.beta = beta

    def quantise(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(codes [n, levels], z_q [n, latent], codebook + commitment loss)``."""
        residual, z_q, loss, codes = z, torch.zeros_like(z), z.new_zeros(()), []
        for book in self.codebooks:
            index = torch.cdist(residual.detach(), book.detach()).argmin(dim=1)
            e = book[index]
            loss = loss + ((residual.detach() - e) ** 2).sum(-1).mean() + self.beta * ((residual - e.detach()) ** 2).sum(-1).mean()
            z_q = z_q + e
            residual = residual - e.detach()
            codes.append(index)
        return torch.stack(codes, dim=1), z_q, loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(total loss, reconstruction loss, codes)``."""
        z = self.encoder(x)
        codes, z_q, q_loss = self.quantise(z)
        recon = ((self.decoder(z + (z_q - z).detach()) - x) ** 2).sum(-1).mean()
        return recon + q_loss, recon, codes

    @torch.no_grad()
    def restart_dead_codes(self, x: torch.Tensor, generator: torch.Generator) -> int:
        """Codes no item of ``x`` uses are moved onto residuals of randomly drawn items of ``x`` (the usual cure
        for codebook collapse: the encoder moves faster than the codes early on). Returns how many moved."""
        residual, moved = self.encoder(x), 0
        for book in self.codebooks:
            index = torch.cdist(residual, book).argmin(dim=1)
            dead = torch.ones(len(book), dtype=torch.bool)
            dead[index] = False
            if dead.any():
                draw = torch.randint(len(x), (int(dead.sum()),), generator=generator)
                book[dead] = residual[draw]
                moved += int(dead.sum())
                index = torch.cdist(residual, book).argmin(dim=1)
            residual = residual - book[index]
        return moved

    @torch.no_grad()
    def kmeans_init(self, x: torch.Tensor, seed: int) -> None:
        """Each level's codebook = k-means centres of that level's residuals on ``x`` (against codebook collapse)."""
        from sklearn.cluster import KMeans

        residual = self.encoder(x)
        for level, book in enumerate(self.codebooks):
            k = book.shape[0]
            points = residual.double().numpy()
            distinct = len(np.unique(points.round(8), axis=0))
            if distinct < k:  # fewer distinct points than codes: take them all, pad with jittered copies
                centres = points[np.random.default_rng(seed + level).choice(len(points), size=k, replace=True)]
                centres = centres + 1e-3 * np.random.default_rng(seed + level).normal(size=centres.shape)
            else:
                centres = KMeans(n_clusters=k, n_init=1, random_state=seed + level).fit(points).cluster_centers_
            book.copy_(torch.from_numpy(centres).to(book.dtype))
            residual = residual - book[torch.cdist(residual, book).argmin(dim=1)]


@dataclasses.dataclass
class SemanticIDs:
    """``codes``: int64 [n_items, levels + 1] (row 0, the padding item, is all -1); ``facts``: usage, collisions."""

    codes: np.ndarray
    facts: dict


def add_collision_level(codes: np.ndarray, codebook_size: int, key: str = "tiger_codebook_size") -> np.ndarray:
    """Append each item's rank among the items sharing all its codes (ties by item order): unique IDs.

    ``codes``: int64 [n, levels] -> [n, levels + 1]. More items on one prefix than ``codebook_size`` cannot be
    told apart by one more code: a clear error.
    """
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if counts.max(initial=0) > codebook_size:
        raise ConfigError(f"{counts.max()} items share one semantic-ID prefix, more than {key}={codebook_size} "
                          "extra codes can separate: raise tiger_codebook_size / tiger_levels or train the RQ-VAE longer")
    order = np.argsort(inverse, kind="stable")
    rank = np.empty(len(codes), dtype=np.int64)
    starts = np.r_[0, np.cumsum(np.bincount(inverse))[:-1]]
    rank[order] = np.arange(len(codes)) - starts[inverse[order]]
    return np.concatenate([codes, rank[:, None]], axis=1)


def check_rqvae_config(config: Mapping[str, Any], n_items: int | None = None) -> None:
    """Validate the RQ-VAE keys (and, given ``n_items``, that the ID space can hold every item)."""
    for key in ("tiger_levels", "tiger_codebook_size", "tiger_rqvae_latent", "tiger_rqvae_epochs", "tiger_rqvae_batch_size"):
        check_integer(key, config[key], 1)
    if config["tiger_codebook_size"] < 2:
        raise ConfigError(f"tiger_codebook_size must be >= 2, got {config['tiger_codebook_size']!r}")
    hidden = config["tiger_rqvae_hidden"]
    if not isinstance(hidden, (list, tuple)) or not all(isinstance(h, int) and h > 0 for h in hidden):
        raise ConfigError(f"tiger_rqvae_hidden must be a list of positive layer widths, got {hidden!r}")
    fields = config["tiger_text_fields"]
    if fields is not None and (not isinstance(fields, (list, tuple)) or not fields or not all(isinstance(f, str) for f in fields)):
        raise ConfigError(f"tiger_text_fields must be ~ (title_field) or a non-empty list of item columns, got {fields!r}")
    if (fields is None or not fields) and not config["title_field"]:
        raise ConfigError("TIGER needs item texts: set title_field (or tiger_text_fields) to item columns")
    if n_items is not None:
        capacity = config["tiger_codebook_size"] ** (config["tiger_levels"] + 1)
        if capacity < n_items:
            raise ConfigError(f"tiger_codebook_size={config['tiger_codebook_size']} and tiger_levels={config['tiger_levels']} "
                              f"give {capacity} semantic IDs for {n_items} items: raise either")


def item_texts(config: Mapping[str, Any], dataset) -> list[str]:
    """One text per item (index 0 = padding, ``""``): the ``tiger_text_fields`` joined by ". "; the first field
    (the title) must be present for every item."""
    from recbole_dealrec.data.items import read_item_column

    fields = list(config["tiger_text_fields"] or [config["title_field"]])
    columns = [read_item_column(config, dataset, f, "tiger_text_fields", missing="error" if i == 0 else "empty")
               for i, f in enumerate(fields)]
    return [". ".join(c[i] for c in columns if c[i]) for i in range(dataset.item_num)]


def train_semantic_ids(config: Mapping[str, Any], texts: Sequence[str], show_progress: bool = False) -> SemanticIDs:
    """Embed ``texts[1:]``, train the RQ-VAE on every item, assign unique codes; log usage and collisions."""
    from recbole_dealrec.text_encoder import encode_texts, resolve_text_encoder

    logger = getLogger()
    start = time.perf_counter()
    x = encode_texts(resolve_text_encoder(config["text_encoder_path"]), list(texts[1:]),
                     max_length=int(config["text_encoder_max_length"]), show_progress=show_progress)
    embed_seconds = time.perf_counter() - start
    seed = int(config["seed"])
    torch.manual_seed(seed)
    levels, size = int(config["tiger_levels"]), int(config["tiger_codebook_size"])
    model = RQVAE(x.shape[1], list(config["tiger_rqvae_hidden"]), int(config["tiger_rqvae_latent"]), levels, size,
                  float(config["tiger_rqvae_beta"]))
    batch = int(config["tiger_rqvae_batch_size"])
    generator = torch.Generator().manual_seed(seed)
    first = torch.randperm(len(x), generator=generator)[:max(batch, size)]
    model.kmeans_init(x[first], seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=float(config["tiger_rqvae_lr"]))
    epochs = int(config["tiger_rqvae_epochs"])
    recon_first = None
    for _ in tqdm(range(epochs), desc="RQ-VAE", disable=not show_progress):
        for index in torch.randperm(len(x), generator=generator).split(batch):
            loss, recon, _ = model(x[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        model.restart_dead_codes(x, generator)
        recon_first = recon_first if recon_first is not None else float(recon)
    model.eval()
    with torch.no_grad():
        _, recon_all, codes = model(x)
    codes = codes.numpy().astype(np.int64)
    usage = [int(len(np.unique(codes[:, level]))) for level in range(levels)]
    prefix_users = len(np.unique(codes, axis=0))
    if usage[0] == 1:
        raise ConfigError(f"the RQ-VAE collapsed: every item got the same level-1 code (tiger_codebook_size={size}); "
                          "change tiger_rqvae_lr / tiger_rqvae_epochs / tiger_rqvae_latent")
    full = add_collision_level(codes, size)
    collided = len(codes) - prefix_users
    facts = {"items": int(len(codes)), "codebook_usage": usage, "codebook_size": size,
             "unique_prefixes": int(prefix_users), "collision_rate": collided / max(len(codes), 1),
             "max_extra_code": int(full[:, -1].max(initial=0)), "reconstruction_loss_first_epoch": recon_first,
             "reconstruction_loss": float(recon_all), "embed_seconds": round(embed_seconds, 2),
             "rqvae_seconds": round(time.perf_counter() - start - embed_seconds, 2)}
    logger.info(f"[TIGER] semantic IDs: codebook usage per level {usage} of {size}; "
                f"{collided} of {len(codes)} items collide on all {levels} levels (rate {facts['collision_rate']:.3f}), "
                f"extra code up to {facts['max_extra_code']}; reconstruction {recon_first:.4f} -> {float(recon_all):.4f}; "
                f"RQ-VAE {facts['rqvae_seconds']} s")
    for level, used in enumerate(usage):
        if used < max(2, size // 10):
            logger.warning(f"[TIGER] codebook collapse: level {level + 1} uses {used} of {size} codes")
    padding = np.full((1, levels + 1), -1, dtype=np.int64)
    return SemanticIDs(np.concatenate([padding, full]), facts)


def read_semantic_ids_file(path: str, levels: int, codebook_size: int) -> dict[str, list[int]]:
    """A ``semantic_ids.tsv`` table (``item_id<TAB>code code ...``): item token -> its ``levels + 1`` codes."""
    key = "tiger_semantic_ids_file"
    if not os.path.isfile(path):
        raise ConfigError(f"{key}={path}: no such file (a TIGER run's semantic_ids.tsv)")
    table: dict[str, list[int]] = {}
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n")
        if header != "item_id\tcodes":
            raise ConfigError(f"{key}={path}: header {header!r}, expected 'item_id<TAB>codes' (semantic_ids.tsv)")
        for number, line in enumerate(handle, start=2):
            token, _, codes = line.rstrip("\n").partition("\t")
            values = codes.split()
            if len(values) != levels + 1 or not all(v.isdigit() and int(v) < codebook_size for v in values):
                raise ConfigError(f"{key}={path} line {number}: {codes!r}, expected tiger_levels + 1 = {levels + 1} "
                                  f"codes below tiger_codebook_size={codebook_size}")
            table[token] = [int(v) for v in values]
    if len({tuple(c) for c in table.values()}) < len(table):
        raise ConfigError(f"{key}={path}: two items share one semantic ID")
    return table


def extend_semantic_ids(table: Mapping[str, Sequence[int]], item_tokens: Sequence[str], embeddings: torch.Tensor,
                        codebook_size: int) -> tuple[np.ndarray, int]:
    """The codes of ``item_tokens`` (by internal id, 0 = padding): an item of ``table`` keeps its codes; an item it
    lacks (new since the table was built) takes the ``levels`` prefix of the most similar known item (cosine of
    ``embeddings``, float [n_items - 1, d], L2-normalised, by internal id from 1) that still has a free last code,
    and the smallest such code: old IDs unchanged, every ID unique. Returns (int64 [n_items, levels + 1], row 0 =
    -1; the number of new items)."""
    width = len(next(iter(table.values())))
    codes = np.full((len(item_tokens), width), -1, dtype=np.int64)
    known = [i for i, t in enumerate(item_tokens) if i and t in table]
    new = [i for i, t in enumerate(item_tokens) if i and t not in table]
    for i in known:
        codes[i] = table[item_tokens[i]]
    taken: dict[tuple, set] = {}
    for value in table.values():
        taken.setdefault(tuple(value[:-1]), set()).add(value[-1])
    if new and not known:
        raise ConfigError("tiger_semantic_ids_file: none of the dataset's items is in the table; expected the IDs of "
                          "an earlier run on the same items")
    if new:
        similarity = embeddings[[i - 1 for i in new]] @ embeddings[[i - 1 for i in known]].T
        for row, item in enumerate(new):
            for neighbour in torch.argsort(similarity[row], descending=True, stable=True).tolist():
                prefix = tuple(codes[known[neighbour]][:-1])
                free = next((c for c in range(codebook_size) if c not in taken.get(prefix, ())), None)
                if free is not None:
                    codes[item] = [*prefix, free]
                    taken.setdefault(prefix, set()).add(free)
                    break
            else:
                raise ConfigError(f"tiger_semantic_ids_file: no free semantic ID left for item {item_tokens[item]!r} "
                                  f"(every known prefix holds tiger_codebook_size={codebook_size} items)")
    return codes, len(new)


def semantic_ids_from_file(config: Mapping[str, Any], dataset, show_progress: bool = False) -> SemanticIDs:
    """``tiger_semantic_ids_file``'s codes for this dataset's items, extended to items it lacks (see
    :func:`extend_semantic_ids`; their texts embedded by the run's text encoder)."""
    from recbole_dealrec.text_encoder import encode_texts, resolve_text_encoder
    from recbole_dealrec.utils import file_checksum

    path = str(config["tiger_semantic_ids_file"])
    levels, size = int(config["tiger_levels"]), int(config["tiger_codebook_size"])
    table = read_semantic_ids_file(path, levels, size)
    tokens = [str(t) for t in dataset.field2id_token[dataset.iid_field]]
    embeddings = None
    if any(t not in table for t in tokens[1:]):
        embeddings = encode_texts(resolve_text_encoder(config["text_encoder_path"]), item_texts(config, dataset)[1:],
                                  max_length=int(config["text_encoder_max_length"]), show_progress=show_progress)
    codes, n_new = extend_semantic_ids(table, tokens, embeddings, size)
    getLogger().info(f"[TIGER] semantic IDs of {len(tokens) - 1 - n_new} items read from {path}; {n_new} new items "
                     "placed beside their most similar known item")
    facts = {"items": len(tokens) - 1, "new_items": n_new, "from_file": os.path.abspath(path),
             "file_sha256": file_checksum(path), "path": os.path.abspath(path)}
    return SemanticIDs(codes, facts)


def cached_semantic_ids(config: Mapping[str, Any], dataset, show_progress: bool = False) -> SemanticIDs:
    """:func:`train_semantic_ids` on this dataset's item texts, reused from ``<output_dir>/<dataset>/cache``; or
    the table ``tiger_semantic_ids_file`` names, read by item token and extended to new items."""
    if config["tiger_semantic_ids_file"]:
        return semantic_ids_from_file(config, dataset, show_progress)
    texts = item_texts(config, dataset)
    payload = {**{k: config[k] for k in RQVAE_KEYS}, "texts": stable_key({"texts": texts})}
    path = os.path.join(cache_dir(config), f"tiger-ids-{stable_key(payload)}.npz")
    if cache_entry_ok(path) & cache_entry_ok(path[:-4] + ".json"):
        with np.load(path, allow_pickle=False) as data:
            codes = data["codes"]
        with open(path[:-4] + ".json", encoding="utf-8") as handle:
            facts = json.load(handle)
        getLogger().info(f"[TIGER] semantic IDs reused from {path}")
        return SemanticIDs(codes, {**facts, "cached": True, "path": path})
    # the build seeds and draws from torch's global RNG (the RQ-VAE's initialisation); forked, so that what the
    # caller draws next (TIGER's T5 initialisation, its effort) is the same whether the IDs were built or reused
    with rng_untouched():
        ids = train_semantic_ids(config, texts, show_progress=show_progress)
    with atomic_write(path, "wb", checksum=True) as handle:
        np.savez(handle, codes=ids.codes)
    with atomic_write(path[:-4] + ".json", checksum=True, encoding="utf-8") as handle:
        json.dump({**ids.facts, **payload}, handle, indent=2, default=str)
    return SemanticIDs(ids.codes, {**ids.facts, "cached": False, "path": path})
