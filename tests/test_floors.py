"""The package's floors, read from the source: no import runs back up.

The floor order is stated once, in `dhjax/__init__.py`'s docstring (the indented line(s) joined by
``<-``); this test parses it from there. Every module of `dhjax/` is parsed with `ast`, and every
import in it is checked wherever it stands (module level, inside functions, under
``if TYPE_CHECKING``): ``import x``, ``from x import y`` (``y`` counts as the submodule ``x.y``
when it is one), relative imports, and ``importlib.import_module("...")`` / ``__import__("...")``
with a literal name. A module may import its own package and floors to the left of its own; the
packages that share a floor do not import each other; the root `dhjax/__init__.py` imports
nothing of the package. Outside the package: `experiments/*.py` never import another
experiment, `configs/*.py` never import `experiments`, and `dhjax` imports neither.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dhjax"
OUTSIDE = ("experiments", "configs")  # above the package; the package never imports them


@dataclasses.dataclass(frozen=True)
class Import:
    line: int
    target: str  # absolute dotted module name


@dataclasses.dataclass(frozen=True)
class Violation:
    path: str
    line: int
    target: str
    why: str

    def __str__(self):
        return f"{self.path}:{self.line}: imports {self.target} ({self.why})"


# ----------------------------------------------------------------------------------------------
# Reading the floor order and the imports.


def parse_floors(docstring: str) -> list[tuple[str, ...]]:
    """The floor order of a docstring: its first indented block with ``<-``, lowest floor first.

    ``a, b <- c`` means: c builds on a and b (a and b share the lowest floor).
    """
    lines = docstring.splitlines()
    start = next((i for i, s in enumerate(lines) if s.startswith(" ") and "<-" in s), None)
    if start is None:
        raise ValueError("no floor order (an indented line with '<-') in the docstring")
    block = []
    for s in lines[start:]:
        if not s.startswith(" ") or not s.strip():
            break
        block.append(s.strip())
    floors = [tuple(n.strip() for n in part.split(",")) for part in " ".join(block).split("<-")]
    if any(not n.isidentifier() for floor in floors for n in floor):
        raise ValueError(f"floor order does not parse: {' '.join(block)!r}")
    return floors


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, *, is_package: bool = False,
               known_modules: frozenset[str] = frozenset()) -> list[Import]:
    """Every import in `source` (of the module named `module`), as absolute module names.

    ``from x import y`` yields ``x.y`` when that is in `known_modules` (a submodule), else ``x``.
    """
    out = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [Import(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 > len(parts) - 1:
                    raise ValueError(f"{module}:{node.lineno}: relative import beyond the top package")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append(Import(node.lineno, sub if sub in known_modules else base))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name in ("import_module", "__import__"):
                out.append(Import(node.lineno, node.args[0].value))
    return list(dict.fromkeys(out))  # `from x import a, b` of one module: once


# ----------------------------------------------------------------------------------------------
# The rules.


def _unit(module: str) -> str:
    """The floor unit of a dhjax module: its top package or module under dhjax ('' for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def package_violations(path: str, module: str, imports, floors) -> list[Violation]:
    """Imports of a dhjax module that run up or sideways across the floors."""
    level = {n: i for i, floor in enumerate(floors) for n in floor}
    level[""] = -1  # the root package: below every floor, so it imports nothing of the package
    here = _unit(module)
    if here not in level:
        return [Violation(path, 1, module, f"'{here}' has no floor in dhjax/__init__.py's order")]
    out = []
    for imp in imports:
        top = imp.target.split(".")[0]
        if top in OUTSIDE:
            out.append(Violation(path, imp.line, imp.target, f"{top} sits above the package"))
            continue
        if top != PACKAGE:
            continue
        there = _unit(imp.target)
        if there == here:
            continue
        if there not in level:
            out.append(Violation(path, imp.line, imp.target, f"'{there}' has no floor"))
        elif level[there] > level[here]:
            out.append(Violation(path, imp.line, imp.target,
                                 f"floor '{there}' is above '{here or PACKAGE}'"))
        elif level[there] == level[here]:
            out.append(Violation(path, imp.line, imp.target,
                                 f"'{there}' and '{here}' share a floor and do not import each other"))
    return out


def outside_violations(path: str, module: str, imports) -> list[Violation]:
    """experiments never import another experiment; configs never import experiments."""
    kind = module.split(".")[0]
    out = []
    for imp in imports:
        if imp.target.split(".")[0] != "experiments":
            continue
        if kind == "experiments":
            out.append(Violation(path, imp.line, imp.target, "an experiment imports another experiment; "
                                 "shared code belongs in dhjax"))
        elif kind == "configs":
            out.append(Violation(path, imp.line, imp.target, "a config imports an experiment"))
    return out


# ----------------------------------------------------------------------------------------------
# The source tree.


def _files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _known_modules() -> frozenset[str]:
    return frozenset(module_name(p) for folder in (PACKAGE,) + OUTSIDE for p in _files(folder))


def _floors() -> list[tuple[str, ...]]:
    doc = ast.get_docstring(ast.parse((ROOT / PACKAGE / "__init__.py").read_text()))
    return parse_floors(doc or "")


def _imports(path: Path, known) -> list[Import]:
    return imports_of(path.read_text(), module_name(path), is_package=path.name == "__init__.py",
                      known_modules=known)


def test_floor_order_names_every_package_once():
    floors = _floors()
    names = [n for floor in floors for n in floor]
    assert len(names) == len(set(names)), f"a name appears twice in the floor order: {names}"
    assert floors[-1] == ("experiments",), "experiments sit on top of the package"
    units = {_unit(module_name(p)) for p in _files(PACKAGE)} - {""}
    assert units <= set(names), f"packages without a floor: {sorted(units - set(names))}"
    assert set(names) - {"experiments"} <= units, \
        f"floors naming no package: {sorted(set(names) - {'experiments'} - units)}"


def test_no_import_runs_back_up():
    floors = _floors()[:-1]  # experiments: outside the package, above it
    known = _known_modules()
    bad = []
    for p in _files(PACKAGE):
        rel = str(p.relative_to(ROOT))
        bad += package_violations(rel, module_name(p), _imports(p, known), floors)
    assert not bad, "imports against the floor order:\n" + "\n".join(map(str, bad))


def test_experiments_and_configs_stay_apart():
    known = _known_modules()
    bad = []
    for folder in OUTSIDE:
        for p in _files(folder):
            bad += outside_violations(str(p.relative_to(ROOT)), module_name(p), _imports(p, known))
    assert not bad, "\n".join(map(str, bad))


def test_the_disk_format_does_not_depend_on_the_generators():
    """`data.dataset` (the format, also for real data) imports nothing else from `dhjax.data`."""
    p = ROOT / PACKAGE / "data" / "dataset.py"
    bad = [i for i in _imports(p, _known_modules())
           if i.target.startswith(f"{PACKAGE}.data") and i.target != f"{PACKAGE}.data.dataset"]
    assert not bad, [f"dhjax/data/dataset.py:{i.line}: {i.target}" for i in bad]


# ----------------------------------------------------------------------------------------------
# Self-checks: the checker catches planted imports (and passes clean ones).

_PLANTED = '''\
"""A geometry module that reaches up."""
import numpy as np
from dhjax.geometry import mesh
from dhjax import losses


def closest(points):
    from dhjax.ops.bvh import closest_point
    import dhjax.train.loop
    from ..capture import tracker
    from .. import render
    from dhjax import nn as nn_lib, io
    return importlib.import_module("dhjax.synthesis.synshot")
'''


def test_checker_catches_planted_upward_imports():
    floors = [("geometry", "losses", "io"), ("ops",), ("models", "render"), ("nn",), ("data",),
              ("train",), ("capture",), ("synthesis",)]
    known = frozenset({"dhjax.losses", "dhjax.io", "dhjax.nn", "dhjax.render", "dhjax.geometry.mesh"})
    imps = imports_of(_PLANTED, "dhjax.geometry.planted", known_modules=known)
    bad = package_violations("dhjax/geometry/planted.py", "dhjax.geometry.planted", imps, floors)
    found = {(v.line, v.target) for v in bad}
    assert found == {
        (4, "dhjax.losses"),                 # same floor, another package: sideways
        (8, "dhjax.ops.bvh"),                # function-level, one floor up
        (9, "dhjax.train.loop"),             # `import x.y.z`
        (10, "dhjax.capture"),              # relative: `from ..capture import name`
        (11, "dhjax.render"),                # relative, `from .. import package`
        (12, "dhjax.nn"), (12, "dhjax.io"),  # `from dhjax import a, b`: each name counts
        (13, "dhjax.synthesis.synshot"),     # importlib with a literal name
    }, sorted(found)
    assert "floor 'ops' is above 'geometry'" in next(str(v) for v in bad if v.line == 8)
    assert str(next(v for v in bad if v.line == 8)).startswith("dhjax/geometry/planted.py:8: ")
    # The same imports in a module of the top floor all run down (or stay in its package).
    top = imports_of(_PLANTED, "dhjax.synthesis.planted", known_modules=known)
    assert package_violations("p.py", "dhjax.synthesis.planted", top, floors) == []
    # Relative imports resolve against the module's package (deeper packages too).
    deep = imports_of("from ...data import dataset\nfrom . import model\n", "dhjax.capture.mica.run",
                      known_modules=frozenset({"dhjax.data.dataset", "dhjax.capture.mica.model"}))
    assert [i.target for i in deep] == ["dhjax.data.dataset", "dhjax.capture.mica.model"]
    with pytest.raises(ValueError, match="beyond"):
        imports_of("from ... import x\n", "dhjax.geometry.planted")
    # The root imports nothing of the package; a package without a floor is named.
    root = package_violations("dhjax/__init__.py", "dhjax", imports_of("import dhjax.io\n", "dhjax",
                                                                       is_package=True), floors)
    assert [(v.line, v.target) for v in root] == [(1, "dhjax.io")]
    unknown = package_violations("dhjax/extra/m.py", "dhjax.extra.m", [], floors)
    assert len(unknown) == 1 and "no floor" in unknown[0].why
    # The package never imports experiments or configs.
    up = package_violations("dhjax/data/m.py", "dhjax.data.m",
                            imports_of("def f():\n    from configs import track\n", "dhjax.data.m"), floors)
    assert [(v.line, v.target) for v in up] == [(2, "configs")]


def test_checker_catches_experiments_importing_experiments():
    src = "from experiments.mica_predict import load\nimport experiments.benchlib\nfrom . import track\n" \
          "from dhjax.train import app\n"
    known = frozenset({"experiments.track"})
    imps = imports_of(src, "experiments.bench", known_modules=known)
    bad = outside_violations("experiments/bench.py", "experiments.bench", imps)
    assert [(v.line, v.target) for v in bad] == [(1, "experiments.mica_predict"), (2, "experiments.benchlib"),
                                                 (3, "experiments.track")]
    cfg = outside_violations("configs/bench.py", "configs.bench",
                             imports_of("def get_config():\n    from experiments import bench\n", "configs.bench"))
    assert [(v.line, v.target) for v in cfg] == [(2, "experiments")]
    # experiments may import configs and dhjax; configs may import dhjax.
    ok = imports_of("from configs import track\nfrom dhjax.capture import tracker\n", "experiments.track")
    assert outside_violations("experiments/track.py", "experiments.track", ok) == []


def test_floor_order_parser():
    doc = "Title.\n\nFloors:\n\n    a, b <- c\n      <- d, e <- f\n\nMore text with x <- y.\n"
    assert parse_floors(doc) == [("a", "b"), ("c",), ("d", "e"), ("f",)]
    with pytest.raises(ValueError):
        parse_floors("no order here")


def test_the_readme_states_the_same_floor_order():
    """README.md's Layout repeats the order (the lines after 'built in floors'); it must not drift."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, s in enumerate(lines) if "built in floors" in s) + 1
    block = []
    for s in lines[start:]:
        if "<-" not in s:
            break
        block.append(s.strip())
    readme = [tuple(n.strip() for n in part.split(",")) for part in " ".join(block).split("<-")]
    assert readme == _floors(), f"README.md's floor order {readme} differs from dhjax/__init__.py's {_floors()}"
