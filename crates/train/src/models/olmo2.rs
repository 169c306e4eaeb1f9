//! OLMo 2 (`Olmo2ForCausalLM`, `Olmo2ForSequenceClassification`): the Llama projections with
//! the RMSNorms after attention and the MLP (`post_attention_layernorm`,
//! `post_feedforward_layernorm`) instead of before, weights applied in fp32, an RMSNorm over
//! the whole query and key projections (`self_attn.q_norm`, `self_attn.k_norm`) before RoPE,
//! and RoPE in fp32. The layers run in `decoder.rs`.

use tuna_core::hf_config::{HfConfig, Olmo2Config};

use super::decoder::{
    self, split_attention, split_mlp, DecoderFamily, Layer, QkNorm, Settings, Source,
};
use crate::layers::RmsScale;
use crate::model::Model;
use crate::Result;

/// The family (see [`DecoderFamily`]).
pub struct Olmo2;

pub(super) fn build(src: Source<'_>, hf: HfConfig, cfg: Olmo2Config) -> Result<Box<dyn Model>> {
    let s = &cfg.shape;
    let settings = Settings {
        norm: RmsScale::InFp32,
        rope_in_fp32: true,
        ..Settings::new(s, &cfg.rope, cfg.attention_dropout)
    };
    let d = s.hidden_size;
    let (q, kv) = (
        s.num_attention_heads * s.head_dim,
        s.num_key_value_heads * s.head_dim,
    );
    let bias = cfg.attention_bias;
    decoder::build::<Olmo2>(src, hf, s, settings, |b, p, n, r| {
        let mut attn = split_attention(b, p, s, (bias, bias), r)?;
        let (q, k) = n.qk(b, p, (q, kv), r)?;
        attn.qk_norm = QkNorm::Whole { q, k };
        Ok(Layer {
            attn_in: None,
            attn,
            attn_out: Some(n.load(b, &format!("{p}.post_attention_layernorm"), d, r)?),
            mlp_in: None,
            mlp: split_mlp(b, p, s, false, &cfg.hidden_act, r)?,
            mlp_out: Some(n.load(b, &format!("{p}.post_feedforward_layernorm"), d, r)?),
        })
    })
}

impl DecoderFamily for Olmo2 {
    const CLASS: &'static str = "Olmo2";
}
