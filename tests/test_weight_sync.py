"""Weight sync learner -> live vLLM engine: after a sync the engine scores exactly like the learner.

Two ways in: the RL learner group's in-memory stream through vLLM's weight-transfer protocol
(`align.rl.transport` -> `align.engine.receive_weights`), and a checkpoint directory loaded in
place (`align.engine.sync_weights`, what the distillation stage and snapshot evaluation use).

The tests reuse the session's engines (conftest `engine_for`, one per family) and load trained
weights into them; a module fixture loads the original checkpoints back at the end (and checks
that this worked), so the other vLLM tests see the engines as they were started.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from align import engine
from align.engine import worker as engine_worker
from align.losses.policy import PolicyLossSettings
from align.modeling import load_model
from align.rl import transport
from align.rl.learner import LearnerRank, LearnerSettings, free_address, split_batch, token_logprobs
from align.settings import EngineSettings
from align.tokenizer import encode_prompts
from align.training import LoraSettings
from align.weight_sync import export_weights
from tests.conftest import run_ranks, shared_engine
from tests.helpers import on_policy_groups

FAMILIES = ["llama4", "qwen3_moe"]
TOLERANCE = 1e-4
CONVERSATIONS = [
    [{"role": "user", "content": "Compute 47+85."}, {"role": "assistant", "content": "132"}],
    [{"role": "user", "content": "Sort: hbadcfe"}, {"role": "assistant", "content": "abcdefh"}],
]


def learner_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Logprob of tokens 1..L-1 given their prefix, from one fp32 transformers forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def max_diff_to_learner(llm, model, sequences: list[list[int]]) -> float:
    """Largest |vLLM - learner| prompt logprob over the sequences."""
    vllm_lp = engine.sequence_logprobs(llm, sequences)
    return max(
        (torch.tensor(lp) - learner_logprobs(model, ids)).abs().max().item()
        for lp, ids in zip(vllm_lp, sequences, strict=True)
    )


def sampled_diff_to_learner(llm, model, prompts: list[list[int]], **sampling) -> float:
    """Largest |vLLM - learner| logprob of the tokens vLLM sampled."""
    worst = 0.0
    for prompt, group in zip(prompts, engine.generate(llm, prompts, **sampling), strict=True):
        for completion in group:
            full = learner_logprobs(model, prompt + completion.token_ids)
            diff = torch.tensor(completion.logprobs) - full[len(prompt) - 1 :]
            worst = max(worst, diff.abs().max().item())
    return worst


def train(model, vocab_size: int, steps: int = 3) -> None:
    """A few AdamW steps on random tokens: every weight (embeddings, attention, routers,
    experts, head) moves."""
    generator = torch.Generator().manual_seed(0)
    ids_bt = torch.randint(3, vocab_size, (4, 48), generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(ids_bt, labels=ids_bt).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="module")
def learner(checkpoints, engine_for, tmp_path_factory):
    """family -> (trained learner model, its exported checkpoint, sequences to score).

    At the end of the module the original checkpoints are synced back into the shared engines,
    and the engines must score like the original weights again.
    """
    cache: dict[str, tuple] = {}
    root = tmp_path_factory.mktemp("weight_sync")

    def get(family: str):
        if family not in cache:
            model = load_model(checkpoints[family])
            before = {name: p.detach().clone() for name, p in model.named_parameters()}
            train(model, model.config.vocab_size)
            unchanged = [
                name for name, p in model.named_parameters() if torch.equal(p, before[name])
            ]
            assert not unchanged, f"training left weights unchanged: {unchanged}"
            tokenizer = AutoTokenizer.from_pretrained(checkpoints[family])
            sequences = [
                tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)
                for c in CONVERSATIONS
            ]
            cache[family] = (model, export_weights(model, root / family), sequences)
        return cache[family]

    yield get
    for family, (_, _, sequences) in cache.items():
        llm = engine_for(family)
        engine.sync_weights(llm, checkpoints[family])
        assert max_diff_to_learner(llm, load_model(checkpoints[family]), sequences) <= TOLERANCE


def prompts_for(checkpoint) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return encode_prompts(tokenizer, [c[:1] for c in CONVERSATIONS])


@pytest.mark.vllm
@pytest.mark.parametrize("family", FAMILIES)
def test_sync_makes_engine_score_like_learner(family, checkpoints, engine_for, learner):
    llm = engine_for(family)
    model, exported, sequences = learner(family)
    engine.sync_weights(llm, checkpoints[family])  # a known starting point: the original weights
    before = max_diff_to_learner(llm, model, sequences)
    assert before > 0.05, f"training changed the learner too little to test a sync ({before})"

    seconds = engine.sync_weights(llm, exported)

    assert 0 < seconds < 60
    assert max_diff_to_learner(llm, model, sequences) <= TOLERANCE
    prompts = prompts_for(checkpoints[family])
    sampled = sampled_diff_to_learner(
        llm, model, prompts, n=3, temperature=1.0, max_tokens=12, seed=7
    )
    assert sampled <= TOLERANCE


@pytest.mark.vllm
@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_moe_repack_is_what_makes_the_sync_exact(family, checkpoints, engine_for, learner):
    """Loading without prepacking vLLM's CPU MoE experts again leaves the engine wrong."""
    llm = engine_for(family)
    if not llm.apply_model(lambda model: len(engine_worker._cpu_moe_layers(model)))[0]:
        pytest.skip("this engine does not run vLLM's CPU MoE experts")
    model, exported, sequences = learner(family)

    llm.collective_rpc("align_load_weights", args=(str(exported), False))
    llm.reset_prefix_cache()
    unpacked = max_diff_to_learner(llm, model, sequences)
    engine.sync_weights(llm, exported)
    repacked = max_diff_to_learner(llm, model, sequences)

    assert unpacked > 0.02
    assert repacked <= TOLERANCE


@pytest.mark.vllm
def test_sync_resets_the_prefix_cache(checkpoints, engine_for, learner):
    """KV cached under the old weights must not serve a prompt after a sync."""
    llm = engine_for("llama4")
    model, exported, _ = learner("llama4")
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    generator = torch.Generator().manual_seed(1)
    random_ids = torch.randint(
        3, model.config.vocab_size, (2 * block_size + 5,), generator=generator
    )
    prompt = [1, *random_ids.tolist()]
    assert len(prompt) + 4 <= EngineSettings().max_model_len
    greedy = dict(n=1, temperature=0.0, max_tokens=4)
    engine.sync_weights(llm, checkpoints["llama4"])
    (old,) = engine.generate(llm, [prompt], **greedy)[0]  # fills the cache under the old weights

    # A load without the reset: the prompt's cached blocks still hold the old weights' KV.
    llm.collective_rpc("align_load_weights", args=(str(exported),))
    stale = sampled_diff_to_learner(llm, model, [prompt], **greedy)
    engine.sync_weights(llm, exported)
    (new,) = engine.generate(llm, [prompt], **greedy)[0]
    fresh = sampled_diff_to_learner(llm, model, [prompt], **greedy)

    assert stale > 0.05
    assert fresh <= TOLERANCE
    assert max(abs(a - b) for a, b in zip(old.logprobs, new.logprobs, strict=False)) > 0.05


@pytest.mark.vllm
@pytest.mark.parametrize("refused", ["zentorch", "padded"])
def test_unsupported_cpu_moe_layouts_are_refused_before_loading(
    refused, checkpoints, engine_for, learner
):
    """The zentorch path and padded experts are refused, and nothing is loaded then."""
    llm = engine_for("llama4")
    _, exported, sequences = learner("llama4")
    engine.sync_weights(llm, checkpoints["llama4"])
    # The engine runs in this process: its live CPU experts objects come back as they are.
    (experts,) = llm.apply_model(
        lambda model: [e for _, _, e in engine_worker._cpu_moe_layers(model)]
    )
    if not experts:
        pytest.skip("this engine does not run vLLM's CPU MoE experts")
    try:
        for each in experts:  # make them look like what vLLM builds in those cases
            if refused == "zentorch":
                each._use_zentorch = True
            else:
                each._padded_intermediate_size = lambda config: config.intermediate_size + 32
        with pytest.raises(RuntimeError, match="zentorch" if refused == "zentorch" else "pad"):
            engine.sync_weights(llm, exported)
    finally:
        for each in experts:
            each._use_zentorch = False
            each.__dict__.pop("_padded_intermediate_size", None)
    # Refused before loading: the engine still scores like the original weights.
    assert max_diff_to_learner(llm, load_model(checkpoints["llama4"]), sequences) <= TOLERANCE


def test_export_is_a_checkpoint_transformers_loads_back(tmp_path):
    from align.modeling import build_model

    model = build_model("qwen3-student", seed=3)
    path = export_weights(model, tmp_path / "sync")
    loaded = load_model(path)
    expected = model.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_export_switches_a_link_atomically_and_keeps_one_previous_version(tmp_path):
    from align.modeling import build_model

    model = build_model("student", seed=0)
    link = tmp_path / "sync"
    versions = [export_weights(model, link) for _ in range(3)]

    assert link.is_symlink() and link.resolve() == versions[-1]
    assert len(set(versions)) == 3
    assert not versions[0].exists()  # older than the previous one: removed
    assert versions[1].exists()  # the previous one: a reader may still be loading it
    assert sorted(p.name for p in versions[2].iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == sorted([versions[1].name, versions[2].name, "sync"])

    (tmp_path / "plain").mkdir()
    with pytest.raises(FileExistsError):
        export_weights(model, tmp_path / "plain")


def test_learner_side_does_not_import_vllm():
    code = "import sys, align.weight_sync; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the learner group's in-memory stream ------------------------------------------------------


def _train_and_send(
    rank, world, port, checkpoint, groups, endpoints, sequences, out: Path, lora: bool = False
):
    """Two learner steps on `world` ranks (LoRA adapters only, with `lora`); rank 0 stages the
    weights and sends them to each endpoint in turn; every rank scores `sequences` (rank 0
    writes the logprobs)."""
    settings = LearnerSettings(learning_rate=1e-2, lora=LoraSettings(enabled=lora, r=8, alpha=16))
    learner = LearnerRank(str(checkpoint), settings, PolicyLossSettings(), 8, 0, rank, world)
    learner.start("127.0.0.1", port)
    for _ in range(2):
        parts, _ = split_batch(groups, learner.loss, world, settings.micro_batch_size)
        learner.train_step(parts[rank], stage=True)
    if rank == 0:
        (out / "update_info.json").write_text(json.dumps(learner.update_info()))
        for worker, endpoint in enumerate(endpoints):
            learner.open_channel(worker, endpoint)
        for worker in range(len(endpoints)):
            learner.send_weights(worker, learner.version)
    with torch.no_grad():
        logprobs = [
            token_logprobs(learner.model, torch.tensor([ids]), torch.ones(1, len(ids)))[0].tolist()
            for ids in sequences
        ]
    if rank == 0:
        (out / "logprobs.json").write_text(json.dumps(logprobs))


@pytest.mark.vllm
@pytest.mark.parametrize("family", FAMILIES)
def test_two_learner_ranks_stream_weights_into_two_engines_exactly(
    family, checkpoints, engine_for, learner, tmp_path
):
    """2 learner ranks (gloo) train, rank 0 streams the weights into 2 engines (the session's
    and one on a copy of the checkpoint); both then score like the learner (<= 1e-5)."""
    llms = [engine_for(family), shared_engine(_copy_of(checkpoints[family]))]
    _, _, sequences = learner(family)
    groups = on_policy_groups(load_model(checkpoints[family]), groups=4)
    endpoints = [transport.Endpoint("gloo", "127.0.0.1", free_address()[1], 2, 120.0) for _ in llms]
    ranks = threading.Thread(
        target=run_ranks,
        args=(_train_and_send, 2, checkpoints[family], groups, endpoints, sequences, tmp_path),
    )
    ranks.start()
    try:
        for llm, endpoint in zip(llms, endpoints, strict=True):
            engine.init_weight_transfer(llm, endpoint.worker_init_info())
        update_info = tmp_path / "update_info.json"
        while not update_info.exists() and ranks.is_alive():
            time.sleep(0.1)
        seconds = [engine.receive_weights(llm, json.loads(update_info.read_text())) for llm in llms]
        ranks.join()
        learner_lp = json.loads((tmp_path / "logprobs.json").read_text())
        for llm in llms:
            for vllm_lp, expected in zip(
                engine.sequence_logprobs(llm, sequences), learner_lp, strict=True
            ):
                assert (torch.tensor(vllm_lp) - torch.tensor(expected)).abs().max() <= 1e-5
        assert all(0 < s < 60 for s in seconds)
    finally:
        ranks.join()
        engine.sync_weights(llms[0], checkpoints[family])
        engine.sync_weights(llms[1], checkpoints[family])
    # The learner really moved: the starting weights score these sequences differently.
    moved = max(
        (torch.tensor(a) - torch.tensor(b)).abs().max().item()
        for a, b in zip(engine.sequence_logprobs(llms[1], sequences), learner_lp, strict=True)
    )
    assert moved > 0.05, moved


@pytest.mark.vllm
def test_a_lora_learner_streams_the_merged_weights_and_the_engine_scores_like_it(
    checkpoints, engine_for, learner, tmp_path
):
    """2 learner ranks train LoRA adapters on a frozen policy; rank 0 merges them into the
    weights it streams, and the engine then scores like the learner with its adapters on."""
    family = "llama4"
    llm = engine_for(family)
    _, _, sequences = learner(family)
    groups = on_policy_groups(load_model(checkpoints[family]), groups=4)
    endpoint = transport.Endpoint("gloo", "127.0.0.1", free_address()[1], 2, 120.0)
    args = (_train_and_send, 2, checkpoints[family], groups, [endpoint], sequences, tmp_path, True)
    ranks = threading.Thread(target=run_ranks, args=args)
    ranks.start()
    try:
        engine.init_weight_transfer(llm, endpoint.worker_init_info())
        update_info = tmp_path / "update_info.json"
        while not update_info.exists() and ranks.is_alive():
            time.sleep(0.1)
        info = json.loads(update_info.read_text())
        # Checkpoint names only: the adapters travel merged into the weights they adapt.
        assert info["names"] and not [n for n in info["names"] if "lora" in n or "base_layer" in n]
        engine.receive_weights(llm, info)
        ranks.join()
        learner_lp = json.loads((tmp_path / "logprobs.json").read_text())
        after = engine.sequence_logprobs(llm, sequences)
    finally:
        ranks.join()
        engine.sync_weights(llm, checkpoints[family])
    for vllm_lp, expected in zip(after, learner_lp, strict=True):
        assert (torch.tensor(vllm_lp) - torch.tensor(expected)).abs().max() <= 1e-5
    before = engine.sequence_logprobs(llm, sequences)
    moved = max(
        (torch.tensor(a) - torch.tensor(b)).abs().max().item()
        for a, b in zip(before, learner_lp, strict=True)
    )
    assert moved > 0.05, moved


_COPIES: dict[str, Path] = {}


def _copy_of(checkpoint: Path) -> Path:
    """A copy of `checkpoint` (a second engine for it must not count as a repeated start)."""
    if str(checkpoint) not in _COPIES:
        copy = checkpoint.with_name(checkpoint.name + "-second-worker")
        shutil.copytree(checkpoint, copy, dirs_exist_ok=True)
        _COPIES[str(checkpoint)] = copy
    return _COPIES[str(checkpoint)]
