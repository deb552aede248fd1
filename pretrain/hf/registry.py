"""Which transformers class represents a model: chosen from the model config, most
specific first; anything no standard class computes exactly goes to remote code."""

from __future__ import annotations

from models.config import ModelConfig
from pretrain.errors import UserError
from pretrain.hf.arch_falcon_h1 import FalconH1
from pretrain.hf.arch_llama import Llama
from pretrain.hf.arch_mamba import Bamba, Mamba2
from pretrain.hf.arch_moe import Mixtral, Qwen2Moe
from pretrain.hf.arch_io import Arch, stack
from pretrain.hf.remote import Remote

ARCHS: list[Arch] = [Llama(), Mixtral(), Qwen2Moe(), Mamba2(), Bamba(), FalconH1()]
REMOTE = Remote()
REMOTE_MODES = ("auto", "always", "never")


def choose(mc: ModelConfig, sd: dict, remote_code: str = "auto") -> tuple[Arch, list[str], list[str]]:
    """``(arch, issues, notes)``: the target class, the features that sent the model to remote
    code (empty when a standard class fits) and informational notes for the README."""
    if remote_code not in REMOTE_MODES:
        raise UserError(f"--remote-code: '{remote_code}' is not one of {', '.join(REMOTE_MODES)}")
    missing = not_exportable(mc)
    if missing:  # neither a standard class nor the remote code computes these yet
        raise UserError(f"export: {', '.join(missing)} have no Hugging Face export yet")
    best, issues = None, [f"sublayer pattern '{stack(mc)}' (no transformers class has this layout)"]
    for arch in ARCHS:
        found = arch.issues(mc, sd)
        if found is None:
            continue
        if not found:
            best, issues = arch, []
            break
        if best is None:  # the closest family names the features that do not fit
            best, issues = arch, found
    notes = []
    if remote_code == "always":
        return REMOTE, [], ["remote code requested (--remote-code always)"]
    if issues:
        target = best.hf_class if best is not None else "no transformers class"
        if remote_code == "never":
            raise UserError(f"{target} cannot represent this model without remote code: "
                            f"{'; '.join(issues)} (use --remote-code auto to export with a modeling file)")
        notes.append(f"exported with remote code: {target} cannot represent {'; '.join(issues)}")
        return REMOTE, issues, notes
    return best, [], notes


def not_exportable(mc: ModelConfig) -> list[str]:
    """Features no export target (standard class or remote code) computes yet. Per-layer
    mappings exist for the Qwen3-Next / DeepSeek-V3 targets: ``models.gdn.to_hf_gdn``, and
    the MLA and attention-option weight names in models/mla.py."""
    out = []
    if "gdn" in mc.sublayer_kinds:
        out.append("Gated DeltaNet sublayers (G)")
    if mc.attention == "mla":
        out.append("multi-head latent attention (model.attention=mla)")
    out += [f"model.{k}" for k in ("qk_norm", "attn_output_gate") if getattr(mc, k)]
    if mc.partial_rotary_factor != 1.0:
        out.append("model.partial_rotary_factor")
    return out


def arch_for_hf(hf: dict) -> Arch:
    """The mapping that imports a HF config.json (by architectures[0], else model_type)."""
    names = hf.get("architectures") or []
    mtype = hf.get("model_type", "")
    for arch in ARCHS + [REMOTE]:
        if (names and names[0] == arch.hf_class) or (not names and mtype in arch.model_types):
            return arch
    supported = ", ".join(a.hf_class for a in ARCHS + [REMOTE])
    found = names[0] if names else (mtype or "unknown")
    raise UserError(f"cannot import architecture {found!r}; supported: {supported}")
