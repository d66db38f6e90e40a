"""Peak memory of a sequential model's full-sort validation with and without the score-entry bound of
``data_preparation`` (``recbole_dealrec.data.dataset.FULL_SORT_SCORE_ENTRIES``), each in its own process: the
same metrics, the peak RSS and seconds of each, and their ratios.

    python run_scripts/bench_eval_memory.py --dataset book_like_1 --data_path <folder above it>

The model is an untrained SASRec of the paper's surrogate size (64 x 2, length 50), seeded: the bound changes the
batches, not the scores, so its weights do not matter.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys


def run_one(args) -> dict:
    import torch
    from recbole.trainer import Trainer

    import recbole_dealrec.data.dataset as dataset_module
    from recbole_dealrec.config import DealrecConfig
    from recbole_dealrec.data import create_dataset, data_preparation
    from recbole_dealrec.model import get_model
    from recbole_dealrec.utils import StageTimer

    if args.one == "unbounded":
        dataset_module.FULL_SORT_SCORE_ENTRIES = 1 << 62
    config = DealrecConfig("SASRec", args.dataset, config_dict={
        **({"data_path": args.data_path} if args.data_path else {}), "hidden_size": 64, "inner_size": 256,
        "n_layers": 2, "n_heads": 2, "MAX_ITEM_LIST_LENGTH": 50, "eval_batch_size": args.eval_batch_size,
        "show_progress": False})
    timer = StageTimer(0.02)
    with timer("data"):
        _, valid, _ = data_preparation(config, create_dataset(config))
    torch.manual_seed(0)
    model = get_model("SASRec")(config, valid.dataset).eval()
    with timer("validation"):
        result = Trainer(config, model).evaluate(valid, load_best_model=False, show_progress=False)
    return {"setting": args.one, "rows_per_batch": valid.step, "metrics": {k: float(v) for k, v in result.items()},
            "peak_gb": timer.peak_gb["validation"], "seconds": timer.seconds["validation"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--eval-batch-size", type=int, default=4096)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # one setting, in a child process
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args)))
        return
    rows = {}
    for setting in ("unbounded", "bounded"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", setting], check=True,
                             capture_output=True, text=True).stdout
        rows[setting] = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    for setting, row in rows.items():
        print(f"{setting:9s}  {row['rows_per_batch']:5d} rows per batch   validation peak RSS {row['peak_gb']:6.2f} GB   "
              f"{row['seconds']:7.1f} s")
    same = rows["bounded"]["metrics"] == rows["unbounded"]["metrics"]
    print(f"bounded / unbounded: peak {rows['bounded']['peak_gb'] / rows['unbounded']['peak_gb']:.3f}, seconds "
          f"{rows['bounded']['seconds'] / rows['unbounded']['seconds']:.3f}; metrics {'identical' if same else 'DIFFER'}: "
          f"{rows['bounded']['metrics']}")


if __name__ == "__main__":
    main()
