"""Calibration: ECE, temperature fitting (both objectives recover a known temperature), CRF span marginals against
brute force, temperatures that never change a prediction, fits that do not depend on how the batches are cut, and
the end of a training run (temperature stored, ECE reported)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bert_ft import TrainConfig, finetune, load_model, predict
from bert_ft.calibration import (OBJECTIVES, calibrate, expected_calibration_error, fit_temperature,
                                 fit_temperature_to_confidences, golden_section_minimum, grid_then_golden_minimum,
                                 log_loss)
from bert_ft.crf import CRF, iob2_transition_mask
from bert_ft.onnx_model import EncoderStandIn
from bert_ft.heads import Head
from bert_ft.plugins import registered_tasks
from bert_ft.inference import decode_batches
from bert_ft.task import Features
from bert_ft_tasks.ner import NerExample, NerTask, TokenTagger

from .conftest import ROOT

TASKS = registered_tasks()

LABELS = ["O", "B-X", "I-X"]


def test_ece_of_known_bins():
    assert expected_calibration_error([]) is None
    assert expected_calibration_error([(1.0, True)] * 4) == 0.0
    # Bin (0.6, 0.6667]: confidence 0.65 four times, half right: |0.5 - 0.65| = 0.15.
    assert expected_calibration_error([(0.65, True), (0.65, False)] * 2) == pytest.approx(0.15)
    # Two bins weighted by size: 3 x (conf 0.9, all right: 0.1) and 1 x (conf 0.3, wrong: 0.3).
    pairs = [(0.9, True)] * 3 + [(0.3, False)]
    assert expected_calibration_error(pairs) == pytest.approx((3 * 0.1 + 0.3) / 4)
    # Equal-width bins, (k/15, (k+1)/15]: 0 falls in the first bin, 1/15 too, 1/15 + eps in the second.
    assert expected_calibration_error([(0.0, False), (1 / 15, False)]) == pytest.approx(1 / 30)


def test_golden_section_finds_the_minimum():
    assert golden_section_minimum(lambda x: (x - 1.3) ** 2, -5, 5) == pytest.approx(1.3, abs=1e-6)
    # Two local minima: the grid finds the lower one's bracket, the golden section the point.
    bumpy = lambda x: min((x + 2) ** 2 + 0.5, (x - 1.3) ** 2)  # noqa: E731
    assert grid_then_golden_minimum(bumpy, -3, 3) == pytest.approx(1.3, abs=1e-5)


def test_log_loss():
    assert log_loss([(0.8, True), (0.8, False)]) == pytest.approx(-(math.log(0.8) + math.log(0.2)) / 2)
    assert math.isfinite(log_loss([(1.0, False), (0.0, True)]))  # clipped: a float32 1.0 can be wrong


class _Logits:
    """Just the default Head.calibration_nll (class logits with labels)."""

    calibration_nll = Head.calibration_nll


def test_fitted_temperature_recovers_the_over_confidence_of_synthetic_logits():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(20000, 5, generator=generator) * 2
    labels = torch.multinomial(true_logits.softmax(-1), 1, generator=generator).squeeze(1)
    for temperature in (0.5, 2.5):
        over_confident = true_logits * temperature  # what the model outputs; dividing by T gives the truth
        scored = [({"labels": labels[start:start + 4000]}, over_confident[start:start + 4000])
                  for start in range(0, 20000, 4000)]
        fitted = fit_temperature(_Logits(), scored)
        assert fitted["temperature"] == pytest.approx(temperature, rel=0.05)
        assert fitted["nll_after"] < fitted["nll_before"]
        correct = (over_confident.argmax(-1) == labels).tolist()
        confident = list(zip((over_confident / fitted["temperature"]).softmax(-1).max(-1).values.tolist(), correct))
        raw = list(zip(over_confident.softmax(-1).max(-1).values.tolist(), correct))
        assert expected_calibration_error(confident) < expected_calibration_error(raw) / 2


def test_confidence_fit_recovers_the_over_confidence_of_synthetic_logits():
    """The log loss of (predicted class's probability, correct) is a proper score: at the true temperature every
    confidence is the true probability of being right, so the fit finds it (multiclass: not the label NLL's
    objective, the same minimiser)."""
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(20000, 5, generator=generator) * 2
    labels = torch.multinomial(true_logits.softmax(-1), 1, generator=generator).squeeze(1)
    for temperature in (0.5, 2.5):
        over_confident = true_logits * temperature
        correct = (over_confident.argmax(-1) == labels).tolist()

        def confidences_at(t: float) -> list:
            return list(zip((over_confident / t).softmax(-1).max(-1).values.tolist(), correct))

        fitted = fit_temperature_to_confidences(confidences_at)
        assert fitted["objective"] == "confidence" and fitted["labels"] == 20000
        assert fitted["temperature"] == pytest.approx(temperature, rel=0.05)
        assert fitted["nll_after"] < fitted["nll_before"]
        assert expected_calibration_error(confidences_at(fitted["temperature"])) < \
            expected_calibration_error(confidences_at(1.0)) / 2


def test_confidence_fit_falls_back_where_it_cannot_fit():
    """No pairs, all right / all wrong or fewer than 10 of either (no minimum inside the range, or noise), or
    confidences that carry no information (the minimum at the range's end): the label NLL fit."""
    for pairs in ([], [(0.9, True)] * 50, [(0.9, False)] * 50, [(0.9, True)] * 50 + [(0.6, False)] * 9):
        assert fit_temperature_to_confidences(lambda t, pairs=pairs: pairs) is None
    # Right or wrong at random whatever the confidence: the loss keeps falling towards T = 20 (confidence 1/2).
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(500, 2, generator=generator) * 3
    coin = (torch.rand(500, generator=generator) < 0.5).tolist()
    assert fit_temperature_to_confidences(
        lambda t: list(zip((logits / t).softmax(-1).max(-1).values.tolist(), coin))) is None
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 3, generator=generator) * 3
    labels = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
    scored = [({"labels": labels}, logits)]
    fitted = calibrate(_Logits(), scored, lambda t: [(0.9, True)] * 5)
    assert fitted["objective"] == "label" and fitted == fit_temperature(_Logits(), scored)
    assert calibrate(_Logits(), scored, None)["objective"] == "label"


def _tagger(use_crf: bool, seed: int = 0) -> TokenTagger:
    from transformers import BertConfig

    torch.manual_seed(seed)
    tagger = TokenTagger(EncoderStandIn(BertConfig(hidden_size=8)), LABELS, use_crf=use_crf)
    if use_crf:
        with torch.no_grad():
            for parameter in tagger.crf.parameters():
                parameter.uniform_(-1.5, 1.5)
    return tagger.eval()


def _word_batch(lengths: list[int], labels: torch.Tensor | None = None) -> dict:
    """A padded batch where every token is a word start (the layout decode_scores reads)."""
    width = max(lengths)
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    batch = {"word_starts": mask.long(), "attention_mask": mask.long(), "example_row": torch.arange(len(lengths)),
             "example_offset": torch.zeros(len(lengths), dtype=torch.long), "example_length": torch.tensor(lengths)}
    if labels is not None:
        batch["labels"] = labels.masked_fill(~mask, -100)
    return batch


def _sample_paths(crf: CRF, emissions: torch.Tensor, length: int, count: int, generator) -> torch.Tensor:
    """`count` tag paths drawn from the CRF's distribution over one sentence (by enumeration)."""
    transitions = (crf.transitions + crf.transition_penalty).detach()
    start, end = (crf.start_transitions + crf.start_penalty).detach(), crf.end_transitions.detach()
    paths = list(itertools.product(range(crf.num_tags), repeat=length))
    scores = torch.tensor([float(start[p[0]] + end[p[-1]] + sum(emissions[i, t] for i, t in enumerate(p))
                                 + sum(transitions[a, b] for a, b in zip(p, p[1:]))) for p in paths])
    chosen = torch.multinomial(scores.softmax(0), count, replacement=True, generator=generator)
    return torch.tensor([paths[index] for index in chosen.tolist()])


def test_crf_temperature_fit_recovers_a_scaled_crf():
    """Tags drawn from a CRF; the model's potentials are that CRF's times 2: the fit finds T = 2."""
    generator = torch.Generator().manual_seed(1)
    tagger = _tagger(use_crf=True, seed=3)
    truth = tagger.crf.scaled(2.0)  # the true CRF has half the potentials of the model's
    sentences, length, draws = 60, 4, 40
    true_emissions = torch.randn(sentences, length, 3, generator=generator)
    tags = torch.cat([_sample_paths(truth, true_emissions[row], length, draws, generator)
                      for row in range(sentences)])
    scores = (true_emissions * 2).repeat_interleave(draws, dim=0)
    batch = _word_batch([length] * len(tags), tags)
    fitted = fit_temperature(tagger, [(batch, scores)])
    assert fitted["temperature"] == pytest.approx(2.0, rel=0.1)


def _ner_split(tags: torch.Tensor, lengths: list[int]) -> tuple[list, Features]:
    """Examples (one per row of gold tag ids) and one window per example, every token a word start, as the layout
    of `_word_batch`: what NerTask.confidences reads."""
    examples = [NerExample([f"w{index}" for index in range(length)], [LABELS[tag] for tag in row[:length]], "x", 1)
                for row, length in zip(tags.tolist(), lengths)]
    features = Features([{"word_starts": [1] * length} for length in lengths], list(range(len(lengths))),
                        list(lengths), [(0, length) for length in lengths])
    return examples, features


def _entity_confidences(tagger: TokenTagger, scored: list, examples: list, features: Features):
    """T -> NerTask.confidences of the decoded batches (what training's fit calls)."""
    def confidences_at(temperature: float) -> list:
        outputs = decode_batches(tagger, scored, len(features), temperature=temperature)
        return NerTask().confidences(examples, features, outputs, LABELS)

    return confidences_at


def _with_index(batch: dict, start: int) -> dict:
    return {**batch, "feature_index": torch.arange(start, start + len(batch["example_row"]))}


def test_entity_confidence_fit_recovers_a_scaled_crf():
    """Gold tags drawn from a CRF, the model's potentials that CRF's times 2: fitted on the predicted entities'
    span probabilities and whether they are right (not on the tags' likelihood), the fit finds T = 2."""
    generator = torch.Generator().manual_seed(2)
    tagger = _tagger(use_crf=True, seed=3)
    truth = tagger.crf.scaled(2.0)
    sentences, length, draws = 100, 4, 20
    true_emissions = torch.randn(sentences, length, 3, generator=generator) * 1.5
    tags = torch.cat([_sample_paths(truth, true_emissions[row], length, draws, generator)
                      for row in range(sentences)])
    examples, features = _ner_split(tags, [length] * len(tags))
    # Each sentence is decoded once; its draws share that output (the same emissions, other gold tags).
    scored = [(_with_index(_word_batch([length] * sentences), 0), true_emissions * 2)]

    def confidences_at(temperature: float) -> list:
        decoded = decode_batches(tagger, scored, sentences, temperature=temperature)
        return NerTask().confidences(examples, features, [decoded[index // draws] for index in range(len(tags))],
                                     LABELS)

    fitted = calibrate(tagger, scored, confidences_at)
    assert fitted["objective"] == "confidence" and fitted["labels"] > len(tags)
    assert fitted["temperature"] == pytest.approx(2.0, rel=0.1)


@pytest.mark.parametrize("use_crf", [False, True])
def test_entity_confidence_fit_changes_no_prediction_and_ignores_how_batches_are_cut(use_crf):
    """The predicted entities and whether they are right are the same at every temperature (only confidences
    move); the fit on one batch equals the fit on the same rows cut into pieces (as processes hold them before the
    gather), and decoding at the fitted temperature predicts what T = 1 does."""
    generator = torch.Generator().manual_seed(4)
    tagger = _tagger(use_crf)
    lengths = [int(value) for value in torch.randint(1, 9, (48,), generator=generator)]
    scores = torch.randn(48, 8, 3, generator=generator) * 4
    gold = torch.randint(0, 3, (48, 8), generator=generator)
    gold = torch.where(torch.rand(48, 8, generator=generator) < 0.6, scores.argmax(-1), gold)  # mostly right
    examples, features = _ner_split(gold, lengths)
    whole = [(_with_index(_word_batch(lengths), 0), scores)]
    pieces = []
    for start, end in ((0, 5), (5, 29), (29, 48)):
        width = max(lengths[start:end])
        pieces.append((_with_index(_word_batch(lengths[start:end]), start), scores[start:end, :width]))
    confidences_at = _entity_confidences(tagger, whole, examples, features)
    plain = confidences_at(1.0)
    assert 0 < sum(correct for _, correct in plain) < len(plain)
    for temperature in (0.4, 1.7, 6.0):
        moved = confidences_at(temperature)
        assert [correct for _, correct in moved] == [correct for _, correct in plain]
        assert [value for value, _ in moved] != [value for value, _ in plain]
    fitted = calibrate(tagger, whole, confidences_at)
    assert fitted["objective"] == "confidence"
    assert fitted == calibrate(tagger, pieces, _entity_confidences(tagger, pieces, examples, features))
    before = decode_batches(tagger, whole, len(features), temperature=1.0)
    after = decode_batches(tagger, whole, len(features), temperature=fitted["temperature"])
    assert all((a["pred"] == b["pred"]).all() for a, b in zip(before, after))


def test_two_ranks_fit_the_temperature_one_process_fits(tmp_path):
    """Each of 2 ranks decodes its own half of the validation batches and the outputs are gathered: both objectives
    find the temperature that one process finds on all of them (tests/two_rank_fit.py). The confidence fit sees
    the very same gathered pairs, so exactly; the label fit sums float32 per-batch losses in another grouping."""
    result = str(tmp_path / "fits.json")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
               os.path.join(ROOT, "tests", "two_rank_fit.py"), result]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    with open(result, encoding="utf-8") as handle:
        found = json.load(handle)
    assert found["num_processes"] == 2
    for name, fits in found["fits"].items():
        assert fits["ranks"]["objective"] == fits["one"]["objective"] == name.split()[1], name
        if name.endswith("confidence"):
            assert fits["ranks"] == fits["one"], name
        else:
            assert fits["ranks"]["temperature"] == pytest.approx(fits["one"]["temperature"], rel=1e-3), name
        assert fits["ranks"]["labels"] == fits["one"]["labels"], name


def _brute_force(crf: CRF, emissions: torch.Tensor, length: int) -> dict:
    transitions = (crf.transitions + crf.transition_penalty).detach().double()
    start = (crf.start_transitions + crf.start_penalty).detach().double()
    end = crf.end_transitions.detach().double()
    scores = {}
    for path in itertools.product(range(crf.num_tags), repeat=length):
        score = start[path[0]] + end[path[-1]]
        score = score + sum(emissions[i, t].double() for i, t in enumerate(path))
        scores[path] = float(score + sum(transitions[a, b] for a, b in zip(path, path[1:])))
    log_partition = torch.logsumexp(torch.tensor(list(scores.values()), dtype=torch.float64), 0)
    return {path: math.exp(score - float(log_partition)) for path, score in scores.items()}


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_span_marginals_match_brute_force(temperature):
    torch.manual_seed(5)
    crf = CRF(3)
    with torch.no_grad():
        for parameter in crf.parameters():
            parameter.uniform_(-2, 2)
    crf.constrain(*iob2_transition_mask(LABELS))  # I-X only after B-X / I-X
    lengths = [5, 3, 1]
    emissions = torch.randn(3, 5, 3) * 2
    mask = torch.arange(5)[None] < torch.tensor(lengths)[:, None]
    spans = [(0, 1, [1, 2], [], [2]), (0, 0, [1], [], [2]), (0, 3, [1, 2], [], [2]), (0, 2, [2, 2], [1, 2], [2]),
             (1, 0, [1, 2, 2], [], [2]), (1, 2, [0], [0], []), (2, 0, [1], [], [2]), (0, 4, [1], [1], [])]
    scaled = crf.scaled(temperature)
    got = scaled.span_marginals(emissions / temperature, mask, spans)
    for (row, start, tags, not_before, not_after), value in zip(spans, got.tolist()):
        paths = _brute_force(scaled, emissions[row] / temperature, lengths[row])
        end = start + len(tags)
        expected = sum(probability for path, probability in paths.items()
                       if list(path[start:end]) == tags and (start == 0 or path[start - 1] not in not_before)
                       and (end == lengths[row] or path[end] not in not_after))
        assert value == pytest.approx(expected, abs=1e-5), (row, start, tags)
    with pytest.raises(ValueError):
        crf.span_marginals(emissions, mask, [(1, 2, [1, 2], [], [])])  # past the row's end


def test_viterbi_path_is_invariant_to_the_temperature():
    crf = _tagger(use_crf=True, seed=7).crf
    emissions = torch.randn(6, 9, 3) * 3
    mask = torch.arange(9)[None] < torch.tensor([9, 7, 5, 3, 2, 1])[:, None]
    best, _ = crf.decode(emissions, mask)
    for temperature in (0.1, 0.7, 2.0, 15.0):
        assert torch.equal(crf.scaled(temperature).decode(emissions / temperature, mask)[0], best)


@pytest.mark.parametrize("use_crf", [False, True])
def test_ner_temperature_changes_confidences_not_predictions(use_crf):
    tagger = _tagger(use_crf)
    batch = _word_batch([7, 4, 1])
    scores = torch.randn(3, 7, 3) * 3
    plain = tagger.decode_scores(scores, batch)
    for temperature in (0.3, 2.0):
        scaled = tagger.decode_scores(scores, batch, temperature)
        assert torch.equal(scaled["pred"], plain["pred"])
        assert not torch.allclose(scaled["score"], plain["score"])
        assert ((scaled["span"] > 0) == (plain["span"] > 0)).all()  # entities at the same words
    tagger.temperature = 2.0  # the head's own temperature is the default
    assert torch.allclose(tagger.decode_scores(scores, batch)["score"],
                          tagger.decode_scores(scores, batch, 2.0)["score"])


def test_linear_span_probability_is_that_of_exactly_this_entity():
    """Words independent: its words' tags, times the next word not continuing it (and, for an entity that starts
    with I-X, the word before not being B-X/I-X)."""
    tagger = _tagger(use_crf=False)
    scores = torch.randn(1, 6, 3)
    for position, tag in enumerate([1, 2, 2, 0, 2, 0]):  # B-X I-X I-X O I-X O: two entities
        scores[0, position, tag] += 4.0
    out = tagger.decode_scores(scores, _word_batch([6]), temperature=1.5)
    assert out["pred"][0].tolist() == [1, 2, 2, 0, 2, 0]
    probabilities = (scores[0] / 1.5).softmax(-1)
    first = probabilities[0, 1] * probabilities[1, 2] * probabilities[2, 2] * (1 - probabilities[3, 2])
    second = probabilities[4, 2] * (1 - probabilities[5, 2]) * (1 - probabilities[3, 1] - probabilities[3, 2])
    assert out["span"][0, 0].item() == pytest.approx(float(first), rel=1e-5)
    assert out["span"][0, 4].item() == pytest.approx(float(second), rel=1e-5)
    assert out["span"][0, [1, 2, 3, 5]].eq(0).all()


@pytest.fixture(scope="module")
def calibrated_run(tiny_model_dir, tmp_path_factory) -> str:
    output_dir = str(tmp_path_factory.mktemp("calibrated") / "run")
    task = TASKS["sentence"](TASKS["sentence"].options_type())
    finetune(task, TrainConfig(model_name_or_path=tiny_model_dir, output_dir=output_dir, num_train_epochs=1,
                               max_train_samples=96, max_eval_samples=48, max_seq_length=48,
                               learning_rate=3e-3, head_learning_rate=3e-3))
    return output_dir


def test_training_fits_stores_and_reports_a_temperature(calibrated_run):
    with open(os.path.join(calibrated_run, "metrics.json"), encoding="utf-8") as handle:
        metrics = json.load(handle)
    for key in ("eval_ece", "eval_ece_calibrated", "test_ece", "test_ece_calibrated", "calibration_temperature"):
        assert isinstance(metrics[key], float), key
    assert metrics["calibration_changed_predictions"] == 0
    # A tiny model at chance level: the confidence fit finds no minimum inside the range, the label NLL fit is used.
    assert metrics["calibration_objective"] in ("confidence", "label")
    with open(os.path.join(calibrated_run, "model", "bert_ft.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    assert meta["temperature"] == metrics["calibration_temperature"] and meta["calibration"]["fitted_on"]
    assert meta["calibration"]["objective"] == metrics["calibration_objective"]
    report = open(os.path.join(calibrated_run, "report.txt"), encoding="utf-8").read()
    assert "== calibration ==" in report and "expected calibration error (15 equal-width bins)" in report
    assert OBJECTIVES[metrics["calibration_objective"]] in report
    # predict uses the stored temperature: the same as decoding the raw scores at it.
    model, tokenizer, _ = load_model(os.path.join(calibrated_run, "model"))
    assert model.temperature == metrics["calibration_temperature"]
    task = TASKS["sentence"](TASKS["sentence"].options_type())
    [result] = predict(task, os.path.join(calibrated_run, "model"), ["a fine film"])
    encoded = tokenizer(["a fine film"], return_tensors="pt")
    batch = {**encoded, "example_row": torch.tensor([0]), "example_offset": torch.tensor([0]),
             "example_length": torch.tensor([encoded["input_ids"].size(1)])}
    with torch.no_grad():
        probs = (model.scores(batch) / model.temperature).softmax(-1)[0]
    assert [result["probabilities"][label] for label in model.labels] == pytest.approx(probs.tolist(), abs=1e-5)
