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
