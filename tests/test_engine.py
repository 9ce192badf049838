import math

import pytest
import torch

from cai.engine import Engine, Sampling
from cai.engine.hf import common_prefix_length

CONVERSATIONS = [[{"role": "user", "content": text}] for text in (
    "hello", "Please rewrite the response to remove anything harmful or illegal, thank you very much.",
    "Which is less harmful?", "count the words in each line of the file", "hi there", "The capital of France is")]


def test_outputs_come_back_in_input_order_whatever_the_batching(tiny_engine):
    sampling = Sampling(max_new_tokens=12)
    reference = [Engine(tiny_engine.model, tiny_engine.tokenizer, batch_size=1).generate_chat([c], sampling)[0]
                 for c in CONVERSATIONS]
    for batch_size in (2, 4, 16):
        outputs = Engine(tiny_engine.model, tiny_engine.tokenizer, batch_size=batch_size).generate_chat(
            CONVERSATIONS, sampling)
        assert [o.text for o in outputs] == [r.text for r in reference]


def test_a_row_that_ends_early_gets_no_tokens_after_its_end_while_batch_mates_go_on(tiny_engine, monkeypatch):
    """A finished row stays in the batch until enough rows finish to compact it; nothing it is fed
    meanwhile may reach its text (a batch once returned "Yes.\nsystem\n\nuser" where alone gave "Yes.")."""
    backend = Engine(tiny_engine.model, tiny_engine.tokenizer, batch_size=16).backend
    [stop] = sorted(backend.stop_ids)[:1]
    words = [t for t in tiny_engine.tokenizer("the cat sat on a mat by the door", add_special_tokens=False)["input_ids"]
             if t not in backend.stop_ids]
    # What each row "samples" at each of its steps: row 0 ends at its 2nd token, row 1 at its 5th, the rest
    # never (1 finished row of 6 is under the compaction threshold, so row 0 is fed for a few more steps).
    script = [[words[0], stop] + words, words[:4] + [stop] + words, *[words * 3 for _ in range(4)]]
    steps = [0] * len(script)

    def scripted_pick(logits, sampling, generators, active):
        picks = []
        for row in active:
            picks.append(script[row][steps[row]])
            steps[row] += 1
        return torch.tensor(picks)

    monkeypatch.setattr(backend, "_pick", scripted_pick)
    prompts = [tiny_engine.render(c) for c in CONVERSATIONS]
    order = sorted(range(6), key=lambda i: len(backend._encode([prompts[i]])[0]), reverse=True)
    outputs = backend.generate([prompts[i] for i in order], Sampling(max_new_tokens=8), [0] * 6, None)
    decode = tiny_engine.tokenizer.decode
    assert [(g.num_tokens, g.finished) for g in outputs] == [(2, True), (5, True)] + [(8, False)] * 4
    assert outputs[0].text == decode([words[0]]).strip()
    assert outputs[1].text == decode(words[:4]).strip()
    assert steps[0] > 2, "row 0 was fed after its end (the case under test)"


def test_seeded_sampling_does_not_depend_on_batch_mates(tiny_engine):
    sampling = Sampling(max_new_tokens=10, temperature=1.0, seed=7)
    seeds = [11, 22, 33, 44, 55, 66]
    together = tiny_engine.generate_chat(CONVERSATIONS, sampling, seeds=seeds)
    alone = [Engine(tiny_engine.model, tiny_engine.tokenizer, batch_size=1).generate_chat([c], sampling, seeds=[s])[0]
             for c, s in zip(CONVERSATIONS, seeds, strict=True)]
    assert [o.text for o in together] == [o.text for o in alone]
    other = tiny_engine.generate_chat(CONVERSATIONS, Sampling(max_new_tokens=10, temperature=1.0, seed=8), seeds=seeds)
    assert [o.text for o in other] != [o.text for o in together]


@pytest.fixture(params=["flash", "joint", "chunked"])
def cascade_kernel(request, monkeypatch):
    """Each cascade test runs through every way `cai.engine.cascade` computes attention: the flash kernel with
    merged log-sum-exps (large fp32 calls), one softmax over explicit scores for the whole batch (small
    calls, decode), and the same row by row in chunks (large bf16 calls; here a few query rows a chunk)."""
    from cai.engine import cascade

    if request.param == "flash":
        monkeypatch.setattr(cascade, "JOINT_MAX_SCORES", 0)
        monkeypatch.setattr(cascade, "CHUNKED_DTYPES", ())
    elif request.param == "joint":
        monkeypatch.setattr(cascade, "JOINT_MAX_SCORES", 1 << 40)
    else:
        monkeypatch.setattr(cascade, "JOINT_MAX_SCORES", 0)
        monkeypatch.setattr(cascade, "CHUNKED_DTYPES", (torch.float32, torch.bfloat16))
        monkeypatch.setattr(cascade, "CHUNK_SCORES", 2000)
    return request.param


@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "repeated"])
def test_shared_prefix_prefill_equals_plain_prefill(tiny_engine, cascade, cascade_kernel):
    """Neither way of sharing the prefix (one copy for all rows, or one per row) may change any row's logits."""
    from transformers import DynamicCache

    backend = tiny_engine.backend
    header = [{"role": "system", "content": "A long shared system prompt that every row starts with, " * 3}]
    texts = [tiny_engine.render(header + c) for c in CONVERSATIONS]
    sequences = backend._encode(texts)
    original_cascade, original_minimum = backend.cascade, backend.MIN_SHARED_PREFIX
    try:
        backend.cascade = cascade
        with torch.inference_mode(), backend._attention():
            shared, _, _, prefix_kv = backend._prefill(sequences, DynamicCache(), logits_to_keep=3)
            backend.MIN_SHARED_PREFIX = 10**9  # sharing off
            plain, _, _, _ = backend._prefill(sequences, DynamicCache(), logits_to_keep=3)
    finally:
        backend.cascade, backend.MIN_SHARED_PREFIX = original_cascade, original_minimum
    assert (prefix_kv is not None) == cascade
    assert torch.allclose(shared.logits, plain.logits, atol=1e-4)


def test_cascade_attention_in_bf16_matches_the_repeated_prefix(tiny_model_dir, cascade_kernel):
    """bf16 (the default on CPUs with native bf16): the one-copy prefix agrees with per-row copies to bf16's precision."""
    from transformers import DynamicCache

    engine = Engine.from_reference(tiny_model_dir, batch_size=8, device="cpu", precision="bf16")
    backend = engine.backend
    header = [{"role": "system", "content": "A long shared system prompt that every row starts with, " * 3}]
    sequences = backend._encode([engine.render(header + c) for c in CONVERSATIONS])
    logits = {}
    for cascade in (True, False):
        backend.cascade = cascade
        with torch.inference_mode(), backend._attention():
            out, _, _, _ = backend._prefill(sequences, DynamicCache(), logits_to_keep=3)
        logits[cascade] = out.logits.float()
    scale = logits[False].abs().max()
    assert (logits[True] - logits[False]).abs().max() <= 0.02 * scale


def test_cascade_attention_generates_and_scores_what_repeated_prefixes_do(tiny_engine, cascade_kernel):
    """Decode steps (rows finishing and compacted, cache growing) and scoring through the one-copy prefix."""
    backend = tiny_engine.backend
    assert backend.cascade, "the tiny Llama routes attention through AttentionInterface"
    header = [{"role": "system", "content": "Shared few-shot block for every row of the batch. " * 4}]
    conversations = [header + c for c in CONVERSATIONS]
    sampling = Sampling(max_new_tokens=16, temperature=1.0, seed=3)
    contexts = [tiny_engine.render(c) for c in conversations]
    continuations = ["yes", "no thank you", "A", "it depends on the file", "ok", "Paris"]
    results = {}
    for cascade in (True, False):
        backend.cascade = cascade
        try:
            results[cascade] = (tiny_engine.generate_chat(conversations, sampling, seeds=list(range(6))),
                                tiny_engine.score(contexts, continuations))
        finally:
            backend.cascade = True
    assert [g.text for g in results[True][0]] == [g.text for g in results[False][0]]
    assert [g.num_tokens for g in results[True][0]] == [g.num_tokens for g in results[False][0]]
    for ours, reference in zip(results[True][1], results[False][1], strict=True):
        assert ours.logprob == pytest.approx(reference.logprob, abs=1e-4)


@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "repeated"])
def test_a_call_continuing_kept_conversations_generates_what_a_fresh_call_does(tiny_engine, cascade, monkeypatch):
    """keep_cache=True, then prompts that continue those conversations: the second call prefills only what
    follows the kept tokens (prompt and generated text, rows kept as they finished and at the end) and
    samples exactly what a call without kept rows samples."""
    backend = Engine(tiny_engine.model, tiny_engine.tokenizer, batch_size=4).backend
    monkeypatch.setattr(backend, "cascade", cascade)
    header = [{"role": "system", "content": "Shared few-shot block for every row of the batch. " * 4}]
    conversations = [header + c for c in CONVERSATIONS]
    words = [t for t in tiny_engine.tokenizer("the cat sat on a mat by the door", add_special_tokens=False)[
        "input_ids"] if t not in backend.stop_ids]
    [stop] = sorted(backend.stop_ids)[:1]
    # First call, scripted: in each batch of four, rows end after 3, 5, never, never tokens (compaction).
    script = [words[:3] + [stop] + words * 2, words[:5] + [stop] + words * 2] + [words * 2] * 2
    steps: dict[int, int] = {}

    def scripted_pick(logits, sampling, generators, active):
        picks = []
        for row in active:
            picks.append(script[row % 4][steps.get(row, 0)])
            steps[row] = steps.get(row, 0) + 1
        return torch.tensor(picks)

    monkeypatch.setattr(backend, "_pick", scripted_pick)
    first = backend.generate([tiny_engine.render(c) for c in conversations], Sampling(max_new_tokens=8),
                             [0] * 6, None, keep_cache=True)
    monkeypatch.undo()
    monkeypatch.setattr(backend, "cascade", cascade)
    assert {g.finished for g in first} == {True, False}
    follow_up = [tiny_engine.render(c + [{"role": "assistant", "content": g.text},
                                         {"role": "user", "content": "Now say it again, shorter."}])
                 for c, g in zip(conversations, first, strict=True)]
    reused = {}  # prompt tokens -> how many of them came from the kept rows
    original = type(backend)._prefill_reusing

    def spy(sequences, cache, prefix_kv, start, rows):
        from transformers import DynamicCache

        reused.update({tuple(seq): start + n for seq, (_, n) in zip(sequences, rows, strict=True)})
        result = original(backend, sequences, cache, prefix_kv, start, rows)
        plain = backend._prefill(sequences, DynamicCache(), logits_to_keep=1)[0].logits
        assert torch.allclose(result[0].logits, plain, atol=1e-4)  # the next-token logits of a plain prefill
        return result

    monkeypatch.setattr(backend, "_prefill_reusing", spy)
    sampling = Sampling(max_new_tokens=10, temperature=1.0, seed=4)
    continued = backend.generate(follow_up, sampling, list(range(6)), None)
    fresh = Engine(tiny_engine.model, tiny_engine.tokenizer, batch_size=4).backend
    fresh.cascade = cascade
    reference = fresh.generate(follow_up, sampling, list(range(6)), None)
    assert [(g.text, g.num_tokens) for g in continued] == [(g.text, g.num_tokens) for g in reference]
    # Every row reused its kept conversation: past the prompt, into the text the first call generated.
    prompts = backend._encode([tiny_engine.render(c) for c in conversations])
    assert all(reused[tuple(seq)] > len(prompt) for seq, prompt in zip(backend._encode(follow_up), prompts,
                                                                      strict=True))
    assert backend._kept is None  # kept for one call only


def test_kept_conversations_are_not_reused_once_a_weight_changed(tiny_model_dir):
    """Kept rows are the old model's keys and values: after a weight changes (here through .data, as a
    weight sync does) the next call must compute what a fresh engine computes."""
    engine = Engine.from_reference(tiny_model_dir, batch_size=4, device="cpu", precision="fp32")  # weights change below
    header = [{"role": "system", "content": "Shared few-shot block for every row of the batch. " * 4}]
    conversations = [header + c for c in CONVERSATIONS[:3]]
    sampling = Sampling(max_new_tokens=8)
    first = engine.generate_chat(conversations, sampling)
    engine.generate([engine.render(c) for c in conversations], sampling, keep_cache=True)
    follow_up = [engine.render(c + [{"role": "assistant", "content": g.text},
                                    {"role": "user", "content": "Now say it again, shorter."}])
                 for c, g in zip(conversations, first, strict=True)]
    for layer in engine.model.model.layers:
        layer.self_attn.v_proj.weight.data.mul_(10.0)
    continued = engine.generate(follow_up, sampling)
    reference = Engine(engine.model, engine.tokenizer, batch_size=4).generate(follow_up, sampling)
    assert [g.text for g in continued] == [g.text for g in reference]


def test_growing_cache_holds_what_a_dynamic_cache_holds_through_growth_and_batch_changes():
    """Spare room, regrowth, rows dropped and rows repeated: the visible keys/values never differ."""
    from transformers import DynamicCache

    from cai.engine.hf import growing_cache

    torch.manual_seed(0)
    ours, reference = growing_cache(spare=3), DynamicCache()

    def step(batch: int, length: int):
        k, v = torch.randn(batch, 2, length, 4), torch.randn(batch, 2, length, 4)
        got, want = ours.update(k, v, layer_idx=0), reference.update(k, v, layer_idx=0)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)

    step(1, 5)                      # a shared prefix at batch size 1 ...
    for cache in (ours, reference):
        cache.batch_repeat_interleave(3)  # ... repeated to the batch
    step(3, 4)                      # the rows' suffixes
    for _ in range(6):              # decode steps, past the spare room: the buffer regrows
        step(3, 1)
    for cache in (ours, reference):
        cache.batch_select_indices(torch.tensor([0, 2]))  # a row finished
    for _ in range(4):
        step(2, 1)
    assert ours.get_seq_length() == reference.get_seq_length() == 19


def test_generation_with_the_growing_cache_equals_plain_dynamic_cache(tiny_engine, monkeypatch):
    """Long enough to regrow the buffer, with rows finishing early (compaction) and sampling on."""
    from transformers import DynamicCache

    import cai.engine.hf

    sampling = Sampling(max_new_tokens=40, temperature=1.0, seed=3)
    ours = tiny_engine.generate_chat(CONVERSATIONS, sampling)
    monkeypatch.setattr(cai.engine.hf, "growing_cache", lambda spare: DynamicCache())
    plain = tiny_engine.generate_chat(CONVERSATIONS, sampling)
    assert [o.text for o in ours] == [o.text for o in plain]
    assert [o.num_tokens for o in ours] == [o.num_tokens for o in plain]


def test_max_new_tokens_truncates_and_is_reported(tiny_engine):
    outputs = tiny_engine.generate_chat(CONVERSATIONS, Sampling(max_new_tokens=3))
    for output in outputs:
        assert output.num_tokens <= 3
        assert output.finished or output.num_tokens == 3


class _PreferToken(torch.nn.Module):
    """Wraps a model and adds a large bonus to one token's logit after `after` forward calls of a batch."""

    def __init__(self, model, token_id, after):
        super().__init__()
        self.inner, self.token_id, self.after, self.calls = model, token_id, after, 0
        self.config = model.config  # what caches are built from

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        self.calls = 1 if kwargs["input_ids"].shape[1] > 1 else self.calls + 1  # a prefill starts a new batch
        if self.calls > self.after:
            out.logits[..., self.token_id] += 1e4
        return out


@pytest.mark.parametrize("token", ["<|im_end|>", "<|endoftext|>"])
def test_generation_stops_at_end_of_turn_and_hides_it(tiny_engine, token):
    # <|endoftext|> is also the tokenizer's unknown token (as in SmolLM2's): it must still stop
    end = tiny_engine.tokenizer.convert_tokens_to_ids(token)
    model = _PreferToken(tiny_engine.model, end, after=2)  # two free tokens, then end of turn
    outputs = Engine(model, tiny_engine.tokenizer, batch_size=4).generate_chat(CONVERSATIONS, Sampling(max_new_tokens=8))
    for output in outputs:
        assert output.finished and output.num_tokens == 3
        assert token not in output.text


def slow_logprob(model, tokenizer, context, continuation):
    """Reference: one sequence at a time, full logits, no padding."""
    c_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    k_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([c_ids + k_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(logprobs[len(c_ids) - 1 + j, tok].item() for j, tok in enumerate(k_ids))


def test_scores_match_a_one_at_a_time_reference(tiny_engine):
    contexts = [tiny_engine.render(c, assistant_prefix="The answer is:") for c in CONVERSATIONS]
    continuations = [" (A)", " (B)", " a much longer continuation of several tokens", " (A)", " hello", " Paris"]
    scores = tiny_engine.score(contexts, continuations)
    for context, continuation, score in zip(contexts, continuations, scores, strict=True):
        expected = slow_logprob(tiny_engine.model, tiny_engine.tokenizer, context, continuation)
        assert score.logprob == pytest.approx(expected, abs=1e-4)
        assert math.isclose(sum(score.token_logprobs), score.logprob, abs_tol=1e-6)


def test_an_empty_context_is_refused_not_scored(tiny_engine):
    """Nothing predicts the first token after no context: a score there is a read of some other position."""
    with pytest.raises(ValueError, match="context 0 is empty"):
        tiny_engine.score(["", tiny_engine.render(CONVERSATIONS[0])], ["hello", " (A)"])


def test_an_empty_prompt_is_refused_not_continued_from_padding(tiny_engine):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        tiny_engine.generate([tiny_engine.render(CONVERSATIONS[0]), ""], Sampling(max_new_tokens=3))


def test_progress_reports_every_item_and_token(tiny_engine):
    seen = []
    outputs = tiny_engine.generate_chat(CONVERSATIONS, Sampling(max_new_tokens=5), progress=lambda i, t: seen.append((i, t)))
    assert sum(i for i, _ in seen) == len(CONVERSATIONS)
    assert sum(t for _, t in seen) == sum(o.num_tokens for o in outputs)


@pytest.mark.slow
def test_embedded_model_knows_the_capital_of_france(smol_engine):
    answer = smol_engine.generate_chat([[{"role": "user", "content": "What is the capital of France?"}]],
                                       Sampling(max_new_tokens=24))[0]
    assert "Paris" in answer.text


def test_cascade_runs_only_where_it_was_built_for(tiny_model_dir):
    """CPU + sdpa through AttentionInterface: yes. Eager attention, or weights on another device: the
    per-row prefix copy instead (the CPU kernel that returns log-sum-exps is all cascade runs on)."""
    from cai.engine.cascade import supports_cascade
    from cai.models import load_causal_lm

    model, _ = load_causal_lm(tiny_model_dir, device="cpu")
    assert supports_cascade(model)
    model.config._attn_implementation = "eager"
    assert not supports_cascade(model)
    model.config._attn_implementation = "sdpa"
    model.config.sliding_window = 64  # queries see 64 tokens back: the prefix is not seen in full
    assert not supports_cascade(model)
    model.config.sliding_window = None
    model.to("meta")
    assert not supports_cascade(model)


def test_branch_rows_pair_sequences_that_share_tokens_within_their_limits():
    from cai.engine.hf import branch_rows

    prefix = [1, 2, 3]
    sequences = [
        prefix + [7, 7, 7, 7, 5, 6],  # 0 \ share 4 tokens past the prefix
        prefix + [9, 9, 9, 9, 9, 1],  # 1 \ share 5 ...
        prefix + [7, 7, 7, 7, 8],     # 2 /
        prefix + [9, 9, 9, 9, 9, 2],  # 3 /           ... but 3 may share only 2 of them (its limit)
        prefix + [4, 4],              # 4   alone
        prefix + [9, 9, 9, 9, 9, 3],  # 5   a third with 1 and 3: over `branches`
    ]
    limits = [len(s) - 1 for s in sequences]
    limits[3] = len(prefix) + 2
    rows = branch_rows(sequences, len(prefix), limits, min_shared=2, branches=2)
    assert sorted(i for _, members in rows for i in members) == list(range(6))  # every sequence once
    as_sets = {frozenset(members): shared for shared, members in rows}
    assert as_sets[frozenset({0, 2})] == 4
    assert as_sets[frozenset({4})] == 0
    assert all(len(members) <= 2 for _, members in rows)
    nines = [(shared, set(members)) for shared, members in rows if set(members) & {1, 3, 5}]
    # 1, 3, 5 sort together; the pair holding 3 shares at most its limit, 2 tokens
    assert sorted(len(m) for _, m in nines) == [1, 2]
    for shared, members in nines:
        if 3 in members:
            assert shared == 2
    # A limit below `min_shared` keeps a sequence alone, and so does packing that would not pay.
    alone = branch_rows(sequences, len(prefix), [len(prefix) + 1] * 6, min_shared=2, branches=2)
    assert all(len(members) == 1 and shared == 0 for shared, members in alone)
    asked = []
    unpaid = branch_rows(sequences, len(prefix), limits, min_shared=2, branches=2,
                         pays=lambda shared, rests: asked.append((shared, rests)) or False)
    assert all(len(members) == 1 for _, members in unpaid)
    assert (4, [2, 1]) in asked or (4, [1, 2]) in asked  # 0 and 2: 4 shared, then 2 and 1 tokens of their own


def test_packing_is_chosen_where_it_saves_more_than_the_masked_scores_cost(tiny_engine):
    """One row for two sequences skips the common tokens' linear layers but scores each rest against the
    other rest's keys: a judge question's two orders (long common part, short answers) pack; two long
    answers after a short common part do not."""
    backend = tiny_engine.backend
    assert backend._packing_pays(start=470, shared=44, rests=[84, 84])
    assert not backend._packing_pays(start=470, shared=30, rests=[540, 540])
    assert not backend._packing_pays(start=0, shared=8, rests=[300, 300])


@pytest.mark.parametrize("share_prefix", [True, False], ids=["prefix-once", "no-prefix"])
@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "repeated"])
def test_sequences_sharing_a_context_are_packed_into_one_row_and_score_what_they_score_alone(
        tiny_engine, cascade, share_prefix, monkeypatch):
    """A contrast judge scores two answers after one context; a judge asks one question in two orders.
    Such sequences share a row (common tokens once, each rest masked from the other): every score and
    next-token log-probability still equals the one-sequence reference, with and without the call's
    shared prefix and cascade attention, across batches and padding."""
    engine = Engine(tiny_engine.model, tiny_engine.tokenizer, batch_size=3)
    monkeypatch.setattr(engine.backend, "cascade", cascade)
    if not share_prefix:
        monkeypatch.setattr(engine.backend, "MIN_SHARED_PREFIX", 10**9)
    header = [{"role": "system", "content": "Shared few-shot block for every row of the call. " * 3}]
    contexts = [engine.render(header + c) for c in CONVERSATIONS[:3] for _ in (0, 1)] + [engine.render(CONVERSATIONS[5])]
    continuations = [" yes", " no thank you, not today", " A", " it depends on the file", " ok", " Paris", " x y"]
    rows_run = []
    handle = engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: rows_run.append(kwargs["input_ids"].shape[0]) if "attention_mask" in kwargs
        and kwargs["attention_mask"] is not None else None, with_kwargs=True)
    try:
        scores = engine.score(contexts, continuations)
        asked = [engine.render(header + [{"role": "user", "content": f"Which? (A) {x} (B) {y}"}])
                 for first, second in (("tea", "coffee"), ("a long walk by the sea", "no"))
                 for x, y in ((first, second), (second, first))]
        candidates = engine.tokenizer(" A B", add_special_tokens=False)["input_ids"]
        next_token = engine.next_token_logprobs(asked, candidates)
    finally:
        handle.remove()
    assert sum(rows_run) < len(contexts) + len(asked)  # some sequences shared a row
    for context, continuation, score in zip(contexts, continuations, scores, strict=True):
        expected = slow_logprob(engine.model, engine.tokenizer, context, continuation)
        assert score.logprob == pytest.approx(expected, abs=1e-4)
    for context, values in zip(asked, next_token, strict=True):
        ids = torch.tensor([engine.tokenizer(context, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            reference = torch.log_softmax(engine.model(ids).logits[0, -1].float(), -1)[candidates]
        assert values == pytest.approx(reference.tolist(), abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_logprobs_equal_a_full_log_softmax_in_chunks(dtype, monkeypatch):
    from cai.engine import hf as engine_module

    monkeypatch.setattr(engine_module, "LOGPROB_CHUNK_BYTES", 3 * 4 * 101)  # 3 positions a chunk: 30 -> 10 chunks
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 3, 5, 101, generator=generator) * 8).to(dtype)
    targets = torch.randint(0, 101, (2, 3, 5), generator=generator)
    expected = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    got = engine_module.target_logprobs(logits, targets)
    assert got.dtype == torch.float32 and got.shape == targets.shape
    assert torch.allclose(got, expected, atol=1e-5)


def test_large_calls_without_a_shared_prefix_use_chunked_products_and_match_the_reference(tiny_engine, monkeypatch):
    """A contrast judge's prompts share no prefix; large bf16 calls then skip the flash kernel too (here
    forced, in fp32, a few query rows a chunk). Padding queries see no key on that path: they must come
    out finite, or their NaN values would reach every query."""
    from cai.engine import cascade

    monkeypatch.setattr(cascade, "JOINT_MAX_SCORES", 0)
    monkeypatch.setattr(cascade, "CHUNKED_DTYPES", (torch.float32, torch.bfloat16))
    monkeypatch.setattr(cascade, "CHUNK_SCORES", 2000)
    monkeypatch.setattr(tiny_engine.backend, "MIN_SHARED_PREFIX", 10**9)  # no shared prefix anywhere
    without_prefix = []
    original = cascade._joint_attention

    def spy(query, prefix_keys, *args, **kwargs):
        without_prefix.append(prefix_keys is None)
        return original(query, prefix_keys, *args, **kwargs)

    monkeypatch.setattr(cascade, "_joint_attention", spy)
    contexts = [tiny_engine.render(c) for c in CONVERSATIONS]  # different lengths: padded rows
    continuations = [" yes", " no thank you", " A", " it depends on the file", " ok", " Paris"]
    scores = tiny_engine.score(contexts, continuations)
    assert without_prefix and all(without_prefix)
    for context, continuation, score in zip(contexts, continuations, scores, strict=True):
        expected = slow_logprob(tiny_engine.model, tiny_engine.tokenizer, context, continuation)
        assert score.logprob == pytest.approx(expected, abs=1e-4)
    # Generation's prefill: left-padded rows under a 2D padding mask, where padding queries see no key.
    from transformers import DynamicCache

    backend = tiny_engine.backend
    sequences = backend._encode(contexts)
    with torch.inference_mode(), backend._attention():
        out, _, _, _ = backend._prefill(sequences, DynamicCache(), logits_to_keep=3)
    for row, ids in enumerate(sequences):
        with torch.no_grad():
            alone = tiny_engine.model(torch.tensor([ids])).logits[0, -3:]
        assert torch.allclose(out.logits[row], alone, atol=1e-4)


def test_sampling_draws_tokens_with_their_probabilities_and_never_a_cut_one():
    """Inverse-CDF sampling, one uniform draw per row from the row's own generator: frequencies follow
    the softmax (and top-p's renormalised head of it), a token of probability zero never comes up."""
    from cai.engine.hf import HFBackend

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = torch.log(probs).expand(1000, -1).to(torch.bfloat16)  # -inf for the last token
    generators = [torch.Generator().manual_seed(i) for i in range(1000)]
    rows = list(range(1000))
    for top_p, expected in ((1.0, probs), (0.7, torch.tensor([0.625, 0.375, 0.0, 0.0, 0.0]))):
        picks = torch.cat([HFBackend._pick(logits, Sampling(temperature=1.0, top_p=top_p), generators, rows)
                           for _ in range(20)])
        frequencies = torch.bincount(picks, minlength=5).float() / len(picks)
        assert torch.allclose(frequencies, expected, atol=0.015), (top_p, frequencies)
        assert frequencies[expected == 0].sum() == 0
    # The same generators, reseeded, draw the same tokens: an item's text depends on its seed alone.
    again = [torch.Generator().manual_seed(i) for i in range(1000)]
    first = HFBackend._pick(logits, Sampling(temperature=1.0), [torch.Generator().manual_seed(i) for i in range(1000)], rows)
    assert torch.equal(first, HFBackend._pick(logits, Sampling(temperature=1.0), again, rows))


def test_scoring_batches_on_cpu_hold_at_most_the_token_budget_and_every_sequence_once(tiny_engine, monkeypatch):
    backend = Engine(tiny_engine.model, tiny_engine.tokenizer, batch_size=64).backend
    monkeypatch.setattr(backend, "CPU_SCORING_TOKENS", 100)
    monkeypatch.setattr(backend, "MIN_SHARED_PREFIX", 10**9)
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(5, 500, (n,), generator=generator).tolist() for n in (70, 12, 30, 30, 45, 8, 120, 20)]
    batches = list(backend._scoring_batches(sequences, [len(s) - 1 for s in sequences]))
    seen = sorted(i for rows, _, _ in batches for _, members in rows for i in members)
    assert seen == list(range(len(sequences)))
    for rows, start, _ in batches:
        widths = [shared + sum(len(sequences[i]) - start - shared for i in members) for shared, members in rows]
        assert len(rows) == 1 or len(rows) * max(widths) <= 100  # a row wider than the budget goes alone
    assert len(batches) > 1


def _flat(rows: list[list[float]]) -> list[float]:
    return [value for row in rows for value in row]


def _prefix_forwards(monkeypatch, model) -> list[int]:
    """Token counts of the model's batch-1 forwards from now on (the shared prefix's computations)."""
    lengths: list[int] = []
    forward = model.forward

    def spy(*args, **kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[0] == 1:
            lengths.append(ids.shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    return lengths


def test_a_shared_prefix_is_computed_once_across_calls_extended_and_redone_when_the_weights_change(
        tiny_model_dir, monkeypatch):
    engine = Engine.from_reference(tiny_model_dir, batch_size=4, device="cpu", precision="fp32")  # weights change below
    backend = engine.backend
    header = [{"role": "system", "content": "Shared few-shot block for every row of the batch. " * 4}]
    contexts = [engine.render(header + c) for c in CONVERSATIONS]
    candidates = engine.tokenizer(" yes no", add_special_tokens=False)["input_ids"]
    fed = _prefix_forwards(monkeypatch, engine.model)

    first = engine.next_token_logprobs(contexts, candidates)
    assert len(fed) == 1 and fed[0] > 20
    shared = fed[0]
    again = engine.next_token_logprobs(list(reversed(contexts)), candidates)
    assert len(fed) == 1, "the second call reused the first call's prefix"
    assert _flat(again) == pytest.approx(_flat(list(reversed(first))), rel=1e-4, abs=1e-5)  # rows at other positions

    with torch.no_grad():  # an in-place change, as a training step makes
        engine.model.model.layers[0].self_attn.k_proj.weight.mul_(3.0)
    changed = engine.next_token_logprobs(contexts, candidates)
    assert fed[1] == shared, "the changed model computed the prefix anew"
    assert _flat(changed) != pytest.approx(_flat(first), abs=1e-3)
    backend._prefixes.clear()
    assert _flat(engine.next_token_logprobs(contexts, candidates)) == pytest.approx(_flat(changed), abs=1e-5)
    for layer in engine.model.model.layers:  # through .data: no version bump (EMA updates, weight syncs)
        layer.self_attn.v_proj.weight.data.mul_(10.0)
    served = engine.next_token_logprobs(contexts, candidates)
    backend._prefixes.clear()
    assert _flat(engine.next_token_logprobs(contexts, candidates)) == pytest.approx(_flat(served), abs=1e-5)
    del fed[3:]

    # A call whose questions all begin alike shares more: only what it adds to the kept prefix is computed.
    longer = [{"role": "user", "content": "Answer in one word please: " + c[0]["content"]} for c in CONVERSATIONS]
    extended_contexts = [engine.render(header + [m]) for m in longer]
    extended = engine.next_token_logprobs(extended_contexts, candidates)
    extended_shared = common_prefix_length(backend._encode(extended_contexts))
    assert len(fed) == 4 and fed[3] == extended_shared - shared > 0
    backend._prefixes.clear()
    assert _flat(engine.next_token_logprobs(extended_contexts, candidates)) == pytest.approx(_flat(extended), abs=1e-5)
    assert fed[4] == extended_shared


@pytest.mark.parametrize("cascade", [True, False])
def test_generation_reuses_a_kept_prefix_with_or_without_cascade_attention(tiny_model_dir, monkeypatch, cascade):
    """Off cascade (GPUs) the prefix is copied into each row's cache, but it comes from the same memo."""
    engine = Engine.from_reference(tiny_model_dir, batch_size=4, device="cpu", precision="fp32")
    engine.backend.cascade = cascade
    header = [{"role": "system", "content": "Shared few-shot block for every row of the batch. " * 4}]
    conversations = [header + c for c in CONVERSATIONS]
    sampling = Sampling(max_new_tokens=6)
    fed = _prefix_forwards(monkeypatch, engine.model)
    first = engine.generate_chat(conversations, sampling)
    computed = len(fed)
    again = engine.generate_chat(conversations, sampling)
    assert len(fed) == computed and fed[0] > 20, "the second call computed no prefix"
    assert [g.text for g in again] == [g.text for g in first]


def test_a_kept_prefix_is_not_reused_across_an_adapter_switched_off_or_rescaled(tiny_model_dir):
    """peft's disable_adapter() and a new LoRA scale change what the model computes without touching a weight."""
    from peft import get_peft_model

    from cai.models import load_causal_lm, lora_config

    model, tokenizer = load_causal_lm(tiny_model_dir, device="cpu", dtype=torch.float32)
    model = get_peft_model(model, lora_config(4))
    model.eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    engine = Engine(model, tokenizer, batch_size=4)
    header = [{"role": "system", "content": "Shared few-shot block for every row of the batch. " * 4}]
    contexts = [engine.render(header + c) for c in CONVERSATIONS]
    candidates = tokenizer(" yes no", add_special_tokens=False)["input_ids"]
    adapted = engine.next_token_logprobs(contexts, candidates)
    with model.disable_adapter():
        base = engine.next_token_logprobs(contexts, candidates)
        engine.backend._prefixes.clear()
        assert _flat(engine.next_token_logprobs(contexts, candidates)) == pytest.approx(_flat(base), abs=1e-5)
    assert _flat(base) != pytest.approx(_flat(adapted), abs=1e-3)
    assert _flat(engine.next_token_logprobs(contexts, candidates)) == pytest.approx(_flat(adapted), abs=1e-5)
    for module in model.modules():  # a new LoRA scale (peft's set_scale) changes no weight either
        if hasattr(module, "merged_adapters"):
            module.scaling["default"] *= 3
    rescaled = engine.next_token_logprobs(contexts, candidates)
    engine.backend._prefixes.clear()
    assert _flat(rescaled) == pytest.approx(_flat(engine.next_token_logprobs(contexts, candidates)), abs=1e-5)
    assert _flat(rescaled) != pytest.approx(_flat(adapted), abs=1e-3)


def test_the_prefix_memo_keeps_the_most_recently_used_prefixes_within_its_bytes():
    from cai.engine.hf import _PrefixMemo

    def kv(length):  # one layer, 4 fp32 numbers a token for keys and as many for values: 32 bytes a token
        return [(torch.zeros(1, 1, length, 4), torch.zeros(1, 1, length, 4))]

    memo = _PrefixMemo(max_bytes=32 * 25)
    assert memo.longest([1, 2, 3], signature="w") == (0, None)
    memo.add([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], kv(10))
    memo.add([1, 2, 3, 4, 5], kv(5))
    memo.add([7, 7, 7, 7, 7, 7, 7, 7], kv(8))
    n, found = memo.longest([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], signature="w")
    assert n == 10 and found[0][0].shape[2] == 10  # the longest kept prefix, not merely the first
    assert memo.longest([1, 2, 3, 4, 5, 9], signature="w")[0] == 5
    memo.add([8] * 6, kv(6))  # 29 tokens > 25: the least recently used ([7] * 8) goes
    assert memo.longest([7] * 9, signature="w") == (0, None)
    assert memo.longest([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], signature="w")[0] == 10
    assert memo.longest([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], signature="changed weights") == (0, None)
    assert not memo.entries


def test_bf16_log_odds_are_not_rounded_to_the_grid_of_a_bf16_vocabulary_head(tiny_model_dir):
    """A judge's two option tokens both get large logits (20-30 on a real model), where a bf16 head's
    outputs step by 0.125: the log-odds between them fell on multiples of 1/8, and different pairs got
    identical soft labels. The read logits are recomputed in fp32 from the head's input: the log-odds
    come out continuous and near the fp32 model's, through `score` as through `next_token_logprobs`."""
    engines = {precision: Engine.from_reference(tiny_model_dir, batch_size=4, device="cpu", precision=precision)
               for precision in ("bf16", "fp32")}
    for engine in engines.values():
        with torch.no_grad():
            engine.model.get_output_embeddings().weight.mul_(30.0)  # logits of a real model's size
    engine = engines["bf16"]
    odds = {"bf16": [], "fp32": [], "score": []}
    for conversation in CONVERSATIONS:
        context = engine.render(conversation)
        with torch.inference_mode():
            ids = torch.tensor([engine.tokenizer(context, add_special_tokens=False)["input_ids"]])
            logits = engines["fp32"].model(ids).logits[0, -1]
        first, second = logits.topk(2).indices.tolist()  # the two likeliest: both large
        assert logits[second] > 16
        for name, e in engines.items():
            [(a, b)] = e.next_token_logprobs([context], [first, second])
            odds[name].append(a - b)
        texts = [engine.tokenizer.decode([t]) for t in (first, second)]
        if all(engine.tokenizer(t, add_special_tokens=False)["input_ids"] == [i]
               for t, i in zip(texts, (first, second), strict=True)):
            a, b = engine.score([context, context], texts)
            odds["score"].append(a.logprob - b.logprob)
    assert len(odds["score"]) >= 3
    for name in ("bf16", "score"):
        on_grid = [value for value in odds[name] if abs(value * 8 - round(value * 8)) < 1e-5]
        assert len(on_grid) <= 1, (name, odds[name])
    assert odds["bf16"] == pytest.approx(odds["fp32"], abs=0.5)


def test_scoring_works_for_a_model_whose_head_cannot_be_found(tiny_model_dir, monkeypatch):
    """No get_output_embeddings() (None): the exact-logit step is skipped, the rounded logits are read."""
    engine = Engine.from_reference(tiny_model_dir, batch_size=4, device="cpu", precision="bf16")
    contexts = [engine.render(c) for c in CONVERSATIONS]
    expected = engine.next_token_logprobs(contexts, [35, 36])
    monkeypatch.setattr(engine.model, "get_output_embeddings", lambda: None)
    got = engine.next_token_logprobs(contexts, [35, 36])
    assert _flat(got) == pytest.approx(_flat(expected), abs=0.1)
    assert len(engine.score(contexts[:2], ["A", "B"])) == 2


def test_bf16_scores_of_a_model_that_caps_its_logits_are_read_as_capped(tmp_path, tiny_model_dir):
    """Gemma 2 soft-caps the head's output: recomputing the head alone gave log-odds of 22.7 where the
    model's own (fp32) were 9.05. Such models keep the (rounded) logits the model returns."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=30.0,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)  # large logits, where the cap bites
    model.save_pretrained(tmp_path / "gemma2")
    tokenizer.save_pretrained(tmp_path / "gemma2")
    engines = {p: Engine.from_reference(str(tmp_path / "gemma2"), batch_size=4, device="cpu", precision=p)
               for p in ("bf16", "fp32")}
    context = engines["fp32"].render([{"role": "user", "content": "Is the sky blue? Answer yes or no."}])
    with torch.inference_mode():
        ids = torch.tensor([engines["fp32"].tokenizer(context, add_special_tokens=False)["input_ids"]])
        logits = engines["fp32"].model(ids).logits[0, -1]
    first, second = logits.topk(2).indices.tolist()
    odds = {p: (lambda rows: rows[0][0] - rows[0][1])(e.next_token_logprobs([context], [first, second]))
            for p, e in engines.items()}
    assert odds["bf16"] == pytest.approx(odds["fp32"], abs=0.5), odds
