import os
import sys
from pathlib import Path

# Triton decides interpreter mode when it is first imported (its standard-library
# @jit functions are decorated then), and transformers, streaming and torch import it
# early: set the interpreter for the whole session before anything can import triton.
# The dispatcher still picks the reference ops on CPU unless a test forces Triton.
os.environ["TRITON_INTERPRET"] = "1"

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# One thread per xdist worker: two workers share the cores, and extra intra-op threads spin.
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small real dataset (stdlib source, 512-token BPE) in MDS shards, built once per session."""
    from pretrain.data.corpus import stdlib_corpus
    from pretrain.data.prepare import prepare
    from pretrain.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_dataset")
    corpus = stdlib_corpus(root / "corpus.jsonl", max_bytes=400_000)
    tok = train_tokenizer([str(corpus)], root / "tok", vocab_size=512)
    prepare([str(corpus)], root / "data", tokenizer=tok, sample_len=132, val_fraction=0.05,
            workers=1, progress=False)
    return root / "data"


def tiny_overrides(data: Path, run_dir: Path, **extra) -> list[str]:
    """Overrides turning configs/tiny.yaml into a fast run on ``tiny_dataset``."""
    ov = {"data.path": str(data), "logging.run_dir": str(run_dir), "logging.progress": "off"}
    ov.update(extra)
    return [f"--{k}={v}" for k, v in ov.items()]


@pytest.fixture(scope="session")
def parity_tokens(tiny_dataset, tmp_path_factory) -> Path:
    """Global batches of ``tiny_dataset`` text for the multi-process tests (tests/parity.py);
    also exported as PARITY_TOKENS for their torchrun workers (tests/test_parallel_worker.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import parity

    path = parity.prepare_tokens(tiny_dataset, tmp_path_factory.mktemp("parity_data") / "tokens.pt")
    os.environ["PARITY_TOKENS"] = str(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and ops: extra intra-op threads only spin on a shared CPU (20x slower steps
    measured under load). A whole module: ``pytestmark = pytest.mark.usefixtures("one_thread")``
    (module-scoped, so the module's own module-scoped fixtures run on one thread too)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The longest modules (one torchrun launch for many layouts) start first, so that under
# `make test`'s xdist workers (a module stays on one worker) neither waits for them at the end.
LONGEST_FIRST = ("test_parity.py", "test_context_parallel.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: otherwise as collected
