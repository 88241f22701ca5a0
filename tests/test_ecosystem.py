"""Around a run: hyperparameter search (Optuna), model cards (huggingface_hub), trackers (MLflow)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket

import pytest

from bert_ft.cli import main, parse
from bert_ft.errors import UsageError

from .conftest import ROOT

SAMPLES = os.path.join(ROOT, "tasks", "samples")


def numbers(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# ------------------------------------------------------------------------------------------------ search

SPACE = """learning_rate: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
per_device_train_batch_size: {type: categorical, choices: [8, 16]}
layer_lr_decay: {type: float, low: 0.8, high: 1.0}
"""


def search_args(tiny_model_dir: str, output_dir: str, space: str, trials: int, test_file: str) -> list[str]:
    return ["ner", "--model_name_or_path", tiny_model_dir, "--train_file", os.path.join(SAMPLES, "ner_train.txt"),
            "--validation_file", os.path.join(SAMPLES, "ner_dev.txt"), "--test_file", test_file,
            "--max_train_samples", "48", "--max_eval_samples", "24", "--max_seq_length", "48",
            "--num_train_epochs", "1", "--output_dir", output_dir, "--hp_search", str(trials), "--hp_space", space]


def test_search_resumes_its_study_and_never_reads_the_test_split(tiny_model_dir, tmp_path):
    optuna = pytest.importorskip("optuna", reason="optuna is the optional extra bert-ft[search]")
    from optuna.trial import TrialState

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    test_file = tmp_path / "test.txt"
    test_file.write_text("this line is not CoNLL\n")  # reading it would stop the run with a DataError
    out = str(tmp_path / "search")
    assert main(search_args(tiny_model_dir, out, str(space), 2, str(test_file))) == 0
    storage = f"sqlite:///{os.path.join(out, 'study.db')}"
    study = optuna.load_study(study_name="bert_ft", storage=storage)
    first = [(trial.number, trial.value, trial.params) for trial in study.trials]
    assert [number for number, _, _ in first] == [0, 1]
    for number, value, params in first:
        metrics = read_json(os.path.join(out, f"trial-{number}", "metrics.json"))
        assert not [key for key in metrics if key.startswith("test_")]
        assert metrics["eval_f1"] == value
        assert params["per_device_train_batch_size"] in (8, 16) and 1e-4 <= params["learning_rate"] <= 3e-3

    # A launch killed mid-trial leaves that trial "running" in the study file.
    killed = study.ask()
    killed.suggest_float("learning_rate", 1e-4, 3e-3, log=True)
    assert main(search_args(tiny_model_dir, out, str(space), 3, str(test_file))) == 0
    study = optuna.load_study(study_name="bert_ft", storage=storage)
    assert [(trial.number, trial.value, trial.params) for trial in study.trials[:2]] == first  # kept, not re-run
    assert [trial.number for trial in study.trials] == [0, 1, 2, 3]
    assert study.trials[2].state == TrialState.FAIL and study.trials[2].user_attrs["interrupted"]
    assert study.trials[3].state == TrialState.COMPLETE
    assert study.trials[3].params["learning_rate"] == killed.params["learning_rate"]  # the interrupted flags first

    best = study.best_trial
    rows = (tmp_path / "search" / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("trial,state,eval_f1") and len(rows) == 5
    _, config, _ = parse(["ner", "--config", os.path.join(out, "best.yaml")])
    assert config.learning_rate == best.params["learning_rate"]
    assert config.per_device_train_batch_size == best.params["per_device_train_batch_size"]
    assert config.test_file == str(test_file) and config.hp_search == 0  # the best flags score the test split
    assert config.output_dir == os.path.join(out, "best")


def test_search_under_two_processes_runs_each_trial_on_both(tiny_model_dir, tmp_path):
    """torch.distributed.run with 2 processes: the main process samples, both train every trial (each run folder
    says 2 processes), the study holds each trial once with its run's validation score, and best.yaml is written."""
    optuna = pytest.importorskip("optuna", reason="optuna is the optional extra bert-ft[search]")
    import subprocess
    import sys

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    out = str(tmp_path / "search")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563",
               os.path.join(ROOT, "run_task.py"),
               *search_args(tiny_model_dir, out, str(space), 2, os.path.join(SAMPLES, "ner_dev.txt"))]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="bert_ft", storage=f"sqlite:///{os.path.join(out, 'study.db')}")
    assert [trial.number for trial in study.trials] == [0, 1]  # one study entry per trial, not one per process
    for trial in study.trials:
        metrics = read_json(os.path.join(out, f"trial-{trial.number}", "metrics.json"))
        assert metrics["num_processes"] == 2 and metrics["eval_f1"] == trial.value
        assert not [key for key in metrics if key.startswith("test_")]
        config = read_json(os.path.join(out, f"trial-{trial.number}", "config.json"))
        assert config["learning_rate"] == trial.params["learning_rate"]
    assert os.path.isfile(os.path.join(out, "best.yaml"))


def test_search_space_errors_are_reported_at_once(tmp_path):
    pytest.importorskip("optuna", reason="optuna is the optional extra bert-ft[search]")
    from bert_ft.config import TrainConfig
    from bert_ft.hpsearch import read_space

    space = tmp_path / "space.yaml"
    space.write_text("learning_rat: {type: float, low: 1, high: 2}\nwarmup_ratio: {type: float, low: 0.3, high: 0.1}\n"
                     "output_dir: {type: categorical, choices: [a]}\nseed: {type: int, low: 1, high: 2.5}\n")
    with pytest.raises(UsageError) as error:
        read_space(str(space), [TrainConfig])
    message = str(error.value)
    assert all(part in message for part in ("learning_rat: not a flag", "warmup_ratio: low must be below high",
                                            "output_dir: cannot be searched", "seed: int needs whole numbers"))


def test_on_epoch_hook_ends_training_when_it_returns_true(tiny_model_dir, tmp_path):
    from bert_ft.train import run

    _, config, task = parse(["sentence", "--model_name_or_path", tiny_model_dir, "--num_train_epochs", "3",
                                    "--max_train_samples", "32", "--max_eval_samples", "16",
                                    "--output_dir", str(tmp_path / "run")])
    seen = []
    metrics = run(task, config, on_epoch=lambda record: seen.append(record) or True)
    assert [record["epoch"] for record in seen] == [1] and metrics["epochs_trained"] == 1
    assert "eval_accuracy" in seen[0]


# ------------------------------------------------------------------------------------------------ cards, trackers

def test_model_card_and_mlflow_hold_metrics_json(tiny_model_dir, tmp_path, monkeypatch):
    """One run with --report_to mlflow,tensorboard: the model card parses with huggingface_hub and its numbers are
    metrics.json's; MLflow's store (local sqlite, no network) holds the flags and metrics.json's numbers."""
    pytest.importorskip("mlflow", reason="mlflow-skinny is the optional extra bert-ft[mlflow]")
    pytest.importorskip("tensorboard", reason="tensorboard is the optional extra bert-ft[tensorboard]")
    from huggingface_hub import ModelCard
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    def no_network(*args, **kwargs):
        raise AssertionError(f"a run tried the network: {args}")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    run_dir = tmp_path / "run"
    assert main(["sentence", "--model_name_or_path", tiny_model_dir, "--num_train_epochs", "2",
                        "--max_train_samples", "64", "--max_eval_samples", "32", "--per_device_train_batch_size", "8",
                        "--logging_steps", "2", "--output_dir", str(run_dir), "--report_to", "mlflow,tensorboard",
                        "--run_name", "tiny-sst"]) == 0
    metrics, config = read_json(run_dir / "metrics.json"), read_json(run_dir / "config.json")

    card = ModelCard.load(str(run_dir / "model" / "README.md"))
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    assert "bert-ft" in card.data.tags
    results = {(result.dataset_split, result.metric_type): result.metric_value for result in card.data.eval_results}
    expected = {(split, key[len(prefix) + 1:]): value for key, value in numbers(metrics).items()
                for prefix, split in (("eval", "validation"), ("test", "test")) if key.startswith(prefix + "_")
                and key[len(prefix) + 1:] not in ("runtime", "samples_per_second", "samples")}
    assert results == expected and ("test", "accuracy") in results
    assert f"| test | {config['data_sources']['test']} | {metrics['test_samples']} |" in card.text
    assert f"| accuracy | {metrics['eval_accuracy']:.4f} | {metrics['test_accuracy']:.4f} |" in card.text
    assert "| --num_train_epochs | 2 |" in card.text and "| --seed |" not in card.text
    if importlib.util.find_spec("onnxruntime"):  # the export folder's card: the source card's numbers + its parity
        export_dir = tmp_path / "onnx"
        assert main(["export", "--model_dir", str(run_dir / "model"), "--output_dir", str(export_dir)]) == 0
        report = read_json(export_dir / "export_report.json")
        exported = ModelCard.load(str(export_dir / "README.md"))
        assert exported.data.library_name == "onnx" and {"onnx", "bert-ft"} <= set(exported.data.tags)
        assert {(result.dataset_split, result.metric_type): result.metric_value
                for result in exported.data.eval_results} == {**expected, ("parity", "accuracy"):
                                                              report["exported"]["accuracy"]}
        assert f"| accuracy | {metrics['eval_accuracy']:.4f} | {metrics['test_accuracy']:.4f} |" in exported.text

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("bert_ft")
    (stored,) = client.search_runs([experiment.experiment_id])
    assert stored.info.run_name == "tiny-sst" and stored.info.status == "FINISHED"
    assert {key: value for key, value in stored.data.metrics.items() if key in metrics} == numbers(metrics)
    assert stored.data.params["learning_rate"] == str(config["learning_rate"])
    assert stored.data.params["num_train_epochs"] == "2" and stored.data.params["task"] == "sentence"
    history = client.get_metric_history(stored.info.run_id, "epoch_train_loss")
    assert [round(point.value, 6) for point in history] == [round(record, 6) for record in
                                                             [h for h in _epoch_losses(run_dir)]]
    steps = [point.step for point in client.get_metric_history(stored.info.run_id, "lr")]
    assert steps == sorted(steps) and len(steps) >= 4 and steps[0] == 2  # every --logging_steps 2
    assert list(run_dir.rglob("events.out.tfevents.*")), "tensorboard logs beside mlflow"


def _epoch_losses(run_dir) -> list[float]:
    """Each epoch's mean training loss as the run recorded it (checkpoint trainer_state history)."""
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    return [record["train_loss"] for record in read_json(checkpoints[-1] / "trainer_state.json")["history"]]
