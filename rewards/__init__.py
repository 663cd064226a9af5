"""Reward plug-ins: functions `(prompts, completions, **columns) -> list[float | None]`."""
