"""Fused linear TDPO: the TDPO loss and its gradients from hidden states and LM-head
weights, without ever materializing the (N, T, V) logits of either model.

Two ops, both opaque to torch.compile (Python custom ops with fake kernels and autograd
registered right here), work on the flat list of unmasked tokens, in blocks of up to 4096
tokens by tiles of vocabulary columns sized to one byte budget (_tiles): each weight tile
is read once per block, and every matmul has the block's length.

- ``tdpo_ext::fused_linear_token_stats``: for each block, the logits tile
  ``hidden @ W[v0:v1].T (+ b)`` of both models (each in its own dtype, into buffers reused
  from tile to tile) is folded into the block's softmax states by the C++/CUDA op
  ``token_stats_tile``; ``token_stats_finish`` turns the states of whole rows into the
  per-token statistics, which are all that is kept.
- ``tdpo_ext::fused_linear_token_stats_backward``: for each block and tile, the policy
  logits are recomputed (and the reference logits only for tokens whose ``token_kl``
  gradient is nonzero: none for DPO, the rejected rows only for TDPO2); the C++/CUDA op
  ``token_stats_backward`` turns them, with the saved logsumexps, into the tile's logits
  gradient ``a (onehot(y) - p) + b (p - q)``, and two matmuls into the tile's rows of the
  weight gradient and the block's hidden-state gradient.

Masked tokens (prompt, padding) are gathered out first, so they cost neither memory nor
matmul work. The row reduction and the pairwise loss are those of tdpo_loss
(``sequence_result`` and ``pairwise_output`` in ops.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _C
from .lm_head import FLOAT_DTYPES
from .ops import (TDPOOutput, _check_hyper, _check_labels, _empty_token_stats, pairwise_output,
                  sequence_result, shift_labels)

__all__ = ["fused_linear_sequence_stats", "fused_linear_tdpo_loss", "auto_chunk_size",
           "CHUNK_BUDGET_BYTES"]

# Bytes that the working set of one step may take, per device type (see auto_chunk_size).
CHUNK_BUDGET_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}
_DEFAULT_BUDGET = 64 << 20


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _bytes_per_token(vocab: int, h_pol: int, h_ref: int, p: int, r: int) -> int:
    """auto_chunk_size's per_token: one token's logits rows (and hidden rows), p and r
    the policy's and the reference's itemsizes."""
    return vocab * (2 * p + r) + 2 * (h_pol * p + h_ref * r)


def auto_chunk_size(vocab: int, policy_hidden_size: int, ref_hidden_size: Optional[int] = None,
                    policy_dtype: torch.dtype = torch.float32,
                    ref_dtype: Optional[torch.dtype] = None,
                    device: torch.device | str = "cpu") -> int:
    """Tokens per chunk when chunk_size is None: as many as fit the byte budget
    CHUNK_BUDGET_BYTES[device type] (64 MiB on CPU, 256 MiB on CUDA) at

        per_token = V * (2 p + r) + 2 * (H_pol p + H_ref r)      (p, r: itemsizes)
        chunk = max(1, budget // per_token), rounded down to a multiple of 8 if >= 8

    chunk * per_token bytes is what chunk tokens' whole logits rows (and hidden rows)
    would take; the forward and backward size their token blocks and vocabulary tiles to
    those bytes (_tiles), whatever their shape. The rule depends
    on V, H and the dtypes only, never on N * T: the extra memory is bounded whatever the
    batch."""
    ref_hidden_size = policy_hidden_size if ref_hidden_size is None else ref_hidden_size
    ref_dtype = policy_dtype if ref_dtype is None else ref_dtype
    p, r = _itemsize(policy_dtype), _itemsize(ref_dtype)
    per_token = _bytes_per_token(vocab, policy_hidden_size, ref_hidden_size, p, r)
    budget = CHUNK_BUDGET_BYTES.get(torch.device(device).type, _DEFAULT_BUDGET)
    chunk = max(1, budget // per_token)
    return chunk - chunk % 8 if chunk >= 8 else chunk


def _chunk_for(chunk_size: int, n_tokens: int, policy_weight: Tensor, ref_weight: Tensor) -> int:
    """chunk_size, or the automatic one where chunk_size is 0; never above n_tokens."""
    if chunk_size <= 0:
        chunk_size = auto_chunk_size(policy_weight.shape[0], policy_weight.shape[1],
                                     ref_weight.shape[1], policy_weight.dtype, ref_weight.dtype,
                                     policy_weight.device)
    return max(1, min(chunk_size, n_tokens))


def _tile_buffers(elements: int, dtypes, device) -> list[Tensor]:
    """Flat buffers of `elements` values of each dtype, carved from one allocation, for
    the logits tiles that every (block, tile) step rewrites. One block, rather than one
    per buffer, is large enough (>= 32 MiB at the shapes where memory matters) that glibc
    maps it afresh and gives it back when freed, instead of keeping it in its heap, where
    the freed blocks of one phase may not fit the next (its adaptive mmap threshold
    otherwise moves every block under 32 MiB into the heap)."""
    sizes = [elements * _itemsize(d) for d in dtypes]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + (size + 63) // 64 * 64)
    block = torch.empty(offsets[-1], dtype=torch.uint8, device=device)
    return [block[o:o + n].view(d) for o, n, d in zip(offsets, sizes, dtypes)]


def _logits_tile(buffer: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                 v0: int, v1: int, scale: float, softcap: float) -> Tensor:
    """The logits of vocabulary columns [v0, v1), softcap(scale * (hidden @ weight[v0:v1].T
    + bias[v0:v1])) with softcap(z) = c * tanh(z / c) (none where c is 0), written into the
    front of a flat preallocated buffer, as (1, rows, v1 - v0): the (N, T, V) layout the
    token-stats ops take, one batch row of tokens."""
    out = buffer[:hidden.shape[0] * (v1 - v0)].view(hidden.shape[0], v1 - v0)
    if bias is None:
        torch.mm(hidden, weight[v0:v1].t(), out=out)
    else:
        torch.addmm(bias[v0:v1], hidden, weight[v0:v1].t(), out=out)
    if scale != 1.0:
        out.mul_(scale)
    if softcap:
        out.div_(softcap).tanh_().mul_(softcap)
    return out.unsqueeze(0)


def _through_logit_transform(grad: Tensor, logits: Tensor, scale: float, softcap: float):
    """The gradient w.r.t. the head's linear output from the gradient w.r.t. the logits
    that _logits_tile made of it: times scale * (1 - (logits / c)^2). Overwrites logits
    (the tile buffer, rewritten by the next tile anyway)."""
    if softcap:
        grad.mul_(logits.div_(softcap).square_().neg_().add_(1))
    if scale != 1.0:
        grad.mul_(scale)


def _tiles(chunk: int, n_tokens: int, policy_weight: Tensor, ref_weight: Tensor, *,
           backward: bool):
    """(tokens per block, vocabulary columns per tile) of the forward or the backward,
    within the bytes of `chunk` tokens' whole rows (auto_chunk_size's per_token * chunk).

    A forward step holds the block's gathered hidden rows of both models and its softmax
    states, and a tile of each model's logits; a backward step holds the gathered hidden
    rows, a float32 accumulator of the block's hidden-state gradient and one product to add
    to it, and a tile of each model's logits and of the logits gradient. Blocks are as long
    as 4096 tokens where the budget allows, so that each weight tile is read once per block
    and the matmuls have long dimensions; a block halves until its tiles are at least 256
    columns wide (or the whole vocabulary)."""
    (vocab, h_pol), h_ref = policy_weight.shape, ref_weight.shape[1]
    p, r = _itemsize(policy_weight.dtype), _itemsize(ref_weight.dtype)
    budget = chunk * _bytes_per_token(vocab, h_pol, h_ref, p, r)
    if backward:
        per_row, per_element = h_pol * (2 * p + 4) + h_ref * r, 2 * p + r
    else:
        per_row, per_element = h_pol * p + h_ref * r + 64, p + r
    block = min(n_tokens, 4096)
    while True:
        tile = (budget - block * per_row) // (block * per_element)
        if tile >= min(vocab, 256) or block == 1:
            return block, max(1, min(vocab, tile))
        block = max(1, block // 2)


# ---------------------------------------------------------------------------------------
# The ops

def _check_targets_in_vocab(targets_flat: Tensor, idx: Tensor, vocab: int, seq_len: int,
                            ignore_index: int):
    """The ops' error, with the label's place in the batch, for an unmasked label outside
    the vocabulary (the tiled ops cannot check labels, and the whole-row kernel would
    name a position inside a block)."""
    t = targets_flat.index_select(0, idx)
    bad = (t < 0) | (t >= vocab)
    if bool(bad.any()):
        first = int(idx[bad.nonzero()[0, 0]])
        row, position = divmod(first, seq_len)
        raise ValueError(_C.bad_label_message(row, position, int(targets_flat[first]), vocab,
                                              ignore_index))


@torch.library.custom_op("tdpo_ext::fused_linear_token_stats", mutates_args=())
def _fused_linear_token_stats(policy_hidden: Tensor, policy_weight: Tensor,
                              policy_bias: Optional[Tensor], ref_hidden: Tensor,
                              ref_weight: Tensor, ref_bias: Optional[Tensor], targets: Tensor,
                              ignore_index: int, chunk_size: int, logit_scale: float,
                              logit_softcap: float, policy_metrics: bool = False
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                         Tensor]:
    """The eight outputs of token_stats (logp_pol, logp_ref, token_kl, lse_pol, lse_ref,
    and the policy metrics entropy, logit_mean, label_is_argmax: (N, T) with
    policy_metrics, empty without), shaped like targets (N, T) (already shifted), 0 where
    masked: token_stats of the logits softcap(scale * (hidden @ weight.T + bias)) of each
    model (_logits_tile), computed block by block and tile by tile."""
    seq_len = targets.shape[-1]
    tgt = targets.reshape(-1)
    hp = policy_hidden.reshape(-1, policy_hidden.shape[-1])
    hr = ref_hidden.reshape(-1, ref_hidden.shape[-1])
    outs = [o.zero_() for o in _empty_token_stats(targets, targets, policy_metrics)]
    # Every output that has a value per token is filled block by block.
    filled = [o.view(-1) for o in outs if o.shape == targets.shape]
    idx = (tgt != ignore_index).nonzero().squeeze(1)
    if idx.numel() == 0:
        return tuple(outs)
    vocab = policy_weight.shape[0]
    _check_targets_in_vocab(tgt, idx, vocab, seq_len, ignore_index)
    chunk = _chunk_for(chunk_size, idx.numel(), policy_weight, ref_weight)
    block, tile = _tiles(chunk, idx.numel(), policy_weight, ref_weight, backward=False)
    pol_buf, ref_buf = _tile_buffers(block * tile, (policy_hidden.dtype, ref_hidden.dtype),
                                     policy_hidden.device)
    with torch.autocast(policy_hidden.device.type, enabled=False):
        for start in range(0, idx.numel(), block):
            i = idx[start:start + block]
            h_pol, h_ref = hp.index_select(0, i), hr.index_select(0, i)
            y = tgt.index_select(0, i).unsqueeze(0)
            state = None
            for v0 in range(0, vocab, tile):
                v1 = min(vocab, v0 + tile)
                state = torch.ops.tdpo_ext.token_stats_tile(
                    _logits_tile(pol_buf, h_pol, policy_weight, policy_bias, v0, v1,
                                 logit_scale, logit_softcap),
                    _logits_tile(ref_buf, h_ref, ref_weight, ref_bias, v0, v1,
                                 logit_scale, logit_softcap),
                    y, ignore_index, v0, state, policy_metrics)
            stats = torch.ops.tdpo_ext.token_stats_finish(state, y, ignore_index)
            for out, stat in zip(filled, stats):
                out.index_copy_(0, i, stat[0])
    return tuple(outs)


@_fused_linear_token_stats.register_fake
def _fused_linear_token_stats_fake(policy_hidden, policy_weight, policy_bias, ref_hidden,
                                   ref_weight, ref_bias, targets, ignore_index, chunk_size,
                                   logit_scale, logit_softcap, policy_metrics=False):
    return _empty_token_stats(targets, targets, policy_metrics)


@torch.library.custom_op("tdpo_ext::fused_linear_token_stats_backward", mutates_args=())
def _fused_linear_token_stats_backward(
        grad_logp_pol: Tensor, grad_token_kl: Tensor, policy_hidden: Tensor,
        policy_weight: Tensor, policy_bias: Optional[Tensor], ref_hidden: Tensor,
        ref_weight: Tensor, ref_bias: Optional[Tensor], targets: Tensor, lse_pol: Tensor,
        lse_ref: Tensor, ignore_index: int, chunk_size: int, logit_scale: float,
        logit_softcap: float, need_hidden: bool,
        need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_policy_hidden, grad_policy_weight, grad_policy_bias) from the upstream
    gradients of logp_pol and token_kl; a gradient not needed is an empty tensor."""
    tgt = targets.reshape(-1)
    hp = policy_hidden.reshape(-1, policy_hidden.shape[-1])
    hr = ref_hidden.reshape(-1, ref_hidden.shape[-1])
    g_lp = grad_logp_pol.reshape(-1).to(torch.float32)
    g_kl = grad_token_kl.reshape(-1).to(torch.float32)
    lse_p, lse_r = lse_pol.reshape(-1), lse_ref.reshape(-1)
    vocab = policy_weight.shape[0]
    dev = policy_hidden.device

    grad_hidden = (torch.zeros_like(hp) if need_hidden
                   else policy_hidden.new_empty(0))
    # The weight gradient is accumulated in place, tile after tile, in the weight's dtype.
    grad_weight = (torch.zeros_like(policy_weight) if need_weight
                   else policy_weight.new_empty(0))
    grad_bias = (torch.zeros(vocab, dtype=torch.float32, device=dev) if need_bias
                 else policy_weight.new_empty(0))
    if not (need_hidden or need_weight or need_bias):
        return grad_hidden, grad_weight, grad_bias

    # Tokens with a zero gradient (masked ones, and e.g. pairs whose loss gets none)
    # contribute nothing. Those whose KL gradient is 0 (TDPO2's chosen rows; all, for DPO)
    # need no reference logits: they form blocks of their own, which pass the policy
    # logits as the reference ones (token_stats_backward never reads the reference row of
    # a token whose KL gradient is 0).
    has_kl = g_kl != 0
    useful = (tgt != ignore_index) & ((g_lp != 0) | has_kl)
    groups = [((has_kl & useful).nonzero().squeeze(1), True),
              ((~has_kl & useful).nonzero().squeeze(1), False)]
    n_active = sum(int(tokens.numel()) for tokens, _ in groups)
    if n_active == 0:
        return _finish_grads(grad_hidden, grad_weight, grad_bias, policy_hidden, policy_bias,
                             policy_weight, need_hidden, need_bias)
    chunk = _chunk_for(chunk_size, n_active, policy_weight, ref_weight)
    # One cut for both groups, from their total: for TDPO2 each group is half the tokens
    # and its blocks use half the budget (measured: 32 MiB live at SmolLM2's shapes, where
    # cutting each group to its size gave 64 MiB and no faster step).
    block, tile = _tiles(chunk, n_active, policy_weight, ref_weight, backward=True)
    pol_buf, ref_buf = _tile_buffers(block * tile, (policy_hidden.dtype, ref_hidden.dtype), dev)
    with torch.autocast(dev.type, enabled=False):
        for tokens, need_ref in groups:
            for start in range(0, tokens.numel(), block):
                i = tokens[start:start + block]
                h = hp.index_select(0, i)
                h_ref = hr.index_select(0, i) if need_ref else None
                a, b, y, lse_p_i, lse_r_i = (t.index_select(0, i).unsqueeze(0)
                                             for t in (g_lp, g_kl, tgt, lse_p, lse_r))
                grad_h_block = (torch.zeros(h.shape, dtype=torch.float32, device=dev)
                                if need_hidden else None)
                for v0 in range(0, vocab, tile):
                    v1 = min(vocab, v0 + tile)
                    pol = _logits_tile(pol_buf, h, policy_weight, policy_bias, v0, v1,
                                       logit_scale, logit_softcap)
                    ref = (_logits_tile(ref_buf, h_ref, ref_weight, ref_bias, v0, v1,
                                        logit_scale, logit_softcap)
                           if need_ref else pol)
                    g = torch.ops.tdpo_ext.token_stats_backward(
                        a, b, pol, ref, y, lse_p_i, lse_r_i, ignore_index, v0)[0]
                    _through_logit_transform(g, pol[0], logit_scale, logit_softcap)
                    if need_bias:
                        grad_bias[v0:v1] += g.sum(0, dtype=torch.float32)
                    if need_weight:
                        grad_weight[v0:v1].addmm_(g.t(), h)
                    if need_hidden:
                        grad_h_block += torch.mm(g, policy_weight[v0:v1])
                    del g
                if need_hidden:
                    grad_hidden.index_copy_(0, i, grad_h_block.to(grad_hidden.dtype))
    return _finish_grads(grad_hidden, grad_weight, grad_bias, policy_hidden, policy_bias,
                         policy_weight, need_hidden, need_bias)


def _finish_grads(grad_hidden, grad_weight, grad_bias, policy_hidden, policy_bias,
                  policy_weight, need_hidden, need_bias):
    if need_hidden:
        grad_hidden = grad_hidden.view(policy_hidden.shape)
    if need_bias:
        grad_bias = grad_bias.to(policy_bias.dtype if policy_bias is not None
                                 else policy_weight.dtype)
    return grad_hidden, grad_weight, grad_bias


@_fused_linear_token_stats_backward.register_fake
def _fused_linear_token_stats_backward_fake(grad_logp_pol, grad_token_kl, policy_hidden,
                                            policy_weight, policy_bias, ref_hidden, ref_weight,
                                            ref_bias, targets, lse_pol, lse_ref, ignore_index,
                                            chunk_size, logit_scale, logit_softcap,
                                            need_hidden, need_weight, need_bias):
    grad_hidden = policy_hidden.new_empty(policy_hidden.shape if need_hidden else (0,))
    grad_weight = policy_weight.new_empty(policy_weight.shape if need_weight else (0,))
    if need_bias:
        dtype = policy_bias.dtype if policy_bias is not None else policy_weight.dtype
        grad_bias = policy_weight.new_empty((policy_weight.shape[0],), dtype=dtype)
    else:
        grad_bias = policy_weight.new_empty((0,))
    return grad_hidden, grad_weight, grad_bias


def _fused_setup_context(ctx, inputs, output):
    (policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight, ref_bias, targets,
     ignore_index, chunk_size, logit_scale, logit_softcap, _) = inputs
    lse_pol, lse_ref = output[3], output[4]
    ctx.save_for_backward(policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight,
                          ref_bias, targets, lse_pol, lse_ref)
    ctx.settings = (ignore_index, chunk_size, logit_scale, logit_softcap)
    # logp_ref, the logsumexps and the policy metrics carry no gradient.
    ctx.mark_non_differentiable(output[1], lse_pol, lse_ref, *output[5:])


def _fused_backward(ctx, grad_logp_pol, grad_logp_ref, grad_token_kl, grad_lse_pol,
                    grad_lse_ref, grad_entropy, grad_logit_mean, grad_label_is_argmax):
    # Only logp_pol and token_kl depend on the policy; nothing flows into the reference.
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    nothing = (None,) * 12
    if (grad_logp_pol is None and grad_token_kl is None) or not (
            need_hidden or need_weight or need_bias):
        return nothing
    (policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight, ref_bias, targets,
     lse_pol, lse_ref) = ctx.saved_tensors
    if grad_logp_pol is None:
        grad_logp_pol = torch.zeros_like(lse_pol)
    if grad_token_kl is None:
        grad_token_kl = torch.zeros_like(lse_pol)
    need_bias = bool(need_bias and policy_bias is not None)
    grad_hidden, grad_weight, grad_bias = torch.ops.tdpo_ext.fused_linear_token_stats_backward(
        grad_logp_pol, grad_token_kl, policy_hidden, policy_weight, policy_bias, ref_hidden,
        ref_weight, ref_bias, targets, lse_pol, lse_ref, *ctx.settings,
        bool(need_hidden), bool(need_weight), need_bias)
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            grad_bias if need_bias else None, *nothing[3:])


_fused_linear_token_stats.register_autograd(_fused_backward, setup_context=_fused_setup_context)


# ---------------------------------------------------------------------------------------
# Public function

def _check_model_inputs(name: str, hidden, weight, bias, labels) -> None:
    for what, t in ((f"{name}_hidden", hidden), (f"{name}_weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tdpo_ext: {what} must be a tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"tdpo_ext: {what} must be float32, bfloat16 or float16, got "
                            f"{t.dtype}")
    if hidden.dim() != 3:
        raise ValueError(f"tdpo_ext: {name}_hidden must have shape (N, T, H), got "
                         f"{tuple(hidden.shape)}")
    if tuple(hidden.shape[:2]) != tuple(labels.shape):
        raise ValueError(f"tdpo_ext: labels shape {tuple(labels.shape)} does not match the "
                         f"(N, T) of {name}_hidden {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"tdpo_ext: {name}_weight must have shape (V, H) with H = "
                         f"{hidden.shape[2]} (from {name}_hidden), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"tdpo_ext: {name}_hidden is {hidden.dtype} but {name}_weight is "
                        f"{weight.dtype}; cast one to the other (the logits are computed in "
                        "that dtype, as the model's LM head would)")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"tdpo_ext: {name}_bias must have shape (V,) = "
                             f"({weight.shape[0]},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else bias}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"tdpo_ext: {name}_bias is {bias.dtype} but {name}_weight is "
                            f"{weight.dtype}")


def fused_linear_sequence_stats(policy_hidden: Tensor, policy_weight: Tensor,
                                ref_hidden: Tensor, ref_weight: Tensor, labels: Tensor, *,
                                policy_bias: Optional[Tensor] = None,
                                ref_bias: Optional[Tensor] = None, ignore_index: int = -100,
                                average_log_prob: bool = False,
                                chunk_size: Optional[int] = None, logit_scale: float = 1.0,
                                logit_softcap: Optional[float] = None,
                                policy_metrics: bool = False):
    """sequence_stats of the logits ``softcap(logit_scale * (hidden @ weight.T + bias))``
    of each model, computed a block of tokens by a tile of vocabulary columns at a time,
    so that neither (N, T, V) logits tensor ever exists.

    Args:
        policy_hidden, ref_hidden: (N, T, H_pol) and (N, T, H_ref) final hidden states
            (what the LM head reads), each in its model's dtype (float32, bfloat16 or
            float16); the two models may differ in H and dtype.
        policy_weight, ref_weight: (V, H) LM-head weights, same dtype as their hidden
            states; V must agree.
        labels: (N, T) int64: the hidden state at t predicts labels at t + 1;
            ``ignore_index`` masks.
        policy_bias, ref_bias: optional (V,) LM-head biases.
        ignore_index, average_log_prob: as for sequence_stats.
        chunk_size: the working memory, as a number of tokens whose whole logits rows
            it would hold (blocks and tiles are cut to those bytes); None picks
            auto_chunk_size(V, H, ...), which bounds the extra memory by a fixed budget
            whatever N * T.
        logit_scale, logit_softcap: what some models do to the head's output, for both
            models: multiply by logit_scale (Cohere's logit_scale, Granite's
            1 / logits_scaling, ...), then, if logit_softcap is set, c * tanh(z / c)
            (Gemma 2's final_logit_softcapping); lm_head.logit_transform_of reads them
            from a transformers model.
        policy_metrics: as for sequence_stats (the metrics of the transformed logits).

    Returns:
        (logps_margin, seq_kl, policy_logps), float32 (N,) each, equal to sequence_stats
        on the materialized logits up to float32 rounding, and with policy_metrics the
        PolicyTokenMetrics as a fourth element. Differentiable w.r.t. policy_hidden,
        policy_weight and policy_bias; nothing flows into the reference.
    """
    _check_labels(labels)
    _check_model_inputs("policy", policy_hidden, policy_weight, policy_bias, labels)
    _check_model_inputs("ref", ref_hidden, ref_weight, ref_bias, labels)
    if ref_weight.shape[0] != policy_weight.shape[0]:
        raise ValueError(f"tdpo_ext: vocabulary mismatch: policy_weight has V="
                         f"{policy_weight.shape[0]} but ref_weight has V={ref_weight.shape[0]}")
    devices = {t.device for t in (policy_hidden, policy_weight, ref_hidden, ref_weight, labels,
                                  policy_bias, ref_bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"tdpo_ext: all inputs must be on one device, got {sorted(map(str, devices))}")
    if chunk_size is None:
        chunk_size = 0  # automatic (auto_chunk_size), worked out inside the ops
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"tdpo_ext: chunk_size must be a positive int or None, got {chunk_size!r}")
    if not (math.isfinite(logit_scale) and logit_scale != 0):
        raise ValueError(f"tdpo_ext: logit_scale must be finite and nonzero, got {logit_scale}")
    if logit_softcap is not None and not (math.isfinite(logit_softcap) and logit_softcap > 0):
        raise ValueError(f"tdpo_ext: logit_softcap must be None or > 0, got {logit_softcap}")

    targets = shift_labels(labels, ignore_index)
    stats = torch.ops.tdpo_ext.fused_linear_token_stats(
        policy_hidden, policy_weight, policy_bias, ref_hidden.detach(), ref_weight.detach(),
        None if ref_bias is None else ref_bias.detach(), targets, ignore_index, chunk_size,
        float(logit_scale), float(logit_softcap or 0.0), bool(policy_metrics))
    return sequence_result(stats, targets, ignore_index, average_log_prob, policy_metrics)


def fused_linear_tdpo_loss(policy_hidden: Tensor, policy_weight: Tensor, ref_hidden: Tensor,
                           ref_weight: Tensor, labels: Tensor, *,
                           policy_bias: Optional[Tensor] = None,
                           ref_bias: Optional[Tensor] = None, beta: float = 0.1,
                           alpha: float = 0.5, variant: str = "tdpo2", ignore_index: int = -100,
                           average_log_prob: bool = False, chunk_size: Optional[int] = None,
                           logit_scale: float = 1.0, logit_softcap: Optional[float] = None,
                           policy_metrics: bool = False) -> TDPOOutput:
    """tdpo_loss of the logits ``softcap(logit_scale * (hidden @ weight.T + bias))`` of
    each model, without ever materializing them: labels as for tdpo_loss (N = 2B rows,
    chosen first, then rejected), beta, alpha and variant as there, everything else as
    for fused_linear_sequence_stats.

    Returns:
        TDPOOutput, equal to tdpo_loss on the materialized logits up to float32 rounding
        (with policy_metrics, its policy_metrics field set, as tdpo_loss's).
    """
    _check_hyper(beta, variant)
    _check_labels(labels)
    if labels.shape[0] % 2:
        raise ValueError("tdpo_ext: fused_linear_tdpo_loss needs an even number of rows "
                         f"(B chosen, then B rejected), got N={labels.shape[0]}")
    stats = fused_linear_sequence_stats(
        policy_hidden, policy_weight, ref_hidden, ref_weight, labels, policy_bias=policy_bias,
        ref_bias=ref_bias, ignore_index=ignore_index, average_log_prob=average_log_prob,
        chunk_size=chunk_size, logit_scale=logit_scale, logit_softcap=logit_softcap,
        policy_metrics=policy_metrics)
    return pairwise_output(*stats, beta=beta, alpha=alpha, variant=variant)
