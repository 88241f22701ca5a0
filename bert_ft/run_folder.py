"""Where a run writes: a fresh folder per run by default, `runs/latest` pointing at the newest; inputs checked first.

Without --output_dir every run gets its own folder, runs/<task>-<YYYYmmdd-HHMMSS> (a -2, -3 ... suffix when that
name is taken), so a first or a second run never meets another run's folder; runs/latest is a symbolic link to the
newest run, replaced atomically when a run creates its folder, so `--model_dir runs/latest/model` always means the
last run started. An explicit --output_dir keeps its protection (a folder that holds another run is refused unless
--overwrite_output_dir or --resume_from_checkpoint). `--resume_from_checkpoint` without --output_dir continues the
run it names (latest: the run runs/latest points at).

The input files are checked before any of this: a misspelled --train_file is named as such, whatever the output
folder holds.
"""

from __future__ import annotations

import os
import time

from accelerate.utils import broadcast_object_list

from .data import require_file

RUNS_ROOT = "runs"
LATEST = "latest"


def check_input_files(config) -> None:
    """Every data file the flags name exists (DataError naming the first one that does not)."""
    for name in ("train_file", "validation_file", "test_file"):
        path = getattr(config, name, None)
        if path:
            require_file(path)


def default_run_folder(task_name: str, root: str = RUNS_ROOT, now: float | None = None) -> str:
    """runs/<task>-<YYYYmmdd-HHMMSS> (local time), with -2, -3 ... when a folder of that name exists."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    folder = os.path.join(root, f"{task_name}-{stamp}")
    candidate, number = folder, 1
    while os.path.lexists(candidate):
        number += 1
        candidate = f"{folder}-{number}"
    return candidate


def resumed_run_folder(checkpoint: str, root: str = RUNS_ROOT) -> str:
    """The run folder a --resume_from_checkpoint without --output_dir continues: the folder runs/latest points at
    for 'latest', else the folder that holds the named checkpoint-STEP folder."""
    if checkpoint == "latest":
        return os.path.realpath(os.path.join(root, LATEST)) if os.path.lexists(os.path.join(root, LATEST)) \
            else os.path.join(root, LATEST)
    return os.path.dirname(os.path.normpath(checkpoint)) or "."


def choose_output_dir(config, task_name: str) -> bool:
    """Fill in config.output_dir when it was not given; True when the run uses a default folder (then
    `point_latest` follows it once the folder exists)."""
    if config.output_dir:
        return False
    if config.resume_from_checkpoint:
        config.output_dir = resumed_run_folder(config.resume_from_checkpoint)
        return False
    config.output_dir = default_run_folder(task_name)
    return True


def same_on_every_process(accelerator, folder: str) -> str:
    """The main process's choice of folder on every process (each process picked a name from its own clock)."""
    if accelerator.num_processes == 1:
        return folder

    return broadcast_object_list([folder])[0]


def point_latest(folder: str, log=print) -> None:
    """Make <folder's parent>/latest a symbolic link to `folder`, atomically (a new link renamed over the old).
    A real folder named latest (a run of a bert-ft version whose default was runs/latest) is first renamed to
    runs/run-<its time>, so nothing is lost."""
    root = os.path.dirname(os.path.abspath(folder))
    link = os.path.join(root, LATEST)
    if os.path.isdir(link) and not os.path.islink(link):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(link)))
        aside = default_run_folder("run", root, os.path.getmtime(link))
        os.rename(link, aside)
        log(f"note: {link} was a run folder (bert-ft's earlier default); moved to {aside} ({stamp})")
    temp = os.path.join(root, f".{LATEST}-{os.getpid()}")
    if os.path.lexists(temp):
        os.remove(temp)
    try:
        os.symlink(os.path.basename(os.path.abspath(folder)), temp)
        os.replace(temp, link)
    except OSError as error:  # e.g. a file system without symbolic links: the run itself is unaffected
        log(f"note: could not point {link} at {folder} ({error.strerror}); use the run folder's own name")
