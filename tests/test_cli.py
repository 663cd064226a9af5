"""The `align` command: subcommands, config errors before work, and the pipeline runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import align

SUBCOMMANDS = ["run", "make-model", "make-data", "eval", "filter", "sft", "rl", "dpo", "distill"]


def test_help_lists_every_subcommand():
    out = align("--help")
    assert out.returncode == 0
    for name in SUBCOMMANDS:
        assert f"    {name}" in out.stdout, name


def test_command_help_lists_every_config_key_with_type_default_and_meaning(capsys):
    """`align COMMAND --help` ends with the command's config keys, nested ones dotted, each
    with its type, default and the first sentence of its comment in the source."""
    from align.cli import DESCRIPTIONS, main

    with pytest.raises(SystemExit) as exit:
        main(["distill", "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    keys = text.split("config keys (--config FILE.yaml or key.sub=value):\n")[1].splitlines()
    entries = dict(zip(keys[0::2], keys[1::2], strict=True))
    lines = {entry.split()[0]: (entry, meaning.strip()) for entry, meaning in entries.items()}
    assert (
        lines["teacher.cache_builder"][0].split(None, 1)[1]
        == 'vllm | transformers = "transformers"'
    )
    assert lines["teacher.cache_builder"][1].startswith("offline: what runs the teacher")
    assert lines["student"][0].endswith("str, required")
    assert lines["train.learning_rate"][0].endswith("float = 0.001")
    assert lines["lora.enabled"][0].endswith("bool = false")
    assert "teacher.engine.tensor_parallel_size" in lines
    # Every key of every command is documented where it is declared: a new setting without a
    # comment fails here.
    from align.cli import config_class
    from align.config import config_keys

    for command in DESCRIPTIONS:
        undocumented = [
            key for key, _, meaning in config_keys(config_class(command)) if not meaning
        ]
        assert not undocumented, (command, undocumented)


def test_distill_needs_a_student_and_a_teacher(tmp_path, quick_align):
    out = quick_align("distill", "data=d", f"runs_dir={tmp_path}")
    assert out.returncode == 2 and "missing required key 'student'" in out.stderr
    out = quick_align("distill", "student=s", "data=d", f"runs_dir={tmp_path}")
    assert out.returncode == 2 and "missing required key 'teacher'" in out.stderr
    out = quick_align("distill", "--print-config", "student=s", "data=d", "teacher.model=t")
    assert out.returncode == 0, out.stderr
    teacher = yaml.safe_load(out.stdout)["teacher"]
    assert teacher["engine"]["dtype"] == "float32"
    assert {k: v for k, v in teacher.items() if k != "engine"} == {
        "model": "t",
        "mode": "online",
        "top_k": 32,
        "cache_builder": "transformers",
        "cache_dir": None,
        "batch_size": 64,
    }
    assert not any(tmp_path.iterdir())


def test_a_stage_dry_run_checks_what_it_reads_and_writes_nothing(
    tmp_path, quick_align, student_dir, sft_file
):
    runs = tmp_path / "runs"
    out = quick_align(
        "sft", f"model={student_dir}", f"data={sft_file}", f"runs_dir={runs}", "--dry-run"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:3] == [
        f"align sft: outputs under {runs}/sft/",
        f"      model    {student_dir}",
        f"      data     {sft_file}",
    ]
    missing = tmp_path / "no-such-data.jsonl"
    out = quick_align(
        "sft", f"model={student_dir}", f"data={missing}", f"runs_dir={runs}", "--dry-run"
    )
    assert out.returncode == 2
    assert f"key 'data': {missing} does not exist" in out.stderr
    # A filter's plug-in is imported and its name checked.
    out = quick_align(
        "filter", f"data={sft_file}", "filters=[{name: lenght}]", f"runs_dir={runs}", "--dry-run"
    )
    assert out.returncode == 2 and "unknown filter 'lenght'" in out.stderr, out.stderr
    assert not runs.exists(), "a dry run writes nothing"


def test_unknown_override_key_suggests_the_nearest(tmp_path, quick_align):
    out = quick_align("make-model", "presett=student", f"runs_dir={tmp_path}")
    assert out.returncode == 2
    assert "unknown key 'presett'" in out.stderr and "did you mean 'preset'" in out.stderr
    assert not any(tmp_path.iterdir()), "nothing may be written before the config is valid"


def test_print_config_shows_resolved_values_and_does_no_work(tmp_path, quick_align):
    out = quick_align(
        "eval",
        "--print-config",
        "model=m",
        "data=d",
        "engine.kv_cache_gib=0.5",
        f"runs_dir={tmp_path}",
    )
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    assert (
        config["engine"]["kv_cache_gib"] == 0.5 and config["pass_k"] == 4 and config["model"] == "m"
    )
    assert not any(tmp_path.iterdir())


def test_wrong_type_in_file_names_file_and_key(tmp_path, quick_align):
    config = tmp_path / "model.yaml"
    config.write_text("preset: student\nseed: abc\n")
    out = quick_align("make-model", "--config", str(config), f"runs_dir={tmp_path}")
    assert out.returncode == 2
    assert str(config) in out.stderr and "'seed'" in out.stderr and "int" in out.stderr


def test_impossible_value_is_refused(tmp_path, quick_align):
    out = quick_align("make-data", "heldout_fraction=1.5", f"runs_dir={tmp_path}")
    assert out.returncode == 2 and "heldout_fraction" in out.stderr


def test_make_model_writes_a_checkpoint_and_resolved_config(tmp_path, quick_align):
    config = tmp_path / "model.yaml"
    config.write_text("preset: student\nseed: 3\n")
    out = quick_align("make-model", "--config", str(config), f"runs_dir={tmp_path}", "name=m")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert Path(result["checkpoint"]) == tmp_path / "m" / "model"
    assert (tmp_path / "m" / "model" / "model.safetensors").is_file()
    assert yaml.safe_load((tmp_path / "m" / "config.yaml").read_text())["seed"] == 3
    assert "student" in (tmp_path / "m" / "log.txt").read_text()
    metrics = json.loads((tmp_path / "m" / "metrics.jsonl").read_text())
    assert metrics["parameters/total"] == result["parameters"]["total"]
    assert list((tmp_path / "m" / "tb").glob("events.out.tfevents.*"))


def test_pipeline_checks_every_stage_before_running_the_first(tmp_path, quick_align):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        yaml.safe_dump(
            {
                "name": "p",
                "runs_dir": str(tmp_path / "runs"),
                "stages": [
                    {"name": "m", "command": "make-model", "config": {"preset": "student"}},
                    {
                        "name": "e",
                        "command": "eval",
                        "config": {"model": "{run}/m/model", "data": "x", "pass_kk": 2},
                    },
                ],
            }
        )
    )
    out = quick_align("run", str(pipeline))
    assert out.returncode == 2
    assert "stages[1] (e)" in out.stderr and "did you mean 'pass_k'" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_pipeline_checks_a_distill_stage_before_running(tmp_path, quick_align):
    pipeline = tmp_path / "p.yaml"
    stage = {
        "name": "d",
        "command": "distill",
        "config": {"student": "s", "data": "d", "teacher": {"model": "t", "mode": "offlin"}},
    }
    pipeline.write_text(yaml.safe_dump({"stages": [stage]}))
    out = quick_align("run", str(pipeline), f"runs_dir={tmp_path}")
    assert out.returncode == 2
    assert (
        "stages[0] (d)" in out.stderr and "teacher.mode" in out.stderr and "'offline'" in out.stderr
    )
    assert not (tmp_path / "runs").exists()


def test_bad_data_is_a_clear_error(tmp_path, quick_align):
    from align.modeling import build_model, write_checkpoint

    write_checkpoint(build_model("student", 0), tmp_path / "model")
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "Compute 1+1.", "answer": "2"}\n{"prompt": "Compute 2+2."}\n')
    out = quick_align("eval", f"model={tmp_path / 'model'}", f"data={data}", f"runs_dir={tmp_path}")
    assert out.returncode == 2
    assert "bad.jsonl" in out.stderr and "row 1" in out.stderr and "answer" in out.stderr


def test_overrides_may_follow_options(tmp_path, quick_align):
    default = Path(__file__).resolve().parents[1] / "pipelines" / "default.yaml"
    out = quick_align("run", str(default), "--dry-run", f"runs_dir={tmp_path}", "name=x")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"outputs under {tmp_path}/x/" in out.stdout
    out = quick_align("make-model", "--print-config", "preset=teacher", "--nonsense")
    assert out.returncode == 2 and "unrecognized arguments: --nonsense" in out.stderr
