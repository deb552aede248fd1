import json

import pytest

from pretrain.config import load_config
from pretrain.errors import UserError


def test_presets_load():
    cfg = load_config("tiny", ["--model.n_layers=3", "--train.steps=7", "--optim.lr=1e-2"])
    assert cfg.model.n_layers == 3 and cfg.train.steps == 7 and cfg.optim.lr == 0.01
    assert load_config("demo").model.d_model == 192


@pytest.mark.parametrize("override,needle", [
    ("--model.nlayers=3", "model.nlayers: unknown key"),
    ("--model.n_layers=three", "model.n_layers: expected an integer"),
    ("--model.n_heads=7", "model.n_heads: 7 heads do not divide d_model=64"),
    ("--model.n_kv_heads=3", "model.n_kv_heads"),
    ("--model.pattern=*-X", "model.pattern: unknown symbol"),
    ("--train.dtype=fp8", "train.dtype: 'fp8' is not one of"),
    ("--data.seq_len=1000", "data.seq_len: 1000 exceeds model.max_seq_len"),
    ("--parallel.tp=0", "parallel.tp"),
    ("--model.residual=zigzag", "model.residual"),
    ("--train.use_magic=true", "train.use_magic: unknown key"),
    ("model.n_layers", "expected --key.path=value"),
])
def test_bad_config_rejected(override, needle):
    with pytest.raises(UserError) as e:
        load_config("tiny", [override])
    assert needle in str(e.value)


def test_missing_config_file():
    with pytest.raises(UserError, match="config file not found"):
        load_config("/nonexistent/cfg.yaml")


def test_bad_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(p))


@pytest.mark.parametrize("override,needle", [
    # issue #21: NaN passed `value <= 0` and ended in a traceback from AdamW
    ("--optim.lr=nan", "optim.lr: nan is not allowed; expected a finite number > 0"),
    # issue #21: an empty run_dir trained into the current directory
    ("--logging.run_dir=", "logging.run_dir: '' is not allowed; expected a non-empty path"),
    ("--logging.run_dir=  ", "logging.run_dir: '  ' is not allowed"),
    # issue #21: -1 silently meant "keep all"
    ("--checkpoint.keep=-1", "checkpoint.keep: -1 is not allowed; expected an integer >= 0 (the newest N "
                             "checkpoints; 0: keep all)"),
    ("--optim.beta2=1.0", "optim.beta2: 1.0 is not allowed; expected a finite number >= 0 and < 1"),
    ("--train.steps=99999999999999999999", "train.steps: 99999999999999999999 is not allowed"),
    ("--model.n_layers=1000000000000", "model.n_layers: 1000000000000 is not allowed"),
    ("--parallel.dp_shard=0", "expected an integer >= 1 or -1 (-1: the rest of the world)"),
    ("--train.kernels=cuda", "train.kernels: 'cuda' is not one of auto, reference, triton, vendor"),
    ("--model.mamba.dt_limit=[0, nan]", "model.mamba.dt_limit[1]: nan is not allowed"),
    ("--data.mixture=[{path: ' ', weight: 1}]", "data.mixture[0].path: ' ' is not allowed"),
])
def test_declared_constraints(override, needle):
    with pytest.raises(UserError) as e:
        load_config("tiny", [override])
    assert needle in str(e.value)


def test_bad_run_dir_writes_nothing(tmp_path, monkeypatch, capsys):
    """Through the CLI: one error line, exit 2, and no file in the current directory."""
    from pretrain.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "tiny", "--logging.run_dir="]) == 2
    assert capsys.readouterr().err.startswith("error: logging.run_dir: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", ["0x10", "null", "a: b", "1_000", "[x]", "~"])
def test_string_override_taken_as_typed(text):
    assert load_config("tiny", [f"--logging.run_dir={text}"]).logging.run_dir == text


def test_checkpoint_keep_zero_keeps_all():
    assert load_config("tiny", ["--checkpoint.keep=0"]).checkpoint.keep == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("override,needle", [
    ("--data.path={tmp}/missing", "data.path: dataset directory not found"),
    ("--checkpoint.init_from={tmp}/missing", "checkpoint.init_from: no complete checkpoint"),
    ("--logging.run_dir={file}/run", "logging.run_dir: "),
])
def test_missing_inputs_leave_no_run_dir(tmp_path, override, needle):
    """Inputs are checked before the run directory (and its config.yaml) is created."""
    from pretrain.train import train

    (tmp_path / "file").write_text("x")
    (tmp_path / "data").mkdir()  # only meta.json is read before the run directory is made
    (tmp_path / "data" / "meta.json").write_text(json.dumps(
        {"vocab_size": 512, "eos_id": 2, "pad_id": 0, "sample_len": 33, "dtype": "uint16", "splits": {}}))
    ov = override.format(tmp=tmp_path, file=tmp_path / "file")
    with pytest.raises(UserError, match=needle):
        train(load_config("tiny", [f"--logging.run_dir={tmp_path}/run", f"--data.path={tmp_path}/data", ov]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "file"]
