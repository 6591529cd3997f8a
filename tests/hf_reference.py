"""The independent reference: transformers' DeepseekV4ForCausalLM (float64, eager
attention and experts) built from a ds4 GGUF's shape and loaded with its weights as
gguf-py dequantizes them. Tensor names follow gguf-layout.md §3."""
import numpy as np
import torch

from ds4.testing import read_dequantized

transformers = __import__("pytest").importorskip("transformers")
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

LAYER_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention"}

GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_hc_fn.weight": "model.hc_head.hc_fn",
    "output_hc_base.weight": "model.hc_head.hc_base",
    "output_hc_scale.weight": "model.hc_head.hc_scale",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

PER_LAYER = {   # GGUF blk.{L}.<key> -> transformers model.layers.{L}.<value>
    "hc_attn_fn.weight": "attn_hc.fn",
    "hc_attn_base.weight": "attn_hc.base",
    "hc_attn_scale.weight": "attn_hc.scale",
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_a_norm.weight": "self_attn.q_a_norm.weight",
    "attn_q_b.weight": "self_attn.q_b_proj.weight",
    "attn_kv.weight": "self_attn.kv_proj.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_norm.weight",
    "attn_sinks.weight": "self_attn.sinks",
    "attn_output_a.weight": "self_attn.o_a_proj.weight",
    "attn_output_b.weight": "self_attn.o_b_proj.weight",
    "hc_ffn_fn.weight": "ffn_hc.fn",
    "hc_ffn_base.weight": "ffn_hc.base",
    "hc_ffn_scale.weight": "ffn_hc.scale",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
    "ffn_gate_tid2eid.weight": "mlp.gate.tid2eid",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "attn_compressor_ape.weight": "self_attn.compressor.position_bias",
    "attn_compressor_kv.weight": "self_attn.compressor.kv_proj.weight",
    "attn_compressor_gate.weight": "self_attn.compressor.gate_proj.weight",
    "attn_compressor_norm.weight": "self_attn.compressor.kv_norm.weight",
    "indexer.attn_q_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "indexer.proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "indexer_compressor_ape.weight": "self_attn.compressor.indexer.position_bias",
    "indexer_compressor_kv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "indexer_compressor_gate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "indexer_compressor_norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
}


def hf_config(meta):
    """DeepseekV4Config from the GGUF metadata (the same keys the engine reads)."""
    arch = "deepseek4"
    g = lambda k: meta[f"{arch}.{k}"]
    ratios = [int(r) for r in g("attention.compress_ratios")]
    others = sorted({r for r in ratios if r not in (0, 4)})
    hca = others[0] if others else 128
    n = int(g("block_count"))
    head_dim = int(g("attention.key_length"))
    n_hash = int(g("hash_layer_count"))
    cfg = DeepseekV4Config(
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        hidden_size=int(g("embedding_length")),
        moe_intermediate_size=int(g("expert_feed_forward_length")),
        num_hidden_layers=n,
        num_attention_heads=int(g("attention.head_count")),
        num_key_value_heads=1,
        head_dim=head_dim,
        q_lora_rank=int(g("attention.q_lora_rank")),
        num_experts_per_tok=int(g("expert_used_count")),
        n_routed_experts=int(g("expert_count")),
        n_shared_experts=int(g("expert_shared_count")),
        routed_scaling_factor=float(g("expert_weights_scale")),
        norm_topk_prob=bool(g("expert_weights_norm")),
        rope_theta=float(g("rope.freq_base")),
        compress_rope_theta=float(g("attention.compress_rope_freq_base")),
        layer_types=[LAYER_TYPE.get(r, "heavily_compressed_attention") for r in ratios],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": hca},
        mlp_layer_types=["hash_moe" if l < n_hash else "moe" for l in range(n)],
        hc_mult=int(g("hyper_connection.count")),
        hc_sinkhorn_iters=int(g("hyper_connection.sinkhorn_iterations")),
        hc_eps=float(g("hyper_connection.epsilon")),
        swiglu_limit=float(np.asarray(g("swiglu_clamp_exp")).reshape(-1)[0]),
        sliding_window=int(g("attention.sliding_window")),
        o_groups=int(g("attention.output_group_count")),
        o_lora_rank=int(g("attention.output_lora_rank")),
        index_n_heads=int(g("attention.indexer.head_count")),
        index_head_dim=int(g("attention.indexer.key_length")),
        index_topk=int(g("attention.indexer.top_k")),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon")),
        partial_rotary_factor=int(g("rope.dimension_count")) / head_dim,
        rope_parameters={
            "rope_type": "yarn",
            "factor": float(g("rope.scaling.factor")),
            "original_max_position_embeddings": int(g("rope.scaling.original_context_length")),
            "beta_fast": float(g("rope.scaling.yarn_beta_fast")),
            "beta_slow": float(g("rope.scaling.yarn_beta_slow")),
        },
        max_position_embeddings=int(g("context_length")),
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    return cfg


def hf_model_from_gguf(path):
    """The transformers model in float64 holding the GGUF's dequantized weights.
    Every parameter and buffer of the model must be covered by the file."""
    from ds4.gguf import GGUFFile
    with GGUFFile(path) as f:
        meta = dict(f.metadata)
    cfg = hf_config(meta)
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(cfg).to(torch.float64).eval()
    weights = read_dequantized(path)
    state = {}
    for name, value in weights.items():
        if name in GLOBAL:
            state[GLOBAL[name]] = value
            continue
        _, layer, key = name.split(".", 2)
        prefix = f"model.layers.{layer}."
        if key == "ffn_gate_exps.weight":
            up = weights[f"blk.{layer}.ffn_up_exps.weight"]
            state[prefix + "mlp.experts.gate_up_proj"] = np.concatenate([value, up], axis=1)
        elif key == "ffn_up_exps.weight":
            continue
        else:
            state[prefix + PER_LAYER[key]] = value
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and "rotary" not in k and "inv_freq" not in k)
    extra = sorted(k for k in state if k not in own)
    if missing or extra:
        raise AssertionError(f"weight mapping incomplete: missing {missing[:8]}, unknown {extra[:8]}")
    with torch.no_grad():
        for k, v in state.items():
            dst = own[k]
            src = torch.from_numpy(np.array(v)).reshape(dst.shape)
            dst.copy_(src.to(dst.dtype))
    return model


def hf_logits(model, ids):
    """float64 logits [len(ids), vocab] of one full forward over ids (no cache)."""
    with torch.no_grad():
        out = model(torch.tensor([list(ids)]), use_cache=False)
    return out.logits[0].to(torch.float64).numpy()
