"""Images in prompts: reading and checking them, and serving vision-language checkpoints.

Datasets follow TRL's vision convention: conversational prompts whose user messages mark where
each image goes with a content item `{"type": "image"}`, and an `images` column holding the
row's images in that order. An image is a PIL image, the bytes of an image file, a path to one
(relative to the dataset file's folder, or absolute) or a `datasets` Image value (`{"bytes":
..., "path": ...}`, what Parquet and `save_to_disk` files hold). Every image is decoded, checked
and converted to RGB when a row is read (`load_images`), so a bad one is refused with its file,
row and field before any work.

Serving: transformers' and vLLM's Qwen3-VL modules import torchvision at module level, although
their PIL image processors need none of it. Where torchvision is not installed (the CPU build
of torch here has no matching torchvision wheel: the registry's is a CUDA build),
`torchvision_shim` registers empty torchvision modules so that those imports succeed
(transformers has by then recorded that torchvision is missing and uses its PIL processors),
and lets Qwen3-VL's processor load without its torchvision-gated video processor loader.
Where torchvision is installed, nothing is changed.

Shape legend: none (images are PIL objects; the model's processor makes the tensors).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import io
import logging
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from align.config import UnreadableFile, read_input_file

log = logging.getLogger(__name__)

# The column of a row's images, and the content item that places one in a message (TRL's).
IMAGES_COLUMN = "images"
IMAGE_ITEM = {"type": "image"}
# Image modes converted to RGB; any other (16-bit, float, CMYK, ...) is refused: its colours
# would change meaning in a conversion.
CONVERTIBLE_MODES = ("RGB", "RGBA", "L", "LA", "P", "1")
# Largest image read (pixels): far beyond what a vision tower takes (they resize), far below
# what would exhaust memory when decoded (a "decompression bomb" declares billions).
MAX_PIXELS = 8192 * 8192

_SHIM_MODULES = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.transforms.v2",
    "torchvision.transforms.v2.functional",
)
# A folder holding a `sitecustomize` that installs the shim in every Python process started
# with it on PYTHONPATH (vLLM inspects model classes in a subprocess).
SHIM_SITE = Path(__file__).resolve().parent / "_vision_site"


class ImageError(ValueError):
    """An image that cannot be used; the message says why, the caller says where."""


def load_image(value: Any, base_dir: str | Path | None = None):
    """One image of a row as an RGB PIL image.

    Args:
        value: a PIL image, the bytes of an image file, a path, or `{"bytes": ..., "path": ...}`.
        base_dir: the folder relative paths are read from (the dataset file's).

    Raises:
        ImageError: not an image value, a file that is missing or not a regular file, bytes
            that are not an image, too many pixels, or a mode with no faithful RGB conversion.
    """
    from PIL import Image

    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, bytes | bytearray | memoryview):
        image = _decode(bytes(value))
    elif isinstance(value, str) and value:
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        try:
            data = read_input_file(path)
        except UnreadableFile as error:
            raise ImageError(f"{value!r} {error}") from None
        image = _decode(data, value)
    else:
        raise ImageError(
            f"expected an image (PIL image, image bytes, a path or {{'bytes', 'path'}}), "
            f"got {type(value).__name__}"
        )
    width, height = image.size
    if width < 1 or height < 1 or width * height > MAX_PIXELS:
        raise ImageError(f"{width} x {height} pixels: at most {MAX_PIXELS} are read")
    if image.mode not in CONVERTIBLE_MODES:
        raise ImageError(
            f"mode {image.mode!r} is not read (RGB or one of {', '.join(CONVERTIBLE_MODES)})"
        )
    return image if image.mode == "RGB" else image.convert("RGB")


def _decode(data: bytes, name: str | None = None):
    from PIL import Image

    what = f"{name!r}" if name else "the bytes"
    # The pixel count is checked from the header before anything is decoded.
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise ImageError(f"{what}: {width} x {height} pixels: at most {MAX_PIXELS} are read")
        image.load()
    except ImageError:
        raise
    except Exception as error:  # PIL raises many kinds for damaged files
        raise ImageError(f"{what} is not a readable image ({type(error).__name__})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return image


# The columns whose messages may place images.
MESSAGE_COLUMNS = ("prompt", "messages")


def image_slots(row: dict) -> int:
    """How many `{"type": "image"}` items a row's prompt (or conversation) holds."""
    return sum(
        1
        for column in MESSAGE_COLUMNS
        if isinstance(row.get(column), list)
        for message in row[column]
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for item in message["content"]
        if isinstance(item, dict) and item.get("type") == "image"
    )


def has_images(row: dict) -> bool:
    """Whether a row holds or places any image."""
    return bool(row.get(IMAGES_COLUMN)) or image_slots(row) > 0


def load_images(row: dict, base_dir: str | Path | None = None, max_images: int = 8) -> list | None:
    """A row's images, read and checked against its prompt; None for a row without images.

    Raises:
        ImageError: a bad image (the message starts with its index), more than `max_images`,
            or a count that differs from the prompt's image items.
    """
    values = row.get(IMAGES_COLUMN)
    slots = image_slots(row)
    if values is None or (isinstance(values, list) and not values):
        if slots:
            raise ImageError(f"the prompt places {slots} image(s) but the row has no images")
        return None
    if not isinstance(values, Sequence) or isinstance(values, str | bytes):
        values = [values]
    if len(values) > max_images:
        raise ImageError(f"{len(values)} images, more than max_images={max_images}")
    if len(values) != slots:
        raise ImageError(f"{len(values)} image(s) but the prompt places {slots}")
    images = []
    for index, value in enumerate(values):
        try:
            images.append(load_image(value, base_dir))
        except ImageError as error:
            raise ImageError(f"image {index}: {error}") from None
    return images


# Where vision-language models keep their vision tower and projector (Qwen3-VL: `visual`,
# holding its patch merger; Llama 4: `vision_model` and `multi_modal_projector`).
VISION_MODULES = ("visual", "vision_model", "vision_tower", "multi_modal_projector")


def in_vision_tower(name: str) -> bool:
    """Whether a parameter name belongs to a vision tower or projector (`VISION_MODULES`)."""
    return any(part in VISION_MODULES for part in name.split("."))


def freeze_vision(model) -> int:
    """Freezes the vision tower and projector of a vision-language model (the language model
    alone learns, as `train_vision: false` asks); returns how many parameters were frozen."""
    frozen = 0
    for name, parameter in model.named_parameters():
        if in_vision_tower(name):
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen


def parameter_groups(
    named_parameters,
    vision_learning_rate: float | None,
    decay: set[str] | None = None,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Optimiser parameter groups of the trainable parameters in `named_parameters`.

    With `vision_learning_rate` the vision tower and projector's parameters form groups of their
    own with that `lr` (marked `vision`); the others take the optimiser's. With `decay` (the
    names that decay) each side splits further, `weight_decay` for those names and 0 for the
    rest. Sharded parameters on different device meshes never share a group (one fused kernel
    call each).
    """
    groups: dict[tuple, list] = {}
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        vision = vision_learning_rate is not None and in_vision_tower(name)
        decays = decay is None or name in decay
        mesh = getattr(parameter, "device_mesh", None)
        groups.setdefault((vision, decays, mesh), []).append(parameter)
    result = []
    for (vision, decays, _), params in groups.items():
        group: dict = {"params": params}
        if vision:
            group.update(lr=vision_learning_rate, vision=True)
        if decay is not None:
            group["weight_decay"] = weight_decay if decays else 0.0
        result.append(group)
    return result


def load_processor(path: str | Path):
    """A vision-language checkpoint's processor (image processor, tokenizer, chat template)."""
    from transformers import AutoProcessor

    torchvision_shim()
    return AutoProcessor.from_pretrained(str(path), trust_remote_code=False)


def vision_training(model, path: str | Path, train_vision: bool):
    """What a trainer of `model` (loaded from `path`) needs for images: for a vision-language
    model its processor (which reads the images and is saved with the model, image settings
    included, so that vLLM serves the result), its tower frozen unless `train_vision`; None
    for a text model."""
    from align.modeling import is_vision_language

    if not is_vision_language(model.config):
        return None
    if not train_vision:
        log.info("vision tower frozen: %d parameters", freeze_vision(model))
    return load_processor(path)


def image_folder(data_path: str | Path) -> Path:
    """Where a dataset's relative image paths are read from: the file's folder (a
    `save_to_disk` directory holds its images)."""
    path = Path(data_path)
    return path if path.is_dir() else path.parent


def rows_images(rows: list[dict], data_path: str | Path, max_images: int = 8) -> list | None:
    """Every row's images (an empty list for a row without any), read as `load_images` does
    with relative paths from the dataset's folder; None when no row has images."""
    if not any(has_images(row) for row in rows):
        return None
    return [load_images(row, image_folder(data_path), max_images) or [] for row in rows]


def training_rows(dataset, columns: list[str], data_path: str | Path, images: bool):
    """`dataset`'s `columns`, plus, with `images` (a vision-language model) and where any row
    has images, its rows' decoded RGB images, as TRL's vision collators hand them to the
    processor; a `datasets.Dataset`."""
    from datasets import Dataset

    rows = dataset.select_columns(columns)
    pictures = rows_images(list(dataset), data_path) if images else None
    if pictures is None:
        return rows
    return Dataset.from_dict({**rows.to_dict(), IMAGES_COLUMN: pictures})


# A vision-language model's inputs besides the ids, as TRL's vision collators return them.
MODEL_INPUTS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")


def image_inputs(batch: dict) -> dict:
    """The image inputs of a collated batch (empty for text batches)."""
    return {name: batch[name] for name in MODEL_INPUTS if name in batch}


def torchvision_shim() -> bool:
    """Registers empty torchvision modules where torchvision is not installed (see the module
    docstring); returns whether it did. Idempotent."""
    if "torchvision" in sys.modules:
        return getattr(sys.modules["torchvision"], "__align_shim__", False)
    if importlib.util.find_spec("torchvision") is not None:
        return False
    # transformers decides once whether torchvision is there; it must decide before the shim.
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()
    _install_modules()
    _load_video_processor_without_torchvision()
    return True


class _VideoProcessorLoader:
    """Stands in for transformers' AutoVideoProcessor where torchvision is missing (that class
    is then a placeholder that raises): a processor that always loads a video processor (Qwen3-
    VL's) gets Qwen3-VL's, built from its class, which imports without torchvision; only
    processing a video would need it, and engines here take no videos (`limit_mm_per_prompt`)."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        return Qwen3VLVideoProcessor()


def _load_video_processor_without_torchvision() -> None:
    """Points transformers' processor loading at `_VideoProcessorLoader`, and its check of a
    processor's parts at the real video processor base class (the one it would name is a
    placeholder without torchvision)."""
    from transformers import processing_utils, video_processing_utils

    mapping = processing_utils.MODALITY_TO_AUTOPROCESSOR_MAPPING
    mapping._MAPPING_NAMES = {
        **mapping._MAPPING_NAMES,
        "video_processor": (__name__, _VideoProcessorLoader.__name__),
    }
    processing_utils.transformers_module.VideoProcessorMixin = (
        video_processing_utils.VideoProcessorMixin
    )


def _install_modules() -> None:
    for name in _SHIM_MODULES:
        module = types.ModuleType(name, "Empty: torchvision is not installed (align.vision).")
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module.__path__ = []
        module.__align_shim__ = True
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


@contextlib.contextmanager
def serving_images():
    """While a vision-language engine starts: the torchvision shim in this process (it stays)
    and in the processes started meanwhile (vLLM's model inspection, its engine core), through
    its `sitecustomize` on PYTHONPATH; PYTHONPATH is restored afterwards."""
    if not torchvision_shim():
        yield
        return
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SHIM_SITE), before]))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
