"""Adversarial training on the word-embedding matrix: FGM (Miyato et al., 2017) and PGD (Madry et al., 2018).

Both adversaries push the word-embedding weight (vocab, hidden) along the gradient of the
current micro-batch's loss, run one more forward+backward whose gradients ADD to the clean ones,
then put the weight back bit-exactly. The training loop drives them like this::

    adversary = build_adversary(kind, model.get_input_embeddings().weight, epsilon, steps, alpha)
    # inside accelerator.accumulate(model):
    adversary.before_backward()
    with accelerator.no_sync(model):
        accelerator.backward(model(**batch)["loss"])
    adversary.adversarial_backward(lambda: accelerator.backward(model(**batch)["loss"]))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

ADVERSARY_KINDS = ("none", "fgm", "pgd")

# Runs one forward+backward of the current micro-batch; its grads accumulate into .grad.
ForwardBackward = Callable[[], object]


def _l2_norm(tensor: torch.Tensor) -> float:
    """Frobenius norm of the whole tensor, accumulated in fp32 so fp16/bf16 inputs do not overflow. A sparse
    gradient (--sparse_embedding_updates: the touched rows) has the norm of its dense form."""
    if tensor.is_sparse:
        tensor = tensor.coalesce()._values()
    return float(torch.linalg.vector_norm(tensor, dtype=torch.float32))


def _is_usable_norm(norm: float) -> bool:
    """A zero norm gives no attack direction; inf/nan means an fp16 overflow (GradScaler skips that step)."""
    return norm > 0.0 and math.isfinite(norm)


class EmbeddingAdversary:
    """Shared protocol: snapshot the embedding grad before the clean backward, attack after it."""

    kind: str = ""

    def __init__(self, embedding_weight: nn.Parameter, epsilon: float) -> None:
        if not (math.isfinite(epsilon) and epsilon >= 0.0):
            raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon}")
        self.embedding_weight = embedding_weight
        self.epsilon = float(epsilon)
        # L2 norm of the perturbation used in the last adversarial forward (0.0 until one ran).
        self.last_perturbation_norm: float = 0.0
        self._grad_snapshot: torch.Tensor | None = None
        self._snapshot_taken = False

    def before_backward(self) -> None:
        """Remember the embedding grad accumulated so far (earlier micro-batches), before the clean backward."""
        grad = self.embedding_weight.grad
        # Clone only when there is a grad: the first micro-batch after zero_grad(set_to_none=True)
        # then costs no (vocab, hidden) copy.
        self._grad_snapshot = None if grad is None else grad.detach().clone()
        self._snapshot_taken = True

    def adversarial_backward(self, forward_backward: ForwardBackward) -> bool:
        """Perturb the embeddings, call ``forward_backward``, restore them; False if the pass was skipped."""
        raise NotImplementedError

    def _pop_micro_batch_grad(self) -> torch.Tensor | None:
        """Embedding grad of the current micro-batch only, (vocab, hidden); None if the embedding has no grad.

        Under gradient accumulation .grad = earlier micro-batches + this one, so subtract the snapshot.
        Without a snapshot the returned tensor aliases .grad: use it before the next backward.
        """
        if not self._snapshot_taken:
            raise RuntimeError("call before_backward() before the clean backward of every micro-batch")
        snapshot = self._grad_snapshot
        self._grad_snapshot, self._snapshot_taken = None, False
        grad = self.embedding_weight.grad
        if grad is None:
            return None
        if snapshot is None:
            return grad.detach()
        if grad.is_sparse:  # touched rows only: small, and the difference is summed per row
            return (grad.detach() - snapshot).coalesce()
        # In place in the snapshot's memory to avoid a second (vocab, hidden) buffer;
        # -s + g is bit-identical to g - s in IEEE arithmetic.
        return snapshot.neg_().add_(grad.detach())


class FGM(EmbeddingAdversary):
    """Fast Gradient Method: one step r = epsilon * g / ||g||_2 on the word embeddings."""

    kind = "fgm"

    def adversarial_backward(self, forward_backward: ForwardBackward) -> bool:
        """Add r to the embeddings, run ``forward_backward`` (grads accumulate), restore the weight exactly."""
        micro_batch_grad = self._pop_micro_batch_grad()
        if micro_batch_grad is None:
            return False
        grad_norm = _l2_norm(micro_batch_grad)
        if not _is_usable_norm(grad_norm):
            return False

        weight = self.embedding_weight
        with torch.no_grad():
            # Under an fp16 GradScaler .grad (and the snapshot) hold S * g for the same scale S within an
            # accumulation cycle; g / ||g|| is invariant to S, so no unscaling is needed.
            perturbation = micro_batch_grad * (self.epsilon / grad_norm)  # (vocab, hidden)
            # Restore from a copy, not by subtracting r: (w + r) - r is not bit-exact in floating point.
            weight_backup = weight.detach().clone()  # (vocab, hidden)
            weight.add_(perturbation)
        self.last_perturbation_norm = _l2_norm(perturbation)
        del perturbation, micro_batch_grad  # free (vocab, hidden) buffers before the extra forward

        try:
            forward_backward()
        finally:
            with torch.no_grad():
                weight.copy_(weight_backup)
        return True


class PGD(EmbeddingAdversary):
    """Projected Gradient Descent, the K-step L2 variant common for BERT fine-tuning.

    Each of ``steps`` ascent steps adds alpha * g_t / ||g_t|| and projects the total perturbation
    into the L2 ball of radius epsilon. Steps before the last run a forward+backward only to get
    g_t, so they zero and later restore the grads of ``params``: pass every trainable parameter of
    the model, otherwise the params left out also keep the grads of those intermediate passes.
    """

    kind = "pgd"

    def __init__(
        self,
        embedding_weight: nn.Parameter,
        epsilon: float = 1.0,
        steps: int = 3,
        alpha: float = 0.3,
        params: Iterable[nn.Parameter] | None = None,
    ) -> None:
        super().__init__(embedding_weight, epsilon)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not (math.isfinite(alpha) and alpha > 0.0):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
        self.steps = int(steps)
        self.alpha = float(alpha)
        candidates = [embedding_weight] if params is None else [embedding_weight, *params]
        # The embedding grad is zeroed between steps, so it must always be backed up; dedupe by
        # identity because tied weights can appear twice.
        unique_params: dict[int, nn.Parameter] = {}
        for param in candidates:
            if param.requires_grad:
                unique_params.setdefault(id(param), param)
        self.params = list(unique_params.values())

    def adversarial_backward(self, forward_backward: ForwardBackward) -> bool:
        """Run the K-step attack; final grads = clean (accumulated) + the last adversarial pass."""
        micro_batch_grad = self._pop_micro_batch_grad()
        if micro_batch_grad is None:
            return False
        grad_norm = _l2_norm(micro_batch_grad)
        if not _is_usable_norm(grad_norm):
            return False

        weight = self.embedding_weight
        with torch.no_grad():
            weight_backup = weight.detach().clone()  # (vocab, hidden)
            # Earlier micro-batches + this clean pass: the last adversarial pass adds onto these.
            grad_backups = [
                None if param.grad is None else param.grad.detach().clone() for param in self.params
            ]

        try:
            for step in range(self.steps):
                # An intermediate pass can overflow in fp16 or give a zero grad: then keep the
                # current perturbation rather than writing inf/nan into the weights.
                if _is_usable_norm(grad_norm):
                    self._ascend(micro_batch_grad, grad_norm, weight_backup)
                if step < self.steps - 1:
                    with torch.no_grad():
                        # zero_() rather than None keeps DDP's gradient bucket views intact.
                        for param in self.params:
                            if param.grad is not None:
                                param.grad.zero_()
                    forward_backward()
                    # The grads were zeroed, so .grad is g_t of this micro-batch's adversarial pass only.
                    micro_batch_grad = weight.grad
                    grad_norm = 0.0 if micro_batch_grad is None else _l2_norm(micro_batch_grad)
                else:
                    self._restore_grads(grad_backups)
                    forward_backward()
        finally:
            with torch.no_grad():
                weight.copy_(weight_backup)
        return True

    def _ascend(self, grad: torch.Tensor, grad_norm: float, weight_backup: torch.Tensor) -> None:
        """weight += alpha * g / ||g||, then project (weight - backup) into the epsilon L2 ball."""
        weight = self.embedding_weight
        with torch.no_grad():
            weight.add_(grad, alpha=self.alpha / grad_norm)
            perturbation = weight - weight_backup  # (vocab, hidden)
            perturbation_norm = _l2_norm(perturbation)
            if perturbation_norm > self.epsilon:
                perturbation.mul_(self.epsilon / perturbation_norm)
                weight.copy_(weight_backup + perturbation)
                perturbation_norm = self.epsilon  # exact up to float rounding of backup + perturbation
        self.last_perturbation_norm = perturbation_norm

    def _restore_grads(self, grad_backups: list[torch.Tensor | None]) -> None:
        """Put the clean (accumulated) grads back in place, so the last adversarial pass adds onto them."""
        with torch.no_grad():
            for param, grad_backup in zip(self.params, grad_backups):
                if grad_backup is None:
                    param.grad = None
                elif param.grad is None or grad_backup.is_sparse:  # a sparse grad's rows may differ: replace it
                    param.grad = grad_backup
                else:
                    param.grad.copy_(grad_backup)


def build_adversary(
    kind: str,
    embedding_weight: nn.Parameter,
    epsilon: float = 1.0,
    steps: int = 3,
    alpha: float = 0.3,
    params: Iterable[nn.Parameter] | None = None,
) -> EmbeddingAdversary | None:
    """Return the adversary for ``kind`` ("none" -> None, "fgm", "pgd"); steps/alpha/params are PGD-only."""
    if kind == "none":
        return None
    if kind == "fgm":
        return FGM(embedding_weight, epsilon)
    if kind == "pgd":
        return PGD(embedding_weight, epsilon, steps, alpha, params)
    raise ValueError(f"unknown adversarial training kind {kind!r}; expected one of {ADVERSARY_KINDS}")
