"""``pretrain scale-test SWEEP.yaml``: run a grid of model sizes, architectures, parallel
layouts and token budgets, then write a report (``pretrain/report.py``).

A sweep file::

    base: tiny                      # config every point starts from (preset or path)
    overrides: {train.steps: 40}    # applied to every point
    out: runs/sweeps/my_sweep       # default: runs/sweeps/<file name>
    axes:                           # the cartesian product of the axes is the grid
      size:                         # a width/depth/heads scaling rule
        rule: {width: [64, 128], aspect: 32, head_dim: 16, kv_ratio: 2, min_layers: 2}
      arch:                         # named points: dotted overrides
        dense: {model.pattern: "*-"}
        moe: {model.pattern: "*E", model.moe.n_experts: 4}
      layout:
        single: {}
        fsdp2: {nproc: 2, parallel.dp_shard: 2}   # nproc/nodes: processes per node, nodes
      tokens: [20480, 40960]        # token budgets: train.steps = tokens / (batch * seq_len)
      lr: {key: optim.lr, values: [1.0e-3, 3.0e-3]}   # any key, several values
    slurm: ["--partition=gpu", "--gpus-per-node=8", "--time=04:00:00"]   # `pretrain launch slurm` options

Every point is a run directory ``<out>/runs/<point>``. A point whose ``summary.json``
records all its steps is finished and never rerun; an interrupted one resumes from its
newest checkpoint; one another run (a second sweep on the same directory) is training now
holds its run directory's lock (``pretrain/run_lock.py``) and is skipped with a message. Locally the points run one after another (``torchrun`` for nproc > 1);
with ``--runner slurm`` the pending points are submitted as SLURM job arrays (one per
distinct node/GPU shape), each task running the launcher's own job script.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pretrain import run_lock
from pretrain.errors import UserError

RESERVED = ("nproc", "nodes")  # point keys that are not config overrides


@dataclass
class Point:
    name: str
    labels: dict[str, str]  # axis -> value name
    overrides: dict[str, object]  # dotted config key -> value
    nproc: int = 1
    nodes: int = 1
    run_dir: Path = field(default_factory=Path)


@dataclass
class Sweep:
    path: Path
    base: str
    overrides: dict
    out: Path
    axes: dict[str, list[tuple[str, dict]]]
    slurm: list[str]
    eval_tasks: list[str] = field(default_factory=list)  # e.g. [mqar] (pretrain/scale_eval.py)
    mqar: dict = field(default_factory=dict)

    def points(self) -> list[Point]:
        out = []
        names = list(self.axes)
        for combo in itertools.product(*(self.axes[a] for a in names)):
            ov = dict(self.overrides)
            labels, nproc, nodes = {}, 1, 1
            for axis, (vname, values) in zip(names, combo):
                labels[axis] = vname
                for k, v in values.items():
                    if k == "nproc":
                        nproc = int(v)
                    elif k == "nodes":
                        nodes = int(v)
                    else:
                        ov[k] = v
            name = "_".join(labels.values()) or "point"
            if any(p.name == name for p in out):
                raise UserError(f"{self.path}: two points are both named '{name}'; rename a value")
            run_dir = self.out / "runs" / name
            ov["logging.run_dir"] = str(run_dir)
            ov["checkpoint.resume"] = "auto"
            out.append(Point(name, labels, ov, nproc, nodes, run_dir))
        return out


# ---- parsing ---------------------------------------------------------------------------

def load_sweep(path: str, out: str | None = None) -> Sweep:
    import yaml

    from pretrain.config import yaml_load

    p = Path(path)
    if not p.is_file():
        raise UserError(f"sweep file not found: {path}")
    try:
        data = yaml_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping")
    unknown = sorted(set(data) - {"base", "overrides", "out", "axes", "slurm", "eval_tasks", "mqar"})
    if unknown:
        raise UserError(f"{path}: unknown key '{unknown[0]}'; allowed: axes, base, eval_tasks, mqar, out, "
                        f"overrides, slurm")
    if "base" not in data:
        raise UserError(f"{path}: missing 'base' (the config every point starts from)")
    overrides = _flat(data.get("overrides") or {}, f"{path}: overrides")
    axes = {}
    for axis, spec in (data.get("axes") or {}).items():
        axes[axis] = _axis(axis, spec, overrides, data["base"], path)
    slurm = data.get("slurm") or []
    if not isinstance(slurm, list) or not all(isinstance(s, str) for s in slurm):
        raise UserError(f"{path}: slurm: expected a list of `pretrain launch slurm` options")
    out_dir = Path(out or data.get("out") or Path("runs") / "sweeps" / p.stem)
    from pretrain import scale_eval

    tasks, mqar = scale_eval.parse(data, path)
    return Sweep(p, str(data["base"]), overrides, out_dir, axes, slurm, tasks, mqar)


def _flat(d: dict, where: str, prefix: str = "") -> dict:
    """Nested or dotted mappings -> {dotted.key: value}."""
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a mapping of dotted keys to values")
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, where, key + "."))
        else:
            out[key] = v
    return out


def _axis(axis: str, spec, overrides: dict, base: str, path: str) -> list[tuple[str, dict]]:
    where = f"{path}: axes.{axis}"
    if isinstance(spec, dict) and "rule" in spec:
        return size_rule(spec["rule"], where)
    if isinstance(spec, dict) and "key" in spec:
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: 'values' must be a non-empty list")
        short = str(spec["key"]).rsplit(".", 1)[-1]
        return [(f"{short}{v}", {spec["key"]: v}) for v in values]
    if axis == "tokens" and isinstance(spec, list):
        return token_budgets(spec, overrides, base, where)
    if isinstance(spec, dict) and spec:
        return [(str(name), _flat(v or {}, f"{where}.{name}")) for name, v in spec.items()]
    raise UserError(f"{where}: expected a mapping of named points, a {{rule: ...}} scaling rule, "
                    f"{{key: ..., values: [...]}}, or (for 'tokens') a list of token budgets")


def size_rule(rule: dict, where: str) -> list[tuple[str, dict]]:
    """Model sizes from one width list: depth = width / aspect (at least ``min_layers``),
    heads = width / head_dim, KV heads = heads / kv_ratio; ``ffn_mult`` sets the MLP width."""
    if not isinstance(rule, dict) or "width" not in rule:
        raise UserError(f"{where}.rule: needs 'width' (a list of model widths)")
    widths = rule["width"] if isinstance(rule["width"], list) else [rule["width"]]
    aspect = rule.get("aspect", 64)
    head_dim = rule.get("head_dim", 64)
    kv_ratio = rule.get("kv_ratio", 1)
    min_layers = rule.get("min_layers", 1)
    out = []
    for w in widths:
        if not isinstance(w, int) or w <= 0 or w % head_dim:
            raise UserError(f"{where}.rule: width {w!r} must be a positive multiple of head_dim={head_dim}")
        heads = w // head_dim
        if heads % kv_ratio:
            raise UserError(f"{where}.rule: kv_ratio={kv_ratio} does not divide the {heads} heads of width {w}")
        ov = {"model.d_model": w, "model.n_layers": max(min_layers, round(w / aspect)),
              "model.n_heads": heads, "model.n_kv_heads": heads // kv_ratio}
        if "ffn_mult" in rule:
            ov["model.ffn_hidden"] = int(round(rule["ffn_mult"] * w / 8)) * 8
        out.append((f"w{w}", ov))
    return out


def token_budgets(values: list, overrides: dict, base: str, where: str) -> list[tuple[str, dict]]:
    from pretrain.config import load_config

    cfg = load_config(base, [f"--{k}={v}" for k, v in overrides.items()])
    per_step = cfg.train.global_batch * cfg.data.seq_len
    out = []
    for t in values:
        if not isinstance(t, (int, float)) or t < per_step:
            raise UserError(f"{where}: token budget {t!r} is below one step ({per_step} tokens)")
        out.append((f"t{_short(t)}", {"train.steps": int(t // per_step)}))
    if len({name for name, _ in out}) < len(out):  # rounded names collide: exact ones
        out = [(f"t{int(t)}", ov) for t, (_, ov) in zip(values, out)]
    return out


def _short(n: float) -> str:
    """1000 -> 1k, 2.5e9 -> 2.5G, 1024 -> 1024, 2147483648 -> 2.15G."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        v = n / div
        if v >= 1 and (v == round(v, 2) or n >= 1e6):
            return f"{v:g}{unit}" if v == round(v, 2) else f"{v:.3g}{unit}"
    return f"{int(n)}"


# ---- status ----------------------------------------------------------------------------

def point_config(sweep: Sweep, point: Point):
    """The validated Config of ``point`` (UserError names the point)."""
    from pretrain.config import load_config

    try:
        return load_config(sweep.base, [f"--{k}={_yaml(v)}" for k, v in point.overrides.items()])
    except UserError as e:
        raise UserError(f"point {point.name}: {e}") from None


def _yaml(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def is_done(point: Point, steps: int) -> bool:
    """Finished: ``summary.json`` records all ``steps`` steps."""
    try:
        summary = json.loads((point.run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return summary.get("steps") == steps


def write_point_config(cfg, point: Point, sweep: Sweep) -> Path:
    from pretrain.config import save_config

    path = sweep.out / "points" / f"{point.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path)
    return path


def write_manifest(sweep: Sweep, rows: list[dict]) -> None:
    sweep.out.mkdir(parents=True, exist_ok=True)
    (sweep.out / "sweep.json").write_text(json.dumps(
        {"sweep": str(sweep.path), "base": sweep.base, "axes": list(sweep.axes), "points": rows}, indent=1))


# ---- running ---------------------------------------------------------------------------

def run_local(sweep: Sweep, points: list[tuple[Point, object]], quiet: bool,
              in_process: bool = False) -> list[str]:
    """Run the pending points one after another; returns the names that failed.

    Each single-process point is a ``pretrain train`` subprocess (its own peak memory), or
    with ``in_process`` a call in this process (faster start; peak memory is then this
    process's high-water mark so far)."""
    from launch.jobs import TrainJob

    failed = []
    for i, (point, cfg) in enumerate(points, 1):
        if busy_elsewhere(point, cfg, f"[{i}/{len(points)}] "):
            continue
        print(f"[{i}/{len(points)}] {point.name}: training ({point.nproc * point.nodes} process(es))",
              flush=True)
        if point.nodes > 1:
            print(f"  skipped: {point.nodes} nodes need --runner slurm", flush=True)
            failed.append(point.name)
            continue
        cfg_path = write_point_config(cfg, point, sweep)
        if point.nproc > 1:
            from launch import local

            job = TrainJob(str(cfg_path.resolve()), [], point.run_dir.resolve(), Path.cwd(),
                           cfg.train.preempt_grace_s, cfg.parallel.dp_engine)
            code = local.run(job, point.nproc)
        elif in_process:
            code = _train_in_process(cfg)
        else:
            cmd = [sys.executable, "-m", "pretrain", "train", str(cfg_path)]
            log = point.run_dir.parent / f"{point.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                code = subprocess.run(cmd, stdout=f if quiet else None, stderr=subprocess.STDOUT
                                      if quiet else None).returncode
        if code == 2 and run_lock.is_locked(point.run_dir):  # another sweep started it first
            print(f"  {point.name} skipped: {point.run_dir} is in use by another run "
                  f"({run_lock.describe(run_lock.read_holder(point.run_dir))})", flush=True)
        elif code != 0:
            print(f"  {point.name} failed (status {code})", flush=True)
            failed.append(point.name)
    return failed


def busy_elsewhere(point: Point, cfg, prefix: str = "") -> bool:
    """True (with a message) if another run, e.g. a second sweep on the same directory, is
    training ``point`` now or finished it since this sweep started: skip it, it is not failed."""
    if run_lock.is_locked(point.run_dir):
        print(f"{prefix}{point.name}: skipped, {point.run_dir} is in use by another run "
              f"({run_lock.describe(run_lock.read_holder(point.run_dir))})", flush=True)
        return True
    if is_done(point, cfg.train.steps):
        print(f"{prefix}{point.name}: finished meanwhile by another run", flush=True)
        return True
    return False


def _train_in_process(cfg) -> int:
    from pretrain.train import train

    try:
        train(cfg)
    except UserError as e:
        print(f"  error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # one broken point must not stop the sweep
        print(f"  error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


def run_slurm(sweep: Sweep, points: list[tuple[Point, object]], dry_run: bool) -> None:
    """Submit the pending points as job arrays; each task runs the script
    ``pretrain launch slurm`` writes for that point."""
    from launch import jobs, slurm

    groups: dict[tuple[int, int], list] = {}
    for point, cfg in points:
        groups.setdefault((point.nodes, point.nproc), []).append((point, cfg))
    for (nodes, nproc), members in groups.items():
        parser = argparse.ArgumentParser(prog="sweep slurm options", add_help=False)
        slurm.add_arguments(parser)
        opts = [o for o in sweep.slurm if not o.startswith(("--nodes", "--nproc-per-node"))]
        try:
            args = parser.parse_args([*opts, f"--nodes={nodes}", f"--nproc-per-node={nproc}"])
        except SystemExit:
            raise UserError(f"{sweep.path}: slurm: options not understood by `pretrain launch slurm`: "
                            f"{' '.join(sweep.slurm)}") from None
        env = jobs.parse_env(args.env)
        scripts = []
        members = [(point, cfg) for point, cfg in members if not busy_elsewhere(point, cfg)]
        if not members:
            continue
        for point, cfg in members:
            cfg_path = write_point_config(cfg, point, sweep).resolve()
            job = jobs.parse_train_args(str(cfg_path), [])
            path = job.run_dir / "slurm" / "point.sbatch"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(slurm.render(args, job, env))
            scripts.append(path)
        array = render_array(args, job, scripts, sweep, f"n{nodes}x{nproc}")
        array_path = sweep.out / "slurm" / f"array-n{nodes}x{nproc}.sbatch"
        array_path.parent.mkdir(parents=True, exist_ok=True)
        array_path.write_text(array)
        if dry_run:
            print(f"wrote {array_path} ({len(scripts)} tasks); not submitted (--dry-run)")
            continue
        try:
            p = subprocess.run(["sbatch", "--parsable", str(array_path)], capture_output=True,
                               text=True, timeout=120)
        except FileNotFoundError:
            raise UserError(f"sbatch not found (is this a SLURM login node?); the array script is "
                            f"{array_path}") from None
        if p.returncode != 0:
            raise UserError(f"sbatch rejected {array_path}: {(p.stderr or p.stdout).strip()[-300:]}")
        print(f"submitted array job {p.stdout.strip()} ({len(scripts)} tasks): {array_path}")


def render_array(args, job, scripts: list[Path], sweep: Sweep, tag: str) -> str:
    """An sbatch job array whose task i execs point i's launcher script: the launcher's
    ``#SBATCH`` options (one node shape per array), an array-wide log, and the per-point
    scripts keep their requeue-on-preemption logic (the batch shell becomes theirs)."""
    from launch import slurm

    opts = [o for o in slurm.sbatch_options(args, job) if not o.startswith(("--job-name", "--output"))]
    name = f"sweep-{sweep.path.stem}-{tag}"
    log = str((sweep.out / "slurm").resolve()).replace("%", "%%") + "/%x-%A_%a.out"
    lines = ["#!/bin/bash", f"# Written by `pretrain scale-test {sweep.path}`: one task per pending point.",
             f'#SBATCH --job-name="{name}"', f"#SBATCH --array=0-{len(scripts) - 1}",
             f'#SBATCH --output="{log}"']
    lines += [f"#SBATCH {o}" for o in opts]
    lines += ["", 'case "$SLURM_ARRAY_TASK_ID" in']
    for i, s in enumerate(scripts):
        lines.append(f"  {i}) exec bash {shlex.quote(str(s))} ;;")
    lines += ['  *) echo "no point for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac", ""]
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pretrain scale-test", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="sweep YAML file")
    p.add_argument("--out", help="sweep directory (default: the file's 'out', or runs/sweeps/<name>)")
    p.add_argument("--runner", choices=("local", "slurm"), default="local")
    p.add_argument("--dry-run", action="store_true",
                   help="list the points and their status (slurm: write the array scripts only)")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report")
    p.add_argument("--quiet", action="store_true", help="training output to <out>/runs/<point>.log")
    p.add_argument("--in-process", action="store_true",
                   help="train single-process points in this process (faster start-up; their "
                        "peak memory then includes the earlier points')")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    sweep = load_sweep(args.sweep, args.out)
    points = sweep.points()
    configs = [(pt, point_config(sweep, pt)) for pt in points]
    rows, pending, done_names = [], [], set()
    for pt, cfg in configs:
        done = is_done(pt, cfg.train.steps)
        rows.append({"name": pt.name, "labels": pt.labels, "run_dir": str(pt.run_dir),
                     "overrides": {k: v for k, v in pt.overrides.items()}, "nproc": pt.nproc,
                     "nodes": pt.nodes, "steps": cfg.train.steps})
        if done:
            done_names.add(pt.name)
        else:
            pending.append((pt, cfg))
    write_manifest(sweep, rows)
    print(f"sweep {sweep.path.name}: {len(points)} points, {len(points) - len(pending)} finished, "
          f"{len(pending)} to run ({sweep.out})")
    if args.dry_run and args.runner == "local":
        for pt, cfg in configs:
            state = "done" if pt.name in done_names else "pending"
            print(f"  {pt.name:<40} {state:<8} {' '.join(f'{k}={v}' for k, v in pt.labels.items())}")
        return 0
    failed: list[str] = []
    if not args.report_only and pending:
        if args.runner == "slurm":
            run_slurm(sweep, pending, args.dry_run)
            return 0
        failed = run_local(sweep, pending, args.quiet, args.in_process)
    from pretrain.report import write_report

    if sweep.eval_tasks:  # finished points only (a SLURM sweep measures at --report-only time)
        from pretrain.scale_eval import run_eval_tasks

        run_eval_tasks(sweep.eval_tasks, sweep.mqar,
                       {pt.name: pt.run_dir for pt, cfg in configs if is_done(pt, cfg.train.steps)})
    report = write_report(sweep.out, rows)
    print(f"report: {report}")
    if failed:
        print(f"{len(failed)} point(s) failed: {', '.join(failed)} (rerun to retry)", file=sys.stderr)
        return 1
    return 0
