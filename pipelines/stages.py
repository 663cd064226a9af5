"""The commands `align` and pipeline files can run, by name.

Each entry is a stage module with a `Config` dataclass and `run(config) -> dict`.
"""

from __future__ import annotations

from types import ModuleType

from pipelines import distill, dpo, evaluate, make_data, make_model, redteam, rl, sft
from pipelines import filter as filter_stage

COMMANDS: dict[str, ModuleType] = {
    "make-model": make_model,
    "make-data": make_data,
    "eval": evaluate,
    "filter": filter_stage,
    "sft": sft,
    "rl": rl,
    "dpo": dpo,
    "distill": distill,
    "redteam": redteam,
}
