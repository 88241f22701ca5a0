"""--torch_compile (bert_ft.compiling): compiled encoder layers train as the eager ones do (clean and FGM steps,
packed batches whose rows and widths change every step, one graph for all of them), evaluation stays eager, a
run through the CLI records its graphs, a feature that cannot be compiled is turned off with one line naming it,
and too many graphs send the layers back to eager.

Compiling is slow (inductor writes and builds C++): every compiled step here shares one graph shape (hidden 32,
intermediate 64, fp32), which the process compiles once; the other tests reuse it from dynamo's cache.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AlbertConfig, AlbertForTokenClassification, BertForTokenClassification

from bert_ft import compiling
from bert_ft.adversarial import FGM
from bert_ft.cli import main
from bert_ft.compiling import CompiledLayers, compile_encoder_layers, why_not_compiled
from bert_ft.data import Collator
from tests.conftest import save_tiny_bert



@pytest.fixture(scope="module")
def still_bert(tmp_path_factory) -> str:
    """tests/conftest.py's tiny BERT (hidden 32, 2 layers, intermediate 64) without dropout, so that compiled and
    eager steps compute the same function; every compiled step of this file runs its layers, one graph."""
    folder = save_tiny_bert(str(tmp_path_factory.mktemp("still-bert")))
    with open(f"{folder}/config.json", encoding="utf-8") as handle:
        config = json.load(handle)
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with open(f"{folder}/config.json", "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    return folder


def packed_batches(count: int, seed: int = 1) -> list[dict]:
    """`count` packed batches of 3-9 random examples of 3-40 tokens: rows and widths differ from batch to batch."""
    generator = torch.Generator().manual_seed(seed)
    collator = Collator({"input_ids": 0, "labels": -100}, pack=True)
    batches = []
    for _ in range(count):
        examples = []
        for index in range(int(torch.randint(3, 10, (1,), generator=generator))):
            length = int(torch.randint(3, 41, (1,), generator=generator))
            examples.append((index, {"input_ids": torch.randint(5, 1000, (length,), generator=generator).tolist(),
                                     "labels": torch.randint(0, 5, (length,), generator=generator).tolist()}))
        batch = collator(examples)
        batches.append({key: batch[key] for key in ("input_ids", "attention_mask", "position_ids", "labels")})
    return batches


def stepper(model: torch.nn.Module, adversarial: bool = False):
    """One SGD step on a batch (with an FGM pass on the word embeddings when `adversarial`); returns its loss.
    (SGD rather than AdamW: Adam divides by the gradient's own size, so float rounding in near-zero gradients
    would move weights by up to the learning rate and hide what this compares, the gradients.)"""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    adversary = FGM(model.get_input_embeddings().weight, epsilon=1.0) if adversarial else None
    model.train()

    def step(batch: dict) -> float:
        loss = model(**batch).loss
        if adversary is not None:
            adversary.before_backward()
        loss.backward()
        if adversary is not None:
            adversary.adversarial_backward(lambda: model(**batch).loss.backward())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


@pytest.mark.compile
def test_compiled_layers_train_as_eager_on_changing_packed_shapes_with_one_graph(still_bert):
    torch.manual_seed(0)
    eager = BertForTokenClassification.from_pretrained(still_bert, num_labels=5)
    compiled_model = copy.deepcopy(eager)
    lines = []
    compiled, note = compile_encoder_layers(compiled_model, 1, lines.append)
    assert note == "on" and len(compiled.layers) == 2
    batches = packed_batches(6)
    assert len({tuple(batch["input_ids"].shape) for batch in batches}) >= 4  # rows and widths churn
    before = compiling._graph_count()
    for part, adversarial in ((batches[:3], False), (batches[3:], True)):  # clean, then FGM (a second forward)
        eager_step, compiled_step = stepper(eager, adversarial), stepper(compiled_model, adversarial)
        expected = [eager_step(batch) for batch in part]
        got = [compiling.timed_step(compiled, number, compiled_step, batch) for number, batch in enumerate(part)]
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
        for (name, mine), theirs in zip(compiled_model.named_parameters(), eager.parameters()):
            assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-5), name
    # Six shapes, one graph (a cached one when another test of this process compiled it first): dynamic rows and
    # widths, not a graph per shape.
    assert compiling._graph_count() - before <= 1
    assert compiled.steady_steps + compiled.compiling_steps == 6 and compiled.eager_since is None
    # Evaluation and no_grad forwards run eager: no graph for them, the same outputs as the eager model.
    compiled_model.eval()
    eager.eval()
    graphs = compiling._graph_count()
    with torch.no_grad():
        assert torch.allclose(compiled_model(**batches[0]).logits, eager(**batches[0]).logits, atol=1e-5)
    assert compiling._graph_count() == graphs
    assert "graph(s) compiled" in compiled.describe()


@pytest.mark.compile
def test_torch_compile_run_records_its_graphs_with_crf_and_fgm(still_bert, tmp_path):
    """The CLI path: the CRF head (eager Python loop) and FGM over compiled layers, packed batches; metrics.json
    counts the graphs and times the steps; the saved model predicts (evaluation ran eager)."""
    run = str(tmp_path / "run")
    assert main(["ner", "--model_name_or_path", still_bert, "--output_dir", run, "--torch_compile",
                 "--crf", "--adversarial", "fgm", "--max_steps", "4", "--per_device_train_batch_size", "8",
                 "--mixed_precision", "no"]) == 0
    with open(f"{run}/metrics.json", encoding="utf-8") as handle:
        metrics = json.load(handle)
    assert metrics["torch_compile"] == "on"
    assert metrics["compiled_graphs"] <= 2  # one graph; a single-row batch may specialise a second
    assert metrics["steady_step_ms"] > 0 and metrics["train_loss"] == pytest.approx(metrics["train_loss"])  # finite
    assert main(["predict", "--model_dir", f"{run}/model", "John lives in Paris ."]) == 0


def test_a_run_that_cannot_compile_says_why_in_one_line(still_bert, monkeypatch):
    torch.manual_seed(0)
    albert = AlbertForTokenClassification(AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32,
                                                       num_hidden_layers=2, num_attention_heads=2,
                                                       intermediate_size=64, num_labels=3))
    lines = []
    compiled, note = compile_encoder_layers(albert, 1, lines.append)
    assert compiled is None and note.startswith("off (") and "albert" in note
    assert lines == [f"torch.compile: {note[:-1].replace('off (', 'off, ', 1)}"]
    bert = BertForTokenClassification.from_pretrained(still_bert, num_labels=5)
    assert "2 processes" in why_not_compiled(bert, 2)
    compiled, note = compile_encoder_layers(bert, 2, lines.append)
    assert compiled is None and "2 processes" in lines[-1]
    assert all(layer._compiled_call_impl is None for layer in bert.bert.encoder.layer)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    assert "no C++ compiler found" in why_not_compiled(bert, 1, "cpu")


def test_a_failing_compile_goes_back_to_eager_with_one_line():
    """A compile that fails at the first step (inductor's C++ build, an untraceable construct): that step and the
    rest run eager, one line says why."""
    layers = [torch.nn.Linear(2, 2) for _ in range(2)]
    lines = []
    compiled = CompiledLayers(layers, lines.append)

    def failing(*args, **kwargs):
        raise torch._dynamo.exc.BackendCompilerFailed("inductor", RuntimeError("g++: fatal error"), None)

    for layer in layers:
        layer._compiled_call_impl = compiling._TrainingOnly(layer, failing, compiled)
    inputs = torch.ones(3, 2)
    expected = layers[0]._call_impl(inputs)
    assert torch.equal(layers[0](inputs), expected)  # the failed compile's step ran eager
    assert all(layer._compiled_call_impl is None for layer in layers)
    assert len(lines) == 1 and "compiling failed (BackendCompilerFailed" in lines[0]
    # A copied layer (deepcopy: a merged LoRA model for saving) runs eager, never through the original's call.
    layers[0]._compiled_call_impl = compiling._TrainingOnly(layers[0], failing, CompiledLayers(layers, print))
    assert copy.deepcopy(layers[0])._compiled_call_impl is None


def test_more_graphs_than_the_cap_send_the_layers_back_to_eager(monkeypatch):
    layers = [torch.nn.Linear(2, 2) for _ in range(2)]
    for layer in layers:
        layer._compiled_call_impl = layer._call_impl  # stands for a compiled call
    count = iter(range(0, 100, 3))  # three new graphs per step
    monkeypatch.setattr(compiling, "_graph_count", lambda: next(count))
    lines = []
    compiled = CompiledLayers(layers, lines.append)
    compiled.after_step(2.0, 1)  # 3 graphs: under the cap
    assert compiled.eager_since is None and compiled.compiling_steps == 1
    compiled.after_step(2.0, 2)  # 6 graphs: at the cap
    assert compiled.eager_since is None
    compiled.after_step(2.0, 3)  # 9 graphs: over it
    assert all(layer._compiled_call_impl is None for layer in layers)
    assert len(lines) == 1 and "run eager" in lines[0] and f"cap of {compiling.MAX_GRAPHS}" in lines[0]
    compiled.after_step(2.0, 4)  # eager now: nothing more is counted or said
    assert len(lines) == 1 and compiled.compiling_steps == 3
    assert compiled.metrics()["torch_compile"].startswith("eager again")
