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
