//! Gemma 2 and Gemma 3 text (`Gemma2ForCausalLM`, `Gemma3ForCausalLM` and their
//! `*SequenceClassification` classes): embeddings scaled by sqrt(hidden_size), RMSNorms times
//! `(1 + weight)` before and after both attention (`input_layernorm`,
//! `post_attention_layernorm`) and the MLP (`pre_feedforward_layernorm`,
//! `post_feedforward_layernorm`), attention scaled by `query_pre_attn_scalar`, sliding-window
//! and global layers, gelu-tanh gated MLP, final logit soft-capping. Gemma 2 soft-caps the
//! attention scores; Gemma 3 normalises each query and key head and gives its sliding layers
//! their own RoPE. The layers run in `decoder.rs`.

use tuna_core::hf_config::{GemmaConfig, HfConfig};

use super::decoder::{
    self, split_attention, split_mlp, AttnSpec, DecoderFamily, Layer, QkNorm, Settings, Source,
};
use crate::layers::RmsScale;
use crate::model::{Model, TaskHead};
use crate::Result;

/// The family (see [`DecoderFamily`]).
pub struct Gemma;

pub(super) fn build(src: Source<'_>, hf: HfConfig, cfg: GemmaConfig) -> Result<Box<dyn Model>> {
    let s = &cfg.shape;
    let settings = Settings {
        layer_types: cfg.layer_types.clone(),
        sliding_window: cfg.sliding_window,
        local_rope: cfg.local_rope.as_ref(),
        attn: AttnSpec {
            scale: 1.0 / cfg.query_pre_attn_scalar.sqrt(),
            softcap: cfg.attn_logit_softcapping,
            ..AttnSpec::new(s, cfg.attention_dropout)
        },
        embed_scale: Some((s.hidden_size as f64).sqrt()),
        final_softcap: cfg.final_logit_softcapping,
        norm: RmsScale::OnePlusInFp32,
        ..Settings::new(s, &cfg.rope, cfg.attention_dropout)
    };
    let (d, hd, bias) = (s.hidden_size, s.head_dim, cfg.attention_bias);
    decoder::build::<Gemma>(src, hf, s, settings, |b, p, n, r| {
        let mut attn = split_attention(b, p, s, (bias, bias), r)?;
        if cfg.qk_norm {
            let (q, k) = n.qk(b, p, (hd, hd), r)?;
            attn.qk_norm = QkNorm::PerHead { q, k };
        }
        Ok(Layer {
            attn_in: Some(n.load(b, &format!("{p}.input_layernorm"), d, r)?),
            attn,
            attn_out: Some(n.load(b, &format!("{p}.post_attention_layernorm"), d, r)?),
            mlp_in: Some(n.load(b, &format!("{p}.pre_feedforward_layernorm"), d, r)?),
            mlp: split_mlp(b, p, s, false, &cfg.hidden_activation, r)?,
            mlp_out: Some(n.load(b, &format!("{p}.post_feedforward_layernorm"), d, r)?),
        })
    })
}

impl DecoderFamily for Gemma {
    const CLASS: &'static str = "Gemma2";

    fn hf_class(model_type: &str, task: &TaskHead) -> String {
        match (model_type, task) {
            ("gemma3_text", TaskHead::SequenceClassification { .. }) => {
                "Gemma3TextForSequenceClassification".into()
            }
            ("gemma3_text", _) => decoder::class("Gemma3", task),
            _ => decoder::class(Self::CLASS, task),
        }
    }
}
