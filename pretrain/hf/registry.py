"""Which transformers class represents a model: chosen from the model config, most
specific first; anything no standard class computes exactly goes to remote code."""

from __future__ import annotations

from models.config import ModelConfig
from pretrain.errors import UserError
from pretrain.hf.arch_deepseek_v3 import DeepseekV3
from pretrain.hf.arch_falcon_h1 import FalconH1
from pretrain.hf.arch_llama import Llama
from pretrain.hf.arch_mamba import Bamba, Mamba2
from pretrain.hf.arch_moe import Mixtral, Qwen2Moe
from pretrain.hf.arch_qwen3next import Qwen3Next
from pretrain.hf.arch_io import Arch, stack
from pretrain.hf.remote import Remote

ARCHS: list[Arch] = [Llama(), Mixtral(), Qwen2Moe(), Mamba2(), Bamba(), FalconH1()]
QWEN3_NEXT = Qwen3Next()  # the one target of G and the attention options (tried before the refusal)
ARCHS.append(QWEN3_NEXT)
DEEPSEEK_V3 = DeepseekV3()  # MLA models only, chosen before the others (which have no MLA)
ARCHS.append(DEEPSEEK_V3)
REMOTE = Remote()
REMOTE_MODES = ("auto", "always", "never")


def choose(mc: ModelConfig, sd: dict, remote_code: str = "auto") -> tuple[Arch, list[str], list[str]]:
    """``(arch, issues, notes)``: the target class, the features that sent the model to remote
    code (empty when a standard class fits) and informational notes for the README."""
    if remote_code not in REMOTE_MODES:
        raise UserError(f"--remote-code: '{remote_code}' is not one of {', '.join(REMOTE_MODES)}")
    missing = not_exportable(mc)
    if mc.attention == "mla":
        if missing:
            raise UserError(f"export: {', '.join(missing)} have no Hugging Face export with MLA")
        return _mla_target(mc, sd, remote_code)
    if missing:  # the remote code does not compute these: Qwen3-Next exactly, or nothing
        q3 = QWEN3_NEXT.issues(mc, sd)
        if q3 is None or q3 or remote_code == "always":
            why = "; ".join(q3) if q3 else "not a stack of such layers" if q3 is None else "--remote-code always"
            raise UserError(f"export: {', '.join(missing)} have no Hugging Face export except as "
                            f"{QWEN3_NEXT.hf_class} (layers of a G or * mixer then an MLP or MoE), "
                            f"which does not fit: {why}")
        return QWEN3_NEXT, [], []
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
    """Features the remote code does not compute: exported only when ``Qwen3NextForCausalLM``
    (pretrain/hf/arch_qwen3next.py) fits the whole model exactly, else refused in one line.
    (MLA models go to ``DeepseekV3ForCausalLM`` only.)"""
    out = []
    if "gdn" in mc.sublayer_kinds:
        out.append("Gated DeltaNet sublayers (G)")
    out += [f"model.{k}" for k in ("qk_norm", "attn_output_gate") if getattr(mc, k)]
    if mc.partial_rotary_factor != 1.0:
        out.append("model.partial_rotary_factor")
    return out


def _mla_target(mc: ModelConfig, sd: dict, remote_code: str) -> tuple[Arch, list[str], list[str]]:
    """MLA models: DeepseekV3ForCausalLM or a refusal naming what it cannot represent (the
    remote code has no MLA)."""
    issues = DEEPSEEK_V3.issues(mc, sd)
    if issues is None:
        issues = [f"sublayer pattern '{stack(mc)}' (attention + MLP or MoE layers only)"]
    if remote_code == "always":
        issues = issues + ["--remote-code always (the remote code has no multi-head latent attention)"]
    if issues:
        raise UserError(f"export: {DEEPSEEK_V3.hf_class} cannot represent this MLA model: {'; '.join(issues)} "
                        "(the remote code has no MLA)")
    notes = []
    if mc.mtp_depth:
        n = len(stack(mc)) // 2
        notes.append(f"the {mc.mtp_depth} MTP module(s) are stored as layer(s) {n}..{n + mc.mtp_depth - 1} "
                     "(DeepSeek-V3's layout, num_nextn_predict_layers); transformers skips them on load")
    if any(v.device.type != "meta" and v.min() < 0 for k, v in sd.items() if k.endswith("mixer.expert_bias")):
        notes.append("some expert_bias values are negative: transformers masks the groups it does not choose with "
                     "0 (we and DeepSeek's reference code with -inf), so its routing differs for tokens whose k-th "
                     "best biased score inside the chosen groups is negative")
    return DEEPSEEK_V3, [], notes


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
