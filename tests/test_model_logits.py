"""The log-probs the PPO scripts use are the model's own: for every architecture of tiny_archs.MATRIX plus Granite,
Cohere, MiniCPM3, HyperCLOVA X and Falcon-H1 (whose forwards transform the logits: Gemma's softcapping, Granite's
logits_scaling, Cohere's logit_scale, ...), and a config with attention dropout set, the training/rollout path (plain,
length-grouped, chunked LM head; train and eval mode) and the sampling distribution of generation equal
log_softmax(model(...).logits / T) of the model's own forward, row by row without padding. In process, on tiny random
models built from configs."""

import pytest
import torch
from helpers import ROOT  # noqa: F401  (puts the repository root on sys.path)
from tiny_archs import ARCHITECTURES, MATRIX, tiny_config

import ppo_rlhf  # noqa: E402
from rlhf_utils import models  # noqa: E402
from rlhf_utils import speed  # noqa: E402

VOCAB, PAD, EOS, T = 97, 1, 0, 0.7
# Three more architectures whose forward scales the logits, built here (tiny_archs holds the matrix of every test).
_SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
)
MORE = {
    "minicpm3": dict(
        dim_model_base=16, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16
    ),  # hidden states divided by hidden_size / dim_model_base = 4
    "hyperclovax": dict(logits_scaling=0.25),
    "falcon_h1": dict(
        lm_head_multiplier=0.25,
        mamba_d_ssm=64,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=16,
        mamba_n_groups=1,
        head_dim=16,
    ),
}
CASES = MATRIX + ["granite", "cohere", "llama_dropout", *MORE]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def build(case: str, seed: int = 0):
    """The tiny model as the PPO scripts load it: dropout settings of the config zeroed, then the modules'."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = "llama" if case == "llama_dropout" else case
    extra = dict(attention_dropout=0.3) if case == "llama_dropout" else {}
    if case in MORE:
        config = AutoConfig.for_model(
            case, vocab_size=VOCAB, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, **_SMALL, **MORE[case]
        )
    else:
        config = tiny_config(arch, VOCAB, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, **extra)
    models.disable_dropout_in_config(config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    models.disable_dropout(model)
    # Logits of a few units (random init gives near-zero ones): a skipped transform shows, and no distribution is
    # saturated to one token, where every transform gives the same probabilities.
    # The head gets a weight of its own (tied ones would make each input token's own logit dominate).
    ids = torch.randint(2, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        head.weight.mul_(3.0 / model.eval()(input_ids=ids).logits.std())
    return model


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    queries = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (5, 2, 4, 3)]
    responses = torch.randint(2, VOCAB, (4, 6), generator=g)
    q_ids, q_mask = ppo_rlhf.left_pad(queries, PAD)
    return queries, responses, q_ids, q_mask


def own_logprobs(model, ids, temperature=T):
    """log_softmax(model(ids).logits / T) of one unpadded row, [len(ids), vocab]."""
    with torch.no_grad():
        return (model(input_ids=torch.tensor([ids])).logits[0].float() / temperature).log_softmax(-1)


def test_the_cases_have_the_transforms_they_are_meant_to_test():
    scales = {
        case: models.logit_transform(tiny_config(case, VOCAB)) for case in ("gemma2", "gemma3", "granite", "cohere")
    }
    assert scales == {"gemma2": (1.0, 30.0), "gemma3": (1.0, 30.0), "granite": (0.25, None), "cohere": (0.25, None)}
    assert models.logit_transform(tiny_config("llama", VOCAB)) == (1.0, None)
    assert all(models.logit_transform(build(case).config) == (0.25, None) for case in MORE)
    assert set(MATRIX) | {"granite", "cohere"} == set(ARCHITECTURES)


@pytest.mark.parametrize("case", CASES)
def test_training_and_rollout_logprobs_are_the_models_own(case):
    """policy_logprobs as the rollout (eval mode) and the PPO epochs (train mode) call it, with and without
    --chunked-logprobs and --length-grouping, equals the model's own forward / T; train and eval mode agree exactly
    (dropout off), so the first mini-batch's ratio is 1."""
    model = build(case)
    queries, responses, q_ids, q_mask = batch()
    context_length = q_ids.shape[1]
    seqs, mask = torch.cat([q_ids, responses], 1), torch.cat([q_mask, torch.ones_like(responses)], 1)
    needed = torch.tensor([6, 3, 5, 6])
    results = {}
    for overhead in (None, speed.GROUP_OVERHEAD, 0):
        for chunked in (False, True):
            for train in (False, True):
                model.train(train)
                with torch.set_grad_enabled(train):
                    lp, entropy = ppo_rlhf.policy_logprobs(
                        model, seqs, mask, context_length, T, needed, overhead, chunked
                    )
                results[overhead, chunked, train] = lp.detach(), entropy
    model.eval()
    for i, q in enumerate(queries):
        n = int(needed[i])
        own = own_logprobs(model, q + responses[i].tolist())[len(q) - 1 : -1][:n]
        expected = own[torch.arange(n), responses[i, :n]]
        for key, (lp, entropy) in results.items():
            torch.testing.assert_close(lp[i, :n], expected, atol=2e-5, rtol=1e-5, msg=f"{case} {key}")
            torch.testing.assert_close(
                entropy[i, :n], -(own.exp() * own).sum(-1), atol=2e-5, rtol=1e-5, msg=f"{case} {key}"
            )
    for overhead in (None, speed.GROUP_OVERHEAD, 0):
        for chunked in (False, True):
            assert torch.equal(results[overhead, chunked, True][0], results[overhead, chunked, False][0]), case


@pytest.mark.parametrize("case", CASES)
def test_generation_samples_from_the_models_own_distribution(case, monkeypatch):
    """Every next-token distribution generate() samples from is softmax(model(prefix).logits[-1] / T)."""
    model = build(case).eval()
    queries, _, q_ids, q_mask = batch(1)
    seen = []

    def recording_sampler(probs, generator):
        seen.append(probs.clone())
        return real_sampler(probs, generator)

    real_sampler = ppo_rlhf.sample_tokens
    monkeypatch.setattr(ppo_rlhf, "sample_tokens", recording_sampler)
    responses = ppo_rlhf.generate(model, q_ids, q_mask, 4, T, None, torch.Generator().manual_seed(0))
    assert len(seen) == responses.shape[1] == 4
    assert torch.stack(seen).amax(-1).mean() < 0.9  # not saturated: a wrong transform would change the probabilities
    for i, q in enumerate(queries):
        for step, probs in enumerate(seen):
            own = own_logprobs(model, q + responses[i, :step].tolist())[-1].exp()
            torch.testing.assert_close(probs[i], own, atol=1e-5, rtol=1e-4, msg=f"{case} row {i} step {step}")


def test_attention_dropout_of_the_config_is_off_in_train_mode():
    """A llama whose config says attention_dropout=0.3, built as a checkpoint with that config would be: in train mode
    its attention drops probabilities unless the float attribute of each attention module is zeroed too."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", VOCAB, attention_dropout=0.3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eval_logits = model.eval()(input_ids=ids).logits
        assert not torch.allclose(model.train()(input_ids=ids).logits, eval_logits)  # dropout is really on
        models.disable_dropout(model)
        assert torch.equal(model.train()(input_ids=ids).logits, eval_logits)
    # The policy and the value model (GPT-NeoX: nn.Dropout for hidden states, a float for attention, a classifier
    # dropout) through the scripts' PolicyAndValue: train mode (PPO epochs) equals eval mode (rollout).
    from transformers import AutoModelForSequenceClassification

    rates = dict(attention_dropout=0.3, hidden_dropout=0.3, classifier_dropout=0.3)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(tiny_config("gpt_neox", VOCAB, **rates))
    value = AutoModelForSequenceClassification.from_config(tiny_config("gpt_neox", VOCAB, num_labels=1, **rates))
    model = ppo_rlhf.PolicyAndValue(policy, value)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        eval_out = model.eval()(ids, mask, 4, T)
        assert not torch.allclose(model.train()(ids, mask, 4, T)[2], eval_out[2])  # dropout is really on
        models.disable_dropout(policy), models.disable_dropout(value)
        for a, b in zip(model.train()(ids, mask, 4, T), eval_out):
            assert torch.equal(a, b)
    for name in (
        "attention_dropout",
        "hidden_dropout",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "classifier_dropout",
        "layerdrop",
        "dropout",
    ):
        config = tiny_config("gpt_neox", VOCAB, **{name: 0.2})
        config.text_config_like = tiny_config("opt", VOCAB, layerdrop=0.1, dropout=0.1)
        models.disable_dropout_in_config(config)
        assert getattr(config, name) == 0.0, name
        assert config.text_config_like.layerdrop == config.text_config_like.dropout == 0.0


@pytest.mark.parametrize("dtype,small_chunks", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)])
def test_chunked_logprobs_with_softcap_and_scale_match_autograd(dtype, small_chunks, monkeypatch):
    """Chunked log-probs (chunks of positions recomputed in the backward pass) through softcapping and a logit scale
    equal autograd through the plain transform (values, entropy, gradients of the hidden states and of the head's
    weight), in fp32 and under bf16 autocast as --bf16 runs them."""
    vocab = 300
    if small_chunks:
        monkeypatch.setattr(speed, "LOGITS_PER_CHUNK", 4 * vocab)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 7, 8, generator=g)
    head = torch.nn.Linear(8, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, 8, generator=g) * 3)  # logits of tens: the softcap bends them
    tokens = torch.randint(0, vocab, hidden.shape[:2], generator=g)
    weights = torch.randn(hidden.shape[:2], generator=g)
    for scale, softcap in ((1.0, 5.0), (0.5, 5.0), (0.25, None)):
        out = {}
        for chunked in (False, True):
            h = hidden.clone().requires_grad_(True)
            head.weight.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                logprobs, entropy = ppo_rlhf.response_logprobs(head, h, tokens, 0.7, chunked, scale, softcap)
            (logprobs * weights).sum().backward()
            out[chunked] = logprobs.detach(), entropy, h.grad, head.weight.grad.clone()
        logits = models.transform_logits(head(hidden), scale, softcap) / 0.7
        expected = logits.log_softmax(-1).gather(2, tokens[..., None]).squeeze(-1)
        # bf16 matmuls: gradients of about 10 differ by up to ~0.06
        tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-1, rtol=3e-2)
        torch.testing.assert_close(out[False][0], expected, **tol)
        for a, b in zip(out[False], out[True]):
            torch.testing.assert_close(b, a, **tol)
