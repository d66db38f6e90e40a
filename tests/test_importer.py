"""The paper-format importer: synthetic round trip, RecBole loading with the paper's protocol, real Games; safety
(crafted maps run nothing, --output never inside --input, all files or none, malformed maps named)."""
import os

import numpy as np
import pytest
import torch
from recbole.evaluator import Collector, Evaluator

from conftest import GAMES_DIR
from recbole_dealrec.config import DealrecConfig
from recbole_dealrec.data import create_dataset, data_preparation
from recbole_dealrec.data.importer import CATEGORY_SEPARATOR, import_paper_dataset
from recbole_dealrec.errors import ConfigError

# uid -> (train, valid, test) items, 1-based as in the paper's files; user 4 has no valid/test items.
SEQUENCES = {
    1: ([1, 2, 3, 4], [5], [6, 7]),
    2: ([2, 3, 5, 2], [], [1]),
    3: ([7, 6, 5], [4, 3], []),
    4: ([1, 3], [], []),
    5: ([4, 5, 6, 7, 1], [2], [3, 2, 4]),
}
TITLES = {1: 'Ivan "Ironman" Stewart\'s Super Off Road', 2: "Anno 2070", 3: "Anno 2070",
          4: "  spaced  title ", 5: "X: Beyond - PC", 6: "title_6", 7: "Über Spiel"}


def write_paper_folder(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for index, split in enumerate(("train", "valid", "test")):
        lines = [" ".join(map(str, [uid, *parts[index]])) for uid, parts in SEQUENCES.items()]
        (folder / f"sequential_{split}.txt").write_text("\n".join(lines) + "\n")
    np.save(folder / "title_maps.npy", {"seqid2title": {str(k): v for k, v in TITLES.items()},
                                        "recid2title": {k - 1: v for k, v in TITLES.items()}}, allow_pickle=True)
    np.save(folder / "category_map.npy",
            {"recid2category": {k - 1: ["Video Games", "PC\tjunk"] for k in TITLES}}, allow_pickle=True)


@pytest.fixture
def imported(tmp_path):
    source = tmp_path / "paper"
    write_paper_folder(source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    counts = import_paper_dataset(str(source), str(tmp_path / "data" / "games"))
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before  # input untouched
    return tmp_path / "data", counts


def test_round_trip_ids_order_split_titles(imported):
    data, counts = imported
    assert counts == {"name": "games", "users": 5, "items": 7, "train": 18, "valid": 4, "test": 6}
    rows = [line.split("\t") for line in (data / "games" / "games.inter").read_text().splitlines()]
    assert rows[0] == ["user_id:token", "item_id:token", "timestamp:float", "split:token"]
    rebuilt = {uid: ([], [], []) for uid in SEQUENCES}
    last_position = {}
    for uid, item, position, split in rows[1:]:
        uid, position = int(uid), int(float(position))
        assert position == last_position.get(uid, -1) + 1  # each user's order kept
        last_position[uid] = position
        rebuilt[uid][("train", "valid", "test").index(split)].append(int(item))
    assert rebuilt == {uid: tuple(map(list, parts)) for uid, parts in SEQUENCES.items()}
    items = [line.split("\t") for line in (data / "games" / "games.item").read_text(encoding="utf-8").split("\n")[1:-1]]
    assert {int(i): title for i, title, _ in items} == TITLES
    assert items[0][2] == CATEGORY_SEPARATOR.join(["Video Games", "PC junk"])


def test_recbole_loads_the_paper_protocol(imported):
    data, _ = imported
    config = DealrecConfig("SASRec", "games", config_dict={"data_path": str(data), "MAX_ITEM_LIST_LENGTH": 10})
    dataset = create_dataset(config)
    assert dataset.user_num - 1 == 5 and dataset.item_num - 1 == 7
    train, valid, test = data_preparation(config, dataset)
    token = lambda field, ids: [int(t) for t in dataset.id2token(field, ids)]  # noqa: E731

    # train: one sample per train item but each user's first
    assert len(train.dataset) == sum(len(t) - 1 for t, _, _ in SEQUENCES.values())
    # valid: users with valid items; history = train items, target = first valid item
    inter = valid.dataset.inter_feat
    got = {}
    for row in range(len(inter)):
        uid = token("user_id", [inter["user_id"][row].item()])[0]
        history = token("item_id", inter["item_id_list"][row][: inter["item_length"][row]].numpy())
        got[uid] = (history, token("item_id", [inter["item_id"][row].item()])[0])
    assert got == {u: (t, v[0]) for u, (t, v, _) in SEQUENCES.items() if v}
    # test: users with test items; history = train + valid, targets = all test items (one row per user)
    rows = {}
    for interaction, _, positive_u, positive_i in test:
        for row in range(len(interaction)):
            uid = token("user_id", [interaction["user_id"][row].item()])[0]
            history = token("item_id", interaction["item_id_list"][row][: interaction["item_length"][row]].numpy())
            rows[uid] = (history, sorted(token("item_id", positive_i[positive_u == row].numpy())))
    assert rows == {u: (t + v, sorted(set(e))) for u, (t, v, e) in SEQUENCES.items() if e}


def test_presplit_splits_without_the_split_list_equal_those_with_it(imported):
    """The pre-split build reads each history's last split without RecBole's split_list: train, valid and test
    rows (and test targets) are those built with every list."""
    data, _ = imported
    built = {}
    for lists in ("all", "auto"):
        config = DealrecConfig("SASRec", "games", config_dict={"data_path": str(data), "sequence_list_fields": lists})
        built[lists] = create_dataset(config).build()
    assert "split_list" in built["all"][0].inter_feat.columns and "split_list" not in built["auto"][0].inter_feat.columns
    for full, lean in zip(built["all"], built["auto"]):
        assert len(lean) == len(full) > 0
        for field in lean.inter_feat.columns:
            assert torch.equal(lean.inter_feat[field], full.inter_feat[field]), field
    assert torch.equal(built["auto"][2].multi_targets, built["all"][2].multi_targets)


def test_multi_target_metrics_follow_the_paper(imported):
    """Recall@K = hits / #targets and NDCG@K over min(#targets, K), from RecBole's own metric classes."""
    data, _ = imported
    config = DealrecConfig("SASRec", "games", config_dict={"data_path": str(data), "topk": [2]})
    dataset = create_dataset(config)
    _, _, test = data_preparation(config, dataset)
    interaction, _, positive_u, positive_i = next(iter(test))
    item_id = lambda token: dataset.token2id("item_id", str(token))  # noqa: E731
    # Rank item 2 then 6 first for everybody; user 1 targets {6, 7}, user 2 {1}, user 5 {3, 2, 4}.
    scores = torch.zeros(len(interaction), dataset.item_num)
    scores[:, item_id(2)], scores[:, item_id(6)] = 2.0, 1.0
    scores[:, 0] = -np.inf
    collector, evaluator = Collector(config), Evaluator(config)
    collector.eval_batch_collect(scores, interaction, positive_u, positive_i)
    result = evaluator.evaluate(collector.get_data_struct())
    users = [int(t) for t in dataset.id2token("user_id", interaction["user_id"].numpy())]
    hits = {1: [0, 1], 2: [0, 0], 5: [1, 0]}
    targets = {1: 2, 2: 1, 5: 3}
    recall = np.mean([sum(hits[u]) / targets[u] for u in users])
    idcg = {u: sum(1 / np.log2(i + 2) for i in range(min(targets[u], 2))) for u in users}
    ndcg = np.mean([sum(h / np.log2(i + 2) for i, h in enumerate(hits[u])) / idcg[u] for u in users])
    places = config["metric_decimal_place"]  # RecBole rounds to it (properties/overall.yaml: 12)
    assert result["recall@2"] == pytest.approx(round(recall, places))
    assert result["ndcg@2"] == pytest.approx(round(ndcg, places))


@pytest.mark.skipif(not os.path.isdir(GAMES_DIR), reason="../shared/datasets/games is not present")
def test_real_games_counts(tmp_path):
    counts = import_paper_dataset(GAMES_DIR, str(tmp_path / "games"))
    assert counts == {"name": "games", "users": 49156, "items": 17332, "train": 299987, "valid": 22609, "test": 19733}
    config = DealrecConfig("SASRec", "games", config_dict={"data_path": str(tmp_path), "MAX_ITEM_LIST_LENGTH": 10})
    dataset = create_dataset(config)
    assert (dataset.user_num - 1, dataset.item_num - 1, dataset.inter_num) == (49156, 17332, 342329)
    train, valid, test = data_preparation(config, dataset)
    assert len(valid.dataset) == 9609 and len(test.dataset) == 8696
    assert int((test.dataset.multi_targets > 0).sum()) == 19733


def test_a_second_paper_dataset_imports_and_runs_without_a_yaml_of_its_own(tmp_path):
    """Another of the paper's datasets (no category_map.npy, as MicroLens): named after its folder, its keys
    written beside its files, the paper's @20/@50 cut-offs, and run_recbole needs nothing else."""
    from recbole_dealrec.quick_start import run_recbole

    source = tmp_path / "paper"
    write_paper_folder(source)
    (source / "category_map.npy").unlink()
    counts = import_paper_dataset(str(source), str(tmp_path / "data" / "microlens"))
    assert counts["name"] == "microlens"
    assert sorted(os.listdir(tmp_path / "data" / "microlens")) == ["microlens.inter", "microlens.item", "recbole_dealrec.yaml"]
    config = {"data_path": str(tmp_path / "data"), "output_dir": str(tmp_path / "out"), "epochs": 1, "sampler": "random",
              "selection_num": 3, "hidden_size": 8, "inner_size": 8, "n_layers": 1, "n_heads": 1, "show_progress": False}
    assert DealrecConfig("SASRec", "microlens", config_dict=config)["topk"] == [20, 50]  # the paper's, from the import
    with pytest.raises(ConfigError, match=r"topk=\[20, 50\]: a cut-off above the dataset's 7 items"):
        run_recbole("SASRec", "microlens", config_dict=config)  # 7 items here: caught before training
    with pytest.raises(ConfigError, match=r"valid_metric=NDCG@20 needs its cut-off in topk=\[2, 5\]"):
        run_recbole("SASRec", "microlens", config_dict={**config, "topk": [2, 5]})
    result = run_recbole("SASRec", "microlens", config_dict={**config, "topk": [2, 5], "valid_metric": "NDCG@2"})
    assert set(result["test_result"]) == {"recall@2", "recall@5", "ndcg@2", "ndcg@5"}
    assert result["selection"]["candidate_users"] == 5


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "sequential_train.txt").write_text("1 2 x3\n"), r"sequential_train\.txt line 1: ids must be non-negative integers, got 'x3'"),
    (lambda d: (d / "title_maps.npy").unlink(), r"paper-format dataset file missing: .*title_maps\.npy"),
])
def test_importer_bad_input_one_line_exit_2(tmp_path, damage, message):
    import re
    import subprocess
    import sys

    source = tmp_path / "paper"
    write_paper_folder(source)
    damage(source)
    result = subprocess.run([sys.executable, "-m", "recbole_dealrec.data.importer", "--input", str(source),
                             "--output", str(tmp_path / "data" / "x")], capture_output=True, text=True)
    assert result.returncode == 2 and re.search(message, result.stderr) and "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "x").exists()


# --- Safety: crafted maps run nothing, --output never inside --input, all files or none, malformed maps named.

class _Calls:
    """Pickles as a call of ``func(*args)``: what a crafted .npy uses to run code when it is unpickled."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker):
    import builtins
    import subprocess

    return {
        "os.system": _Calls(os.system, f"touch {marker}"),
        "builtins.exec": _Calls(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": _Calls(subprocess.call, ["touch", str(marker)]),
    }


def _write_npy_pickle(path, pickle_bytes):
    """A .npy file (object array header) followed by hand-made pickle bytes."""
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "|O", "fortran_order": False, "shape": ()})
        handle.write(pickle_bytes)


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("file", ["title_maps.npy", "category_map.npy"])
@pytest.mark.parametrize("kind, refused", [("os.system", r"posix\.system"), ("builtins.exec", r"builtins\.exec"),
                                           ("subprocess.call", r"subprocess\.call")])
def test_crafted_map_runs_nothing_and_names_the_refused_global(tmp_path, file, kind, refused):
    probe = tmp_path / "probe"  # the payload is live: numpy's own pickle loading runs it
    np.save(tmp_path / "probe.npy", {"seqid2title": _payloads(probe)[kind]}, allow_pickle=True)
    np.load(tmp_path / "probe.npy", allow_pickle=True)
    assert probe.exists()

    source, marker = tmp_path / "paper", tmp_path / "marker"
    write_paper_folder(source)
    key = "seqid2title" if file == "title_maps.npy" else "recid2category"
    np.save(source / file, {key: {"1": "a", 0: ["b"]} | {"x": _payloads(marker)[kind]}}, allow_pickle=True)
    with pytest.raises(ConfigError, match=rf"{file} asks to load the global {refused}: refused, nothing was run"):
        import_paper_dataset(str(source), str(tmp_path / "data" / "games"))
    assert not marker.exists()
    assert not (tmp_path / "data").exists()


def test_crafted_map_naming_a_numpy_attribute_path_is_refused(tmp_path):
    """Only exact (module, name) pairs: ``numpy`` + ``ndarray.tofile`` (a dotted name pickle would resolve) is refused."""
    source = tmp_path / "paper"
    write_paper_folder(source)
    _write_npy_pickle(source / "title_maps.npy", b"\x80\x04\x8c\x05numpy\x8c\x0endarray.tofile\x93.")
    with pytest.raises(ConfigError, match=r"title_maps\.npy asks to load the global numpy\.ndarray\.tofile: refused"):
        import_paper_dataset(str(source), str(tmp_path / "data" / "games"))


@pytest.mark.skipif(not os.path.isdir(GAMES_DIR), reason="../shared/datasets/games is not present")
def test_real_games_maps_read_without_pickle_globals():
    from recbole_dealrec.data.importer import _load_pickled_dict

    for file in ("title_maps.npy", "category_map.npy"):
        path = os.path.join(GAMES_DIR, file)
        assert _load_pickled_dict(path) == np.load(path, allow_pickle=True).item()  # trusted file: plain load to compare


def test_cli_crafted_map_one_line_exit_2_runs_nothing(tmp_path):
    import subprocess
    import sys

    source, marker = tmp_path / "paper", tmp_path / "marker"
    write_paper_folder(source)
    np.save(source / "title_maps.npy", {"seqid2title": _payloads(marker)["os.system"]}, allow_pickle=True)
    result = subprocess.run([sys.executable, "-m", "recbole_dealrec.data.importer", "--input", str(source),
                             "--output", str(tmp_path / "data" / "x")], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"importer: error: {source / 'title_maps.npy'} asks to load the global posix.system")
    assert not marker.exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("layout", ["inside", "symlink to input", "symlink inside input", "input inside output"])
def test_output_inside_input_is_refused_before_writing(tmp_path, layout):
    source = tmp_path / "paper"
    write_paper_folder(source)
    (source / "sub").mkdir()
    if layout == "inside":
        output = source / "sub" / "games"
    elif layout == "input inside output":
        output = tmp_path
    else:
        output = tmp_path / "data" / "games"
        output.parent.mkdir()
        output.symlink_to(source if layout == "symlink to input" else source / "sub")
    before, listing = _snapshot(source), sorted(os.listdir(tmp_path))
    message = r"--input .* lies inside --output" if layout == "input inside output" else \
        r"--output .* (is|lies inside) --input .*: the original dataset is read only"
    with pytest.raises(ConfigError, match=message):
        import_paper_dataset(str(source), str(output))
    assert _snapshot(source) == before and sorted(os.listdir(tmp_path)) == listing
    if layout.startswith("symlink"):
        assert os.listdir(output.parent) == ["games"]  # no staging folder left beside it either


def test_output_through_a_symlink_elsewhere_imports_into_its_target(tmp_path):
    source, real = tmp_path / "paper", tmp_path / "store" / "real"
    write_paper_folder(source)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "games").symlink_to(real)
    import_paper_dataset(str(source), str(tmp_path / "data" / "games"))
    assert (tmp_path / "data" / "games").is_symlink()
    assert sorted(os.listdir(real)) == ["games.inter", "games.item", "recbole_dealrec.yaml"]
    import_paper_dataset(str(source), str(tmp_path / "data" / "games"))  # again, over the previous import
    assert sorted(os.listdir(tmp_path / "store")) == ["real"]


def test_output_holding_other_files_is_refused(tmp_path):
    source, output = tmp_path / "paper", tmp_path / "data"
    write_paper_folder(source)
    import_paper_dataset(str(source), str(output / "games"))
    before = _snapshot(output)
    with pytest.raises(ConfigError, match=r"--output .*data holds files an import of 'data' does not write \(\['games'\]\)"):
        import_paper_dataset(str(source), str(output))  # the data_path instead of data_path/games: would drop it
    assert _snapshot(output) == before


def _fail_yaml(monkeypatch):
    import recbole_dealrec.data.importer as importer

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(importer.yaml, "safe_dump", boom)
    return r"disk full"


def _fail_swap(monkeypatch):
    """The new folder's rename into place fails after the old one was moved aside: the old one comes back."""
    rename = os.rename

    def failing(src, dst):
        if os.path.basename(dst) == "games" and ".staging-" in os.path.basename(src):
            raise OSError("rename failed (simulated)")
        return rename(src, dst)
    monkeypatch.setattr(os, "rename", failing)
    return r"rename failed"


def _none_title(monkeypatch, source):
    np.save(source / "title_maps.npy", {"seqid2title": {**{str(k): v for k, v in TITLES.items()}, "3": None}},
            allow_pickle=True)
    return r"title_maps\.npy: 'seqid2title'\['3'\] is None"


@pytest.mark.parametrize("failure", ["malformed maps", "last write raises", "swap raises"])
def test_failed_import_leaves_the_previous_import_byte_identical(tmp_path, monkeypatch, failure):
    source, data = tmp_path / "paper", tmp_path / "data"
    write_paper_folder(source)
    import_paper_dataset(str(source), str(data / "games"))
    before = _snapshot(data)
    assert sorted(before) == ["games", "games/games.inter", "games/games.item", "games/recbole_dealrec.yaml"]
    # the new import would differ in every file: other sequences, one title fewer, other cut-offs
    (source / "sequential_train.txt").write_text("1 1\n2 2\n3 3\n4 4\n5 5\n")
    if failure == "malformed maps":
        message = _none_title(monkeypatch, source)
    else:
        message = (_fail_yaml if failure == "last write raises" else _fail_swap)(monkeypatch)
    with pytest.raises((ConfigError, OSError), match=message):
        import_paper_dataset(str(source), str(data / "games"), topk=[1, 2])
    assert _snapshot(data) == before  # no temporary sibling left either


def test_reimport_replaces_every_file_and_leaves_no_temporaries(tmp_path):
    source, data = tmp_path / "paper", tmp_path / "data"
    write_paper_folder(source)
    import_paper_dataset(str(source), str(data / "games"))
    (data / "games" / ".games.inter.abc.tmp").write_text("left by an interrupted older import")
    (source / "category_map.npy").unlink()
    np.save(source / "title_maps.npy", {"seqid2title": {str(k): f"new {v}" for k, v in TITLES.items()}}, allow_pickle=True)
    import_paper_dataset(str(source), str(data / "games"), topk=[3, 4])
    assert sorted(os.listdir(data)) == ["games"]
    assert sorted(os.listdir(data / "games")) == ["games.inter", "games.item", "recbole_dealrec.yaml"]
    assert "\tnew Anno 2070\t\n" in (data / "games" / "games.item").read_text(encoding="utf-8")
    assert "- 3\n- 4\n" in (data / "games" / "recbole_dealrec.yaml").read_text()
    assert oct(os.stat(data / "games").st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _titles(**changes):
    return {"seqid2title": {**{str(k): v for k, v in TITLES.items()}, **changes}}


def _object_scalar(value):
    array = np.empty((), dtype=object)
    array[()] = value
    return array


def _raw(source, name, value):
    np.save(source / name, value, allow_pickle=True)


@pytest.mark.parametrize("damage, message", [
    (lambda d: _raw(d, "title_maps.npy", {"seqid2title": {k: v for k, v in TITLES.items()}}),
     r"title_maps\.npy: 'seqid2title' key 1 \(int\): expected a 1-based item id as a string, e.g. '1'"),
    (lambda d: _raw(d, "title_maps.npy", _titles(**{"01": "x"})),
     r"title_maps\.npy: 'seqid2title' key '01' \(str\): expected a 1-based item id as a string"),
    (lambda d: _raw(d, "title_maps.npy", _titles(**{"3": None})),
     r"title_maps\.npy: 'seqid2title'\['3'\] is None \(NoneType\), expected a title string"),
    (lambda d: _raw(d, "title_maps.npy", _titles(**{"4": 4.0})),
     r"title_maps\.npy: 'seqid2title'\['4'\] is 4\.0 \(float\), expected a title string"),
    (lambda d: _raw(d, "title_maps.npy", _titles(**{"2": "tab\there"})),
     r"title_maps\.npy: 'seqid2title'\['2'\] title 'tab\\there' contains '\\t'"),
    (lambda d: _raw(d, "title_maps.npy", {"seqid2title": {str(k): v for k, v in TITLES.items() if k != 6}}),
     r"title_maps\.npy: 'seqid2title' has no title for 1 item ids of the sequences, e\.g\. key '6' \(item 6 of "
     r"user 3 in .*sequential_train\.txt\); expected a title for every item id"),
    (lambda d: _raw(d, "title_maps.npy", {"seqid2title": list(TITLES.values())}),
     r"title_maps\.npy: 'seqid2title' is a list \(.*\), expected a dict \{str\(1-based item id\): title\}"),
    (lambda d: _raw(d, "title_maps.npy", {"recid2title": {k - 1: v for k, v in TITLES.items()}}),
     r"title_maps\.npy has no 'seqid2title' dict \(expected a dict \{str\(1-based item id\): title\}\); its keys: "
     r"\['recid2title'\]"),
    (lambda d: _raw(d, "title_maps.npy", np.array([_titles()], dtype=object)),
     r"title_maps\.npy holds an array of dtype object and shape \(1,\), expected a pickled dict"),
    (lambda d: _raw(d, "title_maps.npy", np.array(["a", "b"])),
     r"title_maps\.npy holds an array of dtype <U1 and shape \(2,\), expected a pickled dict"),
    (lambda d: _raw(d, "title_maps.npy", _object_scalar(["seqid2title"])),
     r"title_maps\.npy holds a list \(\['seqid2title'\]\), expected a pickled dict"),
    (lambda d: (d / "title_maps.npy").write_bytes(b"not numpy"),
     r"title_maps\.npy is not a \.npy file holding a pickled dict"),
    (lambda d: (d / "title_maps.npy").write_bytes((d / "title_maps.npy").read_bytes()[:300]),
     r"title_maps\.npy is not a pickled dict as the paper's format expects: "),
    (lambda d: _raw(d, "category_map.npy", {"recid2category": {str(k - 1): ["Video Games"] for k in TITLES}}),
     r"category_map\.npy: 'recid2category' key '0' \(str\): expected a 0-based item index as an integer, e.g. 0"),
    (lambda d: _raw(d, "category_map.npy", {"recid2category": {0: "Video Games"}}),
     r"category_map\.npy: 'recid2category'\[0\] is 'Video Games', expected a list of category strings"),
    (lambda d: _raw(d, "category_map.npy", {"recid2category": {0: ["Video Games", None]}}),
     r"category_map\.npy: 'recid2category'\[0\] is \['Video Games', None\], expected a list of category strings"),
    (lambda d: _raw(d, "category_map.npy", {"recid2category": [["Video Games"]]}),
     r"category_map\.npy: 'recid2category' is a list \(.*\), expected a dict \{0-based item index: \[category, \.\.\.\]\}"),
    (lambda d: _raw(d, "category_map.npy", "Video Games"),
     r"category_map\.npy holds an array of dtype <U11 and shape \(\), expected a pickled dict"),
], ids=["int title keys", "non-canonical title key", "None title", "number title", "tab in title", "title missing",
        "seqid2title not a dict", "no seqid2title", "object array not 0-d", "string array", "list not dict",
        "not npy", "truncated pickle", "str category keys", "category not a list", "None category",
        "recid2category not a dict", "category file a string"])
def test_malformed_maps_name_the_file_the_key_and_what_was_expected(tmp_path, damage, message):
    source = tmp_path / "paper"
    write_paper_folder(source)
    damage(source)
    with pytest.raises(ConfigError, match=message):
        import_paper_dataset(str(source), str(tmp_path / "data" / "games"))
    assert not (tmp_path / "data").exists()
