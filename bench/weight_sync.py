"""Weight sync into a live vLLM engine, side by side in one run: in memory vs through a checkpoint.

Both arms take the same learner's weights into the same running engine, exactly (the max
|logprob difference| between engine and learner after each sync is reported):

    memory      what `align rl` does now: the learner group gathers its weights one decoder
                layer at a time and converts them to checkpoint names and layouts (gather), its
                rank 0 broadcasts the packed buckets over a gloo process group (send) while the
                engine takes them through vLLM's weight-transfer protocol (load):
                align.rl.transport + align.engine.receive_weights.
    checkpoint  what it did before: the learner writes a Hugging Face checkpoint to /dev/shm
                with save_pretrained (export) and the engine reloads it in place (load):
                align.weight_sync.export_weights + align.engine.sync_weights.

One process per model size holds the engine (multiprocess off, as the rollout workers run it);
a child process holds a learner of one rank (one compute thread, as with the default
`learner_cpus: 1`), as the worker and the learner are separate actors in `align rl`. The
learner first takes one step on a batch of the RL stage's default shape (`--groups` prompts x 8
completions of 32 tokens, micro-batches of 64) to give the step time the sync is compared with;
then every repetition changes the weights with a small step and runs both arms, in
alternating order. In `align rl` only the gather holds up the learner (the send runs on a
thread of rank 0 beside the next step, the load between the worker's requests); `learner share` is
gather / step for memory and export / step for checkpoint, whose export also held the learner.

Sizes: `teacher` (the preset, 3.6 M parameters) and `large` (75 M; bench/common.py SIZES).

    python bench/weight_sync.py --sizes teacher,large --repeats 5

Writes bench/results/weight-sync-<time>.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

ARMS = ["memory", "checkpoint"]
METRICS = [
    common.Metric("sync_s", "sync s", "lower", "{:.4f}"),
    common.Metric("blocking_s", "learner held s", "lower", "{:.4f}"),
    common.Metric("load_s", "load s", "lower", "{:.4f}"),
    common.Metric("step_share", "sync / step", "lower", "{:.2%}"),
    common.Metric("learner_share", "learner share", "lower", "{:.2%}"),
    common.Metric("max_logprob_diff", "max |dlogp|", "lower", "{:.1e}"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="teacher,large")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--groups", type=int, default=64, help="prompts of the timed learner step")
    p.add_argument("--size", help=argparse.SUPPRESS)  # internal: measure one size here
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def learner_process(connection, path: str, groups: int) -> None:
    """The learner of one rank, in a process of its own (as under Ray), doing what the
    measuring process asks over `connection` and answering with the seconds it took."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from align.losses.policy import PolicyLossSettings
    from align.modeling import load_model
    from align.rl.learner import (
        LearnerRank,
        LearnerSettings,
        free_address,
        split_batch,
        token_logprobs,
    )
    from align.rl.rollout import Rollout
    from align.weight_sync import export_weights

    torch.set_num_threads(1)  # the default placement's learner_cpus: 1
    learner = LearnerRank(path, LearnerSettings(learning_rate=1e-3), PolicyLossSettings(), 32)
    learner.start(*free_address())
    vocab = learner.model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    rollouts = [
        Rollout(
            prompt_id=g,
            prompt_ids=torch.randint(3, vocab, (24,), generator=generator).tolist(),
            completion_ids=torch.randint(3, vocab, (8, 32), generator=generator).tolist(),
            behaviour_logprobs=[[-5.0] * 32 for _ in range(8)],
            rewards=[float(i % 2) for i in range(8)],
            version=0,
        )
        for g in range(groups)
    ]
    (part,), _ = split_batch(rollouts, learner.loss, 1, 64)
    (small,), _ = split_batch(rollouts[:2], learner.loss, 1, 64)
    plain = None
    shm = Path(tempfile.mkdtemp(prefix="bench-sync-", dir="/dev/shm"))
    while True:
        command, argument = connection.recv()
        started = time.perf_counter()
        if command == "step":
            learner.train_step(part if argument == "full" else small)
            answer = time.perf_counter() - started
        elif command == "stage":
            answer = (learner.stage_weights(), learner.update_info())
        elif command == "open":
            learner.open_channel(0, argument)
            answer = None
        elif command == "send":
            answer = learner.send_weights(0, learner.version)
        elif command == "export":
            # The single learner process of earlier versions held a plain model.
            state = get_model_state_dict(
                learner.model, options=StateDictOptions(full_state_dict=True)
            )
            plain = plain or load_model(path)
            plain.load_state_dict(state)
            exported = export_weights(plain, shm / "policy")
            answer = (str(exported), time.perf_counter() - started)
        elif command == "logprobs":
            with torch.no_grad():
                ids = torch.tensor([argument])
                answer = token_logprobs(learner.model, ids, torch.ones_like(ids))[0].tolist()
        elif command == "bytes":
            answer = sum(b.numel() for b in learner._staged[max(learner._staged)].buckets)
        else:
            break
        connection.send(answer)


def measure(size: str, groups: int, repeats: int) -> dict:
    """Runs in a process of its own: the engine here, the learner in a child process, both
    arms `repeats` times."""
    import multiprocessing

    import torch
    from transformers import AutoTokenizer

    from align import engine
    from align.rl import transport
    from align.rl.learner import free_address
    from align.settings import EngineSettings

    path = str(common.ensure_model(size))
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    learner = context.Process(target=learner_process, args=(theirs, path, groups))
    learner.start()

    def ask(command: str, argument=None):
        ours.send((command, argument))
        return ours.recv()

    llm = engine.start_engine(path, EngineSettings(max_model_len=256))
    ask("step", "small")  # warm-up
    step_s = ask("step", "full")
    tokenizer = AutoTokenizer.from_pretrained(path)
    conversation = [
        {"role": "user", "content": "Sort: hbadcfe"},
        {"role": "assistant", "content": "abcdefh"},
    ]
    sequence = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)

    def logprob_diff() -> float:
        (vllm_lp,) = engine.sequence_logprobs(llm, [sequence])
        return float((torch.tensor(vllm_lp) - torch.tensor(ask("logprobs", sequence))).abs().max())

    host, port = free_address()
    endpoint = transport.Endpoint("gloo", host, port, 2, 120.0)
    ours.send(("open", endpoint))
    engine.init_weight_transfer(llm, endpoint.worker_init_info())
    ours.recv()
    rows = {arm: [] for arm in ARMS}
    for _, arm in common.alternate(ARMS, repeats):
        ask("step", "small")  # new weights each time (a small batch: only the sync is timed)
        if arm == "memory":
            gather_s, update_info = ask("stage")
            ours.send(("send", None))
            load_s = engine.receive_weights(llm, update_info)
            send_s = ours.recv()
            row = {"gather_s": gather_s, "send_s": send_s, "load_s": load_s}
            row["blocking_s"] = gather_s
            row["sync_s"] = gather_s + max(send_s, load_s)
        else:
            exported, export_s = ask("export")
            load_s = engine.sync_weights(llm, exported)
            row = {"export_s": export_s, "load_s": load_s, "blocking_s": export_s}
            row["sync_s"] = export_s + load_s
        row["step_s"] = step_s
        row["step_share"] = row["sync_s"] / step_s
        row["learner_share"] = row["blocking_s"] / step_s
        row["max_logprob_diff"] = logprob_diff()
        rows[arm].append(row)
        print(f"{size} {arm}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    bytes_sent = ask("bytes")
    ours.send(("stop", None))
    learner.join(60)
    return {"rows": rows, "step_s": step_s, "bytes": bytes_sent}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.size:
        result = measure(args.size, args.groups, args.repeats)
        Path(args.out).write_text(json.dumps(result))
        return
    started = common.stamp()
    facts = common.machine()
    raw, table, ratio_rows, extra = {}, {}, {}, {}
    for size in args.sizes.split(","):
        out = common.RUNS / "weight-sync" / f"{size}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        log = out.with_suffix(".log")
        command = [sys.executable, __file__, "--size", size, "--out", str(out)]
        command += ["--repeats", str(args.repeats), "--groups", str(args.groups)]
        with open(log, "w") as handle:
            done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise SystemExit(f"weight_sync: {size} failed:\n{common.log_tail(log)}")
        result = json.loads(out.read_text())
        raw[size] = result["rows"]
        extra[size] = {"step_s": result["step_s"], "bytes": result["bytes"]}
        for arm in ARMS:
            keys = result["rows"][arm][0].keys()
            table[f"{size} {arm}"] = {
                k: statistics.median(r[k] for r in result["rows"][arm]) for k in keys
            }
        ratio_rows[f"{size} memory / checkpoint"] = {
            m.key: table[f"{size} memory"][m.key] / table[f"{size} checkpoint"][m.key]
            if table[f"{size} checkpoint"][m.key]
            else None
            for m in METRICS
        }
    common.print_table("weight sync into a live vLLM engine (medians)", table, METRICS, ratio_rows)
    for size, facts_of in extra.items():
        print(
            f"{size}: {facts_of['bytes'] / 2**20:.1f} MiB per sync, learner step {facts_of['step_s']:.2f} s"
        )
    path = common.write_results(
        "weight-sync",
        started,
        sys.argv,
        facts,
        settings=vars(args),
        raw=raw,
        medians=table,
        ratios=ratio_rows,
        sizes=extra,
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
