"""`align distill` end to end on tiny models: tokenizer check, offline top-k cache, KL, resume."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from align.distill.teachers import engine_topk, transformers_topk
from align.losses.distill import IGNORE_INDEX, AlphaSchedule, DistillLossSettings
from align.modeling import build_model, load_model, write_checkpoint
from align.tasks import make_problems, split_problems, to_sft
from align.tokenizer import build_tokenizer
from align.training import LoraSettings, TrainSettings
from pipelines import distill
from tests.conftest import memorize, shared_engine, write_jsonl
from tests.helpers import Crash, CrashAfterSave, align, logged

# fp16 storage of the cached logprobs: the offline loss with k = V matches the online one to this.
FP16_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def problems():
    train, heldout = split_problems(make_problems(["add", "sort"], [1, 2], 20, seed=3), 0.2, 0)
    return train, heldout


@pytest.fixture(scope="module")
def files(tmp_path_factory, problems):
    root = tmp_path_factory.mktemp("data")
    train, heldout = problems
    return {
        "train": write_jsonl(root / "train.jsonl", list(to_sft(train))),
        "heldout": write_jsonl(root / "heldout.jsonl", list(to_sft(heldout))),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory, problems):
    """A random student and a teacher (same preset, other seed) that memorised the train rows."""
    from align.tasks import to_rl

    root = tmp_path_factory.mktemp("models")
    student = write_checkpoint(build_model("student", seed=0), root / "student")
    teacher_model = build_model("student", seed=1)
    memorize(teacher_model, build_tokenizer(), list(to_rl(problems[0]))[:64], steps=60)
    teacher = write_checkpoint(teacher_model, root / "teacher")
    return {"student": student, "teacher": teacher}


def config(tmp_path, models, files, name, **teacher) -> distill.Config:
    return distill.Config(
        student=str(models["student"]),
        data=files["train"],
        teacher=distill.TeacherSettings(model=str(models["teacher"]), **teacher),
        name=name,
        runs_dir=str(tmp_path / "runs"),
        loss=DistillLossSettings(alpha=AlphaSchedule(kind="constant", alpha_start=0.5)),
        train=TrainSettings(
            batch_size=16, epochs=1.0, learning_rate=3e-3, logging_steps=1, save_steps=2
        ),
    )


def test_teacher_with_another_tokenizer_or_vocab_size_is_refused(tmp_path, models, files):
    other = tmp_path / "other-teacher"
    shutil.copytree(models["teacher"], other)
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<extra-token>"])
    tokenizer.save_pretrained(str(other))
    cfg = config(tmp_path, models, files, "mismatch")
    cfg.teacher.model = str(other)
    with pytest.raises(ValueError, match="different tokenizers") as error:
        distill.run(cfg)
    assert str(other) in str(error.value) and str(models["student"]) in str(error.value)
    assert "<extra-token>" in str(error.value)
    assert not (tmp_path / "runs").exists(), "refused before anything is written"

    # Same tokenizer, but the model's output layer covers more ids than the student's.
    shutil.rmtree(other)
    shutil.copytree(models["teacher"], other)
    model_config = json.loads((other / "config.json").read_text())
    model_config["vocab_size"] += 8
    (other / "config.json").write_text(json.dumps(model_config))
    with pytest.raises(ValueError, match="vocab_size") as error:
        distill.run(cfg)
    assert str(other) in str(error.value) and str(models["student"]) in str(error.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.vllm
def test_offline_top_k_matches_online_and_the_cache_is_reused_or_refused(
    tmp_path, models, files, caplog
):
    caplog.set_level(logging.INFO, logger="pipelines.distill")
    vocab = len(build_tokenizer())
    online = distill.run(config(tmp_path, models, files, "online"))
    # The cache built by a vLLM engine serving the teacher (the session's engine: one dropped
    # in this process would take the session's other engines with it).
    llm = shared_engine(models["teacher"], max_logprobs=vocab)
    full_config = config(tmp_path, models, files, "full", mode="offline", top_k=vocab)
    full_config.teacher.cache_builder = "vllm"
    full = distill.run(full_config, llm=llm)
    runs = tmp_path / "runs"
    assert online["steps"] == full["steps"] == 4  # 64 rows / 16 per step
    for key in ("train/loss", "train/soft_loss", "train/hard_loss", "train/teacher_kl"):
        a, b = logged(runs / "online", key), logged(runs / "full", key)
        assert len(a) == len(b) == 4
        # Step 1: same weights, same batch; only vLLM's forward and the fp16 storage differ.
        assert b[0] == pytest.approx(a[0], abs=FP16_TOLERANCE), key
        assert b == pytest.approx(a, abs=5 * FP16_TOLERANCE), key
    manifest = json.loads((runs / "full" / "teacher_cache" / "manifest.json").read_text())
    assert manifest["top_k"] == vocab and manifest["rows"] == 64
    assert manifest["built_with"] == "vllm"
    assert manifest["positions"] > 64
    assert manifest["build_seconds"] > 0

    # A small k, built by a transformers forward (the default builder): the truncated teacher
    # loses its tail mass, so the loss moves a little.
    cache = tmp_path / "cache-k8"
    small = config(tmp_path, models, files, "k8", mode="offline", top_k=8, cache_dir=str(cache))
    distill.run(small)
    built = json.loads((cache / "manifest.json").read_text())["built_with"]
    assert built == "transformers"
    a, b = logged(runs / "online", "train/loss"), logged(runs / "k8", "train/loss")
    assert b[0] == pytest.approx(a[0], rel=0.05) and b[0] != pytest.approx(a[0], abs=1e-6)

    # Reused: a second run with the same settings does not rewrite the cache.
    written = (cache / "topk.safetensors").stat().st_mtime_ns
    distill.run(
        config(tmp_path, models, files, "k8-again", mode="offline", top_k=8, cache_dir=str(cache))
    )
    assert (cache / "topk.safetensors").stat().st_mtime_ns == written
    assert f"reusing the teacher cache in {cache}" in caplog.text

    # Refused: another k, or other data, with the same cache directory.
    other_k = config(tmp_path, models, files, "k4", mode="offline", top_k=4, cache_dir=str(cache))
    with pytest.raises(ValueError, match="top_k: cached 8, wanted 4"):
        distill.run(other_k)
    rows_2 = dict(
        files,
        train=write_jsonl(
            tmp_path / "two.jsonl",
            [
                {
                    "prompt": [{"role": "user", "content": "Compute 99+1."}],
                    "completion": [{"role": "assistant", "content": "<answer>100</answer>"}],
                }
            ],
        ),
    )
    other_data = config(
        tmp_path, models, rows_2, "other-data", mode="offline", top_k=8, cache_dir=str(cache)
    )
    with pytest.raises(ValueError, match="lacks 1 of the 1 training sequences"):
        distill.run(other_data)


@pytest.mark.vllm
@pytest.mark.parametrize("family", ["llama4", "qwen3_moe"])
def test_the_vllm_built_cache_equals_the_transformers_built_one(family, checkpoints, engine_for):
    """Both cache builders on the same rows: the same top-k ids, logprobs within 1e-4 (fp32)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[family])
    conversations = [
        [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": f"<answer>{answer}</answer>"},
        ]
        for prompt, answer in [("Compute 47+85.", 132), ("Sort: hbad", "abdh"), ("Compute 3+4.", 7)]
    ]
    # A collated batch as the trainer's collator gives it: right-padded, labels on the answer.
    rows = []
    for conversation in conversations:
        prompt = tokenizer.apply_chat_template(
            conversation[:1], add_generation_prompt=True, return_dict=False
        )
        full = tokenizer.apply_chat_template(conversation, return_dict=False)
        rows.append((full, [IGNORE_INDEX] * len(prompt) + full[len(prompt) :]))
    width = max(len(ids) for ids, _ in rows)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, labels in rows:
        pad = width - len(ids)
        batch["input_ids"].append(ids + [0] * pad)
        batch["attention_mask"].append([1] * len(ids) + [0] * pad)
        batch["labels"].append(labels + [IGNORE_INDEX] * pad)
    batch = {name: torch.tensor(values) for name, values in batch.items()}
    k = 8
    built = list(transformers_topk(load_model(checkpoints[family]), [batch], k))
    served = list(engine_topk(engine_for(family), [batch], k))
    assert len(built) == len(served) == 3
    for (key_a, ids_a, lp_a), (key_b, ids_b, lp_b), (_, labels) in zip(
        built, served, rows, strict=True
    ):
        assert key_a == key_b
        targets = sum(label != IGNORE_INDEX for label in labels[1:])
        assert ids_a.shape == ids_b.shape == lp_a.shape == lp_b.shape == (targets, k)
        assert torch.equal(ids_a, ids_b)
        assert (lp_a - lp_b).abs().max().item() <= 1e-4
        # Most likely first, and real logprobs (a distribution's top k sum to at most 1).
        assert (lp_b[:, :-1] >= lp_b[:, 1:]).all() and (lp_b.exp().sum(-1) <= 1 + 1e-5).all()


def test_distillation_lowers_the_kl_to_the_teacher_and_resumes(tmp_path, models, files):
    def cfg(name):
        c = config(tmp_path, models, files, name)
        c.heldout_sft = files["heldout"]
        c.train.epochs = 3.0  # 12 steps
        return c

    whole = distill.run(cfg("whole"))
    runs = tmp_path / "runs"
    kl = logged(runs / "whole", "train/teacher_kl")
    assert whole["steps"] == 12 == len(kl)
    assert kl[-1] < 0.75 * kl[0]
    before, after = whole["heldout_before"], whole["heldout_after"]
    assert after["teacher_kl"] < 0.8 * before["teacher_kl"]
    assert after["ce"] < before["ce"]
    assert logged(runs / "whole", "train/alpha") == [0.5] * 12
    for key in ("train/soft_loss", "train/hard_loss", "train/effective_alpha"):
        assert len(logged(runs / "whole", key)) == 12, key

    # Interrupted after the checkpoint of step 6, then run again: steps 7-12, same weights.
    with pytest.raises(Crash):
        distill.run(cfg("interrupted"), callbacks=[CrashAfterSave(step=6)])
    interrupted = runs / "interrupted"
    assert not (interrupted / "model").exists()
    resumed = distill.run(cfg("interrupted"))
    assert resumed["steps"] == 12 and resumed["heldout_before"] is None
    assert len(logged(interrupted, "train/teacher_kl")) == 12
    state = json.loads(
        (interrupted / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text()
    )
    assert state["log_history"][6]["step"] == 7
    a = load_file(str(runs / "whole" / "model" / "model.safetensors"))
    b = load_file(str(interrupted / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-5, name
    assert resumed["heldout_after"]["teacher_kl"] == pytest.approx(after["teacher_kl"], rel=1e-4)


def test_lora_distils_into_the_adapted_modules_only(tmp_path, models, files):
    cfg = config(tmp_path, models, files, "lora")
    cfg.lora = LoraSettings(enabled=True, r=4, alpha=8)
    distill.run(cfg)
    base = load_file(str(models["student"] / "model.safetensors"))
    tuned = load_file(str(tmp_path / "runs" / "lora" / "model" / "model.safetensors"))
    assert tuned.keys() == base.keys()
    changed = {name for name in base if not (base[name] == tuned[name]).all()}
    assert changed and all(name.split(".")[-2] in LoraSettings().target_modules for name in changed)


def test_on_policy_steps_train_on_the_students_own_samples(tmp_path, models, files):
    """Through the CLI: an in-process vLLM engine must not share this process's vLLM state."""
    out = align(
        "distill",
        f"student={models['student']}",
        f"data={files['train']}",
        f"teacher.model={models['teacher']}",
        f"runs_dir={tmp_path}",
        "name=gkd",
        "train.batch_size=16",
        "train.logging_steps=1",
        "on_policy.ratio=0.5",
        "on_policy.refresh_every=2",
        "on_policy.max_new_tokens=8",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "gkd"
    assert logged(run_dir, "train/on_policy") == [0.0, 1.0, 0.0, 1.0]
    # On-policy steps take no CE on gold labels: alpha is 1 there, the configured 0.5 elsewhere.
    assert logged(run_dir, "train/alpha") == [0.5, 1.0, 0.5, 1.0]
    assert all(math.isfinite(x) for x in logged(run_dir, "train/loss"))
    log_text = (run_dir / "log.txt").read_text()
    # Exports at the first on-policy step (1) and again at step 3 (refresh_every 2).
    assert log_text.count("synced weights from") == 2
    assert (run_dir / "model" / "model.safetensors").is_file()


def test_on_policy_needs_an_online_teacher(tmp_path, models, files, quick_align):
    out = quick_align(
        "distill",
        f"student={models['student']}",
        f"data={files['train']}",
        f"teacher.model={models['teacher']}",
        "teacher.mode=offline",
        "on_policy.ratio=0.5",
        f"runs_dir={tmp_path}",
    )
    assert out.returncode == 2 and "on_policy.ratio" in out.stderr and "online" in out.stderr
