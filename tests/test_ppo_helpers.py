"""Unit tests of the helpers of ppo_rlhf.py: each one is compared with a plain, obviously-correct computation (Python
loops, the full Hugging Face forward, Hugging Face generate) on random tensors or tiny random models."""

import dataclasses
import json
import os
import random
import time

import numpy as np
import pytest
import torch
from helpers import ROOT
from rlhf_utils import models, speed  # noqa: E402  (helpers puts the repository root on sys.path)

import ppo_rlhf  # noqa: E402
from rlhf_utils.checkpoints import changed_arguments

EMBEDDED = os.path.join(ROOT, "embedded")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def random_mask(shape, generator, p=0.7):
    mask = torch.rand(shape, generator=generator) < p
    mask.view(-1)[0] = True
    mask.view(-1)[-1] = True  # at least two valid entries
    return mask


# ---------------------------------------------------------------------------------------------------------------
# masked statistics


def plain_masked_values(values, mask):
    return [v for v, m in zip(values.flatten().tolist(), mask.flatten().tolist()) if m]


@pytest.mark.parametrize("seed", range(3))
def test_masked_mean_and_unbiased_var_match_loops(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(5, 9, generator=g, dtype=torch.float64) * 3 + 1
    mask = random_mask(values.shape, g)
    kept = plain_masked_values(values, mask)
    mean = sum(kept) / len(kept)
    var = sum((v - mean) ** 2 for v in kept) / (len(kept) - 1)
    assert ppo_rlhf.masked_mean(values, mask).item() == pytest.approx(mean, rel=1e-10)
    assert ppo_rlhf.masked_mean(values, mask.float()).item() == pytest.approx(mean, rel=1e-10)
    assert ppo_rlhf.masked_var(values, mask).item() == pytest.approx(var, rel=1e-10)
    assert ppo_rlhf.masked_var(values, mask, unbiased=False).item() == pytest.approx(
        var * (len(kept) - 1) / len(kept), rel=1e-10
    )
    # values under the mask do not matter
    changed = values.masked_fill(~mask, 1e6)
    assert ppo_rlhf.masked_mean(changed, mask).item() == pytest.approx(mean, rel=1e-10)
    assert ppo_rlhf.masked_var(changed, mask).item() == pytest.approx(var, rel=1e-10)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_loop(shift_mean):
    g = torch.Generator().manual_seed(7)
    values = torch.randn(4, 11, generator=g, dtype=torch.float64) * 2.5 + 3.0
    mask = random_mask(values.shape, g)
    kept = plain_masked_values(values, mask)
    mean = sum(kept) / len(kept)
    std = (sum((v - mean) ** 2 for v in kept) / (len(kept) - 1) + 1e-8) ** 0.5
    out = ppo_rlhf.masked_whiten(values, mask, shift_mean=shift_mean)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            expected = (values[i, j].item() - mean) / std + (0.0 if shift_mean else mean)
            assert out[i, j].item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    whitened = plain_masked_values(out, mask)
    w_mean = sum(whitened) / len(whitened)
    assert w_mean == pytest.approx(0.0 if shift_mean else mean, abs=1e-9)
    assert sum((v - w_mean) ** 2 for v in whitened) / (len(whitened) - 1) == pytest.approx(1.0, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# GAE


def reference_gae(rewards, values, gamma, lam):
    """The N+ / TRL backwards loop: lastgaelam over reversed t, next value 0 past the end."""
    width = rewards.shape[1]
    lastgaelam = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    reversed_advantages = []
    for t in reversed(range(width)):
        nextvalues = values[:, t + 1] if t < width - 1 else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_advantages.append(lastgaelam)
    return torch.stack(reversed_advantages[::-1], dim=1)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.5, 0.7), (1.0, 0.0)])
@pytest.mark.parametrize("width", [1, 2, 17, 53])
def test_gae_matches_the_reference_loop(gamma, lam, width):
    g = torch.Generator().manual_seed(width)
    rewards = torch.randn(6, width, generator=g)
    values = torch.randn(6, width, generator=g)
    expected = reference_gae(rewards.double(), values.double(), gamma, lam)
    out = ppo_rlhf.gae_advantages(rewards, values, gamma, lam)
    assert out.shape == rewards.shape and out.dtype == rewards.dtype
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# stop tokens, scores, KL


def test_first_true_indices_matches_loop_including_rows_without_true():
    g = torch.Generator().manual_seed(0)
    bools = torch.rand(8, 13, generator=g) < 0.15
    bools[0] = False
    bools[1] = True
    bools[2] = False
    bools[2, -1] = True
    out = ppo_rlhf.first_true_indices(bools)
    for row, index in zip(bools.tolist(), out.tolist()):
        assert index == (row.index(True) if True in row else len(row))
    assert out[0].item() == 13 and out[1].item() == 0 and out[2].item() == 12


def test_truncate_after_stop_keeps_the_stop_token_and_pads_the_rest():
    stop, pad = 3, 99
    responses = torch.tensor(
        [
            [5, 3, 7, 3, 8],  # stop at 1: keep it, pad the rest
            [5, 6, 7, 8, 9],  # no stop: full width
            [3, 5, 6, 7, 8],  # stop first
            [5, 6, 7, 8, 3],
        ]
    )  # stop last
    out, lengths = ppo_rlhf.truncate_after_stop(responses, stop, pad)
    assert out.tolist() == [[5, 3, pad, pad, pad], [5, 6, 7, 8, 9], [3, pad, pad, pad, pad], [5, 6, 7, 8, 3]]
    assert lengths.tolist() == [1, 4, 0, 4]
    assert responses[0].tolist() == [5, 3, 7, 3, 8]  # the input is not modified

    g = torch.Generator().manual_seed(1)
    responses = torch.randint(0, 6, (20, 9), generator=g)
    out, lengths = ppo_rlhf.truncate_after_stop(responses, stop, pad)
    for row, o, n in zip(responses.tolist(), out.tolist(), lengths.tolist()):
        cut = row.index(stop) if stop in row else len(row) - 1
        assert o == row[: cut + 1] + [pad] * (len(row) - cut - 1)
        assert n == cut  # index of the last real token


def test_truncate_after_any_of_several_stop_tokens():
    """Some models end a turn with any of several ids (Llama 3's generation config lists three): the first of any."""
    responses = torch.tensor([[5, 4, 3, 8], [5, 6, 7, 4], [5, 6, 7, 8]])
    out, lengths = ppo_rlhf.truncate_after_stop(responses, [3, 4], 99)
    assert out.tolist() == [[5, 4, 99, 99], [5, 6, 7, 4], [5, 6, 7, 8]]
    assert lengths.tolist() == [1, 3, 3]
    assert ppo_rlhf.is_stop(responses, [3, 4]).any(1).tolist() == [True, True, False]


def test_the_models_eos_ids_come_from_its_generation_config_then_its_config_then_the_tokenizer(tmp_path):
    from transformers import AutoTokenizer, GenerationConfig, GPTNeoXConfig

    from rlhf_utils.models import eos_token_ids

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "embedded", "tokenizer"))
    GPTNeoXConfig(eos_token_id=7).save_pretrained(tmp_path)
    assert eos_token_ids(str(tmp_path), tokenizer, False) == [7]
    GenerationConfig(eos_token_id=[9, 5, 9]).save_pretrained(tmp_path)
    assert eos_token_ids(str(tmp_path), tokenizer, False) == [5, 9]
    GPTNeoXConfig(eos_token_id=None).save_pretrained(tmp_path / "none")
    assert eos_token_ids(str(tmp_path / "none"), tokenizer, False) == [tokenizer.eos_token_id]


def test_truncate_without_stop_token_id_changes_nothing():
    responses = torch.randint(0, 6, (4, 7), generator=torch.Generator().manual_seed(2))
    out, lengths = ppo_rlhf.truncate_after_stop(responses, None, 99)
    assert torch.equal(out, responses)
    assert lengths.tolist() == [6] * 4


def test_place_scores_after_the_last_token_or_at_the_end():
    g = torch.Generator().manual_seed(3)
    non_score = torch.randn(5, 6, generator=g)
    scores = torch.randn(5, generator=g)
    lengths = torch.tensor([0, 2, 4, 5, 3])
    out = ppo_rlhf.place_scores(non_score, scores, lengths)
    expected = non_score.clone()
    for i in range(5):
        position = lengths[i].item() + 1 if lengths[i].item() + 1 < 6 else 5
        expected[i, position] += scores[i]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.equal(non_score, out)  # a copy: the input is untouched
    assert out[3, 5] == non_score[3, 5] + scores[3] and out[2, 5] == non_score[2, 5] + scores[2]


def test_kl_penalty_k1_and_k3_match_the_formulas():
    g = torch.Generator().manual_seed(4)
    logprobs = -torch.rand(6, 10, generator=g) * 5
    ref = -torch.rand(6, 10, generator=g) * 5
    k1 = ppo_rlhf.kl_penalty(logprobs, ref, "k1")
    k3 = ppo_rlhf.kl_penalty(logprobs, ref, "k3")
    for i in range(6):
        for j in range(10):
            logr = ref[i, j].item() - logprobs[i, j].item()
            assert k1[i, j].item() == pytest.approx(logprobs[i, j].item() - ref[i, j].item(), abs=1e-6)
            assert k3[i, j].item() == pytest.approx(np.exp(logr) - 1 - logr, rel=1e-5, abs=1e-6)
    assert (k3 >= 0).all()
    assert (k1 < 0).any()  # k1 can be negative, k3 never
    assert torch.equal(ppo_rlhf.kl_penalty(logprobs, logprobs, "k3"), torch.zeros_like(logprobs))


# ---------------------------------------------------------------------------------------------------------------
# logits helpers, padding, data order


def test_entropy_from_logits_matches_the_definition():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, 17, generator=g, dtype=torch.float64) * 4
    p = logits.softmax(-1)
    expected = -(p * p.log()).sum(-1)
    torch.testing.assert_close(ppo_rlhf.entropy_from_logits(logits), expected, atol=1e-10, rtol=1e-10)
    assert (ppo_rlhf.entropy_from_logits(logits) >= 0).all()
    # extreme logits: finite and non-negative (no 0 * log 0 = nan)
    extreme = torch.tensor([[[1000.0, 0.0, -1000.0]]])
    assert torch.isfinite(ppo_rlhf.entropy_from_logits(extreme)).all()
    assert ppo_rlhf.entropy_from_logits(extreme).item() == pytest.approx(0.0, abs=1e-6)


def test_sequence_logprobs_matches_manual_gather():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 5, 11, generator=g)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    out = ppo_rlhf.sequence_logprobs(logits, tokens)
    for b in range(3):
        for t in range(5):
            row = logits[b, t].double()
            expected = row[tokens[b, t]] - torch.log(torch.exp(row).sum())
            assert out[b, t].item() == pytest.approx(expected.item(), abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# model helpers on tiny random GPT-NeoX models


def tiny_config(**overrides):
    from transformers import GPTNeoXConfig

    kwargs = dict(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        classifier_dropout=0.0,
        pad_token_id=1,
        eos_token_id=0,
        bos_token_id=0,
    )
    kwargs.update(overrides)
    return GPTNeoXConfig(**kwargs)


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="module")
def tiny_value():
    from transformers import GPTNeoXForSequenceClassification

    torch.manual_seed(1)
    model = GPTNeoXForSequenceClassification(tiny_config(num_labels=1)).eval()
    with torch.no_grad():
        model.score.weight.normal_()  # a visible scale, not the 0.02 init
    return model


def random_sequences(n, low, high, g, lengths):
    return [torch.randint(low, high, (length,), generator=g).tolist() for length in lengths[:n]]


def pad_more(ids, mask, extra, pad_token_id=1):
    """Prepend `extra` more columns of padding (not attended) to a left-padded batch."""
    return (
        torch.cat([torch.full((len(ids), extra), pad_token_id), ids], 1),
        torch.cat([torch.zeros((len(ids), extra), dtype=mask.dtype), mask], 1),
    )


def test_response_hidden_equals_a_plain_forward_sliced_at_the_response(tiny_lm):
    backbone = tiny_lm.base_model
    g = torch.Generator().manual_seed(0)
    context_length, response_length = 7, 5
    seqs = torch.randint(2, 40, (3, context_length + response_length), generator=g)
    mask = torch.ones_like(seqs)
    with torch.no_grad():
        out = speed.response_hidden(backbone, seqs, mask, context_length)
        plain = backbone(input_ids=seqs).last_hidden_state[:, context_length - 1 : -1]
    assert out.shape == (3, response_length, 32)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)


def test_response_hidden_is_invariant_to_left_padding(tiny_lm):
    """A batch whose queries are left-padded by different amounts (including padding shared by the whole batch,
    which response_hidden trims) gives every row the hidden states of its own unpadded forward."""
    backbone = tiny_lm.base_model
    g = torch.Generator().manual_seed(1)
    queries = random_sequences(3, 2, 40, g, [4, 6, 3])
    response_length = 5
    responses = torch.randint(2, 40, (3, response_length), generator=g)
    for extra in (0, 3):  # extra columns of padding in every row
        q_ids, q_mask = pad_more(*ppo_rlhf.left_pad(queries, pad_token_id=1), extra)
        context_length = q_ids.shape[1]
        seqs = torch.cat([q_ids, responses], 1)
        mask = torch.cat([q_mask, torch.ones_like(responses)], 1)
        with torch.no_grad():
            out = speed.response_hidden(backbone, seqs, mask, context_length)
            for i, q in enumerate(queries):
                alone = torch.tensor([q + responses[i].tolist()])
                plain = backbone(input_ids=alone).last_hidden_state[0, len(q) - 1 : -1]
                torch.testing.assert_close(out[i], plain, atol=1e-5, rtol=1e-5)


PLAIN, OPTIMISED, ONE_ROW_PER_FORWARD = (None, False), (speed.GROUP_OVERHEAD, True), (0, True)


@pytest.mark.parametrize("overhead,chunked", [PLAIN, OPTIMISED, ONE_ROW_PER_FORWARD])
def test_policy_and_value_match_the_full_hf_forwards(tiny_lm, tiny_value, overhead, chunked):
    model = ppo_rlhf.PolicyAndValue(tiny_lm, tiny_value, overhead, chunked).eval()
    g = torch.Generator().manual_seed(2)
    queries = random_sequences(3, 2, 40, g, [5, 3, 4])
    response_length = 4
    responses = torch.randint(2, 40, (3, response_length), generator=g)
    q_ids, q_mask = ppo_rlhf.left_pad(queries, pad_token_id=1)
    context_length = q_ids.shape[1]
    seqs, mask = torch.cat([q_ids, responses], 1), torch.cat([q_mask, torch.ones_like(responses)], 1)
    temperature = 0.7
    with torch.no_grad():
        for needed in (None, torch.tensor([3, 2, 1])):
            logprobs, entropy, values = model(seqs, mask, context_length, temperature, needed)
            width = response_length if needed is None else 3
            assert logprobs.shape == entropy.shape == values.shape == (3, width)
            for i, q in enumerate(queries):
                alone = torch.tensor([q + responses[i].tolist()])
                # the plain HF CausalLM forward over the whole sequence
                full = (tiny_lm(input_ids=alone).logits[0] / temperature).log_softmax(-1)[len(q) - 1 : -1]
                n = response_length if needed is None else int(needed[i])
                torch.testing.assert_close(
                    logprobs[i, :n], full[torch.arange(n), responses[i, :n]], atol=1e-5, rtol=1e-5
                )
                torch.testing.assert_close(entropy[i, :n], -(full.exp() * full).sum(-1)[:n], atol=1e-5, rtol=1e-5)
                # the value at response position t is the sequence classifier's score of the prefix ending there
                for t in range(n):
                    expected = tiny_value(input_ids=alone[:, : len(q) + t]).logits[0, 0]
                    assert values[i, t].item() == pytest.approx(expected.item(), abs=1e-5)


def ppo_like_loss(logprobs, values, needed):
    """A loss that weighs every computed position differently, masked past each row's need as the script does."""
    valid = torch.arange(logprobs.shape[1])[None, :] < needed[:, None]
    weights = torch.linspace(-1, 2, logprobs.numel()).view(logprobs.shape)
    return (logprobs.exp() * weights * valid).sum() + ((values - weights) ** 2 * valid).sum()


@pytest.mark.parametrize("optimised", [OPTIMISED, ONE_ROW_PER_FORWARD])
def test_optimised_forward_gives_the_plain_gradients(optimised):
    """Length groups, right-trimming and the chunked LM head change neither the loss nor any parameter's gradient."""
    from transformers import GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

    g = torch.Generator().manual_seed(9)
    queries = random_sequences(5, 2, 40, g, [9, 2, 5, 7, 3])
    responses = torch.randint(2, 40, (5, 6), generator=g)
    q_ids, q_mask = ppo_rlhf.left_pad(queries, pad_token_id=1)
    seqs, mask = torch.cat([q_ids, responses], 1), torch.cat([q_mask, torch.ones_like(responses)], 1)
    needed = torch.tensor([6, 2, 4, 1, 3])
    results = []
    for overhead, chunked in (PLAIN, optimised):
        torch.manual_seed(4)
        model = ppo_rlhf.PolicyAndValue(
            GPTNeoXForCausalLM(tiny_config()),
            GPTNeoXForSequenceClassification(tiny_config(num_labels=1)),
            overhead,
            chunked,
        )
        if overhead is None:  # the plain reference: the whole padded batch, every response position
            logprobs, _, values = model(seqs, mask, q_ids.shape[1], 0.7)
            logprobs, values = logprobs[:, : int(needed.max())], values[:, : int(needed.max())]
        else:
            logprobs, _, values = model(seqs, mask, q_ids.shape[1], 0.7, needed)
        loss = ppo_like_loss(logprobs, values, needed)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "vocab,dtype,small_chunks",
    [
        (40, torch.float32, False),
        (2**20, torch.float32, False),
        (300, torch.bfloat16, False),
        (300, torch.float32, True),
        (300, torch.bfloat16, True),
    ],
)
def test_chunked_logprobs_match_log_softmax_gather_with_gradients(vocab, dtype, small_chunks, monkeypatch):
    """Values, entropy and the gradients of hidden states and head weight equal the plain computation; the 2^20
    vocabulary makes chunks of 4 positions (6 chunks of the 22); small chunks (4 positions) make 4 chunks of the 14
    positions, so the head's weight gradient is accumulated over chunks; bf16 runs under autocast as the script's
    --bf16 does."""
    if small_chunks:
        monkeypatch.setattr(speed, "LOGITS_PER_CHUNK", 4 * vocab)
        assert len(range(0, 14, speed.LOGITS_PER_CHUNK // vocab)) == 4
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 11 if vocab > 1000 else 7, 8, generator=g)
    head = torch.nn.Linear(8, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, 8, generator=g))
    tokens = torch.randint(0, vocab, hidden.shape[:2], generator=g)
    weights = torch.randn(hidden.shape[:2], generator=g)
    out = {}
    for chunked in (False, True):
        h = hidden.clone().requires_grad_(True)
        head.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logprobs, entropy = ppo_rlhf.response_logprobs(head, h, tokens, 0.7, chunked)
        (logprobs * weights).sum().backward()
        assert not entropy.requires_grad
        out[chunked] = logprobs.detach(), entropy, h.grad, head.weight.grad.clone()
    # fp32 sums over 2^20 terms in a different order differ by ~1e-4 relative; bf16 matmuls by ~1e-2
    tol = dict(atol=1e-4, rtol=1e-4) if vocab < 1000 else dict(atol=3e-3, rtol=1e-3)
    tol = tol if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(b, a, **tol)
    assert (out[True][1] >= -1e-6).all()


def test_chunked_logprobs_fall_back_to_the_plain_head_when_it_has_a_bias():
    g = torch.Generator().manual_seed(6)
    head = torch.nn.Linear(8, 30, bias=True)
    hidden, tokens = torch.randn(2, 3, 8, generator=g), torch.randint(0, 30, (2, 3), generator=g)
    logprobs, _ = ppo_rlhf.response_logprobs(head, hidden, tokens, 0.5, chunked=True)
    expected = (head(hidden) / 0.5).log_softmax(-1).gather(2, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(logprobs, expected)


def partitions(items):
    if not items:
        yield []
        return
    for rest in partitions(items[1:]):
        for i in range(len(rest)):
            yield rest[:i] + [[items[0]] + rest[i]] + rest[i + 1 :]
        yield [[items[0]]] + rest


def group_cost(groups, lengths, overhead):
    return sum(overhead + len(g) * max(lengths[i] for i in g) for g in groups)


@pytest.mark.parametrize("seed", range(20))
def test_length_groups_is_the_cheapest_split(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 7))]
    overhead = rng.choice([0, 5, 32, 200])
    groups = speed.length_groups(lengths, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    best = min(group_cost(p, lengths, overhead) for p in partitions(list(range(len(lengths)))))
    assert group_cost(groups, lengths, overhead) == best
    assert speed.length_groups(lengths, None) == [sorted(range(len(lengths)), key=lambda i: -lengths[i])]


@pytest.mark.parametrize("overhead", [None, 0, 4])
def test_grouped_response_hidden_equals_the_padded_batch(tiny_lm, overhead):
    backbone = tiny_lm.base_model
    g = torch.Generator().manual_seed(8)
    queries = random_sequences(4, 2, 40, g, [8, 2, 5, 3])
    responses = torch.randint(2, 40, (4, 5), generator=g)
    q_ids, q_mask = ppo_rlhf.left_pad(queries, pad_token_id=1)
    seqs, mask = torch.cat([q_ids, responses], 1), torch.cat([q_mask, torch.ones_like(responses)], 1)
    needed = torch.tensor([2, 5, 1, 3])
    with torch.no_grad():
        padded = speed.response_hidden(backbone, seqs, mask, q_ids.shape[1])
        grouped = speed.grouped_response_hidden(backbone, seqs, mask, q_ids.shape[1], needed, overhead)
    assert grouped.shape == (4, 5, 32)
    for i, n in enumerate(needed.tolist()):
        torch.testing.assert_close(grouped[i, :n], padded[i, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("multiple", [4, 16])
def test_pad_to_multiple_of_rounds_every_forward_width_and_changes_nothing(tiny_lm, tiny_value, multiple):
    """--pad-to-multiple-of: the prompts, each length group of the policy and value forwards and each reward-model
    group are as wide as a multiple (where the left padding allows), with the values of multiple 1."""
    g = torch.Generator().manual_seed(9)
    queries = random_sequences(5, 2, 40, g, [9, 2, 5, 3, 14])
    responses = torch.randint(2, 40, (5, 6), generator=g)
    needed = torch.tensor([2, 6, 1, 3, 4])
    widths = []
    hook = tiny_lm.base_model.register_forward_pre_hook(
        lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    hook_value = tiny_value.base_model.register_forward_pre_hook(
        lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    results = {}
    for m in (1, multiple):
        q_ids, q_mask = ppo_rlhf.left_pad(queries, pad_token_id=1, multiple=m)
        assert q_ids.shape[1] % m == 0 and q_ids.shape[1] - 14 < m
        seqs, mask = torch.cat([q_ids, responses], 1), torch.cat([q_mask, torch.ones_like(responses)], 1)
        model = ppo_rlhf.PolicyAndValue(tiny_lm, tiny_value, overhead=0, chunked=True, multiple=m).eval()
        widths.clear()
        with torch.no_grad():
            logprobs, _, values = model(seqs, mask, q_ids.shape[1], 0.7, needed)
            scores = ppo_rlhf.get_score(tiny_value, seqs, mask, overhead=0, multiple=m)
        assert len(widths) > 3  # several groups, so several widths
        # Rounding takes left padding only: a group holding the longest prompt ends at its own need.
        assert all(w % m == 0 or w - q_ids.shape[1] in needed.tolist() + [responses.shape[1]] for w in widths)
        if m > 1:
            assert sum(w % m == 0 for w in widths) >= len(widths) // 2, widths
        results[m] = (logprobs, values, scores)
    hook.remove()
    hook_value.remove()
    for i, n in enumerate(needed.tolist()):
        torch.testing.assert_close(results[multiple][0][i, :n], results[1][0][i, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(results[multiple][1][i, :n], results[1][1][i, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[multiple][2], results[1][2], atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:`(is_)?gradient_checkpointing.*deprecated:FutureWarning")
def test_gradient_checkpointing_is_really_enabled_through_policy_and_value():
    """The script calls gradient_checkpointing_enable() on the policy and value model, whose backbones
    PolicyAndValue calls directly: the models report it, the backward pass recomputes the layers, and the gradients
    are those without checkpointing."""
    from transformers import GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

    def build():
        torch.manual_seed(3)
        return GPTNeoXForCausalLM(tiny_config()), GPTNeoXForSequenceClassification(tiny_config(num_labels=1))

    g = torch.Generator().manual_seed(3)
    seqs = torch.randint(2, 40, (2, 9), generator=g)
    mask = torch.ones_like(seqs)
    grads, calls = {}, {}
    for checkpointing in (False, True):
        policy, value = build()
        if checkpointing:
            for m in (policy, value):
                m.gradient_checkpointing_enable()
                assert m.is_gradient_checkpointing
        else:
            assert not policy.is_gradient_checkpointing
        model = ppo_rlhf.PolicyAndValue(policy, value).train()
        count = [0]
        policy.base_model.layers[0].attention.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))
        logprobs, _, values = model(seqs, mask, 4, 0.7)
        (logprobs.sum() + values.sum()).backward()
        calls[checkpointing] = count[0]
        grads[checkpointing] = [p.grad.clone() for p in model.parameters()]
    assert calls[False] == 1
    assert calls[True] == 2  # the attention ran again in the backward pass: activations were recomputed
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# generation and scoring


@pytest.fixture(scope="module")
def sft():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(EMBEDDED, "sft_model"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(EMBEDDED, "sft_model")).eval()
    models.disable_dropout(model)
    return model, tokenizer


@pytest.fixture(scope="module")
def eval_prompts(sft):
    from datasets import load_from_disk

    _, tokenizer = sft
    prompts = load_from_disk(os.path.join(EMBEDDED, "prompts"))["validation"]["prompt"][:6]
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def test_generate_stops_when_every_row_has_the_stop_token(sft, eval_prompts):
    model, tokenizer = sft
    eos = tokenizer.eos_token_id
    queries, mask = ppo_rlhf.left_pad(eval_prompts, tokenizer.pad_token_id)
    response_length = 53
    out = ppo_rlhf.generate(model, queries, mask, response_length, 0.7, eos, torch.Generator().manual_seed(0))
    assert out.shape[0] == len(eval_prompts)
    assert out.shape[1] < response_length  # the trained SFT model ends its summaries well before 53 tokens
    assert (out == eos).any(1).all()  # every row has the stop token...
    assert not (out[:, :-1] == eos).any(1).all()  # ...and generation stopped at the first step where that was so
    # without a stop token it always generates response_length tokens
    full = ppo_rlhf.generate(model, queries, mask, response_length, 0.7, None, torch.Generator().manual_seed(0))
    assert full.shape == (len(eval_prompts), response_length)
    assert torch.equal(full[:, : out.shape[1]], out)  # the same draws up to the stop


def test_sample_tokens_draws_from_the_distribution_like_multinomial():
    """Inverse-CDF sampling: the frequencies of 40,000 draws match the probabilities (as torch.multinomial's do),
    a probability-0 token is never drawn, and the draws are a function of the generator's seed."""
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1, 0.6]])
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([ppo_rlhf.sample_tokens(probs, g) for _ in range(40000)], 1)
    assert draws.shape == (3, 40000)
    freq = torch.stack([torch.bincount(row, minlength=5) for row in draws]).double() / 40000
    # 4.5 standard errors of a binomial frequency at p = 0.5: a real difference would show, noise would not
    assert (freq - probs.double()).abs().max() < 4.5 * (0.25 / 40000) ** 0.5
    assert (freq[probs == 0] == 0).all()
    reference = torch.cat([torch.multinomial(probs, 1, generator=g) for _ in range(40000)], 1)
    ref_freq = torch.stack([torch.bincount(row, minlength=5) for row in reference]).double() / 40000
    assert (freq - ref_freq).abs().max() < 6.5 * (0.25 / 40000) ** 0.5
    a = ppo_rlhf.sample_tokens(probs, torch.Generator().manual_seed(3))
    assert torch.equal(a, ppo_rlhf.sample_tokens(probs, torch.Generator().manual_seed(3)))


def test_generate_is_determined_by_the_generator_seed(tiny_lm):
    g = torch.Generator().manual_seed(4)
    queries, mask = ppo_rlhf.left_pad(random_sequences(4, 2, 40, g, [3, 6, 2, 5]), pad_token_id=1)
    a = ppo_rlhf.generate(tiny_lm, queries, mask, 12, 1.0, None, torch.Generator().manual_seed(11))
    torch.manual_seed(999)  # the global RNG is not used
    b = ppo_rlhf.generate(tiny_lm, queries, mask, 12, 1.0, None, torch.Generator().manual_seed(11))
    c = ppo_rlhf.generate(tiny_lm, queries, mask, 12, 1.0, None, torch.Generator().manual_seed(12))
    assert a.shape == (4, 12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("which", ["tiny_random", "sft"])
def test_generate_near_zero_temperature_equals_hf_greedy(which, tiny_lm, sft, eval_prompts):
    if which == "sft":
        model, tokenizer = sft
        prompts, pad, eos, length = eval_prompts, tokenizer.pad_token_id, tokenizer.eos_token_id, 30
    else:
        g = torch.Generator().manual_seed(5)
        model, prompts, pad, eos, length = tiny_lm, random_sequences(4, 2, 40, g, [3, 7, 2, 5]), 1, 0, 15
    queries, mask = ppo_rlhf.left_pad(prompts, pad)
    ours = ppo_rlhf.generate(model, queries, mask, length, 1e-6, None, torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = model.generate(
            input_ids=queries,
            attention_mask=mask,
            max_new_tokens=length,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )[:, queries.shape[1] :]
    # HF stops a row at EOS and pads it (and stops when every row has); compare up to and including each first EOS
    ours_cut, ours_len = ppo_rlhf.truncate_after_stop(ours, eos, pad)
    hf_cut, hf_len = ppo_rlhf.truncate_after_stop(hf, eos, pad)
    assert [row[: n + 1] for row, n in zip(ours_cut.tolist(), ours_len.tolist())] == [
        row[: n + 1] for row, n in zip(hf_cut.tolist(), hf_len.tolist())
    ]
    if which == "sft":
        assert (ours_len < length - 1).all()  # the comparison covered whole summaries ending in EOS
    # also the argmax of a plain forward, token by token, for the first row
    seq = torch.tensor([prompts[0]])
    with torch.no_grad():
        for t in range(min(5, ours.shape[1])):
            assert model(input_ids=seq).logits[0, -1].argmax().item() == ours[0, t].item()
            seq = torch.cat([seq, ours[:1, t : t + 1]], 1)


def test_get_score_matches_hf_sequence_classification_and_ignores_padding(tiny_value):
    g = torch.Generator().manual_seed(6)
    queries = random_sequences(3, 2, 40, g, [4, 2, 6])
    responses = random_sequences(3, 2, 40, g, [5, 2, 3])
    with torch.no_grad():
        expected = [
            tiny_value(input_ids=torch.tensor([q + r])).logits[0, 0].item() for q, r in zip(queries, responses)
        ]
        for extra_left, extra_right in ((0, 0), (2, 0), (0, 3), (1, 2)):
            q_ids, q_mask = pad_more(*ppo_rlhf.left_pad(queries, 1), extra_left)
            width = max(len(r) for r in responses) + extra_right
            r_ids = torch.tensor([r + [1] * (width - len(r)) for r in responses])
            r_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in responses])
            for overhead, multiple in ((None, 1), (0, 1), (3, 1), (3, 4), (None, 8)):  # padded, per row, groups
                scores = ppo_rlhf.get_score(
                    tiny_value, torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1), overhead, multiple
                )
                assert scores.shape == (3,)
                for s, e in zip(scores.tolist(), expected):
                    assert s == pytest.approx(e, abs=1e-5), (extra_left, extra_right, overhead, multiple)
        # right-padded, unpadded-left sequences: the HF classifier itself (pooling at the last non-pad token) agrees
        width = max(len(q) + len(r) for q, r in zip(queries, responses))
        seqs = torch.tensor([q + r + [1] * (width - len(q) - len(r)) for q, r in zip(queries, responses)])
        seq_mask = (
            torch.arange(width)[None] < torch.tensor([len(q) + len(r) for q, r in zip(queries, responses)])[:, None]
        ).long()
        hf = tiny_value(input_ids=seqs, attention_mask=seq_mask).logits[:, 0]
        torch.testing.assert_close(ppo_rlhf.get_score(tiny_value, seqs, seq_mask), hf, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the optimizer


def test_fused_adamw_the_script_uses_matches_the_plain_loop():
    """ppo_rlhf.py builds AdamW with fused=True (outside DeepSpeed): same parameters as the plain per-tensor loop."""
    source = "".join(open(os.path.join(ROOT, "ppo_rlhf.py")).read().split())
    assert "fused=notis_deepspeed" in source
    g = torch.Generator().manual_seed(11)
    start = [torch.randn(50, 8, generator=g), torch.randn(8, generator=g)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    finals = []
    for fused in (False, True):
        params = [p.clone().requires_grad_(True) for p in start]
        opt = torch.optim.AdamW(
            params, lr=1e-2, eps=1e-5, weight_decay=0.0, fused=fused, foreach=False if not fused else None
        )
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr.clone()
            opt.step()
        finals.append([p.detach() for p in params])
    for a, b in zip(*finals):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_resume_treats_a_flag_newer_than_the_checkpoint_as_its_default():
    """A checkpoint written before a flag existed ran with that flag's default: resuming it with the default is no
    change, with another value it is."""
    args = ppo_rlhf.Args()
    saved = json.loads(json.dumps(dataclasses.asdict(args)))
    del saved["adam_epsilon"]
    assert changed_arguments(json.dumps(saved), args, set()) == []
    other = dataclasses.replace(args, adam_epsilon=1e-8)
    assert changed_arguments(json.dumps(saved), other, set()) == ["--adam-epsilon 1e-05 (now 1e-08)"]


def test_resume_ignores_a_flag_the_checkpoint_has_and_the_script_dropped():
    """--split-backward was dropped: a checkpoint whose saved args carry it, with either value, resumes."""
    args = ppo_rlhf.Args()
    saved = json.loads(json.dumps(dataclasses.asdict(args)))
    for value in (True, False):
        saved["split_backward"] = value
        assert changed_arguments(json.dumps(saved), args, set()) == []


def test_timer_sums_the_seconds_of_each_named_phase():
    """Timer adds up every block of the same name (the rollout times generation chunk by chunk) and keeps the names
    it starts with, in their order, for the metrics row."""
    from rlhf_utils.runs import Timer

    timer = Timer(generation=0.0, training=0.0)
    for _ in range(2):
        with timer("generation"):
            time.sleep(0.01)
    with timer("scoring"):
        pass
    assert list(timer) == ["generation", "training", "scoring"]
    assert 0.02 <= timer["generation"] < 1 and timer["training"] == 0.0 and timer["scoring"] >= 0


def test_stop_if_not_finite_stops_on_inf_or_nan_in_any_value_with_the_message():
    from rlhf_utils.runs import stop_if_not_finite

    stop_if_not_finite("loss", [torch.ones(3), 2.5, torch.tensor(1.0)], "update 1", " (lower --learning-rate)")
    for bad in (torch.tensor([1.0, float("nan")]), float("inf")):
        with pytest.raises(SystemExit) as stopped:
            stop_if_not_finite("gradient norm", [torch.ones(2), bad], "update 3, PPO epoch 1", " (advice)")
        assert str(stopped.value) == (
            "error: non-finite gradient norm at update 3, PPO epoch 1; the run stops here (advice)"
        )
