"""The learner of the online RL stage: updates the MoE policy from scored rollout groups.

`Learner.train_step` takes a batch of `Rollout`s (each one prompt's group), computes the
advantages and the learner's own logprobs of the sampled tokens (their detached values are the
proximal policy of the off-policy correction: the weights before this step's single update),
then takes one optimiser step on the policy loss plus the MoE router load-balancing loss, in
micro-batches whose losses sum to the full batch's.
A step whose loss or gradient norm is not finite is skipped with the parameters unchanged.

The class is plain Python: the RL controller runs it as a Ray actor, tests call it directly.
accelerate places the model (GPU when the actor was given one) and runs bf16 mixed precision
where the device supports it.

Shape legend: b = sequences (completions) of the batch, t = token positions (prompt +
completion, shifted by one: position t scores token t + 1), e = experts, l = MoE layers.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from align.config import check
from align.losses.policy import PolicyLossSettings, advantages, policy_loss
from align.modeling import load_model
from align.moe import ExpertLoad, RouterLogits, routers
from align.rollout import Rollout
from align.runs import NonFiniteError
from align.training import use_bf16
from align.weight_sync import export_weights

log = logging.getLogger(__name__)

# Sequences whose routing before and after each update is compared (moe/routing_change).
ROUTING_SAMPLE = 16


@dataclass
class LearnerSettings:
    """Optimisation settings of the RL learner."""

    # AdamW learning rate (constant after the warmup: online RL has no known end to decay to).
    learning_rate: float = 1e-4
    # Steps of linear warmup (step n uses learning_rate * n / warmup_steps); 0: none. Adam's
    # first updates move every weight by about the learning rate, however noisy the gradient.
    warmup_steps: int = 0
    # AdamW weight decay.
    weight_decay: float = 0.0
    # Gradient clipping by global norm.
    max_grad_norm: float = 1.0
    # Sequences per forward/backward pass; the step's gradient is the whole batch's either way.
    micro_batch_size: int = 64
    # Weight of the MoE router load-balancing loss (Llama 4 used 0.001); 0 turns it off.
    router_aux_loss_coef: float = 0.001
    # auto: bf16 mixed precision where the GPU supports it, fp32 otherwise.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Stop the run (with a checkpoint) after this many consecutive non-finite steps.
    max_nonfinite_steps: int = 3

    def validate(self) -> None:
        check(self.learning_rate > 0, "learning_rate", f"must be > 0 (got {self.learning_rate})")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0 (got {self.warmup_steps})")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0 (got {self.weight_decay})")
        check(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0 (got {self.max_grad_norm})")
        check(
            self.micro_batch_size >= 1,
            "micro_batch_size",
            f"must be >= 1 (got {self.micro_batch_size})",
        )
        check(
            self.router_aux_loss_coef >= 0,
            "router_aux_loss_coef",
            f"must be >= 0 (got {self.router_aux_loss_coef})",
        )
        check(
            self.max_nonfinite_steps >= 1,
            "max_nonfinite_steps",
            f"must be >= 1 (got {self.max_nonfinite_steps})",
        )


@dataclass
class Batch:
    """Rollout groups as padded tensors, one row per scored completion."""

    input_ids_bt: torch.Tensor
    attention_mask_bt: torch.Tensor
    # 1 where position t scores a completion token (token t + 1), else 0; shape b x (t - 1).
    mask_bt: torch.Tensor
    # vLLM's logprob of the token at each masked position (0 elsewhere).
    behaviour_bt: torch.Tensor
    rewards_b: torch.Tensor
    group_ids_b: torch.Tensor


def collate(rollouts: list[Rollout], pad_id: int) -> Batch:
    """Pads every scored completion of `rollouts` (prompt + completion) into one batch.

    Unscored completions (reward None) are left out: a failed reward is never scored as 0.
    """
    rows = []
    for group_id, rollout in enumerate(rollouts):
        for ids, logprobs, reward in zip(
            rollout.completion_ids, rollout.behaviour_logprobs, rollout.rewards, strict=True
        ):
            if reward is not None and ids:
                rows.append((rollout.prompt_ids, ids, logprobs, reward, group_id))
    if not rows:
        raise ValueError("no scored completion in the batch")
    length = max(len(p) + len(c) for p, c, *_ in rows)
    input_ids_bt = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask_bt = torch.zeros((len(rows), length), dtype=torch.long)
    mask_bt = torch.zeros((len(rows), length - 1))
    behaviour_bt = torch.zeros((len(rows), length - 1))
    for b, (prompt, completion, logprobs, _, _) in enumerate(rows):
        p, c = len(prompt), len(completion)
        input_ids_bt[b, : p + c] = torch.tensor(prompt + completion)
        attention_mask_bt[b, : p + c] = 1
        # Position p - 1 + j scores completion token j.
        mask_bt[b, p - 1 : p - 1 + c] = 1
        behaviour_bt[b, p - 1 : p - 1 + c] = torch.tensor(logprobs)
    return Batch(
        input_ids_bt=input_ids_bt,
        attention_mask_bt=attention_mask_bt,
        mask_bt=mask_bt,
        behaviour_bt=behaviour_bt,
        # float64 to the advantages: any finite reward is accepted (see Learner.train_step).
        rewards_b=torch.tensor([r[3] for r in rows], dtype=torch.float64),
        group_ids_b=torch.tensor([r[4] for r in rows]),
    )


def token_logprobs(model, input_ids_bt, attention_mask_bt) -> torch.Tensor:
    """Logprob of each next token under `model` (b x (t - 1))."""
    logits_btv = model(input_ids=input_ids_bt, attention_mask=attention_mask_bt).logits[:, :-1]
    logp_btv = torch.log_softmax(logits_btv.float(), dim=-1)
    return logp_btv.gather(-1, input_ids_bt[:, 1:, None])[..., 0]


class Learner:
    """Holds the policy, its optimiser and (for the KL term) a frozen reference.

    Args:
        model_path: checkpoint to start from (Hugging Face format, safetensors).
        settings: optimisation settings.
        loss: the policy loss.
        max_completion_tokens: the rollouts' completion limit (Dr.GRPO's constant normaliser).
        seed: torch seed (nothing in a step is random today; kept for new weights and dropout).
    """

    def __init__(
        self,
        model_path: str,
        settings: LearnerSettings,
        loss: PolicyLossSettings,
        max_completion_tokens: int = 32,
        seed: int = 0,
    ) -> None:
        torch.manual_seed(seed)
        self.settings, self.loss = settings, loss
        self.max_completion_tokens = max_completion_tokens
        self.accelerator = Accelerator(
            mixed_precision="bf16" if use_bf16(settings.precision) else "no",
            cpu=not torch.cuda.is_available(),
        )
        model = load_model(model_path)
        model.config.use_cache = False
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.model.train()
        self.reference = None
        if loss.kl_coef > 0:
            self.reference = load_model(model_path).to(self.accelerator.device).eval()
            self.reference.requires_grad_(False)
        self.pad_id = model.config.pad_token_id
        self.is_moe = bool(routers(self.unwrapped))
        self.expert_load = ExpertLoad(self.unwrapped) if self.is_moe else None
        self.router_logits = RouterLogits(self.unwrapped)
        self.version = 0
        self.nonfinite_in_a_row = 0

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _micro_batches(self, batch: Batch):
        size = self.settings.micro_batch_size
        device = self.accelerator.device
        for start in range(0, batch.input_ids_bt.shape[0], size):
            rows = slice(start, start + size)
            # Trim padding columns this micro-batch does not use.
            length = int(batch.attention_mask_bt[rows].sum(dim=1).max())
            yield (
                rows,
                batch.input_ids_bt[rows, :length].to(device),
                batch.attention_mask_bt[rows, :length].to(device),
                slice(0, length - 1),
            )

    @torch.no_grad()
    def _logprobs(self, model, batch: Batch) -> torch.Tensor:
        """Logprobs of every position under `model`, without gradients (b x (t - 1))."""
        logp_bt = torch.zeros_like(batch.mask_bt)
        for rows, ids_bt, attn_bt, cols in self._micro_batches(batch):
            with self.accelerator.autocast():
                logp = token_logprobs(model, ids_bt, attn_bt)
            logp_bt[rows, cols] = logp.float().cpu()
            self.router_logits.take()  # not needed from these passes
        return logp_bt

    def train_step(self, rollouts: list[Rollout]) -> dict[str, float]:
        """One optimiser step on a batch of rollout groups; returns the step's metrics."""
        started = time.perf_counter()
        self.router_logits.take()  # forwards outside training steps are not this step's
        batch = collate(rollouts, self.pad_id)
        # In float64, then float32 like the rest of the loss: a reward too large for float32
        # statistics gives a non-finite loss, and the step is skipped below.
        adv_b = advantages(batch.rewards_b, batch.group_ids_b, self.loss).float()
        ref_bt = self._logprobs(self.reference, batch) if self.reference is not None else None
        total_tokens = int(batch.mask_bt.sum())
        total_sequences = batch.input_ids_bt.shape[0]
        num_experts = self.unwrapped.config.num_experts if self.is_moe else 0
        top_k = self.unwrapped.config.num_experts_per_tok if self.is_moe else 0

        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, aux_sum, entropy_sum, weighted = 0.0, 0.0, 0.0, {}
        if self.expert_load is not None:
            self.expert_load.reset()
        for rows, ids_bt, attn_bt, cols in self._micro_batches(batch):
            with self.accelerator.autocast():
                logp_bt = token_logprobs(self.model, ids_bt, attn_bt)
            router_logits = self.router_logits.take()
            # The proximal policy is the learner's policy before this update: one optimiser
            # step per batch means these very weights, so no second forward is needed.
            prox_bt = (
                batch.behaviour_bt[rows, cols].to(logp_bt.device)
                if self.loss.correction == "none"
                else logp_bt.detach()
            )
            out = policy_loss(
                self.loss,
                logp_bt,
                prox_bt,
                batch.behaviour_bt[rows, cols].to(logp_bt.device),
                adv_b[rows].to(logp_bt.device),
                batch.mask_bt[rows, cols].to(logp_bt.device),
                ref_logp_bt=None if ref_bt is None else ref_bt[rows, cols].to(logp_bt.device),
                max_completion_tokens=self.max_completion_tokens,
                total_tokens=total_tokens,
                total_sequences=total_sequences,
            )
            loss = out.loss
            share = ids_bt.shape[0] / total_sequences
            if self.is_moe:
                aux = load_balancing_loss_func(router_logits, num_experts, top_k, attn_bt)
                aux_sum += float(aux.detach()) * share
                entropy_sum += routing_entropy(router_logits, attn_bt) * share
                if self.settings.router_aux_loss_coef > 0:
                    loss = loss + self.settings.router_aux_loss_coef * aux * share
                if rows.start == 0:
                    # Routing of the first micro-batch before the update, to measure how many
                    # tokens the update sends to other experts.
                    first = (
                        ids_bt[:ROUTING_SAMPLE],
                        attn_bt[:ROUTING_SAMPLE],
                        [
                            r.detach()
                            .topk(top_k, dim=-1)
                            .indices[: ROUTING_SAMPLE * ids_bt.shape[1]]
                            for r in router_logits
                        ],
                    )
            self.accelerator.backward(loss)
            loss_sum += float(out.loss.detach())
            for key, value in out.metrics.items():
                if key.endswith("_max"):
                    weighted[key] = max(weighted.get(key, value), value)
                else:
                    weighted[key] = weighted.get(key, 0.0) + value * share

        grad_norm = float(
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
        )
        finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
        # The version counts steps, skipped ones included (their weights equal the previous).
        self.version += 1
        learning_rate = self.settings.learning_rate * min(
            1.0, self.version / max(1, self.settings.warmup_steps)
        )
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            log.warning(
                "step skipped: loss %s, gradient norm %s (%d in a row)",
                loss_sum,
                grad_norm,
                self.nonfinite_in_a_row,
            )
        self.optimizer.zero_grad(set_to_none=True)
        routing_change = self._routing_change(*first) if self.is_moe else None

        scored = batch.rewards_b
        metrics = {
            "train/loss": loss_sum,
            "train/grad_norm": grad_norm,
            "train/learning_rate": learning_rate,
            "train/skipped": float(not finite),
            "train/sequences": float(total_sequences),
            "train/completion_tokens": float(total_tokens),
            "train/reward_mean": float(scored.mean()),
            "train/advantage_abs_mean": float(adv_b.abs().mean()),
            "time/learner_step": time.perf_counter() - started,
            **weighted,
        }
        if self.is_moe:
            metrics["moe/aux_loss"] = aux_sum
            metrics["moe/routing_entropy"] = entropy_sum
            metrics["moe/routing_change"] = routing_change
            metrics.update(self.expert_load.summary())
        if self.nonfinite_in_a_row >= self.settings.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient"
                f" norm (last: loss {loss_sum}, gradient norm {grad_norm})"
            )
        return metrics

    @torch.no_grad()
    def _routing_change(self, ids_bt, attn_bt, before_lk: list[torch.Tensor]) -> float:
        """Share of (real token, MoE layer) pairs whose top-k experts this update changed.

        It is also how often vLLM and the learner route a token differently for a group one
        version stale: weight sync is exact, so routing differs only through the update.
        """
        with self.accelerator.autocast():
            self.model(input_ids=ids_bt, attention_mask=attn_bt)
        keep_t = attn_bt.reshape(-1).bool()
        changed, total = 0, 0
        for before_tk, logits_te in zip(before_lk, self.router_logits.take(), strict=True):
            after_tk = logits_te.topk(before_tk.shape[-1], dim=-1).indices
            same_t = (after_tk.sort(-1).values == before_tk.sort(-1).values).all(-1)
            changed += int((~same_t[keep_t]).sum())
            total += int(keep_t.sum())
        return changed / max(total, 1)

    def publish(self, directory: str) -> float:
        """Writes the current weights for the rollout workers; returns the seconds it took."""
        started = time.perf_counter()
        export_weights(self.unwrapped, directory)
        return time.perf_counter() - started

    def save(self, directory: str) -> None:
        """Writes the learner's state (weights, optimiser, version) under `directory`."""
        from safetensors.torch import save_model

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        # In-memory parameter names (not the checkpoint format vLLM reads): exact and fast.
        save_model(self.unwrapped, str(path / "model.safetensors"))
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "version": self.version,
                "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "torch_rng": torch.get_rng_state(),
            },
            path / "learner.pt",
        )

    def load(self, directory: str) -> int:
        """Restores the state `save` wrote; returns the policy version."""
        from safetensors.torch import load_model as load_safetensors

        path = Path(directory)
        load_safetensors(self.unwrapped, str(path / "model.safetensors"))
        state = torch.load(path / "learner.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = state["version"]
        self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
        torch.set_rng_state(state["torch_rng"])
        return self.version


def routing_entropy(router_logits: tuple[torch.Tensor, ...], attention_mask_bt) -> float:
    """Mean entropy (nats) of the routers' softmax over experts, real tokens only, all layers."""
    keep_t = attention_mask_bt.reshape(-1).bool()
    total, count = 0.0, 0
    for logits_te in router_logits:
        logp_te = torch.log_softmax(logits_te.detach().float()[keep_t], dim=-1)
        total += float(-(logp_te.exp() * logp_te).sum(dim=-1).sum())
        count += int(keep_t.sum())
    return total / max(count, 1)
