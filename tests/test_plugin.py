"""A task from outside the repository: multiple choice (examples/plugins/multiple_choice.py) through --task_module.

Its examples' input_ids have shape (choices, seq) and are not flattened into separate examples; it trains, saves,
reloads with identical outputs and predicts, while no file of bert_ft/ or tasks/ knows it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from tests.conftest import ROOT

PLUGINS = os.path.join(ROOT, "examples", "plugins")
QUESTIONS = [("the sky on a clear day is", ["blue", "green", "loud"], 0),
             ("grass in spring is", ["purple", "green", "salty"], 1),
             ("a lemon tastes", ["quiet", "tall", "sour"], 2),
             ("snow is usually", ["white", "angry", "late"], 0),
             ("the sea tastes", ["wooden", "salty", "slow"], 1),
             ("a tomato is usually", ["square", "silent", "red"], 2)]


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for index, (context, choices, label) in enumerate(rows):
            handle.write(json.dumps({"id": f"q{index}", "context": context, "choices": choices, "label": label}) + "\n")
    return str(path)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PLUGINS, ROOT])}
    return subprocess.run([sys.executable, os.path.join(ROOT, "run_task.py"), "--task_module", "multiple_choice", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_multiple_choice_plugin_trains_saves_reloads_and_predicts(tiny_model_dir, tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", QUESTIONS * 4)
    test = write_jsonl(tmp_path / "test.jsonl", QUESTIONS)
    run_dir = tmp_path / "run"
    help_text = run_cli("--help").stdout
    assert "multiple_choice" in help_text and "multiple choice (JSONL" in help_text
    done = run_cli("multiple_choice", "--model_name_or_path", tiny_model_dir, "--train_file", train,
                   "--validation_file", test, "--test_file", test, "--output_dir", str(run_dir),
                   "--num_train_epochs", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["packing"].startswith("off")
    meta = json.loads((run_dir / "model" / "bert_ft.json").read_text())
    assert meta["task"] == "multiple_choice" and meta["task_module"] == "multiple_choice"

    # Reload in this process through a registry that includes the plugin: identical outputs after a second save.
    sys.path.insert(0, PLUGINS)
    try:
        from bert_ft.data import Collator
        from bert_ft.model_folder import load_model, save_model
        from bert_ft import plugins
        from bert_ft.plugins import registered_tasks, task_registry, use_task_modules

        monkeypatch.setattr(plugins, "_task_modules", [])  # this test's registrations end with it
        registry = task_registry(["multiple_choice"])
        assert "multiple_choice" not in registered_tasks(), "task_registry(modules) registers nothing"
        use_task_modules(["multiple_choice"])
        assert registered_tasks()["multiple_choice"] is registry["multiple_choice"]
        model, tokenizer, _ = load_model(str(run_dir / "model"))
        task = registry["multiple_choice"]()
        examples = task.read(test)
        features = task.encode(examples, tokenizer, 32, model.labels)
        assert torch.tensor(features.inputs[0]["input_ids"]).dim() == 2, "(choices, seq) per example"
        batch = Collator(task.pad_values(tokenizer))(list(enumerate(features.inputs)))
        batch.pop("feature_index")
        assert batch["input_ids"].shape[:2] == (len(examples), 3)
        save_model(model, tokenizer, str(tmp_path / "again"), task.name)
        reloaded, _, _ = load_model(str(tmp_path / "again"))
        with torch.no_grad():
            first, second = model(**batch, decode=True), reloaded(**batch, decode=True)
        assert torch.equal(first["probs"], second["probs"])
    finally:
        sys.path.remove(PLUGINS)

    # predict on the test inputs gives the run's own test predictions.
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"context": c, "choices": ch}) + "\n" for c, ch, _ in QUESTIONS))
    predicted = run_cli("predict", "--model_dir", str(run_dir / "model"), "--input_file", str(inputs))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    labels = [json.loads(line)["label"] for line in predicted.stdout.splitlines()]
    expected = [int(json.loads(line)["pred"]) for line in (run_dir / "test_predictions.jsonl").read_text().splitlines()]
    assert labels == expected
    assert labels == [int(p) for p in first["pred"].tolist()]


def test_core_never_names_the_plugin():
    for folder in ("bert_ft", "tasks"):
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith(".py"):
                with open(os.path.join(ROOT, folder, name), encoding="utf-8") as handle:
                    assert "multiple_choice" not in handle.read(), f"{folder}/{name} names the plugin"


def test_unknown_task_module_is_a_clear_error(tmp_path):
    done = run_cli("multiple_choice", "--help")
    assert done.returncode == 0
    env = {**os.environ, "PYTHONPATH": ROOT}
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "run_task.py"), "--task_module", "no_such_module_xyz",
                          "ner"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --task_module no_such_module_xyz: cannot import it")
    assert "Traceback" not in bad.stderr


def test_multiple_choice_plugin_passes_the_public_harness(tiny_model_dir, tmp_path, monkeypatch):
    """bert_ft.testing.check_task, as a plugin author would call it: trains (the loss falls), saves and reloads with
    equal outputs, predicts one result per raw input (packing is not checked: the task is not packable)."""
    from bert_ft.testing import check_task

    monkeypatch.syspath_prepend(PLUGINS)
    from multiple_choice import MultipleChoiceTask

    train = write_jsonl(tmp_path / "train.jsonl", QUESTIONS * 4)
    inputs = [{"context": context, "choices": choices} for context, choices, _ in QUESTIONS]
    report = check_task(MultipleChoiceTask(), train, str(tmp_path / "check"), inputs=inputs,
                        model_dir=tiny_model_dir)
    assert report["loss_after"] < report["loss_before"]
    assert [len(result["probabilities"]) for result in report["predictions"]] == [3] * len(QUESTIONS)
    assert report["packing_exact"] is None and 0.0 <= report["metrics"]["test_accuracy"] <= 1.0
