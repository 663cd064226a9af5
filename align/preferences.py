"""Preference pairs built from scored rollouts, and the DPO batch mask for formatting tokens.

`build_pairs` samples n completions per prompt from a live vLLM engine, scores them with a
`RewardSet`, and pairs the best against the worst completion of the same prompt when their
reward margin is at least `min_margin`. That is how the pipeline runs DPO after RL on the same
task: the policy's own rollouts, ranked by the task's reward.

`FormatMaskingCollator` is TRL's preference collator with formatting tokens (chat headers,
end-of-turn) taken out of the completion mask, as in Llama 3's DPO: those tokens are the same in
the chosen and the rejected answer, and pushing their probability up and down at once only
destabilises training.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference, DataCollatorForVisionPreference

from align.rewarding import RewardSet
from align.runs import verbose
from align.scoring import row_prompt, sample_and_score

if TYPE_CHECKING:
    from vllm import LLM

log = logging.getLogger(__name__)


@dataclass
class PairStats:
    """What `build_pairs` made of the prompts."""

    prompts: int
    pairs: int
    # Prompts whose best and worst completion differ by less than min_margin (ties included).
    below_margin: int
    # Prompts with fewer than two completions the rewards could score.
    unscored: int
    mean_chosen_reward: float | None
    mean_rejected_reward: float | None


def build_pairs(
    llm: LLM,
    tokenizer,
    rows: list[dict[str, Any]],
    rewards: RewardSet,
    *,
    samples: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    min_margin: float = 0.5,
    seed: int = 0,
    images: list[list] | None = None,
) -> tuple[list[dict[str, Any]], PairStats]:
    """Samples, scores and pairs completions: best vs worst of each prompt.

    Args:
        llm: engine serving the policy whose rollouts are paired.
        tokenizer: its tokenizer (chat template for conversational prompts).
        rows: prompt rows (`prompt` or `messages`, plus what the rewards read, e.g. `answer`).
        rewards: scores each completion; unscored completions (None) are left out.
        samples: completions per prompt (n >= 2).
        temperature: sampling temperature.
        max_new_tokens: longest completion.
        min_margin: a pair is kept when best - worst reward >= this (> 0).
        seed: sampling seed.
        images: each row's images (`align.vision.rows_images`), for a vision-language engine;
            a pair keeps its row's `images` column for the trainer.

    Returns:
        The pairs in TRL's preference format (`prompt`, `chosen`, `rejected`; conversational
        when the prompt is, plus the row's other columns, `chosen_reward` and
        `rejected_reward`) and the counts.
    """
    if samples < 2:
        raise ValueError(f"pairs need at least 2 samples per prompt (got {samples})")
    if min_margin <= 0:
        raise ValueError(f"min_margin must be > 0 (got {min_margin}); equal rewards are no pair")
    completions, batch = sample_and_score(
        llm,
        tokenizer,
        rows,
        rewards,
        samples=samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        progress=verbose(),
        images=images,
    )
    totals = batch.totals

    pairs, below_margin, unscored = [], 0, 0
    for i, row in enumerate(rows):
        scored = [
            (totals[i * samples + j], completions[i][j].text)
            for j in range(samples)
            if totals[i * samples + j] is not None
        ]
        if len(scored) < 2:
            unscored += 1
            continue
        # max/min keep the first of equal rewards: the earliest sample, so the choice is seeded.
        best = max(scored, key=lambda item: item[0])
        worst = min(scored, key=lambda item: item[0])
        if best[0] - worst[0] < min_margin:
            below_margin += 1
            continue
        prompt = row_prompt(row)
        extra = {k: v for k, v in row.items() if k not in ("prompt", "messages")}
        pairs.append(
            {
                **extra,
                "prompt": prompt,
                "chosen": _as_completion(prompt, best[1]),
                "rejected": _as_completion(prompt, worst[1]),
                "chosen_reward": best[0],
                "rejected_reward": worst[0],
            }
        )
    stats = PairStats(
        prompts=len(rows),
        pairs=len(pairs),
        below_margin=below_margin,
        unscored=unscored,
        mean_chosen_reward=statistics.fmean(p["chosen_reward"] for p in pairs) if pairs else None,
        mean_rejected_reward=(
            statistics.fmean(p["rejected_reward"] for p in pairs) if pairs else None
        ),
    )
    log.info(
        "pairs: %d of %d prompts (%d below the margin %g, %d with < 2 scored completions)",
        stats.pairs,
        stats.prompts,
        below_margin,
        min_margin,
        unscored,
    )
    return pairs, stats


def _as_completion(prompt: str | list[dict], text: str) -> str | list[dict]:
    """A sampled text as a completion in the prompt's format (an assistant turn or a string)."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def format_token_ids(tokenizer, tokens: list[str]) -> list[int]:
    """Ids of formatting tokens named as strings; each must be a single token of `tokenizer`.

    Raises:
        ValueError: a string that is not one token, naming it.
    """
    ids = []
    for token in tokens:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(
                f"format token {token!r} is {len(encoded)} tokens for this tokenizer, not one; "
                "list single tokens (chat headers, end of turn)"
            )
        ids.append(encoded[0])
    return ids


class FormatMasking:
    """Removes `format_ids` from the completion mask of a TRL preference collator's batches.

    Masked tokens count neither in the policy's nor in the reference's sequence log-probability
    (nor in the NLL term), so the loss compares only what differs between the answers.
    """

    def __init__(self, *args, format_ids: list[int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.format_ids = torch.tensor(sorted(set(format_ids)), dtype=torch.long)

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        if len(self.format_ids):
            is_format = torch.isin(batch["input_ids"], self.format_ids)
            batch["completion_mask"] = batch["completion_mask"].masked_fill(is_format, 0)
        return batch


class FormatMaskingCollator(FormatMasking, DataCollatorForPreference):
    """TRL's preference collator for text pairs, with the format tokens masked."""


class VisionFormatMaskingCollator(FormatMasking, DataCollatorForVisionPreference):
    """TRL's preference collator for pairs with images (the processor reads them), with the
    format tokens masked."""
