"""On-policy distillation (GKD-style): the student's own completions, sampled with vLLM.

On an on-policy step `DistillTrainer` replaces the batch's dataset completions with ones the
student samples for the batch's prompts (`StudentSampler.resample`); the teacher then scores
those and the loss is the divergence alone. The steps are spread evenly over training: with a
share `ratio`, step s is on-policy when floor((s + 1) * ratio) > floor(s * ratio).

Tensor legend: t position.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from align import engine
from align.losses.distill import IGNORE_INDEX
from align.weight_sync import export_weights


class StudentSampler:
    """Samples the student's own completions with vLLM for on-policy steps.

    Every `refresh_every` steps (and at the first on-policy step) the student's current weights
    are exported (`align.weight_sync.export_weights`) and loaded into the engine
    (`align.engine.sync_weights`); in between, samples come from weights at most that many
    steps old.

    Args:
        llm: the vLLM engine serving the student (`align.engine.start_engine`).
        export_dir: where the student's weights are exported for the engine.
        pad_id: the tokenizer's padding id, for the resampled batch.
        ratio: share of optimiser steps that are on-policy, in (0, 1].
        refresh_every: optimiser steps between weight exports.
        temperature: sampling temperature.
        max_new_tokens: longest sampled completion in tokens.
        seed: sampling seed; step s samples with seed + s, so a resumed run samples the same.
    """

    def __init__(
        self,
        llm,
        export_dir: Path,
        pad_id: int,
        *,
        ratio: float,
        refresh_every: int,
        temperature: float,
        max_new_tokens: int,
        seed: int,
    ) -> None:
        self.llm, self.export_dir, self.pad_id = llm, export_dir, pad_id
        self.ratio, self.refresh_every = ratio, refresh_every
        self.temperature, self.max_new_tokens, self.seed = temperature, max_new_tokens, seed
        self.synced_step: int | None = None

    def is_on_policy(self, step: int) -> bool:
        return math.floor((step + 1) * self.ratio) > math.floor(step * self.ratio)

    def resample(self, model: torch.nn.Module, inputs: dict, step: int) -> dict:
        """The batch with each completion replaced by one the student samples for its prompt."""
        if self.synced_step is None or step - self.synced_step >= self.refresh_every:
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
            temperature=self.temperature,
            max_tokens=self.max_new_tokens,
            seed=self.seed + step,
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
