"""Generation speed, side by side in one run: vLLM through this toolkit's adapter vs transformers.

Both arms sample `--n` completions of at most `--max-new-tokens` tokens for each of the same
`--prompts` prompts (the embedded tasks' RL prompts, chat template applied), at temperature 1
with no top-p or top-k truncation, from the same random-initialised checkpoint:

    vllm  align.engine.start_engine with the RL stage's default EngineSettings, then
          align.engine.generate (n completions per prompt, with the sampled tokens' logprobs),
          the two calls a rollout worker makes (align/rollout.py);
    hf    transformers' AutoModelForCausalLM.from_pretrained (the model as transformers runs
          it) and model.generate(do_sample=True, num_return_sequences=n) on one left-padded
          batch of all prompts, then batch_decode (TRL's GRPOTrainer generates this way).

Each arm is a process of its own with `--threads` compute threads (OMP_NUM_THREADS; a rollout
worker with the default worker_cpus 1 has one), started once per model size. The engine start
and the model load are timed on their own and kept out of tokens/s. One untimed batch warms
each arm up; then every repetition asks both arms for one batch, in alternating order, while
the other arm waits idle. Tokens/s counts generated tokens only: each completion's tokens up to
and including its end-of-turn token, never the prompt or padding.

Sizes: `teacher` (the preset, 3.6 M parameters) and `large` (75 M, 30.5 M active; built here,
bench/common.py SIZES). The ratio is vllm / hf: above 1, vLLM generates faster.

    python bench/generation.py --sizes teacher,large --repeats 3

Writes bench/results/generation-<time>.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common

ARMS = ["vllm", "hf"]
METRICS = [
    common.Metric("tokens_per_s", "tokens/s", "higher"),
    common.Metric("batch_s", "batch s", "lower", "{:.2f}"),
    common.Metric("tokens_per_completion", "tokens/completion", "higher"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="teacher,large", help="model sizes, comma-separated")
    p.add_argument("--prompts", type=int, default=16, help="distinct prompts per batch")
    p.add_argument("--n", type=int, default=8, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="compute threads of each arm")
    p.add_argument("--repeats", type=int, default=3)
    # Internal: serve one arm in this process (see `serve`).
    p.add_argument("--serve", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------- the arms
def prompt_ids(tokenizer, count: int) -> list[list[int]]:
    """The first `count` RL training prompts, tokenised as a rollout worker does."""
    from align.data import load_dataset_file
    from align.tokenizer import encode_prompts

    rows, _ = load_dataset_file(str(common.RUNS / "data" / "train" / "rl"), "rl")
    if len(rows) < count:
        raise SystemExit(f"generation: --prompts {count} but the data has {len(rows)} prompts")
    return encode_prompts(tokenizer, [rows[i]["prompt"] for i in range(count)])


class VllmArm:
    """vLLM as a rollout worker uses it: the toolkit's engine adapter, default engine settings."""

    def __init__(self, model: str, args) -> None:
        from align import engine
        from align.settings import EngineSettings

        self.engine, self.args = engine, args
        self.llm = engine.start_engine(model, EngineSettings())

    def batch(self, prompts: list[list[int]], seed: int) -> tuple[int, int]:
        completions = self.engine.generate(
            self.llm,
            prompts,
            n=self.args.n,
            temperature=1.0,
            max_tokens=self.args.max_new_tokens,
            seed=seed,
        )
        done = [c for group in completions for c in group]
        return sum(len(c.token_ids) for c in done), len(done)


class HfArm:
    """transformers' generate on the model as transformers loads it."""

    def __init__(self, model: str, args) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch, self.args = torch, args
        torch.set_num_threads(args.threads)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)

    def batch(self, prompts: list[list[int]], seed: int) -> tuple[int, int]:
        torch, tok = self.torch, self.tokenizer
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        attention_mask = (
            torch.arange(width) >= width - torch.tensor([[len(p)] for p in prompts])
        ).long()
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                num_return_sequences=self.args.n,
                max_new_tokens=self.args.max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        new_tokens = out[:, width:]
        tok.batch_decode(new_tokens, skip_special_tokens=True)
        # A finished sequence is padded to the batch's length: count up to its end-of-turn.
        is_eos = new_tokens == tok.eos_token_id
        first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, new_tokens.shape[1])
        return int(first_eos.sum()), len(new_tokens)


def serve(args) -> None:
    """One arm as a process: loads, says `ready`, then answers one batch per stdin line.

    The protocol travels on the original stdout; everything else printed goes to stderr.
    """
    import torch
    from transformers import AutoTokenizer

    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    prompts = prompt_ids(AutoTokenizer.from_pretrained(args.model), args.prompts)
    started = time.perf_counter()
    arm = (VllmArm if args.serve == "vllm" else HfArm)(args.model, args)
    start_s = time.perf_counter() - started
    channel.write(json.dumps({"start_s": start_s, "threads": torch.get_num_threads()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        began = time.perf_counter()
        tokens, sequences = arm.batch(prompts, request["seed"])
        seconds = time.perf_counter() - began
        channel.write(
            json.dumps({"seconds": seconds, "tokens": tokens, "sequences": sequences}) + "\n"
        )


class Server:
    """The parent's handle on one serving arm."""

    def __init__(self, args, arm: str, model: str, log: Path) -> None:
        self.log, self.log_file = log, open(log, "w")
        argv = [sys.executable, __file__, "--serve", arm, "--model", model]
        for key in ("prompts", "n", "max_new_tokens", "threads"):
            argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            env=env,
            text=True,
        )
        ready = self._read()
        self.start_s, self.threads = ready["start_s"], ready["threads"]

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            raise RuntimeError(
                f"generation arm exited with {self.process.returncode}; log {self.log}:\n"
                + common.log_tail(self.log)
            )
        return json.loads(line)

    def batch(self, seed: int) -> dict:
        self.process.stdin.write(json.dumps({"seed": seed}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()
        self.log_file.close()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.serve:
        serve(args)
        return
    started = common.stamp()
    machine = common.machine()
    out = common.RUNS / f"generation-{started}"
    out.mkdir(parents=True, exist_ok=True)
    common.ensure_data()
    raw: dict[str, list[dict]] = {}
    start_s: dict[str, dict[str, float]] = {}
    # torch's thread count inside each arm after its start (what it computed with).
    threads: dict[str, dict[str, int]] = {}
    for size in args.sizes.split(","):
        model = str(common.ensure_model(size))
        # One at a time, so that each start is timed on a machine not busy with the other.
        servers = {arm: Server(args, arm, model, out / f"{size}-{arm}.log") for arm in ARMS}
        start_s[size] = {arm: s.start_s for arm, s in servers.items()}
        threads[size] = {arm: s.threads for arm, s in servers.items()}
        for server in servers.values():
            server.batch(seed=10_000)  # warm-up, untimed
        for rep, arm in common.alternate(ARMS, args.repeats):
            result = servers[arm].batch(seed=rep)
            print(
                f"[{size} rep {rep}] {arm}: {result['tokens']} tokens in {result['seconds']:.2f} s",
                flush=True,
            )
            raw.setdefault(f"{arm} {size}", []).append(
                {
                    "rep": rep,
                    "tokens_per_s": result["tokens"] / result["seconds"],
                    "batch_s": result["seconds"],
                    "tokens_per_completion": result["tokens"] / result["sequences"],
                    "tokens": result["tokens"],
                    "sequences": result["sequences"],
                }
            )
        for server in servers.values():
            server.close()

    table = common.medians(raw)
    sizes = args.sizes.split(",")
    ratio_rows = common.ratios(table, [(f"vllm {s}", f"hf {s}") for s in sizes], METRICS)
    print()
    common.print_table(
        f"generation: {args.prompts} prompts x {args.n} completions, <= {args.max_new_tokens} new tokens, "
        f"{args.threads} thread(s) per arm; medians of {args.repeats}",
        table,
        METRICS,
        ratio_rows,
    )
    for size in sizes:
        print(
            f"start-up, not in tokens/s ({size}): vLLM engine {start_s[size]['vllm']:.1f} s, "
            f"transformers model load {start_s[size]['hf']:.1f} s"
        )
    path = common.write_results(
        "generation",
        started,
        sys.argv,
        machine,
        settings=vars(args),
        raw=raw,
        medians=table,
        ratios=ratio_rows,
        start_s=start_s,
        threads=threads,
        notes="ratio = vllm / hf; tokens/s: above 1, vLLM (this toolkit's adapter) is faster",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
