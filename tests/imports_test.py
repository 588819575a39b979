"""Imports run one way: no cycle between jdit's modules (imports inside functions count), none between its
packages, and the building blocks in jdit.nn import no other part of jdit. Every jdit import in the library, the
tools and the tests names something that exists (imports inside functions run late: a stale one fails only then)."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOTTOM = {"jdit.nn": (), "jdit.plugins": (), "jdit.state_dict": (), "jdit.sharding": ()}  # importing no jdit part


def modules() -> dict[str, str]:
  """jdit module name -> file path."""
  found = {}
  for directory, _, names in os.walk(os.path.join(ROOT, "jdit")):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        found[module.removesuffix(".__init__")] = path
  return found


def import_graph(found: dict[str, str]) -> dict[str, set[str]]:
  """module -> the jdit modules it imports anywhere in its file (`from a import b` names module a.b when it is
  one, else a)."""
  graph = {}
  for module, path in found.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    targets = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets |= {a.name for a in node.names if a.name.startswith("jdit")}
      elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jdit"):
        targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in found else node.module
                    for a in node.names}
    graph[module] = {t for t in targets if t != module}
  return graph


def unit(module: str, found: dict[str, str]) -> str:
  """A module's package (jdit.models, jdit.data, ...), or the module itself when it sits at the top of jdit."""
  parts = module.split(".")
  package = ".".join(parts[:2])
  return package if found.get(package, "").endswith("__init__.py") else module


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle of `graph` as a path, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_imports_itself_back():
  cycle = find_cycle(import_graph(modules()))
  assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_no_two_packages_import_each_other():
  found = modules()
  graph = {}
  for module, targets in import_graph(found).items():
    graph.setdefault(unit(module, found), set()).update(unit(t, found) for t in targets)
  graph = {node: targets - {node} for node, targets in graph.items()}
  assert {"jdit.nn", "jdit.models", "jdit.text", "jdit.data"} <= set(graph)
  cycle = find_cycle(graph)
  assert cycle is None, f"package cycle: {' -> '.join(cycle)}"
  for bottom in BOTTOM:
    assert not graph[bottom], f"{bottom} sits below the rest of jdit but imports {sorted(graph[bottom])}"
  assert "jdit.models" not in graph["jdit.text"] and "jdit.data" not in graph["jdit.text"]


def top_level_names(path: str) -> set[str]:
  """The names a module defines or imports at its top level."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names |= {(a.asname or a.name).split(".")[0] for a in node.names}
  return names


def test_every_jdit_import_resolves():
  found = modules()
  files = [p for top in ("jdit", "tools", "tests") for p in glob.glob(os.path.join(ROOT, top, "**", "*.py"),
                                                                       recursive=True)]
  missing = []
  for path in files:
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        missing += [f"{path}: import {a.name}" for a in node.names
                    if a.name.startswith("jdit") and a.name not in found]
      elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jdit"):
        if node.module not in found:
          missing.append(f"{path}: from {node.module}")
          continue
        defined = top_level_names(found[node.module])
        missing += [f"{path}: from {node.module} import {a.name}" for a in node.names
                    if f"{node.module}.{a.name}" not in found and a.name not in defined]
  assert not missing, "imports of names that do not exist: " + "; ".join(missing)
