"""``pretrain export``: a checkpoint (any parallel layout) -> a Hugging Face model directory.

Writes config.json, safetensors weights (sharded with an index above --max-shard-size),
generation_config.json, tokenizer files (from the checkpoint's tokenizer.model) and a
README.md with the notes below. The target class is chosen from the model config
(``pretrain.hf.registry``); a model no transformers class computes exactly is exported
with a self-contained modeling file (``--remote-code auto``), or refused (``never``).
The directory appears atomically: it is written next to OUT and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from pretrain.errors import UserError
from pretrain.hf.arch_io import BOS_ID, DTYPES, EOS_ID, HF_DTYPE_NAMES, PAD_ID, cast, parse_size, write_safetensors


def export_checkpoint(checkpoint: str, out: str, dtype: str = "fp32", max_shard_size: str | int = "5GB",
                      remote_code: str = "auto", tokenizer: str | None = None) -> dict:
    """Export; returns a summary (architecture, files, notes)."""
    from pretrain.evaluate import load_for_inference
    from pretrain.hf.registry import REMOTE, choose

    if dtype not in DTYPES:
        raise UserError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    if max_bytes <= 0:
        raise UserError("--max-shard-size: must be positive")
    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not empty; choose a new output directory")
    cfg, model, path = load_for_inference(checkpoint)
    mc = cfg.model
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    arch, _, notes = choose(mc, sd, remote_code)
    from pretrain.data.tokenizer import find_tokenizer

    tok_path = Path(tokenizer) if tokenizer else (find_tokenizer(path) or path / "tokenizer.model")
    if tokenizer and not tok_path.is_file():
        raise UserError(f"--tokenizer: {tok_path} not found")
    tok_ids = _token_ids(tok_path, mc.vocab_size)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp_{out_dir.name}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()  # (not mkdtemp: the result keeps the umask's permissions)
    try:
        torch_dtype = DTYPES[dtype]
        files = write_safetensors(cast(arch.export_weights(mc, sd), torch_dtype), tmp, max_bytes)
        _write_config(arch, mc, tmp, torch_dtype, tok_ids)
        files.append("config.json")
        if arch is REMOTE:
            arch.write_code(tmp)
            files.append("modeling_pretrain_lm.py")
        _write_generation_config(tmp, tok_ids, use_cache=arch is not REMOTE)
        files.append("generation_config.json")
        if tok_ids["source"]:
            from pretrain.data.tokenizer import load_tokenizer

            files += load_tokenizer(tok_path).write_hf(tmp, mc.max_seq_len)
        else:
            notes.append(f"no tokenizer written: {tok_path} not found (pass --tokenizer)")
        summary = {"checkpoint": str(path), "out": str(out_dir), "architecture": arch.hf_class,
                   "tokenizer_kind": tok_ids.get("kind"),
                   "remote_code": arch is REMOTE, "dtype": dtype, "files": sorted(files), "notes": notes}
        (tmp / "README.md").write_text(_readme(summary, mc))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _token_ids(tok_path: Path, vocab_size: int) -> dict:
    if not tok_path.is_file():
        return {"source": None, "bos": BOS_ID, "eos": EOS_ID, "pad": PAD_ID}
    from pretrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_path)
    if tok.vocab_size > vocab_size:
        raise UserError(f"{tok_path}: tokenizer has {tok.vocab_size} pieces, more than the model's "
                        f"vocab_size={vocab_size}")
    ids = {"source": str(tok_path), "bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
    return {k: (None if isinstance(v, int) and v < 0 else v) for k, v in ids.items()} | {"kind": tok.kind}


def _write_config(arch, mc, out: Path, torch_dtype, tok_ids: dict) -> None:
    import transformers

    fields = dict(arch.export_config(mc))
    fields.update(bos_token_id=tok_ids["bos"], eos_token_id=tok_ids["eos"], pad_token_id=tok_ids["pad"])
    if fields["model_type"] == "pretrain_lm":  # our own config class lives in the remote code
        data = {"architectures": [arch.hf_class], **fields, "torch_dtype": HF_DTYPE_NAMES[torch_dtype],
                "use_cache": False, "transformers_version": transformers.__version__}
        (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return
    config = transformers.AutoConfig.for_model(**fields, dtype=HF_DTYPE_NAMES[torch_dtype])
    config.architectures = [arch.hf_class]
    config.save_pretrained(str(out))


def _write_generation_config(out: Path, tok_ids: dict, use_cache: bool) -> None:
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=tok_ids["bos"], eos_token_id=tok_ids["eos"], pad_token_id=tok_ids["pad"],
                     use_cache=use_cache).save_pretrained(str(out))


def _readme(summary: dict, mc) -> str:
    lines = [f"# Exported from `{summary['checkpoint']}`", "",
             f"- architecture: `{summary['architecture']}`" + (" (remote code)" if summary["remote_code"] else ""),
             f"- weights dtype: {summary['dtype']}", ""]
    if summary["remote_code"]:
        lines += ["Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`. The modeling",
                  "file `modeling_pretrain_lm.py` needs only torch and transformers. It keeps no KV/SSM cache:",
                  "`generate()` re-runs the whole sequence for every new token (correct, slower).", ""]
        kinds = set(mc.sublayer_kinds)
        if kinds & {"mamba", "hybrid"}:
            lines += ["Mamba-2 runs the exact quadratic form of the SSD scan: memory grows with the square",
                      "of the sequence length.", ""]
        if "moe" in kinds and mc.moe.capacity_factor > 0:
            lines += ["The MoE drops tokens over capacity per forward, as in training: outputs depend on",
                      "the batch (batch size 1 reproduces `pretrain generate`).", ""]
    lines += ["## Document masking",
              "Training packed several documents per sequence (`doc EOS doc EOS ...`)"
              + (" with document masks: attention (and Mamba-2 state) did not cross EOS." if mc.doc_mask
                 else "."),
              "Hugging Face models attend causally over the whole input, so logits agree with training",
              "on a single document (no EOS inside); feed packed sequences one document at a time.", "",
              "## Tokenizer"]
    if summary.get("tokenizer_kind") == "hf":
        lines += ["`AutoTokenizer` loads the training run's own `tokenizer.json` with the special tokens of",
                  "its `tokenizer_config.json`; training packed documents as `doc EOS doc EOS` with no BOS",
                  "(encode with `add_special_tokens=False` to match).", ""]
    else:
        lines += ["`AutoTokenizer` loads the sentencepiece model as `LlamaTokenizerFast` and encodes/decodes",
                  "text exactly as the training tokenizer (whitespace and newlines included). It adds no BOS",
                  "(`add_bos_token: false`): training documents start right after an EOS, so to condition on",
                  "a document start, prepend the EOS id (as `pretrain generate` does). Literal special-token",
                  "strings such as `</s>` inside text are parsed as special tokens by transformers.", ""]
    if summary["notes"]:
        lines += ["## Notes"] + [f"- {n}" for n in summary["notes"]] + [""]
    return "\n".join(lines) + "\n"


def parser():
    from pretrain.cliargs import Parser, name, path

    ap = Parser(prog="pretrain export",
                description="Write a checkpoint (saved under any parallel layout) in Hugging Face "
                            "format: config.json, safetensors, generation config, tokenizer.")
    ap.add_argument("--checkpoint", required=True, type=path(),
                    help="step_N directory or run directory (newest)")
    ap.add_argument("--out", required=True, type=path(), help="new output directory")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weight dtype (default fp32)")
    ap.add_argument("--max-shard-size", default="5GB", type=name(),
                    help="split safetensors above this size, with an index (default 5GB)")
    ap.add_argument("--remote-code", default="auto", choices=["auto", "always", "never"],
                    help="models no transformers class represents: export a modeling file (auto), always do, "
                         "or fail naming the feature (never)")
    ap.add_argument("--tokenizer", type=path(exists=True),
                    help="sentencepiece .model or tokenizer.json (default: the checkpoint's copy)")
    return ap


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    s = export_checkpoint(args.checkpoint, args.out, args.dtype, args.max_shard_size, args.remote_code,
                          args.tokenizer)
    print(f"exported {s['checkpoint']} -> {s['out']} as {s['architecture']}"
          + (" (remote code: load with trust_remote_code=True)" if s["remote_code"] else ""))
    for n in s["notes"]:
        print(f"note: {n}")
    return 0
