"""Shared fixtures: tiny checkpoints and vLLM engines, built once per test session.

A vLLM engine costs 15-45 s to start on CPU, so engines are session-scoped and a check at the
end of the session fails the run if any checkpoint got more than one engine. Tests must also
never drop an engine: an in-process vLLM engine that is garbage-collected tears down vLLM's
process-global distributed state, and every other live engine then fails
("pipeline model parallel group is not initialized"). `shared_engine` keeps them all alive.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from align import engine
from align.modeling import build_model, write_checkpoint
from align.settings import EngineSettings

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
REPO_ROOT = Path(__file__).resolve().parents[1]

# The presets the vLLM tests cover: one per supported model family.
FAMILY_PRESETS = {"llama4": "student", "qwen3_moe": "qwen3-student"}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny random-initialised checkpoint per model family, keyed by family."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        family: write_checkpoint(build_model(preset, seed=0), root / preset)
        for family, preset in FAMILY_PRESETS.items()
    }


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory) -> Path:
    """A random-initialised `student` preset checkpoint (seed 0) for training tests."""
    return write_checkpoint(
        build_model("student", seed=0), tmp_path_factory.mktemp("student") / "m"
    )


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory) -> str:
    """32 prompt/completion rows (add and sort, levels 1-2) as JSON lines."""
    from align.tasks import make_problems, to_sft

    rows = list(to_sft(make_problems(["add", "sort"], [1, 2], 8, seed=2)))
    return write_jsonl(tmp_path_factory.mktemp("sft-data") / "sft.jsonl", rows)


def write_jsonl(path: Path, rows) -> str:
    """Writes `rows` (dicts) as JSON lines to `path`; returns the path as a string."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


SERVER = r"""
import json, os, sys, traceback

from align import cli
import datasets, transformers  # what cli.main imports when it starts
from pipelines import pipeline, stages

print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        status = 1
        try:
            status = cli.main(request["args"])
        except SystemExit as exit:
            status = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(wait_status)}), flush=True)
"""


class ForkedAlign:
    """Runs `align ARGS` in a fork of one process that imported the command once."""

    def __init__(self, scratch: Path, pythonpath: Path | None = None) -> None:
        self.scratch = scratch
        env = dict(os.environ)
        if pythonpath is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(pythonpath), env.get("PYTHONPATH")) if p
            )
        self.server = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        # Imported once here, so no case's time includes the imports.
        assert self._read_line(timeout_s=300.0) == "ready\n"

    def _read_line(self, timeout_s: float) -> str:
        ready, _, _ = select.select([self.server.stdout], [], [], timeout_s)
        if not ready:
            self.close()
            raise TimeoutError(f"no answer from the align process within {timeout_s} s")
        return self.server.stdout.readline()

    def __call__(self, *args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess:
        out, err = self.scratch / "stdout", self.scratch / "stderr"
        request = {"args": list(args), "stdout": str(out), "stderr": str(err)}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        returncode = json.loads(self._read_line(timeout_s))["returncode"]
        return subprocess.CompletedProcess(
            ["align", *args], returncode, out.read_text(), err.read_text()
        )

    def close(self) -> None:
        self.server.stdin.close()
        try:
            self.server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.server.kill()


@pytest.fixture(scope="session")
def quick_align(tmp_path_factory):
    """`align ARGS` in a fork of one process that imported the command once: for commands that
    refuse, print or write a little (about 1 s each instead of 10). Runs that start Ray or
    vLLM, or need their own environment or directory, use `tests.test_cli.align`."""
    runner = ForkedAlign(tmp_path_factory.mktemp("quick-align"))
    yield runner
    runner.close()


_engines: dict[str, object] = {}


@pytest.fixture(scope="session")
def engine_for(checkpoints):
    """Returns the session's engine for a model family, starting it on first use."""

    return lambda family: shared_engine(checkpoints[family])


def shared_engine(path: Path, **settings):
    """The session's engine for the checkpoint at `path`, started on first use (with the
    EngineSettings `settings` given then)."""
    if str(path) not in _engines:
        _engines[str(path)] = engine.start_engine(str(path), EngineSettings(**settings))
    return _engines[str(path)]


@pytest.fixture(autouse=True)
def _engines_stay_usable():
    """Fails the test that tore down vLLM's process-global state while session engines live
    (an in-process engine it started and dropped), instead of the engine tests that come later."""
    yield
    if _engines:
        from vllm.distributed import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            pytest.fail(
                "this test tore down vLLM's in-process distributed state (it dropped an engine "
                "it started in this process); run such engines in a subprocess or share one"
            )


def pytest_sessionfinish(session, exitstatus):
    repeated = {path: n for path, n in engine.ENGINE_STARTS.items() if n > 1}
    if repeated:
        print(
            f"\nFAILED engine reuse: engines were started more than once per checkpoint: {repeated}"
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def memorize(
    model, tokenizer, rows: list[dict], steps: int = 300, lr: float = 3e-3, tagged: bool = True
) -> float:
    """Trains `model` to answer `rows` (prompt messages + answer) verbatim, in answer tags
    unless `tagged` is false; returns the last loss.

    A few seconds on CPU. It gives tests a checkpoint whose right answers are known, so the
    evaluation's numbers can be checked against an independent computation.
    """
    import torch

    from align.moe import route_sparsely
    from align.tasks import format_answer

    # Only each token's chosen experts run, as in the trainers: the same sums, a third faster.
    route_sparsely(model)

    sequences, masks = [], []
    for row in rows:
        prompt_ids = tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, return_dict=False
        )
        answer = format_answer(row["answer"]) if tagged else row["answer"]
        full = row["prompt"] + [{"role": "assistant", "content": answer}]
        full_ids = tokenizer.apply_chat_template(full, return_dict=False)
        sequences.append(full_ids)
        masks.append([0] * len(prompt_ids) + [1] * (len(full_ids) - len(prompt_ids)))
    width = max(map(len, sequences))
    ids_bt = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in sequences])
    mask_bt = torch.tensor([m + [0] * (width - len(m)) for m in masks])[:, 1:].float()
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        logits_btv = model(ids_bt).logits[:, :-1]
        logprobs_bt = logits_btv.log_softmax(-1).gather(-1, ids_bt[:, 1:, None])[..., 0]
        loss = -(logprobs_bt * mask_bt).sum() / mask_bt.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


@pytest.fixture(scope="session")
def memorized(tmp_path_factory):
    """A student checkpoint trained to answer 8 level-1 problems, with those and 8 unseen rows."""
    from align.tasks import make_problems, to_rl
    from align.tokenizer import build_tokenizer

    rows = list(to_rl(make_problems(["add", "sort"], [1], 8, seed=11)))
    seen = [rows[i] for i in range(0, 16, 2)]
    unseen = [rows[i] for i in range(1, 16, 2)]
    model = build_model("student", seed=0)
    loss = memorize(model, build_tokenizer(), seen)
    assert loss < 0.05, f"memorisation did not converge (loss {loss:.3f})"
    path = write_checkpoint(model, tmp_path_factory.mktemp("memorized") / "model")
    return {"checkpoint": path, "seen": seen, "unseen": unseen}


@pytest.fixture(scope="session")
def partially_trained(tmp_path_factory):
    """A student trained briefly on `sort` (levels 1-4): it half-generalises, worse on longer
    strings, so held-out pass rates fall with the level on the whole (by level, 15 rows each,
    not always in order: difficulty over 8 samples 0.25, 0.59, 0.40, 0.78 on one machine).
    200 full-batch steps at lr 3e-3, about 20 s on two cores; 120 steps at 6e-3 were faster
    but diverged on one machine (loss 0.94) and converged on another.

    Returns the checkpoint and the held-out problems (15 per level) it never saw.
    """
    from align.tasks import make_problems, split_problems, to_rl
    from align.tokenizer import build_tokenizer

    train, heldout = split_problems(make_problems(["sort"], [1, 2, 3, 4], 60, seed=0), 0.25, 0)
    model = build_model("student", seed=0)
    memorize(model, build_tokenizer(), list(to_rl(train)), steps=200, lr=3e-3)
    path = write_checkpoint(model, tmp_path_factory.mktemp("partial") / "model")
    return {"checkpoint": path, "heldout": heldout}


def run_ranks(target, world: int, *args, timeout_s: float = 600.0) -> None:
    """Runs `target(rank, world, port, *args)` in `world` fresh processes, as the learner group's
    ranks (they join a gloo group at 127.0.0.1:port); fails unless every one exits cleanly.

    `target` must be a module-level function (the processes are spawned and import it).
    """
    import time

    import torch.multiprocessing as mp

    from align.rl.learner import free_address

    _, port = free_address()
    context = mp.get_context("spawn")
    processes = [
        context.Process(target=_rank_entry, args=(target, rank, world, port, args))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in processes if p.is_alive()]
    for process in hung:
        process.kill()
    assert not hung, f"{len(hung)} of {world} ranks still running after {timeout_s:.0f} s"
    codes = [p.exitcode for p in processes]
    assert codes == [0] * world, f"rank exit codes {codes} (their tracebacks are above)"


def _rank_entry(target, rank: int, world: int, port: int, args: tuple) -> None:
    import torch

    # Two ranks share the machine's cores; one thread each keeps them from fighting.
    torch.set_num_threads(1)
    target(rank, world, port, *args)
    # The rank's work is done and written. Exit without the interpreter's teardown: there,
    # now and then, a gloo thread was destroyed while joinable and the process aborted
    # ("terminate called without an active exception", exit -6) after finishing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
