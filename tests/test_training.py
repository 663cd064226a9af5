"""Shared training pieces: token budgets, expert load, packing, the SFT completion mask."""

from __future__ import annotations

import pytest
import torch
from trl import SFTConfig, SFTTrainer

from align.launch import TrainPlacement
from align.modeling import build_model, load_model
from align.moe import ExpertLoad, load_summary
from align.tasks import make_problems, to_sft
from align.tokenizer import build_tokenizer
from align.training import (
    LoraSettings,
    TrainSettings,
    budget_indices,
    fit_budget,
    model_dtype,
    token_count,
    trainer_arguments,
)


def test_budget_takes_whole_seeded_passes_then_cuts_the_last():
    counts = [10, 20, 30]  # 60 tokens per pass
    indices = budget_indices(counts, budget=100, seed=0)
    # First pass: every row once. Second pass: rows until the total reaches 100.
    assert sorted(indices[:3]) == [0, 1, 2]
    total = sum(counts[i] for i in indices)
    assert total >= 100 and total - counts[indices[-1]] < 100
    assert len(set(indices[3:])) == len(indices[3:])  # no row twice within a pass
    assert indices == budget_indices(counts, budget=100, seed=0)
    assert budget_indices(counts, budget=5, seed=0) in ([0], [1], [2])


def test_budget_refuses_nothing_to_draw_from():
    with pytest.raises(ValueError, match="token budget"):
        budget_indices([], budget=10, seed=0)


def test_fit_budget_repeats_small_data_to_the_budget():
    from datasets import Dataset

    dataset = Dataset.from_dict({"x": list(range(4))})
    settings = TrainSettings(token_budget=100)
    fitted, used = fit_budget(dataset, [10] * 4, settings, "rows")
    assert len(fitted) == 10 and used == 100
    assert sorted(fitted["x"]) == sorted(list(range(4)) * 2 + fitted["x"][8:])


def test_token_count_matches_the_chat_template():
    tokenizer = build_tokenizer()
    row = to_sft(make_problems(["add"], [1], 1, seed=0))[0]
    # <bos> <h_start> user <h_end> "Compute a+b." <eot> <h_start> assistant <h_end> answer <eot>
    rendered = tokenizer.apply_chat_template(row["prompt"] + row["completion"], return_dict=False)
    assert token_count(tokenizer, row["prompt"], row["completion"]) == len(rendered)
    text = "Compute 1+2."
    assert token_count(tokenizer, text, "3") == len(text) + 1 + 1  # chars, "3", EOS (no BOS)


def test_expert_load_counts_real_tokens_only():
    model = build_model("student", seed=0)
    load = ExpertLoad(model)
    ids_bt = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 0, 0]])
    mask_bt = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        out = model(input_ids=ids_bt, attention_mask=mask_bt, output_router_logits=True)
    # The model's own router logits per MoE layer, with padding rows removed, give the counts.
    assert len(out.router_logits) == len(load.layer_names) == 2
    for layer, logits_te in enumerate(out.router_logits):
        chosen = logits_te[mask_bt.reshape(-1).bool()].topk(1, dim=-1).indices.reshape(-1)
        expected = torch.bincount(chosen, minlength=4).double()
        assert torch.equal(load.counts_le[layer], expected)
    assert load.counts_le.sum(dim=1).tolist() == [8.0, 8.0]  # 8 real tokens per layer
    load.detach()
    with torch.no_grad():
        model(input_ids=ids_bt, attention_mask=mask_bt)
    assert load.counts_le.sum().item() == 16.0  # detached: nothing more counted


def test_expert_load_summary_hand_worked():
    load = ExpertLoad(build_model("qwen3-student", seed=0))
    load.counts_le.zero_()
    load.counts_le[0] = torch.tensor([40.0, 30.0, 20.0, 10.0])  # shares 0.4 0.3 0.2 0.1
    load.counts_le[1:] = 25.0  # uniform
    summary = load_summary(load.counts_le)
    assert summary["moe/load_max"] == pytest.approx(1.6)
    assert summary["moe/load_min"] == pytest.approx(0.4)
    assert summary["moe/load_cv"] == pytest.approx(0.2**0.5)


def test_dense_model_has_no_router_to_watch():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            num_hidden_layers=1,
            vocab_size=16,
            intermediate_size=64,
            num_attention_heads=2,
        )
    )
    with pytest.raises(ValueError, match="no MoE router"):
        ExpertLoad(dense)


@pytest.mark.parametrize("preset", ["student", "qwen3-student"])
def test_packed_sequences_do_not_see_each_other(preset):
    """Packing (padding-free rows with restarting position ids) gives each row the logits it
    gets alone, for both families on CPU attention: no token attends across rows."""
    model = build_model(preset, seed=0)
    a_t, b_t = torch.tensor([1, 4, 37, 35, 21, 34, 5, 61, 31]), torch.tensor([1, 4, 17, 35, 35])
    with torch.no_grad():
        alone_a = model(input_ids=a_t[None], use_cache=False).logits[0]
        alone_b = model(input_ids=b_t[None], use_cache=False).logits[0]
        positions = torch.cat([torch.arange(len(a_t)), torch.arange(len(b_t))])[None]
        packed = model(
            input_ids=torch.cat([a_t, b_t])[None], position_ids=positions, use_cache=False
        ).logits[0]
    torch.testing.assert_close(packed[: len(a_t)], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[len(a_t) :], alone_b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("packing", [False, True])
def test_sft_loss_covers_exactly_the_completion(tmp_path, student_dir, packing):
    """Token by token: label = the token on the completion (answer and end of turn), -100 on
    every prompt token (BOS, headers, user text, assistant header) and padding."""
    tokenizer = build_tokenizer()
    dataset = to_sft(make_problems(["add", "sort"], [1, 3], 2, seed=0)).select_columns(
        ["prompt", "completion"]
    )
    model = load_model(student_dir)
    args = SFTConfig(
        **trainer_arguments(
            TrainSettings(batch_size=8, max_length=64), tmp_path, model, TrainPlacement()
        ),
        packing=packing,
        completion_only_loss=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    expected_rows = []
    for row in dataset:
        prompt = tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, return_dict=False
        )
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], return_dict=False)
        expected_rows.append((full, [-100] * len(prompt) + full[len(prompt) :]))
    if packing:  # one row holding every sequence back to back
        found = []
        position = 0
        while position < len(ids[0]):
            seq, seq_labels = next(
                (f, la) for f, la in expected_rows if ids[0][position : position + len(f)] == f
            )
            assert labels[0][position : position + len(seq)] == seq_labels
            found.append(seq)
            position += len(seq)
        assert len(found) == len(expected_rows)
    else:
        for row_ids, row_labels in zip(ids, labels, strict=True):
            full, lab = next((f, la) for f, la in expected_rows if row_ids[: len(f)] == f)
            assert row_labels[: len(full)] == lab
            assert all(x == -100 for x in row_labels[len(full) :])  # padding


def test_frozen_weights_load_in_bf16_under_bf16_precision_and_trained_ones_in_fp32():
    lora = LoraSettings(enabled=True)
    assert model_dtype(TrainSettings(precision="bf16"), lora) == torch.bfloat16
    assert model_dtype(TrainSettings(precision="bf16"), LoraSettings()) == torch.float32
    assert model_dtype(TrainSettings(precision="fp32"), lora) == torch.float32
    # auto is bf16 only where a GPU supports it: fp32 on this CPU machine.
    assert model_dtype(TrainSettings(precision="auto"), lora) == torch.float32
