"""Hyperparameter search with Optuna: `run_task.py TASK --hp_search N [--hp_space space.yaml] [--hp_study file]`.

N trials, one after another in this launch (under several processes every process trains each trial; the main
process alone talks to Optuna and broadcasts the sampled flags and the pruning decisions). Each trial is an ordinary
run in --output_dir/trial-NUMBER with the sampled flags; the score is the validation metric of the task
(TPE sampler seeded by --seed; MedianPruner on the validation metric reported after every epoch through
`train.run`'s `on_epoch` hook). Trials never read the test split: its file is dropped from every trial's flags
(the task's shipped sample test file too), and only the best flags' config, which keeps --test_file, scores it.

The study lives in a SQLite file (--hp_study, default --output_dir/study.db): launching the same command again
continues it. A trial left running by a killed launch is marked failed and its flags are tried again first; trial
numbers continue. At the end: --output_dir/best.yaml (the flags to pass to --config; output_dir points at
--output_dir/best), trials.csv and trials.md (every trial), and Optuna's plots where matplotlib is installed.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import warnings
from typing import Any
from unittest import mock

import torch
import yaml
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from .checkpoints import RUN_MARKERS
from .config import TrainConfig, read_config_file
from .errors import TrainingDiverged, UsageError
from .io import atomic_write_text
from .train import run

STUDY_NAME = "bert_ft"
# The default space: the flags the brief's users tune first. LoRA runs search a higher learning-rate range.
DEFAULT_SPACE = {
    "learning_rate": {"type": "float", "low": 1e-5, "high": 5e-4, "log": True},
    "head_learning_rate": {"type": "float", "low": 1e-4, "high": 5e-3, "log": True},
    "layer_lr_decay": {"type": "float", "low": 0.7, "high": 1.0},
    "num_train_epochs": {"type": "int", "low": 2, "high": 5},
    "per_device_train_batch_size": {"type": "categorical", "choices": [8, 16, 32]},
    "warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2},
    "weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
}
LORA_LEARNING_RATE = {"type": "float", "low": 1e-4, "high": 3e-3, "log": True}
# Flags a space may not sample: they decide where data, output and the search itself live.
NOT_SEARCHABLE = {"output_dir", "overwrite_output_dir", "train_file", "validation_file", "test_file", "dataset_name",
                  "hp_search", "hp_space", "hp_study", "config", "resume_from_checkpoint", "check_data", "debug"}


def default_space(config: TrainConfig) -> dict:
    space = dict(DEFAULT_SPACE)
    if config.lora_r:
        space["learning_rate"] = LORA_LEARNING_RATE
    return space


def read_space(path: str, option_types: list[type]) -> dict:
    """The --hp_space YAML: {flag: {type: float|int|categorical, low, high, log, choices}}; every problem at once."""
    values = read_config_file(path)
    fields = {item.name: item for option_type in option_types for item in dataclasses.fields(option_type)}
    problems = []
    for name, spec in values.items():
        where = f"--hp_space {path}: {name}"
        if name not in fields:
            problems.append(f"{where}: not a flag of this task")
            continue
        if name in NOT_SEARCHABLE:
            problems.append(f"{where}: cannot be searched (it names data, output or the search itself)")
            continue
        if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
            problems.append(f"{where}: expected {{type: float|int|categorical, ...}}, got {spec!r}")
            continue
        if spec["type"] == "categorical":
            if not isinstance(spec.get("choices"), list) or not spec["choices"]:
                problems.append(f"{where}: categorical needs a non-empty list 'choices'")
            continue
        low, high = spec.get("low"), spec.get("high")
        if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in (low, high)):
            problems.append(f"{where}: {spec['type']} needs numbers 'low' and 'high', got {low!r}, {high!r}")
        elif not low < high:
            problems.append(f"{where}: low must be below high, got {low} >= {high}")
        elif spec.get("log") and low <= 0:
            problems.append(f"{where}: log: true needs low > 0, got {low}")
        elif spec["type"] == "int" and not (float(low).is_integer() and float(high).is_integer()):
            problems.append(f"{where}: int needs whole numbers, got {low}, {high}")
        unknown = set(spec) - {"type", "low", "high", "log", "step"}
        if unknown:
            problems.append(f"{where}: unknown keys {sorted(unknown)} (allowed: type, low, high, log, step)")
    if not values:
        problems.append(f"--hp_space {path}: empty; give at least one flag to search")
    if problems:
        raise UsageError("invalid search space:\n  " + "\n  ".join(problems))
    return values


def sample(trial: Any, space: dict) -> dict:
    """One value per flag of `space`, drawn through the Optuna trial."""
    values = {}
    for name, spec in space.items():
        if spec["type"] == "categorical":
            values[name] = trial.suggest_categorical(name, spec["choices"])
        elif spec["type"] == "int":
            values[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")),
                                             step=int(spec.get("step", 1)))
        else:
            values[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]),
                                               log=bool(spec.get("log")), step=spec.get("step"))
    return values


def split_values(values: dict, config: TrainConfig, options: Any) -> tuple[dict, dict]:
    train_names = {item.name for item in dataclasses.fields(config)}
    return ({key: value for key, value in values.items() if key in train_names},
            {key: value for key, value in values.items() if key not in train_names})


def trial_setup(task: Any, config: TrainConfig, values: dict, number: int) -> tuple[Any, TrainConfig]:
    """(task, config) of one trial: the sampled flags, its own folder, no test split, no search flags."""
    train_values, option_values = split_values(values, config, task.options)
    files = {}
    if not config.train_file:  # the task's shipped sample: name train/validation so its test file is not read
        defaults = task.default_files()
        files = {"train_file": defaults.get("train"),
                 "validation_file": None if config.validation_split else defaults.get("validation")}
    trial_config = dataclasses.replace(
        config, **train_values, **files, test_file=None, output_dir=os.path.join(config.output_dir, f"trial-{number}"),
        overwrite_output_dir=True, hp_search=0, hp_space=None, hp_study=None, config=None,
        run_name=f"{config.run_name or os.path.basename(os.path.abspath(config.output_dir))}-trial-{number}")
    trial_task = type(task)(dataclasses.replace(task.options, **option_values))
    problems = trial_config.problems() + trial_task.problems(trial_config)
    if problems:
        raise UsageError(f"trial {number} with {values}: invalid flags:\n  " + "\n  ".join(problems)
                         + "\n  fix: narrow --hp_space so that every sampled combination is valid")
    return trial_task, trial_config


def _broadcast(value: Any) -> Any:
    """`value` of the main process, on every process (itself in a single process)."""

    return broadcast_object_list([value])[0]


def open_study(path: str, seed: int, task_name: str, metric: str, log=print):
    """Create or load the study in the SQLite file `path`; a trial still marked running (its launch was killed) is
    failed and its flags queued to run first."""
    import optuna
    from optuna.trial import TrialState

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    existed = os.path.isfile(path)
    study = optuna.create_study(study_name=STUDY_NAME, storage=f"sqlite:///{os.path.abspath(path)}",
                                direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0))
    attributes = study.user_attrs
    if existed and attributes.get("task") not in (None, task_name):
        raise UsageError(f"--hp_study {path}: holds a {attributes['task']} search, not {task_name}; give another "
                         "--hp_study or --output_dir")
    study.set_user_attr("task", task_name)
    study.set_user_attr("metric", f"eval_{metric}")
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        study.enqueue_trial(trial.params)
        log(f"search: trial {trial.number} was interrupted (its launch ended mid-trial); it is marked failed and "
            "its flags run again first")
    return study


def counted(study) -> int:
    """Trials that count towards N: finished ones (complete, pruned, or failed on their own), not interrupted."""
    from optuna.trial import TrialState

    return sum(1 for trial in study.get_trials(deepcopy=False)
               if trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (trial.state == TrialState.FAIL and not trial.user_attrs.get("interrupted")))


def search(task: Any, config: TrainConfig, task_module: str | None = None) -> Any:
    """Run the search to N counted trials; returns the study (None on other processes than the main one)."""


    # cpu=True without a GPU, as train.make_accelerator does: only then does Accelerate form the (gloo) group on CPUs
    state = PartialState(cpu=not torch.cuda.is_available())
    main = state.is_main_process
    log = print if main else (lambda *_: None)
    present = [name for name in RUN_MARKERS if os.path.exists(os.path.join(config.output_dir, name))]
    if present and not config.overwrite_output_dir:
        raise UsageError(f"--output_dir {config.output_dir} holds a training run ({', '.join(present)}), not a "
                         "search; choose a new --output_dir for the search")
    if not (config.validation_file or config.validation_split
            or (not config.train_file and task.default_files().get("validation"))):
        raise UsageError("--hp_search: needs a validation set to score the trials on (a search never reads the test "
                         "split): give --validation_file or --validation_split")
    space = read_space(config.hp_space, [TrainConfig, type(task.options)]) if config.hp_space \
        else default_space(config)
    study_path = config.hp_study or os.path.join(config.output_dir, "study.db")
    study = open_study(study_path, config.seed, task.name, task.metric, log) if main else None
    metric = f"eval_{task.metric}"
    remaining = _broadcast(config.hp_search - counted(study) if main else 0)
    log(f"search: {config.hp_search} trials over {', '.join(space)}; study {study_path}"
        + (f" ({config.hp_search - remaining} done, {max(remaining, 0)} to go)" if remaining < config.hp_search
           else ""))
    with keep_process_group(state):
        study = _trials(study, remaining, space, task, config, task_module, main, log, run)
    if main:
        write_results(study, task, config, metric)
    return study


@contextlib.contextmanager
def keep_process_group(state: Any):
    """Several processes: Accelerator.end_training, which every trial's run calls, destroys the process group that
    the next trial (and the broadcasts between trials) need; keep it until the search ends."""
    if state.num_processes == 1:
        yield
        return

    with mock.patch.object(PartialState, "destroy_process_group", lambda self, group=None: None):
        yield
    state.destroy_process_group()


def _trials(study, remaining: int, space: dict, task: Any, config: TrainConfig, task_module: str | None, main: bool,
            log, run):
    """Run `remaining` trials (see `search`); the main process asks Optuna and tells it the outcome."""
    metric = f"eval_{task.metric}"
    while remaining > 0:
        import optuna

        trial = study.ask() if main else None
        values, number = _broadcast((sample(trial, space), trial.number) if main else None)
        trial_task, trial_config = trial_setup(task, config, values, number)
        log(f"\n== trial {number}: {', '.join(f'{key}={_short(value)}' for key, value in values.items())} ==")
        pruned = []

        def on_epoch(record: dict) -> bool:
            score = record.get(metric)
            decision = False
            if main and score is not None:
                trial.report(score, record["epoch"])
                decision = trial.should_prune()
            decision = _broadcast(decision)
            if decision:
                pruned.append(record["epoch"])
            return decision

        try:
            metrics = run(trial_task, trial_config, task_module, on_epoch=on_epoch)
        except TrainingDiverged as error:
            if main:
                trial.set_user_attr("error", str(error).splitlines()[0])
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log(f"trial {number} failed: {error}")
        else:
            if main:
                trial.set_user_attr("run_dir", trial_config.output_dir)
                if pruned:
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    log(f"trial {number} pruned after epoch {pruned[0]} (validation {task.metric} below the median "
                        "of earlier trials at that epoch)")
                else:
                    study.tell(trial, metrics[metric])
        remaining -= 1
    return study


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def best_config(study, task: Any, config: TrainConfig) -> dict:
    """The flags of the best trial as a --config mapping: the search's own flags that differ from the defaults,
    the best trial's sampled values, output_dir --output_dir/best; no search flags."""
    values = {}
    for option_type, instance in ((TrainConfig, config), (type(task.options), task.options)):
        for item in dataclasses.fields(option_type):
            value = getattr(instance, item.name)
            if value != item.default and item.name not in ("hp_search", "hp_space", "hp_study", "config", "debug",
                                                               "overwrite_output_dir", "run_name"):
                values[item.name] = value
    values.update(study.best_trial.params)
    values["output_dir"] = os.path.join(config.output_dir, "best")
    return values


def write_results(study, task: Any, config: TrainConfig, metric: str) -> None:
    """best.yaml, trials.csv, trials.md and plots in --output_dir; the table printed."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    names = sorted({name for trial in trials for name in trial.params})
    rows = [[trial.number, trial.state.name.lower(), "" if trial.value is None else round(trial.value, 4),
             len(trial.intermediate_values),
             round(trial.duration.total_seconds(), 1) if trial.duration else "",
             *[_short(trial.params[name]) if name in trial.params else "" for name in names]] for trial in trials]
    header = ["trial", "state", metric, "epochs", "seconds", *names]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    os.makedirs(config.output_dir, exist_ok=True)
    atomic_write_text(os.path.join(config.output_dir, "trials.csv"), buffer.getvalue())
    table = "\n".join(["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
                      + ["| " + " | ".join(map(str, row)) + " |" for row in rows])
    atomic_write_text(os.path.join(config.output_dir, "trials.md"), table + "\n")
    print("\n" + table)
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    if not complete:
        print("search: no trial completed; no best.yaml written")
        return
    best = study.best_trial
    best_path = os.path.join(config.output_dir, "best.yaml")
    atomic_write_text(best_path, f"# best of {len(complete)} completed trials: trial {best.number}, validation "
                      f"{task.metric} {best.value:.4f} (study {STUDY_NAME})\n"
                      + yaml.safe_dump(best_config(study, task, config), sort_keys=False))
    written = write_plots(study, config.output_dir)
    print(f"search: best trial {best.number} (validation {task.metric} {best.value:.4f}); its flags: {best_path}\n"
          f"  train it and score the test split: run_task.py {task.name} --config {best_path}"
          + (f"\n  plots: {', '.join(written)}" if written else ""))


def write_plots(study, folder: str) -> list[str]:
    """Optuna's matplotlib plots (history, intermediate values, parameter importances) where they can be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from optuna.visualization import matplotlib as plots
    except ImportError:
        return []
    import matplotlib.pyplot as plt

    written = []
    for name, draw in (("hp_history.png", plots.plot_optimization_history),
                       ("hp_intermediate.png", plots.plot_intermediate_values),
                       ("hp_importances.png", plots.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental" warnings of optuna's matplotlib backend
                axes = draw(study)
            figure = getattr(axes, "figure", None) or axes.flat[0].figure
            path = os.path.join(folder, name)
            figure.savefig(path, bbox_inches="tight")
            plt.close(figure)
            written.append(name)
        except (ValueError, RuntimeError, ImportError, ZeroDivisionError):
            continue  # e.g. importances need two completed trials with different values
    return written

