"""Length filter: scores each row by the length of its text, in tokens or characters.

Overlong rows waste sequence budget (and get truncated, which teaches a cut-off answer); very
short ones often carry no signal. Scoring length lets a `Selection(min=..., max=...)` keep a
band of lengths, e.g. `max: 2048` with `unit: tokens` drops rows that would not fit a context.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from transformers import AutoTokenizer

from align.config import check
from align.pruning import row_text

PARTS = ("prompt", "completion", "all")
UNITS = ("tokens", "chars")


class LengthFilter:
    """Length of a row's text (see `align.pruning.row_text`); every row gets a score.

    Token counts are of the flattened text (chat messages joined by newlines, no chat template
    and no BOS/EOS), so they measure content, not the template's fixed overhead.

    Args:
        part: Which text to measure: "prompt", "completion" or "all" (prompt, newline,
            completion).
        unit: "tokens" (needs `tokenizer`) or "chars" (Unicode code points).
        tokenizer: A local checkpoint directory whose tokenizer counts the tokens; only with
            unit "tokens". Nothing is downloaded.

    Raises:
        ConfigError: An unknown part or unit, unit "tokens" without a tokenizer, a tokenizer
            with unit "chars" (it would be ignored), or a tokenizer path that is not a directory.
    """

    # A row's length depends on that row alone: scores are cached per row.
    independent_rows = True

    def __init__(
        self,
        part: Literal["prompt", "completion", "all"] = "all",
        unit: Literal["tokens", "chars"] = "tokens",
        tokenizer: str | None = None,
    ) -> None:
        check(part in PARTS, "part", f"must be one of {', '.join(PARTS)} (got {part!r})")
        check(unit in UNITS, "unit", f"must be one of {', '.join(UNITS)} (got {unit!r})")
        check(
            unit == "chars" or tokenizer is not None,
            "tokenizer",
            "unit 'tokens' needs a tokenizer: a local checkpoint directory (or set unit: chars)",
        )
        check(
            unit == "tokens" or tokenizer is None,
            "tokenizer",
            f"is only used with unit 'tokens'; unit is 'chars' (got tokenizer {tokenizer!r})",
        )
        # What part of each row is measured.
        self.part = part
        # Tokens or characters.
        self.unit = unit
        # The loaded tokenizer, None when counting characters.
        self.tokenizer = None
        if tokenizer is not None:
            check(
                Path(tokenizer).is_dir(),
                "tokenizer",
                f"must be a local checkpoint directory; {tokenizer!r} is not a directory",
            )
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        self.score_name = f"length of {part} ({unit})"

    def score(self, rows: list[dict[str, Any]]) -> list[float | None]:
        """The length of each row's text, in the configured unit.

        Args:
            rows: Dataset rows in any stage schema.

        Returns:
            One length per row, never None.
        """
        texts = [row_text(row, self.part) for row in rows]
        if self.tokenizer is None:
            return [float(len(text)) for text in texts]
        if not texts:  # the tokenizer raises on an empty batch
            return []
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [float(len(row_ids)) for row_ids in ids]

    def metrics(self) -> dict[str, float]:
        return {}
