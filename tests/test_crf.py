"""CRF checks against brute-force enumeration of every tag path on tiny problems."""

from __future__ import annotations

import itertools

import pytest
import torch

from bert_ft.crf import CRF, iob2_transition_mask

IOB2_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def brute_force_path_scores(
    crf: CRF, emissions: torch.Tensor, length: int
) -> dict[tuple[int, ...], float]:
    """Score of every tag path of `length` for one sentence; emissions (seq, num_tags)."""
    transitions = (crf.transitions + crf.transition_penalty).detach().double()
    start = (crf.start_transitions + crf.start_penalty).detach().double()
    end = crf.end_transitions.detach().double()
    emissions = emissions.double()
    scores = {}
    for path in itertools.product(range(crf.num_tags), repeat=length):
        score = start[path[0]] + end[path[-1]]
        score = score + sum(emissions[position, tag] for position, tag in enumerate(path))
        score = score + sum(transitions[previous, following] for previous, following in zip(path, path[1:]))
        scores[path] = float(score)
    return scores


def random_batch(
    lengths: list[int], num_tags: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(emissions (batch, seq, num_tags), tags (batch, seq), prefix mask (batch, seq)) with padding = -100 tags."""
    generator = torch.Generator().manual_seed(seed)
    seq_len = max(lengths)
    emissions = torch.randn(len(lengths), seq_len, num_tags, generator=generator) * 2
    tags = torch.randint(0, num_tags, (len(lengths), seq_len), generator=generator)
    mask = torch.arange(seq_len).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return emissions, tags.masked_fill(~mask, -100), mask


def make_crf(num_tags: int, seed: int) -> CRF:
    torch.manual_seed(seed)
    crf = CRF(num_tags)
    with torch.no_grad():
        # Wider than the default init so transitions actually matter for the argmax.
        for parameter in crf.parameters():
            parameter.uniform_(-2.0, 2.0)
    return crf


LENGTH_CASES = [[1], [2], [4], [4, 1, 3, 2], [3, 3]]


def test_init_shapes_and_range() -> None:
    crf = CRF(5)
    assert crf.start_transitions.shape == (5,)
    assert crf.end_transitions.shape == (5,)
    assert crf.transitions.shape == (5, 5)
    for parameter in crf.parameters():
        assert parameter.abs().max() <= 0.1


@pytest.mark.parametrize("lengths", LENGTH_CASES)
def test_viterbi_matches_brute_force(lengths: list[int]) -> None:
    num_tags = 3
    crf = make_crf(num_tags, seed=len(lengths) * 10 + max(lengths))
    emissions, _, mask = random_batch(lengths, num_tags, seed=sum(lengths))
    best_tags, best_scores = crf.decode(emissions, mask)
    assert best_tags.dtype == torch.long and best_tags.shape == mask.shape
    assert best_scores.shape == (len(lengths),)
    for row, length in enumerate(lengths):
        scores = brute_force_path_scores(crf, emissions[row], length)
        expected_path = max(scores, key=scores.get)
        assert tuple(best_tags[row, :length].tolist()) == expected_path
        assert best_tags[row, length:].eq(0).all()
        assert best_scores[row].item() == pytest.approx(scores[expected_path], abs=1e-4)


@pytest.mark.parametrize("lengths", LENGTH_CASES)
def test_negative_log_likelihood_matches_brute_force(lengths: list[int]) -> None:
    num_tags = 3
    crf = make_crf(num_tags, seed=7 + len(lengths))
    emissions, tags, mask = random_batch(lengths, num_tags, seed=100 + sum(lengths))
    expected_losses = []
    for row, length in enumerate(lengths):
        scores = brute_force_path_scores(crf, emissions[row], length)
        log_partition = torch.logsumexp(torch.tensor(list(scores.values()), dtype=torch.float64), dim=0)
        gold_path = tuple(tags[row, :length].tolist())
        expected = float(log_partition) - scores[gold_path]
        expected_losses.append(expected)
        single_row_loss = crf(emissions[row : row + 1], tags[row : row + 1], mask[row : row + 1])
        assert single_row_loss.item() == pytest.approx(expected, abs=1e-4)
    batch_loss = crf(emissions, tags, mask)
    assert batch_loss.dim() == 0
    assert batch_loss.item() == pytest.approx(sum(expected_losses) / len(lengths), abs=1e-4)


@pytest.mark.parametrize("lengths", LENGTH_CASES)
def test_marginals_match_brute_force(lengths: list[int]) -> None:
    num_tags = 3
    crf = make_crf(num_tags, seed=21 + len(lengths))
    emissions, _, mask = random_batch(lengths, num_tags, seed=200 + sum(lengths))
    marginals = crf.marginals(emissions, mask)
    assert marginals.shape == emissions.shape
    for row, length in enumerate(lengths):
        scores = brute_force_path_scores(crf, emissions[row], length)
        paths = list(scores)
        probabilities = torch.softmax(torch.tensor([scores[path] for path in paths], dtype=torch.float64), dim=0)
        expected = torch.zeros(length, num_tags, dtype=torch.float64)
        for path, probability in zip(paths, probabilities):
            for position, tag in enumerate(path):
                expected[position, tag] += probability
        torch.testing.assert_close(marginals[row, :length].double(), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(marginals[row, :length].sum(dim=1), torch.ones(length), atol=1e-5, rtol=0)
        assert marginals[row, length:].eq(0).all()


def test_empty_rows_give_zero_loss_and_no_nan() -> None:
    crf = make_crf(4, seed=3)
    emissions, tags, mask = random_batch([3, 1], 4, seed=5)
    emissions = torch.cat([emissions, torch.full((1, 3, 4), float("nan"))]).requires_grad_(True)
    tags = torch.cat([tags, torch.full((1, 3), -100)])
    mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)])

    loss = crf(emissions, tags, mask)
    reference = crf(emissions[:2].detach(), tags[:2], mask[:2])
    # The empty row adds 0 to the sum but still counts in the batch mean.
    assert loss.item() == pytest.approx(reference.item() * 2 / 3, abs=1e-5)
    loss.backward()
    assert torch.isfinite(emissions.grad).all()
    assert all(torch.isfinite(parameter.grad).all() for parameter in crf.parameters())

    best_tags, best_scores = crf.decode(emissions.detach(), mask)
    assert best_tags[2].eq(0).all() and best_scores[2].item() == 0.0
    assert crf.marginals(emissions.detach(), mask)[2].eq(0).all()

    all_empty_loss = crf(emissions[2:], tags[2:], mask[2:])
    assert all_empty_loss.item() == 0.0


def test_half_precision_emissions_are_scored_in_float32() -> None:
    crf = make_crf(3, seed=11)
    emissions, tags, mask = random_batch([4, 2], 3, seed=12)
    for low_precision in (torch.float16, torch.bfloat16):
        low_precision_emissions = emissions.to(low_precision)
        loss = crf(low_precision_emissions, tags, mask)
        assert loss.dtype == torch.float32
        expected = crf(low_precision_emissions.float(), tags, mask)
        assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
        assert crf.marginals(low_precision_emissions, mask).dtype == torch.float32
        assert crf.decode(low_precision_emissions, mask)[1].dtype == torch.float32


def test_non_prefix_mask_is_rejected() -> None:
    crf = CRF(3)
    mask = torch.tensor([[True, False, True]])
    with pytest.raises(ValueError):
        crf.decode(torch.zeros(1, 3, 3), mask)


def test_training_crf_alone_lowers_loss_and_learns_transitions() -> None:
    # Emissions carry no information, so the alternating 0,1,2,0,1,2 pattern can
    # only be learned through start and transition scores.
    torch.manual_seed(0)
    crf = CRF(3)
    batch_size, seq_len = 8, 6
    emissions = torch.zeros(batch_size, seq_len, 3)
    tags = (torch.arange(seq_len) % 3).repeat(batch_size, 1)  # (batch, seq)
    lengths = torch.randint(1, seq_len + 1, (batch_size,))
    mask = torch.arange(seq_len).unsqueeze(0) < lengths.unsqueeze(1)
    optimizer = torch.optim.SGD(crf.parameters(), lr=0.5)

    initial_loss = crf(emissions, tags, mask).item()
    for _ in range(100):
        optimizer.zero_grad()
        loss = crf(emissions, tags, mask)
        loss.backward()
        optimizer.step()
    final_loss = crf(emissions, tags, mask).item()

    assert final_loss < 0.25 * initial_loss
    best_tags, _ = crf.decode(emissions, mask)
    assert torch.equal(best_tags, tags.masked_fill(~mask, 0))


def test_iob2_transition_mask() -> None:
    allowed, allowed_start = iob2_transition_mask(IOB2_LABELS)
    index = {label: position for position, label in enumerate(IOB2_LABELS)}
    assert allowed.dtype == torch.bool and allowed.shape == (5, 5)
    assert allowed_start.tolist() == [True, True, False, True, False]
    for previous in IOB2_LABELS:
        for following in IOB2_LABELS:
            expected = not following.startswith("I-") or previous in (
                "B-" + following[2:],
                "I-" + following[2:],
            )
            assert allowed[index[previous], index[following]].item() == expected, (previous, following)


def test_constrained_decoding_emits_valid_iob2() -> None:
    torch.manual_seed(4)
    crf = CRF(len(IOB2_LABELS))
    crf.constrain(*iob2_transition_mask(IOB2_LABELS))
    lengths = [7, 1, 5, 7, 3, 6] * 5
    emissions, _, mask = random_batch(lengths, len(IOB2_LABELS), seed=9)
    # Push the emissions toward I- tags so an unconstrained decoder would emit them after O.
    emissions[:, :, [2, 4]] += 3.0
    best_tags, _ = crf.decode(emissions, mask)
    unconstrained_tags, _ = CRF(len(IOB2_LABELS)).decode(emissions, mask)

    def invalid_steps(tag_rows: torch.Tensor) -> int:
        count = 0
        for row, length in enumerate(lengths):
            names = ["O"] + [IOB2_LABELS[tag] for tag in tag_rows[row, :length].tolist()]
            for previous, following in zip(names, names[1:]):
                if following.startswith("I-") and previous not in ("B-" + following[2:], "I-" + following[2:]):
                    count += 1
        return count

    assert invalid_steps(unconstrained_tags) > 0  # the check below is not vacuous
    assert invalid_steps(best_tags) == 0


def test_constrained_viterbi_matches_brute_force_over_allowed_paths() -> None:
    crf = make_crf(len(IOB2_LABELS), seed=17)
    crf.constrain(*iob2_transition_mask(IOB2_LABELS))
    emissions, _, mask = random_batch([4, 2], len(IOB2_LABELS), seed=18)
    best_tags, best_scores = crf.decode(emissions, mask)
    for row, length in enumerate([4, 2]):
        scores = brute_force_path_scores(crf, emissions[row], length)
        expected_path = max(scores, key=scores.get)
        assert tuple(best_tags[row, :length].tolist()) == expected_path
        assert best_scores[row].item() == pytest.approx(scores[expected_path], abs=1e-3)


def test_constraints_survive_state_dict_round_trip() -> None:
    crf = CRF(len(IOB2_LABELS))
    crf.constrain(*iob2_transition_mask(IOB2_LABELS))
    reloaded = CRF(len(IOB2_LABELS))
    reloaded.load_state_dict(crf.state_dict())
    assert torch.equal(reloaded.transition_penalty, crf.transition_penalty)
    assert reloaded.start_penalty[IOB2_LABELS.index("I-PER")].item() == -10000.0
