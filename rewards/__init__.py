"""Reward plug-ins: functions `(prompts, completions, **columns) -> list[float | None]`.

Importing this package registers the built-in rewards in `align.rewarding.REWARDS`:

- `answer_match`: the embedded tasks' verifiers, or normalised exact match of the tagged answer;
- `math_verify`: mathematical equivalence with HF's math-verify;
- `answer_format`: exactly one well-formed, non-empty `<answer>...</answer>`;
- `overlong`: DAPO's soft overlong penalty;
- `reward_model`: a transformers sequence classifier;
- `llm_judge`: a judge model served by vLLM, read through its choice probabilities;
- `code_tests`: runs the completion's code against the row's tests in the sandbox.

Your own reward needs no registration: name it in YAML as `package.module:function`.
"""

from align.rewarding import REWARDS, Failed
from rewards import answers, code, judge, overlong, reward_model

__all__ = ["REWARDS", "Failed", "answers", "code", "judge", "overlong", "reward_model"]
