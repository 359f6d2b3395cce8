"""The planner's cost model: pure functions, each with the formula it implements.

Every solver (full MILP, decomposed frontier method, exhaustive enumeration) and `hsplit plan
--check` use these functions and nothing else, so they optimise and check the same quantities.
Notation: b batch size, T sequence length, h hidden size, V vocabulary, N matmul parameters of a
block, E activation elements per token of a block, P adapter parameters (sum q*(d_in+d_out)).
docs/formulation.md states the full model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hsplit.planner.model import GPT2, ModelProfile

GIB = 2 ** 30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Per trainable adapter parameter: fp32 weight + fp32 gradient + two fp32 Adam moments (Kingma & Ba 2015).
ADAPTER_STATE_BYTES = 16
# Adapters travel between client and server in fp32 once per round (upload, then download).
ADAPTER_WIRE_BYTES = 4
# hsplitlora's merge download: factors a holder contributes per unit of rank, by aggregation mode
# (warm: its old and its new factors, W' = W + sum_h p_h s (B_h' A_h' - B_h A_h); restart: the new ones).
MERGE_RANK_FACTOR = {"warm": 2, "restart": 1}


def floor_download_bytes(floor_rank: int, shapes) -> float:
    """hsplitlora, aggregation bounded: the floor part of one block's download, 4 * floor_rank * sum over its
    planned matrices of (d_in + d_out). A client downloads rank max(q, floor_rank) on a matrix it adapts at rank q
    and floor_rank on the other matrices of its blocks; the solvers charge the bound q + floor_rank: the q part
    per adapter parameter (like the adapter sync: linear in P), this floor part per block (a constant of s)."""
    return ADAPTER_WIRE_BYTES * floor_rank * float(sum(d_in + d_out for d_in, d_out in shapes))


def block_forward_flops(model: ModelProfile, b: int, T: int) -> float:
    """Forward FLOPs of one block: b*T*(2N + 4*T*h) (PaLM, Chowdhery et al. 2022, app. B:
    2 FLOPs per matmul weight per token, plus QK^T and AV, 2*T*h each, non-causal count)."""
    return b * T * (2.0 * model.block_matmul_params() + 4.0 * T * model.hidden)


def block_backward_flops_frozen(model: ModelProfile, b: int, T: int) -> float:
    """Backward FLOPs of one block whose weights are frozen: input gradients only, b*T*(2N + 8*T*h)
    (the weight-gradient half of the usual 2x-forward backward is skipped; attention has no weights,
    so its backward costs 2x its forward)."""
    return b * T * (2.0 * model.block_matmul_params() + 8.0 * T * model.hidden)


def lora_flops_per_param(b: int, T: int) -> float:
    """LoRA FLOPs per adapter parameter and step: 6*b*T (forward x@A@B is 2*b*T*q*(d_in+d_out),
    backward twice that), i.e. the DESIGN formula 6*b*T*q*(d_in+d_out) divided by q*(d_in+d_out)."""
    return 6.0 * b * T


def head_flops(model: ModelProfile, b: int, T: int) -> float:
    """LM head forward (2*b*T*V*h) plus its input-gradient backward (2*b*T*V*h); the head is frozen."""
    return 4.0 * b * T * model.vocab * model.hidden


def classifier_head_flops(model: ModelProfile, b: int, classes: int) -> float:
    """A sequence-classification head in place of the LM head (data.task classification): one position per
    sequence, forward 2*b*C*h plus its input-gradient backward 2*b*C*h; the head is frozen."""
    return 4.0 * b * classes * model.hidden


def block_activation_elements(model: ModelProfile) -> int:
    """Activation elements per token a block keeps for its backward (SDPA attention, no T^2 scores):
    Llama: residual in, norm out, q, k, v, attention out, residual mid, norm out, gate, up, act
    = 6h + 2*kv + 3I. GPT-2: 2 residuals, 2 norms, qkv (3h), attention out, fc out, gelu out = 8h + 2I.
    Adapted from Korthikanti et al. 2022 (activation recomputation paper, sec. 4.1)."""
    h, i = model.hidden, model.intermediate
    if model.family is GPT2:
        return 8 * h + 2 * i
    return 6 * h + 2 * model.kv_dim + 3 * i


@dataclass(frozen=True)
class Coefficients:
    """Per-step and per-round constants of one model under one training setting (bytes, FLOPs)."""
    block_weight_bytes: float      # frozen weights of one block
    embedding_bytes: float         # frozen embeddings on the client
    server_frozen_bytes: float     # frozen blocks + head on the server (shared by all clients)
    block_act_bytes: float         # activations of one block that is back-propagated (client side)
    client_fixed_bytes: float      # cut activation + its gradient + one block's transient forward buffers
    server_block_act_bytes: float  # activations of one server block, with server adapters' intermediates
    server_fixed_bytes: float      # logits and their gradient (fp32) + cut buffers, per client in service
    forward_flops: float           # one block forward
    backward_flops: float          # one block backward (frozen weights)
    lora_flops_per_param: float
    head_flops: float
    cut_bytes: float               # one activation tensor at the cut (b*T*h*act_bytes)
    server_adapter_params_per_block: float  # server_rank * sum over planned modules of (d_in + d_out)


def coefficients(model: ModelProfile, modules: tuple[str, ...], max_rank: int, server_rank: int,
                 b: int, T: int, dtype: str, classes: int | None = None) -> Coefficients:
    """All constants of the cost model for one (model, modules, training) setting; `classes`: a
    classification head of that many classes replaces the LM head (its weights, FLOPs and logits)."""
    wbytes = abit = DTYPE_BYTES[dtype]
    shapes = model.module_shapes()
    width = sum(shapes[m][0] + shapes[m][1] for m in modules)
    # LoRA keeps x@A (b*T*q) per adapted matrix for B's gradient: charged at the largest rank.
    lora_act = b * T * max_rank * len(modules) * abit
    block_act = b * T * block_activation_elements(model) * abit
    cut = b * T * model.hidden * abit
    head_params, head_out, head_fl = model.head_params(), b * T * model.vocab, head_flops(model, b, T)
    if classes:         # final norm + a (classes x h) head; logits of one position per sequence
        head_params = head_params - model.vocab * model.hidden + classes * model.hidden
        head_out, head_fl = b * classes, classifier_head_flops(model, b, classes)
    return Coefficients(
        block_weight_bytes=model.block_params() * wbytes,
        embedding_bytes=model.embedding_params() * wbytes,
        server_frozen_bytes=(model.layers * model.block_params() + head_params) * wbytes,
        block_act_bytes=block_act + lora_act,
        client_fixed_bytes=2 * cut + block_act,
        server_block_act_bytes=block_act + b * T * server_rank * len(modules) * abit,
        server_fixed_bytes=2 * head_out * 4 + 2 * cut,
        forward_flops=block_forward_flops(model, b, T),
        backward_flops=block_backward_flops_frozen(model, b, T),
        lora_flops_per_param=lora_flops_per_param(b, T),
        head_flops=head_fl,
        cut_bytes=cut,
        server_adapter_params_per_block=server_rank * width,
    )


def server_step_flops(c: Coefficients, layers: int, split: int) -> float:
    """Server FLOPs for one step of a client split at `split`: blocks [split, L) forward + backward
    + server adapters' LoRA FLOPs + LM head."""
    n = layers - split
    return n * (c.forward_flops + c.backward_flops + c.lora_flops_per_param * c.server_adapter_params_per_block) \
        + c.head_flops


def server_slot_bytes(c: Coefficients, layers: int, split: int) -> float:
    """Server memory one client occupies while served: activations of its server blocks, logits,
    and its server-side adapters' weights, gradients and Adam moments."""
    n = layers - split
    return n * c.server_block_act_bytes + c.server_fixed_bytes \
        + ADAPTER_STATE_BYTES * n * c.server_adapter_params_per_block


def merge_matrix_bytes(K, d_in: int, d_out: int):
    """hsplitlora's merge download of one (d_in, d_out) matrix whose holders stack K rows of factors
    (K = sum over holders of factor x rank): the cheaper of the stacked factors, 4*K*(d_in + d_out)
    bytes, and the dense update, 4*d_in*d_out bytes (fp32); 0 when nothing was adapted (K = 0).
    Works elementwise on arrays of K."""
    K = np.asarray(K, dtype=float)
    return np.where(K > 0, ADAPTER_WIRE_BYTES * np.minimum(K * (d_in + d_out), float(d_in) * d_out), 0.0)


def link_seconds(nbytes: float, uplink_mbps: float, downlink_mbps: float) -> float:
    """Time to send `nbytes` up and the same amount down: 8*bytes/(Mbit/s * 1e6), each way."""
    return 8.0 * nbytes / (uplink_mbps * 1e6) + 8.0 * nbytes / (downlink_mbps * 1e6)
