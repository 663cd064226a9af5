"""RL policy-gradient losses of the GRPO family, and group-relative advantages (recipe: online RL).

Notation, for completion (sequence) i and its completion tokens t:
    A_i       the sequence's advantage (`advantages`), shared by all its tokens.
    r_it      pi_theta / pi_prox, the learner's ratio against the proximal policy (see below).
    w_it      pi_prox / pi_behav, a detached importance weight (see below).
    clip(x)   clamp(x, 1 - e_low, 1 + e_high), (e_low, e_high) = `resolved_clip()`.
    k3_it     exp(q_it) - q_it - 1, q_it = log pi_ref - log pi_theta: the k3 estimator of
              KL(pi_theta || pi_ref) (Schulman, "Approximating KL divergence", 2020), >= 0, with
              gradient through pi_theta; beta = `kl_coef`.
    |o_i|     completion tokens of sequence i; N sequences and T tokens in the whole batch.

Kinds, the loss to minimise with l_it = -w_it * min(r_it A_i, clip(r_it) A_i) + beta * k3_it:
    grpo     L = 1/N sum_i 1/|o_i| sum_t l_it: each sequence's token mean, then the sequence mean
             (DeepSeekMath, Shao et al. 2024: e = 0.2, beta = 0.04).
    dapo     L = 1/T sum_i sum_t l_it: one token mean over the batch; clip-higher e_low = 0.2,
             e_high = 0.28 and no KL in the paper (Yu et al. 2025, arXiv 2503.14476). Dynamic
             sampling and the soft overlong penalty live in the rollout buffer and the rewards.
    dr_grpo  L = 1/(N * L_max) sum_i sum_t l_it, L_max = `max_completion_tokens`: a constant
             normaliser, so no length bias (Liu et al. 2025, "Understanding R1-Zero-Like
             Training", arXiv 2503.20783); its advantage is A_i = R_i - mean R (no std).
    gspo     s_i = exp(1/|o_i| sum_t log r_it), the length-normalised sequence ratio; the clip and
             the min act on sequences:
                 L = 1/N sum_i [ -w_i * min(s_i A_i, clip(s_i) A_i) + beta/|o_i| sum_t k3_it ],
             gradient through s_i (d s_i / d log pi_theta_it = s_i / |o_i|), e_low = 3e-4,
             e_high = 4e-4 (Zheng et al. 2025, arXiv 2507.18071, section 5.1; recommended for MoE
             policies, whose token ratios are noisy when the routing shifts). The sequence weight
             is the geometric mean w_i = exp(1/|o_i| sum_t log w_it), like s_i itself.
    cispo    L = 1/T sum_i sum_t [ -sg(min(r_it, 1 + e_max) * w_it) * A_i * log pi_theta_it
                                   + beta * k3_it ]:
             the detached, truncated IS weight scales a REINFORCE term, so no token loses its
             gradient (MiniMax-M1, Chen et al. 2025, arXiv 2506.13585). The paper sets no lower
             bound ("we did not impose a lower bound on the IS weight") and does not publish its
             e_high; the default e_max = 4 (cap 5) is ScaleRL's clip(r, 0, 5) (Khatri et al.
             2025, arXiv 2510.13786, which found {4, 5, 8} alike), as SkyRL and NeMo-RL use it.
A sequence with no completion tokens contributes 0 (but still counts in N).

Off-policy correction (`correction`). vLLM samples with the behaviour policy pi_behav, possibly
some versions stale and with other kernels; the learner recomputes pi_prox, its own logprobs of
the same tokens before the update (detached):
    decoupled  r = pi_theta / pi_prox and w = pi_prox / pi_behav: AReaL's decoupled PPO objective
               (Fu et al. 2025, arXiv 2505.24298). The clip bounds the update against the
               learner's own recent policy, the weight corrects for the sampler.
    tis        as decoupled with w = min(pi_prox / pi_behav, tis_cap): truncated IS (Yao et al.
               2025, "Your efficient RL framework secretly brings you off-policy RL training";
               cap 2 as in verl's rollout IS). Bounds the variance a stale sample can add.
    none       pi_prox := pi_behav (plain PPO ratio against vLLM's logprobs), w = 1; the prox
               argument is ignored. The gspo clip range is ~1e-4, below the usual vLLM / learner
               mismatch: with "none" that gap alone puts most s_i outside it, and every sequence
               whose advantage pushes s_i further out gets no gradient.
Since w * r = pi_theta / pi_behav, the corrections differ only where the clip acts (centred on
pi_prox or on pi_behav) and where the tis cap bites; gspo's geometric-mean w keeps this true for
the sequence ratio. The KL term is not weighted (as in TRL).

Gradient accumulation. Each kind's normaliser (N, T or N * L_max) is of the whole batch: pass
`total_sequences` / `total_tokens` of the full batch with each micro-batch and backpropagate each
micro-batch's loss; their sum is the full batch's loss (grpo's per-sequence 1/|o_i| is local to a
sequence, so it needs N only). Advantages must be computed on the whole batch first.

Padding. Positions with mask 0 are replaced by 0 before any arithmetic (`torch.where`), so their
values, even inf or NaN, change neither the loss nor the gradients (which are exactly 0 there).

Tensor legend: b sequences (completions), t completion-token positions (already aligned: the
logprob at [i, t] is of the token the mask marks at [i, t]); `_b` per sequence, `_bt` per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

from align.config import check

PolicyLossKind = Literal["grpo", "dapo", "dr_grpo", "gspo", "cispo"]
CorrectionName = Literal["decoupled", "tis", "none"]
AdvantageName = Literal["group", "batch"]
KINDS: tuple[str, ...] = get_args(PolicyLossKind)
CORRECTIONS: tuple[str, ...] = get_args(CorrectionName)
ADVANTAGES: tuple[str, ...] = get_args(AdvantageName)

# (clip_low, clip_high) when left None. cispo has no lower bound (MiniMax-M1), shown as inf
# (1 - inf = -inf); its clip_high is e_max, the truncation of the IS weight at 1 + e_max.
DEFAULT_CLIPS: dict[str, tuple[float, float]] = {
    "grpo": (0.2, 0.2),  # PPO / DeepSeekMath
    "dr_grpo": (0.2, 0.2),  # Dr.GRPO keeps PPO's clip
    "dapo": (0.2, 0.28),  # DAPO clip-higher
    "gspo": (3e-4, 4e-4),  # GSPO paper, section 5.1
    "cispo": (math.inf, 4.0),  # ScaleRL's cap of 5 on the IS weight; no lower bound
}


@dataclass
class PolicyLossSettings:
    """The policy loss and the advantage estimator; the module docstring gives the formulas."""

    # Which objective: "grpo", "dapo", "dr_grpo", "gspo" or "cispo" (module docstring).
    kind: PolicyLossKind = "grpo"
    # e_low: the ratio is clipped below at 1 - clip_low, in [0, 1). None: the kind's default
    # (grpo, dr_grpo, dapo 0.2; gspo 3e-4). Must stay None for cispo, which has no lower bound.
    clip_low: float | None = None
    # e_high: the ratio is clipped above at 1 + clip_high, >= 0. None: the kind's default
    # (grpo, dr_grpo 0.2; dapo 0.28; gspo 4e-4; cispo e_max = 4, an IS-weight cap of 5).
    clip_high: float | None = None
    # beta of the k3 KL to the reference policy, >= 0; > 0 needs the reference's logprobs.
    # DeepSeekMath's GRPO used 0.04; DAPO, Dr.GRPO and CISPO drop the term (0).
    kl_coef: float = 0.0
    # Off-policy correction between vLLM's behaviour policy and the learner:
    # "decoupled": r = pi_theta / pi_prox times the detached weight w = pi_prox / pi_behav
    # (AReaL); "tis": the same with w = min(pi_prox / pi_behav, tis_cap); "none": the plain
    # ratio pi_theta / pi_behav, w = 1, the prox logprobs ignored.
    correction: CorrectionName = "tis"
    # "tis" only: the cap on the importance weight, finite and >= 1 (on-policy tokens have
    # weight 1). 2 as in verl's rollout importance sampling.
    tis_cap: float = 2.0
    # Advantage normalisation (`advantages`): "group": (R - group mean) / (group std + eps);
    # "batch": (R - group mean) / (std of all the batch's rewards + eps) (TRL's scale_rewards
    # "batch", PPO-Lite). dr_grpo never divides by a std, so it takes "group" only.
    advantage: AdvantageName = "group"

    def validate(self) -> None:
        check(self.kind in KINDS, "kind", f"must be one of {', '.join(KINDS)} (got {self.kind!r})")
        check(
            self.correction in CORRECTIONS,
            "correction",
            f"must be one of {', '.join(CORRECTIONS)} (got {self.correction!r})",
        )
        check(
            self.advantage in ADVANTAGES,
            "advantage",
            f"must be one of {', '.join(ADVANTAGES)} (got {self.advantage!r})",
        )
        if self.clip_low is not None:
            check(
                self.kind != "cispo",
                "clip_low",
                f"must be null for kind 'cispo' (got {self.clip_low}): CISPO puts no lower "
                "bound on the IS weight, only clip_high (e_max) caps it",
            )
            check(
                0.0 <= self.clip_low < 1.0,
                "clip_low",
                f"must be in [0, 1) (got {self.clip_low}): the ratio is clipped at 1 - clip_low",
            )
        if self.clip_high is not None:
            check(
                math.isfinite(self.clip_high) and self.clip_high >= 0.0,
                "clip_high",
                f"must be finite and >= 0 (got {self.clip_high}): the ratio is clipped at "
                "1 + clip_high",
            )
        check(
            math.isfinite(self.kl_coef) and self.kl_coef >= 0.0,
            "kl_coef",
            f"must be finite and >= 0 (got {self.kl_coef})",
        )
        check(
            math.isfinite(self.tis_cap) and self.tis_cap >= 1.0,
            "tis_cap",
            f"must be finite and >= 1 (got {self.tis_cap}): a cap below 1 would shrink even "
            "on-policy tokens (weight 1); for no cap use correction 'decoupled'",
        )
        check(
            not (self.kind == "dr_grpo" and self.advantage == "batch"),
            "advantage",
            "must be 'group' for kind 'dr_grpo', which never divides by a std (got 'batch')",
        )

    def resolved_clip(self) -> tuple[float, float]:
        """(clip_low, clip_high) with the kind's defaults for the fields left None.

        cispo's clip_low is inf: no lower bound (1 - inf = -inf).
        """
        default_low, default_high = DEFAULT_CLIPS[self.kind]
        low = default_low if self.clip_low is None else self.clip_low
        high = default_high if self.clip_high is None else self.clip_high
        return low, high


@dataclass
class PolicyLossOutput:
    """What `policy_loss` returns."""

    # The scalar to backpropagate for this (micro-)batch, already divided by the kind's
    # normaliser of the whole batch (so micro-batch losses sum to the full batch's).
    loss: Tensor
    # Logging means over this call's completion tokens (sequences for gspo's ratio, weight and
    # clip metrics), python floats, 0 when there are none:
    #   policy/clip_fraction       share where the clip is active: the clipped term is the min,
    #                              so the token (sequence) gets no gradient; for cispo, the share
    #                              whose IS weight is truncated at 1 + e_max.
    #   policy/clip_fraction_low   active at the low bound (A < 0, r < 1 - e_low); 0 for cispo.
    #   policy/clip_fraction_high  active at the high bound (A > 0, r > 1 + e_high; cispo: r >
    #                              1 + e_max whatever A).
    #   policy/ratio_mean          mean r (gspo: mean s_i), unclipped.
    #   policy/is_weight_mean, policy/is_weight_max   w after the tis cap (1 for "none").
    #   policy/behaviour_gap       mean |log pi_prox - log pi_behav|; with "none", which has no
    #                              prox, mean |log pi_theta - log pi_behav| (detached) instead.
    #   policy/kl_ref              mean k3, whenever ref_logp_bt is given.
    metrics: dict[str, float] = field(default_factory=dict)


# --- advantages --------------------------------------------------------------------------------


def advantages(
    rewards_b: Tensor, group_ids_b: Tensor, settings: PolicyLossSettings, eps: float = 1e-6
) -> Tensor:
    """Per-sequence advantages from scalar rewards and the prompt group of each sequence.

    - kind "dr_grpo": A_i = R_i - mean of i's group (no std).
    - advantage "group": A_i = (R_i - group mean) / (group std + eps).
    - advantage "batch": A_i = (R_i - group mean) / (std of all of rewards_b + eps).
    Stds are unbiased (Bessel's n - 1, as torch.std, TRL and verl). A group whose rewards are all
    equal (a group of one included) gets exactly 0, and so does every sequence in "batch" mode
    when the whole batch is constant: never NaN, and no rounding residue from the mean.

    Call it on the whole batch, before splitting into micro-batches.

    Args:
        rewards_b: scalar reward per sequence, shape (b,).
        group_ids_b: integer id of each sequence's group (its prompt), shape (b,); any values,
            the rows of a group need not be adjacent.
        settings: kind and advantage estimator.
        eps: added to the std, >= 0.

    Returns:
        Detached advantages, shape (b,), float32 (float64 for float64 rewards).

    Raises:
        ValueError: shape mismatch, non-integer group ids, non-finite rewards, eps < 0.
        ConfigError: invalid settings.
    """
    settings.validate()
    if rewards_b.dim() != 1:
        raise ValueError(f"rewards_b must have shape (b,), got {tuple(rewards_b.shape)}")
    if group_ids_b.shape != rewards_b.shape:
        raise ValueError(
            f"group_ids_b {tuple(group_ids_b.shape)} must have the shape of rewards_b "
            f"{tuple(rewards_b.shape)}"
        )
    if group_ids_b.is_floating_point() or group_ids_b.is_complex():
        raise ValueError(f"group_ids_b must be integer ids, got {group_ids_b.dtype}")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be finite and >= 0 (got {eps})")
    dtype = _compute_dtype(rewards_b)
    reward_b = rewards_b.detach().to(dtype)
    if not torch.isfinite(reward_b).all():
        raise ValueError("rewards_b must be finite")
    if reward_b.numel() == 0:
        return reward_b.clone()
    _, group_b = torch.unique(group_ids_b.to(reward_b.device), return_inverse=True)
    groups = int(group_b.max()) + 1

    def per_group(values_b: Tensor, reduce: str) -> Tensor:
        init = {"sum": 0.0, "amax": -math.inf, "amin": math.inf}[reduce]
        out_g = torch.full((groups,), init, dtype=dtype, device=reward_b.device)
        return out_g.scatter_reduce(0, group_b, values_b, reduce=reduce)

    count_g = per_group(torch.ones_like(reward_b), "sum")
    mean_g = per_group(reward_b, "sum") / count_g
    centred_b = reward_b - mean_g[group_b]
    constant_b = (per_group(reward_b, "amax") == per_group(reward_b, "amin"))[group_b]
    if settings.kind == "dr_grpo":
        adv_b = centred_b
    elif settings.advantage == "group":
        var_g = per_group(centred_b.square(), "sum") / (count_g - 1.0).clamp(min=1.0)
        adv_b = centred_b / (var_g.sqrt()[group_b] + eps)
    else:
        batch_std = reward_b.std() if reward_b.numel() > 1 else reward_b.new_zeros(())
        adv_b = centred_b / (batch_std + eps)
    return torch.where(constant_b, 0.0, adv_b)


# --- the loss ----------------------------------------------------------------------------------


def policy_loss(
    settings: PolicyLossSettings,
    logp_bt: Tensor,
    prox_logp_bt: Tensor | None,
    behav_logp_bt: Tensor,
    adv_b: Tensor,
    mask_bt: Tensor,
    *,
    ref_logp_bt: Tensor | None = None,
    max_completion_tokens: int | None = None,
    total_tokens: int | None = None,
    total_sequences: int | None = None,
) -> PolicyLossOutput:
    """The policy loss of `settings.kind` for one (micro-)batch; formulas in the module docstring.

    Args:
        settings: kind, clip range, KL coefficient, off-policy correction.
        logp_bt: the learner's logprobs of the sampled completion tokens, with grad, (b, t).
        prox_logp_bt: the learner's logprobs of the same tokens before the update (pi_prox),
            detached here; ignored (may be None) when correction is "none".
        behav_logp_bt: vLLM's (the behaviour policy's) logprobs of the same tokens, (b, t).
        adv_b: per-sequence advantage, (b,), from `advantages` on the whole batch; detached.
        mask_bt: 1 (or True) for completion tokens, 0 for padding; other values are refused.
        ref_logp_bt: the reference policy's logprobs of the same tokens; required iff
            kl_coef > 0 (when given with kl_coef = 0 it is only logged as policy/kl_ref).
        max_completion_tokens: L_max of dr_grpo (required there, >= every sequence's token
            count); ignored by the other kinds.
        total_tokens: T, the completion tokens of the whole batch (dapo, cispo); default: this
            call's count.
        total_sequences: N, the sequences of the whole batch (grpo, dr_grpo, gspo); default:
            this call's b.

    Returns:
        PolicyLossOutput: the loss to backpropagate and logging metrics (python floats).

    Raises:
        ValueError: mismatched shapes or dtypes, a mask that is not 0/1, a missing ref (kl_coef
            > 0) or max_completion_tokens (dr_grpo), normalisers smaller than this call's counts.
        ConfigError: invalid settings (a ValueError too).
    """
    settings.validate()
    _check_inputs(settings, logp_bt, prox_logp_bt, behav_logp_bt, adv_b, mask_bt, ref_logp_bt)
    low, high = settings.resolved_clip()
    kind, correction = settings.kind, settings.correction
    use_prox = correction != "none"
    dtype = _compute_dtype(logp_bt, behav_logp_bt, *([prox_logp_bt] if use_prox else []))
    valid_bt = mask_bt != 0

    def select(x_bt: Tensor) -> Tensor:
        """x at completion tokens, 0 at padding: padding takes no part in any arithmetic."""
        return torch.where(valid_bt, x_bt.to(dtype), 0.0)

    logp = select(logp_bt)
    behav = select(behav_logp_bt.detach())
    if use_prox:
        assert prox_logp_bt is not None  # _check_inputs guarantees it
        base = select(prox_logp_bt.detach())
        log_w_bt = base - behav
    else:
        base = behav
        log_w_bt = torch.zeros_like(behav)
    validf_bt = valid_bt.to(dtype)
    len_b = validf_bt.sum(-1)
    tokens = int(len_b.sum())
    sequences = logp_bt.shape[0]
    tok_norm = _normaliser(total_tokens, tokens, "total_tokens", "completion tokens")
    seq_norm = _normaliser(total_sequences, sequences, "total_sequences", "sequences")
    if kind == "dr_grpo":
        if (
            isinstance(max_completion_tokens, bool)
            or not isinstance(max_completion_tokens, int)
            or max_completion_tokens < 1
        ):
            raise ValueError(
                "kind 'dr_grpo' needs max_completion_tokens, an int >= 1: its constant length "
                f"normaliser (got {max_completion_tokens!r})"
            )
        longest = int(len_b.max()) if sequences else 0
        if longest > max_completion_tokens:
            raise ValueError(
                f"a sequence has {longest} completion tokens, more than "
                f"max_completion_tokens={max_completion_tokens}"
            )
    adv = adv_b.detach().to(dtype)
    kl_bt = None
    if ref_logp_bt is not None:
        q_bt = select(ref_logp_bt.detach()) - logp
        kl_bt = torch.where(valid_bt, torch.exp(q_bt) - q_bt - 1.0, 0.0)
    beta = settings.kl_coef

    def cap(w: Tensor) -> Tensor:
        return w.clamp(max=settings.tis_cap) if correction == "tis" else w

    if kind == "gspo":
        per_len_b = len_b.clamp(min=1.0)
        has_tokens_b = len_b > 0
        log_s_b = ((logp - base) * validf_bt).sum(-1) / per_len_b
        ratio = torch.exp(log_s_b)
        weight = cap(torch.exp((log_w_bt * validf_bt).sum(-1) / per_len_b))
        surrogate_b = torch.minimum(ratio * adv, ratio.clamp(1.0 - low, 1.0 + high) * adv)
        seq_loss_b = -weight * surrogate_b
        if beta > 0.0:
            assert kl_bt is not None
            seq_loss_b = seq_loss_b + beta * kl_bt.sum(-1) / per_len_b
        loss = torch.where(has_tokens_b, seq_loss_b, 0.0).sum() / seq_norm
        unit = has_tokens_b  # gspo's ratio metrics are per sequence
        clipped_low = unit & (adv < 0) & (ratio < 1.0 - low)
        clipped_high = unit & (adv > 0) & (ratio > 1.0 + high)
    else:
        ratio = torch.exp(logp - base)
        weight = cap(torch.exp(log_w_bt))
        adv_bt = adv[:, None]
        if kind == "cispo":
            coef_bt = (ratio.clamp(max=1.0 + high) * weight).detach()
            token_loss_bt = -coef_bt * adv_bt * logp
            clipped_low = torch.zeros_like(valid_bt)
            clipped_high = valid_bt & (ratio > 1.0 + high)
        else:
            surrogate_bt = torch.minimum(
                ratio * adv_bt, ratio.clamp(1.0 - low, 1.0 + high) * adv_bt
            )
            token_loss_bt = -weight * surrogate_bt
            clipped_low = valid_bt & (adv_bt < 0) & (ratio < 1.0 - low)
            clipped_high = valid_bt & (adv_bt > 0) & (ratio > 1.0 + high)
        if beta > 0.0:
            assert kl_bt is not None
            token_loss_bt = token_loss_bt + beta * kl_bt
        token_loss_bt = torch.where(valid_bt, token_loss_bt, 0.0)
        if kind == "grpo":
            loss = (token_loss_bt.sum(-1) / len_b.clamp(min=1.0)).sum() / seq_norm
        elif kind == "dr_grpo":
            assert max_completion_tokens is not None  # checked above
            loss = token_loss_bt.sum() / (seq_norm * max_completion_tokens)
        else:  # dapo, cispo: one token mean over the whole batch
            loss = token_loss_bt.sum() / tok_norm
        unit = valid_bt

    with torch.no_grad():
        if use_prox:
            gap_bt = (base - behav).abs()
        else:
            gap_bt = (logp.detach() - behav).abs()
        metrics = _metrics(
            unit=unit,
            valid_bt=valid_bt,
            clipped_low=clipped_low,
            clipped_high=clipped_high,
            ratio=ratio.detach(),
            weight=weight.detach(),
            gap_bt=gap_bt,
            kl_bt=kl_bt.detach() if kl_bt is not None else None,
        )
    return PolicyLossOutput(loss=loss, metrics=metrics)


def _metrics(
    *,
    unit: Tensor,
    valid_bt: Tensor,
    clipped_low: Tensor,
    clipped_high: Tensor,
    ratio: Tensor,
    weight: Tensor,
    gap_bt: Tensor,
    kl_bt: Tensor | None,
) -> dict[str, float]:
    """Means over `unit` (tokens, or gspo's sequences) and over tokens; one host sync."""
    units = unit.sum().clamp(min=1)
    tokens = valid_bt.sum().clamp(min=1)

    def over_units(x: Tensor) -> Tensor:
        return torch.where(unit, x.to(ratio.dtype), 0.0).sum() / units

    def over_tokens(x_bt: Tensor) -> Tensor:
        return torch.where(valid_bt, x_bt, 0.0).sum() / tokens

    names = [
        "policy/clip_fraction",
        "policy/clip_fraction_low",
        "policy/clip_fraction_high",
        "policy/ratio_mean",
        "policy/is_weight_mean",
        "policy/is_weight_max",
        "policy/behaviour_gap",
    ]
    values = [
        over_units(clipped_low | clipped_high),
        over_units(clipped_low),
        over_units(clipped_high),
        over_units(ratio),
        over_units(weight),
        torch.where(unit, weight, 0.0).amax() if unit.numel() else ratio.new_zeros(()),
        over_tokens(gap_bt),
    ]
    if kl_bt is not None:
        names.append("policy/kl_ref")
        values.append(over_tokens(kl_bt))
    return dict(zip(names, torch.stack(values).tolist(), strict=True))


# --- input checks ------------------------------------------------------------------------------


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 at least (bf16 logprobs are too coarse for ratios near 1), float64 if given."""
    dtype = torch.float32
    for x in tensors:
        if x.is_floating_point():
            dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _normaliser(given: int | None, local: int, name: str, what: str) -> float:
    """The whole batch's count (>= this call's), or this call's by default; at least 1."""
    if given is None:
        return float(max(local, 1))
    if isinstance(given, bool) or not isinstance(given, int):
        raise ValueError(f"{name} must be an int, got {type(given).__name__}")
    if given < local:
        raise ValueError(
            f"{name}={given} is smaller than this call's {local} {what}: pass the count of the "
            "whole (accumulated) batch"
        )
    return float(max(given, 1))


def _check_inputs(
    settings: PolicyLossSettings,
    logp_bt: Tensor,
    prox_logp_bt: Tensor | None,
    behav_logp_bt: Tensor,
    adv_b: Tensor,
    mask_bt: Tensor,
    ref_logp_bt: Tensor | None,
) -> None:
    """Raises ValueError naming the argument that does not fit."""
    if logp_bt.dim() != 2 or not logp_bt.is_floating_point():
        raise ValueError(
            "logp_bt must be floating point with shape (sequences, tokens); got "
            f"{logp_bt.dtype} {tuple(logp_bt.shape)}"
        )
    shape = tuple(logp_bt.shape)
    named: list[tuple[str, Tensor | None]] = [("behav_logp_bt", behav_logp_bt)]
    if settings.correction != "none":
        if prox_logp_bt is None:
            raise ValueError(
                f"correction '{settings.correction}' needs prox_logp_bt, the learner's logprobs "
                "before the update (only correction 'none' ignores it)"
            )
        named.append(("prox_logp_bt", prox_logp_bt))
    if settings.kl_coef > 0.0 and ref_logp_bt is None:
        raise ValueError(
            f"kl_coef={settings.kl_coef} > 0 needs ref_logp_bt, the reference policy's logprobs "
            "of the same tokens (or set kl_coef to 0)"
        )
    named.append(("ref_logp_bt", ref_logp_bt))
    for name, x in named:
        if x is None:
            continue
        if tuple(x.shape) != shape or not x.is_floating_point():
            raise ValueError(
                f"{name} must be floating point with the shape of logp_bt {shape}; got "
                f"{x.dtype} {tuple(x.shape)}"
            )
    if tuple(mask_bt.shape) != shape:
        raise ValueError(
            f"mask_bt must have the shape of logp_bt {shape}; got {tuple(mask_bt.shape)}"
        )
    if mask_bt.numel() and not ((mask_bt == 0) | (mask_bt == 1)).all():
        raise ValueError("mask_bt must hold only 0 and 1 (or False and True)")
    if tuple(adv_b.shape) != shape[:1]:
        raise ValueError(
            f"adv_b must have shape ({shape[0]},), one advantage per sequence; got "
            f"{tuple(adv_b.shape)}"
        )
