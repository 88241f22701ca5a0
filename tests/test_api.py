"""The Python API, --init_from weight transfer, gradual unfreezing and the offline --dataset_name message."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from bert_ft import TrainConfig, finetune, load_model, predict
from bert_ft.cli import main
from bert_ft.encoder import transfer_encoder
from bert_ft.errors import UsageError
from bert_ft.plugins import registered_tasks
from bert_ft_tasks.ner import NerOptions, NerTask

TASKS = registered_tasks()


def small(tiny_model_dir: str, output_dir: str, **overrides) -> TrainConfig:
    settings = {"model_name_or_path": tiny_model_dir, "output_dir": output_dir, "num_train_epochs": 1,
                "max_train_samples": 48, "max_eval_samples": 16, "max_seq_length": 48}
    return TrainConfig(**{**settings, **overrides})


def test_finetune_and_predict_from_python(tiny_model_dir, tmp_path):
    task = NerTask(NerOptions(crf=True))
    metrics = finetune(task, small(tiny_model_dir, str(tmp_path / "run")))
    assert {"test_f1", "eval_f1", "train_samples_per_second"} <= set(metrics)
    [result] = predict(task, str(tmp_path / "run" / "model"), ["Ada Lovelace visited Paris."])
    assert result["text"] == "Ada Lovelace visited Paris." and isinstance(result["entities"], list)
    with pytest.raises(UsageError, match="--num_train_epochs"):
        finetune(task, small(tiny_model_dir, str(tmp_path / "bad"), num_train_epochs=0))


def test_init_from_copies_the_encoder_and_replaces_the_head(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    finetune(NerTask(), small(tiny_model_dir, str(tmp_path / "source"), learning_rate=1e-2))
    source_dir = str(tmp_path / "source" / "model")
    source, _, _ = load_model(source_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sentence = TASKS["sentence"](TASKS["sentence"].options_type())
    target = sentence.build_model(tiny_model_dir, ["negative", "positive"], tokenizer, False)
    missing, unexpected = transfer_encoder(target, source_dir)
    printed = capsys.readouterr().out
    assert "missing keys" in printed and "unexpected keys" in printed
    source_state = source.encoder_model().state_dict()
    for key, value in target.encoder_model().state_dict().items():
        if key in source_state:
            assert torch.equal(value, source_state[key]), key
    assert all("classifier" not in key for key in source_state)  # the output layer is never copied
    assert "pooler.dense.weight" in missing  # the NER encoder has no pooler: kept from --model_name_or_path


def record_initial_weights(monkeypatch) -> dict[str, tuple[torch.Tensor, bool]]:
    """{parameter name: (its value when training starts, whether it is an encoder parameter)}, filled by a run.

    `build_training` calls `set_frozen` once, after building the model and any --init_from transfer and before the
    first step: the spy copies every parameter there."""
    import bert_ft.training_setup

    initial: dict[str, tuple[torch.Tensor, bool]] = {}
    set_frozen = bert_ft.training_setup.set_frozen

    def spy(model, *args, **kwargs):
        assert not initial, "set_frozen is expected once per run"
        encoder_ids = {id(param) for param in model.encoder_model().parameters()}
        initial.update({name: (param.detach().clone(), id(param) in encoder_ids)
                        for name, param in model.named_parameters()})
        return set_frozen(model, *args, **kwargs)

    monkeypatch.setattr(bert_ft.training_setup, "set_frozen", spy)
    return initial


def test_init_from_on_the_command_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """--init_from starts the new run from the source run's saved encoder (tensor by tensor) with a head of its own;
    with the encoder frozen, the new run's saved encoder is still the source's."""
    from transformers import AutoModel

    finetune(NerTask(), small(tiny_model_dir, str(tmp_path / "source")))
    initial = record_initial_weights(monkeypatch)
    source_dir = str(tmp_path / "source" / "model")
    args = ["sentence", "--model_name_or_path", tiny_model_dir, "--init_from", source_dir,
            "--output_dir", str(tmp_path / "target"), "--num_train_epochs", "1", "--max_train_samples", "32",
            "--max_eval_samples", "16", "--freeze_encoder"]
    assert main(args) == 0
    assert "init_from: copied" in capsys.readouterr().out
    source, _, _ = load_model(source_dir)
    target, _, target_meta = load_model(str(tmp_path / "target" / "model"))
    source_state = source.encoder_model().state_dict()
    target_state = target.encoder_model().state_dict()
    pretrained = AutoModel.from_pretrained(tiny_model_dir).state_dict()
    shared = [key for key in target_state if key in source_state]
    assert any(key.startswith("encoder.layer.") for key in shared) and "embeddings.word_embeddings.weight" in shared

    def same(source_value: torch.Tensor, target_value: torch.Tensor) -> bool:
        if source_value.shape != target_value.shape:  # resized embeddings: the shared rows were copied
            rows = min(source_value.shape[0], target_value.shape[0])
            source_value, target_value = source_value[:rows], target_value[:rows]
        return torch.equal(target_value, source_value)

    # The new run's initial encoder is the source's saved encoder, tensor by tensor.
    prefix = "model." + target.model.base_model_prefix + "."
    initial_encoder = {name[len(prefix):]: value for name, (value, in_encoder) in initial.items() if in_encoder}
    assert set(shared) <= set(initial_encoder)
    for key in shared:
        assert same(source_state[key], initial_encoder[key]), key
        assert same(source_state[key], target_state[key]), key  # frozen: the saved encoder too
    # Not vacuous: the source run trained its encoder away from --model_name_or_path.
    assert any(not torch.equal(source_state[key], pretrained[key]) for key in shared)
    # The NER source has no pooler: the target keeps the pretrained one (frozen, so still equal).
    assert "pooler.dense.weight" not in source_state
    assert torch.equal(initial_encoder["pooler.dense.weight"], pretrained["pooler.dense.weight"])
    assert torch.equal(target_state["pooler.dense.weight"], pretrained["pooler.dense.weight"])
    # The output layer is the new task's own, never the source's: neither at the start nor after training.
    source_head = source.model.classifier.weight
    heads = [value for name, (value, in_encoder) in initial.items() if not in_encoder and name.endswith("weight")]
    assert heads and target.model.classifier.weight.shape[0] == len(target_meta["labels"])
    for head in [*heads, target.model.classifier.weight]:
        rows = min(head.shape[0], source_head.shape[0])
        assert head.shape[1:] == source_head.shape[1:] and not torch.equal(head[:rows], source_head[:rows])


def _checkpoints_by_epoch(output_dir: str) -> dict[int, dict[str, torch.Tensor]]:
    """{epoch completed: model tensors} from the end-of-epoch checkpoint-STEP folders (Accelerate's save_state)."""
    found = {}
    for folder in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as handle:
            state = json.load(handle)
        assert state["batches_in_epoch"] == 0, folder  # an end-of-epoch checkpoint
        found[state["epoch"]] = load_file(os.path.join(folder, "model.safetensors"))
    return found


@pytest.mark.parametrize("freeze", [{"freeze_encoder": True}, {"freeze_layers": 1}], ids=["encoder", "layers"])
def test_gradual_unfreezing(tiny_model_dir, tmp_path, capsys, monkeypatch, freeze):
    """Epoch 1 trains only what is not frozen (frozen weights stay bit-identical to the initial ones); from
    --unfreeze_at_epoch 2 on, the frozen weights train too."""
    initial = record_initial_weights(monkeypatch)
    config = small(tiny_model_dir, str(tmp_path / "run"), num_train_epochs=2, unfreeze_at_epoch=2, **freeze)
    finetune(NerTask(), config)
    assert "epoch 2: encoder unfrozen" in capsys.readouterr().out
    epochs = _checkpoints_by_epoch(str(tmp_path / "run"))
    assert sorted(epochs) == [1, 2] and initial

    def frozen_at_first(name: str) -> bool:
        if not initial[name][1]:
            return False  # the head is never frozen
        return "freeze_encoder" in freeze or "embeddings." in name or ".layer.0." in name

    frozen = [name for name in initial if frozen_at_first(name)]
    trainable = [name for name in initial if not frozen_at_first(name)]
    assert frozen and trainable and any("classifier" in name for name in trainable)
    if "freeze_layers" in freeze:
        assert any(".layer.1." in name for name in trainable)
    for name in frozen:  # epoch 1: bit-identical to the initial weights
        assert torch.equal(epochs[1][name], initial[name][0]), name
    # Epoch 1 trained the rest (the head at least), so the comparison above is not vacuous.
    assert all(not torch.equal(epochs[1][name], initial[name][0]) for name in trainable if "classifier" in name)
    assert any(not torch.equal(epochs[1][name], initial[name][0]) for name in trainable)
    # Epoch 2, unfrozen: every weight matrix frozen in epoch 1 has moved (all the layers that were frozen).
    matrices = [name for name in frozen if initial[name][0].dim() >= 2]
    assert matrices
    for name in matrices:
        assert not torch.equal(epochs[2][name], epochs[1][name]), name


def test_dataset_name_offline_gives_a_clear_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code = main(["ner", "--dataset_name", "conll2003", "--output_dir", str(tmp_path / "r")])
    error = capsys.readouterr().err
    assert code == 2 and "--dataset_name conll2003: cannot load it" in error and "--train_file" in error
    assert not os.path.exists(tmp_path / "r")
