//! Qwen3 (`model_type: qwen3`): the Llama layout plus an RMSNorm over each query and key head
//! (`q_norm`, `k_norm`) before RoPE, config.json as transformers' `Qwen3Config` writes it,
//! resolved into [`Qwen3Config`]. `head_dim` is its own key (128 when left out, as transformers
//! defaults it), `attention_bias` puts a bias on all four attention projections, and with
//! `use_sliding_window` the layers from `max_window_layers` on (or those `layer_types` names)
//! attend through `sliding_window`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::decoder::{
    layer_types, window, DecoderFacts, DecoderShape, LayerType, RawRopeKeys, RawShape, RopeConfig,
};
use super::{activation, dropout, from_json, int, Arch, Family, HfConfigError, Int};

pub(super) const FAMILY: Family = Family {
    model_types: &["qwen3"],
    parse,
};

fn parse(value: &Value, _model_type: &str) -> Result<Arch, HfConfigError> {
    let shape = from_json::<RawShape>(value)?.resolve(Some(128), 1e-6)?;
    let rope = from_json::<RawRopeKeys>(value)?.resolve(shape.max_position_embeddings, 10000.0)?;
    Ok(Arch::Qwen3(
        from_json::<RawQwen3Config>(value)?.into_config(shape, rope)?,
    ))
}

/// config.json as it is, beyond the sizes and RoPE keys.
#[derive(Deserialize)]
struct RawQwen3Config {
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    attention_dropout: Option<f64>,
    use_sliding_window: Option<bool>,
    sliding_window: Option<Int>,
    max_window_layers: Option<Int>,
    layer_types: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Qwen3Config {
    #[serde(flatten)]
    pub shape: DecoderShape,
    pub rope: RopeConfig,
    /// Bias on q, k, v and o.
    pub attention_bias: bool,
    pub attention_dropout: f64,
    pub hidden_act: String,
    /// The window of the sliding layers (None when `use_sliding_window` is off).
    pub sliding_window: Option<i64>,
    pub layer_types: Vec<LayerType>,
}

impl RawQwen3Config {
    fn into_config(
        self,
        shape: DecoderShape,
        rope: RopeConfig,
    ) -> Result<Qwen3Config, HfConfigError> {
        let sliding_window = match self.use_sliding_window {
            Some(true) => window(Some(int(self.sliding_window).unwrap_or(4096)))?,
            _ => None,
        };
        let first_sliding = int(self.max_window_layers).unwrap_or(28);
        let layer_types = layer_types(self.layer_types, shape.num_hidden_layers, |i| {
            sliding_window.is_some() && i >= first_sliding
        })?;
        Ok(Qwen3Config {
            shape,
            rope,
            attention_bias: self.attention_bias.unwrap_or(false),
            attention_dropout: dropout(self.attention_dropout, 0.0, "attention_dropout")?,
            hidden_act: activation(self.hidden_act, "silu", "hidden_act")?,
            sliding_window,
            layer_types,
        })
    }
}

impl DecoderFacts for Qwen3Config {
    const FAMILY: &'static str = "qwen3";
    fn shape(&self) -> &DecoderShape {
        &self.shape
    }
    fn attention_dropout(&self) -> f64 {
        self.attention_dropout
    }
    fn layer_parameters(&self, s: &DecoderShape) -> i64 {
        // Two norms and the per-head q/k norms.
        2 * s.hidden_size
            + s.attention_parameters(self.attention_bias, self.attention_bias)
            + 2 * s.head_dim
            + s.mlp_parameters()
    }
}
