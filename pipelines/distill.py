"""Stage `distill`: a teacher's soft targets mixed with hard labels, trained with TRL's SFTTrainer.

The loss is `align.losses.distill.distillation_loss` (recipe section 4):

    L = mean over completion tokens of [a_t T^2 D(p_teacher^T || p_student^T) + (1 - a_t) CE_t],
    a_t = alpha(step) * w_t

with alpha following a schedule over the optimiser steps and w_t an optional per-token weight
(teacher confidence or entropy). The data are prompt/completion rows (the `sft` schema); the loss
covers the completion tokens only.

Teacher logits come from one of two places (`teacher.mode`):
    online   the teacher runs forward on every batch, in eval mode under no_grad;
    offline  a precompute step runs the teacher once over the (deduplicated) training rows and
             writes its top-k log-probabilities (fp16) and ids (int32) per completion position
             to a cache directory (`TopKCache`); training then reads them back as a sparse
             teacher. The teacher runs as a transformers forward in this process
             (`teacher.cache_builder: transformers`, the default) or in a vLLM engine (`vllm`,
             its prompt logprobs; `teacher.engine` sets dtype and tensor parallelism, so a
             teacher vLLM can serve on several GPUs can be distilled). The cache's manifest
             names the teacher (path and a hash of its files), k, the tokenizer and the rows;
             a cache whose manifest does not match is refused, not silently reused.

Steps: (1) check the inputs before anything is written: teacher and student share a tokenizer
and a vocabulary size, the data files are valid; (2) fit the data to the token budget; (3) build the trainer (SFTTrainer with `compute_loss`
replaced) and, offline, build or reuse the top-k cache; (4) train, resuming from the newest
checkpoint of an interrupted run; (5) save a Hugging Face checkpoint that vLLM loads;
(6) held-out student CE and teacher-student KL on gold completions (`heldout_sft`), and greedy
accuracy / pass@k through `align eval` (`heldout`).

Output under runs/<name>/: `model/` (with `train_result.json`), `checkpoints/`, `teacher_cache/`
(offline, unless `teacher.cache_dir` puts it elsewhere), `eval/`, `expert_load.json`/`.png`,
`metrics.jsonl` (per step: loss, soft_loss, hard_loss, alpha, effective_alpha, teacher_kl),
`tb/`, `log.txt`, `config.yaml`, `result.json`; `ranks/` (the rows and job the ranks read) with
`placement.processes` > 1.

Tensor legend: b batch, t position, v vocabulary, k cached teacher entries per position, n
completion tokens of one row.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
from trl import SFTConfig, SFTTrainer

from align import engine, launch
from align.config import ConfigError, check
from align.data import load_dataset_file
from align.launch import TrainPlacement, sum_over_ranks
from align.losses.distill import (
    IGNORE_INDEX,
    AlphaSchedule,
    DistillLossConfig,
    TeacherLogits,
    distillation_loss,
)
from align.modeling import check_checkpoint, load_model
from align.runs import Run, atomic_directory, write_json_atomic
from align.settings import EngineSettings
from align.training import (
    LoraSettings,
    TrainSettings,
    finish,
    finished_result,
    fit_budget,
    frozen_dtype,
    lora_config,
    model_dtype,
    refuse_changed_rerun,
    resume_point,
    token_count,
    trainer_arguments,
    watch,
)
from align.weight_sync import export_weights
from pipelines import evaluate

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

log = logging.getLogger(__name__)

# Bumped when the cache layout changes, so an old cache is refused rather than misread.
# 2: log-probabilities instead of raw logits (what vLLM returns; the same truncated teacher).
CACHE_FORMAT = 2
# The per-step values of `DistillOutput` that go to metrics.jsonl / TensorBoard (as train/<name>).
LOGGED = ("soft_loss", "hard_loss", "effective_alpha", "teacher_kl")


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


@dataclass
class Config:
    """Settings of `align distill`."""

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
    # Run name: everything is written under <runs_dir>/<name>/.
    name: str = "distill"
    # Root directory of runs.
    runs_dir: str = "runs"
    # The loss: divergence, temperature, per-token weighting and the alpha schedule.
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
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


class DistillTrainer(SFTTrainer):
    """SFTTrainer whose loss is `distillation_loss`; it overrides only `compute_loss`.

    Everything else (tokenising prompt/completion rows, the completion-only labels, batching,
    optimiser, schedules, checkpoints, resume, LoRA) is SFTTrainer's. `teacher` maps a batch to
    the teacher's logits for its shifted positions: `OnlineTeacher` or `TopKCache`. `sampler`
    (a `StudentSampler`, or None) swaps the completions of on-policy steps for the student's own.
    """

    def __init__(
        self, *args, teacher, loss_config: DistillLossConfig, sampler=None, **kwargs
    ) -> None:
        self.teacher, self.loss_config, self.sampler = teacher, loss_config, sampler
        # On-policy batches: divergence only, alpha 1 throughout.
        self.on_policy_loss = replace(loss_config, alpha=AlphaSchedule("constant", 1.0))
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The distillation loss of one micro-batch, plus the MoE load-balancing loss.

        With gradient accumulation the Trainer passes `num_items_in_batch`, the target tokens of
        the whole accumulated batch; the loss is then `loss_sum / num_items_in_batch`, so that
        the accumulated gradient is that of one big batch. On an on-policy step the batch is
        first replaced by the student's samples for its prompts; its token count then differs
        from `num_items_in_batch`, so its mean loss is used instead.
        """
        step = self.state.global_step
        on_policy = self.sampler is not None and self.sampler.is_on_policy(step)
        if on_policy:
            inputs = self.sampler.resample(self.accelerator.unwrap_model(model), inputs, step)
            num_items_in_batch = None
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            use_cache=False,
            **extra,
        )
        # Shift: position t predicts token t + 1.
        student_logits_btv = outputs.logits[:, :-1]
        labels_bt = inputs["labels"][:, 1:]
        out = distillation_loss(
            student_logits_btv,
            labels_bt,
            teacher=self.teacher(inputs["input_ids"], inputs["attention_mask"], labels_bt),
            config=self.on_policy_loss if on_policy else self.loss_config,
            step=step,
            total_steps=max(self.state.max_steps, 1),
        )
        if num_items_in_batch is not None:
            loss = out.loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices:
                # num_items_in_batch counts the tokens of every rank and DDP (or FSDP) averages
                # the gradients over the ranks: scale back, as Trainer.compute_loss does.
                loss = loss * self.accelerator.num_processes
        elif on_policy:
            # The Trainer leaves the accumulation average to the loss here.
            loss = out.loss / self.current_gradient_accumulation_steps
        else:
            loss = out.loss
        if self.aux_loss_enabled:
            # MoE load balancing as SFTTrainer adds it: a per-micro-batch mean, averaged over
            # the accumulation steps.
            aux_loss = load_balancing_loss_func(
                outputs.router_logits,
                self.model.config.num_experts,
                self.model.config.num_experts_per_tok,
                inputs["attention_mask"],
            )
            steps = self.current_gradient_accumulation_steps if num_items_in_batch else 1
            loss = loss + self.router_aux_loss_coef * aux_loss / steps
            self._metrics["train"]["aux_loss"].append(aux_loss.item())
        # SFTTrainer.log averages these over the logging interval and RunLogger writes them.
        for name in LOGGED:
            self._metrics["train"][name].append(getattr(out, name).item())
        self._metrics["train"]["alpha"].append(out.alpha)
        self._metrics["train"]["on_policy"].append(float(on_policy))
        return (loss, outputs) if return_outputs else loss


class StudentSampler:
    """Samples the student's own completions with vLLM for on-policy steps.

    Every `refresh_every` steps (and at the first on-policy step) the student's current weights
    are exported (`align.weight_sync.export_weights`) and loaded into the engine
    (`align.engine.sync_weights`); in between, samples come from weights at most that many
    steps old.
    """

    def __init__(self, settings: OnPolicySettings, student: str, export_dir: Path, pad_id: int):
        self.settings, self.export_dir, self.pad_id = settings, export_dir, pad_id
        self.llm = engine.start_engine(student, settings.engine)
        self.synced_step: int | None = None

    def is_on_policy(self, step: int) -> bool:
        ratio = self.settings.ratio
        return math.floor((step + 1) * ratio) > math.floor(step * ratio)

    def resample(self, model: torch.nn.Module, inputs: dict, step: int) -> dict:
        """The batch with each completion replaced by one the student samples for its prompt."""
        if self.synced_step is None or step - self.synced_step >= self.settings.refresh_every:
            engine.sync_weights(self.llm, export_weights(model, self.export_dir))
            self.synced_step = step
        prompts = []
        for ids_t, mask_t, labels_t in zip(
            inputs["input_ids"], inputs["attention_mask"], inputs["labels"], strict=True
        ):
            ids_t, labels_t = ids_t[mask_t.bool()], labels_t[mask_t.bool()]
            first = int((labels_t != IGNORE_INDEX).nonzero()[0, 0])
            prompts.append(ids_t[:first].tolist())
        completions = engine.generate(
            self.llm,
            prompts,
            temperature=self.settings.temperature,
            max_tokens=self.settings.max_new_tokens,
            seed=self.settings.seed + step,
        )
        rows = [(p, c[0].token_ids) for p, c in zip(prompts, completions, strict=True)]
        width = max(len(p) + len(c) for p, c in rows)
        device = inputs["input_ids"].device
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=device)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        attention_mask = torch.zeros_like(input_ids)
        for i, (prompt, completion) in enumerate(rows):
            n = len(prompt) + len(completion)
            input_ids[i, :n] = torch.tensor(prompt + completion)
            labels[i, len(prompt) : n] = torch.tensor(completion, dtype=torch.long)
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class OnlineTeacher:
    """The teacher model run forward on each batch (eval mode, no gradients)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, input_ids_bt, attention_mask_bt, labels_bt) -> TeacherLogits:
        self.model.to(input_ids_bt.device)
        logits_btv = self.model(
            input_ids=input_ids_bt, attention_mask=attention_mask_bt, use_cache=False
        ).logits
        return TeacherLogits.dense(logits_btv[:, :-1])


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary and the special tokens: equal fingerprints mean equal token ids."""
    data = json.dumps(
        {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_tokens}
    )
    return hashlib.sha256(data.encode()).hexdigest()


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
    sizes = {path: AutoConfig.from_pretrained(path).vocab_size for path in (student, teacher)}
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


def teacher_fingerprint(path: str) -> str:
    """sha256 over the teacher's config.json and weight files (contents, in name order)."""
    digest = hashlib.sha256()
    directory = Path(path)
    for file in [directory / "config.json", *sorted(directory.glob("*.safetensors"))]:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def sequence_key(ids_t: torch.Tensor) -> bytes:
    """sha256 of one sequence's unpadded token ids: the cache's row key."""
    return hashlib.sha256(ids_t.to(torch.int64).cpu().numpy().tobytes()).digest()


class TopKCache:
    """The offline teacher: top-k log-probabilities and ids per completion position, read back
    from disk.

    Layout of the directory: `manifest.json` (format, teacher path and fingerprint, k, tokenizer
    fingerprint, max_length, rows, positions, built_with, build_seconds) and `topk.safetensors`
        keys      (rows, 32) uint8   sha256 of each row's unpadded token ids (`sequence_key`)
        offsets   (rows + 1) int64   row r owns positions offsets[r]:offsets[r + 1]
        ids       (positions, k) int32    the teacher's top-k token ids, most likely first
        logprobs  (positions, k) float16  their log-probabilities over the vocabulary (T = 1)
    A row's positions are its target positions (shifted labels != -100) in order. Rows are read
    on demand through safetensors' memory map, so the cache need not fit in memory. The loss
    takes the logprobs as the sparse teacher's logits: softmax over the k ids is the same for
    logits and logprobs (they differ by one constant per position).
    """

    def __init__(self, directory: Path, manifest: dict) -> None:
        self.directory, self.manifest = directory, manifest
        self.file = safe_open(str(directory / "topk.safetensors"), framework="pt")
        keys = self.file.get_tensor("keys")
        offsets = self.file.get_tensor("offsets").tolist()
        self.rows = {bytes(k.tolist()): (offsets[r], offsets[r + 1]) for r, k in enumerate(keys)}
        self.ids = self.file.get_slice("ids")
        self.logprobs = self.file.get_slice("logprobs")

    @classmethod
    def open(cls, directory: Path, expected: dict) -> TopKCache:
        """Opens the cache in `directory`, refusing one whose manifest differs from `expected`."""
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        different = {
            key: (manifest.get(key), value)
            for key, value in expected.items()
            if manifest.get(key) != value
        }
        if different:
            lines = "; ".join(f"{k}: cached {c!r}, wanted {w!r}" for k, (c, w) in different.items())
            raise ConfigError(
                f"teacher cache {directory} was built for other settings ({lines}). Delete it to "
                "rebuild it, or set teacher.cache_dir to a new directory"
            )
        return cls(directory, manifest)

    def check_covers(self, keys: set[bytes]) -> None:
        """Raises if a training row has no cached logits (the data changed since the cache)."""
        missing = len(keys - self.rows.keys())
        if missing:
            raise ConfigError(
                f"teacher cache {self.directory} lacks {missing} of the {len(keys)} training "
                "sequences: it was built from other data. Delete it to rebuild it, or set "
                "teacher.cache_dir to a new directory"
            )

    def __call__(self, input_ids_bt, attention_mask_bt, labels_bt) -> TeacherLogits:
        k = self.manifest["top_k"]
        b, t = labels_bt.shape
        # Positions that are not targets get distinct dummy ids (arange) and zero logits; the
        # loss drops them before any arithmetic.
        ids_btk = torch.arange(k, device=labels_bt.device).expand(b, t, k).clone()
        logits_btk = torch.zeros(b, t, k, device=labels_bt.device)
        for i in range(b):
            key = sequence_key(input_ids_bt[i][attention_mask_bt[i].bool()])
            if key not in self.rows:
                raise ValueError(
                    f"teacher cache {self.directory} has no entry for batch row {i} (a sequence "
                    "of the training data it was not built from)"
                )
            start, end = self.rows[key]
            positions_n = (labels_bt[i] != IGNORE_INDEX).nonzero().squeeze(-1)
            if len(positions_n) != end - start:
                raise ValueError(
                    f"teacher cache {self.directory}: batch row {i} has {len(positions_n)} "
                    f"target tokens but the cache holds {end - start} for it"
                )
            ids_btk[i, positions_n] = self.ids[start:end].to(ids_btk.device, torch.int64)
            logits_btk[i, positions_n] = self.logprobs[start:end].to(logits_btk.device).float()
        return TeacherLogits.sparse(ids_btk, logits_btk)


def transformers_topk(
    teacher: torch.nn.Module, batches: Iterable[dict], k: int
) -> Iterator[tuple[bytes, torch.Tensor, torch.Tensor]]:
    """Per row of `batches` (collated): its key, and the teacher's top-k ids (n, k) and
    log-probabilities (n, k) at its n target positions, from a transformers forward pass."""
    online = OnlineTeacher(teacher)
    for batch in batches:
        labels_bt = batch["labels"][:, 1:]
        logits_btv = online(batch["input_ids"], batch["attention_mask"], labels_bt).logits_btv
        top_logprobs_btk, top_ids_btk = logits_btv.float().log_softmax(-1).topk(k, dim=-1)
        for i in range(len(labels_bt)):
            target_t = labels_bt[i] != IGNORE_INDEX
            key = sequence_key(batch["input_ids"][i][batch["attention_mask"][i].bool()])
            yield key, top_ids_btk[i, target_t], top_logprobs_btk[i, target_t]


def engine_topk(
    llm, batches: Iterable[dict], k: int
) -> Iterator[tuple[bytes, torch.Tensor, torch.Tensor]]:
    """`transformers_topk` from a vLLM engine serving the teacher (its prompt logprobs); one
    engine call per batch."""
    for batch in batches:
        keys, sequences, targets = [], [], []
        for ids_t, mask_t, labels_t in zip(
            batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True
        ):
            ids_n = ids_t[mask_t.bool()]
            keys.append(sequence_key(ids_n))
            sequences.append(ids_n.tolist())
            # Position t of the engine's answer predicts token t + 1: the shifted labels.
            targets.append(labels_t[mask_t.bool()][1:] != IGNORE_INDEX)
        answers = engine.prompt_topk(llm, sequences, k)
        for key, target_t, (ids, logprobs) in zip(keys, targets, answers, strict=True):
            ids_tk = torch.tensor(ids, dtype=torch.int64).reshape(-1, k)
            logprobs_tk = torch.tensor(logprobs, dtype=torch.float32).reshape(-1, k)
            yield key, ids_tk[target_t], logprobs_tk[target_t]


def write_topk_cache(
    rows: Iterable[tuple[bytes, torch.Tensor, torch.Tensor]], directory: Path, manifest: dict
) -> None:
    """Writes the cache of `rows` (from `transformers_topk` or `engine_topk`) to `directory`.

    Written with `atomic_directory`, so an interrupted precompute never leaves a cache that
    looks complete. The manifest records the seconds it took
    (`build_seconds`: running the teacher over the rows and writing, its loading excluded).
    """
    started = time.perf_counter()
    keys, offsets, ids, logprobs = [], [0], [], []
    for key, ids_nk, logprobs_nk in rows:
        keys.append(key)
        ids.append(ids_nk.to(torch.int32))
        logprobs.append(logprobs_nk.to(torch.float16))
        offsets.append(offsets[-1] + len(ids_nk))
    with atomic_directory(directory) as partial:
        save_file(
            {
                "keys": torch.tensor([list(key) for key in keys], dtype=torch.uint8),
                "offsets": torch.tensor(offsets, dtype=torch.int64),
                "ids": torch.cat(ids),
                "logprobs": torch.cat(logprobs),
            },
            str(partial / "topk.safetensors"),
        )
        seconds = time.perf_counter() - started
        write_json_atomic(
            partial / "manifest.json",
            {**manifest, "positions": offsets[-1], "build_seconds": seconds},
        )
    log.info("teacher cache: %d positions of %d rows in %.1f s", offsets[-1], len(keys), seconds)


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
    expected = {
        "format": CACHE_FORMAT,
        "teacher": str(Path(settings.model).resolve()),
        "teacher_sha256": teacher_fingerprint(settings.model),
        "top_k": settings.top_k,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "max_length": config.train.max_length,
    }
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
def heldout_scores(student, teacher: OnlineTeacher, loader) -> dict:
    """Student CE and forward KL(teacher || student) at T = 1 per gold completion token."""
    was_training = student.training
    student.eval()
    ce_sum, kl_sum, tokens = 0.0, 0.0, 0
    for batch in loader:
        labels_bt = batch["labels"][:, 1:]
        student_logits_btv = student(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits[:, :-1]
        teacher_logits = teacher(batch["input_ids"], batch["attention_mask"], labels_bt)
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
    check_checkpoint(config.student, "student")
    check_checkpoint(config.teacher.model, "teacher.model")
    vocab = check_same_tokenizer(config.student, config.teacher.model)
    if config.teacher.mode == "offline" and config.teacher.top_k > vocab:
        raise ConfigError(
            f"key 'teacher.top_k': {config.teacher.top_k} exceeds the vocabulary size {vocab}"
        )
    dataset, data_report = load_dataset_file(config.data, "sft", config.on_error)
    if config.heldout_sft is not None:
        load_dataset_file(config.heldout_sft, "sft", config.on_error)
    evaluate.check_heldout(config.heldout)
    out = Path(config.runs_dir) / config.name
    refuse_changed_rerun(out, config)
    with Run(out, config) as run_dir:
        model_dir = out / "model"
        result = finished_result(model_dir)
        if result is None:
            # 2. Data, fitted to the token budget.
            tokenizer = AutoTokenizer.from_pretrained(config.student)
            counts = [token_count(tokenizer, row["prompt"], row["completion"]) for row in dataset]
            too_long = sum(n > config.train.max_length for n in counts)
            if too_long:
                log.warning(
                    "%d of %d rows are longer than train.max_length=%d tokens and are truncated",
                    too_long,
                    len(counts),
                    config.train.max_length,
                )
            dataset, tokens = fit_budget(
                dataset.select_columns(["prompt", "completion"]), counts, config.train, "rows"
            )

            # 3-5. Training here or on config.placement's processes (see `fit`); an interrupted
            # run continues from its newest checkpoint.
            result = launch.train(
                fit,
                config,
                dataset,
                run_dir,
                resume_point(out / "checkpoints"),
                callbacks,
                # An engine of this process cannot reach the ranks; there rank 0 starts one.
                llm=llm if config.placement.processes == 1 else None,
                facts={
                    "data": data_report,
                    "budget_tokens": tokens,
                    "teacher": config.teacher.model,
                },
            )

        # 6. Held-out evaluation.
        if config.heldout is not None:
            result["eval"] = evaluate.evaluate_checkpoint(
                config.eval, str(model_dir), config.heldout, f"{config.name}/eval", config.runs_dir
            )
        run_dir.write_json("result.json", result)
    return result


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
    heldout_rows = None
    if config.heldout_sft is not None:
        heldout_rows, _ = load_dataset_file(config.heldout_sft, "sft", config.on_error)
        heldout_rows = heldout_rows.select_columns(["prompt", "completion"])
    # The trainer; its teacher is set once the tokenised rows exist (offline cache).
    model = load_model(config.student, model_dtype(config.train, config.lora))
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
        processing_class=tokenizer,
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
        trainer.sampler = StudentSampler(
            config.on_policy, config.student, out / "policy-export", tokenizer.pad_token_id
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
    return finish(trainer, train_output, tokenizer, out / "model", **facts)
