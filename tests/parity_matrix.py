"""The layout matrix of the parity harness, generated (not hand-listed).

Elements, each of size 2: ``dp_shard``, ``dp_replicate``, ``tp`` (with and without sequence
parallel), ``pp`` (each schedule) and ``ep`` (carved out of ``dp_shard``, so it doubles it).
:func:`all_jobs` is every element alone (2 ranks), every pair of elements of different
dimensions (4 ranks) and a set of 3-D/4-D combinations (8 ranks), for each architecture
family of ``parity.FAMILIES`` (``ep`` only for MoE families: it shards experts), plus the
named variants (:data:`EXTRAS`) and cp2 alone and with each element (:func:`cp_jobs`,
``make parity`` only). Layouts the trainer cannot run carry the message it must
refuse them with (:func:`expected_refusal`). :func:`ci_jobs` is the subset CI runs: every
element and every pair once (families in rotation) and every family, plus the extras.
"""

from __future__ import annotations

from itertools import combinations

ELEMENTS = {  # name -> (dimension, layout keys)
    "dp_shard": ("dp_shard", {"dp_shard": 2}),
    "dp_replicate": ("dp_replicate", {"dp_replicate": 2}),
    "tp": ("tp", {"tp": 2}),
    "tp_sp": ("tp", {"tp": 2, "sequence_parallel": True}),
    "pp_gpipe": ("pp", {"pp": 2, "pp_schedule": "gpipe"}),
    "pp_1f1b": ("pp", {"pp": 2, "pp_schedule": "1f1b"}),
    "pp_interleaved": ("pp", {"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 2}),
    "pp_zbv": ("pp", {"pp": 2, "pp_schedule": "zbv"}),
    "ep": ("ep", {"ep": 2}),
}
# 3-D / 4-D combinations at 8 ranks (ep borrows from dp_shard: no rank of its own)
WIDE = [("dp_shard", "tp_sp", "pp_1f1b"), ("dp_replicate", "dp_shard", "tp"),
        ("dp_replicate", "tp_sp", "pp_interleaved"), ("dp_shard", "tp", "pp_gpipe")]
WIDE_MOE = [("dp_shard", "ep", "pp_1f1b"), ("dp_replicate", "ep", "pp_interleaved"), ("dp_replicate", "ep", "tp_sp"),
            ("dp_shard", "ep", "tp")]
MOE_FAMILIES = ("moe", "deepseek")
FAMILY_ORDER = ("dense", "mamba", "heads", "moe", "ladder")

# Named variants kept from the earlier per-file tests: options that must not change the
# numbers (activation checkpointing, compile), other losses, other model shapes.
TP2 = {"tp": 2, "dp_shard": 1}
SP = {**TP2, "sequence_parallel": True}
EP2 = {"dp_shard": 2, "ep": 2}
EXTRAS = [
    {"name": "dense_tp2_sp_fused_zloss", "layout": SP, "kw": {"fused_loss": True, "z_loss": 0.01}},
    {"name": "dense_tp2_sp_dp_shard2_ac", "layout": {**SP, "dp_shard": 2}, "kw": {"ac": "full"}},
    {"name": "dense_tp4_replicated_kv", "layout": {"tp": 4, "dp_shard": 1}},
    {"name": "ladder_tp2_ac", "family": "ladder", "layout": TP2, "kw": {"ac": "full"}},
    {"name": "ladder_tp2_compile", "family": "ladder", "layout": TP2, "kw": {"compile": True}},
    {"ci": False, "name": "ladder_from1_pp2", "family": "ladder", "model": {"ladder_from": 1}, "layout": {"pp": 2, "dp_shard": 1}},
    {"name": "ladder_from2_tp2", "family": "ladder", "model": {"ladder_from": 2}, "layout": TP2},
    {"name": "ladder_moe_tp2_sp", "family": "moe", "model": {"residual": "ladder"}, "layout": SP},
    {"name": "mamba_ladder_tp2_sp", "family": "mamba", "model": {"residual": "ladder"}, "layout": SP},
    {"name": "heads_ladder_tp2", "family": "heads", "model": {"residual": "ladder"}, "layout": TP2},
    {"name": "gdn_ladder_tp2_sp", "family": "gdn", "model": {"residual": "ladder"}, "layout": SP},
    {"name": "gdn_dp_shard2_pp2", "family": "gdn", "layout": {"dp_shard": 2, "pp": 2}},
    {"name": "moe_ep2_edp2_micro1", "family": "moe", "layout": {"dp_shard": 4, "ep": 2}, "micro": 1},
    {"ci": False, "name": "deepseek_ep2", "family": "deepseek", "layout": EP2},
    {"name": "deepseek_ep2_tp2_sp", "family": "deepseek", "layout": {**EP2, **SP, "dp_shard": 2}},
    {"name": "deepseek_ep2_pp2", "family": "deepseek", "layout": {**EP2, "pp": 2}},
    # bf16 compute against the fp32 reference (tests/test_parity.py: bf16 tolerances)
    {"name": "dense_dp_shard2_bf16", "layout": {"dp_shard": 2, "mixed_precision": "bf16"}, "probe_reduce": True},
    {"name": "dense_dp_replicate2_bf16", "layout": {"dp_replicate": 2, "mixed_precision": "bf16"},
     "probe_reduce": True},
    {"name": "moe_ep2_bf16", "family": "moe", "layout": {**EP2, "mixed_precision": "bf16"}, "probe_reduce": True},
    # multi-head latent attention (heads split over tp, latents replicated) and the
    # standard attention's options (gate split with its head, qk_norm replicated)
    {"ci": False, "name": "mla_tp2", "family": "mla", "layout": TP2},
    {"name": "mla_tp2_sp_dp_shard2", "family": "mla", "layout": {**SP, "dp_shard": 2}},
    {"name": "mla_pp2", "family": "mla", "layout": {"pp": 2, "dp_shard": 1}},
    {"ci": False, "name": "mla_ladder_tp2", "family": "mla", "model": {"residual": "ladder"}, "layout": TP2},
    {"name": "attn_opts_tp2_sp", "family": "attn_opts", "layout": SP},
    # Qwen3-Next shape (G + gated attention + MoE with a gated shared expert): experts over ep,
    # heads over tp
    {"ci": False, "name": "qwen3_next_ep2", "family": "qwen3_next", "layout": EP2},
    {"ci": False, "name": "qwen3_next_tp2_ep2", "family": "qwen3_next", "layout": {**EP2, **TP2, "dp_shard": 2}},
    {"ci": False, "name": "attn_opts_tp4_replicated_kv", "family": "attn_opts", "layout": {"tp": 4, "dp_shard": 1}},
]


# Multi-token prediction (family "mtp"): run by their own test (tests/test_parity.py, -k mtp),
# outside ci_jobs; the MTP modules' parameters are among the compared ones. (Also passed once,
# left out to keep CI short: dp_replicate=2, and ladder residual under pp=2.) The "ci": False
# ones (the other pipeline schedules, MoE under ep, ladder) run under `make parity`.
MTP_JOBS = [
    {"name": "mtp_tp2", "family": "mtp", "layout": TP2},
    {"name": "mtp_tp2_fused_zloss", "family": "mtp", "layout": TP2, "kw": {"fused_loss": True, "z_loss": 0.01}},
    {"name": "mtp_dp_shard2", "family": "mtp", "layout": {"dp_shard": 2}},
    {"name": "mtp_pp2_1f1b", "family": "mtp", "layout": {"pp": 2, "pp_schedule": "1f1b"}},
    {"name": "mtp_tp2_sp", "family": "mtp", "layout": SP,
     "refuse": "model.mtp_depth: not supported with parallel.sequence_parallel"},
    {"ci": False, "name": "mtp_pp2_interleaved", "family": "mtp",
     "layout": {"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 2}},
    {"ci": False, "name": "mtp_pp2_zbv", "family": "mtp", "layout": {"pp": 2, "pp_schedule": "zbv"}},
    {"ci": False, "name": "mtp_moe_ep2", "family": "mtp_moe", "layout": EP2},
    {"ci": False, "name": "mtp_ladder_tp2", "family": "mtp", "model": {"residual": "ladder"}, "layout": TP2},
]


def mtp_jobs(ci: bool = True) -> list[dict]:
    """The MTP jobs (``ci``: only those CI runs; the others, ``"ci": False``, run under
    ``make parity`` from tests/test_mtp.py: tens of seconds each, too slow for CI)."""
    return [{**j, "layout": {"dp_shard": 1, **j["layout"]}, "world": world_of({"dp_shard": 1, **j["layout"]})}
            for j in MTP_JOBS if not ci or j.get("ci", True)]


def layout_of(elements: tuple[str, ...]) -> dict:
    """The parallel config of a combination of elements (every dimension given explicitly)."""
    out = {"dp_shard": 1}
    for e in elements:
        for k, v in ELEMENTS[e][1].items():
            out[k] = out.get(k, 1) * v if k == "dp_shard" else v
    if "ep" in elements:
        out["dp_shard"] *= 2  # dp_shard = edp x ep
    return out


def world_of(layout: dict) -> int:
    return (layout.get("dp_replicate", 1) * layout["dp_shard"] * layout.get("tp", 1) * layout.get("pp", 1)
            * layout.get("cp", 1))


def expected_refusal(layout: dict, family: str = "dense") -> str | None:
    """The one line the trainer refuses ``layout`` with, or None if it runs: the trainer's
    own layout check (``parity.refusal``), not a copy of its rules."""
    import parity

    return parity.refusal({"family": family, "layout": layout}, world_of({"dp_shard": 1, **layout}))


def _job(family: str, elements: tuple[str, ...]) -> dict:
    layout = layout_of(elements)
    job = {"name": f"{family}__{'+'.join(elements)}", "family": family, "layout": layout,
           "world": world_of(layout)}
    refusal = expected_refusal(layout, family)
    if refusal:
        job["refuse"] = refusal
    return job


def combos(family: str) -> list[tuple[str, ...]]:
    names = [e for e in ELEMENTS if e != "ep" or family in MOE_FAMILIES]
    pairs = [c for c in combinations(names, 2) if ELEMENTS[c[0]][0] != ELEMENTS[c[1]][0]]
    wide = WIDE + (WIDE_MOE if family in MOE_FAMILIES else [])
    return [(e,) for e in names] + pairs + wide


def all_jobs() -> list[dict]:
    """The whole matrix (``make parity``): the DeepSeek-style MoE joins for layouts with ep."""
    jobs = [_job(f, c) for f in FAMILY_ORDER for c in combos(f)]
    jobs += [_job("deepseek", c) for c in combos("deepseek") if "ep" in c]
    return jobs + extras() + cp_jobs()


# Context parallelism (cp2, ring attention) alone and paired with every element, per family,
# at the harness's 128-token rows: ``make parity`` only ("ci": False; CI's cp coverage is
# tests/test_context_parallel.py at 1024 tokens). Kept out of ELEMENTS so that ci_jobs and
# its every-pair check stay as they are.
CP = {"cp": 2}


def cp_jobs() -> list[dict]:
    """``FAMILY__cp`` and ``FAMILY__cp+ELEMENT`` (ep ones for the MoE families), with the
    trainer's refusal where it gives one."""
    out = []
    for fam in FAMILY_ORDER + ("deepseek",):
        for c in [()] + [(e,) for e in ELEMENTS if e != "ep" or fam in MOE_FAMILIES]:
            if fam == "deepseek" and c != ("ep",):
                continue  # as in all_jobs: DeepSeek routing joins for ep
            layout = {**layout_of(c), **CP}
            job = {"ci": False, "name": f"{fam}__{'+'.join(('cp',) + c)}", "family": fam, "layout": layout,
                   "world": world_of(layout)}
            refusal = expected_refusal(layout, fam)
            out.append({**job, "refuse": refusal} if refusal else job)
    return out


def extras(ci: bool = False) -> list[dict]:
    """The named variants (``ci``: only those CI runs; the others repeat a CI job's layout
    and model up to one option)."""
    out = []
    for j in EXTRAS:
        if ci and not j.get("ci", True):
            continue
        layout = {"dp_shard": 1, **j["layout"]}
        job = {"family": "dense", **j, "layout": layout, "world": world_of(layout)}
        refusal = expected_refusal(layout, job["family"])
        out.append({**job, "refuse": refusal} if refusal else job)
    return out


def ci_jobs() -> list[dict]:
    """Every element and every pair once, families in rotation (ep ones over the MoE
    families), two 8-rank jobs (3-D dense, 4-D MoE), and the extras."""
    out, turn = [], {False: 0, True: 0}
    for c in combos("moe"):  # a MoE family has every element
        if len(c) == 3:
            continue
        fams = MOE_FAMILIES if "ep" in c else FAMILY_ORDER
        fam = fams[turn["ep" in c] % len(fams)]
        turn["ep" in c] += 1
        if expected_refusal(layout_of(c), fam) != expected_refusal(layout_of(c)):
            fam = fams[turn["ep" in c] % len(fams)]  # run it on a family that supports it
            turn["ep" in c] += 1
        out.append(_job(fam, c))
    out += [_job("dense", WIDE[0]), _job("moe", WIDE_MOE[0]), _job("moe", ("tp", "pp_1f1b"))]
    return out + extras(ci=True)
