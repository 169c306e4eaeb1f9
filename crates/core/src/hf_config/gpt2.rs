//! GPT-2 (`model_type: gpt2`): config.json as transformers' `GPT2Config` writes it, resolved
//! into [`Gpt2Config`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    activation, check_heads, dropout, err, from_json, int, positive, Arch, ArchFacts, Dims, Family,
    HfConfigError, Int,
};

pub(super) const FAMILY: Family = Family {
    model_types: &["gpt2"],
    parse,
};

fn parse(value: &Value, _model_type: &str) -> Result<Arch, HfConfigError> {
    Ok(Arch::Gpt2(
        from_json::<RawGpt2Config>(value)?.into_config()?,
    ))
}

/// config.json as it is. The aliases are the names transformers' `GPT2Config.attribute_map`
/// accepts for the GPT-2 ones.
#[derive(Deserialize)]
struct RawGpt2Config {
    vocab_size: Option<Int>,
    #[serde(alias = "max_position_embeddings")]
    n_positions: Option<Int>,
    #[serde(alias = "hidden_size")]
    n_embd: Option<Int>,
    #[serde(alias = "num_hidden_layers")]
    n_layer: Option<Int>,
    #[serde(alias = "num_attention_heads")]
    n_head: Option<Int>,
    n_inner: Option<Int>,
    activation_function: Option<String>,
    layer_norm_epsilon: Option<f64>,
    attn_pdrop: Option<f64>,
    resid_pdrop: Option<f64>,
    embd_pdrop: Option<f64>,
    scale_attn_weights: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    add_cross_attention: Option<bool>,
    // `reorder_and_upcast_attn` is numerically the same attention up to rounding: ignored.
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gpt2Config {
    pub vocab_size: i64,
    pub n_positions: i64,
    pub n_embd: i64,
    pub n_layer: i64,
    pub n_head: i64,
    /// MLP width (`n_inner`, default 4 × n_embd).
    pub n_inner: i64,
    pub activation_function: String,
    pub layer_norm_epsilon: f64,
    pub attn_pdrop: f64,
    pub resid_pdrop: f64,
    pub embd_pdrop: f64,
    pub scale_attn_weights: bool,
    pub scale_attn_by_inverse_layer_idx: bool,
}

impl RawGpt2Config {
    fn into_config(self) -> Result<Gpt2Config, HfConfigError> {
        let n_embd = positive(self.n_embd, "n_embd")?;
        let n_head = positive(self.n_head, "n_head")?;
        check_heads(n_embd, n_head, "n_embd")?;
        if self.add_cross_attention == Some(true) {
            return err("GPT-2 with cross-attention is not supported");
        }
        Ok(Gpt2Config {
            activation_function: activation(
                self.activation_function,
                "gelu_new",
                "activation_function",
            )?,
            vocab_size: positive(self.vocab_size, "vocab_size")?,
            n_positions: positive(self.n_positions, "n_positions")?,
            n_embd,
            n_layer: positive(self.n_layer, "n_layer")?,
            n_head,
            n_inner: int(self.n_inner).unwrap_or(4 * n_embd),
            layer_norm_epsilon: self.layer_norm_epsilon.unwrap_or(1e-5),
            attn_pdrop: dropout(self.attn_pdrop, 0.1, "attn_pdrop")?,
            resid_pdrop: dropout(self.resid_pdrop, 0.1, "resid_pdrop")?,
            embd_pdrop: dropout(self.embd_pdrop, 0.1, "embd_pdrop")?,
            scale_attn_weights: self.scale_attn_weights.unwrap_or(true),
            scale_attn_by_inverse_layer_idx: self.scale_attn_by_inverse_layer_idx.unwrap_or(false),
        })
    }
}

impl ArchFacts for Gpt2Config {
    fn family(&self) -> &'static str {
        "gpt2"
    }
    fn is_decoder(&self) -> bool {
        true
    }
    fn ties_embeddings_by_default(&self) -> bool {
        true
    }
    fn dims(&self) -> Dims {
        Dims {
            num_layers: self.n_layer,
            hidden_size: self.n_embd,
            num_heads: self.n_head,
            num_kv_heads: self.n_head,
            context_length: self.n_positions,
            vocab_size: self.vocab_size,
        }
    }
    fn layer_prefix(&self) -> &'static str {
        "transformer.h"
    }
    fn layer_linears(&self) -> &'static [&'static str] {
        &["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    }
    fn intermediate_size(&self) -> i64 {
        self.n_inner
    }
    fn layer_linear_shapes(&self) -> Vec<(i64, i64)> {
        let (d, i) = (self.n_embd, self.n_inner);
        vec![(d, 3 * d), (d, d), (d, i), (i, d)]
    }
    /// GPT-2 124M, batches of 2 and 4 x 256 and 2 x 512 tokens (BENCHMARKS.md, memory).
    fn activation_bytes_per_width(&self) -> f64 {
        22.9
    }
    fn cpu_attention_keeps_scores(&self) -> bool {
        self.attn_pdrop > 0.0
    }
    fn freeze_patterns(&self) -> &'static [&'static str] {
        &[
            "transformer.wte.*",
            "transformer.wpe.*",
            "transformer.h.*.attn.*",
            "transformer.h.*.mlp.*",
            "transformer.h.*.ln_*",
        ]
    }
    fn num_parameters(&self, tied: bool) -> i64 {
        let (d, ni) = (self.n_embd, self.n_inner);
        let layer = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * ni + ni) + (ni * d + d);
        let head = if tied { 0 } else { self.vocab_size * d };
        self.vocab_size * d + self.n_positions * d + self.n_layer * layer + 2 * d + head
    }
}
