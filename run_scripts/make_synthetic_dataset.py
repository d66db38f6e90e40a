"""A seeded synthetic RecBole atomic dataset of a chosen size, for scaling runs (issue: Book-sized data).

    python run_scripts/make_synthetic_dataset.py --name book_like --output <data_path> \\
        --users 88263 --items 86272 --interactions 5303707            # the paper's Book, 15x Games
    python run_scripts/make_synthetic_dataset.py --name games_like --output <data_path> \\
        --users 49156 --items 17332 --interactions 342329

User history lengths are log-normal (at least ``--min-length``, heavy right tail: Book's median is ~32 and its
longest ~7.8k), items are drawn by a Zipf-like popularity (rank^-``--zipf``), times increase within each user.
Writes ``<output>/<name>/<name>.inter`` (``user_id:token item_id:token timestamp:float``) and ``<name>.item``
(``item_id:token title:token_seq``) atomically; no property file is needed (the plugin infers the columns).
Same arguments, same files, byte for byte.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from recbole_dealrec.utils import atomic_write


def lengths_for(users: int, interactions: int, min_length: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """[users] history lengths >= min_length summing to exactly ``interactions`` (log-normal shape)."""
    if interactions < users * min_length:
        raise SystemExit(f"--interactions {interactions} < --users x --min-length = {users * min_length}")
    raw = rng.lognormal(mean=0.0, sigma=sigma, size=users)
    extra = raw / raw.sum() * (interactions - users * min_length)
    lengths = min_length + np.floor(extra).astype(np.int64)
    short = interactions - int(lengths.sum())  # the floor's remainder: one more to the largest fractions
    lengths[np.argsort(-(extra - np.floor(extra)), kind="stable")[:short]] += 1
    return lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--output", required=True, help="data_path: the dataset goes to <output>/<name>/")
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--interactions", type=int, required=True)
    parser.add_argument("--min-length", type=int, default=5)
    parser.add_argument("--sigma", type=float, default=1.3, help="log-normal shape of the history lengths")
    parser.add_argument("--zipf", type=float, default=1.0, help="item popularity ~ rank^-zipf")
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    lengths = lengths_for(args.users, args.interactions, args.min_length, args.sigma, rng)
    popularity = np.arange(1, args.items + 1, dtype=np.float64) ** -args.zipf
    items = rng.choice(args.items, size=args.interactions, p=popularity / popularity.sum())
    users = np.repeat(np.arange(args.users), lengths)
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    times = np.arange(args.interactions) - first  # the position in the user's history
    folder = os.path.join(args.output, args.name)
    os.makedirs(folder, exist_ok=True)
    with atomic_write(os.path.join(folder, f"{args.name}.inter"), encoding="utf-8") as handle:
        handle.write("user_id:token\titem_id:token\ttimestamp:float\n")
        handle.writelines(f"u{u}\ti{i}\t{t}\n" for u, i, t in zip(users.tolist(), items.tolist(), times.tolist()))
    with atomic_write(os.path.join(folder, f"{args.name}.item"), encoding="utf-8") as handle:
        handle.write("item_id:token\ttitle:token_seq\n")
        handle.writelines(f"i{i}\titem {i}\n" for i in range(args.items))
    print(f"wrote {folder}: {args.users} users, {args.items} items, {args.interactions} interactions; history "
          f"lengths min {lengths.min()}, median {int(np.median(lengths))}, max {lengths.max()}")


if __name__ == "__main__":
    main()
