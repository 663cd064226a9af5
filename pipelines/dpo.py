"""Stage `dpo`: lightweight preference optimisation with TRL's DPOTrainer.

Pairs come from a preference dataset (`data`) or from the model's own scored rollouts
(`pairs`): n completions per prompt sampled with vLLM, scored by the configured rewards, the best
paired against the worst when their reward margin is large enough. The second way lets the
pipeline run DPO after RL on the same task.

Losses (`loss.kind`): sigmoid DPO, IPO, length-normalised DPO, and SimPO (no reference model).
Llama 3's additions: an NLL term on the chosen answer (`loss.nll_weight`) and formatting tokens
taken out of the loss (`loss.mask_format_tokens`).

Steps: (1) check the inputs before anything is written (the checkpoint, the held-out rows, the
preference rows or prompts); (2) build or load the pairs; (3) fit them to the token budget;
(4) train (resuming from the newest checkpoint of an interrupted run); (5) save a checkpoint
vLLM loads; (6) evaluate.

Output under runs/<name>/: `pairs/` and `pairs.json` (when built from rollouts), `model/`,
`checkpoints/`, `eval/`, `expert_load.json`/`.png`, `metrics.jsonl`, `tb/`, `log.txt`; `ranks/` (the
pairs and job the ranks read) with `placement.processes` > 1.
"""

from __future__ import annotations

import gc
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from datasets import Dataset, load_from_disk
from transformers import AutoTokenizer, ProcessorMixin
from trl import DPOConfig, DPOTrainer

from align import engine, launch
from align.config import ConfigError, check
from align.data import DataError, load_dataset_file
from align.launch import TrainPlacement
from align.modeling import check_checkpoint, is_vision_language, load_model
from align.preferences import (
    FormatMaskingCollator,
    VisionFormatMaskingCollator,
    build_pairs,
    format_token_ids,
)
from align.rewarding import (
    RewardSpec,
    build_reward_set,
    check_option_columns,
    check_reward_checkpoints,
)
from align.runs import Run, RunSettings
from align.settings import EngineSettings, GenerationSettings
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
from align.vision import IMAGES_COLUMN, rows_images, training_rows, vision_training
from pipelines import evaluate, frame

log = logging.getLogger(__name__)

# loss.kind -> TRL loss_type. SimPO is length-normalised DPO against a reference that only
# contributes the target margin gamma (see SimPOTrainer).
LOSS_TYPES = {
    "sigmoid": "sigmoid",
    "ipo": "ipo",
    "length_normalized": "sigmoid_norm",
    "simpo": "sigmoid_norm",
}


@dataclass(kw_only=True)
class PairSettings(GenerationSettings):
    """Preference pairs from the model's own rollouts (`samples` completions per prompt,
    `align.settings.GenerationSettings`), ranked by rewards."""

    # Prompt rows (prompt, plus what the rewards read, e.g. answer): JSONL, Parquet or a
    # `datasets` directory.
    prompts: str
    # Rewards that rank the completions (README, "Rewards").
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="answer_match")])
    # Keep a pair when best - worst reward >= this.
    min_margin: float = 0.5
    # Build pairs from at most this many prompts, a seeded draw from the rows (kept in file
    # order); null: from every prompt. Keeps DPO light when the prompt set is large.
    max_prompts: int | None = None
    # Sampling seed.
    seed: int = 0
    # vLLM engine settings.
    engine: EngineSettings = field(default_factory=EngineSettings)

    def validate(self) -> None:
        super().validate()
        check(self.samples >= 2, "samples", f"pairs need >= 2 samples (got {self.samples})")
        check(self.min_margin > 0, "min_margin", f"must be > 0 (got {self.min_margin})")
        check(
            self.max_prompts is None or self.max_prompts >= 1,
            "max_prompts",
            f"must be >= 1 or null (got {self.max_prompts})",
        )


@dataclass
class LossSettings:
    """The preference loss."""

    # sigmoid: DPO. ipo: IPO. length_normalized: DPO on per-token mean log-ratios. simpo: SimPO,
    # per-token mean log-probabilities with a target margin and no reference model.
    kind: Literal["sigmoid", "ipo", "length_normalized", "simpo"] = "sigmoid"
    # beta of DPO and SimPO; for IPO the regularisation tau (the target margin is 1/(2 tau)).
    beta: float = 0.1
    # SimPO's target reward margin gamma (simpo only).
    simpo_gamma: float = 0.5
    # Weight of the NLL term on the chosen answer (Llama 3 used 0.2); 0 turns it off.
    nll_weight: float = 0.2
    # Leave formatting tokens out of the loss (Llama 3): the tokenizer's special tokens (chat
    # headers, end of turn) plus `extra_format_tokens`.
    mask_format_tokens: bool = True
    # More single tokens to leave out, as strings.
    extra_format_tokens: list[str] = field(default_factory=list)

    def validate(self) -> None:
        check(self.beta > 0, "beta", f"must be > 0 (got {self.beta})")
        check(self.nll_weight >= 0, "nll_weight", f"must be >= 0 (got {self.nll_weight})")
        check(self.simpo_gamma >= 0, "simpo_gamma", f"must be >= 0 (got {self.simpo_gamma})")


@dataclass(kw_only=True)
class Config(RunSettings):
    """Settings of `align dpo`."""

    name: str = "dpo"

    # Checkpoint to train (and, except for SimPO, the frozen reference).
    model: str
    # Preference rows (prompt, chosen, rejected); or set `pairs` instead.
    data: str | None = None
    # Build the pairs from the model's rollouts instead of reading `data`.
    pairs: PairSettings | None = None
    # Held-out rows (prompt, answer) to evaluate the result on; null skips evaluation.
    heldout: str | None = None
    # The loss.
    loss: LossSettings = field(default_factory=LossSettings)
    # Optimisation (batch_size counts pairs).
    train: TrainSettings = field(
        default_factory=lambda: TrainSettings(learning_rate=3e-5, batch_size=16, epochs=2.0)
    )
    # LoRA instead of full fine-tuning (the reference is then the base without adapters).
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
            (self.data is None) != (self.pairs is None),
            "data",
            "set exactly one of 'data' (a preference dataset) and 'pairs' (build from rollouts)",
        )


class SimPOTrainer(DPOTrainer):
    """DPOTrainer computing SimPO: -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma).

    TRL's length-normalised loss ("sigmoid_norm") is -log sigmoid(beta * [(log pi(y_w) -
    ref_w)/|y_w| - (log pi(y_l) - ref_l)/|y_l|]). With the reference log-probabilities set to
    ref_w = (gamma/beta) |y_w| and ref_l = 0 it is exactly SimPO, and no reference model is run or
    kept: this class overrides only the documented `compute_ref_log_probs`, and the stage
    precomputes these values once before training.
    """

    def __init__(self, *args, simpo_gamma: float, **kwargs) -> None:
        self.simpo_gamma = simpo_gamma
        super().__init__(*args, **kwargs)

    def compute_ref_log_probs(self, model, inputs):
        chosen_mask, _ = inputs["completion_mask"].chunk(2, dim=0)
        chosen_lengths = chosen_mask.sum(dim=1).float()
        ref_chosen = (self.simpo_gamma / self.beta) * chosen_lengths
        return ref_chosen, ref_chosen.new_zeros(ref_chosen.shape)


def run(config: Config, callbacks: list | None = None, llm=None) -> dict:
    """Trains `config.model` on preference pairs; extra TrainerCallbacks go in `callbacks`.

    Pairs built from rollouts are sampled by `llm` when given (an engine already serving
    `config.model`, started with `config.pairs.engine`), else by an engine started here.
    """
    out = Path(config.runs_dir) / config.name
    # 1. Inputs, checked before anything is written: the checkpoint, the held-out rows, and the
    # preference rows or the prompts the pairs are built from.
    if config.pairs is None:
        model_config = check_checkpoint(config.model, "model", vision=True)
    else:
        length = config.pairs.engine.max_model_len
        model_config = check_checkpoint(
            config.model, "model", length, "pairs.engine.max_model_len", vision=True
        )
        check_reward_checkpoints(config.pairs.rewards, "pairs.rewards")
    vision = is_vision_language(model_config)
    evaluate.check_heldout(config.heldout, config.eval, vision)
    refuse_changed_rerun(out, config)
    images = {"images": vision, "max_images": config.eval.engine.max_images_per_prompt}
    if config.pairs is not None:
        rows, rows_report = load_dataset_file(config.pairs.prompts, "rl", config.on_error, **images)
        check_option_columns(
            config.pairs.rewards, rows.column_names, "pairs.rewards", config.pairs.prompts
        )
        rows = draw_prompts(rows, config.pairs.max_prompts, config.pairs.seed)
    else:
        rows, rows_report = load_dataset_file(config.data, "dpo", config.on_error, **images)

    def prepare(run_dir: Run):
        tokenizer = AutoTokenizer.from_pretrained(config.model)
        # 2. Pairs: the rows read, or built from the model's rollouts on the prompts (kept for
        # a resumed run).
        if config.pairs is not None:
            dataset, data_report = rollout_pairs(
                config, tokenizer, rows, rows_report, out, run_dir, llm
            )
        else:
            dataset, data_report = rows, rows_report
        # 3. Fitted to the token budget (chosen and rejected sequences both count).
        lengths = [
            (
                token_count(tokenizer, row["prompt"], row["chosen"]),
                token_count(tokenizer, row["prompt"], row["rejected"]),
            )
            for row in dataset
        ]
        source = config.data if config.pairs is None else config.pairs.prompts
        dataset, tokens = fit_budget(
            training_rows(dataset, ["prompt", "chosen", "rejected"], source, vision),
            [chosen + rejected for chosen, rejected in lengths],
            config.train,
            "pairs",
            longest=[max(pair) for pair in lengths],
            note=" (TRL drops pairs whose prompt alone fills it)",
        )
        # An in-memory copy: TRL caches the precomputed reference log-probs next to the
        # dataset's files, keyed without the loss settings (format mask, SimPO margin); an
        # in-memory dataset's cache lives in a per-process temporary directory instead.
        return Dataset.from_list(list(dataset)), {"data": data_report, "budget_tokens": tokens}

    # 4-6. Training here or on config.placement's processes (see `fit`), resuming an interrupted
    # run; then held-out evaluation (pipelines/frame.py).
    return frame.train_and_evaluate(config, prepare, fit, callbacks)


def fit(
    config: Config,
    dataset: Dataset,
    run_dir: Run | None,
    resume: str | None,
    callbacks: list | None,
    facts: dict,
) -> dict | None:
    """Steps 4-5 of `run`, on each rank: trains on the prepared pairs, resuming from `resume`,
    and saves the checkpoint vLLM loads (rank 0, with `facts` in its result)."""
    out = Path(config.runs_dir) / config.name
    model = load_model(config.model, model_dtype(config.train, config.lora))
    processor = vision_training(model, config.model, config.train.train_vision)
    tokenizer = processor or AutoTokenizer.from_pretrained(config.model)
    trainer = build_trainer(config, model, tokenizer, dataset, out)
    launch.check_joined(trainer)
    for callback in callbacks or []:
        trainer.add_callback(callback)
    watch(trainer, run_dir, config.train, config.name)
    train_output = trainer.train(resume_from_checkpoint=resume)
    return finish(trainer, train_output, tokenizer, out / "model", **facts)


def build_trainer(config: Config, model, tokenizer, dataset: Dataset, out: Path) -> DPOTrainer:
    """The DPO (or SimPO) trainer for `config`: loss mapping, format mask, precomputed reference."""
    loss = config.loss
    loss_types, loss_weights = [LOSS_TYPES[loss.kind]], [1.0]
    if loss.nll_weight > 0:
        loss_types.append("sft")
        loss_weights.append(loss.nll_weight)
    vision = IMAGES_COLUMN in dataset.column_names
    args = DPOConfig(
        **trainer_arguments(config.train, out / "checkpoints", model, config.placement),
        beta=loss.beta,
        loss_type=loss_types,
        loss_weights=loss_weights,
        # The reference's log-probabilities are computed once, before training, so no second
        # model sits in memory while training. TRL computes them on the fly for pairs with
        # images (its vision collator reads the images batch by batch).
        precompute_ref_log_probs=not vision,
    )
    text = tokenizer.tokenizer if isinstance(tokenizer, ProcessorMixin) else tokenizer
    format_ids = []
    if loss.mask_format_tokens:
        format_ids = list(text.all_special_ids)
        format_ids += format_token_ids(text, loss.extra_format_tokens)
    trainer_cls, extra = DPOTrainer, {}
    if loss.kind == "simpo":
        trainer_cls, extra = SimPOTrainer, {"simpo_gamma": loss.simpo_gamma}
    return trainer_cls(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=VisionFormatMaskingCollator(
            processor=tokenizer, max_length=config.train.max_length, format_ids=format_ids
        )
        if vision
        else FormatMaskingCollator(
            pad_token_id=text.pad_token_id,
            max_length=config.train.max_length,
            format_ids=format_ids,
        ),
        peft_config=lora_config(config.lora),
        **extra,
    )


def draw_prompts(rows: Dataset, max_prompts: int | None, seed: int) -> Dataset:
    """At most `max_prompts` of `rows`, drawn with `seed` and kept in their order."""
    if max_prompts is None or len(rows) <= max_prompts:
        return rows
    drawn = sorted(random.Random(seed).sample(range(len(rows)), max_prompts))
    log.info("pairs from %d of %d prompts (pairs.max_prompts)", max_prompts, len(rows))
    return rows.select(drawn)


def rollout_pairs(
    config: Config,
    tokenizer,
    prompts: Dataset,
    prompt_report: dict,
    out: Path,
    run_dir: Run,
    llm=None,
) -> tuple[Dataset, dict]:
    """Builds the pairs from `config.model`'s rollouts on `prompts`, or loads an earlier try's."""
    pairs_dir = out / "pairs"
    if pairs_dir.is_dir():
        log.info("using the pairs built earlier in %s", pairs_dir)
        return load_from_disk(str(pairs_dir)), {"pairs_from": str(pairs_dir)}
    settings = config.pairs
    rewards = build_reward_set(settings.rewards)
    llm = llm or engine.start_engine(config.model, settings.engine)
    pairs, stats = build_pairs(
        llm,
        tokenizer,
        list(prompts),
        rewards,
        samples=settings.samples,
        temperature=settings.temperature,
        max_new_tokens=settings.max_new_tokens,
        min_margin=settings.min_margin,
        seed=settings.seed,
        images=rows_images(list(prompts), settings.prompts),
    )
    # The engine goes before training starts, so its memory is free for the trainer.
    del llm
    gc.collect()
    report = {"prompts": prompt_report, **asdict(stats)}
    run_dir.write_json("pairs.json", report)
    if not pairs and stats.unscored > stats.below_margin:
        faults = ", ".join(f"reward/{k}: {n}" for k, n in sorted(rewards.faults.items()))
        raise ConfigError(
            f"key 'pairs.rewards': no prompt gave a pair because the rewards scored too little: "
            f"{stats.unscored} of {stats.prompts} prompts had fewer than two completions scored "
            f"(faults: {faults or 'none counted; every reward was not applicable'}). Fix the "
            "reward; the log has its first warning of each fault"
        )
    if not pairs:
        raise DataError(
            f"no prompt gave a pair with a reward margin >= {settings.min_margin} "
            f"({stats.below_margin} below the margin, {stats.unscored} unscored); lower "
            "pairs.min_margin, sample more (pairs.samples) or raise pairs.temperature",
            file=settings.prompts,
        )
    dataset = Dataset.from_list(pairs)
    dataset.save_to_disk(str(pairs_dir))
    return dataset, report
