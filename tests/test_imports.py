"""The core's import graph, read from its source (ast): one way, no circles, no hidden imports, no tasks.

Imports flow from the CLI down to small modules that know nothing of what sits above them. A function-level import
of a core module would hide an edge (or a circle) from the reader, so the only imports inside functions are the
heavy or optional third-party modules listed in bert_ft.lazy.LAZY_IMPORTS.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from bert_ft.lazy import LAZY_IMPORTS

from .conftest import ROOT

CORE = os.path.join(ROOT, "bert_ft")
TASK_PACKAGES = {"tasks", "bert_ft_tasks"}


def core_modules() -> dict[str, ast.Module]:
    """{dotted module name: its syntax tree} of every module of the core package."""
    found = {}
    for name in sorted(os.listdir(CORE)):
        if name.endswith(".py"):
            module = "bert_ft" if name == "__init__.py" else f"bert_ft.{name[:-3]}"
            with open(os.path.join(CORE, name), encoding="utf-8") as handle:
                found[module] = ast.parse(handle.read(), filename=name)
    return found


def imported_names(module: str, node: ast.Import | ast.ImportFrom, modules: set[str]) -> list[str]:
    """The modules an import statement of `module` loads: core modules by their dotted names, others as written."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: from . import x, from .x import y
        package = module if module == "bert_ft" else module.rsplit(".", 1)[0]
        base = package if not node.module else f"{package}.{node.module}"
    else:
        base = node.module
    names = [base]
    if base in ("bert_ft",):  # from . import data: the submodule data
        names = [f"bert_ft.{alias.name}" if f"bert_ft.{alias.name}" in modules else "bert_ft" for alias in node.names]
    return names


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def walk_imports(tree: ast.Module):
    """(import node, inside a function?) for every import statement; TYPE_CHECKING blocks never run."""
    def visit(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if is_type_checking_block(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from visit(child, inside)

    yield from visit(tree, False)


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """({core module: core modules it imports at module level}, problems: task imports and function-level
    imports that are not in LAZY_IMPORTS)."""
    trees = core_modules()
    modules = set(trees)
    graph: dict[str, set[str]] = {module: set() for module in modules}
    problems = []
    for module, tree in trees.items():
        for node, in_function in walk_imports(tree):
            for name in imported_names(module, node, modules):
                top = name.split(".")[0]
                where = f"{module} line {node.lineno}"
                if top in TASK_PACKAGES:
                    problems.append(f"{where}: imports the task package {name} (the core finds tasks through "
                                    "bert_ft.plugins)")
                elif name in modules or top == "bert_ft":
                    if in_function:
                        problems.append(f"{where}: imports the core module {name} inside a function")
                    elif name != module:
                        graph[module].add(name)
                elif in_function and top not in LAZY_IMPORTS:
                    problems.append(f"{where}: imports {name} inside a function; import it at the top, or list it "
                                    "in bert_ft.lazy.LAZY_IMPORTS with the reason")
    return graph, problems


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` as a path (first == last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_core_import_graph_is_one_way_without_hidden_or_task_imports():
    graph, problems = import_graph()
    assert not problems, "\n".join(problems)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
    # The layers the architecture names: the CLI at the top, nothing imports it; the loop above its stages.
    assert not any("bert_ft.cli" in targets for module, targets in graph.items() if module != "bert_ft.docs")
    assert {"bert_ft.data_stage", "bert_ft.training_setup", "bert_ft.checkpoints", "bert_ft.scoring"} <= \
        graph["bert_ft.train"]
    for stage in ("bert_ft.data_stage", "bert_ft.model_folder", "bert_ft.parity", "bert_ft.export",
                  "bert_ft.onnx_model", "bert_ft.inference", "bert_ft.heads"):
        assert "bert_ft.train" not in graph[stage], stage


def test_the_graph_checker_finds_what_it_forbids(tmp_path):
    """The checks above would fail on a circle, a hidden core import and a task import (checked on made-up code)."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("import os\nfrom .x import y\ndef f():\n    from .heads import Head\n    import bert_ft_tasks\n"
                     "    import datasets\n    import json\n")
    found = [(imported_names("bert_ft.m", node, {"bert_ft.x", "bert_ft.heads"}), inside)
             for node, inside in walk_imports(tree)]
    assert found == [(["os"], False), (["bert_ft.x"], False), (["bert_ft.heads"], True), (["bert_ft_tasks"], True),
                     (["datasets"], True), (["json"], True)]


def test_export_side_of_the_core_loads_without_the_trainer():
    """The parity check and model folders need neither the training loop nor the CPU training patches (whose
    import sets a oneDNN variable)."""
    code = ("import os, sys; os.environ.pop('ONEDNN_PRIMITIVE_CACHE_CAPACITY', None); "
            "import bert_ft.parity, bert_ft.model_folder; "
            "trainer = ('bert_ft.train', 'bert_ft.cpu', 'bert_ft.training_setup', 'bert_ft.cli', 'bert_ft.api'); "
            "print(sorted(name for name in trainer if name in sys.modules), "
            "'ONEDNN_PRIMITIVE_CACHE_CAPACITY' in os.environ)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[] False"
