"""Embedded model presets and tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, Llama4ForCausalLM
from transformers.models.llama4.modeling_llama4 import Llama4TextMLP, Llama4TextMoe
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from align.modeling import (
    PRESETS,
    build_model,
    count_parameters,
    load_model,
    model_config,
    write_checkpoint,
)
from align.moe import RouterLogits
from align.tasks import TASK_ALPHABET
from align.tokenizer import ANSWER_TAGS, build_tokenizer


def test_llama4_student_is_llama4_style_moe():
    model = build_model("student", seed=0)
    layers = model.model.layers
    kinds = [type(layer.feed_forward) for layer in layers]
    # Alternating dense and MoE layers, starting dense.
    assert kinds == [Llama4TextMLP, Llama4TextMoe] * (len(layers) // 2)
    moe = layers[1].feed_forward
    assert isinstance(moe.shared_expert, Llama4TextMLP)
    assert moe.top_k == 1
    # Sigmoid routing: the router scores of the chosen expert lie in (0, 1) and are not a softmax.
    hidden = torch.randn(5, model.config.hidden_size)
    scores, logits = moe.router(hidden)
    chosen = logits.topk(1, dim=-1)
    assert torch.allclose(scores.gather(1, chosen.indices), torch.sigmoid(chosen.values))
    assert (scores > 0).sum(dim=1).tolist() == [1] * 5


def test_teacher_is_larger_than_student():
    student, teacher = (count_parameters(build_model(p, seed=0)) for p in ("student", "teacher"))
    assert teacher["total"] > 4 * student["total"]
    assert student["active"] < student["total"]


def test_qwen3_preset_builds_a_sparse_moe():
    model = build_model("qwen3-student", seed=0)
    assert all(isinstance(layer.mlp, Qwen3MoeSparseMoeBlock) for layer in model.model.layers)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_same_seed_same_weights_other_seed_differs(preset):
    a, b, c = build_model(preset, 1), build_model(preset, 1), build_model(preset, 2)
    for (name, pa), pb, _pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
    assert not all(
        torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True)
    )


def test_checkpoint_round_trip(tmp_path):
    model = build_model("student", seed=0)
    directory = write_checkpoint(model, tmp_path / "ckpt")
    assert (directory / "model.safetensors").is_file()
    assert not list(directory.glob("*.bin")), "weights must be written as safetensors only"
    loaded = load_model(directory)
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|eot|>"
    assert loaded.config.vocab_size == len(tokenizer)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="known presets: student, teacher"):
        model_config("huge")


def test_tokenizer_covers_task_alphabet_one_token_per_character():
    tokenizer = build_tokenizer()
    ids = tokenizer.encode(TASK_ALPHABET, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids
    assert len(ids) == len(TASK_ALPHABET)
    assert tokenizer.decode(ids) == TASK_ALPHABET


def test_tokenizer_answer_tags_are_single_tokens_and_decode_verbatim():
    tokenizer = build_tokenizer()
    text = "<answer> 12, ab</answer>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 2 + len(" 12, ab")
    assert tokenizer.convert_ids_to_tokens([ids[0], ids[-1]]) == list(ANSWER_TAGS)
    assert tokenizer.decode(ids) == text


def test_chat_template_prompt_is_a_prefix_of_the_full_conversation():
    tokenizer = build_tokenizer()
    prompt = [{"role": "user", "content": "Compute 1+2."}]
    full = prompt + [{"role": "assistant", "content": "<answer>3</answer>"}]
    prompt_ids = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, return_dict=False
    )
    full_ids = tokenizer.apply_chat_template(full, return_dict=False)
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert full_ids[-1] == tokenizer.eos_token_id
    assert (
        tokenizer.decode(full_ids[len(prompt_ids) :], skip_special_tokens=True)
        == "<answer>3</answer>"
    )


@pytest.mark.parametrize("top_k", [1, 2])
def test_sparse_routing_matches_transformers_dense_moe(tmp_path, top_k):
    """load_model's Llama 4 MoE layers compute the chosen experts only, with the same results."""
    config = model_config("teacher")
    config.num_experts_per_tok = top_k
    torch.manual_seed(0)
    dense = Llama4ForCausalLM(config)
    # Larger router weights than the init spread the tokens over many experts.
    for layer in dense.model.layers:
        if isinstance(layer.feed_forward, Llama4TextMoe):
            torch.nn.init.normal_(layer.feed_forward.router.weight, std=0.5)
    dense.save_pretrained(tmp_path)
    sparse = load_model(tmp_path)
    moe_layers = [m for m in sparse.modules() if isinstance(m, Llama4TextMoe)]
    assert moe_layers and all("forward" in vars(m) for m in moe_layers)
    assert not any("forward" in vars(m) for m in dense.modules() if isinstance(m, Llama4TextMoe))

    ids_bt = torch.randint(3, config.vocab_size, (4, 32))
    recorded = RouterLogits(sparse)
    logits_dense = dense(ids_bt).logits
    logits_sparse = sparse(ids_bt).logits
    torch.testing.assert_close(logits_sparse, logits_dense, rtol=0, atol=1e-5)
    logits_dense.square().mean().backward()
    logits_sparse.square().mean().backward()
    grads = dict(dense.named_parameters())
    for name, param in sparse.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-4, atol=1e-7, msg=name)
    # The tokens really were spread over the experts, so the dispatch loop ran several times.
    for logits_te in recorded.take():
        assert logits_te.topk(top_k, dim=-1).indices.unique().numel() > 2
