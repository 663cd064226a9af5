"""The learner of the online RL stage: N ranks that shard and update the MoE policy together.

Each `LearnerRank` is one process of a `torch.distributed` group (gloo on CPU, NCCL on GPU; the
RL stage runs the ranks as Ray actors, `align.rl.group`). It holds a shard of the policy, of its
gradients and of AdamW's state: FSDP2, `fully_shard` on every decoder layer, then on the root.
On GPU the forward and backward run in bf16 with fp32 master weights and fp32 gradient
reduction; on CPU everything is fp32. `learner.offload` keeps the shards on the CPU (the
optimiser steps there).

A step on N ranks equals the step on one rank (up to the order of float sums) because
`split_batch` prepares it on the whole batch, before it is cut:
- advantages (group or batch statistics) and the loss normalisers (completion tokens and
  sequences of the whole batch) are computed on the whole batch;
- the batch is cut into global micro-batches of `micro_batch_size` x N rows, each split evenly
  across the ranks, so every rank runs the same number of forward/backward passes (a rank
  with no rows in one runs a placeholder row whose loss is 0: FSDP's collectives never wait
  for a rank that skipped a pass);
- the router load-balancing loss of global micro-batch k takes its expert counts from all
  ranks' tokens of that micro-batch (all-reduced before the backward): a step on N ranks with
  micro-batches of m rows equals the step on one rank with micro-batches of N x m rows, and
  with the router loss off, any split gives the same step;
- each rank's loss is its part of the global sum; FSDP2 averages gradients over the ranks, so
  the loss is scaled by N (gloo has no pre-multiplied sum for a divide factor of 1);
- the gradient norm is the global one (DTensor), and a non-finite loss or norm skips the step
  on every rank alike; metrics are all-reduced, so every rank returns the same numbers.
N = 1 runs the same code.

With one optimiser step per batch the proximal policy of the off-policy correction is the
weights before the step, so the detached logprobs of the training forward are pi_prox (no
second forward). The policy version, the one counter of the run, counts steps (skipped ones
included) and lives here.

Shape legend: b = sequences (completions) of a micro-batch, t = token positions (prompt +
completion, shifted by one: position t scores token t + 1), e = experts, l = MoE layers.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pickle
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from align.config import check
from align.losses.policy import PolicyLossSettings, advantages, policy_loss
from align.modeling import (
    checkpoint_dtype,
    count_parameters,
    decoder_layers,
    empty_model,
    is_vision_language,
    load_model,
)
from align.moe import RouterLogits, balance_terms, load_summary, routers
from align.rl import transport
from align.rl.rollout import Rollout
from align.runs import NonFiniteError
from align.settings import OptimSettings
from align.training import LoraSettings, lora_config, use_bf16
from align.vision import freeze_vision, in_vision_tower, parameter_groups

log = logging.getLogger(__name__)

# Sequences per rank whose routing before and after each update is compared (moe/routing_change).
ROUTING_SAMPLE = 16


@dataclass
class LearnerSettings(OptimSettings):
    """Optimisation of the RL learner group (`align.settings.OptimSettings` plus its own). The
    learning rate is constant after the warmup: online RL has no known end to decay to."""

    learning_rate: float = 1e-4

    # Sequences per forward/backward pass on each rank (the memory knob); the step's gradient
    # is the whole batch's either way. On N ranks a micro-batch spans N x this many sequences.
    micro_batch_size: int = 64
    # Keep the shards of weights, gradients and optimiser state in CPU memory (FSDP2's CPU
    # offload; the optimiser steps on the CPU): GPU memory then holds the layers in use only.
    offload: bool = False
    # Seconds a collective of the group may wait for a rank before failing (a rank that died).
    collective_timeout_s: float = 600.0
    # LoRA adapters on the frozen policy instead of training every weight (as in the SFT
    # stage: attention and dense MLP projections; routers and routed experts stay frozen unless
    # target_modules names them). The workers get the weights with the adapters merged in.
    lora: LoraSettings = field(default_factory=LoraSettings)

    def validate(self) -> None:
        super().validate()
        check(
            self.micro_batch_size >= 1,
            "micro_batch_size",
            f"must be >= 1 (got {self.micro_batch_size})",
        )
        check(
            self.collective_timeout_s > 0,
            "collective_timeout_s",
            f"must be > 0 (got {self.collective_timeout_s})",
        )


# --- the step's data, prepared on the whole batch --------------------------------------------


@dataclass
class Row:
    """One scored completion with its prompt, as the learner trains it."""

    prompt_ids: list[int]
    completion_ids: list[int]
    # vLLM's logprob of each completion token (the behaviour policy).
    behaviour_logprobs: list[float]
    # The sequence's advantage, computed on the whole batch.
    advantage: float
    # The prompt's images (vision-language models), one placeholder token each in prompt_ids.
    images: list | None = None


@dataclass
class RankBatch:
    """One rank's part of a learner step, with what every rank normalises by."""

    # This rank's rows of each global micro-batch (the same count on every rank; may be empty).
    micro_batches: list[list[Row]]
    # Rows of each global micro-batch over all ranks.
    micro_rows: list[int]
    # Completion tokens and sequences of the whole batch.
    total_tokens: int
    total_sequences: int
    # Per global micro-batch: whether some rank's rows hold images. A vision-language policy's
    # tower then runs on every rank (FSDP gathers its blocks collectively), on a blank image
    # where a rank has none (`collate`'s `run_tower`).
    with_images: list[bool] = field(default_factory=list)


def split_batch(
    rollouts: list[Rollout], loss: PolicyLossSettings, ranks: int, micro_batch_size: int
) -> tuple[list[RankBatch], dict[str, float]]:
    """Prepares a learner step on the whole batch and cuts it for `ranks` ranks.

    Unscored completions (reward None) and empty ones are left out: a failed reward is never
    scored as 0. The rows are then sorted by length (prompt + completion; stable, so equal
    lengths keep the batch's order) and global micro-batch k holds rows [k * m * ranks,
    (k + 1) * m * ranks) with m = `micro_batch_size`, rank r taking the r-th of its `ranks`
    near-equal slices: each micro-batch is padded to its own longest row, so sorted rows pad
    less (on the embedded default, 13% of the positions were padding in batch order). The
    step's loss and gradient do not depend on the order: every term is normalised by the
    whole batch's totals.

    Returns:
        One `RankBatch` per rank, and the batch's reward metrics.

    Raises:
        ValueError: no scored completion in the batch.
    """
    rows, rewards, group_ids = [], [], []
    for group_id, rollout in enumerate(rollouts):
        for ids, logprobs, reward in zip(
            rollout.completion_ids, rollout.behaviour_logprobs, rollout.rewards, strict=True
        ):
            if reward is not None and ids:
                rows.append(Row(rollout.prompt_ids, ids, logprobs, 0.0, rollout.images))
                rewards.append(reward)
                group_ids.append(group_id)
    if not rows:
        raise ValueError("no scored completion in the batch")
    # In float64, then float32 like the rest of the loss: a reward too large for float32
    # statistics gives a non-finite advantage, and the step is skipped.
    rewards_b = torch.tensor(rewards, dtype=torch.float64)
    adv_b = advantages(rewards_b, torch.tensor(group_ids), loss).float()
    for row, advantage in zip(rows, adv_b.tolist(), strict=True):
        row.advantage = advantage
    rows.sort(key=lambda row: len(row.prompt_ids) + len(row.completion_ids))

    span = micro_batch_size * ranks
    parts = [RankBatch([], [], 0, len(rows)) for _ in range(ranks)]
    for start in range(0, len(rows), span):
        chunk = rows[start : start + span]
        bounds = [len(chunk) * r // ranks for r in range(ranks + 1)]
        for r, part in enumerate(parts):
            part.micro_batches.append(chunk[bounds[r] : bounds[r + 1]])
            part.micro_rows.append(len(chunk))
            part.with_images.append(any(row.images for row in chunk))
    total_tokens = sum(len(row.completion_ids) for row in rows)
    for part in parts:
        part.total_tokens = total_tokens
    metrics = {
        "train/sequences": float(len(rows)),
        "train/completion_tokens": float(total_tokens),
        "train/reward_mean": float(rewards_b.mean()),
        "train/advantage_abs_mean": float(adv_b.abs().mean()),
    }
    return parts, metrics


@dataclass
class MicroBatch:
    """Rows as padded tensors (a placeholder row when the rank has none in this micro-batch)."""

    input_ids_bt: torch.Tensor
    attention_mask_bt: torch.Tensor
    # 1 where position t scores a completion token (token t + 1), else 0; shape b x (t - 1).
    mask_bt: torch.Tensor
    # vLLM's logprob of the token at each masked position (0 elsewhere).
    behaviour_bt: torch.Tensor
    advantages_b: torch.Tensor
    # 1 for the tokens of real rows (the router statistics count these), 0 for a placeholder.
    real_bt: torch.Tensor
    rows: int
    # The image processor's outputs for the rows' images, and which tokens stand for image
    # patches (`mm_token_type_ids`): the model's other inputs. Empty for text rows.
    vision: dict[str, torch.Tensor] = field(default_factory=dict)


def collate(
    rows: list[Row], pad_id: int, images: ImageInputs | None = None, run_tower: bool = False
) -> MicroBatch:
    """Pads `rows` (prompt + completion) into tensors; no rows give one placeholder row.

    With `images` (a vision-language policy), each image placeholder of a prompt is expanded
    to the image's patch tokens, as the rollout engine expanded it, and the pixel inputs come
    along. The placeholder is two attended padding tokens with no completion token: its policy
    loss and router statistics are exactly 0, but its forward and backward run the same
    collectives as a real micro-batch.

    `run_tower` (other ranks' rows of this micro-batch hold images): where none of `rows` does,
    a prompt of one blank image with no completion (`ImageInputs.tower_row`) joins them, so
    that the tower's collectives run here too; like the placeholder it adds exactly 0 to the
    loss, the gradients and the router statistics.
    """
    tower_rows = 0
    if run_tower and images is not None and not any(row.images for row in rows):
        rows, tower_rows = [*rows, images.tower_row], 1
    if not rows:
        return MicroBatch(
            input_ids_bt=torch.full((1, 2), pad_id, dtype=torch.long),
            attention_mask_bt=torch.ones((1, 2), dtype=torch.long),
            mask_bt=torch.zeros((1, 1)),
            behaviour_bt=torch.zeros((1, 1)),
            advantages_b=torch.zeros(1),
            real_bt=torch.zeros((1, 2)),
            rows=0,
        )
    vision: dict[str, torch.Tensor] = {}
    prompts = [row.prompt_ids for row in rows]
    if images is not None and any(row.images for row in rows):
        prompts, vision = images.expand(rows)
    length = max(len(p) + len(r.completion_ids) for p, r in zip(prompts, rows, strict=True))
    input_ids_bt = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask_bt = torch.zeros((len(rows), length), dtype=torch.long)
    mask_bt = torch.zeros((len(rows), length - 1))
    behaviour_bt = torch.zeros((len(rows), length - 1))
    for b, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
        p, c = len(prompt), len(row.completion_ids)
        input_ids_bt[b, : p + c] = torch.tensor(prompt + row.completion_ids)
        attention_mask_bt[b, : p + c] = 1
        # Position p - 1 + j scores completion token j.
        mask_bt[b, p - 1 : p - 1 + c] = 1
        behaviour_bt[b, p - 1 : p - 1 + c] = torch.tensor(row.behaviour_logprobs)
    if vision:
        vision["mm_token_type_ids"] = (input_ids_bt == images.image_token_id).long()
    real_bt = attention_mask_bt.float()
    real_bt[len(rows) - tower_rows :] = 0.0
    return MicroBatch(
        input_ids_bt=input_ids_bt,
        attention_mask_bt=attention_mask_bt,
        mask_bt=mask_bt,
        behaviour_bt=behaviour_bt,
        advantages_b=torch.tensor([r.advantage for r in rows], dtype=torch.float32),
        real_bt=real_bt,
        rows=len(rows) - tower_rows,
        vision=vision,
    )


class ImageInputs:
    """A vision-language policy's image inputs: its image processor, and the placeholder token
    each image's patch tokens replace (`collate`)."""

    def __init__(self, model_path: str, image_token_id: int) -> None:
        from align.vision import load_processor

        processor = load_processor(model_path)
        self.processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = image_token_id

    @functools.cached_property
    def tower_row(self) -> Row:
        """A user turn of one blank image and no completion: a row that only runs the tower
        (a 64 x 64 image: a few patches; a processor with a larger minimum resizes it up).
        Built once, on first use; `collate` only reads it."""
        from PIL import Image

        from align.tokenizer import encode_prompts
        from align.vision import IMAGE_ITEM

        (prompt,) = encode_prompts(self.tokenizer, [[{"role": "user", "content": [IMAGE_ITEM]}]])
        return Row(prompt, [], [], 0.0, [Image.new("RGB", (64, 64))])

    def expand(self, rows: list[Row]) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
        """Each row's prompt ids with every placeholder expanded to its image's merged patches
        (in order), and the pixel inputs of all the rows' images."""
        pictures = [image for row in rows for image in row.images or []]
        pixels = self.processor(images=pictures, return_tensors="pt")
        merge = self.processor.merge_size**2
        counts = iter(int(grid.prod()) // merge for grid in pixels["image_grid_thw"])
        prompts = []
        for row in rows:
            ids: list[int] = []
            for token in row.prompt_ids:
                ids += [token] * next(counts) if token == self.image_token_id else [token]
            prompts.append(ids)
        return prompts, {
            "pixel_values": pixels["pixel_values"],
            "image_grid_thw": pixels["image_grid_thw"],
        }


def token_logprobs(model, input_ids_bt, attention_mask_bt=None, **inputs) -> torch.Tensor:
    """Logprob of each next token under `model` (b x (t - 1)); `inputs`: the model's other
    inputs (a vision-language model's pixel values).

    Rows padded on the right (as `collate` pads them) need no attention mask: under causal
    attention no real token sees a later position, so the scores of real tokens are the same
    without it, and attention takes its causal path instead of building a b x t x t mask.
    """
    logits_btv = model(input_ids=input_ids_bt, attention_mask=attention_mask_bt, **inputs).logits[
        :, :-1
    ]
    logp_btv = torch.log_softmax(logits_btv.float(), dim=-1)
    return logp_btv.gather(-1, input_ids_bt[:, 1:, None])[..., 0]


# --- one rank ----------------------------------------------------------------------------------


def shard_units(model) -> list:
    """The modules sharded one by one before the root: the decoder layers (a vision-language
    model's language model's), and a vision tower's blocks."""
    units = list(decoder_layers(model))
    visual = getattr(model.model, "visual", None)
    if visual is not None:
        units += list(visual.blocks)
    return units


def free_address() -> tuple[str, int]:
    """This node's IP address and a free TCP port on it (a rendezvous for a process group)."""
    try:
        import ray

        host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    except ImportError:
        host = "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return host, s.getsockname()[1]


class LearnerRank:
    """One rank of the learner group: its shard of the policy, of the optimiser and (for the KL
    term) of a frozen reference.

    Construction only stores the settings; `start` joins the process group and loads the model
    (every rank calls it at once: joining blocks until all ranks are there).

    Args:
        model_path: checkpoint to start from (Hugging Face format, safetensors).
        settings: optimisation settings.
        loss: the policy loss.
        max_completion_tokens: the rollouts' completion limit (Dr.GRPO's constant normaliser).
        seed: torch seed (nothing in a step is random today; kept for new weights and dropout).
        rank: this rank's index.
        world_size: ranks in the group.
        engine_dtype: the rollout engines' dtype, in which weights are sent to them.
    """

    def __init__(
        self,
        model_path: str,
        settings: LearnerSettings,
        loss: PolicyLossSettings,
        max_completion_tokens: int = 32,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        engine_dtype: str = "float32",
    ) -> None:
        self.model_path = model_path
        self.engine_dtype = getattr(torch, engine_dtype)
        # Rank 0: the last two staged policy versions (a send may still read the older one),
        # and one channel per rollout worker.
        self._staged: dict[int, transport.StagedWeights] = {}
        self._channels: dict[int, transport.Channel] = {}
        self.settings, self.loss = settings, loss
        self.max_completion_tokens = max_completion_tokens
        self.seed = seed
        self.rank, self.world_size = rank, world_size

    def start(self, address: str, port: int) -> None:
        """Joins the group (rank 0 hosts its rendezvous at address:port) and loads the policy."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        torch.manual_seed(self.seed)
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else None
        self.device = self.device or torch.device("cpu")
        if dist.is_initialized():
            # An in-process single rank next to a vLLM engine shares the engine's world of one.
            if dist.get_world_size() != self.world_size:
                raise RuntimeError(
                    f"this process already belongs to a process group of "
                    f"{dist.get_world_size()}, not {self.world_size} learner ranks"
                )
        else:
            dist.init_process_group(
                "nccl" if cuda else "gloo",
                init_method=f"tcp://{address}:{port}",
                rank=self.rank,
                world_size=self.world_size,
                timeout=timedelta(seconds=self.settings.collective_timeout_s),
            )
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        offload = self.settings.offload
        if offload and not cuda:
            log.warning("learner.offload ignored: the learner runs on the CPU already")
            offload = False
        bf16 = use_bf16(self.settings.precision)
        shard_options = {
            "mesh": mesh,
            "mp_policy": MixedPrecisionPolicy(
                param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32
            ),
            "offload_policy": CPUOffloadPolicy() if offload else None,
        }
        self.model = self._load_sharded(shard_options, trainable=True)
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model.named_parameters(), self.settings.vision_learning_rate),
            lr=self.settings.learning_rate,
            weight_decay=self.settings.weight_decay,
        )
        self.reference = None
        if self.loss.kl_coef > 0:
            self.reference = self._load_sharded(shard_options, trainable=False)
        self.images = None
        if is_vision_language(self.model.config):
            self.images = ImageInputs(self.model_path, self.model.config.image_token_id)
        config = self.model.config.get_text_config()
        self.pad_id = config.pad_token_id
        self.is_moe = bool(routers(self.model))
        self.num_experts = config.num_experts if self.is_moe else 0
        self.top_k = config.num_experts_per_tok if self.is_moe else 0
        self.router_logits = RouterLogits(self.model)
        self.version = 0
        self.nonfinite_in_a_row = 0
        # A step's forward + backward FLOPs per real token: 6 x the parameters one token goes
        # through (its chosen experts only; not the input embedding, a lookup), attention's
        # score and value products left out, and a vision-language model's tower (it runs on
        # image patches, not on these tokens). DTensor.numel() counts the whole parameter.
        active = count_parameters(self.model)["active"]
        if not config.tie_word_embeddings:
            active -= self.model.get_input_embeddings().weight.numel()
        active -= sum(p.numel() for n, p in self.model.named_parameters() if in_vision_tower(n))
        # Frozen weights (LoRA) take no weight gradient: 4 FLOPs per parameter, not 6 (the
        # adapters' own FLOPs left out, a fraction of a percent).
        self.flops_per_token = (4 if self.settings.lora.enabled else 6) * active

    def _load_sharded(self, shard_options: dict, trainable: bool):
        """The checkpoint as an FSDP2 module (each decoder layer a unit, then the root), built
        on the meta device and filled from rank 0's copy: no rank ever holds the whole model on
        its device."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )
        from torch.distributed.fsdp import fully_shard

        model = empty_model(self.model_path)
        if is_vision_language(model.config) and not (trainable and self.settings.train_vision):
            # Before sharding: FSDP2 keeps what is frozen out of the gradient reductions.
            freeze_vision(model)
        adapters = lora_config(self.settings.lora) if trainable else None
        if adapters is not None:
            _add_adapters(model, adapters)
        if trainable and self.settings.gradient_checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        options = {k: v for k, v in shard_options.items() if v is not None}
        for layer in shard_units(model):
            fully_shard(layer, **options)
        fully_shard(model, **options)
        model.to_empty(device="cpu" if "offload_policy" in options else self.device)
        full = load_model(self.model_path) if self.rank == 0 else None
        if full is not None and adapters is not None:
            # Rank 0's adapters, initialised from the seed, are every rank's.
            _add_adapters(full, adapters)
        set_model_state_dict(
            model,
            full.state_dict() if full is not None else {},
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )
        # Buffers that checkpoints do not hold (rotary frequencies) come from rank 0 too.
        saved = set(model.state_dict())
        for name, buffer in model.named_buffers():
            if name not in saved:
                # Through the group's device (NCCL sends GPU tensors; offloaded buffers are on
                # the CPU).
                value = (full.get_buffer(name) if full is not None else buffer).to(self.device)
                dist.broadcast(value, src=0)
                buffer.copy_(value)
        if full is not None:
            # transformers' record of how the checkpoint's names and layouts were converted on
            # loading: what the weight export reverses (`align.rl.transport`).
            model._weight_conversions = getattr(full, "_weight_conversions", None)
        model.config.use_cache = False
        # Unused parameters still take part in the reduce-scatter (as zeros), so a rank whose
        # tokens skipped an expert never leaves the others waiting.
        model.set_reduce_scatter_unused_params(True)
        if trainable:
            model.train()
            if adapters is not None:
                for name, parameter in model.named_parameters():
                    parameter.requires_grad_(".lora_" in name)
        else:
            model.eval()
            model.requires_grad_(False)
        return model

    def address(self) -> tuple[str, int]:
        """A rendezvous address on this rank's node (asked of rank 0)."""
        return free_address()

    # --- the step ----------------------------------------------------------------------------

    def _all_reduce(self, values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        values = values.to(self.device)
        dist.all_reduce(values, op=op)
        return values.cpu()

    def train_step(self, part: RankBatch, stage: bool = False) -> dict[str, float]:
        """One optimiser step; every rank calls it with its part of the same batch.

        With `stage`, the new weights are then gathered and staged on rank 0 for the workers
        (`stage_weights`). The metrics include the new policy version (`learner/version`).
        """
        started = time.perf_counter()
        self.router_logits.take()  # forwards outside training steps are not this step's
        self.optimizer.zero_grad(set_to_none=True)
        local: dict[str, float] = {"loss": 0.0, "aux": 0.0, "entropy": 0.0, "tokens": 0.0}
        maxima: dict[str, float] = {}
        counts_le = torch.zeros(len(routers(self.model)), max(self.num_experts, 1))
        first = None
        real_tokens = padded_tokens = 0
        for k, rows in enumerate(part.micro_batches):
            batch = collate(rows, self.pad_id, self.images, part.with_images[k])
            ids_bt = batch.input_ids_bt.to(self.device)
            vision = {name: value.to(self.device) for name, value in batch.vision.items()}
            mask_bt = batch.mask_bt.to(self.device)
            behaviour_bt = batch.behaviour_bt.to(self.device)
            real_tokens += int(batch.attention_mask_bt.sum())
            padded_tokens += batch.attention_mask_bt.numel()
            ref_bt = None
            if self.reference is not None:
                with torch.no_grad():
                    ref_bt = token_logprobs(self.reference, ids_bt, **vision)
                self.router_logits.take()  # not this step's routing
            logp_bt = token_logprobs(self.model, ids_bt, **vision)
            router_logits = self.router_logits.take()
            out = policy_loss(
                self.loss,
                logp_bt,
                # The proximal policy is the weights before this update: these very weights.
                behaviour_bt if self.loss.correction == "none" else logp_bt.detach(),
                behaviour_bt,
                batch.advantages_b.to(self.device),
                mask_bt,
                ref_logp_bt=ref_bt,
                max_completion_tokens=self.max_completion_tokens,
                total_tokens=part.total_tokens,
                total_sequences=part.total_sequences,
            )
            loss = out.loss
            share = batch.rows / part.total_sequences
            if self.is_moe:
                real_t = batch.real_bt.reshape(-1).to(self.device)
                terms = balance_terms(router_logits, self.top_k, real_t)
                # The router loss of global micro-batch k: its counts over every rank's tokens.
                global_counts = self._all_reduce(torch.cat([terms.counts_e, terms.rows[None]]))
                aux = terms.loss(
                    global_counts[:-1].to(self.device), global_counts[-1].to(self.device)
                )
                weight = part.micro_rows[k] / part.total_sequences
                if self.settings.router_aux_loss_coef > 0:
                    loss = loss + self.settings.router_aux_loss_coef * weight * aux
                local["aux"] += float(aux.detach()) * weight
                entropy, tokens = routing_entropy_sum(router_logits, real_t)
                local["entropy"] += entropy
                local["tokens"] += tokens
                for layer, logits_te in enumerate(router_logits):
                    chosen = logits_te.detach().topk(self.top_k, dim=-1).indices[real_t.bool()]
                    counts_le[layer] += torch.bincount(
                        chosen.reshape(-1).cpu(), minlength=self.num_experts
                    ).float()
                if first is None:
                    # Routing before the update, to measure how many tokens it sends elsewhere
                    # (with images: the whole micro-batch, whose pixel inputs are one tensor).
                    keep = slice(None) if vision else slice(0, ROUTING_SAMPLE)
                    first = (
                        ids_bt[keep],
                        batch.real_bt[keep],
                        [r.detach().topk(self.top_k, dim=-1).indices for r in router_logits],
                        vision,
                    )
            (loss * self.world_size).backward()
            # A host sync: the backward has run when the loss is read (timed with it).
            local["loss"] += float(out.loss.detach())
            for key, value in out.metrics.items():
                if key.endswith("_max"):
                    maxima[key] = max(maxima.get(key, value), value)
                else:
                    local[key] = local.get(key, 0.0) + value * share

        forward_backward_s = time.perf_counter() - started
        # The global norm (the gradients are DTensors); clipped in place by it.
        grad_norm = float(
            _full(
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
            )
        )
        names = sorted(local)
        sums = self._all_reduce(torch.tensor([local[n] for n in names], dtype=torch.float64))
        totals = dict(zip(names, sums.tolist(), strict=True))
        finite = math.isfinite(totals["loss"]) and math.isfinite(grad_norm)
        # The version counts steps, skipped ones included (their weights equal the previous).
        self.version += 1
        warmup = min(1.0, self.version / max(1, self.settings.warmup_steps))
        learning_rate = self.settings.learning_rate * warmup
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = (
                    self.settings.vision_learning_rate * warmup
                    if group.get("vision")
                    else learning_rate
                )
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            log.warning(
                "step skipped: loss %s, gradient norm %s (%d in a row)",
                totals["loss"],
                grad_norm,
                self.nonfinite_in_a_row,
            )
        self.optimizer.zero_grad(set_to_none=True)
        optimizer_done = time.perf_counter()

        metrics = {
            "train/loss": totals.pop("loss"),
            "train/grad_norm": grad_norm,
            "train/learning_rate": learning_rate,
            "train/skipped": float(not finite),
        }
        aux, entropy, tokens = totals.pop("aux"), totals.pop("entropy"), totals.pop("tokens")
        metrics.update(totals)
        if maxima:
            names = sorted(maxima)
            highest = self._all_reduce(
                torch.tensor([maxima[n] for n in names], dtype=torch.float64), dist.ReduceOp.MAX
            )
            metrics.update(zip(names, highest.tolist(), strict=True))
        if self.is_moe:
            metrics["moe/aux_loss"] = aux
            metrics["moe/routing_entropy"] = entropy / max(tokens, 1.0)
            metrics["moe/routing_change"] = self._routing_change(*first)
            metrics.update(load_summary(self._all_reduce(counts_le.double())))
        metrics["learner/version"] = float(self.version)
        # Where the step's time went (rank 0's view; the collectives keep the ranks in step):
        # forward and backward of every micro-batch; gradient clipping, the metric all-reduce
        # and the optimiser; the MoE metrics (routing change: one more forward of a sample).
        metrics_done = time.perf_counter()
        metrics["time/learner_forward_backward"] = forward_backward_s
        metrics["time/learner_optimizer"] = optimizer_done - started - forward_backward_s
        metrics["time/learner_metrics"] = metrics_done - optimizer_done
        metrics["time/learner_step"] = metrics_done - started
        # This rank's achieved FLOP/s in forward + backward (see `flops_per_token`) and the
        # share of its forward's positions that were padding.
        metrics["perf/learner_flops_per_s"] = (
            self.flops_per_token * real_tokens / max(forward_backward_s, 1e-9)
        )
        metrics["perf/padding_share"] = 1.0 - real_tokens / max(padded_tokens, 1)
        if stage:
            metrics["sync/gather_seconds"] = self.stage_weights()
        if self.nonfinite_in_a_row >= self.settings.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient"
                f" norm (last: loss {metrics['train/loss']}, gradient norm {grad_norm})"
            )
        return metrics

    @torch.no_grad()
    def _routing_change(
        self, ids_bt, real_bt, before_lk: list[torch.Tensor], vision: dict
    ) -> float:
        """Share of (real token, MoE layer) pairs whose top-k experts this update changed, over
        every rank's sample.

        It is also how often vLLM and the learner route a token differently for a group one
        version stale: weight sync is exact, so routing differs only through the update.
        """
        self.model(input_ids=ids_bt, **vision)  # right-padded rows (`token_logprobs`)
        keep_t = real_bt.reshape(-1).bool().to(self.device)
        changed, total = 0, 0
        for before_tk, logits_te in zip(before_lk, self.router_logits.take(), strict=True):
            before_tk = before_tk[: keep_t.shape[0]]
            after_tk = logits_te.topk(before_tk.shape[-1], dim=-1).indices
            same_t = (after_tk.sort(-1).values == before_tk.sort(-1).values).all(-1)
            changed += int((~same_t[keep_t]).sum())
            total += int(keep_t.sum())
        changed, total = self._all_reduce(torch.tensor([changed, total], dtype=torch.float64))
        return float(changed / max(total, 1.0))

    # --- weights out -------------------------------------------------------------------------

    def stage_weights(self) -> float:
        """Gathers the current weights and keeps them on rank 0, converted and packed for the
        workers (a collective); returns the seconds it took."""
        staged, seconds = transport.stage(self.model, self.engine_dtype, self.version)
        if staged is not None:
            self._staged = {v: w for v, w in self._staged.items() if v == max(self._staged)}
            self._staged[staged.version] = staged
        return seconds

    def update_info(self) -> dict:
        """What a worker needs to receive a staged version (rank 0; the same for every one)."""
        return self._staged[max(self._staged)].wire.update_info()

    def transfer_endpoint(self, world_size: int, timeout_s: float) -> transport.Endpoint:
        """A rendezvous on rank 0's node for a channel to one worker engine of `world_size - 1`
        ranks (rank 0)."""
        host, port = free_address()
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        return transport.Endpoint(backend, host, port, world_size, timeout_s)

    def open_channel(self, worker: int, endpoint: transport.Endpoint) -> None:
        """Opens the channel to `worker` (rank 0; the worker joins at the same time), closing
        the one of a worker it replaces."""
        old = self._channels.pop(worker, None)
        if old is not None:
            old.close()
        self._channels[worker] = transport.Channel(endpoint)

    def send_weights(self, worker: int, version: int) -> float:
        """Sends staged policy `version` to `worker`, which receives meanwhile (rank 0; runs on
        a thread of its own, beside training); returns the seconds it took."""
        return self._channels[worker].send(self._staged[version])

    def export(self, directory: str) -> float:
        """Writes the current weights as a Hugging Face checkpoint from rank 0 (a collective),
        in the starting checkpoint's dtype; returns the seconds it took."""
        return transport.export(self.model, directory, checkpoint_dtype(self.model_path))

    # --- state ---------------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        """Writes this rank's shards of weights and optimiser (torch.distributed.checkpoint:
        every rank writes its own, nothing is gathered) and, on rank 0, the learner's counters.
        Every rank calls it with the same directory (shared storage across nodes)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)
        if self.rank == 0:
            counters = {
                "version": self.version,
                "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "ranks": self.world_size,
            }
            (Path(directory) / "learner.json").write_text(json.dumps(counters), encoding="utf-8")
        dist.barrier()

    def load(self, directory: str) -> int:
        """Restores what `save` wrote, on any number of ranks (the shards are re-cut); returns
        the policy version."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, storage_reader=checkpoint_reader(directory))
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
        counters = json.loads((Path(directory) / "learner.json").read_text(encoding="utf-8"))
        self.version = counters["version"]
        self.nonfinite_in_a_row = counters["nonfinite_in_a_row"]
        return self.version

    def node(self) -> dict[str, str | int]:
        """Where this rank runs: host, process id, compute threads, Ray node (for the
        placement report)."""
        info: dict[str, str | int] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "threads": torch.get_num_threads(),
        }
        try:
            import ray

            if ray.is_initialized():
                info["node_id"] = ray.get_runtime_context().get_node_id()
        except ImportError:
            pass
        return info


# What torch.distributed.checkpoint's metadata file (a pickle) may contain: the metadata
# classes, torch's dtypes, sizes and layouts, paths. Nothing that runs code when called.
_CHECKPOINT_METADATA = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {
        "Size",
        *(name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)),
    },
    "pathlib": {"Path", "PosixPath", "WindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a checkpoint's metadata, refusing every global outside `_CHECKPOINT_METADATA`
    (Python's "restricting globals"): a crafted checkpoint cannot run code on resume."""

    def find_class(self, module: str, name: str):
        if name in _CHECKPOINT_METADATA.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"checkpoint metadata refers to {module}.{name}, which a checkpoint never holds; "
            "it was not written by this toolkit and is not loaded"
        )


def checkpoint_reader(directory: str):
    """torch.distributed.checkpoint's file reader for `directory`, reading the metadata with
    `_MetadataUnpickler` (the library's own reader unpickles whatever the file holds)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(directory)


def _add_adapters(model, config) -> None:
    """Puts LoRA adapters into `model` in place (peft), keeping its class and module names."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, model)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a possibly sharded (DTensor) tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def routing_entropy_sum(
    router_logits: tuple[torch.Tensor, ...], token_mask_t: torch.Tensor
) -> tuple[float, float]:
    """Sum of the routers' softmax entropies (nats) over real tokens and layers, and the count."""
    keep_t = token_mask_t.reshape(-1).bool()
    total, count = 0.0, 0.0
    for logits_te in router_logits:
        logp_te = torch.log_softmax(logits_te.detach().float()[keep_t], dim=-1)
        total += float(-(logp_te.exp() * logp_te).sum())
        count += float(keep_t.sum())
    return total, count
