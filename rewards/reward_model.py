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
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
        # Truncate from the left so the completion, which is being judged, is always seen.
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model, use_safetensors=True, trust_remote_code=False
        ).to(device)
        self.model.eval()
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"reward model {model} has {self.model.config.num_labels} outputs; a reward "
                "model needs exactly one (num_labels=1)"
            )
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"reward model tokenizer of {model} has no pad token")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.max_length = max_length

    def text(self, prompt: str | list[dict], completion: str) -> str:
        """The string the classifier reads for one (prompt, completion) pair."""
        if isinstance(prompt, str):
            return prompt + completion
        conversation = [*prompt, {"role": "assistant", "content": completion}]
        return self.tokenizer.apply_chat_template(conversation, tokenize=False)

    def __call__(self, prompts: list, completions: list[str], **_) -> list[float]:
        import torch

        texts = [self.text(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    add_special_tokens=False,
                ).to(self.device)
                logits_b1 = self.model(**batch).logits
                scores.extend(logits_b1[:, 0].float().tolist())
        return scores
