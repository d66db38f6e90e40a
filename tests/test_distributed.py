"""torch.distributed (gloo, 1-3 processes via torchrun): the scores and selections are the one-process ones bit for
bit, many-process fine-tuning takes the one-process step on the same global batch, sharded evaluation merges to
the one-process metrics exactly, and a failing rank fails the run instead of hanging it."""
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
import yaml

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


BLOCK_SCRIPT = """
import json, sys
import numpy as np, torch
from recbole_dealrec import distributed
distributed.init_from_env(timeout_s=120)
rng = np.random.default_rng(0)
rows = torch.from_numpy(rng.standard_normal((37, 101)).astype(np.float32) * 10.0 ** rng.integers(-4, 4, (37, 1)))
total = distributed.ordered_sum(len(rows), lambda block: rows[block.start:block.stop].sum(0), like=rows[0], n_blocks=7)
per_row = distributed.map_blocks(rows, lambda block: block @ rows[0], block_size=5)
if distributed.is_main():
    json.dump({"total": total.numpy().tobytes().hex(), "rows": per_row.numpy().tobytes().hex()}, open(sys.argv[1], "w"))
distributed.shutdown()
"""


def test_block_reductions_are_the_same_bits_for_one_two_and_three_processes(tmp_path):
    # Summed in an order that depends on the number of ranks, float32 rows of magnitudes 1e-4 .. 1e3 would differ
    # in their last bits; block sums added in block order do not.
    script = tmp_path / "blocks.py"
    script.write_text(BLOCK_SCRIPT)
    results = []
    for nproc in (1, 2, 3):
        done = run([str(tmp_path / f"n{nproc}.json")], tmp_path, nproc, module=str(script), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results.append(json.load(open(tmp_path / f"n{nproc}.json")))
    assert results[0] == results[1] == results[2]


def test_one_two_and_three_gloo_processes_score_and_select_the_same_bits(tiny_llm_path, tmp_path):
    # The surrogate is trained by rank 0 alone (the others read its cache); every summed pass over the users
    # (DEALRec's mean gradient and HVPs) is cut into fixed blocks added in block order, and every per-user signal
    # (influence, effort, GraNd, EL2N, TF-DCon's embeddings) is computed in fixed blocks, whatever the number of
    # processes: scores and selections equal bit for bit for 1, 2 and 3 processes.
    surrogate = {**TINY_SURROGATE, "epochs": 2, "train_batch_size": 333}
    outputs = {}
    for nproc in (1, 2, 3):
        tmp = tmp_path / f"n{nproc}"
        config = {**tiny_bigrec_config(tiny_llm_path, tmp), **TINY_SASREC, "sampler": "dealrec", "selection_num": 40,
                  "dealrec_lambda": 0.5, "dealrec_num_groups": 5, "effort_backend": "BIGRec",
                  "surrogate_config": surrogate, "influence_power_iters": 3, "cg_max_iter": 5,
                  "influence_params": [r"trm_encoder\.layer\.0\.multi_head_attention\.dense\.weight$"],
                  "effort_batch_size": 64, "report_plots": False,
                  # GraNd averages a second seeded run, trained for its epoch when asked for
                  "grand_epoch": 1, "grand_seeds": 2, "el2n_epoch": 1}
        config["llm_max_length"] = 128  # a SASRec run: the BIGRec keys are the effort backend's
        logs = ""
        for sampler in ("dealrec", "grand", "el2n", "tfdcon"):
            done = run(cli_argv({**config, "sampler": sampler}) + ["--model=SASRec"], tmp_path, nproc)
            assert done.returncode == 0, "\n".join(line for line in done.stderr.splitlines() if "Error" in line)[-3000:]
            logs += done.stderr + done.stdout
        outputs[nproc] = (tmp / "out" / "ml-100k", logs)
    one = outputs[1][0]
    for nproc in (2, 3):
        many, log = outputs[nproc]
        for stage in ("influence", "effort", "grand", "el2n", "surrogate_embedding", "text_embedding"):
            a, b = scores_by_user(str(one / "cache"), stage), scores_by_user(str(many / "cache"), stage)
            assert list(a) == list(b) and len(a) == 943
            x, y = np.array(list(a.values())), np.array(list(b.values()))
            assert x.tobytes() == y.tobytes(), (nproc, stage, np.abs(x - y).max())
        assert all(f"rank {r} scored" in log for r in range(nproc)) and "rank 0 alone" in log
        for sampler in ("dealrec", "grand", "el2n", "tfdcon"):
            (sel_one,) = [d for d in os.listdir(one) if d.startswith(sampler + "-")]
            (sel_many,) = [d for d in os.listdir(many) if d.startswith(sampler + "-")]
            assert open(many / sel_many / "selection.tsv").read() == open(one / sel_one / "selection.tsv").read()
            assert json.load(open(many / sel_many / "selection.json"))["world_size"] == nproc


def fine_tune(model: str, config: dict, tmp_path, nproc: int):
    """Run ``model`` under ``nproc`` processes; return (checkpoint or None, user results, log)."""
    tmp = tmp_path / f"{model}-e{config['epochs']}-n{nproc}"
    config = {**config, "checkpoint_dir": str(tmp / "ckpt"), "output_dir": str(tmp / "out"),
              "test_user_results_file": str(tmp / "users.npz")}
    done = run(cli_argv(config) + [f"--model={model}"], tmp_path, nproc)
    assert done.returncode == 0, "\n".join(line for line in done.stderr.splitlines() if "Error" in line)[-3000:]
    best = [f for f in (tmp / "ckpt").rglob(f"{model}-*.pth") if not f.name.endswith("-last.pth")]
    state = torch.load(best[0], map_location="cpu", weights_only=True) if best else None
    return state, load_user_results(str(tmp / "users.npz")), done.stderr + done.stdout


def logged_test_results(log: str) -> set[str]:
    """The test result every rank logged (one line per rank)."""
    return {line.split("test result", 1)[1] for line in log.splitlines() if "test result" in line}


# No dropout (each rank draws its own masks); batch sizes that split unevenly over 2 ranks (the shares are weighted by
# their loss terms: BIGRec's target tokens differ per row).
FINE_TUNING_RUNS = {
    # every micro-batch of an epoch accumulated into one optimizer step (the last, partial window)
    "TIGER": lambda llm, tmp: {**TINY_TIGER, "tiger_dropout": 0.0, "sampler": "random", "selection_num": 60,
                               "train_batch_size": 33, "gradient_accumulation_steps": 1000, "eval_batch_size": 7,
                               "eval_user_subset": 30, "valid_user_subset": 25},
    "BIGRec": lambda llm, tmp: {**tiny_bigrec_config(llm, tmp), "lora_dropout": 0.0, "sampler": "random",
                                "selection_num": 9, "train_batch_size": 5, "gradient_accumulation_steps": 2,
                                "eval_user_subset": 9, "valid_user_subset": 7},
}


@pytest.mark.parametrize("model", sorted(FINE_TUNING_RUNS))
def test_many_process_fine_tuning_takes_the_one_process_step(model, tiny_llm_path, tmp_path):
    # One optimizer step on the same global batch: the ranks' weighted shares, all-reduced, give the one-process
    # loss and gradient up to float order (~1e-7 relative), and one Adam step moves every weight by
    # lr * g / (|g| + eps) (lr 1e-4 for BIGRec, 1e-3 for TIGER): about lr * sign(g), so a wrong gradient moves weights
    # by ~lr. Where |g| is near eps the float order shows in the step itself, so the weights agree to 1e-3 of a step
    # (seen: 1.3e-7 on one TIGER weight of 2,048 whose gradient is that small). Adam's step is blind to the gradient's
    # scale, so the epoch's loss (the sum of the ranks' weighted shares) is compared too.
    # (Over hundreds of steps the float-order differences grow: 6e-4 after 400 steps, so a whole training run is
    # not compared.)
    config = {**FINE_TUNING_RUNS[model](tiny_llm_path, tmp_path), "epochs": 1}
    (s1, _, _), (s2, _, log2) = (fine_tune(model, config, tmp_path, n) for n in (1, 2))
    assert s1["optimizer_steps"] == s2["optimizer_steps"] == 1 and s1["epoch"] == s2["epoch"] == 0
    assert s2["train_loss"][0] == pytest.approx(s1["train_loss"][0], rel=1e-6)
    assert s2["best_valid_score"] == pytest.approx(s1["best_valid_score"], rel=1e-6)
    w1, w2 = s1["weights"], s2["weights"]
    assert w1.keys() == w2.keys()
    step = config.get("learning_rate") or yaml.safe_load(open(os.path.join(
        os.path.dirname(__file__), "..", "properties", "model", f"{model}.yaml")))["learning_rate"]
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=2e-6, atol=1e-3 * step, msg=lambda m: f"{model} {key}: {m}")
    assert "in collectives" in log2


@pytest.mark.parametrize("model", sorted(FINE_TUNING_RUNS))
def test_sharded_evaluation_merges_to_the_one_process_metrics_exactly(model, tiny_llm_path, tmp_path):
    # The same weights (epochs 0: the seeded initial state, rank 0's broadcast to every rank): each rank tests its
    # share of the users; the merged per-user results and metrics are the one-process ones exactly. Enough test
    # users that the untrained TIGER's random ranking hits some targets (the metrics are not all zero).
    config = {**FINE_TUNING_RUNS[model](tiny_llm_path, tmp_path), "epochs": 0,
              "eval_user_subset": {"TIGER": 300, "BIGRec": 40}[model]}
    (_, users1, log1), (_, users2, log2) = (fine_tune(model, config, tmp_path, n) for n in (1, 2))
    assert "rank 1 evaluates" in log2
    assert users2.keys() == users1.keys() >= {"user_id", "hits", "n_targets", "target_item"}
    for key in users1:
        np.testing.assert_array_equal(users2[key], users1[key], err_msg=key)
    assert len(users1["user_id"]) == config["eval_user_subset"]
    assert model != "TIGER" or users1["hits"].any()
    assert len(logged_test_results(log1)) == 1 and logged_test_results(log2) == logged_test_results(log1)


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


def test_a_stream_under_two_processes_gives_the_one_process_rounds(tmp_path):
    """python -m recbole_dealrec.stream under torchrun: rank 0 writes the round datasets before the others read
    them, every round's metrics are the one-process ones exactly (no training: epochs 0, the continued backend
    starts from the previous round's weights), and the stream's files are written once."""
    from test_stream import stream_dict, write_dataset

    write_dataset(tmp_path / "data" / "toy", "toy", n_users=48, n_items=120)
    reports = []
    for nproc in (1, 2):
        config = {**stream_dict(tmp_path, stream_periods=3, stream_update="incremental",
                                stream_output=str(tmp_path / f"stream{nproc}")),
                  **TINY_TIGER, "tiger_codebook_size": 16, "title_field": "title", "epochs": 0, "dataset": "toy",
                  "eval_user_subset": None}
        done = run(cli_argv(config) + ["--model=TIGER"], tmp_path, nproc, module="recbole_dealrec.stream")
        assert done.returncode == 0, "\n".join(line for line in done.stderr.splitlines() if "Error" in line)[-3000:]
        reports.append(json.load(open(tmp_path / f"stream{nproc}" / "report.json")))
    one, two = ([r["test_result"] for r in report["rounds"]] for report in reports)
    assert one == two and len(one) == 2 and any(v for r in one for v in r.values())
    assert [r["selection"]["world_size"] for r in reports[1]["rounds"]] == [2, 2]
    started = [r["selection"]["backend_start_digest"] for r in reports[1]["rounds"]]
    assert started[1] == reports[1]["rounds"][0]["selection"]["backend_export"]["digest"]
