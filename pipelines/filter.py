"""Stage `filter`: score a dataset with one or more filters and keep the rows inside thresholds.

Filters run in the order listed; each scores the rows the previous ones kept. For each filter,
`keep:` decides from the scores (`min`, `max`, `drop_lowest`). Rows a filter cannot score go
to the unscored bucket, never silently anywhere else.

Output under runs/<name>/:
- `kept/`, `dropped/`, `unscored/`: `datasets` directories (`dropped` and `unscored` carry a
  `filtered_by` column naming the filter);
- `report.json`, `report.txt`: counts, thresholds, score statistics per task and level;
- `scores.jsonl`: per input row, its scores (by "<index>:<filter>") and its outcome;
- `histogram-<i>-<filter>.png`: each filter's scores before and after selection;
- `scores/`: the score cache. Scores are keyed by the filter's name and options (and the
  files those options point to), so changing only `keep:` re-uses them and samples nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from align.config import ConfigError, check, from_dict
from align.data import DataError, load_dataset_file
from align.pruning import FILTERS, Buckets, Selection, build_filter, select
from align.registry import Registry, RegistryError
from align.rewarding import RewardSpec, check_option_columns
from align.runs import Run, RunSettings, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class FilterStep:
    """One filter of the chain."""

    # A registered filter (difficulty, difficulty_judge, length, dedup) or 'module:Class'.
    name: str
    # The filter's options (how it scores). Changing them re-scores; see README "Filters".
    options: dict[str, Any] = field(default_factory=dict)
    # Which scores to keep. Changing only this re-uses the cached scores.
    keep: Selection = field(default_factory=Selection)

    @staticmethod
    def registry() -> Registry:
        """Where `name` is looked up."""
        return FILTERS

    def validate(self) -> None:
        try:
            FILTERS.get(self.name)
        except RegistryError as error:
            check(False, "name", str(error))


@dataclass(kw_only=True)
class Config(RunSettings):
    """Settings of `align filter`."""

    name: str = "filter"

    # Dataset to filter: JSONL, Parquet or a `datasets` directory.
    data: str
    # Schema of `data` (columns checked on load): sft, rl, dpo, chat or text.
    schema: Literal["sft", "rl", "dpo", "chat", "text"] = "sft"
    # The filters, applied in order.
    filters: list[FilterStep] = field(default_factory=list)
    # Seed of the tie-breaking among equal scores in `drop_lowest`.
    seed: int = 0
    # Bad dataset rows: "raise" stops with the file, row and field; "skip" drops and counts them.
    on_error: Literal["raise", "skip"] = "raise"

    def validate(self) -> None:
        super().validate()
        # Each step's name: FilterStep.validate.
        check(bool(self.filters), "filters", "list at least one filter")


def _fingerprint(value: Any) -> Any:
    """Option values, with each existing file or directory replaced by its content stamps.

    So a cache made with a reference checkpoint is not reused after that checkpoint changes.
    """
    if isinstance(value, dict):
        return {k: _fingerprint(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fingerprint(v) for v in value]
    if isinstance(value, str) and value and Path(value).exists():
        path = Path(value)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return {
            "path": value,
            "files": [
                [str(p.relative_to(path.parent)), p.stat().st_size, p.stat().st_mtime_ns]
                for p in files
            ],
        }
    return value


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


class ScoreCache:
    """Scores of one filter with one set of options, kept in a JSON file.

    Per-row filters store {row digest: score}, so any row scored before is never re-scored;
    set-level filters (duplicates) store {input digest: [scores]}.
    """

    def __init__(self, path: Path, independent_rows: bool) -> None:
        self.path = path
        self.independent_rows = independent_rows
        self.entries: dict[str, Any] = (
            json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        )

    def scores(self, rows: list[dict], score_fn) -> tuple[list[float | None], int]:
        """The rows' scores, computing only the missing ones; returns (scores, computed)."""
        if not self.independent_rows:
            key = _digest(rows)
            if key not in self.entries:
                self.entries[key] = score_fn(rows)
                self._save()
                return self.entries[key], len(rows)
            return self.entries[key], 0
        keys = [_digest(row) for row in rows]
        missing = sorted({i for i, k in enumerate(keys) if k not in self.entries})
        unique = {keys[i]: i for i in missing}
        if unique:
            todo = list(unique.values())
            for i, score in zip(todo, score_fn([rows[i] for i in todo]), strict=True):
                self.entries[keys[i]] = score
            self._save()
        return [self.entries[k] for k in keys], len(unique)

    def _save(self) -> None:
        write_json_atomic(self.path, self.entries)


def _checked_scores(scores: list, n: int, name: str) -> list[float | None]:
    if len(scores) != n:
        raise RuntimeError(f"filter {name!r} returned {len(scores)} scores for {n} rows")
    return [None if s is None else float(s) for s in scores]


def _by_group(rows: list[dict], scores: list[float | None], kept: list[int]) -> dict[str, dict]:
    """Per task x level (the columns present): rows, mean score, rows kept, mean kept score."""
    columns = [c for c in ("task", "level") if rows and c in rows[0]]
    kept_set = set(kept)
    groups: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    for i, (row, score) in enumerate(zip(rows, scores, strict=True)):
        if score is not None:
            key = " ".join(f"{c}={row[c]}" for c in columns) or "all"
            groups[key].append((score, i in kept_set))
    table = {}
    for key, items in sorted(groups.items()):
        kept_scores = [s for s, k in items if k]
        table[key] = {
            "rows": len(items),
            "mean": statistics.fmean(s for s, _ in items),
            "kept": len(kept_scores),
            "kept_mean": statistics.fmean(kept_scores) if kept_scores else None,
        }
    return table


def _histogram(path: Path, name: str, title: str, before: list[float], after: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    low, high = min(before), max(before)
    bins = 20 if high > low else 1
    span = (low, high) if high > low else (low - 0.5, high + 0.5)
    axes.hist(before, bins=bins, range=span, alpha=0.5, label=f"scored ({len(before)})")
    axes.hist(after, bins=bins, range=span, alpha=0.7, label=f"kept ({len(after)})")
    axes.set_title(f"{name}: scores before and after selection")
    axes.set_xlabel(title)
    axes.set_ylabel("rows")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def format_report(report: dict) -> str:
    """The report as the table printed at the end of the stage."""
    lines = [f"filter: {report['input_rows']} rows from {report['data']}"]
    for i, step in enumerate(report["filters"], start=1):
        keep = ", ".join(f"{k} {v}" for k, v in step["keep"].items() if v is not None) or "all"
        cached = step["rows_in"] - step["computed"]
        lines += [
            "",
            f"{i}. {step['name']}: {step['score_name']}; keep: {keep}",
            f"   in {step['rows_in']}, kept {step['kept']}, dropped {step['dropped']}, "
            f"unscored {step['unscored']} (scored now {step['computed']}, from cache {cached})",
            f"   {'group':<20} {'rows':>6} {'mean score':>11} {'kept':>6} {'kept mean':>10}",
        ]
        for group, g in step["by_group"].items():
            kept_mean = "-" if g["kept_mean"] is None else f"{g['kept_mean']:.3f}"
            lines.append(
                f"   {group:<20} {g['rows']:>6} {g['mean']:>11.3f} {g['kept']:>6} {kept_mean:>10}"
            )
    totals = report["output"]
    lines += [
        "",
        f"kept {totals['kept']}, dropped {totals['dropped']}, unscored {totals['unscored']}"
        f" -> {report['output_dir']}/kept",
    ]
    return "\n".join(lines)


def _check_group_fractions(keep: Selection, dataset, key: str, source: str) -> None:
    """Refuses a per-group `drop_lowest` that leaves a group of the data unnamed or names a
    group the data lacks (a misspelt task would otherwise prune nothing, silently)."""
    if not isinstance(keep.drop_lowest, dict) or keep.group_by not in dataset.column_names:
        return  # a single fraction; or a missing column, reported with its row below
    present = sorted({str(v) for v in dataset[keep.group_by]})
    unnamed, absent = keep.unnamed_groups(present)
    if unnamed or absent:
        problem = (
            f"{source} has {keep.group_by} {unnamed[0]!r}, which it gives no fraction"
            if unnamed
            else f"names {keep.group_by} {absent[0]!r}, which no row of {source} has"
        )
        raise ConfigError(f"key '{key}': {problem} (the data's values: {', '.join(present)})")


def run(config: Config) -> dict:
    """Scores and prunes `config.data`; see the module docstring for what it writes."""
    # Build every filter and read the data before anything is written: bad names, options,
    # checkpoints and rows fail fast.
    filters = [
        build_filter(step.name, step.options, f"filters[{i}]")
        for i, step in enumerate(config.filters)
    ]
    dataset, data_report = load_dataset_file(config.data, config.schema, config.on_error)
    for i, step in enumerate(config.filters):
        # A filter that scores with rewards (difficulty) passes them the rows' columns.
        specs = [
            from_dict(RewardSpec, spec, source=f"filters[{i}].options.rewards[{j}]")
            for j, spec in enumerate(step.options.get("rewards") or [])
        ]
        key = f"filters[{i}].options.rewards"
        check_option_columns(specs, dataset.column_names, key, config.data)
        _check_group_fractions(step.keep, dataset, f"filters[{i}].keep.drop_lowest", config.data)
    with Run(Path(config.runs_dir) / config.name, config) as run_dir:
        rows = list(dataset)
        if not rows:
            raise DataError("dataset has no rows to filter", file=config.data)
        active = list(range(len(rows)))
        row_scores: list[dict[str, float | None]] = [{} for _ in rows]
        dropped: list[tuple[int, str]] = []
        unscored: list[tuple[int, str]] = []
        steps = []
        for i, (step, flt) in enumerate(zip(config.filters, filters, strict=True)):
            options_key = _digest({"name": step.name, "options": _fingerprint(step.options)})
            stem = step.name.replace(":", ".")  # a plug-in's module:Class as a file name
            cache = ScoreCache(
                run_dir.dir / "scores" / f"{stem}-{options_key[:16]}.json",
                flt.independent_rows,
            )
            subset = [rows[j] for j in active]
            log.info("filter %d/%d %s on %d rows", i + 1, len(filters), step.name, len(subset))
            scores, computed = cache.scores(
                subset,
                lambda part, flt=flt, name=step.name: _checked_scores(
                    flt.score(part), len(part), name
                ),
            )
            groups = None
            if step.keep.group_by is not None:
                missing = next((j for j in active if step.keep.group_by not in rows[j]), None)
                if missing is not None:
                    raise DataError(
                        f"keep.group_by names column {step.keep.group_by!r}, which this row lacks",
                        file=config.data,
                        row=missing,
                        field=step.keep.group_by,
                    )
                groups = [rows[j][step.keep.group_by] for j in active]
            buckets: Buckets = select(scores, step.keep, seed=config.seed, groups=groups)
            label = f"{i}:{step.name}"
            for j, score in zip(active, scores, strict=True):
                row_scores[j][label] = score
            dropped += [(active[j], label) for j in buckets.dropped]
            unscored += [(active[j], label) for j in buckets.unscored]
            scored = [s for s in scores if s is not None]
            if scored:
                _histogram(
                    run_dir.dir / f"histogram-{i}-{stem}.png",
                    step.name,
                    flt.score_name,
                    scored,
                    [scores[j] for j in buckets.kept],
                )
            steps.append(
                {
                    "name": step.name,
                    "score_name": flt.score_name,
                    "options": step.options,
                    "keep": vars(step.keep),
                    "rows_in": len(subset),
                    "kept": len(buckets.kept),
                    "dropped": len(buckets.dropped),
                    "unscored": len(buckets.unscored),
                    "tied_at_cut": buckets.tied_at_cut,
                    "computed": computed,
                    "score_mean": statistics.fmean(scored) if scored else None,
                    "by_group": _by_group(subset, scores, buckets.kept),
                    "metrics": flt.metrics(),
                }
            )
            for key, value in steps[-1]["metrics"].items():
                log.info("filter %s: %s = %g", step.name, key, value)
            if buckets.tied_at_cut:
                log.warning(
                    "filter %s: drop_lowest cut through %d rows with the same score; which of "
                    "them were kept was decided by the seeded tie-break (seed %d). If most rows "
                    "tie, the scores do not tell the rows apart (an untrained reference model "
                    "fails everything): check the histogram.",
                    step.name,
                    buckets.tied_at_cut,
                    config.seed,
                )
            if buckets.unscored:
                log.warning(
                    "filter %s could not score %d rows; they are in %s/unscored",
                    step.name,
                    len(buckets.unscored),
                    run_dir.dir,
                )
            active = [active[j] for j in buckets.kept]

        for bucket, members in (("dropped", dropped), ("unscored", unscored)):
            order = sorted(members)
            subset = dataset.select([j for j, _ in order])
            subset = subset.add_column("filtered_by", [label for _, label in order])
            subset.save_to_disk(str(run_dir.dir / bucket))
        dataset.select(active).save_to_disk(str(run_dir.dir / "kept"))
        outcome = {j: "kept" for j in active}
        outcome.update({j: f"dropped by {label}" for j, label in dropped})
        outcome.update({j: f"unscored by {label}" for j, label in unscored})
        with open(run_dir.dir / "scores.jsonl", "w", encoding="utf-8") as out:
            for j, scores_of_row in enumerate(row_scores):
                line = {"row": j, "outcome": outcome[j], "scores": scores_of_row}
                out.write(json.dumps(line) + "\n")

        report = {
            "data": config.data,
            "data_report": data_report,
            "input_rows": len(rows),
            "filters": steps,
            "output": {"kept": len(active), "dropped": len(dropped), "unscored": len(unscored)},
            "output_dir": str(run_dir.dir),
        }
        run_dir.write_json("report.json", report)
        scalars = {f"filter/{k}": float(v) for k, v in report["output"].items()}
        for i, step in enumerate(steps):
            scalars.update(
                {f"filter/{i}:{step['name']}/{k}": v for k, v in step["metrics"].items()}
            )
        run_dir.log_metrics(0, scalars)
        table = format_report(report)
        (run_dir.dir / "report.txt").write_text(table + "\n", encoding="utf-8")
        print(table)
        if not active:
            raise DataError(
                "filtering kept no rows; loosen the thresholds (see report.txt)",
                file=config.data,
            )
    return report
