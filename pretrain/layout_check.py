"""Every rule a run's layout must meet, in one function that needs no process group and
allocates nothing: the trainer calls it once before the process group starts, and
``pretrain plan`` (its search and its dry run) calls it for every layout it considers, so the
planner's "runnable" is the trainer's own verdict."""

from __future__ import annotations

from pretrain.config import Config
from pretrain.errors import UserError


def check_run(cfg: Config, world_size: int) -> None:
    """Raise UserError (one line naming the key) if the trainer would refuse ``cfg`` on
    ``world_size`` processes: config validation, mesh sizes, what the model can be divided
    into, engine restrictions, and how the global batch splits into data-parallel rows,
    micro-batches, pipeline micro-batches and (sequence/context parallel) token slices."""
    from parallel.apply import check_model_layout
    from parallel.pipeline import check_schedule
    from parallel.runner import check_pipeline_rows, check_sequence_split, pipeline_microbatches
    from parallel.world import World, resolve_layout

    cfg.validate()
    p = cfg.parallel
    sizes = resolve_layout(p, world_size)
    dp = sizes["dp_replicate"] * sizes["dp_shard"]
    world = World(world_size=world_size, pp_size=sizes["pp"], tp_size=sizes["tp"], cp_size=sizes["cp"],
                  dp_replicate=sizes["dp_replicate"], dp_shard=sizes["dp_shard"], dp_size=dp, ep_size=p.ep)
    from parallel.mtp import check_mtp

    check_mtp(cfg.model, p, world)
    if p.dp_engine == "deepspeed":
        from importlib.util import find_spec

        from parallel.deepspeed_engine import MISSING, check_layout

        check_layout(p, world)
        if find_spec("deepspeed") is None:
            raise UserError(MISSING)
    else:
        check_model_layout(cfg.model, p, world)
    t = cfg.train
    if t.global_batch % dp:  # the data loader's rule
        raise UserError(f"train.global_batch={t.global_batch} must be a positive multiple of the "
                        f"data-parallel size {dp}")
    rows = t.global_batch // dp
    micro = t.micro_batch or rows
    if rows % micro:  # the trainer's micro-batch split
        raise UserError(f"train.micro_batch: {micro} does not divide the per-rank batch of {rows}")
    check_sequence_split(cfg.data.seq_len // sizes["cp"], sizes["tp"], p.sequence_parallel)  # cp: local tokens
    if sizes["pp"] > 1 and p.dp_engine != "deepspeed":
        n_micro = pipeline_microbatches(p.pp_microbatches, rows // micro, sizes["pp"])
        check_pipeline_rows(rows, n_micro)
        check_schedule(p.pp_schedule, n_micro, sizes["pp"])

