"""Training losses, pure torch (CPU and CUDA), each usable and tested without the config system.

- `align.losses.distill`: teacher-to-student distillation, soft targets from a dense or top-k
  teacher mixed with hard labels under an alpha schedule and per-token weights.
- `align.losses.policy`: online RL policy losses (GRPO, DAPO, Dr.GRPO, GSPO, CISPO), group
  and batch advantages, and the off-policy corrections for stale rollouts.
"""
