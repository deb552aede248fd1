"""Checkpoints from elsewhere are data, never code; a resume never silently starts over."""

import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_overrides
from pretrain import checkpoint as ckpt
from pretrain.config import load_config
from pretrain.errors import UserError
from pretrain.train import train

PY = sys.executable


class Evil:
    """Unpickling this runs a shell command (creates ``marker``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def run_cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([PY, "-m", "pretrain", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def one_error_line(p, *needles):
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-3000:])
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("safety") / "run"
    train(load_config("tiny", tiny_overrides(tiny_dataset, run, **{"train.steps": 4, "checkpoint.every": 2})))
    return run


def copy_run(trained, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def resume_cfg(data, run, **extra):
    return load_config("tiny", tiny_overrides(data, run, **{"train.steps": 6, "checkpoint.every": 2,
                                                            "checkpoint.resume": "auto", **extra}))


def test_pickled_code_in_rng_file_is_refused_without_running(tiny_dataset, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"torch": Evil(marker)}, ckpt.latest_checkpoint(run) / "rng_rank0.pt")
    p = run_cli("train", "tiny", *tiny_overrides(tiny_dataset, run, **{"train.steps": 6,
                                                                      "checkpoint.resume": "auto"}))
    one_error_line(p, "rng_rank0.pt holds more than tensors", "step_4")
    assert not marker.exists()


def test_pickled_code_in_dcp_metadata_is_refused_without_running(trained, tmp_path):
    from pretrain.evaluate import load_for_inference

    run = copy_run(trained, tmp_path)
    marker = tmp_path / "pwned"
    (ckpt.latest_checkpoint(run) / ".metadata").write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(UserError, match=r"step_4: .metadata refers to posix.system, .*could run code"):
        load_for_inference(str(ckpt.latest_checkpoint(run)))
    assert not marker.exists()


def test_pickled_code_in_a_dcp_value_is_refused_without_running(tmp_path):
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    from pretrain.ckpt_safety import SafeLoadPlanner

    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(Evil(marker), buf)
    buf.seek(0)
    item = ReadItem(LoadItemType.BYTE_IO, MetadataIndex("optim.param_groups.0.lr"), [], MetadataIndex("x"),
                    [], [])
    planner = SafeLoadPlanner()
    planner.flatten_state_dict = False
    planner.state_dict = {}
    with pytest.raises(UserError, match="is not plain data"):
        planner.load_bytes(item, buf)
    assert not marker.exists()
    buf = io.BytesIO()
    torch.save({"lr": 0.1, "betas": (0.9, 0.95)}, buf)
    buf.seek(0)
    planner.load_bytes(item, buf)  # plain values still load
    assert planner.state_dict["optim.param_groups.0.lr"] == {"lr": 0.1, "betas": (0.9, 0.95)}


def test_resume_auto_with_only_unreadable_checkpoints_is_an_error(tiny_dataset, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    for _, path in ckpt.list_checkpoints(run):
        (path / "meta.json").write_text("{garbled")
    with pytest.raises(UserError, match=r"none of the 2 checkpoints under .*checkpoints is readable "
                                        r"\(newest: checkpoint .*step_4: meta.json is unreadable\)"):
        train(resume_cfg(tiny_dataset, run))
    assert not (run / "checkpoints" / "step_6").exists()


def test_resume_auto_skips_an_unreadable_newest_and_logs_what_it_loaded(tiny_dataset, trained, tmp_path,
                                                                         capfd):
    run = copy_run(trained, tmp_path)
    (ckpt.latest_checkpoint(run) / ".metadata").write_bytes(b"\x80\x04truncated")
    summary = train(resume_cfg(tiny_dataset, run))
    err = capfd.readouterr().err
    assert "skipped unreadable newer checkpoints: checkpoint" in err and "step_4: .metadata is unreadable" in err
    assert f"resumed from {run / 'checkpoints' / 'step_2'}: continuing at step 3" in err
    assert summary["steps"] == 6


def test_init_from_that_does_not_exist_is_an_error(tiny_dataset, tmp_path):
    cfg = load_config("tiny", tiny_overrides(tiny_dataset, tmp_path / "run",
                                             **{"checkpoint.init_from": str(tmp_path / "nope")}))
    with pytest.raises(UserError, match=r"checkpoint.init_from: .*nope"):
        train(cfg)
    assert not ckpt.list_checkpoints(tmp_path / "run")


def test_checkpoint_of_another_shape_names_the_mismatch(tiny_dataset, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    with pytest.raises(UserError, match=r"step_4 does not fit this model: layers.0.mixer.wk.weight is \[32, 64\] "
                                        r"in the checkpoint, \[48, 96\] in this model \(model.d_model=64 in the "
                                        r"checkpoint, 96 here\)"):
        train(resume_cfg(tiny_dataset, run, **{"model.d_model": 96}))
    with pytest.raises(UserError, match=r"model.n_layers=2 in the checkpoint, 3 here"):
        train(load_config("tiny", tiny_overrides(tiny_dataset, tmp_path / "r2", **{
            "model.n_layers": 3, "checkpoint.init_from": str(ckpt.latest_checkpoint(run))})))


@pytest.mark.parametrize("overrides,needle", [
    (["--parallel.straggler_ratio=1"], "parallel.straggler_ratio: .* expected a finite number > 1"),
    (["--parallel.straggler_ratio=inf"], "parallel.straggler_ratio"),
    (["--parallel.straggler_ratio=nan"], "parallel.straggler_ratio"),
    (["--checkpoint.hf_every=-1"], "checkpoint.hf_every: -1 is not allowed; expected an integer >= 0"),
    (["--checkpoint.async=true", "--parallel.dp_engine=deepspeed"], "checkpoint.async: not supported"),
    (["--checkpoint.async=yes"], "checkpoint.async: expected true or false"),
])
def test_new_keys_are_validated(overrides, needle):
    with pytest.raises(UserError, match=needle):
        load_config("tiny", overrides)


def test_async_key_is_spelled_as_in_the_docs():
    assert load_config("tiny", ["--checkpoint.async=true"]).checkpoint.async_ is True
    assert load_config("tiny", []).checkpoint.async_ is False
