"""`DistillTrainer`: TRL's SFTTrainer with `compute_loss` replaced by the distillation loss.

The loss is `align.losses.distill.distillation_loss`, the teacher's soft targets mixed with the
hard labels under an alpha schedule; its per-step parts (`LOGGED`, plus alpha, the MoE router's
aux_loss and whether the step was on-policy) go to SFTTrainer's metrics, which the run's logger
writes to metrics.jsonl and TensorBoard.

Tensor legend: b batch, t position, v vocabulary.
"""

from __future__ import annotations

from dataclasses import replace

from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
from trl import SFTTrainer

from align.losses.distill import AlphaSchedule, DistillLossSettings, distillation_loss
from align.vision import image_inputs

# The per-step values of `DistillOutput` that go to metrics.jsonl / TensorBoard (as train/<name>).
LOGGED = ("soft_loss", "hard_loss", "effective_alpha", "teacher_kl")


class DistillTrainer(SFTTrainer):
    """SFTTrainer whose loss is `distillation_loss`; it overrides only `compute_loss`.

    Everything else (tokenising prompt/completion rows, the completion-only labels, batching,
    optimiser, schedules, checkpoints, resume, LoRA) is SFTTrainer's. `teacher` maps a batch to
    the teacher's logits for its shifted positions: `OnlineTeacher` or `TopKCache`
    (`align.distill.teachers`). `sampler` (an `align.distill.sampler.StudentSampler`, or None)
    swaps the completions of on-policy steps for the student's own.
    """

    def __init__(
        self, *args, teacher, loss_config: DistillLossSettings, sampler=None, **kwargs
    ) -> None:
        self.teacher, self.loss_config, self.sampler = teacher, loss_config, sampler
        # On-policy batches: divergence only, alpha 1 throughout.
        self.on_policy_loss = replace(loss_config, alpha=AlphaSchedule("constant", 1.0))
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The distillation loss of one micro-batch, plus the MoE load-balancing loss.

        With gradient accumulation the Trainer passes `num_items_in_batch`, the target tokens of
        the whole accumulated batch; the loss is then `loss_sum / num_items_in_batch`, so that
        the accumulated gradient is that of one big batch. On an on-policy step the batch is
        first replaced by the student's samples for its prompts; its token count then differs
        from `num_items_in_batch`, so its mean loss is used instead.
        """
        step = self.state.global_step
        on_policy = self.sampler is not None and self.sampler.is_on_policy(step)
        if on_policy:
            inputs = self.sampler.resample(self.accelerator.unwrap_model(model), inputs, step)
            num_items_in_batch = None
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
        images = image_inputs(inputs)
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            use_cache=False,
            **extra,
            **images,
        )
        # Shift: position t predicts token t + 1.
        student_logits_btv = outputs.logits[:, :-1]
        labels_bt = inputs["labels"][:, 1:]
        out = distillation_loss(
            student_logits_btv,
            labels_bt,
            teacher=self.teacher(
                inputs["input_ids"], inputs["attention_mask"], labels_bt, **images
            ),
            config=self.on_policy_loss if on_policy else self.loss_config,
            step=step,
            total_steps=max(self.state.max_steps, 1),
        )
        if num_items_in_batch is not None:
            loss = out.loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices:
                # num_items_in_batch counts the tokens of every rank and DDP (or FSDP) averages
                # the gradients over the ranks: scale back, as Trainer.compute_loss does.
                loss = loss * self.accelerator.num_processes
        elif on_policy:
            # The Trainer leaves the accumulation average to the loss here.
            loss = out.loss / self.current_gradient_accumulation_steps
        else:
            loss = out.loss
        if self.aux_loss_enabled:
            # MoE load balancing as SFTTrainer adds it: a per-micro-batch mean, averaged over
            # the accumulation steps.
            text = self.model.config.get_text_config()
            aux_loss = load_balancing_loss_func(
                outputs.router_logits,
                text.num_experts,
                text.num_experts_per_tok,
                inputs["attention_mask"],
            )
            steps = self.current_gradient_accumulation_steps if num_items_in_batch else 1
            loss = loss + self.router_aux_loss_coef * aux_loss / steps
            self._metrics["train"]["aux_loss"].append(aux_loss.item())
        # SFTTrainer.log averages these over the logging interval and RunLogger writes them.
        for name in LOGGED:
            self._metrics["train"][name].append(getattr(out, name).item())
        self._metrics["train"]["alpha"].append(out.alpha)
        self._metrics["train"]["on_policy"].append(float(on_policy))
        return (loss, outputs) if return_outputs else loss
