"""Test setup: run Triton kernels under the interpreter when no CUDA GPU is present.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
Shared fixtures: `device`, `seed`, and the models the HF-level tests use (`stories_dir`,
`float_llama` / `llama`, `tok`, the `tiny_opt` factory).
"""
import copy
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MIXQ_OFFLINE", "1")  # tests never download


@pytest.fixture
def device() -> torch.device:
    """The device kernels run on: CUDA when present, else CPU (Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def seed(request) -> int:
    """A seed per test, printed on failure so a failing draw can be replayed.

    Deterministic by default (CRC32 of the test's node id, so CI is reproducible); set
    ``MIXQ_TEST_SEED=random`` to draw fresh seeds (fuzzing) or an integer to replay one draw.
    """
    env = os.environ.get("MIXQ_TEST_SEED", "")
    if env == "random":
        s = int.from_bytes(os.urandom(4), "little")
    elif env:
        s = int(env)
    else:
        s = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(s)
    print(f"seed={s}")
    return s


# ------------------------------------------------------------------ shared models (transformers)
def _tiny_opt(pre_norm: bool = True):
    """A tiny random OPT (2 layers, hidden 24, 3 heads, vocab 97), seeded with 0; eval mode."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.OPTConfig(vocab_size=97, hidden_size=24, num_hidden_layers=2, ffn_dim=40,
                                 num_attention_heads=3, max_position_embeddings=64,
                                 word_embed_proj_dim=24, do_layer_norm_before=pre_norm)
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_opt():
    """Factory ``tiny_opt(pre_norm=True)``: a fresh tiny random OPT per call (see `_tiny_opt`)."""
    return _tiny_opt


@pytest.fixture(scope="session")
def stories_dir():
    """The staged stories260k folder (a tiny Llama); skips the test when it is not staged."""
    from mixq.data import find_data

    path = find_data("stories260k", required=False)
    if path is None:
        pytest.skip("stories260k not staged")
    return path


@pytest.fixture(scope="module")
def float_llama(stories_dir):
    """stories260k in fp32, eval mode, one per test module: do not mutate it (use `llama`)."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture
def llama(float_llama):
    """A private copy of `float_llama` that the test may change (quantize, edit weights)."""
    return copy.deepcopy(float_llama)


@pytest.fixture(scope="module")
def tok(stories_dir):
    """The stories260k tokenizer."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(stories_dir)
