//! The Llama family (`model_type`: `llama`, `mistral`, `qwen2`): one decoder layout (RMSNorm,
//! RoPE, GQA, SwiGLU), config.json as transformers' `LlamaConfig`, `MistralConfig` and
//! `Qwen2Config` write it, resolved into [`LlamaConfig`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::decoder::{window, DecoderFacts, DecoderShape, RawRopeKeys, RawShape, RopeConfig};
use super::{activation, dropout, err, from_json, int, Arch, Family, HfConfigError, Int};

pub(super) const FAMILY: Family = Family {
    model_types: &["llama", "mistral", "qwen2"],
    parse,
};

fn parse(value: &Value, model_type: &str) -> Result<Arch, HfConfigError> {
    let shape = from_json::<RawShape>(value)?.resolve(None, 1e-6)?;
    let rope = from_json::<RawRopeKeys>(value)?.resolve(shape.max_position_embeddings, 10000.0)?;
    Ok(Arch::Llama(
        from_json::<RawLlamaConfig>(value)?.into_config(model_type, shape, rope)?,
    ))
}

/// config.json as it is, beyond the sizes ([`RawShape`]) and RoPE keys ([`RawRopeKeys`]).
#[derive(Deserialize)]
struct RawLlamaConfig {
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    /// Llama only.
    mlp_bias: Option<bool>,
    attention_dropout: Option<f64>,
    sliding_window: Option<Int>,
    /// Qwen2 only.
    use_sliding_window: Option<bool>,
    max_window_layers: Option<Int>,
    // `pretraining_tp` only changed how the original code sliced matmuls: ignored.
}

/// Llama, Mistral and Qwen2 share one decoder layout (RMSNorm, RoPE, GQA, SwiGLU).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LlamaConfig {
    #[serde(flatten)]
    pub shape: DecoderShape,
    pub rope: RopeConfig,
    /// Bias on q/k/v (Qwen2 always; Llama when `attention_bias`). o_proj gets a bias only on Llama
    /// with `attention_bias`.
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub attention_dropout: f64,
    pub hidden_act: String,
    /// Sliding-window attention width (Mistral; Qwen2 when `use_sliding_window`), on every
    /// layer. None = full.
    pub sliding_window: Option<i64>,
}

impl RawLlamaConfig {
    fn into_config(
        self,
        model_type: &str,
        shape: DecoderShape,
        rope: RopeConfig,
    ) -> Result<LlamaConfig, HfConfigError> {
        let hidden_act = activation(self.hidden_act, "silu", "hidden_act")?;
        let attention_bias = self.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match model_type {
            "qwen2" => (true, false),
            "llama" => (attention_bias, attention_bias),
            _ => (false, false),
        };
        let sliding_window = match model_type {
            "mistral" => int(self.sliding_window),
            "qwen2" if self.use_sliding_window == Some(true) => {
                if int(self.max_window_layers).unwrap_or(0) < shape.num_hidden_layers {
                    return err("Qwen2 with sliding-window attention on only some layers (`max_window_layers`) is not supported");
                }
                int(self.sliding_window)
            }
            _ => None,
        };
        Ok(LlamaConfig {
            shape,
            rope,
            qkv_bias,
            o_bias,
            mlp_bias: model_type == "llama" && self.mlp_bias.unwrap_or(false),
            attention_dropout: dropout(self.attention_dropout, 0.0, "attention_dropout")?,
            hidden_act,
            sliding_window: window(sliding_window)?,
        })
    }
}

impl DecoderFacts for LlamaConfig {
    const FAMILY: &'static str = "llama";
    fn shape(&self) -> &DecoderShape {
        &self.shape
    }
    fn attention_dropout(&self) -> f64 {
        self.attention_dropout
    }
    fn layer_parameters(&self, s: &DecoderShape) -> i64 {
        let (d, i) = (s.hidden_size, s.intermediate_size);
        let mlp_bias = if self.mlp_bias { 2 * i + d } else { 0 };
        // Two norms.
        2 * d + s.attention_parameters(self.qkv_bias, self.o_bias) + s.mlp_parameters() + mlp_bias
    }
}
