"""Distillation loss: teacher soft targets mixed with hard labels (recipe section 4).

    L = mean over target tokens t of [ a_t * T^2 * D_t + (1 - a_t) * CE_t ],  a_t = alpha(step) * w_t

D_t compares the teacher's and the student's next-token distributions at temperature T
(softmax(logits / T)); CE_t is the student's cross-entropy on the gold token at T = 1; alpha(step)
follows an `AlphaSchedule`; w_t is a detached per-token weight. The T^2 factor (Hinton et al.,
2015) keeps the soft term's gradients on the scale of the hard term's as T changes.

Shift convention: the caller shifts. `student_logits_btv[:, t]` predicts `labels_bt[:, t]`; with a
Hugging Face causal LM pass `logits[:, :-1]` and `labels[:, 1:]`, and shift the teacher the same
way. Labels of -100 mark positions that are not targets: they are dropped before any arithmetic,
so their logits (even inf or NaN) change neither the loss nor the gradients.

Gradient accumulation: `DistillOutput.loss_sum` sums this call's target tokens. Backpropagating
each micro-batch's `loss_sum / N`, N the target-token count of the whole accumulated batch, gives
the gradients of one big batch; averaging per-micro-batch means does not when counts differ.

Divergences, p_t the teacher and p_s the student at temperature T:
    forward_kl  KL(p_t || p_s).
    reverse_kl  KL(p_s || p_t).
    jsd         beta * KL(p_t || m) + (1 - beta) * KL(p_s || m),  m = beta * p_t + (1 - beta) * p_s:
                the generalised JSD of GKD (Agarwal et al., 2024) and TRL, beta the teacher's share
                of the mixture; beta = 0.5 is the symmetric JSD. It is identically 0 at beta = 0
                and at beta = 1 (TRL swaps in forward/reverse KL there); this module refuses those
                values: name forward_kl or reverse_kl instead.
    skew_kl     KL(p_t || lam * p_t + (1 - lam) * p_s): DistiLLM's alpha-skew KL (Ko et al., 2024,
                "SKL"), their alpha named lam here; lam = 0 is forward KL, DistiLLM uses 0.1.
Everything is computed from log-softmax values with 0 * log 0 = 0, so probabilities that underflow
to zero, or -inf logits, give no NaN in the loss or its gradients.

Sparse (offline) teacher: top-k ids and logits per position, see `TeacherLogits`. The teacher is
the truncated distribution softmax(top-k logits / T) on those ids, zero elsewhere (the tail of
its distribution was not cached, so nothing better is known). Each divergence is then the exact
divergence between this truncated teacher and the student's full softmax, whose mass outside
the top-k ids is lumped into one "other" bucket where it matters:
    forward_kl, skew_kl  the teacher puts no mass on "other", so only the k gathered student
                         log-probs enter; exact for the truncated teacher.
    jsd                  on "other" m = (1 - beta) * p_s exactly, so the student's tail mass S adds
                         (1 - beta) * S * log(1 / (1 - beta)); exact for the truncated teacher.
    reverse_kl           against a teacher with zero mass on "other" the exact value is infinite
                         as soon as the student has any mass there, so both distributions are
                         restricted to the top-k ids and renormalised: KL(p_s|topk || p_t|topk).
                         This is the one approximation beyond the truncation itself; it gives no
                         gradient to the student's mass outside the top-k.
With k = V every case reproduces the dense loss.

Tensor legend: b batch, t position (already shifted), v vocabulary, k teacher entries per
position, n target tokens (labels != -100, flattened over b and t). The divergence helpers accept
any leading shape; `_bt` names the usual one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from align.config import check

IGNORE_INDEX = -100
# Floor on the teacher's gold-token cross-entropy in the "confidence" weight: a teacher that is
# (almost) certain of the gold token gives ratio CE_s / 1e-6, so w = 1 unless the student is as
# certain too (CE_s = 0, w = 0: both terms are then ~0 anyway).
CONFIDENCE_EPS = 1e-6

DivergenceName = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl"]
WeightingName = Literal["none", "confidence", "entropy"]
DIVERGENCES: tuple[str, ...] = get_args(DivergenceName)
WEIGHTINGS: tuple[str, ...] = get_args(WeightingName)


@dataclass
class AlphaSchedule:
    """How alpha, the weight of the soft (teacher) term, moves over training; see `alpha_at`."""

    # "constant": alpha_start throughout. "linear" / "cosine": from alpha_start at step 0 to
    # alpha_end at total_steps. "wsd" (warmup-stable-decay): linear from alpha_end up to
    # alpha_start over the first warmup_fraction of training, alpha_start, then linear back down
    # to alpha_end over the last decay_fraction (with alpha_end = 0: the usual WSD shape).
    kind: Literal["constant", "linear", "cosine", "wsd"] = "constant"
    # Alpha at the start (after the warmup for "wsd"), in [0, 1]; the value of "constant".
    alpha_start: float = 0.5
    # Alpha at the end of training, in [0, 1]; unused by "constant". Decreasing alpha (more
    # teacher early) beat increasing it in pre-training distillation studies.
    alpha_end: float = 0.0
    # "wsd" only (0 otherwise): fraction of total_steps spent warming up, may be 0.
    warmup_fraction: float = 0.0
    # "wsd" only (0 otherwise): fraction of total_steps spent decaying at the end, > 0.
    decay_fraction: float = 0.0

    def validate(self) -> None:
        for key in ("alpha_start", "alpha_end"):
            value = getattr(self, key)
            check(0.0 <= value <= 1.0, key, f"must be in [0, 1] (got {value})")
        for key in ("warmup_fraction", "decay_fraction"):
            value = getattr(self, key)
            check(0.0 <= value <= 1.0, key, f"must be in [0, 1] (got {value})")
            check(
                self.kind == "wsd" or value == 0.0,
                key,
                f"is only used by kind 'wsd'; got {value} with kind '{self.kind}'",
            )
        if self.kind == "wsd":
            check(
                self.decay_fraction > 0.0,
                "decay_fraction",
                "must be > 0 for kind 'wsd' (use kind 'constant' for no decay)",
            )
            check(
                self.warmup_fraction + self.decay_fraction <= 1.0,
                "decay_fraction",
                f"warmup_fraction + decay_fraction must be <= 1 "
                f"(got {self.warmup_fraction} + {self.decay_fraction})",
            )


@dataclass
class DistillLossSettings:
    """The distillation loss; the module docstring gives the formula and conventions."""

    # D, the divergence between teacher and student at temperature T.
    divergence: DivergenceName = "forward_kl"
    # T: both distributions are softmax(logits / T) in D, and D is scaled by T^2. Must be > 0.
    temperature: float = 1.0
    # "jsd" only: the teacher's share beta of the mixture m; 0.5 is the symmetric JSD. In (0, 1).
    jsd_beta: float = 0.5
    # "skew_kl" only: the teacher's share lam in KL(p_t || lam p_t + (1 - lam) p_s), DistiLLM's
    # skew alpha (0 is forward KL; DistiLLM uses 0.1). In [0, 1).
    skew_lambda: float = 0.1
    # Per-token weight w_t, detached, at T = 1: "none" 1; "confidence" 1 - exp(-CE_s / CE_t) on
    # the gold token (trust the teacher where it beats the student); "entropy" 1 - H_t / log V
    # (trust a confident teacher). See `token_weights`.
    weighting: WeightingName = "none"
    # alpha(step), the weight of the soft term before w_t.
    alpha: AlphaSchedule = field(default_factory=AlphaSchedule)

    def validate(self) -> None:
        check(
            math.isfinite(self.temperature) and self.temperature > 0.0,
            "temperature",
            f"must be finite and > 0 (got {self.temperature})",
        )
        check(
            0.0 < self.jsd_beta < 1.0,
            "jsd_beta",
            f"must be in (0, 1) (got {self.jsd_beta}); JSD is identically 0 at 0 and 1, "
            "use divergence 'forward_kl' or 'reverse_kl' instead",
        )
        check(
            0.0 <= self.skew_lambda < 1.0,
            "skew_lambda",
            f"must be in [0, 1) (got {self.skew_lambda}); skew KL is identically 0 at 1",
        )


@dataclass(frozen=True)
class TeacherLogits:
    """The teacher's next-token logits, dense (online teacher) or top-k (offline cache).

    Build with `TeacherLogits.dense(teacher_logits_btv)` or
    `TeacherLogits.sparse(teacher_ids_btk, teacher_logits_btk)`. Positions are aligned with the
    student's (same shift). Teacher and student must share a tokenizer: a dense vocab size that
    differs from the student's, or a sparse id outside the student's vocab, is refused.
    """

    # Dense: teacher logits over the shared vocabulary, (b, t, v); None when sparse.
    logits_btv: Tensor | None = None
    # Sparse: the ids of the teacher's top-k tokens per position, (b, t, k), distinct per position.
    ids_btk: Tensor | None = None
    # Sparse: the teacher's raw logits (T = 1) for those ids, (b, t, k), in the same order.
    logits_btk: Tensor | None = None

    def __post_init__(self) -> None:
        dense = self.logits_btv is not None
        sparse = self.ids_btk is not None or self.logits_btk is not None
        if dense == sparse:
            raise ValueError(
                "TeacherLogits takes either logits_btv (dense) or ids_btk and logits_btk "
                f"(sparse top-k); got {'both' if dense else 'neither'}"
            )
        if sparse and (self.ids_btk is None or self.logits_btk is None):
            raise ValueError("a sparse TeacherLogits needs both ids_btk and logits_btk")

    @classmethod
    def dense(cls, teacher_logits_btv: Tensor) -> TeacherLogits:
        """A teacher given by its full logits (b, t, v)."""
        return cls(logits_btv=teacher_logits_btv)

    @classmethod
    def sparse(cls, teacher_ids_btk: Tensor, teacher_logits_btk: Tensor) -> TeacherLogits:
        """A teacher given by its top-k token ids (b, t, k) and their logits (b, t, k)."""
        return cls(ids_btk=teacher_ids_btk, logits_btk=teacher_logits_btk)

    @property
    def is_sparse(self) -> bool:
        return self.logits_btv is None


@dataclass
class DistillOutput:
    """What `distillation_loss` returns; the logging scalars are detached 0-dim tensors."""

    # Mean loss over this call's target tokens (0 when there are none): backprop it when the
    # call covers the whole batch.
    loss: Tensor
    # Sum of the per-token losses; with gradient accumulation backprop loss_sum / N, N the
    # target-token count of the whole accumulated batch.
    loss_sum: Tensor
    # Target tokens (labels != -100) in this call, an int64 0-dim tensor (no host sync).
    tokens: Tensor
    # Mean over target tokens of T^2 * D_t.
    soft_loss: Tensor
    # Mean over target tokens of CE_t.
    hard_loss: Tensor
    # Mean over target tokens of a_t = alpha(step) * w_t.
    effective_alpha: Tensor
    # Mean over target tokens of KL(p_teacher || p_student) at T = 1 (the truncated teacher's
    # when sparse).
    teacher_kl: Tensor
    # alpha(step) from the schedule.
    alpha: float


def alpha_at(step: int, total_steps: int, schedule: AlphaSchedule) -> float:
    """Alpha at `step` of `total_steps` (progress = step / total_steps, clamped to [0, 1]).

    Step 0 gives the start value and step == total_steps the end value; later steps keep the end
    value. See `AlphaSchedule.kind` for the shapes.

    Raises:
        ValueError: total_steps < 1 or step < 0.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1 (got {total_steps})")
    if step < 0:
        raise ValueError(f"step must be >= 0 (got {step})")
    progress = min(step / total_steps, 1.0)
    start, end = schedule.alpha_start, schedule.alpha_end
    if schedule.kind == "constant":
        return start
    if schedule.kind == "linear":
        return start + (end - start) * progress
    if schedule.kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule.kind != "wsd":
        raise ValueError(f"unknown alpha schedule kind {schedule.kind!r}")
    warmup, decay = schedule.warmup_fraction, schedule.decay_fraction
    if progress < warmup:
        return end + (start - end) * progress / warmup
    if progress <= 1.0 - decay:
        return start
    return start + (end - start) * (progress - (1.0 - decay)) / decay


# --- divergences on log-probabilities ----------------------------------------------------------


def _kl_terms(logp_p: Tensor, logp_q: Tensor) -> Tensor:
    """sum over the last dim of p * (log p - log q), with 0 * log 0 = 0; p need not sum to 1.

    The `where` keeps -inf - -inf (a NaN) out of the sum and out of the gradient.
    """
    p = logp_p.exp()
    return (p * torch.where(p > 0, logp_p - logp_q, 0.0)).sum(-1)


def _log_mix(logp_a: Tensor, logp_b: Tensor, share_a: float) -> Tensor:
    """log(share_a * exp(logp_a) + (1 - share_a) * exp(logp_b)), elementwise.

    -inf inputs are clamped to the dtype's most negative finite value first: logaddexp of two
    -inf is -inf but its gradient is NaN, which would leak through the masked KL terms.
    """
    if share_a == 0.0:
        return logp_b
    if share_a == 1.0:
        return logp_a
    lowest = torch.finfo(logp_a.dtype).min
    return torch.logaddexp(
        logp_a.clamp(min=lowest) + math.log(share_a),
        logp_b.clamp(min=lowest) + math.log1p(-share_a),
    )


def _dense_divergence(
    name: str, logp_t_nv: Tensor, logp_s_nv: Tensor, jsd_beta: float, skew_lambda: float
) -> Tensor:
    """D per token from full teacher and student log-probs (..., v) -> (...)."""
    if name == "forward_kl":
        return _kl_terms(logp_t_nv, logp_s_nv)
    if name == "reverse_kl":
        return _kl_terms(logp_s_nv, logp_t_nv)
    if name == "jsd":
        logm_nv = _log_mix(logp_t_nv, logp_s_nv, jsd_beta)
        return jsd_beta * _kl_terms(logp_t_nv, logm_nv) + (1.0 - jsd_beta) * _kl_terms(
            logp_s_nv, logm_nv
        )
    if name == "skew_kl":
        return _kl_terms(logp_t_nv, _log_mix(logp_t_nv, logp_s_nv, skew_lambda))
    raise ValueError(f"unknown divergence {name!r}; known: {', '.join(DIVERGENCES)}")


def _sparse_divergence(
    name: str,
    ids_nk: Tensor,
    logp_t_nk: Tensor,
    logp_s_nv: Tensor,
    jsd_beta: float,
    skew_lambda: float,
) -> Tensor:
    """D per token between the truncated teacher on `ids_nk` and the full student (module doc)."""
    logp_s_nk = logp_s_nv.gather(-1, ids_nk)
    if name == "forward_kl":
        return _kl_terms(logp_t_nk, logp_s_nk)
    if name == "reverse_kl":
        # Both restricted to the top-k ids and renormalised: the exact value is infinite.
        logq_s_nk = logp_s_nk - torch.logsumexp(logp_s_nk, dim=-1, keepdim=True)
        return _kl_terms(logq_s_nk, logp_t_nk)
    if name == "jsd":
        logm_nk = _log_mix(logp_t_nk, logp_s_nk, jsd_beta)
        # The student's mass outside the top-k, summed directly (1 - sum over the top-k would
        # cancel catastrophically when k is close to V); there m = (1 - beta) p_s exactly.
        tail_n = logp_s_nv.exp().scatter(-1, ids_nk, 0.0).sum(-1)
        student_nk = _kl_terms(logp_s_nk, logm_nk) - tail_n * math.log1p(-jsd_beta)
        return jsd_beta * _kl_terms(logp_t_nk, logm_nk) + (1.0 - jsd_beta) * student_nk
    if name == "skew_kl":
        return _kl_terms(logp_t_nk, _log_mix(logp_t_nk, logp_s_nk, skew_lambda))
    raise ValueError(f"unknown divergence {name!r}; known: {', '.join(DIVERGENCES)}")


class _TeacherLogp(NamedTuple):
    """Teacher log-probs at one temperature: over the vocab (dense) or over `ids` (sparse)."""

    # (..., v) when dense; (..., k) when sparse, the truncated teacher on `ids`.
    logp: Tensor
    # Sparse: the vocab ids of logp's last dim, (..., k), int64; None when dense.
    ids: Tensor | None


def _teacher_logp(
    logits: Tensor, ids: Tensor | None, temperature: float, dtype: torch.dtype
) -> _TeacherLogp:
    logp = F.log_softmax(logits.to(dtype) / temperature, dim=-1)
    return _TeacherLogp(logp, None if ids is None else ids.long())


def _divergence(
    name: str, teacher: _TeacherLogp, logp_s_nv: Tensor, jsd_beta: float, skew_lambda: float
) -> Tensor:
    if teacher.ids is None:
        return _dense_divergence(name, teacher.logp, logp_s_nv, jsd_beta, skew_lambda)
    return _sparse_divergence(name, teacher.ids, teacher.logp, logp_s_nv, jsd_beta, skew_lambda)


def _weights(
    weighting: str, teacher: _TeacherLogp, logp_s_nv: Tensor, labels_n: Tensor, vocab: int
) -> Tensor:
    """w per token from T = 1 log-probs; labels_n must be valid ids. Callers detach."""
    if weighting == "none":
        return torch.ones(labels_n.shape, dtype=logp_s_nv.dtype, device=logp_s_nv.device)
    if weighting == "confidence":
        ce_s_n = -logp_s_nv.gather(-1, labels_n[..., None]).squeeze(-1)
        if teacher.ids is None:
            logp_t_gold_n = teacher.logp.gather(-1, labels_n[..., None]).squeeze(-1)
        else:
            # A gold token outside the teacher's top-k has truncated-teacher probability 0:
            # CE_t = inf, ratio 0, w = 0 (rely on the label where the teacher missed it).
            is_gold_nk = teacher.ids == labels_n[..., None]
            logp_t_gold_n = torch.where(is_gold_nk, teacher.logp, -math.inf).amax(-1)
        ratio_n = ce_s_n / (-logp_t_gold_n).clamp(min=CONFIDENCE_EPS)
        return -torch.expm1(-ratio_n)
    if weighting == "entropy":
        if vocab < 2:
            raise ValueError(f"entropy weighting needs a vocab of at least 2 (got {vocab})")
        p_t = teacher.logp.exp()
        entropy_n = -(p_t * torch.where(p_t > 0, teacher.logp, 0.0)).sum(-1)
        # Rounding can put a one-hot teacher's entropy a hair below 0.
        return (1.0 - entropy_n / math.log(vocab)).clamp(0.0, 1.0)
    raise ValueError(f"unknown weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}")


# --- input checks ------------------------------------------------------------------------------


def _check_params(temperature: float, jsd_beta: float, skew_lambda: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be finite and > 0 (got {temperature})")
    if not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"jsd_beta must be in (0, 1) (got {jsd_beta})")
    if not 0.0 <= skew_lambda < 1.0:
        raise ValueError(f"skew_lambda must be in [0, 1) (got {skew_lambda})")


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_inputs(
    student_logits_btv: Tensor, teacher: TeacherLogits, labels_bt: Tensor | None = None
) -> None:
    """Raises ValueError (TypeError for a wrong teacher type) naming what does not match."""
    if not isinstance(teacher, TeacherLogits):
        raise TypeError(
            "teacher must be a TeacherLogits (TeacherLogits.dense(logits_btv) or "
            f"TeacherLogits.sparse(ids_btk, logits_btk)), got {type(teacher).__name__}"
        )
    if student_logits_btv.dim() != 3 or not student_logits_btv.is_floating_point():
        raise ValueError(
            "student_logits_btv must be floating point with shape (batch, positions, vocab); "
            f"got {student_logits_btv.dtype} {_shape(student_logits_btv)}"
        )
    b, t, v = student_logits_btv.shape
    if teacher.logits_btv is not None:
        logits_btv = teacher.logits_btv
        if logits_btv.dim() != 3 or not logits_btv.is_floating_point():
            raise ValueError(
                "teacher logits_btv must be floating point with shape (batch, positions, vocab); "
                f"got {logits_btv.dtype} {_shape(logits_btv)}"
            )
        if logits_btv.shape[:2] != (b, t):
            raise ValueError(
                f"teacher logits cover (batch, positions) {_shape(logits_btv)[:2]} but the "
                f"student's cover {(b, t)}: shift and slice both the same way"
            )
        if logits_btv.shape[2] != v:
            raise ValueError(
                f"teacher vocab size {logits_btv.shape[2]} != student vocab size {v}: teacher "
                "and student must share a tokenizer"
            )
    else:
        ids_btk, logits_btk = teacher.ids_btk, teacher.logits_btk
        assert ids_btk is not None and logits_btk is not None  # __post_init__ guarantees it
        if ids_btk.dim() != 3 or ids_btk.shape != logits_btk.shape:
            raise ValueError(
                "teacher ids_btk and logits_btk must both have shape (batch, positions, k); got "
                f"{_shape(ids_btk)} and {_shape(logits_btk)}"
            )
        if ids_btk.is_floating_point() or ids_btk.is_complex() or ids_btk.dtype == torch.bool:
            raise ValueError(f"teacher ids_btk must be integer token ids, got {ids_btk.dtype}")
        if not logits_btk.is_floating_point():
            raise ValueError(f"teacher logits_btk must be floating point, got {logits_btk.dtype}")
        if ids_btk.shape[:2] != (b, t):
            raise ValueError(
                f"teacher top-k covers (batch, positions) {_shape(ids_btk)[:2]} but the "
                f"student's logits cover {(b, t)}: shift and slice both the same way"
            )
        k = ids_btk.shape[2]
        if not 1 <= k <= v:
            raise ValueError(f"teacher top-k must have 1 <= k <= student vocab {v} (got k={k})")
        if ids_btk.numel() and (ids_btk.min() < 0 or ids_btk.max() >= v):
            raise ValueError(
                f"teacher ids must lie in [0, {v}), the student vocab, but range over "
                f"[{int(ids_btk.min())}, {int(ids_btk.max())}]: teacher and student must share "
                "a tokenizer"
            )
        sorted_btk = ids_btk.sort(dim=-1).values
        if (sorted_btk[..., 1:] == sorted_btk[..., :-1]).any():
            raise ValueError(
                "teacher ids_btk repeat an id within a position; top-k ids are distinct"
            )
    if labels_bt is not None:
        if labels_bt.shape != (b, t) or labels_bt.is_floating_point():
            raise ValueError(
                f"labels_bt must be integer with shape {(b, t)} (the student's batch, positions); "
                f"got {labels_bt.dtype} {_shape(labels_bt)}"
            )
        bad_bt = (labels_bt != IGNORE_INDEX) & ((labels_bt < 0) | (labels_bt >= v))
        if bad_bt.any():
            raise ValueError(
                f"labels must be {IGNORE_INDEX} (ignored) or in [0, {v}); found "
                f"{labels_bt[bad_bt][0].item()}"
            )


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 at least (bf16 log-softmax over a large vocab is too coarse), float64 if given."""
    dtype = torch.float32
    for x in tensors:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


# --- public API --------------------------------------------------------------------------------


def _dense_public(
    name: str,
    teacher_logits_btv: Tensor,
    student_logits_btv: Tensor,
    temperature: float,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.0,
) -> Tensor:
    _check_params(temperature, jsd_beta, skew_lambda)
    if teacher_logits_btv.shape != student_logits_btv.shape:
        raise ValueError(
            f"teacher logits {_shape(teacher_logits_btv)} and student logits "
            f"{_shape(student_logits_btv)} must have the same shape"
        )
    dtype = _compute_dtype(teacher_logits_btv, student_logits_btv)
    logp_t_btv = F.log_softmax(teacher_logits_btv.to(dtype) / temperature, dim=-1)
    logp_s_btv = F.log_softmax(student_logits_btv.to(dtype) / temperature, dim=-1)
    return _dense_divergence(name, logp_t_btv, logp_s_btv, jsd_beta, skew_lambda)


def forward_kl(
    teacher_logits_btv: Tensor, student_logits_btv: Tensor, temperature: float = 1.0
) -> Tensor:
    """KL(p_teacher || p_student) per position at temperature T, shape (b, t)."""
    return _dense_public("forward_kl", teacher_logits_btv, student_logits_btv, temperature)


def reverse_kl(
    teacher_logits_btv: Tensor, student_logits_btv: Tensor, temperature: float = 1.0
) -> Tensor:
    """KL(p_student || p_teacher) per position at temperature T, shape (b, t)."""
    return _dense_public("reverse_kl", teacher_logits_btv, student_logits_btv, temperature)


def jsd(
    teacher_logits_btv: Tensor,
    student_logits_btv: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Generalised JSD per position, shape (b, t): beta KL(p_t||m) + (1-beta) KL(p_s||m).

    m = beta * p_teacher + (1 - beta) * p_student; beta in (0, 1), 0.5 the symmetric JSD.
    """
    return _dense_public("jsd", teacher_logits_btv, student_logits_btv, temperature, jsd_beta=beta)


def skew_kl(
    teacher_logits_btv: Tensor,
    student_logits_btv: Tensor,
    skew_lambda: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """DistiLLM's skew KL per position, shape (b, t): KL(p_t || lam p_t + (1 - lam) p_s).

    lam = skew_lambda in [0, 1); 0 is forward KL.
    """
    return _dense_public(
        "skew_kl", teacher_logits_btv, student_logits_btv, temperature, skew_lambda=skew_lambda
    )


def divergence(
    name: DivergenceName,
    teacher: TeacherLogits,
    student_logits_btv: Tensor,
    *,
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
) -> Tensor:
    """D per position, shape (b, t), for a dense or sparse teacher (module doc: sparse treatment).

    Raises:
        ValueError: unknown name, impossible parameters, or mismatched shapes / vocab.
    """
    _check_params(temperature, jsd_beta, skew_lambda)
    _check_inputs(student_logits_btv, teacher)
    teacher_logits = teacher.logits_btv if teacher.logits_btv is not None else teacher.logits_btk
    dtype = _compute_dtype(student_logits_btv, teacher_logits)
    logp_s_btv = F.log_softmax(student_logits_btv.to(dtype) / temperature, dim=-1)
    teacher_lp = _teacher_logp(teacher_logits, teacher.ids_btk, temperature, dtype)
    return _divergence(name, teacher_lp, logp_s_btv, jsd_beta, skew_lambda)


def token_weights(
    weighting: WeightingName,
    teacher: TeacherLogits,
    student_logits_btv: Tensor,
    labels_bt: Tensor,
) -> Tensor:
    """The per-token weight w (b, t), detached, from T = 1 distributions; 0 where label is -100.

    - "none": 1.
    - "confidence": 1 - exp(-CE_s / max(CE_t, CONFIDENCE_EPS)), CE_s and CE_t the student's and
      teacher's cross-entropy on the gold token. Near 1 where the teacher beats the student
      (CE_t << CE_s), near 0 where it does worse; 1 - 1/e at a tie. A sparse teacher whose top-k
      misses the gold token has CE_t = inf, so w = 0.
    - "entropy": 1 - H(p_teacher) / log V, clamped to [0, 1]: 1 for a one-hot teacher, 0 for a
      uniform one. Measured at T = 1 so that it gates on the teacher's own confidence, not on
      the softening chosen for D (raising T would otherwise push every w towards 0). A sparse
      teacher uses the entropy of its truncated distribution, still over log V.

    w is a weight, not a target: no gradient flows through it.
    """
    _check_inputs(student_logits_btv, teacher, labels_bt)
    teacher_logits = teacher.logits_btv if teacher.logits_btv is not None else teacher.logits_btk
    dtype = _compute_dtype(student_logits_btv, teacher_logits)
    target_bt = labels_bt != IGNORE_INDEX
    with torch.no_grad():
        logp_s_btv = F.log_softmax(student_logits_btv.detach().to(dtype), dim=-1)
        teacher_lp = _teacher_logp(teacher_logits.detach(), teacher.ids_btk, 1.0, dtype)
        safe_labels_bt = torch.where(target_bt, labels_bt, 0).long()
        w_bt = _weights(weighting, teacher_lp, logp_s_btv, safe_labels_bt, logp_s_btv.shape[-1])
        return torch.where(target_bt, w_bt, 0.0)


def distillation_loss(
    student_logits_btv: Tensor,
    labels_bt: Tensor,
    *,
    teacher: TeacherLogits,
    config: DistillLossSettings,
    step: int,
    total_steps: int,
) -> DistillOutput:
    """L = mean over target tokens of [a_t T^2 D_t + (1 - a_t) CE_t], a_t = alpha(step) w_t.

    Args:
        student_logits_btv: student logits, already shifted: [:, t] predicts labels_bt[:, t].
        labels_bt: gold token ids, -100 where there is no target (prompt, padding).
        teacher: the teacher's logits for the same positions, dense or top-k; it gets no
            gradient.
        config: divergence, temperature, weighting and alpha schedule.
        step: the optimiser step, for the alpha schedule.
        total_steps: the run's total optimiser steps, for the alpha schedule.

    Returns:
        DistillOutput: `loss` to backprop (or `loss_sum` and `tokens` for accumulation) and
        detached logging means.

    Raises:
        ValueError: shape or vocab mismatch, bad labels or ids, bad step; ConfigError (a
            ValueError) for an invalid config.
    """
    config.alpha.validate()
    config.validate()
    _check_inputs(student_logits_btv, teacher, labels_bt)
    alpha = alpha_at(step, total_steps, config.alpha)
    temperature = config.temperature
    vocab = student_logits_btv.shape[-1]

    # Keep target positions only: ignored positions take no part in any arithmetic.
    target_bt = labels_bt != IGNORE_INDEX
    tokens = target_bt.sum()
    labels_n = labels_bt[target_bt].long()
    teacher_logits = teacher.logits_btv if teacher.logits_btv is not None else teacher.logits_btk
    dtype = _compute_dtype(student_logits_btv, teacher_logits)
    student_nv = student_logits_btv[target_bt].to(dtype)
    logp_s1_nv = F.log_softmax(student_nv, dim=-1)
    logp_st_nv = (
        logp_s1_nv if temperature == 1.0 else F.log_softmax(student_nv / temperature, dim=-1)
    )
    with torch.no_grad():
        teacher_n = teacher_logits[target_bt]
        ids_nk = None if teacher.ids_btk is None else teacher.ids_btk[target_bt]
        teacher_t = _teacher_logp(teacher_n, ids_nk, temperature, dtype)
        teacher_1 = (
            teacher_t if temperature == 1.0 else _teacher_logp(teacher_n, ids_nk, 1.0, dtype)
        )

    hard_n = -logp_s1_nv.gather(-1, labels_n[:, None]).squeeze(-1)
    soft_n = temperature**2 * _divergence(
        config.divergence, teacher_t, logp_st_nv, config.jsd_beta, config.skew_lambda
    )
    with torch.no_grad():
        w_n = _weights(config.weighting, teacher_1, logp_s1_nv.detach(), labels_n, vocab)
        kl1_n = _divergence("forward_kl", teacher_1, logp_s1_nv.detach(), 0.5, 0.0)
    a_n = alpha * w_n
    loss_sum = (a_n * soft_n + (1.0 - a_n) * hard_n).sum()
    count = tokens.clamp(min=1).to(dtype)

    def mean(x_n: Tensor) -> Tensor:
        return x_n.detach().sum() / count

    return DistillOutput(
        loss=loss_sum / count,
        loss_sum=loss_sum,
        tokens=tokens,
        soft_loss=mean(soft_n),
        hard_loss=mean(hard_n),
        effective_alpha=mean(a_n),
        teacher_kl=mean(kl1_n),
        alpha=alpha,
    )
