"""Sparse-row updates of the word embeddings: the same AdamW, without paying for the whole vocabulary every step.

A batch of 32 sentences touches a few hundred of MiniLM's 30,522 embedding rows, yet the dense path builds a
(vocab, hidden) gradient (47 MB) and fused AdamW rewrites every row each step. Here the word embedding returns a
sparse gradient (`nn.Embedding(sparse=True)`: the touched rows only, summed per row where read), and
`LazyEmbeddingAdamW` (torch's fused AdamW for every other parameter) updates only the touched rows:

- before a forward pass reads a row (a pre-hook on the embedding), the row catches up on the steps it was skipped,
  in closed form: there its gradient was 0, so its moments only decayed (m * beta1^k, v * beta2^k), decoupled
  weight decay multiplied it by (1 - lr_j * wd) each step, and it kept moving by the decaying momentum
  lr_j / bc1_j * m_j / (sqrt(v_j / bc2_j) + eps). The products come from the per-step lr history (prefix sums of
  log(1 - lr_j * wd)); the momentum sum depends on each element only through x = sqrt(v):
  sum_k w_k / (a_k * x + eps), a short series in eps / x with per-row coefficients (the exact sum over k for the
  few elements where eps is not small against a_k * x);
- at the optimiser step, each touched row takes exactly dense AdamW's step with this step's gradient.

The momentum term of a skipped step k decays like (beta1 / sqrt(beta2))^k (0.90 for the defaults), so the sum is
truncated after `horizon` steps where that factor is below 1e-12; the series keeps `SERIES_TERMS` terms where
eps / (a_k x) <= 1 / SERIES_MARGIN, a relative error below 1e-7 of the catch-up. Rows are caught up
("materialized") before anything reads the weights: evaluation, a saved model folder, a checkpoint.

The gradient clip (`clip_gradients`) counts the sparse gradient as the dense one (the same global norm), and FGM /
PGD read the touched rows' gradient (bert_ft.adversarial handles a sparse `.grad`).
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from torch import nn

from .config import TrainConfig

SERIES_TERMS = 8  # terms of the series in eps / x
SERIES_MARGIN = 8.0  # the series is used where a_k * x >= SERIES_MARGIN * eps: error <= (1/8)^8 = 6e-8 relative
TRUNCATION = 1e-12  # skipped steps whose momentum factor (beta1 / sqrt(beta2))^k falls below this are dropped
ROW_CHUNK = 2048  # rows caught up at once (materializing the whole vocabulary in float64 stays ~100 MB)


def sparse_updates_off_reason(config: TrainConfig, model: nn.Module, processes: int) -> str:
    """'' when sparse-row updates apply to this run (`config` a TrainConfig, `model` the head), else why not
    (printed once in the run's log)."""
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not config.sparse_embedding_updates:
        return "--sparse_embedding_updates false"
    if config.lora_r:
        return "--lora_r: the word embeddings are frozen under LoRA"
    if not (embedding.weight.requires_grad or config.unfreeze_at_epoch):
        return "the word embeddings are frozen"
    if processes > 1:
        return "several processes: DDP all-reduces dense gradient buckets, not sparse rows"
    if config.torch_compile:
        return "--torch_compile: the compiled step does not take sparse gradients"
    if type(embedding) is not nn.Embedding or embedding.max_norm is not None:
        return f"the input embeddings are a {type(embedding).__name__}, not a plain nn.Embedding"
    if output is not None and getattr(output, "weight", None) is embedding.weight:
        return "the word embeddings are tied to the output layer, which reads every row"
    return ""


def enable_sparse_gradients(embedding: nn.Embedding) -> None:
    """Make the word embedding return touched-row gradients: (tokens, dim) values at their row ids, duplicates and
    accumulated micro-batches summed per row when read (clip_gradients, the optimiser step, FGM/PGD coalesce)."""
    embedding.sparse = True


def clip_gradients(accelerator: Accelerator, parameters, max_norm: float) -> torch.Tensor:
    """`accelerator.clip_grad_norm_` that also counts a sparse (touched-row) gradient: the same global L2 norm as the
    dense gradient (untouched rows are zeros), and the same scale applied to every gradient."""
    params = [param for param in parameters if param.grad is not None]
    sparse = [param for param in params if param.grad.is_sparse]
    if not sparse:
        return accelerator.clip_grad_norm_(params, max_norm)
    accelerator.unscale_gradients()  # fp16: the loss scale out first, as Accelerate's clip does
    dense = [param for param in params if not param.grad.is_sparse]
    for param in sparse:
        param.grad = param.grad.coalesce()  # one value per touched row: its norm is the dense gradient's
    norms = [torch.nn.utils.get_total_norm([param.grad for param in dense])] if dense else []
    norms += [torch.linalg.vector_norm(param.grad._values()) for param in sparse]
    total = torch.linalg.vector_norm(torch.stack(norms))
    torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # clip_grads_with_norm_'s coefficient
    for param in sparse:
        param.grad._values().mul_(scale)  # in place: _values() is the gradient's own storage
    return total


def materialize(optimizer) -> None:
    """Catch every embedding row up to the current step (before evaluation, saving or a checkpoint reads the
    weights); nothing to do for any other optimizer. `optimizer` may be Accelerate's wrapper."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if isinstance(inner, LazyEmbeddingAdamW):
        inner.materialize()


class LazyEmbeddingAdamW(torch.optim.AdamW):
    """torch's AdamW (fused where available) for every parameter but the word embedding's weight, which gets the
    same AdamW arithmetic on its touched rows only (module docstring). The weight stays in its parameter group, so
    the lr schedule, the group table and Accelerate see the usual optimizer; its moments live in its `state` under
    AdamW's own names, and the lazy bookkeeping (each row's last step, the lr history) in the state dict's
    "lazy_embedding" entry, so checkpoints resume exactly. Constructing it switches `embedding` to sparse
    gradients and catches the rows a forward pass looks up up to the last step before it reads them."""

    def __init__(self, param_groups: list[dict], embedding: nn.Embedding, **kwargs) -> None:
        try:
            super().__init__(param_groups, **kwargs)
        except RuntimeError:  # older torch: fused kernels for CUDA only
            kwargs.pop("fused", None)
            super().__init__(param_groups, **kwargs)
        enable_sparse_gradients(embedding)
        embedding.register_forward_pre_hook(self._before_lookup, with_kwargs=True)
        sparse_weight = self.sparse_weight = embedding.weight
        if self.group["amsgrad"] or self.group["maximize"]:
            raise ValueError("LazyEmbeddingAdamW: amsgrad and maximize have no lazy form")
        beta1, beta2 = self.group["betas"]
        ratio = beta1 / math.sqrt(beta2)
        if not 0 < ratio < 1:
            raise ValueError(f"LazyEmbeddingAdamW: beta1 / sqrt(beta2) = {ratio} must be < 1 for the catch-up to end")
        self.horizon = math.ceil(math.log(TRUNCATION) / math.log(ratio))  # 264 skipped steps for (0.9, 0.999)
        self.steps = 0  # optimiser steps in which the embedding had a gradient (AdamW's `step` for it)
        device = sparse_weight.device  # the bookkeeping lives beside the weight (CPU or GPU)
        self.row_step = torch.zeros(sparse_weight.shape[0], dtype=torch.long, device=device)  # (vocab,) up to step
        # Per step j (index 0 unused): lr_j, L_j = sum_{i<=j} log|1 - lr_i * wd_i| and how many of those were < 0.
        self.lr_history = torch.zeros(64, dtype=torch.float64, device=device)
        self.log_decay = torch.zeros(64, dtype=torch.float64, device=device)
        self.negative_decays = torch.zeros(64, dtype=torch.float64, device=device)  # count of 1 - lr_i wd_i < 0

    @property
    def group(self) -> dict:
        """The parameter group of the embedding weight (looked up each time: load_state_dict replaces the dicts)."""
        return next(group for group in self.param_groups if any(param is self.sparse_weight for param in group["params"]))

    # --- the step -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        weight = self.sparse_weight
        grad = weight.grad
        weight.grad = None  # the dense AdamW skips a parameter without a gradient
        try:
            super().step()
        finally:
            weight.grad = grad
        if grad is not None:
            self._row_step(grad)
        return loss

    def _row_step(self, grad: torch.Tensor) -> None:
        group, weight = self.group, self.sparse_weight
        if not self.state[weight]:
            self.state[weight]["exp_avg"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
            self.state[weight]["exp_avg_sq"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
        step = self.steps + 1
        self.state[weight]["step"] = torch.tensor(float(step))  # AdamW's own counter (its load_state_dict reads it)
        lr, weight_decay, eps = float(group["lr"]), float(group["weight_decay"]), group["eps"]
        beta1, beta2 = group["betas"]
        self._record(step, lr, weight_decay)
        if grad.is_sparse:
            grad = grad.coalesce()
            rows, values = grad.indices()[0], grad.values()  # (n,), (n, hidden)
        else:  # the weight was also read densely (a tied head): every row is touched
            rows, values = torch.arange(weight.shape[0], device=weight.device), grad
        self._catch_up(rows, step - 1)
        state = self.state[weight]
        # Dense AdamW's arithmetic for this step, on the touched rows (torch.optim.adamw._single_tensor_adamw).
        param, exp_avg, exp_avg_sq = weight.data[rows], state["exp_avg"][rows], state["exp_avg_sq"][rows]
        values = values.to(param.dtype)
        param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(values, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(values, values, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        weight.data[rows], state["exp_avg"][rows], state["exp_avg_sq"][rows] = param, exp_avg, exp_avg_sq
        self.row_step[rows] = step
        self.steps = step

    def _record(self, step: int, lr: float, weight_decay: float) -> None:
        if step >= len(self.lr_history):
            grown = 2 * len(self.lr_history)
            self.lr_history = torch.cat([self.lr_history, self.lr_history.new_zeros(grown - len(self.lr_history))])
            self.log_decay = torch.cat([self.log_decay, self.log_decay.new_zeros(grown - len(self.log_decay))])
            self.negative_decays = torch.cat([self.negative_decays,
                                              self.negative_decays.new_zeros(grown - len(self.negative_decays))])
        self.lr_history[step] = lr
        factor = 1 - lr * weight_decay  # below 0 only for absurd learning rates (the run then diverges, as dense)
        log_factor = math.log1p(-lr * weight_decay) if factor > 0 else math.log(max(-factor, 1e-300))
        self.log_decay[step] = self.log_decay[step - 1] + log_factor  # device ops: no host sync
        self.negative_decays[step] = self.negative_decays[step - 1] + (factor < 0)

    def _decay(self, through: int, since: torch.Tensor) -> torch.Tensor:
        """prod_{i = since+1 .. through} (1 - lr_i * wd_i), float64, the shape of `since` (step indices)."""
        magnitude = torch.exp(self.log_decay[through] - self.log_decay[since])
        flips = self.negative_decays[through] - self.negative_decays[since]
        return torch.where(flips % 2 == 1, -magnitude, magnitude)

    # --- the catch-up ---------------------------------------------------------------------------------------
    def _before_lookup(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the embedding: the rows this batch reads, (batch, seq) ids, up to the last step."""
        ids = args[0] if args else kwargs.get("input")
        if self.steps and ids is not None and self.state[self.sparse_weight]:
            self._catch_up(torch.unique(ids), self.steps)

    @torch.no_grad()
    def materialize(self) -> None:
        """Bring every row up to the last step (the weights then equal dense AdamW's)."""
        state, through, weight = self.state[self.sparse_weight], self.steps, self.sparse_weight
        if not (through and state):
            return
        # Whole-matrix passes (no row gathers): rows never touched only decay, the others take the catch-up.
        behind = self.row_step < through  # (vocab,)
        moving = behind & ((state["exp_avg"] != 0).any(1) | (state["exp_avg_sq"] != 0).any(1))
        still = behind & ~moving
        decay = self._decay(through, self.row_step)  # (vocab,)
        weight.data.mul_(torch.where(still, decay, torch.ones_like(decay)).to(weight.dtype)[:, None])
        self.row_step[still] = through
        self._catch_up(moving.nonzero()[:, 0], through)

    @torch.no_grad()
    def _catch_up(self, rows: torch.Tensor, through: int) -> None:
        """Apply steps row_step+1 .. `through` with a zero gradient to `rows` (n,), in closed form."""
        rows = rows[self.row_step[rows] < through]
        for start in range(0, len(rows), ROW_CHUNK):
            self._catch_up_chunk(rows[start:start + ROW_CHUNK], through)

    def _catch_up_chunk(self, rows: torch.Tensor, through: int) -> None:
        group, weight = self.group, self.sparse_weight
        state = self.state[weight]
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        last, inverse = torch.unique(self.row_step[rows], return_inverse=True)  # (u,) distinct last steps, (n,)
        coefficients = self._coefficients(last, through, beta1, beta2)
        weights, scales, series, smallest_scale, param_decay = coefficients

        param = weight.data[rows].double()  # (n, hidden)
        exp_avg = state["exp_avg"][rows].double()
        exp_avg_sq = state["exp_avg_sq"][rows].double()
        root = exp_avg_sq.sqrt()  # x
        # sum_k w_k / (a_k x + eps) = (1/x) sum_n (-eps/x)^n S_n where eps <= a_k x / SERIES_MARGIN (Horner).
        ratio = eps / root  # inf where x == 0: those elements take the exact sum
        exact = root * smallest_scale[inverse, None] < SERIES_MARGIN * eps
        total = series[inverse, -1, None].expand_as(root).clone()
        for term in range(SERIES_TERMS - 2, -1, -1):
            total = series[inverse, term, None] - ratio * total
        momentum_sum = torch.where(exact, torch.zeros_like(total), total / root)
        where = (exact & (exp_avg != 0)).nonzero()  # (e, 2): row, column of elements eps is not small against
        for start in range(0, len(where), 4096):
            row, column = where[start:start + 4096].unbind(1)
            owner = inverse[row]
            x = root[row, column, None]  # (e, 1)
            momentum_sum[row, column] = (weights[owner] / (scales[owner] * x + eps)).sum(1)
        param = param * param_decay[inverse, None] - exp_avg * momentum_sum
        gap = (through - last).double()[inverse, None]  # skipped steps per row
        weight.data[rows] = param.to(weight.dtype)
        state["exp_avg"][rows] = (exp_avg * beta1 ** gap).to(weight.dtype)
        state["exp_avg_sq"][rows] = (exp_avg_sq * beta2 ** gap).to(weight.dtype)
        self.row_step[rows] = through

    def _coefficients(self, last: torch.Tensor, through: int, beta1: float, beta2: float):
        """Per distinct last step s (u,): skipped step j = s + k (k = 1..horizon, j <= through) contributes
        w_k * m_s / (a_k * sqrt(v_s) + eps) to the parameter's decrease, with (all float64, (u, horizon))
          w_k = lr_j / bc1_j * beta1^k * prod_{i=j+1..through} (1 - lr_i wd),   a_k = beta2^(k/2) / sqrt(bc2_j).
        Returns w, a, the series sums S_n = sum_k w_k / a_k^(n+1) (u, SERIES_TERMS), min_k a_k (u,), and the
        weight-decay product over all skipped steps (u,)."""
        offsets = torch.arange(1, self.horizon + 1, dtype=torch.long, device=last.device)  # (K,)
        steps = last[:, None] + offsets[None, :]  # (u, K)
        valid = steps <= through
        clamped = steps.clamp(max=through)
        k = offsets.double()[None, :]
        step_float = clamped.double()
        decay_after = self._decay(through, clamped)
        weights = self.lr_history[clamped] / (1 - beta1 ** step_float) * beta1 ** k * decay_after
        weights = torch.where(valid, weights, torch.zeros_like(weights))
        scales = beta2 ** (k / 2) / torch.sqrt(1 - beta2 ** step_float)
        inverse_scales = 1 / scales
        powers = torch.stack([inverse_scales ** (n + 1) for n in range(SERIES_TERMS)], dim=1)  # (u, N, K)
        series = (weights[:, None, :] * powers).sum(-1)
        smallest_scale = torch.where(valid, scales, torch.full_like(scales, math.inf)).min(1).values
        param_decay = self._decay(through, last)
        return weights, scales, series, smallest_scale, param_decay

    # --- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["lazy_embedding"] = {"steps": self.steps, "row_step": self.row_step.clone(),
                                   "lr_history": self.lr_history[:self.steps + 1].clone(),
                                   "log_decay": self.log_decay[:self.steps + 1].clone(),
                                   "negative_decays": self.negative_decays[:self.steps + 1].clone()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        lazy = state_dict.pop("lazy_embedding", None)
        super().load_state_dict(state_dict)
        if lazy is None:  # written by dense AdamW (--sparse_embedding_updates false): every row is up to date
            state = self.state[self.sparse_weight]
            steps = int(state["step"]) if "step" in state else 0
            lazy = {"steps": steps, "row_step": torch.full_like(self.row_step, steps),
                    "lr_history": torch.zeros(steps + 1, dtype=torch.float64),  # only differences after `steps`
                    "log_decay": torch.zeros(steps + 1, dtype=torch.float64),  # are ever read
                    "negative_decays": torch.zeros(steps + 1, dtype=torch.float64)}
        self.steps = int(lazy["steps"])
        device = self.sparse_weight.device
        self.row_step = lazy["row_step"].to(device=device, dtype=torch.long).clone()
        size = max(64, 2 * (self.steps + 1))
        self.lr_history = torch.zeros(size, dtype=torch.float64, device=device)
        self.log_decay = torch.zeros(size, dtype=torch.float64, device=device)
        self.lr_history[:self.steps + 1] = lazy["lr_history"].to(device=device, dtype=torch.float64)
        self.log_decay[:self.steps + 1] = lazy["log_decay"].to(device=device, dtype=torch.float64)
        self.negative_decays = torch.zeros(size, dtype=torch.float64, device=device)
        self.negative_decays[:self.steps + 1] = lazy["negative_decays"].to(device=device, dtype=torch.float64)
