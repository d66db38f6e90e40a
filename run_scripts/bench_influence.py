"""Benchmark of the influence stage; prints times and ratios (timings here are noisy: read the ratios).

For one dataset: one surrogate training epoch (RecBole's prefix rows), then in prefix and in sequence mode the
mean gradient, the iHVP solve (with its relative residual) and batched scoring of every user (forward-mode
jvp), and the per-user backward loop (sequence mode, the paper's algorithm) for ``--loop-users`` users,
extrapolated to all users.

    python run_scripts/bench_influence.py --dataset ml-100k
    python run_scripts/bench_influence.py --dataset games --data_path dataset   # after the importer
"""
from __future__ import annotations

import argparse
import time

import torch

import recbole_dealrec  # noqa: F401
from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data import create_dataset, data_preparation
from recbole_dealrec.scoring.ihvp import solve
from recbole_dealrec.gradients.params import flatten, select_parameters, unflatten
from recbole_dealrec.scoring.influence_core import directional_derivatives, mean_gradient, per_sample_gradient_dot_loop
from recbole_dealrec.scoring.influence import InfluenceArguments, auto_damping, hessian_vector_product
from recbole_dealrec.surrogate import SurrogateLoss, user_batches
from recbole_dealrec.model import get_model
from recbole_dealrec.trainer import get_trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--model", default="SASRec")
    parser.add_argument("--params", nargs="+", default=[".*"], help="influence_params patterns")
    parser.add_argument("--loop-users", type=int, default=2000)
    parser.add_argument("--cg-iters", type=int, default=200, help="cg_max_iter (default key: 200; CG stops at ihvp_tol 1e-3)")
    parser.add_argument("--damping", default="auto", help="influence_damping: auto (default key) or a number")
    parser.add_argument("--batch-rows", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=64, help="surrogate hidden size (paper: 64)")
    parser.add_argument("--layers", type=int, default=2, help="surrogate layers (paper: 2)")
    parser.add_argument("--max-len", type=int, default=50, help="MAX_ITEM_LIST_LENGTH (paper: 50)")
    parser.add_argument("--hessian-users", default="auto",
                        help="influence_hessian_users: auto (default key, 2000 users), all, or a number")
    parser.add_argument("--user-loss", default="mean", choices=["mean", "sum"], help="influence_user_loss")
    parser.add_argument("--epochs-only", action="store_true", help="only the prefix-row vs sequence-mode epoch")
    parser.add_argument("--skip-prefix", action="store_true", help="influence stage in sequence mode only")
    args = parser.parse_args()
    hessian_users = args.hessian_users if args.hessian_users == "auto" else \
        None if args.hessian_users == "all" else int(args.hessian_users)

    overrides = {"show_progress": False, "hidden_size": args.hidden, "inner_size": 4 * args.hidden,
                 "n_layers": args.layers, "n_heads": 2, "MAX_ITEM_LIST_LENGTH": args.max_len,
                 "train_batch_size": 500, "learning_rate": 0.001, "influence_hessian": "gauss_newton",
                 "influence_hessian_users": hessian_users, "influence_batch_rows": args.batch_rows}
    if args.data_path:
        overrides["data_path"] = args.data_path
    config = DealrecConfig(args.model, args.dataset, config_dict=overrides)
    train_data, _, _ = data_preparation(config, create_dataset(config))
    torch.manual_seed(0)
    model = get_model(args.model)(config, train_data.dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], args.model)(config, model)

    timings = {}
    start = time.perf_counter()
    trainer._train_epoch(train_data, 0, show_progress=False)
    timings["surrogate epoch (prefix rows)"] = time.perf_counter() - start
    from recbole_dealrec.surrogate.train import _sequence_mode_loader

    config["surrogate_sequence_mode"] = True
    sequence_loader = _sequence_mode_loader(config, model, train_data)
    start = time.perf_counter()
    trainer._train_epoch(sequence_loader, 1, show_progress=False)
    timings["surrogate epoch (sequence rows)"] = time.perf_counter() - start
    print(f"surrogate epoch: {len(train_data.dataset)} prefix rows, {len(sequence_loader.dataset)} sequence rows; "
          f"ratio sequence / prefix epoch {timings['surrogate epoch (sequence rows)'] / timings['surrogate epoch (prefix rows)']:.2f}",
          flush=True)
    if args.epochs_only:
        return
    model.eval()

    loss = SurrogateLoss(model, args.user_loss)
    params = select_parameters(model.named_parameters(), args.params)
    m = sum(p.numel() for p in params.values())
    stage = {}
    for mode in ("sequence",) if args.skip_prefix else ("prefix", "sequence"):
        batches = user_batches(train_data.dataset, args.batch_rows, sequence=mode == "sequence")
        n_users = sum(len(b) for b in batches)
        start = time.perf_counter()
        v = flatten(mean_gradient(loss, params, batches, n_users))
        timings[f"{mode}: mean gradient"] = time.perf_counter() - start
        hvp = hessian_vector_product(InfluenceArguments.from_config(config), loss, params, train_data.dataset, batches)
        start = time.perf_counter()
        if args.damping == "auto":  # as influence_damping: auto (the power-iteration HVPs count in the iHVP time)
            damping, _ = auto_damping(InfluenceArguments.from_config(config), hvp, m, v.dtype)
        else:
            damping = float(args.damping)
        result = solve("cg", v, hvp=hvp, damping=damping, tol=config["ihvp_tol"], max_iter=args.cg_iters)
        timings[f"{mode}: iHVP (CG, GN, damping {damping:.1e}, {result.iterations} it., residual {result.residual:.1e})"] = \
            time.perf_counter() - start
        direction = unflatten(result.x, params)
        start = time.perf_counter()
        scores = directional_derivatives(loss, params, direction, batches)
        timings[f"{mode}: score all users (jvp)"] = time.perf_counter() - start
        stage[mode] = sum(t for k, t in timings.items() if k.startswith(mode + ":"))
        rows = sum(len(b.segment) for b in batches)
        print(f"{mode} mode: {rows} model rows per pass", flush=True)

    # The paper's algorithm: one backward per user, in sequence mode.
    loop_batches = user_batches(train_data.dataset, args.batch_rows, sequence=True,
                                user_ids=[u for b in batches for u in b.user_ids][: args.loop_users])
    n_loop = sum(len(b) for b in loop_batches)
    start = time.perf_counter()
    loop_scores = per_sample_gradient_dot_loop(loss, params, direction, loop_batches, lambda b: b.split())
    loop_time = time.perf_counter() - start
    timings[f"sequence: per-user loop, {n_loop} users"] = loop_time
    loop_all = loop_time * n_users / n_loop
    max_diff = (scores[:n_loop].double() - loop_scores.double()).abs().max().item()

    print(f"surrogate {args.model}: hidden {args.hidden}, {args.layers} layers, max length {args.max_len}; "
          f"Hessian on {args.hessian_users} users; per-user loss: {args.user_loss}")
    print(f"dataset={args.dataset} users={n_users} rows={len(train_data.dataset)} scored parameters={m} "
          f"threads={torch.get_num_threads()}")
    for name, seconds in timings.items():
        print(f"  {name:62s} {seconds:9.2f} s")
    epoch = timings["surrogate epoch (prefix rows)"]
    sequence_epoch = timings["surrogate epoch (sequence rows)"]
    print(f"  ratio  surrogate epoch, sequence / prefix rows          {sequence_epoch / epoch:.2f}")
    if "prefix" in stage:
        print(f"  ratio  influence stage, sequence / prefix mode          {stage['sequence'] / stage['prefix']:.2f}")
        print(f"  ratio  influence stage (prefix) / prefix-row epoch      {stage['prefix'] / epoch:.2f}")
    print(f"  ratio  influence stage (sequence) / sequence-mode epoch {stage['sequence'] / sequence_epoch:.2f}")
    print(f"  ratio  per-user loop (all users, extrapolated) / jvp    "
          f"{loop_all / timings['sequence: score all users (jvp)']:.2f}x")
    print(f"  max |batched - loop| on the looped users               {max_diff:.2e} (scores up to {scores.abs().max().item():.2e})")


if __name__ == "__main__":
    main()
