"""A learned reward model: a transformers sequence classifier scoring (prompt, completion) pairs."""

from __future__ import annotations

from typing import Literal


class RewardModel:
    """Scores each completion with a sequence-classification checkpoint (one output: the reward).

    Conversational prompts are rendered through the checkpoint's chat template with the
    completion as the assistant turn; plain-string prompts are concatenated with the completion.
    Scoring runs in batches under `torch.inference_mode`. Weights load from safetensors only and
    remote code is never trusted.

    Args:
        model: checkpoint directory (e.g. a Qwen3MoeForSequenceClassification with num_labels=1).
        batch_size: pairs scored per forward pass.
        max_length: longest (prompt + completion) in tokens; longer inputs keep their end.
        device: "cpu", "cuda", or "auto" (CUDA when available).
    """

    # Options naming a checkpoint, checked when a stage starts, before anything is written
    # (`align.modeling.check_plugin_checkpoints`).
    checkpoint_options = {"model": "any"}

    def __init__(
        self,
        model: str,
        batch_size: int = 16,
        max_length: int = 512,
        device: Literal["cpu", "cuda", "auto"] = "auto",
    ) -> None:
        from align.scoring import SequenceClassifier

        self.classifier = SequenceClassifier(model, batch_size, max_length, device)
        if len(self.classifier.labels) != 1:
            raise ValueError(
                f"reward model {model} has {len(self.classifier.labels)} outputs; a reward "
                "model needs exactly one (num_labels=1)"
            )

    def __call__(self, prompts: list, completions: list[str], **_) -> list[float]:
        texts = [self.classifier.text(p, c) for p, c in zip(prompts, completions, strict=True)]
        return [row[0] for row in self.classifier.logits(texts)]
