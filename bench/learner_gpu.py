"""The RL learner on a GPU: step time, tokens/s, MFU and peak memory of a ~1 B-parameter MoE.

Runs one rank of the learner group (`align.rl.learner.LearnerRank.train_step`, the code path
`align rl` uses: FSDP2, bf16 compute with fp32 master weights) on synthetic rollout groups,
without vLLM or Ray, so it runs on a bare GPU machine; then times the per-layer gather and
conversion to checkpoint format that precedes every weight sync (`stage_weights`). MFU =
achieved FLOP/s over the chip's dense bf16 peak, counting 6 x active parameters x tokens per
step for forward and backward (the learner runs one forward per step: with one optimiser step
per batch the proximal policy's logprobs are the training forward's, detached). Attention FLOPs
are left out, so MFU is slightly understated.

    python bench/learner_gpu.py --peak-tflops 989 --lengths 512,1024,2048,4096

Writes bench/results/learner-gpu-<time>.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    p.add_argument(
        "--lengths", default="512,1024,2048,4096", help="sequence lengths (prompt + completion)"
    )
    p.add_argument("--tokens", type=int, default=65536, help="tokens per step (all lengths)")
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("learner_gpu: no CUDA device")

    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from align.losses.policy import PolicyLossSettings
    from align.modeling import count_parameters
    from align.rl.learner import LearnerRank, LearnerSettings, free_address, split_batch
    from align.rl.rollout import Rollout

    config = Llama4TextConfig(
        vocab_size=32000,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        intermediate_size_mlp=args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        head_dim=64,
        num_local_experts=args.experts,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        max_position_embeddings=8192,
        attention_chunk_size=8192,
        use_qk_norm=True,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    directory = Path(tempfile.mkdtemp()) / "model"
    model = Llama4ForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(directory))
    counts = count_parameters(model)
    active, total = counts["active"], counts["total"]
    del model

    peak = args.peak_tflops * 1e12
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        sequences = max(8, args.tokens // length // 8 * 8)
        micro = max(1, args.micro_batch_tokens // length)
        learner = LearnerRank(
            str(directory),
            LearnerSettings(learning_rate=1e-5, micro_batch_size=micro, precision="bf16"),
            PolicyLossSettings(kind="gspo"),
            max_completion_tokens=length,
        )
        learner.start(*free_address())
        torch.cuda.reset_peak_memory_stats()
        prompt, completion = length // 4, length - length // 4
        groups = []
        for g in range(sequences // 8):
            ids = torch.randint(1, config.vocab_size, (8, completion)).tolist()
            groups.append(
                Rollout(
                    prompt_id=g,
                    prompt_ids=torch.randint(1, config.vocab_size, (prompt,)).tolist(),
                    completion_ids=ids,
                    behaviour_logprobs=[[-10.0] * completion for _ in ids],
                    rewards=[float(i % 2) for i in range(8)],
                    version=0,
                )
            )
        (part,), _ = split_batch(groups, learner.loss, 1, micro)
        learner.train_step(part)  # warm-up
        times = []
        for _ in range(args.steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            learner.train_step(part)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        gather = statistics.median(learner.stage_weights() for _ in range(3))
        tokens = sequences * length
        flops = 6 * active * tokens  # forward + backward
        rows.append(
            {
                "length": length,
                "sequences": sequences,
                "micro_batch": micro,
                "step_s": seconds,
                "tokens_per_s": tokens / seconds,
                "mfu": flops / seconds / peak,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                "gather_convert_s": gather,
            }
        )
        print(
            f"length {length:5d}: step {seconds:.3f} s, {tokens / seconds:,.0f} tok/s, "
            f"MFU {100 * flops / seconds / peak:.1f}%, peak "
            f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, gather+convert {gather:.3f} s",
            flush=True,
        )
        del learner
    result = {
        "device": torch.cuda.get_device_name(),
        "active_parameters": active,
        "parameters": total,
        "args": vars(args),
        "rows": rows,
    }
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"learner-gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
