"""Per-expert load of MoE routers, measured during training.

`ExpertLoad` hooks every router of a model and counts, per MoE layer, how many real tokens
(padding excluded) each expert was routed. Trainers log the summary (`moe/load_max`,
`moe/load_min`, `moe/load_cv`: the busiest and idlest expert's share relative to a uniform
share, and the coefficient of variation) and the full layer x expert table.

The load-balancing auxiliary loss itself is computed by TRL's trainers from the router logits
(`router_aux_loss_coef`); `RouterLogits` records them for the RL learner. `route_sparsely` makes
transformers' Llama 4 MoE layers compute only the experts each token is routed to.

Shape legend: t = tokens of the batch (batch x sequence, flattened), e = experts, k = top-k.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama4.modeling_llama4 import Llama4Router, Llama4TextMoe
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter


@dataclass(frozen=True)
class RouterKind:
    """Where a router module's output keeps its logits."""

    logits_index: int


# Llama4Router returns (scores_te, logits_te); Qwen3MoeTopKRouter (logits_te, weights_tk, ids_tk).
ROUTERS: dict[type[nn.Module], RouterKind] = {
    Llama4Router: RouterKind(logits_index=1),
    Qwen3MoeTopKRouter: RouterKind(logits_index=0),
}


def routers(model: nn.Module) -> list[tuple[str, nn.Module, RouterKind]]:
    """The model's MoE routers in layer order, with how to read each one's output."""
    found = []
    for name, module in model.named_modules():
        for cls, kind in ROUTERS.items():
            if isinstance(module, cls):
                found.append((name, module, kind))
    return found


def shares(counts_le: torch.Tensor) -> torch.Tensor:
    """Each layer's routed-token counts as shares per expert (rows sum to 1; empty rows 0)."""
    return counts_le / counts_le.sum(dim=1, keepdim=True).clamp(min=1)


class ExpertLoad:
    """Counts routed tokens per layer and expert while attached to a model.

    Both the top-level forward (to read the attention mask) and every router are hooked. The
    top-k choice is recomputed from the router logits: for both router kinds the chosen experts
    are the k largest logits.

    Args:
        model: a causal LM whose routers are in `ROUTERS`.

    Raises:
        ValueError: when the model has no router this module knows.
    """

    def __init__(self, model: nn.Module) -> None:
        found = routers(model)
        if not found:
            raise ValueError(
                f"{type(model).__name__} has no MoE router of a known kind "
                f"({', '.join(cls.__name__ for cls in ROUTERS)})"
            )
        self.layer_names = [name for name, _, _ in found]
        num_experts = found[0][1].num_experts
        self.counts_le = torch.zeros(len(found), num_experts, dtype=torch.float64)
        self._token_mask_t: torch.Tensor | None = None
        self._handles = [model.register_forward_pre_hook(self._remember_mask, with_kwargs=True)]
        for layer, (_, module, kind) in enumerate(found):
            self._handles.append(module.register_forward_hook(self._counter(layer, module, kind)))

    def _remember_mask(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self._token_mask_t = None if mask is None or mask.dim() != 2 else mask.reshape(-1).bool()

    def _counter(self, layer: int, router: nn.Module, kind: RouterKind):
        def count(module, args, output) -> None:
            logits_te = output[kind.logits_index].detach()
            chosen_tk = logits_te.topk(router.top_k, dim=-1).indices
            mask_t = self._token_mask_t
            if mask_t is not None and mask_t.numel() == chosen_tk.shape[0]:
                chosen_tk = chosen_tk[mask_t.to(chosen_tk.device)]
            self.counts_le[layer] += torch.bincount(
                chosen_tk.reshape(-1).cpu(), minlength=self.counts_le.shape[1]
            ).to(torch.float64)

        return count

    def summary(self) -> dict[str, float]:
        """Load relative to a uniform share, worst over layers: 1.0 everywhere is perfect balance.

        Example: 4 experts with shares 0.4, 0.3, 0.2, 0.1 -> load_max 1.6, load_min 0.4,
        load_cv = std/mean of the shares = 0.1118 / 0.25 = 0.447.
        """
        if self.counts_le.sum() == 0:
            return {}
        relative_le = shares(self.counts_le) * self.counts_le.shape[1]
        return {
            "moe/load_max": relative_le.max().item(),
            "moe/load_min": relative_le.min().item(),
            "moe/load_cv": (relative_le.std(dim=1, unbiased=False)).max().item(),
        }

    def reset(self) -> None:
        self.counts_le.zero_()

    def detach(self) -> None:
        """Removes the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class RouterLogits:
    """Records every router's logits (with their gradients) during a model's forward passes.

    The same tensors as `output_router_logits=True`, read from the routers themselves, so the
    learner does not depend on how a transformers version fills the model output.
    """

    def __init__(self, model: nn.Module) -> None:
        self.logits: list[torch.Tensor] = []
        self._handles = [
            module.register_forward_hook(self._recorder(kind)) for _, module, kind in routers(model)
        ]

    def _recorder(self, kind: RouterKind):
        def record(module, args, output) -> None:
            self.logits.append(output[kind.logits_index])

        return record

    def take(self) -> tuple[torch.Tensor, ...]:
        """The logits recorded since the last call, one tensor per MoE layer in order."""
        logits, self.logits = tuple(self.logits), []
        return logits


def _llama4_routed_forward(self, hidden_states: torch.Tensor):
    """Llama4TextMoe.forward computing each token's chosen experts only.

    transformers' forward runs every token through every expert and multiplies the inputs of
    the unchosen ones by a router score of exactly 0 (sigmoid(-inf)); this one gathers each
    expert's tokens and runs only those, as vLLM does. Same outputs and gradients up to the
    order of floating-point sums; with E experts and top-k routing the routed experts cost k/E
    of the dense path.
    """
    x_td = hidden_states.reshape(-1, self.hidden_dim)
    scores_te, logits_te = self.router(x_td)
    # The router's own choice: its scores are sigmoid(top-k logit) on these, 0 elsewhere.
    chosen_tk = torch.topk(logits_te, self.router.top_k, dim=1).indices
    out_td = self.shared_expert(x_td)
    experts = self.experts
    for expert in chosen_tk.unique().tolist():
        token_n, slot_n = torch.where(chosen_tk == expert)
        # As transformers does: the score scales the expert's input, not its output.
        routed_nd = x_td[token_n] * scores_te[token_n, chosen_tk[token_n, slot_n], None]
        gate_nf, up_nf = (routed_nd @ experts.gate_up_proj[expert]).chunk(2, dim=-1)
        out_td = out_td.index_add(
            0, token_n, (up_nf * experts.act_fn(gate_nf)) @ experts.down_proj[expert]
        )
    return out_td, logits_te


def route_sparsely(model: nn.Module) -> int:
    """Makes every Llama 4 MoE layer of `model` run only its tokens' chosen experts.

    Changes the forward of these module instances only (nothing that is saved); Qwen3-MoE's
    transformers forward already dispatches per expert. Returns how many layers changed.
    """
    layers = [m for m in model.modules() if isinstance(m, Llama4TextMoe)]
    for layer in layers:
        layer.forward = types.MethodType(_llama4_routed_forward, layer)
    return len(layers)
