"""The dependency rule of the tree, checked on the source (every import statement, at any depth: function-level
and ``TYPE_CHECKING`` imports count the same as module-level ones).

- ``actors`` and ``learner`` (the two roles) never import each other, directly or through another package;
- ``protocol`` imports no other first-party package; ``configs`` only ``protocol``;
- ``buffer`` and the shared packages (``weights``, ``envs``, ``tiny``) import neither role. The one
  exception is ``tiny/__main__.py``, the command line, whose ``--sample`` runs ``actors.sample``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("actors", "learner", "buffer", "protocol", "configs", "weights", "envs", "tiny")
ROLES = ("actors", "learner")
ALLOWED = {  # package -> first-party packages it may import (itself always)
    "protocol": set(),
    "configs": {"protocol"},
    "buffer": {"protocol", "configs"},
    "weights": {"protocol", "configs", "buffer"},
    "envs": {"protocol", "configs"},
    "tiny": {"protocol", "configs", "weights", "envs"},
    "actors": set(PACKAGES) - {"learner"},
    "learner": set(PACKAGES) - {"actors"},
}
EXCEPTIONS = {("tiny/__main__.py", "actors.sample")}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path, with_names: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file, relative imports resolved; ``with_names`` adds
    ``pkg.name`` for each ``from pkg import name`` (the name may be a submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path, root).split(".")
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_pkg else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            if with_names:
                out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def first_party(mod: str) -> str | None:
    top = mod.split(".")[0]
    return top if top in PACKAGES else None


def source_files(root: Path) -> list[Path]:
    return sorted(p for pkg in PACKAGES if (root / pkg).is_dir() for p in (root / pkg).rglob("*.py"))


def violations(root: Path) -> list[str]:
    """Every import that breaks the rule, as ``file:line: pkg imports mod``."""
    bad = []
    for path in source_files(root):
        rel = path.relative_to(root).as_posix()
        pkg = rel.split("/")[0]
        for line, mod in imports_of(path, root):
            target = first_party(mod)
            if target is None or target == pkg or target in ALLOWED[pkg]:
                continue
            if any(rel == f and (mod == m or mod.startswith(m + ".")) for f, m in EXCEPTIONS):
                continue
            bad.append(f"{rel}:{line}: {pkg} imports {mod}")
    return sorted(set(bad))


def import_graph(root: Path) -> dict[str, set[str]]:
    """First-party module -> first-party modules it imports (only names that are modules in the tree)."""
    files = {module_name(p, root): p for p in source_files(root)}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps = set()
        for _, mod in imports_of(path, root, with_names=True):
            parts = mod.split(".")
            for i in range(len(parts), 0, -1):  # the longest prefix that is a module of the tree
                if ".".join(parts[:i]) in files:
                    deps.add(".".join(parts[:i]))
                    break
        graph[name] = deps
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b runs a/__init__ too
        todo += graph.get(m, ())
    return seen


def test_packages_import_only_what_the_rule_allows():
    assert violations(ROOT) == []


def test_roles_do_not_reach_each_other_through_other_packages():
    graph = import_graph(ROOT)
    for role, other in (("actors", "learner"), ("learner", "actors")):
        for mod in [m for m in graph if m.split(".")[0] == role]:
            leaked = sorted(m for m in reachable(graph, mod) if m.split(".")[0] == other)
            assert not leaked, f"{mod} reaches {leaked}"


def test_rule_catches_a_learner_import_hidden_in_an_actor_function(tmp_path):
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "learner" / "trainer.py").write_text("def train():\n    pass\n")
    (tmp_path / "actors" / "actor.py").write_text("import os\n\n\ndef run():\n    from learner.trainer import train\n"
                                                  "    return train()\n")
    (tmp_path / "buffer" / "reader.py").write_text("from ..actors import actor\n")
    (tmp_path / "protocol" / "messages.py").write_text("import configs\n")
    assert violations(tmp_path) == ["actors/actor.py:5: actors imports learner.trainer",
                                    "buffer/reader.py:1: buffer imports actors",
                                    "protocol/messages.py:1: protocol imports configs"]
    graph = import_graph(tmp_path)
    assert "learner.trainer" in reachable(graph, "actors.actor")
