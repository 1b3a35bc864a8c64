"""Tiny random-weight models of many transformers families (fixed seeds), each exercising an
attention feature the built-in engine's decode must reproduce exactly. Windows are 16-24
tokens, so prompts of 20-60 tokens plus 24 generated ones run past every window."""

from __future__ import annotations

# name -> (model_type, config kwargs, features covered)
H = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
         max_position_embeddings=512)
FAMILIES: dict[str, tuple[str, dict, str]] = {
    "llama": ("llama", dict(H, num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "grouped-query, llama3 rope scaling"),
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=4, n_head=4, n_positions=512), "learned positions"),
    "mistral": ("mistral", dict(H, num_key_value_heads=2, sliding_window=16),
                "sliding window (every layer) < prompt+output, grouped-query"),
    "mixtral": ("mixtral", dict(H, num_key_value_heads=1, sliding_window=20, num_local_experts=4,
                                num_experts_per_tok=2), "MoE, sliding window, multi-query"),
    "gemma2": ("gemma2", dict(H, num_key_value_heads=2, head_dim=16, sliding_window=16,
                              attn_logit_softcapping=20.0, final_logit_softcapping=15.0,
                              query_pre_attn_scalar=16), "attention + final softcapping (eager), sliding/full alternating"),
    "gemma3": ("gemma3_text", dict(H, num_hidden_layers=6, num_key_value_heads=2, head_dim=16,
                                   sliding_window=16, layer_types=["sliding_attention"] * 5 + ["full_attention"],
                                   query_pre_attn_scalar=16, final_logit_softcapping=None),
               "5 sliding : 1 full layers, per-layer-type rope"),
    "qwen2": ("qwen2", dict(H, num_key_value_heads=2, use_sliding_window=True, sliding_window=16,
                            max_window_layers=2, rope_parameters={
                                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                "original_max_position_embeddings": 128}),
              "mixed full/sliding layers (layer_types), yarn rope, grouped-query"),
    "bloom": ("bloom", dict(hidden_size=64, n_layer=4, n_head=4), "ALiBi (eager)"),
    "falcon": ("falcon", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                              multi_query=True, new_decoder_architecture=False, parallel_attn=True,
                              alibi=False, bias=False), "multi-query (Falcon-7B layout), parallel attention"),
    "phi": ("phi", dict(H, partial_rotary_factor=0.5), "partial rotary, parallel block"),
    "gpt_neox": ("gpt_neox", dict(H, rotary_pct=0.25, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}), "partial rotary, linear rope scaling"),
    "stablelm": ("stablelm", dict(H, num_key_value_heads=2, partial_rotary_factor=0.25),
                 "partial rotary, grouped-query"),
    "qwen3_moe": ("qwen3_moe", dict(H, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
                                    num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1),
                  "MoE, q/k norms, grouped-query"),
}
