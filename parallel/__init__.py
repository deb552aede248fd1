"""Parallelism applied from outside the model: mesh, FSDP2/HSDP, TP+SP, pipeline."""

from parallel.apply import check_layout, parallelize  # noqa: F401
from parallel.config import ParallelConfig  # noqa: F401
from parallel.engines import build_runner  # noqa: F401
from parallel.pipeline import PipelineRunner  # noqa: F401
from parallel.runner import PlainRunner, Runner  # noqa: F401
from parallel.tp import TPContext, TPPlan, reduce_sublayer_output  # noqa: F401
from parallel.tp_plans import TP_PLANS  # noqa: F401
from parallel.world import MESH_DIMS, World, build_world, init_world, resolve_layout, shutdown_world  # noqa: F401
