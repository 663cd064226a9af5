"""The embedded character-level tokenizer, built locally with the `tokenizers` library.

Every printable ASCII character and the newline is one token, so digits and letters keep a
one-to-one token mapping (what a tiny model needs to learn arithmetic and sorting). The chat
control tokens and the answer tags are single tokens. Nothing is downloaded.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

BOS = "<|begin_of_text|>"
EOS = "<|eot|>"
PAD = "<|pad|>"
UNK = "<unk>"
HEADER_START = "<|header_start|>"
HEADER_END = "<|header_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, HEADER_START, HEADER_END)
# Answer tags are ordinary (non-special) added tokens: they survive decoding.
ANSWER_TAGS = ("<answer>", "</answer>")

# The vision tokens of Qwen3-VL (added to the tokenizers of vision-language checkpoints): an
# image item of a message renders as start, one placeholder and end; the processor
# (transformers) or the engine (vLLM) repeats the placeholder once per image embedding.
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# Llama 4's layout: <|header_start|>role<|header_end|>content<|eot|>, without the newlines
# (every character is a token here, so each saved character is a faster step). A message's
# content is a string or TRL's list of content items (`{"type": "text", "text": ...}`,
# `{"type": "image"}`); only vision-language checkpoints get rows with images.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|header_start|>{{ message['role'] }}<|header_end|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|eot|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>{% endif %}"
)

CHARACTERS = "\n" + "".join(c for c in string.printable if c.isprintable())


def build_tokenizer(vision: bool = False) -> PreTrainedTokenizerFast:
    """Builds the embedded tokenizer: special tokens, answer tags, then one token per character.

    Args:
        vision: add the vision tokens (after every other token: the text ids do not move), for
            a vision-language model.

    Returns:
        A `PreTrainedTokenizerFast` with BOS/EOS/PAD/UNK set and the chat template attached.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for char in CHARACTERS:
        vocab[char] = len(vocab)
    # BPE without merges and without a pre-tokenizer splits text into single characters,
    # spaces and newlines included; Fuse() joins them back verbatim when decoding.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[HEADER_START, HEADER_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        padding_side="left",
    )
    tokenizer.add_tokens(list(ANSWER_TAGS))
    if vision:
        tokenizer.add_tokens(list(VISION_TOKENS), special_tokens=True)
    return tokenizer


def encode_prompts(tokenizer, prompts: list[str | list[dict]]) -> list[list[int]]:
    """Token ids of each prompt, ready for generation.

    A prompt is a conversation (list of `{"role", "content"}` messages, TRL's conversational
    format): the chat template is applied with the assistant header appended. A plain string is
    tokenised as is, with the BOS token in front.
    """
    encoded = []
    for prompt in prompts:
        if isinstance(prompt, str):
            encoded.append(
                [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]
            )
        else:
            encoded.append(
                list(
                    tokenizer.apply_chat_template(
                        prompt, add_generation_prompt=True, tokenize=True, return_dict=False
                    )
                )
            )
    return encoded
