"""ONNX export: export + reload + the same predictions as the PyTorch model for every task (CRF included), at
shapes other than the traced one (2 x 16 traced; 3 x 41, 1 x 300 and windows run), int8, and a corrupted export
that the parity check flags."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch
from huggingface_hub import ModelCard

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from bert_ft.cli import main  # noqa: E402
from bert_ft.data import Collator  # noqa: E402
from bert_ft.model_folder import is_export_folder  # noqa: E402
from bert_ft.onnx_model import OnnxModel  # noqa: E402
from bert_ft.parity import check_export, format_report  # noqa: E402
from bert_ft.model_folder import load_model, save_model  # noqa: E402
from bert_ft.optim import build_optimizer, parameter_groups  # noqa: E402
from bert_ft.prediction import predict_examples  # noqa: E402
from bert_ft.plugins import registered_tasks  # noqa: E402
from bert_ft_tasks.ner import NerOptions, NerTask  # noqa: E402

TASKS = registered_tasks()

CITIES = ["Paris", "Berlin", "Madrid", "New York"]
FILLER = ["the", "a", "we", "walked", "to", "and", "then", "saw", "big", "river", "."]


def city_sentences(count: int, seed: int) -> list[tuple[list[str], list[str]]]:
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        words, tags = [], []
        for _ in range(rng.randint(3, 10)):
            if rng.random() < 0.25:
                city = rng.choice(CITIES).split()
                words.extend(city)
                tags.extend(["B-LOC"] + ["I-LOC"] * (len(city) - 1))
            else:
                words.append(rng.choice(FILLER))
                tags.append("O")
        sentences.append((words, tags))
    return sentences


def write_conll(path, sentences) -> str:
    path.write_text("\n\n".join("\n".join(f"{w} {t}" for w, t in zip(words, tags)) for words, tags in sentences) + "\n")
    return str(path)


def train_briefly(task, model, tokenizer, examples, labels, steps: int, lr: float = 3e-3) -> None:
    features = task.encode(examples, tokenizer, 32, labels)
    collate = Collator(task.pad_values(tokenizer))
    optimizer = build_optimizer(parameter_groups(model, lr, lr, 1.0, 0.0), 0.0)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model trains faster on one thread, the more so on a busy machine
    try:
        for step in range(steps):
            start = (step * 16) % max(len(features) - 16, 1)
            batch = collate([(index, features.inputs[index])
                             for index in range(start, min(start + 16, len(features)))])
            batch.pop("feature_index")
            model(**batch)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval()


@pytest.fixture(scope="module")
def city_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cities")
    return write_conll(folder / "train.txt", city_sentences(96, 0)), write_conll(folder / "dev.txt",
                                                                                city_sentences(40, 1))


@pytest.fixture(scope="module", params=[False, True], ids=["linear", "crf"])
def city_tagger(request, tiny_model_dir, city_data, tmp_path_factory) -> str:
    """A tiny tagger that has learnt 'city names are LOC' (multi-word ones too), saved as a model folder."""
    from transformers import AutoTokenizer

    task = NerTask(NerOptions(crf=request.param))
    examples = task.read(city_data[0])
    labels = task.build_labels(examples)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = task.build_model(tiny_model_dir, labels, tokenizer, False)
    train_briefly(task, model, tokenizer, examples, labels, steps=60)
    folder = str(tmp_path_factory.mktemp("tagger") / "run" / "model")
    save_model(model, tokenizer, folder, "ner", {"max_seq_length": 32, "task_options": {"crf": request.param}})
    return folder


def long_text(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(CITIES) if index % 6 == 2 else rng.choice(FILLER[:-1]) for index in range(words))


def assert_same_results(ours: list[dict], theirs: list[dict]) -> None:
    """Equal JSON results, floats to 1e-3 (a CRF's float32 forward algorithm over a 250-word sentence has a log
    partition near 10^3, so its probabilities carry ~1e-4 of rounding on either side)."""
    _compare(ours, theirs)


def _compare(mine, other) -> None:
    if isinstance(mine, dict):
        assert mine.keys() == other.keys()
        for key in mine:
            _compare(mine[key], other[key])
    elif isinstance(mine, list):
        assert len(mine) == len(other)
        for a, b in zip(mine, other):
            _compare(a, b)
    elif isinstance(mine, float):
        assert mine == pytest.approx(other, abs=1e-3)
    else:
        assert mine == other


def random_batch(shape: tuple[int, int], seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    rows, width = shape
    input_ids = torch.randint(1000, 20000, shape, generator=generator)
    attention_mask = torch.ones(shape, dtype=torch.long)
    attention_mask[0, width // 2:] = 0  # one padded row
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids)}


def test_ner_export_gives_the_pytorch_predictions_at_any_shape(city_tagger, city_data, tmp_path, capsys):
    output = str(tmp_path / "onnx")
    assert main(["export", "--model_dir", city_tagger, "--validation_file", city_data[1],
                        "--output_dir", output]) == 0
    printed = capsys.readouterr().out
    assert "changed predictions: 0 of" in printed and "passed" in printed
    with open(os.path.join(output, "export_report.json"), encoding="utf-8") as handle:
        report = json.load(handle)
    assert report["passed"] and report["changed_predictions"] == 0
    assert report["export"]["traced_shape"] == [2, 16]
    assert report["pytorch"]["f1"] == report["exported"]["f1"] > 0.5
    assert is_export_folder(output) and not os.path.exists(os.path.join(output, "model.safetensors"))
    # the export folder's model card (its source, saved through the API, has none): the parity score is the export's
    card = ModelCard.load(os.path.join(output, "README.md"))
    assert card.data.library_name == "onnx" and card.data.pipeline_tag == "token-classification"
    assert "onnx" in card.data.tags and "int8" not in card.data.tags
    (result,) = card.data.eval_results
    assert (result.dataset_split, result.metric_type, result.metric_value) == ("parity", "f1", report["exported"]["f1"])
    assert f"changed predictions 0 of {report['predictions_compared']}" in card.text

    reference, tokenizer, _ = load_model(city_tagger)
    exported, _, meta = load_model(output)
    assert isinstance(exported, OnnxModel) and meta["export"]["quantize"] == "none"
    with torch.no_grad():
        for seed, shape in enumerate([(3, 41), (1, 300), (2, 16)]):
            batch = random_batch(shape, seed)
            real = batch["attention_mask"].bool()
            torch.testing.assert_close(exported.scores(batch)[real], reference.scores(batch)[real], atol=1e-4,
                                       rtol=1e-4)
    task = NerTask(NerOptions(crf=reference.crf is not None))
    texts = ["We walked to Paris, then New York.", "Madrid and the big river", "the a we", long_text(400, 3)]
    for max_seq_length in (32, 300):  # windows of 32 sub-words; one 300-wide input for the 250-word text
        inputs = texts + [long_text(250, 4)] if max_seq_length == 300 else texts
        ours = predict_examples(task, exported, tokenizer, inputs, max_seq_length, batch_size=3)
        theirs = predict_examples(task, reference, tokenizer, inputs, max_seq_length, batch_size=3)
        assert_same_results(ours, theirs)
        assert len(ours[3]["entities"]) > 50  # the long text: every city found, through the export
        assert all(0 < entity["probability"] <= 1 for result in ours for entity in result["entities"])
    outputs = {}
    for folder in (city_tagger, output):  # the CLI recognises the export folder from its files
        target = tmp_path / f"{os.path.basename(folder)}.jsonl"
        assert main(["predict", "--model_dir", folder, "--output_file", str(target), *texts]) == 0
        outputs[folder] = [json.loads(line) for line in target.read_text().splitlines()]
    assert_same_results(outputs[output], outputs[city_tagger])


def test_sentence_pairs_and_relation_markers_go_through_the_export(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    cases = {"sentence": (TASKS["sentence"](TASKS["sentence"].options_type()),
                          ["a fine film", {"text": "the plot", "text_pair": "was dull and far too long " * 3},
                           "这部电影很好看", "no"]),
             "relation": (TASKS["relation"](TASKS["relation"].options_type(pooling="entity_mean")),
                          ["The <e1>fire</e1> was caused by a <e2>cigarette</e2>.",
                           {"text": "A cup of hot tea with sugar", "head": [2, 5], "tail": [22, 27]},
                           "<e2>Mud</e2> " + "and stones " * 30 + "filled the <e1>river</e1>."])}
    for name, (task, inputs) in cases.items():
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        task.prepare_tokenizer(tokenizer)
        examples = task.read(task.default_files()["train"])[:64]
        labels = task.build_labels(examples)
        torch.manual_seed(0)
        model = task.build_model(tiny_model_dir, labels, tokenizer, False)
        train_briefly(task, model, tokenizer, examples, labels, steps=4)
        folder = str(tmp_path / name / "model")
        save_model(model, tokenizer, folder, name, {"max_seq_length": 48,
                                                    "task_options": {"pooling": "entity_mean"} if name == "relation"
                                                    else {}})
        data = task.default_files()["validation"] or task.default_files()["test"]
        assert main(["export", "--model_dir", folder, "--validation_file", data, "--max_eval_samples", "40",
                            "--output_dir", str(tmp_path / name / "onnx")]) == 0
        exported, _, _ = load_model(str(tmp_path / name / "onnx"))
        reference, _, _ = load_model(folder)
        if name == "sentence":  # PyTorch runs the [CLS]-only top layer, the export the stock one: same results
            assert reference.first_token_only
        ours = predict_examples(task, exported, tokenizer, inputs, 48, batch_size=2)
        theirs = predict_examples(task, reference, tokenizer, inputs, 48, batch_size=2)
        assert_same_results(ours, theirs)


def test_int8_export_prints_its_drop(city_tagger, city_data, tmp_path, capsys):
    if not load_model(city_tagger)[2]["head_options"].get("use_crf"):
        pytest.skip("one int8 check is enough: run it on the CRF tagger")
    output = str(tmp_path / "int8")
    assert main(["export", "--model_dir", city_tagger, "--quantize", "int8", "--validation_file",
                        city_data[1], "--output_dir", output]) == 0
    printed = capsys.readouterr().out
    assert "int8" in printed and "drop" in printed
    with open(os.path.join(output, "export_report.json"), encoding="utf-8") as handle:
        report = json.load(handle)
    assert report["export"]["quantize"] == "int8" and "drop_points" in report
    assert report["criterion"].startswith("int8")
    import onnx

    operators = {node.op_type for node in onnx.load(os.path.join(output, "model.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= operators  # int8 matrix products


def corrupt(graph: str) -> None:
    """Flip the sign of the largest float weight of an ONNX graph, in place."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(graph)
    largest = max((item for item in model.graph.initializer if item.data_type == onnx.TensorProto.FLOAT
                   and len(item.dims) == 2), key=lambda item: int(np.prod(item.dims)) if "embed" not in item.name
                  else 0)
    largest.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(largest), largest.name))
    onnx.save(model, graph)


def test_parity_check_flags_a_corrupted_export(city_tagger, city_data, tmp_path, monkeypatch, capsys):
    import bert_ft.export as export_module

    if load_model(city_tagger)[2]["head_options"].get("use_crf"):
        pytest.skip("one corrupted export is enough: run it on the linear tagger")
    good = str(tmp_path / "good")
    assert main(["export", "--model_dir", city_tagger, "--validation_file", city_data[1],
                        "--output_dir", good]) == 0
    bad = str(tmp_path / "bad")
    shutil.copytree(good, bad)
    corrupt(os.path.join(bad, "model.onnx"))
    report = check_export(bad, city_tagger, validation_file=city_data[1])
    assert not report["passed"] and report["changed_predictions"] > report["changed_near_ties"]
    assert report["max_abs_logit_difference"] > 0.01 and "FAILED" in format_report(report)
    assert check_export(good, city_tagger, validation_file=city_data[1])["passed"]

    original = export_module.export_graph  # the command itself: a graph broken while exporting fails with 2

    def broken(head, batch, path):
        names = original(head, batch, path)
        corrupt(path)
        return names

    monkeypatch.setattr(export_module, "export_graph", broken)
    capsys.readouterr()
    assert main(["export", "--model_dir", city_tagger, "--validation_file", city_data[1],
                        "--output_dir", str(tmp_path / "broken")]) == 2
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "beyond near-ties" in captured.err
    with open(tmp_path / "broken" / "export_report.json", encoding="utf-8") as handle:
        assert json.load(handle)["passed"] is False  # the report is kept next to the flagged export


def test_export_refuses_to_replace_a_folder_that_is_not_an_export(city_tagger, capsys):
    run_dir = os.path.dirname(city_tagger)
    assert main(["export", "--model_dir", city_tagger, "--output_dir", run_dir]) == 2
    assert "holds something other than an export" in capsys.readouterr().err
    assert os.path.isfile(os.path.join(city_tagger, "model.safetensors"))  # untouched
