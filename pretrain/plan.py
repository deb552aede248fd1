"""``pretrain plan CONFIG [--gpus N] [--gpu-type h100]``: predict per-rank memory and step time of
parallel layouts before spending GPU hours, and rank the layouts that fit.

The cost model lives in ``pretrain/planner/``; this module is the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from pretrain.cliargs import Parser, integer, name
from pretrain.errors import UserError

GIB = 2**30


def parser() -> Parser:
    p = Parser(
        prog="pretrain plan", description=__doc__.split("\n\n")[0],
        epilog="Extra --section.key=value arguments override the config, as for `pretrain train`.")
    p.add_argument("config", type=name(), help="YAML config or preset name")
    p.add_argument("--gpus", type=integer(ge=1), default=0,
                   help="world size (GPUs, or processes for cpu); default: the config's hardware.gpus")
    p.add_argument("--gpu-type", default=None, type=name(),
                   help="h100 | a100 | h200 | b200 | cpu; default: the config's hardware.gpu_type")
    p.add_argument("--nodes", type=integer(ge=0, note="0: 8 GPUs per node"), default=0,
                   help="nodes the GPUs spread over (default: 8 per node)")
    p.add_argument("--gpus-per-node", type=integer(ge=0), default=0)
    p.add_argument("--recipe", default="project", choices=("project", "megatron"),
                   help="storage/overlap model: this trainer (fp32 states) or Megatron-LM's")
    p.add_argument("--top", type=integer(ge=1), default=10, help="how many ranked layouts to print")
    p.add_argument("--dry-run", action="store_true",
                   help="build the configured layout on the meta device under a fake process "
                        "group and report exact per-rank parameter counts")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return p


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    return parser().parse_known_args(argv)


def _gpus_per_node(args) -> int:
    if args.gpus < 1:
        raise UserError(f"--gpus: must be >= 1, got {args.gpus}")
    if args.gpus_per_node:
        return args.gpus_per_node
    if args.nodes:
        if args.gpus % args.nodes:
            raise UserError(f"--nodes: {args.nodes} nodes do not split {args.gpus} GPUs evenly")
        return args.gpus // args.nodes
    return args.gpus if args.gpu_type == "cpu" else min(8, args.gpus)


def main(argv: list[str] | None = None) -> int:
    from pretrain.config import load_config
    from pretrain.planner import hardware as hw
    from pretrain.planner.layout import config_layout, megatron_recipe, project_recipe, workload
    from pretrain.planner.search import evaluate, rank

    args, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
    bad = [o for o in overrides if not o.startswith("--")]
    if bad:
        raise UserError(f"unexpected argument '{bad[0]}'")
    cfg = load_config(args.config, overrides)
    # a preset names what it is sized for (its `hardware:` section); the flags override it
    args.gpus = args.gpus or cfg.hardware.gpus
    args.gpu_type = args.gpu_type or cfg.hardware.gpu_type
    if not args.gpus:
        raise UserError(f"--gpus: required ({args.config} names no hardware.gpus)")
    gpn = _gpus_per_node(args)
    dev = hw.get_device(args.gpu_type, gpn)
    recipe = project_recipe(cfg) if args.recipe == "project" else megatron_recipe()
    if args.gpu_type == "cpu":  # CPU runs use the pure-torch reference kernels
        from dataclasses import replace

        recipe = replace(recipe, reference_kernels=True)
    wl = workload(cfg)
    if args.dry_run:
        return _dry_run(cfg, args, recipe)
    try:
        mine = evaluate(cfg.model, config_layout(cfg, args.gpus), wl, dev, recipe, cfg)
    except UserError as e:  # the configured layout does not match the world size
        mine = None
        mine_error = str(e)
    plans = rank(cfg.model, args.gpus, wl, dev, recipe, base=cfg)
    if args.json:
        print(json.dumps({"configured": _plan_json(mine) if mine else None,
                          "ranked": [_plan_json(p) for p in plans if p.fits][:args.top]}, indent=1))
        return 0
    print(_header(cfg, args, dev, recipe, wl))
    if mine is None:
        print(f"configured layout: {mine_error}")
    else:
        print(f"configured layout: {mine.layout.name}\n  {_describe(mine, dev)}")
    fit = [p for p in plans if p.fits]
    refused = sum(1 for p in plans if p.unsupported)
    print(f"\n{len(fit)} of {len(plans)} candidate layouts fit ({len(plans) - len(fit) - refused} "
          f"do not fit in memory, {refused} refused by the trainer's layout check); fastest first:")
    print(_table(fit[:args.top], dev))
    if fit:
        print(f"\nfastest runnable: pretrain train {args.config} "
              f"{' '.join(fit[0].layout.overrides(wl.micro_batches(fit[0].layout)))}")
    return 0


def _header(cfg, args, dev, recipe, wl) -> str:
    from pretrain.flops import train_flops_per_token
    from pretrain.planner.model_stats import active_params, total_params

    total, active = total_params(cfg.model), active_params(cfg.model)
    nodes = max(1, math.ceil(args.gpus / dev.gpus_per_node))
    return (f"model: {_count(total)} parameters ({_count(active)} active), {cfg.model.n_sublayers} "
            f"sublayers, {train_flops_per_token(cfg.model, wl.seq_len):.3g} training FLOPs/token\n"
            f"{_kv_cache_line(cfg.model)}\n"
            f"batch: {wl.global_batch} x {wl.seq_len} tokens per step\n"
            f"hardware: {args.gpus} x {dev.name} ({dev.gpus_per_node} per node, {nodes} node(s)), "
            f"{dev.usable_bytes / GIB:.1f} GiB usable each, peak {dev.peak_flops / 1e12:.3g} TFLOP/s; "
            f"recipe: {recipe.name}")


def _kv_cache_line(mc) -> str:
    from models.mla import kv_cache_bytes_per_token

    kind = "MLA latent + rope key" if mc.attention == "mla" else f"K and V of {mc.n_kv_heads_resolved} KV heads"
    return (f"kv cache: {kv_cache_bytes_per_token(mc):,} bytes/token in bf16 over all layers "
            f"({kind} per attention layer)")


def _count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _describe(plan, dev) -> str:
    if plan.estimate is None:
        return f"cannot be used: {plan.problem}"
    worst = max(plan.memory, key=lambda b: b.total)
    mem = ", ".join(f"{k} {v / GIB:.2f}" for k, v in worst.parts.items() if v)
    e = plan.estimate
    status = "fits" if plan.fits else f"does NOT fit ({plan.problem})"
    lines = [f"{status}; peak {plan.peak_bytes / GIB:.2f} GiB per rank ({mem} GiB)",
             f"step {e.step_s:.3g} s, {e.tokens_per_s:,.0f} tokens/s, MFU {e.mfu:.1%}; time: "
             + ", ".join(f"{k} {v:.3g}s" for k, v in e.parts.items() if v)]
    lines += plan.notes
    return "\n  ".join(lines)


def _table(plans, dev) -> str:
    head = f"{'#':>3}  {'layout':<40} {'peak GiB':>8} {'state':>7} {'activ':>7} {'step s':>8} " \
           f"{'tokens/s':>11} {'MFU':>6}"
    rows = [head]
    for i, p in enumerate(plans, 1):
        worst = max(p.memory, key=lambda b: b.total)
        act = worst.parts.get("activations", 0) + worst.parts.get("logits", 0)
        rows.append(f"{i:>3}  {p.layout.name:<40} {p.peak_bytes / GIB:>8.2f} {p.state_bytes / GIB:>7.2f} "
                    f"{act / GIB:>7.2f} {p.estimate.step_s:>8.3g} {p.estimate.tokens_per_s:>11,.0f} "
                    f"{p.estimate.mfu:>6.1%}")
    return "\n".join(rows)


def _plan_json(p) -> dict:
    return {"layout": p.layout.name, "overrides": p.layout.overrides(p.n_micro), "fits": p.fits,
            "problem": p.problem, "unsupported": p.unsupported,
            "peak_bytes": p.peak_bytes, "state_bytes": p.state_bytes,
            "memory": [b.parts for b in p.memory],
            "step_s": p.estimate.step_s if p.estimate else None,
            "tokens_per_s": p.estimate.tokens_per_s if p.estimate else None,
            "mfu": p.estimate.mfu if p.estimate else None,
            "time": p.estimate.parts if p.estimate else None}


def _dry_run(cfg, args, recipe) -> int:
    from pretrain.planner.dryrun import dry_run
    from pretrain.planner.layout import config_layout
    from pretrain.planner.memory import local_param_counts

    exact = dry_run(cfg, args.gpus)
    layout = config_layout(cfg, args.gpus)
    predicted = local_param_counts(cfg.model, layout)
    rows = []
    for r, p in zip(exact, predicted):
        rows.append({"pp_rank": r["pp_rank"], "stages": r["stages"], "params": r["params"],
                     "predicted": p["sharded"], "param_bytes": r["params"] * recipe.param_bytes})
    if args.json:
        print(json.dumps({"layout": layout.name, "world_size": args.gpus, "ranks": rows}, indent=1))
        return 0
    print(f"dry run: {layout.name} on {args.gpus} ranks (meta device, fake process group); "
          f"parameters per rank (tp rank 0, dp rank 0):")
    print(f"  {_kv_cache_line(cfg.model)}")
    for row in rows:
        same = "matches the planner" if row["params"] == row["predicted"] else \
            f"planner predicted {row['predicted']:,}"
        print(f"  pp rank {row['pp_rank']} (stages {row['stages']}): {row['params']:,} parameters, "
              f"{row['param_bytes'] / GIB:.3f} GiB as {recipe.name} stores them; {same}")
    return 0
