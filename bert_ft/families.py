"""What differs between encoder families, in one place, found from the model itself wherever it can be.

The rest of bert-ft speaks one batch contract (bert_ft.heads): packed rows carry position ids restarting at 0 per
example and an additive block mask (rows, 1, seq, seq) of 0 / finfo.min; padded rows a 0/1 mask. `encoder_call`
turns that into what a given transformers encoder needs:
  token type ids      passed only where the model's forward takes them and its config has more than one type
                      (RoBERTa and XLM-R have 1, DeBERTa-v3 0, DistilBERT and ModernBERT none)
  position ids        RoBERTa-style models number positions from padding_idx + 1 (their own
                      `create_position_ids_from_input_ids`): packed positions are shifted by that offset
  DeBERTa masks       DeBERTa reads its mask as 0/1 (`mask.bool()`, and the embeddings multiply by it): the block
                      mask is given as 0/1; its relative positions are differences of row positions, which do not
                      change when an example moves along a row, so the block mask is all it needs
  ModernBERT          alternating global and local (sliding-window) layers with rotary positions: a 4-D mask would
                      be used as-is by both kinds of layer, so both masks are given (the block mask, and the block
                      mask cut to |i - j| <= sliding_window, the band its local layers see)
  block attention     with --block_attention (bert_ft.block_attention.use_block_attention) a packed batch's
                      layout rides along as one more keyword argument, which the model passes down to its
                      attention function: every family but DeBERTa, whose attention is its own
`encoder_layers` finds the stack of per-depth layers that layer-wise lr decay and --freeze_layers address, and
`model_init_kwargs` keeps only the keyword arguments a family's model class takes (`add_pooling_layer`).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from .block_layout import BLOCK_MODE, LAYOUT_ARGUMENT, BlockLayout, build_layout, worthwhile
from .checks import PADDING_OFFSET_MODEL_TYPES
from .errors import UsageError

# Families whose attention reads the mask as 0/1 (keep where nonzero) rather than as an additive bias.
BOOLEAN_MASK_MODEL_TYPES = frozenset({"deberta", "deberta-v2", "sew-d"})


@dataclass(frozen=True)
class EncoderFamily:
    """How to call one encoder with the batch contract's inputs."""

    model_type: str
    token_types: bool  # the model reads token_type_ids
    position_offset: int  # added to packed position ids (RoBERTa: padding_idx + 1)
    boolean_mask: bool  # the attention reads a 0/1 mask (DeBERTa)
    sliding_window: int | None  # half-window of local-attention layers (ModernBERT), None: no local layers


def _forward_parameters(module: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return set()


def family_of(model: nn.Module) -> EncoderFamily:
    """The family description of a transformers model (task model or bare encoder); cached on the model."""
    cached = model.__dict__.get("_bert_ft_family")
    if cached is not None:
        return cached
    config = model.config
    encoder = getattr(model, "base_model", model)
    parameters = _forward_parameters(encoder) | _forward_parameters(model)
    types = getattr(config, "type_vocab_size", 2)
    token_types = "token_type_ids" in parameters and (types is None or types > 1)
    offset = 0
    embeddings = getattr(encoder, "embeddings", None)
    if config.model_type in PADDING_OFFSET_MODEL_TYPES or getattr(embeddings, "padding_idx", None) is not None:
        padding_index = getattr(embeddings, "padding_idx", None)
        if padding_index is None:
            padding_index = getattr(config, "pad_token_id", 1)
        offset = int(padding_index) + 1
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None) if "sliding_attention" in layer_types else None
    family = EncoderFamily(config.model_type, token_types, offset, config.model_type in BOOLEAN_MASK_MODEL_TYPES,
                           int(window) if window else None)
    if family.boolean_mask and embeddings is not None and not getattr(embeddings, "_bert_ft_mask_hook", False):
        embeddings._bert_ft_mask_hook = True
        embeddings.register_forward_pre_hook(_token_mask_for_embeddings, with_kwargs=True)
    model.__dict__["_bert_ft_family"] = family
    return family


def _token_mask_for_embeddings(module: nn.Module, args: tuple, kwargs: dict):
    """DeBERTa's embeddings multiply by their `mask` (zeroing padding): give them the per-token 0/1 mask of a
    packed batch's (rows, 1, seq, seq) block mask (its diagonal: every token of an example, and the row's trailing
    padding, which forms its own block, attend to themselves)."""
    mask = kwargs.get("mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        kwargs = dict(kwargs, mask=mask[:, 0].diagonal(dim1=-2, dim2=-1).to(torch.long))  # (rows, seq)
        return args, kwargs
    return None


def encoder_call(model: nn.Module, inputs: dict, examples: dict | None = None) -> dict:
    """The encoder inputs of the batch contract (input_ids, attention_mask, token_type_ids, position_ids) as
    `model`'s family takes them (see the module's docstring). Padded batches pass unchanged but for token types.
    `examples` (the batch's example_row/offset/length) lets a packed batch carry its block layout where block
    attention is on for `model` (`bert_ft.block_attention.use_block_attention`)."""
    family = family_of(model)
    inputs = dict(inputs)
    if not family.token_types:
        inputs.pop("token_type_ids", None)
    mask = inputs.get("attention_mask")
    if "position_ids" not in inputs or not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return inputs  # padded: the model's own position ids and mask handling
    layout = _block_layout(model, mask, examples)
    if layout is not None:
        inputs[LAYOUT_ARGUMENT] = layout
    if family.position_offset:
        inputs["position_ids"] = inputs["position_ids"] + family.position_offset
    if family.boolean_mask:
        inputs["attention_mask"] = (mask == 0).to(torch.long)  # (rows, 1, seq, seq): 1 = may attend
    elif family.sliding_window is not None:
        seq = mask.size(-1)
        steps = torch.arange(seq, device=mask.device)
        outside = (steps[:, None] - steps[None, :]).abs() > family.sliding_window  # (seq, seq)
        local = mask.masked_fill(outside, torch.finfo(mask.dtype).min)  # (rows, 1, seq, seq)
        inputs["attention_mask"] = {"full_attention": mask, "sliding_attention": local}
    return inputs


# ------------------------------------------------------------------------------------------ block attention

def _block_layout(model: nn.Module, mask: torch.Tensor, examples: dict | None) -> BlockLayout | None:
    """The layout of a packed batch when block attention is on for `model` in its current mode and pays."""
    mode = model.__dict__.get(BLOCK_MODE)
    if (examples is None or mode is None or (mode == "train" and not model.training)
            or torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export()):
        return None
    layout = build_layout(examples["example_row"], examples["example_offset"], examples["example_length"],
                          mask.size(0), mask.size(-1))
    return layout if worthwhile(layout) else None


# ------------------------------------------------------------------------------------------------ tokenizers

def _byte_level_nodes(node: Any) -> list[dict]:
    if isinstance(node, dict):
        found = [node] if node.get("type") == "ByteLevel" and "add_prefix_space" in node else []
        return found + [inner for value in node.values() for inner in _byte_level_nodes(value)]
    if isinstance(node, list):
        return [inner for value in node for inner in _byte_level_nodes(value)]
    return []


def prefix_space_for_words(tokenizer: Any) -> bool:
    """Turn on `add_prefix_space` of a byte-level BPE tokenizer (RoBERTa, ModernBERT) in place; True if it changed.

    Pre-split words are tokenised one by one: without a prefix space every word is read as if it continued the
    previous one ("Berger" -> B, er, ger instead of ĠBerger). The flag goes into the backend's pre-tokenizer and
    the tokenizer's saved settings, so a saved folder (and transformers.pipeline on it) reads text the same way:
    each word, the first included, as following a space (what HF's run_ner.py does for RoBERTa)."""

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is None:
        return False
    state = json.loads(backend.to_str())
    nodes = [node for node in _byte_level_nodes(state.get("pre_tokenizer")) if not node["add_prefix_space"]]
    if not nodes:
        return False

    for node in nodes:
        node["add_prefix_space"] = True
    backend.pre_tokenizer = Tokenizer.from_str(json.dumps(state)).pre_tokenizer
    tokenizer.add_prefix_space = True
    tokenizer.init_kwargs["add_prefix_space"] = True
    return True


def word_prefix_ids(tokenizer: Any) -> set[int]:
    """Ids of a bare word-start piece ("▁" of SentencePiece, "Ġ" of byte-level BPE): the first piece of a word that
    is not in the vocabulary with its prefix. A word's label goes on the real sub-word after it."""
    vocab = tokenizer.get_vocab()
    return {vocab[piece] for piece in ("▁", "Ġ") if piece in vocab}


# ------------------------------------------------------------------------------------------ model building

def model_class(auto_class: Any, config: Any) -> type | None:
    """The concrete transformers class an Auto class builds for `config` (None when it cannot tell)."""
    mapping = getattr(auto_class, "_model_mapping", None)
    if mapping is None:
        return auto_class if isinstance(auto_class, type) else None
    try:
        return mapping[type(config)]
    except (KeyError, ValueError):
        return None


def model_init_kwargs(auto_class: Any, config: Any, kwargs: dict) -> dict:
    """The `kwargs` the family's model class takes: `add_pooling_layer=False` reaches BERT, RoBERTa, ALBERT, and
    is left out for ELECTRA, DistilBERT, DeBERTa and ModernBERT (which have no pooler to leave out)."""
    if not kwargs:
        return {}
    concrete = model_class(auto_class, config)
    if concrete is None:
        return dict(kwargs)
    parameters = inspect.signature(concrete.__init__).parameters
    return {key: value for key, value in kwargs.items() if key in parameters}


# --------------------------------------------------------------------------------------- layer-wise groups

def encoder_layers(encoder: nn.Module) -> tuple[str, int] | None:
    """(name prefix, count) of the encoder's stack of per-depth layers: the ModuleList holding one module per
    hidden layer (`encoder.layer` of BERT & co., `transformer.layer` of DistilBERT, `layers` of ModernBERT).
    None where no such list exists: ALBERT runs one shared layer group num_hidden_layers times."""
    count = getattr(encoder.config, "num_hidden_layers", None)
    for name, module in encoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and count:
            return name, count
    return None


def encoder_depth(name: str, layers: tuple[str, int] | None) -> int:
    """0 for embeddings (and relative-position tables), i+1 for a parameter of layer i, count+1 for the rest of the
    encoder (pooler, final norm), where `layers` is `encoder_layers`' answer."""
    if layers is None:
        return 0 if "embeddings" in name else 1
    prefix, count = layers
    start = f"{prefix}." if prefix else ""
    if name.startswith(start):
        index = name[len(start):].split(".", 1)[0]
        if index.isdigit():
            return int(index) + 1
    if "embeddings" in name:
        return 0
    return count


def refuse_without_layers(encoder: nn.Module, flag: str, what: str) -> None:
    """UsageError naming the family when `flag` needs a per-depth layer stack that `encoder` does not have."""
    if encoder_layers(encoder) is None:
        family = encoder.config.model_type
        shared = ("its layers share one set of weights (num_hidden_groups="
                  f"{getattr(encoder.config, 'num_hidden_groups', 1)}), so there is no bottom layer to tell apart"
                  if family == "albert" else "no stack of per-depth layers was found in it")
        raise UsageError(f"{flag}: {what} needs distinct encoder layers; {family} has none: {shared}.\n"
                         f"  fix: drop {flag} (or use --freeze_encoder to train the head only, --head_learning_rate "
                         "for a separate head lr)")
