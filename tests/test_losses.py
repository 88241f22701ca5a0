"""Imbalance-aware training (issue 15): class weights and focal loss, checked against hand computations, the CRF's
sentence weighting, the weight file's errors, flag validation, packing, FGM and what a run records."""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import pytest
import torch

from bert_ft import TrainConfig, finetune, load_model
from bert_ft.cli import main, parse
from bert_ft.errors import DataError, UsageError
from bert_ft.losses import (balanced_weights, class_weight_problems, classification_loss, label_counts,
                            read_weight_file, resolve_class_weights)
from bert_ft_tasks.ner import FOCAL_WITH_CRF, NerExample, NerOptions, NerTask
from bert_ft_tasks.sentence import SentenceTask

from .conftest import ROOT
from .test_packing import CASES, batches, build, run

SAMPLES = os.path.join(ROOT, "tasks", "samples")

# Three targets, the third ignored: logits and the hand-computed -log p of the gold class of the first two.
LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0]])
TARGETS = torch.tensor([0, 2, -100])
WEIGHTS = torch.tensor([1.0, 2.0, 3.0])
# -log p_0 of row 0 = log(1 + e^-2 + e^-3) = log(1.1851) = 0.169846
# -log p_2 of row 1 = 1.5 + log(e^-1 + 1 + e^-1.5) - 0 = 1.5 + log(1.591010) = 1.964369
NLL = (0.169846, 1.964369)


# ------------------------------------------------------------------------------------------ the loss function

def test_weighted_cross_entropy_matches_a_hand_computation():
    # weighted mean: (w_0 * 0.169846 + w_2 * 1.964369) / (w_0 + w_2) = (0.169846 + 3 * 1.964369) / 4
    expected = (1.0 * NLL[0] + 3.0 * NLL[1]) / (1.0 + 3.0)
    assert expected == pytest.approx(1.515738, abs=1e-6)
    assert classification_loss(LOGITS, TARGETS, WEIGHTS).item() == pytest.approx(expected, abs=1e-5)
    # Unweighted: the plain mean (0.169846 + 1.964369) / 2, torch's own cross-entropy.
    assert classification_loss(LOGITS, TARGETS).item() == pytest.approx(sum(NLL) / 2, abs=1e-5)
    # Only ratios matter: scaling every weight changes nothing.
    assert classification_loss(LOGITS, TARGETS, WEIGHTS * 7).item() == pytest.approx(expected, abs=1e-5)


def test_focal_loss_matches_a_hand_computation():
    # p_t = e^-NLL: 0.843795 and 0.140244; focal term (1 - p_t)^2 * NLL: 0.0041443 and 1.452022
    p = [math.exp(-value) for value in NLL]
    terms = [(1 - p_t) ** 2 * value for p_t, value in zip(p, NLL)]
    assert terms[0] == pytest.approx(0.0041443, abs=1e-6) and terms[1] == pytest.approx(1.452022, abs=1e-5)
    weighted = (1.0 * terms[0] + 3.0 * terms[1]) / 4.0  # class weights as alpha_t, weighted mean: 1.090052
    assert weighted == pytest.approx(1.090052, abs=1e-5)
    assert classification_loss(LOGITS, TARGETS, WEIGHTS, "focal", 2.0).item() == pytest.approx(weighted, abs=1e-5)
    assert classification_loss(LOGITS, TARGETS, None, "focal", 2.0).item() == pytest.approx(sum(terms) / 2, abs=1e-5)
    # gamma 0.5 has a finite gradient even where p_t is 1 in float32.
    sure = torch.tensor([[60.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = classification_loss(sure, torch.tensor([0, 1]), None, "focal", 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sure.grad).all()


@pytest.mark.parametrize("weighted", [False, True])
def test_focal_with_gamma_zero_equals_cross_entropy(weighted):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 5, generator=generator) * 3  # (rows, seq, labels), as the token tagger gives
    targets = torch.randint(0, 5, (2, 7), generator=generator)
    targets[0, :2] = -100
    weights = torch.rand(5, generator=generator) + 0.1 if weighted else None
    grads = []
    for kind in ("cross_entropy", "focal"):
        leaf = logits.clone().requires_grad_()
        loss = classification_loss(leaf, targets, weights, kind, 0.0)
        loss.backward()
        grads.append((loss.detach(), leaf.grad))
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 5), targets.reshape(-1), weight=weights)
    assert torch.allclose(grads[0][0], expected, rtol=1e-6, atol=1e-7)
    assert torch.allclose(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-7)
    assert torch.allclose(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ the weights

def test_balanced_weights_follow_sklearns_formula():
    counts = Counter({"a": 6, "b": 3, "c": 1})  # 10 samples, 3 classes that occur: n / (3 * count)
    weights = balanced_weights(counts, ["a", "b", "c", "never"])
    assert weights["a"] == pytest.approx(10 / 18) and weights["b"] == pytest.approx(10 / 9)
    assert weights["c"] == pytest.approx(10 / 3)
    assert weights["never"] == 1.0  # absent from training: never a gold target, so unused
    sklearn = pytest.importorskip("sklearn.utils.class_weight")
    import numpy

    y = numpy.array(["a"] * 6 + ["b"] * 3 + ["c"])
    reference = sklearn.compute_class_weight("balanced", classes=numpy.array(["a", "b", "c"]), y=y)
    assert [weights[label] for label in "abc"] == pytest.approx(list(reference))


def test_weight_files_json_and_lines(tmp_path):
    lines = tmp_path / "weights.txt"
    lines.write_text("# minority first\nnegative 4.5\n\npositive\t1\nvery good 2e-1\n", encoding="utf-8")
    assert {label: weight for label, (weight, _) in read_weight_file(str(lines)).items()} == \
        {"negative": 4.5, "positive": 1.0, "very good": 0.2}
    as_json = tmp_path / "weights.json"
    as_json.write_text('{\n  "negative": 4.5,\n  "positive": 1\n}\n', encoding="utf-8")
    assert read_weight_file(str(as_json)) == {"negative": (4.5, 2), "positive": (1.0, 3)}


@pytest.mark.parametrize("text, line, message", [
    ("negative 2\npositive abc\n", 2, "the weight of 'positive' is 'abc', not a number"),
    ("negative 0\n", 1, "weights must be finite numbers > 0"),
    ("negative -1\n", 1, "weights must be finite numbers > 0"),
    ("negative nan\n", 1, "weights must be finite numbers > 0"),
    ("negative inf\n", 1, "weights must be finite numbers > 0"),
    ("negative 2\nnegative 3\n", 2, "label 'negative' is given twice (first on line 1)"),
    ("# header\njustonefield\n", 2, "expected 'label weight', got 'justonefield'"),
    ('{"negative": 2,\n "positive": "3"}', 2, "the weight of 'positive' is \"3\", not a number"),
    ('{"negative": 2,\n "positive": 0}', 2, "weights must be finite numbers > 0"),
    ('{"negative": NaN}', 1, "weights must be finite numbers > 0"),
    ('{"negative": 2,\n', 2, "not valid JSON"),
    ("# nothing\n\n", None, "no label weights found"),
])
def test_weight_file_errors_name_the_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "weights.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_weight_file(str(path))
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert str(caught.value).startswith(where) and message in str(caught.value), str(caught.value)
    assert "fix:" in str(caught.value)
    # The same message is one of the flag problems, found before any data is read.
    [problem] = class_weight_problems(str(path))
    assert problem.startswith("--class_weights: " + where) and message in problem


def test_unknown_labels_are_refused_and_missing_ones_get_weight_one(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("O 0.5\nB-PER 3\n", encoding="utf-8")
    notes = []
    weights = resolve_class_weights(str(path), ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"], Counter(), notes.append)
    assert weights == {"O": 0.5, "B-LOC": 1.0, "I-LOC": 1.0, "B-PER": 3.0, "I-PER": 1.0}
    assert notes == [f"class weights: {path} does not list B-LOC, I-LOC, I-PER: weight 1.0"]
    path.write_text("O 0.5\nB-FOO 3\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:2: label 'B-FOO' is not a label of this run \(labels: O, B-LOC"):
        resolve_class_weights(str(path), ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"], Counter(), notes.append)
    assert resolve_class_weights("none", ["a", "b"], Counter(a=1, b=3)) is None


# ------------------------------------------------------------------------------------------- flag validation

def test_bad_loss_flags_are_reported_together(tmp_path):
    with pytest.raises(UsageError) as caught:
        parse(["sentence", "--class_weights", str(tmp_path / "absent.json"), "--loss", "focal",
                      "--focal_gamma", "-1", "--num_train_epochs", "0"])
    message = str(caught.value)
    assert "--class_weights: " in message and "is neither none, balanced nor an existing file" in message
    assert "--focal_gamma: must be >= 0, got -1.0" in message and "--num_train_epochs" in message
    with pytest.raises(UsageError, match="--focal_gamma: has no effect without --loss focal"):
        parse(["sentence", "--focal_gamma", "1"])
    with pytest.raises(UsageError) as caught:
        parse(["sentence", "--loss", "focal", "--focal_gamma", "nan"])
    assert str(caught.value).count("--focal_gamma") == 1 and "finite" in str(caught.value)
    _, config, _ = parse(["sentence", "--class_weights", "balanced", "--loss", "focal", "--focal_gamma", "0"])
    assert (config.class_weights, config.loss, config.focal_gamma) == ("balanced", "focal", 0.0)


def test_focal_loss_with_the_crf_is_refused_with_both_flags_named(tiny_model_dir):
    with pytest.raises(UsageError) as caught:
        parse(["ner", "--crf", "--loss", "focal", "--class_weights", "balanced"])
    assert FOCAL_WITH_CRF in str(caught.value)
    assert all(part in FOCAL_WITH_CRF for part in ("--loss focal", "--crf", "use --loss cross_entropy"))
    parse(["ner", "--crf", "--class_weights", "balanced"])  # class weights with the CRF are fine
    parse(["ner", "--loss", "focal"])  # and focal loss with the linear head
    from transformers import AutoTokenizer

    tagger = NerTask(NerOptions(crf=True)).build_model(tiny_model_dir, ["O", "B-PER", "I-PER"],
                                                       AutoTokenizer.from_pretrained(tiny_model_dir), False)
    with pytest.raises(UsageError, match="--loss focal: not defined with --crf"):  # the API path, too
        tagger.set_loss(None, "focal", 2.0)


# -------------------------------------------------------------------------------------------- heads, the CRF

def ner_batch(tiny_model_dir, crf: bool):
    task, tokenizer, model, features = build("token_crf" if crf else "token", "sdpa", tiny_model_dir)
    _, examples = CASES["token"](tokenizer)
    padded, packed = batches(task, tokenizer, features)
    return task, model, examples, padded, packed


def test_crf_class_weights_weight_each_sentence_by_the_mean_weight_of_its_tags(tiny_model_dir):
    _, tagger, examples, padded, _ = ner_batch(tiny_model_dir, crf=True)
    labels = tagger.labels
    weights = {label: 1.0 + 0.75 * index for index, label in enumerate(labels)}  # O 1.0, then 1.75, 2.5, ...
    batch = {key: value for key, value in padded.items() if key != "feature_index"}
    with torch.no_grad():
        unweighted = tagger(**batch)["loss"]
        # The CRF's own negative log-likelihood of each sentence's gold tags.
        logits = tagger.scores(batch)
        emissions, word_labels, word_mask, _ = tagger._word_emissions(logits, batch["word_starts"], batch,
                                                                      batch["labels"])
        nll = tagger.crf(emissions, word_labels.clamp(min=0), word_mask, reduction="none").tolist()
        tagger.set_loss([weights[label] for label in labels])
        weighted = tagger(**batch)["loss"].item()
    assert len(nll) == len(examples) and unweighted.item() == pytest.approx(sum(nll) / len(nll), rel=1e-6)
    # By hand: w_s = mean of the weights of the sentence's gold tags; loss = sum w_s NLL_s / sum w_s.
    sentence_weights = [sum(weights[tag] for tag in example.tags) / len(example.tags) for example in examples]
    assert sentence_weights[0] == pytest.approx((1.0 + weights["B-LOC"] + weights["I-LOC"]) / 3)
    expected = sum(w * value for w, value in zip(sentence_weights, nll)) / sum(sentence_weights)
    assert weighted == pytest.approx(expected, rel=1e-6)
    assert abs(weighted - unweighted.item()) > 1e-3, "the weights change the loss"
    tagger.set_loss([2.5] * len(labels))  # the same weight everywhere: the unweighted loss
    with torch.no_grad():
        assert tagger(**batch)["loss"].item() == pytest.approx(unweighted.item(), rel=1e-6)


def test_linear_tagger_weights_every_labelled_word(tiny_model_dir):
    _, tagger, examples, padded, _ = ner_batch(tiny_model_dir, crf=False)
    weights = torch.arange(1.0, len(tagger.labels) + 1)
    batch = {key: value for key, value in padded.items() if key != "feature_index"}
    tagger.set_loss(weights.tolist())
    with torch.no_grad():
        loss = tagger(**batch)["loss"].item()
        log_p = tagger.scores(batch).float().log_softmax(-1)
    labels = batch["labels"]
    keep = labels != -100
    assert int(keep.sum()) == sum(len(example.tags) for example in examples)  # one target per word
    picked = -log_p[keep].gather(1, labels[keep][:, None]).squeeze(1)
    w = weights[labels[keep]]
    assert loss == pytest.approx(((w * picked).sum() / w.sum()).item(), rel=1e-6)


@pytest.mark.parametrize("case, kind", [("token", "cross_entropy"), ("token", "focal"), ("token_crf", "cross_entropy"),
                                        ("sentence", "focal"), ("sentence_pair", "cross_entropy"),
                                        ("relation_entity_start", "focal"), ("relation_entity_mean", "cross_entropy")])
def test_packed_and_padded_batches_give_the_same_weighted_loss(case, kind, tiny_model_dir):
    task, tokenizer, model, features = build(case, "sdpa", tiny_model_dir)
    padded, packed = batches(task, tokenizer, features)
    with torch.no_grad():
        plain = run(model, padded)["loss"]
        model.set_loss([0.5 + index for index in range(len(model.labels))], kind, 2.0)
        padded_loss, packed_loss = run(model, padded)["loss"], run(model, packed)["loss"]
    assert torch.allclose(padded_loss, packed_loss, atol=1e-5, rtol=1e-5), (padded_loss, packed_loss)
    assert not torch.allclose(padded_loss, plain), "the settings change the loss"


def test_loss_settings_are_not_saved_with_the_model(tiny_model_dir):
    _, model, _, _, _ = ner_batch(tiny_model_dir, crf=True)
    model.set_loss([1.0] + [3.0] * (len(model.labels) - 1))
    assert model.class_weights is not None
    assert not any("class_weights" in key for key in model.state_dict())


# --------------------------------------------------------------------------------------------- training runs

def small(tiny_model_dir: str, output_dir: str, **overrides) -> TrainConfig:
    settings = {"model_name_or_path": tiny_model_dir, "output_dir": output_dir, "num_train_epochs": 1,
                "max_train_samples": 48, "max_eval_samples": 16, "max_seq_length": 48}
    return TrainConfig(**{**settings, **overrides})


def test_a_run_records_the_flags_and_the_resolved_weights(tiny_model_dir, tmp_path, capsys):
    task = SentenceTask()
    folder = tmp_path / "run"
    finetune(task, small(tiny_model_dir, str(folder), class_weights="balanced", loss="focal", focal_gamma=1.5))
    with open(folder / "config.json", encoding="utf-8") as handle:
        config = json.load(handle)
    assert (config["class_weights"], config["loss"], config["focal_gamma"]) == ("balanced", "focal", 1.5)
    counts = Counter(example.label for example in task.read(task.default_files()["train"])[:48])
    total = sum(counts.values())
    assert config["class_weights_resolved"] == {label: pytest.approx(total / (2 * counts[label]))
                                                for label in ("negative", "positive")}
    printed = capsys.readouterr().out
    assert "class weights (balanced): label, training count, weight" in printed and "loss: focal (gamma 1.5)" in printed
    model, _, meta = load_model(str(folder / "model"))  # the folder loads as before, unweighted
    assert model.class_weights is None and model.loss_kind == "cross_entropy"
    assert "class_weights" not in json.dumps(meta)
    finetune(task, small(tiny_model_dir, str(tmp_path / "plain")))
    with open(tmp_path / "plain" / "config.json", encoding="utf-8") as handle:
        plain = json.load(handle)
    assert (plain["class_weights"], plain["loss"], plain["class_weights_resolved"]) == ("none", "cross_entropy", None)


def test_cli_weight_file_with_the_crf(tiny_model_dir, tmp_path, capsys):
    weights = tmp_path / "weights.txt"
    weights.write_text("O 0.5\nB-PER 3\n", encoding="utf-8")
    args = ["ner", "--crf", "--model_name_or_path", tiny_model_dir, "--num_train_epochs", "1", "--max_train_samples",
            "24", "--max_eval_samples", "8", "--max_seq_length", "48", "--class_weights", str(weights)]
    assert main([*args, "--output_dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"class weights: {weights} does not list B-LOC" in out
    with open(tmp_path / "run" / "config.json", encoding="utf-8") as handle:
        config = json.load(handle)
    assert config["class_weights"] == str(weights) and config["crf"] is True
    assert config["class_weights_resolved"]["O"] == 0.5 and config["class_weights_resolved"]["B-PER"] == 3.0
    assert set(config["class_weights_resolved"].values()) == {0.5, 3.0, 1.0}
    weights.write_text("O 0.5\nB-PERSON 3\n", encoding="utf-8")
    assert main([*args, "--output_dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert f"{weights}:2: label 'B-PERSON' is not a label of this run" in err
    assert not os.path.exists(tmp_path / "bad" / "config.json"), "refused before anything is written"


def test_the_fgm_pass_trains_on_the_weighted_loss(tiny_model_dir, tmp_path, monkeypatch):
    """FGM's second forward goes through the head's forward, so it computes the same (weighted, focal) loss."""
    from bert_ft.adversarial import FGM
    from bert_ft.heads import Head

    calls = []  # (inside the adversarial pass, class weights, loss kind)
    inside = [False]
    head_loss, adversarial_backward = Head.loss, FGM.adversarial_backward

    def spy_loss(self, logits, targets):
        calls.append((inside[0], None if self.class_weights is None else self.class_weights.tolist(), self.loss_kind))
        return head_loss(self, logits, targets)

    def spy_backward(self, forward_backward):
        inside[0] = True
        try:
            return adversarial_backward(self, forward_backward)
        finally:
            inside[0] = False

    monkeypatch.setattr(Head, "loss", spy_loss)
    monkeypatch.setattr(FGM, "adversarial_backward", spy_backward)
    finetune(SentenceTask(), small(tiny_model_dir, str(tmp_path / "run"), adversarial="fgm",
                                   class_weights=str(_write(tmp_path / "w.json", '{"negative": 3}')), loss="focal"))
    adversarial = [call for call in calls if call[0]]
    clean = [call for call in calls if not call[0]]
    assert adversarial and len(adversarial) <= len(clean)
    assert all(weights == [3.0, 1.0] and kind == "focal" for _, weights, kind in calls)


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_ner_balanced_weights_count_word_tags():
    task = NerTask()
    examples = [NerExample(["Ada", "met", "Bob"], ["B-PER", "O", "B-PER"], "mem", 1),
                NerExample(["in", "Paris", "Texas"], ["O", "B-LOC", "I-LOC"], "mem", 2)]
    labels = task.build_labels(examples)
    counts = label_counts(task.labels_of(example) for example in examples)  # what build_training counts
    notes = []
    weights = resolve_class_weights("balanced", labels, counts, notes.append)
    # 6 words, 4 tags that occur (O 2, B-PER 2, B-LOC 1, I-LOC 1): 6 / (4 * count); I-PER never occurs: 1.0
    assert weights == {"O": 0.75, "B-LOC": 1.5, "I-LOC": 1.5, "B-PER": 0.75, "I-PER": 1.0}
    assert notes == ["class weights: I-PER never occur in the training data: weight 1.0 (unused)"]
