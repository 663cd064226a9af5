"""Reward plug-ins: functions `(prompts, completions, **columns) -> list[float | None]`.

The built-in rewards, by the names YAML gives them (`align.rewarding.BUILTIN_REWARDS` maps each
name to its function or class here, imported when first named):

- `answer_match`: the embedded tasks' verifiers, or normalised exact match of the tagged answer;
- `math_verify`: mathematical equivalence with HF's math-verify;
- `answer_format`: exactly one well-formed, non-empty `<answer>...</answer>`;
- `overlong`: DAPO's soft overlong penalty;
- `reward_model`: a transformers sequence classifier;
- `llm_judge`: a judge model served by vLLM, read through its choice probabilities;
- `code_tests`: runs the completion's code against the row's tests in the sandbox.

Your own reward needs no registration: name it in YAML as `package.module:function`, or
declare it in your distribution's entry points (group `moealign.rewards`) and name it.
"""

from align.rewarding import Failed

__all__ = ["Failed"]
