"""The distillation stage's parts; `pipelines/distill.py` configures and runs them.

- `trainer`: `DistillTrainer`, TRL's SFTTrainer with the distillation loss
  (`align.losses.distill`) as its `compute_loss`;
- `teachers`: where the teacher's logits come from: `OnlineTeacher` (a forward pass per batch)
  or `TopKCache` (the offline top-k cache: its format and manifest, the transformers and vLLM
  builders, the reader);
- `sampler`: `StudentSampler`, the student's own completions (vLLM) for on-policy steps.
"""
