"""Task heads on the shared encoder, and saving/loading them as `save_pretrained` folders.

Every head is an `nn.Module` with the same small surface used by the training loop and `predict`:
  forward(**batch) -> {"loss": scalar (when labels are given), "logits": ...}
  predict(**batch) -> {name: tensor with batch first}  (decoded predictions and confidences)
  encoder_model()  -> the bare encoder (for layer-wise lr groups, freezing and weight transfer)
  save_pretrained(folder) / HEAD.load(folder, meta)
Token and sequence heads are the stock transformers `AutoModelFor*` classes inside, so their folders load in
`transformers.pipeline`; the extra CRF or entity-pair layer is stored next to them in `bert_ft_head.safetensors`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

try:  # transformers >= 4.48: attention implementations behind one registry (older ones keep the stock forward)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:  # pragma: no cover - depends on the installed transformers
    ALL_ATTENTION_FUNCTIONS = None

from . import __version__
from .crf import CRF, iob2_transition_mask
from .encoder import load_config, load_pretrained
from .errors import UsageError
from .io import atomic_directory

META_FILE = "bert_ft.json"
HEAD_WEIGHTS = "bert_ft_head.safetensors"


def _label_maps(labels: list[str]) -> dict:
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: index for index, label in enumerate(labels)}}


def _encoder_inputs(batch: dict) -> dict:
    """Only the keys a transformers encoder accepts (the batch also carries task fields)."""
    return {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in batch}


def _first_token_forward(layer: nn.Module, hidden_states: torch.Tensor, attention_mask=None, *args, **kwargs):
    """A BERT-style top layer computed for position 0 only: (batch, seq, hidden) -> (batch, 1, hidden).

    The keys and values still come from every position, so the [CLS] output equals the full layer's row 0; the
    queries, attention output, feed-forward and LayerNorms of the other positions, which nothing reads, are skipped.
    """
    attention = layer.attention.self
    batch_size = hidden_states.size(0)
    head_shape = (batch_size, -1, attention.num_attention_heads, attention.attention_head_size)
    first = hidden_states[:, :1]  # (batch, 1, hidden)
    query = attention.query(first).view(head_shape).transpose(1, 2)  # (batch, heads, 1, head_dim)
    key = attention.key(hidden_states).view(head_shape).transpose(1, 2)  # (batch, heads, seq, head_dim)
    value = attention.value(hidden_states).view(head_shape).transpose(1, 2)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.size(-2) > 1:
        attention_mask = attention_mask[:, :, :1]  # (batch, 1 or heads, 1, seq): the query row we keep
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, None)
    if interface is None:
        from transformers.models.bert.modeling_bert import eager_attention_forward as interface
    context, _ = interface(attention, query, key, value, attention_mask,
                           dropout=attention.dropout.p if attention.training else 0.0, scaling=attention.scaling,
                           **{name: item for name, item in kwargs.items() if name == "position_ids"})
    context = context.reshape(batch_size, 1, -1)  # (batch, 1, hidden)
    attended = layer.attention.output(context, first)
    return layer.output(layer.intermediate(attended), attended)


def read_first_token_only(model: nn.Module) -> bool:
    """Let a `*ForSequenceClassification` BERT skip the top layer's work on positions other than [CLS].

    A sequence classifier reads only [CLS] from the top layer, so computing the rest is waste: about 14 % of the
    encoder's FLOPs for a 6-layer model, in training and evaluation alike. Enabled only where this transformers
    version's layer has the BERT layout and a check on random input gives the same logits as the full forward
    (padding included); otherwise the model runs unchanged. The weights and the saved folder are untouched: only
    this instance's forward of the top layer is replaced.
    """
    encoder = getattr(model.base_model, "encoder", None)
    layers = getattr(encoder, "layer", None)
    top = layers[-1] if isinstance(layers, nn.ModuleList) and len(layers) else None
    needed = ("attention", "intermediate", "output")
    if (ALL_ATTENTION_FUNCTIONS is None or top is None or model.config.is_decoder
            or not all(hasattr(top, name) for name in needed) or getattr(top, "add_cross_attention", False)
            or not all(hasattr(top.attention, name) for name in ("self", "output"))
            or not hasattr(top.attention.self, "query")):
        return False
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(0)
    parameter = next(model.parameters())
    input_ids = torch.randint(5, min(model.config.vocab_size, 1000), (2, 7), generator=generator)
    attention_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])  # one row padded: the mask path is checked too
    inputs = {"input_ids": input_ids.to(parameter.device), "attention_mask": attention_mask.to(parameter.device)}
    try:
        with torch.no_grad():
            expected = model(**inputs).logits
            top.forward = _first_token_forward.__get__(top)
            got = model(**inputs).logits
        same = got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    except Exception:  # another layout than this code knows: keep the stock forward
        same = False
    if not same and "forward" in top.__dict__:
        del top.forward
    model.train(was_training)
    return same


class TokenTagger(nn.Module):
    """Token classification: a linear layer per token (transformers' own), optionally followed by a CRF.

    Only the first sub-word of each word is labelled (`word_starts`); the CRF runs over those positions, compacted
    to the front of each row, so its transitions are between consecutive words rather than sub-words.
    """

    head_name = "token_tagger"

    def __init__(self, model: nn.Module, labels: list[str], use_crf: bool) -> None:
        super().__init__()
        self.model, self.labels, self.use_crf = model, list(labels), use_crf
        self.crf = CRF(len(labels)) if use_crf else None
        if self.crf is not None and all(label == "O" or label[:2] in ("B-", "I-") for label in labels):
            self.crf.constrain(*iob2_transition_mask(self.labels))

    @classmethod
    def create(cls, model_path: str, labels: list[str], use_crf: bool = False, trust_remote_code: bool = False,
               vocab_size: int | None = None) -> "TokenTagger":
        config = load_config(model_path, trust_remote_code, **_label_maps(labels))
        model = load_pretrained(AutoModelForTokenClassification, model_path, trust_remote_code, config=config)
        if vocab_size is not None and vocab_size != model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(vocab_size)
        return cls(model, labels, use_crf)

    def encoder_model(self) -> nn.Module:
        return self.model.base_model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def options(self) -> dict:
        return {"use_crf": self.use_crf}

    def forward(self, labels: torch.Tensor | None = None, word_starts: torch.Tensor | None = None,
                **batch: torch.Tensor) -> dict:
        logits = self.model(**_encoder_inputs(batch)).logits  # (batch, seq, num_labels)
        if labels is None:
            return {"logits": logits}
        if self.crf is None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        else:
            emissions, word_labels, word_mask, _ = self._compact(logits, word_starts, labels)
            loss = self.crf(emissions, word_labels.clamp(min=0), word_mask)
        return {"loss": loss, "logits": logits}

    @staticmethod
    def _compact(logits: torch.Tensor, word_starts: torch.Tensor, labels: torch.Tensor | None = None):
        """Move the first-sub-word positions of each row to its front: (batch, seq, L) -> (batch, words, L)."""
        starts = word_starts.bool()
        # A stable sort on "is not a start" lists the start positions first, in order.
        positions = torch.argsort((~starts).to(torch.int8), dim=1, stable=True)
        num_words = int(starts.sum(dim=1).max().item()) if starts.numel() else 0
        positions = positions[:, :max(num_words, 1)]  # (batch, words)
        word_mask = torch.gather(starts, 1, positions)  # (batch, words): a contiguous prefix of True
        emissions = torch.gather(logits, 1, positions.unsqueeze(-1).expand(-1, -1, logits.size(-1)))
        word_labels = torch.gather(labels, 1, positions) if labels is not None else None
        return emissions.float(), word_labels, word_mask, positions

    @torch.no_grad()
    def predict(self, word_starts: torch.Tensor, labels: torch.Tensor | None = None, **batch: torch.Tensor) -> dict:
        """Per token: predicted label id (-1 off word starts) and its probability."""
        logits = self.model(**_encoder_inputs(batch)).logits.float()  # (batch, seq, num_labels)
        starts = word_starts.bool()
        if self.crf is None:
            scores, predictions = logits.softmax(-1).max(-1)  # (batch, seq) each
        else:
            emissions, _, word_mask, positions = self._compact(logits, word_starts)
            word_predictions, _ = self.crf.decode(emissions, word_mask)  # (batch, words)
            marginals = self.crf.marginals(emissions, word_mask)  # (batch, words, num_labels)
            word_scores = marginals.gather(-1, word_predictions.unsqueeze(-1)).squeeze(-1)
            predictions = torch.zeros_like(starts, dtype=torch.long)
            scores = torch.zeros_like(starts, dtype=torch.float)
            predictions.scatter_(1, positions, word_predictions * word_mask)
            scores.scatter_(1, positions, word_scores * word_mask)
        return {"pred": torch.where(starts, predictions, -1), "score": torch.where(starts, scores, 0.0)}

    def save_pretrained(self, folder: str) -> None:
        self.model.save_pretrained(folder)
        if self.crf is not None:
            save_file({key: value.contiguous() for key, value in self.crf.state_dict().items()},
                      os.path.join(folder, HEAD_WEIGHTS))

    @classmethod
    def load(cls, folder: str, meta: dict) -> "TokenTagger":
        model = load_pretrained(AutoModelForTokenClassification, folder)
        tagger = cls(model, meta["labels"], meta["head_options"]["use_crf"])
        if tagger.crf is not None:
            tagger.crf.load_state_dict(load_file(os.path.join(folder, HEAD_WEIGHTS)))
        return tagger


class SequenceClassifier(nn.Module):
    """Sentence (or sentence-pair) classification: transformers' own [CLS] pooler + linear head."""

    head_name = "sequence_classifier"

    def __init__(self, model: nn.Module, labels: list[str]) -> None:
        super().__init__()
        self.model, self.labels = model, list(labels)
        self.first_token_only = read_first_token_only(model)

    @classmethod
    def create(cls, model_path: str, labels: list[str], trust_remote_code: bool = False,
               vocab_size: int | None = None) -> "SequenceClassifier":
        config = load_config(model_path, trust_remote_code, **_label_maps(labels))
        model = load_pretrained(AutoModelForSequenceClassification, model_path, trust_remote_code, config=config)
        if vocab_size is not None and vocab_size != model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(vocab_size)
        return cls(model, labels)

    def encoder_model(self) -> nn.Module:
        return self.model.base_model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def options(self) -> dict:
        return {}

    def forward(self, labels: torch.Tensor | None = None, **batch: torch.Tensor) -> dict:
        logits = self.model(**_encoder_inputs(batch)).logits  # (batch, num_labels)
        if labels is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits.float(), labels), "logits": logits}

    @torch.no_grad()
    def predict(self, labels: torch.Tensor | None = None, **batch: torch.Tensor) -> dict:
        probs = self.model(**_encoder_inputs(batch)).logits.float().softmax(-1)  # (batch, num_labels)
        return {"pred": probs.argmax(-1), "probs": probs}

    def save_pretrained(self, folder: str) -> None:
        self.model.save_pretrained(folder)

    @classmethod
    def load(cls, folder: str, meta: dict) -> "SequenceClassifier":
        return cls(load_pretrained(AutoModelForSequenceClassification, folder), meta["labels"])


POOLINGS = ("entity_start", "entity_mean", "cls")


class EntityPairClassifier(nn.Module):
    """Relation classification over a marked entity pair.

    pooling "entity_start": hidden states at the two start markers, concatenated ("matching the blanks");
    "entity_mean": [CLS] + mean of each entity's tokens (R-BERT); "cls": the [CLS] state alone.
    The batch gives `e1_start`, `e2_start` (marker positions) and `e1_end`, `e2_end` (end-marker positions).
    """

    head_name = "entity_pair_classifier"

    def __init__(self, encoder: nn.Module, labels: list[str], pooling: str, dropout: float = 0.1) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise UsageError(f"--pooling: must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.encoder, self.labels, self.pooling = encoder, list(labels), pooling
        hidden = encoder.config.hidden_size
        parts = {"entity_start": 2, "entity_mean": 3, "cls": 1}[pooling]
        self.norm = nn.LayerNorm(parts * hidden)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(parts * hidden, len(labels))
        self.config = encoder.config

    @classmethod
    def create(cls, model_path: str, labels: list[str], pooling: str = "entity_start",
               trust_remote_code: bool = False, vocab_size: int | None = None) -> "EntityPairClassifier":
        config = load_config(model_path, trust_remote_code, **_label_maps(labels))
        encoder = load_pretrained(AutoModel, model_path, trust_remote_code, config=config, add_pooling_layer=False)
        if vocab_size is not None and vocab_size != encoder.get_input_embeddings().num_embeddings:
            encoder.resize_token_embeddings(vocab_size)
        return cls(encoder, labels, pooling)

    def encoder_model(self) -> nn.Module:
        return self.encoder

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.get_input_embeddings()

    def options(self) -> dict:
        return {"pooling": self.pooling}

    def _logits(self, batch: dict) -> torch.Tensor:
        hidden = self.encoder(**_encoder_inputs(batch)).last_hidden_state  # (batch, seq, hidden)
        rows = torch.arange(hidden.size(0), device=hidden.device)
        if self.pooling == "entity_start":
            pooled = torch.cat([hidden[rows, batch["e1_start"]], hidden[rows, batch["e2_start"]]], dim=-1)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            positions = torch.arange(hidden.size(1), device=hidden.device)  # (seq,)
            means = [hidden[:, 0]]
            for start, end in (("e1_start", "e1_end"), ("e2_start", "e2_end")):
                # Tokens strictly between the start and end markers: (batch, seq) float mask.
                inside = ((positions > batch[start][:, None]) & (positions < batch[end][:, None])).to(hidden.dtype)
                means.append((hidden * inside[..., None]).sum(1) / inside.sum(1, keepdim=True).clamp(min=1))
            pooled = torch.cat(means, dim=-1)
        return self.classifier(self.dropout(self.norm(pooled)))  # (batch, num_labels)

    def forward(self, labels: torch.Tensor | None = None, **batch: torch.Tensor) -> dict:
        logits = self._logits(batch)
        if labels is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits.float(), labels), "logits": logits}

    @torch.no_grad()
    def predict(self, labels: torch.Tensor | None = None, **batch: torch.Tensor) -> dict:
        probs = self._logits(batch).float().softmax(-1)
        return {"pred": probs.argmax(-1), "probs": probs}

    def save_pretrained(self, folder: str) -> None:
        self.encoder.save_pretrained(folder)
        head = {f"{name}.{key}": value.contiguous() for name in ("norm", "classifier")
                for key, value in getattr(self, name).state_dict().items()}
        save_file(head, os.path.join(folder, HEAD_WEIGHTS))

    @classmethod
    def load(cls, folder: str, meta: dict) -> "EntityPairClassifier":
        encoder = load_pretrained(AutoModel, folder, add_pooling_layer=False)
        model = cls(encoder, meta["labels"], meta["head_options"]["pooling"])
        state = load_file(os.path.join(folder, HEAD_WEIGHTS))
        for name in ("norm", "classifier"):
            getattr(model, name).load_state_dict(
                {key[len(name) + 1:]: value for key, value in state.items() if key.startswith(name + ".")})
        return model


HEADS = {head.head_name: head for head in (TokenTagger, SequenceClassifier, EntityPairClassifier)}


def save_model(model: nn.Module, tokenizer: Any, folder: str, task_name: str, extra: dict | None = None) -> None:
    """Write `folder` atomically: transformers weights/config, tokenizer, extra head weights and bert_ft.json."""
    meta = {"bert_ft_version": __version__, "task": task_name, "head": model.head_name, "labels": model.labels,
            "head_options": model.options(), **(extra or {})}
    with atomic_directory(folder) as temp:
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        with open(os.path.join(temp, META_FILE), "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=2, ensure_ascii=False)


def read_meta(folder: str) -> dict:
    path = os.path.join(folder, META_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"{folder}: not a bert-ft model folder (no {META_FILE}); give RUN/model of a finished run")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def load_model(folder: str) -> tuple[nn.Module, Any, dict]:
    """Load any bert-ft model folder: (model in eval mode, tokenizer, meta). The relation model loads only here."""
    from .encoder import load_tokenizer

    meta = read_meta(folder)
    if meta.get("head") not in HEADS:
        raise UsageError(f"{folder}/{META_FILE}: unknown head {meta.get('head')!r}")
    model = HEADS[meta["head"]].load(folder, meta)
    return model.eval(), load_tokenizer(folder), meta
