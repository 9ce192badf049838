"""Data parallel (`--data-parallel-size`): replicas in their own processes answer shares of a call.

The replicas here are transformers backends on the tiny model (vLLM's start-up would cost minutes);
the splitting and joining is the same whatever backend each replica runs."""

import pytest

from cai.engine import Engine, Sampling

CONVERSATIONS = [[{"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"}] for i in range(7)]


def tiny_backend(model_dir):
    """A replica's backend (module level: the spawned process imports it by name)."""
    return Engine.from_reference(model_dir, batch_size=4, device="cpu", precision="fp32").backend


@pytest.fixture(scope="module")
def replicated(tiny_model_dir, tiny_engine):
    from cai.engine.vllm import Replicas

    backend = Replicas(tiny_backend, (tiny_model_dir,), 3, tiny_engine.tokenizer, parameters=123)
    yield Engine(None, tiny_engine.tokenizer, backend=backend)
    backend.close()


def test_replicas_answer_in_input_order_as_one_engine_does(replicated, tiny_engine):
    sampling = Sampling(max_new_tokens=12, temperature=1.0, seed=4)
    seeds = [11 * i for i in range(len(CONVERSATIONS))]
    ours = replicated.generate_chat(CONVERSATIONS, sampling, seeds=seeds)
    alone = tiny_engine.generate_chat(CONVERSATIONS, sampling, seeds=seeds)
    assert [g.text for g in ours] == [g.text for g in alone]
    assert len({g.text for g in ours}) > 1  # distinct answers: a shuffled join would show

    contexts = [tiny_engine.render(c) for c in CONVERSATIONS]
    answers = [f"The answer is {2 * i}." for i in range(len(CONVERSATIONS))]
    for a, b in zip(replicated.score(contexts, answers), tiny_engine.score(contexts, answers), strict=True):
        assert a.logprob == pytest.approx(b.logprob, rel=1e-4, abs=1e-5)
    ids = tiny_engine.tokenizer(" A B", add_special_tokens=False)["input_ids"]
    ours_next = replicated.next_token_logprobs(contexts, ids)
    theirs_next = tiny_engine.next_token_logprobs(contexts, ids)
    for a, b in zip(ours_next, theirs_next, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    assert replicated.parameter_count() == 123


def test_a_replica_that_cannot_start_is_reported(tiny_engine):
    from cai.engine.vllm import Replicas

    with pytest.raises(RuntimeError, match="failed to start"):
        Replicas(tiny_backend, ("/nonexistent/model",), 2, tiny_engine.tokenizer, parameters=0)
