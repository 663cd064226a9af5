"""Stage `sft`: lightweight supervised fine-tuning with TRL's SFTTrainer.

Lightweight, as in Llama 4's recipe: the data can first go through the `filter` stage's filters
(score difficulty, drop the easy part) and training can stop at a token budget.

Steps: (1) check the inputs before anything is written: the checkpoint, the held-out rows and
the data (filtered first, if `filters` are given); (2) fit the data to the token budget;
(3) train with SFTTrainer (loss on the completion only, packing, LoRA optional, MoE
load-balancing loss), resuming from the newest checkpoint of an interrupted run; (4) save a
Hugging Face checkpoint that vLLM loads; (5) evaluate it on the held-out rows.

Output under runs/<name>/: `model/` (the checkpoint, with `train_result.json`), `checkpoints/`
(resumable), `filter/` (if filtering), `eval/`, `expert_load.json` and `.png` (routed-token share
per MoE layer and expert), `metrics.jsonl`, `tb/`, `log.txt`, `config.yaml`; `ranks/` (the rows
and job the ranks read) with `placement.processes` > 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

from align import launch
from align.config import check
from align.data import load_dataset_file
from align.launch import TrainPlacement
from align.modeling import check_checkpoint, is_vision_language, load_model
from align.runs import Run, RunSettings
from align.training import (
    LoraSettings,
    TrainSettings,
    finish,
    fit_budget,
    lora_config,
    model_dtype,
    refuse_changed_rerun,
    token_count,
    trainer_arguments,
    watch,
)
from align.vision import training_rows, vision_training
from pipelines import evaluate, frame
from pipelines import filter as filter_stage

log = logging.getLogger(__name__)

# The columns SFTTrainer trains on, per schema; the rest (task, level, ...) are metadata.
TRAIN_COLUMNS = {"sft": ["prompt", "completion"], "chat": ["messages"], "text": ["text"]}


@dataclass(kw_only=True)
class Config(RunSettings):
    """Settings of `align sft`."""

    name: str = "sft"

    # Checkpoint to fine-tune (Hugging Face format, safetensors).
    model: str
    # Training rows: JSONL, Parquet or a `datasets` directory.
    data: str
    # Schema of `data`: auto (from its columns, as TRL detects them), sft (prompt/completion,
    # strings or messages: loss on the completion only), chat (messages: loss on every token of
    # the conversation) or text (text: language modelling, loss on every token).
    schema: Literal["auto", "sft", "chat", "text"] = "auto"
    # Held-out rows (prompt, answer) to evaluate the result on; null skips evaluation.
    heldout: str | None = None
    # Filters applied to `data` before training, as in `align filter` (e.g. difficulty with
    # keep.drop_lowest 0.5 drops the easiest half). Empty: train on all rows.
    filters: list[filter_stage.FilterStep] = field(default_factory=list)
    # Pack several rows into each sequence of train.max_length tokens instead of padding. Off
    # by default: on CPU, packing the embedded tasks' ~40-token rows into 128-token sequences
    # trained 2.6x slower per token than padded batches (sdpa takes a block mask instead of
    # its causal fast path). Worth it for long rows on GPUs with flash attention.
    packing: bool = False
    # Optimisation.
    train: TrainSettings = field(default_factory=TrainSettings)
    # LoRA instead of full fine-tuning.
    lora: LoraSettings = field(default_factory=LoraSettings)
    # Held-out evaluation after training.
    eval: evaluate.EvalSettings = field(default_factory=evaluate.EvalSettings)
    # Bad dataset rows: "raise" stops with the file, row and field; "skip" drops and counts them.
    on_error: Literal["raise", "skip"] = "raise"
    # Processes the training runs on (align/launch.py).
    placement: TrainPlacement = field(default_factory=TrainPlacement)

    def validate(self) -> None:
        super().validate()
        check(
            self.schema in ("auto", "sft") or not self.filters,
            "filters",
            f"filters score prompt/completion rows, not {self.schema} rows; convert the data to "
            "the sft schema first",
        )


def run(config: Config, callbacks: list | None = None) -> dict:
    """Fine-tunes `config.model`; extra TrainerCallbacks may be passed as `callbacks`."""
    out = Path(config.runs_dir) / config.name
    # 1. Inputs, checked before anything is written. With `filters`, the filter stage reads the
    # data (its scores are cached) and the rows it keeps are the training data.
    vision = is_vision_language(check_checkpoint(config.model, "model", vision=True))
    evaluate.check_heldout(config.heldout, config.eval, vision)
    refuse_changed_rerun(out, config)
    data = config.data
    if config.filters:
        filter_stage.run(
            filter_stage.Config(
                data=data,
                name=f"{config.name}/filter",
                runs_dir=config.runs_dir,
                schema="sft",
                filters=config.filters,
                seed=config.train.seed,
                on_error=config.on_error,
            )
        )
        data = str(out / "filter" / "kept")
    # With schema auto the data's columns say which schema it is; filters keep sft rows.
    schema = config.schema
    if schema == "auto":
        schema = "sft" if config.filters else tuple(TRAIN_COLUMNS)
    dataset, data_report = load_dataset_file(
        data,
        schema,
        config.on_error,
        images=vision,
        max_images=config.eval.engine.max_images_per_prompt,
    )
    schema = data_report["schema"]

    def prepare(run_dir: Run):
        # 2. Data, fitted to the token budget (an image counts as its placeholder token).
        tokenizer = AutoTokenizer.from_pretrained(config.model)
        columns = TRAIN_COLUMNS[schema]
        counts = [token_count(tokenizer, *(row[c] for c in columns)) for row in dataset]
        rows, tokens = fit_budget(
            training_rows(dataset, columns, data, vision), counts, config.train, "rows"
        )
        report = {**data_report, "rows_after_filters": len(counts)}
        return rows, {"data": report, "budget_tokens": tokens}

    # 3-5. Training here or on config.placement's processes (see `fit`), resuming an interrupted
    # run; then held-out evaluation (pipelines/frame.py).
    return frame.train_and_evaluate(config, prepare, fit, callbacks, schema=schema)


def fit(
    config: Config,
    dataset,
    run_dir: Run | None,
    resume: str | None,
    callbacks: list | None,
    schema: str,
    facts: dict,
) -> dict | None:
    """Steps 3-4 of `run`, on each rank: trains on the prepared rows with SFTTrainer, resuming
    from `resume`, and saves the checkpoint vLLM loads (rank 0, with `facts` in its result)."""
    out = Path(config.runs_dir) / config.name
    model = load_model(config.model, model_dtype(config.train, config.lora))
    # A vision-language model's processor reads the images and applies the chat template.
    processor = vision_training(model, config.model, config.train.train_vision)
    tokenizer = processor or AutoTokenizer.from_pretrained(config.model)
    args = SFTConfig(
        **trainer_arguments(config.train, out / "checkpoints", model, config.placement),
        packing=config.packing,
        completion_only_loss=True if schema == "sft" else None,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(config.lora),
        callbacks=callbacks,
    )
    launch.check_joined(trainer)
    watch(trainer, run_dir, config.train, config.name)
    train_output = trainer.train(resume_from_checkpoint=resume)
    return finish(trainer, train_output, tokenizer, out / "model", **facts)
