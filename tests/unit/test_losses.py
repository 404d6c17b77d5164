"""The objectives against hand-computed values, their limits, gradient directions and masking."""

import math

import pytest
import torch

from spin_ray.objectives.losses import sft_loss, spin_loss, sppo_loss, tspin_loss


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
    one = torch.tensor([1.0])
    ipo, _ = spin_loss(*_pair(), beta=0.1, loss_type="ipo", real_tokens=one, generated_tokens=one)
    assert ipo.item() == pytest.approx((2 - 5) ** 2, abs=1e-5)  # (h - 1/(2 beta))^2


def test_ipo_averages_per_token_in_the_loss_and_reports_summed_rewards_as_trl():
    # log-ratios 1 (human, 2 tokens) and -1 (generated, 4 tokens): h_tok = 1/2 + 1/4 = 0.75
    ipo, metrics = spin_loss(*_pair(), beta=0.1, loss_type="ipo", real_tokens=torch.tensor([2.0]),
                             generated_tokens=torch.tensor([4.0]))
    assert ipo.item() == pytest.approx((0.75 - 5) ** 2, abs=1e-5)
    # rewards are beta x summed log-ratios whatever the loss, as TRL's rewards/chosen and rewards/rejected
    assert metrics["rewards/real"].item() == pytest.approx(0.1) and metrics[
        "rewards/generated"
    ].item() == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="answer lengths"):
        spin_loss(*_pair(), beta=0.1, loss_type="ipo")


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
    lengths = torch.tensor([3.0, 5.0])
    losses, _ = spin_loss(policy_real, policy_generated, refs, refs, beta=0.1, loss_type=loss_type,
                          real_tokens=lengths, generated_tokens=lengths)
    losses.sum().backward()
    # Gradient descent moves against the gradient: real log-probs go up, generated go down.
    assert (policy_real.grad < 0).all()
    assert (policy_generated.grad > 0).all()


def test_unknown_loss_type_is_rejected():
    with pytest.raises(ValueError, match="unknown SPIN loss_type 'kto'"):
        spin_loss(*_pair(), loss_type="kto")


def test_sft_loss_is_the_summed_nll_and_reports_it_per_token():
    logps = torch.tensor([math.log(0.25) + math.log(0.7), math.log(0.7)])  # two answers of 2 and 1 tokens
    losses, metrics = sft_loss(logps, torch.tensor([2.0, 1.0]))
    assert losses.tolist() == pytest.approx([-logps[0].item(), -logps[1].item()])
    # per token over the batch, not per answer: a longer answer weighs more
    assert metrics["nll"].item() == pytest.approx(-(math.log(0.25) + 2 * math.log(0.7)) / 3, abs=1e-6)
    with pytest.raises(ValueError, match="no tokens"):
        sft_loss(torch.tensor([0.0]), torch.tensor([0.0]))


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


def test_tspin_defaults_are_the_papers_and_match_its_formula():
    # arXiv 2601.08198 Sec. 4.3: alpha (reward scale) 1.0, beta (historical weight) 0.1, summed log-probs.
    # lp(y) = -30, lp(y_t) = -25, lp(y_0) = -40: r = lp, so current = -log s(-5), historical = -log s(15)
    losses, _ = tspin_loss(_t(-30.0), _t(-25.0), _t(-40.0))
    expected = math.log1p(math.exp(5.0)) + 0.1 * math.log1p(math.exp(-15.0))
    assert losses.item() == pytest.approx(expected, rel=1e-12)


def test_tspin_reference_free_loss_matches_hand_computed_values():
    # r = 0.5 * lp: r(y) = -5, r(y_t) = -4, r(y_0) = -6
    losses, metrics = tspin_loss(_t(-10.0), _t(-8.0), _t(-12.0), historical_weight=0.5, reward_scale=0.5)
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
    losses, _ = tspin_loss(*policy, *ref, historical_weight=1.0, reward_scale=0.1)
    # ratios 1, -1, 0.5: current -log s(0.1 * 2), historical -log s(0.1 * -1.5)
    expected = -math.log(1 / (1 + math.exp(-0.2))) - math.log(1 / (1 + math.exp(0.15)))
    assert losses.item() == pytest.approx(expected, rel=1e-12)
    # historical weight 0 leaves SPIN's sigmoid loss with beta = the reward scale
    spin, _ = spin_loss(policy[0], policy[1], ref[0], ref[1], beta=0.1)
    no_history, _ = tspin_loss(*policy, *ref, historical_weight=0.0, reward_scale=0.1)
    assert no_history.item() == pytest.approx(spin.item(), rel=1e-12)
    with pytest.raises(ValueError, match="all three"):
        tspin_loss(*policy, ref[0], None, None)


def test_tspin_historical_term_keeps_a_gradient_when_the_current_advantage_vanishes():
    # y and y_t equally likely: SPIN's signal is the constant log 2; T-SPIN still pushes y_t above y_0
    generated = torch.tensor([-10.0], requires_grad=True)
    proto = torch.tensor([-10.0], requires_grad=True)
    losses, _ = tspin_loss(torch.tensor([-10.0]), generated, proto, historical_weight=1.0, reward_scale=1.0)
    losses.sum().backward()
    assert proto.grad.item() > 0  # lower y_0
    assert generated.grad.item() == pytest.approx(0.0)  # current (+0.5) and historical (-0.5) pulls cancel here


def test_nll_weight_adds_rpos_per_token_nll_of_the_human_answer():
    # two pairs; human answers of 5 and 2 tokens with summed log-probs -10 and -6: per-token NLL 2 and 3
    policy_real, policy_generated = torch.tensor([-10.0, -6.0]), torch.tensor([-12.0, -9.0])
    ref_real, ref_generated = torch.tensor([-11.0, -6.5]), torch.tensor([-11.0, -8.0])
    tokens = dict(real_tokens=torch.tensor([5.0, 2.0]), generated_tokens=torch.tensor([7.0, 3.0]))
    plain, _ = spin_loss(policy_real, policy_generated, ref_real, ref_generated, beta=0.1, **tokens)
    rpo, metrics = spin_loss(policy_real, policy_generated, ref_real, ref_generated, beta=0.1, nll_weight=0.5, **tokens)
    h = torch.tensor([(-10 + 11) - (-12 + 11), (-6 + 6.5) - (-9 + 8)])  # 2.0 and 1.5
    expected = -torch.nn.functional.logsigmoid(0.1 * h) + 0.5 * torch.tensor([2.0, 3.0])
    assert torch.allclose(rpo, expected, atol=1e-6) and torch.allclose(rpo - plain, torch.tensor([1.0, 1.5]))
    assert metrics["nll/real"].item() == pytest.approx(2.5) and metrics["loss"].item() == pytest.approx(
        expected.mean().item()
    )
    with pytest.raises(ValueError, match="need real_tokens"):
        spin_loss(policy_real, policy_generated, ref_real, ref_generated, nll_weight=0.5)


def test_length_normalize_divides_each_log_ratio_by_its_answers_tokens():
    # log-ratios +1 over a 2-token human answer and -1 over a 4-token generated one: h = 1/2 + 1/4
    losses, metrics = spin_loss(*_pair(), beta=0.1, length_normalize=True, real_tokens=torch.tensor([2.0]),
                                generated_tokens=torch.tensor([4.0]))
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.1 * 0.75))), abs=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx(0.2)  # rewards stay beta x summed log-ratios
    # a longer opponent answer with the same per-token log-ratio earns it nothing more
    longer, _ = spin_loss(*_pair(policy_generated=-13.0), beta=0.1, length_normalize=True,
                          real_tokens=torch.tensor([2.0]), generated_tokens=torch.tensor([8.0]))
    assert longer.item() == pytest.approx(losses.item(), abs=1e-6)


def test_dpop_penalises_the_human_answer_falling_below_the_opponent():
    # r = -12 - (-11) = -1 (the human answer lost likelihood), g = -14 - (-11) = -3: h = r - g - lambda * 1
    args = _pair(policy_real=-12.0, policy_generated=-14.0)
    losses, metrics = spin_loss(*args, beta=0.1, dpop_lambda=5.0)
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.1 * (2 - 5)))), abs=1e-6)
    assert metrics["dpop/penalty"].item() == pytest.approx(5.0)
    raised, _ = spin_loss(*_pair(policy_real=-10.0, policy_generated=-12.0), beta=0.1, dpop_lambda=5.0)
    plain, _ = spin_loss(*_pair(policy_real=-10.0, policy_generated=-12.0), beta=0.1)
    assert raised.item() == pytest.approx(plain.item())  # no penalty while the human answer's log-ratio is >= 0
    policy_real = torch.tensor([-12.0], requires_grad=True)
    spin_loss(policy_real, torch.tensor([-14.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), dpop_lambda=5.0)[
        0
    ].backward()
    free = torch.tensor([-12.0], requires_grad=True)
    spin_loss(free, torch.tensor([-14.0]), torch.tensor([-11.0]), torch.tensor([-11.0]))[0].backward()
    assert policy_real.grad.item() < free.grad.item() < 0  # a stronger push up on the human answer


def test_tspin_nll_weight_adds_the_same_term():
    real, generated, proto = torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-15.0])
    plain, _ = tspin_loss(real, generated, proto)
    rpo, metrics = tspin_loss(real, generated, proto, nll_weight=0.25, real_tokens=torch.tensor([4.0]))
    assert rpo.item() == pytest.approx(plain.item() + 0.25 * 2.5) and metrics["nll/real"].item() == pytest.approx(2.5)
