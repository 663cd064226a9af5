"""Tests of align.losses.distill: divergences, sparse teacher, alpha schedules, weights, the loss.

Tensor legend: b batch, t position, v vocabulary, k teacher top-k entries per position.
Hand-worked examples build logits as log-probabilities (softmax(log p) = p) so the arithmetic in
each docstring is over simple fractions; expected values use math.log, never the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from align.config import ConfigError, from_dict
from align.losses.distill import (
    CONFIDENCE_EPS,
    DIVERGENCES,
    AlphaSchedule,
    DistillLossSettings,
    TeacherLogits,
    alpha_at,
    distillation_loss,
    divergence,
    forward_kl,
    jsd,
    reverse_kl,
    skew_kl,
    token_weights,
)

LN = math.log
P_TEACHER = [0.8, 0.1, 0.1]
P_STUDENT = [0.4, 0.4, 0.2]
WEIGHTINGS = ("none", "confidence", "entropy")


def _logits(*rows: list[float], dtype=torch.float64) -> torch.Tensor:
    """(1, len(rows), v) logits whose softmax is each row of probabilities (0 -> -inf)."""
    return torch.tensor([rows], dtype=dtype).log()


def _config(**kwargs) -> DistillLossSettings:
    alpha = kwargs.pop("alpha", {"kind": "constant", "alpha_start": 0.5})
    return from_dict(DistillLossSettings, {**kwargs, "alpha": alpha})


# --- hand-worked divergences -------------------------------------------------------------------


def test_forward_kl_hand_worked():
    """p_t = [0.8, 0.1, 0.1], p_s = [0.4, 0.4, 0.2]:
    KL(p_t || p_s) = 0.8 ln(0.8/0.4) + 0.1 ln(0.1/0.4) + 0.1 ln(0.1/0.2)
                   = 0.8 ln2 - 0.2 ln2 - 0.1 ln2 = 0.5 ln2 = 0.346574.
    """
    value = forward_kl(_logits(P_TEACHER), _logits(P_STUDENT))
    assert value.shape == (1, 1)
    assert value.item() == pytest.approx(0.5 * LN(2), abs=1e-12)


def test_reverse_kl_hand_worked():
    """KL(p_s || p_t) = 0.4 ln(0.4/0.8) + 0.4 ln(0.4/0.1) + 0.2 ln(0.2/0.1)
    = -0.4 ln2 + 0.8 ln2 + 0.2 ln2 = 0.6 ln2 = 0.415888.
    """
    value = reverse_kl(_logits(P_TEACHER), _logits(P_STUDENT))
    assert value.item() == pytest.approx(0.6 * LN(2), abs=1e-12)


def test_jsd_hand_worked_symmetric_and_generalised():
    """beta = 0.5: m = 0.5 p_t + 0.5 p_s = [0.6, 0.25, 0.15];
    JSD = 0.5 [0.8 ln(0.8/0.6) + 0.1 ln(0.1/0.25) + 0.1 ln(0.1/0.15)]
        + 0.5 [0.4 ln(0.4/0.6) + 0.4 ln(0.4/0.25) + 0.2 ln(0.2/0.15)] = 0.090661.
    beta = 0.2 (the teacher's share of m): m = 0.2 p_t + 0.8 p_s = [0.48, 0.34, 0.18];
    JSD = 0.2 [0.8 ln(0.8/0.48) + 0.1 ln(0.1/0.34) + 0.1 ln(0.1/0.18)]
        + 0.8 [0.4 ln(0.4/0.48) + 0.4 ln(0.4/0.34) + 0.2 ln(0.2/0.18)] = 0.056022.
    """
    sym = 0.5 * (0.8 * LN(0.8 / 0.6) + 0.1 * LN(0.1 / 0.25) + 0.1 * LN(0.1 / 0.15)) + 0.5 * (
        0.4 * LN(0.4 / 0.6) + 0.4 * LN(0.4 / 0.25) + 0.2 * LN(0.2 / 0.15)
    )
    gen = 0.2 * (0.8 * LN(0.8 / 0.48) + 0.1 * LN(0.1 / 0.34) + 0.1 * LN(0.1 / 0.18)) + 0.8 * (
        0.4 * LN(0.4 / 0.48) + 0.4 * LN(0.4 / 0.34) + 0.2 * LN(0.2 / 0.18)
    )
    assert sym == pytest.approx(0.090661, abs=1e-6) and gen == pytest.approx(0.056022, abs=1e-6)
    teacher, student = _logits(P_TEACHER), _logits(P_STUDENT)
    assert jsd(teacher, student, beta=0.5).item() == pytest.approx(sym, abs=1e-12)
    assert jsd(teacher, student, beta=0.2).item() == pytest.approx(gen, abs=1e-12)


def test_skew_kl_hand_worked_distillm_convention():
    """DistiLLM skew KL, lam = 0.1: m = 0.1 p_t + 0.9 p_s = [0.44, 0.37, 0.19];
    SKL = 0.8 ln(0.8/0.44) + 0.1 ln(0.1/0.37) + 0.1 ln(0.1/0.19) = 0.283251.
    lam = 0 is forward KL: 0.5 ln2.
    """
    expected = 0.8 * LN(0.8 / 0.44) + 0.1 * LN(0.1 / 0.37) + 0.1 * LN(0.1 / 0.19)
    assert expected == pytest.approx(0.283251, abs=1e-6)
    teacher, student = _logits(P_TEACHER), _logits(P_STUDENT)
    assert skew_kl(teacher, student, skew_lambda=0.1).item() == pytest.approx(expected, abs=1e-12)
    assert skew_kl(teacher, student, skew_lambda=0.0).item() == pytest.approx(
        0.5 * LN(2), abs=1e-12
    )


def test_temperature_divides_logits():
    """Logits 2 ln p at T = 2 give softmax(ln p) = p: the forward KL is again 0.5 ln2."""
    teacher, student = 2 * _logits(P_TEACHER), 2 * _logits(P_STUDENT)
    assert forward_kl(teacher, student, temperature=2.0).item() == pytest.approx(0.5 * LN(2))
    assert forward_kl(teacher, student).item() != pytest.approx(0.5 * LN(2))


def test_full_loss_hand_worked():
    """One token, gold id 0, alpha = 0.5, T = 2, forward KL; logits 2 ln p_t and 2 ln p_s.
    Soft: at T = 2 the distributions are p_t, p_s: T^2 D = 4 * 0.5 ln2 = 2 ln2.
    Hard: at T = 1 the student is p_s^2 / sum p_s^2 = [0.16, 0.16, 0.04] / 0.36 = [4/9, 4/9, 1/9],
          CE = -ln(4/9) = ln(9/4).
    L = 0.5 * 2 ln2 + 0.5 * ln(9/4) = ln2 + ln(3/2) = ln 3 = 1.098612.
    Logged teacher KL at T = 1: teacher [0.64, 0.01, 0.01] / 0.66 against [4/9, 4/9, 1/9].
    """
    student = (2 * _logits(P_STUDENT)).requires_grad_()
    out = distillation_loss(
        student,
        torch.tensor([[0]]),
        teacher=TeacherLogits.dense(2 * _logits(P_TEACHER)),
        config=_config(temperature=2.0),
        step=0,
        total_steps=10,
    )
    assert out.loss.item() == pytest.approx(LN(3), abs=1e-12)
    assert out.loss_sum.item() == pytest.approx(LN(3), abs=1e-12)
    assert out.tokens.item() == 1 and out.alpha == 0.5
    assert out.soft_loss.item() == pytest.approx(2 * LN(2), abs=1e-12)
    assert out.hard_loss.item() == pytest.approx(LN(9 / 4), abs=1e-12)
    assert out.effective_alpha.item() == pytest.approx(0.5)
    t1, s1 = [64 / 66, 1 / 66, 1 / 66], [4 / 9, 4 / 9, 1 / 9]
    expected_kl = sum(a * LN(a / b) for a, b in zip(t1, s1, strict=True))
    assert out.teacher_kl.item() == pytest.approx(expected_kl, abs=1e-12)
    for logged in (out.soft_loss, out.hard_loss, out.effective_alpha, out.teacher_kl):
        assert not logged.requires_grad
    out.loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


# --- alpha extremes ----------------------------------------------------------------------------


def _random_batch(b=3, t=5, v=7, seed=0, dtype=torch.float64, ignored=None):
    """Random student and teacher logits and labels; `ignored` (default: one position per row
    and the last of row 0) are labelled -100."""
    if ignored is None:
        ignored = [(i, (2 * i) % t) for i in range(b)] + [(0, t - 1)]
    gen = torch.Generator().manual_seed(seed)
    student_btv = torch.randn(b, t, v, generator=gen, dtype=dtype) * 2
    teacher_btv = torch.randn(b, t, v, generator=gen, dtype=dtype) * 2
    labels_bt = torch.randint(0, v, (b, t), generator=gen)
    for i, j in ignored:
        labels_bt[i, j] = -100
    return student_btv, teacher_btv, labels_bt


def test_alpha_zero_is_plain_cross_entropy():
    """alpha = 0: every a_t = 0, so L = mean CE over non-ignored tokens, whatever D and w are."""
    student_btv, teacher_btv, labels_bt = _random_batch()
    for divergence_name in DIVERGENCES:
        student = student_btv.clone().requires_grad_()
        out = distillation_loss(
            student,
            labels_bt,
            teacher=TeacherLogits.dense(teacher_btv),
            config=_config(
                divergence=divergence_name,
                temperature=3.0,
                weighting="confidence",
                alpha={"alpha_start": 0.0},
            ),
            step=3,
            total_steps=10,
        )
        reference = student_btv.clone().requires_grad_()
        expected = F.cross_entropy(
            reference.reshape(-1, 7), labels_bt.reshape(-1), ignore_index=-100
        )
        torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
        out.loss.backward()
        expected.backward()
        torch.testing.assert_close(student.grad, reference.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("divergence_name", DIVERGENCES)
def test_alpha_one_is_pure_kd(divergence_name):
    """alpha = 1, no weighting: L = T^2 * mean over non-ignored tokens of D (T = 2)."""
    student_btv, teacher_btv, labels_bt = _random_batch(seed=1)
    functions = {
        "forward_kl": lambda t, s: forward_kl(t, s, temperature=2.0),
        "reverse_kl": lambda t, s: reverse_kl(t, s, temperature=2.0),
        "jsd": lambda t, s: jsd(t, s, beta=0.3, temperature=2.0),
        "skew_kl": lambda t, s: skew_kl(t, s, skew_lambda=0.2, temperature=2.0),
    }
    d_bt = functions[divergence_name](teacher_btv, student_btv)
    mask_bt = labels_bt != -100
    expected = 4.0 * d_bt[mask_bt].sum() / mask_bt.sum()
    out = distillation_loss(
        student_btv,
        labels_bt,
        teacher=TeacherLogits.dense(teacher_btv),
        config=_config(
            divergence=divergence_name,
            temperature=2.0,
            jsd_beta=0.3,
            skew_lambda=0.2,
            alpha={"alpha_start": 1.0},
        ),
        step=0,
        total_steps=1,
    )
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
    assert out.effective_alpha.item() == pytest.approx(1.0)


# --- divergence properties ---------------------------------------------------------------------


def _dense(name, teacher_btv, student_btv, temperature=1.0, beta=0.5, lam=0.1):
    return divergence(
        name,
        TeacherLogits.dense(teacher_btv),
        student_btv,
        temperature=temperature,
        jsd_beta=beta,
        skew_lambda=lam,
    )


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_divergence_zero_when_teacher_equals_student(name, temperature):
    logits_btv = torch.randn(2, 4, 9, dtype=torch.float64) * 3
    value = _dense(name, logits_btv, logits_btv.clone(), temperature)
    torch.testing.assert_close(value, torch.zeros(2, 4, dtype=torch.float64), atol=1e-12, rtol=0)
    # A shifted copy (softmax is shift invariant) is the same distribution.
    value = _dense(name, logits_btv, logits_btv + 5.0, temperature)
    torch.testing.assert_close(value, torch.zeros(2, 4, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_non_negative_dense_and_sparse(name):
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        teacher_btv = torch.randn(3, 4, 9, generator=gen) * 4
        student_btv = torch.randn(3, 4, 9, generator=gen) * 4
        assert (_dense(name, teacher_btv, student_btv, 1.7, 0.3, 0.4) >= -1e-6).all()
        values_btk, ids_btk = teacher_btv.topk(3, dim=-1)
        sparse = divergence(
            name,
            TeacherLogits.sparse(ids_btk, values_btk),
            student_btv,
            temperature=1.7,
            jsd_beta=0.3,
            skew_lambda=0.4,
        )
        assert (sparse >= -1e-6).all()


def test_jsd_symmetry_and_reverse_forward_swap():
    """JSD(0.5) is symmetric; JSD_beta(t, s) = JSD_(1-beta)(s, t); reverse KL(t, s) = KL(s || t)."""
    gen = torch.Generator().manual_seed(3)
    a_btv = torch.randn(2, 5, 11, generator=gen, dtype=torch.float64) * 2
    b_btv = torch.randn(2, 5, 11, generator=gen, dtype=torch.float64) * 2
    torch.testing.assert_close(jsd(a_btv, b_btv), jsd(b_btv, a_btv), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        jsd(a_btv, b_btv, beta=0.3), jsd(b_btv, a_btv, beta=0.7), rtol=1e-12, atol=1e-12
    )
    assert not torch.allclose(jsd(a_btv, b_btv, beta=0.3), jsd(b_btv, a_btv, beta=0.3))
    torch.testing.assert_close(
        reverse_kl(teacher_logits_btv=a_btv, student_logits_btv=b_btv),
        forward_kl(teacher_logits_btv=b_btv, student_logits_btv=a_btv),
        rtol=1e-12,
        atol=1e-12,
    )
    assert not torch.allclose(reverse_kl(a_btv, b_btv), forward_kl(a_btv, b_btv))


@pytest.mark.parametrize("name", DIVERGENCES)
def test_no_nan_when_probabilities_underflow(name):
    """Logits 1e4 apart underflow probabilities to exactly 0; a vocab entry that is -inf for both
    models (a masked padding id) has p = 0 on both sides. Values and gradients stay finite."""
    teacher_btv = torch.tensor([[[1e4, 0.0, -1e4, -math.inf], [0.0, 3.0, -2e4, -math.inf]]])
    student_btv = torch.tensor([[[-1e4, 1e4, 0.0, -math.inf], [5e3, 0.0, 1.0, -math.inf]]])
    student = student_btv.clone().requires_grad_()
    value_bt = _dense(name, teacher_btv, student, 1.0, 0.5, 0.1)
    assert torch.isfinite(value_bt).all() and (value_bt >= 0).all()
    value_bt.sum().backward()
    assert torch.isfinite(student.grad).all()
    ids_btk = torch.tensor([[[0, 1, 2], [1, 0, 2]]])
    student = student_btv.clone().requires_grad_()
    sparse_bt = divergence(
        name, TeacherLogits.sparse(ids_btk, teacher_btv.gather(-1, ids_btk)), student
    )
    assert torch.isfinite(sparse_bt).all()
    sparse_bt.sum().backward()
    assert torch.isfinite(student.grad).all()


# --- sparse (top-k) teacher --------------------------------------------------------------------


def _full_topk(teacher_btv: torch.Tensor, seed: int = 0):
    """All V entries in a random order per position, so k = V."""
    gen = torch.Generator().manual_seed(seed)
    b, t, v = teacher_btv.shape
    ids_btk = torch.stack([torch.randperm(v, generator=gen) for _ in range(b * t)]).view(b, t, v)
    return ids_btk, teacher_btv.gather(-1, ids_btk)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_sparse_with_k_equal_v_matches_dense(name):
    gen = torch.Generator().manual_seed(4)
    teacher_btv = torch.randn(2, 6, 13, generator=gen) * 3
    student_btv = torch.randn(2, 6, 13, generator=gen) * 3
    ids_btk, logits_btk = _full_topk(teacher_btv)
    dense_bt = _dense(name, teacher_btv, student_btv, 1.5, 0.3, 0.2)
    sparse_bt = divergence(
        name,
        TeacherLogits.sparse(ids_btk, logits_btk),
        student_btv,
        temperature=1.5,
        jsd_beta=0.3,
        skew_lambda=0.2,
    )
    torch.testing.assert_close(sparse_bt, dense_bt, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_sparse_with_k_equal_v_matches_dense_full_loss(name, weighting):
    """Loss, logging scalars and student gradients agree within 1e-5 (float32)."""
    student_btv, teacher_btv, labels_bt = _random_batch(b=2, t=6, v=13, seed=5, dtype=torch.float32)
    ids_btk, logits_btk = _full_topk(teacher_btv, seed=1)
    config = _config(
        divergence=name,
        temperature=2.0,
        jsd_beta=0.3,
        weighting=weighting,
        alpha={"kind": "linear", "alpha_start": 0.9, "alpha_end": 0.1},
    )
    outputs, grads = [], []
    for teacher in (TeacherLogits.dense(teacher_btv), TeacherLogits.sparse(ids_btk, logits_btk)):
        student = student_btv.clone().requires_grad_()
        out = distillation_loss(
            student, labels_bt, teacher=teacher, config=config, step=3, total_steps=10
        )
        out.loss.backward()
        outputs.append(out)
        grads.append(student.grad)
    dense, sparse = outputs
    for field in ("loss", "soft_loss", "hard_loss", "effective_alpha", "teacher_kl"):
        torch.testing.assert_close(getattr(sparse, field), getattr(dense, field), rtol=0, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-5)


def test_sparse_top2_of_4_is_the_documented_approximation():
    """V = 4, student p_s = [0.4, 0.3, 0.2, 0.1]; teacher top-2 ids [0, 1] with logits
    ln 0.6, ln 0.2, so the truncated teacher is [0.75, 0.25] (zero on ids 2, 3).
    forward: 0.75 ln(0.75/0.4) + 0.25 ln(0.25/0.3)                              (exact)
    skew(0.1): m = 0.1 [0.75, 0.25] + 0.9 [0.4, 0.3] = [0.435, 0.295];
               0.75 ln(0.75/0.435) + 0.25 ln(0.25/0.295)                         (exact)
    jsd(0.5): m = [0.575, 0.275] on the top-2; on ids 2, 3 m = 0.5 p_s, so the student's tail
              mass 0.3 adds 0.3 ln 2:
              0.5 [0.75 ln(0.75/0.575) + 0.25 ln(0.25/0.275)]
            + 0.5 [0.4 ln(0.4/0.575) + 0.3 ln(0.3/0.275) + 0.3 ln 2]            (exact)
    reverse: student restricted to the top-2 and renormalised, [0.4, 0.3] / 0.7 = [4/7, 3/7]:
             4/7 ln((4/7)/0.75) + 3/7 ln((3/7)/0.25)                 (the approximation)
    The three exact ones equal the dense divergence against the truncated teacher
    (logits [ln 0.75, ln 0.25, -inf, -inf]); the dense reverse KL there is +inf.
    """
    expected = {
        "forward_kl": 0.75 * LN(0.75 / 0.4) + 0.25 * LN(0.25 / 0.3),
        "skew_kl": 0.75 * LN(0.75 / 0.435) + 0.25 * LN(0.25 / 0.295),
        "jsd": 0.5 * (0.75 * LN(0.75 / 0.575) + 0.25 * LN(0.25 / 0.275))
        + 0.5 * (0.4 * LN(0.4 / 0.575) + 0.3 * LN(0.3 / 0.275) + 0.3 * LN(2)),
        "reverse_kl": 4 / 7 * LN((4 / 7) / 0.75) + 3 / 7 * LN((3 / 7) / 0.25),
    }
    student_btv = _logits([0.4, 0.3, 0.2, 0.1])
    teacher = TeacherLogits.sparse(torch.tensor([[[0, 1]]]), _logits([0.6, 0.2]))
    truncated_btv = _logits([0.75, 0.25, 0.0, 0.0])
    for name, value in expected.items():
        sparse = divergence(name, teacher, student_btv, jsd_beta=0.5, skew_lambda=0.1)
        assert sparse.item() == pytest.approx(value, abs=1e-12), name
        dense = _dense(name, truncated_btv, student_btv, 1.0, 0.5, 0.1)
        if name == "reverse_kl":
            assert dense.item() == math.inf
        else:
            assert dense.item() == pytest.approx(value, abs=1e-12), name


# --- per-token weights -------------------------------------------------------------------------


def test_confidence_weight_hand_worked():
    """Teacher [0.8, 0.1, 0.1], student [0.4, 0.4, 0.2] at both positions, T = 1.
    gold 0: CE_s = ln 2.5 = 0.916291, CE_t = ln 1.25 = 0.223144, ratio 4.106284,
            w = 1 - exp(-4.106284) = 0.983531   (teacher beats the student: trust it)
    gold 1: CE_s = ln 2.5, CE_t = ln 10 = 2.302585, ratio 0.397940,
            w = 1 - exp(-0.397940) = 0.328298   (teacher worse: lean on the label)
    """
    w0 = 1 - math.exp(-LN(2.5) / LN(1.25))
    w1 = 1 - math.exp(-LN(2.5) / LN(10))
    assert (w0, w1) == (pytest.approx(0.983531, abs=1e-6), pytest.approx(0.328298, abs=1e-6))
    teacher_btv = _logits(P_TEACHER, P_TEACHER)
    student = _logits(P_STUDENT, P_STUDENT).requires_grad_()
    labels_bt = torch.tensor([[0, 1]])
    w_bt = token_weights("confidence", TeacherLogits.dense(teacher_btv), student, labels_bt)
    torch.testing.assert_close(w_bt, torch.tensor([[w0, w1]], dtype=torch.float64))
    assert not w_bt.requires_grad
    # The loss uses the same weights: mean a_t = alpha * mean w.
    out = distillation_loss(
        student,
        labels_bt,
        teacher=TeacherLogits.dense(teacher_btv),
        config=_config(weighting="confidence", alpha={"alpha_start": 0.6}),
        step=0,
        total_steps=1,
    )
    assert out.effective_alpha.item() == pytest.approx(0.6 * (w0 + w1) / 2, abs=1e-12)


def test_confidence_weight_edge_cases():
    """A teacher certain of the gold token (CE_t underflows to 0) is clamped to CONFIDENCE_EPS:
    w = 1 - exp(-ln 2.5 / 1e-6) = 1. A sparse teacher whose top-k misses the gold token has
    CE_t = inf: w = 1 - exp(0) = 0. Ignored positions get 0."""
    certain_btv = torch.tensor([[[200.0, 0.0, 0.0]]], dtype=torch.float64)
    assert -F.log_softmax(certain_btv, -1)[0, 0, 0].item() < CONFIDENCE_EPS
    student_btv = _logits(P_STUDENT)
    w = token_weights(
        "confidence", TeacherLogits.dense(certain_btv), student_btv, torch.tensor([[0]])
    )
    assert w.item() == 1.0
    sparse = TeacherLogits.sparse(torch.tensor([[[1, 2]]]), torch.tensor([[[1.0, 0.0]]]))
    assert token_weights("confidence", sparse, student_btv, torch.tensor([[0]])).item() == 0.0
    assert token_weights("confidence", sparse, student_btv, torch.tensor([[-100]])).item() == 0.0


def test_entropy_weight_hand_worked():
    """w = 1 - H_teacher / ln V, V = 4, at T = 1 (the loss's T = 3 must not change it).
    teacher [0.5, 0.5, 0, 0]: H = ln 2, w = 1 - ln2 / ln4 = 0.5.
    teacher [0.5, 0.25, 0.25, 0]: H = 0.5 ln2 + 0.5 ln4 = 1.5 ln2, w = 1 - 1.5 ln2 / (2 ln2) = 0.25.
    teacher uniform: H = ln 4, w = 0.
    """
    teacher_btv = _logits([0.5, 0.5, 0.0, 0.0], [0.5, 0.25, 0.25, 0.0], [0.25] * 4)
    student = torch.zeros(1, 3, 4, dtype=torch.float64, requires_grad=True)
    labels_bt = torch.tensor([[0, 1, 2]])
    w_bt = token_weights("entropy", TeacherLogits.dense(teacher_btv), student, labels_bt)
    torch.testing.assert_close(w_bt, torch.tensor([[0.5, 0.25, 0.0]], dtype=torch.float64))
    assert not w_bt.requires_grad
    out = distillation_loss(
        student,
        labels_bt,
        teacher=TeacherLogits.dense(teacher_btv),
        config=_config(weighting="entropy", temperature=3.0, alpha={"alpha_start": 1.0}),
        step=0,
        total_steps=1,
    )
    assert out.effective_alpha.item() == pytest.approx(0.75 / 3, abs=1e-12)
    # Sparse: the truncated teacher on its top-2 ids is [0.5, 0.5]; still over ln V.
    sparse = TeacherLogits.sparse(torch.tensor([[[3, 1]]]), torch.tensor([[[0.0, 0.0]]]))
    w = token_weights("entropy", sparse, torch.zeros(1, 1, 4), torch.tensor([[0]]))
    assert w.item() == pytest.approx(0.5)


# --- alpha schedules ---------------------------------------------------------------------------


def _schedule(**kwargs) -> AlphaSchedule:
    return from_dict(AlphaSchedule, kwargs)


def test_constant_schedule():
    schedule = _schedule(kind="constant", alpha_start=0.7)
    assert [alpha_at(s, 100, schedule) for s in (0, 50, 100, 150)] == [0.7] * 4


def test_linear_schedule():
    """0.9 -> 0.1 over 100 steps: 0.9 + (0.1 - 0.9) * s/100; s = 0, 25, 50, 100, 150 (clamped)."""
    schedule = _schedule(kind="linear", alpha_start=0.9, alpha_end=0.1)
    values = [alpha_at(s, 100, schedule) for s in (0, 25, 50, 100, 150)]
    assert values == pytest.approx([0.9, 0.7, 0.5, 0.1, 0.1], abs=1e-12)


def test_cosine_schedule():
    """0.1 + 0.8 * 0.5 * (1 + cos(pi * s/100)): s = 0 -> 0.9; s = 25 -> 0.1 + 0.4 (1 + 0.707107)
    = 0.782843; s = 50 -> 0.5; s = 100 -> 0.1."""
    schedule = _schedule(kind="cosine", alpha_start=0.9, alpha_end=0.1)
    values = [alpha_at(s, 100, schedule) for s in (0, 25, 50, 100)]
    assert values == pytest.approx([0.9, 0.1 + 0.4 * (1 + math.sqrt(0.5)), 0.5, 0.1], abs=1e-12)


def test_wsd_schedule():
    """100 steps, warmup 0.1, decay 0.2, start 0.9, end 0.1: up from 0.1 over steps 0..10,
    0.9 over 10..80, down to 0.1 over 80..100.
    s = 0: 0.1; s = 5: 0.1 + 0.8 * 0.5 = 0.5; s = 10, 50, 80: 0.9; s = 90: 0.9 - 0.8 * 0.5 = 0.5;
    s = 100: 0.1."""
    schedule = _schedule(
        kind="wsd", alpha_start=0.9, alpha_end=0.1, warmup_fraction=0.1, decay_fraction=0.2
    )
    values = [alpha_at(s, 100, schedule) for s in (0, 5, 10, 50, 80, 90, 100)]
    assert values == pytest.approx([0.1, 0.5, 0.9, 0.9, 0.9, 0.5, 0.1], abs=1e-12)
    no_warmup = _schedule(kind="wsd", alpha_start=0.8, alpha_end=0.0, decay_fraction=0.5)
    assert [alpha_at(s, 10, no_warmup) for s in (0, 5, 10)] == pytest.approx([0.8, 0.8, 0.0])


def test_alpha_at_refuses_bad_steps():
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        alpha_at(0, 0, AlphaSchedule())
    with pytest.raises(ValueError, match="step must be >= 0"):
        alpha_at(-1, 10, AlphaSchedule())


# --- equivalence: reference loop, gradient accumulation, masking -------------------------------


def _reference_loss(student_btv, labels_bt, teacher_btv, sparse_ids_btk, config, alpha):
    """Per-position python loop with the textbook formulas, written independently of the module.

    With sparse_ids_btk the teacher is softmax over teacher_btv[b, t, ids] (the top-k logits).
    Weights are computed from detached values, as plain numbers would be.
    """
    temperature, beta, lam = config.temperature, config.jsd_beta, config.skew_lambda
    total, count = 0.0, 0
    b, t, v = student_btv.shape
    for i in range(b):
        for j in range(t):
            gold = int(labels_bt[i, j])
            if gold == -100:
                continue
            count += 1
            s_logits = student_btv[i, j]
            q = torch.softmax(s_logits / temperature, -1)
            q1 = torch.softmax(s_logits, -1)
            ce = -torch.log(q1[gold])
            ids = list(range(v)) if sparse_ids_btk is None else sparse_ids_btk[i, j].tolist()
            p = torch.softmax(teacher_btv[i, j] / temperature, -1)
            p1 = torch.softmax(teacher_btv[i, j], -1)
            q_ids = q[ids]
            if config.divergence == "forward_kl":
                d = (p * torch.log(p / q_ids)).sum()
            elif config.divergence == "reverse_kl":
                r = q_ids / q_ids.sum()
                d = (r * torch.log(r / p)).sum()
            elif config.divergence == "jsd":
                m = beta * p + (1 - beta) * q_ids
                tail = 1 - q_ids.sum()
                d = beta * (p * torch.log(p / m)).sum() + (1 - beta) * (
                    (q_ids * torch.log(q_ids / m)).sum() + tail * math.log(1 / (1 - beta))
                )
            else:
                m = lam * p + (1 - lam) * q_ids
                d = (p * torch.log(p / m)).sum()
            if config.weighting == "none":
                w = 1.0
            elif config.weighting == "confidence":
                ce_s = float(ce.detach())
                ce_t = -math.log(float(p1[ids.index(gold)])) if gold in ids else math.inf
                w = 1 - math.exp(-ce_s / max(ce_t, CONFIDENCE_EPS))
            else:
                entropy = -sum(float(x) * math.log(float(x)) for x in p1 if x > 0)
                w = 1 - entropy / math.log(v)
            a = alpha * w
            total = total + a * temperature**2 * d + (1 - a) * ce
    return total / count


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("sparse", [False, True])
def test_vectorised_equals_reference_loop(name, weighting, sparse):
    """Loss and student gradients agree with the loop to rtol 1e-9 / atol 1e-12 (float64). The
    loop's weights are detached numbers, so a weight that let gradient through would fail here."""
    student_btv, teacher_btv, labels_bt = _random_batch(b=2, t=4, v=6, seed=6)
    config = _config(
        divergence=name,
        temperature=1.7,
        jsd_beta=0.3,
        skew_lambda=0.25,
        weighting=weighting,
        alpha={"kind": "cosine", "alpha_start": 0.8, "alpha_end": 0.2},
    )
    if sparse:
        values_btk, ids_btk = teacher_btv.topk(3, dim=-1)
        ids_btk[0, 1] = torch.tensor([5, 0, 2])  # an arbitrary (not top) set, out of order
        values_btk[0, 1] = teacher_btv[0, 1, [5, 0, 2]]
        teacher = TeacherLogits.sparse(ids_btk, values_btk)
        ref_teacher, ref_ids = values_btk, ids_btk
    else:
        teacher = TeacherLogits.dense(teacher_btv)
        ref_teacher, ref_ids = teacher_btv, None
    student = student_btv.clone().requires_grad_()
    out = distillation_loss(
        student, labels_bt, teacher=teacher, config=config, step=4, total_steps=10
    )
    out.loss.backward()
    reference = student_btv.clone().requires_grad_()
    expected = _reference_loss(
        reference, labels_bt, ref_teacher, ref_ids, config, alpha_at(4, 10, config.alpha)
    )
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(student.grad, reference.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
def test_gradient_accumulation_1x8_equals_8x1(sparse):
    """One batch of 8 sequences vs 8 micro-batches of 1, each backpropagating loss_sum / N with N
    the target tokens of all 8 (rows hold 6, 5, 4, 3, 2, 1, 0, 0 targets). Gradients on
    the student logits agree to rtol 1e-9 / atol 1e-12 (float64). Averaging the per-micro-batch
    means instead gives different gradients (checked, so the comparison can fail)."""
    b, t, v = 8, 6, 11
    student_btv, teacher_btv, labels_bt = _random_batch(b=b, t=t, v=v, seed=7, ignored=())
    for i in range(1, b):
        labels_bt[i, max(t - i, 0) :] = -100
    if sparse:
        values_btk, ids_btk = teacher_btv.topk(4, dim=-1)
        teachers = [
            TeacherLogits.sparse(ids_btk[i : i + 1], values_btk[i : i + 1]) for i in range(b)
        ]
        whole = TeacherLogits.sparse(ids_btk, values_btk)
    else:
        teachers = [TeacherLogits.dense(teacher_btv[i : i + 1]) for i in range(b)]
        whole = TeacherLogits.dense(teacher_btv)
    config = _config(
        divergence="jsd",
        temperature=2.0,
        jsd_beta=0.4,
        weighting="entropy",
        alpha={
            "kind": "wsd",
            "alpha_start": 0.9,
            "alpha_end": 0.2,
            "warmup_fraction": 0.1,
            "decay_fraction": 0.3,
        },
    )
    kwargs = {"config": config, "step": 85, "total_steps": 100}

    big = student_btv.clone().requires_grad_()
    out = distillation_loss(big, labels_bt, teacher=whole, **kwargs)
    out.loss.backward()

    micro = student_btv.clone().requires_grad_()
    total_tokens = (labels_bt != -100).sum()
    assert total_tokens.item() == 21 and out.tokens.item() == 21
    loss_total = 0.0
    for i in range(b):
        part = distillation_loss(
            micro[i : i + 1], labels_bt[i : i + 1], teacher=teachers[i], **kwargs
        )
        (part.loss_sum / total_tokens).backward()
        loss_total += part.loss_sum.item()
    torch.testing.assert_close(micro.grad, big.grad, rtol=1e-9, atol=1e-12)
    assert loss_total / total_tokens.item() == pytest.approx(out.loss.item(), rel=1e-12)

    naive = student_btv.clone().requires_grad_()
    for i in range(b):
        part = distillation_loss(
            naive[i : i + 1], labels_bt[i : i + 1], teacher=teachers[i], **kwargs
        )
        (part.loss / b).backward()
    assert not torch.allclose(naive.grad, big.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("sparse", [False, True])
def test_ignored_positions_contribute_nothing(name, sparse):
    """Replacing the student and teacher logits at -100 positions (even by NaN and inf) leaves the
    loss and every gradient bit-identical, and the gradient at those positions is exactly 0."""
    student_btv, teacher_btv, labels_bt = _random_batch(
        b=2, t=5, v=8, seed=8, ignored=((0, 0), (0, 3), (1, 3), (1, 4))
    )
    ignored_bt = labels_bt == -100
    config = _config(divergence=name, temperature=1.5, weighting="confidence")

    def run(student_values, teacher_values):
        student = student_values.clone().requires_grad_()
        if sparse:
            values_btk, ids_btk = teacher_btv.topk(3, dim=-1)
            values_btk = torch.where(ignored_bt[..., None], teacher_values[..., :3], values_btk)
            teacher = TeacherLogits.sparse(ids_btk, values_btk)
        else:
            teacher = TeacherLogits.dense(teacher_values)
        out = distillation_loss(
            student, labels_bt, teacher=teacher, config=config, step=0, total_steps=1
        )
        out.loss.backward()
        return out, student.grad

    out, grad = run(student_btv, teacher_btv)
    changed_student = student_btv.clone()
    changed_teacher = teacher_btv.clone()
    changed_student[ignored_bt] = torch.randn(int(ignored_bt.sum()), 8, dtype=torch.float64) * 50
    changed_student[0, 0, 0] = math.nan
    changed_student[1, 3, 1] = math.inf
    changed_teacher[ignored_bt] = torch.randn(int(ignored_bt.sum()), 8, dtype=torch.float64) * 50
    changed_teacher[0, 0, 2] = math.nan
    out2, grad2 = run(changed_student, changed_teacher)
    assert torch.equal(out.loss, out2.loss) and out.tokens.item() == 6
    assert torch.equal(grad, grad2)
    assert (grad[ignored_bt] == 0).all() and (grad[~ignored_bt] != 0).any()


def test_all_positions_ignored_gives_zero_loss_and_zero_gradient():
    student = torch.randn(1, 3, 5, requires_grad=True)
    out = distillation_loss(
        student,
        torch.full((1, 3), -100),
        teacher=TeacherLogits.dense(torch.randn(1, 3, 5)),
        config=_config(),
        step=0,
        total_steps=1,
    )
    assert out.loss.item() == 0.0 and out.tokens.item() == 0
    out.loss.backward()
    assert (student.grad == 0).all()


# --- bad input ---------------------------------------------------------------------------------


def _call(student_btv, labels_bt, teacher):
    return distillation_loss(
        student_btv, labels_bt, teacher=teacher, config=_config(), step=0, total_steps=1
    )


def test_shape_and_vocab_mismatches_raise_value_error():
    student_btv, labels_bt = torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)
    cases = [
        (TeacherLogits.dense(torch.randn(2, 3, 6)), "teacher vocab size 6 != student vocab size 5"),
        (TeacherLogits.dense(torch.randn(2, 4, 5)), r"teacher logits cover .* \(2, 4\)"),
        (TeacherLogits.dense(torch.randn(2, 3)), r"teacher logits_btv must be .* \(2, 3\)"),
        (
            TeacherLogits.sparse(torch.tensor([[[0, 5]] * 3] * 2), torch.randn(2, 3, 2)),
            r"teacher ids must lie in \[0, 5\).*share a tokenizer",
        ),
        (
            TeacherLogits.sparse(torch.tensor([[[-1, 2]] * 3] * 2), torch.randn(2, 3, 2)),
            r"teacher ids must lie in \[0, 5\)",
        ),
        (
            TeacherLogits.sparse(torch.tensor([[[1, 1]] * 3] * 2), torch.randn(2, 3, 2)),
            "repeat an id",
        ),
        (
            TeacherLogits.sparse(torch.zeros(2, 3, 2, dtype=torch.long), torch.randn(2, 3, 3)),
            "must both have shape",
        ),
        (
            TeacherLogits.sparse(torch.zeros(2, 2, 1, dtype=torch.long), torch.randn(2, 2, 1)),
            r"teacher top-k covers .* \(2, 2\)",
        ),
        (
            TeacherLogits.sparse(torch.zeros(2, 3, 6, dtype=torch.long), torch.randn(2, 3, 6)),
            "1 <= k <= student vocab 5",
        ),
        (
            TeacherLogits.sparse(torch.zeros(2, 3, 1), torch.randn(2, 3, 1)),
            "must be integer token ids",
        ),
    ]
    for teacher, message in cases:
        with pytest.raises(ValueError, match=message):
            _call(student_btv, labels_bt, teacher)
    teacher = TeacherLogits.dense(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"labels_bt must be integer with shape \(2, 3\)"):
        _call(student_btv, torch.zeros(2, 4, dtype=torch.long), teacher)
    with pytest.raises(
        ValueError, match=r"labels must be -100 \(ignored\) or in \[0, 5\); found 5"
    ):
        _call(student_btv, torch.tensor([[0, 5, -100]] * 2), teacher)
    with pytest.raises(ValueError, match="student_logits_btv must be"):
        _call(torch.randn(2, 5), labels_bt, teacher)
    with pytest.raises(TypeError, match="teacher must be a TeacherLogits"):
        _call(student_btv, labels_bt, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="must have the same shape"):
        forward_kl(torch.randn(2, 3, 6), student_btv)


def test_teacher_logits_takes_exactly_one_form():
    with pytest.raises(ValueError, match="got both"):
        TeacherLogits(logits_btv=torch.zeros(1, 1, 2), ids_btk=torch.zeros(1, 1, 1))
    with pytest.raises(ValueError, match="got neither"):
        TeacherLogits()
    with pytest.raises(ValueError, match="needs both ids_btk and logits_btk"):
        TeacherLogits(ids_btk=torch.zeros(1, 1, 1, dtype=torch.long))


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"jsd_beta": 1.5}, "jsd_beta"),
        ({"jsd_beta": 0.0}, "jsd_beta"),
        ({"jsd_beta": 1.0}, "jsd_beta"),
        ({"skew_lambda": 1.0}, "skew_lambda"),
        ({"skew_lambda": -0.1}, "skew_lambda"),
        ({"divergence": "kl"}, "divergence"),
        ({"weighting": "attention"}, "weighting"),
        ({"alpha": {"alpha_start": 1.5}}, "alpha.alpha_start"),
        ({"alpha": {"kind": "linear", "alpha_end": -0.1}}, "alpha.alpha_end"),
        ({"alpha": {"alpha_start": math.nan}}, "alpha.alpha_start"),
        ({"alpha": {"kind": "linear", "warmup_fraction": 0.1}}, "alpha.warmup_fraction"),
        ({"alpha": {"kind": "wsd", "warmup_fraction": 0.1}}, "alpha.decay_fraction"),
        (
            {"alpha": {"kind": "wsd", "warmup_fraction": 0.6, "decay_fraction": 0.5}},
            "alpha.decay_fraction",
        ),
        ({"alpha": {"kind": "step"}}, "alpha.kind"),
    ],
)
def test_config_validate_refuses_impossible_values(data, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        from_dict(DistillLossSettings, data)


def test_config_defaults_are_valid_and_loss_revalidates_direct_construction():
    assert from_dict(DistillLossSettings, {}) == DistillLossSettings()
    student_btv = torch.randn(1, 2, 3)
    with pytest.raises(ConfigError, match="temperature"):
        distillation_loss(
            student_btv,
            torch.zeros(1, 2, dtype=torch.long),
            teacher=TeacherLogits.dense(student_btv),
            config=DistillLossSettings(temperature=0.0),
            step=0,
            total_steps=1,
        )
