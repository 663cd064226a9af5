"""Tests of align.losses.policy: advantages, the five policy losses, off-policy corrections, KL.

Tensor legend: b sequences, t completion-token positions.
Hand-worked examples choose each token's ratio r and set the behaviour logprob to log pi - ln r,
so every docstring's arithmetic is over simple decimals; padding holds NaN / inf on purpose.
Expected values never come from the code under test: `reference_loss` at the end of the file is
a plain-Python loop over sequences and tokens written from the formulas.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from align.config import ConfigError, from_dict
from align.losses.policy import PolicyLossSettings, advantages, policy_loss

LN = math.log
NAN = math.nan
INF = math.inf
KINDS = ("grpo", "dapo", "dr_grpo", "gspo", "cispo")
CORRECTIONS = ("decoupled", "tis", "none")
# The documented defaults, written out independently of the module's table.
DOCUMENTED_CLIPS = {
    "grpo": (0.2, 0.2),
    "dr_grpo": (0.2, 0.2),
    "dapo": (0.2, 0.28),
    "gspo": (3e-4, 4e-4),
    "cispo": (INF, 4.0),
}
METRIC_KEYS = {
    "policy/clip_fraction",
    "policy/clip_fraction_low",
    "policy/clip_fraction_high",
    "policy/ratio_mean",
    "policy/is_weight_mean",
    "policy/is_weight_max",
    "policy/behaviour_gap",
}


def _settings(**kwargs) -> PolicyLossSettings:
    return from_dict(PolicyLossSettings, kwargs)


def _batch(logp_rows, log_ratio_rows, dtype=torch.float64):
    """logp (leaf, with grad), behav = logp - ln r, mask; None marks padding (NaN / -inf there)."""
    mask_bt = torch.tensor([[x is not None for x in row] for row in logp_rows], dtype=dtype)
    logp_bt = torch.tensor(
        [[NAN if x is None else x for x in row] for row in logp_rows], dtype=dtype
    )
    behav_bt = torch.tensor(
        [
            [-INF if lp is None else lp - lr for lp, lr in zip(lps, lrs, strict=True)]
            for lps, lrs in zip(logp_rows, log_ratio_rows, strict=True)
        ],
        dtype=dtype,
    )
    return logp_bt.requires_grad_(), behav_bt, mask_bt


def _run(settings, logp_bt, behav_bt, adv, mask_bt, prox_bt=None, **kwargs):
    """policy_loss with prox = behav unless given; returns (output, grad of logp_bt)."""
    prox_bt = behav_bt if prox_bt is None else prox_bt
    adv_b = torch.tensor(adv, dtype=torch.float64)
    out = policy_loss(settings, logp_bt, prox_bt, behav_bt, adv_b, mask_bt, **kwargs)
    (grad_bt,) = torch.autograd.grad(out.loss, logp_bt)
    return out, grad_bt


def _close(actual, expected, tol=1e-12):
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=actual.dtype), rtol=0, atol=tol, equal_nan=False
    )


# The shared tiny batch: 2 sequences x 3 tokens, the last token of sequence 1 padded.
#   ratios r:   seq 0 [1.1, 0.7, 1.3]   A_0 = +1
#               seq 1 [1.5, 0.6, pad]   A_1 = -1
TINY_LOGP = [[-1.0, -2.0, -0.5], [-1.0, -3.0, None]]
TINY_RATIOS = [[1.1, 0.7, 1.3], [1.5, 0.6, None]]
TINY_ADV = [1.0, -1.0]


def _tiny():
    log_ratios = [[None if r is None else LN(r) for r in row] for row in TINY_RATIOS]
    return _batch(TINY_LOGP, log_ratios)


# --- hand-worked losses, one kind at a time -------------------------------------------------------


def test_grpo_hand_worked_with_low_and_high_clipping():
    """e = 0.2, correction "none" (r = pi / pi_behav, w = 1). min(r A, clip(r) A) per token:
    seq 0 (A = +1): 1.1 -> 1.1; 0.7 -> min(0.7, 0.8) = 0.7 (below 1 - e but A > 0: not clipped);
                    1.3 -> min(1.3, 1.2) = 1.2 (high clip active). Token mean 3.0 / 3 = 1.0.
    seq 1 (A = -1): 1.5 -> min(-1.5, -1.2) = -1.5 (above 1 + e but A < 0: not clipped);
                    0.6 -> min(-0.6, -0.8) = -0.8 (low clip active). Token mean -2.3 / 2 = -1.15.
    L = -(1.0 - 1.15) / 2 = 0.075.
    dL/dlogp_it = -A_i r_it / (N |o_i|) where not clipped, else 0:
        seq 0: -1.1/6, -0.7/6, 0;  seq 1: 1.5/4 = 0.375, 0, 0 (padding).
    Clip fraction 2/5 (1/5 low, 1/5 high); ratio mean 5.2 / 5 = 1.04.
    """
    logp_bt, behav_bt, mask_bt = _tiny()
    out, grad_bt = _run(_settings(correction="none"), logp_bt, behav_bt, TINY_ADV, mask_bt)
    _close(out.loss, 0.075)
    _close(grad_bt, [[-1.1 / 6, -0.7 / 6, 0.0], [0.375, 0.0, 0.0]])
    assert out.metrics["policy/clip_fraction"] == pytest.approx(0.4)
    assert out.metrics["policy/clip_fraction_low"] == pytest.approx(0.2)
    assert out.metrics["policy/clip_fraction_high"] == pytest.approx(0.2)
    assert out.metrics["policy/ratio_mean"] == pytest.approx(1.04)
    assert out.metrics["policy/is_weight_mean"] == out.metrics["policy/is_weight_max"] == 1.0


def test_grpo_hand_worked_without_clipping():
    """clip_low = clip_high = 0.9 (range [0.1, 1.9]): no token clipped, the min is r A throughout.
    L = -((1.1 + 0.7 + 1.3) / 3 - (1.5 + 0.6) / 2) / 2 = -(1.0333.. - 1.05) / 2 = 0.0083333..
    Gradients -A r / (N |o_i|): seq 0: -r/6; seq 1: +r/4.
    """
    logp_bt, behav_bt, mask_bt = _tiny()
    settings = _settings(correction="none", clip_low=0.9, clip_high=0.9)
    out, grad_bt = _run(settings, logp_bt, behav_bt, TINY_ADV, mask_bt)
    _close(out.loss, -((1.1 + 0.7 + 1.3) / 3 - (1.5 + 0.6) / 2) / 2)
    assert out.loss.item() == pytest.approx(1 / 120)
    _close(grad_bt, [[-1.1 / 6, -0.7 / 6, -1.3 / 6], [1.5 / 4, 0.6 / 4, 0.0]])
    assert out.metrics["policy/clip_fraction"] == 0.0


def test_dapo_hand_worked_token_mean_and_clip_higher():
    """e_low 0.2, e_high 0.28; one token mean over the T = 5 tokens of the batch.
    seq 0 (A = +1): 1.1, 0.7, min(1.3, 1.28) = 1.28 (high clip);  seq 1 (A = -1): -1.5,
    min(-0.6, -0.8) = -0.8 (low clip). Sum 1.1 + 0.7 + 1.28 - 1.5 - 0.8 = 0.78; L = -0.78 / 5
    = -0.156. Gradients -A r / T where not clipped: seq 0: -0.22, -0.14, 0; seq 1: 0.3, 0.
    """
    logp_bt, behav_bt, mask_bt = _tiny()
    out, grad_bt = _run(
        _settings(kind="dapo", correction="none"), logp_bt, behav_bt, TINY_ADV, mask_bt
    )
    _close(out.loss, -0.156)
    _close(grad_bt, [[-0.22, -0.14, 0.0], [0.3, 0.0, 0.0]])
    assert out.metrics["policy/clip_fraction"] == pytest.approx(0.4)


def test_clip_higher_lets_dapo_raise_a_ratio_grpo_clips():
    """One token, A = +1, r = 1.25: GRPO clips at 1.2 (L = -1.2, no gradient); DAPO's 1.28 does
    not (L = -1.25, gradient -r = -1.25). With A = -1 and r = 0.75 both clip low at 0.8:
    L = -min(-0.75, -0.8) = 0.8, no gradient.
    """
    for kind, loss, grad in (("grpo", -1.2, 0.0), ("dapo", -1.25, -1.25)):
        logp_bt, behav_bt, mask_bt = _batch([[-0.7]], [[LN(1.25)]])
        out, grad_bt = _run(
            _settings(kind=kind, correction="none"), logp_bt, behav_bt, [1.0], mask_bt
        )
        _close(out.loss, loss)
        _close(grad_bt, [[grad]])
        logp_bt, behav_bt, mask_bt = _batch([[-0.7]], [[LN(0.75)]])
        out, grad_bt = _run(
            _settings(kind=kind, correction="none"), logp_bt, behav_bt, [-1.0], mask_bt
        )
        _close(out.loss, 0.8)
        _close(grad_bt, [[0.0]])


def test_dr_grpo_hand_worked_constant_normaliser():
    """e = 0.2 as GRPO; L = -sum of clipped surrogates / (N * L_max), N = 2, L_max = 4:
    sum = 1.1 + 0.7 + 1.2 - 1.5 - 0.8 = 0.7, L = -0.7 / 8 = -0.0875.
    Gradients -A r / 8 where not clipped: seq 0: -0.1375, -0.0875, 0; seq 1: 0.1875, 0.
    The same batch with L_max = 7 divides by 14 instead: the normaliser ignores the lengths.
    """
    logp_bt, behav_bt, mask_bt = _tiny()
    settings = _settings(kind="dr_grpo", correction="none")
    out, grad_bt = _run(settings, logp_bt, behav_bt, TINY_ADV, mask_bt, max_completion_tokens=4)
    _close(out.loss, -0.0875)
    _close(grad_bt, [[-0.1375, -0.0875, 0.0], [0.1875, 0.0, 0.0]])
    out, _ = _run(settings, logp_bt, behav_bt, TINY_ADV, mask_bt, max_completion_tokens=7)
    _close(out.loss, -0.7 / 14)


# GSPO batch: 3 sequences; token log-ratios vary but only their mean matters.
#   seq 0 (A = +1): mean ln 1.0005 -> s = 1.0005 > 1 + 4e-4: clipped high
#   seq 1 (A = -1): mean ln 0.9999 -> s = 0.9999, inside (0.9997, 1.0004): not clipped
#   seq 2 (A = -1): mean ln 0.9995 -> s = 0.9995 < 1 - 3e-4: clipped low
GSPO_LOGP = [[-1.0, -2.0, -0.5], [-1.0, -3.0, None], [-0.2, -0.4, -0.6]]
GSPO_LOG_RATIOS = [
    [LN(1.0005) + 0.01, LN(1.0005) - 0.01, LN(1.0005)],
    [LN(0.9999) + 0.02, LN(0.9999) - 0.02, None],
    [LN(0.9995) + 0.003, LN(0.9995) - 0.001, LN(0.9995) - 0.002],
]
GSPO_ADV = [1.0, -1.0, -1.0]


def test_gspo_hand_worked_sequence_ratio_and_clip():
    """Default clip (3e-4, 4e-4). min(s A, clip(s) A) per sequence:
    seq 0: min(1.0005, 1.0004) = 1.0004;  seq 1: min(-0.9999, -0.9999) = -0.9999;
    seq 2: min(-0.9995, -0.9997) = -0.9997.  L = -(1.0004 - 0.9999 - 0.9997) / 3 = 0.9992 / 3.
    Gradient only through the unclipped seq 1: dL/dlogp_1t = -(1/N) A_1 s_1 / |o_1|
    = 0.9999 / 6 = 0.16665 for both of its tokens; 0 elsewhere.
    Clip fraction over sequences 2/3 (1/3 low, 1/3 high); ratio mean (1.0005 + 0.9999 + 0.9995) / 3.
    """
    logp_bt, behav_bt, mask_bt = _batch(GSPO_LOGP, GSPO_LOG_RATIOS)
    out, grad_bt = _run(
        _settings(kind="gspo", correction="none"), logp_bt, behav_bt, GSPO_ADV, mask_bt
    )
    _close(out.loss, 0.9992 / 3)
    _close(grad_bt, [[0.0, 0.0, 0.0], [0.9999 / 6, 0.9999 / 6, 0.0], [0.0, 0.0, 0.0]])
    assert out.metrics["policy/clip_fraction"] == pytest.approx(2 / 3)
    assert out.metrics["policy/clip_fraction_low"] == pytest.approx(1 / 3)
    assert out.metrics["policy/clip_fraction_high"] == pytest.approx(1 / 3)
    assert out.metrics["policy/ratio_mean"] == pytest.approx((1.0005 + 0.9999 + 0.9995) / 3)


def test_gspo_hand_worked_without_clipping():
    """clip 0.01 both sides: nothing clipped. L = -(1.0005 - 0.9999 - 0.9995) / 3 = 0.9989 / 3.
    dL/dlogp_it = -A_i s_i / (3 |o_i|): seq 0: -1.0005 / 9; seq 1: 0.9999 / 6; seq 2: 0.9995 / 9.
    Every token of a sequence gets the same gradient, whatever its own ratio.
    """
    logp_bt, behav_bt, mask_bt = _batch(GSPO_LOGP, GSPO_LOG_RATIOS)
    settings = _settings(kind="gspo", correction="none", clip_low=0.01, clip_high=0.01)
    out, grad_bt = _run(settings, logp_bt, behav_bt, GSPO_ADV, mask_bt)
    _close(out.loss, 0.9989 / 3)
    g0, g1, g2 = -1.0005 / 9, 0.9999 / 6, 0.9995 / 9
    _close(grad_bt, [[g0, g0, g0], [g1, g1, 0.0], [g2, g2, g2]])
    assert out.metrics["policy/clip_fraction"] == 0.0


def test_cispo_hand_worked_truncation_keeps_every_gradient():
    """e_max = 0.2 (cap 1.2), no lower bound; L = -(1/T) sum sg(min(r, 1.2)) A log pi, T = 5:
    seq 0 (A = +1): 1.1 * -1 + 0.7 * -2 + 1.2 * -0.5 = -1.1 - 1.4 - 0.6 = -3.1
    seq 1 (A = -1): -(1.2 * -1) - (0.6 * -3) = 1.2 + 1.8 = 3.0
    L = -(-3.1 + 3.0) / 5 = 0.02. Gradients -min(r, 1.2) A / 5 on every token, truncated ones
    included (where GRPO gives 0): seq 0: -0.22, -0.14, -0.24; seq 1: 0.24, 0.12. The weight 0.6
    is not floored (GRPO would clip it to 0.8). Truncated: r = 1.3 and 1.5, 2 of 5 tokens.
    """
    logp_bt, behav_bt, mask_bt = _tiny()
    settings = _settings(kind="cispo", correction="none", clip_high=0.2)
    out, grad_bt = _run(settings, logp_bt, behav_bt, TINY_ADV, mask_bt)
    _close(out.loss, 0.02)
    _close(grad_bt, [[-0.22, -0.14, -0.24], [0.24, 0.12, 0.0]])
    assert out.metrics["policy/clip_fraction"] == pytest.approx(0.4)
    assert out.metrics["policy/clip_fraction_high"] == pytest.approx(0.4)
    assert out.metrics["policy/clip_fraction_low"] == 0.0


def test_cispo_hand_worked_default_cap_not_reached():
    """Default e_max = 4 (cap 5): no weight truncated.
    seq 0: -1.1 - 1.4 - 1.3 * 0.5 = -3.15; seq 1: 1.5 + 1.8 = 3.3; L = -(0.15) / 5 = -0.03.
    Gradients -r A / 5: seq 0: -0.22, -0.14, -0.26; seq 1: 0.3, 0.12.
    """
    logp_bt, behav_bt, mask_bt = _tiny()
    out, grad_bt = _run(
        _settings(kind="cispo", correction="none"), logp_bt, behav_bt, TINY_ADV, mask_bt
    )
    _close(out.loss, -0.03)
    _close(grad_bt, [[-0.22, -0.14, -0.26], [0.3, 0.12, 0.0]])
    assert out.metrics["policy/clip_fraction"] == 0.0


# --- advantages ------------------------------------------------------------------------------------


def test_group_advantages_hand_worked():
    """Rows interleaved, group ids arbitrary; eps = 1e-6; unbiased (n - 1) stds.
    group 7: rewards [1, 0, 0, 0], mean 0.25, var (0.5625 + 3 * 0.0625) / 3 = 0.25, std 0.5:
             A = [0.75, -0.25, -0.25, -0.25] / (0.5 + eps) ~ [1.5, -0.5, -0.5, -0.5].
    group 1: rewards [0.3, 0.7], mean 0.5, var (0.04 + 0.04) / 1, std sqrt(0.08):
             A = +-0.2 / (sqrt(0.08) + eps) ~ +-0.7071.
    group 3: [2, 2] constant -> 0;  group 9: a single sequence -> 0.
    """
    ids = torch.tensor([7, 3, 7, 9, 7, 1, 3, 7, 1])
    rewards = torch.tensor([1.0, 2.0, 0.0, 5.0, 0.0, 0.3, 2.0, 0.0, 0.7], dtype=torch.float64)
    adv_b = advantages(rewards, ids, _settings())
    s7, s1 = 0.5 + 1e-6, math.sqrt(0.08) + 1e-6
    expected = [0.75 / s7, 0, -0.25 / s7, 0, -0.25 / s7, -0.2 / s1, 0, -0.25 / s7, 0.2 / s1]
    _close(adv_b, expected, tol=1e-12)
    assert adv_b[0].item() == pytest.approx(1.5, abs=1e-5)
    assert adv_b[8].item() == pytest.approx(math.sqrt(0.5), abs=1e-5)
    assert not adv_b.requires_grad


def test_batch_advantages_hand_worked():
    """ "batch": group-centred, divided by the std of all rewards.
    rewards [1, 0, 0, 0 | 2, 0]: batch mean 0.5, squared deviations 0.25 * 5 + 2.25 = 3.5,
    unbiased var 3.5 / 5 = 0.7. Group-centred [0.75, -0.25, -0.25, -0.25 | 1, -1] / (sqrt 0.7 + eps).
    A constant group stays exactly 0 (and takes part in the batch std, here via statistics.stdev).
    """
    ids = torch.tensor([0, 0, 0, 0, 1, 1])
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 0.0], dtype=torch.float64)
    adv_b = advantages(rewards, ids, _settings(advantage="batch"))
    scale = math.sqrt(0.7) + 1e-6
    _close(adv_b, [x / scale for x in (0.75, -0.25, -0.25, -0.25, 1.0, -1.0)])
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    values = [1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 3.0, 3.0]
    adv_b = advantages(torch.tensor(values, dtype=torch.float64), ids, _settings(advantage="batch"))
    scale = statistics.stdev(values) + 1e-6
    _close(adv_b, [x / scale for x in (0.75, -0.25, -0.25, -0.25, 1.0, -1.0, 0.0, 0.0)])
    # The group estimator on the same rewards differs: it is not the batch one.
    assert not torch.allclose(
        adv_b, advantages(torch.tensor(values, dtype=torch.float64), ids, _settings())
    )


def test_dr_grpo_advantages_never_divide_by_std():
    """Dr.GRPO: A = R - group mean. [1, 0, 0, 0 | 2, 0] -> [0.75, -0.25, -0.25, -0.25 | 1, -1];
    rewards x10 give advantages x10 (a std normalisation would cancel the factor).
    """
    ids = torch.tensor([0, 0, 0, 0, 1, 1])
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 0.0], dtype=torch.float64)
    settings = _settings(kind="dr_grpo")
    _close(advantages(rewards, ids, settings), [0.75, -0.25, -0.25, -0.25, 1.0, -1.0])
    _close(advantages(10 * rewards, ids, settings), [7.5, -2.5, -2.5, -2.5, 10.0, -10.0])


@pytest.mark.parametrize(
    "settings",
    [{}, {"advantage": "batch"}, {"kind": "dr_grpo"}, {"kind": "gspo", "advantage": "batch"}],
)
def test_constant_groups_and_singletons_give_exactly_zero(settings):
    """Rewards 0.1 x 3: the float mean is 0.10000000000000002, so R - mean is not exactly 0;
    constant groups must still give exactly 0, size-1 groups too (unbiased std of one value is
    NaN), and a wholly constant batch gives zeros, not NaN, in "batch" mode.
    """
    ids = torch.tensor([0, 0, 0, 1, 2, 2])
    rewards = torch.tensor([0.1, 0.1, 0.1, 4.0, 1.0, 0.0], dtype=torch.float64)
    adv_b = advantages(rewards, ids, _settings(**settings))
    assert adv_b[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert adv_b[4] > 0 > adv_b[5]
    constant = advantages(
        torch.full((5,), 0.1, dtype=torch.float64), torch.arange(5) % 2, _settings(**settings)
    )
    assert constant.tolist() == [0.0] * 5
    single = advantages(torch.tensor([3.0]), torch.tensor([0]), _settings(**settings))
    assert single.tolist() == [0.0]


def test_advantages_input_errors():
    settings = _settings()
    with pytest.raises(ValueError, match="group_ids_b"):
        advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long), settings)
    with pytest.raises(ValueError, match="integer ids"):
        advantages(torch.zeros(3), torch.zeros(3), settings)
    with pytest.raises(ValueError, match="finite"):
        advantages(torch.tensor([1.0, NAN]), torch.zeros(2, dtype=torch.long), settings)
    with pytest.raises(ValueError, match="rewards_b must have shape"):
        advantages(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), settings)
    with pytest.raises(ConfigError, match="tis_cap"):
        advantages(
            torch.zeros(2), torch.zeros(2, dtype=torch.long), PolicyLossSettings(tis_cap=0.0)
        )
    assert advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long), settings).shape == (0,)


# --- off-policy corrections ------------------------------------------------------------------------


def _one_token(settings, log_r_prox, log_w, adv=1.0):
    """One token: logp = -1, prox = logp - log_r_prox, behav = prox - log_w."""
    logp_bt = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    prox_bt = torch.tensor([[-1.0 - log_r_prox]], dtype=torch.float64)
    behav_bt = prox_bt - log_w
    return _run(settings, logp_bt, behav_bt, [adv], torch.ones(1, 1), prox_bt=prox_bt)


def test_decoupled_ratio_is_against_prox_and_weight_against_behaviour():
    """pi_theta / pi_prox = 1.1, pi_prox / pi_behav = 1.5, A = 1, GRPO (e = 0.2):
    decoupled: L = -1.5 * min(1.1, 1.1) = -1.65, gradient -1.65; gap |ln 1.5|.
    tis (cap 2): 1.5 < 2, the same.
    none: r = pi_theta / pi_behav = 1.65 > 1.2, clipped: L = -1.2, no gradient; w = 1.
    """
    for correction in ("decoupled", "tis"):
        out, grad_bt = _one_token(_settings(correction=correction), LN(1.1), LN(1.5))
        _close(out.loss, -1.65)
        _close(grad_bt, [[-1.65]])
        assert out.metrics["policy/is_weight_mean"] == pytest.approx(1.5)
        assert out.metrics["policy/ratio_mean"] == pytest.approx(1.1)
        assert out.metrics["policy/behaviour_gap"] == pytest.approx(LN(1.5))
    out, grad_bt = _one_token(_settings(correction="none"), LN(1.1), LN(1.5))
    _close(out.loss, -1.2)
    _close(grad_bt, [[0.0]])
    assert out.metrics["policy/is_weight_max"] == 1.0
    assert out.metrics["policy/ratio_mean"] == pytest.approx(1.65)
    assert out.metrics["policy/behaviour_gap"] == pytest.approx(LN(1.65))


def test_tis_caps_the_weight_and_decoupled_does_not():
    """r = 1, pi_prox / pi_behav = 3, A = 1: decoupled L = -3; tis (cap 2) L = -2; cap 5 -> -3.
    A weight below 1 is never raised: pi_prox / pi_behav = 0.5 gives -0.5 under both.
    """
    out, _ = _one_token(_settings(correction="decoupled"), 0.0, LN(3.0))
    _close(out.loss, -3.0)
    assert out.metrics["policy/is_weight_max"] == pytest.approx(3.0)
    out, grad_bt = _one_token(_settings(correction="tis"), 0.0, LN(3.0))
    _close(out.loss, -2.0)
    _close(grad_bt, [[-2.0]])
    assert out.metrics["policy/is_weight_max"] == pytest.approx(2.0)
    out, _ = _one_token(_settings(correction="tis", tis_cap=5.0), 0.0, LN(3.0))
    _close(out.loss, -3.0)
    for correction in ("decoupled", "tis"):
        out, _ = _one_token(_settings(correction=correction), 0.0, LN(0.5))
        _close(out.loss, -0.5)


def test_gspo_weight_is_the_geometric_mean_then_capped():
    """GSPO, 2 tokens with log(pi_prox / pi_behav) = [ln 4, ln 1] -> w = exp(ln 4 / 2) = 2 (not the
    arithmetic mean 2.5). r = 1 (s = 1), A = 1: decoupled L = -2; tis with cap 1.5: L = -1.5.
    """
    logp_bt = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    prox_bt = logp_bt.detach().clone()
    behav_bt = prox_bt - torch.tensor([[LN(4.0), 0.0]], dtype=torch.float64)
    for correction, cap, expected in (("decoupled", 2.0, -2.0), ("tis", 1.5, -1.5)):
        settings = _settings(kind="gspo", correction=correction, tis_cap=cap)
        out, _ = _run(settings, logp_bt, behav_bt, [1.0], torch.ones(1, 2), prox_bt=prox_bt)
        _close(out.loss, expected)
        assert out.metrics["policy/is_weight_max"] == pytest.approx(-expected)


@pytest.mark.parametrize("kind", KINDS)
def test_corrections_agree_when_prox_equals_behaviour(kind):
    """pi_prox = pi_behav: w = 1 (below any cap >= 1) and the ratio is the same for all three."""
    inputs = _random_inputs(kind, seed=11)
    inputs["prox_bt"] = inputs["behav_bt"].clone()
    results = [
        _run_random(_settings(kind=kind, correction=c, kl_coef=0.04), inputs) for c in CORRECTIONS
    ]
    for loss, grad_bt, _ in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad_bt, results[0][1], rtol=1e-12, atol=1e-12)
    assert results[0][2]["policy/is_weight_max"] == pytest.approx(1.0)
    # With a stale behaviour policy they no longer agree (the clip is centred on pi_prox or
    # pi_behav, the cap bites): the test can tell them apart.
    inputs = _random_inputs(kind, seed=12)
    losses = [
        _run_random(_settings(kind=kind, correction=c, tis_cap=1.2), inputs)[0].item()
        for c in CORRECTIONS
    ]
    assert len({round(x, 12) for x in losses}) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_none_ignores_prox(kind):
    inputs = _random_inputs(kind, seed=12)
    settings = _settings(kind=kind, correction="none")
    expected_loss, expected_grad, _ = _run_random(settings, inputs)
    for prox_bt in (None, torch.full_like(inputs["prox_bt"], NAN), inputs["prox_bt"] + 3.0):
        loss, grad_bt, _ = _run_random(settings, {**inputs, "prox_bt": prox_bt})
        torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
        torch.testing.assert_close(grad_bt, expected_grad, rtol=0, atol=0)


def test_decoupled_and_tis_need_prox():
    inputs = _random_inputs("grpo", seed=0)
    for correction in ("decoupled", "tis"):
        with pytest.raises(ValueError, match="needs prox_logp_bt"):
            _run_random(_settings(correction=correction), {**inputs, "prox_bt": None})


# --- KL to the reference ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "scale"),
    [("grpo", 1 / 2), ("dapo", 1 / 2), ("gspo", 1 / 2), ("cispo", 1 / 2), ("dr_grpo", 1 / 4)],
)
def test_k3_kl_hand_worked(kind, scale):
    """One sequence, 2 tokens and a padded one; A = 0 so only beta * KL remains; beta = 0.04.
    q = ln pi_ref - ln pi_theta = [ln 2, -ln 2]: k3 = e^q - q - 1 = [1 - ln 2, 0.5 + ln 2 - 1]
    = [0.306853, 0.193147], sum 0.5. Token / sequence means divide by 2 (L = 0.01); dr_grpo
    divides by N * L_max = 1 * 4 (L = 0.005). dk3/dlogp = 1 - e^q = [-1, 0.5], times beta * scale.
    """
    logp_bt = torch.tensor([[-1.0, -2.0, NAN]], dtype=torch.float64, requires_grad=True)
    ref_bt = torch.tensor([[-1.0 + LN(2), -2.0 - LN(2), NAN]], dtype=torch.float64)
    mask_bt = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    behav_bt = torch.tensor([[-1.1, -1.9, INF]], dtype=torch.float64)
    out, grad_bt = _run(
        _settings(kind=kind, kl_coef=0.04),
        logp_bt,
        behav_bt,
        [0.0],
        mask_bt,
        ref_logp_bt=ref_bt,
        max_completion_tokens=4,
    )
    k3 = [1 - LN(2), 0.5 + LN(2) - 1]
    assert sum(k3) == pytest.approx(0.5)
    _close(out.loss, 0.04 * sum(k3) * scale)
    _close(grad_bt, [[0.04 * scale * -1.0, 0.04 * scale * 0.5, 0.0]])
    assert out.metrics["policy/kl_ref"] == pytest.approx(0.25)


def test_kl_coef_zero_needs_no_ref_and_positive_refuses_without_one():
    inputs = _random_inputs("grpo", seed=3)
    loss, _, metrics = _run_random(_settings(), {**inputs, "ref_bt": None})
    assert "policy/kl_ref" not in metrics
    # Given anyway with kl_coef = 0: logged, loss unchanged.
    loss_with_ref, _, metrics = _run_random(_settings(), inputs)
    torch.testing.assert_close(loss_with_ref, loss, rtol=0, atol=0)
    assert metrics["policy/kl_ref"] > 0
    with pytest.raises(ValueError, match=r"kl_coef=0.04 > 0 needs ref_logp_bt"):
        _run_random(_settings(kl_coef=0.04), {**inputs, "ref_bt": None})


# --- padding, metrics, inputs ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("correction", CORRECTIONS)
def test_padding_values_never_matter(kind, correction):
    """NaN / inf at padded positions of every input: same loss, gradients and metrics as zeros
    there, and exactly-zero, finite gradients at padding."""
    inputs = _random_inputs(kind, seed=5)
    pad_bt = inputs["mask_bt"] == 0
    clean = {
        key: value.masked_fill(pad_bt, 0.0) if key.endswith("_bt") and key != "mask_bt" else value
        for key, value in inputs.items()
    }
    settings = _settings(kind=kind, correction=correction, kl_coef=0.04)
    loss, grad_bt, metrics = _run_random(settings, inputs)
    clean_loss, clean_grad, clean_metrics = _run_random(settings, clean)
    assert torch.isnan(inputs["logp_bt"][pad_bt]).all()
    assert torch.isfinite(loss) and torch.isfinite(grad_bt).all()
    torch.testing.assert_close(loss, clean_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad_bt, clean_grad, rtol=0, atol=0)
    assert (grad_bt[pad_bt] == 0).all()
    assert metrics == clean_metrics


@pytest.mark.parametrize("kind", KINDS)
def test_all_padding_gives_zero_loss(kind):
    mask_bt = torch.zeros(2, 3)
    logp_bt = torch.full((2, 3), NAN, requires_grad=True)
    behav_bt = torch.full((2, 3), -INF)
    out = policy_loss(
        _settings(kind=kind, kl_coef=0.1),
        logp_bt,
        behav_bt,
        behav_bt,
        torch.tensor([1.0, -1.0]),
        mask_bt,
        ref_logp_bt=behav_bt,
        max_completion_tokens=3,
    )
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert (logp_bt.grad == 0).all()
    assert all(value == 0.0 for value in out.metrics.values())


def test_metrics_are_python_floats_and_low_precision_is_upcast():
    inputs = _random_inputs("dapo", seed=4)
    _, _, metrics = _run_random(_settings(kind="dapo", kl_coef=0.01), inputs)
    assert set(metrics) == METRIC_KEYS | {"policy/kl_ref"}
    assert all(type(value) is float for value in metrics.values())
    bf16 = {k: v.to(torch.bfloat16) if k != "adv_b" else v for k, v in inputs.items()}
    bf16["logp_bt"] = bf16["logp_bt"].detach().requires_grad_()
    loss, grad_bt, _ = _run_random(_settings(kind="dapo"), bf16)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert grad_bt.dtype == torch.bfloat16 and torch.isfinite(grad_bt).all()


def test_policy_loss_input_errors():
    inputs = _random_inputs("grpo", seed=0)
    settings = _settings()

    def call(settings=settings, inputs=inputs, **kwargs):
        return _run_random(settings, inputs, **kwargs)

    def changed(**changes):
        return {**inputs, **changes}

    with pytest.raises(ValueError, match="behav_logp_bt must be floating point with the shape"):
        call(inputs=changed(behav_bt=inputs["behav_bt"][:, :-1]))
    with pytest.raises(ValueError, match="mask_bt must hold only 0 and 1"):
        call(inputs=changed(mask_bt=inputs["mask_bt"] * 0.5))
    with pytest.raises(ValueError, match=r"adv_b must have shape \(6,\)"):
        call(inputs=changed(adv_b=inputs["adv_b"][:3]))
    with pytest.raises(ValueError, match="logp_bt must be floating point"):
        call(inputs=changed(logp_bt=inputs["logp_bt"][0]))
    with pytest.raises(ValueError, match="needs max_completion_tokens"):
        call(_settings(kind="dr_grpo"), max_completion_tokens=None)
    with pytest.raises(ValueError, match="more than max_completion_tokens=3"):
        call(_settings(kind="dr_grpo"), max_completion_tokens=3)
    with pytest.raises(ValueError, match="total_tokens=5 is smaller than this call's"):
        call(_settings(kind="dapo"), total_tokens=5)
    with pytest.raises(ValueError, match="total_sequences=2 is smaller than this call's 6"):
        call(total_sequences=2)
    with pytest.raises(ConfigError, match="clip_low"):
        call(PolicyLossSettings(clip_low=-1.0))


# --- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"clip_low": -0.1}, "clip_low"),
        ({"clip_low": 1.0}, "clip_low"),
        ({"clip_low": NAN}, "clip_low"),
        ({"kind": "cispo", "clip_low": 0.2}, "clip_low"),
        ({"clip_high": -0.1}, "clip_high"),
        ({"clip_high": INF}, "clip_high"),
        ({"clip_high": NAN}, "clip_high"),
        ({"kl_coef": -0.01}, "kl_coef"),
        ({"kl_coef": NAN}, "kl_coef"),
        ({"tis_cap": 0.0}, "tis_cap"),
        ({"tis_cap": -2.0}, "tis_cap"),
        ({"tis_cap": 0.5}, "tis_cap"),
        ({"tis_cap": INF}, "tis_cap"),
        ({"kind": "dr_grpo", "advantage": "batch"}, "advantage"),
        ({"kind": "ppo"}, "kind"),
        ({"correction": "is"}, "correction"),
        ({"advantage": "global"}, "advantage"),
    ],
)
def test_settings_validate_refuses_impossible_values(data, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        from_dict(PolicyLossSettings, data)


def test_settings_validate_on_direct_construction():
    for settings, key in (
        (PolicyLossSettings(kind="ppo"), "kind"),  # type: ignore[arg-type]
        (PolicyLossSettings(tis_cap=0.0), "tis_cap"),
        (PolicyLossSettings(kind="cispo", clip_low=0.1), "clip_low"),
    ):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            settings.validate()


def test_defaults_and_resolved_clip():
    assert from_dict(PolicyLossSettings, {}) == PolicyLossSettings()
    defaults = PolicyLossSettings()
    assert (defaults.kind, defaults.correction, defaults.tis_cap) == ("grpo", "tis", 2.0)
    assert (defaults.kl_coef, defaults.advantage) == (0.0, "group")
    for kind, clips in DOCUMENTED_CLIPS.items():
        assert _settings(kind=kind).resolved_clip() == clips
    assert _settings(kind="dapo", clip_high=0.3).resolved_clip() == (0.2, 0.3)
    assert _settings(kind="gspo", clip_low=1e-3).resolved_clip() == (1e-3, 4e-4)
    assert _settings(kind="cispo", clip_high=1.0).resolved_clip() == (INF, 1.0)


# --- equivalence with a plain-Python reference -----------------------------------------------------


def _ppo_min(r, a, low, high):
    """min(r a, clip(r) a) for one ratio tensor r; the clipped value is a constant (no grad)."""
    value = r.item()
    clipped = min(max(value, 1.0 - low), 1.0 + high)
    if clipped * a < value * a:
        return torch.tensor(clipped * a, dtype=r.dtype)
    return r * a


def reference_loss(settings, logp_bt, prox_bt, behav_bt, adv_b, mask_bt, ref_bt, max_tokens):
    """The module docstring's formulas, one sequence and one token at a time."""
    kind, correction = settings.kind, settings.correction
    low, high = DOCUMENTED_CLIPS[kind]
    low = low if settings.clip_low is None else settings.clip_low
    high = high if settings.clip_high is None else settings.clip_high
    beta, cap = settings.kl_coef, settings.tis_cap
    b, t = logp_bt.shape
    rows = [[j for j in range(t) if mask_bt[i, j] == 1] for i in range(b)]
    n_seq, n_tok = b, sum(len(cols) for cols in rows)
    total = torch.zeros((), dtype=torch.float64)

    def base(i, j):
        return float(behav_bt[i, j]) if correction == "none" else float(prox_bt[i, j])

    def log_weight(i, j):
        return 0.0 if correction == "none" else float(prox_bt[i, j]) - float(behav_bt[i, j])

    def capped(w):
        return min(w, cap) if correction == "tis" else w

    def k3(i, j):
        q = float(ref_bt[i, j]) - logp_bt[i, j]
        return torch.exp(q) - q - 1.0

    for i, cols in enumerate(rows):
        if not cols:
            continue
        a, n = float(adv_b[i]), len(cols)
        if kind == "gspo":
            s = torch.exp(sum(logp_bt[i, j] - base(i, j) for j in cols) / n)
            w = capped(math.exp(sum(log_weight(i, j) for j in cols) / n))
            seq = -w * _ppo_min(s, a, low, high)
            if beta:
                seq = seq + beta * sum(k3(i, j) for j in cols) / n
            total = total + seq / n_seq
            continue
        terms = []
        for j in cols:
            r = torch.exp(logp_bt[i, j] - base(i, j))
            w = capped(math.exp(log_weight(i, j)))
            if kind == "cispo":
                term = -(min(r.item(), 1.0 + high) * w) * a * logp_bt[i, j]
            else:
                term = -w * _ppo_min(r, a, low, high)
            if beta:
                term = term + beta * k3(i, j)
            terms.append(term)
        if kind == "grpo":
            total = total + sum(terms) / n / n_seq
        elif kind == "dr_grpo":
            total = total + sum(terms) / (n_seq * max_tokens)
        else:
            total = total + sum(terms) / n_tok
    return total


def _random_inputs(kind, seed, b=6, t=7, lengths=(7, 5, 1, 0, 6, 3)):
    """Random logprobs with padding full of NaN / inf. The learner moves ~0.25 in log space from
    pi_prox (4e-4 for gspo, whose clip range is ~1e-4), pi_prox is ~0.7 from pi_behav, so every
    kind sees clipped and unclipped tokens (sequences) and tis sees capped weights."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64
    mask_bt = torch.zeros(b, t, dtype=dtype)
    for i, n in enumerate(lengths[:b]):
        mask_bt[i, :n] = 1.0
    logp_bt = -3.0 * torch.rand(b, t, generator=gen, dtype=dtype) - 0.05
    step = 4e-4 if kind == "gspo" else 0.25
    prox_bt = logp_bt + step * torch.randn(b, t, generator=gen, dtype=dtype)
    behav_bt = (
        prox_bt
        + 0.5 * torch.randn(b, t, generator=gen, dtype=dtype)
        + 0.5 * torch.randn(b, 1, generator=gen, dtype=dtype)
    )
    ref_bt = logp_bt + 0.3 * torch.randn(b, t, generator=gen, dtype=dtype)
    adv_b = torch.randn(b, generator=gen, dtype=dtype)
    pad_bt = mask_bt == 0
    return {
        "logp_bt": logp_bt.masked_fill(pad_bt, NAN),
        "prox_bt": prox_bt.masked_fill(pad_bt, INF),
        "behav_bt": behav_bt.masked_fill(pad_bt, -INF),
        "ref_bt": ref_bt.masked_fill(pad_bt, NAN),
        "adv_b": adv_b,
        "mask_bt": mask_bt,
    }


def _run_random(settings, inputs, max_completion_tokens=7, **kwargs):
    """(loss, grad of logp_bt, metrics) of policy_loss on `_random_inputs`-style inputs."""
    logp_bt = inputs["logp_bt"].detach().clone().requires_grad_()
    out = policy_loss(
        settings,
        logp_bt,
        inputs["prox_bt"],
        inputs["behav_bt"],
        inputs["adv_b"],
        inputs["mask_bt"],
        ref_logp_bt=inputs["ref_bt"],
        max_completion_tokens=max_completion_tokens,
        **kwargs,
    )
    (grad_bt,) = torch.autograd.grad(out.loss, logp_bt)
    return out.loss.detach(), grad_bt, out.metrics


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("correction", CORRECTIONS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.04])
def test_vectorised_matches_reference_loop(kind, correction, kl_coef):
    # cispo's default cap 5 is never reached by these ratios: truncate at 1.2 to exercise it.
    clip = {"clip_high": 0.2} if kind == "cispo" else {}
    settings = _settings(kind=kind, correction=correction, kl_coef=kl_coef, **clip)
    inputs = _random_inputs(kind, seed=7)
    loss, grad_bt, metrics = _run_random(settings, inputs)
    logp_bt = inputs["logp_bt"].detach().clone().requires_grad_()
    expected = reference_loss(
        settings,
        logp_bt,
        inputs["prox_bt"],
        inputs["behav_bt"],
        inputs["adv_b"],
        inputs["mask_bt"],
        inputs["ref_bt"],
        max_tokens=7,
    )
    (expected_grad,) = torch.autograd.grad(expected, logp_bt)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(grad_bt, expected_grad, rtol=1e-5, atol=1e-12)
    # The inputs exercise both branches of the clip, and the tis cap.
    assert 0.0 < metrics["policy/clip_fraction"] < 1.0
    expected_max_weight = {"none": 1.0, "tis": 2.0}.get(correction)
    if expected_max_weight is not None:
        assert metrics["policy/is_weight_max"] == pytest.approx(expected_max_weight)
    else:
        assert metrics["policy/is_weight_max"] > 2.0


# --- gradient accumulation -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("split", [(1,) * 8, (3, 5)])
def test_micro_batches_sum_to_the_full_batch(kind, split):
    """8 sequences at once == micro-batches (8 x 1, or 3 + 5) whose losses use the whole batch's
    total_tokens / total_sequences and are summed: same loss, same gradients."""
    inputs = _random_inputs(kind, seed=9, b=8, t=7, lengths=(7, 5, 1, 0, 6, 3, 2, 7))
    settings = _settings(kind=kind, correction="tis", kl_coef=0.04)
    full_loss, full_grad, _ = _run_random(settings, inputs)
    total_tokens = int(inputs["mask_bt"].sum())
    logp_bt = inputs["logp_bt"].detach().clone().requires_grad_()
    summed, naive, start = 0.0, 0.0, 0
    for size in split:
        rows = slice(start, start + size)
        start += size
        args = (
            settings,
            logp_bt[rows],
            inputs["prox_bt"][rows],
            inputs["behav_bt"][rows],
            inputs["adv_b"][rows],
            inputs["mask_bt"][rows],
        )
        kwargs = {"ref_logp_bt": inputs["ref_bt"][rows], "max_completion_tokens": 7}
        out = policy_loss(*args, **kwargs, total_tokens=total_tokens, total_sequences=8)
        out.loss.backward()
        summed += out.loss.item()
        naive += policy_loss(*args, **kwargs).loss.item()
    assert summed == pytest.approx(full_loss.item(), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(logp_bt.grad, full_grad, rtol=1e-10, atol=1e-15)
    # Without the global normalisers each micro-batch is its own mean: the sum is wrong.
    assert naive != pytest.approx(full_loss.item(), rel=1e-3)
