"""scripts/answer_loss.py: the loss of each answer character by task, level and place."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from align.modeling import load_model
from tests.conftest import write_jsonl

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "answer_loss.py"


def _script():
    spec = importlib.util.spec_from_file_location("answer_loss", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_place_is_the_loss_of_that_answer_character(student_dir, sft_file):
    rows = [json.loads(line) for line in Path(sft_file).read_text().splitlines()][:6]
    model = load_model(student_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    losses = _script().answer_losses(model, tokenizer, rows)
    assert sum(len(v) for v in losses.values()) == sum(len(r["answer"]) for r in rows)
    # The places of one row sum to the model's own loss on the answer characters alone,
    # computed by the labels the trainer would use with everything else masked.
    row = rows[0]
    prompt = tokenizer.apply_chat_template(
        row["prompt"], tokenize=False, add_generation_prompt=True
    )
    answer_at = len(tokenizer(prompt + "<answer>", add_special_tokens=False).input_ids)
    ids = tokenizer(
        prompt + row["completion"][0]["content"], add_special_tokens=False, return_tensors="pt"
    ).input_ids
    labels = torch.full_like(ids, -100)
    labels[0, answer_at : answer_at + len(row["answer"])] = ids[
        0, answer_at : answer_at + len(row["answer"])
    ]
    with torch.no_grad():
        expected = model(ids, labels=labels).loss.item() * len(row["answer"])
    first = [losses[(row["task"], int(row["level"]), k)][0] for k in range(len(row["answer"]))]
    assert math.isclose(sum(first), expected, rel_tol=1e-4)


def test_data_without_the_make_data_columns_is_refused(student_dir, tmp_path, capsys):
    data = write_jsonl(
        tmp_path / "plain.jsonl",
        [{"prompt": "Compute 1+2.", "completion": "<answer>3</answer>"}],
    )
    with pytest.raises(SystemExit) as stop:
        _script().main([str(student_dir), data])
    assert stop.value.code == 2
    assert "plain.jsonl: no column(s) ['answer', 'level', 'task']" in capsys.readouterr().err
