"""The one task registry: the entry-point group "bert_ft.tasks" plus the modules named with `--task_module`.

The core never imports a task package: it finds every task here. bert-ft's own three tasks (the package
`bert_ft_tasks`, the repository's tasks/ folder) are entry points of bert-ft's own distribution (pyproject.toml),
and a task defined anywhere else (a Task subclass with its own Head) joins the same way without editing bert-ft:
  - installed packages declare it in their pyproject.toml:
        [project.entry-points."bert_ft.tasks"]
        my_task = "my_pkg.my_task:MyTask"
  - or a run names its module: `run_task.py --task_module my_pkg.my_task TASK_NAME ...` (in Python:
    `use_task_modules(["my_pkg.my_task"])`); the module exposes `TASKS` (a dict name -> Task subclass) or defines
    Task subclasses, each of which is registered.
Both are listed by `run_task.py --help`. Two different classes under one name are refused as a clash.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from importlib.metadata import entry_points
from typing import Any, ClassVar, Iterable

from .errors import UsageError
from .task import Task

ENTRY_POINT_GROUP = "bert_ft.tasks"
COMMAND_GROUP = "bert_ft.commands"


class Command:
    """A sub-command that is not a task to train (e.g. `extract`, which chains an NER and a relation model folder).

    A plugin module lists its commands in `COMMANDS` (a dict name -> Command subclass), or an installed package
    declares them in the entry-point group "bert_ft.commands"; the command line gets one sub-command per command,
    whose flags are the fields of `config_type` (a dataclass of `bert_ft.config.flag` fields)."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line for --help
    config_type: ClassVar[type]
    takes_texts: ClassVar[bool] = False  # positional text arguments (like predict's)
    epilog: ClassVar[str] = ""  # printed after the flags by --help

    def problems(self, config: Any) -> list[str]:
        """Invalid flags as '--flag: why' lines (all reported at once)."""
        return []

    def run(self, config: Any, texts: list[str]) -> None:
        raise NotImplementedError


def _defines_commands(value) -> bool:
    return inspect.ismodule(value) and isinstance(getattr(value, "COMMANDS", None), dict)


def _tasks_in(value, origin: str) -> list[type]:
    """The Task subclasses a module, a dict or a class stands for (a module may define only commands)."""
    if isinstance(value, dict):
        found = list(value.values())
    elif inspect.ismodule(value):
        if isinstance(getattr(value, "TASKS", None), dict):
            found = list(value.TASKS.values())
        else:
            found = [item for item in vars(value).values() if inspect.isclass(item) and issubclass(item, Task)
                     and item.__module__ == value.__name__ and "name" in vars(item)]
    else:
        found = [value]
    bad = [item for item in found if not (inspect.isclass(item) and issubclass(item, Task))]
    if bad or not (found or _defines_commands(value)):
        raise UsageError(f"{origin}: expected bert_ft.task.Task subclasses, found {bad or 'none'}")
    return found


def _commands_in(value, origin: str) -> list[type]:
    found = list(value.COMMANDS.values()) if _defines_commands(value) else [value] if inspect.isclass(value) and \
        issubclass(value, Command) else []
    bad = [item for item in found if not (inspect.isclass(item) and issubclass(item, Command))]
    if bad:
        raise UsageError(f"{origin}: COMMANDS must map names to bert_ft.plugins.Command subclasses, found {bad}")
    return found


def plugin_modules(package: str, folder: str) -> list[str]:
    """The modules of `package` (in `folder`) that define tasks or commands; the others are helpers (a data format,
    a converter) and are not registered."""
    names = []
    for module in pkgutil.iter_modules([folder]):
        value = importlib.import_module(f"{package}.{module.name}")
        if _defines_commands(value) or isinstance(getattr(value, "TASKS", None), dict) or any(
                inspect.isclass(item) and issubclass(item, Task) and item.__module__ == value.__name__
                and "name" in vars(item) for item in vars(value).values()):
            names.append(f"{package}.{module.name}")
    return names


_task_modules: list[str] = []  # modules given to use_task_modules (--task_module), in order
_cache: dict[tuple[str, ...], dict] = {}
_command_cache: dict[tuple[str, ...], dict] = {}


def use_task_modules(modules: Iterable[str]) -> None:
    """Add the tasks of `modules` (import paths, as --task_module takes them) to the registry of this process;
    raises UsageError when one cannot be imported or defines no task."""
    new = [module for module in modules if module not in _task_modules]
    task_registry(new)  # import and check them now: a bad module is reported where it is named
    _task_modules.extend(new)


def registered_tasks() -> dict:
    """{name: Task subclass}: every entry-point task plus the tasks of the modules given to `use_task_modules`
    (read once per process and set of modules)."""
    key = tuple(_task_modules)
    if key not in _cache:
        _cache[key] = task_registry(key)
    return _cache[key]


def registered_commands() -> dict:
    """{name: Command subclass}: the "bert_ft.commands" entry points plus the `COMMANDS` of the modules given to
    `use_task_modules`."""
    key = tuple(_task_modules)
    if key not in _command_cache:
        registry: dict = {}
        sources = []
        for entry in entry_points(group=COMMAND_GROUP):
            try:
                sources.append((f"entry point {entry.name} = {entry.value}", entry.load()))
            except Exception as error:  # as for tasks: a broken package must not break the others
                print(f"warning: cannot load the {COMMAND_GROUP} entry point {entry.value}: {error}")
        sources += [(f"--task_module {module}", importlib.import_module(module)) for module in key]
        for origin, value in sources:
            for command in _commands_in(value, origin):
                known = registry.get(command.name)
                if known is not None and known is not command:
                    raise UsageError(f"{origin}: command name {command.name!r} is already taken by "
                                     f"{known.__module__}.{known.__name__}")
                registry[command.name] = command
        _command_cache[key] = registry
    return _command_cache[key]


def task_registry(modules: Iterable[str] = ()) -> dict:
    """The entry-point tasks plus the tasks of each of `modules` (without remembering them: see
    `use_task_modules`)."""
    registry: dict = {}
    sources: list[tuple[str, object]] = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            sources.append((f"entry point {entry.name} = {entry.value}", entry.load()))
        except Exception as error:  # a broken third-party package must not break bert-ft's own tasks
            print(f"warning: cannot load the {ENTRY_POINT_GROUP} entry point {entry.value}: {error}")
    for module in modules:
        try:
            sources.append((f"--task_module {module}", importlib.import_module(module)))
        except ImportError as error:
            raise UsageError(f"--task_module {module}: cannot import it ({error}).\n  fix: give an importable module "
                             "path (e.g. my_pkg.my_task) and run from the folder that holds my_pkg, or install it")
    for origin, value in sources:
        for task in _tasks_in(value, origin):
            known = registry.get(task.name)
            if known is not None and known is not task:
                raise UsageError(f"{origin}: task name {task.name!r} is already taken by {known.__module__}."
                                 f"{known.__name__}; give the new task another name")
            registry[task.name] = task
    return registry


def split_task_modules(argv: list[str]) -> tuple[list[str], list[str]]:
    """(modules named by --task_module, argv without them): read before the sub-commands are built."""
    modules, rest, index = [], [], 0
    while index < len(argv):
        item = argv[index]
        if item == "--task_module" and index + 1 < len(argv):
            modules.append(argv[index + 1])
            index += 2
            continue
        if item.startswith("--task_module="):
            modules.append(item.split("=", 1)[1])
        else:
            rest.append(item)
        index += 1
    return modules, rest
