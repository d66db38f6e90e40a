"""Peak memory of TIGER's test-time beam search at a wide beam, with and without ``tiger_decode_rows`` (issue 25
item 5): one fresh process per setting, the same model (the Games CPU grid's, seeded), users and evaluation batch.

    python run_scripts/bench_tiger_memory.py --dataset games --data_path <data_path> \\
        --output_dir <folder holding games/cache> --beams 50 --batch-size 4096 --users 4096

``tiger_decode_rows`` = users x beams per beam-search call (default 8192); "unbounded" searches the whole evaluation
batch in one call (the behaviour before the key). Prints each setting's peak RSS, its growth over the process's
resident memory before the search, the seconds, and whether the answers agree.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

UNBOUNDED = 1 << 40


def one(args) -> dict:
    import torch

    from recbole_dealrec.utils import resident_bytes

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_tiger_decoding import seeded_tiger

    model, test_data = seeded_tiger(args.dataset, args.data_path, args.output_dir, topk=[10, 20, 50],
                                    eval_batch_size=args.batch_size, tiger_num_beams=args.beams,
                                    tiger_decode_rows=args.rows)
    interaction = next(iter(test_data))[0]
    interaction = interaction[torch.arange(min(args.users, len(interaction)))]
    before = resident_bytes()
    start = time.perf_counter()
    items, scores = model.generate(interaction)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rows": args.rows, "users": len(interaction), "beams": args.beams, "seconds": seconds,
            "before_gb": before / 1e9, "peak_gb": peak / 1e9, "items": items.tolist()[:50], "score_sum": float(scores.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--output_dir", default="saved/bench_tiger")
    parser.add_argument("--beams", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--users", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rows is not None:
        print("RESULT " + json.dumps(one(args)))
        return
    results = []
    for rows in (UNBOUNDED, 8192):
        command = [sys.executable, __file__, "--dataset", args.dataset, "--output_dir", args.output_dir, "--beams",
                   str(args.beams), "--batch-size", str(args.batch_size), "--users", str(args.users), "--rows", str(rows)]
        if args.data_path:
            command += ["--data_path", args.data_path]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    for r in results:
        label = "unbounded (one call)" if r["rows"] == UNBOUNDED else f"tiger_decode_rows {r['rows']}"
        print(f"{label}: {r['users']} users x {r['beams']} beams: peak RSS {r['peak_gb']:.2f} GB "
              f"(+{r['peak_gb'] - r['before_gb']:.2f} over {r['before_gb']:.2f} before the search), {r['seconds']:.1f} s")
    print(f"peak ratio bounded / unbounded: {results[1]['peak_gb'] / results[0]['peak_gb']:.3f}; same first items: "
          f"{results[0]['items'] == results[1]['items']}; score sums {results[0]['score_sum']:.3f} / "
          f"{results[1]['score_sum']:.3f}")


if __name__ == "__main__":
    main()
