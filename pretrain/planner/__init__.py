"""The layout planner behind ``pretrain plan``: per-rank memory and step-time predictions.

- ``hardware``: devices, links, the latency-bandwidth collective model, GEMM efficiency;
- ``model_stats``: parameter shapes and their tensor/expert-parallel splits, GEMM shapes,
  element-wise traffic and activation bytes per sublayer kind;
- ``layout``: layouts, workloads, software recipes (this trainer, Megatron-LM);
- ``memory`` / ``timing``: the predictions; ``search``: enumerate, check, rank;
- ``dryrun``: exact per-rank parameter counts from ``parallel/`` on the meta device.
"""
