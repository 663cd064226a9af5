"""Duplicate filter: scores each row by its highest similarity to any EARLIER row.

Duplicates over-weight what they repeat and leak across train / held-out splits. Comparing a
row only with the rows before it gives the first row of a group of duplicates a score of 0 and
its later copies a high score, so `Selection(max=...)` keeps exactly one row per group: the
first in dataset order.

Modes:
- exact: 1.0 when an earlier row has the same normalised text (lowercase, whitespace runs
  collapsed to one space, stripped), else 0.0. Select with `max: 0.0`.
- near: Jaccard similarity |A & B| / |A | B| of the rows' sets of character n-grams
  (shingles) of the normalised text, estimated with MinHash: the fraction of `num_perm`
  seeded hash functions whose minimum over A equals that over B. Candidate pairs come from
  LSH banding (rows sharing every value in one band of the signature), so a dataset without
  near-duplicates costs about linear time instead of comparing all pairs (a dataset of
  mutually similar rows, such as one template with different numbers, still compares each row
  with many earlier ones). The score is the
  highest MinHash estimate over the candidates (0.0 with no candidate); the exact Jaccard is
  never computed, which keeps memory at one signature per row.

Choosing the threshold: `max: 0.8` keeps rows at most 80% similar to every earlier row. The
estimate is noisy (standard deviation sqrt(J (1 - J) / num_perm), 0.05 at J = 0.8 with 64
hashes), and LSH finds a pair only with some probability: with bands of 4 hashes and
b = num_perm / 4 bands, a pair of similarity J becomes a candidate with probability
1 - (1 - J^4)^b. For the default 64 hashes (16 bands) that is 0.64 at J = 0.5, 0.89 at 0.6,
0.988 at 0.7, 0.9998 at 0.8 and 1.0 at 0.9: pairs above roughly (1/b)^(1/4) = 0.5 are found,
so use `max` of 0.7 or above; a lower `max` lets missed pairs through as 0.0.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from align.config import check
from align.pruning import row_text

log = logging.getLogger(__name__)

PARTS = ("prompt", "completion", "all")
MODES = ("exact", "near")
# Hashes per LSH band. With 4, the band count alone (num_perm / 4) sets the detection curve
# above; more rows per band would push the threshold past typical `max` values of 0.7-0.8.
ROWS_PER_BAND = 4
# Odd multiplier of the polynomial shingle hash (the 64-bit FNV prime); arithmetic wraps mod 2^64.
_SHINGLE_BASE = np.uint64(0x100000001B3)
# Shingles hashed at a time, bounding the (shingles x num_perm) temporary for very long rows.
_CHUNK = 4096
_UINT64_MAX = np.iinfo(np.uint64).max


def normalize_text(text: str) -> str:
    """Lowercases, collapses whitespace runs to one space and strips: "A  b\\n" -> "a b"."""
    return " ".join(text.lower().split())


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a uint64 bijection; each input bit flips ~half the output bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """64-bit polynomial hashes of the text's character n-grams; a shorter text is one shingle."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    windows = sliding_window_view(codes, ngram) if len(codes) >= ngram else codes[None, :]
    hashes = np.zeros(len(windows), dtype=np.uint64)
    for column in windows.T:
        hashes = hashes * _SHINGLE_BASE + column
    return hashes


class DedupFilter:
    """Highest similarity of each row to an earlier row (see the module docstring).

    Args:
        mode: "exact" (normalised text equality, scores 0/1) or "near" (MinHash Jaccard).
        part: Which text to compare: "prompt", "completion" or "all".
        ngram: Near only: characters per shingle. 5 suits prose; shorter shingles make
            unrelated texts look more alike.
        num_perm: Near only: MinHash hash functions, a positive multiple of 4. More gives a
            sharper estimate and a lower LSH threshold, at a proportional cost.
        seed: Near only: seed of the hash functions; the same seed gives the same scores.

    Raises:
        ConfigError: An unknown mode or part, or an `ngram` / `num_perm` / `seed` out of range.
    """

    # A row's score depends on the rows before it: scores are cached per whole input.
    independent_rows = False

    def __init__(
        self,
        mode: Literal["exact", "near"] = "exact",
        part: Literal["prompt", "completion", "all"] = "all",
        ngram: int = 5,
        num_perm: int = 64,
        seed: int = 0,
    ) -> None:
        check(mode in MODES, "mode", f"must be one of {', '.join(MODES)} (got {mode!r})")
        check(part in PARTS, "part", f"must be one of {', '.join(PARTS)} (got {part!r})")
        check(_is_int(ngram) and ngram >= 1, "ngram", f"must be an integer >= 1 (got {ngram!r})")
        check(
            _is_int(num_perm) and num_perm >= ROWS_PER_BAND and num_perm % ROWS_PER_BAND == 0,
            "num_perm",
            f"must be a positive multiple of {ROWS_PER_BAND} (got {num_perm!r})",
        )
        check(_is_int(seed) and seed >= 0, "seed", f"must be an integer >= 0 (got {seed!r})")
        # Exact equality or MinHash similarity.
        self.mode = mode
        # What part of each row is compared.
        self.part = part
        # Characters per shingle (near mode).
        self.ngram = ngram
        # Number of MinHash functions (near mode).
        self.num_perm = num_perm
        # Hash function i is x -> mix64(x ^ seeds[i]): a seeded permutation of the 64-bit hashes.
        self.seeds = np.random.default_rng(seed).integers(
            0, _UINT64_MAX, size=num_perm, dtype=np.uint64, endpoint=True
        )
        self.score_name = (
            f"duplicate of an earlier row ({part}, exact after normalisation: 1/0)"
            if mode == "exact"
            else f"max Jaccard similarity to an earlier row ({part}, {ngram}-char shingles, "
            f"MinHash {num_perm})"
        )

    def score(self, rows: list[dict[str, Any]]) -> list[float | None]:
        """Each row's highest similarity to a row before it, in dataset order.

        Args:
            rows: Dataset rows in any stage schema.

        Returns:
            One score in [0, 1] per row, never None; the first row scores 0.0.
        """
        texts = [normalize_text(row_text(row, self.part)) for row in rows]
        if self.mode == "exact":
            seen: set[str] = set()
            scores = []
            for text in texts:
                scores.append(1.0 if text in seen else 0.0)
                seen.add(text)
            return scores
        return self._near_scores(texts)

    def metrics(self) -> dict[str, float]:
        return {}

    def signature(self, text: str) -> np.ndarray:
        """MinHash signature of a text: per hash function, the minimum over the text's shingles.

        The fraction of equal entries of two signatures estimates the Jaccard similarity of the
        two texts' shingle sets. `score` passes normalised texts.

        Args:
            text: The text to sign.

        Returns:
            A uint64 array of `num_perm` entries.
        """
        hashes = _shingle_hashes(text, self.ngram)
        signature = np.full(self.num_perm, _UINT64_MAX, dtype=np.uint64)
        for start in range(0, len(hashes), _CHUNK):
            permuted = _mix64(hashes[start : start + _CHUNK, None] ^ self.seeds[None, :])
            np.minimum(signature, permuted.min(axis=0), out=signature)
        return signature

    def _near_scores(self, texts: list[str]) -> list[float | None]:
        n_bands = self.num_perm // ROWS_PER_BAND
        signatures = np.empty((len(texts), self.num_perm), dtype=np.uint64)
        # Per band: the band's values (as bytes) -> earlier rows with those values.
        buckets: list[dict[bytes, list[int]]] = [{} for _ in range(n_bands)]
        # A row whose whole signature equals an earlier one's scores 1.0 and stays out of the
        # buckets: its similarity to any later row equals the earlier row's, and large groups
        # of exact copies would otherwise make every later candidate list long.
        seen_signatures: set[bytes] = set()
        scores: list[float | None] = []
        n_pairs = 0
        for i, text in enumerate(texts):
            signature = signatures[i] = self.signature(text)
            if signature.tobytes() in seen_signatures:
                scores.append(1.0)
                continue
            seen_signatures.add(signature.tobytes())
            band_keys = [band.tobytes() for band in signature.reshape(n_bands, ROWS_PER_BAND)]
            candidates = [j for b, key in enumerate(band_keys) for j in buckets[b].get(key, ())]
            if candidates:
                earlier = np.unique(candidates)
                n_pairs += len(earlier)
                scores.append(float((signatures[earlier] == signature).mean(axis=1).max()))
            else:
                scores.append(0.0)
            for b, key in enumerate(band_keys):
                buckets[b].setdefault(key, []).append(i)
        log.info(
            "dedup (near): %d rows, %d identical signatures, %d LSH candidate pairs compared",
            len(texts),
            len(texts) - len(seen_signatures),
            n_pairs,
        )
        return scores


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
