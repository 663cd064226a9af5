"""DPO stage pieces: loss variants (hand-worked, then through TRL), the format mask, pairs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from align.modeling import load_model
from align.preferences import FormatMaskingCollator, format_token_ids
from align.tasks import make_problems, to_dpo
from align.tokenizer import build_tokenizer
from align.training import TrainSettings
from pipelines import dpo


def reference_loss(kind, beta, gamma, nll_weight, pc, pr, rc, rr, lc, lr, chosen_token_sum=None):
    """The recipe's formulas, per pair, then the batch mean (plus the batch NLL term).

    pc/pr: policy log-prob sums of chosen/rejected; rc/rr: reference sums; lc/lr: token counts.
    """
    if kind == "sigmoid":
        per_pair = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    elif kind == "ipo":
        per_pair = ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * beta)) ** 2
    elif kind == "length_normalized":
        per_pair = -F.logsigmoid(beta * ((pc - rc) / lc - (pr - rr) / lr))
    elif kind == "simpo":
        per_pair = -F.logsigmoid(beta * pc / lc - beta * pr / lr - gamma)
    loss = per_pair.mean()
    if nll_weight:
        loss = loss + nll_weight * -(pc.sum() / lc.sum())
    return loss


T = torch.tensor


@pytest.mark.parametrize(
    ("kind", "beta", "expected"),
    [
        # h = (-1 - -2) - (-3 - -2) = 2; -log sigmoid(0.1 * 2) = log(1 + e^-0.2) = 0.598139
        ("sigmoid", 0.1, 0.598139),
        # h = 1/2 - (-1)/4 = 0.75; target 1/(2 * 0.1) = 5; (0.75 - 5)^2 = 18.0625
        ("ipo", 0.1, 18.0625),
        # h = 0.75; log(1 + e^-0.075) = 0.656350
        ("length_normalized", 0.1, 0.656350),
        # 2 * (-1/2) - 2 * (-3/4) - 0.5 = 0; -log sigmoid(0) = log 2 = 0.693147
        ("simpo", 2.0, 0.693147),
    ],
)
def test_loss_formulas_hand_worked(kind, beta, expected):
    loss = reference_loss(
        kind, beta, 0.5, 0.0, T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), T([2.0]), T([4.0])
    )
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_nll_term_is_the_mean_chosen_token_nll():
    # Two pairs, chosen sums -1 (2 tokens) and -3 (4 tokens): NLL = 4/6; weight 0.2 -> 0.13333
    sums = dict(pc=T([-1.0, -3.0]), pr=T([-3.0, -3.0]), rc=T([-1.0, -3.0]), rr=T([-3.0, -3.0]))
    lengths = dict(lc=T([2.0, 4.0]), lr=T([4.0, 4.0]))
    base = reference_loss("sigmoid", 0.1, 0, 0.0, **sums, **lengths)
    with_nll = reference_loss("sigmoid", 0.1, 0, 0.2, **sums, **lengths)
    assert base.item() == pytest.approx(math.log(2))
    assert (with_nll - base).item() == pytest.approx(0.2 * 4 / 6)


def pairs_dataset(n: int = 6) -> Dataset:
    rows = to_dpo(make_problems(["add", "sort"], [2, 3], n // 4 + 1, seed=1)).select(range(n))
    return rows.select_columns(["prompt", "chosen", "rejected"])


def test_format_tokens_leave_the_completion_mask_token_by_token():
    tokenizer = build_tokenizer()
    eot = tokenizer.convert_tokens_to_ids("<|eot|>")
    answer_open = tokenizer.convert_tokens_to_ids("<answer>")
    collator = FormatMaskingCollator(
        pad_token_id=tokenizer.pad_token_id,
        format_ids=[*tokenizer.all_special_ids, answer_open],
    )
    example = {
        "prompt_ids": [1, 4, 50, 5],
        "chosen_ids": [answer_open, 20, 21, eot],
        "rejected_ids": [answer_open, 22, eot],
    }
    batch = collator([example])
    # Rows: chosen then rejected; prompt 0, answer digits 1, <answer> and <|eot|> 0, padding 0.
    assert batch["completion_mask"].tolist() == [
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1, 0, 0],
    ]
    plain = FormatMaskingCollator(pad_token_id=tokenizer.pad_token_id, format_ids=[])([example])
    assert plain["completion_mask"].tolist() == [
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 0],
    ]


def test_format_tokens_must_be_single_tokens():
    tokenizer = build_tokenizer()
    assert format_token_ids(tokenizer, ["<answer>"]) == [
        tokenizer.convert_tokens_to_ids("<answer>")
    ]
    with pytest.raises(ValueError, match="'ab' is 2 tokens"):
        format_token_ids(tokenizer, ["ab"])


def sequence_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent of TRL: per-sequence sums of completion-token log-probs, and token counts."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["completion_mask"][:, 1:].float()
    return (logps * mask).sum(1), mask.sum(1)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "length_normalized", "simpo"])
def test_trainer_loss_equals_the_formula(tmp_path, student_dir, kind):
    """The stage's trainer (TRL plus our loss mapping, format mask and SimPO reference) gives
    the recipe's loss on a batch where policy and reference differ."""
    beta = 2.0 if kind == "simpo" else 0.1
    config = dpo.Config(
        model=str(student_dir),
        data="unused",
        loss=dpo.LossSettings(kind=kind, beta=beta, simpo_gamma=0.5, nll_weight=0.2),
        train=TrainSettings(batch_size=4, router_aux_loss_coef=0.0),
    )
    model = load_model(student_dir)
    reference = copy.deepcopy(model)
    trainer = dpo.build_trainer(config, model, build_tokenizer(), pairs_dataset(), tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    # Every completion loses its end-of-turn token to the format mask.
    eot = build_tokenizer().eos_token_id
    assert not (batch["completion_mask"].bool() & (batch["input_ids"] == eot)).any()

    with torch.no_grad():  # the policy moves away from the reference
        torch.manual_seed(0)
        for p in trainer.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    policy, lengths = sequence_logps(trainer.model, batch)
    ref, _ = sequence_logps(reference, batch)
    pc, pr = policy.chunk(2)
    lc, lr = lengths.chunk(2)
    rc, rr = ref.chunk(2)
    if kind == "simpo":  # no reference model: only the margin, (gamma/beta)|y_w| and 0
        torch.testing.assert_close(batch["ref_chosen_logps"], 0.25 * lc)
        torch.testing.assert_close(batch["ref_rejected_logps"], torch.zeros(4))
    else:  # precomputed from the untouched model, on the masked tokens only
        torch.testing.assert_close(batch["ref_chosen_logps"], rc, atol=1e-4, rtol=0)
        torch.testing.assert_close(batch["ref_rejected_logps"], rr, atol=1e-4, rtol=0)
    expected = reference_loss(kind, beta, 0.5, 0.2, pc, pr, rc, rr, lc, lr)
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch)
    assert got.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
