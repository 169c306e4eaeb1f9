//! Qwen3 (`Qwen3ForCausalLM`, `Qwen3ForSequenceClassification`): the Llama layers plus an
//! RMSNorm over each query and key head (`self_attn.q_norm`, `self_attn.k_norm`) before RoPE,
//! bias on all four attention projections with `attention_bias`, and a sliding window on the
//! layers `layer_types` names. The layers run in `decoder.rs`.

use tuna_core::hf_config::{HfConfig, Qwen3Config};

use super::decoder::{
    self, split_attention, split_mlp, DecoderFamily, Layer, QkNorm, Settings, Source,
};
use crate::model::Model;
use crate::Result;

/// The family (see [`DecoderFamily`]).
pub struct Qwen3;

pub(super) fn build(src: Source<'_>, hf: HfConfig, cfg: Qwen3Config) -> Result<Box<dyn Model>> {
    let s = &cfg.shape;
    let settings = Settings {
        layer_types: cfg.layer_types.clone(),
        sliding_window: cfg.sliding_window,
        ..Settings::new(s, &cfg.rope, cfg.attention_dropout)
    };
    let (hd, bias) = (s.head_dim, cfg.attention_bias);
    decoder::build::<Qwen3>(src, hf, s, settings, |b, p, n, r| {
        let mut attn = split_attention(b, p, s, (bias, bias), r)?;
        let (q, k) = n.qk(b, p, (hd, hd), r)?;
        attn.qk_norm = QkNorm::PerHead { q, k };
        let mlp = split_mlp(b, p, s, false, &cfg.hidden_act, r)?;
        Layer::pre_norm(b, p, n, r, attn, mlp)
    })
}

impl DecoderFamily for Qwen3 {
    const CLASS: &'static str = "Qwen3";
}
