"""Bad-input matrix: each bad input through the installed CLI, with its exit code, the seconds before the error,
the message and whether anything was written. Prints a markdown table (the README's "Bad input and safety").

    python run_scripts/bad_input_matrix.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


class RunsCode:
    """Pickles as ``os.system(command)``: a crafted map that runs code when it is unpickled."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def paper_folder(root: str, bad_line: bool = False, no_titles: bool = False, titles: object = None) -> str:
    folder = os.path.join(root, "paper")
    os.makedirs(folder, exist_ok=True)
    for split in ("train", "valid", "test"):
        with open(os.path.join(folder, f"sequential_{split}.txt"), "w") as handle:
            handle.write("1 1 2 3\n2 2 x3\n" if bad_line and split == "train" else "1 1 2 3\n2 2 3\n")
    if not no_titles:
        titles = {"1": "a", "2": "b", "3": "c"} if titles is None else titles
        np.save(os.path.join(folder, "title_maps.npy"), {"seqid2title": titles}, allow_pickle=True)
    return folder


def cases(root: str):
    bad_yaml = os.path.join(root, "bad.yaml")
    with open(bad_yaml, "w") as handle:
        handle.write("epochs: [1, 2\n")
    no_type = os.path.join(root, "llm_no_type")
    os.makedirs(no_type, exist_ok=True)
    with open(os.path.join(no_type, "config.json"), "w") as handle:
        json.dump({"hidden_size": 8}, handle)
    toy = os.path.join(root, "data", "toy")
    os.makedirs(toy, exist_ok=True)
    with open(os.path.join(toy, "toy.inter"), "w") as handle:
        handle.write("user_id:token\titem_id:token\ttimestamp:float\n1\t1\t10\n2\t2\n3\t3\tnoon\n")
    run = ["run_recbole", "--model=SASRec"]
    yield "misspelled key", run + ["--sampler=random", "--selction_num=10"]
    yield "unknown sampler", run + ["--sampler=nope"]
    yield "budget above the users", run + ["--sampler=random", "--selection_num=5000"]
    yield "influence_params matching nothing", run + ["--sampler=dealrec", "--selection_num=10", "--influence_params=['nomatch']"]
    yield "llm_path missing (dealrec)", run + ["--sampler=dealrec", "--selection_num=10", f"--llm_path={root}/nope"]
    yield "config.json without model_type", run + ["--sampler=dealrec", "--selection_num=10", f"--llm_path={no_type}"]
    yield "BIGRec without titles", ["run_recbole", "--model=BIGRec", "--sampler=random", "--selection_num=10", "--title_field=None"]
    yield "invalid YAML", run + [f"--config_files={bad_yaml}"]
    yield "missing config file", run + [f"--config_files={root}/missing.yaml"]
    yield ".inter row with too few fields", run + ["--dataset=toy", f"--data_path={root}/data"]
    yield "topk above the items", run + ["--topk=[5000]", "--valid_metric=NDCG@5000"]
    yield "valid_metric cut-off not in topk", run + ["--topk=[5]"]
    yield "unknown dataset", run + ["--dataset=nope", f"--data_path={root}/data"]
    yield "importer: non-integer id", [sys.executable, "-m", "recbole_dealrec.data.importer", "--input",
                                       paper_folder(os.path.join(root, "p1"), bad_line=True), "--output", f"{root}/out/x"]
    yield "importer: no title_maps.npy", [sys.executable, "-m", "recbole_dealrec.data.importer", "--input",
                                          paper_folder(os.path.join(root, "p2"), no_titles=True), "--output", f"{root}/out/y"]
    importer = [sys.executable, "-m", "recbole_dealrec.data.importer", "--input"]
    yield "importer: code payload in title_maps.npy (runs nothing)", importer + [
        paper_folder(os.path.join(root, "p3"), titles=RunsCode(f"touch {os.path.join(root, 'PWNED')}")), "--output", f"{root}/out/z"]
    yield "importer: None title", importer + [
        paper_folder(os.path.join(root, "p4"), titles={"1": "a", "2": None, "3": "c"}), "--output", f"{root}/out/w"]
    yield "importer: integer keys in seqid2title", importer + [
        paper_folder(os.path.join(root, "p5"), titles={1: "a", 2: "b", 3: "c"}), "--output", f"{root}/out/v"]
    yield "importer: an item without a title", importer + [
        paper_folder(os.path.join(root, "p6"), titles={"1": "a", "2": "b"}), "--output", f"{root}/out/u"]
    p7 = paper_folder(os.path.join(root, "p7"))
    yield "importer: --output inside --input", importer + [p7, "--output", f"{p7}/games"]
    os.makedirs(f"{root}/links", exist_ok=True)
    os.symlink(p7, f"{root}/links/games")
    yield "importer: --output a symlink to --input", importer + [p7, "--output", f"{root}/links/games"]
    yield "code payload in a value (runs nothing)", run + ["--sampler=__import__('os').system('touch PWNED')"]
    # RecBole's own keys and the plugin's keys: type and range, before the data
    yield "epochs not a number", run + ["--epochs=ten"]
    yield "MAX_ITEM_LIST_LENGTH 0", run + ["--MAX_ITEM_LIST_LENGTH=0"]
    yield "train_batch_size 0", run + ["--train_batch_size=0"]
    yield "learning_rate -1", run + ["--learning_rate=-1"]
    yield "seed not a number", run + ["--seed=abc"]
    yield "a plugin float key given a word", run + ["--sampler=dealrec", "--selection_num=10", "--dealrec_lambda=abc"]
    yield "influence_damping neither a number nor auto", run + ["--sampler=dealrec", "--selection_num=10",
                                                               "--influence_damping=lots"]
    yield "selection_seed -1 (was: after the surrogate)", run + ["--sampler=dealrec", "--selection_num=10",
                                                                "--selection_seed=-1"]
    yield "reference_rows unknown", run + ["--reference_rows=['pop']"]
    yield "selection_export unknown format", run + ["--sampler=random", "--selection_num=10", "--selection_export=['csv']"]
    # outputs checked writable before the first long stage
    blocker = os.path.join(root, "a_file")
    with open(blocker, "w") as handle:
        handle.write("not a folder")
    yield "test_user_results_file not writable (was: after training)", run + [
        "--sampler=random", "--selection_num=10", f"--test_user_results_file={blocker}/users.npz"]
    yield "checkpoint_dir not writable", run + ["--sampler=random", "--selection_num=10", f"--checkpoint_dir={blocker}/ck"]
    # data identity and degenerate data
    yield "data_path without ml-100k (was: the embedded copy, silently)", run + [f"--data_path={root}/data"]
    empty = os.path.join(root, "data", "empty")
    os.makedirs(empty, exist_ok=True)
    with open(os.path.join(empty, "empty.inter"), "w") as handle:
        handle.write("user_id:token\titem_id:token\ttimestamp:float\n")
    yield "header-only .inter", run + ["--dataset=empty", f"--data_path={root}/data"]
    short = os.path.join(root, "data", "short")
    os.makedirs(short, exist_ok=True)
    with open(os.path.join(short, "short.inter"), "w") as handle:
        handle.write("user_id:token\titem_id:token\ttimestamp:float\n" + "".join(
            f"{u}\t{u % 5}\t{t}\n" for u in range(20) for t in range(2)))
    yield "users too short for valid/test", run + ["--dataset=short", f"--data_path={root}/data", "--topk=[3]",
                                                   "--valid_metric=MRR@3", "--load_col={'inter': ['user_id', 'item_id', 'timestamp']}"]
    # --sampler=file
    selections = os.path.join(root, "selections")
    os.makedirs(selections, exist_ok=True)
    for name, text in (("empty", "# none\n"), ("duplicate", "1\n2\n1\n"), ("unknown", "1\nnobody\n")):
        with open(os.path.join(selections, f"{name}.txt"), "w") as handle:
            handle.write(text)
    yield "selection_file missing", run + ["--sampler=file", f"--selection_file={selections}/missing.txt"]
    yield "selection_file empty", run + ["--sampler=file", f"--selection_file={selections}/empty.txt"]
    yield "selection_file with a duplicate user", run + ["--sampler=file", f"--selection_file={selections}/duplicate.txt"]
    yield "selection_file with an unknown user", run + ["--sampler=file", f"--selection_file={selections}/unknown.txt"]
    yield "sampler file with a budget", run + ["--sampler=file", f"--selection_file={selections}/unknown.txt",
                                               "--selection_num=5"]
    # selections out, grids and reports
    yield "export: not a selection folder", [sys.executable, "-m", "recbole_dealrec.export", root, "--format", "alpaca",
                                             "--out", os.path.join(root, "x.json")]
    results = os.path.join(root, "empty.jsonl")
    open(results, "w").close()
    yield "report over an empty results file", [sys.executable, "-m", "recbole_dealrec.experiment", "report", results,
                                                "--out", os.path.join(root, "report")]


def main() -> None:
    root = tempfile.mkdtemp(prefix="bad-input-")
    print("| bad input | exit | seconds | written | message |\n|---|---|---|---|---|")
    for name, args in cases(root):
        out = os.path.join(root, "runs", name.replace(" ", "_").replace(":", ""))
        if args[0] == "run_recbole":
            args = args + [f"--output_dir={out}"]
        start = time.perf_counter()
        result = subprocess.run(args, cwd=root, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        lines = [line for line in result.stderr.strip().splitlines() if line]
        message = lines[-1] if lines else ""
        written = os.path.exists(out) and any(files for _, _, files in os.walk(out))
        traceback = " (traceback!)" if "Traceback" in result.stderr else ""
        message = message.replace("|", "\\|")[:160]
        print(f"| {name} | {result.returncode} | {seconds:.1f} | {'yes' if written else 'no'} | `{message}`{traceback} |")
    print(f"\npayload ran: {os.path.exists(os.path.join(root, 'PWNED'))}")


if __name__ == "__main__":
    main()
