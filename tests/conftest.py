"""Shared fixtures. Nothing here downloads: the hub is forced offline and CAI_HOME is a temp dir."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One CAI_HOME for the whole session, so the embedded model is converted once, not per test.
os.environ["CAI_HOME"] = tempfile.mkdtemp(prefix="cai-test-home-")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """A tiny random Llama with a ChatML tokenizer (built in about a second)."""
    from cai.models import resolve

    return resolve("embedded:tiny-random")


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    from cai.engine import Engine

    # fp32: tests compare its scores with slow references to 1e-4, which bf16 cannot hold
    return Engine.from_reference(tiny_model_dir, batch_size=4, device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def smol_engine():
    """The real embedded SmolLM2-135M-Instruct (slow tests only)."""
    from cai.engine import Engine

    return Engine.from_reference("embedded:smollm2-135m-instruct", batch_size=16, device="cpu")
