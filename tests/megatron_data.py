"""Writing a Megatron-LM indexed dataset for tests, with megatron-core's own builder."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np


def write_megatron_dataset(corpus_jsonl: Path, tokenizer_model: Path, out_dir: Path,
                           name: str = "corpus_text_document") -> Path:
    """Tokenize the documents of ``corpus_jsonl`` (EOS appended, as ``--append-eod`` does)
    into ``out_dir/<name>.bin/.idx`` and copy the tokenizer beside them; returns the prefix."""
    import sentencepiece as spm
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / name
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    with warnings.catch_warnings():  # optional GPU extras, numpy __array__ deprecations
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
        with open(corpus_jsonl) as f:
            for line in f:
                ids = sp.encode(json.loads(line)["text"]) + [sp.eos_id()]
                builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
        builder.finalize(str(prefix) + ".idx")
    shutil.copyfile(tokenizer_model, out_dir / "tokenizer.model")
    return prefix
