//! Gemma 2 and Gemma 3 text (`model_type`: `gemma2`, `gemma3_text`): config.json as
//! transformers' `Gemma2Config` and `Gemma3TextConfig` write it, resolved into [`GemmaConfig`].
//!
//! One layout: embeddings scaled by sqrt(hidden_size), RMSNorm times `(1 + weight)`, a norm
//! before and after both attention and the MLP, attention scaled by `query_pre_attn_scalar`,
//! GQA, a gated gelu-tanh MLP, tied head, final logit soft-capping, and layers alternating
//! between a sliding window and global attention (`layer_types`; before it, Gemma 2 alternated
//! one to one and Gemma 3 made every `sliding_window_pattern`-th layer global). Gemma 2 also
//! soft-caps the attention logits; Gemma 3 normalises each query and key head and gives the
//! sliding layers their own RoPE base (`rope_parameters.sliding_attention`, formerly
//! `rope_local_base_freq`). transformers leaves Gemma 3's `attn_logit_softcapping` unused,
//! and so does tuna.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::decoder::{
    layer_types, rope, window, DecoderFacts, DecoderShape, LayerType, RawRope, RawRopeKeys,
    RawShape, RopeConfig,
};
use super::{activation, dropout, err, from_json, int, Arch, Family, HfConfigError, Int};

pub(super) const FAMILY: Family = Family {
    model_types: &["gemma2", "gemma3_text"],
    parse,
};

fn parse(value: &Value, model_type: &str) -> Result<Arch, HfConfigError> {
    let shape = from_json::<RawShape>(value)?.resolve(Some(256), 1e-6)?;
    let raw = from_json::<RawGemmaConfig>(value)?;
    let gemma3 = model_type == "gemma3_text";
    let (rope, local_rope) = if gemma3 {
        let r = from_json::<RawGemma3Rope>(value)?;
        let max_pos = shape.max_position_embeddings;
        let (full, sliding) = match r.rope_parameters {
            Some(p) => (p.full_attention, p.sliding_attention),
            None => (None, None),
        };
        let global = rope(full, r.rope_scaling, r.rope_theta, None, None, max_pos, 1e6)?;
        let local = rope(
            sliding,
            None,
            r.rope_local_base_freq,
            None,
            None,
            max_pos,
            1e4,
        )?;
        (global, Some(local))
    } else {
        let r = from_json::<RawRopeKeys>(value)?;
        (r.resolve(shape.max_position_embeddings, 1e4)?, None)
    };
    Ok(Arch::Gemma(
        raw.into_config(gemma3, shape, rope, local_rope)?,
    ))
}

/// A key whose `null` differs from its absence: `Some(None)` when written as null (transformers
/// then turns the feature off, where an absent key takes the class default).
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// config.json as it is, beyond the sizes and RoPE keys.
#[derive(Deserialize)]
struct RawGemmaConfig {
    /// Gemma's own key; `hidden_act`, which older configs also carry, is not read by transformers.
    hidden_activation: Option<String>,
    attention_bias: Option<bool>,
    attention_dropout: Option<f64>,
    query_pre_attn_scalar: Option<f64>,
    #[serde(default, deserialize_with = "nullable")]
    sliding_window: Option<Option<Int>>,
    /// Gemma 2 as transformers 4.42 wrote it, beside or instead of `sliding_window`.
    sliding_window_size: Option<Int>,
    layer_types: Option<Vec<String>>,
    /// Gemma 3 before `layer_types`.
    sliding_window_pattern: Option<Int>,
    #[serde(default, deserialize_with = "nullable")]
    attn_logit_softcapping: Option<Option<f64>>,
    #[serde(default, deserialize_with = "nullable")]
    final_logit_softcapping: Option<Option<f64>>,
    use_bidirectional_attention: Option<bool>,
}

/// Gemma 3's RoPE keys: one set per layer type (transformers ≥ 5), or `rope_theta` and
/// `rope_scaling` for the global layers beside `rope_local_base_freq` for the sliding ones.
#[derive(Deserialize)]
struct RawGemma3Rope {
    rope_parameters: Option<RawLayerRopes>,
    rope_scaling: Option<RawRope>,
    rope_theta: Option<f64>,
    rope_local_base_freq: Option<f64>,
}

#[derive(Deserialize)]
#[serde(expecting = "an object with `full_attention` and `sliding_attention`")]
struct RawLayerRopes {
    full_attention: Option<RawRope>,
    sliding_attention: Option<RawRope>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GemmaConfig {
    #[serde(flatten)]
    pub shape: DecoderShape,
    /// RoPE of the global layers (of every layer on Gemma 2).
    pub rope: RopeConfig,
    /// Gemma 3: RoPE of the sliding layers.
    pub local_rope: Option<RopeConfig>,
    /// Gemma 3: an RMSNorm over each query and key head (`q_norm`, `k_norm`).
    pub qk_norm: bool,
    /// Attention scores are scaled by `query_pre_attn_scalar ** -0.5`.
    pub query_pre_attn_scalar: f64,
    /// Gemma 2: attention logits become `cap * tanh(logits / cap)`.
    pub attn_logit_softcapping: Option<f64>,
    /// LM logits become `cap * tanh(logits / cap)`.
    pub final_logit_softcapping: Option<f64>,
    /// The window of the sliding layers (None: they attend globally too).
    pub sliding_window: Option<i64>,
    pub layer_types: Vec<LayerType>,
    pub attention_bias: bool,
    pub attention_dropout: f64,
    pub hidden_activation: String,
}

/// A soft-cap, `default` when config.json leaves the key out; `null` turns it off.
fn softcap(
    v: Option<Option<f64>>,
    default: Option<f64>,
    key: &str,
) -> Result<Option<f64>, HfConfigError> {
    match v.unwrap_or(default) {
        Some(c) if c <= 0.0 => err(format!("`{key}` must be positive, got {c}")),
        c => Ok(c),
    }
}

impl RawGemmaConfig {
    fn into_config(
        self,
        gemma3: bool,
        shape: DecoderShape,
        rope: RopeConfig,
        local_rope: Option<RopeConfig>,
    ) -> Result<GemmaConfig, HfConfigError> {
        if self.use_bidirectional_attention == Some(true) {
            return err(
                "`use_bidirectional_attention` is not supported: tuna trains causal decoders",
            );
        }
        let sliding_window = match self.sliding_window {
            Some(w) => int(w),
            None => int(self.sliding_window_size).or(Some(4096)),
        };
        let layer_types = match int(self.sliding_window_pattern) {
            Some(p) if p <= 0 => {
                return err(format!(
                    "`sliding_window_pattern` must be positive, got {p}"
                ))
            }
            p => {
                let every = if gemma3 { p.unwrap_or(6) } else { 2 };
                layer_types(self.layer_types, shape.num_hidden_layers, |i| {
                    (i + 1) % every != 0
                })?
            }
        };
        let scalar = self.query_pre_attn_scalar.unwrap_or(256.0);
        if scalar <= 0.0 {
            return err(format!(
                "`query_pre_attn_scalar` must be positive, got {scalar}"
            ));
        }
        let attn_cap = softcap(
            self.attn_logit_softcapping,
            Some(50.0),
            "attn_logit_softcapping",
        )?;
        let final_default = if gemma3 { None } else { Some(30.0) };
        Ok(GemmaConfig {
            shape,
            rope,
            local_rope,
            qk_norm: gemma3,
            query_pre_attn_scalar: scalar,
            attn_logit_softcapping: if gemma3 { None } else { attn_cap },
            final_logit_softcapping: softcap(
                self.final_logit_softcapping,
                final_default,
                "final_logit_softcapping",
            )?,
            sliding_window: window(sliding_window)?,
            layer_types,
            attention_bias: self.attention_bias.unwrap_or(false),
            attention_dropout: dropout(self.attention_dropout, 0.0, "attention_dropout")?,
            hidden_activation: activation(
                self.hidden_activation,
                "gelu_pytorch_tanh",
                "hidden_activation",
            )?,
        })
    }
}

impl DecoderFacts for GemmaConfig {
    const FAMILY: &'static str = "gemma";
    const TIES_BY_DEFAULT: bool = true;
    fn shape(&self) -> &DecoderShape {
        &self.shape
    }
    fn attention_dropout(&self) -> f64 {
        self.attention_dropout
    }
    fn layer_parameters(&self, s: &DecoderShape) -> i64 {
        let qk_norm = if self.qk_norm { 2 * s.head_dim } else { 0 };
        // Four norms.
        4 * s.hidden_size
            + s.attention_parameters(self.attention_bias, self.attention_bias)
            + qk_norm
            + s.mlp_parameters()
    }
}
