"""Learner side of weight sync: the model's current weights as a checkpoint a vLLM engine loads.

This module must not import vLLM (the GPU learner may not have it). The engine side is
`align.engine.sync_weights`, which loads what `export_weights` writes into a live engine:

    path = export_weights(model, "/dev/shm/moealign-sync/policy")
    align.engine.sync_weights(llm, path)

Why a checkpoint and not the in-memory tensors: transformers 5 keeps MoE experts fused in
memory (`mlp.experts.gate_up_proj`), while vLLM's loaders expect the names and layouts that
`save_pretrained` writes (e.g. per-expert `mlp.experts.0.gate_proj.weight` for Qwen3-MoE).
`save_pretrained` applies transformers' own conversion back to checkpoint format, so no name is
mapped by hand here. Writing to tmpfs (/dev/shm) keeps it a memory copy.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Completed versions are hidden siblings of the link: `.{name}{_VERSION}{time_ns}-{pid}`.
_VERSION = ".v"
_PARTIAL = ".partial"


def export_weights(model: PreTrainedModel, directory: str | Path) -> Path:
    """Writes `model`'s current weights as a Hugging Face checkpoint, atomically.

    The checkpoint (safetensors in checkpoint format, config.json, generation_config.json; no
    tokenizer) is written into a hidden sibling directory of `directory`, renamed complete into
    a version directory, and `directory` (a symlink) is then switched to it with one rename(2).
    A reader therefore never sees half a checkpoint: through `directory` it finds the previous
    complete version or the new one. The previous version is kept (a reader may still be
    loading it); older ones are deleted.

    Args:
        model: a transformers causal LM (on any device; weights in any dtype).
        directory: where the latest export is found; created as a symlink. Prefer tmpfs, e.g.
            /dev/shm/..., so that no disk is involved.

    Returns:
        The version directory just written (what `directory` now points to). Pass this to
        `align.engine.sync_weights`: it stays unchanged until two more exports replace it.

    Raises:
        FileExistsError: `directory` exists and is not a symlink made by this function.
    """
    link = Path(directory).absolute()
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.exists() and not link.is_symlink():
        raise FileExistsError(
            f"{link} exists and is not a weight-export link; export_weights replaces only its "
            "own links (pass a path that does not exist yet)"
        )
    previous = Path(os.readlink(link)).name if link.is_symlink() else None
    version = link.parent / f".{link.name}{_VERSION}{time.time_ns()}-{os.getpid()}"
    staging = version.with_name(version.name + _PARTIAL)
    try:
        # save_original_format: transformers converts its in-memory layout (fused experts) back
        # to the checkpoint names and layouts that vLLM's loaders expect.
        model.save_pretrained(str(staging), save_original_format=True)
        os.rename(staging, version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # A relative target keeps the link valid if the parent directory is moved.
    new_link = link.parent / f".{link.name}.link-{uuid.uuid4().hex}"
    os.symlink(version.name, new_link)
    os.replace(new_link, link)
    ours = re.compile(re.escape(f".{link.name}{_VERSION}") + r"\d+-\d+")
    for old in link.parent.iterdir():
        if ours.fullmatch(old.name) and old.name not in (version.name, previous):
            shutil.rmtree(old, ignore_errors=True)
    return version
