"""The training loop (``pretrain train``)."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import traceback
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

import parallel
from parallel.mtp import mtp_metrics
from models.transformer import build_model
from parallel.runner import Runner
from parallel.world import World
from pretrain import checkpoint as ckpt
from pretrain.async_ckpt import AsyncSaver
from pretrain.config import Config, config_yaml
from pretrain.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, STATUS_FILE_ENV, UserError
from pretrain.faults import step_faults
from pretrain.flops import device_peak_flops, train_flops_per_token
from pretrain.layout_check import check_run
from pretrain.metrics import MetricsWriter, Progress
from pretrain.optim import build_optimizer, build_scheduler
from pretrain.preflight import check_inputs, check_run_dir
from pretrain.resilience import PreemptionFlag, Watchdog
from pretrain.run_lock import hold_run_dir
from pretrain.stragglers import StragglerMonitor


class Preempted(Exception):
    """Raised after a checkpoint was written because SIGTERM/SIGUSR1 arrived."""


def setup_kernels(cfg: Config, device) -> None:
    """Apply ``train.kernels`` and resolve every op now, so an unavailable path fails up front."""
    import kernels
    from kernels.dispatch import OPS

    try:
        kernels.configure(backend=cfg.train.kernels)
        for op in OPS:
            kernels.backend_for(op, device)
    except (ValueError, RuntimeError, ImportError) as e:
        raise UserError(f"train.kernels: {e}") from None


def setup_determinism(cfg: Config) -> None:
    torch.manual_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def prepare_run_dir(cfg: Config, world) -> Path:
    """Create the run dir; refuse to silently start over an existing run."""
    run_dir = Path(cfg.logging.run_dir)
    for p in (run_dir, *run_dir.parents):  # (on every rank, so that none waits at the barrier)
        if p.exists() and not p.is_dir():
            raise UserError(f"logging.run_dir: {p} exists and is not a directory")
    if cfg.checkpoint.resume == "off" and ckpt.list_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints: pass --checkpoint.resume=auto "
                        f"to continue it, or choose another --logging.run_dir")
    if world.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"logging.run_dir: cannot create {run_dir} ({e.strerror})") from None
    world.barrier()
    return run_dir


def build_data(cfg: Config, world, run_dir: Path, split: str):
    if cfg.data.task == "mqar":  # generated recall sequences (pretrain/data/mqar.py)
        from pretrain.data.mqar import MqarBatches

        return MqarBatches.from_config(cfg, split, cfg.train.global_batch, world.dp_rank, world.dp_size,
                                       seed=cfg.train.seed)
    from pretrain.data.loader import TokenBatches

    return TokenBatches(cfg.data, split, cfg.train.global_batch, world.dp_rank, world.dp_size,
                        seed=cfg.train.seed, cache_dir=cfg.data.cache_path(run_dir), doc_ids=cfg.model.doc_mask)


def tokenizer_path(cfg: Config, run_dir: Path) -> str | None:
    """The run's sentencepiece model (copied into each checkpoint), if it can be found."""
    from pretrain.data.loader import resolve_tokenizer

    try:
        return resolve_tokenizer(cfg.data, cfg.data.cache_path(run_dir))
    except UserError:
        return None


def split_micro_batches(batch: dict, micro: int) -> list[dict]:
    rows = batch["input_ids"].shape[0]
    micro = micro or rows
    if rows % micro:
        raise UserError(f"train.micro_batch: {micro} does not divide the per-rank batch of {rows}")
    return [{k: v[i:i + micro] for k, v in batch.items()} for i in range(0, rows, micro)]


def evaluate(runner, batches) -> float:
    """Mean held-out token loss over ``batches`` (all data-parallel ranks)."""
    runner.train(False)
    total = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        loss_sum, n = runner.eval_loss(batch)
        total += torch.tensor([float(loss_sum), float(n)], dtype=torch.float64)
    runner.train(True)
    runner.world.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train(cfg: Config) -> dict:
    """Run training; returns a summary dict (also written to ``<run_dir>/summary.json``)."""
    # handlers first: a preemption signal during start-up must not kill the process
    flag = PreemptionFlag(cfg.train.preempt_grace_s)
    if "LOCAL_SIZE" in os.environ and "LOCAL_WORLD_SIZE" not in os.environ:
        # DeepSpeed's launcher calls it LOCAL_SIZE; mosaicml-streaming reads LOCAL_WORLD_SIZE
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]
    try:
        check_run(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # every layout rule, before the process group
        world = parallel.init_world(cfg.parallel)
        try:
            # one live run per run dir: rank 0 locks it before anything is written
            lock_wait = cfg.checkpoint.lock_wait_s if cfg.checkpoint.resume == "auto" else 0.0
            check_inputs(cfg)  # before the run directory exists: a missing input leaves nothing behind
            check_run_dir(cfg)
            with hold_run_dir(Path(cfg.logging.run_dir), lock_wait, world):
                return _train(cfg, world, flag)
        finally:
            parallel.shutdown_world(world)
    finally:
        flag.restore()


@dataclass
class Run:
    """A built run: its runner, optimizer, scheduler and data, and where it stands."""

    cfg: Config
    world: World
    run_dir: Path
    config_text: str  # the resolved config, as written to <run_dir>/config.yaml
    n_params: int
    runner: Runner
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_data: object
    resume_from: Path | None  # the checkpoint this run continues
    init_weights: Path | None  # or the weights it starts from
    step: int = 0
    tokens: int = 0
    nan_skipped: int = 0


def _train(cfg: Config, world, flag: PreemptionFlag) -> dict:
    run = build_run(cfg, world)
    resume(run)
    return TrainLoop(run, flag).train()


def build_run(cfg: Config, world) -> Run:
    """Write the run's config, build model, runner, data, optimizer and lr schedule, and
    decide where the run starts (loading ``checkpoint.init_from`` weights). (The layout
    passed ``pretrain.layout_check.check_run`` before the process group started.)"""
    setup_determinism(cfg)
    setup_kernels(cfg, world.device)
    run_dir = prepare_run_dir(cfg, world)
    config_text = config_yaml(cfg)
    if world.is_main:
        (run_dir / "config.yaml").write_text(config_text)

    # multi-process layouts shard a meta-device model, then initialise each shard
    model = build_model(cfg.model, device=world.device, seed=cfg.train.seed, init=not world.distributed)
    n_params = model.num_params()
    runner = build_model_runner(cfg, world, model)
    train_data = build_data(cfg, world, run_dir, cfg.data.train_split)
    if train_data.meta.get("vocab_size", 0) > cfg.model.vocab_size:
        raise UserError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the data's "
                        f"vocabulary ({train_data.meta['vocab_size']})")
    from pretrain.resume import resolve_start

    resume_from, init_weights = resolve_start(cfg, run_dir)  # never a silent fresh start
    if init_weights is not None:  # before the optimizer: an engine copies the weights it starts from
        for part in runner.parts:
            ckpt.load_model_weights(init_weights, part)
    optimizer = build_optimizer(runner.parts, cfg.optim,
                                log=(lambda s: print(s, file=sys.stderr)) if world.is_main else None)
    optimizer = runner.attach_optimizer(optimizer)
    scheduler = build_scheduler(optimizer, cfg.train.steps, cfg.optim)
    return Run(cfg, world, run_dir, config_text, n_params, runner, optimizer, scheduler, train_data,
               resume_from, init_weights)


def build_model_runner(cfg: Config, world, model) -> Runner:
    """The engine's runner for ``model`` under ``cfg.parallel``."""
    tcfg = cfg.train
    costs = None
    if cfg.parallel.pp > 1:  # automatic pipeline stages are balanced by FLOPs
        from pretrain.flops import sublayer_flops_per_token

        costs = ([sublayer_flops_per_token(k, cfg.model, cfg.data.seq_len) for k in cfg.model.sublayer_kinds],
                 0.0, 2.0 * cfg.model.d_model * cfg.model.vocab_size)
    local = tcfg.global_batch // world.dp_size
    micro = tcfg.micro_batch or local
    return parallel.build_runner(
        model, cfg.parallel, world, micro_batch=micro, accumulation=max(local // micro, 1),
        grad_clip=cfg.optim.grad_clip, stage_costs=costs, ac=tcfg.activation_checkpointing,
        ac_every=tcfg.ac_every, compile=tcfg.compile, z_loss=tcfg.z_loss, fused_loss=tcfg.fused_loss,
        autocast_dtype=torch.bfloat16 if tcfg.dtype == "bf16" else None, seed=tcfg.seed)


def resume(run: Run) -> None:
    """Load the checkpoint the run continues (if any): weights, optimizer, RNG, lr schedule,
    data position, step and token counts."""
    path = run.resume_from
    if path is None:
        return
    state = run.runner.load_checkpoint(lambda parts, optimizer: ckpt.load_checkpoint(path, parts, optimizer, run.world),
                                   path, ckpt.saved_world_size(path))
    run.step, run.tokens = state["step"], state["tokens"]
    run.nan_skipped = state.get("nan_skipped", 0)
    run.scheduler.load_state_dict(state["scheduler"])
    run.train_data.load_state_dict(state["data"])


class TrainLoop:
    """The optimizer steps of a built run, with metrics, evaluation, checkpoints, Hugging
    Face exports and the exit on a preemption signal."""

    def __init__(self, run: Run, flag: PreemptionFlag):
        self.run, self.flag = run, flag
        cfg, world, run_dir = run.cfg, run.world, run.run_dir
        self.metrics = MetricsWriter(run_dir, cfg.logging.tensorboard and world.is_main,
                                     truncate_after_step=run.step) if world.is_main else None
        if self.metrics and cfg.logging.wandb:
            from pretrain.tracking import WandbTracker

            self.metrics.trackers.append(WandbTracker(cfg.logging, run_dir, yaml.safe_load(run.config_text)))
        self.flops_tok = train_flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak = device_peak_flops(world.device)
        self.tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
        self.progress = Progress(cfg.train.steps, run.step, cfg.logging.progress, world.is_main, cfg.logging.log_every)
        if world.is_main:
            _log_start(run)
        self.tok_path = tokenizer_path(cfg, run_dir)
        self.saver = AsyncSaver(world, cfg.parallel.timeout_s) if cfg.checkpoint.async_ else None
        self.watchdog = Watchdog(cfg.parallel.timeout_s if world.distributed else 0, world.rank)
        self.stragglers = StragglerMonitor(world, cfg.parallel.straggler_ratio, cfg.logging.log_every)
        self.last_saved = run.step if run.resume_from is not None else -1
        self.val_loss = self.loss_val = None

    def train(self) -> dict:
        """Train to ``train.steps``, save, export, evaluate; returns the summary."""
        run, steps = self.run, self.run.cfg.train.steps
        try:
            while run.step < steps:
                rec = self.step()
                self.after_step(rec)
                self.watchdog.kick()
            self.watchdog.stop()
            if self.last_saved != run.step:
                self.save(run.step)
            if run.cfg.checkpoint.hf_every:
                self.export_hf(run.step)
            self.wait_for_saves()
            self.val_loss = run_eval(run.cfg, run.runner, run.world, run.run_dir)
        finally:
            self.watchdog.stop()
            self.stragglers.close()
            self.progress.close()
            if self.metrics:
                self.metrics.close()
        summary = {"run_dir": str(run.run_dir), "steps": run.step, "tokens": run.tokens, "params": run.n_params,
                   "final_train_loss": self.loss_val, "val_loss": self.val_loss,
                   "checkpoint": str(ckpt.latest_checkpoint(run.run_dir)), "nan_skipped": run.nan_skipped,
                   "unigram_entropy": run.train_data.meta.get("unigram_entropy")}
        if run.world.is_main:
            (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def step(self) -> dict:
        """One optimizer step; returns its metrics record."""
        run, tcfg, runner = self.run, self.run.cfg.train, self.run.runner
        t0 = time.perf_counter()
        self.stragglers.begin_step()
        micro_batches = split_micro_batches(next(run.train_data), tcfg.micro_batch)
        loss = step_faults(run.step + 1, lambda: runner.forward_backward(micro_batches))  # test-only
        self.loss_val = loss_val = runner.reduce_loss(loss)
        grad_norm, finite = runner.optimizer_step(run.cfg.optim.grad_clip, skip=not math.isfinite(loss_val))
        if not finite and tcfg.nan_policy == "skip":
            run.nan_skipped += 1
        elif not finite:
            raise UserError(f"non-finite loss ({loss_val}) or grad norm ({grad_norm}) at step "
                            f"{run.step + 1}; set train.nan_policy=skip to skip such steps")
        lr = run.scheduler.get_last_lr()[0]
        run.scheduler.step()
        run.step += 1
        run.tokens += self.tokens_per_step
        dt = time.perf_counter() - t0
        world = run.world
        rec = {"step": run.step, "loss": loss_val, "lr": lr, "grad_norm": grad_norm,
               "tokens": run.tokens, "tokens_per_sec": self.tokens_per_step / dt,
               "step_time_s": dt, "mfu": (self.flops_tok * self.tokens_per_step / dt / (self.peak * world.world_size))
               if self.peak else None, "memory_mb": peak_memory_mb(world.device), "nan_skipped": run.nan_skipped}
        rec.update(runner.step_metrics())
        rec.update(mtp_metrics(runner, rec))  # MTP: mtp_loss_k; `loss` = main loss, `loss_total`
        rec.update(self.stragglers.step(run.step, dt))
        return rec

    def after_step(self, rec: dict) -> None:
        """Evaluate, log, checkpoint and export when due; save and exit on a preemption signal."""
        run, cfg = self.run, self.run.cfg
        step, steps = run.step, cfg.train.steps
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < steps:
            with self.watchdog.suspended():
                self.val_loss = run_eval(cfg, run.runner, run.world, run.run_dir)
            rec["val_loss"] = self.val_loss
        if self.metrics:
            self.metrics.write(rec)
        self.progress.update(step, steps, rec)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < steps:
            self.save(step)
            self.last_saved = step
        if cfg.checkpoint.hf_every and step % cfg.checkpoint.hf_every == 0 and step < steps:
            self.export_hf(step)
        if _agreed_signal(self.flag, run.world):
            self.flag.boundary_reached()
            path = self.save(step) if self.last_saved != step else ckpt.checkpoint_root(run.run_dir) / f"step_{step}"
            self.wait_for_saves()
            self.progress.write(f"signal received: saved {path}; exiting for requeue")
            _record_status(run.world.rank, EXIT_PREEMPTED)
            run.world.barrier()  # no rank exits (and no launcher tears the job down) before that
            raise Preempted(str(path))

    def save(self, at_step: int) -> Path:
        run, keep = self.run, self.run.cfg.checkpoint.keep
        state = {"step": at_step, "tokens": run.tokens, "nan_skipped": run.nan_skipped,
                 "scheduler": run.scheduler.state_dict(), "data": run.train_data.state_dict()}

        def write(parts, optimizer, extra) -> Path:
            if self.saver is not None:  # checkpoint.async (not offered for engines with state of their own)
                return self.saver.save(run.run_dir, at_step, parts, optimizer, state, run.config_text,
                                       self.tok_path, keep)
            return ckpt.save_checkpoint(run.run_dir, at_step, parts, optimizer, state, run.world,
                                        run.config_text, self.tok_path, keep, extra=extra)

        with self.watchdog.suspended():
            return run.runner.save_checkpoint(write)

    def export_hf(self, at_step: int) -> None:
        """checkpoint.hf_every: Hugging Face weights from the live (sharded) state."""
        from pretrain.hf.live_export import export_live

        run = self.run
        with self.watchdog.suspended(), run.runner.checkpoint_parts() as parts:
            path = export_live(run.run_dir, at_step, parts, run.cfg, run.world, self.tok_path)
        self.progress.write(f"wrote Hugging Face weights to {path}")

    def wait_for_saves(self) -> None:
        """The background write in flight, if any (checkpoint.async)."""
        if self.saver is not None:
            with self.watchdog.suspended():
                self.saver.wait()


def _log_start(run: Run) -> None:
    """Where the run starts, always logged (whatever logging.progress says)."""
    if run.resume_from or run.init_weights:
        print(f"resumed from {run.resume_from}: continuing at step {run.step + 1}" if run.resume_from else
              f"initialised weights from {run.init_weights}: starting at step 1", file=sys.stderr, flush=True)
    elif run.cfg.checkpoint.resume == "auto":
        print(f"checkpoint.resume=auto: no checkpoint under {ckpt.checkpoint_root(run.run_dir)}: starting at step 1",
              file=sys.stderr, flush=True)


def _agreed_signal(flag: PreemptionFlag, world) -> bool:
    """True on every rank if any rank got a preemption signal."""
    t = torch.tensor([float(flag.signum)], device=world.device)
    world.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item() > 0


def run_eval(cfg: Config, runner, world, run_dir: Path) -> float | None:
    from pretrain.data.loader import eval_batches

    if cfg.data.task == "mqar":
        from pretrain.data import mqar

        return evaluate(runner, mqar.eval_batches(cfg, cfg.data.val_split, cfg.train.global_batch,
                                              cfg.train.eval_batches, world.dp_rank, world.dp_size))
    try:
        batches = eval_batches(cfg.data, cfg.data.val_split, cfg.train.global_batch,
                               cfg.train.eval_batches, dp_rank=world.dp_rank, dp_size=world.dp_size,
                               cache_dir=cfg.data.cache_path(run_dir),
                               doc_ids=cfg.model.doc_mask)
    except UserError as e:
        if world.is_main:
            print(f"warning: no held-out evaluation: {e}", file=sys.stderr)
        return None
    return evaluate(runner, batches)


def train_main(cfg: Config) -> int:
    """``pretrain train``: 0 when done, EXIT_PREEMPTED after a preemption signal.

    In a multi-process run an exception ends this rank at once (no clean-up that could
    wait on peers); its closed connections, the launcher and the peers' watchdogs and
    process-group timeouts then bring the other ranks down.
    """
    rank = int(os.environ.get("RANK", "0"))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        summary = train(cfg)
    except Preempted:
        _record_status(rank, EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    except BaseException as e:
        if not distributed or isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        code = EXIT_USER_ERROR if isinstance(e, UserError) else 1
        _record_status(rank, code)
        if code == EXIT_USER_ERROR and (rank == 0 or not getattr(e, "rank0_reports", False)):
            print(f"error: [rank {rank}] {e}", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
            print(f"rank {rank}: {type(e).__name__}: exiting", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)
    _record_status(rank, 0)
    if rank == 0:
        print(json.dumps(summary, indent=1))
    return 0


def _record_status(rank: int, status: int) -> None:
    """Rank 0 writes its exit status where a launcher asked (torchrun's own is always 1)."""
    path = os.environ.get(STATUS_FILE_ENV)
    if path and rank == 0:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(f"{status}\n")
        except OSError as e:
            print(f"warning: cannot write {path}: {e}", file=sys.stderr)
