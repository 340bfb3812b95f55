"""The modules of cat_jax import each other without a cycle.

A cycle works only as long as each side imports the other late enough (or
inside a function), and it hides which module is built on which; this test
reads every module's imports with `ast` (module-level and inside functions)
and names any cycle it finds.
"""

import ast
import os

import pytest

PACKAGE = "cat_jax"
ROOT = os.path.join(os.path.dirname(__file__), "..", PACKAGE)


def module_files(root: str = ROOT, package: str = PACKAGE) -> dict:
  """{dotted module name: path} of every .py file under `root`; a package
  is named by its folder (its __init__.py)."""
  out = {}
  for folder, _, files in os.walk(root):
    rel = os.path.relpath(folder, root)
    parts = [package] + ([] if rel == "." else rel.split(os.sep))
    for f in files:
      if not f.endswith(".py"):
        continue
      stem = f[:-len(".py")]
      name = ".".join(parts if stem == "__init__" else parts + [stem])
      out[name] = os.path.join(folder, f)
  return out


def _resolve(name: str, modules) -> str | None:
  """The module `name` or its closest enclosing one among `modules`."""
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def imports_of(module: str, path: str, modules) -> set:
  """The modules among `modules` that `module` imports, anywhere in it.

  `import a.b` -> a.b; `from a import b` -> a.b if that is a module, else
  a; relative imports are resolved against `module`'s package.
  """
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  is_package = os.path.basename(path) == "__init__.py"
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = module.split(".")
        anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
        base = ".".join(anchor + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules
                 else base for a in node.names]
    else:
      continue
    out.update(m for m in (_resolve(t, modules) for t in targets)
               if m is not None and m != module)
  return out


def import_graph(root: str = ROOT, package: str = PACKAGE) -> dict:
  modules = module_files(root, package)
  return {m: imports_of(m, p, modules) for m, p in sorted(modules.items())}


def find_cycles(graph: dict) -> list:
  """One cycle [m1, m2, ..., m1] through each strongly connected group of
  modules that import each other (Tarjan's algorithm), sorted."""
  index, low, stack, on_stack, groups = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      group = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        group.add(w)
        if w == v:
          break
      if len(group) > 1:
        groups.append(group)

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(_cycle_in(graph, g) for g in groups)


def _cycle_in(graph: dict, group: set) -> list:
  """A shortest cycle through the first module (by name) of a strongly
  connected group (breadth-first search inside the group)."""
  start = min(group)
  parent, frontier = {start: None}, [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(graph[v] & group):
        if w == start:
          path = [v]
          while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
          return [start] + path[::-1][1:] + [start] if v != start else [
              start, start]
        if w not in parent:
          parent[w] = v
          nxt.append(w)
    frontier = nxt
  raise AssertionError(f"{sorted(group)} is not strongly connected")


def test_no_import_cycles():
  graph = import_graph()
  assert "cat_jax.train" in graph and "cat_jax.experiments.common" in graph
  cycles = find_cycles(graph)
  assert not cycles, "import cycles among cat_jax modules: " + "; ".join(
      " -> ".join(c) for c in cycles)


def test_the_reader_sees_every_kind_of_import(tmp_path):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from pkg import b\n")
  (pkg / "b.py").write_text("def f():\n  import pkg.sub.c\n")
  (pkg / "sub" / "c.py").write_text("from pkg.a import thing\n")
  (pkg / "d.py").write_text("from . import e\nimport os\n")
  (pkg / "e.py").write_text("from .sub import c\n")
  graph = import_graph(str(pkg), "pkg")
  assert graph["pkg.a"] == {"pkg.b"}
  assert graph["pkg.b"] == {"pkg.sub.c"}
  assert graph["pkg.sub.c"] == {"pkg.a"}
  assert graph["pkg.d"] == {"pkg.e"} and graph["pkg.e"] == {"pkg.sub.c"}
  assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
  with pytest.raises(AssertionError, match="not strongly connected"):
    _cycle_in({"x": set(), "y": set()}, {"x", "y"})
