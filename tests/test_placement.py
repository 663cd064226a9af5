"""Where the RL stage's actors go: the placement report of `--dry-run`, the learner's memory per
GPU from a model's config.json, and refusals of placements that cannot fit the declared cluster.

Qwen3-30B-A3B's config.json (the GPU pipeline's policy) is written here from its published
values: no weights are needed, the arithmetic counts parameters on the meta device.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from align.config import ConfigError, from_dict, load_config
from align.launch import TrainPlacement
from align.launch import plan as train_plan
from align.modeling import read_config
from align.rl.placement import GIB, Cluster, ModelShape, learner_memory
from align.training import TrainSettings
from pipelines import pipeline, rl

REPO_ROOT = Path(__file__).resolve().parents[1]
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


# Llama 4 Scout's config.json (the multimodal checkpoint: the language model's settings nested).
LLAMA4_SCOUT = {
    "architectures": ["Llama4ForConditionalGeneration"],
    "model_type": "llama4",
    "text_config": {
        "model_type": "llama4_text",
        "hidden_size": 5120,
        "intermediate_size": 8192,
        "intermediate_size_mlp": 16384,
        "num_hidden_layers": 48,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "num_local_experts": 16,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 1,
        "vocab_size": 202048,
        "max_position_embeddings": 10485760,
        "attention_chunk_size": 8192,
        "use_qk_norm": True,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "model_type": "llama4_vision_model",
        "hidden_size": 1408,
        "num_hidden_layers": 34,
        "image_size": 336,
        "patch_size": 14,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


@pytest.fixture(scope="module")
def llama4_scout(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llama4-scout")
    (directory / "config.json").write_text(json.dumps(LLAMA4_SCOUT))
    return directory


@pytest.fixture(scope="module")
def qwen3_30b(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("qwen3-30b-a3b")
    (directory / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    return directory


def test_the_learner_memory_of_qwen3_30b_on_16_ranks(qwen3_30b):
    shape = ModelShape.from_config(read_config(qwen3_30b))
    assert round(shape.parameters / 1e9, 2) == 30.53 and shape.layers == 48
    memory = learner_memory(shape, 16, 1, 4096, False, True, False)
    # 16 bytes per parameter over 16 ranks: the parameter count in GiB.
    assert memory.sharded == 16 * shape.parameters / 16
    assert memory.logits == 10 * 4096 * 151936
    assert round(memory.total / GIB, 1) == 42.2
    # Offloaded: no sharded state on the GPU; without checkpointing: activations of 48 layers.
    assert learner_memory(shape, 16, 1, 4096, True, True, False).sharded == 0
    no_checkpointing = learner_memory(shape, 16, 1, 4096, False, False, False)
    assert no_checkpointing.activations == 34 * 2048 * 4096 * 48
    # LoRA: the frozen fp32 policy, 4 bytes per parameter, and no gradients in flight.
    lora = learner_memory(shape, 16, 1, 4096, False, True, False, lora=True)
    assert lora.sharded == 4 * shape.parameters / 16
    assert lora.in_flight == memory.in_flight / 2


def dry_run(*overrides: str) -> str:
    """What `align run pipelines/qwen3-moe-gpu.yaml --dry-run OVERRIDES` prints (in-process)."""
    path = REPO_ROOT / "pipelines" / "qwen3-moe-gpu.yaml"
    config = load_config(pipeline.Config, path, list(overrides))
    return pipeline.plan(config, pipeline.resolve_stages(config, str(path)))


def test_the_dry_run_reads_a_make_model_preset_without_writing_anything(tmp_path, monkeypatch):
    """The default pipeline's RL policy starts from a preset no stage has built yet: its
    shape comes from the preset's config, and the dry run writes nothing (it used to save the
    config into a temporary directory that a process ended by a signal never removed)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = REPO_ROOT / "pipelines" / "default.yaml"
    config = load_config(pipeline.Config, path, [f"runs_dir={tmp_path / 'runs'}"])
    report = pipeline.plan(config, pipeline.resolve_stages(config, str(path)))
    assert "policy   3.6 M parameters, 6 layers (preset teacher of stage 'teacher')" in report
    assert list(tmp_path.iterdir()) == []


def test_the_plan_lists_an_engine_only_for_a_plugin_that_serves_a_model():
    """over_refusal takes engine settings for its optional judge: with phrases only (the
    safety pipeline) it starts no engine, and the plan lists none; with a judge it does."""
    path = REPO_ROOT / "pipelines" / "safety.yaml"
    config = load_config(pipeline.Config, path)
    (rl,) = [c for entry, c in pipeline.resolve_stages(config, str(path)) if entry.name == "rl"]
    keys = [key for key, _ in pipeline.engines(rl)]
    assert "rewards[0].options.engine" in keys and "rewards[1].options.engine" not in keys
    config = load_config(pipeline.Config, path, ["stages.8.config.rewards.1.options.judge_model=j"])
    (rl,) = [c for entry, c in pipeline.resolve_stages(config, str(path)) if entry.name == "rl"]
    assert "rewards[1].options.engine" in [key for key, _ in pipeline.engines(rl)]


def test_the_dry_run_follows_the_policy_back_to_its_checkpoint_and_reports_it(qwen3_30b):
    # The RL stage trains the SFT stage's output, which starts from this config.
    report = dry_run(f"stages.3.config.model={qwen3_30b}")
    assert f"policy   30.53 B parameters, 48 layers (config.json in {qwen3_30b})" in report
    assert "learner  per GPU: 42.2 GiB = sharded state 28.4 GiB" in report
    assert "worker   per GPU: weights 28.4 GiB" in report
    # Four ranks cannot hold the sharded state: refused, naming the stage, key and numbers.
    with pytest.raises(ConfigError) as refused:
        dry_run(f"stages.3.config.model={qwen3_30b}", "stages.4.config.placement.learners=4")
    message = str(refused.value)
    assert "stage 'rl'" in message and "key 'placement.cluster'" in message
    assert "the learner needs about 127" in message and "add learners" in message


def test_the_refusal_is_exit_status_2_of_the_command(qwen3_30b, quick_align):
    pipeline_file = str(REPO_ROOT / "pipelines" / "qwen3-moe-gpu.yaml")
    out = quick_align(
        "run",
        pipeline_file,
        "--dry-run",
        f"stages.3.config.model={qwen3_30b}",
        "stages.4.config.placement.learners=4",
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "key 'placement.cluster'" in out.stderr


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        ({"workers": 9, "worker_gpus": 2}, "34 GPUs do not fit 4 node(s) x 8 GPUs"),
        ({"workers": 1, "worker_gpus": 16}, "a worker needs 16 GPUs but a node has 8"),
        ({"learners": 30, "workers": 1, "worker_gpus": 4}, "do not fit 4 node(s) x 8 GPUs"),
    ],
)
def test_a_placement_that_cannot_fit_the_cluster_is_refused(placement, message):
    data = {
        "model": "m",
        "data": "d",
        "engine": {"tensor_parallel_size": placement.get("worker_gpus", 1)},
        "placement": {
            "learners": 16,
            "learner_gpus": 1,
            "cluster": {"nodes": 4, "gpus_per_node": 8, "gpu_memory_gib": 80},
            **placement,
        },
    }
    with pytest.raises(ConfigError, match="placement.cluster") as refused:
        from_dict(rl.Config, data, source="rl.yaml")
    assert message in str(refused.value)


def test_worker_gpus_must_match_the_engines_tensor_parallelism():
    data = {"model": "m", "data": "d", "placement": {"worker_gpus": 2}}
    with pytest.raises(ConfigError, match="must equal engine.tensor_parallel_size"):
        from_dict(rl.Config, data, source="rl.yaml")


def test_a_training_stages_memory_per_gpu(qwen3_30b):
    """LoRA on data-parallel ranks holds the frozen bf16 weights on every GPU; FSDP divides
    them (and a full-parameter state of 16 bytes per parameter) over the processes."""
    shape = ModelShape.from_config(read_config(qwen3_30b))
    train = TrainSettings(
        batch_size=1, max_length=4096, precision="bf16", gradient_checkpointing=True
    )
    lines, problem = train_plan(TrainPlacement(processes=8, sharding="ddp"), train, True, shape)
    # 2 x 30.53 B = 56.9 GiB + logits 10 x 4096 x 151936 = 5.8 GiB + activations 1.0 GiB.
    assert "trainer  per GPU: 63.7 GiB = frozen weights 56.9 GiB" in lines[1] and problem is None
    cluster = Cluster(nodes=1, gpus_per_node=8, gpu_memory_gib=80)
    full = TrainPlacement(processes=8, sharding="fsdp", cluster=cluster)
    lines, problem = train_plan(full, train, False, shape)
    # 16 x 30.53 B / 8 = 56.9 GiB + 7.0 GiB of layers in flight: inside 90% of 80 GiB, barely.
    assert "trainer  per GPU: 70.6 GiB = state 56.9 GiB + layers in flight 7.0 GiB" in lines[1]
    assert problem is None
    longer = replace(train, max_length=8192)
    _, problem = train_plan(full, longer, False, shape)
    assert problem is not None and "the training needs about 77.5 GiB per GPU" in problem
    assert "over 90% of 80 GiB" in problem and "train LoRA adapters" in problem
    # A DPO micro-batch holds both sequences of a pair.
    lines, _ = train_plan(full, train, True, shape, sequences_per_row=2)
    assert "micro-batch 2 x 4096 tokens" in lines[1]


def scout_dry_run(scout: Path, student: Path, *overrides: str) -> str:
    path = REPO_ROOT / "pipelines" / "llama4-scout-gpu.yaml"
    models = [
        f"stages.1.config.model={scout}",
        f"stages.2.config.filters.1.options.model={scout}",
        f"stages.3.config.model={scout}",
        f"stages.6.config.student={student}",
    ]
    config = load_config(pipeline.Config, path, [*models, *overrides])
    resolved = pipeline.resolve_stages(config, str(path))
    pipeline.check_inputs(config, resolved, str(path))
    return pipeline.plan(config, resolved)


def test_the_llama4_scout_pipeline_fits_its_cluster_and_full_sft_would_not(
    llama4_scout, student_dir
):
    report = scout_dry_run(llama4_scout, student_dir)
    assert "policy   107.77 B parameters, 48 layers" in report
    # SFT: LoRA on 8 GPUs, the frozen bf16 weights sharded; RL: 16 ranks, state offloaded.
    assert "trainer  per GPU: 47.4 GiB = frozen weights 25.1 GiB" in report
    assert "learner  per GPU: 34.4 GiB = sharded state 0.0 GiB (offloaded" in report
    assert "worker   per GPU: weights 50.2 GiB" in report
    # RL with LoRA adapters instead: the frozen policy sharded over 16 ranks, nothing offloaded.
    lora_rl = scout_dry_run(
        llama4_scout,
        student_dir,
        "stages.4.config.learner.lora.enabled=true",
        "stages.4.config.learner.offload=false",
    )
    assert "learner  per GPU: 47.4 GiB = sharded state 25.1 GiB + layers in flight 12.1" in lora_rl
    # Full-parameter SFT on one node would need 201 GiB of state per GPU: refused.
    with pytest.raises(ConfigError) as refused:
        scout_dry_run(llama4_scout, student_dir, "stages.3.config.lora.enabled=false")
    message = str(refused.value)
    assert "stage 'sft'" in message and "the training needs about 235.1 GiB per GPU" in message


def test_a_training_stage_run_alone_that_cannot_fit_is_refused(qwen3_30b, quick_align, tmp_path):
    out = quick_align(
        "sft",
        f"model={qwen3_30b}",
        f"data={tmp_path / 'rows.jsonl'}",
        f"runs_dir={tmp_path / 'runs'}",
        "placement.processes=8",
        "placement.cluster.gpu_memory_gib=80",
        "train.batch_size=1",
        "train.max_length=8192",
        "train.gradient_checkpointing=true",
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "key 'placement.cluster'" in out.stderr and "77.5 GiB per GPU" in out.stderr
    assert not (tmp_path / "runs").exists()
