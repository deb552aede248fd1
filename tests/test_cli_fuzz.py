"""Property-based fuzz of the options of ``pretrain data|export|eval|plan|launch`` in-process.

Every option and positional of each verb's parser is found by introspection; each must
declare its type with ``pretrain.cliargs`` (or choices / a flag), and bad values (wrong type,
out of range, NaN/inf, blank, NUL, missing input paths) give exactly one ``error:`` line
naming the option, exit 2, no traceback and no file created.
"""

from __future__ import annotations

import argparse
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.fields import Spec
from tests.config_fuzz_util import Leaf, assert_one_error, invalid_texts, run_cli, tree

FUZZ = settings(max_examples=8, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))
FLAGS = (argparse._StoreTrueAction, argparse._HelpAction, argparse._SubParsersAction)


def _parsers():
    """(argv prefix, parser, base arguments) for every verb and sub-command."""
    from launch.cli import parser as launch_parser
    from pretrain.data.cli import _parser as data_parser
    from pretrain.evaluate import eval_parser
    from pretrain.hf.export import parser as export_parser
    from pretrain.plan import parser as plan_parser

    def subs(p):
        return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices

    data, launch = subs(data_parser()), subs(launch_parser())
    return [
        (["data", "corpus"], data["corpus"], ["--out={tmp}/c.jsonl"]),
        (["data", "tokenizer"], data["tokenizer"], ["--input={file}", "--out={tmp}/tok"]),
        (["data", "prepare"], data["prepare"], ["--input={file}", "--out={tmp}/ds", "--tokenizer={file}"]),
        (["eval"], eval_parser(), ["--checkpoint={dir}"]),
        (["export"], export_parser(), ["--checkpoint={dir}", "--out={tmp}/hf"]),
        (["plan"], plan_parser(), ["tiny", "--gpus=1"]),
        (["launch", "local"], launch["local"], ["--dry-run", "tiny"]),
        (["launch", "slurm"], launch["slurm"], ["--nodes=1", "--dry-run", "tiny"]),
        (["launch", "deepspeed"], launch["deepspeed"], ["--hostfile={file}", "--dry-run", "tiny"]),
    ]


def _cases():
    out = []
    for prefix, parser, base in _parsers():
        for action in parser._actions:
            if isinstance(action, FLAGS):
                continue
            name = action.option_strings[-1] if action.option_strings else (action.metavar or action.dest)
            out.append(pytest.param(prefix, base, action, id=f"{' '.join(prefix)} {name}"))
    return out


def _strategy(action) -> st.SearchStrategy[str]:
    tp = action.type
    if action.choices is not None:
        return st.text(max_size=8).filter(lambda t: t not in action.choices and not t.startswith("-"))
    if isinstance(action, argparse._AppendAction):  # NAME=VALUE / raw sbatch options: checked by the launcher
        return st.sampled_from(["", "=", "1BAD=x", "A\x00=b"]) if action.dest == "env" else \
            st.sampled_from(["", " ", "--x\n--y", 'a"b'])
    assert getattr(tp, "kind", None), f"{action.option_strings or action.dest}: declare its type with pretrain.cliargs"
    leaf = Leaf(action.dest, tp.kind, tp.spec, str, None)
    bad = invalid_texts(leaf)
    if getattr(tp, "exists", False):
        bad = st.one_of(bad, st.just("{tmp}/missing"))
    if not action.option_strings:  # a positional cannot start with '-'
        bad = bad.filter(lambda t: not t.startswith("-"))
    return bad


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("clifuzz")
    (root / "cwd").mkdir()
    (root / "dir").mkdir()
    (root / "file.txt").write_text("hello\n")
    old = os.getcwd()
    os.chdir(root / "cwd")
    t0 = time.perf_counter()
    yield root
    os.chdir(old)
    print(f"\nverb fuzz: {time.perf_counter() - t0:.1f}s")


def _fill(text: str, root) -> str:
    return text.replace("{tmp}", str(root / "out")).replace("{file}", str(root / "file.txt")) \
        .replace("{dir}", str(root / "dir"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("prefix,base,action", _cases())
def test_bad_option_values_refused(prefix, base, action, sandbox):
    root = sandbox
    before = tree(str(root))
    flag = action.option_strings[-1] if action.option_strings else None
    needle = flag or action.metavar or action.dest

    @FUZZ
    @given(text=_strategy(action))
    def check(text):
        text = _fill(text, root)
        if flag:
            args = [a for a in base if not a.startswith(flag + "=")] + [f"{flag}={text}"]
        else:  # the positional (CONFIG) is the one base argument without a leading '-'
            args = [text if not a.startswith("-") else a for a in base]
        argv = prefix + [_fill(a, root) for a in args]
        rc, _, err = run_cli(argv)
        assert_one_error(rc, err, needle, repr(argv))
        assert tree(str(root)) == before, f"{argv!r} created files"

    check()


@pytest.mark.parametrize("argv,needle", [
    (["eval", "--checkpoint={dir}"], "checkpoint"),  # an existing directory that is no checkpoint
    (["eval", "--checkpoint={tmp}/missing"], "no complete checkpoint"),
    (["export", "--checkpoint={tmp}/missing", "--out={tmp}/hf"], "no complete checkpoint"),
    (["export", "--checkpoint={dir}", "--out={tmp}/hf"], "checkpoint"),
    (["export", "--checkpoint={dir}", "--out={tmp}/hf", "--max-shard-size=5XB"], "--max-shard-size"),
    (["data", "prepare", "--input={tmp}/none.jsonl", "--out={tmp}/ds", "--vocab-size=300"], "none.jsonl"),
    (["data", "prepare", "--input={file}", "--out={tmp}/ds", "--tokenizer={file}"], "sentencepiece"),
    (["data", "tokenizer", "--input={tmp}/none.jsonl", "--out={tmp}/tok"], "none.jsonl"),
    (["plan", "{tmp}/none.yaml", "--gpus=1"], "none.yaml"),
    (["launch", "local", "--dry-run", "{tmp}/none.yaml"], "none.yaml"),
    (["plan", "tiny", "--gpus=1", "--optim.lr=nan"], "optim.lr"),
    (["launch", "local", "--dry-run", "tiny", "--logging.run_dir= "], "logging.run_dir"),
])
def test_bad_inputs_after_parsing(argv, needle, sandbox):
    """Values that parse but name nothing usable: still one line, exit 2, nothing written."""
    root = sandbox
    before = tree(str(root))
    rc, _, err = run_cli([_fill(a, root) for a in argv])
    assert_one_error(rc, err, needle, repr(argv))
    assert tree(str(root)) == before


def test_bad_value_message_names_the_option(sandbox):
    rc, _, err = run_cli(["data", "prepare", "--input=x", "--out=y", "--vocab-size=512", "--val-fraction=nan"])
    assert err.strip() == ("error: pretrain data prepare: argument --val-fraction: nan is not allowed; "
                           "expected a finite number >= 0 and < 1 (0: none held out)")
    assert Spec(ge=0).describe("int") == "an integer >= 0"
