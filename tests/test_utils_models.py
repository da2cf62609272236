"""rlhf_utils.models: a dedicated pad token for tokenizers without one (or whose pad is EOS), and the context length a
model's config states. The scripts with such tokenizers, end to end: tests/test_sft.py and tests/test_ppo_rlhf.py."""

import pytest
from helpers import EMBEDDED
from transformers import AutoTokenizer, GPT2Config, GPTNeoXConfig, LlamaConfig, PretrainedConfig

from rlhf_utils.models import (
    add_pad_token,
    checked_configs,
    context_length,
    logit_transform,
    unsupported_logit_transform,
)


@pytest.mark.parametrize("pad", [None, "eos"])
def test_a_tokenizer_without_its_own_pad_token_gets_one(pad):
    tok = AutoTokenizer.from_pretrained(f"{EMBEDDED}/tokenizer")
    tok.pad_token = tok.eos_token if pad == "eos" else None
    line = add_pad_token(tok)
    assert tok.pad_token == "[PAD]" and tok.pad_token_id not in (None, tok.eos_token_id)
    before = repr(tok.eos_token) if pad == "eos" else "None"
    assert line == (
        f"the tokenizer's pad token was {before} (EOS {tok.eos_token!r}): added a dedicated pad token '[PAD]' "
        f"(id {tok.pad_token_id}), saved with the output"
    )
    size = len(tok)
    assert add_pad_token(tok) is None and len(tok) == size and tok.pad_token == "[PAD]"  # dedicated: nothing more


def test_context_length_is_the_position_table_or_the_rotary_training_length():
    assert context_length(GPT2Config(n_positions=77)) == 77
    assert context_length(GPTNeoXConfig(max_position_embeddings=99)) == 99
    assert context_length(LlamaConfig(max_position_embeddings=4096)) == 4096
    assert context_length(PretrainedConfig()) is None  # a config that states neither


@pytest.mark.parametrize(
    "model_type, refused",
    [
        ("inkling_text", "inkling_text"),  # divides the hidden states by logits_mup_width_multiplier
        ("inkling_mm_model", "inkling_text"),  # a multimodal config: its text model decides
        ("recurrent_gemma", "recurrent_gemma"),  # caps with logits_soft_cap
        ("inkling2_text", None),  # dropped the multiplier
        ("llama", None),
        ("cohere_compass", None),
    ],
)
def test_architectures_whose_logits_are_not_reproduced_are_found_by_their_text_config(model_type, refused):
    from transformers import AutoConfig

    assert unsupported_logit_transform(AutoConfig.for_model(model_type)) == refused


def test_a_logit_scale_left_unset_is_one_not_a_crash():
    """Cohere Compass's text config leaves logit_scale None, and its forward then does not scale (as Cohere's would)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("cohere_compass")
    assert config.get_text_config().logit_scale is None
    assert logit_transform(config) == (1.0, None)
    assert logit_transform(AutoConfig.for_model("cohere", logit_scale=0.5)) == (0.5, None)
    assert logit_transform(AutoConfig.for_model("granite", logits_scaling=4.0)) == (0.25, None)


def test_checked_configs_reads_every_model_and_wants_room_for_a_prompt():
    import os

    sft, reward = os.path.join(EMBEDDED, "sft_model"), os.path.join(EMBEDDED, "reward_model")
    tokenizer = AutoTokenizer.from_pretrained(sft)
    models = {"sft_model_path": (sft, False), "reward_model_path": (reward, True), "value_model_path": (None, True)}
    configs, context = checked_configs(models, tokenizer, sft, False, 8)
    assert set(configs) == {"sft_model_path", "reward_model_path"} and configs["reward_model_path"].num_labels == 1
    assert context == min(context_length(c) for c in configs.values())
    with pytest.raises(SystemExit, match="--response-length: .* leave no room for a prompt"):
        checked_configs(models, tokenizer, sft, False, context)
