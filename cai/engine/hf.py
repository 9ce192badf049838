"""The transformers backend: a hand-written decode loop and packed scoring, tuned for CPUs.

- prompts are sorted by length and batched (little padding), left-padded, decoded with the KV cache;
- prefill computes logits for the last position only (the vocabulary head over every prompt token would
  cost more than the layers on a small model);
- the decode cache keeps spare room at the end of each layer's keys and values, so a step writes one
  position instead of copying the whole cache (what `DynamicCache`'s torch.cat does every step);
- rows that finish are dropped from the batch and the cache as they finish, so a long straggler does
  not keep paying for the short ones;
- sampling is seeded per item (one `torch.Generator` per row), so an item's text does not depend on
  which batch it landed in or where a run resumed (exactly so in fp32; in bf16 a row's numbers can
  round differently beside other rows, which now and then changes a sampled token);
- scoring never generates: one forward pass per batch reads the log-probabilities of given
  continuations, and `next_token_logprobs` only the next-token distribution (a judge's "(A)" or "(B)");
- scoring calls compute a token prefix that all their sequences share (a judge's few-shot block) once,
  and pack two sequences that share what follows (a judge question in its two orders, a contrast
  judge's two answers after one framing) into one row, a mask keeping each rest from seeing the other;
- shared prefixes are kept across calls until a weight changes, and `generate(..., keep_cache=True)`
  keeps each row's KV cache for the next call, which prefills only what its prompts add (a revision
  after the critique the model just wrote);
- on CPU the shared prefix is attended once for the whole batch (`cascade`), not copied to each row.

Tuning constants. Each trades memory or bookkeeping for speed; the values suit a 2-8 core CPU and a
100M-8B model, and none changes a result (tests run them at extreme values against the plain path):

- `HFBackend.COMPACT_FRACTION` (0.25): finished rows are dropped from the cache once this share of the
  batch has finished; compacting copies the cache, so doing it at every finished row costs more than
  the dead rows do.
- `HFBackend.KEEP_BYTES` (2 GiB) and `PREFIX_MEMO_BYTES` (1 GiB): caps on the keys and values kept
  between calls; past them rows are recomputed, never an out-of-memory error.
- `HFBackend.MIN_SHARED_PREFIX`, `MIN_BRANCH_SHARED` (8 tokens) and `BRANCHES_PER_ROW` (2): a prefix or a
  common part shorter than this is not worth a separate pass; packing more than two branches a row
  makes each branch's queries score the others' keys for nothing.
- `HFBackend.ATTENTION_COST_FACTOR` (2.6): how much slower, per FLOP, attention runs than the linear
  layers on a CPU (softmax, masks and small products); `_packing_pays` weighs the tokens packing saves
  in the linear layers against the masked attention it adds.
- `HFBackend.CPU_SCORING_TOKENS` (2048): tokens one scoring forward holds on CPU; past about this many
  the activations leave the CPU's caches and throughput falls. Generation is not capped: decode steps
  are one token a row.
- `LOGPROB_CHUNK_BYTES` (8 MiB): logits converted to fp32 at a time when reading log-probabilities,
  so a long continuation never holds a full fp32 copy of its logits.
- `cascade.JOINT_MAX_SCORES` and `cascade.CHUNK_SCORES`: when cascade attention uses plain matrix
  products over explicit scores (small calls, and large bf16 ones chunked to stay in cache) rather than
  the flash kernel, which wins on large fp32 calls.
"""

from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from cai.engine import ContinuationScore, Generation, Sampling, stop_token_ids


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all sequences share."""
    if not sequences:
        return 0
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for other in sequences[1:]:
        n = 0
        while n < length and other[n] == first[n]:
            n += 1
        length = n
    return length


# `target_logprobs` converts this many bytes of logits to fp32 at a time.
LOGPROB_CHUNK_BYTES = 8 << 20


def target_logprobs(logits, targets, target_logits=None):
    """log softmax(logits)[target] per position, in fp32: logits (..., V) in any dtype, targets (...) of
    token ids -> (...). Equals `log_softmax(logits.float(), -1).gather(-1, targets[..., None])` without
    its two full fp32 copies of the logits (a 256-token answer holds 256 x 49k logits per row, and a
    full log-softmax over them is a large share of a contrast judge's time). Here the normaliser is a logsumexp over a few positions at a time, converted to fp32
    as they go. `target_logits` (...), when given, replace the targets' entries (`exact_logits`)."""
    import torch

    vocab = logits.shape[-1]
    flat, wanted = logits.reshape(-1, vocab), targets.reshape(-1)
    exact = None if target_logits is None else target_logits.reshape(-1, 1).float()
    out = torch.empty(wanted.shape, dtype=torch.float32, device=logits.device)
    step = max(1, LOGPROB_CHUNK_BYTES // (4 * vocab))
    for start in range(0, flat.shape[0], step):
        block = flat[start:start + step].float()
        index = wanted[start:start + step, None]
        if exact is not None:
            block.scatter_(-1, index, exact[start:start + step])
        out[start:start + step] = block.gather(-1, index).squeeze(-1) - torch.logsumexp(block, dim=-1)
    return out.view(targets.shape)


def head_gives_logits(model) -> bool:
    """Whether the vocabulary head's output is the logits as they are: not for models that scale or cap
    them afterwards (Gemma 2's final soft-capping, Cohere's logit_scale, Granite's logits_scaling), where
    `exact_logits` would be the uncapped values."""
    config = getattr(model, "config", None)
    return all(getattr(config, name, None) in (None, 1, 1.0)
               for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


def exact_logits(head, hidden, token_ids):
    """The logits of `token_ids` computed in fp32 from the hidden states the head was given: hidden (N, D),
    token_ids (N, K) -> (N, K), or None when the head's weight is not a plain matrix (4-bit) or its input
    was not seen (hidden None).

    A bf16 head rounds its output: at the magnitudes a small model's logits reach (16-32) bf16 steps
    by 0.125-0.25, so a judge's log-odds fell on a grid of quarters and different pairs got identical
    soft labels. The few logits that are read are recomputed here instead (K rows of the head per
    position: nothing next to the full head)."""
    import torch

    weight = getattr(head, "weight", None)
    if (hidden is None or weight is None or weight.dim() != 2 or weight.dtype not in (torch.bfloat16, torch.float16, torch.float32)
            or weight.shape[1] != hidden.shape[-1]):
        return None
    rows = weight[token_ids].float()  # (N, K, D)
    values = torch.einsum("nd,nkd->nk", hidden.float(), rows)
    bias = getattr(head, "bias", None)
    return values + bias[token_ids].float() if bias is not None else values


def branch_rows(sequences: Sequence[Sequence[int]], start: int, limits: Sequence[int], *, min_shared: int,
                branches: int, pays: Callable[[int, list[int]], bool] | None = None) -> list[tuple[int, list[int]]]:
    """Sequences grouped into rows that share tokens past `start`: [(shared, [i, j, ...])], every index once.

    The members of a row agree on tokens start .. start+shared-1, with `min_shared` <= shared <=
    limits[i] - start for each member i (a caller keeps the tokens it reads out of the shared part);
    at most `branches` per row, and only where `pays(shared, [each member's tokens after the shared
    ones])` says so; a sequence that shares too little with its neighbours is a row alone, with shared
    0. Neighbours are found by sorting the tokens, so the two orders of a judge question (same
    conversation and question, then the answers swapped) land in one row.
    """
    order = sorted(range(len(sequences)), key=lambda i: list(sequences[i][start:]))
    rows: list[tuple[int, list[int]]] = []
    at = 0
    while at < len(order):
        members, shared = [order[at]], limits[order[at]] - start
        first = sequences[order[at]]
        at += 1
        while at < len(order) and len(members) < branches:
            other = sequences[order[at]]
            n, most = start, min(start + shared, limits[order[at]])
            while n < most and other[n] == first[n]:
                n += 1
            rests = [len(sequences[i]) - n for i in (*members, order[at])]
            if n - start < min_shared or (pays is not None and not pays(n - start, rests)):
                break
            members.append(order[at])
            shared = n - start
            at += 1
        rows.append((shared if len(members) > 1 else 0, members))
    return rows


def _row_width(sequences: Sequence[Sequence[int]], start: int, row: tuple[int, list[int]]) -> int:
    """Tokens of a packed row (`branch_rows`) past the call's shared `start`: the common ones once, then
    each member's rest."""
    shared, members = row
    return shared + sum(len(sequences[i]) - start - shared for i in members)


def growing_cache(spare: int):
    """A `DynamicCache` whose layers keep `spare` free positions (at least) after their keys and values.

    DynamicCache appends with torch.cat, copying every layer's whole cache at every decode step: with a
    few-shot prompt of ~1000 tokens in a batch of 32 that is ~2 GB of copying per step for this 135M model,
    as much time as the step's matmuls. Here a step writes its one position into the spare room; the buffer
    is copied only when it runs out (then it grows by at least a quarter) or when the batch changes (rows
    dropped or repeated: transformers replaces the tensors, and the next update takes them over).
    """
    from transformers import DynamicCache
    from transformers.cache_utils import Cache, DynamicLayer

    class GrowingLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states) -> None:
            super().lazy_initialization(key_states, value_states)
            self._buffers = None  # (keys buffer, values buffer), shape (B, H, capacity, D)

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            length = self.get_seq_length()
            end = length + key_states.shape[-2]
            buffers = self._buffers
            stale = (buffers is None or buffers[0].shape[-2] < end or buffers[0].shape[0] != key_states.shape[0]
                     or (length and self.keys.data_ptr() != buffers[0].data_ptr()))
            if stale:
                import torch

                capacity = end + max(spare, end // 4)
                shape = (*key_states.shape[:-2], capacity, key_states.shape[-1])
                buffers = (torch.empty(shape, dtype=key_states.dtype, device=key_states.device),
                           torch.empty(shape, dtype=value_states.dtype, device=value_states.device))
                if length:
                    buffers[0][..., :length, :] = self.keys
                    buffers[1][..., :length, :] = self.values
                self._buffers = buffers
            buffers[0][..., length:end, :] = key_states
            buffers[1][..., length:end, :] = value_states
            self.keys, self.values = buffers[0][..., :end, :], buffers[1][..., :end, :]
            return self.keys, self.values

    cache = DynamicCache()
    Cache.__init__(cache, layer_class_to_replicate=GrowingLayer)
    return cache


@contextmanager
def _eval_mode(model):
    """Dropout off while generating or scoring (a model handed over mid-training is in train mode)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class _KeptRow:
    tokens: list[int]  # the tokens whose keys and values the cache held: prompt, then generated but the last
    start: int  # tokens[:start] were the batch's shared prefix, held apart (cascade); `kv` begins after it
    prefix_kv: list[tuple] | None  # that prefix's keys and values per layer, (1, H_kv, start, D); None if start is 0
    kv: list[tuple]  # per layer (keys, values), each (H_kv, len(tokens) - start, D)


def weights_signature(model) -> tuple:
    """What must not change for keys and values computed earlier to hold: every parameter's storage and
    in-place version (a training step, a load or a cast changes one), a sample of its values (an edit
    through `.data`, as EMA updates and weight syncs make, bumps no version: 64 values a tensor, summed),
    and each adapter layer's state (peft's disable_adapter(), a merge or a new LoRA scale changes what the
    model computes without any of those)."""
    import torch

    tensors = list(model.parameters())
    parameters = tuple((p.data_ptr(), p._version) for p in tensors)
    with torch.no_grad():
        sums = [p.detach().reshape(-1)[::max(1, p.numel() // 64)].float().sum() for p in tensors]
        sampled = tuple(torch.stack(sums).tolist()) if sums else ()
    adapters = tuple(_adapter_state(m) for m in model.modules() if hasattr(m, "merged_adapters"))
    return parameters, sampled, adapters


def _adapter_state(layer) -> tuple:
    """What a peft adapter layer computes with beyond its weights: on/off, which adapters, merged, scales."""
    scaling = getattr(layer, "scaling", None)  # LoRA: {adapter name: alpha / r}, changed by set_scale
    return (bool(getattr(layer, "disable_adapters", False)), tuple(getattr(layer, "active_adapters", ()) or ()),
            tuple(getattr(layer, "merged_adapters", ()) or ()),
            tuple(sorted(scaling.items())) if isinstance(scaling, dict) else ())


class _PrefixMemo:
    """Keys and values of the token prefixes recent calls shared, for the calls after them.

    A stage calls the engine chunk after chunk with prompts that start with the same few-shot block
    (a judge's ~500 tokens, a critique's ~1000): computed once per call, that block was 7% of a judge
    call's time on the embedded model. Entries hold for one weights signature (`weights_signature`):
    any change to the model empties the memo. Least recently used entries go past `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: dict[tuple, list[tuple]] = {}  # prefix tokens -> [(keys, values) per layer], oldest first
        self.signature: tuple | None = None

    def longest(self, tokens: list[int], signature: tuple) -> tuple[int, list[tuple] | None]:
        """(n, keys and values of tokens[:n]) for the longest kept prefix of `tokens`; (0, None) if none."""
        if signature != self.signature:
            self.clear()
            self.signature = signature
        best: tuple | None = None
        for kept in self.entries:
            if len(kept) <= len(tokens) and (best is None or len(kept) > len(best)) and tuple(tokens[:len(kept)]) == kept:
                best = kept
        if best is None:
            return 0, None
        self.entries[best] = self.entries.pop(best)  # most recently used last
        return len(best), self.entries[best]

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def add(self, tokens: list[int], kv: list[tuple]) -> None:
        key = tuple(tokens)
        if key in self.entries or _kv_bytes(kv) > self.max_bytes:
            return
        self.entries[key] = kv
        self.bytes += _kv_bytes(kv)
        while self.bytes > self.max_bytes:
            self.bytes -= _kv_bytes(self.entries.pop(next(iter(self.entries))))


def _kv_bytes(kv: list[tuple]) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


class _KeptRows:
    """Rows of one generate call, kept (`keep_cache=True`) so that the next call can start from them.

    A critique stage asks for a critique, then for a revision in the same conversation: the revision
    prompt is the critique prompt plus the critique the model just wrote plus a request, so most of its
    prefill was already computed once. The next call looks each of its prompts up here (`match`) and
    prefills only what follows the longest token prefix it shares with a kept row."""

    KEY_TOKENS = 8  # rows are indexed by this many tokens after their shared prefix

    def __init__(self, max_bytes: int, signature: tuple):
        self.max_bytes, self.bytes = max_bytes, 0
        self.signature = signature  # `weights_signature` of the model that computed the rows
        self.index: dict[tuple, list[_KeptRow]] = {}  # (prefix tokens, next KEY_TOKENS) -> rows
        self.prefixes: dict[int, set[tuple]] = {}  # start -> the distinct prefixes of that length

    def __bool__(self) -> bool:
        return bool(self.index)

    def add(self, tokens: list[int], start: int, prefix_kv, cache, mask, row: int) -> None:
        """Keep row `row` of `cache`: its positions are where `mask` (the row's attention mask over the
        cache) is 1, the first len(tokens) - start of them (a row fed past its end holds more)."""
        own = len(tokens) - start
        if own <= 0:
            return
        size = sum(2 * layer.keys[row, :, :own].numel() * layer.keys.element_size() for layer in cache.layers)
        if self.bytes + size > self.max_bytes:
            return
        self.bytes += size
        positions = mask.nonzero().squeeze(-1)[:own]
        kv = [(layer.keys[row].index_select(1, positions), layer.values[row].index_select(1, positions))
              for layer in cache.layers]
        prefix = tuple(tokens[:start])
        self.prefixes.setdefault(start, set()).add(prefix)
        key = (prefix, tuple(tokens[start:start + self.KEY_TOKENS]))
        self.index.setdefault(key, []).append(_KeptRow(tokens, start, prefix_kv, kv))

    def match(self, sequences: list[list[int]]):
        """How a batch of prompts can start from kept rows: (prefix keys and values, prefix length,
        [(kept row or None, tokens of it to reuse after the prefix)] per prompt), or None when nothing is
        reused. Every prompt must start with the same kept prefix, the one whose keys and values the
        batch then shares; a prompt keeps at least its last token to prefill (its logits are needed)."""
        for start, prefixes in sorted(self.prefixes.items(), reverse=True):
            head = tuple(sequences[0][:start])
            if head not in prefixes or any(len(seq) <= start or tuple(seq[:start]) != head for seq in sequences):
                continue
            reused, prefix_kv = [], None
            for seq in sequences:
                best, best_n = None, 0
                for row in self.index.get((head, tuple(seq[start:start + self.KEY_TOKENS])), ()):
                    n = common_prefix_length([seq[:len(seq) - 1], row.tokens]) - start
                    if n > best_n:
                        best, best_n = row, n
                reused.append((best, best_n))
                if best is not None:
                    prefix_kv = best.prefix_kv
            if any(n for _, n in reused):
                return prefix_kv, start, reused
        return None


class HFBackend:
    """transformers implementation of `Backend`: a hand-written decode loop over the KV cache."""

    # Compact the batch (drop finished rows from the cache) once this share of rows has finished.
    COMPACT_FRACTION = 0.25
    # generate(keep_cache=True) keeps rows' keys and values up to this many bytes; later rows are not kept.
    KEEP_BYTES = 2 << 30
    # Shared-prefix keys and values kept across calls (`_PrefixMemo`), at most this many bytes.
    PREFIX_MEMO_BYTES = 1 << 30

    def __init__(self, model, tokenizer, *, batch_size: int = 32):
        from cai.engine.cascade import supports_cascade

        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stop_ids = stop_token_ids(tokenizer, model)
        self._kept: _KeptRows | None = None  # rows the last generate call kept (keep_cache=True)
        self._token_cost: float | None = None  # `_token_cost_in_pairs`, computed once
        self._prefixes = _PrefixMemo(self.PREFIX_MEMO_BYTES)  # `_shared_prefix_cache`'s results
        # Shared prompt prefixes are attended once for the whole batch (`cascade`) where the model's
        # attention allows it; otherwise their keys and values are repeated to every row.
        self.cascade = supports_cascade(model)

    def _attention(self):
        from cai.engine.cascade import cascade_attention

        return cascade_attention(self.model) if self.cascade else nullcontext()

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]

    # -- generation ------------------------------------------------------------------------------

    def generate(self, prompts, sampling, seeds, progress, keep_cache: bool = False):
        import torch

        encoded = self._encode(prompts)
        for i, ids in enumerate(encoded):
            if not ids:  # a first token would be drawn from a padding position's logits
                raise ValueError(f"prompt {i} is empty: nothing to condition on")
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
        results: list[Generation | None] = [None] * len(prompts)
        signature = weights_signature(self.model) if keep_cache or self._kept else None
        kept = _KeptRows(self.KEEP_BYTES, signature) if keep_cache else None
        # What the previous call kept is offered to this call only: a conversation continues at the next step.
        # Only if no weight changed since: its keys and values are the old model's (a training step between).
        previous, self._kept = self._kept, None
        if previous is not None and previous.signature != signature:
            previous = None
        with _eval_mode(self.model), torch.inference_mode(), self._attention():
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                outputs = self._generate_batch([encoded[i] for i in batch], sampling, [seeds[i] for i in batch],
                                               previous, kept)
                for index, generation in zip(batch, outputs, strict=True):
                    results[index] = generation
                if progress:
                    progress(len(batch), sum(g.num_tokens for g in outputs))
        self._kept = kept
        return results  # type: ignore[return-value]

    def _generate_batch(self, sequences: list[list[int]], sampling: Sampling, seeds: list[int],
                        previous: "_KeptRows | None" = None, kept: "_KeptRows | None" = None) -> list[Generation]:
        """Generate for one batch. `previous`: rows kept by the last call, whose keys and values this batch
        reuses where its prompts start with their tokens; `kept`: where to keep this batch's rows."""
        import torch

        device = self.device
        generators = None
        if sampling.temperature > 0:
            generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        cache = growing_cache(sampling.max_new_tokens)
        reuse = previous.match(sequences) if previous else None
        if reuse is not None:
            out, attention, positions, prefix_kv = self._prefill_reusing(sequences, cache, *reuse)
        else:
            out, attention, positions, prefix_kv = self._prefill(sequences, cache, logits_to_keep=1)
        # Where each row's own keys and values begin: after the shared prefix when it is held apart (cascade).
        own_start = prefix_kv[0][0].shape[-2] if prefix_kv is not None else 0

        def keep_rows(indices: list[int]) -> None:
            for i in indices:
                row = active[i]
                kept.add(sequences[row] + generated[row][:-1], own_start, prefix_kv, cache, attention[i], i)

        shared = {"cai_shared_prefix": prefix_kv} if prefix_kv is not None else {}
        logits = out.logits[:, -1, :].float()  # (B, V)
        active = list(range(len(sequences)))  # original row of each row still in the batch
        next_position = positions[:, -1] + 1  # (B,)
        generated: list[list[int]] = [[] for _ in sequences]
        finished = [False] * len(sequences)
        for step in range(sampling.max_new_tokens):
            tokens = self._pick(logits, sampling, generators, active)  # (B_active,)
            token_list = tokens.tolist()
            for row, token in zip(active, token_list, strict=True):
                if finished[row]:  # ended earlier, still in the batch until enough rows end to compact it
                    continue
                generated[row].append(token)
                if token in self.stop_ids:
                    finished[row] = True
            keep = [i for i, row in enumerate(active) if not finished[row]]
            if not keep or step + 1 == sampling.max_new_tokens:
                break
            if len(keep) < len(active) and (len(active) - len(keep)) >= self.COMPACT_FRACTION * len(active):
                if kept is not None:
                    keep_rows([i for i in range(len(active)) if finished[active[i]]])
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                attention, next_position, tokens = attention[index], next_position[index], tokens[index]
                active = [active[i] for i in keep]
            attention = torch.cat([attention, torch.ones((len(active), 1), dtype=attention.dtype, device=device)], 1)
            out = self.model(input_ids=tokens[:, None], attention_mask=attention, position_ids=next_position[:, None],
                             past_key_values=cache, use_cache=True, **shared)
            logits = out.logits[:, -1, :].float()
            next_position = next_position + 1
        if kept is not None:  # the last tokens picked were never fed: what the cache holds ends before them
            keep_rows(list(range(len(active))))

        results = []
        for row, tokens_out in enumerate(generated):
            done = finished[row]
            visible = tokens_out[:-1] if done else tokens_out
            text = self.tokenizer.decode(visible, skip_special_tokens=True)
            results.append(Generation(text=text.strip(), num_tokens=len(tokens_out), finished=done))
        return results

    MIN_SHARED_PREFIX = 8  # tokens: a shorter common prefix is not computed apart (module docstring)

    def _prefill(self, sequences: list[list[int]], cache, logits_to_keep: int):
        """Run the prompts through the model into `cache`, computing their common prefix only once.

        Every prompt of a stage starts with the same chat-template header, and critique and judge
        prompts with the same few-shot examples: hundreds of tokens that would otherwise be computed
        once per row. The shared prefix is prefilled at batch size 1; each row's own suffix follows,
        left-padded *after* the prefix:

            [ shared prefix (P) ][ pad ... ][ suffix of row i ]      attention 1...1 0...0 1...1

        The prefix's keys and values come from `_shared_prefix_cache` (kept across calls). With cascade
        attention (`self.cascade`) they stay out of `cache`, one copy for all rows, passed to every forward
        as `cai_shared_prefix`; the attention mask then covers the suffix block only. Otherwise they are
        repeated into `cache`, one copy per row. Positions stay those of the unpadded sequence (prefix
        0..P-1, suffix P..), so the result equals a row run alone.
        Returns (model output, attention mask, position ids, prefix keys and values or None).
        """
        import torch

        device = self.device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        shared = common_prefix_length(sequences)
        shared = min(shared, min(len(s) for s in sequences) - 1)  # every row keeps >= 1 token to prefill
        if len(sequences) < 2 or shared < self.MIN_SHARED_PREFIX:
            shared = 0
        prefix_kv = self._shared_prefix_cache(sequences[0][:shared]) if shared else None
        if prefix_kv is not None and not self.cascade:  # one copy per row, in the cache (the cache copies)
            for layer, (keys, values) in enumerate(prefix_kv):
                cache.update(keys.expand(len(sequences), -1, -1, -1), values.expand(len(sequences), -1, -1, -1),
                             layer)
        in_cache = 0 if self.cascade else shared  # prefix positions the attention mask must cover
        suffixes = [seq[shared:] for seq in sequences]
        width = max(len(s) for s in suffixes)
        input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(sequences), in_cache + width), dtype=torch.long)
        attention[:, :in_cache] = 1
        positions = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, suffix in enumerate(suffixes):  # left padding within the suffix block
            input_ids[row, width - len(suffix):] = torch.tensor(suffix, dtype=torch.long)
            attention[row, in_cache + width - len(suffix):] = 1
            positions[row, width - len(suffix):] = torch.arange(shared, shared + len(suffix))
        input_ids, attention, positions = input_ids.to(device), attention.to(device), positions.to(device)
        extra = {"cai_shared_prefix": prefix_kv} if self.cascade and prefix_kv is not None else {}
        out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                         past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep, **extra)
        return out, attention, positions, (prefix_kv if extra else None)

    def _prefill_reusing(self, sequences: list[list[int]], cache, prefix_kv, start: int, reused: list):
        """`_prefill` for rows that continue rows the previous call kept: row i's first `start` tokens are
        the shared prefix (`prefix_kv`: its keys and values, held apart under cascade; None when `start`
        is 0) and its next `n_i` tokens are already computed (`reused[i]` = (kept row, n_i), or (None, 0)).
        Only the rest is run through the model. Layout of each row (cache, then this forward's block):

            [ pad ][ reused n_i ] [ pad ][ new tokens ]      attention 0..0 1..1 0..0 1..1

        Positions are those of the row run alone, so the result equals a plain prefill (a test compares).
        Returns what `_prefill` returns."""
        import torch

        device = self.device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        counts = [n for _, n in reused]
        held = max(counts)
        some_row = next(row for row, n in reused if n)
        for layer, (some_keys, _) in enumerate(some_row.kv):
            keys = some_keys.new_zeros((len(sequences), some_keys.shape[0], held, some_keys.shape[-1]))
            values = torch.zeros_like(keys)
            for i, (row, n) in enumerate(reused):
                if n:
                    keys[i, :, held - n:] = row.kv[layer][0][:, :n]
                    values[i, :, held - n:] = row.kv[layer][1][:, :n]
            cache.update(keys, values, layer)
        fresh = [seq[start + n:] for seq, n in zip(sequences, counts, strict=True)]
        width = max(len(f) for f in fresh)
        input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(sequences), held + width), dtype=torch.long)
        positions = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, (tokens, n) in enumerate(zip(fresh, counts, strict=True)):
            input_ids[i, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
            attention[i, held - n:held] = 1
            attention[i, held + width - len(tokens):] = 1
            positions[i, width - len(tokens):] = torch.arange(start + n, start + n + len(tokens))
        input_ids, attention, positions = input_ids.to(device), attention.to(device), positions.to(device)
        extra = {"cai_shared_prefix": prefix_kv} if prefix_kv is not None else {}
        out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                         past_key_values=cache, use_cache=True, logits_to_keep=1, **extra)
        return out, attention, positions, prefix_kv

    @staticmethod
    def _pick(logits, sampling: Sampling, generators, active: list[int]):
        import torch

        if sampling.temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)  # (B, V)
        if sampling.top_p < 1.0:
            sorted_probs, sorted_index = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p  # keep the top token always
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, sorted_index, sorted_probs)
        # Inverse-CDF sampling: one uniform draw per row, from that row's generator (the draw for an item
        # does not depend on its batch-mates). torch.multinomial draws an exponential variate for every
        # vocabulary entry, 49k per row and step: 21% of a sampled generation's time went there.
        uniform = torch.cat([torch.rand(1, dtype=torch.float64, generator=generators[row],
                                        device=generators[row].device) for row in active])
        cdf = probs.double().cumsum(dim=-1)  # (B, V); float64: no mass lost to rounding over 49k terms
        total = cdf[:, -1:]
        # Strictly inside [0, total): the first index whose cdf exceeds it has positive probability.
        target = torch.minimum(uniform[:, None].to(cdf.device) * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, target, right=True).squeeze(-1)

    # -- scoring ---------------------------------------------------------------------------------

    # Tuning constants: see the module docstring.
    MIN_BRANCH_SHARED = 8  # tokens past the call's prefix two sequences must share to be packed in one row
    BRANCHES_PER_ROW = 2
    ATTENTION_COST_FACTOR = 2.6  # a query-key pair's cost per FLOP against the linear layers'
    CPU_SCORING_TOKENS = 2048  # tokens (rows x padded width) one scoring forward holds on CPU

    def score(self, contexts, continuations, progress):
        import torch

        context_ids = self._encode(contexts)
        continuation_ids = self._encode(continuations)
        for i, ids in enumerate(continuation_ids):
            if not ids:
                raise ValueError(f"continuation {i} is empty: nothing to score")
        for i, ids in enumerate(context_ids):  # no position holds the logits of a first token after nothing
            if not ids:
                raise ValueError(f"context {i} is empty: nothing to condition on")
        sequences = [c + k for c, k in zip(context_ids, continuation_ids, strict=True)]
        # The logit predicting a continuation's first token sits at its context's last position: shared
        # parts (the call's prefix, a row's common tokens) end before it.
        limits = [len(c) - 1 for c in context_ids]
        results: list[ContinuationScore | None] = [None] * len(contexts)
        with _eval_mode(self.model), torch.inference_mode(), self._attention():
            for rows, start, prefix_kv in self._scoring_batches(sequences, limits):
                members = [i for _, row_members in rows for i in row_members]
                # Each continuation's tokens are predicted by the logits at its context's last token and
                # at all its own tokens but the last: read n+1 positions, the last predicting past the end.
                logits, where, hidden = self._forward_packed(sequences, rows, start, prefix_kv,
                                                             {i: len(continuation_ids[i]) + 1 for i in members})
                targets = torch.zeros(logits.shape[0], dtype=torch.long)  # 0: the past-the-end dummies
                for i in members:
                    targets[where[i]:where[i] + len(continuation_ids[i])] = torch.tensor(continuation_ids[i])
                targets = targets.to(logits.device)
                exact = self._exact_logits(logits, hidden, targets[:, None])
                picked = target_logprobs(logits, targets, None if exact is None else exact[:, 0]).tolist()
                for i in members:
                    values = picked[where[i]:where[i] + len(continuation_ids[i])]
                    results[i] = ContinuationScore(logprob=float(sum(values)), token_logprobs=values)
                if progress:
                    progress(len(members), sum(len(sequences[i]) for i in members))
        return results  # type: ignore[return-value]

    # -- next-token log-probabilities ----------------------------------------------------------------

    def next_token_logprobs(self, contexts, candidate_ids, lead_ids, progress):
        import torch

        sequences = [ids + lead_ids for ids in self._encode(contexts)]
        for i, seq in enumerate(sequences):
            if not seq:
                raise ValueError(f"context {i} is empty: nothing to condition on")
        results: list[list[float] | None] = [None] * len(sequences)
        candidates = torch.tensor(candidate_ids, dtype=torch.long, device=self.device)
        with _eval_mode(self.model), torch.inference_mode(), self._attention():
            for rows, start, prefix_kv in self._scoring_batches(sequences, [len(s) - 1 for s in sequences]):
                members = [i for _, row_members in rows for i in row_members]
                logits, where, hidden = self._forward_packed(sequences, rows, start, prefix_kv,
                                                             dict.fromkeys(members, 1))
                full = logits.float()
                exact = self._exact_logits(logits, hidden, candidates.expand(full.shape[0], -1))
                if exact is not None:
                    full[:, candidates] = exact
                picked = torch.log_softmax(full, dim=-1)[:, candidates].tolist()  # (N, C)
                for i in members:
                    results[i] = picked[where[i]]
                if progress:
                    progress(len(members), sum(len(sequences[i]) for i in members))
        return results  # type: ignore[return-value]

    def _exact_logits(self, logits, hidden, token_ids):
        """`exact_logits` where they help: a half-precision head whose output is the logits (else None,
        and the returned logits are read as they are)."""
        import torch

        if logits.dtype == torch.float32 or not head_gives_logits(self.model):
            return None
        return exact_logits(self.model.get_output_embeddings(), hidden, token_ids)

    # -- packed scoring rows ---------------------------------------------------------------------------

    def _scoring_batches(self, sequences: list[list[int]], limits: list[int]):
        """Yield (rows, start, prefix_kv) per forward pass of a scoring call, longest rows first.

        The tokens every sequence shares (a judge's few-shot block, up to each sequence's limit) are
        computed once for the whole call: `start` of them, their keys and values `prefix_kv` (None when
        too few are shared). Past them, sequences that share at least MIN_BRANCH_SHARED more tokens (the
        two orders of a judge question; a contrast judge's two answers after one framing) are packed
        into one row (`branch_rows`) where that saves work (`_packing_pays`). A batch holds up to
        `batch_size` sequences, and on CPU up to CPU_SCORING_TOKENS tokens."""
        start = min(common_prefix_length(sequences), min(limits))
        prefix_kv = None
        if len(sequences) > 1 and start >= self.MIN_SHARED_PREFIX:
            prefix_kv = self._shared_prefix_cache(sequences[0][:start])
        else:
            start = 0
        rows = branch_rows(sequences, start, limits, min_shared=self.MIN_BRANCH_SHARED,
                           branches=self.BRANCHES_PER_ROW, pays=lambda shared, rests: self._packing_pays(
                               start, shared, rests))
        rows.sort(key=lambda row: _row_width(sequences, start, row), reverse=True)
        most_tokens = self.CPU_SCORING_TOKENS if self.device.type == "cpu" else None
        batch: list[tuple[int, list[int]]] = []
        for row in rows:  # longest first: the batch's first row sets its padded width
            width = _row_width(sequences, start, batch[0] if batch else row)
            full = sum(len(m) for _, m in batch) + len(row[1]) > self.batch_size
            if batch and (full or (most_tokens is not None and (len(batch) + 1) * width > most_tokens)):
                yield batch, start, prefix_kv
                batch = []
            batch.append(row)
        if batch:
            yield batch, start, prefix_kv

    def _packing_pays(self, start: int, shared: int, rests: list[int]) -> bool:
        """Whether one row for sequences sharing `shared` tokens after a `start`-token prefix, then
        `rests` tokens each, costs less than a row each: the linear layers skip (members - 1) x shared
        tokens, attention scores rows x keys pairs either way (keys: prefix + row)."""
        together = (shared + sum(rests)) * (start + shared + sum(rests))
        apart = sum((shared + rest) * (start + shared + rest) for rest in rests)
        return (len(rests) - 1) * shared * self._token_cost_in_pairs() > together - apart

    def _token_cost_in_pairs(self) -> float:
        """A token's pass through the linear layers, in attention query-key pairs (ATTENTION_COST_FACTOR).
        From the parameter count less the embeddings (4-bit weights count packed, half: such models pack
        less eagerly, which errs on the cheap side)."""
        if self._token_cost is None:
            from cai.models import parameter_count

            config = self.model.config
            try:
                heads = config.num_attention_heads
                head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
                linear = max(parameter_count(self.model) - config.vocab_size * config.hidden_size, 1)
                pair = self.ATTENTION_COST_FACTOR * 4 * heads * head_dim * config.num_hidden_layers
                self._token_cost = 2 * linear / pair
            except (AttributeError, TypeError):  # a config without these fields: pack only when it cannot cost
                self._token_cost = 0.0
        return self._token_cost

    def _forward_packed(self, sequences: list[list[int]], rows: list[tuple[int, list[int]]], start: int,
                        prefix_kv: list[tuple] | None, reads: dict[int, int]):
        """One forward pass over packed rows; returns (logits (N, V), where, hidden (N, D)): for each member i,
        the logits at its last reads[i] tokens (the last of them predicts past its end) are logits[where[i]:
        where[i] + reads[i]], and `hidden` the head's inputs there. N is the sum of reads: the vocabulary
        head runs on those positions only.

        Every sequence's first `start` tokens are `prefix_kv` (held apart under cascade attention, else
        repeated into the cache as views); a row is its members' `shared` common tokens, then each member's
        own rest, one after the other, left-padded:

            [ pad ][ common ][ rest of member 1 ][ rest of member 2 ]

        The mask lets a rest see the prefix, the common tokens and itself (causally), never the other
        rest, and positions continue the common tokens in each rest, so each member computes what it
        would alone (tests compare). reads[i] may not exceed the member's own rest."""
        import torch
        from transformers import DynamicCache

        device = self.device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(_row_width(sequences, start, row) for row in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        segment = torch.full((len(rows), width), -1, dtype=torch.long)  # -1 pad, 0 common, g+1 member g's rest
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        keep = torch.zeros((len(rows), width), dtype=torch.bool)  # the positions whose logits are read
        where, read = {}, 0
        for row, (shared, members) in enumerate(rows):
            column = width - _row_width(sequences, start, (shared, members))
            common = sequences[members[0]][start:start + shared]
            input_ids[row, column:column + shared] = torch.tensor(common, dtype=torch.long)
            segment[row, column:column + shared] = 0
            positions[row, column:column + shared] = torch.arange(start, start + shared)
            column += shared
            for g, i in enumerate(members):
                rest = sequences[i][start + shared:]
                input_ids[row, column:column + len(rest)] = torch.tensor(rest, dtype=torch.long)
                segment[row, column:column + len(rest)] = g + 1
                positions[row, column:column + len(rest)] = torch.arange(start + shared, start + shared + len(rest))
                column += len(rest)
                keep[row, column - reads[i]:column] = True
                where[i], read = read, read + reads[i]  # the head's output is row-major: columns in order
        # query q sees key k: k no later than q, not padding, and k common or in q's own rest; padding sees itself
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        own = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])
        allowed = (causal & own & (segment[:, None, :] >= 0)) | torch.eye(width, dtype=torch.bool)
        in_cache = 0
        cache = DynamicCache()
        extra = {}
        if prefix_kv is not None and self.cascade:
            extra = {"cai_shared_prefix": prefix_kv}
        elif prefix_kv is not None:  # expanded views: copied only when the forward appends the rows to them
            in_cache = start
            cache = DynamicCache(ddp_cache_data=[(k.expand(len(rows), -1, -1, -1), v.expand(len(rows), -1, -1, -1))
                                                 for k, v in prefix_kv], config=self.model.config)
        mask = torch.ones((len(rows), 1, width, in_cache + width), dtype=torch.bool)
        mask[:, 0, :, in_cache:] = allowed
        head_inputs = []  # what the vocabulary head was given: the kept positions' hidden states
        head = self.model.get_output_embeddings()
        hook = None if head is None else head.register_forward_hook(
            lambda module, args, output: head_inputs.append(args[0] if args else None))
        try:
            out = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             position_ids=positions.to(device), past_key_values=cache, use_cache=True,
                             logits_to_keep=keep.to(device), **extra)
        finally:
            if hook is not None:
                hook.remove()
        hidden = head_inputs[-1] if head_inputs and head_inputs[-1] is not None else None
        if hidden is not None and hidden.numel() != read * hidden.shape[-1]:
            hidden = None  # a head that was given more than the kept positions: no exact logits then
        return out.logits.reshape(read, -1), where, None if hidden is None else hidden.reshape(read, -1)

    def _shared_prefix_cache(self, prefix: list[int]) -> list[tuple]:
        """Keys and values of every layer for one token prefix, each (1, kv_heads, len(prefix), head_dim).
        Kept for later calls (`_PrefixMemo`): a prefix computed before is looked up, one that extends it
        computes only the tokens it adds."""
        import torch
        from transformers import DynamicCache

        known, kv = self._prefixes.longest(prefix, weights_signature(self.model))
        if known == len(prefix):
            return kv
        # The cache appends by concatenation: the kept tensors stay as they are.
        cache = DynamicCache(ddp_cache_data=kv, config=self.model.config) if kv else DynamicCache(config=self.model.config)
        ids = torch.tensor([prefix[known:]], dtype=torch.long, device=self.device)
        self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        self._prefixes.add(prefix, kv)
        return kv
