"""Benchmark of the effort scores: batched exact per-sample norms vs a batch-of-one loop, same parameters,
and against what they cannot be cheaper than (one plain forward; one forward + backward of the batch loss).

    python run_scripts/bench_effort.py --users 200                      # default LLM (SmolLM2-135M)
    python run_scripts/bench_effort.py --users 200 --last-layer-lora-b  # the paper's single tensor
    python run_scripts/bench_effort.py --users 64 --costs               # ratios to a forward / forward+backward
    python run_scripts/bench_effort.py --users 192 --shared-prefix      # the paper's tensor: prompt prefix once
                                                                        # per batch (new) vs every row (old)

Prints the times, their ratios and the largest difference between batched and loop (timings are noisy here:
read the ratios).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import recbole_dealrec  # noqa: F401
from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data import create_dataset, data_preparation
from recbole_dealrec.data.items import last_rows
from recbole_dealrec.scoring.effort import _backend
from recbole_dealrec.gradients.lora import effort_scores, effort_scores_loop, last_layer_lora_pattern


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128, help="llm_max_length (paper: 512)")
    parser.add_argument("--llm-path", default=None, help="local causal-LM folder (default: SmolLM2)")
    parser.add_argument("--last-layer-lora-b", action="store_true", help="score only the last v_proj lora_B")
    parser.add_argument("--costs", action="store_true",
                        help="instead of the loop: effort (all LoRA, paper's tensor) vs a forward and a forward+backward")
    parser.add_argument("--shared-prefix", action="store_true",
                        help="instead of the loop: the paper's tensor with the batch's shared prompt prefix run once "
                             "(the default) vs every token of every row, alternated over --repeats runs")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    config = DealrecConfig("BIGRec", args.dataset, config_dict={
        "llm_path": args.llm_path, "llm_max_length": args.max_length, "show_progress": False,
    })
    train_data, _, _ = data_preparation(config, create_dataset(config))
    model = _backend(config, train_data.dataset)
    rows = last_rows(train_data.dataset)[: args.users]
    batches = [model.batch_tensors(train_data.dataset.inter_feat[torch.from_numpy(rows[i:i + args.batch_size])])
               for i in range(0, len(rows), args.batch_size)]
    patterns = [last_layer_lora_pattern(model.llm)] if args.last_layer_lora_b else None
    tokens = int(sum(b["attention_mask"].sum() for b in batches))
    if args.costs:
        return costs(model.llm, batches, len(rows), tokens)
    if args.shared_prefix:
        return shared_prefix(model.llm, batches, len(rows), tokens, args.repeats)

    start = time.perf_counter()
    batched = effort_scores(model.llm, batches, patterns)
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    loop = effort_scores_loop(model.llm, batches, patterns)
    t_loop = time.perf_counter() - start

    print(f"{len(rows)} users, {tokens} tokens, batch {args.batch_size}, params: {patterns or 'all LoRA'}, "
          f"threads {torch.get_num_threads()}")
    print(f"  batched {t_batched:8.1f} s   loop {t_loop:8.1f} s   ratio loop/batched {t_loop / t_batched:.2f}x")
    rel = float(np.max(np.abs(batched.numpy() - loop.numpy()) / np.maximum(np.abs(loop.numpy()), 1e-12)))
    print(f"  max relative difference {rel:.2e}; norms {batched.min().item():.3g} .. {batched.max().item():.3g}")


def costs(llm, batches, n_users: int, tokens: int) -> None:
    """Effort with all LoRA / the paper's last-layer lora_B vs one plain forward and one forward+backward."""
    from recbole_dealrec.gradients.lora import _forward_loss, _prepare

    device = next(llm.parameters()).device
    llm.eval()

    def forward_only():
        with torch.no_grad():
            for b in batches:
                _forward_loss(llm, *_prepare(b, device))

    def forward_backward():
        for b in batches:
            _forward_loss(llm, *_prepare(b, device)).sum().backward()
        llm.zero_grad(set_to_none=True)

    timings = {}
    for name, run in (("plain forward", forward_only), ("forward + backward (all LoRA)", forward_backward),
                      ("effort, all LoRA", lambda: effort_scores(llm, batches, None)),
                      ("effort, last v_proj.lora_B", lambda: effort_scores(llm, batches, [last_layer_lora_pattern(llm)]))):
        start = time.perf_counter()
        run()
        timings[name] = time.perf_counter() - start
    print(f"{n_users} users, {tokens} tokens, threads {torch.get_num_threads()}")
    for name, seconds in timings.items():
        print(f"  {name:32s} {seconds:8.1f} s")
    print(f"  ratio effort (paper's tensor) / plain forward     {timings['effort, last v_proj.lora_B'] / timings['plain forward']:.2f}")
    print(f"  ratio effort (all LoRA) / forward + backward      "
          f"{timings['effort, all LoRA'] / timings['forward + backward (all LoRA)']:.2f}")


def shared_prefix(llm, batches, n_users: int, tokens: int, repeats: int) -> None:
    """The paper's tensor (last v_proj.lora_B): the shared prompt prefix once per batch vs every row's every token."""
    from recbole_dealrec.gradients.lora import _prepare, shared_prefix_columns

    device = next(llm.parameters()).device
    patterns = [last_layer_lora_pattern(llm)]
    shared = sum(shared_prefix_columns(*_prepare(b, device)) * len(b["input_ids"]) for b in batches)
    times: dict[bool, list[float]] = {True: [], False: []}
    norms = {}
    for _ in range(repeats):  # alternated, so both paths see the same load
        for share in (False, True):
            start = time.perf_counter()
            norms[share] = effort_scores(llm, batches, patterns, share_prefix=share)
            times[share].append(time.perf_counter() - start)
    old, new = np.median(times[False]), np.median(times[True])
    rel = float(np.max(np.abs(norms[True].numpy() - norms[False].numpy()) / np.maximum(np.abs(norms[False].numpy()), 1e-12)))
    print(f"{n_users} users, {tokens} tokens ({shared} of them in the batches' shared prefixes), threads "
          f"{torch.get_num_threads()}, median of {repeats}")
    print(f"  old (every token) {old:8.1f} s   new (shared prefix once per batch) {new:8.1f} s   new / old {new / old:.3f}")
    print(f"  max relative difference {rel:.2e}")


if __name__ == "__main__":
    main()
