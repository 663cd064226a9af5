"""Embedded default models: tiny Llama 4 style and Qwen3-MoE text MoEs built from presets.

A preset is a named set of config values for one model family. `build_model` random-initialises
the model from a seed; `write_checkpoint` saves it with the embedded tokenizer as a Hugging Face
checkpoint (safetensors, config, generation config, tokenizer with chat template) that both
transformers and vLLM load. The same loading code (`load_model`) serves real checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationConfig,
    Llama4ForCausalLM,
    Llama4TextConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

from align.config import (
    ConfigError,
    UnreadableFile,
    check_input_file,
    decode_text,
    read_input_file,
)
from align.moe import route_sparsely
from align.tokenizer import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, build_tokenizer


@dataclass(frozen=True)
class ModelFamily:
    """A model family the toolkit builds: its config class, model class and fixed settings."""

    config_cls: type[PretrainedConfig]
    model_cls: type[PreTrainedModel]
    # Settings every preset of the family shares (what makes it "Llama 4 style"); of the text
    # model for a vision-language family.
    base: dict[str, Any]
    # A vision-language family's vision tower (its output width is the text model's width).
    vision: dict[str, Any] | None = None


FAMILIES: dict[str, ModelFamily] = {
    # Llama 4 text MoE: MoE on every second layer (alternating dense/MoE), one shared expert in
    # every MoE layer (built into Llama4TextMoe), top-1 routing with a sigmoid router score.
    "llama4": ModelFamily(
        Llama4TextConfig,
        Llama4ForCausalLM,
        dict(
            interleave_moe_layer_step=2,
            num_experts_per_tok=1,
            use_qk_norm=True,
            # vLLM's CPU attention refuses head_dim 16; 32 is the smallest accepted.
            head_dim=32,
            max_position_embeddings=512,
            attention_chunk_size=512,
            router_aux_loss_coef=0.001,
            tie_word_embeddings=False,
        ),
    ),
    # Qwen3-MoE: softmax top-k routing, MoE in every layer, no shared expert.
    "qwen3_moe": ModelFamily(
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        dict(
            head_dim=32,
            decoder_sparse_step=1,
            norm_topk_prob=True,
            max_position_embeddings=512,
            router_aux_loss_coef=0.001,
            tie_word_embeddings=False,
        ),
    ),
    # Qwen3 dense: no experts. Every stage runs on it too; the MoE-only settings (router loss,
    # expert load, routing change) are skipped where a model has no routers.
    "qwen3": ModelFamily(
        Qwen3Config,
        Qwen3ForCausalLM,
        dict(head_dim=32, max_position_embeddings=512, tie_word_embeddings=False),
    ),
}

# Qwen3-VL-MoE: a Qwen3-MoE text model (softmax top-k routing, MoE in every layer) reading the
# embeddings of a ViT vision tower through a patch merger, with multimodal rotary positions
# (M-RoPE: its sections, temporal/height/width, add up to head_dim / 2).
FAMILIES["qwen3_vl_moe"] = ModelFamily(
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    dict(
        head_dim=32,
        decoder_sparse_step=1,
        # vLLM's Qwen3-MoE layer reads it; the text config class has no such field, and its
        # router renormalises the top-k weights (what True means).
        norm_topk_prob=True,
        max_position_embeddings=1024,
        router_aux_loss_coef=0.001,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [8, 4, 4],
            "mrope_interleaved": True,
        },
    ),
    vision=dict(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        # A 16 x 16 grid of patches: images up to 256 x 256 pixels.
        num_position_embeddings=256,
        deepstack_visual_indexes=[0, 1],
    ),
)

# TRL's MoE load-balancing loss reads `config.num_experts`; Llama 4 names it `num_local_experts`.
# A class-level alias, so nothing extra is written into saved configs.
Llama4TextConfig.attribute_map = {
    **Llama4TextConfig.attribute_map,
    "num_experts": "num_local_experts",
}

# name -> (family, sizes). "teacher" and "student" are the recipe's defaults: the default
# pipeline aligns the teacher (SFT, RL, DPO) and distils it into the smaller student.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "student": (
        "llama4",
        dict(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_local_experts=4,
            intermediate_size=128,
            intermediate_size_mlp=256,
        ),
    ),
    "teacher": (
        "llama4",
        dict(
            hidden_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=8,
            intermediate_size=256,
            intermediate_size_mlp=512,
        ),
    ),
    "qwen3-student": (
        "qwen3_moe",
        dict(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=128,
            intermediate_size=256,
        ),
    ),
    "dense-student": (
        "qwen3",
        dict(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=256,
        ),
    ),
    "qwen3-teacher": (
        "qwen3_moe",
        dict(
            hidden_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=256,
            intermediate_size=512,
        ),
    ),
}
# The multimodal student: Qwen3-VL-MoE whose text model has the qwen3-student's sizes.
PRESETS["vision-student"] = ("qwen3_vl_moe", PRESETS["qwen3-student"][1])
# A guard model for the embedded safety rule (`align.tasks.GuardTask`): the student's size
# with room for Llama Guard's instruction (about 600 characters, one token each).
PRESETS["guard"] = (
    "llama4",
    {**PRESETS["student"][1], "max_position_embeddings": 1024, "attention_chunk_size": 1024},
)


def model_config(preset: str) -> PretrainedConfig:
    """Returns the transformers config of a preset, with the embedded tokenizer's special ids.

    Raises:
        ValueError: the preset is unknown (the message lists the known presets).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known presets: {', '.join(PRESETS)}")
    family_name, sizes = PRESETS[preset]
    return family_config(family_name, **sizes)


def family_config(family_name: str, **sizes) -> PretrainedConfig:
    """Returns the config of a `FAMILIES[family_name]` model with the given sizes (overriding the
    family's base settings) and the embedded tokenizer's special ids."""
    family = FAMILIES[family_name]
    tokenizer = build_tokenizer(vision=family.vision is not None)
    text = dict(
        **{**family.base, **sizes},
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family.vision is None:
        return family.config_cls(**text, architectures=[family.model_cls.__name__], dtype="float32")
    token = tokenizer.convert_tokens_to_ids
    return family.config_cls(
        text_config=text,
        vision_config={**family.vision, "out_hidden_size": text["hidden_size"]},
        image_token_id=token(IMAGE_PAD),
        video_token_id=token(VIDEO_PAD),
        vision_start_token_id=token(VISION_START),
        vision_end_token_id=token(VISION_END),
        tie_word_embeddings=False,
        architectures=[family.model_cls.__name__],
        dtype="float32",
    )


def build_model(preset: str, seed: int) -> PreTrainedModel:
    """Random-initialises the preset's model; the same seed gives the same weights."""
    config = model_config(preset)
    family = FAMILIES[PRESETS[preset][0]]
    torch.manual_seed(seed)
    return family.model_cls(config).to(torch.float32).eval()


def is_vision_language(config: PretrainedConfig) -> bool:
    """Whether the toolkit runs a checkpoint as a model that reads images: it has a vision
    tower and transformers has no text-only class for it. A multimodal checkpoint with one
    (Llama 4: `Llama4ForCausalLM`) runs as its language model, text only, as before the image
    path existed: its image processor needs torchvision (docs/multimodal.md)."""
    return (
        getattr(config, "vision_config", None) is not None
        and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )


def write_checkpoint(model: PreTrainedModel, directory: str | Path) -> Path:
    """Saves `model` with the embedded tokenizer as a Hugging Face checkpoint directory (and,
    for a vision-language model, its image processor's settings)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vision = is_vision_language(model.config)
    tokenizer = build_tokenizer(vision=vision)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    if vision:
        _write_vision_files(model, directory)
    return directory


def _write_vision_files(model: PreTrainedModel, directory: Path) -> None:
    """The image processor's settings (PIL backend: no torchvision needed), read by both
    transformers and vLLM, and the experts in the checkpoint layout (`fix_expert_layout`)."""
    from transformers import Qwen2VLImageProcessorPil

    fix_expert_layout(model, directory)
    vision = model.config.vision_config
    Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        # At least one merged patch; at most the tower's position grid.
        min_pixels=(vision.patch_size * vision.spatial_merge_size) ** 2,
        max_pixels=vision.num_position_embeddings * vision.patch_size**2,
    ).save_pretrained(str(directory))


def checkpoint_expert_layout(
    config: PretrainedConfig, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A Qwen3-VL-MoE model's fused expert tensors, as transformers 5.19 writes them, in the
    checkpoint layout its loader and vLLM read; other tensors and models unchanged.

    transformers saves (and `revert_weight_conversion` returns) this model's experts in its
    internal layout, `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I], where its own loader
    and vLLM read [E, H, 2I] and [E, I, H]: without this, neither loads what was saved. A tensor
    already in the checkpoint layout is left alone, so this stays right once transformers
    writes the layout itself. (The layouts cannot be told apart when 2I = H or I = H; the
    presets keep them different.)
    """
    if config.model_type != "qwen3_vl_moe":
        return tensors
    text = config.get_text_config()
    hidden, inner = text.hidden_size, text.moe_intermediate_size
    internal = {".experts.gate_up_proj": (2 * inner, hidden), ".experts.down_proj": (hidden, inner)}
    fixed = dict(tensors)
    for name, tensor in tensors.items():
        for suffix, shape in internal.items():
            if name.endswith(suffix) and tuple(tensor.shape[1:]) == shape != shape[::-1]:
                fixed[name] = tensor.transpose(1, 2).contiguous()
    return fixed


def fix_expert_layout(model: PreTrainedModel, directory: Path) -> None:
    """Rewrites a saved checkpoint's fused experts in the checkpoint layout where needed
    (`checkpoint_expert_layout`)."""
    from safetensors.torch import load_file, save_file

    if model.config.model_type != "qwen3_vl_moe":
        return
    for file in sorted(Path(directory).glob("*.safetensors")):
        tensors = load_file(str(file))
        fixed = checkpoint_expert_layout(model.config, tensors)
        if any(fixed[name] is not tensors[name] for name in tensors):
            save_file(fixed, str(file), metadata={"format": "pt"})


# Suffixes of pickle-based weight files, which `check_checkpoint` names when it refuses them.
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# A tokenizer's files: its config and at least one of the others.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


def check_checkpoint(
    path: str | Path,
    key: str,
    max_model_len: int | None = None,
    length_key: str = "engine.max_model_len",
    causal: bool = True,
    vision: bool = False,
) -> PretrainedConfig:
    """Refuses a path that is not a usable local checkpoint directory, without loading it.

    The stages call this before anything is written, so a wrong or damaged checkpoint fails
    fast instead of in transformers, safetensors or vLLM after a run directory exists or an
    engine has started. It reads config.json, the tokenizer's JSON files and each weight file's
    header; pickle-based weights (`pytorch_model.bin`, `*.pt`) are refused without being
    opened: unpickling a file can run code from it.

    Args:
        path: the checkpoint directory a config names.
        key: that config key (`model`, `teacher.model`), named in the error.
        max_model_len: the engine's context length, if the stage starts one: it must fit
            the model's positions.
        length_key: the config key of `max_model_len`, named in the error.
        causal: whether the checkpoint must be a causal language model (a reward model, a
            sequence classifier, need not be).
        vision: whether a vision-language model (image-text-to-text) is taken too (every
            stage takes one; plug-ins' checkpoints are causal LMs or classifiers).

    Returns:
        The checkpoint's config.

    Raises:
        ConfigError: naming `key` (or `length_key`), the path and what is wrong.
    """
    try:
        config = _read_checkpoint(Path(path), causal, vision)
    except UnreadableFile as error:
        raise ConfigError(f"key '{key}': checkpoint {path} {error}") from None
    if max_model_len is not None:
        text = config.get_text_config()
        positions = getattr(text, "max_position_embeddings", None)
        if positions is not None and max_model_len > positions:
            raise ConfigError(
                f"key '{length_key}': {max_model_len} exceeds the {positions} positions "
                f"of checkpoint {path} (max_position_embeddings in its config.json)"
            )
    return config


def check_plugin_checkpoints(plugin: Any, options: dict[str, Any], key: str) -> None:
    """Refuses the options of a reward or filter plug-in that name an unusable checkpoint.

    A plug-in declares its checkpoint options in a class attribute, `checkpoint_options`:
    option name -> "causal_lm" (served by vLLM or trained) or "any" (e.g. a sequence
    classifier). The stages call this when they start, before anything is written or any
    engine starts (not when the config is read: in a pipeline an earlier stage may write
    the checkpoint).

    Raises:
        ConfigError: naming `key`.<option>, the path and what is wrong.
    """
    for option, kind in getattr(plugin, "checkpoint_options", {}).items():
        path = options.get(option)
        if isinstance(path, (str, Path)):  # missing or mistyped: the plug-in's checks say so
            check_checkpoint(path, f"{key}.{option}", causal=kind == "causal_lm")


def _read_checkpoint(
    directory: Path, causal: bool = True, vision: bool = False
) -> PretrainedConfig:
    """The checkpoint directory's config, checked with its weight headers and tokenizer files.

    Raises:
        UnreadableFile: saying what is wrong with the directory or a file in it.
    """
    try:
        is_dir = directory.is_dir()
    except OSError as error:
        raise UnreadableFile(f"cannot be read: {error.strerror}") from None
    if not is_dir:
        if not directory.exists() and not directory.is_symlink():
            raise UnreadableFile("does not exist")
        layout = "a checkpoint is a directory (config.json, *.safetensors, tokenizer)"
        try:
            check_input_file(directory)
        except UnreadableFile as error:
            raise UnreadableFile(f"{error}; {layout}") from None
        raise UnreadableFile(f"is a file; {layout}")
    if not (directory / "config.json").exists():
        raise UnreadableFile("has no config.json: it is not a Hugging Face checkpoint directory")
    try:
        config = json.loads(decode_text(read_input_file(directory / "config.json")))
    except UnreadableFile as error:
        raise UnreadableFile(f"config.json {error}") from None
    except json.JSONDecodeError as error:
        raise UnreadableFile(
            f"config.json is not JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None
    if not isinstance(config, dict):
        raise UnreadableFile("config.json does not hold a JSON object")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise UnreadableFile(
            f"config.json names model_type {model_type!r}, which transformers "
            f"{transformers.__version__} does not know"
        )
    served = vision and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    if causal and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not served:
        raise UnreadableFile(
            f"config.json names model_type {model_type!r}, which is not a causal language "
            "model (the stages train and serve causal LMs; see README, The embedded default)"
        )
    try:
        loaded = AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as error:  # transformers and pydantic raise many kinds for a bad field
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UnreadableFile(f"config.json is not a valid {model_type} config: {reason}") from None
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLED_WEIGHTS)
        found = (
            f" ({', '.join(pickled)} found: pickle-based weights are never loaded, since"
            " unpickling can run code; convert them to safetensors)"
            if pickled
            else ""
        )
        raise UnreadableFile("has no *.safetensors weights" + found)
    for file in weights:
        try:
            check_input_file(file)
            with safe_open(str(file), "pt"):
                pass
        except UnreadableFile as error:
            raise UnreadableFile(f"weights file {file.name} {error}") from None
        except Exception as error:  # safetensors' own error type for a damaged header
            raise UnreadableFile(
                f"weights file {file.name} is damaged or cut short: {error}"
            ) from None
    names = [name for name in TOKENIZER_FILES if (directory / name).exists()]
    if "tokenizer_config.json" not in names or len(names) < 2:
        raise UnreadableFile(
            "has no tokenizer (tokenizer_config.json and one of tokenizer.json, "
            "tokenizer.model, vocab.json); save the tokenizer beside the model"
        )
    for name in names:
        if name.endswith(".json"):
            try:
                json.loads(decode_text(read_input_file(directory / name)))
            except UnreadableFile as error:
                raise UnreadableFile(f"{name} {error}") from None
            except json.JSONDecodeError as error:
                raise UnreadableFile(
                    f"{name} is not JSON ({error.msg} at line {error.lineno})"
                ) from None
    return loaded


def read_config(path: str | Path) -> PretrainedConfig:
    """A local checkpoint's config (no remote code)."""
    return AutoConfig.from_pretrained(str(path), trust_remote_code=False)


def _auto_class(config: PretrainedConfig):
    """The transformers auto class the toolkit builds a checkpoint's model with: a causal LM,
    or a vision-language model (image-text-to-text) with its vision tower."""
    return AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM


def decoder_layers(model: PreTrainedModel):
    """The decoder layers of a causal LM, or of a vision-language model's language model."""
    return getattr(model.model, "language_model", model.model).layers


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Loads a local Hugging Face checkpoint (safetensors only, no remote code): a causal LM,
    or a vision-language model (image-text-to-text) with its vision tower."""
    model = _auto_class(read_config(path)).from_pretrained(
        str(path), dtype=dtype, use_safetensors=True, trust_remote_code=False
    )
    return _for_training(model)


def empty_model(
    source: str | Path | PretrainedConfig, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """The checkpoint's architecture (or a config's) on the meta device: no memory, no weights.

    A sharded learner cuts this into shards before any weight exists, then fills the shards
    from one rank's copy of the checkpoint (`align.rl.learner`), so no rank ever holds the
    whole model on its device.
    """
    config = source if isinstance(source, PretrainedConfig) else read_config(source)
    with torch.device("meta"):
        model = _auto_class(config).from_config(config, dtype=dtype, trust_remote_code=False)
    return _for_training(model)


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in (config.json's `dtype`; float32 if none)."""
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)


def _for_training(model: PreTrainedModel) -> PreTrainedModel:
    if isinstance(model, Llama4ForCausalLM):
        # Two gaps between transformers' text-only Llama 4 and TRL's trainers, closed on this
        # instance only (nothing changes in what is saved):
        # - `base_model_prefix` is "language_model" (the prefix of the multimodal checkpoints it
        #   loads from) while the backbone sits at `.model`, so `model.base_model` is the model
        #   itself and TRL's fused LM head gets no `last_hidden_state`;
        # - the expert count is `num_local_experts`, and TRL's load-balancing loss reads
        #   `num_experts` (an alias on the config class, next to FAMILIES).
        model.base_model_prefix = "model"
        # transformers runs every token through every expert; run the chosen ones only.
        route_sparsely(model)
    return model


def count_parameters(model: PreTrainedModel) -> dict[str, int]:
    """Total parameters and those active per token (one routed expert set + everything else)."""
    total = sum(p.numel() for p in model.parameters())
    config = model.config.get_text_config()
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    if not routed:  # a dense model: every parameter is active
        return {"total": total, "active": total}
    n_experts = config.num_experts  # Llama 4's num_local_experts through the alias above
    active = total - routed + routed * config.num_experts_per_tok // n_experts
    return {"total": total, "active": active}
