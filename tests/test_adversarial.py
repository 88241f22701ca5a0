"""FGM / PGD embedding adversaries on a tiny BERT (CPU, no dropout so every forward is deterministic)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from bert_ft.adversarial import FGM, PGD, build_adversary

BATCH_SIZE, SEQ_LEN, VOCAB_SIZE, NUM_LABELS = 4, 8, 100, 3


def make_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=NUM_LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


def make_batch(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, VOCAB_SIZE, (BATCH_SIZE, SEQ_LEN), generator=generator),  # (batch, seq)
        "labels": torch.randint(0, NUM_LABELS, (BATCH_SIZE,), generator=generator),  # (batch,)
    }


def embedding_weight_of(model: nn.Module) -> nn.Parameter:
    return model.get_input_embeddings().weight  # (vocab, hidden)


def forward_backward(model: nn.Module, batch: dict[str, torch.Tensor], loss_scale: float = 1.0) -> None:
    (model(**batch)["loss"] * loss_scale).backward()


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    """Clone of every .grad, zeros where a param has none (so lists of different models compare)."""
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def fresh_grads(
    model: nn.Module, batch: dict[str, torch.Tensor], embedding: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Grads of one forward on a copy of ``model`` (optionally with the embedding replaced), .grad untouched."""
    model_copy = copy.deepcopy(model)
    if embedding is not None:
        with torch.no_grad():
            embedding_weight_of(model_copy).copy_(embedding)
    params = list(model_copy.parameters())
    grads = torch.autograd.grad(model_copy(**batch)["loss"], params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def fresh_embedding_grad(
    model: nn.Module, batch: dict[str, torch.Tensor], embedding: torch.Tensor | None = None
) -> torch.Tensor:
    embedding_index = next(i for i, p in enumerate(model.parameters()) if p is embedding_weight_of(model))
    return fresh_grads(model, batch, embedding)[embedding_index]


def assert_grads_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for actual_grad, expected_grad in zip(actual, expected):
        torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-5, atol=1e-7)


class PerturbationRecorder:
    """Adversarial callback: records (weight - clean weight) at each call, then runs forward+backward."""

    def __init__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
        self.model, self.batch = model, batch
        self.clean_weight = embedding_weight_of(model).detach().clone()  # (vocab, hidden)
        self.perturbations: list[torch.Tensor] = []

    def __call__(self) -> None:
        self.perturbations.append(embedding_weight_of(self.model).detach() - self.clean_weight)
        forward_backward(self.model, self.batch)

    @property
    def norms(self) -> list[float]:
        return [float(p.norm()) for p in self.perturbations]


def run_micro_batch(
    adversary: FGM | PGD, model: nn.Module, batch: dict[str, torch.Tensor]
) -> PerturbationRecorder:
    """One micro-batch exactly as the training loop drives the adversary."""
    recorder = PerturbationRecorder(model, batch)
    adversary.before_backward()
    forward_backward(model, batch)
    assert adversary.adversarial_backward(recorder)
    return recorder


# ---------------------------------------------------------------- factory


def test_build_adversary_kinds() -> None:
    weight = embedding_weight_of(make_bert())
    assert build_adversary("none", weight) is None
    fgm = build_adversary("fgm", weight, epsilon=0.5)
    assert isinstance(fgm, FGM) and fgm.kind == "fgm" and fgm.epsilon == 0.5
    pgd = build_adversary("pgd", weight, epsilon=0.5, steps=2, alpha=0.1)
    assert isinstance(pgd, PGD) and pgd.kind == "pgd" and (pgd.steps, pgd.alpha) == (2, 0.1)
    assert pgd.params == [weight]
    assert fgm.last_perturbation_norm == pgd.last_perturbation_norm == 0.0


@pytest.mark.parametrize("kind", ["FGM", "fgsm", ""])
def test_build_adversary_rejects_unknown_kind(kind: str) -> None:
    with pytest.raises(ValueError, match="unknown adversarial"):
        build_adversary(kind, embedding_weight_of(make_bert()))


def test_invalid_hyperparameters_are_rejected() -> None:
    weight = embedding_weight_of(make_bert())
    with pytest.raises(ValueError):
        build_adversary("fgm", weight, epsilon=-1.0)
    with pytest.raises(ValueError):
        build_adversary("pgd", weight, steps=0)
    with pytest.raises(ValueError):
        build_adversary("pgd", weight, alpha=0.0)


@pytest.mark.parametrize("kind", ["fgm", "pgd"])
def test_adversarial_backward_requires_before_backward(kind: str) -> None:
    model, batch = make_bert(), make_batch(0)
    adversary = build_adversary(kind, embedding_weight_of(model))
    forward_backward(model, batch)
    with pytest.raises(RuntimeError, match="before_backward"):
        adversary.adversarial_backward(lambda: forward_backward(model, batch))
    # The snapshot is consumed by one adversarial pass, so a stale one is never reused.
    run_micro_batch(adversary, model, batch)
    with pytest.raises(RuntimeError, match="before_backward"):
        adversary.adversarial_backward(lambda: forward_backward(model, batch))


# ---------------------------------------------------------------- FGM


def test_fgm_perturbs_by_epsilon_and_restores_weights_bit_exactly() -> None:
    model, batch = make_bert(), make_batch(0)
    weight = embedding_weight_of(model)
    weight_before = weight.detach().clone()
    adversary = build_adversary("fgm", weight, epsilon=0.7)

    recorder = run_micro_batch(adversary, model, batch)

    assert len(recorder.norms) == 1
    assert recorder.norms[0] == pytest.approx(0.7, rel=1e-5)
    assert adversary.last_perturbation_norm == pytest.approx(0.7, rel=1e-5)
    assert torch.equal(weight, weight_before)


def test_fgm_with_zero_epsilon_adds_exactly_the_clean_gradient() -> None:
    model, batch = make_bert(), make_batch(0)
    adversary = build_adversary("fgm", embedding_weight_of(model), epsilon=0.0)
    params_before = [p.detach().clone() for p in model.parameters()]
    clean_grads = fresh_grads(model, batch)

    run_micro_batch(adversary, model, batch)

    # eps = 0: the adversarial forward is a second clean forward, so .grad = clean + clean.
    assert_grads_close(grads_of(model), [g + g for g in clean_grads])
    learning_rate = 0.1
    torch.optim.SGD(model.parameters(), lr=learning_rate).step()
    for param, param_before, clean_grad in zip(model.parameters(), params_before, clean_grads):
        torch.testing.assert_close(param.detach(), param_before - learning_rate * 2 * clean_grad)


def test_fgm_uses_only_the_current_micro_batch_gradient_under_accumulation() -> None:
    model = make_bert()
    reference_model = copy.deepcopy(model)
    batches = [make_batch(1), make_batch(2)]
    epsilon = 0.5
    adversary = build_adversary("fgm", embedding_weight_of(model), epsilon=epsilon)

    recorders = [run_micro_batch(adversary, model, batch) for batch in batches]

    expected_grads = [torch.zeros_like(p) for p in reference_model.parameters()]
    for recorder, batch in zip(recorders, batches):
        # Fresh computation: g of this micro-batch alone, at the clean weights.
        micro_batch_grad = fresh_embedding_grad(reference_model, batch)
        expected_perturbation = epsilon * micro_batch_grad / micro_batch_grad.norm()
        torch.testing.assert_close(recorder.perturbations[0], expected_perturbation, rtol=1e-4, atol=1e-6)
        perturbed_embedding = embedding_weight_of(reference_model).detach() + recorder.perturbations[0]
        clean_grads = fresh_grads(reference_model, batch)
        adversarial_grads = fresh_grads(reference_model, batch, perturbed_embedding)
        for total, clean, adversarial in zip(expected_grads, clean_grads, adversarial_grads):
            total += clean + adversarial

    # The naive direction (the whole accumulated .grad) is measurably different,
    # so the check above discriminates.
    accumulated_clean_grad = sum(fresh_embedding_grad(reference_model, batch) for batch in batches)
    naive_perturbation = epsilon * accumulated_clean_grad / accumulated_clean_grad.norm()
    assert not torch.allclose(recorders[1].perturbations[0], naive_perturbation, atol=1e-4)
    # .grad = sum over micro-batches of (clean + adversarial), and the weights are untouched.
    assert_grads_close(grads_of(model), expected_grads)
    assert torch.equal(embedding_weight_of(model), embedding_weight_of(reference_model))


def test_fgm_direction_is_invariant_to_the_loss_scale() -> None:
    # Under an fp16 GradScaler .grad holds S * g; g / ||g|| must not depend on S.
    perturbations = []
    for loss_scale in (1.0, 1024.0):
        model, batch = make_bert(), make_batch(0)
        adversary = build_adversary("fgm", embedding_weight_of(model), epsilon=1.0)
        recorder = PerturbationRecorder(model, batch)
        adversary.before_backward()
        forward_backward(model, batch, loss_scale)
        assert adversary.adversarial_backward(recorder)
        perturbations.append(recorder.perturbations[0])
    torch.testing.assert_close(perturbations[0], perturbations[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["fgm", "pgd"])
@pytest.mark.parametrize("bad_value", [math.inf, math.nan, 0.0])
def test_unusable_gradient_skips_the_adversarial_pass(kind: str, bad_value: float) -> None:
    model = make_bert()
    weight = embedding_weight_of(model)
    weight_before = weight.detach().clone()
    adversary = build_adversary(kind, weight)
    calls: list[int] = []

    adversary.before_backward()
    # Stand-in for a clean backward that overflowed in fp16 (inf/nan) or gave no signal (zero).
    weight.grad = torch.full_like(weight, bad_value)
    assert adversary.adversarial_backward(lambda: calls.append(1)) is False

    assert calls == []
    assert torch.equal(weight, weight_before)
    torch.testing.assert_close(weight.grad, torch.full_like(weight, bad_value), rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------- PGD


def reference_pgd_perturbations(
    model: nn.Module, batch: dict[str, torch.Tensor], epsilon: float, steps: int, alpha: float
) -> list[torch.Tensor]:
    """Textbook K-step L2 PGD on a copy: the perturbation used by each adversarial forward."""
    clean_weight = embedding_weight_of(model).detach().clone()  # (vocab, hidden)
    perturbation = torch.zeros_like(clean_weight)
    grad = fresh_embedding_grad(model, batch)
    perturbations = []
    for _ in range(steps):
        perturbation = perturbation + alpha * grad / grad.norm()
        if perturbation.norm() > epsilon:
            perturbation = perturbation * epsilon / perturbation.norm()
        perturbations.append(perturbation)
        grad = fresh_embedding_grad(model, batch, clean_weight + perturbation)
    return perturbations


def test_pgd_stays_in_the_epsilon_ball_and_restores_weights_bit_exactly() -> None:
    model, batch = make_bert(), make_batch(0)
    weight = embedding_weight_of(model)
    weight_before = weight.detach().clone()
    epsilon, steps, alpha = 0.5, 4, 0.3
    adversary = build_adversary("pgd", weight, epsilon, steps, alpha, params=model.parameters())

    recorder = run_micro_batch(adversary, model, batch)

    # One adversarial forward per step, each after that step's ascent + projection.
    assert len(recorder.norms) == steps
    assert all(norm <= epsilon + 1e-6 for norm in recorder.norms)
    assert recorder.norms[0] == pytest.approx(alpha, rel=1e-5)  # first step is inside the ball
    assert recorder.norms[-1] == pytest.approx(epsilon, rel=1e-5)  # later ones get projected
    assert adversary.last_perturbation_norm == pytest.approx(recorder.norms[-1], rel=1e-5)
    assert torch.equal(weight, weight_before)


def test_pgd_final_grads_are_clean_plus_last_adversarial_pass() -> None:
    model = make_bert()
    reference_model = copy.deepcopy(model)
    epsilon, steps, alpha = 0.5, 3, 0.3
    adversary = build_adversary(
        "pgd", embedding_weight_of(model), epsilon, steps, alpha, params=model.parameters()
    )
    earlier_batch, batch = make_batch(1), make_batch(2)

    # An earlier micro-batch already accumulated into .grad (gradient accumulation).
    forward_backward(model, earlier_batch)
    recorder = run_micro_batch(adversary, model, batch)

    # Each step's direction comes from this micro-batch alone (not the accumulated .grad).
    expected_perturbations = reference_pgd_perturbations(reference_model, batch, epsilon, steps, alpha)
    for actual, expected in zip(recorder.perturbations, expected_perturbations, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)
    # Intermediate passes leave no trace: .grad = earlier + clean + the last adversarial pass.
    last_embedding = embedding_weight_of(reference_model).detach() + recorder.perturbations[-1]
    expected_grads = [
        earlier + clean + adversarial
        for earlier, clean, adversarial in zip(
            fresh_grads(reference_model, earlier_batch),
            fresh_grads(reference_model, batch),
            fresh_grads(reference_model, batch, last_embedding),
        )
    ]
    assert_grads_close(grads_of(model), expected_grads)
    assert torch.equal(embedding_weight_of(model), embedding_weight_of(reference_model))
