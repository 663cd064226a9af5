"""Images in prompts: the vision-language preset, serving it with images, reading images, and
the embedded visual task.

The engine test proves what nothing else can: vLLM, given prompt token ids with an image
placeholder and the image, computes the same logprobs as a transformers forward of the same
checkpoint with the processor's pixel values (fp32, within 1e-4), and the image changes them.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections import deque

import pytest
import torch
from PIL import Image, ImageColor
from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen3VLMoeForConditionalGeneration

from align.modeling import build_model, count_parameters, write_checkpoint
from align.tasks import (
    SHAPE_COLOURS,
    SHAPES_IMAGE,
    TILE,
    TILE_LETTERS,
    export,
    get_task,
    make_problems,
    split_problems,
)
from align.vision import ImageError, load_image, load_images
from tests.conftest import shared_engine


@pytest.fixture(scope="module")
def vision_checkpoint(tmp_path_factory):
    model = build_model("vision-student", seed=0)
    path = write_checkpoint(model, tmp_path_factory.mktemp("vision") / "model")
    return path, model


def test_the_learners_flop_count_leaves_the_vision_tower_out(vision_checkpoint):
    """The RL learner's FLOPs per token count the parameters a text token passes through: the
    tower runs on image patches, so its weights are not among them."""
    from align.losses.policy import PolicyLossSettings
    from align.rl.learner import LearnerRank, LearnerSettings, free_address
    from align.vision import in_vision_tower

    path, model = vision_checkpoint
    rank = LearnerRank(str(path), LearnerSettings(), PolicyLossSettings(), 8)
    rank.start(*free_address())
    tower = sum(p.numel() for n, p in model.named_parameters() if in_vision_tower(n))
    embedding = model.get_input_embeddings().weight.numel()
    assert tower > 0 and not model.config.get_text_config().tie_word_embeddings
    assert rank.flops_per_token == 6 * (count_parameters(model)["active"] - embedding - tower)


def test_vision_preset_checkpoint_reloads_exactly(vision_checkpoint):

    path, model = vision_checkpoint
    reloaded = Qwen3VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    built, loaded = model.state_dict(), reloaded.state_dict()
    assert built.keys() == loaded.keys()
    assert [name for name in built if not torch.equal(built[name], loaded[name])] == []
    counts = count_parameters(model)
    assert 0 < counts["active"] < counts["total"]


def _image_prompt(tokenizer, text: str) -> list[int]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )


def transformers_logprobs(model, processor, ids: list[int], images: list):
    """A transformers fp32 forward of `ids` with `images`: each image placeholder expanded to
    its image's merged patches (in order), as the engine expands it. Returns the expanded ids,
    the logprob of every token after the first, and the log-softmax at every position."""
    pixels = processor(images=images, return_tensors="pt")
    image_id = model.config.image_token_id
    counts = iter(int(g.prod()) // processor.merge_size**2 for g in pixels["image_grid_thw"])
    expanded: list[int] = []
    for token in ids:
        expanded += [image_id] * next(counts) if token == image_id else [token]
    ids_t = torch.tensor([expanded])
    with torch.no_grad():
        logits = model(
            input_ids=ids_t,
            pixel_values=pixels["pixel_values"],
            image_grid_thw=pixels["image_grid_thw"],
            # What the processor returns beside the ids: 1 marks image tokens (M-RoPE).
            mm_token_type_ids=(ids_t == image_id).long(),
        ).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return expanded, logp[:-1].gather(-1, ids_t[0, 1:, None])[:, 0], logp


def test_vllm_logprobs_on_image_prompts_equal_transformers(vision_checkpoint):

    from align import engine

    path, _ = vision_checkpoint
    tokenizer = AutoTokenizer.from_pretrained(path)
    task = get_task("shapes")
    rows = make_problems(["shapes"], [1, 4], 1, seed=0)
    images = [task.render(row["scene"]) for row in rows]
    prompt = _image_prompt(tokenizer, task.question)
    llm = shared_engine(path, max_model_len=256)
    completions = engine.generate(
        llm, [prompt, prompt], n=1, temperature=0.0, max_tokens=6, images=[[im] for im in images]
    )
    sequences = [prompt + c[0].token_ids for c in completions]
    served = engine.sequence_logprobs(llm, sequences, images=[[im] for im in images])

    processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    last = []
    for sequence, image, logprobs, (completion,) in zip(
        sequences, images, served, completions, strict=True
    ):
        ids, expected, logp = transformers_logprobs(model, processor, sequence, [image])
        assert len(logprobs) == len(ids) - 1
        assert torch.allclose(torch.tensor(logprobs), expected, atol=1e-4, rtol=0)
        # The engine's greedy completion is the transformers argmax at each generated position.
        prompt_end = len(ids) - len(completion.token_ids)
        assert logp[prompt_end - 1 : -1].argmax(-1).tolist() == ids[prompt_end:]
        last.append(logp[-1])
    # The image reaches the language model: another image moves the logprobs by far more
    # than the tolerance above.
    assert (last[0] - last[1]).abs().max() > 1e-2


# --- reading images ----------------------------------------------------------------------------


def _png(mode: str = "RGB", size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def test_images_are_read_from_every_form_and_converted_to_rgb(tmp_path):
    (tmp_path / "a.png").write_bytes(_png("L"))
    for value in (
        Image.new("P", (8, 8)),
        _png(),
        "a.png",
        str(tmp_path / "a.png"),
        {"bytes": _png("RGBA"), "path": None},
        {"bytes": None, "path": "a.png"},
    ):
        image = load_image(value, base_dir=tmp_path)
        assert image.mode == "RGB" and image.size == (8, 8)


@pytest.mark.parametrize(
    "value, reason",
    [
        (b"not an image", "is not a readable image"),
        (_png()[:40], "is not a readable image"),
        ("missing.png", "does not exist"),
        (".", "is not a regular file"),
        (17, "expected an image"),
        ("", "expected an image"),
        (_png("I;16"), "mode 'I;16' is not read"),
    ],
)
def test_bad_images_are_refused_saying_why(tmp_path, value, reason):
    with pytest.raises(ImageError, match=reason):
        load_image(value, base_dir=tmp_path)


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding():
    from align import vision

    header = _png(size=(64, 64))
    limit = vision.MAX_PIXELS
    try:
        vision.MAX_PIXELS = 63 * 63
        with pytest.raises(ImageError, match="64 x 64 pixels"):
            load_image(header)
    finally:
        vision.MAX_PIXELS = limit


def test_a_rows_images_must_match_its_prompt():
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "n?"}]}]
    assert len(load_images({"prompt": prompt, "images": [_png()]})) == 1
    assert load_images({"prompt": "text only"}) is None
    with pytest.raises(ImageError, match="places 1 image"):
        load_images({"prompt": prompt})
    with pytest.raises(ImageError, match="2 image\\(s\\) but the prompt places 1"):
        load_images({"prompt": prompt, "images": [_png(), _png()]})
    with pytest.raises(ImageError, match="more than max_images=1"):
        load_images({"prompt": prompt, "images": [_png(), _png()]}, max_images=1)
    with pytest.raises(ImageError, match="^image 0: "):
        load_images({"prompt": prompt, "images": [b"junk"]})


# --- the visual task ---------------------------------------------------------------------------


def _count_squares(image: Image.Image) -> tuple[int, int]:
    """(squares, other shapes) found in the pixels: connected non-white regions, a square being
    one that fills its bounding box."""
    width, height = image.size
    pixels = image.load()
    seen = [[False] * width for _ in range(height)]
    squares = others = 0
    for y0 in range(height):
        for x0 in range(width):
            if seen[y0][x0] or pixels[x0, y0] == (255, 255, 255):
                continue
            region, queue = [], deque([(x0, y0)])
            seen[y0][x0] = True
            while queue:
                x, y = queue.popleft()
                region.append((x, y))
                for nx, ny in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                    if 0 <= nx < width and 0 <= ny < height and not seen[ny][nx]:
                        if pixels[nx, ny] != (255, 255, 255):
                            seen[ny][nx] = True
                            queue.append((nx, ny))
            xs, ys = [x for x, _ in region], [y for _, y in region]
            box = (max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1)
            if len(region) == box:
                squares += 1
            else:
                others += 1
    return squares, others


def test_shapes_answers_equal_the_squares_in_the_drawn_image():
    task = get_task("shapes")
    rows = make_problems(["shapes"], None, 25, seed=3)
    circles = 0
    for row in rows:
        image = task.render(row["scene"])
        assert image.size == (SHAPES_IMAGE, SHAPES_IMAGE)
        squares, others = _count_squares(image)
        assert str(squares) == row["answer"], row
        circles += others
        assert task.check(f"<answer>{squares}</answer>", row["answer"])
        assert not task.check(
            f"<answer>{task.corrupt(row['answer'], task_rng())}</answer>", row["answer"]
        )
    assert circles > 0  # levels 3 and 4 draw circles among the squares


def test_colours_answers_equal_the_colours_read_from_each_tile():
    """The answer is the set of colours in the pixels, one per tile at most (a blank border
    around every square: none reaches past its tile, the merged image token that reads it)."""
    task = get_task("colours")
    letters = {
        ImageColor.getrgb(name): c for name, c in zip(SHAPE_COLOURS, TILE_LETTERS, strict=True)
    }
    rows = make_problems(["colours"], None, 25, seed=3)
    for row in rows:
        image = task.render(row["scene"])
        side = image.size[0] // TILE
        assert image.size == (side * TILE, side * TILE)
        pixels = image.load()
        read = set()
        for i in range(side * side):
            x0, y0 = i % side * TILE, i // side * TILE
            inside = {pixels[x, y] for x in range(x0, x0 + TILE) for y in range(y0, y0 + TILE)}
            border = {pixels[x, y] for x in range(x0, x0 + TILE) for y in (y0, y0 + TILE - 1)}
            border |= {pixels[x, y] for y in range(y0, y0 + TILE) for x in (x0, x0 + TILE - 1)}
            assert border == {(255, 255, 255)}, row
            inside.discard((255, 255, 255))
            assert len(inside) <= 1, row
            read |= {letters[colour] for colour in inside}
        assert "".join(sorted(read)) == row["answer"], row
        assert task.check(f"<answer>{row['answer']}</answer>", row["answer"])
        assert not task.check(
            f"<answer>{task.corrupt(row['answer'], task_rng())}</answer>", row["answer"]
        )
    assert {task.render(row["scene"]).size[0] for row in rows} == {2 * TILE, 3 * TILE, 4 * TILE}


def task_rng():
    import random

    return random.Random(0)


def test_shapes_rows_export_with_their_images_in_trl_columns(tmp_path):
    rows = make_problems(["shapes", "add"], [1], 4, seed=0)
    train, heldout = split_problems(rows, 0.5, seed=0)
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in heldout)
    for schema in ("sft", "rl", "dpo", "chat"):
        data = export(rows, schema)
        data.save_to_disk(str(tmp_path / schema))
        first = data[0]
        messages = first["messages"] if schema == "chat" else first["prompt"]
        assert first["task"] == "shapes"
        assert [item["type"] for item in messages[0]["content"]] == ["image", "text"]
        (image,) = first["images"]
        assert image.size == (SHAPES_IMAGE, SHAPES_IMAGE)
        # Text rows keep their text as a text item and have no images.
        assert data[-1]["images"] == []
        assert (
            data[-1][("messages" if schema == "chat" else "prompt")][0]["content"][0]["type"]
            == "text"
        )


def test_dataset_files_with_images_are_checked_row_by_row(tmp_path):
    import json

    from align.data import DataError, load_dataset_file

    (tmp_path / "one.png").write_bytes(_png())
    (tmp_path / "bad.png").write_bytes(b"junk")
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "n?"}]}]
    text = [{"role": "user", "content": [{"type": "text", "text": "text"}]}]
    rows = [
        {"prompt": text, "answer": "1", "images": []},
        {"prompt": prompt, "answer": "2", "images": ["one.png"]},
    ]
    path = tmp_path / "rl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, report = load_dataset_file(path, "rl", images=True)
    assert report["kept"] == 2
    # A stage that does not take images refuses the first row in that format, naming it.
    with pytest.raises(DataError, match=r"rl.jsonl: row 0: field 'prompt': message 0: content is"):
        load_dataset_file(path, "rl")
    rows[1]["images"] = ["bad.png"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"row 1: field 'images': image 0: 'bad.png' is not a"):
        load_dataset_file(path, "rl", images=True)
    # An image in an assistant turn, and a text item without text.
    answer = [{"role": "assistant", "content": [{"type": "image"}]}]
    bad = {"prompt": [{"role": "user", "content": "q"}], "completion": answer}
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(DataError, match="images belong in user messages, not 'assistant'"):
        load_dataset_file(path, "sft", images=True)
    empty = {
        "prompt": [{"role": "user", "content": [{"type": "text", "text": " "}]}],
        "answer": "1",
    }
    path.write_text(json.dumps(empty) + "\n")
    with pytest.raises(DataError, match="content item 0: text must be a non-empty string"):
        load_dataset_file(path, "rl", images=True)


def test_align_eval_scores_image_rows_through_the_engine(vision_checkpoint, tmp_path):

    from align import engine
    from align.config import from_dict
    from align.data import DataError
    from pipelines.evaluate import Config, run

    path, _ = vision_checkpoint
    rows = make_problems(["shapes"], [1, 2], 3, seed=1)
    data = tmp_path / "heldout"
    export(rows, "rl").save_to_disk(str(data))
    llm = shared_engine(path, max_model_len=256)
    config = from_dict(
        Config,
        {
            "model": str(path),
            "data": str(data),
            "runs_dir": str(tmp_path / "runs"),
            "samples": 2,
            "pass_k": 1,
            "max_new_tokens": 6,
            "engine": {"max_model_len": 256},
        },
    )
    report = run(config, llm=llm)
    assert report["n"] == 6 and len(report["by_level"]) == 2
    # The same greedy completions, recounted from the engine given each row's image.
    tokenizer = AutoTokenizer.from_pretrained(path)
    task = get_task("shapes")
    prompts = [_image_prompt(tokenizer, row["prompt"]) for row in rows]
    greedy = engine.generate(
        llm,
        prompts,
        n=1,
        temperature=0.0,
        max_tokens=6,
        images=[[task.render(row["scene"])] for row in rows],
    )
    right = sum(task.check(g[0].text, row["answer"]) for g, row in zip(greedy, rows, strict=True))
    assert report["greedy_accuracy"] == right / len(rows)
    # A row whose image cannot be read is refused before anything is written.
    bad = tmp_path / "bad.jsonl"
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "n?"}]}]
    bad.write_text(json.dumps({"prompt": prompt, "answer": "1", "images": ["nothing.png"]}) + "\n")
    bad_config = dataclasses.replace(config, data=str(bad), name="bad")
    with pytest.raises(DataError, match="row 0: field 'images': image 0: 'nothing.png' does not"):
        run(bad_config, llm=llm)
    assert not (tmp_path / "runs" / "bad").exists()


@pytest.fixture(scope="module")
def sft_vision(vision_checkpoint, tmp_path_factory):
    """`align sft` of the vision checkpoint on 120 `shapes` rows, 3 passes (45 steps: enough
    for the answer format): (result, rows)."""
    from align.config import from_dict
    from pipelines.sft import Config, run

    path, _ = vision_checkpoint
    tmp_path = tmp_path_factory.mktemp("sft-vision")
    rows = make_problems(["shapes"], [1, 2], 60, seed=2)
    data = tmp_path / "train"
    export(rows, "sft").save_to_disk(str(data))
    config = from_dict(
        Config,
        {
            "model": str(path),
            "data": str(data),
            "runs_dir": str(tmp_path / "runs"),
            "train": {"batch_size": 8, "learning_rate": 1e-3, "epochs": 3, "save_steps": 100},
        },
    )
    return run(config), rows


def test_sft_with_images_trains_the_language_model_and_serves_exactly(
    vision_checkpoint, sft_vision
):
    """`align sft` on image rows: the vision tower stays as it was (train_vision: false), the
    language model learns, and vLLM serves the saved checkpoint with the logprobs transformers
    computes (the saved experts are in the layout both read)."""

    from align import engine
    from align.modeling import load_model

    path, before = vision_checkpoint
    result, rows = sft_vision
    assert result["steps"] == 45
    trained = load_model(result["model"])
    old, new = before.state_dict(), trained.state_dict()
    vision = [n for n in old if ".visual." in n]
    assert vision and all(torch.equal(old[n], new[n]) for n in vision)
    assert not torch.equal(old["lm_head.weight"], new["lm_head.weight"])

    tokenizer = AutoTokenizer.from_pretrained(result["model"])
    image = get_task("shapes").render(rows[0]["scene"])
    prompt = _image_prompt(tokenizer, rows[0]["prompt"])
    answer = tokenizer.encode("<answer>2</answer><|eot|>", add_special_tokens=False)
    llm = shared_engine(result["model"], max_model_len=256)
    (served,) = engine.sequence_logprobs(llm, [prompt + answer], images=[[image]])
    reference = Qwen3VLMoeForConditionalGeneration.from_pretrained(
        result["model"], dtype=torch.float32
    ).eval()
    processor = Qwen2VLImageProcessorPil.from_pretrained(result["model"])
    _, expected, _ = transformers_logprobs(reference, processor, prompt + answer, [image])
    assert torch.allclose(torch.tensor(served), expected, atol=1e-4, rtol=0)


def test_the_vision_learning_rate_moves_the_tower_by_its_own_rate(vision_checkpoint, tmp_path):
    """`train.vision_learning_rate` through SFTTrainer's own optimiser creation: Adam's first
    step moves each weight by about its group's rate, the tower's 1e-5 and the rest's 1e-2."""
    from align.config import from_dict
    from align.modeling import load_model
    from pipelines.sft import Config, run

    path, before = vision_checkpoint
    data = tmp_path / "train"
    export(make_problems(["shapes"], [1], 8, seed=3), "sft").save_to_disk(str(data))
    train = {"batch_size": 8, "learning_rate": 1e-2, "lr_scheduler": "constant", "warmup_steps": 0}
    train |= {"epochs": 1, "save_steps": 100, "train_vision": True, "vision_learning_rate": 1e-5}
    config = {"model": str(path), "data": str(data), "runs_dir": str(tmp_path), "train": train}
    result = run(from_dict(Config, config))
    assert result["steps"] == 1
    old, new = before.state_dict(), load_model(result["model"]).state_dict()

    def moved(names) -> float:
        return max((new[n] - old[n]).abs().max().item() for n in names)

    tower = [n for n in old if ".visual." in n]
    assert tower and 0.5e-5 < moved(tower) <= 1.01e-5
    assert 0.5e-2 < moved(set(old) - set(tower)) <= 1.01e-2


def _answer_logprob(model, processor, tokenizer, prompt, image, answer: str) -> float:
    """Sum of the model's logprobs of an answer's tokens after an image prompt."""
    ids = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    _, logprobs, _ = transformers_logprobs(model, processor, list(ids) + answer_ids, [image])
    return float(logprobs[-len(answer_ids) :].sum())


def test_dpo_with_images_prefers_the_chosen_answers_more(vision_checkpoint, tmp_path):
    """`align dpo` on pairs with images: TRL's vision preference collator (format tokens
    masked), the vision tower frozen; after training the model prefers the chosen answers over
    the rejected ones more than before, measured by transformers with the pairs' images."""

    from align.config import from_dict
    from align.modeling import load_model
    from pipelines.dpo import Config, run

    path, before = vision_checkpoint
    rows = make_problems(["shapes"], [1], 16, seed=4)
    data = tmp_path / "pairs"
    pairs = export(rows, "dpo", seed=0)
    pairs.save_to_disk(str(data))
    config = from_dict(
        Config,
        {
            "model": str(path),
            "data": str(data),
            "runs_dir": str(tmp_path / "runs"),
            "train": {"batch_size": 8, "learning_rate": 1e-3, "epochs": 2, "save_steps": 100},
        },
    )
    result = run(config)
    assert result["steps"] == 4
    after = load_model(result["model"]).eval()
    old, new = before.state_dict(), after.state_dict()
    assert all(torch.equal(old[n], new[n]) for n in old if ".visual." in n)
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = Qwen2VLImageProcessorPil.from_pretrained(path)

    def margin(model) -> float:
        total = 0.0
        for pair in pairs:
            prompt, image = pair["prompt"], pair["images"][0]
            chosen, rejected = (pair[k][0]["content"][0]["text"] for k in ("chosen", "rejected"))
            total += _answer_logprob(model, processor, tokenizer, prompt, image, chosen)
            total -= _answer_logprob(model, processor, tokenizer, prompt, image, rejected)
        return total / len(pairs)

    # Before: about 0 (a random model); after 4 steps: about +0.8 nats per pair.
    assert margin(after) > margin(before.eval()) + 0.5


def test_two_images_of_other_shapes_in_one_prompt_are_served_exactly(vision_checkpoint):
    """Two images, neither square, in one prompt: vLLM's logprobs equal transformers' with the
    processor's pixel values for both images (each placeholder expanded to its own image's
    merged patches, in order)."""
    from PIL import ImageDraw

    from align import engine

    path, _ = vision_checkpoint
    tokenizer = AutoTokenizer.from_pretrained(path)
    wide, tall = Image.new("RGB", (128, 64), "white"), Image.new("RGB", (64, 160), "white")
    ImageDraw.Draw(wide).rectangle([10, 10, 40, 40], fill="red")
    ImageDraw.Draw(tall).ellipse([5, 60, 50, 110], fill="blue")
    content = [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]
    prompt = list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
    )
    llm = shared_engine(path, max_model_len=256)
    (served,) = engine.sequence_logprobs(llm, [prompt + [5, 6, 7]], images=[[wide, tall]])
    processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    ids, expected, _ = transformers_logprobs(model, processor, prompt + [5, 6, 7], [wide, tall])
    assert len(served) == len(ids) - 1
    assert torch.allclose(torch.tensor(served), expected, atol=1e-4, rtol=0)


@pytest.mark.ray
@pytest.mark.slow
def test_rl_with_images_scores_tokens_as_the_engine_does_after_every_sync(
    vision_checkpoint, sft_vision, tmp_path
):
    """`align rl` on image prompts through Ray and vLLM, synchronous: the rollout engine gets
    each prompt's image, the learner expands its placeholder to the image's patches with the
    processor's pixel values, and every step's sampled tokens score the same under the learner
    as under the engine that sampled them (steps 2-3: after a weight sync, which sends the
    language model only); the frozen tower's weights leave the run unchanged."""
    import yaml

    from align.modeling import load_model
    from tests.helpers import align

    result, _ = sft_vision
    data = tmp_path / "prompts"
    export(make_problems(["shapes"], [1, 2], 8, seed=6), "rl").save_to_disk(str(data))
    config = {
        "name": "rl",
        "runs_dir": str(tmp_path / "runs"),
        "model": result["model"],
        "data": str(data),
        "steps": 3,
        "groups_per_step": 8,
        "groups_per_request": 8,
        "max_staleness": 0,
        # Batches of groups whose rewards vary (the format reward varies where the answers are
        # all wrong): every step learns, so steps 2-3 score a policy the sync changed.
        "rewards": [{"name": "answer_match"}, {"name": "answer_format"}],
        "sampling": {"samples": 4, "max_new_tokens": 8},
        "pool": {"min_active": 8},
        "engine": {"kv_cache_gib": 0.125, "max_model_len": 256},
    }
    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    out = align("rl", "--config", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "rl"
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "train/loss" in s]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(s["policy/behaviour_gap"] < 1e-5 for s in steps)
    assert all(s["train/advantage_abs_mean"] > 0 for s in steps)
    assert all(s["sync/load_seconds"] > 0 for s in steps[1:])
    start = load_model(result["model"]).state_dict()
    end = load_model(run_dir / "model").state_dict()
    assert all(torch.equal(start[n], end[n]) for n in start if ".visual." in n)
    assert not torch.equal(start["lm_head.weight"], end["lm_head.weight"])


def test_dry_runs_plan_a_vision_language_model(vision_checkpoint, tmp_path, quick_align):
    """`--dry-run` sizes the learner of a vision-language policy from its language model's
    layers (the tower counts with the root) for `align rl` and `align sft`."""
    path, _ = vision_checkpoint
    data = tmp_path / "rows"
    rows = make_problems(["shapes"], [1], 4, seed=0)
    export(rows, "rl").save_to_disk(str(data / "rl"))
    export(rows, "sft").save_to_disk(str(data / "sft"))
    runs = f"runs_dir={tmp_path / 'runs'}"
    out = quick_align("rl", "--dry-run", f"model={path}", f"data={data / 'rl'}", runs)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "policy   0.9 M parameters, 4 layers" in out.stdout
    out = quick_align("sft", "--dry-run", f"model={path}", f"data={data / 'sft'}", runs)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "training 1 process(es), fsdp, full-parameter" in out.stdout
    assert not (tmp_path / "runs").exists()


def test_distillation_with_images_moves_the_student_to_the_teacher(
    vision_checkpoint, sft_vision, tmp_path
):
    """`align distill` between two vision-language models, online teacher: both read each
    row's image (TRL's vision collator), and the student's KL to the teacher on held-out gold
    completions with their images falls; its tower stays frozen. A top-k cache of image rows
    is refused by name (not built yet)."""
    from align.config import ConfigError, from_dict
    from align.modeling import load_model
    from pipelines.distill import Config, run

    path, before = vision_checkpoint
    result, rows = sft_vision
    export(rows, "sft").save_to_disk(str(tmp_path / "train"))
    export(make_problems(["shapes"], [1, 2], 6, seed=8), "sft").save_to_disk(
        str(tmp_path / "heldout")
    )
    settings = {
        "student": str(path),
        "data": str(tmp_path / "train"),
        "heldout_sft": str(tmp_path / "heldout"),
        "runs_dir": str(tmp_path / "runs"),
        "teacher": {"model": result["model"], "mode": "online"},
        "train": {"batch_size": 8, "learning_rate": 1e-3, "epochs": 1, "save_steps": 100},
    }
    distilled = run(from_dict(Config, settings))
    before_kl = distilled["heldout_before"]["teacher_kl"]
    after_kl = distilled["heldout_after"]["teacher_kl"]
    assert after_kl < 0.7 * before_kl, (before_kl, after_kl)
    student = load_model(distilled["model"]).state_dict()
    assert all(torch.equal(before.state_dict()[n], student[n]) for n in student if ".visual." in n)
    offline = {**settings, "teacher": {"model": result["model"], "mode": "offline"}}
    with pytest.raises(ConfigError, match="key 'teacher.mode': a vision-language student"):
        run(from_dict(Config, {**offline, "name": "offline"}))
    assert not (tmp_path / "runs" / "offline").exists()
