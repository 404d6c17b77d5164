"""The objectives against hand-computed values, their limits, gradient directions and masking."""

import math

import pytest
import torch

from spin_ray.losses import sequence_logps, sft_loss, spin_loss, sppo_loss, token_logps, tspin_loss


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


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_sppo_loss_matches_hand_computed_values():
    # a = -9.5 - (-10) = 0.5, b = -20.2 - (-20) = -0.2; beta 0.001 -> eta 1000
    # targets: 1000 * (0.75 - 0.5) = 250 and 1000 * (0.25 - 0.5) = -250
    losses, metrics = sppo_loss(_t(-9.5), _t(-20.2), _t(-10.0), _t(-20.0), _t(0.75), _t(0.25), beta=0.001)
    expected = ((0.5 - 250) ** 2 + (-0.2 + 250) ** 2) / 2
    assert losses.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["rewards/winner"].item() == pytest.approx(0.0005)
    assert metrics["rewards/loser"].item() == pytest.approx(-0.0002)
    assert metrics["rewards/margins"].item() == pytest.approx(0.0007)
    assert metrics["rewards/accuracies"].item() == 1.0
    assert metrics["win_rate/winner"].item() == 0.75 and metrics["logps/loser"].item() == pytest.approx(-20.2)


def test_sppo_equal_win_rates_give_zero_targets():
    # P_w = P_l = 1/2: both targets are 0, so the loss is (a^2 + b^2) / 2 whatever beta is
    for beta in (0.001, 0.1):
        losses, _ = sppo_loss(_t(-9.0, -5.0), _t(-21.0, -5.0), _t(-10.0, -5.0), _t(-20.0, -5.0),
                              _t(0.5, 0.5), _t(0.5, 0.5), beta=beta)
        assert losses.tolist() == pytest.approx([(1.0 ** 2 + (-1.0) ** 2) / 2, 0.0])


def test_sppo_gradient_moves_log_ratios_toward_their_targets():
    winner = torch.tensor([-10.0], requires_grad=True)
    loser = torch.tensor([-20.0], requires_grad=True)
    losses, _ = sppo_loss(winner, loser, torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([0.6]),
                          torch.tensor([0.4]), beta=0.01)
    losses.sum().backward()
    # targets +10 and -10 nats: raise the winner's log-prob, lower the loser's
    assert winner.grad.item() == pytest.approx(-10.0) and loser.grad.item() == pytest.approx(10.0)


def test_tspin_reference_free_loss_matches_hand_computed_values():
    # r = 0.5 * lp: r(y) = -5, r(y_t) = -4, r(y_0) = -6
    losses, metrics = tspin_loss(_t(-10.0), _t(-8.0), _t(-12.0), alpha=0.5, reward_scale=0.5)
    current = -math.log(1 / (1 + math.exp(-(-5.0 + 4.0))))
    historical = -math.log(1 / (1 + math.exp(-(-4.0 + 6.0))))
    assert losses.item() == pytest.approx(current + 0.5 * historical, rel=1e-12)
    assert metrics["loss/current"].item() == pytest.approx(current)
    assert metrics["loss/historical"].item() == pytest.approx(historical)
    assert metrics["rewards/margins"].item() == pytest.approx(-1.0)
    assert metrics["rewards/historical_margins"].item() == pytest.approx(2.0)
    assert metrics["rewards/accuracies"].item() == 0.0 and metrics["rewards/proto"].item() == pytest.approx(-6.0)


def test_tspin_with_reference_uses_log_ratios_and_alpha_zero_is_spin():
    policy, ref = (_t(-10.0), _t(-8.0), _t(-12.0)), (_t(-11.0), _t(-7.0), _t(-12.5))
    losses, _ = tspin_loss(*policy, *ref, alpha=1.0, reward_scale=0.1)
    # ratios 1, -1, 0.5: current -log s(0.1 * 2), historical -log s(0.1 * -1.5)
    expected = -math.log(1 / (1 + math.exp(-0.2))) - math.log(1 / (1 + math.exp(0.15)))
    assert losses.item() == pytest.approx(expected, rel=1e-12)
    # alpha 0 leaves SPIN's sigmoid loss with beta = lambda
    spin, _ = spin_loss(policy[0], policy[1], ref[0], ref[1], beta=0.1)
    no_history, _ = tspin_loss(*policy, *ref, alpha=0.0, reward_scale=0.1)
    assert no_history.item() == pytest.approx(spin.item(), rel=1e-12)
    with pytest.raises(ValueError, match="all three"):
        tspin_loss(*policy, ref[0], None, None)


def test_tspin_historical_term_keeps_a_gradient_when_the_current_advantage_vanishes():
    # y and y_t equally likely: SPIN's signal is the constant log 2; T-SPIN still pushes y_t above y_0
    generated = torch.tensor([-10.0], requires_grad=True)
    proto = torch.tensor([-10.0], requires_grad=True)
    losses, _ = tspin_loss(torch.tensor([-10.0]), generated, proto, alpha=1.0, reward_scale=1.0)
    losses.sum().backward()
    assert proto.grad.item() > 0  # lower y_0
    assert generated.grad.item() == pytest.approx(0.0)  # current (+0.5) and historical (-0.5) pulls cancel here


def test_linear_token_logps_matches_full_logits_and_its_gradients_are_exact():
    from spin_ray.losses import gathered_logps, linear_token_logps

    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 50, (37,))
    logits = hidden @ weight.T
    expected = torch.gather(logits, -1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    assert torch.allclose(gathered_logps(logits, tokens).double(), expected, atol=1e-5)  # same quantity, fp32
    for chunk_rows in (1, 8, 37, 100):
        assert torch.allclose(linear_token_logps(hidden, weight, tokens, chunk_rows), expected, atol=1e-12)
    # analytic backward (recomputed per chunk) against finite differences
    assert torch.autograd.gradcheck(lambda h, w: linear_token_logps(h, w, tokens, 8), (hidden, weight))
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_token_logps(hidden, weight, tokens, 0)


def test_linear_token_logps_keeps_fp32_for_bf16_inputs():
    from spin_ray.losses import linear_token_logps

    hidden, weight = torch.randn(5, 8).bfloat16(), torch.randn(11, 8).bfloat16()
    out = linear_token_logps(hidden, weight, torch.randint(0, 11, (5,)), 2)
    assert out.dtype == torch.float32 and bool((out < 0).all())
