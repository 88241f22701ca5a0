"""Linear-chain conditional random field for sequence labelling heads.

Shapes used throughout:
    emissions: (batch, seq, num_tags) per-token tag scores from the encoder
    tags:      (batch, seq) gold tag ids
    mask:      (batch, seq) bool; each row must be a contiguous prefix of True
               (the caller compacts sub-word positions away). An all-False row
               is an empty sequence: it contributes 0 loss and decodes to zeros.

All arithmetic runs in float32 so fp16/bf16 emissions cannot overflow in the
log-sum-exp recursions.
"""

from __future__ import annotations

import torch
from torch import nn

# Added to the score of a forbidden transition. Large enough that no forbidden
# path can win Viterbi or carry probability mass, small enough to stay finite
# (true -inf would turn all-forbidden rows and their gradients into NaN).
DISALLOWED_TRANSITION_PENALTY = -10000.0


class CRF(nn.Module):
    """Linear-chain CRF with optional hard transition constraints.

    `transitions[i, j]` scores moving from tag i to tag j.
    """

    def __init__(self, num_tags: int) -> None:
        super().__init__()
        if num_tags < 1:
            raise ValueError(f"num_tags must be positive, got {num_tags}")
        self.num_tags = num_tags
        self.start_transitions = nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))
        self.end_transitions = nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags).uniform_(-0.1, 0.1))
        # Registered up front (all zero = unconstrained) so state_dicts of
        # constrained and unconstrained CRFs have the same keys, and a saved
        # checkpoint keeps its constraints when reloaded.
        self.register_buffer("transition_penalty", torch.zeros(num_tags, num_tags))
        self.register_buffer("start_penalty", torch.zeros(num_tags))

    def extra_repr(self) -> str:
        return f"num_tags={self.num_tags}"

    # ------------------------------------------------------------------ setup

    def constrain(self, allowed: torch.Tensor, allowed_start: torch.Tensor) -> None:
        """Forbid transitions: `allowed` (num_tags, num_tags) bool, [i, j] = may go i -> j;
        `allowed_start` (num_tags,) bool, = tag may begin a sequence.

        Forbidden moves get DISALLOWED_TRANSITION_PENALTY added in the loss,
        Viterbi and marginals. A gold path that uses a forbidden move therefore
        gets a huge loss, so only constrain with masks the training data obeys.
        """
        if allowed.shape != (self.num_tags, self.num_tags):
            raise ValueError(
                f"allowed must have shape ({self.num_tags}, {self.num_tags}), got {tuple(allowed.shape)}"
            )
        if allowed_start.shape != (self.num_tags,):
            raise ValueError(f"allowed_start must have shape ({self.num_tags},), got {tuple(allowed_start.shape)}")
        if allowed.dtype != torch.bool or allowed_start.dtype != torch.bool:
            raise TypeError("allowed and allowed_start must be bool tensors")
        # copy_ keeps the buffers on whatever device the module already lives on.
        self.transition_penalty.copy_((~allowed).float() * DISALLOWED_TRANSITION_PENALTY)
        self.start_penalty.copy_((~allowed_start).float() * DISALLOWED_TRANSITION_PENALTY)

    # ------------------------------------------------------------ public API

    def forward(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor,
                reduction: str = "mean") -> torch.Tensor:
        """Negative log-likelihood of `tags`: its mean over the batch (scalar, float32), or with reduction "none"
        one value per sequence (batch,) (0 for an empty one)."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        emissions, mask = self._prepare(emissions, mask)
        if tags.shape != mask.shape:
            raise ValueError(f"tags shape {tuple(tags.shape)} does not match mask shape {tuple(mask.shape)}")
        batch_size, seq_len, _ = emissions.shape
        if batch_size == 0 or seq_len == 0:
            # Mean of nothing would be NaN; keep the graph connected with a zero loss.
            return emissions.sum() * 0.0 if reduction == "mean" else emissions.sum((1, 2)) * 0.0
        # Padding positions may hold an ignore index such as -100; make them
        # valid indices. They are masked out of every sum below.
        tags = tags.long().masked_fill(~mask, 0)
        gold_score = self._path_score(emissions, tags, mask)  # (batch,)
        log_partition = self._log_partition(emissions, mask)  # (batch,)
        # Both terms are 0 for empty rows, so they add exactly 0 loss.
        negative_log_likelihood = log_partition - gold_score  # (batch,)
        return negative_log_likelihood.mean() if reduction == "mean" else negative_log_likelihood

    @torch.no_grad()  # argmax paths have no useful gradient; skip building the graph
    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Viterbi decoding.

        Returns (best tag ids (batch, seq) long, 0 where mask is False;
        best path score (batch,) float32, 0 for empty rows).
        """
        emissions, mask = self._prepare(emissions, mask)
        batch_size, seq_len, _ = emissions.shape
        device = emissions.device
        best_tags = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        if batch_size == 0 or seq_len == 0:
            return best_tags, torch.zeros(batch_size, device=device)

        transitions, start_transitions = self._effective_transitions()
        lengths = mask.sum(dim=1)  # (batch,)
        last_positions = (lengths - 1).clamp(min=0)  # (batch,)

        # score[b, j]: best score of any path ending in tag j at the current position.
        score = start_transitions + emissions[:, 0]  # (batch, num_tags)
        backpointers: list[torch.Tensor] = []  # backpointers[t - 1]: (batch, num_tags) best tag at t-1 given tag at t
        for position in range(1, seq_len):
            # (batch, prev, 1) + (prev, next) -> (batch, prev, next)
            candidates = score.unsqueeze(2) + transitions
            best_previous_score, best_previous_tag = candidates.max(dim=1)  # (batch, next) each
            next_score = best_previous_score + emissions[:, position]  # (batch, num_tags)
            # Finished rows keep their score, so after the loop `score` holds
            # each row's value at its own last real position.
            score = torch.where(mask[:, position].unsqueeze(1), next_score, score)
            backpointers.append(best_previous_tag)

        final_score = score + self.end_transitions  # (batch, num_tags)
        best_path_score, current_tag = final_score.max(dim=1)  # (batch,) each

        # Walk back from each row's own last position; positions after it stay 0.
        has_tokens = lengths > 0  # (batch,)
        for position in range(seq_len - 1, -1, -1):
            if position < seq_len - 1:
                previous_tag = backpointers[position].gather(1, current_tag.unsqueeze(1)).squeeze(1)  # (batch,)
                current_tag = torch.where(position < last_positions, previous_tag, current_tag)
            inside_row = (position <= last_positions) & has_tokens  # (batch,)
            best_tags[:, position] = torch.where(inside_row, current_tag, torch.zeros_like(current_tag))

        best_path_score = torch.where(has_tokens, best_path_score, torch.zeros_like(best_path_score))
        return best_tags, best_path_score

    def marginals(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Posterior P(tag at position t = j | sentence) via forward-backward.

        Returns (batch, seq, num_tags) float32; rows sum to 1 where mask is True, 0 elsewhere.
        """
        emissions, mask = self._prepare(emissions, mask)
        batch_size, seq_len, num_tags = emissions.shape
        if batch_size == 0 or seq_len == 0:
            return torch.zeros(batch_size, seq_len, num_tags, device=emissions.device)

        alphas = self._forward_log_alphas(emissions, mask)  # (batch, seq, num_tags)
        beta_stack = self._backward_log_betas(emissions, mask)  # (batch, seq, num_tags)

        log_partition = self._log_partition_from_alphas(alphas, mask)  # (batch,)
        log_posterior = alphas + beta_stack - log_partition.view(-1, 1, 1)  # (batch, seq, num_tags)
        # masked_fill rather than multiply: padded entries must be exactly 0, never inf * 0.
        return log_posterior.exp().masked_fill(~mask.unsqueeze(2), 0.0)

    def span_marginals(self, emissions: torch.Tensor, mask: torch.Tensor, spans: list) -> torch.Tensor:
        """Posterior probability of each span's tag sequence, with conditions on its neighbours.

        `spans`: (row, start, tags, not_before, not_after) tuples: P(tags[row, start + k] = tags[k] for every k,
        the tag before `start` (if any) not in `not_before`, and the tag after the span (if any) not in
        `not_after`). For an IOB2 entity B-X I-X I-X: not_before = () and not_after = (I-X,), i.e. the probability
        that exactly this entity is in the tagging. Returns (len(spans),) float32.
        """
        emissions, mask = self._prepare(emissions, mask)
        device = emissions.device
        if not spans:
            return torch.zeros(0, device=device)
        transitions, start_transitions = self._effective_transitions()
        alphas = self._forward_log_alphas(emissions, mask)  # (batch, seq, num_tags)
        betas = self._backward_log_betas(emissions, mask)  # (batch, seq, num_tags)
        log_partition = self._log_partition_from_alphas(alphas, mask)  # (batch,)
        count, longest = len(spans), max(len(span[2]) for span in spans)
        rows = torch.tensor([span[0] for span in spans], device=device)  # (spans,)
        starts = torch.tensor([span[1] for span in spans], device=device)  # (spans,)
        sizes = torch.tensor([len(span[2]) for span in spans], device=device)  # (spans,)
        paths = torch.zeros(count, longest, dtype=torch.long, device=device)  # (spans, longest)
        allowed_before = torch.ones(count, self.num_tags, dtype=torch.bool, device=device)
        allowed_after = torch.ones(count, self.num_tags, dtype=torch.bool, device=device)
        for index, (_, _, tags, not_before, not_after) in enumerate(spans):
            paths[index, :len(tags)] = torch.tensor(list(tags), dtype=torch.long)
            allowed_before[index, list(not_before)] = False
            allowed_after[index, list(not_after)] = False
        lengths = mask.sum(dim=1)[rows]  # (spans,)
        ends = starts + sizes - 1  # (spans,) last position of each span
        if bool(((starts < 0) | (sizes < 1) | (ends >= lengths)).any()):
            raise ValueError("every span must lie inside its row's real positions")
        first_tags = paths[:, 0]
        emitted = emissions[rows, starts, first_tags]  # (spans,)
        # Into the first tag: from the start, or from any allowed previous tag (alpha includes its emission).
        previous = alphas[rows, (starts - 1).clamp(min=0)]  # (spans, num_tags)
        into = previous + transitions[:, first_tags].t()  # (spans, num_tags): previous tag -> first tag
        from_before = torch.logsumexp(into.masked_fill(~allowed_before, float("-inf")), dim=1)
        score = torch.where(starts == 0, start_transitions[first_tags], from_before) + emitted
        for step in range(1, longest):  # along each span's own path
            inside = step < sizes
            positions = (starts + step).clamp(max=emissions.size(1) - 1)
            moved = transitions[paths[:, step - 1], paths[:, step]] + emissions[rows, positions, paths[:, step]]
            score = score + torch.where(inside, moved, torch.zeros_like(moved))
        last_tags = paths.gather(1, (sizes - 1).unsqueeze(1)).squeeze(1)  # (spans,)
        following = (ends + 1).clamp(max=emissions.size(1) - 1)
        out = transitions[last_tags] + emissions[rows, following] + betas[rows, following]  # (spans, num_tags)
        to_after = torch.logsumexp(out.masked_fill(~allowed_after, float("-inf")), dim=1)
        score = score + torch.where(ends == lengths - 1, self.end_transitions[last_tags], to_after)
        return (score - log_partition[rows]).exp()

    def scaled(self, temperature: float) -> "CRF":
        """A copy whose learned potentials (transitions, start and end scores) are divided by `temperature`; the
        hard constraints stay as they are. With emissions / temperature this is the CRF at that temperature:
        marginals and span probabilities change, Viterbi's best path does not (a positive scale of every score
        keeps the order of the allowed paths)."""
        copy = CRF(self.num_tags).to(self.transitions.device)
        with torch.no_grad():
            for name in ("start_transitions", "end_transitions", "transitions"):
                getattr(copy, name).copy_(getattr(self, name) / temperature)
            copy.transition_penalty.copy_(self.transition_penalty)
            copy.start_penalty.copy_(self.start_penalty)
        return copy

    # --------------------------------------------------------------- helpers

    def _prepare(self, emissions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate shapes, upcast to float32 and zero padded emissions."""
        if emissions.dim() != 3 or emissions.size(2) != self.num_tags:
            raise ValueError(f"emissions must be (batch, seq, {self.num_tags}), got {tuple(emissions.shape)}")
        if mask.shape != emissions.shape[:2]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match emissions {tuple(emissions.shape[:2])}")
        mask = mask.bool()
        if mask.size(1) > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            # The recursions carry state across padding, which is only right
            # when padding is all at the end of the row.
            raise ValueError("each mask row must be a contiguous prefix of True values")
        # Zeroing padding keeps NaN/inf in padded emissions out of sums and gradients.
        emissions = emissions.float().masked_fill(~mask.unsqueeze(2), 0.0)
        return emissions, mask

    def _effective_transitions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(transitions (num_tags, num_tags), start_transitions (num_tags,)) with constraint penalties added."""
        return self.transitions + self.transition_penalty, self.start_transitions + self.start_penalty

    def _path_score(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unnormalised score of the given tag paths, (batch,); 0 for empty rows."""
        transitions, start_transitions = self._effective_transitions()
        lengths = mask.sum(dim=1)  # (batch,)
        has_tokens = lengths > 0  # (batch,)

        emission_scores = emissions.gather(2, tags.unsqueeze(2)).squeeze(2)  # (batch, seq)
        score = emission_scores.masked_fill(~mask, 0.0).sum(dim=1)  # (batch,)

        # A step into position t exists iff position t is real (prefix mask).
        transition_scores = transitions[tags[:, :-1], tags[:, 1:]]  # (batch, seq - 1)
        score = score + transition_scores.masked_fill(~mask[:, 1:], 0.0).sum(dim=1)

        first_tags = tags[:, 0]  # (batch,)
        last_tags = tags.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # (batch,)
        boundary_scores = start_transitions[first_tags] + self.end_transitions[last_tags]  # (batch,)
        return score + boundary_scores.masked_fill(~has_tokens, 0.0)

    def _forward_log_alphas(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """alpha[b, t, j]: log-sum of scores of all prefixes ending in tag j at t, (batch, seq, num_tags).

        Past a row's last token the previous alpha is carried forward unchanged.
        """
        transitions, start_transitions = self._effective_transitions()
        alpha = start_transitions + emissions[:, 0]  # (batch, num_tags)
        alphas = [alpha]
        for position in range(1, emissions.size(1)):
            # (batch, prev, 1) + (prev, next) -> logsumexp over prev -> (batch, next)
            next_alpha = torch.logsumexp(alpha.unsqueeze(2) + transitions, dim=1) + emissions[:, position]
            alpha = torch.where(mask[:, position].unsqueeze(1), next_alpha, alpha)
            alphas.append(alpha)
        return torch.stack(alphas, dim=1)

    def _backward_log_betas(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """beta[b, t, i]: log-sum of scores of all continuations after position t given tag i at t (the end
        transition at a row's last token), (batch, seq, num_tags)."""
        transitions, _ = self._effective_transitions()
        batch_size, seq_len, num_tags = emissions.shape
        end_scores = self.end_transitions.unsqueeze(0).expand(batch_size, num_tags)  # (batch, num_tags)
        betas = [end_scores]
        for position in range(seq_len - 2, -1, -1):
            following = emissions[:, position + 1] + betas[0]  # (batch, next)
            # (prev, next) + (batch, 1, next) -> logsumexp over next -> (batch, prev)
            recursed = torch.logsumexp(transitions + following.unsqueeze(1), dim=2)
            # If position + 1 is padding, position is the row's last token and
            # only the end transition follows it.
            betas.insert(0, torch.where(mask[:, position + 1].unsqueeze(1), recursed, end_scores))
        return torch.stack(betas, dim=1)

    def _log_partition_from_alphas(self, alphas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log Z per row, (batch,); 0 for empty rows."""
        # The last alpha equals the alpha at each row's last token (carried forward).
        log_partition = torch.logsumexp(alphas[:, -1] + self.end_transitions, dim=1)  # (batch,)
        has_tokens = mask.any(dim=1)  # (batch,)
        return log_partition.masked_fill(~has_tokens, 0.0)

    def _log_partition(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log Z per row, (batch,), via the forward algorithm."""
        return self._log_partition_from_alphas(self._forward_log_alphas(emissions, mask), mask)


def iob2_transition_mask(labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """IOB2 constraints for CRF.constrain: (allowed (n, n) bool, allowed_start (n,) bool).

    `I-X` may only follow `B-X` or `I-X` and may not start a sequence. Labels
    that are not `I-...` (`O`, `B-X`, anything else) are unconstrained.
    """
    num_labels = len(labels)
    allowed = torch.ones(num_labels, num_labels, dtype=torch.bool)
    allowed_start = torch.ones(num_labels, dtype=torch.bool)
    for next_index, next_label in enumerate(labels):
        if not next_label.startswith("I-"):
            continue
        entity_type = next_label[2:]
        allowed_start[next_index] = False
        for previous_index, previous_label in enumerate(labels):
            allowed[previous_index, next_index] = previous_label in (f"B-{entity_type}", f"I-{entity_type}")
    return allowed, allowed_start
