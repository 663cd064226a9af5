"""Stage `distill`: a teacher's soft targets mixed with hard labels, trained with TRL's SFTTrainer.

The loss is `align.losses.distill.distillation_loss` (recipe section 4):

    L = mean over completion tokens of [a_t T^2 D(p_teacher^T || p_student^T) + (1 - a_t) CE_t],
    a_t = alpha(step) * w_t

with alpha following a schedule over the optimiser steps and w_t an optional per-token weight
(teacher confidence or entropy). The data are prompt/completion rows (the `sft` schema); the loss
covers the completion tokens only.

Teacher logits come from one of two places (`teacher.mode`; `align.distill.teachers`):
    online   the teacher runs forward on every batch, in eval mode under no_grad;
    offline  a precompute step runs the teacher once over the (deduplicated) training rows and
             writes its top-k log-probabilities per completion position to a cache directory
             (`TopKCache`); training then reads them back as a sparse teacher. The teacher runs
             as a transformers forward in this process (`teacher.cache_builder: transformers`,
             the default) or in a vLLM engine (`vllm`, its prompt logprobs; `teacher.engine`
             sets dtype and tensor parallelism, so a teacher vLLM can serve on several GPUs can
             be distilled). A cache whose manifest (teacher, k, tokenizer, rows) does not match
             the run is refused, not silently reused.
With `on_policy.ratio` > 0 a share of the steps trains on completions the student samples itself
(`align.distill.sampler.StudentSampler`).

Steps: (1) check the inputs before anything is written: teacher and student share a tokenizer
and a vocabulary size, the data files are valid; (2) fit the data to the token budget; (3) build
the trainer (`align.distill.trainer.DistillTrainer`: SFTTrainer with `compute_loss` replaced)
and, offline, build or reuse the top-k cache; (4) train, resuming from the newest checkpoint of
an interrupted run; (5) save a Hugging Face checkpoint that vLLM loads; (6) held-out student CE
and teacher-student KL on gold completions (`heldout_sft`), and greedy accuracy / pass@k through
`align eval` (`heldout`).

Output under runs/<name>/: `model/` (with `train_result.json`), `checkpoints/`, `teacher_cache/`
(offline, unless `teacher.cache_dir` puts it elsewhere), `eval/`, `expert_load.json`/`.png`,
`metrics.jsonl` (per step: loss, soft_loss, hard_loss, alpha, effective_alpha, teacher_kl),
`tb/`, `log.txt`, `config.yaml`, `result.json`; `ranks/` (the rows and job the ranks read) with
`placement.processes` > 1.

Tensor legend: b batch, t position, v vocabulary, n completion tokens of the batch.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

from align import engine, launch
from align.config import ConfigError, check
from align.data import load_dataset_file
from align.distill.sampler import StudentSampler
from align.distill.teachers import (
    OnlineTeacher,
    TopKCache,
    cache_manifest,
    engine_topk,
    sequence_key,
    transformers_topk,
    write_topk_cache,
)
from align.distill.trainer import DistillTrainer
from align.launch import TrainPlacement, sum_over_ranks
from align.losses.distill import IGNORE_INDEX, DistillLossSettings
from align.modeling import check_checkpoint, is_vision_language, load_model, read_config
from align.runs import Run, RunSettings
from align.settings import EngineSettings
from align.training import (
    LoraSettings,
    TrainSettings,
    finish,
    fit_budget,
    frozen_dtype,
    lora_config,
    model_dtype,
    refuse_changed_rerun,
    token_count,
    trainer_arguments,
    watch,
)
from align.vision import image_inputs, training_rows, vision_training
from pipelines import evaluate, frame

log = logging.getLogger(__name__)


@dataclass
class TeacherSettings:
    """Where the teacher's logits come from."""

    # Teacher checkpoint directory (Hugging Face format, safetensors); it must use the student's
    # tokenizer.
    model: str
    # online: teacher forward pass on every batch. offline: top-k logits precomputed once and
    # read back from `cache_dir`.
    mode: Literal["online", "offline"] = "online"
    # offline: teacher entries kept per completion position (the truncated teacher is
    # softmax(top-k logits); see align/losses/distill.py). At most the vocabulary size.
    top_k: int = 32
    # offline: what runs the teacher to build the cache. transformers: a forward pass in the
    # training process (the teacher must fit beside the student; on CPU it built a 75 M
    # teacher's cache 1.7x faster than vLLM with half the memory, docs/benchmarks.md section 3);
    # vllm: a vLLM engine's prompt logprobs (any teacher vLLM serves, sharded over GPUs by
    # `engine.tensor_parallel_size`: for teachers too large to sit beside the student).
    cache_builder: Literal["vllm", "transformers"] = "transformers"
    # offline, cache_builder vllm: the engine. max_model_len and max_logprobs are raised to
    # train.max_length + 1 and top_k when lower.
    engine: EngineSettings = field(default_factory=EngineSettings)
    # offline: cache directory; null puts it in runs/<name>/teacher_cache. Runs with the same
    # teacher, student tokenizer, data, budget, seed and max_length can share one.
    cache_dir: str | None = None
    # Rows per teacher forward pass (per engine call with vllm) when precomputing the cache.
    batch_size: int = 64

    def uses_engine(self) -> bool:
        """Whether `engine` starts: the offline cache built with vLLM."""
        return self.mode == "offline" and self.cache_builder == "vllm"

    def validate(self) -> None:
        check(self.top_k >= 1, "top_k", f"must be >= 1 (got {self.top_k})")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1 (got {self.batch_size})")
        check(
            self.mode == "offline" or self.cache_dir is None,
            "cache_dir",
            "is only used with mode 'offline'",
        )


@dataclass
class OnPolicySettings:
    """GKD-style on-policy distillation: some batches train on completions the student samples.

    On such a batch the dataset completions are replaced by the student's own samples (vLLM,
    from the batch's prompts), the online teacher scores them, and the loss is the divergence
    alone (alpha = 1: a sampled completion has no gold label to take a CE on).
    """

    # Share of optimiser steps that are on-policy, spread evenly: step s is on-policy when
    # floor((s + 1) * ratio) > floor(s * ratio). 0 turns it off; 1 makes every step on-policy.
    ratio: float = 0.0
    # Optimiser steps between exports of the student's weights to the sampling engine (the
    # first on-policy step always exports).
    refresh_every: int = 10
    # Sampling temperature of the student's completions.
    temperature: float = 1.0
    # Longest sampled completion in tokens.
    max_new_tokens: int = 32
    # Sampling seed; step s samples with seed + s, so a resumed run samples the same.
    seed: int = 0
    # vLLM engine settings.
    engine: EngineSettings = field(default_factory=EngineSettings)

    def uses_engine(self) -> bool:
        """Whether `engine` starts: on-policy batches sample with vLLM."""
        return self.ratio > 0

    def validate(self) -> None:
        check(0.0 <= self.ratio <= 1.0, "ratio", f"must be in [0, 1] (got {self.ratio})")
        check(self.refresh_every >= 1, "refresh_every", f"must be >= 1 ({self.refresh_every})")
        check(self.temperature > 0, "temperature", f"must be > 0 (got {self.temperature})")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1 ({self.max_new_tokens})")


@dataclass(kw_only=True)
class Config(RunSettings):
    """Settings of `align distill`."""

    name: str = "distill"

    # Student checkpoint to train (Hugging Face format, safetensors).
    student: str
    # Training rows in the sft schema (prompt/completion): JSONL, Parquet or a `datasets`
    # directory. The loss covers the completion tokens only.
    data: str
    # The teacher and where its logits come from.
    teacher: TeacherSettings
    # Held-out rows (prompt, answer) for greedy accuracy and pass@k; null skips them.
    heldout: str | None = None
    # Held-out prompt/completion rows for the student's CE and KL to the teacher on the gold
    # completions, before and after training; null skips them.
    heldout_sft: str | None = None
    # The loss: divergence, temperature, per-token weighting and the alpha schedule.
    loss: DistillLossSettings = field(default_factory=DistillLossSettings)
    # Optimisation (batch_size counts rows).
    train: TrainSettings = field(default_factory=TrainSettings)
    # LoRA on the student instead of full fine-tuning.
    lora: LoraSettings = field(default_factory=LoraSettings)
    # On-policy batches (student-sampled completions); off unless on_policy.ratio > 0.
    on_policy: OnPolicySettings = field(default_factory=OnPolicySettings)
    # Held-out evaluation after training.
    eval: evaluate.EvalSettings = field(default_factory=evaluate.EvalSettings)
    # Bad dataset rows: "raise" stops with the file, row and field; "skip" drops and counts them.
    on_error: Literal["raise", "skip"] = "raise"
    # Processes the training runs on (align/launch.py).
    placement: TrainPlacement = field(default_factory=TrainPlacement)

    def validate(self) -> None:
        super().validate()
        if self.on_policy.ratio == 0.0:
            return
        check(
            self.placement.processes == 1,
            "on_policy.ratio",
            "on-policy batches run on one process (each rank would start its own vLLM engine); "
            "set placement.processes 1 or on_policy.ratio 0",
        )
        check(
            self.teacher.mode == "online",
            "on_policy.ratio",
            "on-policy batches need teacher.mode 'online' (a cache cannot hold the teacher's "
            "logits for completions sampled during training)",
        )
        check(
            self.loss.weighting != "confidence",
            "on_policy.ratio",
            "weighting 'confidence' reads the gold token, which a sampled completion lacks",
        )
        check(
            not self.lora.enabled,
            "on_policy.ratio",
            "on-policy sampling exports full weights to vLLM; LoRA adapters are not exported",
        )


def run(config: Config, callbacks: list | None = None, llm=None) -> dict:
    """Distils `config.teacher.model` into `config.student`; extra TrainerCallbacks may be given,
    and an engine already serving the teacher (`llm`, with max_logprobs >= teacher.top_k) that
    builds the offline cache instead of one started and dropped here (its caller keeps it).

    Raises:
        ConfigError: a checkpoint is missing, teacher and student tokenizers or vocabulary sizes
            differ, `teacher.top_k` exceeds the vocabulary (all before anything is written), or
            an offline cache does not match the run.
        DataError: a bad row in `data`, `heldout_sft` or `heldout` (before anything is written).
    """
    # 1. The inputs, checked before anything is written: the checkpoints share a tokenizer,
    # the data files are readable and valid.
    vision = is_vision_language(check_checkpoint(config.student, "student", vision=True))
    teacher_config = check_checkpoint(config.teacher.model, "teacher.model", vision=True)
    vocab = check_same_tokenizer(config.student, config.teacher.model)
    if config.teacher.mode == "offline" and config.teacher.top_k > vocab:
        raise ConfigError(
            f"key 'teacher.top_k': {config.teacher.top_k} exceeds the vocabulary size {vocab}"
        )
    if vision:
        check_image_distillation(config, is_vision_language(teacher_config))
    images = {"images": vision, "max_images": config.eval.engine.max_images_per_prompt}
    dataset, data_report = load_dataset_file(config.data, "sft", config.on_error, **images)
    if config.heldout_sft is not None:
        load_dataset_file(config.heldout_sft, "sft", config.on_error, **images)
    evaluate.check_heldout(config.heldout, config.eval, vision)
    out = Path(config.runs_dir) / config.name
    refuse_changed_rerun(out, config)

    def prepare(run_dir: Run):
        # 2. Data, fitted to the token budget.
        tokenizer = AutoTokenizer.from_pretrained(config.student)
        counts = [token_count(tokenizer, row["prompt"], row["completion"]) for row in dataset]
        train = training_rows(dataset, ["prompt", "completion"], config.data, vision)
        rows, tokens = fit_budget(train, counts, config.train, "rows")
        return rows, {"data": data_report, "budget_tokens": tokens, "teacher": config.teacher.model}

    # 3-6. Training here or on config.placement's processes (see `fit`), resuming an interrupted
    # run; then held-out evaluation (pipelines/frame.py). An engine of this process cannot reach
    # the ranks; there rank 0 starts one.
    llm = llm if config.placement.processes == 1 else None
    return frame.train_and_evaluate(config, prepare, fit, callbacks, llm=llm)


def fit(
    config: Config,
    dataset,
    run_dir: Run | None,
    resume: str | None,
    callbacks: list | None,
    facts: dict,
    llm=None,
) -> dict | None:
    """Steps 3-5 of `run`, on each rank: the trainer and its teacher, training from `resume`,
    the held-out CE and KL before and after, and the checkpoint vLLM loads (rank 0, with `facts`
    in its result). `llm` builds the offline cache as in `run` (in the stage's process only)."""
    out = Path(config.runs_dir) / config.name
    tokenizer = AutoTokenizer.from_pretrained(config.student)
    model = load_model(config.student, model_dtype(config.train, config.lora))
    processor = vision_training(model, config.student, config.train.train_vision)
    processing = processor or tokenizer
    heldout_rows = None
    if config.heldout_sft is not None:
        vision = processor is not None
        heldout_rows, _ = load_dataset_file(
            config.heldout_sft, "sft", config.on_error, images=vision
        )
        heldout_rows = training_rows(
            heldout_rows, ["prompt", "completion"], config.heldout_sft, vision
        )
    # The trainer; its teacher is set once the tokenised rows exist (offline cache).
    args = SFTConfig(
        **trainer_arguments(config.train, out / "checkpoints", model, config.placement),
        completion_only_loss=True,
        per_device_eval_batch_size=config.train.batch_size,
    )
    trainer = DistillTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=heldout_rows,
        processing_class=processing,
        peft_config=lora_config(config.lora),
        callbacks=callbacks,
        teacher=None,
        loss_config=config.loss,
    )
    launch.check_joined(trainer)
    watch(trainer, run_dir, config.train, config.name)
    online = None
    if config.teacher.mode == "online" or heldout_rows is not None:
        online = OnlineTeacher(
            load_model(config.teacher.model, frozen_dtype(config.train.precision))
        )
    if config.teacher.mode == "online":
        trainer.teacher = online
    else:
        # Rank 0 builds the cache (or finds it); the other ranks then open it.
        with trainer.accelerator.main_process_first():
            trainer.teacher = offline_teacher(config, trainer, tokenizer, out, llm)
    if config.on_policy.ratio > 0:
        on_policy = config.on_policy
        trainer.sampler = StudentSampler(
            engine.start_engine(config.student, on_policy.engine),
            out / "policy-export",
            tokenizer.pad_token_id,
            ratio=on_policy.ratio,
            refresh_every=on_policy.refresh_every,
            temperature=on_policy.temperature,
            max_new_tokens=on_policy.max_new_tokens,
            seed=on_policy.seed,
        )

    # Training; held-out CE and KL on the gold completions before (unless resumed) and after.
    heldout_before = None
    if heldout_rows is not None and resume is None:
        heldout_before = heldout_scores(trainer.model, online, trainer.get_eval_dataloader())
    train_output = trainer.train(resume_from_checkpoint=resume)
    if heldout_rows is not None:
        after = heldout_scores(trainer.model, online, trainer.get_eval_dataloader())
        facts = {**facts, "heldout_before": heldout_before, "heldout_after": after}
        log.info("held-out gold completions: %s -> %s", heldout_before, after)
    return finish(trainer, train_output, processing, out / "model", **facts)


def check_same_tokenizer(student: str, teacher: str) -> int:
    """Refuses a teacher whose tokenizer or output vocabulary differs from the student's.

    Distillation compares the two next-token distributions id by id, so the ids must mean the
    same tokens and both models must produce logits over the same number of ids.

    Returns:
        The models' shared `vocab_size`.

    Raises:
        ConfigError: naming the key `teacher.model`, both paths and the first difference found.
    """
    key = "key 'teacher.model'"
    tokenizers = {path: AutoTokenizer.from_pretrained(path) for path in (student, teacher)}
    vocabs = {path: tok.get_vocab() for path, tok in tokenizers.items()}
    s_vocab, t_vocab = vocabs[student], vocabs[teacher]
    if s_vocab != t_vocab:
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        moved = sorted(k for k in set(s_vocab) & set(t_vocab) if s_vocab[k] != t_vocab[k])[:5]
        raise ConfigError(
            f"{key}: teacher {teacher} and student {student} have different tokenizers: vocab "
            f"sizes {len(t_vocab)} and {len(s_vocab)}; tokens only in the student's: {only_s}, "
            f"only in the teacher's: {only_t}, with different ids: {moved}. Distillation needs "
            "a shared tokenizer"
        )
    s_special = tokenizers[student].all_special_tokens
    t_special = tokenizers[teacher].all_special_tokens
    if s_special != t_special:
        raise ConfigError(
            f"{key}: teacher {teacher} and student {student} have different special tokens: "
            f"{t_special} vs {s_special}. Distillation needs a shared tokenizer"
        )
    sizes = {path: read_config(path).get_text_config().vocab_size for path in (student, teacher)}
    for path, size in sizes.items():
        if size < len(s_vocab):
            raise ConfigError(
                f"{key}: model {path} has vocab_size {size} in config.json but its tokenizer "
                f"has {len(s_vocab)} tokens: the model cannot score every token"
            )
    if sizes[student] != sizes[teacher]:
        raise ConfigError(
            f"{key}: teacher {teacher} has vocab_size {sizes[teacher]} and student {student} "
            f"has {sizes[student]}: their logits must cover the same ids"
        )
    return sizes[student]


def offline_teacher(
    config: Config, trainer: SFTTrainer, tokenizer, out: Path, llm=None
) -> TopKCache:
    """The top-k cache for `trainer`'s training rows: reused when it matches, else built (with
    `llm` when given and the builder is vllm)."""
    settings = config.teacher
    directory = Path(settings.cache_dir) if settings.cache_dir else out / "teacher_cache"
    # One entry per distinct training row (the token budget repeats rows). The collator only
    # pads, so these keys are the ones the cache stores for the collated rows.
    dataset = trainer.train_dataset
    unique, seen = [], set()
    for index, ids in enumerate(dataset["input_ids"]):
        key = sequence_key(torch.tensor(ids))
        if key not in seen:
            seen.add(key)
            unique.append(index)
    expected = cache_manifest(settings.model, settings.top_k, tokenizer, config.train.max_length)
    if not (directory / "manifest.json").exists():
        log.info(
            "precomputing the teacher's top-%d logits for %d distinct rows into %s",
            settings.top_k,
            len(unique),
            directory,
        )
        step = settings.batch_size
        batches = (
            trainer.data_collator([dataset[i] for i in unique[start : start + step]])
            for start in range(0, len(unique), step)
        )
        manifest = {**expected, "rows": len(unique), "built_with": settings.cache_builder}
        if settings.cache_builder == "transformers":
            rows = transformers_topk(load_model(settings.model), batches, settings.top_k)
            write_topk_cache(rows, directory, manifest)
        elif llm is not None:
            write_topk_cache(engine_topk(llm, batches, settings.top_k), directory, manifest)
        else:
            engine_config = replace(
                settings.engine,
                max_model_len=max(settings.engine.max_model_len, config.train.max_length + 1),
                max_logprobs=max(settings.engine.max_logprobs, settings.top_k),
            )
            llm = engine.start_engine(settings.model, engine_config)
            write_topk_cache(engine_topk(llm, batches, settings.top_k), directory, manifest)
            # The engine goes before training starts, so its memory is free for the trainer.
            del llm
            gc.collect()
    else:
        log.info("reusing the teacher cache in %s", directory)
    cache = TopKCache.open(directory, expected)
    cache.check_covers(seen)
    return cache


@torch.no_grad()
def check_image_distillation(config: Config, teacher_reads_images: bool) -> None:
    """What distillation of a vision-language student takes so far: a teacher that reads the
    same images, run online (no offline cache or on-policy batches of image rows yet).

    Raises:
        ConfigError: naming the key that asks for more.
    """
    if not teacher_reads_images:
        raise ConfigError(
            f"key 'teacher.model': {config.teacher.model} does not read images but the student "
            f"{config.student} does: distil between two vision-language models"
        )
    if config.teacher.mode != "online":
        raise ConfigError(
            "key 'teacher.mode': a vision-language student distils from an online teacher "
            "(teacher.mode: online); a top-k cache of image rows is not built yet"
        )
    if config.on_policy.ratio > 0:
        raise ConfigError(
            "key 'on_policy.ratio': on-policy batches of image rows are not built yet; set it to 0"
        )


def heldout_scores(student, teacher: OnlineTeacher, loader) -> dict:
    """Student CE and forward KL(teacher || student) at T = 1 per gold completion token."""
    was_training = student.training
    student.eval()
    ce_sum, kl_sum, tokens = 0.0, 0.0, 0
    for batch in loader:
        labels_bt = batch["labels"][:, 1:]
        images = image_inputs(batch)
        student_logits_btv = student(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            use_cache=False,
            **images,
        ).logits[:, :-1]
        teacher_logits = teacher(batch["input_ids"], batch["attention_mask"], labels_bt, **images)
        target_bt = labels_bt != IGNORE_INDEX
        logp_s_nv = student_logits_btv[target_bt].float().log_softmax(-1)
        logp_t_nv = teacher_logits.logits_btv[target_bt].float().log_softmax(-1)
        ce_sum += -logp_s_nv.gather(-1, labels_bt[target_bt][:, None]).sum().item()
        kl_sum += (logp_t_nv.exp() * (logp_t_nv - logp_s_nv)).sum().item()
        tokens += int(target_bt.sum())
    student.train(was_training)
    # On several ranks the loader gives each rank its share of the rows.
    ce_sum, kl_sum, tokens = sum_over_ranks(torch.tensor([ce_sum, kl_sum, tokens])).tolist()
    tokens = int(tokens)
    return {"ce": ce_sum / max(tokens, 1), "teacher_kl": kl_sum / max(tokens, 1), "tokens": tokens}
