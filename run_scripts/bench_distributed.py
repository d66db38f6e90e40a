"""Benchmark of sharded scoring: influence and effort with 1 vs N processes (torchrun, gloo, one thread each).

    python run_scripts/bench_distributed.py                       # README main job's keys, 2 processes
    python run_scripts/bench_distributed.py --effort-users 96 --nproc 2 --config run_scripts/configs/bigrec_ml100k_cpu.yaml

The surrogate is trained (or loaded from ``--output-dir``'s cache) before any timing; then each stage is timed
with 1 and with N processes, every process with one thread. Prints per stage: seconds with 1 and N processes,
the speed-up, the share of the N-process time spent in collectives (sending, receiving and waiting for the
slower rank), and the largest difference between the 1- and N-process scores relative to the largest score.
On a machine with fewer cores than N x threads the processes compete for cores: the speed-up measures that
machine, nothing more.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np


def worker(args) -> None:
    """One process of the timed run (launched by torchrun when N > 1): score, then rank 0 prints one JSON line."""
    import torch

    from recbole_dealrec import distributed
    from recbole_dealrec.config import DealrecConfig
    from recbole_dealrec.data import create_dataset, data_preparation, training_user_ids
    from recbole_dealrec.scoring.effort import effort_model, effort_scores_for_users
    from recbole_dealrec.scoring.influence import influence_scores
    from recbole_dealrec.scoring.signals import SignalContext

    config = DealrecConfig("BIGRec", args.dataset, [args.config] if args.config else None,
                           {"output_dir": args.output_dir, "show_progress": False, "sampler": "dealrec"})
    distributed.init_from_env(config["distributed_timeout"])
    train_data, _, _ = data_preparation(config, create_dataset(config))
    candidates = training_user_ids(train_data.dataset)
    ctx = SignalContext(config, train_data.dataset, candidates)
    surrogate = ctx.surrogate()  # cached by the preparing run: loaded, not timed
    # effort's model build (the LLM loaded by each rank, rank 0 first) is timed apart from the scoring
    models = {}
    stages = {
        "influence": lambda: influence_scores(config, surrogate),
        "effort-build": lambda: models.setdefault("effort", effort_model(config, train_data.dataset)),
        "effort": lambda: effort_scores_for_users(config, train_data.dataset, candidates[: args.effort_users],
                                                  model=models.get("effort")),
    }
    out = {}
    for name in args.stages.split(","):
        distributed.barrier()
        start, comm = time.perf_counter(), distributed.collective_seconds()
        result = stages[name]()
        seconds = time.perf_counter() - start
        comm = distributed.collective_seconds() - comm
        timings = distributed.gather_objects((seconds, comm))
        scores = np.asarray(getattr(result, "scores", []), dtype=np.float64).tolist()
        out[name] = {"seconds": max(t[0] for t in timings), "collective_seconds": max(t[1] for t in timings),
                     "scores": scores, "threads": torch.get_num_threads()}
    if distributed.is_main():
        print("BENCH " + json.dumps(out), flush=True)
    distributed.shutdown()


def launch(args, nproc: int, stages: str, effort_users: int | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    own = [os.path.abspath(__file__), "--worker", "--dataset", args.dataset, "--output-dir", args.output_dir,
           "--effort-users", str(effort_users or args.effort_users), "--stages", stages] + (["--config", args.config] if args.config else [])
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   "--master_addr=127.0.0.1", f"--master_port={port}", *own]
    else:
        command = [sys.executable, *own]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{nproc}-process run failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("BENCH "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="run_scripts/configs/bigrec_ml100k_cpu.yaml",
                        help="property file (default: the README main job's)")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--effort-users", type=int, default=96, help="users whose effort scores are timed")
    parser.add_argument("--stages", default="effort-build,effort,influence")
    parser.add_argument("--output-dir", default=None, help="cache folder (default: a fresh temporary one)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    args.output_dir = args.output_dir or tempfile.mkdtemp(prefix="bench_distributed-")
    print(f"preparing (surrogate, caches) in {args.output_dir} ...", flush=True)
    launch(args, 1, "effort-build,effort", effort_users=2)  # trains and caches the surrogate; builds what the LLM backend caches
    one, many = launch(args, 1, args.stages), launch(args, args.nproc, args.stages)
    print(f"{args.dataset}, {args.effort_users} effort users, {args.threads} thread(s) per process, {os.cpu_count()} cores")
    print(f"{'stage':<10} {'1 proc s':>9} {f'{args.nproc} procs s':>10} {'speed-up':>9} {'collectives':>12} {'rel. diff':>10}")
    for stage in args.stages.split(","):
        a, b = one[stage], many[stage]
        x, y = np.array(a["scores"]), np.array(b["scores"])
        diff = float(np.max(np.abs(x - y)) / max(np.max(np.abs(x)), 1e-300)) if len(x) else float("nan")
        print(f"{stage:<10} {a['seconds']:9.1f} {b['seconds']:10.1f} {a['seconds'] / b['seconds']:8.2f}x "
              f"{b['collective_seconds'] / b['seconds']:11.1%} {diff:10.1e}")


if __name__ == "__main__":
    main()
