"""The RL learner group without Ray: one rank in this process, several in spawned processes.

A rank in this process joins (or shares) a process group of one. Groups of several ranks run in
fresh processes over gloo (`conftest.run_ranks`), exactly as under Ray, and write what the test
compares to files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from align.losses.policy import KINDS, PolicyLossSettings
from align.modeling import build_model, load_model, write_checkpoint
from align.moe import balance_terms
from align.rl import transport
from align.rl.learner import (
    LearnerRank,
    LearnerSettings,
    Row,
    collate,
    free_address,
    split_batch,
    token_logprobs,
)
from align.rl.rollout import Rollout
from align.runs import NonFiniteError
from align.training import LoraSettings
from align.vision import in_vision_tower
from tests.conftest import FAMILY_PRESETS, run_ranks
from tests.helpers import image_and_text_groups, on_policy_groups


def start_rank(path, settings: LearnerSettings, loss: PolicyLossSettings, **kwargs) -> LearnerRank:
    """A learner of one rank in this process."""
    rank = LearnerRank(str(path), settings, loss, max_completion_tokens=8, **kwargs)
    rank.start(*free_address())
    return rank


def step(rank: LearnerRank, groups: list[Rollout], stage: bool = False) -> dict:
    """One step on the whole batch, with the batch's metrics (as the learner group returns)."""
    (part,), batch_metrics = split_batch(groups, rank.loss, 1, rank.settings.micro_batch_size)
    return {**batch_metrics, **rank.train_step(part, stage)}


def full_parameters(model) -> dict[str, torch.Tensor]:
    """Every parameter's whole value (a collective on a sharded model)."""
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in model.named_parameters()
    }


def mean_logprob_gap(model, groups: list[Rollout]) -> float:
    """Mean logprob of rewarded completions minus unrewarded ones, under `model`."""
    (part,), _ = split_batch(groups, PolicyLossSettings(), 1, 1000)
    gaps = {True: [], False: []}
    with torch.no_grad():
        for row in part.micro_batches[0]:
            ids = torch.tensor([row.prompt_ids + row.completion_ids])
            logp = token_logprobs(model, ids, torch.ones_like(ids))[0, len(row.prompt_ids) - 1 :]
            gaps[row.advantage > 0].append(float(logp.sum()))
    return sum(gaps[True]) / len(gaps[True]) - sum(gaps[False]) / len(gaps[False])


# --- one rank ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_learner_steps_raise_the_likelihood_of_rewarded_completions(student_dir, kind):
    rank = start_rank(
        student_dir, LearnerSettings(learning_rate=3e-3), PolicyLossSettings(kind=kind)
    )
    groups = on_policy_groups(load_model(student_dir))
    before = mean_logprob_gap(rank.model, groups)
    for _ in range(3):
        metrics = step(rank, groups)
    after = mean_logprob_gap(rank.model, groups)
    assert rank.version == 3 and metrics["learner/version"] == 3
    assert after > before + 0.5, (before, after)
    assert metrics["moe/load_max"] >= 1.0 and metrics["moe/routing_entropy"] > 0
    # The step's profile: its parts, each measured, add up to the step.
    parts = ("forward_backward", "optimizer", "metrics")
    assert all(metrics[f"time/learner_{p}"] > 0 for p in parts), metrics
    assert sum(metrics[f"time/learner_{p}"] for p in parts) == pytest.approx(
        metrics["time/learner_step"], rel=1e-9
    )
    # Every parameter a token passes through, counted by hand: one routed expert of each MoE
    # layer (top-1) and everything else but the input embedding.
    routed = sum(p.numel() for n, p in rank.model.named_parameters() if ".experts." in n)
    embedding = rank.model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in rank.model.parameters())
    config = rank.model.config
    assert config.num_experts_per_tok == 1 and routed > 0
    assert rank.flops_per_token == 6 * (total - embedding - routed + routed // config.num_experts)
    assert metrics["perf/learner_flops_per_s"] > 0 and 0 <= metrics["perf/padding_share"] < 1
    # Steps this large send some tokens to other experts, not all.
    assert 0 < metrics["moe/routing_change"] < 0.5


def test_a_lora_learner_trains_only_its_adapters_and_exports_them_merged(student_dir, tmp_path):
    lora = LoraSettings(enabled=True, r=8, alpha=16)
    rank = start_rank(
        student_dir, LearnerSettings(learning_rate=1e-2, lora=lora), PolicyLossSettings()
    )
    groups = on_policy_groups(load_model(student_dir))
    before, gap_before = full_parameters(rank.model), mean_logprob_gap(rank.model, groups)
    for _ in range(3):
        step(rank, groups)
    assert mean_logprob_gap(rank.model, groups) > gap_before + 0.5
    after = full_parameters(rank.model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    adapters = {name for name in before if ".lora_" in name}
    # Every adapter's B (zero at first) moved; no other weight did: not the routers, not the
    # experts, not the attention and MLP weights the adapters sit on.
    assert changed and changed <= adapters
    assert {n for n in adapters if "lora_B" in n} <= changed
    assert not [n for n in adapters if "router" in n or ".experts." in n]
    # The export (what the workers get) is the merged model: a checkpoint transformers loads,
    # without adapter tensors, scoring as the learner does.
    transport.export(rank.model, tmp_path / "merged", torch.float32)
    merged = load_model(tmp_path / "merged")
    assert not [n for n, _ in merged.named_parameters() if "lora" in n]
    ids = torch.randint(
        3, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        learner_lp = token_logprobs(rank.model, ids, torch.ones_like(ids))
        merged_lp = token_logprobs(merged, ids, torch.ones_like(ids))
    assert (learner_lp - merged_lp).abs().max() <= 1e-5
    assert (
        merged_lp - token_logprobs(load_model(student_dir), ids, torch.ones_like(ids))
    ).abs().max() > 1e-3


def test_routing_change_is_zero_for_an_update_too_small_to_reroute(student_dir):
    rank = start_rank(student_dir, LearnerSettings(learning_rate=1e-12), PolicyLossSettings())
    metrics = step(rank, on_policy_groups(load_model(student_dir), groups=2))
    assert metrics["moe/routing_change"] == 0.0


def test_the_behaviour_gap_of_on_policy_groups_is_zero_at_the_first_step(student_dir):
    """The groups' logprobs come from the starting weights, which the learner holds."""
    rank = start_rank(student_dir, LearnerSettings(), PolicyLossSettings())
    metrics = step(rank, on_policy_groups(load_model(student_dir), groups=2))
    assert metrics["policy/behaviour_gap"] < 1e-6


@pytest.mark.parametrize("family", FAMILY_PRESETS)
def test_a_padded_micro_batch_scores_every_row_as_the_row_alone(checkpoints, family):
    # The learner scores collated rows without an attention mask (right padding under causal
    # attention): each row's logprobs must equal the row's own, whatever its neighbours' length.
    model = load_model(checkpoints[family])
    pad_id = model.config.get_text_config().pad_token_id
    generator = torch.Generator().manual_seed(0)
    rows = [
        Row(
            torch.randint(5, 60, (p,), generator=generator).tolist(),
            torch.randint(5, 60, (c,), generator=generator).tolist(),
            [0.0] * c,
            1.0,
        )
        for p, c in [(4, 9), (7, 2), (3, 1), (5, 5)]
    ]
    batch = collate(rows, pad_id)
    assert batch.input_ids_bt.shape == (4, 13) and int(batch.attention_mask_bt.sum()) == 36
    with torch.no_grad():
        logp_bt = token_logprobs(model, batch.input_ids_bt)
        for b, row in enumerate(rows):
            ids = row.prompt_ids + row.completion_ids
            alone = token_logprobs(model, torch.tensor([ids]))[0]
            torch.testing.assert_close(logp_bt[b, : len(ids) - 1], alone, rtol=0, atol=1e-5)


def test_micro_batches_give_the_same_gradient(student_dir):
    """The step's gradient is the whole batch's however it is cut into micro-batches (router
    loss off: it is a per-micro-batch mean, as in TRL; see `LearnerSettings`).

    Gradients are compared at the optimiser step: Adam's first update is about lr * sign(g), so
    float noise on near-zero gradients would make the updated weights themselves incomparable.
    """
    groups = on_policy_groups(build_model("student", seed=0), groups=2, size=4)
    results = []
    for micro in (8, 3, 1):
        settings = LearnerSettings(learning_rate=1e-3, micro_batch_size=micro)
        settings.router_aux_loss_coef = 0.0
        rank = start_rank(student_dir, settings, PolicyLossSettings(kind="dapo"))
        grads = {}

        def capture(rank=rank, grads=grads):
            for name, param in rank.model.named_parameters():
                grads[name] = param.grad.full_tensor().clone()

        rank.optimizer.step = capture
        results.append((step(rank, groups), grads))
    (m8, g8), *others = results
    assert any(g.abs().max() > 1e-3 for g in g8.values())
    for metrics, grads in others:
        assert metrics["train/loss"] == pytest.approx(m8["train/loss"], rel=1e-5, abs=1e-7)
        assert metrics["train/grad_norm"] == pytest.approx(m8["train/grad_norm"], rel=1e-5)
        for name, grad in g8.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7)


def test_a_non_finite_step_is_skipped_with_the_parameters_unchanged(student_dir):
    rank = start_rank(
        student_dir,
        LearnerSettings(learning_rate=1e-3, max_nonfinite_steps=2),
        PolicyLossSettings(kind="grpo", correction="none"),
    )
    groups = on_policy_groups(load_model(student_dir), groups=2)
    groups[0].behaviour_logprobs[0][0] = float("nan")
    before = full_parameters(rank.model)
    metrics = step(rank, groups)
    assert metrics["train/skipped"] == 1.0
    for name, tensor in full_parameters(rank.model).items():
        assert torch.equal(tensor, before[name]), name
    with pytest.raises(NonFiniteError, match="2 consecutive steps"):
        step(rank, groups)


def test_rewards_too_large_for_float32_train_like_their_scaled_down_values(student_dir):
    """Group advantages do not depend on the rewards' scale; a reward of 1e39 (finite, but
    infinite in float32) must neither crash the step nor be skipped."""

    def train(scale: float) -> dict:
        rank = start_rank(
            student_dir,
            LearnerSettings(learning_rate=1e-3),
            PolicyLossSettings(kind="grpo", correction="none"),
        )
        groups = on_policy_groups(load_model(student_dir), groups=2)
        for group in groups:
            group.rewards = [None if r is None else scale * r for r in group.rewards]
        return step(rank, groups)

    small, large = train(1.0), train(1e39)
    assert large["train/skipped"] == 0.0
    assert large["train/advantage_abs_mean"] == pytest.approx(
        small["train/advantage_abs_mean"], rel=1e-5
    )
    assert large["train/grad_norm"] == pytest.approx(small["train/grad_norm"], rel=1e-4)


def test_learning_rate_warms_up_linearly_and_resumes_where_it_was(student_dir, tmp_path):
    settings = LearnerSettings(learning_rate=1e-3, warmup_steps=4)
    a = start_rank(student_dir, settings, PolicyLossSettings())
    groups = on_policy_groups(load_model(student_dir), groups=2)
    rates = [step(a, groups)["train/learning_rate"] for _ in range(2)]
    assert rates == pytest.approx([2.5e-4, 5e-4])
    a.save(str(tmp_path / "state"))
    b = start_rank(student_dir, settings, PolicyLossSettings())
    assert b.load(str(tmp_path / "state")) == 2
    rates = [step(b, groups)["train/learning_rate"] for _ in range(3)]
    assert rates == pytest.approx([7.5e-4, 1e-3, 1e-3])


@pytest.mark.parametrize(("warmup", "steps"), [(0, 0), (4, 4), (0.1, 4), (0.01, 1)])
def test_a_warmup_below_one_is_a_share_of_the_run(warmup, steps):
    """One meaning of `warmup_steps` in every trained stage: steps, or a share of a 40-step run
    (the trainers take a fraction themselves; RL's fleet converts it with `warmup_for`)."""
    from align.config import ConfigError, from_dict

    settings = from_dict(LearnerSettings, {"warmup_steps": warmup})
    assert settings.warmup_for(40) == steps
    with pytest.raises(ConfigError, match="'warmup_steps'.*whole number of steps or a fraction"):
        from_dict(LearnerSettings, {"warmup_steps": 2.5})


@pytest.mark.parametrize("preset", FAMILY_PRESETS.values())
def test_the_router_loss_parts_add_up_to_transformers_load_balancing_loss(preset):
    """Split over two "ranks" (halves of the tokens), the parts' losses with the whole batch's
    counts sum to transformers' loss of the whole batch, gradients included."""
    config = build_model(preset, seed=0).config
    generator = torch.Generator().manual_seed(0)
    logits = tuple(
        torch.randn(12, config.num_experts, generator=generator, requires_grad=True)
        for _ in range(3)
    )
    mask_t = torch.tensor([1.0] * 9 + [0.0] * 3)
    k = config.num_experts_per_tok
    expected = load_balancing_loss_func(logits, config.num_experts, k, mask_t.reshape(3, 4))
    (expected_grad,) = torch.autograd.grad(expected, logits[0])
    halves = [slice(0, 6), slice(6, 12)]
    parts = [balance_terms(tuple(x[h] for x in logits), k, mask_t[h]) for h in halves]
    counts = sum(p.counts_e for p in parts)
    rows = sum(p.rows for p in parts)
    total = sum(p.loss(counts, rows) for p in parts)
    (grad,) = torch.autograd.grad(total, logits[0])
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-8)


def test_the_learner_imports_without_vllm_ray_trl_or_datasets():
    """The GPU learner path must run on a machine that has only torch and transformers."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('datasets', 'trl', 'vllm', 'ray'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import align.rl.learner\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


# --- several ranks -------------------------------------------------------------------------------

# (family, loss kind, router loss coefficient, micro-batch size per rank on 1 and on 2 ranks).
# With the router loss on, a global micro-batch must hold the same rows on 1 and 2 ranks (the
# loss is a mean over it); with it off, any cut gives the same step.
CASES = [(family, kind, 1e-3, (64, 32)) for family in FAMILY_PRESETS for kind in KINDS] + [
    ("llama4", "grpo", 0.0, (3, 2)),
    ("qwen3_moe", "dapo", 0.0, (4, 2)),
    # A vision-language policy, its tower frozen and trained, on a batch whose image rows all
    # fall on rank 0 (`image_and_text_groups`): rank 1 must run the tower all the same.
    ("vision", "grpo", 1e-3, (16, 8)),
    ("vision-trained", "grpo", 1e-3, (16, 8)),
]


def _train_cases(rank, world, port, checkpoints, groups, out: Path) -> None:
    """3 steps of every case on `world` ranks; rank 0 writes the parameters. After each
    family's first case it also writes what the group streams to the workers, and the
    save_pretrained checkpoint of the same weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from align.rl import transport

    streamed = set()
    for index, (family, kind, aux, micro) in enumerate(CASES):
        settings = LearnerSettings(learning_rate=1e-4, micro_batch_size=micro[world - 1])
        settings.router_aux_loss_coef = aux
        settings.train_vision = family == "vision-trained"
        if settings.train_vision:  # the tower at a rate of its own
            settings.vision_learning_rate = 1e-6
        learner = LearnerRank(
            str(checkpoints[family]), settings, PolicyLossSettings(kind=kind), 8, 0, rank, world
        )
        learner.start("127.0.0.1", port)
        for _ in range(3):
            parts, _ = split_batch(groups[family], learner.loss, world, settings.micro_batch_size)
            learner.train_step(parts[rank])
        params = full_parameters(learner.model)
        if rank == 0:
            save_file(params, str(out / f"case{index}-ranks{world}.safetensors"))
        if family in FAMILY_PRESETS and family not in streamed:
            streamed.add(family)
            staged, _ = transport.stage(learner.model, torch.float32, learner.version)
            state = get_model_state_dict(
                learner.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            if rank == 0:
                tensors = {name: t.clone() for name, t in staged.tensors()}
                save_file(tensors, str(out / f"streamed-{family}-ranks{world}.safetensors"))
                plain = load_model(checkpoints[family])
                plain.load_state_dict(state)
                plain.save_pretrained(str(out / f"saved-{family}-ranks{world}"))


@pytest.fixture(scope="module")
def trained_cases(checkpoints, tmp_path_factory):
    """Every case trained on one rank and on two (each in its own processes)."""
    out = tmp_path_factory.mktemp("learner-cases")
    groups = {
        family: on_policy_groups(load_model(path), groups=5) for family, path in checkpoints.items()
    }
    vision = write_checkpoint(build_model("vision-student", seed=0), out / "vision-student")
    groups["vision"] = groups["vision-trained"] = image_and_text_groups(vision)
    paths = {**checkpoints, "vision": vision, "vision-trained": vision}
    for world in (1, 2):
        run_ranks(_train_cases, world, paths, groups, out)
    return out


def test_two_ranks_take_the_same_steps_as_one(trained_cases):
    """Every loss kind, both families, a batch of 19 rows (5 groups, one unscored completion)
    cut 10 / 9 across the ranks: parameters after 3 AdamW steps within 2e-6. Also a
    vision-language policy, tower frozen and trained, with every image row on rank 0 (before
    rank 1 ran the tower too, its FSDP collectives went out of step and the group crashed).

    The steps differ only in the order of float sums. At the default learning rate (1e-4) that
    leaves about 2e-7 in most cases; Adam turns a rounding difference dg on a gradient near its
    eps (1e-8) into an update difference of up to lr * dg / eps, so the bound scales with the
    rate, and with the machine's summation order: Qwen3-MoE with DAPO and micro-batches of 4/2
    came to 1.03e-6 on one 2-core machine and under 1e-6 on another."""
    parts, _ = split_batch(
        image_and_text_groups(trained_cases / "vision-student"), PolicyLossSettings(), 2, 8
    )
    assert [[bool(row.images) for row in part.micro_batches[0]] for part in parts] == [
        [True] * 8,
        [False] * 8,
    ]
    for index, case in enumerate(CASES):
        one = load_file(str(trained_cases / f"case{index}-ranks1.safetensors"))
        two = load_file(str(trained_cases / f"case{index}-ranks2.safetensors"))
        assert one.keys() == two.keys()
        worst = max((one[n] - two[n]).abs().max().item() for n in one)
        assert worst <= 2e-6, (case, worst)


def test_a_trained_tower_moves_by_its_own_learning_rate(trained_cases):
    """The vision-trained case's tower learns at `vision_learning_rate` (1e-6, the language
    model at 1e-4): over 3 Adam steps from the same start (the frozen case's tower) it moves,
    by far less than the language model's rate would move it."""
    index = {family: i for i, (family, *_) in enumerate(CASES)}
    start = load_file(str(trained_cases / f"case{index['vision']}-ranks1.safetensors"))
    trained = load_file(str(trained_cases / f"case{index['vision-trained']}-ranks1.safetensors"))
    tower = [name for name in start if in_vision_tower(name)]
    moved = max((trained[n] - start[n]).abs().max().item() for n in tower)
    assert tower and 0 < moved <= 1e-5


@pytest.mark.parametrize("family", FAMILY_PRESETS)
def test_streamed_weights_equal_what_save_pretrained_writes_bit_for_bit(trained_cases, family):
    """What the group sends the engines (gathered per layer, converted back to checkpoint
    names and layouts) is what transformers' save_pretrained writes for the same weights."""
    for world in (1, 2):
        streamed = load_file(str(trained_cases / f"streamed-{family}-ranks{world}.safetensors"))
        saved = load_file(str(trained_cases / f"saved-{family}-ranks{world}" / "model.safetensors"))
        assert streamed.keys() == saved.keys()
        for name, tensor in saved.items():
            assert streamed[name].dtype == tensor.dtype and torch.equal(streamed[name], tensor), (
                name
            )
    if family == "qwen3_moe":  # fused in memory, one tensor per expert in checkpoints
        assert "model.layers.0.mlp.experts.0.gate_proj.weight" in saved


def _resume(rank, world, port, checkpoint, groups, out: Path) -> None:
    """2 steps, save, a 3rd step; then a fresh learner in the same processes loads the
    checkpoint and takes the 3rd step again. Rank 0 writes the parameters and metrics."""
    settings = LearnerSettings(learning_rate=1e-3)

    def third_step(learner: LearnerRank, tag: str) -> None:
        before = full_parameters(learner.model)
        parts, _ = split_batch(groups, learner.loss, world, settings.micro_batch_size)
        metrics = learner.train_step(parts[rank])
        after = full_parameters(learner.model)
        if rank == 0:
            save_file(before, str(out / f"{tag}-before.safetensors"))
            save_file(after, str(out / f"{tag}-after.safetensors"))
            (out / f"{tag}.json").write_text(json.dumps(metrics))

    first = LearnerRank(str(checkpoint), settings, PolicyLossSettings(), 8, 0, rank, world)
    first.start("127.0.0.1", port)
    for _ in range(2):
        parts, _ = split_batch(groups, first.loss, world, settings.micro_batch_size)
        first.train_step(parts[rank])
    first.save(str(out / "checkpoint"))
    third_step(first, f"uninterrupted-ranks{world}")
    resumed = LearnerRank(str(checkpoint), settings, PolicyLossSettings(), 8, 0, rank, world)
    resumed.start("127.0.0.1", port)
    assert resumed.load(str(out / "checkpoint")) == 2
    third_step(resumed, f"resumed-ranks{world}")


def test_a_sharded_checkpoint_resumes_the_next_step_bitwise_and_reshards(student_dir, tmp_path):
    groups = on_policy_groups(load_model(student_dir))
    run_ranks(_resume, 2, student_dir, groups, tmp_path)
    # Each rank wrote its own shards; nothing was gathered into one file.
    assert len(list((tmp_path / "checkpoint").glob("*.distcp"))) == 2

    def read(tag: str):
        return (
            load_file(str(tmp_path / f"{tag}-before.safetensors")),
            load_file(str(tmp_path / f"{tag}-after.safetensors")),
            json.loads((tmp_path / f"{tag}.json").read_text()),
        )

    saved_before, saved_after, saved_metrics = read("uninterrupted-ranks2")
    before, after, metrics = read("resumed-ranks2")
    for name in saved_before:
        assert torch.equal(before[name], saved_before[name]), name
        assert torch.equal(after[name], saved_after[name]), name
    for key in ("train/loss", "train/grad_norm", "moe/aux_loss", "train/learning_rate"):
        assert metrics[key] == saved_metrics[key], key
    # The same checkpoint on one rank: re-cut shards, the same weights and optimiser state.
    rank = start_rank(student_dir, LearnerSettings(learning_rate=1e-3), PolicyLossSettings())
    assert rank.load(str(tmp_path / "checkpoint")) == 2
    for name, tensor in full_parameters(rank.model).items():
        assert torch.equal(tensor, saved_before[name]), name
    step(rank, groups)
    for name, tensor in full_parameters(rank.model).items():
        torch.testing.assert_close(tensor, saved_after[name], rtol=0, atol=1e-6)
