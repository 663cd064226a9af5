"""Held-out evaluation: pass@k arithmetic, answer checks, and a real run through vLLM."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from align.evaluate import format_table, is_correct, pass_at_k
from align.modeling import load_model
from align.rewarding import RewardSpec
from align.tokenizer import encode_prompts
from pipelines import evaluate as eval_stage
from tests.conftest import shared_engine


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 4, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(3, 1, 3) == 1.0


def test_is_correct_uses_the_task_verifier_and_exact_match_otherwise():
    add_row = {"task": "add", "answer": "46"}
    assert is_correct(add_row, "<answer>046</answer>")
    assert not is_correct(add_row, "<answer>47</answer>")
    assert not is_correct(add_row, "46")
    custom = {"task": "mine", "answer": "Paris"}
    assert is_correct(custom, "<answer> Paris </answer>")
    assert not is_correct(custom, "<answer>paris</answer>")
    assert not is_correct({"answer": "x"}, "<answer>x")


@pytest.mark.vllm
def test_eval_stage_matches_an_independent_greedy_check(memorized, tmp_path):
    """`align eval` on a model that memorised half of the rows: its greedy accuracy equals the
    accuracy computed from transformers' greedy generate with the task verifiers."""
    rows = memorized["seen"] + memorized["unseen"]
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = eval_stage.Config(
        model=str(memorized["checkpoint"]),
        data=str(data),
        name="ev",
        runs_dir=str(tmp_path / "runs"),
        pass_k=2,
        samples=4,
        max_new_tokens=12,
        rewards=[RewardSpec(name="answer_match"), RewardSpec(name="answer_format", weight=0.5)],
    )
    report = eval_stage.run(config, llm=shared_engine(memorized["checkpoint"]))

    tokenizer = AutoTokenizer.from_pretrained(memorized["checkpoint"])
    model = load_model(memorized["checkpoint"])
    expected = []
    for row, prompt in zip(
        rows, encode_prompts(tokenizer, [r["prompt"] for r in rows]), strict=True
    ):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
        expected.append(
            is_correct(row, tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True))
        )

    assert report["n"] == 16
    assert report["greedy_accuracy"] == pytest.approx(sum(expected) / 16)
    assert sum(expected[:8]) >= 7, "the memorised rows must be answered"
    assert report["by_task"]["add"]["n"] == report["by_task"]["sort"]["n"] == 8
    assert [g["n"] for g in report["groups"]] == [8, 8]
    # Per row, pass@1 (the share of right samples) never exceeds pass@2; the memorised rows
    # are answered when sampled too.
    assert 0.0 < report["sample_accuracy"] <= report["pass@2"]
    saved = json.loads((tmp_path / "runs" / "ev" / "eval.json").read_text())
    assert saved["greedy_accuracy"] == report["greedy_accuracy"]
    assert (tmp_path / "runs" / "ev" / "config.yaml").is_file()
    metrics = json.loads((tmp_path / "runs" / "ev" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["eval/greedy_accuracy"] == report["greedy_accuracy"]
    assert metrics["eval/level_1/pass@2"] == report["by_level"]["1"]["pass@2"]
    assert list((tmp_path / "runs" / "ev" / "tb").glob("events.out.tfevents.*"))
    assert "add" in format_table(report) and "pass@2" in format_table(report)
    # The rewards, on the same sampled completions: answer_match is the verifier's 0/1, so its
    # mean is the sample accuracy; the total is the weighted sum of the means.
    assert report["reward/answer_match"] == pytest.approx(report["sample_accuracy"])
    assert report["reward/total"] == pytest.approx(
        report["reward/answer_match"] + 0.5 * report["reward/answer_format"]
    )
    for task, table in report["by_task"].items():
        assert table["reward/answer_match"] == pytest.approx(table["sample_accuracy"]), task
    assert metrics["eval/reward/answer_format"] == report["reward/answer_format"]
    assert "mean reward of the sampled completions: answer_match" in format_table(report)
