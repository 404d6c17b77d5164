"""The objectives against hand-computed values, their limits, gradient directions and masking."""

import math

import pytest
import torch

from spin_ray.losses import sequence_logps, sft_loss, spin_loss, token_logps


def _logits_from_probs(rows):
    return torch.log(torch.tensor(rows, dtype=torch.float32))


@pytest.fixture
def handmade():
    # One sequence of 3 tokens over a 3-token vocabulary. Position 0 predicts token 1 with p=0.25,
    # position 1 predicts token 2 with p=0.7; position 2's logits predict past the end (unused).
    logits = _logits_from_probs([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]]])
    labels = torch.tensor([[0, 1, 2]])
    return logits, labels


def test_sequence_logps_sums_only_masked_response_tokens(handmade):
    logits, labels = handmade
    both = sequence_logps(logits, labels, torch.tensor([[0, 1, 1]]))
    assert both.item() == pytest.approx(math.log(0.25) + math.log(0.7), abs=1e-6)
    last = sequence_logps(logits, labels, torch.tensor([[0, 0, 1]]))
    assert last.item() == pytest.approx(math.log(0.7), abs=1e-6)


def test_sequence_logps_average_divides_by_response_tokens(handmade):
    logits, labels = handmade
    mean = sequence_logps(logits, labels, torch.tensor([[0, 1, 1]]), average=True)
    assert mean.item() == pytest.approx((math.log(0.25) + math.log(0.7)) / 2, abs=1e-6)


def test_masked_positions_do_not_matter_but_response_tokens_do():
    torch.manual_seed(0)
    batch, length, vocab = 2, 9, 11
    logits = torch.randn(batch, length, vocab)
    labels = torch.randint(0, vocab, (batch, length))
    # Rows: 3 prompt tokens, 4 response tokens, 2 padding tokens.
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, 3:7] = True
    reference = sequence_logps(logits, labels, mask)

    perturbed_logits, perturbed_labels = logits.clone(), labels.clone()
    perturbed_labels[:, :3] = torch.randint(0, vocab, (batch, 3))  # prompt tokens
    perturbed_labels[:, 7:] = -100  # padding labels, even invalid ids
    perturbed_logits[:, :2] += 5 * torch.randn(batch, 2, vocab)  # logits predicting prompt tokens
    perturbed_logits[:, 6:] += 5 * torch.randn(batch, 3, vocab)  # logits predicting padding / past the end
    assert torch.allclose(sequence_logps(perturbed_logits, perturbed_labels, mask), reference)

    changed = labels.clone()
    changed[:, 5] = (changed[:, 5] + 1) % vocab  # a response token
    assert not torch.allclose(sequence_logps(logits, changed, mask), reference)


def test_prompt_tokens_cannot_leak_through_a_real_model(tiny_model, tokenizer):
    """Perturbing prompt tokens changes the conditioning, not which tokens are summed: only response
    positions count, so a sequence whose response mask is empty scores exactly 0."""
    from spin_ray.tokenization import collate_sequences

    batch = collate_sequences([[5, 6, 7, 8]], [[9, 10, 11]], tokenizer.pad_token_id)
    logits = tiny_model(input_ids=batch["input_ids"]).logits
    empty = torch.zeros_like(batch["loss_mask"])
    assert sequence_logps(logits, batch["input_ids"], empty).item() == 0.0
    scored = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
    per_token, mask = token_logps(logits, batch["input_ids"], batch["loss_mask"])
    assert mask.sum().item() == 3  # the three response tokens, nothing of the prompt or padding
    assert scored.item() == pytest.approx(per_token[mask].sum().item(), abs=1e-5)


def _pair(policy_real=-10.0, policy_generated=-12.0, ref_real=-11.0, ref_generated=-11.0):
    return [torch.tensor([v]) for v in (policy_real, policy_generated, ref_real, ref_generated)]


def test_spin_sigmoid_hand_computed():
    # h = (-10 + 11) - (-12 + 11) = 2; beta * h = 0.2
    losses, metrics = spin_loss(*_pair(), beta=0.1, loss_type="sigmoid")
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-6)
    assert metrics["rewards/real"].item() == pytest.approx(0.1, abs=1e-6)
    assert metrics["rewards/generated"].item() == pytest.approx(-0.1, abs=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx(0.2, abs=1e-6)
    assert metrics["rewards/accuracies"].item() == 1.0
    assert metrics["logps/real"].item() == -10.0
    assert metrics["logps/generated"].item() == -12.0


def test_spin_hinge_and_ipo_hand_computed():
    hinge, _ = spin_loss(*_pair(), beta=0.1, loss_type="hinge")
    assert hinge.item() == pytest.approx(0.8, abs=1e-6)  # max(0, 1 - 0.2)
    saturated, _ = spin_loss(*_pair(policy_real=0.0), beta=0.1, loss_type="hinge")
    assert saturated.item() == 0.0  # h = 12 -> 1 - 1.2 < 0
    ipo, _ = spin_loss(*_pair(), beta=0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx((2 - 5) ** 2, abs=1e-5)  # (h - 1/(2 beta))^2


def test_real_equal_generated_gives_zero_margin_and_log2():
    logps = torch.tensor([-7.5, -3.0, -20.0])
    refs = torch.tensor([-8.0, -2.0, -19.0])
    losses, metrics = spin_loss(logps, logps, refs, refs, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))
    assert metrics["rewards/margins"].item() == 0.0
    assert metrics["rewards/accuracies"].item() == 0.0  # a tie is not a win


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_gradient_raises_real_and_lowers_generated(loss_type):
    policy_real = torch.tensor([-10.0, -4.0], requires_grad=True)
    policy_generated = torch.tensor([-10.0, -5.0], requires_grad=True)
    refs = torch.tensor([-10.0, -4.5])
    losses, _ = spin_loss(policy_real, policy_generated, refs, refs, beta=0.1, loss_type=loss_type)
    losses.sum().backward()
    # Gradient descent moves against the gradient: real log-probs go up, generated go down.
    assert (policy_real.grad < 0).all()
    assert (policy_generated.grad > 0).all()


def test_unknown_loss_type_is_rejected():
    with pytest.raises(ValueError, match="unknown SPIN loss_type 'kto'"):
        spin_loss(*_pair(), loss_type="kto")


def test_sft_loss_is_token_averaged_nll(handmade):
    logits, labels = handmade
    loss, metrics = sft_loss(logits, labels, torch.tensor([[0, 1, 1]]))
    assert loss.item() == pytest.approx(-(math.log(0.25) + math.log(0.7)) / 2, abs=1e-6)
    assert metrics["tokens"].item() == 2
    # Token-averaged over the batch, not averaged per sequence: a longer answer weighs more.
    two = torch.cat([logits, logits]), torch.cat([labels, labels]), torch.tensor([[0, 1, 1], [0, 0, 1]])
    loss2, _ = sft_loss(*two)
    expected = -(math.log(0.25) + 2 * math.log(0.7)) / 3
    assert loss2.item() == pytest.approx(expected, abs=1e-6)


def test_sft_loss_refuses_an_empty_mask(handmade):
    logits, labels = handmade
    with pytest.raises(ValueError, match="no response tokens"):
        sft_loss(logits, labels, torch.zeros_like(labels))
