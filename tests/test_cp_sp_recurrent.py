"""Recurrent mixers under context parallelism through the trainer's path (``parallelize``):
sequence parallel + cp (the recurrent shard then sees the whole sequence length, not S/tp),
Gated DeltaNet hybrids, cp4 and the ``P`` mixer.

Same harness as tests/test_context_parallel.py (tests/cp_parity.py): seq 1024 on real text
with document masking, 10 steps, per-step loss, every step-1 gradient by name and the final
weights against one process. The noise floor here is one process that sums in another
order in *both* places a cp run does: attention in the ring's blocks and the recurrent
scan with another chunk size; tolerance max(1e-5, 10x floor) on loss, gradients and weights.
"""

from __future__ import annotations

import copy
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests"))
import cp_parity  # noqa: E402
from torchrun_jobs import job_result, run_jobs  # noqa: E402

TOL = 1e-5
CP2 = {"cp": 2, "dp_shard": 1}
SP = {**CP2, "tp": 2, "sequence_parallel": True}
JOBS = {4: [{"name": "cp2_tp2_sp_hybrid", "layout": SP, "model": "hybrid"},  # CI
            {"name": "cp2_tp2_sp_gdn", "layout": SP, "model": "gdn"}]}
# pytest -m parity (``P`` at cp2 alone is test_context_parallel's CI job cp2_heads)
PARITY_JOBS = {2: [{"name": "cp2_gdn", "layout": CP2, "model": "gdn"}],
               4: [{"name": "cp4_gdn", "layout": {"cp": 4, "dp_shard": 1}, "model": "gdn"},
                   {"name": "cp2_tp2_sp_heads", "layout": SP, "model": "heads"}]}
FLOOR_CHUNK = 20  # the recurrent scan's chunk size in the floor run (48 in the runs)


def _floor_model(name: str) -> str:
    """A copy of model ``name`` whose recurrent scan uses another chunk size."""
    key = f"{name}@chunk{FLOOR_CHUNK}"
    if key not in cp_parity.MODELS:
        kw = copy.deepcopy(cp_parity.MODELS[name])
        kw["gdn" if "gdn" in kw else "mamba"]["chunk_size"] = FLOOR_CHUNK
        cp_parity.MODELS[key] = kw
    return key


@pytest.fixture(scope="module")
def work(tiny_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp_sp_rec")
    cp_parity.write_tokens(tiny_dataset, tmp / "tokens.pt")
    return tmp


def _launch(work, jobs: dict) -> tuple[dict, dict]:
    """One-process references and floors of the models ``jobs`` use, then the torchrun runs."""
    import torch

    torch.set_num_threads(1)
    data = torch.load(work / "tokens.pt")
    refs, floors = {}, {}
    for m in sorted({j["model"] for js in jobs.values() for j in js}):
        refs[m] = cp_parity.train(data, {}, m, cp_parity.STEPS)
        floors[m] = cp_parity.compare(cp_parity.train(data, {}, _floor_model(m), cp_parity.STEPS, floor=True), refs[m])
    torch.save(refs, work / "ref.pt")
    out = {}
    for n, js in jobs.items():
        spec = [{"kind": "train", "tokens": str(work / "tokens.pt"), "ref": str(work / "ref.pt"),
                 "steps": cp_parity.STEPS, **j} for j in js]
        out.update(run_jobs("test_cp_worker.py", n, spec, work, timeout=1500))
    return out, floors


@pytest.fixture(scope="module")
def results(work):
    return _launch(work, JOBS)


@pytest.fixture(scope="module")
def parity_results(work):
    return _launch(work, PARITY_JOBS)


def _check(res: dict, floor: dict, name: str) -> None:
    tol = {k: max(TOL, 10 * floor[k]) for k in ("loss_diff", "grads_rel", "weights_diff")}
    print(f"{name}: loss {res['loss_diff']:.2e} (floor {floor['loss_diff']:.2e}), grads rel "
          f"{res['grads_rel']:.2e} (floor {floor['grads_rel']:.2e}), weights {res['weights_diff']:.2e} "
          f"(floor {floor['weights_diff']:.2e})")
    assert len(res["loss"]) == cp_parity.STEPS and len(res["names"]) > 10
    assert res["loss"][-1] < res["loss"][0] - 0.5, res["loss"]  # it learns the text
    for key, t in tol.items():
        assert res[key] <= t, (name, key, res[key], t)


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", [j["name"] for js in JOBS.values() for j in js])
def test_sp_cp_recurrent_matches_one_process(results, name):
    res, floors = results
    model = next(j["model"] for js in JOBS.values() for j in js if j["name"] == name)
    _check(job_result(res, name), floors[model], name)


@pytest.mark.parity
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", [j["name"] for js in PARITY_JOBS.values() for j in js])
def test_more_recurrent_cp_layouts_match_one_process(parity_results, name):
    res, floors = parity_results
    model = next(j["model"] for js in PARITY_JOBS.values() for j in js if j["name"] == name)
    _check(job_result(res, name), floors[model], name)
