"""Weight transport, learner side: the group's weights in checkpoint format, into live engines.

After a learner step the group gathers the policy one decoder layer at a time: every rank takes
part in the all-gather of its FSDP2 shards, and rank 0 converts the layer back to checkpoint
names and layouts with transformers' own conversion (`revert_weight_conversion`, what
`save_pretrained` applies: Qwen3-MoE's fused experts become `experts.{i}.{gate,up,down}_proj`),
casts it to the engines' dtype and packs it into buckets (`stage`). Rank 0 then sends the
buckets to each rollout worker over the worker's own channel, a process group of two (gloo on
CPU; on GPU vLLM's NCCL communicator and packed broadcast), while the worker's engine takes them
through vLLM's weight-transfer protocol (`align.engine`: `init_weight_transfer_engine`, then per
update `start_weight_update` / `update_weights` / `finish_weight_update`).

Why stage on rank 0 instead of streaming each gathered layer straight to the workers: the
gather is a collective of the learner group, and a worker can take weights only between its
rollout requests. Streaming would hold every learner rank until the slowest worker's request
ends; staged, the sends run on a separate thread of rank 0 (`send`) while the group trains its
next step, and each worker loads the weights when its current request is done. The price is one
copy of the weights, in the engines' dtype, in rank 0's host memory.

Nothing here touches a file: the run directory and /dev/shm play no part in a sync, so learner
ranks and workers may sit on different machines. `export` writes the same stream as a Hugging
Face checkpoint (snapshots and the final model), from rank 0.

vLLM is imported only by the channel code (a learner that never syncs, e.g. a GPU benchmark,
does not need it).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Bytes per packed bucket. The worker cuts its receive buffers from the same metadata with the
# same rule (`bucket_plan`), so the two sides agree without sending boundaries.
BUCKET_BYTES = 256 << 20
# The buckets of one export file (a Hugging Face checkpoint shard).
EXPORT_SHARD_BYTES = 4 << 30


def bucket_plan(sizes: list[int], bucket_bytes: int) -> list[range]:
    """Tensor index ranges of each bucket: tensors are added until a bucket exceeds
    `bucket_bytes` (the tensor that crosses it stays in; vLLM's packed broadcast cuts alike)."""
    buckets, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        total += size
        if total > bucket_bytes:
            buckets.append(range(start, i + 1))
            start, total = i + 1, 0
    if start < len(sizes):
        buckets.append(range(start, len(sizes)))
    return buckets


def layer_groups(names: list[str]) -> list[list[str]]:
    """Names grouped per decoder layer (the first integer segment: `model.layers.3.`), in order;
    names without one go to a group before the first layer (embeddings) or after (norm, head)."""
    groups: dict[Any, list[str]] = {}
    seen_layer = False
    for name in names:
        index = next((int(p) for p in name.split(".") if p.isdigit()), None)
        if index is None:
            key = ("post",) if seen_layer else ("pre",)
        else:
            seen_layer = True
            key = ("layer", index)
        groups.setdefault(key, []).append(name)
    order = sorted(
        groups, key=lambda k: (0, 0) if k == ("pre",) else (2, 0) if k == ("post",) else (1, k[1])
    )
    return [groups[k] for k in order]


def checkpoint_layers(
    model, trained_only: bool = False
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The model's weights under their checkpoint names and layouts, one decoder layer at a time.

    A collective: every rank of the group must iterate it to the end together. Rank 0 gets each
    layer's tensors (full, on the CPU); the other ranks get empty lists. With `trained_only`,
    a frozen vision tower is left out: an engine that has it already needs only the rest.
    """
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from align.modeling import checkpoint_expert_layout
    from align.vision import in_vision_tower

    state = model.state_dict()
    if trained_only:
        frozen = {
            name
            for name, parameter in model.named_parameters()
            if not parameter.requires_grad and in_vision_tower(name)
        }
        state = {name: value for name, value in state.items() if name not in frozen}
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    for names in layer_groups(list(state)):
        layer = {}
        for name in names:
            tensor = state[name]
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            if rank0:
                layer[name] = full.detach().cpu()
        if not rank0:
            yield []
            continue
        layer = remove_tied_weights_from_state_dict(merge_adapters(model, layer), model)
        converted = revert_weight_conversion(model, layer)
        yield list(checkpoint_expert_layout(model.config, converted).items())


def merge_adapters(model, layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`layer`'s tensors with any LoRA adapters merged into the weights they adapt, under those
    weights' own names: W + scaling x (B @ A), as peft's merge computes it, without changing
    the model (whose adapters keep training). Tensors of modules without adapters pass through.
    """
    merged = {}
    for name, tensor in layer.items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        prefix, base, leaf = name.rpartition(".base_layer.")
        if not base:
            merged[name] = tensor
            continue
        if leaf == "weight":
            module = model.get_submodule(prefix)
            for adapter in module.active_adapters:
                a = layer[f"{prefix}.lora_A.{adapter}.weight"]
                b = layer[f"{prefix}.lora_B.{adapter}.weight"]
                tensor = tensor + (b @ a) * module.scaling[adapter]
        merged[f"{prefix}.{leaf}"] = tensor
    return merged


@dataclass
class WireFormat:
    """What a worker needs to cut and unpack the stream: every tensor's name, dtype and shape
    in sending order (vLLM's update info), and the bucket size."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def sizes(self) -> list[int]:
        return [
            math.prod(shape) * getattr(torch, dtype).itemsize
            for shape, dtype in zip(self.shapes, self.dtype_names, strict=True)
        ]

    def update_info(self) -> dict[str, Any]:
        return {"names": self.names, "dtype_names": self.dtype_names, "shapes": self.shapes}


@dataclass
class StagedWeights:
    """One policy version, converted and packed on rank 0, ready to send to any worker."""

    version: int
    wire: WireFormat
    # Packed uint8 buckets, in order (see `bucket_plan`).
    buckets: list[torch.Tensor]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The named tensors, as views into the buckets."""
        sizes = self.wire.sizes()
        for bucket, indices in zip(self.buckets, bucket_plan(sizes, BUCKET_BYTES), strict=True):
            offset = 0
            for i in indices:
                flat = bucket[offset : offset + sizes[i]]
                offset += sizes[i]
                dtype = getattr(torch, self.wire.dtype_names[i])
                yield self.wire.names[i], flat.view(dtype).view(self.wire.shapes[i])


def stage(model, dtype: torch.dtype, version: int) -> tuple[StagedWeights | None, float]:
    """Gathers, converts and packs `model`'s weights (a collective of the group), a frozen
    vision tower left out (the engines keep theirs).

    Returns:
        On rank 0 the staged weights (None elsewhere), and the seconds it took.
    """
    started = time.perf_counter()
    names, dtypes, shapes, flats = [], [], [], []
    for layer in checkpoint_layers(model, trained_only=True):
        for name, tensor in layer:
            tensor = tensor.to(dtype).contiguous()
            names.append(name)
            dtypes.append(str(tensor.dtype).removeprefix("torch."))
            shapes.append(list(tensor.shape))
            flats.append(tensor.reshape(-1).view(torch.uint8))
    if not names:
        return None, time.perf_counter() - started
    wire = WireFormat(names, dtypes, shapes)
    buckets = [
        torch.cat([flats[i] for i in indices])
        for indices in bucket_plan(wire.sizes(), BUCKET_BYTES)
    ]
    return StagedWeights(version, wire, buckets), time.perf_counter() - started


def export(model, directory: str | Path, dtype: torch.dtype) -> float:
    """Writes `model`'s weights as a Hugging Face checkpoint (safetensors in checkpoint format,
    config.json, generation_config.json; no tokenizer) from rank 0. A collective.

    Returns the seconds it took.
    """
    from safetensors.torch import save_file

    started = time.perf_counter()
    directory = Path(directory)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for layer in checkpoint_layers(model):
        for name, tensor in layer:
            tensor = tensor.to(dtype).contiguous()
            if size and size + tensor.nbytes > EXPORT_SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][name] = tensor
            size += tensor.nbytes
    if rank0:
        directory.mkdir(parents=True, exist_ok=True)
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(directory / "model.safetensors"), metadata=metadata)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(directory / filename), metadata=metadata)
                weight_map.update(dict.fromkeys(shard, filename))
            total = sum(t.nbytes for shard in shards for t in shard.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (directory / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2), encoding="utf-8"
            )
        model.config.save_pretrained(str(directory))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(directory))
    return time.perf_counter() - started


# --- channels: rank 0 -> one worker ------------------------------------------------------------


@dataclass
class Endpoint:
    """The rendezvous of one channel (rank 0 hosts it) and its wire settings; sent to the worker
    as its `init_weight_transfer_engine` info."""

    backend: str
    master_address: str
    master_port: int
    # Rank 0 plus the worker engine's ranks (its tensor-parallel degree).
    world_size: int
    timeout_s: float

    def worker_init_info(self) -> dict[str, Any]:
        """The init info of the worker engine's transfer backend (gloo: ours; nccl: vLLM's)."""
        common = {
            "master_address": self.master_address,
            "master_port": self.master_port,
            "rank_offset": 1,
            "world_size": self.world_size,
        }
        if self.backend == "gloo":
            return {**common, "bucket_bytes": BUCKET_BYTES, "timeout_s": self.timeout_s}
        return {**common, "packed": True, "packed_buffer_size_bytes": BUCKET_BYTES}


class Channel:
    """Rank 0's end of the process group with one rollout worker's engine.

    Args:
        endpoint: the rendezvous; the worker joins it at the same time (rank 1, and up).
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        if endpoint.backend == "gloo":
            from vllm.distributed.utils import stateless_init_torch_distributed_process_group

            self.group = stateless_init_torch_distributed_process_group(
                endpoint.master_address,
                endpoint.master_port,
                rank=0,
                world_size=endpoint.world_size,
                backend="gloo",
                timeout=timedelta(seconds=endpoint.timeout_s),
            )
        else:
            from vllm.distributed.weight_transfer.nccl_common import trainer_init

            self.group = trainer_init(
                {
                    "master_address": endpoint.master_address,
                    "master_port": endpoint.master_port,
                    "world_size": endpoint.world_size,
                }
            )

    def send(self, weights: StagedWeights) -> float:
        """Broadcasts every bucket to the worker (which must be receiving); returns seconds."""
        started = time.perf_counter()
        if self.endpoint.backend == "gloo":
            options = dist.BroadcastOptions()
            options.rootRank = 0
            for bucket in weights.buckets:
                self.group.broadcast([bucket], options).wait()
        else:
            from vllm.distributed.weight_transfer.packed_tensor import (
                packed_nccl_broadcast_producer,
            )

            device = torch.device("cuda", torch.cuda.current_device())
            packed_nccl_broadcast_producer(
                iterator=weights.tensors(),
                group=self.group,
                src=0,
                post_iter_func=lambda item: item[1].to(device, non_blocking=True),
                buffer_size_bytes=BUCKET_BYTES,
            )
            torch.cuda.current_stream().synchronize()
        return time.perf_counter() - started

    def close(self) -> None:
        if self.endpoint.backend == "gloo":
            self.group.shutdown()
        else:
            self.group.destroy()
