"""LoRA adapters (peft): what trains, what is saved, and that every saved form gives the trained model's outputs."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("peft", reason="peft is the optional extra bert-ft[lora]")

from bert_ft.cli import main, parse  # noqa: E402
from bert_ft.data import Collator  # noqa: E402
from bert_ft.encoder import load_tokenizer  # noqa: E402
from bert_ft.errors import UsageError  # noqa: E402
from bert_ft.model_folder import load_model, read_meta, save_model  # noqa: E402
from bert_ft.lora import apply_lora, load_adapter, merged, save_adapter  # noqa: E402
from bert_ft.plugins import registered_tasks  # noqa: E402

from .conftest import ROOT  # noqa: E402

SAMPLES = os.path.join(ROOT, "tasks", "samples")
HIDDEN, LAYERS, RANK = 32, 2, 4  # the tiny BERT of conftest.save_tiny_bert
CASES = {"ner": (["--crf"], "ner_train.txt"), "relation": ([], "relation_train.txt"),
         "sentence": ([], "sentence_train.tsv")}


def build(task_name: str, tiny_model_dir: str):
    """(task, tokenizer, labels, head with LoRA r=4 whose LoRA B matrices and head layers are randomised, batch)."""
    flags, sample = CASES[task_name]
    _, _, task = parse([task_name, *flags])
    tokenizer = load_tokenizer(tiny_model_dir)
    task.prepare_tokenizer(tokenizer)
    examples = task.read(os.path.join(SAMPLES, sample))[:6]
    labels = task.build_labels(task.read(os.path.join(SAMPLES, sample)))
    torch.manual_seed(0)
    head = task.build_model(tiny_model_dir, labels, tokenizer, False)
    apply_lora(head, RANK, 16.0, 0.0, None, tiny_model_dir, log=lambda *_: None)
    with torch.no_grad():  # LoRA B starts at zero (a no-op adapter); make every trainable tensor matter
        for param in head.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    features = task.encode(examples, tokenizer, 64, labels)
    batch = Collator(task.pad_values(tokenizer))(list(enumerate(features.inputs)))
    batch.pop("feature_index")
    return task, tokenizer, labels, head.eval(), batch


def scores(head, batch) -> torch.Tensor:
    with torch.no_grad():
        return head.scores(batch)


@pytest.mark.parametrize("task_name", sorted(CASES))
def test_adapter_reload_and_merged_model_equal_the_trained_model(task_name, tiny_model_dir, tmp_path):
    task, tokenizer, labels, head, batch = build(task_name, tiny_model_dir)
    expected = scores(head, batch)
    meta = {"max_seq_length": 64, "task_options": {}}
    save_adapter(head, tokenizer, str(tmp_path / "adapter"), task.name, meta, tiny_model_dir, None)
    reloaded = load_adapter(str(tmp_path / "adapter"), task.head_type, read_meta(str(tmp_path / "adapter"))).eval()
    # adapter + head layers + new token rows (float round-off only: the same weights, reassembled)
    assert torch.allclose(scores(reloaded, batch), expected, atol=1e-6, rtol=0)
    assert reloaded.state_dict().keys() == head.state_dict().keys()

    folded = merged(head).eval()
    assert all("lora" not in name for name, _ in folded.named_parameters())
    assert torch.allclose(scores(folded, batch), expected, atol=1e-5)
    assert torch.equal(scores(head, batch), expected), "merging a copy leaves the training model as it was"
    save_model(folded, tokenizer, str(tmp_path / "model"), task.name, meta)
    plain = task.head_type.load(str(tmp_path / "model"), read_meta(str(tmp_path / "model"))).eval()
    assert torch.allclose(scores(plain, batch), expected, atol=1e-5)
    # predict's loader reads an adapter folder too (merged on load)
    loaded, _, _ = load_model(str(tmp_path / "adapter"))
    assert torch.allclose(scores(loaded, batch), expected, atol=1e-5)


def test_trainable_parameters_are_adapters_head_and_new_token_rows(tiny_model_dir):
    lora = 2 * LAYERS * RANK * (HIDDEN + HIDDEN)  # query and value: A (r, in) + B (out, r) per layer
    _, _, labels, head, _ = build("ner", tiny_model_dir)
    count = len(labels)
    crf = 2 * count + count * count  # start, end, transitions
    trainable = {name: param.numel() for name, param in head.named_parameters() if param.requires_grad}
    assert sum(trainable.values()) == lora + (HIDDEN * count + count) + crf
    assert not any(name.startswith("model.bert.") and "lora_" not in name for name in trainable)

    _, tokenizer, labels, head, _ = build("relation", tiny_model_dir)
    count = len(labels)
    markers = 4 * HIDDEN  # the four <e1> </e1> <e2> </e2> rows, not the 30k-row word embedding
    norm, classifier = 2 * 2 * HIDDEN, 2 * HIDDEN * count + count  # entity_start pooling: 2 * hidden features
    trainable = {name: param.numel() for name, param in head.named_parameters() if param.requires_grad}
    assert sum(trainable.values()) == lora + markers + norm + classifier
    assert not head.model.get_input_embeddings().original_module.weight.requires_grad


def test_adversarial_training_is_refused_under_lora():
    with pytest.raises(UsageError, match="--adversarial fgm: not with --lora_r"):
        parse(["sentence", "--lora_r", "8", "--adversarial", "fgm"])
    with pytest.raises(UsageError, match="--freeze_encoder: not with --lora_r"):
        parse(["sentence", "--lora_r", "8", "--freeze_encoder"])


def lora_args(tiny_model_dir: str, output_dir: str, *extra: str) -> list[str]:
    return ["ner", "--model_name_or_path", tiny_model_dir, "--output_dir", output_dir, "--num_train_epochs", "2",
            "--max_train_samples", "64", "--max_eval_samples", "24", "--per_device_train_batch_size", "8",
            "--learning_rate", "3e-3", "--max_seq_length", "48", "--lora_r", "4", "--crf", *extra]


def assert_merged_predicts_as_adapter(run: str, capsys) -> None:
    """RUN/model (the merged model) and RUN/adapter give the same entities through `predict`."""
    capsys.readouterr()
    outputs = []
    for folder in ("model", "adapter"):
        assert main(["predict", "--model_dir", os.path.join(run, folder), "EU rejects German call"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0]["entities"] == outputs[1]["entities"]


def test_lora_run_trains_only_adapters_and_resumes_exactly(tiny_model_dir, tmp_path, capsys):
    """A full run: base weights untouched, adapter and head trained, RUN/model (merged) predicts as RUN/adapter,
    and resuming from a mid-run checkpoint finishes with the uninterrupted run's scores."""
    from safetensors.torch import load_file

    run = str(tmp_path / "run")
    assert main(lora_args(tiny_model_dir, run, "--save_steps", "4", "--save_total_limit", "10")) == 0
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert {"adapter_config.json", "adapter_model.safetensors", "bert_ft_head.safetensors"} <= \
        set(os.listdir(os.path.join(run, "adapter")))
    adapter_dir = os.path.join(run, "adapter")
    adapter = load_adapter(adapter_dir, registered_tasks()["ner"].head_type, read_meta(adapter_dir))
    base = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    query = adapter.model.bert.encoder.layer[0].attention.self.query
    assert torch.equal(query.base_layer.weight, base["encoder.layer.0.attention.self.query.weight"])
    assert query.lora_B["default"].weight.abs().sum() > 0, "LoRA B starts at 0: training moved it"
    count = len(adapter.labels)
    assert metrics["trainable_parameters"] == 2 * LAYERS * RANK * 2 * HIDDEN + HIDDEN * count + count + 2 * count \
        + count * count

    from huggingface_hub import ModelCard

    adapter_card, merged_card = (ModelCard.load(os.path.join(run, name, "README.md")) for name in ("adapter", "model"))
    assert adapter_card.data.library_name == "peft" and merged_card.data.library_name == "transformers"
    assert {"lora", "peft"} <= set(adapter_card.data.tags)
    results = {(result.dataset_split, result.metric_type): result.metric_value
               for result in adapter_card.data.eval_results}
    assert results[("validation", "f1")] == metrics["eval_f1"] and results[("test", "f1")] == metrics["test_f1"]
    assert results == {(result.dataset_split, result.metric_type): result.metric_value
                       for result in merged_card.data.eval_results}

    assert_merged_predicts_as_adapter(run, capsys)

    resumed = str(tmp_path / "resumed")
    shutil.copytree(run, resumed)
    for name in ("metrics.json", "model", "adapter"):
        path = os.path.join(resumed, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    assert main(lora_args(tiny_model_dir, resumed, "--save_steps", "4", "--save_total_limit", "10",
                                 "--resume_from_checkpoint", os.path.join(resumed, "checkpoint-4"))) == 0
    again = json.load(open(os.path.join(resumed, "metrics.json")))
    keys = ("eval_f1", "test_f1", "train_loss", "test_precision")
    assert {key: again[key] for key in keys} == {key: metrics[key] for key in keys}


@pytest.mark.parametrize("family, expected", [("bert", ["query", "value"]), ("roberta", ["query", "value"]),
                                              ("distilbert", ["q_lin", "v_lin"]),
                                              ("deberta-v2", ["query_proj", "value_proj"]),
                                              ("electra", ["query", "value"])])
def test_default_target_modules_follow_the_encoder_family(family, expected):
    """The default adapts the family's attention query/value projections, found by their names in the model."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    from bert_ft.lora import default_target_modules, head_layers

    config = AutoConfig.for_model(family, vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, dim=16, n_layers=1, n_heads=2, hidden_dim=32, num_labels=3)
    model = AutoModelForTokenClassification.from_config(config)
    assert sorted(default_target_modules(model)) == sorted(expected)
    assert head_layers(model) == ["classifier"]
    from bert_ft.lora import target_modules

    assert target_modules(model, expected[0]) == [expected[0]]
    with pytest.raises(UsageError, match="--lora_target_modules: no module named nope"):
        target_modules(model, ",".join([expected[0], "nope"]))


def test_init_from_starts_the_adapters_from_another_runs_encoder(tiny_model_dir, tmp_path, capsys):
    """--init_from under LoRA: the frozen base the adapters sit on is the earlier run's encoder (not the hub
    model's), the adapter folder rebuilds that base by itself, and it predicts what the merged model predicts."""
    from safetensors.torch import load_file

    first = str(tmp_path / "first")
    assert main(["ner", "--model_name_or_path", tiny_model_dir, "--output_dir", first, "--num_train_epochs", "1",
                 "--max_train_samples", "32", "--max_eval_samples", "8", "--per_device_train_batch_size", "8",
                 "--learning_rate", "3e-2", "--max_seq_length", "48"]) == 0
    run = str(tmp_path / "lora")
    assert main(lora_args(tiny_model_dir, run, "--init_from", os.path.join(first, "model"))) == 0
    adapter_dir = os.path.join(run, "adapter")
    meta = read_meta(adapter_dir)
    assert meta["adapter"]["init_from"] == os.path.join(first, "model")
    adapter = load_adapter(adapter_dir, registered_tasks()["ner"].head_type, meta)
    name = "encoder.layer.0.attention.self.query.weight"
    started_from = load_file(os.path.join(first, "model", "model.safetensors"))["bert." + name]
    hub = load_file(os.path.join(tiny_model_dir, "model.safetensors"))[name]
    base_layer = adapter.model.bert.encoder.layer[0].attention.self.query.base_layer.weight
    assert not torch.equal(started_from, hub), "the first run moved the encoder (lr 3e-2)"
    assert torch.equal(base_layer, started_from)
    assert_merged_predicts_as_adapter(run, capsys)
