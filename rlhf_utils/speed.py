"""Speed and memory machinery of the PPO scripts. It computes the same numbers as the plain path (one forward of the
whole padded batch, the LM head on every response position at once) with less work: rows forwarded in groups of similar
length, each trimmed of its padding, and the LM head's log-probs a chunk of positions at a time, recomputed in the
backward pass. `--no-length-grouping --no-chunked-logprobs` switches both off (one padded forward of the batch, whole
logits); tests/test_ppo_helpers.py and tests/test_model_logits.py compare the two. Measured gains: benchmark/README.md.
"""

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def round_up(width: int, multiple: int) -> int:
    return -(-width // multiple) * multiple


def first_real_columns(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the first attended column of each row (the row length if there is none)."""
    width = attention_mask.shape[-1]
    positions = torch.where(attention_mask.bool(), torch.arange(width, device=attention_mask.device), width)
    return positions.min(-1).values


def response_hidden(
    backbone: nn.Module,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    multiple: int = 1,
) -> torch.Tensor:
    """Final hidden states at the positions that predict the response tokens (context_length-1 ... -2).
    Left-padding columns shared by the whole batch are trimmed first, keeping a width that is a multiple of
    `multiple` where the padding allows; position ids count real tokens only, so trimming and padding do not change
    the result."""
    keep = int(first_real_columns(attention_mask.any(0, keepdim=True))[0].clamp(max=context_length - 1))
    keep = max(0, query_responses.shape[1] - round_up(query_responses.shape[1] - keep, multiple))
    query_responses, attention_mask, context_length = (
        query_responses[:, keep:],
        attention_mask[:, keep:],
        context_length - keep,
    )
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    out = backbone(
        input_ids=query_responses, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return out.last_hidden_state[:, context_length - 1 : -1]


GROUP_OVERHEAD = 32
"""The cost of one more forward call, in token positions, for length_groups (measured: benchmark/README.md)."""


def length_groups(lengths: list, overhead: Optional[int] = GROUP_OVERHEAD) -> list:
    """Rows (indices) split into groups of similar length, longest first, to be forwarded one group at a time, each
    trimmed to its own longest row: the split minimises sum over groups of (rows x longest row + overhead), the token
    positions of the padded forwards plus a fixed cost per call. overhead None: one group, the plain padded batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if overhead is None:
        return [order]
    best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)  # best[j]: cost of the first j rows
    for j in range(1, len(order) + 1):
        for i in range(j):  # last group = order[i:j], whose longest row is order[i]
            cost = best[i] + overhead + (j - i) * lengths[order[i]]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def grouped_response_hidden(
    backbone: nn.Module,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    needed: torch.Tensor,
    overhead: Optional[int],
    multiple: int = 1,
) -> torch.Tensor:
    """response_hidden for the first needed[i] response positions of row i, [batch, max(needed), hidden], computed
    over length_groups: each group's columns end at its longest need (causal attention: later columns cannot change
    earlier positions) and start at its first real token. Positions past a row's need are not meaningful (zeros or
    computed); the caller masks them."""
    start = first_real_columns(attention_mask)
    lengths = (context_length + needed - start).tolist()
    width, parts, order = int(needed.max()), [], []
    for rows in length_groups(lengths, overhead):
        index = torch.tensor(rows, device=query_responses.device)
        end = context_length + int(needed[index].max())
        hidden = response_hidden(
            backbone, query_responses[index, :end], attention_mask[index, :end], context_length, multiple
        )
        parts.append(F.pad(hidden, (0, 0, 0, width - hidden.shape[1])))
        order += rows
    return torch.cat(parts)[torch.argsort(torch.tensor(order, device=query_responses.device))]


LOGITS_PER_CHUNK = 2**22
"""Logits held at once by chunked log-probs (16 MB in fp32) whatever the batch; enough positions for fast matmuls."""


def in_position_chunks(head_fn, head: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, *rest) -> tuple:
    """head_fn(head, hidden, tokens, *rest) -> per-position tensors shaped like tokens, computed over chunks of
    positions, each recomputed in the backward pass (torch.utils.checkpoint): the [batch, response, vocab] logits and
    their gradient exist one chunk at a time."""
    rows = max(1, LOGITS_PER_CHUNK // head.weight.shape[0])
    hidden_chunks = hidden.reshape(1, -1, hidden.shape[-1]).split(rows, dim=1)
    chunks = [
        torch.utils.checkpoint.checkpoint(head_fn, head, h, t, *rest, use_reentrant=False)
        for h, t in zip(hidden_chunks, tokens.reshape(1, -1).split(rows, dim=1))
    ]
    return tuple(torch.cat(parts, 1).view(tokens.shape) for parts in zip(*chunks))


def forward_in_chunks(
    forward,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    sequence_lengths: torch.Tensor,
    chunk_size: int,
) -> list:
    """forward(query_responses, attention_mask, context_length, needed) -> [rows, max(needed)] tensors, run on chunks of
    chunk_size rows of the whole padded rollout batch; the outputs right-padded with 0 to the response width and
    stacked. needed = each row's stop token + 2 (the value at sequence_length + 1 receives the score), capped at the
    width, so a row's numbers do not depend on the chunk it was generated in. Positions past the need: the caller
    masks them."""
    width = query_responses.shape[1] - context_length
    outputs = []
    for i in range(0, len(query_responses), chunk_size):
        needed = (sequence_lengths[i : i + chunk_size] + 2).clamp(max=width)
        chunk = forward(
            query_responses[i : i + chunk_size], attention_mask[i : i + chunk_size], context_length, needed
        )
        outputs.append([F.pad(out, (0, width - out.shape[1])) for out in chunk])
    return [torch.cat(parts) for parts in zip(*outputs)]
