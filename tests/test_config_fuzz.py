"""Property-based fuzz of every config key through ``pretrain train`` in-process.

For every leaf of the config tree (found by introspection, so new keys are covered without
editing this file): values its declaration refuses give exactly one ``error:`` line naming
the key, exit 2, no traceback and no file anywhere; values it allows are not refused by it
and reach the trainer unchanged. Training itself never starts (``train_main`` is replaced).
"""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, given, settings

import pretrain.train
from models.fields import check_fields
from pretrain.config import Config, apply_overrides, from_dict, load_yaml, resolve_config_path
from tests.config_fuzz_util import assert_one_error, invalid_texts, leaves, run_cli, tree, valid_values, _text

LEAVES = leaves()
FUZZ = settings(max_examples=8, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))


class _Reached(Exception):
    pass


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A temp cwd for every example; train_main records the config instead of training."""
    root = tmp_path_factory.mktemp("fuzz")
    cwd, old_cwd, old_main = root / "cwd", os.getcwd(), pretrain.train.train_main
    cwd.mkdir()
    seen = []
    pretrain.train.train_main = lambda cfg: seen.append(cfg) or 0
    os.chdir(cwd)
    t0 = time.perf_counter()
    yield root, seen
    os.chdir(old_cwd)
    pretrain.train.train_main = old_main
    print(f"\nconfig fuzz: {time.perf_counter() - t0:.1f}s for {len(LEAVES)} leaves")


def _argv(leaf, override: str, root) -> list[str]:
    argv = ["train", "tiny", override]
    if leaf.key != "logging.run_dir":
        argv.append(f"--logging.run_dir={root}/run")
    return argv


def test_every_key_is_enumerated():
    keys = {leaf.key for leaf in LEAVES}
    assert {"optim.lr", "logging.run_dir", "checkpoint.keep", "model.moe.top_k", "model.mamba.dt_limit",
            "parallel.timeout_s", "data.mixture"} <= keys
    assert len(LEAVES) > 90


@pytest.mark.timeout(300)
@pytest.mark.parametrize("leaf", LEAVES, ids=[f"{x.key}-{i}" for i, x in enumerate(LEAVES)])
def test_invalid_values_refused(leaf, sandbox):
    root, seen = sandbox

    @FUZZ
    @given(text=invalid_texts(leaf))
    def check(text):
        seen.clear()
        override = leaf.render(text)
        rc, _, err = run_cli(_argv(leaf, override, root))
        assert not seen, f"{override!r} was accepted"
        assert_one_error(rc, err, leaf.key, repr(override))
        assert tree(str(root)) == [str(root / "cwd")], f"{override!r} created files"

    check()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("leaf", LEAVES, ids=[f"{x.key}-{i}" for i, x in enumerate(LEAVES)])
def test_valid_values_not_refused(leaf, sandbox):
    root, seen = sandbox
    base = load_yaml(resolve_config_path("tiny"))

    @FUZZ
    @given(value=valid_values(leaf))
    def check(value):
        seen.clear()
        override = leaf.render(_text(leaf.kind, value))
        rc, _, err = run_cli(_argv(leaf, override, root))
        if rc == 0:
            got = leaf.get(seen[0])
            assert got == value or (got != got and value != value), f"{override!r} arrived as {got!r}"
        else:  # refused by a rule across fields: the field checks themselves must pass
            assert "Traceback" not in err and rc == 2, f"{override!r}: exit {rc}\n{err}"
            cfg = from_dict(Config, apply_overrides(dict(base, logging={"run_dir": "x"}), [override]))
            check_fields(cfg)
            assert leaf.get(cfg) == value
        assert tree(str(root)) == [str(root / "cwd")], f"{override!r} created files"

    check()
