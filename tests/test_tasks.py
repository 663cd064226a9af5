"""The embedded tasks: generators, verifiers, splits and the export schemas."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections import Counter

import pytest
from datasets import load_from_disk

from align.tasks import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    SCHEMAS,
    SORT_LETTERS,
    TASK_ALPHABET,
    export,
    extract_answer,
    format_answer,
    get_task,
    make_problems,
    split_problems,
)
from align.tokenizer import ANSWER_TAGS, CHARACTERS

ROWS = make_problems(["add", "sort"], None, 30, seed=0)


def test_answer_tags_are_the_tokenizer_tags_and_the_alphabet_is_tokenizable():
    assert (ANSWER_OPEN, ANSWER_CLOSE) == ANSWER_TAGS
    assert set(TASK_ALPHABET) <= set(CHARACTERS)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<answer>46</answer>", "46"),
        ("I think <answer> 46 \n</answer> done", "46"),
        ("<answer>1</answer><answer>2</answer>", "1"),
        ("<answer>1<answer>2</answer>", "2"),
        ("<answer></answer>", ""),
        ("46", None),
        ("<answer>46", None),
        ("46</answer>", None),
        ("</answer>46<answer>", None),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_format_answer_round_trips():
    assert format_answer("abc") == "<answer>abc</answer>"
    assert extract_answer(format_answer("abc")) == "abc"


def test_add_check_compares_integers():
    add = get_task("add")
    for completion in ("<answer>46</answer>", "<answer>046</answer>", "<answer> 46 </answer>"):
        assert add.check(completion, "46"), completion
    for completion in (
        "<answer>47</answer>",
        "<answer>4 6</answer>",
        "<answer>46.0</answer>",
        "<answer>+46</answer>",
        "<answer></answer>",
        "46",
        "<answer>46",
    ):
        assert not add.check(completion, "46"), completion


def test_add_reversed_writes_the_sum_least_significant_digit_first():
    task = get_task("add_reversed")
    rows = make_problems(["add_reversed"], [1, 2, 3, 4], 50, seed=0)
    rng = random.Random(0)
    for row in rows:
        a, b = map(int, re.fullmatch(r"Compute (\d+)\+(\d+), reversed\.", row["prompt"]).groups())
        assert row["answer"] == str(a + b)[::-1]
        assert task.check(format_answer(row["answer"]), row["answer"])
        assert not task.check(format_answer(task.corrupt(row["answer"], rng)), row["answer"])
    # 120 reversed is "021": every written digit counts, a dropped zero is wrong.
    assert task.check("<answer>021</answer>", "021")
    assert not task.check("<answer>21</answer>", "021")
    assert not task.check("<answer>120</answer>", "021")


def test_add_aligned_writes_operands_and_sum_least_significant_digit_first():
    task = get_task("add_aligned")
    rows = make_problems(["add_aligned"], [1, 2, 3, 4], 50, seed=0)
    rng = random.Random(0)
    for row in rows:
        level = int(row["level"])
        written = re.fullmatch(r"Compute (\d+)\+(\d+), all reversed\.", row["prompt"]).groups()
        assert all(len(operand) == level for operand in written)  # trailing zeros kept: 50 is "05"
        a, b = (int(operand[::-1]) for operand in written)
        assert row["answer"] == str(a + b)[::-1]
        assert task.check(format_answer(row["answer"]), row["answer"])
        assert not task.check(format_answer(task.corrupt(row["answer"], rng)), row["answer"])
    assert task.generate(random.Random(3), 2)[0].endswith(", all reversed.")


def test_add_padded_writes_every_digit_at_the_same_place_at_every_level():
    task = get_task("add_padded")
    rows = make_problems(["add_padded"], [1, 2, 3, 4], 50, seed=0)
    rng = random.Random(0)
    for row in rows:
        level = int(row["level"])
        written = re.fullmatch(r"Compute (\d{4})\+(\d{4}), reversed, padded\.", row["prompt"])
        assert written is not None, row["prompt"]
        a, b = (int(operand[::-1]) for operand in written.groups())
        assert all(len(str(n)) == level for n in (a, b)) or level == 1
        assert row["answer"] == str(a + b).zfill(5)[::-1]
        assert task.check(format_answer(row["answer"]), row["answer"])
        corrupted = task.corrupt(row["answer"], rng)
        assert len(corrupted) == 5 and not task.check(format_answer(corrupted), row["answer"])
    # 47+85: the padding is part of the answer; the bare reversed sum is wrong.
    assert task.check("<answer>23100</answer>", "23100")
    assert not task.check("<answer>231</answer>", "23100")


def test_sort_check_compares_stripped_strings():
    sort = get_task("sort")
    assert sort.check("<answer> abcd </answer>", "abcd")
    for completion in (
        "<answer>abdc</answer>",
        "<answer>ABCD</answer>",
        "<answer>a bcd</answer>",
        "abcd",
        "<answer>abcd",
    ):
        assert not sort.check(completion, "abcd"), completion


def test_generators_are_deterministic_per_seed():
    assert make_problems(["add", "sort"], None, 30, seed=0) == ROWS
    other = make_problems(["add", "sort"], None, 30, seed=1)
    assert [r["prompt"] for r in other] != [r["prompt"] for r in ROWS]


def test_a_task_s_problems_do_not_depend_on_the_other_tasks():
    alone = make_problems(["sort"], [2, 3], 30, seed=0)
    assert alone == [r for r in ROWS if r["task"] == "sort" and r["level"] in (2, 3)]


def test_levels_set_the_difficulty():
    for row in ROWS:
        level = row["level"]
        if row["task"] == "add":
            a, b = row["prompt"].removeprefix("Compute ").removesuffix(".").split("+")
            assert len(a) == len(b) == level
            assert (a[0] != "0" or level == 1) and int(row["answer"]) == int(a) + int(b)
        else:
            letters = row["prompt"].removeprefix("Sort: ")
            assert len(letters) == level + 2 and set(letters) <= set(SORT_LETTERS)
            assert row["answer"] == "".join(sorted(letters))
    assert Counter((r["task"], r["level"]) for r in ROWS) == {
        (task, level): 30 for task in ("add", "sort") for level in (1, 2, 3, 4)
    }


def test_rows_have_ids_and_no_duplicate_prompts():
    rows = make_problems(["add"], [1], 100, seed=3)  # every level-1 addition exactly once
    assert len({r["prompt"] for r in rows}) == 100
    assert len({r["prompt"] for r in ROWS}) == len(ROWS)
    assert ROWS[17]["id"] == "add-1-000017" and ROWS[-1]["id"] == "sort-4-000029"
    assert all(len(r["prompt"]) < 30 for r in ROWS)


def test_asking_for_more_problems_than_a_level_has_is_an_error():
    with pytest.raises(ValueError, match=r"'add' level 1 has only 100 distinct problems"):
        make_problems(["add"], [1], 101, seed=0)


def test_unknown_task_and_level_are_errors():
    with pytest.raises(
        ValueError,
        match="known tasks: add, add_reversed, add_aligned, add_padded, sort, secret, guard",
    ):
        get_task("mul")
    with pytest.raises(ValueError, match="known tasks"):
        make_problems(["mul"], None, 1, seed=0)
    with pytest.raises(ValueError, match=r"levels \[1, 2, 3, 4\], not 5"):
        make_problems(["sort"], [5], 1, seed=0)


def test_all_text_is_within_the_task_alphabet():
    texts = [r["prompt"] for r in ROWS] + [format_answer(r["answer"]) for r in ROWS]
    texts += [m[0]["content"] for m in export(ROWS, "dpo")["rejected"]]
    assert set("".join(texts)) <= set(TASK_ALPHABET)


def test_split_is_disjoint_stratified_and_deterministic():
    train, heldout = split_problems(ROWS, 0.2, seed=0)
    assert len(train) + len(heldout) == len(ROWS)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert set(Counter((r["task"], r["level"]) for r in heldout).values()) == {6}
    assert split_problems(ROWS, 0.2, seed=0) == (train, heldout)
    assert split_problems(ROWS[::-1], 0.2, seed=0)[1] == heldout[::-1]  # order-independent
    assert split_problems(ROWS, 0.2, seed=1)[1] != heldout


def test_split_keeps_repeated_prompts_on_one_side():
    rows = ROWS + [dict(r, id=r["id"] + "-copy") for r in ROWS[:30]]
    train, heldout = split_problems(rows, 0.5, seed=0)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_problems(ROWS, 1.5, seed=0)


def user(text):
    return [{"role": "user", "content": text}]


def assistant(answer):
    return [{"role": "assistant", "content": format_answer(answer)}]


def test_sft_rl_and_chat_exports():
    rows = ROWS[:3] + ROWS[-3:]
    sft, rl, chat = (export(rows, schema) for schema in ("sft", "rl", "chat"))
    assert sft.column_names == ["prompt", "completion", "task", "level", "answer", "id"]
    assert rl.column_names == ["prompt", "answer", "task", "level", "id"]
    assert chat.column_names == ["messages", "task", "level", "answer", "id"]
    for row, s, r, c in zip(rows, sft, rl, chat, strict=True):
        assert s["prompt"] == r["prompt"] == user(row["prompt"])
        assert s["completion"] == assistant(row["answer"])
        assert c["messages"] == user(row["prompt"]) + assistant(row["answer"])
        assert s["answer"] == r["answer"] == c["answer"] == row["answer"]
        assert s["id"] == r["id"] == c["id"] == row["id"]
        assert get_task(row["task"]).check(s["completion"][0]["content"], row["answer"])


def test_dpo_rejected_always_fails_and_chosen_passes():
    rows = ROWS + make_problems(["sort"], [1], 200, seed=5)
    assert any(len(set(row["answer"])) == 1 for row in rows)  # "aaa": no pair to swap
    dpo = export(rows, "dpo", seed=0)
    assert dpo.column_names == ["prompt", "chosen", "rejected", "task", "level", "id"]
    for row, out in zip(rows, dpo, strict=True):
        task = get_task(row["task"])
        assert out["prompt"] == user(row["prompt"]) and out["chosen"] == assistant(row["answer"])
        assert out["rejected"][0]["role"] == "assistant"
        assert task.check(out["chosen"][0]["content"], row["answer"])
        assert not task.check(out["rejected"][0]["content"], row["answer"]), out["rejected"]
    assert export(rows, "dpo", seed=0)["rejected"] == dpo["rejected"]
    assert export(rows, "dpo", seed=1)["rejected"] != dpo["rejected"]


def test_corrupted_answers_are_plausible():
    rng = random.Random(0)
    add, sort = get_task("add"), get_task("sort")
    for answer in ("0", "9", "10", "46", "1998"):
        wrong = [add.corrupt(answer, rng) for _ in range(50)]
        assert all(w.isdigit() and w != answer and len(w) <= len(answer) + 1 for w in wrong)
        assert all(w == "0" or w[0] != "0" for w in wrong)
    assert sort.corrupt("aaa", rng) != "aaa"
    assert sorted(sort.corrupt("abcd", rng)) == list("abcd")


def test_unknown_schema_is_an_error():
    assert SCHEMAS == ("sft", "rl", "dpo", "chat")
    with pytest.raises(ValueError, match="known schemas: sft, rl, dpo, chat"):
        export(ROWS, "kto")


def test_up_to_gives_what_a_small_level_has_and_the_rest_in_full():
    rows = make_problems(["add"], [1, 2], 150, seed=0, up_to=True)
    counts = {level: sum(r["level"] == level for r in rows) for level in (1, 2)}
    assert counts == {1: get_task("add").capacity(1), 2: 150}
    assert len({r["prompt"] for r in rows}) == len(rows)
    with pytest.raises(ValueError, match="level 1 has only"):
        make_problems(["add"], [1], 150, seed=0)


def test_chatter_share_marks_that_share_of_the_sft_and_chat_answers_only(tmp_path):
    from align.config import ConfigError
    from align.tasks import CHATTER
    from pipelines import make_data

    config = make_data.Config(
        runs_dir=str(tmp_path), name="data", per_level=10, chatter_share=0.5, seed=3
    )
    out = make_data.run(config)
    sft = load_from_disk(f"{out['train']}/sft")
    chatty = [c[0]["content"].endswith(CHATTER) for c in sft["completion"]]
    assert sum(chatty) == round(len(sft) * 0.5) and len(sft) == 64
    chat = load_from_disk(f"{out['train']}/chat")
    assert sum(m[-1]["content"].endswith(CHATTER) for m in chat["messages"]) == sum(chatty)
    # Everything else keeps the bare answer: DPO pairs, RL rows (answer column), held-out rows.
    dpo = load_from_disk(f"{out['train']}/dpo")
    assert not any(CHATTER in c[0]["content"] for c in list(dpo["chosen"]) + list(dpo["rejected"]))
    for split in ("train", "heldout"):
        assert not any(CHATTER in a for a in load_from_disk(f"{out[split]}/rl")["answer"])
    assert not any(
        CHATTER in c[0]["content"] for c in load_from_disk(f"{out['heldout']}/sft")["completion"]
    )
    with pytest.raises(ConfigError, match="chatter_share"):
        make_data.Config(chatter_share=1.5).validate()


def test_per_level_per_task_and_a_fixed_heldout_count(tmp_path):
    from align.config import ConfigError
    from pipelines import make_data

    config = make_data.Config(
        runs_dir=str(tmp_path),
        name="data",
        tasks=["add_padded", "sort"],
        levels=[1, 2],
        per_level={"add_padded": 40, "sort": 10},
        heldout_per_level=3,
    )
    out = make_data.run(config)
    rows = {}
    for split in ("train", "heldout"):
        with open(f"{out[split]}/problems.jsonl", encoding="utf-8") as f:
            rows[split] = Counter((r["task"], r["level"]) for r in map(json.loads, f))
    assert rows["heldout"] == {(t, lv): 3 for t in ("add_padded", "sort") for lv in (1, 2)}
    assert rows["train"] == {
        ("add_padded", 1): 37,
        ("add_padded", 2): 37,
        ("sort", 1): 7,
        ("sort", 2): 7,
    }
    # The evaluation's size does not grow with the training rows.
    bigger = make_data.run(
        dataclasses.replace(config, name="big", per_level={"add_padded": 80, "sort": 10})
    )
    with open(f"{bigger['heldout']}/problems.jsonl", encoding="utf-8") as f:
        big_heldout = [json.loads(line)["prompt"] for line in f]
    assert len(big_heldout) == 12
    with pytest.raises(ValueError, match="leave none to train on"):
        split_problems(make_problems(["sort"], [1], 4, seed=0), 0.2, seed=0, heldout_count=4)

    for bad, message in [
        (
            {"per_level": {"add_padded": 40}},
            r"'per_level': names no count for task\(s\) \['sort'\]",
        ),
        (
            {"per_level": {"add_padded": 40, "sort": 10, "add": 5}},
            r"task\(s\) \['add'\] that are not",
        ),
        ({"per_level": {"add_padded": 40, "sort": 1}}, r"'per_level\.sort': must be >= 2"),
        ({"heldout_per_level": 10}, r"must be below the 10 problems of task 'sort' level 1"),
        ({"per_level": {}}, r"'per_level': names no count for task\(s\) \['add_padded', 'sort'\]"),
        (
            {"per_level": {"add_padded": 200, "sort": 10}},
            r"'per_level\.add_padded': task 'add_padded' level 1 has only 100 distinct problems",
        ),
        (
            {"per_level": {"add_padded": 200, "sort": 10}, "up_to": True, "heldout_per_level": 100},
            r"must be below the 10 problems",
        ),
        ({"heldout_per_level": 0}, "'heldout_per_level': must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            dataclasses.replace(config, **bad).validate()
