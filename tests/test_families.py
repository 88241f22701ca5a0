"""The family matrix: every encoder family x every task, on tiny random models (hidden 32, 2 layers) with a real
tokenizer of each family (bert_ft.random_models), built once per test session.

For every family and task: the model builds, packed rows equal padded ones (the start-up check `packing_is_exact`
says so on real features, several examples per row), words and entity markers align, and one train -> reload ->
predict run through the command line predicts every test word / example. Once per family: ONNX export parity and
transformers.pipeline agreement, FGM and PGD. On one non-BERT family: --crf, --context_size, FGM training,
calibration and --init_from.

Run alone with `pytest -m families` (89 tests). Measured only on 2 cores shared with five other sessions (load
average ~11): 641 s, of which the seven ONNX exports took 421 s (torch.onnx's tracing, 40-90 s each there).
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch

from bert_ft.adversarial import build_adversary
from bert_ft.api import finetune
from bert_ft.cli import main
from bert_ft.data import Collator, special_tokens_around
from bert_ft.encoder import load_tokenizer
from bert_ft.errors import UsageError
from bert_ft.families import encoder_layers, family_of, word_prefix_ids
from bert_ft.model_folder import load_model
from bert_ft.optim import parameter_groups, set_frozen
from bert_ft.plugins import registered_tasks
from bert_ft.random_models import FAMILIES, family_folders
from bert_ft.training_setup import packing_is_exact
from bert_ft_tasks.ner import NerTask
from bert_ft_tasks.relation import MARKERS, RelationTask

pytestmark = pytest.mark.families
TASK_NAMES = ("ner", "relation", "sentence")
# Words without punctuation attached, in which the trained tokenizers split some words into several pieces and
# (SentencePiece) start some with a bare "▁"; digits and a non-Latin word included.
WORDS = "Ingrid Berger left Blue Harbor Bank in Lisbon during 1998 with Zoë and 北京 friends".split()


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> dict[str, str]:
    """{family: folder} of the tiny random encoders (built once per session, ~10 s for all)."""
    return family_folders(str(tmp_path_factory.mktemp("families")))


def small_files(folder) -> dict[str, dict[str, str]]:
    """Per task, small train / validation / test files cut from the shipped samples."""
    samples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks", "samples")

    def blocks(name: str, count: int, separator: str = "\n\n") -> str:
        with open(os.path.join(samples, name), encoding="utf-8") as handle:
            parts = [part for part in handle.read().split(separator) if part.strip()]
        return separator.join(parts[:count]) + "\n"

    def rows(name: str, count: int) -> str:
        with open(os.path.join(samples, name), encoding="utf-8") as handle:
            return "".join(handle.readlines()[:count + 1])

    files = {"ner": {"train": blocks("ner_train.txt", 40), "validation": blocks("ner_dev.txt", 12),
                     "test": blocks("ner_test.txt", 12)},
             "relation": {"train": blocks("relation_train.txt", 40), "validation": blocks("relation_test.txt", 12),
                          "test": blocks("relation_test.txt", 16)},
             "sentence": {"train": rows("sentence_train.tsv", 40), "validation": rows("sentence_dev.tsv", 12),
                          "test": rows("sentence_test.tsv", 16)}}
    paths = {}
    for task, splits in files.items():
        paths[task] = {}
        for split, text in splits.items():
            path = folder / f"{task}_{split}.{'tsv' if task == 'sentence' else 'txt'}"
            path.write_text(text, encoding="utf-8")
            paths[task][split] = str(path)
    return paths


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, dict[str, str]]:
    return small_files(tmp_path_factory.mktemp("family-data"))


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """The runs' PNG plots cost ~2 s each and are not what this matrix checks (test_report.py covers them)."""
    monkeypatch.setattr("bert_ft.scoring.write_plots", lambda *args, **kwargs: None)


def train(task_name: str, model_dir: str, data: dict, output_dir: str, options: dict | None = None, **flags) -> dict:
    """One epoch of `task_name` through the Python API (the command line's validation and loop); metrics.json."""
    settings = {"model_name_or_path": model_dir, "train_file": data[task_name]["train"],
                "validation_file": data[task_name]["validation"], "test_file": data[task_name]["test"],
                "output_dir": output_dir, "num_train_epochs": 1, "per_device_train_batch_size": 8,
                "max_seq_length": 48, "learning_rate": 1e-3, "seed": 0, "mixed_precision": "no", **flags}
    return finetune(task_of(task_name, **(options or {})), **settings)


@pytest.fixture(scope="session")
def runs(families, data, tmp_path_factory):
    """trained(family, task) -> the run folder of one epoch on the small files, trained once per session (the
    export and pipeline checks reuse the matrix's runs)."""
    done: dict[tuple[str, str], str] = {}

    def trained(family: str, task_name: str) -> str:
        if (family, task_name) not in done:
            folder = str(tmp_path_factory.mktemp(f"{family}-{task_name}") / "run")
            train(task_name, families[family], data, folder)
            done[family, task_name] = folder
        return done[family, task_name]

    return trained


def task_of(name: str, **options):
    task_type = registered_tasks()[name]
    return task_type(task_type.options_type(**options))


# ------------------------------------------------------------------------------------------- per family x task

@pytest.mark.parametrize("task_name", TASK_NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_packing_is_exact_on_every_family(family, task_name, families, data):
    """The start-up exactness check passes (several examples per row, on real features): packing stays on."""
    task = task_of(task_name)
    tokenizer = load_tokenizer(families[family])
    task.prepare_tokenizer(tokenizer)
    examples = list(task.stream(data[task_name]["train"]))[:12]
    labels = task.build_labels(examples)
    torch.manual_seed(0)
    model = task.build_model(families[family], labels, tokenizer, False)
    features = task.encode(examples, tokenizer, 48, labels)
    assert packing_is_exact(model, features, task.pad_values(tokenizer), count=12)
    if family == "modernbert" and task_name != "sentence":  # examples longer than the local window (16): the band cuts
        assert max(features.lengths[:12]) > 2 * model.config.sliding_window


@pytest.mark.parametrize("task_name", TASK_NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_train_reload_predict_on_every_family(family, task_name, runs, data):
    """One epoch (the command line's validation and loop), the run folder's model reloaded, every test word /
    example predicted, and raw-text predictions (`run_task.py predict`) whose character offsets slice the text."""
    run = pathlib.Path(runs(family, task_name))
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert all(value == value for value in metrics.values() if isinstance(value, float)), "no NaN metric"
    model, tokenizer, meta = load_model(str(run / "model"))
    assert meta["task"] == task_name and family_of(model.model).model_type == model.config.model_type
    predictions = (run / registered_tasks()[task_name].predictions_file).read_text(encoding="utf-8")
    task = task_of(task_name)
    gold = list(task.stream(data[task_name]["test"]))
    if task_name == "ner":  # one "word gold pred" line per test word
        lines = [line.split() for line in predictions.splitlines() if line.strip()]
        assert len(lines) == sum(len(example.words) for example in gold)
        assert all(len(line) == 3 and line[2] in model.labels for line in lines)
        text = "  ".join(WORDS[:7]) + "\n" + " ".join(WORDS[7:])
        output = run / "predictions.jsonl"
        assert main(["predict", "--model_dir", str(run / "model"), "--output_file", str(output), text]) == 0
        [result] = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
        for entity in result["entities"]:  # offsets are exact on the input text
            assert text[entity["start"]:entity["end"]] == entity["text"] and entity["text"].strip() == entity["text"]
    else:
        rows = [json.loads(line) for line in predictions.splitlines()]
        assert len(rows) == len(gold) and all(row["pred"] in model.labels for row in rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_words_and_markers_align_on_every_family(family, families):
    """Each word's label sits on its first real sub-word (never a bare "▁"/"Ġ"), pre-split words get the sub-words
    they have in running text, and the four entity markers stay one token each wherever they touch words."""
    tokenizer = load_tokenizer(families[family])
    task = NerTask()
    task.prepare_tokenizer(tokenizer)
    from bert_ft_tasks.ner import NerExample

    example = NerExample(WORDS, ["O"] * len(WORDS), "mem", 1)
    [feature] = task.encode([example], tokenizer, 128, ["O"]).inputs
    ids, starts = feature["input_ids"], feature["word_starts"]
    assert sum(starts) == len(WORDS), "one labelled position per word"
    bare = word_prefix_ids(tokenizer)
    assert not any(token in bare for token, start in zip(ids, starts) if start), "labels on real sub-words"
    if family == "albert":
        assert any(token in bare for token in ids), "this vocabulary does start some word with a bare '▁'"
    running = tokenizer(" ".join(WORDS), add_special_tokens=False)["input_ids"]
    before, after = special_tokens_around(tokenizer)
    content = ids[len(before):len(ids) - len(after)]
    assert content == running, "pre-split words tokenise as the running text does"

    relation = RelationTask()
    relation_tokenizer = load_tokenizer(families[family])
    relation.prepare_tokenizer(relation_tokenizer)
    marker_ids = relation.marker_ids(relation_tokenizer)
    for text in ("<e1>Ingrid</e1> left <e2>Lisbon</e2>", "a<e1>b</e1><e2>c</e2>d", "<e2>北京</e2>和<e1>Zoë</e1>"):
        encoded = relation_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert sorted(token for token in encoded if token in marker_ids) == sorted(marker_ids), text


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_groups_and_freezing_on_every_family(family, families):
    """Layer-wise lr decay gives embeddings, each layer and the head their own lr, and --freeze_layers 1 freezes
    exactly the embeddings and layer 0; ALBERT (one shared layer) refuses both by name."""
    task = task_of("ner")
    tokenizer = load_tokenizer(families[family])
    model = task.build_model(families[family], ["O", "B-X", "I-X"], tokenizer, False)
    encoder = model.encoder_model()
    if family == "albert":
        with pytest.raises(UsageError, match="albert.*share one set of weights"):
            parameter_groups(model, 1e-3, None, 0.5, 0.01)
        with pytest.raises(UsageError, match="--freeze_layers.*albert"):
            set_frozen(model, False, 1)
        return
    prefix, count = encoder_layers(encoder)
    assert count == 2
    groups = parameter_groups(model, 1e-3, 1e-2, 0.5, 0.01)
    rates = {group.name: group.lr for group in groups}
    assert rates["embeddings"] == pytest.approx(1e-3 * 0.25) and rates["layer.0"] == pytest.approx(1e-3 * 0.5)
    assert rates["layer.1"] == pytest.approx(1e-3) and rates["head"] == pytest.approx(1e-2)
    set_frozen(model, False, 1)
    for name, param in encoder.named_parameters():
        in_layer_0 = name.startswith(f"{prefix}.0.")
        in_layer_1 = name.startswith(f"{prefix}.1.")
        if in_layer_0 or "embeddings" in name:
            assert not param.requires_grad, name
        elif in_layer_1:
            assert param.requires_grad, name


# ------------------------------------------------------------------------------------------- once per family

@pytest.mark.parametrize("family", [family for family in FAMILIES if not family.startswith("bert")])
def test_export_parity_on_every_family(family, runs, data, tmp_path):
    """The NER folder exports to ONNX and passes its parity check (BERT's export is tests/test_export.py's)."""
    pytest.importorskip("onnxruntime")
    model_dir = os.path.join(runs(family, "ner"), "model")
    output = tmp_path / "onnx"
    assert main(["export", "--model_dir", model_dir, "--validation_file", data["ner"]["test"],
                        "--output_dir", str(output)]) == 0
    report = json.loads((output / "export_report.json").read_text(encoding="utf-8"))
    assert report["passed"] and report["changed_predictions"] == report["changed_near_ties"]
    assert report["predictions_compared"] > 0


def stripped(text: str, start: int, end: int) -> tuple[int, int]:
    """A pipeline span without the spaces around it: DeBERTa-v3's and ModernBERT's tokenizers give a word's
    offsets with the space before it (the "▁"/"Ġ" is part of the token), bert-ft's predict the word's own."""
    span = text[start:end]
    return start + len(span) - len(span.lstrip()), end - len(span) + len(span.rstrip())


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_agrees_on_every_family(family, runs):
    """transformers.pipeline on the NER folder finds bert-ft's entities (texts without punctuation attached to
    words, where the pipeline's own word grouping is the same as `split_words`), and on the sentence folder gives
    bert-ft's labels and probabilities."""
    from transformers import pipeline

    from bert_ft.prediction import predict_examples

    texts = [" ".join(WORDS[:7]), "Lisbon during 1998 with Zoë and friends", "Ingrid met Berger in Lisbon",
             "the bank in the city", "Harbor Bank and the river in Paris"]
    model_dir = os.path.join(runs(family, "ner"), "model")
    model, tokenizer, _ = load_model(model_dir)
    model.temperature = 1.0  # the pipeline knows no fitted temperature (it never changes a prediction)
    # The pipeline takes a bare "▁" piece for a word of its own; bert-ft labels the word's first real sub-word
    # (item 2 of issue 26). Texts where this vocabulary starts a word with one are compared on their words only.
    bare = word_prefix_ids(tokenizer)
    plain = [text for text in texts if not any(
        tokenizer(word, add_special_tokens=False)["input_ids"][:1] in ([token] for token in bare)
        for word in text.split())]
    assert plain, "at least one text to compare entity by entity"
    ours = predict_examples(NerTask(), model, tokenizer, plain, 128, 8)
    tagger = pipeline("token-classification", model=model_dir, aggregation_strategy="first", device="cpu")
    for text, result in zip(plain, ours):
        theirs = [(entity["entity_group"], *stripped(text, entity["start"], entity["end"])) for entity in tagger(text)]
        assert theirs == [(entity["type"], entity["start"], entity["end"]) for entity in result["entities"]], text

    model_dir = os.path.join(runs(family, "sentence"), "model")
    model, tokenizer, _ = load_model(model_dir)
    model.temperature = 1.0
    ours = predict_examples(task_of("sentence"), model, tokenizer, texts, 128, 8)
    classifier = pipeline("text-classification", model=model_dir, device="cpu", top_k=None)
    for text, result in zip(texts, ours):
        rows = classifier(text)
        rows = rows[0] if rows and isinstance(rows[0], list) else rows
        theirs = {row["label"]: row["score"] for row in rows}
        assert max(theirs, key=theirs.get) == result["label"], text
        for label, probability in result["probabilities"].items():
            assert probability == pytest.approx(theirs[label], abs=1e-5)


# ------------------------------------------------------------------------------------ one non-BERT family

def test_crf_context_fgm_calibration_and_init_from_on_roberta(families, data, tmp_path):
    """RoBERTa: NER with --crf and --context_size (packed), sentence with FGM, each calibrated on validation;
    relation started from the NER run's encoder with --init_from."""
    roberta = families["roberta"]
    ner = train("ner", roberta, data, str(tmp_path / "ner"), {"crf": True, "context_size": 16})
    assert "calibration_temperature" in ner and ner["calibration_temperature"] > 0
    model, _, meta = load_model(str(tmp_path / "ner" / "model"))
    assert meta["task_options"]["crf"] and meta["task_options"]["context_size"] == 16
    assert model.crf is not None and meta["temperature"] == pytest.approx(ner["calibration_temperature"])
    sentence = train("sentence", roberta, data, str(tmp_path / "sentence"), adversarial="fgm")
    # a fit needs MIN_EACH_OUTCOME right and wrong validation predictions; below that the report says why not
    report = (tmp_path / "sentence" / "report.txt").read_text(encoding="utf-8")
    assert "calibration_temperature" in sentence or "not fitted" in report
    assert "eval_ece" in sentence
    train("relation", roberta, data, str(tmp_path / "relation"), init_from=str(tmp_path / "ner" / "model"),
          layer_lr_decay=0.8, freeze_layers=1)
    relation, _, _ = load_model(str(tmp_path / "relation" / "model"))
    source, _, _ = load_model(str(tmp_path / "ner" / "model"))
    # layer 0 was frozen after the transfer: it still holds the NER run's weights
    first = dict(source.encoder_model().encoder.layer[0].named_parameters())
    for name, param in relation.encoder_model().encoder.layer[0].named_parameters():
        assert torch.equal(param, first[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_fgm_and_pgd_on_every_family(family, families, data):
    """FGM and PGD find each family's word embeddings, perturb them within epsilon along the micro-batch's gradient,
    add the adversarial gradients to the clean ones and put the weights back bit-exactly (packed batch)."""
    task = task_of("sentence")
    tokenizer = load_tokenizer(families[family])
    examples = list(task.stream(data["sentence"]["train"]))[:6]
    labels = task.build_labels(examples)
    torch.manual_seed(0)
    model = task.build_model(families[family], labels, tokenizer, False)
    model.train()
    for module in model.modules():  # no dropout: the clean gradient of each pass is the same
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    features = task.encode(examples, tokenizer, 48, labels)
    batch = Collator(task.pad_values(tokenizer), pack=True, row_capacity=64)(
        [(index, features.inputs[index]) for index in range(len(examples))])
    batch.pop("feature_index")
    weight = model.get_input_embeddings().weight
    params = [param for param in model.parameters() if param.requires_grad]
    model(**batch)["loss"].backward()
    clean = weight.grad.clone()
    for kind in ("fgm", "pgd"):
        model.zero_grad(set_to_none=True)
        before = weight.detach().clone()
        adversary = build_adversary(kind, weight, epsilon=0.5, steps=2, alpha=0.3, params=params)
        adversary.before_backward()
        model(**batch)["loss"].backward()
        assert adversary.adversarial_backward(lambda: model(**batch)["loss"].backward()), (family, kind)
        assert torch.equal(weight.detach(), before), (family, kind)  # restored bit-exactly
        assert 0 < adversary.last_perturbation_norm <= 0.5 + 1e-5, (family, kind)
        if kind == "fgm":
            assert adversary.last_perturbation_norm == pytest.approx(0.5, rel=1e-4)
        assert torch.isfinite(weight.grad).all() and not torch.allclose(weight.grad, clean), (family, kind)
