"""The loss of each answer character, by task, level and place: which places a model has learned.

    python scripts/answer_loss.py MODEL DATA [--rows N]

MODEL is a checkpoint directory, DATA an `sft` dataset (prompt/completion, with `task`,
`level` and `answer` columns, as `align make-data` writes them). For every row scored (N rows
spread evenly over DATA, default 90) the model reads the prompt and the completion as SFT
trains them; the table gives the mean negative log-likelihood of answer character k (the k-th
token after `<answer>`) per task and level. Near 0: that place is learned; near ln 10 = 2.30
for a digit: the model is guessing there. docs/recipe-evidence.md (0d) reads a plateau of
`add_aligned` this way.
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch
from transformers import AutoTokenizer

from align.data import DataError, load_dataset_file
from align.modeling import load_model
from align.rl.learner import token_logprobs
from align.tasks import ANSWER_OPEN


def answer_losses(model, tokenizer, rows) -> dict[tuple[str, int, int], list[float]]:
    """(task, level, place) -> the answer character's loss in each row that has that place."""
    answer_open = tokenizer.convert_tokens_to_ids(ANSWER_OPEN)
    losses = collections.defaultdict(list)
    for row in rows:
        prompt = tokenizer.apply_chat_template(
            row["prompt"], tokenize=False, add_generation_prompt=True
        )
        text = prompt + row["completion"][0]["content"]
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        start = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        opens = (ids[0, start:] == answer_open).nonzero()
        if len(opens) == 0:
            raise SystemExit(f"row {row['id']}: its completion holds no {ANSWER_OPEN}")
        first = start + int(opens[0]) + 1  # the answer's first character
        with torch.no_grad():
            logprobs = token_logprobs(model, ids)[0]  # position t scores token t + 1
        for place in range(len(row["answer"])):
            nll = -logprobs[first + place - 1].item()
            losses[(row["task"], int(row["level"]), place)].append(nll)
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="checkpoint directory")
    parser.add_argument("data", help="sft dataset (JSONL, Parquet or save_to_disk directory)")
    parser.add_argument("--rows", type=int, default=90, help="rows scored, spread evenly")
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error(f"--rows must be >= 1 (got {args.rows})")
    try:
        rows, _ = load_dataset_file(args.data, "sft")
    except DataError as error:
        print(error, file=sys.stderr)
        raise SystemExit(2) from None
    missing = {"task", "level", "answer"} - set(rows.column_names)
    if missing:
        print(
            f"{args.data}: no column(s) {sorted(missing)}; make-data writes them", file=sys.stderr
        )
        raise SystemExit(2)
    step = max(1, len(rows) // args.rows)
    rows = rows.select(range(0, len(rows), step)[: args.rows])
    model = load_model(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    losses = answer_losses(model, tokenizer, rows)
    print(f"answer loss (nats) of {args.model} on {len(rows)} rows of {args.data}")
    print(f"{'task':<12} {'level':>5} {'place':>5} {'rows':>5} {'loss':>7}")
    for (task, level, place), values in sorted(losses.items()):
        print(
            f"{task:<12} {level:>5} {place:>5} {len(values):>5} {sum(values) / len(values):>7.3f}"
        )


if __name__ == "__main__":
    main()
