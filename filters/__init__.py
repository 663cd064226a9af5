"""Data-pruning filters behind one interface (`align.pruning.Filter`).

The built-in filters, by the names YAML gives them (`align.pruning.BUILTIN_FILTERS` maps each
name to its class here, imported when first named):

- `difficulty`: 1 - pass rate of k answers sampled from a reference model with vLLM;
- `difficulty_judge`: a judge model's expected easy/medium/hard verdict;
- `length`: length of the prompt, completion or both, in tokens or characters;
- `dedup`: similarity to the most similar earlier row (exact or MinHash near-duplicates);
- `guard`: 1 - a guard model's P(safe) of each row's response or prompt (Llama Guard format);
- `prompt_attack`: a prompt-attack classifier's P(attack) of each prompt (Prompt Guard style).

Your own filter needs no registration: name its class in YAML as `package.module:Class`, or
declare it in your distribution's entry points (group `moealign.filters`) and name it.
"""
