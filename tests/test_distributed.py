"""torch.distributed (gloo, 2 processes via torchrun): sharded influence and effort scores equal the
single-process scores, every rank makes the same selection, many-process fine-tuning takes the one-process steps
on the same global batches, sharded evaluation merges to the one-process metrics, and a failing rank fails the
run instead of hanging it."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from conftest import TINY_SASREC, TINY_SURROGATE, TINY_TIGER, cli_argv, tiny_bigrec_config
from recbole_dealrec.evaluation import load_user_results
from recbole_dealrec.scoring.cache import load_scores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], cwd, nproc: int = 1, module: str = "recbole_dealrec", timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    target = ["-m", module] if not module.endswith(".py") else [module]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", *target] if nproc > 1 else [sys.executable, *target]
    return subprocess.run(launcher + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def scores_by_user(folder: str, stage: str) -> dict[str, float]:
    (name,) = [f for f in os.listdir(folder) if f.startswith(stage + "-") and f.endswith(".npz")]
    tokens, values = load_scores(os.path.join(folder, name))
    return dict(zip(tokens.tolist(), values.tolist()))


def test_two_gloo_processes_score_and_select_like_one(tiny_llm_path, tmp_path):
    # The surrogate is trained data-parallel by the 2 ranks (no dropout: each rank would draw its own masks), the
    # signals are scored in shards (DEALRec's, GraNd's, EL2N's, TF-DCon's embeddings); each equals the one-process
    # run's and so does every selection.
    surrogate = {**TINY_SURROGATE, "epochs": 2, "train_batch_size": 333, "hidden_dropout_prob": 0.0,
                 "attn_dropout_prob": 0.0}
    outputs = {}
    for nproc in (1, 2):
        tmp = tmp_path / f"n{nproc}"
        config = {**tiny_bigrec_config(tiny_llm_path, tmp), **TINY_SASREC, "sampler": "dealrec", "selection_num": 40,
                  "dealrec_lambda": 0.5, "dealrec_num_groups": 5, "effort_backend": "BIGRec",
                  "surrogate_config": surrogate, "influence_power_iters": 3,
                  # the exact solve (m = 64): 5 CG steps far from convergence would amplify the float-order
                  # differences of the all-reduced sums; the sums themselves are what is compared here
                  "ihvp_solver": "exact",
                  "influence_params": [r"trm_encoder\.layer\.0\.multi_head_attention\.dense\.weight$"],
                  "effort_batch_size": 64, "report_plots": False,
                  # GraNd averages a second seeded run, trained (data-parallel) for its epoch when asked for
                  "grand_epoch": 1, "grand_seeds": 2, "el2n_epoch": 1}
        config["llm_max_length"] = 128  # a SASRec run: the BIGRec keys are the effort backend's
        logs = ""
        for sampler in ("dealrec", "grand", "el2n", "tfdcon"):
            done = run(cli_argv({**config, "sampler": sampler}) + ["--model=SASRec"], tmp_path, nproc)
            assert done.returncode == 0, "\n".join(line for line in done.stderr.splitlines() if "Error" in line)[-3000:]
            logs += done.stderr + done.stdout
        outputs[nproc] = (tmp / "out" / "ml-100k", logs)
    one, two = outputs[1][0], outputs[2][0]
    for stage in ("influence", "effort", "grand", "el2n", "surrogate_embedding", "text_embedding"):
        a, b = scores_by_user(str(one / "cache"), stage), scores_by_user(str(two / "cache"), stage)
        assert a.keys() == b.keys() and len(a) == 943
        x, y = np.array([a[u] for u in a]), np.array([b[u] for u in a])
        assert np.allclose(x, y, rtol=1e-5, atol=1e-5 * np.abs(x).max()), (stage, np.abs(x - y).max())
    log = outputs[2][1]
    assert "rank 0 scored" in log and "rank 1 scored" in log and "(2 processes)" in log
    for sampler in ("dealrec", "grand", "el2n", "tfdcon"):
        (sel_one,) = [d for d in os.listdir(one) if d.startswith(sampler + "-")]
        (sel_two,) = [d for d in os.listdir(two) if d.startswith(sampler + "-")]
        users_one = open(one / sel_one / "selection.tsv").read().splitlines()
        users_two = open(two / sel_two / "selection.tsv").read().splitlines()
        assert [r.split("\t")[0] for r in users_one] == [r.split("\t")[0] for r in users_two], sampler
        assert json.load(open(two / sel_two / "selection.json"))["world_size"] == 2


def fine_tune(model: str, config: dict, tmp_path, nproc: int):
    """Run ``model`` under ``nproc`` processes; return (trained weights, user results, log)."""
    tmp = tmp_path / f"{model}-n{nproc}"
    config = {**config, "checkpoint_dir": str(tmp / "ckpt"), "output_dir": str(tmp / "out"),
              "test_user_results_file": str(tmp / "users.npz")}
    done = run(cli_argv(config) + [f"--model={model}"], tmp_path, nproc)
    assert done.returncode == 0, "\n".join(line for line in done.stderr.splitlines() if "Error" in line)[-3000:]
    (best,) = [f for f in (tmp / "ckpt").glob(f"{model}-*.pth") if not f.name.endswith("-last.pth")]
    state = torch.load(best, map_location="cpu", weights_only=True)
    return state, load_user_results(str(tmp / "users.npz")), done.stderr + done.stdout


def test_many_process_fine_tuning_and_evaluation_equal_one_process(tiny_llm_path, tmp_path):
    # No dropout (each rank draws its own masks); batch sizes that split unevenly over 2 ranks (the shares are
    # weighted by their loss terms: BIGRec's target tokens differ per row).
    runs = {
        "TIGER": {**TINY_TIGER, "tiger_dropout": 0.0, "sampler": "random", "selection_num": 60, "epochs": 2,
                  "train_batch_size": 33, "eval_batch_size": 7, "eval_user_subset": 30, "valid_user_subset": 25},
        "BIGRec": {**tiny_bigrec_config(tiny_llm_path, tmp_path), "lora_dropout": 0.0, "sampler": "random",
                   "selection_num": 9, "train_batch_size": 5, "gradient_accumulation_steps": 2, "epochs": 1,
                   "eval_user_subset": 9, "valid_user_subset": 7},
    }
    for model, config in runs.items():
        (s1, users1, _), (s2, users2, log2) = (fine_tune(model, config, tmp_path, n) for n in (1, 2))
        # the same optimizer steps were taken (on the same global batches), and they moved the weights alike
        assert s1["optimizer_steps"] == s2["optimizer_steps"] > 0 and s1["epoch"] == s2["epoch"]
        assert s2["best_valid_score"] == pytest.approx(s1["best_valid_score"], rel=1e-6)
        w1, w2 = s1["weights"], s2["weights"]
        assert w1.keys() == w2.keys()
        for key in w1:
            torch.testing.assert_close(w2[key], w1[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{model} {key}: {m}")
        # every user tested, with the same hits, in the same order
        assert "rank 1 evaluates" in log2 and "in collectives" in log2
        np.testing.assert_array_equal(users2["user_id"], users1["user_id"])
        np.testing.assert_array_equal(users2["hits"], users1["hits"])
        assert len(users1["user_id"]) == config["eval_user_subset"]


def test_a_failing_rank_fails_the_run_with_its_error(tmp_path):
    script = tmp_path / "fail_one_rank.py"
    script.write_text(textwrap.dedent("""
        from recbole_dealrec import distributed
        distributed.init_from_env(timeout_s=20)
        if distributed.rank() == 1:
            raise ValueError("rank 1 broke on purpose")
        distributed.barrier()   # rank 0 waits for a rank that is gone
        distributed.barrier()
    """))
    start = time.perf_counter()
    done = run([], tmp_path, nproc=2, module=str(script), timeout=300)
    assert done.returncode != 0
    assert "rank 1 broke on purpose" in done.stderr
    assert time.perf_counter() - start < 200
