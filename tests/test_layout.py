"""The house rules, checked on the package's own source: stages import only earlier ones, RecBole is extended by
subclassing (patches only in compat.py), every key is declared once in a property file and read from there."""
import ast
import dataclasses
import importlib
import os
import pkgutil

import pytest

import recbole_dealrec
from recbole_dealrec.config import PROPERTIES_DIR, StageArguments, property_file_keys, read_property_file, recbole_keys

PACKAGE = os.path.dirname(recbole_dealrec.__file__)

#: the data flow, earliest first; shared layers (config, errors, registry, utils, distributed, compat, gradients,
#: text_encoder) sit below every stage. The model definitions (BIGRec, TIGER, the registry) sit under the
#: surrogate: the effort signal scores with the backend's initial state, and the fine-tuning stage is the trainer.
STAGES = {"data": 0, "model": 1, "surrogate": 2, "scoring": 3, "selection": 4, "trainer": 5, "evaluation": 6,
          "export": 6, "pipeline": 7, "quick_start": 8, "__main__": 9, "experiment": 9, "diagnose": 9,
          "stream": 9}


def package_modules():
    """``(dotted name, path)`` of every module of the package."""
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                yield dotted.removesuffix(".__init__"), path


def stage_of(dotted: str):
    parts = dotted.split(".")
    return STAGES.get(parts[1]) if parts[0] == "recbole_dealrec" and len(parts) > 1 else None


def imported_modules(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def test_no_module_imports_a_later_stage():
    later = []
    for dotted, path in package_modules():
        mine = stage_of(dotted)
        if mine is None:
            continue
        for line, module in imported_modules(ast.parse(open(path).read())):
            theirs = stage_of(module)
            if theirs is not None and theirs > mine:
                later.append(f"{dotted}:{line} imports {module}")
    assert not later, later


#: the one shared-layer import of a stage: the config resolves the model class by name, as RecBole's Config does
#: (lazily, from the model registry: the model definitions, not a stage of the run)
SHARED_LAYER_ALLOWED = {("recbole_dealrec.config", "recbole_dealrec.model"),
                        ("recbole_dealrec.config", "recbole_dealrec.model.get_model")}


def test_shared_layers_import_no_stage():
    for dotted, path in package_modules():
        if stage_of(dotted) is not None or dotted == "recbole_dealrec":
            continue
        stages = [m for _, m in imported_modules(ast.parse(open(path).read()))
                  if stage_of(m) is not None and (dotted, m) not in SHARED_LAYER_ALLOWED]
        assert not stages, (dotted, stages)


def _patches(tree: ast.AST) -> list:
    """Assignments of a lambda, or of a function defined in the same scope, to an attribute of an object other
    than ``self``/``cls`` (``trainer._train_epoch = hooked``, ``self.evaluator.evaluate = ...``): a patched method."""
    return sorted(set(_patch_sites(tree)))


def _patch_sites(tree: ast.AST):
    for scope in ast.walk(tree):
        if not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module)):
            continue
        local_functions = {n.name for n in ast.walk(scope) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                           and n is not scope}
        for node in ast.walk(scope):
            if not isinstance(node, ast.Assign):
                continue
            for target in node.targets:
                if not isinstance(target, ast.Attribute):
                    continue
                owner = target.value.id if isinstance(target.value, ast.Name) else None
                if owner in ("self", "cls"):
                    continue
                value = node.value
                if isinstance(value, ast.Lambda) or (isinstance(value, ast.Name) and value.id in local_functions):
                    yield node.lineno, ast.unparse(target)


def test_no_monkeypatch_outside_compat():
    found = [f"{dotted}:{line} {target}" for dotted, path in package_modules() if not dotted.endswith(".compat")
             for line, target in _patches(ast.parse(open(path).read()))]
    assert not found, found


def test_the_patch_finder_finds_a_patch():
    tree = ast.parse("def f(trainer):\n    def hooked():\n        pass\n    trainer._train_epoch = hooked\n"
                     "    trainer.model.calculate_loss = lambda x: x\n    self.ok = hooked\n")
    assert [target for _, target in _patches(tree)] == ["trainer._train_epoch", "trainer.model.calculate_loss"]


def test_run_recbole_reads_as_its_stages():
    from recbole_dealrec import quick_start

    tree = ast.parse(open(quick_start.__file__).read())
    [function] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run_recbole"]
    assert function.end_lineno - function.lineno + 1 <= 40


def _all_stage_arguments():
    for info in pkgutil.walk_packages(recbole_dealrec.__path__, "recbole_dealrec."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    return sorted(subclasses(StageArguments), key=lambda c: c.__name__)


def test_stage_arguments_are_their_property_files_keys():
    classes = _all_stage_arguments()
    assert classes, "no typed stage arguments found"
    for cls in classes:
        assert [f.name for f in dataclasses.fields(cls)] == list(cls.declared_keys()), cls.__name__


def test_every_signal_and_sampler_reads_its_keys_from_its_property_file():
    from recbole_dealrec.scoring.signals import registered_signals
    from recbole_dealrec.selection import SAMPLERS

    known = set(recbole_keys()) | {"dataset", "model"} | {k for kind in ("", "model", "dataset", "sampler", "signal")
                                   for name in os.listdir(os.path.join(PROPERTIES_DIR, kind)) if name.endswith(".yaml")
                                   for k in read_property_file(os.path.join(PROPERTIES_DIR, kind, name))}
    signals = registered_signals()
    for name in signals:
        cls = signals.get(name)
        assert "keys" not in vars(cls), f"signal {name} lists its keys by hand"
        assert set(cls.key_names()) <= known, name
        assert property_file_keys("signal", name) == cls.key_names()[:len(property_file_keys("signal", name))]
    for name in SAMPLERS.names():
        cls = SAMPLERS.get(name)
        assert "keys" not in vars(cls), f"sampler {name} lists its keys by hand"
        assert cls.own_keys() == property_file_keys("sampler", name)
    # every sampler and signal file belongs to a registered method or signal
    for kind, registered in (("sampler", set(SAMPLERS.names())), ("signal", set(signals.names()))):
        files = {n[:-5] for n in os.listdir(os.path.join(PROPERTIES_DIR, kind)) if n.endswith(".yaml")}
        assert files <= registered, (kind, files - registered)


def test_plugin_keys_are_declared_once():
    """A plugin key is declared (with its type comment) by one of overall.yaml, a sampler's or a signal's file;
    model and dataset files only set per-model / per-dataset values of keys."""
    seen: dict[str, str] = {}
    for kind in ("", "sampler", "signal"):
        folder = os.path.join(PROPERTIES_DIR, kind)
        for name in sorted(os.listdir(folder)):
            if name.endswith(".yaml"):
                for key in read_property_file(os.path.join(folder, name)):
                    assert key not in seen, f"{key} declared in {seen.get(key)} and {kind}/{name}"
                    seen[key] = f"{kind}/{name}"


def test_bigrec_fallback_defaults_are_its_property_files_values():
    """BIGRec built as another run's effort backend reads a config without BIGRec.yaml: its fallbacks must be that
    file's values."""
    from recbole_dealrec.model.bigrec import model as bigrec_model

    values = read_property_file(os.path.join(PROPERTIES_DIR, "model", "BIGRec.yaml"))
    calls = [n for n in ast.walk(ast.parse(open(bigrec_model.__file__).read()))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "_cfg"]
    assert calls
    for call in calls:
        key, default = call.args[1].value, call.args[2]
        if key == "bigrec_instruction":  # ~ in BIGRec.yaml: set per dataset, else the generic instruction
            assert values[key] is None
            continue
        assert ast.literal_eval(default) == values[key], key


@pytest.mark.parametrize("kind", ["sampler", "signal"])
def test_property_file_keys_reads_the_file(kind, tmp_path):
    name = sorted(n[:-5] for n in os.listdir(os.path.join(PROPERTIES_DIR, kind)) if n.endswith(".yaml"))[0]
    assert property_file_keys(kind, name) == tuple(read_property_file(os.path.join(PROPERTIES_DIR, kind, f"{name}.yaml")))
    assert property_file_keys(kind, "no-such-file") == ()
