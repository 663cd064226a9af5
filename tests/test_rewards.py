"""The built-in rewards, each on hand-checked values."""

from __future__ import annotations

import pytest
import torch

from align.rewarding import RewardSpec, build_reward, build_reward_set
from rewards.answers import answer_format, answer_match, math_equivalence
from rewards.judge import LLMJudge
from rewards.overlong import overlong_penalty, soft_overlong
from rewards.reward_model import RewardModel


def test_answer_match_uses_task_verifiers_and_normalised_text():
    completions = [
        "<answer>46</answer>",  # add: right
        "<answer>046</answer>",  # add verifier compares numbers: right
        "<answer>47</answer>",  # add: wrong
        "46",  # no tag: wrong
        "<answer>abcd</answer>",  # sort: right
        "<answer>  Paris </answer>",  # free text: normalised match
        "<answer>Lyon</answer>",  # free text: wrong
        "<answer>x</answer>",  # no gold answer: not applicable
    ]
    answers = ["46", "46", "46", "46", "abcd", "paris", "Paris", None]
    tasks = ["add", "add", "add", "add", "sort", None, None, None]
    scores = answer_match([None] * 8, completions, answer=answers, task=tasks)
    assert scores == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, None]
    assert answer_match([None], ["<answer>1</answer>"]) == [None]


def test_math_verify_equivalence():
    completions = [
        "<answer>1/2</answer>",
        "so the result is \\boxed{0.5}",
        "<answer>\\frac{2}{4}</answer>",
        "<answer>3</answer>",
        "<answer>x+1</answer>",
        "<answer>2</answer>",
    ]
    answers = ["0.5", "1/2", "0.5", "4", "1+x", None]
    scores = math_equivalence([None] * 6, completions, answer=answers)
    assert scores == [1.0, 1.0, 1.0, 0.0, 1.0, None]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<answer>46</answer>", 1.0),
        ("I think <answer> 46 </answer> is it", 1.0),
        ("<answer></answer>", 0.0),
        ("<answer>  </answer>", 0.0),
        ("<answer>4</answer><answer>6</answer>", 0.0),
        ("46</answer>", 0.0),
        ("<answer>46", 0.0),
        ("</answer>46<answer>", 0.0),
        ("46", 0.0),
    ],
)
def test_answer_format(completion, expected):
    assert answer_format([None], [completion]) == [expected]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<answer>46</answer>", 1.0),
        ("  <answer>46</answer>\n", 1.0),
        ("<answer>46</answer> Hope this helps!", 0.0),
        ("I think <answer> 46 </answer>", 0.0),
        ("<answer>4</answer><answer>6</answer>", 0.0),
        ("<answer></answer>", 0.0),
    ],
)
def test_answer_format_with_nothing_else_refuses_chatter_around_the_answer(completion, expected):
    assert answer_format([None], [completion], nothing_else=True) == [expected]


def test_overlong_penalty_matches_the_dapo_formula():
    """L_max 20, L_cache 8: free up to 12 tokens, then (12 - L) / 8, -1 from 20 on."""
    lengths = [0, 12, 13, 16, 19, 20, 21, 100]
    expected = [0.0, 0.0, -0.125, -0.5, -0.875, -1.0, -1.0, -1.0]
    assert [overlong_penalty(n, 20, 8) for n in lengths] == expected
    ids = [[7] * n for n in lengths]
    scores = soft_overlong([None] * 8, [""] * 8, ids, max_length=20, cache_length=8)
    assert scores == expected


def test_overlong_without_token_ids_is_a_counted_fault():
    rewards = build_reward_set(
        [RewardSpec(name="overlong", options={"max_length": 20, "cache_length": 8})]
    )
    batch = rewards(["p"], ["text"])
    assert batch.totals == [None]
    assert batch.metrics["reward/overlong/errors"] == 1.0


@pytest.fixture(scope="module")
def reward_checkpoint(tmp_path_factory):
    """A tiny Qwen3-MoE sequence classifier (one output) with the embedded tokenizer."""
    from transformers import Qwen3MoeForSequenceClassification

    from align.modeling import model_config
    from align.tokenizer import build_tokenizer

    config = model_config("qwen3-student")
    config.num_labels = 1
    config.pad_token_id = build_tokenizer().pad_token_id
    torch.manual_seed(0)
    model = Qwen3MoeForSequenceClassification(config)
    path = tmp_path_factory.mktemp("reward_model")
    model.save_pretrained(str(path))
    build_tokenizer().save_pretrained(str(path))
    return path, model.eval()


def test_reward_model_scores_equal_an_unbatched_forward(reward_checkpoint):
    path, model = reward_checkpoint
    reward = build_reward(
        RewardSpec(name="reward_model", options={"model": str(path), "batch_size": 3})
    )
    prompts = [
        [{"role": "user", "content": "Compute 1+2."}],
        [{"role": "user", "content": "Sort: dcba"}],
        "plain prompt ",
        [{"role": "user", "content": "Compute 12+34."}],
    ]
    completions = ["<answer>3</answer>", "<answer>abcd</answer>", "x", "<answer>46</answer>"]
    scores = reward(prompts, completions)

    tokenizer = reward.fn.classifier.tokenizer
    expected = []
    for prompt, completion in zip(prompts, completions, strict=True):
        if isinstance(prompt, str):
            text = prompt + completion
        else:
            conversation = [*prompt, {"role": "assistant", "content": completion}]
            text = tokenizer.apply_chat_template(conversation, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            expected.append(model(ids).logits[0, 0].item())
    # Different-length inputs are padded inside a batch of 3; scores must not depend on it.
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 4


def test_reward_model_refuses_a_multi_output_classifier(tmp_path):
    from transformers import Qwen3MoeForSequenceClassification

    from align.modeling import model_config
    from align.tokenizer import build_tokenizer

    config = model_config("qwen3-student")
    config.num_labels = 3
    Qwen3MoeForSequenceClassification(config).save_pretrained(str(tmp_path))
    build_tokenizer().save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="has 3 outputs; a reward model needs exactly one"):
        RewardModel(str(tmp_path))


@pytest.mark.vllm
def test_llm_judge_reward_is_the_renormalised_choice_probability(checkpoints, engine_for):
    """P(yes) / (P(yes) + P(no)) from vLLM equals the same ratio from a transformers forward."""
    from align.modeling import load_model
    from align.tokenizer import build_tokenizer

    template = "Q: {prompt} A: {completion} Gold: {answer}. Right?"
    judge = LLMJudge(str(checkpoints["llama4"]), template=template, llm=engine_for("llama4"))
    prompts = [[{"role": "user", "content": "Compute 1+2."}], "Sort: cba"]
    completions = ["<answer>3</answer>", "<answer>abc</answer>"]
    scores = judge(prompts, completions, answer=["3", "abc"], level=[1, 1])

    tokenizer = build_tokenizer()
    model = load_model(checkpoints["llama4"]).eval()
    questions = [
        "Q: Compute 1+2. A: <answer>3</answer> Gold: 3. Right?",
        "Q: Sort: cba A: <answer>abc</answer> Gold: abc. Right?",
    ]
    for question, score in zip(questions, scores, strict=True):
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            return_dict=False,
        )
        choice_logprob = {}
        for choice in ("yes", "no"):
            choice_ids = tokenizer.encode(choice, add_special_tokens=False)
            ids = torch.tensor([prompt_ids + choice_ids])
            with torch.no_grad():
                logprobs = model(ids).logits[0].log_softmax(-1)
            positions = range(len(prompt_ids) - 1, ids.shape[1] - 1)
            choice_logprob[choice] = sum(logprobs[t, ids[0, t + 1]].item() for t in positions)
        p_yes, p_no = (torch.tensor(list(choice_logprob.values())).softmax(0)).tolist()
        assert score == pytest.approx(p_yes, abs=1e-4)
        assert 0.0 < score < 1.0
