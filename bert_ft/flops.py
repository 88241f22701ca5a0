"""Model FLOPs of an encoder, from its config: per real token, per attention pair, and the MFU ratio.

Conventions (docs/benchmarks.md, "Model FLOPs and MFU"):
  - matrix products only, 2 FLOPs per multiply-add; the word-embedding lookup, position/type embeddings,
    LayerNorm, activations, softmax, dropout and biases count 0;
  - dense products every real token passes through: Q, K, V, the attention output, the feed-forward (ModernBERT's
    Wi projects to 2 x intermediate: value and gate), the embedding projection where the family has one (ELECTRA
    and DeBERTa when embedding_size != hidden_size, ALBERT always: its embedding_hidden_mapping_in), DeBERTa's
    convolution layer where conv_kernel_size > 0; ALBERT's shared layers run num_hidden_layers x inner_group_num
    times and are counted that many times;
  - attention scores (Q K^T) and the weighted sum (P V) per (query, key) pair of one example, as per-example
    (packed block) attention computes them: an example of n real tokens has n^2 pairs in a global layer and the
    pairs with |i - j| <= sliding_window in a ModernBERT local layer; padding and the other examples of a packed
    row are not counted (they are the waste MFU shows);
  - DeBERTa (v2/v3): the content->position and position->content terms are two more products per pair; the
    projections of the relative-position table (2 x position_buckets rows, through the query and key projections)
    run once per forward call. transformers computes c2p/p2c against the whole table and gathers (8 x span x
    hidden per token and layer); that surplus is implementation overhead and not counted;
  - a sentence classifier's [CLS]-only top layer (bert_ft.heads.read_first_token_only) is counted as what it
    computes: keys and values of every token, the rest for [CLS] alone (first_token_top_layer);
  - the task head is not counted (a token classifier adds 2 x hidden x labels per token: under 0.1 % for MiniLM
    with 9 labels);
  - training = forward + backward = 3 x forward (the backward computes the gradient of the input and of the weight
    of every product), whatever is frozen; each FGM/PGD extra forward+backward pass counts as one more training
    pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable

import torch

TRAINING_FACTOR = 3  # forward + backward (input and weight gradients): 3 x the forward's products

# Dense peak of common GPUs in TFLOPS (vendor spec sheets, without sparsity) by precision: the divisor of MFU.
# fp32 is the tensor-core TF32 figure where torch lets matmuls use TF32, else the plain fp32 one (see peak_tflops).
GPU_PEAK_TFLOPS: dict[str, tuple[float, float, float] | None] = {  # name fragment -> (bf16/fp16, tf32, fp32)
    "H200": (989.4, 494.7, 66.9), "H100 SXM": (989.4, 494.7, 66.9), "H100 80GB HBM3": (989.4, 494.7, 66.9),
    "H100 PCIe": (756.0, 378.0, 51.2), "H100": (756.0, 378.0, 51.2), "A100": (312.0, 156.0, 19.5),
    "L40S": (362.1, 183.0, 91.6), "L4": (121.0, 60.0, 30.3), "A10G": None, "A10": (125.0, 62.5, 31.2),
}  # None: no figure we trust (the A10G's clocks differ from the A10's): give --peak_tflops


@dataclass(frozen=True)
class EncoderFlops:
    """Forward FLOPs of one encoder, split by what they grow with (see the module docstring for what counts)."""

    model_type: str
    per_token: float  # dense products of one real token through the whole encoder
    per_pair: float  # one (query, key) pair of an example, summed over the global-attention layers
    local_per_pair: float  # the same over the sliding-window layers (ModernBERT), which see |i - j| <= window only
    window: int | None  # half-window of the local layers (None: there are none)
    per_call: float  # once per forward call whatever it holds (DeBERTa's relative-position table projections)
    per_example: float = 0.0  # once per example (a [CLS]-only top layer's query, output and feed-forward)
    first_query_per_pair: float = 0.0  # per key of one query per example (that layer's [CLS] row of attention)

    def pairs(self, length: int) -> tuple[int, int]:
        """(pairs a global layer computes, pairs a local layer computes) for one example of `length` tokens."""
        if self.window is None:
            return length * length, 0
        reach = min(self.window, length - 1)  # |i - j| <= window: the diagonal plus 2 x each off-diagonal band
        return length * length, length + 2 * (reach * length - reach * (reach + 1) // 2)

    def forward(self, lengths: Iterable[int], calls: int = 1) -> float:
        """Forward FLOPs of `calls` forward passes over examples of these real lengths (all passes together)."""
        total = self.per_call * calls
        for length in lengths:
            full, local = self.pairs(int(length))
            total += self.per_token * length + self.per_pair * full + self.local_per_pair * local + \
                self.per_example + self.first_query_per_pair * length
        return total

    def training(self, lengths: Iterable[int], calls: int = 1, passes: int = 1) -> float:
        """Training FLOPs (3 x forward) of `calls` micro-batches over these examples, each trained `passes` times
        (1, or 1 + the FGM/PGD passes)."""
        return TRAINING_FACTOR * passes * self.forward(lengths, calls)

    def per_real_token(self, length: float, training: bool = True) -> float:
        """FLOPs of one token of an example of `length` tokens (per_call left out): the figure for a table."""
        whole = self.forward([round(length)], calls=0) / max(round(length), 1)
        return TRAINING_FACTOR * whole if training else whole


def _get(config: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` that `config` has (DistilBERT names its sizes dim, hidden_dim, n_layers, n_heads)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def encoder_sizes(config: Any) -> tuple[int, int, int, int, int]:
    """(hidden, intermediate, layers as run, heads, embedding size) of a config; ValueError naming the fields a
    config lacks (a custom architecture that does not use BERT's names)."""
    names = {"hidden": ("hidden_size", "dim"), "intermediate": ("intermediate_size", "hidden_dim"),
             "layers": ("num_hidden_layers", "n_layers"), "heads": ("num_attention_heads", "n_heads")}
    values = {key: _get(config, *fields) for key, fields in names.items()}
    missing = [" or ".join(names[key]) for key, value in values.items() if not isinstance(value, int)]
    if missing:
        raise ValueError(f"{getattr(config, 'model_type', 'this model')}: its config has no {', '.join(missing)}")
    layers = values["layers"]
    if getattr(config, "model_type", "") == "albert":  # one shared group run num_hidden_layers times, each with
        layers *= int(getattr(config, "inner_group_num", 1) or 1)  # inner_group_num layers
    return (values["hidden"], values["intermediate"], layers, values["heads"],
            int(_get(config, "embedding_size", default=values["hidden"])))


def first_token_top_layer(flop_model: EncoderFlops, config: Any) -> EncoderFlops:
    """The count when a sentence classifier's top layer computes only each example's first token
    (`bert_ft.heads.read_first_token_only`, BERT-layout layers): keys and values of every token, the query,
    attention output and feed-forward of [CLS] alone, one query row of attention. What nothing reads is not model
    work, so it is not counted."""
    hidden, inner, _, _, _ = encoder_sizes(config)
    layer = 2 * 4 * hidden * hidden + 2 * 2 * hidden * inner  # the top layer's products per token
    keys_values = 2 * 2 * hidden * hidden
    pair = 2 * 2 * hidden
    return replace(flop_model, per_token=flop_model.per_token - layer + keys_values,
                   per_example=flop_model.per_example + layer - keys_values, per_pair=flop_model.per_pair - pair,
                   first_query_per_pair=flop_model.first_query_per_pair + pair)


def relative_terms(config: Any) -> tuple[int, int]:
    """(DeBERTa's relative-position terms among c2p and p2c, the table's half-size `span`: position_buckets, else
    max_relative_positions, else max_position_embeddings); (0, 0) for every other family."""
    if getattr(config, "model_type", "") not in ("deberta-v2", "deberta") or \
            not getattr(config, "relative_attention", False):
        return 0, 0
    kinds = len([kind for kind in (getattr(config, "pos_att_type", None) or []) if kind in ("c2p", "p2c")])
    buckets = int(getattr(config, "position_buckets", -1) or -1)
    span = buckets if buckets > 0 else int(getattr(config, "max_relative_positions", -1) or -1)
    return kinds, span if span >= 1 else int(config.max_position_embeddings)


def known_flops(config: Any) -> EncoderFlops | None:
    """`encoder_flops(config)`, or None for a config without BERT's size fields (its run reports no FLOPs)."""
    try:
        return encoder_flops(config)
    except ValueError:
        return None


def encoder_flops(config: Any) -> EncoderFlops:
    """The FLOP model of an encoder from its transformers config (BERT, RoBERTa, XLM-R, ELECTRA, ALBERT,
    DistilBERT, DeBERTa v2/v3, ModernBERT; any other BERT-shaped config by the same sizes)."""
    model_type = getattr(config, "model_type", "")
    hidden, inner, layers, _, embedding = encoder_sizes(config)
    feed_forward = 2 * hidden * inner * (3 if model_type == "modernbert" else 2)  # ModernBERT: Wi -> 2 x inner
    per_layer = 2 * 4 * hidden * hidden + feed_forward  # Q, K, V, attention output (4 h x h) + feed-forward
    per_token = layers * per_layer
    if model_type == "albert" or embedding != hidden:  # embedding -> hidden projection (ALBERT: always there)
        per_token += 2 * embedding * hidden
    pair = 2 * 2 * hidden  # scores q.k and the weighted sum p.v, over all heads (heads x head_dim = hidden)
    window, global_layers, local_layers = None, layers, 0
    kinds, span = relative_terms(config)
    kernel = int(getattr(config, "conv_kernel_size", 0) or 0) if model_type in ("deberta-v2", "deberta") else 0
    if kernel > 0:  # DeBERTa's first-layer ConvLayer: a width-`kernel` convolution hidden -> hidden, in groups
        per_token += 2 * kernel * hidden * hidden // int(getattr(config, "conv_groups", 1) or 1)
    pair += 2 * hidden * kinds  # each DeBERTa term: one more q.k_pos or k.q_pos product per pair
    per_call = layers * kinds * 2 * (2 * span) * hidden * hidden  # the table through the key / query projection
    if model_type == "modernbert":
        layer_types = list(getattr(config, "layer_types", None) or [])
        local_layers = sum(kind == "sliding_attention" for kind in layer_types)
        global_layers = layers - local_layers
        window = int(config.sliding_window) if local_layers else None
    return EncoderFlops(model_type, float(per_token), float(global_layers * pair), float(local_layers * pair),
                        window, float(per_call))


@dataclass(frozen=True)
class Product:
    """One matrix product shape of a training step: `batch` products (m x k) @ (k x n), `count` times a step."""

    name: str
    batch: int
    m: int
    k: int
    n: int
    count: int
    transposed: str = ""  # "left" / "right": that operand is a transposed view, as autograd passes it to the GEMM

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.k * self.n * self.count


def training_products(config: Any, tokens: int, examples: int) -> list[Product]:
    """The products of one training step (forward, input gradient, weight gradient) of a micro-batch of `tokens`
    real tokens in `examples` examples of equal length, at the encoder's own shapes: what benchmarks/gemm_bound.py
    times. Their FLOPs add up to `encoder_flops(config).training` of that batch (one call), but for ModernBERT's
    local layers, timed as full products (the same count when the examples fit the window)."""
    model_type = getattr(config, "model_type", "")
    hidden, inner, layers, heads, embedding = encoder_sizes(config)
    length, head_dim = max(round(tokens / max(examples, 1)), 1), hidden // heads
    kinds, span = relative_terms(config)
    kernel = int(getattr(config, "conv_kernel_size", 0) or 0) if model_type in ("deberta-v2", "deberta") else 0
    # (name, rows, in, out, times a step) of each nn.Linear-like product
    dense = [("QKV", tokens, hidden, 3 * hidden, layers), ("attention output", tokens, hidden, hidden, layers),
             ("feed-forward in", tokens, hidden, inner * (2 if model_type == "modernbert" else 1), layers),
             ("feed-forward out", tokens, inner, hidden, layers)]
    if model_type == "albert" or embedding != hidden:
        dense.append(("embedding projection", tokens, embedding, hidden, 1))
    if kernel > 0:  # timed as the im2col product it equals in FLOPs
        groups = int(getattr(config, "conv_groups", 1) or 1)
        dense.append(("convolution", tokens, kernel * hidden // groups, hidden, 1))
    if kinds:  # the (2 span, hidden) relative-position table through the key / query projections, once a call
        dense.append(("relative-position table projections", 2 * span, hidden, hidden, layers * kinds))
    products = []
    for name, rows, fan_in, fan_out, count in dense:  # nn.Linear: W (out, in), y (rows, out) = x (rows, in) @ W^T
        products += [Product(f"{name} forward", 1, rows, fan_in, fan_out, count, "right"),
                     Product(f"{name} input gradient", 1, rows, fan_out, fan_in, count),  # dx = dy @ W
                     Product(f"{name} weight gradient", 1, fan_out, rows, fan_in, count, "left")]  # dW = dy^T @ x
    per_example = examples * heads
    attention_terms = 1 + kinds
    # scores S = Q K^T (n, d) @ (d, n) and their gradients dQ = dS K, dK = dS^T Q (n, n) @ (n, d), as many times
    # as there are score terms (DeBERTa: + c2p, p2c); weighted sum O = P V (n, n) @ (n, d), dP = dO V^T
    # (n, d) @ (d, n), dV = P^T dO (n, n) @ (n, d)
    products += [Product("attention scores forward", per_example, length, head_dim, length, layers * attention_terms,
                         "right"),
                 Product("attention scores gradients", per_example, length, length, head_dim,
                         2 * layers * attention_terms),
                 Product("attention weighted sum forward and dV", per_example, length, length, head_dim, 2 * layers),
                 Product("attention weighted sum dP", per_example, length, head_dim, length, layers)]
    return products


def passes_per_step(adversarial: str, adv_steps: int) -> int:
    """Forward+backward passes per micro-batch: 1, FGM 2, PGD 1 + its steps (bert_ft.adversarial)."""
    return {"fgm": 2, "pgd": 1 + adv_steps}.get(adversarial, 1)


def batches_training_flops(flop_model: EncoderFlops, lengths: list[int], batches: Iterable[Iterable[int]],
                           passes: int = 1) -> float:
    """Training FLOPs of these batches of feature indices (`lengths[i]`: feature i's real tokens), one forward
    call per batch."""
    return sum(flop_model.training([lengths[index] for index in batch], 1, passes) for batch in batches)


def peak_tflops(device: torch.device, precision: str, setting: float | None = None) -> tuple[float, str] | None:
    """(peak TFLOPS the run's products could reach, where the figure comes from), or None when unknown: the
    --peak_tflops setting when given, else a known GPU's dense peak for the run's precision (GPU_PEAK_TFLOPS).
    CPUs have no table entry: their bound is measured (benchmarks/gemm_bound.py), not looked up."""
    if setting:
        return float(setting), "--peak_tflops"
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    entry = next((values for key, values in GPU_PEAK_TFLOPS.items() if key in name), None)
    if entry is None:
        return None
    if precision in ("bf16", "fp16"):
        return entry[0], f"{name} dense {precision} peak"
    if torch.get_float32_matmul_precision() != "highest":  # fp32 matmuls may run on TF32 tensor cores
        return entry[1], f"{name} dense TF32 peak"
    return entry[2], f"{name} fp32 peak"


def training_metrics(flops: float | None, real_tokens: int, seconds: float, peak: tuple[float, str] | None,
                     devices: int = 1) -> dict:
    """The metrics.json fields: model FLOPs per real token (training, a mean over the tokens trained), the
    achieved rate over real tokens, and the MFU ratio where a peak is known (per device: x `devices` processes).
    `flops` None (an architecture without BERT's size fields): the fields are null, no MFU."""
    if flops is None:
        return dict.fromkeys(("train_model_flops", "train_model_flops_per_token", "train_model_gflops_per_second"))
    rate = flops / max(seconds, 1e-9)
    metrics = {"train_model_flops": flops,
               "train_model_flops_per_token": round(flops / real_tokens) if real_tokens else None,
               "train_model_gflops_per_second": significant(rate / 1e9)}
    if peak is not None:
        metrics["train_mfu"] = significant(rate / (peak[0] * 1e12 * devices))
        metrics["mfu_peak_tflops"] = peak[0]
        metrics["mfu_peak_source"] = peak[1]
    return metrics


def significant(value: float, digits: int = 5) -> float:
    """`value` to `digits` significant digits (tiny test runs and large GPU runs alike keep their precision)."""
    return float(f"{value:.{digits}g}")

