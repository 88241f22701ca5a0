"""CPU training speed that changes no expected value of a step: dropout masks drawn in bulk (the same Bernoulli
masks in distribution, other draws), an allocator that keeps large freed blocks for reuse, and a smaller oneDNN
kernel cache (memory). A training run applies them in one place, `apply_cpu_speedups` (called by
`bert_ft.training_setup.build_training`).

Measured on the development VM (2 cores, MiniLM, 32 CoNLL-2003 sentences per packed step, bf16; README "Measured
results"): torch's CPU dropout draws its mask one element at a time (`bernoulli_`, about 4.8 ns per element), which
was about 28 ms of a 160 ms step; and glibc hands every block above its mmap threshold (at most 32 MiB, so always
the 47 MB dense gradient of the word embeddings) back to the kernel on free, so each step page-faulted about
16,000 fresh pages in again (about 10 ms).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:  # transformers with the attention registry (>= 4.48); without it bulk dropout covers nn.Dropout layers only
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError:  # pragma: no cover - depends on the installed transformers
    AttentionInterface = AttentionMaskInterface = sdpa_attention_forward = sdpa_mask = None

# oneDNN (torch's bf16 matmuls on CPU) caches a compiled kernel per operand shape, 1024 by default. Packed rows
# are as wide as each batch's longest example, so rows x width takes hundreds of values and the cache held about
# 400 MB (MiniLM, NER, bf16: peak RSS 1,857 MB against 1,501 MB at 64, 1,445 MB at 16; the same speed). oneDNN reads
# this when it first compiles a kernel, so it is set on import, before any training; an explicit setting wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

ATTENTION_NAME = "bert_ft_bulk_dropout"  # the transformers attention implementation registered below
_BITS = 16  # random bits per mask element: the drop probability is exact to 1/65536


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A bool mask of `shape`, each element True (kept) with probability 1 - p (p rounded to a multiple of 1/65536:
    0.1 becomes 0.100006), independently.

    16 random bits per element come from one call of numpy's PCG64 (about 0.8 ns per element here, against 4.8 ns
    for torch's bernoulli_). Its seed is drawn from torch's global generator, so `torch.manual_seed`, Accelerate's
    `set_seed` and a restored RNG state (a resumed run) fix these masks exactly as they fix torch's own.
    """
    count = math.prod(shape)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    words = np.random.PCG64(seed).random_raw((count + 3) // 4)  # uint64, every bit uniform: 4 x 16 bits each
    bits = torch.from_numpy(words.view(np.int16)[:count])  # uniform over [-32768, 32767]
    return (bits >= -2 ** (_BITS - 1) + round(p * 2**_BITS)).view(shape)


def _bulk_capable(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def bulk_dropout(tensor: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout` with the mask from `keep_mask` on CPU: kept elements scaled by 1 / (1 - p), the rest zero; the
    gradient is masked and scaled the same way. Elsewhere (GPU, inside torch.compile, eval, p 0 or 1) it is
    `F.dropout` itself."""
    if not training or p <= 0.0 or p >= 1.0 or not _bulk_capable(tensor):
        return F.dropout(tensor, p, training)
    # mul by a bool tensor saves only the mask for backward (1 byte per element, as torch's dropout does).
    return tensor.mul(keep_mask(tensor.shape, p)).mul_(1.0 / (1.0 - p))


class BulkDropout(nn.Dropout):
    """nn.Dropout whose CPU masks come from `keep_mask`; `use_bulk_dropout` swaps it in for a model's dropouts."""

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return F.dropout(tensor, self.p, self.training, inplace=True)
        return bulk_dropout(tensor, self.p, self.training)


def bulk_dropout_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs):
    """transformers' SDPA attention, except in CPU training with attention dropout: there SDPA runs its math path
    and draws the dropout mask with bernoulli_, so this computes the same math (scores, additive or boolean mask,
    soft-max, dropout, weighted sum) with the mask from `keep_mask`. query/key/value: (rows, heads, seq, head_dim);
    returns ((rows, seq, heads, head_dim), None) as every transformers attention function does."""
    if (not module.training or dropout <= 0.0 or not _bulk_capable(query) or is_causal
            or getattr(module, "is_causal", False) or key.size(1) != query.size(1)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (rows, heads, seq, seq)
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.size(-2)]
        if attention_mask.dtype == torch.bool:  # sdpa's mask format: True = attend
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:  # additive 0 / finfo.min (packed rows' block-diagonal mask is float32, so the soft-max runs in fp32)
            scores = scores + attention_mask
    probabilities = bulk_dropout(torch.softmax(scores, dim=-1), dropout).to(value.dtype)
    return torch.matmul(probabilities, value).transpose(1, 2).contiguous(), None


def _register_attention() -> bool:
    if AttentionInterface is None:  # pragma: no cover - transformers without the attention registry
        return False
    AttentionInterface.register(ATTENTION_NAME, bulk_dropout_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # padded batches get exactly sdpa's masks
    return True


def use_bulk_dropout(model: nn.Module) -> list[str]:
    """Swap every nn.Dropout of `model` (encoder and head) for BulkDropout, and its SDPA attention for
    `bulk_dropout_attention` where the model routes attention through transformers' registry. Weights, state_dict
    and saved folders are unchanged (a dropout has no state, the attention choice is not saved); evaluation runs
    exactly as before. Returns what was switched, for the log."""
    switched = []
    dropouts = [module for module in model.modules() if type(module) is nn.Dropout]
    for module in dropouts:
        module.__class__ = BulkDropout
    if dropouts:
        switched.append(f"{len(dropouts)} dropout layers")
    for sub in model.modules():
        config = getattr(sub, "config", None)
        if (hasattr(sub, "set_attn_implementation") and getattr(config, "_attn_implementation", None) == "sdpa"
                and _register_attention()):
            try:
                sub.set_attn_implementation(ATTENTION_NAME)
            except (ValueError, ImportError):  # a model whose attention cannot be chosen at run time
                continue
            if config._attn_implementation == ATTENTION_NAME:
                switched.append("attention dropout")
    return switched


def reuse_freed_memory() -> bool:
    """Let glibc keep large freed blocks (up to 1 GiB) in the heap instead of returning them to the kernel, so the
    next step reuses them without page faults (what PyTorch's CPU tuning guides get from jemalloc/tcmalloc). Peak
    memory is unchanged; memory freed by training stays with the process until it exits. Linux with glibc only;
    returns whether it took effect."""
    if not sys.platform.startswith("linux") or os.environ.get("BERT_FT_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries: leave the allocator alone
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def apply_cpu_speedups(model: nn.Module, config: Any, device: torch.device, log=print) -> list[str]:
    """Every CPU speed-up of a training run, applied here and only here (set-up calls it once, after building the
    model); none changes what a step computes in expectation:
      - the allocator keeps large freed blocks for reuse (`reuse_freed_memory`; BERT_FT_KEEP_FREED_MEMORY=0 turns
        it off);
      - dropout masks are drawn in bulk (`use_bulk_dropout`), with --bulk_dropout (the default) and without
        --torch_compile.
    Two speed-ups are not switched here, and why: the oneDNN kernel-cache cap is set when this module is imported
    (oneDNN reads it at its first kernel, see above), and a sentence classifier's [CLS]-only top layer
    (`bert_ft.heads.read_first_token_only`, exact on any device) is switched on by the head when it is built, so
    that a model loaded for predict or export makes the same choice. Nothing is applied off the CPU. Returns what
    was applied."""
    applied: list[str] = []
    if device.type != "cpu":
        return applied
    if reuse_freed_memory():  # the data stage is over: training's large blocks are reused instead of re-faulted
        applied.append("allocator keeps freed blocks")
    if config.bulk_dropout and config.torch_compile:
        # The compiled layers draw their dropout masks inside inductor's fused kernels, and stay on transformers'
        # stock SDPA attention, which inductor traces whole (bert_ft.compiling).
        log("dropout masks drawn in bulk: off under --torch_compile (the compiled layers draw theirs in fused "
            "kernels)")
    elif config.bulk_dropout:
        switched = use_bulk_dropout(model)
        log(f"dropout masks drawn in bulk: {', '.join(switched) or 'no dropout layers found'}")
        applied += switched
    return applied
