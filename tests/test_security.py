"""Security rules of docs/reliability.md ("Security"), checked on the source and on checkpoints.

`scan` parses every Python file of the toolkit with `ast` (so comments and strings never count),
resolves import aliases (`import torch as t`, `from pickle import loads`) and reports each use
of a forbidden pattern as `file:line: rule (in function)`:

- `torch.load` without `weights_only=True`;
- `trust_remote_code=True` written as a literal (the toolkit passes a literal False everywhere
  and has no setting for it);
- `eval`, `exec`;
- pickle-based loading: `pickle.load(s)`, `pickle.Unpickler`, `dill`/`cloudpickle`/`joblib`
  loads, `pandas.read_pickle`, `numpy.load(..., allow_pickle=True)`;
- `yaml.load` without a safe loader, `yaml.unsafe_load`, `yaml.full_load`;
- a shell: `subprocess.*(..., shell=...)` unless `shell=False`, `os.system`, `os.popen`;
- importing a module named by a string (`importlib.import_module`, `__import__`).

A use that is there on purpose is allowed by file, function and rule in `ALLOWED`, with the
reason. Weights are written and read as safetensors only; the last tests check that.
"""

from __future__ import annotations

import ast
import pickle
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from align.config import ConfigError
from align.modeling import build_model, check_checkpoint, load_model, write_checkpoint
from align.tokenizer import build_tokenizer
from align.training import save_checkpoint
from align.weight_sync import export_weights

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("align", "rewards", "filters", "pipelines", "scripts", "bench")

# (file, function, rule) -> why that use is safe.
ALLOWED = {
    ("align/registry.py", "Registry._load_plugin", "dynamic import"): (
        "imports the module of a reward or filter plug-in that the user names explicitly as "
        "'module:attribute' in a config (README, Rewards); no other config string is imported"
    ),
    ("align/launch.py", "_rank_main", "dynamic import"): (
        "a training rank imports the module of the stage's `fit` function, which the stage "
        "process names itself on the ranks' command line (`fit.__module__`); no config, data "
        "or job-file string is imported"
    ),
    ("align/config.py", "parse_yaml", "yaml.load without SafeLoader"): (
        "its loader, _ConfigLoader, subclasses yaml.SafeLoader and only adds refusals "
        "(duplicate keys, alias expansion past a bound); it constructs nothing SafeLoader does not"
    ),
    ("align/rl/learner.py", "_MetadataUnpickler", "pickle load"): (
        "reads the metadata file of the RL learner's sharded checkpoint (torch.distributed."
        "checkpoint writes it as a pickle) with find_class restricted to the checkpoint "
        "metadata classes, dtypes and paths; anything else is refused before it loads"
    ),
}

PICKLE_LOADERS = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "_pickle.load",
    "_pickle.loads",
    "dill.load",
    "dill.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "joblib.load",
    "pandas.read_pickle",
}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader"}
UNSAFE_YAML = {"yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"}
SUBPROCESS = {f"subprocess.{f}" for f in ("run", "call", "check_call", "check_output", "Popen")}


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    rule: str
    # Qualified name of the enclosing function ("<module>" at the top level).
    function: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.rule} (in {self.function})"


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_literal(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


class _Scanner(ast.NodeVisitor):
    def __init__(self, file: str) -> None:
        self.file = file
        self.aliases: dict[str, str] = {}  # local name -> dotted name it was imported as
        self.scope: list[str] = []
        self.findings: list[Finding] = []

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:
                top = alias.name.split(".")[0]
                self.aliases[top] = top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            # Relative imports (`from . import x`) name the toolkit's own modules.
            module = "." * node.level + (node.module or "")
            self.aliases[alias.asname or alias.name] = f"{module}.{alias.name}"

    def _scoped(self, node) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _scoped

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        # A subclass of an unpickler loads pickles like it (whatever find_class allows).
        for base in node.bases:
            if self.dotted(base) in PICKLE_LOADERS:
                self.scope.append(node.name)
                self.report(node, "pickle load")
                self.scope.pop()
        self._scoped(node)

    def dotted(self, node: ast.expr) -> str | None:
        """`torch.load` for `t.load` after `import torch as t`; None for other expressions."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        parts.append(self.aliases.get(node.id, node.id))
        return ".".join(reversed(parts))

    def report(self, node: ast.AST, rule: str) -> None:
        function = ".".join(self.scope) or "<module>"
        self.findings.append(Finding(self.file, node.lineno, rule, function))

    def visit_Call(self, node: ast.Call) -> None:
        name = self.dotted(node.func)
        if name == "torch.load" and not _is_literal(_keyword(node, "weights_only"), True):
            self.report(node, "torch.load without weights_only=True")
        if _is_literal(_keyword(node, "trust_remote_code"), True):
            self.report(node, "trust_remote_code=True")
        if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
            self.report(node, "eval/exec")
        if name in PICKLE_LOADERS:
            self.report(node, "pickle load")
        allow_pickle = _keyword(node, "allow_pickle")
        if (
            name == "numpy.load"
            and allow_pickle is not None
            and not _is_literal(allow_pickle, False)
        ):
            self.report(node, "numpy.load with allow_pickle")
        if name in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or self.dotted(loader) not in SAFE_YAML_LOADERS:
                self.report(node, "yaml.load without SafeLoader")
        if name in UNSAFE_YAML:
            self.report(node, "yaml.load without SafeLoader")
        shell = _keyword(node, "shell")
        if name in SUBPROCESS and shell is not None and not _is_literal(shell, False):
            self.report(node, "shell=True")
        if name in ("os.system", "os.popen"):
            self.report(node, "shell=True")
        if name in ("importlib.import_module", "__import__", "builtins.__import__"):
            self.report(node, "dynamic import")
        self.generic_visit(node)


def scan_source(source: str, file: str) -> list[Finding]:
    """The forbidden patterns in one file's source, in line order."""
    scanner = _Scanner(file)
    scanner.visit(ast.parse(source, filename=file))
    return sorted(scanner.findings, key=lambda f: f.line)


def python_files() -> list[Path]:
    """Every Python file under the `SCANNED` directories of the repository."""
    return [path for directory in SCANNED for path in sorted((REPO / directory).rglob("*.py"))]


def scan() -> list[Finding]:
    """The forbidden patterns in every file of `python_files()`."""
    return [
        finding
        for path in python_files()
        for finding in scan_source(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    ]


def test_the_source_has_no_forbidden_pattern_outside_the_allow_list():
    findings = scan()
    unexpected = [str(f) for f in findings if (f.file, f.function, f.rule) not in ALLOWED]
    assert unexpected == []
    used = {(f.file, f.function, f.rule) for f in findings}
    assert used == set(ALLOWED), f"allow-list entries that match nothing: {set(ALLOWED) - used}"


def test_the_scan_covers_every_tracked_python_file_outside_the_tests():
    """What git tracks is the product: every Python file of it but the tests is scanned (a new
    top-level directory of code would otherwise escape the scan)."""
    tracked = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    product = {path for path in tracked if not path.startswith("tests/")}
    scanned = {str(path.relative_to(REPO)) for path in python_files()}
    assert product - scanned == set()
    assert "align/registry.py" in product and "bench/rl.py" in product


SNIPPET = """
import builtins
import importlib
import os
import pickle as pk
import subprocess
import numpy as np
import torch
import yaml
from pickle import loads
from subprocess import Popen
from transformers import AutoModel

torch.load("model.pt")
torch.load("model.pt", weights_only=False)
torch.load("state.pt", weights_only=True)  # fine
AutoModel.from_pretrained("m", trust_remote_code=True)
AutoModel.from_pretrained("m", trust_remote_code=False)  # fine
eval("1 + 1")
exec("x = 1")
builtins.eval("2")
pk.load(open("f.pkl", "rb"))
loads(b"")
np.load("a.npy", allow_pickle=True)
np.load("a.npy")  # fine
yaml.load("a: 1")
yaml.load("a: 1", Loader=yaml.Loader)
yaml.load("a: 1", Loader=yaml.SafeLoader)  # fine
yaml.safe_load("a: 1")  # fine
yaml.full_load("a: 1")
subprocess.run("ls", shell=True)
Popen(["ls"], shell=True)
subprocess.run(["ls"], shell=False)  # fine
subprocess.run(["ls"])  # fine
os.system("ls")


def load_plugin(name):
    return importlib.import_module(name)


class Model:
    def run(self):
        self.model.eval()  # fine: a method, not the builtin
        # eval("in a comment"), torch.load("in a comment")
        return "torch.load('in a string') exec('too')"


class Restricted(pk.Unpickler):
    pass
"""


def test_the_scan_reports_every_forbidden_pattern():
    findings = scan_source(textwrap.dedent(SNIPPET), "snippet.py")
    assert [(f.line, f.rule) for f in findings] == [
        (14, "torch.load without weights_only=True"),
        (15, "torch.load without weights_only=True"),
        (17, "trust_remote_code=True"),
        (19, "eval/exec"),
        (20, "eval/exec"),
        (21, "eval/exec"),
        (22, "pickle load"),
        (23, "pickle load"),
        (24, "numpy.load with allow_pickle"),
        (26, "yaml.load without SafeLoader"),
        (27, "yaml.load without SafeLoader"),
        (30, "yaml.load without SafeLoader"),
        (31, "shell=True"),
        (32, "shell=True"),
        (35, "shell=True"),
        (39, "dynamic import"),
        (49, "pickle load"),
    ]
    assert str(findings[-2]) == "snippet.py:39: dynamic import (in load_plugin)"
    assert str(findings[-1]) == "snippet.py:49: pickle load (in Restricted)"


class _Boom:
    """Unpickling this runs os.system: what a crafted checkpoint would carry."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_a_sharded_checkpoint_whose_metadata_would_run_code_is_refused(tmp_path):
    """The RL learner's resume reads torch.distributed.checkpoint's pickled metadata with a
    restricted unpickler: a global outside the metadata classes is refused before it loads."""
    import torch
    import torch.distributed.checkpoint as dcp

    from align.rl.learner import checkpoint_reader

    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(tmp_path / "good"), no_dist=True)
    state = {"w": torch.zeros(3)}
    dcp.load(state, storage_reader=checkpoint_reader(str(tmp_path / "good")), no_dist=True)
    assert state["w"].tolist() == [1.0, 1.0, 1.0]

    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "good", bad)
    (bad / ".metadata").write_bytes(pickle.dumps(_Boom()))
    # torch.distributed.checkpoint wraps the refusal in its own error, per rank.
    with pytest.raises(dcp.api.CheckpointException) as refused:
        dcp.load({"w": torch.zeros(3)}, storage_reader=checkpoint_reader(str(bad)), no_dist=True)
    assert "posix.system, which a checkpoint never holds" in repr(refused.value.failures)


# --- weights: safetensors only ------------------------------------------------------------------


def test_checkpoints_are_written_as_safetensors_only(tmp_path):
    model = build_model("student", seed=0)
    written = [
        write_checkpoint(model, tmp_path / "made"),
        save_checkpoint(model, build_tokenizer(), tmp_path / "trained"),
    ]
    export_weights(model, tmp_path / "published")
    for directory in [*written, tmp_path / "published"]:
        suffixes = {path.suffix for path in directory.iterdir()}
        assert ".safetensors" in suffixes, directory
        assert not suffixes & {".bin", ".pt", ".pth", ".ckpt", ".pkl"}, directory


class _CreatesAFileWhenUnpickled:
    """Pickled as a call of `open(path, "w")`: loading the pickle leaves a file at `path`."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def pickled_checkpoint(tmp_path) -> tuple[Path, Path]:
    """A checkpoint whose only weights are pytorch_model.bin, a pickle that creates a file."""
    source = write_checkpoint(build_model("student", seed=0), tmp_path / "source")
    directory = tmp_path / "pickled"
    shutil.copytree(source, directory, ignore=shutil.ignore_patterns("*.safetensors"))
    marker = tmp_path / "unpickled"
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_CreatesAFileWhenUnpickled(marker)))
    return directory, marker


def test_pickled_weights_are_refused_without_being_opened(pickled_checkpoint):
    directory, marker = pickled_checkpoint
    with pytest.raises(ConfigError, match="key 'model': checkpoint .* has no \\*.safetensors"):
        check_checkpoint(directory, "model")
    with pytest.raises(OSError, match="model.safetensors"):
        load_model(directory)
    assert not marker.exists()
    # The trap works: loading the pickle does create the file.
    pickle.loads((directory / "pytorch_model.bin").read_bytes())
    assert marker.exists()


@pytest.mark.vllm
def test_vllm_loads_safetensors_only(pickled_checkpoint):
    directory, marker = pickled_checkpoint
    # In a child process: a failed in-process engine would tear down the session's engines.
    code = (
        "from align import engine\n"
        "from align.settings import EngineSettings\n"
        f"engine.start_engine({str(directory)!r}, EngineSettings())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert out.returncode != 0
    assert f"Cannot find any model weights with `{directory}`" in out.stderr
    assert not marker.exists()
