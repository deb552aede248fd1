"""Data pipeline: a code corpus, a sentencepiece tokenizer, MDS shard preparation and the
resumable, layout-independent token loader.

Kept import-light on purpose: tokenizer worker processes import this package, and the loader
(which pulls in torch and mosaicml-streaming) is only imported where it is used.
"""
