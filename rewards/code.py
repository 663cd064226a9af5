"""The `code_tests` reward: runs the completion's code against the row's tests in the sandbox.

Threat model. The code is untrusted and the policy is rewarded for passing, so it may learn to
fake a pass. The program is the completion's code followed by the row's tests; it passes only
when it exits 0 and its last line was reached. The sandbox checks the latter with a random
per-run token that its bootstrap reads from stdin before the code starts and writes to a file
only after the whole program returned: the token is in neither the program's source, its
arguments, its environment nor stdout, so exiting early (`sys.exit(0)`, `os._exit(0)`,
`raise SystemExit`) or printing a success message scores 0.0. What this does not stop: code
that goes looking for the token in its own interpreter's memory (the frames of the
bootstrap), or that defeats the asserts themselves (an object whose `__eq__` is always True).
Both are deliberate, visible in the samples, and beyond what a test-based reward can rule out.
"""

from __future__ import annotations

import re

from align.rewarding import Failed
from align.sandbox import Sandbox, SandboxLimits
from align.tasks import extract_answer

_PYTHON_BLOCK = re.compile(r"```(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_ANY_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The code of a completion: its last ```python block, else its last ``` block, else the
    text inside `<answer>...</answer>`, else the whole completion.

    Example: "Here:\\n```python\\ndef f():\\n    return 1\\n```" -> "def f():\\n    return 1\\n".
    """
    for pattern in (_PYTHON_BLOCK, _ANY_BLOCK):
        blocks = pattern.findall(completion)
        if blocks:
            return blocks[-1]
    answer = extract_answer(completion)
    return answer if answer is not None else completion


class CodeTests:
    """1.0 when the completion's code passes the row's `tests`, 0.0 when not, None without tests.

    `tests[i]` is Python code (asserts) run after the code of completion i, in the sandbox
    (`align.sandbox`): stdlib only, no network, writes only in a temporary directory. A failed
    assert, an exception, an early exit, a timeout or a crash scores 0.0. A sandbox that cannot
    run the program (e.g. isolation missing in strict mode) leaves the row unscored, counted
    under `reward/code_tests/errors`. A batch takes up to rows * wall_seconds / concurrency
    seconds: set the reward's `timeout_s` above that.

    Args:
        cpu_seconds: CPU time of one program.
        wall_seconds: wall-clock time of one program.
        memory_mb: address space of each of its processes, in MiB.
        concurrency: programs run at once.
        strict: refuse to run (unscored rows) when an isolation layer is missing; with False,
            run without it after one warning.
    """

    def __init__(
        self,
        cpu_seconds: float = 5.0,
        wall_seconds: float = 10.0,
        memory_mb: int = 512,
        concurrency: int = 2,
        strict: bool = True,
    ) -> None:
        limits = SandboxLimits(
            cpu_seconds=cpu_seconds, wall_seconds=wall_seconds, memory_mb=memory_mb
        )
        self.sandbox = Sandbox(limits, concurrency=concurrency, strict=strict)

    def __call__(
        self, prompts: list, completions: list[str], tests: list | None = None, **_
    ) -> list[float | Failed | None]:
        if tests is None:
            return [None] * len(completions)
        rows = [i for i, test in enumerate(tests) if test and str(test).strip()]
        programs = [f"{extract_code(completions[i])}\n\n{tests[i]}\n" for i in rows]
        scores: list[float | Failed | None] = [None] * len(completions)
        for i, result in zip(rows, self.sandbox.run_many(programs), strict=True):
            if result.status == "error":
                scores[i] = Failed(result.detail)
            else:
                scores[i] = float(result.status == "ok" and result.completed)
        return scores
