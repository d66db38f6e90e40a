"""torch.distributed (gloo, 2 processes via torchrun): sharded influence and effort scores equal the
single-process scores, and every rank makes the same selection."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY_SASREC, TINY_SURROGATE, cli_argv, tiny_bigrec_config
from recbole_dealrec.scoring.cache import load_scores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], cwd, nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", "-m", "recbole_dealrec"] if nproc > 1 else \
        [sys.executable, "-m", "recbole_dealrec"]
    return subprocess.run(launcher + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def scores_by_user(folder: str, stage: str) -> dict[str, float]:
    (name,) = [f for f in os.listdir(folder) if f.startswith(stage + "-") and f.endswith(".npz")]
    tokens, values = load_scores(os.path.join(folder, name))
    return dict(zip(tokens.tolist(), values.tolist()))


def test_two_gloo_processes_score_and_select_like_one(tiny_llm_path, tmp_path):
    outputs = {}
    for nproc in (1, 2):
        tmp = tmp_path / f"n{nproc}"
        config = {**tiny_bigrec_config(tiny_llm_path, tmp), **TINY_SASREC, "sampler": "dealrec", "selection_num": 40,
                  "dealrec_lambda": 0.5, "dealrec_num_groups": 5, "effort_backend": "BIGRec",
                  "surrogate_config": TINY_SURROGATE, "influence_power_iters": 3,
                  # the exact solve (m = 64): 5 CG steps far from convergence would amplify the float-order
                  # differences of the all-reduced sums; the sums themselves are what is compared here
                  "ihvp_solver": "exact",
                  "influence_params": [r"trm_encoder\.layer\.0\.multi_head_attention\.dense\.weight$"],
                  "effort_batch_size": 64, "report_plots": False}
        config["llm_max_length"] = 128  # a SASRec run: the BIGRec keys are the effort backend's
        done = run(cli_argv(config) + ["--model=SASRec"], tmp_path, nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[nproc] = (tmp / "out" / "ml-100k", done.stderr + done.stdout)
    one, two = outputs[1][0], outputs[2][0]
    for stage in ("influence", "effort"):
        a, b = scores_by_user(str(one / "cache"), stage), scores_by_user(str(two / "cache"), stage)
        assert a.keys() == b.keys() and len(a) == 943
        x, y = np.array([a[u] for u in a]), np.array([b[u] for u in a])
        assert np.allclose(x, y, rtol=1e-6, atol=1e-6 * np.abs(x).max()), (stage, np.abs(x - y).max())
    log = outputs[2][1]
    assert "rank 0 scored" in log and "rank 1 scored" in log
    (sel_one,) = [d for d in os.listdir(one) if d.startswith("dealrec-")]
    (sel_two,) = [d for d in os.listdir(two) if d.startswith("dealrec-")]
    users_one = open(one / sel_one / "selection.tsv").read().splitlines()
    users_two = open(two / sel_two / "selection.tsv").read().splitlines()
    assert [r.split("\t")[0] for r in users_one] == [r.split("\t")[0] for r in users_two]
    assert json.load(open(two / sel_two / "selection.json"))["world_size"] == 2
