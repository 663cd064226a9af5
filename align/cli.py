"""The `align` command: one subcommand per stage, each taking `--config FILE.yaml` and
`key.sub=value` overrides.

    align make-model --config m.yaml preset=student
    align eval model=runs/m/model data=runs/d/data/heldout/rl
    align run pipelines/default.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

from align.config import COMMAND_LINE, ConfigError, dump_yaml, keys_help, load_config
from align.data import DataError
from align.runs import RunStopped

DESCRIPTIONS = {
    "run": "run a pipeline file: its stages in order, resuming where it stopped",
    "make-model": "write a random-initialised embedded MoE checkpoint from a size preset",
    "make-data": "generate the embedded tasks in every stage's dataset schema",
    "eval": "score a checkpoint on held-out prompts with vLLM (greedy accuracy, pass@k)",
    "filter": "score data difficulty and prune the easy part",
    "sft": "lightweight supervised fine-tuning",
    "rl": "asynchronous online RL with Ray and vLLM",
    "dpo": "lightweight DPO",
    "distill": "teacher-to-student distillation",
    "redteam": "multi-turn automated red teaming of a policy, judged by a guard model",
}


def build_parser(keys_of: str | None = None) -> argparse.ArgumentParser:
    """The `align` parser; the help of command `keys_of` ends with its config keys (their
    type, default and meaning, from the config dataclasses: it imports the stage's module)."""
    parser = argparse.ArgumentParser(
        prog="align",
        description="Llama 4 style post-training for Mixture-of-Experts models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, description in DESCRIPTIONS.items():
        p = sub.add_parser(
            name,
            help=description,
            description=description,
            epilog=keys_help(config_class(name)) if name == keys_of else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", metavar="FILE.yaml", help="config file (YAML)")
        p.add_argument(
            "--print-config",
            action="store_true",
            help="print the resolved config (defaults, file, overrides) as YAML and exit",
        )
        p.add_argument(
            "--dry-run",
            action="store_true",
            help=(
                "check every stage's config, print the plan (stages, inputs, placement), exit"
                if name == "run"
                else "check the config, its plug-ins, the files it reads and its placement, "
                "print what it would read and write, exit"
            ),
        )
        p.add_argument(
            "--verbose",
            action="store_true",
            help="show every detail in the terminal: vLLM's logs and progress bars, the "
            "trainers' logged dicts (log.txt has the run's own log either way)",
        )
        if name == "run":
            p.add_argument(
                "--from",
                dest="rerun_from",
                metavar="STAGE",
                help="run STAGE and every later stage again (earlier outputs are moved aside)",
            )
            p.add_argument(
                "--seeds",
                type=int,
                metavar="K",
                help="run the pipeline K times, every seed offset by 0..K-1 "
                "(runs/NAME/seed-S/), and report each stage's mean with its 95%% interval "
                "and the paired differences between stages (runs/NAME/seeds.md)",
            )
        p.add_argument(
            "items",
            nargs="*",
            metavar="key.sub=value",
            help="overrides of config keys"
            + (" (a bare FILE.yaml is the pipeline file)" if name == "run" else ""),
        )
    return parser


def config_class(command: str) -> type:
    """The config dataclass of an `align` command."""
    from pipelines import pipeline, stages

    return pipeline.Config if command == "run" else stages.COMMANDS[command].Config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    asks_help = argv[:1] and argv[0] in DESCRIPTIONS and {"-h", "--help"} & set(argv)
    parser = build_parser(keys_of=argv[0] if asks_help else None)
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling `items` at the first option, so overrides written after one
    # (`align run FILE --dry-run key=value`) arrive here.
    unknown = [item for item in extra if item.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.items += extra
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # vLLM logs every engine detail at INFO, and datasets/transformers draw a bar for every
    # small file they write; keep the terminal for the toolkit's own progress (one line per
    # stage) unless --verbose asks for everything. VLLM_LOGGING_LEVEL, when set, wins.
    if args.verbose:
        os.environ["ALIGN_VERBOSE"] = "1"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if args.verbose else "ERROR")
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
    import datasets
    import transformers

    if not args.verbose:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()

    from pipelines import pipeline, stages

    config_path = args.config
    overrides = []
    for item in args.items:
        if "=" not in item and config_path is None and args.command == "run":
            config_path = item
        elif "=" not in item:
            print(f"align {args.command}: expected key=value, got {item!r}", file=sys.stderr)
            return 2
        else:
            overrides.append(item)

    if args.command == "run":
        module = pipeline
    else:
        module = stages.COMMANDS[args.command]
    seeds = getattr(args, "seeds", None)
    if seeds is not None and seeds < 1:
        print(f"align {args.command}: --seeds must be >= 1 (got {seeds})", file=sys.stderr)
        return 2
    try:
        config = load_config(module.Config, config_path, overrides)
        source = config_path or COMMAND_LINE
        if args.command == "run":
            from pipelines import repeat

            # The pipeline, or with --seeds each of its repetitions, with its stages resolved.
            runs = [config] if seeds is None else repeat.seed_configs(config, seeds)
            resolved = [(run, pipeline.resolve_stages(run, source=source)) for run in runs]
            if args.dry_run and not args.print_config:
                # `align run` checks them in pipeline.run, before its first stage.
                for run, stages_of_run in resolved:
                    pipeline.check_inputs(run, stages_of_run, source=source)
        elif not (args.dry_run or args.print_config) and args.command in ("sft", "dpo", "distill"):
            pipeline.check_stage_placement(args.command, config, source)
        if args.dry_run and not args.print_config:
            if args.command == "run":
                dry_run = "\n".join(
                    pipeline.plan(run, stages_of_run) for run, stages_of_run in resolved
                )
            else:
                dry_run = pipeline.stage_dry_run(args.command, config, source)
    except ConfigError as error:
        print(f"align {args.command}: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(config), end="")
        return 0
    if args.dry_run:
        print(dry_run)
        return 0

    try:
        if seeds is not None:
            result = repeat.run(config, resolved, source, rerun_from=args.rerun_from)
        elif args.command == "run":
            result = pipeline.run(config, resolved[0][1], rerun_from=args.rerun_from)
        else:
            result = module.run(config)
    except DataError as error:
        print(f"align {args.command}: bad data: {error}", file=sys.stderr)
        return 2
    except ConfigError as error:
        print(f"align {args.command}: {error}", file=sys.stderr)
        return 2
    except RunStopped as error:
        print(f"align {args.command}: stopped: {error}", file=sys.stderr)
        return 1
    if args.command in ("make-model", "make-data"):
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
