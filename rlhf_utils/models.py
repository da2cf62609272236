"""Tokenizer and model checks shared by every script."""

from typing import Optional


def add_pad_token(tokenizer) -> Optional[str]:
    """A tokenizer without a pad token (Pythia, Llama, Mistral) or whose pad is EOS (GPT-2 setups, Qwen2 base) gets a
    dedicated `[PAD]` special token, as TRL's example did: padding with EOS would make every real EOS look like padding
    in the masks. Returns the line to log when one was added, else None."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return None
    before = tokenizer.pad_token
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return (
        f"the tokenizer's pad token was {before!r} (EOS {tokenizer.eos_token!r}): added a dedicated pad token "
        f"{tokenizer.pad_token!r} (id {tokenizer.pad_token_id}), saved with the output"
    )


def context_length(config) -> Optional[int]:
    """The longest sequence the model covers: its position table (absolute positions index past it) or its rotary
    training length (beyond it rotary models extrapolate); None when the config states neither."""
    config = config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
