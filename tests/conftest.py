"""Shared fixtures. Nothing here downloads: the hub is forced offline and CAI_HOME is a temp dir."""

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One CAI_HOME for the whole session, so the embedded model is converted once, not per test.
os.environ["CAI_HOME"] = tempfile.mkdtemp(prefix="cai-test-home-")
# The converted embedded model is ~500 MB: left behind by every run, it fills a shared /tmp.
atexit.register(shutil.rmtree, os.environ["CAI_HOME"], ignore_errors=True)

import pytest  # noqa: E402

from cai import models as _models  # noqa: E402

# Whether this machine's CPU multiplies bf16 natively (read before the patch below).
CPU_NATIVE_BF16 = _models.cpu_has_native_bf16()


@pytest.fixture(scope="session", autouse=True)
def fp32_unless_a_test_asks_for_bf16():
    """cai picks bf16 (inference; training under autocast) on CPUs with native bf16. Many tests compare
    with fp32 references to 1e-4, and CI machines may or may not have native bf16: every test runs as on
    a CPU without it, unless it takes the `native_bf16` fixture."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_models, "cpu_has_native_bf16", lambda: False)
        yield


@pytest.fixture
def native_bf16(monkeypatch):
    """This test runs as on a CPU with native bf16 (bf16 inference, bf16 autocast training)."""
    monkeypatch.setattr(_models, "cpu_has_native_bf16", lambda: True)


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
    """The real embedded SmolLM2-135M-Instruct (slow tests only), in the precision cai would pick here."""
    from cai.engine import Engine

    return Engine.from_reference("embedded:smollm2-135m-instruct", batch_size=16, device="cpu",
                                 precision="bf16" if CPU_NATIVE_BF16 else "fp32")
