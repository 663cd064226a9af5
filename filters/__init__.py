"""Data-pruning filters behind one interface (`align.pruning.Filter`).

Importing this package registers the built-in filters in `align.pruning.FILTERS`:

- `difficulty`: 1 - pass rate of k answers sampled from a reference model with vLLM;
- `difficulty_judge`: a judge model's expected easy/medium/hard verdict;
- `length`: length of the prompt, completion or both, in tokens or characters;
- `dedup`: similarity to the most similar earlier row (exact or MinHash near-duplicates).

Your own filter needs no registration: name its class in YAML as `package.module:Class`.
"""

from filters import dedup, difficulty, length

__all__ = ["dedup", "difficulty", "length"]
