"""Attention that reads a prefix shared by every row of a batch once, not once per row.

Every critique prompt starts with the same ~1000 tokens of few-shot examples, and so does every judge
question. Repeating that prefix's keys and values to each row of the batch (`DynamicCache`'s
`batch_repeat_interleave`) makes every decode step read one copy per row — and, on CPU, where sdpa
repeats grouped key/value heads whenever there is a mask, write three more. Cascade attention splits
each row's attention in two:

    softmax over [prefix ; own suffix]  =  merge( attention over the prefix, attention over the suffix )

The prefix part runs all rows' queries against the single (1, kv_heads, P, head_dim) copy as one
batched product; the suffix part is ordinary masked attention over the row's own cache. The two are
merged exactly by their log-sum-exps. Positions and masks are those of the row run alone, so the
result equals the plain path (tests compare them).

Usage: the engine keeps the prefix's keys and values out of the cache and passes them to the forward as
`cai_shared_prefix=[(keys, values) per layer]` inside `cascade_attention(model)`; the model's attention
modules hand that keyword on to the registered attention function (transformers' AttentionInterface).
Without the keyword the function is plain sdpa, so the switch is harmless for other calls.
"""

from __future__ import annotations

from contextlib import contextmanager

# Imported by the engine only, once torch and transformers are loaded: the module-level imports cost
# nothing then and keep them off the per-layer path of every forward.
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "cai_cascade"
_registered = False
# The last mask converted, with its conversion: transformers builds one mask per forward and hands the
# same tensor to every layer, so each forward converts it once, not once per layer.
_last_mask: tuple = (None, None, None)


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, cascade_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def supports_cascade(model) -> bool:
    """Whether cascade attention can run for `model`: on CPU (the only device it has been measured and
    tested on; it relies on PyTorch's CPU flash kernel returning log-sum-exps), for a model that routes
    attention through transformers' AttentionInterface (Llama, Qwen, Mistral, ...) with sdpa, without a
    sliding window."""
    can_set = getattr(model, "_can_set_attn_implementation", None)
    try:
        config = model.config
        # A sliding window limits how far back a query sees; the shared prefix is attended in full.
        windowed = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) is not False
        on_cpu = next(model.parameters()).device.type == "cpu"
        return (on_cpu and not windowed and bool(can_set and can_set())
                and config._attn_implementation in ("sdpa", NAME))
    except Exception:  # the check inspects source code; any failure means "not sure", so no
        return False


@contextmanager
def cascade_attention(model):
    """Route `model`'s attention through `cascade_attention_forward` for the duration of the block."""
    _register()
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous


def _flash_with_lse(query, key, value, mask, scale):
    """(output, log-sum-exp) of softmax attention on CPU; `mask` is additive (0 / -inf) or None."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, False, attn_mask=mask, scale=scale)


def _suffix_mask(attention_mask, batch, group, length, suffix, dtype, device, prefix: int = 0):
    """(additive mask (B, 1, group*L, prefix+S) of 0 / -inf, boolean (B, 1, group*L): query rows that see no
    suffix key). With `prefix`, the mask starts with that many zero columns: the shared prefix, which every
    query sees, so one fused multiply-add scores prefix and suffix keys together."""
    global _last_mask
    key = (batch, group, length, suffix, dtype, device, prefix)
    if attention_mask is not None and _last_mask[0] is attention_mask and _last_mask[1] == key:
        return _last_mask[2]
    allowed = attention_mask
    if allowed is None:  # sdpa_mask leaves it out when plain causal attention is meant
        allowed = torch.ones(length, suffix, dtype=torch.bool, device=device).tril(suffix - length)[None, None]
    allowed = allowed.expand(batch, 1, length, suffix)
    allowed = allowed[:, :, None].expand(batch, 1, group, length, suffix).reshape(batch, 1, group * length, suffix)
    additive = torch.zeros((batch, 1, group * length, prefix + suffix), dtype=dtype, device=device)
    additive[..., prefix:].masked_fill_(~allowed, float("-inf"))
    converted = (additive, ~allowed.any(-1))
    if attention_mask is not None:
        _last_mask = (attention_mask, key, converted)
    return converted


# How attention over [prefix ; suffix] is computed (tuning constants, see also cai/engine/hf.py). Up to
# JOINT_MAX_SCORES scores per layer (decode steps: a few queries per row): one softmax over scores from
# plain matrix products for the whole batch, which beats the flash kernel's per-call overhead on small
# calls. Larger calls in bf16 the same way, row by row in chunks of CHUNK_SCORES scores that stay in the
# CPU's cache (the flash kernel computes bf16 inner products at fp32 speed). Larger fp32 calls keep the
# flash kernel, which is faster than fp32 matmuls there; fp16 always does, as its matmul scores could
# overflow where the kernel accumulates in fp32.
JOINT_MAX_SCORES = 1 << 21
CHUNK_SCORES = 1 << 20
JOINT_DTYPES = (torch.float32, torch.bfloat16)
CHUNKED_DTYPES = (torch.bfloat16,)


def _joint_attention(query, prefix_keys, prefix_values, key, value, additive, scale, blind=None):
    """Attention over [shared prefix ; own suffix] as one softmax over explicitly computed scores.
    Shapes as in `cascade_attention_forward`; `additive` (B, 1, group*L, S) masks the suffix (the prefix is
    visible to every query), and for calls over JOINT_MAX_SCORES (chunked) it is (B, 1, group*L, P+S), with
    P zero columns first (`_suffix_mask(..., prefix=P)`). Scores and probabilities in the query's dtype
    (the softmax accumulates in fp32). Without a prefix (`prefix_keys` None: large calls only), `blind` (B, 1,
    group*L) marks the queries that see no key (padding): they get zeros, not the NaN of an empty
    softmax, which would reach every query through the values."""
    batch, heads, length, dim = query.shape
    kv_heads, suffix = key.shape[1], key.shape[2]
    prefix = 0 if prefix_keys is None else prefix_keys.shape[2]
    rows = heads // kv_heads * length  # query rows per key/value head and batch row
    # Scaled queries rather than scores: fewer numbers to multiply, and the scores go to the softmax as
    # they come out of the matmul (CPU softmax computes in fp32 whatever its input; no fp32 copy of them).
    grouped = (query * scale).reshape(batch, kv_heads, rows, dim)
    if prefix and batch * kv_heads * rows * (prefix + suffix) <= JOINT_MAX_SCORES:
        # (kv_heads, B*rows, D) @ (kv_heads, D, P): the one prefix copy against every row's queries.
        prefix_scores = torch.matmul(grouped.transpose(0, 1).reshape(kv_heads, batch * rows, dim),
                                     prefix_keys[0].transpose(-1, -2))
        prefix_scores = prefix_scores.view(kv_heads, batch, rows, prefix).transpose(0, 1)  # (B, H_kv, rows, P)
        suffix_scores = torch.matmul(grouped, key.transpose(-1, -2)) + additive  # (B, H_kv, rows, S)
        probs = torch.softmax(torch.cat([prefix_scores, suffix_scores], dim=-1), dim=-1)
        prefix_probs = probs[..., :prefix].transpose(0, 1).reshape(kv_heads, batch * rows, prefix)
        out = torch.matmul(prefix_probs, prefix_values[0]).view(kv_heads, batch, rows, dim).transpose(0, 1)
        out = out + torch.matmul(probs[..., prefix:], value)
    else:
        # Row by row: the row's keys after the prefix's, so each chunk is one fused multiply-add with the
        # mask (which then covers prefix and suffix: `additive` has `prefix` leading zero columns here), one
        # softmax and one product with the values. Copying the keys once per row and layer costs less than
        # concatenating every chunk's scores.
        out = torch.empty_like(grouped)
        step = max(1, CHUNK_SCORES // (kv_heads * (prefix + suffix)))  # query rows per chunk
        has_blind = [False] * batch if prefix or blind is None else blind.any(-1).flatten().tolist()
        for b in range(batch):
            keys, values = key[b], value[b]
            if prefix:
                keys = torch.cat([prefix_keys[0], keys], dim=1)
                values = torch.cat([prefix_values[0], values], dim=1)
            keys_t = keys.transpose(-1, -2)
            for r in range(0, rows, step):
                scores = torch.baddbmm(additive[b, :, r:r + step], grouped[b, :, r:r + step], keys_t)
                probs = torch.softmax(scores, dim=-1)
                if has_blind[b]:
                    probs = probs.nan_to_num(0.0)
                torch.matmul(probs, values, out=out[b, :, r:r + step])
    return out.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None


def cascade_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs):
    """AttentionInterface function. Shapes: query (B, H, L, D); key/value (B, H_kv, S, D), the rows' own
    cache; `attention_mask` (B, 1, L, S) boolean (True = attend) or None (causal over the suffix);
    `cai_shared_prefix[layer]` = keys, values (1, H_kv, P, D), attended by every query. Returns (B, L, H, D)."""
    shared = kwargs.pop("cai_shared_prefix", None)
    if shared is None:
        batch, heads, length, dim = query.shape
        if query.dtype in CHUNKED_DTYPES and batch * heads * length * key.shape[2] > JOINT_MAX_SCORES:
            # A large bf16 call without a shared prefix (a contrast judge's prompts share none): the
            # chunked products beat the flash kernel here too.
            group = heads // key.shape[1]
            additive, blind = _suffix_mask(attention_mask, batch, group, length, key.shape[2], query.dtype,
                                           query.device)
            scale = scaling if scaling is not None else dim ** -0.5
            return _joint_attention(query, None, None, key, value, additive, scale, blind)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    prefix_keys, prefix_values = shared[module.layer_idx]
    batch, heads, length, dim = query.shape
    kv_heads, suffix = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    prefix = prefix_keys.shape[-2]
    small = batch * heads * length * (prefix + suffix) <= JOINT_MAX_SCORES
    if (small and query.dtype in JOINT_DTYPES) or query.dtype in CHUNKED_DTYPES:
        # The chunked path (large calls) scores prefix and suffix keys together: its mask covers both.
        additive, _ = _suffix_mask(attention_mask, batch, group, length, suffix, query.dtype, query.device,
                                   prefix=0 if small else prefix)
        return _joint_attention(query, prefix_keys, prefix_values, key, value, additive, scale)
    additive, blind = _suffix_mask(attention_mask, batch, group, length, suffix, query.dtype, query.device)

    # Prefix: every row's queries against the one shared copy, as batch 1 with B*group*L query rows per head.
    shared_query = (query.reshape(batch, kv_heads, group * length, dim).transpose(0, 1)
                    .reshape(1, kv_heads, batch * group * length, dim))
    prefix_out, prefix_lse = _flash_with_lse(shared_query, prefix_keys, prefix_values, None, scale)
    prefix_out = prefix_out.reshape(kv_heads, batch, group * length, dim).transpose(0, 1)
    prefix_lse = prefix_lse.reshape(kv_heads, batch, group * length).transpose(0, 1)

    # Suffix: the rows' own keys, grouped heads folded into the query length so no key is repeated.
    suffix_out, suffix_lse = _flash_with_lse(query.reshape(batch, kv_heads, group * length, dim), key, value,
                                             additive, scale)
    # A query that may see none of the suffix (padding) gets lse 0 from the kernel; it must weigh nothing.
    suffix_lse = suffix_lse.masked_fill(blind, float("-inf"))

    total = torch.logaddexp(prefix_lse, suffix_lse)
    out = (prefix_out * torch.exp(prefix_lse - total)[..., None].to(prefix_out.dtype)
           + suffix_out * torch.exp(suffix_lse - total)[..., None].to(suffix_out.dtype))
    out = out.reshape(batch, heads, length, dim)
    return out.transpose(1, 2).contiguous(), None
