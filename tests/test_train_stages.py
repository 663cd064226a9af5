"""`align sft` and `align dpo` end to end on the tiny model: loss, resume, LoRA, checkpoints."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
import yaml
from datasets import Dataset, load_from_disk
from safetensors.torch import load_file

from align.config import ConfigError
from align.rewarding import RewardSpec
from align.tasks import make_problems, split_problems, to_chat, to_dpo, to_rl, to_sft
from align.training import LoraSettings, TrainSettings
from pipelines import dpo, sft
from tests.conftest import write_jsonl
from tests.helpers import Crash, CrashAfterSave, align, logged, sft_config


def test_sft_lowers_the_loss_and_resumes_where_it_stopped(tmp_path, student_dir, sft_file):
    whole = sft.run(sft_config(tmp_path, student_dir, sft_file, "whole"))
    run_dir = tmp_path / "runs" / "whole"
    losses = logged(run_dir, "train/loss")
    assert whole["steps"] == 12 == len(losses)  # 32 rows / 8 per step x 3 epochs
    assert losses[-1] < 0.75 * losses[0]
    assert (run_dir / "expert_load.png").exists()
    shares = json.loads((run_dir / "expert_load.json").read_text())["share_per_expert"]
    assert len(shares) == 2 and all(sum(row) == pytest.approx(1.0) for row in shares.values())

    config = sft_config(tmp_path, student_dir, sft_file, "interrupted")
    with pytest.raises(Crash):
        sft.run(config, callbacks=[CrashAfterSave(step=6)])
    interrupted = tmp_path / "runs" / "interrupted"
    assert not (interrupted / "model").exists()
    resumed = sft.run(config)
    assert resumed["steps"] == 12
    # The resumed run did steps 7-12 only, and ends with the same weights as the whole run.
    assert len(logged(interrupted, "train/loss")) == 12
    assert (
        json.loads(
            (interrupted / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text()
        )["log_history"][6]["step"]
        == 7
    )
    a = load_file(str(run_dir / "model" / "model.safetensors"))
    b = load_file(str(interrupted / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-5, name
    # A finished run is not trained again.
    assert sft.run(config)["train_loss"] == resumed["train_loss"]


def test_lora_trains_only_the_adapted_modules_and_saves_them_merged(
    tmp_path, student_dir, sft_file
):
    config = sft_config(tmp_path, student_dir, sft_file, "lora", epochs=1.0)
    config.lora = LoraSettings(enabled=True, r=4, alpha=8)
    sft.run(config)
    base = load_file(str(student_dir / "model.safetensors"))
    tuned = load_file(str(tmp_path / "runs" / "lora" / "model" / "model.safetensors"))
    assert tuned.keys() == base.keys()  # merged: a plain checkpoint, no adapter weights
    changed = {name for name in base if not (base[name] == tuned[name]).all()}
    assert changed and all(
        name.split(".")[-2] in LoraSettings().target_modules for name in changed
    ), changed
    assert not any("router" in name or "experts" in name for name in changed)


def test_token_budget_bounds_the_training(tmp_path, student_dir, sft_file):
    result = sft.run(sft_config(tmp_path, student_dir, sft_file, "budget", token_budget=3000))
    assert 3000 <= result["budget_tokens"] < 3000 + 60  # stops at the row that reaches it
    tokens = logged(tmp_path / "runs" / "budget", "train/num_tokens")[-1]
    assert tokens == result["budget_tokens"]  # the trainer saw exactly the budgeted rows


@pytest.mark.parametrize("schema", ["chat", "text"])
def test_sft_reads_conversations_and_plain_text_without_being_told(tmp_path, student_dir, schema):
    """A TRL `messages` file and a language-modelling `text` file train under the default
    schema (auto), every token counted as the token budget counted it."""
    problems = make_problems(["add", "sort"], [1, 2], 8, seed=4)
    rows = list(to_chat(problems))
    if schema == "text":
        rows = [{"text": f"{r['messages'][0]['content']} {r['answer']}"} for r in rows]
    data = write_jsonl(tmp_path / f"{schema}.jsonl", rows)
    result = sft.run(sft_config(tmp_path, student_dir, data, schema, token_budget=800))
    assert result["data"]["schema"] == schema
    tokens = logged(tmp_path / "runs" / schema, "train/num_tokens")[-1]
    assert tokens == result["budget_tokens"] >= 800
    losses = logged(tmp_path / "runs" / schema, "train/loss")
    assert losses and all(loss > 0 for loss in losses)


def test_dpo_lowers_the_loss_and_resumes_where_it_stopped(tmp_path, student_dir):
    rows = list(to_dpo(make_problems(["add", "sort"], [1, 2], 8, seed=4)))
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)

    def config(name):
        return dpo.Config(
            model=str(student_dir),
            data=data,
            name=name,
            runs_dir=str(tmp_path / "runs"),
            train=TrainSettings(
                batch_size=8, epochs=3.0, learning_rate=1e-3, logging_steps=1, save_steps=2
            ),
        )

    whole = dpo.run(config("whole"))
    losses = logged(tmp_path / "runs" / "whole", "train/loss")
    assert whole["steps"] == 12 and losses[-1] < losses[0]
    margins = logged(tmp_path / "runs" / "whole", "train/rewards/margins")
    assert margins[-1] > 0  # chosen answers gained on rejected ones

    with pytest.raises(Crash):
        dpo.run(config("interrupted"), callbacks=[CrashAfterSave(step=4)])
    resumed = dpo.run(config("interrupted"))
    assert resumed["steps"] == 12
    assert len(logged(tmp_path / "runs" / "interrupted", "train/loss")) == 12
    a = load_file(str(tmp_path / "runs" / "whole" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "runs" / "interrupted" / "model" / "model.safetensors"))
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-5, name


DROP_BY_LEVEL = {"1": 0.5, "2": 0.5, "3": 0.0, "4": 0.75}


@pytest.mark.vllm
def test_sft_cli_filters_by_difficulty_trains_and_evaluates(tmp_path, partially_trained):
    train, heldout = split_problems(make_problems(["sort"], [1, 2, 3, 4], 16, seed=5), 0.25, 0)
    config = {
        "model": str(partially_trained["checkpoint"]),
        "data": write_jsonl(tmp_path / "train.jsonl", list(to_sft(train))),
        "heldout": write_jsonl(tmp_path / "heldout.jsonl", list(to_rl(heldout))),
        "name": "sft",
        "runs_dir": str(tmp_path / "runs"),
        "filters": [
            {
                "name": "difficulty",
                "options": {"model": str(partially_trained["checkpoint"]), "samples": 4},
                # Each level its own share: the easiest half of levels 1-2, none of level 3.
                "keep": {"drop_lowest": DROP_BY_LEVEL, "group_by": "level"},
            }
        ],
        "train": {"batch_size": 8, "epochs": 2.0, "logging_steps": 1},
        "eval": {"samples": 2, "pass_k": 1, "max_new_tokens": 16},
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    out = align("sft", "--config", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "sft"
    kept = load_from_disk(str(run_dir / "filter" / "kept"))
    per_level = Counter(row["level"] for row in train)
    assert Counter(kept["level"]) == {
        level: n - round(DROP_BY_LEVEL[str(level)] * n) for level, n in per_level.items()
    }
    assert len(kept) < len(train)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 2 * (len(kept) // 8 + (len(kept) % 8 > 0))
    # The checkpoint loads in vLLM: every held-out row was answered.
    report = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert report["n"] == len(heldout) and report["model"] == str(run_dir / "model")
    assert "held-out evaluation" in out.stdout
    # The terminal: one progress line for the training (named after the run, with the loss),
    # not the trainer's dict per log; after it, the evaluation's vLLM batches draw no bars (the
    # difficulty filter's scoring pass, a long one, keeps its bar).
    assert "sft: 100%" in out.stderr and "loss=" in out.stderr
    assert "{'loss'" not in out.stdout + out.stderr
    assert "Processed prompts" not in out.stderr.rsplit("sft: 100%", 1)[1]


@pytest.mark.vllm
def test_dpo_cli_pairs_the_models_own_rollouts_and_evaluates(tmp_path, partially_trained):
    from align.tasks import get_task

    prompts = list(to_rl(make_problems(["sort"], [3, 4], 12, seed=6)))
    config = {
        "model": str(partially_trained["checkpoint"]),
        "pairs": {
            "prompts": write_jsonl(tmp_path / "prompts.jsonl", prompts),
            "samples": 8,
            "min_margin": 0.5,
            "max_prompts": 18,
        },
        "heldout": write_jsonl(tmp_path / "heldout.jsonl", prompts[:8]),
        "name": "dpo",
        "runs_dir": str(tmp_path / "runs"),
        "train": {"batch_size": 4, "epochs": 1.0, "logging_steps": 1},
        "eval": {"samples": 2, "pass_k": 1, "max_new_tokens": 16},
    }
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(config))
    out = align("dpo", "--config", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "dpo"
    stats = json.loads((run_dir / "pairs.json").read_text())
    # Pairs from a seeded draw of 18 of the 24 prompts (pairs.max_prompts).
    assert stats["pairs"] + stats["below_margin"] + stats["unscored"] == 18 < len(prompts)
    pairs = load_from_disk(str(run_dir / "pairs"))
    drawn = dpo.draw_prompts(Dataset.from_list(prompts), 18, seed=0)
    assert {p["id"] for p in pairs} <= set(drawn["id"])
    assert len(pairs) == stats["pairs"] > 0
    for pair in pairs:  # best vs worst by answer_match: a right and a wrong answer
        task = get_task(pair["task"])
        assert pair["chosen_reward"] - pair["rejected_reward"] >= 0.5
        assert task.check(pair["chosen"][0]["content"], pair["answer"])
        assert not task.check(pair["rejected"][0]["content"], pair["answer"])
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == -(-len(pairs) // 4)
    report = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert report["n"] == 8 and report["model"] == str(run_dir / "model")


def test_pairs_draw_at_most_max_prompts_in_file_order():
    rows = Dataset.from_list([{"id": i} for i in range(30)])
    drawn = dpo.draw_prompts(rows, 10, seed=0)
    assert len(drawn) == 10 and drawn["id"] == sorted(drawn["id"])
    assert drawn["id"] == dpo.draw_prompts(rows, 10, seed=0)["id"]
    assert drawn["id"] != dpo.draw_prompts(rows, 10, seed=1)["id"]
    assert dpo.draw_prompts(rows, None, seed=0) is rows and dpo.draw_prompts(rows, 30, 0) is rows
    with pytest.raises(ConfigError, match="max_prompts"):
        dpo.PairSettings(prompts="p", max_prompts=0).validate()


def unscorable(prompts, completions, **_):
    """A reward that fails on every completion (NaN), like a broken reward service."""
    return [float("nan")] * len(completions)


@pytest.mark.vllm
def test_dpo_names_the_reward_when_too_few_completions_were_scored(tmp_path, partially_trained):
    from tests.conftest import shared_engine

    prompts = list(to_rl(make_problems(["sort"], [3, 4], 4, seed=6)))
    config = dpo.Config(
        model=str(partially_trained["checkpoint"]),
        pairs=dpo.PairSettings(
            prompts=write_jsonl(tmp_path / "prompts.jsonl", prompts),
            samples=4,
            rewards=[RewardSpec(name="tests.test_train_stages:unscorable")],
        ),
        runs_dir=str(tmp_path / "runs"),
    )
    llm = shared_engine(partially_trained["checkpoint"])
    with pytest.raises(ConfigError) as error:
        dpo.run(config, llm=llm)
    message = str(error.value)
    assert message.startswith("key 'pairs.rewards': no prompt gave a pair because the rewards")
    assert "8 of 8 prompts had fewer than two completions scored" in message
    assert "(faults: reward/tests.test_train_stages:unscorable/nonfinite: 32)" in message
    assert "min_margin" not in message


def test_sft_dpo_and_distillation_train_a_dense_model(tmp_path, student_dir, sft_file, caplog):
    """A dense checkpoint (no experts) through the three TRL stages with the default settings:
    the router loss and expert statistics are skipped, and the log says so once per stage."""
    from align.modeling import build_model, write_checkpoint
    from pipelines import distill

    caplog.set_level(logging.INFO, logger="align.training")
    dense = write_checkpoint(build_model("dense-student", seed=0), tmp_path / "dense")
    assert TrainSettings().router_aux_loss_coef > 0  # the default applies to MoE models

    tuned = sft.run(sft_config(tmp_path, dense, sft_file, "sft", epochs=2.0))
    run_dir = tmp_path / "runs" / "sft"
    losses = logged(run_dir, "train/loss")
    assert tuned["steps"] == 8 and losses[-1] < 0.75 * losses[0]
    assert not (run_dir / "expert_load.png").exists()
    assert not any(
        key.startswith("moe/")
        for key in json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    )

    pairs = write_jsonl(
        tmp_path / "pairs.jsonl", list(to_dpo(make_problems(["add", "sort"], [1, 2], 8, seed=4)))
    )
    train = TrainSettings(batch_size=8, learning_rate=1e-3, logging_steps=1, save_steps=100)
    dpo.run(
        dpo.Config(
            model=tuned["model"],
            data=pairs,
            name="dpo",
            runs_dir=str(tmp_path / "runs"),
            train=train,
        )
    )
    assert logged(tmp_path / "runs" / "dpo", "train/rewards/margins")[-1] > 0

    # A MoE teacher distilled into the dense student (same tokenizer, other architecture).
    distill.run(
        distill.Config(
            student=str(dense),
            data=sft_file,
            teacher=distill.TeacherSettings(model=str(student_dir), mode="offline", top_k=8),
            name="distill",
            runs_dir=str(tmp_path / "runs"),
            train=train,
        )
    )
    assert logged(tmp_path / "runs" / "distill", "train/loss")
    said = [r.getMessage() for r in caplog.records if "has no experts" in r.getMessage()]
    assert len(said) == 3 and all(m.startswith("Qwen3ForCausalLM has no experts") for m in said)
