"""An LLM judge served by vLLM: the reward is the judge's expected verdict on each completion."""

from __future__ import annotations

from typing import Any

DEFAULT_TEMPLATE = (
    "Question: {prompt}\nReference answer: {answer}\nResponse: {completion}\n"
    "Is the response correct? Reply yes or no."
)


class LLMJudge:
    """Asks a judge model about each (prompt, completion) pair; reward = expected choice value.

    The template is a str.format string over `{prompt}`, `{completion}` and any dataset column
    (e.g. `{answer}`). The judge's probability of each choice is read from its logprobs (see
    `align.scoring.ChoiceJudge`), so the reward is smooth: with choices {"yes": 1, "no": 0} it
    is P(yes) renormalised over yes/no.

    Args:
        model: the judge checkpoint directory; a vLLM engine is started for it.
        template: the question; see `DEFAULT_TEMPLATE`.
        choices: allowed verdicts and their reward values.
        engine: vLLM engine settings (`align.settings.EngineSettings` keys).
        llm: an already started engine for `model` (from code, not YAML), e.g. to share one.
    """

    # Options naming a checkpoint, checked when a stage starts, before anything is written
    # (`align.modeling.check_plugin_checkpoints`).
    checkpoint_options = {"model": "causal_lm"}

    def __init__(
        self,
        model: str,
        template: str = DEFAULT_TEMPLATE,
        choices: dict[str, float] | None = None,
        engine: dict[str, Any] | None = None,
        llm: Any = None,
    ) -> None:
        from align.engine import engine_and_tokenizer
        from align.scoring import ChoiceJudge

        llm, tokenizer = engine_and_tokenizer(model, engine, "llm_judge.engine", llm)
        self.judge = ChoiceJudge(llm, tokenizer, template, choices or {"yes": 1.0, "no": 0.0})

    def __call__(self, prompts: list, completions: list[str], **columns) -> list[float]:
        rows = [
            {**{k: v[i] for k, v in columns.items()}, "prompt": prompt, "completion": completion}
            for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True))
        ]
        return self.judge.expected(rows)
