"""Docs that match the code: every config field, variant, sweep override and command a docstring
(or README.md) names exists.

What is read, and from where:
  * config files `configs/*.py`: the variants `get_config(arg)` accepts (from its code: the
    strings `arg` is compared with) and those the docstring lists ("Variants:" paragraph); each
    loads through `dhjax.train.config.load_config`, and each documented variant is one the code
    accepts (and the other way round);
  * field claims in a docstring, checked against the defaults:
      - `--config.a.b=v` overrides in a command: `a.b` exists in the config the command loads;
      - dotted names in prose or backticks (`train.steps`, data.root): when the first part is a
        top-level field, the whole path exists (in at least one variant); other dotted names
        (modules, functions, files) are not claims;
      - field lists (a function `default_*config()`'s docstring after its first paragraph, or the
        block after a line ending in "Fields:" in a module docstring): items such as
        `name (default): text`, `group: a, b, c`, `a / b_c`; each name exists somewhere in the
        defaults, and a default written as a Python literal equals the code's default;
  * `sweep(arg)` overrides apply (`apply_overrides`) to the variant they are declared for;
  * commands `python -m experiments.<name> ...` in docstrings of configs/, dhjax/ and
    experiments/ and in the Markdown docs: the module exists, every flag is one it defines
    (absl DEFINE_* calls, read with ast), `--config=path.py:variant` loads, `--config.x` and
    `--set=x=v` name existing fields;
  * `default_*config()` functions in dhjax modules: the same field claims against their own
    output (the module docstring against all of them together, `default_<x>_config` as `<x>`).

`test_parser_finds_planted_errors` runs the whole checker on a docstring with planted errors.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import re
import shlex
from pathlib import Path

import ml_collections
import pytest

from dhjax.train import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p for p in (ROOT / "configs").glob("*.py") if p.name != "__init__.py")
MARKDOWN_DOCS = [p for p in (ROOT / "README.md", ROOT / "colabs" / "README.md", ROOT / "kernels" / "README.md")
                 if p.is_file()]

IDENT = r"[a-z_][a-z0-9_]*"
DOTTED = rf"{IDENT}(?:\.{IDENT})*"
FILE_SUFFIXES = {"py", "json", "jsonl", "png", "jpg", "jpeg", "npz", "npy", "obj", "ply", "txt", "pts", "mp4",
                 "onnx", "pkl", "md", "csv", "h", "cc", "cu", "so", "sh", "toml", "yaml", "ipynb", "gz", "tar"}
# Flags every absl program accepts.
ABSL_FLAGS = {"help", "helpfull", "helpshort", "helpxml", "flagfile", "undefok", "only_check_args",
              "logtostderr", "alsologtostderr", "verbosity", "v", "log_dir", "stderrthreshold", "showprefixforinfo"}


# ----------------------------------------------------------------------------------------------
# Config trees.


def flat_paths(cfg, prefix: str = "") -> dict[str, object]:
    """{dotted path: value} of every node (inner ConfigDicts too) of a ConfigDict."""
    out = {}
    for key in cfg.keys():
        value = cfg[key]
        path = f"{prefix}{key}"
        out[path] = value
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update(flat_paths(value, path + "."))
    return out


def suffix_matches(paths, name: str) -> list[str]:
    return [p for p in paths if p == name or p.endswith("." + name)]


def same_value(documented, actual) -> bool:
    if isinstance(actual, (list, tuple)) and isinstance(documented, (list, tuple)):
        return len(actual) == len(documented) and all(same_value(d, a) for d, a in zip(documented, actual))
    if isinstance(actual, bool) or isinstance(documented, bool):
        return documented is actual or (documented == actual and type(documented) is type(actual))
    if isinstance(actual, (int, float)) and isinstance(documented, (int, float)):
        return float(documented) == float(actual)
    return documented == actual


# ----------------------------------------------------------------------------------------------
# Docstring parsing.


@dataclasses.dataclass(frozen=True)
class Claim:
    """A config field a doc names. kind: 'path' (exact path from the root, first part known to be
    a field), 'listed' (a field-list item: exists at any depth), 'override' (--config.x: exact)."""

    kind: str
    name: str
    where: str
    default: object = dataclasses.field(default=None, compare=False)
    has_default: bool = False


def _mask_groups(text: str):
    """Replaces backtick spans and (innermost first) (...), [...], {...} groups by placeholders
    '\\x00<i>\\x00'; returns (masked text, [group contents])."""
    groups: list[str] = []

    def keep(m):
        groups.append(m.group(0))
        return f"\x00{len(groups) - 1}\x00"

    text = re.sub(r"`[^`]*`", keep, text)
    pattern = re.compile(r"\([^()\[\]{}\x00]*(?:\x00\d+\x00[^()\[\]{}\x00]*)*\)|\[[^()\[\]{}]*\]|\{[^(){}\[\]]*\}")
    while True:
        new = pattern.sub(keep, text)
        if new == text:
            return text, groups
        text = new


def _literal(group: str):
    """The Python literal inside '(...)', or raises ValueError."""
    if not group.startswith("("):
        raise ValueError(group)
    value = ast.literal_eval(group[1:-1].strip())
    if not isinstance(value, (int, float, str, bool, tuple)):
        raise ValueError(group)
    return value


def _names_in(segment: str, groups: list[str]) -> list[tuple[str, object, bool]]:
    """Field names of one list segment: 'name', 'name (default)', 'a / b_c', 'latent_dim n'."""
    segment = " ".join(segment.split())
    unit = rf"({DOTTED})((?:\s*\x00\d+\x00)*)"
    m = re.fullmatch(unit, segment)
    if m:
        default, has = None, False
        ids = re.findall(r"\x00(\d+)\x00", m.group(2))
        if ids and not groups[int(ids[0])].startswith("`"):
            try:
                default, has = _literal(groups[int(ids[0])]), True
            except (ValueError, SyntaxError):
                pass
        return [(m.group(1), default, has)]
    parts = [p.strip() for p in segment.split("/")]
    if len(parts) > 1 and all(re.fullmatch(unit, p) for p in parts):
        # 'shake_m / shake_deg' names two fields; 'train / val / test / calib_identities' is a
        # shorthand whose bare words are not fields: only names with '_' or '.' count.
        return [(re.fullmatch(unit, p).group(1), None, False) for p in parts
                if re.search(r"[_.]", re.fullmatch(unit, p).group(1))]
    m = re.fullmatch(rf"({IDENT}_{IDENT}|{IDENT}\.{DOTTED})\s+[A-Za-z]", segment)   # 'latent_dim n'
    if m:
        return [(m.group(1), None, False)]
    return []


def _grouped(name: str, segment: str, groups: list[str]) -> bool:
    """Whether name is followed by a (...) / [...] / {...} group in segment (a default or a note)."""
    m = re.search(rf"(?<![\w.]){re.escape(name)}\s*\x00(\d+)\x00", segment)
    return bool(m) and not groups[int(m.group(1))].startswith("`")


def field_list_claims(text: str, where: str) -> list[Claim]:
    """Claims of a field list (see the module docstring for the forms understood)."""
    masked, groups = _mask_groups(text)
    claims = []
    for sentence in re.split(r"\.(?:\s+|$)|;", masked):
        described = False        # after 'name: a description, ...' plain words are prose
        for item in sentence.split(","):
            label, colon, rest = item.partition(":")
            found = [f for f in _names_in(label, groups)
                     if not described or re.search(r"[_.]", f[0]) or _grouped(f[0], label, groups)]
            if colon:
                # 'group: name' lists a field of the group; 'name (default): metres' describes one.
                named = [f for f in _names_in(rest, groups) if re.search(r"[_.]", f[0]) or _grouped(f[0], rest, groups)]
                described = described or not named
                found += named
            claims += [Claim("listed", n, where, d, h) for n, d, h in found]
    return claims


def field_list_blocks(doc: str, function: bool) -> list[str]:
    """The field-list parts of a docstring: a function's text after its first paragraph, and in
    any docstring the lines after a line ending in 'Fields:' up to the next blank line."""
    blocks = []
    if function:
        paragraphs = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)
        if len(paragraphs) > 1:
            blocks.append(paragraphs[1])
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.rstrip().endswith("Fields:"):
            block = []
            for nxt in lines[i + 1:]:
                if not nxt.strip():
                    break
                block.append(nxt)
            blocks.append("\n".join(block))
    return blocks


def _without_commands(text: str) -> str:
    """Text with shell commands removed (their --config.x overrides are checked as commands)."""
    return "\n".join(line for line in _join_continuations(text).splitlines() if "python -m " not in line)


@functools.lru_cache(maxsize=None)
def dhjax_modules() -> tuple[str, ...]:
    return tuple(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                 for p in sorted((ROOT / "dhjax").rglob("*.py")))


@functools.lru_cache(maxsize=None)
def refers_to_code(name: str) -> bool:
    """Whether 'a.b' names code: a dhjax module '....a' with an attribute 'b' (`splat.rasterize`)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        for module in dhjax_modules():
            if module.endswith("." + ".".join(parts[:i])):
                try:
                    obj = importlib.import_module(module)
                    for attr in parts[i:]:
                        obj = getattr(obj, attr)
                    return True
                except Exception:   # noqa: BLE001 -- not importable or no such attribute: not code
                    continue
    return False


def prose_claims(text: str, top_level: set[str], where: str) -> list[Claim]:
    """Dotted names whose first part is a top-level field: 'data.root', `train.steps`."""
    claims = []
    for m in re.finditer(rf"(?<![\w./$~-])({DOTTED})", _without_commands(text)):
        name, end = m.group(1), m.end()
        if "." not in name or name.split(".")[0] not in top_level:
            continue
        after = m.string[end:end + 1]
        if after in ("(", "/") or name.rsplit(".", 1)[1] in FILE_SUFFIXES or refers_to_code(name):
            continue                                         # a call, a file or a function
        claims.append(Claim("path", name, where))
    return claims


def doc_variants(doc: str) -> set[str] | None:
    """Variant names listed in a 'Variants:' paragraph (indented list or inline quoted names);
    None when the docstring has none. '' stands for the default."""
    m = re.search(r"^([ \t]*)Variants:(.*?)(?:\n[ \t]*\n|\Z)", doc, re.S | re.M)
    if not m:
        return None
    heading, body = len(m.group(1)), m.group(2)
    names = set()
    if body.strip() and not body.startswith("\n"):       # inline: Variants: '' (...) and 'tiny' (...)
        masked, _ = _mask_groups(body)
        names |= {a or b for a, b in re.findall(r"'([\w-]*)'|\"([\w-]*)\"", masked)}
    else:                                                 # indented list: its least-indented lines
        lines = []
        for line in body.splitlines()[1:]:
            if len(line) - len(line.lstrip()) <= heading:
                break                                     # the text after the list
            lines.append(line)
        indent = min(len(line) - len(line.lstrip()) for line in lines)
        names |= {line.split()[0].strip("'\"") for line in lines if len(line) - len(line.lstrip()) == indent}
    return names


# ----------------------------------------------------------------------------------------------
# Config files: variants from the code.


def code_variants(path: Path) -> set[str]:
    """Strings that get_config's argument is compared with (plus a default in `arg or "x"`)."""
    tree = ast.parse(path.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_config")
    param = fn.args.args[0].arg
    holders, out = {param}, {""}
    for node in ast.walk(fn):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.BoolOp)
                and isinstance(node.value.values[0], ast.Name) and node.value.values[0].id == param):
            holders |= {ast.unparse(t) for t in node.targets}
            out |= {v.value for v in node.value.values[1:] if isinstance(v, ast.Constant)}
    for node in ast.walk(fn):
        if isinstance(node, ast.Compare) and ast.unparse(node.left) in holders:
            for comp in node.comparators:
                elts = comp.elts if isinstance(comp, (ast.Tuple, ast.List, ast.Set)) else [comp]
                out |= {e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return out


def absolute(spec: str) -> str:
    """A config spec with its path made absolute (relative ones are relative to the repository)."""
    return spec if Path(spec.partition(":")[0]).is_absolute() else str(ROOT / spec)


@functools.lru_cache(maxsize=None)
def load(spec: str):
    return config_lib.load_config(absolute(spec))


def is_placeholder(name: str) -> bool:
    """'x', 'a.b': names in a pattern such as `configs/x.py:tiny` or `--config.a.b=v`."""
    return all(len(part) == 1 for part in name.split("."))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def spec_of(path: Path, variant: str) -> str:
    return f"{rel(path)}:{variant}" if variant else rel(path)


# ----------------------------------------------------------------------------------------------
# Commands.


def _join_continuations(text: str) -> str:
    return re.sub(r"\\\n\s*", " ", text)


def commands_in(text: str) -> list[str]:
    """`python -m experiments.x ...` commands: inline code spans (which may wrap lines) and lines."""
    fence = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)   # Markdown code blocks
    out = [c for block in fence.findall(text) for c in commands_in(block)]
    text = fence.sub("\n", text)
    spans = list(re.finditer(r"`[^`]*`", text))             # in order, so backticks pair up
    for m in spans:
        if "python -m experiments." in m.group(0):       # from there on (no `VAR=1 ` prefix)
            span = " ".join(m.group(0).strip("`").split())
            out.append(span[span.index("python -m experiments."):])
    pieces, last = [], 0
    for m in spans:
        pieces.append(text[last:m.start()])
        last = m.end()
    for line in _join_continuations(" ".join(pieces + [text[last:]])).splitlines():
        for m in re.finditer(r"python -m experiments\.\S+.*", line):
            out.append(m.group(0).split("&&")[0].strip())
    return [c for c in out if not re.match(r"python -m experiments\.\S*<", c)]   # patterns, not commands


@functools.lru_cache(maxsize=None)
def experiment_flags(name: str) -> dict[str, str | None] | None:
    """{flag: None, or for a config-file flag its default spec ("" = none)} of
    experiments/<name>.py (its absl DEFINE_* calls); None when there is no such module."""
    path = ROOT / "experiments" / f"{name}.py"
    if not path.is_file():
        return None
    flags = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
                and (getattr(node.func, "attr", None) or getattr(node.func, "id", "")).startswith("DEFINE_")
                and node.args and isinstance(node.args[0], ast.Constant)):
            func = getattr(node.func, "attr", None) or node.func.id
            default = None
            if func == "DEFINE_config_file":
                given = node.args[1] if len(node.args) > 1 else None
                default = given.value if isinstance(given, ast.Constant) and given.value else ""
            flags[node.args[0].value] = default
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"   # argparse
                and node.args and isinstance(node.args[0], ast.Constant)
                and str(node.args[0].value).startswith("--")):
            flags[node.args[0].value[2:].replace("-", "_")] = None
    return flags


def check_command(cmd: str) -> list[str]:
    """Problems of one command line (flags the experiment does not define, configs that do not
    load, overrides of unknown fields)."""
    try:
        words = shlex.split(cmd, comments=True)
    except ValueError as e:
        return [f"{cmd!r}: cannot split ({e})"]
    module = words[2]
    name = module.split(".", 1)[1]
    flags = experiment_flags(name)
    if flags is None:
        return [f"{cmd!r}: no module {module} (experiments/{name}.py)"]
    problems, overrides, sets, spec = [], {}, {}, None
    for word in words[3:]:
        word = word.strip("[]")
        if not word.startswith("--"):
            continue
        key, _, value = word[2:].partition("=")
        if key.startswith("config.") and "config" in flags:
            overrides[key[len("config."):]] = value
            continue
        bare = key[2:] if key.startswith("no") and key[2:] in flags else key
        if bare not in flags and bare not in ABSL_FLAGS:
            problems.append(f"{cmd!r}: experiments.{name} defines no flag --{bare}")
        if key == "config":
            spec = value
        if key == "set":
            k, _, v = value.partition("=")
            sets[k] = v
    if spec is None and "config" in flags:
        spec = flags["config"] or None          # a config_file flag's default, if any
    if spec is not None and "<" not in spec:
        try:
            cfg = load(spec)
        except Exception as e:   # noqa: BLE001 -- any failure to load is the finding
            return problems + [f"{cmd!r}: --config={spec} does not load ({type(e).__name__}: {e})"]
        paths = flat_paths(cfg)
        problems += [f"{cmd!r}: {spec} has no field {key}" for key in list(overrides) + list(sets)
                     if key not in paths]
        if name == "sweep":
            try:
                config_lib.load_sweep(absolute(spec))
            except Exception as e:   # noqa: BLE001
                problems.append(f"{cmd!r}: {spec} has no usable sweep ({e})")
    elif overrides:
        problems.append(f"{cmd!r}: --config.x overrides without a config to apply them to")
    return problems


# ----------------------------------------------------------------------------------------------
# Checking claims.


def check_claims(claims, configs: list, where_cfg: str) -> list[str]:
    """Problems of claims against a list of configs (a claim holds when it holds in any of them)."""
    problems = []
    all_paths = [flat_paths(c) for c in configs]
    for claim in dict.fromkeys(claims):
        if claim.kind in ("path", "override"):
            if not any(claim.name in paths for paths in all_paths):
                problems.append(f"{claim.where}: names '{claim.name}', not a field of {where_cfg}")
            continue
        matches = [(paths, m) for paths in all_paths for m in suffix_matches(paths, claim.name)]
        if not matches:
            problems.append(f"{claim.where}: lists field '{claim.name}', not a field of {where_cfg}")
        elif claim.has_default and len({m for _, m in matches}) == 1:
            paths, m = matches[0]
            if not same_value(claim.default, paths[m]):
                problems.append(f"{claim.where}: documents {claim.name} = {claim.default!r}, "
                                f"the default in {where_cfg} is {paths[m]!r}")
    return problems


def check_docstring(doc: str, configs: list, where: str, where_cfg: str, function: bool = False) -> list[str]:
    """All field claims of one docstring against configs (see the module docstring)."""
    top = {k for c in configs for k in c.keys()}
    claims = prose_claims(doc, top, where)
    for block in field_list_blocks(doc, function):
        claims += field_list_claims(block, where)
    return check_claims(claims, configs, where_cfg)


def check_config_file(path: Path) -> list[str]:
    """Variants, field claims, sweeps and commands of one config file."""
    where = rel(path)
    problems = []
    module, _ = config_lib.load_config_module(str(path))
    doc = module.__doc__ or ""
    accepted = code_variants(path)
    documented = doc_variants(doc) or set()
    documented |= set(re.findall(rf"configs/{re.escape(path.stem)}\.py:(\w+)", doc))   # used in commands
    for v in sorted(documented - accepted):
        problems.append(f"{where}: the docstring lists variant {v!r}, get_config does not accept it")
    for v in sorted(accepted - documented - {""}):
        problems.append(f"{where}: get_config accepts variant {v!r}, the docstring does not list it")
    configs = {}
    for v in sorted(accepted | documented):
        try:
            configs[v] = load(spec_of(path, v))
        except Exception as e:   # noqa: BLE001 -- any failure to load is the finding
            problems.append(f"{where}: variant {v!r} does not load ({type(e).__name__}: {e})")
    if not configs:
        return problems
    problems += check_docstring(doc, list(configs.values()), f"{where} docstring", where)
    if hasattr(module, "sweep"):
        if not any("experiment" in c for c in configs.values()):
            problems.append(f"{where}: declares sweep() but has no 'experiment' field for experiments.sweep")
        for v, cfg in configs.items():
            for overrides in config_lib.load_sweep(absolute(spec_of(path, v))):
                try:
                    config_lib.apply_overrides(cfg, overrides)
                except KeyError as e:
                    problems.append(f"{where}: sweep({v!r}) override {overrides} does not apply: {e}")
    for cmd in commands_in(doc):
        problems += [f"{where} docstring: {p}" for p in check_command(cmd)]
    return problems


def config_functions(module) -> dict[str, object]:
    return {name: getattr(module, name) for name in dir(module)
            if re.fullmatch(r"default_(?:\w+_)?config", name) and callable(getattr(module, name))
            and getattr(getattr(module, name), "__module__", None) == module.__name__}


def dhjax_config_modules() -> list[str]:
    """dhjax modules that define a top-level default_config() or default_<x>_config()."""
    out = []
    for path in sorted((ROOT / "dhjax").rglob("*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.FunctionDef) and re.fullmatch(r"default_(?:\w+_)?config", n.name)
               for n in tree.body):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def check_dhjax_module(name: str) -> list[str]:
    module = importlib.import_module(name)
    functions = config_functions(module)
    problems, root = [], ml_collections.ConfigDict()
    for fname, fn in sorted(functions.items()):
        cfg = fn()
        sub = re.fullmatch(r"default_(\w+)_config", fname)
        if sub:
            root[sub.group(1)] = cfg
        else:
            for key in cfg.keys():
                root[key] = cfg[key]
        problems += check_docstring(fn.__doc__ or "", [cfg], f"{name}.{fname} docstring", f"{fname}()",
                                    function=True)
    problems += check_docstring(module.__doc__ or "", [root], f"{name} docstring",
                                " + ".join(f"{f}()" for f in sorted(functions)))
    return problems


# ----------------------------------------------------------------------------------------------
# Tests.


def test_finds_the_config_files_and_modules():
    assert len(CONFIG_FILES) >= 8, CONFIG_FILES
    assert any(m.startswith("dhjax.capture.registration") for m in dhjax_config_modules())


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_file_docstring_matches_its_defaults(path):
    problems = check_config_file(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", dhjax_config_modules())
def test_dhjax_config_docstrings_match_their_defaults(name):
    problems = check_dhjax_module(name)
    assert not problems, "\n".join(problems)


def docstrings(path: Path) -> list[str]:
    return [doc for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
            and (doc := ast.get_docstring(node, clean=False))]


CODE_WITH_COMMANDS = [p for folder in ("dhjax", "experiments") for p in sorted((ROOT / folder).rglob("*.py"))
                      if any("python -m experiments." in d for d in docstrings(p))]


@pytest.mark.parametrize("path", CODE_WITH_COMMANDS, ids=rel)
def test_commands_in_code_docstrings_run(path):
    problems = [f"{rel(path)}: {p}" for doc in docstrings(path) for cmd in commands_in(doc)
                for p in check_command(cmd)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", MARKDOWN_DOCS, ids=rel)
def test_markdown_commands_and_config_references(path):
    """Commands in the Markdown docs, `configs/x.py:variant` references (they load) and
    `--config.a.b` / `a.b=` field names written outside commands (a field of some config)."""
    text = path.read_text()
    problems = [f"{rel(path)}: {p}" for cmd in commands_in(text) for p in check_command(cmd)]
    for file, variant in set(re.findall(r"configs/(\w+)\.py:(\w+)", text)):
        if is_placeholder(file):
            continue
        try:
            load(f"configs/{file}.py:{variant}")
        except Exception as e:   # noqa: BLE001
            problems.append(f"{rel(path)}: configs/{file}.py:{variant} does not load ({type(e).__name__}: {e})")
    every = []
    for p in CONFIG_FILES:
        for v in sorted(code_variants(p)):
            try:
                every.append(flat_paths(load(spec_of(p, v))))
            except Exception:   # noqa: BLE001 -- reported by test_config_file_docstring_matches_its_defaults
                pass
    prose = _without_commands(re.sub(r"`[^`]*python -m [^`]*`", " ", text))
    top = {p for paths in every for p in paths if "." not in p}
    names = {f"--config.{n}": n for n in re.findall(rf"--config\.({DOTTED})", prose)}
    names.update({f"`{n}`": n for span in re.findall(r"`([^`]*)`", prose)
                  for n in re.findall(rf"(?<![\w.-])({DOTTED})(?![\w(])", span)
                  if "." in n and n.split(".")[0] in top and n.rsplit(".", 1)[1] not in FILE_SUFFIXES
                  and not refers_to_code(n)})
    for written, name in sorted(names.items()):
        if not is_placeholder(name) and not any(name in paths for paths in every):
            problems.append(f"{rel(path)}: names {written}, a field of no config file")
    assert not problems, "\n".join(problems)


PLANTED = '''Random heads (a planted docstring).

    python -m experiments.sample_heads --config=configs/sample_heads.py:tiny --config.num_headz=2 \\
        --workdir=/tmp/x --no_such_flag=1
    python -m experiments.no_such_experiment --workdir=/tmp/y
    python -m experiments.sample_heads --config=configs/sample_heads.py:huge --workdir=/tmp/z

Variants: '' (six heads) and 'tiny' (three heads), "huge".

Fields:
  seed (0): the `dhjax.data.synthetic.key` seed; num_heads (6), image_sise (256): pixels.
  camera_distance (0.5): metres, from the head centre, along z. view_azimuths_deg, write_meshes (True).
  shape_std / expression_std: coefficient std; jaw_open_max (rad).

The heads look at `fov_y_deg`; `camera.distance`, view_elevation_deg.x and `flame_path` are in
degrees (see configs/sample_heads.py and params.npz, dhjax.render.camera.look_at(...)).
'''


def test_parser_finds_planted_errors():
    path = ROOT / "configs" / "sample_heads.py"
    cfg, tiny = load(rel(path)), load(spec_of(path, "tiny"))
    top = set(cfg.keys()) | {"camera", "view_elevation_deg"}
    claims = prose_claims(PLANTED, top, "planted")
    assert {c.name for c in claims} == {"camera.distance", "view_elevation_deg.x"}, claims
    listed = [c for b in field_list_blocks(PLANTED, function=False) for c in field_list_claims(b, "planted")]
    assert [c.name for c in listed] == ["seed", "num_heads", "image_sise", "camera_distance", "view_azimuths_deg",
                                        "write_meshes", "shape_std", "expression_std", "jaw_open_max"], listed
    assert {c.name: c.default for c in listed if c.has_default} == {
        "seed": 0, "num_heads": 6, "image_sise": 256, "camera_distance": 0.5, "write_meshes": True}
    problems = check_docstring(PLANTED, [cfg, tiny], "planted", "sample_heads")
    assert sorted(problems) == sorted([
        "planted: documents camera_distance = 0.5, the default in sample_heads is 0.95",
        "planted: lists field 'image_sise', not a field of sample_heads",
        "planted: names 'view_elevation_deg.x', not a field of sample_heads",
    ]), problems
    assert doc_variants(PLANTED) == {"", "tiny", "huge"}
    assert "huge" not in code_variants(path) and {"", "tiny"} <= code_variants(path)
    cmd_problems = [p for cmd in commands_in(PLANTED) for p in check_command(cmd)]
    assert len(cmd_problems) == 4, cmd_problems
    assert any("no field num_headz" in p for p in cmd_problems)
    assert any("defines no flag --no_such_flag" in p for p in cmd_problems)
    assert any("no module experiments.no_such_experiment" in p for p in cmd_problems)
    assert any("configs/sample_heads.py:huge does not load" in p for p in cmd_problems)
    # The right fields of the same docstring raise nothing.
    good = PLANTED.replace("image_sise", "image_size").replace("(0.5)", "(0.95)").replace("_deg.x", "_deg")
    assert check_docstring(good, [cfg, tiny], "good", "sample_heads") == []


def undocumented_public_names(source: str) -> list[str]:
    """Top-level functions and classes of a module's source, and the methods of those classes
    ("Class.method"), without a leading underscore and without a docstring."""
    missing = []
    for n in ast.parse(source).body:
        if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or n.name.startswith("_"):
            continue
        if ast.get_docstring(n) is None:
            missing.append(n.name)
        if isinstance(n, ast.ClassDef):
            missing += [f"{n.name}.{m.name}" for m in n.body
                        if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and not m.name.startswith("_")
                        and ast.get_docstring(m) is None]
    return missing


def test_every_public_function_class_and_method_of_dhjax_has_a_docstring():
    """The house style asks for shapes and units in every public docstring; a missing one is the
    first thing to catch. (experiments' `main` and configs' `get_config` are described by their
    module docstrings, so only dhjax/ is checked.)"""
    sample = ("def f():\n    return 1\n\nclass C:\n    x: int\n    def m(self):\n        pass\n"
              "    def _p(self):\n        pass\n\ndef _g():\n    pass\ndef h():\n    '''Doc.'''\n")
    assert undocumented_public_names(sample) == ["f", "C", "C.m"]
    files = sorted((ROOT / "dhjax").rglob("*.py"))
    assert len(files) > 100, len(files)          # the package's modules, not an empty glob
    missing = [f"{p.relative_to(ROOT)}: {name}" for p in files for name in undocumented_public_names(p.read_text())]
    assert not missing, "public names without a docstring:\n" + "\n".join(missing)
