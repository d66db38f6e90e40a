"""Benchmark of BIGRec's beam search: the path where each prompt leaves the batch when its beams are done
(``BIGRec.generate``, the default) vs HF ``generate`` with the prompt cache (``BIGRec.generate_reference``, the path
it replaced), on the same model, users and batches, in one run.

    python run_scripts/bench_bigrec_decoding.py                    # the README main job's sizes
    python run_scripts/bench_bigrec_decoding.py --users 32 --batch-size 32

The model is the README main job's (``run_scripts/configs/bigrec_ml100k_cpu.yaml``: SmolLM2-135M-Instruct + LoRA,
prompts of at most 128 tokens, 4 beams, at most 32 new tokens). When a beam search ends depends on what the model
learned (an untrained instruct model talks until ``max_new_tokens``), so the adapter first takes ``--train-steps``
optimizer steps on the training samples of seeded users, as the main job's training does. The two paths then decode
the same test batches, alternating which goes first per batch (the machine's load falls on both). Prints each
path's seconds per user, the new / old ratio, the share of identical answers and the largest score difference; and
the tokens each path runs through the LLM's decoder (rows x positions of every call, counted by a forward pre-hook):
the model's own arithmetic, which no change around the model removes, so new / old tokens bounds the time ratio an
exact path can reach.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import recbole_dealrec  # noqa: F401
from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data import create_dataset, data_preparation
from recbole_dealrec.model.bigrec.model import BIGRec
from recbole_dealrec.trainer import GenerativeTrainer

MAIN_JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "bigrec_ml100k_cpu.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=64, help="test users decoded by each path")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (main job: 16)")
    parser.add_argument("--train-steps", type=int, default=16, help="adapter steps of 8 samples before decoding")
    parser.add_argument("--output_dir", default="saved/bench_bigrec")
    args = parser.parse_args()

    config = DealrecConfig("BIGRec", "ml-100k", config_file_list=[MAIN_JOB], config_dict={
        "output_dir": args.output_dir, "show_progress": False, "eval_batch_size": args.batch_size,
        "eval_user_subset": args.users, "train_batch_size": 8})
    train_data, _, test_data = data_preparation(config, create_dataset(config))
    torch.manual_seed(int(config["seed"]))
    model = BIGRec(config, train_data.dataset)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(config["learning_rate"]))
    model.train()
    start, steps = time.perf_counter(), 0
    while steps < args.train_steps:
        for interaction in train_data:
            optimizer.zero_grad()
            model.calculate_loss(interaction).backward()
            optimizer.step()
            steps += 1
            if steps == args.train_steps:
                break
    print(f"adapter: {steps} steps of {config['train_batch_size']} samples in {time.perf_counter() - start:.0f} s")

    model.eval()
    # The test rows and order of the main job's evaluation: the seeded eval_user_subset, prompts by length.
    histories = [model.histories(batch[0]) for batch in GenerativeTrainer(config, model).eval_subset(test_data)]
    times = {"old": 0.0, "new": 0.0}
    answers = {"old": [], "new": []}
    scores = {"old": [], "new": []}
    paths = {"old": model.generate_reference, "new": model.generate}
    tokens = {"old": 0, "new": 0}
    counting = {"path": None}

    def count_tokens(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        shape = ids.shape if ids is not None else kwargs["inputs_embeds"].shape[:2]
        tokens[counting["path"]] += int(shape[0]) * int(shape[1])

    model.llm.get_decoder().register_forward_pre_hook(count_tokens, with_kwargs=True)
    steps = []
    for i, batch in enumerate(histories):
        for name in (("old", "new") if i % 2 == 0 else ("new", "old")):
            counting["path"] = name
            start = time.perf_counter()
            texts, beam_scores = paths[name](batch)
            times[name] += time.perf_counter() - start
            answers[name] += texts
            scores[name].append(beam_scores)
            if name == "new":
                steps.append(model.last_decode_steps)
    users = sum(len(b) for b in histories)
    print(f"ml-100k: {users} test users, batch {args.batch_size}, {model.num_beams} beams, "
          f"max_new_tokens {model.max_new_tokens}, llm_max_length {model.max_length}, threads {torch.get_num_threads()}")
    print(f"  HF generate + prompt cache (old): {times['old']:7.1f} s  {times['old'] / users:6.3f} s/user")
    print(f"  prompts leave when done (new):    {times['new']:7.1f} s  {times['new'] / users:6.3f} s/user")
    print(f"  new / old: {times['new'] / times['old']:.3f}")
    print(f"  decoder tokens (rows x positions, prompts included): old {tokens['old']}, new {tokens['new']}, "
          f"new / old {tokens['new'] / max(tokens['old'], 1):.3f}")
    steps = torch.cat(steps).double()
    print(f"  decoding steps per prompt: mean {steps.mean():.1f}, min {steps.min():.0f}, max {steps.max():.0f} "
          f"(HF's batch runs every prompt to its batch's last step)")
    same = sum(a == b for a, b in zip(answers["old"], answers["new"])) / max(users, 1)
    diff = (torch.cat(scores["old"]) - torch.cat(scores["new"])).abs().max().item()
    print(f"  users with identical answers (all beams, in order): {same:.4f}; largest score difference: {diff:.2e}")


if __name__ == "__main__":
    main()
