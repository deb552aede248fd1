"""``pretrain plot RUN_DIR...``: loss and throughput curves of any runs (PNG files)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain.errors import UserError


def plot_throughput_curves(rows: list[dict], path: Path, x: str = "step") -> Path:
    """Tokens/s of each run at every step."""
    from pretrain.report import _num, _pyplot, _x

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        recs = [q for q in r["_records"] if _num(q.get("tokens_per_sec")) is not None]
        ax.plot([_x(q, r, x) for q in recs], [q["tokens_per_sec"] for q in recs], lw=1.2, label=r["point"])
    ax.set_xlabel(x)
    ax.set_ylabel("tokens/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pretrain plot", description=__doc__)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (holding metrics.jsonl)")
    p.add_argument("--out", default="plots", help="directory for loss.png and throughput.png (default: plots)")
    p.add_argument("--x", choices=("tokens", "step", "flops"), default="tokens", help="x axis of the loss plot")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    from pretrain.report import plot_loss_curves, run_summary

    rows = []
    for d in args.runs:
        if not (Path(d) / "metrics.jsonl").is_file():
            raise UserError(f"{d}: no metrics.jsonl (not a run directory)")
        rows.append(run_summary(d, name=_name(d, args.runs)))
    rows = [r for r in rows if r["_records"]]
    if not rows:
        raise UserError("no metrics recorded in the given run directories")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    a = plot_loss_curves(rows, out / "loss.png", x=args.x)
    b = plot_throughput_curves(rows, out / "throughput.png")
    print(f"wrote {a}\nwrote {b}")
    return 0


def _name(d: str, all_dirs: list[str]) -> str:
    """The shortest distinguishing name: the directory name, or its last two parts."""
    name = Path(d).name
    if sum(Path(x).name == name for x in all_dirs) > 1:
        return "/".join(Path(d).resolve().parts[-2:])
    return name
