"""Scale-test reports: a table (CSV and Markdown) and PNG plots from run directories.

Per run: total and active parameters, training FLOPs per token (``pretrain.flops``),
tokens trained, throughput (median tokens/s after the first step), MFU where the device's
peak is known, peak memory, and the final held-out (else training) loss. Plots: loss
against tokens per run; loss against training FLOPs per architecture with a fitted power
law ``L = a * C^-b``; throughput and peak memory per layout.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

from pretrain.errors import UserError
from pretrain.metrics import read_metrics

COLUMNS = ["point", "arch", "size", "layout", "params", "active_params", "flops_per_token", "tokens",
           "train_flops", "tokens_per_s", "mfu", "peak_memory_mb", "val_loss", "train_loss"]
EVAL_COLUMNS = ["mqar_recall"]  # sweep eval_tasks (pretrain/scale_eval.py), shown when measured


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_summary(run_dir: str | Path, labels: dict | None = None, name: str | None = None) -> dict:
    """One table row (plus the metric records under ``"_records"``) for ``run_dir``."""
    from pretrain.config import load_config
    from pretrain.flops import train_flops_per_token
    from pretrain.planner.model_stats import active_params, total_params

    run_dir = Path(run_dir)
    labels = labels or {}
    row = {c: None for c in COLUMNS}
    row["point"] = name or run_dir.name
    recs = read_metrics(run_dir)
    row["_records"] = recs
    cfg = None
    if (run_dir / "config.yaml").is_file():
        try:
            cfg = load_config(str(run_dir / "config.yaml"))
        except UserError:  # written by another version of the trainer: metrics only
            cfg = None
    if cfg is not None:
        m = cfg.model
        row["params"], row["active_params"] = total_params(m), active_params(m)
        row["flops_per_token"] = train_flops_per_token(m, cfg.data.seq_len)
    row["arch"] = labels.get("arch") or (describe_arch(cfg) if cfg else None)
    row["size"] = labels.get("size") or (f"d{cfg.model.d_model}x{cfg.model.n_layers}" if cfg else None)
    row["layout"] = labels.get("layout") or (describe_layout(cfg) if cfg else None)
    for k, v in labels.items():
        if k not in row:
            row[k] = v
    if recs:
        last = recs[-1]
        row["tokens"] = last.get("tokens")
        row["train_loss"] = _num(last.get("loss"))
        tps = [r["tokens_per_sec"] for r in recs[1:] or recs if _num(r.get("tokens_per_sec"))]
        row["tokens_per_s"] = statistics.median(tps) if tps else None
        mfu = [r["mfu"] for r in recs[1:] or recs if _num(r.get("mfu")) is not None]
        row["mfu"] = statistics.median(mfu) if mfu else None
        mem = [r["memory_mb"] for r in recs if _num(r.get("memory_mb"))]
        row["peak_memory_mb"] = max(mem) if mem else None
        if row["flops_per_token"] and row["tokens"]:
            row["train_flops"] = row["flops_per_token"] * row["tokens"]
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        row["val_loss"] = _num(summary.get("val_loss"))
    except (OSError, ValueError):
        pass
    from pretrain.scale_eval import read_evals

    row.update(read_evals(run_dir))
    return row


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def describe_arch(cfg) -> str:
    m = cfg.model
    s = f"'{m.pattern}'"
    if m.residual != "standard":
        s += f" {m.residual}"
    if "moe" in m.sublayer_kinds:
        s += f" E{m.moe.n_experts}k{m.moe.top_k}"
    return s


def describe_layout(cfg) -> str:
    p = cfg.parallel
    parts = [f"tp{p.tp}", f"pp{p.pp}"]
    if p.dp_engine == "deepspeed":
        parts.append(f"zero{p.zero_stage}")
    else:
        parts.append(f"dp{p.dp_replicate}x{p.dp_shard if p.dp_shard > 0 else 'auto'}")
    return " ".join(parts)


# ---- table ----------------------------------------------------------------------------

def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if abs(v) >= 1e6 or (0 < abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


def write_table(rows: list[dict], out: Path) -> tuple[Path, Path]:
    extra = sorted({k for r in rows for k in r if k not in COLUMNS + EVAL_COLUMNS and not k.startswith("_")})
    cols = COLUMNS[:1] + extra + COLUMNS[1:] + [c for c in EVAL_COLUMNS if any(r.get(c) is not None for r in rows)]
    csv_path, md_path = out / "table.csv", out / "table.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


# ---- plots ----------------------------------------------------------------------------

def fit_power_law(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least squares in log-log: ``y = a * x^-b``; None with fewer than two distinct x."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    n = len(pts)
    mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    return math.exp(my - slope * mx), -slope


def plot_loss_curves(rows: list[dict], path: Path, x: str = "tokens") -> Path:
    """Training loss of each run against ``x`` (tokens | step | flops); held-out loss marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        recs = [q for q in r["_records"] if _num(q.get("loss")) is not None]
        if not recs:
            continue
        xs = [_x(q, r, x) for q in recs]
        line, = ax.plot(xs, [q["loss"] for q in recs], lw=1.2, label=r["point"])
        vals = [(_x(q, r, x), q["val_loss"]) for q in recs if _num(q.get("val_loss")) is not None]
        if r.get("val_loss") is not None and recs:
            vals.append((xs[-1], r["val_loss"]))
        if vals:
            ax.plot(*zip(*vals), "o", color=line.get_color(), ms=4)
    ax.set_xlabel({"tokens": "tokens", "step": "step", "flops": "training FLOPs"}[x])
    ax.set_ylabel("loss (line: train, dots: held-out)")
    if x == "flops":
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _x(rec: dict, row: dict, x: str) -> float:
    if x == "step":
        return rec["step"]
    if x == "flops":
        return rec["tokens"] * (row.get("flops_per_token") or 0.0)
    return rec["tokens"]


def plot_loss_vs_flops(rows: list[dict], path: Path) -> tuple[Path, dict]:
    """Per architecture: training curves against FLOPs (thin), final losses (dots) and the
    power law fitted to the final losses (or, with one run, to its curve's second half)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fits = {}
    archs = sorted({r["arch"] or "?" for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, arch in enumerate(archs):
        c = colors[i % len(colors)]
        group = [r for r in rows if (r["arch"] or "?") == arch and r.get("flops_per_token")]
        xs, ys = [], []
        for r in group:
            recs = [q for q in r["_records"] if _num(q.get("loss")) is not None]
            if recs:
                ax.plot([_x(q, r, "flops") for q in recs], [q["loss"] for q in recs], color=c,
                        lw=0.8, alpha=0.35)
            final = r.get("val_loss") if r.get("val_loss") is not None else r.get("train_loss")
            if final is not None and r.get("train_flops"):
                xs.append(r["train_flops"])
                ys.append(final)
        ax.plot(xs, ys, "o", color=c, label=arch)
        fit = fit_power_law(xs, ys)
        if fit is None and len(group) == 1:
            recs = [q for q in group[0]["_records"] if _num(q.get("loss")) is not None]
            half = recs[len(recs) // 2:]
            fit = fit_power_law([_x(q, group[0], "flops") for q in half], [q["loss"] for q in half])
        if fit:
            a, b = fit
            fits[arch] = {"a": a, "b": b}
            lo = min(xs or [1.0]) / 2
            hi = max(xs or [1.0]) * 2
            grid = [lo * (hi / lo) ** (k / 50) for k in range(51)]
            ax.plot(grid, [a * g ** -b for g in grid], "--", color=c, lw=1,
                    label=f"{arch}: L = {a:.3g} C^-{b:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("loss (dots: final held-out)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, fits


def plot_throughput(rows: list[dict], path: Path) -> Path:
    """Tokens/s and peak memory of each run, grouped (coloured) by layout."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: (str(r["layout"]), r["point"]))
    layouts = sorted({str(r["layout"]) for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    col = {lay: colors[i % len(colors)] for i, lay in enumerate(layouts)}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.5))
    names = [r["point"] for r in rows]
    cs = [col[str(r["layout"])] for r in rows]
    a1.barh(names, [r.get("tokens_per_s") or 0 for r in rows], color=cs)
    a1.set_xlabel("tokens/s (median)")
    a2.barh(names, [r.get("peak_memory_mb") or 0 for r in rows], color=cs)
    a2.set_xlabel("peak memory (MB)")
    a2.set_yticks([])
    handles = [plt.Rectangle((0, 0), 1, 1, color=col[lay]) for lay in layouts]
    a2.legend(handles, layouts, fontsize=7, title="layout")
    for ax in (a1, a2):
        ax.grid(alpha=0.3, axis="x")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(sweep_dir: str | Path, points: list[dict]) -> Path:
    """``<sweep_dir>/report/``: table.csv, table.md, loss_vs_tokens.png, loss_vs_flops.png,
    throughput_memory.png and fits.json, for the ``points`` (``name``, ``run_dir``, ``labels``)
    whose run directory holds metrics."""
    out = Path(sweep_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_summary(p["run_dir"], p.get("labels"), p.get("name")) for p in points]
    rows = [r for r in rows if r["_records"]]
    write_table(rows, out)
    if rows:
        plot_loss_curves(rows, out / "loss_vs_tokens.png")
        _, fits = plot_loss_vs_flops(rows, out / "loss_vs_flops.png")
        plot_throughput(rows, out / "throughput_memory.png")
        (out / "fits.json").write_text(json.dumps(fits, indent=1))
    return out
