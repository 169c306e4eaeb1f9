//! Phi-3 (`Phi3ForCausalLM`, `Phi3ForSequenceClassification`): the Llama layers with fused
//! projections (`self_attn.qkv_proj`, `mlp.gate_up_proj`; LoRA attaches to them whole, as
//! PEFT does), plain or LongRoPE rotary embeddings, possibly on part of each head, dropout on
//! the residual branches (`resid_pdrop`) and one sliding window on every layer. The layers run
//! in `decoder.rs`.

use tuna_core::hf_config::{HfConfig, LayerType, Phi3Config};

use super::decoder::{
    self, Attention, DecoderFamily, GateUp, Layer, Mlp, QkNorm, Qkv, Settings, Source,
};
use crate::model::Model;
use crate::Result;

/// The family (see [`DecoderFamily`]).
pub struct Phi3;

pub(super) fn build(src: Source<'_>, hf: HfConfig, cfg: Phi3Config) -> Result<Box<dyn Model>> {
    let s = &cfg.shape;
    let settings = Settings {
        layer_types: vec![LayerType::SlidingAttention; s.num_hidden_layers as usize],
        sliding_window: cfg.sliding_window,
        resid_dropout: cfg.resid_pdrop,
        ..Settings::new(s, &cfg.rope, cfg.attention_dropout)
    };
    let (d, i) = (s.hidden_size, s.intermediate_size);
    let qkv = (s.num_attention_heads + 2 * s.num_key_value_heads) * s.head_dim;
    let q = s.num_attention_heads * s.head_dim;
    decoder::build::<Phi3>(src, hf, s, settings, |b, p, n, r| {
        let attn = Attention {
            qkv: Qkv::Fused(b.linear(
                &format!("{p}.self_attn.qkv_proj"),
                d,
                qkv,
                false,
                r,
                false,
            )?),
            o: b.linear(&format!("{p}.self_attn.o_proj"), q, d, false, r, false)?,
            qk_norm: QkNorm::None,
        };
        let mlp = Mlp {
            gate_up: GateUp::Fused(b.linear(
                &format!("{p}.mlp.gate_up_proj"),
                d,
                2 * i,
                false,
                r,
                false,
            )?),
            down: b.linear(&format!("{p}.mlp.down_proj"), i, d, false, r, false)?,
            act: cfg.hidden_act.clone(),
        };
        Layer::pre_norm(b, p, n, r, attn, mlp)
    })
}

impl DecoderFamily for Phi3 {
    const CLASS: &'static str = "Phi3";
}
