"""The repository's layout, from its imports (read with `ast`, nothing is imported) and its file sizes.

Every .py file of the repository counts, except the virtual environment, the generated stubs
(`scoring/`), build outputs and caches. The rules, each a test of its own:

- the benchmarks: `bench/kit/` (the kit), `bench/reports/` (reports), `bench/peers/` (peers: separate
  server programs that scenarios start), and every other module directly under `bench/` (and
  `bench/__main__.py`) is a scenario. A scenario never imports another scenario; the kit never imports
  a scenario or a report; a report never imports a scenario; a peer never imports a scenario or a report;
- the programs: `loadtest` never imports `bench`; `tools` never imports `server`; `model_format` (the
  version format the others share) never imports `server`, `bench`, `tools` or `loadtest`; `server`
  never imports `bench`, `tools` or `loadtest`;
- no .py file outside tests/ is over MAX_LINES lines.

Imports anywhere in a file count (inside functions and `if TYPE_CHECKING:` too), and so does
`importlib.import_module("literal")`. The checker tests itself on synthetic import graphs that break
each rule, so a broken scan or rule cannot pass silently.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

MAX_LINES = 400
# Not the project's source: the virtual environment, generated gRPC stubs, build outputs.
EXCLUDED_TOP = {".venv", "scoring", "build", "bench_out"}
BENCH_PARTS = {"kit": "kit", "reports": "report", "peers": "peer"}


# --- the scan -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    name: str  # dotted: bench.kit.server; a package's __init__.py is the package (bench.kit)
    path: str  # relative to the repository root, for messages
    imports: tuple[tuple[int, str], ...]  # (line, imported module)
    lines: int


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(root: Path) -> list[Path]:
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        at_top = Path(folder) == root
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__"
                         and not (at_top and d in EXCLUDED_TOP))
        found += [Path(folder) / f for f in sorted(files) if f.endswith(".py")]
    return found


def _resolve_from(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module of `from <level dots><name> import …` written in `module`."""
    if level == 0:
        return name or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[:len(package) - (level - 1)] if level > 1 else package
    return ".".join([*base, *([name] if name else [])])


def imports_of(source: str, module: str, is_package: bool, known: Iterable[str]) -> list[tuple[int, str]]:
    """(line, module) for every import in `source`. `from a import b` imports `a.b` when `a.b` is one of
    the `known` modules (a submodule), else `a` (a name defined in `a`)."""
    submodules = set(known)
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                found.append((node.lineno, sub if sub in submodules else base))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            found.append((node.lineno, node.args[0].value))
    return sorted(set(found))


def scan(root: Path) -> list[Module]:
    files = source_files(root)
    names = {f: module_name(f.relative_to(root)) for f in files}
    known = set(names.values())
    modules = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        modules.append(Module(names[f], f.relative_to(root).as_posix(),
                              tuple(imports_of(text, names[f], f.name == "__init__.py", known)),
                              len(text.splitlines())))
    return modules


# --- the rules ------------------------------------------------------------------------------------------


def kind(module: str) -> str:
    """`scenario`, `kit`, `report`, `peer` or `bench` (the package itself) under bench/; else the top package."""
    top, _, rest = module.partition(".")
    if top != "bench":
        return top
    if not rest:
        return "bench"
    return BENCH_PARTS.get(rest.split(".")[0], "scenario")


def scenario(module: str) -> str:
    """The scenario a bench module belongs to: bench.<name> (a scenario may be a package)."""
    return ".".join(module.split(".")[:2])


def top(module: str) -> str:
    return module.split(".")[0]


@dataclass(frozen=True)
class Rule:
    id: str
    says: str  # the rule, in the failure message
    breaks: Callable[[str, str], bool]  # (importer, imported) -> broken?


RULES = (
    Rule("scenario-imports-scenario", "a benchmark scenario never imports another scenario",
         lambda a, b: kind(a) == kind(b) == "scenario" and scenario(a) != scenario(b)),
    Rule("kit-imports-scenario-or-report", "the benchmark kit (bench/kit/) never imports a scenario or a report",
         lambda a, b: kind(a) == "kit" and kind(b) in ("scenario", "report")),
    Rule("report-imports-scenario", "a benchmark report (bench/reports/) never imports a scenario",
         lambda a, b: kind(a) == "report" and kind(b) == "scenario"),
    Rule("peer-imports-scenario-or-report", "a benchmark peer (bench/peers/) never imports a scenario or a report",
         lambda a, b: kind(a) == "peer" and kind(b) in ("scenario", "report")),
    Rule("loadtest-imports-bench", "loadtest never imports bench",
         lambda a, b: top(a) == "loadtest" and top(b) == "bench"),
    Rule("tools-imports-server", "tools never imports server",
         lambda a, b: top(a) == "tools" and top(b) == "server"),
    Rule("model_format-imports-program", "model_format never imports server, bench, tools or loadtest",
         lambda a, b: top(a) == "model_format" and top(b) in ("server", "bench", "tools", "loadtest")),
    Rule("server-imports-bench-tools-loadtest", "server never imports bench, tools or loadtest",
         lambda a, b: top(a) == "server" and top(b) in ("bench", "tools", "loadtest")),
)


def violations(modules: Sequence[Module], rule: Rule) -> list[str]:
    return [f"{m.path}:{line}: {m.name} imports {target}: {rule.says} [{rule.id}]"
            for m in modules for line, target in m.imports if rule.breaks(m.name, target)]


def oversized(modules: Sequence[Module], limit: int = MAX_LINES) -> list[str]:
    return [f"{m.path}: {m.lines} lines" for m in modules
            if m.lines > limit and not m.path.startswith("tests/")]


# --- the repository -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modules() -> list[Module]:
    return scan(REPO_ROOT)


def test_the_scan_sees_the_repository(modules: list[Module]) -> None:
    names = {m.name for m in modules}
    for expected in ("server.app", "model_format.manifest", "tools.build_model", "loadtest", "bench",
                     "bench.kit.server", "tests.test_layout"):
        assert expected in names, f"the scan missed {expected}"
    assert not any(n.split(".")[0] in EXCLUDED_TOP for n in names)
    assert sum(len(m.imports) for m in modules) > 200
    assert any(t.startswith("model_format.") for m in modules if top(m.name) == "server" for _, t in m.imports)
    assert any(t.startswith("bench.kit.") for m in modules if kind(m.name) == "scenario" for _, t in m.imports)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_layout_rule(modules: list[Module], rule: Rule) -> None:
    found = violations(modules, rule)
    if found:
        pytest.fail(f"{rule.says}:\n" + "\n".join(found), pytrace=False)


def test_no_source_file_is_over_the_line_limit(modules: list[Module]) -> None:
    found = oversized(modules)
    if found:
        pytest.fail(f"no .py file outside tests/ is over {MAX_LINES} lines; split these by subject:\n"
                    + "\n".join(found), pytrace=False)


# --- the checker checks itself ----------------------------------------------------------------------------


def synthetic(name: str, *targets: str, lines: int = 10) -> Module:
    path = name.replace(".", "/") + ".py"
    return Module(name, path, tuple((i + 1, t) for i, t in enumerate(targets)), lines)


# For every rule, imports that break it (importer, imported): each must be flagged by that rule and no other.
BREAKING: dict[str, list[tuple[str, str]]] = {
    "scenario-imports-scenario": [("bench.workers_scale", "bench.cache_zipf"), ("bench.__main__", "bench.compare"),
                                  ("bench.soak", "bench.swaps.plan")],
    "kit-imports-scenario-or-report": [("bench.kit.server", "bench.overload"),
                                       ("bench.kit.rates", "bench.reports.summary"), ("bench.kit", "bench.__main__")],
    "report-imports-scenario": [("bench.reports.compare", "bench.compare")],
    "peer-imports-scenario-or-report": [("bench.peers.naive_server", "bench.compare"),
                                        ("bench.peers.procs", "bench.reports.compare")],
    "loadtest-imports-bench": [("loadtest.sweep", "bench.kit.rates"), ("loadtest", "bench")],
    "tools-imports-server": [("tools.build_model.writer", "server.runtime"), ("tools.score", "server")],
    "model_format-imports-program": [("model_format.features", "server.settings"), ("model_format.golden", "bench.kit"),
                                     ("model_format.manifest", "tools.build_model"), ("model_format", "loadtest.cli")],
    "server-imports-bench-tools-loadtest": [("server.app", "bench.kit.server"), ("server.runtime", "tools.build_model"),
                                            ("server.metrics", "loadtest.workload")],
}

# Imports the layout allows: no rule may flag any of them.
ALLOWED = [
    ("bench.compare", "bench.kit.server"), ("bench.compare", "bench.reports.compare"),
    ("bench.compare", "bench.peers.procs"), ("bench.__main__", "bench.kit.engine"),
    ("bench.swaps.plan", "bench.swaps.run"), ("bench.soak", "server.settings"), ("bench.soak", "loadtest.sweep"),
    ("bench.heads", "tools.heads"), ("bench.kit.server", "bench.kit.data"), ("bench.kit.rates", "loadtest.sweep"),
    ("bench.kit", "bench"), ("bench.reports.summary", "bench.kit.fmt"), ("bench.reports.soak", "bench.reports.fmt"),
    ("bench.peers.model", "bench.kit.engine"), ("bench.peers.ray_peer", "bench.peers.rpc"),
    ("loadtest.cli", "scoring.v1.scoring_pb2"), ("tools.build_model.writer", "model_format.manifest"),
    ("server.manager", "model_format.repository"), ("model_format.features", "model_format.manifest"),
    ("tests.test_server", "server.app"), ("tests.test_bench_floor", "bench.compare"), ("bench.compare", "numpy"),
]


def test_every_rule_has_breaking_examples() -> None:
    assert set(BREAKING) == {r.id for r in RULES}


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_checker_flags_each_broken_rule(rule: Rule) -> None:
    for importer, imported in BREAKING[rule.id]:
        graph = [synthetic(importer, imported)]
        flagged = {r.id for r in RULES if violations(graph, r)}
        assert flagged == {rule.id}, f"{importer} -> {imported}: flagged by {sorted(flagged)}, not {rule.id}"
        [message] = violations(graph, rule)
        path = importer.replace(".", "/") + ".py"
        assert message == f"{path}:1: {importer} imports {imported}: {rule.says} [{rule.id}]"


def test_checker_allows_the_layout() -> None:
    graph = [synthetic(importer, imported) for importer, imported in ALLOWED]
    for rule in RULES:
        assert violations(graph, rule) == [], rule.id


def test_checker_flags_long_files_outside_tests() -> None:
    graph = [synthetic("server.big", lines=MAX_LINES + 1), synthetic("server.fits", lines=MAX_LINES),
             synthetic("tests.test_big", lines=5 * MAX_LINES)]
    assert oversized(graph) == [f"server/big.py: {MAX_LINES + 1} lines"]


def test_parser_resolves_imports() -> None:
    source = '''
import server.app, numpy as np
from bench.kit import server as kit_server, cli
from bench.kit.fmt import table
from . import compare
from .reports import summary
import importlib
if TYPE_CHECKING:
    from tools import score

def later() -> None:
    import loadtest.cli
    importlib.import_module("bench.overload")
'''
    known = {"server.app", "bench.kit", "bench.kit.server", "bench.kit.cli", "bench.kit.fmt", "bench.compare",
             "bench.reports", "bench.reports.summary", "tools", "tools.score", "loadtest.cli", "bench.overload"}
    got = [t for _, t in imports_of(source, "bench.soak", False, known)]
    assert sorted(got) == sorted([
        "server.app", "numpy", "bench.kit.server", "bench.kit.cli", "bench.kit.fmt", "bench.compare",
        "bench.reports.summary", "importlib", "tools.score", "loadtest.cli", "bench.overload"])
    # Relative imports from a package's __init__ and from a module two levels down.
    assert imports_of("from . import rates", "bench.kit", True, {"bench.kit.rates"}) == [(1, "bench.kit.rates")]
    assert imports_of("from ..reports import summary", "bench.kit.sustained", False, {"bench.reports.summary"}) == \
        [(1, "bench.reports.summary")]
    # `from a import name` where name is not a module: the import is of `a`.
    assert imports_of("from bench.kit.fmt import table", "bench.soak", False, {"bench.kit.fmt"}) == \
        [(1, "bench.kit.fmt")]


def test_kinds_of_bench_modules() -> None:
    assert [kind(m) for m in ("bench", "bench.__main__", "bench.compare", "bench.swaps.plan", "bench.kit",
                              "bench.kit.server", "bench.reports.soak", "bench.peers.rpc", "server.app")] == \
        ["bench", "scenario", "scenario", "scenario", "kit", "kit", "report", "peer", "server"]
