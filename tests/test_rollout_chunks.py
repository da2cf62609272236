"""The rollout's no-grad forwards in chunks of --local-rollout-forward-batch-size give every row the numbers of one plain
padded forward over the whole batch, including the value at sequence_length + 1 (where the score lands) of a row
whose stop token is in the last column its chunk generated (it was once 0)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT  # noqa: F401  (puts the repository root on sys.path)
from tiny_archs import tiny_config

import ppo_rlhf  # noqa: E402
from rlhf_utils import speed  # noqa: E402

VOCAB, PAD, EOS, T = 60, 1, 0, 0.7


@pytest.fixture(scope="module")
def policy_and_value():
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB, eos_token_id=EOS, pad_token_id=PAD))
    value = AutoModelForSequenceClassification.from_config(
        tiny_config("llama", VOCAB, eos_token_id=EOS, pad_token_id=PAD, num_labels=1)
    )
    with torch.no_grad():
        value.score.weight.normal_()  # visible values, not the 0.02 init
    return ppo_rlhf.PolicyAndValue(policy, value).eval()


@pytest.mark.parametrize("chunk_size", [2, 3])
def test_chunked_rollout_forward_equals_the_plain_padded_forward(policy_and_value, chunk_size):
    """Rows generated in chunks of 2 (or 3): the first chunk stopped after 3 tokens, row 0 with its stop token in that
    chunk's last column; the others ran to 7. Stacked to width 7, every valid log-prob (up to the stop token) and
    value (one more) equals the plain padded forward over the whole batch."""
    g = torch.Generator().manual_seed(0)
    queries = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (4, 2, 5, 3, 4, 6)]
    q_ids, q_mask = ppo_rlhf.left_pad(queries, PAD)
    context_length, width = q_ids.shape[1], 7
    chunks = [
        torch.randint(2, VOCAB, (len(queries[i : i + chunk_size]), width), generator=g)
        for i in range(0, len(queries), chunk_size)
    ]
    chunks[0] = chunks[0][:, :3]  # the first chunk stopped generating after 3 tokens ...
    chunks[0][0, 2] = EOS  # ... row 0 with its stop token in the last column
    chunks[0][1:, 1] = EOS
    chunks[1][0, 4] = EOS
    responses = torch.cat([F.pad(c, (0, width - c.shape[1]), value=PAD) for c in chunks])
    _, sequence_lengths = ppo_rlhf.truncate_after_stop(responses, EOS, PAD)
    assert sequence_lengths[0] == 2 and sequence_lengths[0] + 1 < width  # the score lands at column 3
    seqs = torch.cat([q_ids, responses], 1)
    mask = torch.cat([q_mask, torch.ones_like(responses)], 1)

    def forward(query_responses, attention_mask, context_length, needed):
        logprobs, _, values = policy_and_value(query_responses, attention_mask, context_length, T, needed)
        return logprobs, values

    with torch.no_grad():
        logprobs, values = speed.forward_in_chunks(forward, seqs, mask, context_length, sequence_lengths, chunk_size)
        plain_logprobs, _, plain_values = policy_and_value(seqs, mask, context_length, T)
    columns = torch.arange(width)[None, :]
    valid, valid_p1 = columns <= sequence_lengths[:, None], columns <= sequence_lengths[:, None] + 1
    assert logprobs.shape == values.shape == (len(queries), width)
    torch.testing.assert_close(logprobs[valid], plain_logprobs[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values[valid_p1], plain_values[valid_p1], atol=1e-5, rtol=1e-5)
    assert values[0, 3].abs() > 1e-3  # the value the score is added to is really computed
