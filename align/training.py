"""What the TRL-based training stages (SFT, DPO) share: settings, token budgets, logging, saving.

The stages hand TRL's trainers these pieces; the training loops themselves are TRL's.

    args = SFTConfig(**trainer_arguments(settings, run_dir / "checkpoints", model), packing=True)
    trainer = SFTTrainer(model, args, ..., peft_config=lora_config(lora))
    trainer.add_callback(RunLogger(run, trainer.model))
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from transformers import PreTrainedModel, TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from align.config import (
    ConfigError,
    UnreadableFile,
    changed_settings,
    check,
    decode_text,
    parse_yaml,
    read_input_file,
)
from align.launch import TrainPlacement, sharding_arguments, sum_over_ranks
from align.modeling import fix_expert_layout
from align.moe import ExpertLoad, has_experts, load_summary, routers, shares
from align.runs import NonFiniteError, Run, atomic_directory, verbose, write_json_atomic
from align.settings import OptimSettings
from align.vision import parameter_groups

log = logging.getLogger(__name__)

# The file transformers' Trainer writes last into a checkpoint: no file, no complete checkpoint.
TRAINER_STATE_NAME = "trainer_state.json"


@dataclass
class LoraSettings:
    """LoRA adapters through peft; the saved checkpoint has them merged in."""

    # Train LoRA adapters instead of all weights.
    enabled: bool = False
    # Adapter rank.
    r: int = 16
    # Scaling numerator: the update is scaled by alpha / r.
    alpha: int = 32
    # Dropout on the adapter input.
    dropout: float = 0.0
    # Module names that get adapters. The default covers attention and the dense MLPs (dense
    # layers and Llama 4's shared expert); routers and routed experts stay frozen.
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )

    def validate(self) -> None:
        check(self.r >= 1, "r", f"must be >= 1 (got {self.r})")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1) (got {self.dropout})")
        check(bool(self.target_modules), "target_modules", "list at least one module name")


@dataclass
class TrainSettings(OptimSettings):
    """Optimisation of the SFT, DPO and distillation stages (`align.settings.OptimSettings`
    plus what a TRL trainer takes). Warmup defaults to 5% of the steps."""

    warmup_steps: float = 0.05

    # Learning-rate schedule after warmup.
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    # Sequences (SFT; packed rows with packing) or pairs (DPO) per device per micro-batch.
    batch_size: int = 32
    # Micro-batches per optimiser step.
    grad_accum: int = 1
    # Passes over the data when `token_budget` is not set.
    epochs: float = 1.0
    # Train on this many tokens (prompt + completion, chosen + rejected for DPO): the data is
    # repeated or cut, in seeded order, to fit. The "lightweight" setting of the recipe.
    token_budget: int | None = None
    # Longest sequence in tokens; longer rows are truncated (and counted in the log).
    max_length: int = 256
    # Log every N optimiser steps.
    logging_steps: int = 10
    # Write a resumable checkpoint every N optimiser steps.
    save_steps: int = 200
    # Resumable checkpoints kept (older ones are deleted).
    save_total_limit: int = 2
    # Seed of data order, budget sampling and initialisation of new weights.
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        check(self.batch_size >= 1, "batch_size", f"must be >= 1 (got {self.batch_size})")
        check(self.grad_accum >= 1, "grad_accum", f"must be >= 1 (got {self.grad_accum})")
        check(self.epochs > 0, "epochs", f"must be > 0 (got {self.epochs})")
        check(
            self.token_budget is None or self.token_budget >= 1,
            "token_budget",
            f"must be >= 1 or null (got {self.token_budget})",
        )
        check(self.max_length >= 2, "max_length", f"must be >= 2 (got {self.max_length})")
        check(self.logging_steps >= 1, "logging_steps", f"must be >= 1 ({self.logging_steps})")
        check(self.save_steps >= 1, "save_steps", f"must be >= 1 (got {self.save_steps})")
        check(
            self.save_total_limit >= 1,
            "save_total_limit",
            f"must be >= 1 (got {self.save_total_limit})",
        )


def use_bf16(precision: str) -> bool:
    """Whether `precision` means bf16 mixed precision on this machine."""
    if precision == "bf16":
        return True
    return precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def frozen_dtype(precision: str) -> torch.dtype:
    """The dtype of weights that are not trained (a LoRA base, a teacher): bf16 under bf16
    mixed precision, where they need half the memory of fp32 and are computed in bf16 anyway;
    fp32 otherwise. Trained weights stay fp32 (the optimiser's master copy)."""
    return torch.bfloat16 if use_bf16(precision) else torch.float32


def model_dtype(settings: TrainSettings, lora: LoraSettings) -> torch.dtype:
    """The dtype to load the model to train in: with LoRA its weights are frozen."""
    return frozen_dtype(settings.precision) if lora.enabled else torch.float32


def trainer_arguments(
    settings: TrainSettings, output_dir: Path, model, placement: TrainPlacement
) -> dict:
    """Keyword arguments that SFTConfig and DPOConfig (both TrainingArguments) share.

    `model` is the model to train: the router loss applies only where it has experts (a dense
    model trains without it, and the log says so once). On the ranks of a launch, `placement`
    says how they shard the model (`align.launch.sharding_arguments`).
    """
    router_aux_loss_coef = settings.router_aux_loss_coef
    if router_aux_loss_coef and not has_experts(model.config):
        log.info(
            "%s has no experts: train.router_aux_loss_coef and the expert-load metrics do not "
            "apply",
            type(model).__name__,
        )
        router_aux_loss_coef = 0.0
    return dict(
        output_dir=str(output_dir),
        learning_rate=settings.learning_rate,
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(
            settings.lr_scheduler, settings.lr_scheduler
        ),
        # A float below 1 is a share of the steps to the trainers too.
        warmup_steps=settings.warmup_steps
        if settings.warmup_steps < 1
        else int(settings.warmup_steps),
        weight_decay=settings.weight_decay,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        num_train_epochs=1.0 if settings.token_budget else settings.epochs,
        max_grad_norm=settings.max_grad_norm,
        logging_steps=settings.logging_steps,
        # Pinned host memory only helps copies to a GPU (on CPU torch warns on every stage).
        dataloader_pin_memory=torch.cuda.is_available(),
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=use_bf16(settings.precision),
        gradient_checkpointing=settings.gradient_checkpointing,
        router_aux_loss_coef=router_aux_loss_coef,
        max_length=settings.max_length,
        # Metrics go to the run directory through RunLogger (metrics.jsonl and TensorBoard).
        report_to=[],
        # The stages keep their metadata columns (task, level) out of the batch themselves.
        remove_unused_columns=True,
        **sharding_arguments(placement),
    )


def lora_config(settings: LoraSettings):
    """peft's LoraConfig for `settings`, or None when LoRA is off."""
    if not settings.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )


def token_count(tokenizer, prompt: str | list[dict], completion: str | list[dict] = "") -> int:
    """Tokens of prompt + completion as the trainers see them (chat template applied, or EOS).

    A conversation (`prompt` a list of messages, `completion` the reply messages or empty) is
    rendered with the chat template; plain text gets the tokenizer's special tokens and EOS.
    """
    if isinstance(prompt, list):
        messages = prompt + (completion or [])
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    return len(tokenizer(prompt + completion)["input_ids"]) + 1


def budget_indices(token_counts: list[int], budget: int, seed: int) -> list[int]:
    """Row indices whose token counts add up to `budget`: whole seeded passes, then a cut pass.

    Each pass over the data is a fresh seeded permutation; the last pass stops at the first row
    that reaches the budget. Rows are repeated when the budget exceeds the data.

    Example: counts [10, 20, 30] (60 tokens), budget 100 -> one full pass (60 tokens) plus rows
    of a second permutation until 100 is reached or passed.
    """
    if budget < 1 or not token_counts:
        raise ValueError("a token budget needs rows and a positive budget")
    rng = random.Random(seed)
    indices: list[int] = []
    total = 0
    while total < budget:
        order = list(range(len(token_counts)))
        rng.shuffle(order)
        for i in order:
            indices.append(i)
            total += token_counts[i]
            if total >= budget:
                break
    return indices


def fit_budget(
    dataset,
    token_counts: list[int],
    settings: TrainSettings,
    what: str,
    longest: list[int] | None = None,
    note: str = "",
):
    """Repeats or cuts `dataset` to the token budget (if set) and logs what that did.

    `token_counts` are the tokens each row trains on; `longest` its longest sequence (default:
    the count), which `settings.max_length` truncates: how many are, is a warning (`note`
    added to it).
    """
    longest = token_counts if longest is None else longest
    too_long = sum(n > settings.max_length for n in longest)
    if too_long:
        log.warning(
            "%d of %d %s are longer than train.max_length=%d tokens and are truncated%s",
            too_long,
            len(longest),
            what,
            settings.max_length,
            note,
        )
    total = sum(token_counts)
    if settings.token_budget is None:
        log.info(
            "training on %d %s (%d tokens) for %g epochs",
            len(dataset),
            what,
            total,
            settings.epochs,
        )
        return dataset, total * settings.epochs
    indices = budget_indices(token_counts, settings.token_budget, settings.seed)
    used = sum(token_counts[i] for i in indices)
    log.info(
        "token budget %d: %d %s drawn from %d (%.2f passes over %d tokens)",
        settings.token_budget,
        len(indices),
        what,
        len(dataset),
        used / total,
        total,
    )
    return dataset.select(indices), used


def resume_point(checkpoints: Path) -> str | None:
    """The newest complete checkpoint under `checkpoints`, or None to start fresh.

    The trainers write a checkpoint in place and its `trainer_state.json` last, so a checkpoint
    without one was cut off half-way (the process died while saving). It is set aside as
    `incomplete-checkpoint-N` and the one before it is used.
    """
    if not checkpoints.is_dir():
        return None
    while (last := get_last_checkpoint(str(checkpoints))) is not None:
        if (Path(last) / TRAINER_STATE_NAME).exists():
            log.info("resuming from %s", last)
            return last
        aside = Path(last).with_name(f"incomplete-{Path(last).name}")
        shutil.rmtree(aside, ignore_errors=True)
        Path(last).rename(aside)
        log.warning(
            "%s was not completely written (no %s): set aside as %s",
            last,
            TRAINER_STATE_NAME,
            aside.name,
        )
    return None


def save_checkpoint(
    model: PreTrainedModel, tokenizer, directory: Path, state_dict: dict | None = None
) -> Path:
    """Writes a Hugging Face checkpoint that vLLM loads: LoRA merged, safetensors, tokenizer.

    `state_dict` replaces the model's own weights (the full weights gathered from FSDP shards).
    Written with `atomic_directory`, so `directory` is never half written.
    """
    if hasattr(model, "merge_and_unload"):  # a peft model
        model = model.merge_and_unload()
    with atomic_directory(directory) as partial:
        model.save_pretrained(str(partial), state_dict=state_dict)
        # A vision-language model's processor writes its tokenizer and image settings.
        tokenizer.save_pretrained(str(partial))
        fix_expert_layout(model, partial)
    return directory


def with_weights(peft_model, state_dict: dict[str, torch.Tensor]):
    """A copy of `peft_model` (LoRA on a sharded base) holding `state_dict`, its full weights
    gathered from the FSDP shards, so that peft can merge the adapters for the export.

    The copy is built on the meta device and takes the gathered tensors as its parameters
    (`assign`), so no second copy of the weights is made.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = peft_model.get_base_model()
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(base.config, dtype=base.dtype)
    copy = get_peft_model(skeleton, peft_model.peft_config["default"])
    copy.load_state_dict(state_dict, strict=True, assign=True)
    return copy


class NonFiniteGuard(TrainerCallback):
    """Skips an optimiser step whose gradients are not finite; stops after `limit` in a row.

    Called between gradient clipping and the optimiser step: a non-finite gradient (a NaN or
    infinite loss gives one) is dropped (`grad = None`), so the optimiser leaves those
    parameters and their moments unchanged; the learning-rate schedule moves on. The count of
    skipped steps is logged as `train/skipped_nonfinite`. After `limit` consecutive skips the
    trainer writes a checkpoint and the run stops with `NonFiniteError`.
    """

    def __init__(self, run: Run, limit: int) -> None:
        self.run, self.limit = run, limit
        self.skipped = 0
        self.in_a_row = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # The local shards: under FSDP each rank holds part of every gradient.
        grads = [getattr(p.grad, "_local_tensor", p.grad) for p in model.parameters()]
        finite = all(bool(g.isfinite().all()) for g in grads if g is not None)
        if bool(sum_over_ranks(torch.tensor([float(not finite)])).item() == 0):
            self.in_a_row = 0
            return
        for parameter in model.parameters():
            parameter.grad = None
        self.skipped += 1
        self.in_a_row += 1
        step = state.global_step + 1
        log.warning(
            "step %d skipped: non-finite gradients (%d in a row, %d of %d allowed)",
            step,
            self.in_a_row,
            self.in_a_row,
            self.limit,
        )
        if self.run is not None:
            self.run.log_metrics(step, {"train/skipped_nonfinite": float(self.skipped)})
        if self.in_a_row >= self.limit:
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"{self.in_a_row} consecutive steps had non-finite gradients (up to step "
                f"{state.global_step}); the run stopped with a checkpoint in {args.output_dir}. "
                "Lower train.learning_rate or check the data, then run the same command again "
                "to resume, or raise train.max_nonfinite_steps."
            )


class RunLogger(TrainerCallback):
    """Sends the trainer's logs to the run (metrics.jsonl, TensorBoard) with MoE expert load.

    At the end of training the per-expert load of the whole run is written to
    `expert_load.json` and drawn as a layer x expert heat map, `expert_load.png`. On several
    ranks every rank counts its own tokens and rank 0, the one with a `run`, writes the sums.
    """

    def __init__(self, run: Run | None, model: torch.nn.Module, prefix: str = "train") -> None:
        self.run, self.prefix = run, prefix
        self.load = ExpertLoad(model) if routers(model) else None
        self.total_le = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = {
            f"{self.prefix}/{key}": float(value)
            for key, value in (logs or {}).items()
            if isinstance(value, int | float) and math.isfinite(value)
        }
        if self.load is not None:
            metrics.update(load_summary(self._accumulate()))
        if metrics and self.run is not None:
            self.run.log_metrics(state.global_step, metrics)

    def _accumulate(self) -> torch.Tensor:
        """Adds the counts since the last call (of every rank) to the total; returns them."""
        counts = sum_over_ranks(self.load.counts_le)
        self.total_le = counts if self.total_le is None else self.total_le + counts
        self.load.reset()
        return counts

    def on_train_end(self, args, state, control, **kwargs):
        if self.load is None:
            return
        self._accumulate()
        self.load.detach()
        if self.run is None:
            return
        shares_le = shares(self.total_le)
        table = {
            name: row.tolist() for name, row in zip(self.load.layer_names, shares_le, strict=True)
        }
        write_json_atomic(self.run.dir / "expert_load.json", {"share_per_expert": table})
        _heatmap(self.run.dir / "expert_load.png", shares_le, self.load.layer_names)


class ProgressLine(ProgressCallback):
    """The trainer's progress bar, named after the run, with the last logged loss and learning
    rate beside it instead of a printed dict at every log (the metrics are in the run)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(self.name)

    def on_log(self, args, state, control, logs=None, **kwargs):
        shown = {
            key: f"{logs[key]:.4g}"
            for key in ("loss", "learning_rate")
            if isinstance((logs or {}).get(key), int | float)
        }
        if self.training_bar is not None and shown:
            self.training_bar.set_postfix(shown)


class _VisionRateOptimizer:
    """An optimiser factory for transformers' Trainer (its `optimizer_cls_and_kwargs`): the
    optimiser the trainer's arguments choose, over `align.vision.parameter_groups`."""

    def __call__(self, model, *, optimizer, vision_learning_rate, decay, weight_decay):
        optimizer_cls, options = optimizer
        groups = parameter_groups(
            model.named_parameters(), vision_learning_rate, set(decay(model)), weight_decay
        )
        return optimizer_cls(groups, **options)


def watch(trainer, run: Run | None, settings: TrainSettings, name: str) -> None:
    """Adds what every training stage's trainer needs beyond its arguments: the vision tower's
    own learning rate (`vision_learning_rate`), the run's metrics and expert load
    (`RunLogger`), the non-finite step guard, and one progress line named `name` (the
    trainer's own bar and dicts with `--verbose`)."""
    if settings.vision_learning_rate is not None:
        trainer.optimizer_cls_and_kwargs = (
            _VisionRateOptimizer,
            {
                "optimizer": trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model),
                "vision_learning_rate": settings.vision_learning_rate,
                "decay": trainer.get_decay_parameter_names,
                "weight_decay": trainer.args.weight_decay,
            },
        )
    trainer.add_callback(RunLogger(run, trainer.model))
    trainer.add_callback(NonFiniteGuard(run, settings.max_nonfinite_steps))
    if not verbose():
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(ProgressLine(name))


def _heatmap(path: Path, shares_le: torch.Tensor, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, experts = shares_le.shape
    fig, ax = plt.subplots(figsize=(1.5 + 0.5 * experts, 1.2 + 0.4 * layers))
    image = ax.imshow(shares_le.numpy() * experts, cmap="coolwarm", vmin=0, vmax=2)
    ax.set_xlabel("expert")
    ax.set_yticks(range(layers), [n.split(".")[-3] if n.count(".") >= 2 else n for n in names])
    ax.set_ylabel("MoE layer")
    ax.set_title("routed-token share x experts (1 = uniform)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finish(trainer, train_output, tokenizer, directory: Path, **facts) -> dict | None:
    """Saves the trained model (see `save_checkpoint`) and marks the run finished.

    On several ranks every rank must call it (FSDP gathers the full weights); rank 0 writes.

    Returns:
        The result: the checkpoint path, steps, mean training loss and `facts`, also written to
        `<directory>/train_result.json`, whose presence means the run needs no more training.
        None on the other ranks.
    """
    model, state_dict = trainer.model, None
    if trainer.is_fsdp_enabled:
        # The full weights, gathered from every rank's shard into rank 0's host memory.
        state_dict = trainer.accelerator.get_state_dict(trainer.model)
        model = trainer.accelerator.unwrap_model(trainer.model)
    if not trainer.accelerator.is_main_process:
        return None
    if state_dict is not None and hasattr(model, "merge_and_unload"):
        model, state_dict = with_weights(model, state_dict), None
    save_checkpoint(model, tokenizer, directory, state_dict)
    result = {
        "model": str(directory),
        "steps": trainer.state.global_step,
        "train_loss": train_output.training_loss,
        **facts,
    }
    write_json_atomic(directory / "train_result.json", result)
    return result


def finished_result(directory: Path) -> dict | None:
    """The result of a finished training run whose checkpoint is `directory`, if any."""
    path = directory / "train_result.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def refuse_changed_rerun(run_dir: Path, config) -> None:
    """Refuses to run again, under other settings, a training run that finished in `run_dir`.

    A finished run's model is reused as it is when its command runs again; with other
    settings that would report a model the settings did not train, and rewrite config.yaml so
    it no longer describes `model/`. Call before anything is written.

    Raises:
        ConfigError: naming the run directory and the keys that differ.
    """
    if finished_result(run_dir / "model") is None:
        return
    try:
        before = parse_yaml(decode_text(read_input_file(run_dir / "config.yaml")))
    except (UnreadableFile, yaml.YAMLError):
        before = None
    changed = (
        changed_settings(before, config) if isinstance(before, dict) else ["config.yaml unreadable"]
    )
    if not changed:
        return
    raise ConfigError(
        f"run {run_dir} finished earlier with other settings ({', '.join(changed)}); its model "
        "would be reused as it is. Choose another name, or delete the directory to train again"
    )
