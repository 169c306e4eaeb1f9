//! OLMo 2 (`model_type: olmo2`): config.json as transformers' `Olmo2Config` writes it, resolved
//! into [`Olmo2Config`]. The Llama projections with the norms after each block instead of
//! before it (`post_attention_layernorm`, `post_feedforward_layernorm`) and an RMSNorm over
//! the whole query and key projections (`q_norm`, `k_norm`) before RoPE.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::decoder::{DecoderFacts, DecoderShape, RawRopeKeys, RawShape, RopeConfig};
use super::{activation, dropout, from_json, Arch, Family, HfConfigError};

pub(super) const FAMILY: Family = Family {
    model_types: &["olmo2"],
    parse,
};

fn parse(value: &Value, _model_type: &str) -> Result<Arch, HfConfigError> {
    let shape = from_json::<RawShape>(value)?.resolve(None, 1e-5)?;
    let rope = from_json::<RawRopeKeys>(value)?.resolve(shape.max_position_embeddings, 10000.0)?;
    let raw = from_json::<RawOlmo2Config>(value)?;
    Ok(Arch::Olmo2(Olmo2Config {
        shape,
        rope,
        attention_bias: raw.attention_bias.unwrap_or(false),
        attention_dropout: dropout(raw.attention_dropout, 0.0, "attention_dropout")?,
        hidden_act: activation(raw.hidden_act, "silu", "hidden_act")?,
    }))
}

/// config.json as it is, beyond the sizes and RoPE keys.
#[derive(Deserialize)]
struct RawOlmo2Config {
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    attention_dropout: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Olmo2Config {
    #[serde(flatten)]
    pub shape: DecoderShape,
    pub rope: RopeConfig,
    /// Bias on q, k, v and o.
    pub attention_bias: bool,
    pub attention_dropout: f64,
    pub hidden_act: String,
}

impl DecoderFacts for Olmo2Config {
    const FAMILY: &'static str = "olmo2";
    fn shape(&self) -> &DecoderShape {
        &self.shape
    }
    fn attention_dropout(&self) -> f64 {
        self.attention_dropout
    }
    fn layer_parameters(&self, s: &DecoderShape) -> i64 {
        // Two norms; q_norm and k_norm span all query and key heads.
        let qk_norm = (s.num_attention_heads + s.num_key_value_heads) * s.head_dim;
        2 * s.hidden_size
            + s.attention_parameters(self.attention_bias, self.attention_bias)
            + qk_norm
            + s.mlp_parameters()
    }
}
