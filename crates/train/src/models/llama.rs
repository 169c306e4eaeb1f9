//! The Llama family: Llama, Mistral and Qwen2 (`*ForCausalLM`, `*ForSequenceClassification`).
//! RMSNorm before attention and MLP, rotary embeddings (default, linear, dynamic NTK, llama3
//! and YaRN scaling), grouped-query attention, SwiGLU MLP, tied or untied output head, q/k/v
//! bias (Qwen2), sliding window on every layer (Mistral). The layers run in `decoder.rs`.

use tuna_core::hf_config::{HfConfig, LayerType, LlamaConfig};

use super::decoder::{self, split_attention, split_mlp, DecoderFamily, Layer, Settings, Source};
use crate::model::{Model, TaskHead};
use crate::Result;

/// The family (see [`DecoderFamily`]).
pub struct Llama;

pub(super) fn build(src: Source<'_>, hf: HfConfig, cfg: LlamaConfig) -> Result<Box<dyn Model>> {
    let s = &cfg.shape;
    let sliding = match cfg.sliding_window {
        Some(_) => LayerType::SlidingAttention,
        None => LayerType::FullAttention,
    };
    let settings = Settings {
        layer_types: vec![sliding; s.num_hidden_layers as usize],
        sliding_window: cfg.sliding_window,
        ..Settings::new(s, &cfg.rope, cfg.attention_dropout)
    };
    decoder::build::<Llama>(src, hf, s, settings, |b, p, n, r| {
        let attn = split_attention(b, p, s, (cfg.qkv_bias, cfg.o_bias), r)?;
        let mlp = split_mlp(b, p, s, cfg.mlp_bias, &cfg.hidden_act, r)?;
        Layer::pre_norm(b, p, n, r, attn, mlp)
    })
}

impl DecoderFamily for Llama {
    const CLASS: &'static str = "Llama";

    fn hf_class(model_type: &str, task: &TaskHead) -> String {
        let base = match model_type {
            "mistral" => "Mistral",
            "qwen2" => "Qwen2",
            _ => Self::CLASS,
        };
        decoder::class(base, task)
    }
}
