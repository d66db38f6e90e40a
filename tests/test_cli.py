"""The console script end to end on the embedded ml-100k."""
import os
import re
import subprocess
import sys

from conftest import cli_argv


def test_console_script_random_sampler(tiny_config, tmp_path):
    argv = ["run_recbole", "--model=SASRec", "--sampler=random", "--selection_num=100", *cli_argv(tiny_config)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert re.search(r"kept 100 of 943 users, \d+ of \d+ training samples", output)
    test_line = [line for line in output.splitlines() if "test result" in line][-1]
    # plain numbers, readable in a log and in JSON (RecBole's own print np.float64(...))
    assert re.search(r"'recall@10': 0\.\d+", test_line) and "np." not in test_line, test_line
    assert re.search(r"'ndcg@10': 0\.\d+", test_line), test_line
    assert re.search(r"SASRec +0\.\d{4} +0\.\d{4}", output) and re.search(r"popularity +0\.\d{4}", output)
    (folder,) = (tmp_path / "out" / "ml-100k").glob("random-n100-seed2020-*")
    assert (folder / "selection.tsv").read_text().count("\n") == 101
    assert (folder / "ml-100k.inter").exists()


def test_python_dash_m_lists_samplers():
    result = subprocess.run([sys.executable, "-m", "recbole_dealrec", "--list-samplers"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    from recbole_dealrec.selection import SAMPLERS

    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == SAMPLERS.names() and "file" in names
    assert all(len(line.split()) > 3 for line in result.stdout.splitlines())  # each with its description


def test_seqpop_ranks_by_the_selected_users_popularity(tiny_config):
    from recbole_dealrec.quick_start import run_recbole

    result = run_recbole("SeqPop", config_dict={**tiny_config, "sampler": "random", "selection_num": 200})
    assert result["test_result"]["recall@10"] > 0.02  # popularity is a real signal on ml-100k (random: ~0.006)
