"""``python -m recbole_dealrec.stream --model=M --sampler=S [--dataset=D] [--stream_periods=N] [--key=value ...]``:
every round of a stream (properties/stream.yaml), then its report.
``python -m recbole_dealrec.stream compare FOLDER [FOLDER ...] --out OUT [--metric M]``: streams side by side."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from recbole_dealrec import distributed
from recbole_dealrec.errors import ConfigError
from recbole_dealrec.stream.runner import run_stream


def compare(argv: Sequence[str]) -> None:
    from recbole_dealrec.stream.report import write_comparison

    parser = argparse.ArgumentParser(prog="python -m recbole_dealrec.stream compare",
                                     description="streams of one dataset and cut side by side, per round")
    parser.add_argument("folders", nargs="+", help="stream_output folders (each with its report.json)")
    parser.add_argument("--out", required=True, help="folder for streams.md, streams.json and streams.png")
    parser.add_argument("--metric", default=None, help="the compared and plotted metric (default: the last, e.g. "
                        "recall@20)")
    parser.add_argument("--reference", default=None, help="the stream label the others are compared with, paired by "
                        "seed (e.g. 'random / scratch'; default: the stream not updated, '... / none', else the first)")
    args = parser.parse_args(argv)
    try:
        write_comparison(args.folders, args.out, args.metric, args.reference)
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"wrote {args.out}/streams.md, streams.json, streams.png")


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        return compare(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m recbole_dealrec.stream", description=__doc__.splitlines()[0])
    parser.add_argument("--model", "-m", default=None, help="plugin or RecBole model name (e.g. TIGER, BIGRec)")
    parser.add_argument("--dataset", "-d", default=None, help="dataset name (default: the embedded ml-100k)")
    parser.add_argument("--config_files", default=None, help="comma- or space-separated property files")
    args, rest = parser.parse_known_args(argv)
    files = [f for f in (args.config_files or "").replace(",", " ").split() if f]
    try:
        report = run_stream(args.model, args.dataset, files, argv=rest)
    except (ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    finally:
        distributed.shutdown()
    for record in report["rounds"]:
        print(f"round {record['round']}: {record['test_result']}")


if __name__ == "__main__":
    main(sys.argv[1:])
