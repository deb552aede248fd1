"""Hugging Face export (``pretrain export``) and import (``pretrain import-hf``).

- ``registry``: picks the transformers class from the model config (Llama, Mixtral,
  Qwen2-MoE, Mamba2, Bamba, Falcon-H1), or remote code for anything none computes exactly.
- ``arch_*``: one mapping per architecture (config fields and tensor names, both ways).
- ``remote`` + ``modeling_pretrain_lm.py``: the self-contained modeling file for remote code.
- ``tokenizer``: the sentencepiece model as a ``LlamaTokenizerFast``.
- ``arch_io``: safetensors I/O (sharded with an index), dtypes, the ``Arch`` interface.
"""
