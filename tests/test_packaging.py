"""Installed names: the wheel holds only bert_ft and bert_ft_tasks (no top-level `tasks` or `run_task` to shadow or be
shadowed), declares the `bert-ft` command and the built-in tasks as entry points; `bert-ft` and
`python run_task.py` list the same tasks, installed or not."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from .conftest import ROOT

BUILT_IN = ("ner", "relation", "sentence")
COMMANDS = ("convert", "extract")  # the plugin commands of tasks/ (bert_ft.plugins.Command)


def test_wheel_installs_only_bert_ft_names(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    for folder in ("bert_ft", "tasks"):
        shutil.copytree(os.path.join(ROOT, folder), source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True,
                           timeout=300)
    if built.returncode != 0 and "No module named" in built.stderr:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("bert_ft-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
        entry_points = archive.read(info).decode()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"bert_ft", "bert_ft_tasks"}, top
    assert {"bert_ft_tasks/ner.py", "bert_ft_tasks/relation.py", "bert_ft_tasks/sentence.py",
            "bert_ft_tasks/samples/ner_train.txt", "bert_ft/cli.py"} <= set(names)
    lines = [line.replace(" ", "") for line in entry_points.splitlines()]
    assert lines[lines.index("[console_scripts]") + 1] == "bert-ft=bert_ft.cli:main"
    group = lines[lines.index("[bert_ft.tasks]") + 1:]
    assert {f"{name}=bert_ft_tasks.{name}:{name.capitalize() if name != 'ner' else 'Ner'}Task"
            for name in BUILT_IN} <= set(group)


def help_text(*command: str, env: dict | None = None) -> str:
    done = subprocess.run(list(command), capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def listed_tasks(text: str) -> list[str]:
    """The task names of the help's "tasks:" section, in order."""
    section = text.split("tasks:\n", 1)[1]
    return [line.split()[0] for line in section.splitlines() if line.startswith("  ") and line.split()]


def test_console_script_and_run_task_list_the_same_tasks():
    script = os.path.join(os.path.dirname(sys.executable), "bert-ft")
    if not os.path.isfile(script):
        pytest.skip("bert-ft is not installed in this environment (make setup installs it)")
    installed = help_text(script, "--help")
    repository = help_text(sys.executable, os.path.join(ROOT, "run_task.py"), "--help")
    assert installed.startswith("usage: bert-ft") and repository.startswith("usage: run_task.py")
    assert listed_tasks(installed) == listed_tasks(repository) == [*BUILT_IN, "predict", "export", *COMMANDS]


# bert-ft not installed: no editable finder, no bert_ft_tasks, no entry points; run_task.py from the repository root.
UNINSTALLED = """
import importlib.metadata, runpy, sys
sys.meta_path[:] = [finder for finder in sys.meta_path if "editable" not in type(finder).__module__.lower()
                    and "editable" not in getattr(finder, "__name__", "").lower()]
sys.path[:] = [path for path in sys.path if "__editable__" not in path]
for name in [name for name in sys.modules if name.startswith(("bert_ft", "tasks"))]:
    del sys.modules[name]
real = importlib.metadata.entry_points
importlib.metadata.entry_points = lambda **kw: [] if kw.get("group") in ("bert_ft.tasks", "bert_ft.commands") \
    else real(**kw)
import importlib.util
assert importlib.util.find_spec("bert_ft_tasks") is None, "still installed"
sys.argv = ["run_task.py", *sys.argv[1:]]
runpy.run_path("run_task.py", run_name="__main__")
"""


def test_run_task_works_from_the_repository_without_an_install(tmp_path):
    text = help_text(sys.executable, "-c", UNINSTALLED, "--help")
    assert listed_tasks(text) == [*BUILT_IN, "predict", "export", *COMMANDS]
    done = subprocess.run([sys.executable, "-c", UNINSTALLED, "ner", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0 and "--crf" in done.stdout, done.stderr[-2000:]


def test_the_tasks_folder_has_one_import_name():
    """Imported as `tasks` (the repository root on sys.path), the folder refuses with the name to use: the same task
    class under two module names would be two tasks to the registry."""
    done = subprocess.run([sys.executable, "-c", "import tasks.ner"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 1 and "import bert_ft_tasks instead of tasks" in done.stderr
