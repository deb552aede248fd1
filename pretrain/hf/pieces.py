"""Weight mappings as data: each architecture lists its pieces once, and the export and the
import both walk that one list (:meth:`pretrain.hf.arch_io.Arch.pieces`).

A piece maps the tensors under one of our name prefixes to those under one HF prefix, in
both directions: ``to_hf(sd, ours, theirs)`` and ``from_hf(t, theirs, ours, where)`` (``where``
names the HF class in error messages; a missing tensor is one ``error:`` line).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from models.config import ModelConfig
from pretrain.hf.arch_io import Arch, need, strip_prefix, take


class Piece(abc.ABC):
    @abc.abstractmethod
    def to_hf(self, sd: dict, ours: str, theirs: str) -> dict:
        ...

    @abc.abstractmethod
    def from_hf(self, t: dict, theirs: str, ours: str, where: str) -> dict:
        ...


@dataclass(frozen=True)
class Rename(Piece):
    """Tensors that differ only in name: ``(our suffix, HF suffix)`` pairs."""

    pairs: tuple[tuple[str, str], ...]

    def to_hf(self, sd, ours, theirs):
        return {theirs + h: sd[ours + o] for o, h in self.pairs}

    def from_hf(self, t, theirs, ours, where):
        return {ours + o: take(t, theirs + h, where) for o, h in self.pairs}


def norm(hf_name: str) -> Rename:
    """A sublayer's input norm, called ``hf_name`` in the HF decoder layer."""
    return Rename((("norm.weight", f"{hf_name}.weight"),))


def mlp(names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> Rename:
    """Our SwiGLU ``w_gate/w_up/w_down`` -> HF ``names``."""
    return Rename(tuple((f"{o}.weight", f"{h}.weight") for o, h in zip(("w_gate", "w_up", "w_down"), names)))


ROUTER = Rename((("router.weight", "weight"),))


@dataclass(frozen=True)
class Attention(Piece):
    """Our ``wq/wk/wv/wo`` -> HF ``q_proj/k_proj/v_proj/o_proj``. ``o_bias``: the HF class
    has an o_proj bias where we have none (exported as zeros, must be zero on import)."""

    qkv_bias: bool = False
    o_bias: bool = False

    def _pairs(self):
        for o, h in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            yield f"{o}.weight", f"{h}.weight"
            if self.qkv_bias and o != "wo":
                yield f"{o}.bias", f"{h}.bias"

    def to_hf(self, sd, ours, theirs):
        out = {theirs + h: sd[ours + o] for o, h in self._pairs()}
        if self.o_bias:
            w = sd[f"{ours}wo.weight"]
            out[f"{theirs}o_proj.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
        return out

    def from_hf(self, t, theirs, ours, where):
        ob = t.get(f"{theirs}o_proj.bias")
        need(ob is None or not ob.any(), f"{where}: {theirs}o_proj.bias is non-zero; the attention output "
                                         "projection here has no bias")
        return {ours + o: take(t, theirs + h, where) for o, h in self._pairs()}


@dataclass(frozen=True)
class Experts(Piece):
    """Our ``[E, in, out]`` expert matrices <-> HF per-expert ``[out, in]`` Linear weights
    named ``names`` (gate, up, down) under ``{theirs}{e}.``."""

    n: int
    names: tuple[str, str, str]

    def to_hf(self, sd, ours, theirs):
        return {f"{theirs}{e}.{h}.weight": sd[ours + o][e].t()
                for o, h in zip(("w_gate", "w_up", "w_down"), self.names) for e in range(self.n)}

    def from_hf(self, t, theirs, ours, where):
        return {ours + o: torch.stack([take(t, f"{theirs}{e}.{h}.weight", where).t() for e in range(self.n)])
                for o, h in zip(("w_gate", "w_up", "w_down"), self.names)}


@dataclass(frozen=True)
class ExpertBias(Piece):
    """The aux-loss-free balancing bias: not in HF classes (export requires it zero, see
    ``routing_issues``); imported as zeros."""

    n: int

    def to_hf(self, sd, ours, theirs):
        return {}

    def from_hf(self, t, theirs, ours, where):
        return {f"{ours}expert_bias": torch.zeros(self.n)}


@dataclass(frozen=True)
class MambaMixer(Piece):
    """Our Mamba-2 mixer <-> transformers' fused ``in_proj`` [z, x, B, C, dt] and ``conv1d``
    over [x, B, C] (``models.mamba2.to_hf_mamba2`` / ``from_hf_mamba2``)."""

    def to_hf(self, sd, ours, theirs):
        from models.mamba2 import to_hf_mamba2

        return {theirs + k: v for k, v in to_hf_mamba2(sd, ours).items()}

    def from_hf(self, t, theirs, ours, where):
        from models.mamba2 import from_hf_mamba2

        part = strip_prefix(t, theirs)
        for k in ("in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"):
            take(part, k, f"{where} ({theirs})")
        need("in_proj.bias" not in part and "out_proj.bias" not in part,
             f"{where}: projection biases in {theirs} (use_bias=true) have no equivalent here")
        return {ours + k: v for k, v in from_hf_mamba2(part).items()}


class MappedArch(Arch):
    """An ``Arch`` whose weights map by its list of pieces: the embedding and final norm
    (HF names ``ends``, the LM head unless tied) and ``pieces(mc)``."""

    ends = ("model.embed_tokens.weight", "model.norm.weight")

    @abc.abstractmethod
    def pieces(self, mc: ModelConfig) -> list[tuple[str, str, Piece]]:
        """(our prefix, HF prefix, piece) for every tensor between the ends, in HF order."""

    def export_weights(self, mc, sd):
        embed, final_norm = self.ends
        out = {embed: sd["tok_embeddings.weight"], final_norm: sd["norm.weight"]}
        if not mc.tie_embeddings:
            out["lm_head.weight"] = sd["output.weight"]
        for ours, theirs, piece in self.pieces(mc):
            out.update(piece.to_hf(sd, ours, theirs))
        return out

    def import_weights(self, hf, mc, t):
        embed, final_norm = self.ends
        where = self.hf_class
        out = {"tok_embeddings.weight": take(t, embed, where), "norm.weight": take(t, final_norm, where)}
        out["output.weight"] = out["tok_embeddings.weight"] if mc.tie_embeddings else take(t, "lm_head.weight", where)
        for ours, theirs, piece in self.pieces(mc):
            out.update(piece.from_hf(t, theirs, ours, where))
        return out
