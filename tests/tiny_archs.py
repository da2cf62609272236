"""Tiny random models of the architectures users fine-tune, built from configs (no download), for tests.

    folder = save_tiny_causal_lm("llama", tmp_path / "llama", vocab_size=911)

Each is a few hundred thousand parameters at most and saves in well under a second. The configs keep each
architecture's own layout (RMSNorm vs LayerNorm, tied embeddings, GQA, parallel residual, softcapping) and shrink the
sizes only. Used by the architecture matrix tests; benchmark/ may use them too.
"""

import os

# Overrides that make every architecture tiny; each config class ignores none of these names in transformers 5.
_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512
)

ARCHITECTURES = {
    # name: (config class name in transformers, extra config fields)
    "gpt_neox": ("GPTNeoXConfig", dict(rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)),
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None)),
    "gemma2": (
        "Gemma2Config",
        dict(
            num_key_value_heads=2,
            head_dim=16,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            query_pre_attn_scalar=16,
            sliding_window=64,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            num_key_value_heads=2,
            head_dim=16,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=16,
            sliding_window=64,
        ),
    ),
    "phi3": ("Phi3Config", dict(num_key_value_heads=4, pad_token_id=None)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, n_inner=128)),
    "opt": ("OPTConfig", dict(ffn_dim=128, word_embed_proj_dim=64, do_layer_norm_before=True)),
    # Logit transforms of the model's own forward (not in the matrix of every test: they are less common).
    "granite": ("GraniteConfig", dict(num_key_value_heads=2, logits_scaling=4.0)),
    "cohere": ("CohereConfig", dict(num_key_value_heads=2, logit_scale=0.25)),
}

MATRIX = ["gpt_neox", "llama", "qwen2", "mistral", "gemma2", "gemma3", "phi3", "gpt2", "opt"]


def tiny_config(
    arch: str, vocab_size: int, bos_token_id: int = 0, eos_token_id: int = 0, pad_token_id=None, **overrides
):
    """The config of a tiny random `arch` model with the given vocabulary and special token ids."""
    import transformers

    class_name, extra = ARCHITECTURES[arch]
    fields = {
        **_COMMON,
        **extra,
        "vocab_size": vocab_size,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        **overrides,
    }
    if arch == "gpt2":  # GPT-2 names its sizes differently and rejects the common ones
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            fields.pop(k)
    if arch == "opt":
        fields.pop("intermediate_size")
    return getattr(transformers, class_name)(**fields)


def save_tiny_causal_lm(arch: str, folder, vocab_size: int = None, tokenizer=None, seed: int = 0, **overrides) -> str:
    """Build a tiny random causal LM of `arch` and save it (with the tokenizer, when given) in folder. The vocabulary
    is the tokenizer's length unless vocab_size is given."""
    import torch
    from transformers import AutoModelForCausalLM

    if vocab_size is None:
        vocab_size = len(tokenizer)
    ids = {}
    if tokenizer is not None:
        ids = dict(
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id or tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    config = tiny_config(arch, vocab_size, **ids, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
