"""The training loop (``pretrain train``)."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import traceback
import time
from pathlib import Path

import torch
import yaml

import parallel
from models.transformer import build_model
from pretrain import checkpoint as ckpt
from pretrain.async_ckpt import AsyncSaver
from pretrain.config import Config, config_yaml
from pretrain.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, STATUS_FILE_ENV, UserError
from pretrain.faults import fault_at, maybe_hang, maybe_kill, maybe_slow_step
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


def evaluate(pm, batches) -> float:
    """Mean held-out token loss over ``batches`` (all data-parallel ranks)."""
    pm.train(False)
    total = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        loss_sum, n = pm.eval_loss(batch)
        total += torch.tensor([float(loss_sum), float(n)], dtype=torch.float64)
    pm.train(True)
    pm.world.all_reduce(total)
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


def _train(cfg: Config, world, flag: PreemptionFlag) -> dict:
    setup_determinism(cfg)
    setup_kernels(cfg, world.device)
    run_dir = prepare_run_dir(cfg, world)
    tcfg = cfg.train
    config_text = config_yaml(cfg)
    if world.is_main:
        (run_dir / "config.yaml").write_text(config_text)

    # multi-process layouts shard a meta-device model, then initialise each shard
    model = build_model(cfg.model, device=world.device, seed=tcfg.seed, init=not world.distributed)
    n_params = model.num_params()
    autocast = torch.bfloat16 if tcfg.dtype == "bf16" else None
    common = dict(ac=tcfg.activation_checkpointing, ac_every=tcfg.ac_every, compile=tcfg.compile,
                  z_loss=tcfg.z_loss, fused_loss=tcfg.fused_loss, autocast_dtype=autocast, seed=tcfg.seed)
    if cfg.parallel.dp_engine == "deepspeed":
        from parallel.deepspeed_engine import deepspeed_parallelize

        local = tcfg.global_batch // world.dp_size
        micro = tcfg.micro_batch or local
        pm = deepspeed_parallelize(model, cfg.parallel, world, micro_batch=micro,
                                   accumulation=max(local // micro, 1), grad_clip=cfg.optim.grad_clip,
                                   **common)
    else:
        costs = None
        if cfg.parallel.pp > 1:  # automatic pipeline stages are balanced by FLOPs
            from pretrain.flops import sublayer_flops_per_token

            costs = ([sublayer_flops_per_token(k, cfg.model, cfg.data.seq_len) for k in cfg.model.sublayer_kinds],
                     0.0, 2.0 * cfg.model.d_model * cfg.model.vocab_size)
        pm = parallel.parallelize(model, cfg.parallel, world, stage_costs=costs, **common)
    train_data = build_data(cfg, world, run_dir, cfg.data.train_split)
    if train_data.meta.get("vocab_size", 0) > cfg.model.vocab_size:
        raise UserError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the data's "
                        f"vocabulary ({train_data.meta['vocab_size']})")
    from pretrain.resume import resolve_start

    resume_from, init_weights = resolve_start(cfg, run_dir)  # never a silent fresh start
    if init_weights is not None:  # before the optimizer: an engine copies the weights it starts from
        for part in pm.parts:
            ckpt.load_model_weights(init_weights, part)
    optimizer = build_optimizer(pm.parts, cfg.optim,
                                log=(lambda s: print(s, file=sys.stderr)) if world.is_main else None)
    engine = hasattr(pm, "attach_optimizer")  # DeepSpeed: the engine owns step and optimizer state
    if engine:
        optimizer = pm.attach_optimizer(optimizer)
    scheduler = build_scheduler(optimizer, tcfg.steps, cfg.optim)

    step, tokens_seen, nan_skipped = 0, 0, 0
    if resume_from is not None:
        if engine:  # trainer state and RNG from the checkpoint, weights and optimizer from the engine's
            state = ckpt.load_checkpoint(resume_from, [], None, world)
            pm.load_state(resume_from, json.loads((resume_from / "meta.json").read_text()).get("world_size"))
        else:
            state = ckpt.load_checkpoint(resume_from, pm.parts, optimizer, world)
        step, tokens_seen = state["step"], state["tokens"]
        nan_skipped = state.get("nan_skipped", 0)
        scheduler.load_state_dict(state["scheduler"])
        train_data.load_state_dict(state["data"])

    metrics = MetricsWriter(run_dir, cfg.logging.tensorboard and world.is_main,
                            truncate_after_step=step) if world.is_main else None
    if metrics and cfg.logging.wandb:
        from pretrain.tracking import WandbTracker

        metrics.trackers.append(WandbTracker(cfg.logging, run_dir, yaml.safe_load(config_text)))
    flops_tok = train_flops_per_token(cfg.model, cfg.data.seq_len)
    peak = device_peak_flops(world.device)
    tokens_per_step = tcfg.global_batch * cfg.data.seq_len
    progress = Progress(tcfg.steps, step, cfg.logging.progress, world.is_main, cfg.logging.log_every)
    if world.is_main and (resume_from or init_weights):  # always logged, whatever logging.progress says
        print(f"resumed from {resume_from}: continuing at step {step + 1}" if resume_from else
              f"initialised weights from {init_weights}: starting at step 1", file=sys.stderr, flush=True)
    elif world.is_main and cfg.checkpoint.resume == "auto":
        print(f"checkpoint.resume=auto: no checkpoint under {ckpt.checkpoint_root(run_dir)}: starting at step 1",
              file=sys.stderr, flush=True)
    tok_path = tokenizer_path(cfg, run_dir)

    def save(at_step: int) -> Path:
        state = {"step": at_step, "tokens": tokens_seen, "nan_skipped": nan_skipped,
                 "scheduler": scheduler.state_dict(), "data": train_data.state_dict()}
        with watchdog.suspended():
            if saver is not None:  # checkpoint.async: returns once the state is staged
                return saver.save(run_dir, at_step, pm.parts, optimizer, state, config_text, tok_path,
                                  cfg.checkpoint.keep)
            if not engine:
                return ckpt.save_checkpoint(run_dir, at_step, pm.parts, optimizer, state, world,
                                            config_text, tok_path, cfg.checkpoint.keep)
            with pm.full_parts() as parts:
                return ckpt.save_checkpoint(run_dir, at_step, parts, None, state, world, config_text,
                                            tok_path, cfg.checkpoint.keep, extra=pm.save_state)

    def export_hf(at_step: int) -> None:  # checkpoint.hf_every: HF weights from the sharded state
        from pretrain.hf.live_export import export_live

        with watchdog.suspended():
            if engine:  # DeepSpeed: parameters as the engine presents them (gathered under ZeRO-3)
                with pm.full_parts() as parts:
                    path = export_live(run_dir, at_step, parts, cfg, world, tok_path)
            else:
                path = export_live(run_dir, at_step, pm.parts, cfg, world, tok_path)
        progress.write(f"wrote Hugging Face weights to {path}")

    def wait_for_saves() -> None:  # the background write in flight, if any (checkpoint.async)
        if saver is not None:
            with watchdog.suspended():
                saver.wait()

    saver = AsyncSaver(world, cfg.parallel.timeout_s) if cfg.checkpoint.async_ else None
    watchdog = Watchdog(cfg.parallel.timeout_s if world.distributed else 0, world.rank)
    stragglers = StragglerMonitor(world, cfg.parallel.straggler_ratio, cfg.logging.log_every)
    last_saved = step if resume_from is not None else -1
    val_loss = loss_val = None
    try:
        while step < tcfg.steps:
            t0 = time.perf_counter()
            stragglers.begin_step()
            batch = next(train_data)
            if fault_at("raise_at_step", step + 1):
                raise RuntimeError(f"injected fault at step {step + 1}")
            maybe_hang("hang_at_step", step + 1)
            maybe_slow_step()
            loss = pm.forward_backward(split_micro_batches(batch, tcfg.micro_batch))
            if fault_at("nan_at_step", step + 1):
                loss = loss * float("nan")
            loss_val = pm.reduce_loss(loss)
            grad_norm, finite = optimizer_step(pm, optimizer, cfg.optim.grad_clip,
                                               skip=not math.isfinite(loss_val))
            if not finite and tcfg.nan_policy == "skip":
                nan_skipped += 1
            elif not finite:
                raise UserError(f"non-finite loss ({loss_val}) or grad norm ({grad_norm}) at step "
                                f"{step + 1}; set train.nan_policy=skip to skip such steps")
            if not engine:  # an engine clears its own (and must keep offloaded buffers)
                optimizer.zero_grad(set_to_none=True)
            if finite:
                pm.after_optimizer_step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            tokens_seen += tokens_per_step
            dt = time.perf_counter() - t0
            rec = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": grad_norm,
                   "tokens": tokens_seen, "tokens_per_sec": tokens_per_step / dt,
                   "step_time_s": dt, "mfu": (flops_tok * tokens_per_step / dt / (peak * world.world_size))
                   if peak else None, "memory_mb": peak_memory_mb(world.device), "nan_skipped": nan_skipped}
            rec.update(pm.step_metrics())
            rec.update(stragglers.step(step, dt))
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps:
                with watchdog.suspended():
                    val_loss = run_eval(cfg, pm, world, run_dir)
                rec["val_loss"] = val_loss
            if metrics:
                metrics.write(rec)
            progress.update(step, tcfg.steps, rec)
            maybe_kill("kill_after_step", step)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < tcfg.steps:
                save(step)
                last_saved = step
            if cfg.checkpoint.hf_every and step % cfg.checkpoint.hf_every == 0 and step < tcfg.steps:
                export_hf(step)
            if _agreed_signal(flag, world):
                flag.boundary_reached()
                path = save(step) if last_saved != step else ckpt.checkpoint_root(run_dir) / f"step_{step}"
                wait_for_saves()
                progress.write(f"signal received: saved {path}; exiting for requeue")
                _record_status(world.rank, EXIT_PREEMPTED)
                world.barrier()  # no rank exits (and no launcher tears the job down) before that
                raise Preempted(str(path))
            watchdog.kick()
        watchdog.stop()
        if last_saved != step:
            save(step)
        if cfg.checkpoint.hf_every:
            export_hf(step)
        wait_for_saves()
        val_loss = run_eval(cfg, pm, world, run_dir)
    finally:
        watchdog.stop()
        stragglers.close()
        progress.close()
        if metrics:
            metrics.close()
    summary = {"run_dir": str(run_dir), "steps": step, "tokens": tokens_seen, "params": n_params,
               "final_train_loss": loss_val, "val_loss": val_loss,
               "checkpoint": str(ckpt.latest_checkpoint(run_dir)), "nan_skipped": nan_skipped,
               "unigram_entropy": train_data.meta.get("unigram_entropy")}
    if world.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def optimizer_step(pm, optimizer, max_norm: float, skip: bool) -> tuple[float, bool]:
    """Clip and step unless ``skip`` or the gradient norm is not finite: (grad norm, stepped)."""
    if hasattr(pm, "optimizer_step"):  # engines that clip and step in one call (DeepSpeed)
        return pm.optimizer_step(max_norm, skip)
    grad_norm = float(pm.clip_grad_norm_(max_norm))
    if skip or not math.isfinite(grad_norm):
        return grad_norm, False
    optimizer.step()
    return grad_norm, True


def _agreed_signal(flag: PreemptionFlag, world) -> bool:
    """True on every rank if any rank got a preemption signal."""
    t = torch.tensor([float(flag.signum)], device=world.device)
    world.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item() > 0


def run_eval(cfg: Config, pm, world, run_dir: Path) -> float | None:
    from pretrain.data.loader import eval_batches

    try:
        batches = eval_batches(cfg.data, cfg.data.val_split, cfg.train.global_batch,
                               cfg.train.eval_batches, dp_rank=world.dp_rank, dp_size=world.dp_size,
                               cache_dir=cfg.data.cache_path(run_dir),
                               doc_ids=cfg.model.doc_mask)
    except UserError as e:
        if world.is_main:
            print(f"warning: no held-out evaluation: {e}", file=sys.stderr)
        return None
    return evaluate(pm, batches)


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
