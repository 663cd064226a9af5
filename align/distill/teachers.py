"""Where a distillation's teacher logits come from: the teacher run online, or a top-k cache.

`OnlineTeacher` runs the teacher forward on every batch. The offline teacher is a top-k cache
(`TopKCache`): the teacher runs once over the training rows, as a transformers forward
(`transformers_topk`) or in a vLLM engine (`engine_topk`, its prompt logprobs, so a teacher vLLM
shards over GPUs can be distilled); `write_topk_cache` writes its top-k log-probabilities and
ids per completion position, and training reads them back as a sparse teacher. The cache's
manifest (`cache_manifest`) names the teacher (path and a hash of its files), k, the tokenizer
and max_length; a cache whose manifest does not match is refused, not silently reused.

Both teachers map a collated batch (input_ids, attention_mask and the shifted labels) to a
`TeacherLogits` for the shifted positions, what `align.losses.distill.distillation_loss` takes.

Tensor legend: b batch, t position, v vocabulary, k cached teacher entries per position, n
completion tokens of one row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from align import engine
from align.config import ConfigError
from align.losses.distill import IGNORE_INDEX, TeacherLogits
from align.runs import atomic_directory, write_json_atomic

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

log = logging.getLogger(__name__)

# Bumped when the cache layout changes, so an old cache is refused rather than misread.
# 2: log-probabilities instead of raw logits (what vLLM returns; the same truncated teacher).
CACHE_FORMAT = 2


class OnlineTeacher:
    """The teacher model run forward on each batch (eval mode, no gradients)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, input_ids_bt, attention_mask_bt, labels_bt, **inputs) -> TeacherLogits:
        """The teacher's logits of the batch (`inputs`: a vision-language batch's images)."""
        self.model.to(input_ids_bt.device)
        logits_btv = self.model(
            input_ids=input_ids_bt, attention_mask=attention_mask_bt, use_cache=False, **inputs
        ).logits
        return TeacherLogits.dense(logits_btv[:, :-1])


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary and the special tokens: equal fingerprints mean equal token ids."""
    data = json.dumps(
        {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_tokens}
    )
    return hashlib.sha256(data.encode()).hexdigest()


def teacher_fingerprint(path: str) -> str:
    """sha256 over the teacher's config.json and weight files (contents, in name order)."""
    digest = hashlib.sha256()
    directory = Path(path)
    for file in [directory / "config.json", *sorted(directory.glob("*.safetensors"))]:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def sequence_key(ids_t: torch.Tensor) -> bytes:
    """sha256 of one sequence's unpadded token ids: the cache's row key."""
    return hashlib.sha256(ids_t.to(torch.int64).cpu().numpy().tobytes()).digest()


def cache_manifest(teacher: str, top_k: int, tokenizer, max_length: int) -> dict:
    """The manifest entries a cache of `teacher`'s top-`top_k` over rows tokenised by
    `tokenizer` to at most `max_length` tokens records, and must match to be reused."""
    return {
        "format": CACHE_FORMAT,
        "teacher": str(Path(teacher).resolve()),
        "teacher_sha256": teacher_fingerprint(teacher),
        "top_k": top_k,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
    }


class TopKCache:
    """The offline teacher: top-k log-probabilities and ids per completion position, read back
    from disk.

    Layout of the directory: `manifest.json` (format, teacher path and fingerprint, k, tokenizer
    fingerprint, max_length, rows, positions, built_with, build_seconds) and `topk.safetensors`
        keys      (rows, 32) uint8   sha256 of each row's unpadded token ids (`sequence_key`)
        offsets   (rows + 1) int64   row r owns positions offsets[r]:offsets[r + 1]
        ids       (positions, k) int32    the teacher's top-k token ids, most likely first
        logprobs  (positions, k) float16  their log-probabilities over the vocabulary (T = 1)
    A row's positions are its target positions (shifted labels != -100) in order. Rows are read
    on demand through safetensors' memory map, so the cache need not fit in memory. The loss
    takes the logprobs as the sparse teacher's logits: softmax over the k ids is the same for
    logits and logprobs (they differ by one constant per position).
    """

    def __init__(self, directory: Path, manifest: dict) -> None:
        self.directory, self.manifest = directory, manifest
        self.file = safe_open(str(directory / "topk.safetensors"), framework="pt")
        keys = self.file.get_tensor("keys")
        offsets = self.file.get_tensor("offsets").tolist()
        self.rows = {bytes(k.tolist()): (offsets[r], offsets[r + 1]) for r, k in enumerate(keys)}
        self.ids = self.file.get_slice("ids")
        self.logprobs = self.file.get_slice("logprobs")

    @classmethod
    def open(cls, directory: Path, expected: dict) -> TopKCache:
        """Opens the cache in `directory`, refusing one whose manifest differs from `expected`."""
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        different = {
            key: (manifest.get(key), value)
            for key, value in expected.items()
            if manifest.get(key) != value
        }
        if different:
            lines = "; ".join(f"{k}: cached {c!r}, wanted {w!r}" for k, (c, w) in different.items())
            raise ConfigError(
                f"teacher cache {directory} was built for other settings ({lines}). Delete it to "
                "rebuild it, or set teacher.cache_dir to a new directory"
            )
        return cls(directory, manifest)

    def check_covers(self, keys: set[bytes]) -> None:
        """Raises if a training row has no cached logits (the data changed since the cache)."""
        missing = len(keys - self.rows.keys())
        if missing:
            raise ConfigError(
                f"teacher cache {self.directory} lacks {missing} of the {len(keys)} training "
                "sequences: it was built from other data. Delete it to rebuild it, or set "
                "teacher.cache_dir to a new directory"
            )

    def __call__(self, input_ids_bt, attention_mask_bt, labels_bt) -> TeacherLogits:
        k = self.manifest["top_k"]
        b, t = labels_bt.shape
        # Positions that are not targets get distinct dummy ids (arange) and zero logits; the
        # loss drops them before any arithmetic.
        ids_btk = torch.arange(k, device=labels_bt.device).expand(b, t, k).clone()
        logits_btk = torch.zeros(b, t, k, device=labels_bt.device)
        for i in range(b):
            key = sequence_key(input_ids_bt[i][attention_mask_bt[i].bool()])
            if key not in self.rows:
                raise ValueError(
                    f"teacher cache {self.directory} has no entry for batch row {i} (a sequence "
                    "of the training data it was not built from)"
                )
            start, end = self.rows[key]
            positions_n = (labels_bt[i] != IGNORE_INDEX).nonzero().squeeze(-1)
            if len(positions_n) != end - start:
                raise ValueError(
                    f"teacher cache {self.directory}: batch row {i} has {len(positions_n)} "
                    f"target tokens but the cache holds {end - start} for it"
                )
            ids_btk[i, positions_n] = self.ids[start:end].to(ids_btk.device, torch.int64)
            logits_btk[i, positions_n] = self.logprobs[start:end].to(logits_btk.device).float()
        return TeacherLogits.sparse(ids_btk, logits_btk)


def transformers_topk(
    teacher: torch.nn.Module, batches: Iterable[dict], k: int
) -> Iterator[tuple[bytes, torch.Tensor, torch.Tensor]]:
    """Per row of `batches` (collated): its key, and the teacher's top-k ids (n, k) and
    log-probabilities (n, k) at its n target positions, from a transformers forward pass."""
    online = OnlineTeacher(teacher)
    for batch in batches:
        labels_bt = batch["labels"][:, 1:]
        logits_btv = online(batch["input_ids"], batch["attention_mask"], labels_bt).logits_btv
        top_logprobs_btk, top_ids_btk = logits_btv.float().log_softmax(-1).topk(k, dim=-1)
        for i in range(len(labels_bt)):
            target_t = labels_bt[i] != IGNORE_INDEX
            key = sequence_key(batch["input_ids"][i][batch["attention_mask"][i].bool()])
            yield key, top_ids_btk[i, target_t], top_logprobs_btk[i, target_t]


def engine_topk(
    llm, batches: Iterable[dict], k: int
) -> Iterator[tuple[bytes, torch.Tensor, torch.Tensor]]:
    """`transformers_topk` from a vLLM engine serving the teacher (its prompt logprobs); one
    engine call per batch."""
    for batch in batches:
        keys, sequences, targets = [], [], []
        for ids_t, mask_t, labels_t in zip(
            batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True
        ):
            ids_n = ids_t[mask_t.bool()]
            keys.append(sequence_key(ids_n))
            sequences.append(ids_n.tolist())
            # Position t of the engine's answer predicts token t + 1: the shifted labels.
            targets.append(labels_t[mask_t.bool()][1:] != IGNORE_INDEX)
        answers = engine.prompt_topk(llm, sequences, k)
        for key, target_t, (ids, logprobs) in zip(keys, targets, answers, strict=True):
            ids_tk = torch.tensor(ids, dtype=torch.int64).reshape(-1, k)
            logprobs_tk = torch.tensor(logprobs, dtype=torch.float32).reshape(-1, k)
            yield key, ids_tk[target_t], logprobs_tk[target_t]


def write_topk_cache(
    rows: Iterable[tuple[bytes, torch.Tensor, torch.Tensor]], directory: Path, manifest: dict
) -> None:
    """Writes the cache of `rows` (from `transformers_topk` or `engine_topk`) to `directory`.

    Written with `atomic_directory`, so an interrupted precompute never leaves a cache that
    looks complete. The manifest records the seconds it took
    (`build_seconds`: running the teacher over the rows and writing, its loading excluded).
    """
    started = time.perf_counter()
    keys, offsets, ids, logprobs = [], [0], [], []
    for key, ids_nk, logprobs_nk in rows:
        keys.append(key)
        ids.append(ids_nk.to(torch.int32))
        logprobs.append(logprobs_nk.to(torch.float16))
        offsets.append(offsets[-1] + len(ids_nk))
    with atomic_directory(directory) as partial:
        save_file(
            {
                "keys": torch.tensor([list(key) for key in keys], dtype=torch.uint8),
                "offsets": torch.tensor(offsets, dtype=torch.int64),
                "ids": torch.cat(ids),
                "logprobs": torch.cat(logprobs),
            },
            str(partial / "topk.safetensors"),
        )
        seconds = time.perf_counter() - started
        write_json_atomic(
            partial / "manifest.json",
            {**manifest, "positions": offsets[-1], "build_seconds": seconds},
        )
    log.info("teacher cache: %d positions of %d rows in %.1f s", offsets[-1], len(keys), seconds)
