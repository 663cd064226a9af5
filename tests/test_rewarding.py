"""Reward sets: weighted combination, fault isolation, the registry and user plug-ins."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import time

import pytest

from align.config import ConfigError, from_dict
from align.registry import Registry, RegistryError
from align.rewarding import (
    REWARDS,
    Failed,
    RewardFunction,
    RewardSet,
    RewardSpec,
    build_reward_set,
)

PROMPTS = ["p0", "p1", "p2"]
COMPLETIONS = ["a", "bb", "ccc"]


def constant(value):
    return lambda prompts, completions, **_: [value] * len(completions)


def test_weighted_sum_and_per_reward_values():
    """total_i = 2 * len_i + (-1) * [i != 1 else None -> skipped].

    Row 0: 2*1 + -1*1 = 1; row 1: 2*2 (second reward not applicable) = 4; row 2: 2*3 - 1 = 5.
    """
    length = RewardFunction("length", lambda p, c, **_: [len(x) for x in c], weight=2.0)
    partial = RewardFunction("partial", lambda p, c, **_: [1.0, None, 1.0], weight=-1.0)
    batch = RewardSet([length, partial])(PROMPTS, COMPLETIONS)
    assert batch.totals == [1.0, 4.0, 5.0]
    assert batch.values == {"length": [1.0, 2.0, 3.0], "partial": [1.0, None, 1.0]}
    assert batch.metrics["reward/length/mean"] == 2.0
    assert batch.metrics["reward/partial/applicable"] == pytest.approx(2 / 3)
    assert batch.metrics["reward/partial/not_applicable"] == 1.0
    assert batch.metrics["reward/total/mean"] == pytest.approx(10 / 3)
    assert batch.metrics["reward/unscored"] == 0.0


def test_columns_and_options_reach_the_function():
    seen = {}

    def spy(prompts, completions, answer, bonus=0.0, **rest):
        seen.update(answer=answer, bonus=bonus, rest=sorted(rest))
        return [float(c == a) + bonus for c, a in zip(completions, answer, strict=True)]

    reward = RewardFunction("spy", spy, options={"bonus": 0.5})
    batch = RewardSet([reward])(
        PROMPTS, COMPLETIONS, {"answer": ["a", "x", "ccc"], "level": [1, 2, 3]}
    )
    assert batch.totals == [1.5, 0.5, 1.5]
    assert seen == {"answer": ["a", "x", "ccc"], "bonus": 0.5, "rest": ["level"]}


def test_no_applicable_reward_leaves_row_unscored():
    batch = RewardSet([RewardFunction("none", constant(None))])(PROMPTS, COMPLETIONS)
    assert batch.totals == [None, None, None]
    assert batch.metrics["reward/unscored"] == 3.0
    assert "reward/total/mean" not in batch.metrics


def _raises(prompts, completions, **_):
    raise RuntimeError("boom")


def _exits(prompts, completions, **_):
    sys.exit(3)


@pytest.mark.fault
@pytest.mark.parametrize(
    ("fn", "kind"),
    [
        (_raises, "errors"),
        (_exits, "errors"),
        (lambda p, c, **_: [1.0], "wrong_length"),
        (lambda p, c, **_: 7, "wrong_length"),
    ],
    ids=["exception", "sys.exit", "short list", "not a list"],
)
def test_whole_call_faults_are_isolated_and_counted(fn, kind, caplog):
    good = RewardFunction("good", constant(1.0))
    bad = RewardFunction("bad", fn)
    rewards = RewardSet([good, bad])
    batch = rewards(PROMPTS, COMPLETIONS)
    # Never a silent 0: the rows the faulty reward should have scored stay unscored.
    assert batch.totals == [None, None, None]
    assert batch.values["good"] == [1.0, 1.0, 1.0]
    assert batch.values["bad"] == [None, None, None]
    assert batch.metrics[f"reward/bad/{kind}"] == 3.0
    assert rewards.faults == {f"bad/{kind}": 3}
    assert "reward 'bad' failed" in caplog.text


@pytest.mark.fault
def test_per_row_faults_leave_only_those_rows_unscored():
    bad = RewardFunction("bad", lambda p, c, **_: [math.nan, Failed("sandbox down"), "1"])
    rows = ["a", "b", "c", "d"]

    def fine(p, c, **_):
        return [0.5] * len(c)

    mixed = RewardFunction("mixed", lambda p, c, **_: [math.inf, 2.0, True, 1])
    batch = RewardSet([RewardFunction("fine", fine), mixed])(rows, rows)
    assert batch.totals == [None, 2.5, None, 1.5]
    assert batch.metrics["reward/mixed/nonfinite"] == 1.0
    assert batch.metrics["reward/mixed/bad_values"] == 1.0

    batch = RewardSet([bad])(PROMPTS, COMPLETIONS)
    assert batch.totals == [None, None, None]
    assert batch.metrics["reward/bad/nonfinite"] == 1.0
    assert batch.metrics["reward/bad/errors"] == 1.0
    assert batch.metrics["reward/bad/bad_values"] == 1.0


@pytest.mark.fault
def test_hanging_reward_times_out_and_the_run_goes_on():
    def hangs(prompts, completions, **_):
        time.sleep(30)
        return [1.0] * len(completions)

    rewards = RewardSet(
        [RewardFunction("hangs", hangs, timeout_s=0.5), RewardFunction("ok", constant(1.0))]
    )
    started = time.perf_counter()
    batch = rewards(PROMPTS, COMPLETIONS)
    assert time.perf_counter() - started < 5
    assert batch.totals == [None, None, None]
    assert batch.metrics["reward/hangs/timeouts"] == 3.0
    # The set stays usable: the next batch is scored by the healthy reward as before.
    assert RewardSet([RewardFunction("ok", constant(1.0))])(PROMPTS, COMPLETIONS).totals == [
        1.0,
        1.0,
        1.0,
    ]


def test_bad_batches_are_caller_errors():
    rewards = RewardSet([RewardFunction("ok", constant(1.0))])
    with pytest.raises(ValueError, match="2 prompts for 3 completions"):
        rewards(PROMPTS[:2], COMPLETIONS)
    with pytest.raises(ValueError, match="column 'answer' has 1 values"):
        rewards(PROMPTS, COMPLETIONS, {"answer": ["x"]})
    with pytest.raises(ValueError, match="may not be named 'completions'"):
        rewards(PROMPTS, COMPLETIONS, {"completions": COMPLETIONS})


def test_registry_refuses_duplicates_and_unknown_names_listing_known():
    registry: Registry = Registry("reward")
    registry.register("exact")(constant(1.0))
    with pytest.raises(RegistryError, match="already registered; known rewards: exact"):
        registry.register("exact")(constant(0.0))
    with pytest.raises(RegistryError, match="Did you mean 'exact'.*Known rewards: exact"):
        registry.get("exakt")
    with pytest.raises(RegistryError, match="unknown reward 'answer_mach'.*'answer_match'"):
        build_reward_set([RewardSpec(name="answer_mach")])


def test_reward_set_refuses_listing_a_reward_twice():
    with pytest.raises(RegistryError, match="listed more than once: answer_match"):
        build_reward_set([RewardSpec(name="answer_match"), RewardSpec(name="answer_match")])


def test_options_are_checked_against_the_signature():
    with pytest.raises(RegistryError, match="no option.*max_len.*its options: .*max_length"):
        build_reward_set([RewardSpec(name="overlong", options={"max_len": 3})])
    with pytest.raises(RegistryError, match="'overlong' needs option.*cache_length"):
        build_reward_set([RewardSpec(name="overlong", options={"max_length": 3})])
    with pytest.raises(RegistryError, match="'reward_model' needs option.*model"):
        build_reward_set([RewardSpec(name="reward_model")])
    with pytest.raises(ConfigError, match="'weight' in rewards: must be finite"):
        from_dict(RewardSpec, {"name": "x", "weight": math.inf}, source="rewards")


def test_user_plugin_from_a_module_outside_the_repo(tmp_path, monkeypatch):
    plugin_dir = tmp_path / "outside"
    plugin_dir.mkdir()
    (plugin_dir / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            def brevity(prompts, completions, limit=2, **columns):
                return [1.0 if len(c) <= limit else 0.0 for c in completions]
            """
        )
    )
    monkeypatch.syspath_prepend(str(plugin_dir))
    rewards = build_reward_set(
        [
            RewardSpec(name="my_rewards:brevity", weight=2.0, options={"limit": 1}),
            RewardSpec(name="answer_format"),
        ]
    )
    batch = rewards(PROMPTS, ["a", "<answer>b</answer>", "ccc"])
    # brevity: 1, 0, 0 (x2); format: 0, 1, 0.
    assert batch.totals == [2.0, 1.0, 0.0]
    assert batch.values["my_rewards:brevity"] == [1.0, 0.0, 0.0]
    assert "my_rewards:brevity" not in REWARDS.names()


def test_an_installed_distribution_offers_its_reward_by_name(tmp_path, monkeypatch):
    """A plug-in package declaring an entry point in group `moealign.rewards`, installed with
    pip (into a directory on the path), is named in YAML like a built-in."""
    source = tmp_path / "source"
    (source / "shouting").mkdir(parents=True)
    (source / "shouting" / "__init__.py").write_text(
        "def loud(prompts, completions, **columns):\n"
        "    return [float(c.isupper()) for c in completions]\n"
    )
    (source / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "shouting"
            version = "0.1"

            [project.entry-points."moealign.rewards"]
            loud = "shouting:loud"
            """
        )
    )
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
    subprocess.run(
        [*pip, "--no-build-isolation", "--target", str(site), str(source)],
        check=True,
        capture_output=True,
    )
    assert "loud" not in REWARDS.names()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(REWARDS, "_items", {})  # nothing looked up earlier is remembered
    assert "loud" in REWARDS.names() and "answer_match" in REWARDS.names()
    rewards = build_reward_set([RewardSpec(name="loud"), RewardSpec(name="answer_format")])
    assert rewards(PROMPTS, ["A", "b", "<answer>C</answer>"]).values["loud"] == [1.0, 0.0, 0.0]
    with pytest.raises(RegistryError, match="unknown reward 'lound'. Did you mean 'loud'"):
        build_reward_set([RewardSpec(name="lound")])


def test_the_core_imports_no_plug_in_package_until_one_is_named():
    """`import align` and building a config import neither `rewards` nor `filters` (nor
    `pipelines`, vLLM or Ray); naming a reward imports its module only."""
    code = (
        "import sys, align, align.rewarding, align.pruning, align.config\n"
        "heavy = ('rewards', 'filters', 'pipelines', 'vllm', 'ray')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "from align.rewarding import REWARDS\n"
        "REWARDS.get('overlong')\n"
        "print(sorted(m for m in sys.modules if m.startswith(('rewards', 'filters'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["[]", "['rewards', 'rewards.overlong']"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
        ("math:no_such_fn", "has no attribute 'no_such_fn'"),
        ("math:pi", "is not callable"),
        (":fn", "must look like 'package.module:function'"),
    ],
)
def test_bad_plugin_references_are_clear(name, message):
    with pytest.raises(RegistryError, match=message):
        build_reward_set([RewardSpec(name=name)])
