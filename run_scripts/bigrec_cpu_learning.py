"""Does BIGRec learn at CPU scale? Zero-shot vs fine-tuned on ml-100k, and every grounding on the same answers.

1. zero-shot: ``run_recbole`` with ``epochs: 0`` (the base LLM answers the test prompts);
2. fine-tuned: the same run with training on the chosen users (one sample per user, BIGRec's protocol);
3. both runs' answers (``bigrec_generations_file``) are grounded again in every way the model offers
   (top beam / all beams x last-token / mean-pooled embeddings) against the test targets, so the groundings
   are compared on identical generations.

Prints, per run and grounding: hits@10 on the seeded test users, Recall@10, NDCG@10, the share of top beams
that are exactly an item title, and what a random ranking expects. Writes ``summary.json`` to ``--out``.

    python run_scripts/bigrec_cpu_learning.py --out /tmp/bigrec_learn --config run_scripts/configs/bigrec_ml100k_learn_cpu.yaml
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from recbole_dealrec.config import DealrecConfig, parse_literal
from recbole_dealrec.data import create_dataset, data_preparation
from recbole_dealrec.model.bigrec.grounding import (
    GROUNDING_BEAMS,
    POOLINGS,
    ground_answers,
    last_token_embeddings,
    title_index,
)
from recbole_dealrec.model.bigrec.llm import load_causal_lm, resolve_llm_path
from recbole_dealrec.quick_start import run_recbole

K = 10
GAMMAS = (0.0, 1.0, 5.0, 25.0)  # popularity weights of BIGRec's grounding with statistical information (0 = off)


def test_targets(config) -> tuple[dict[int, set[int]], torch.Tensor]:
    """(internal user id -> its test item ids, training interactions per item [n_items]) of the run's dataset."""
    dataset = create_dataset(config)
    train, _, test = data_preparation(config, dataset)
    feat = test.dataset.inter_feat
    targets: dict[int, set[int]] = {}
    for u, i in zip(feat[test.dataset.uid_field].tolist(), feat[test.dataset.iid_field].tolist()):
        targets.setdefault(int(u), set()).add(int(i))
    popularity = torch.bincount(train.dataset.inter_feat[train.dataset.iid_field], minlength=dataset.item_num).double()
    return targets, popularity


def regrounded_metrics(generations: dict, targets: dict[int, set[int]], popularity: torch.Tensor, llm, tokenizer,
                       gammas=GAMMAS) -> dict[str, dict]:
    """Hits@K, Recall@K and NDCG@K of the answers under every (beams, pooling, popularity gamma) grounding."""
    titles = generations["item_titles"]
    rows = generations["rows"]
    index = title_index(titles)
    out = {}
    for pooling in POOLINGS:
        item_emb = last_token_embeddings(llm, tokenizer, titles[1:], batch_size=32, pooling=pooling)
        item_emb = torch.cat([torch.zeros(1, item_emb.shape[1]), item_emb])
        unique_answers = sorted({a for row in rows for a in row["answers"] if a})
        table = dict(zip(unique_answers, last_token_embeddings(llm, tokenizer, unique_answers, batch_size=32,
                                                               pooling=pooling)))

        def embed(texts: list[str]) -> torch.Tensor:
            return torch.stack([table[t] for t in texts])

        for beams_mode, gamma in [(m, g) for m in GROUNDING_BEAMS for g in gammas]:
            hits, recall, ndcg = 0, 0.0, 0.0
            for row in rows:
                scores = ground_answers([row["answers"]], torch.tensor([row["scores"]]), embed, item_emb, index,
                                        beams_mode, popularity, gamma)[0]
                # RecBole's full sort: ties broken by item id order (torch.topk is stable enough here for a report)
                top = scores.topk(K).indices.tolist()
                target = targets[row["user"]]
                found = [r for r, item in enumerate(top) if item in target]
                hits += len(found)
                recall += len(found) / len(target)
                ndcg += sum(1 / math.log2(r + 2) for r in found) / sum(1 / math.log2(r + 2) for r in range(min(len(target), K)))
            n = len(rows)
            out[f"{beams_mode}/{pooling}/gamma={gamma}"] = {"hits@10": hits, "recall@10": recall / n, "ndcg@10": ndcg / n}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the answers and summary.json")
    parser.add_argument("--config", default="run_scripts/configs/bigrec_ml100k_learn_cpu.yaml")
    parser.add_argument("--skip-zero-shot", action="store_true")
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--name", default="finetuned", help="name of the fine-tuned run in the summary")
    parser.add_argument("--reground", metavar="ANSWERS_JSON", default=None,
                        help="only ground again the answers of an earlier run (a bigrec_generations_file) and print")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for arg in rest:  # --key=value, parsed as literals like run_recbole's command line
        key, _, value = arg.lstrip("-").partition("=")
        overrides[key] = parse_literal(value)
    os.makedirs(args.out, exist_ok=True)
    if args.reground:
        config = DealrecConfig("BIGRec", "ml-100k", [args.config], overrides)
        llm, tokenizer = load_causal_lm(resolve_llm_path(config["llm_path"], config["llm_cache_dir"]))
        targets, popularity = test_targets(config)
        result = regrounded_metrics(json.load(open(args.reground)), targets, popularity, llm, tokenizer)
        print(json.dumps(result, indent=1))
        return
    summary_file = os.path.join(args.out, "summary.json")
    summary = json.load(open(summary_file)) if os.path.isfile(summary_file) else {}

    runs = []
    if not args.skip_zero_shot:
        runs.append(("zero_shot", {"epochs": 0}))
    if not args.skip_finetune:
        runs.append((args.name, {}))
    for name, extra in runs:
        gen_file = os.path.join(args.out, f"{name}-answers.json")
        cfg = {**overrides, **extra, "bigrec_generations_file": gen_file,
               "checkpoint_dir": os.path.join(args.out, f"{name}-ckpt")}
        start = time.time()
        result = run_recbole("BIGRec", "ml-100k", [args.config], cfg)
        summary[name] = {
            "settings": cfg,
            "test_result": result["test_result"],
            "answers": result["evaluation_facts"],
            "stage_seconds": result["selection"]["seconds"],
            "wall_seconds": round(time.time() - start, 1),
        }
        config = DealrecConfig("BIGRec", "ml-100k", [args.config], cfg)
        llm, tokenizer = load_causal_lm(resolve_llm_path(config["llm_path"], config["llm_cache_dir"]))
        generations = json.load(open(gen_file))
        targets, popularity = test_targets(config)
        summary[name]["groundings"] = regrounded_metrics(generations, targets, popularity, llm, tokenizer)
        n_items = len(generations["item_titles"]) - 1
        summary[name]["random_expected_hits@10"] = len(generations["rows"]) * K / n_items
        with open(summary_file + ".tmp", "w") as handle:
            json.dump(summary, handle, indent=1, default=str)
        os.replace(summary_file + ".tmp", summary_file)
        print(json.dumps({name: summary[name]}, indent=1, default=str), flush=True)


if __name__ == "__main__":
    sys.exit(main())
