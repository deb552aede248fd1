"""The tensor-parallel plan of every sublayer kind, keyed by its ``models/kinds.py`` name.

A new kind adds its :class:`~parallel.tp.TPPlan` here (``tests/test_kinds.py`` fails for a
kind without one). ``parallel/tp.py`` reads this table when it checks and shards a model.
"""

from __future__ import annotations

from models.kinds import ATTENTION, GDN, HYBRID, MAMBA, MLP_KIND, MOE
from parallel import tp, tp_gdn, tp_hybrid, tp_mamba, tp_moe

TP_PLANS: dict[str, tp.TPPlan] = {
    ATTENTION.name: tp.ATTENTION_PLAN,
    MLP_KIND.name: tp.MLP_PLAN,
    MAMBA.name: tp_mamba.PLAN,
    MOE.name: tp_moe.PLAN,
    HYBRID.name: tp_hybrid.PLAN,
    GDN.name: tp_gdn.PLAN,
}
