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
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextTopKRouter


@dataclass(frozen=True)
class RouterKind:
    """Where a router module's output keeps its logits."""

    logits_index: int


# Llama4Router returns (scores_te, logits_te); Qwen3MoeTopKRouter and Qwen3-VL-MoE's text
# router (logits_te, weights_tk, ids_tk).
ROUTERS: dict[type[nn.Module], RouterKind] = {
    Llama4Router: RouterKind(logits_index=1),
    Qwen3MoeTopKRouter: RouterKind(logits_index=0),
    Qwen3VLMoeTextTopKRouter: RouterKind(logits_index=0),
}


def has_experts(config) -> bool:
    """Whether a model config describes a Mixture-of-Experts model (one whose forward can return
    router logits, the test TRL's trainers use); a dense model trains without the MoE settings."""
    return hasattr(config.get_text_config(), "output_router_logits")


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


def load_summary(counts_le: torch.Tensor) -> dict[str, float]:
    """Load relative to a uniform share, worst over layers: 1.0 everywhere is perfect balance.

    Example: 4 experts with shares 0.4, 0.3, 0.2, 0.1 -> load_max 1.6, load_min 0.4,
    load_cv = std/mean of the shares = 0.1118 / 0.25 = 0.447. Empty counts give {}.
    """
    if counts_le.sum() == 0:
        return {}
    relative_le = shares(counts_le) * counts_le.shape[1]
    return {
        "moe/load_max": relative_le.max().item(),
        "moe/load_min": relative_le.min().item(),
        "moe/load_cv": (relative_le.std(dim=1, unbiased=False)).max().item(),
    }


@dataclass
class BalanceTerms:
    """The sums the router load-balancing loss is made of, over some tokens of every MoE layer.

    transformers' `load_balancing_loss_func` (Switch Transformer's loss, used by TRL and by
    Llama 4's recipe) is, over all layers' real tokens of a batch,
        aux = E * sum_e (count_e / R) * (prob_e / R)
    with count_e the top-k assignments to expert e, prob_e the sum of softmax(router logits)_e
    and R the (layer, token) rows. Both sums are additive over tokens, so a batch split across
    ranks gets the batch's loss exactly: all-reduce `counts_e` and `rows` (no gradient), then
    each rank's `loss(...)` of its own `prob_e` adds up to the batch's aux (and so do the
    gradients).
    """

    counts_e: torch.Tensor
    prob_e: torch.Tensor
    rows: torch.Tensor

    def loss(self, counts_e: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """This part's share of the aux loss, given the counts and rows of the whole batch."""
        rows = rows.clamp(min=1)
        return counts_e.shape[0] * ((counts_e / rows) * (self.prob_e / rows)).sum()


def balance_terms(
    router_logits: tuple[torch.Tensor, ...], top_k: int, token_mask_t: torch.Tensor
) -> BalanceTerms:
    """`BalanceTerms` of the tokens where `token_mask_t` (flattened batch x sequence) is 1.

    Same reductions as transformers' `load_balancing_loss_func` with an attention mask.
    """
    num_experts = router_logits[0].shape[-1]
    device = router_logits[0].device
    mask_t = token_mask_t.reshape(-1).to(device=device, dtype=torch.float32)
    counts_e = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_e = torch.zeros(num_experts, dtype=torch.float32, device=device)
    for logits_te in router_logits:
        probs_te = torch.softmax(logits_te, dim=-1)
        chosen_tk = torch.topk(probs_te, top_k, dim=-1).indices
        counts_e = counts_e + torch.zeros_like(counts_e).scatter_add_(
            0, chosen_tk.reshape(-1), mask_t.repeat_interleave(top_k)
        )
        prob_e = prob_e + (probs_te.float() * mask_t.unsqueeze(-1)).sum(dim=0)
    rows = mask_t.sum() * len(router_logits)
    return BalanceTerms(counts_e.detach(), prob_e, rows.detach())


def _llama4_routed_forward(self, hidden_states: torch.Tensor):
    """Llama4TextMoe.forward computing each token's chosen experts only.

    transformers' forward runs every token through every expert and multiplies the inputs of
    the unchosen ones by a router score of exactly 0 (sigmoid(-inf)); this one runs only the
    chosen ones, as vLLM does. Same outputs and gradients up to the order of floating-point sums
    (bit-equal with top-1 routing); with E experts and top-k routing the routed experts cost k/E
    of the dense path.

    The (token, slot) pairs are sorted by expert once, so a layer costs one host sync (the
    group sizes) and one scatter of the results, whatever the expert count; each expert's
    weights are its slice of an `unbind`, whose backward writes every expert's gradient in one
    stack instead of a zero-filled full-size tensor per expert.
    """
    x_td = hidden_states.reshape(-1, self.hidden_dim)
    scores_te, logits_te = self.router(x_td)
    # The router's own choice: its scores are sigmoid(top-k logit) on these, 0 elsewhere.
    chosen_tk = torch.topk(logits_te, self.router.top_k, dim=1).indices
    out_td = self.shared_expert(x_td)
    experts = self.experts
    expert_n = chosen_tk.reshape(-1)  # n = t * k (token, slot) pairs, token-major
    order_n = torch.argsort(expert_n, stable=True)
    token_n = order_n // chosen_tk.shape[1]
    sizes = torch.bincount(expert_n, minlength=self.num_experts).tolist()
    # As transformers does: the score scales the expert's input, not its output.
    routed_nd = x_td[token_n] * scores_te.gather(1, chosen_tk).reshape(-1)[order_n, None]
    gate_up, down = experts.gate_up_proj.unbind(0), experts.down_proj.unbind(0)
    outs = []
    for expert, rows_md in enumerate(routed_nd.split(sizes)):
        # An expert without tokens multiplies an empty block: no work, a zero gradient.
        gate_mf, up_mf = (rows_md @ gate_up[expert]).chunk(2, dim=-1)
        outs.append((up_mf * experts.act_fn(gate_mf)) @ down[expert])
    return out_td.index_add(0, token_n, torch.cat(outs)), logits_te


def route_sparsely(model: nn.Module) -> int:
    """Makes every Llama 4 MoE layer of `model` run only its tokens' chosen experts.

    Changes the forward of these module instances only (nothing that is saved); Qwen3-MoE's
    transformers forward already dispatches per expert. Returns how many layers changed.
    """
    layers = [m for m in model.modules() if isinstance(m, Llama4TextMoe)]
    for layer in layers:
        layer.forward = types.MethodType(_llama4_routed_forward, layer)
    return len(layers)
