//! DistilBERT (`model_type: distilbert`): config.json as transformers' `DistilBertConfig` writes
//! it (`dim`, `n_layers`, `n_heads`, `hidden_dim`, `dropout`, `activation`, ...; the BERT names
//! its `attribute_map` accepts are read too), resolved into [`DistilBertConfig`]. An encoder
//! without token types: sequence classification only, through `pre_classifier` and `classifier`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::bert::layer_parameters;
use super::{
    activation, check_heads, dropout, from_json, positive, Arch, ArchFacts, Dims, Family,
    HfConfigError, Int,
};

pub(super) const FAMILY: Family = Family {
    model_types: &["distilbert"],
    parse,
};

fn parse(value: &Value, _model_type: &str) -> Result<Arch, HfConfigError> {
    Ok(Arch::DistilBert(
        from_json::<RawDistilBertConfig>(value)?.into_config()?,
    ))
}

/// config.json as it is. The aliases are the names `DistilBertConfig.attribute_map` accepts.
/// `sinusoidal_pos_embds` only chose how transformers initialises the position embeddings, which
/// the checkpoint holds either way; `tie_weights_` concerns the MLM head.
#[derive(Deserialize)]
struct RawDistilBertConfig {
    vocab_size: Option<Int>,
    max_position_embeddings: Option<Int>,
    #[serde(alias = "hidden_size")]
    dim: Option<Int>,
    #[serde(alias = "num_hidden_layers")]
    n_layers: Option<Int>,
    #[serde(alias = "num_attention_heads")]
    n_heads: Option<Int>,
    hidden_dim: Option<Int>,
    dropout: Option<f64>,
    attention_dropout: Option<f64>,
    activation: Option<String>,
    seq_classif_dropout: Option<f64>,
    qa_dropout: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DistilBertConfig {
    pub vocab_size: i64,
    pub max_position_embeddings: i64,
    pub dim: i64,
    pub n_layers: i64,
    pub n_heads: i64,
    /// Feed-forward width.
    pub hidden_dim: i64,
    pub dropout: f64,
    pub attention_dropout: f64,
    pub activation: String,
    /// Dropout before `classifier`.
    pub seq_classif_dropout: f64,
    /// Dropout before `qa_outputs` (question answering).
    pub qa_dropout: f64,
}

/// DistilBERT's LayerNorm epsilon (fixed in transformers' code, not in config.json).
pub const DISTILBERT_LAYER_NORM_EPS: f64 = 1e-12;

impl RawDistilBertConfig {
    fn into_config(self) -> Result<DistilBertConfig, HfConfigError> {
        let dim = positive(self.dim, "dim")?;
        let n_heads = positive(self.n_heads, "n_heads")?;
        check_heads(dim, n_heads, "dim")?;
        Ok(DistilBertConfig {
            vocab_size: positive(self.vocab_size, "vocab_size")?,
            max_position_embeddings: positive(
                self.max_position_embeddings,
                "max_position_embeddings",
            )?,
            dim,
            n_layers: positive(self.n_layers, "n_layers")?,
            n_heads,
            hidden_dim: positive(self.hidden_dim, "hidden_dim")?,
            dropout: dropout(self.dropout, 0.1, "dropout")?,
            attention_dropout: dropout(self.attention_dropout, 0.1, "attention_dropout")?,
            activation: activation(self.activation, "gelu", "activation")?,
            seq_classif_dropout: dropout(self.seq_classif_dropout, 0.2, "seq_classif_dropout")?,
            qa_dropout: dropout(self.qa_dropout, 0.1, "qa_dropout")?,
        })
    }
}

impl ArchFacts for DistilBertConfig {
    fn family(&self) -> &'static str {
        "distilbert"
    }
    fn is_decoder(&self) -> bool {
        false
    }
    fn ties_embeddings_by_default(&self) -> bool {
        true
    }
    fn dims(&self) -> Dims {
        Dims {
            num_layers: self.n_layers,
            hidden_size: self.dim,
            num_heads: self.n_heads,
            num_kv_heads: self.n_heads,
            context_length: self.max_position_embeddings,
            vocab_size: self.vocab_size,
        }
    }
    fn layer_prefix(&self) -> &'static str {
        "transformer.layer"
    }
    fn layer_linears(&self) -> &'static [&'static str] {
        &[
            "attention.q_lin",
            "attention.k_lin",
            "attention.v_lin",
            "attention.out_lin",
            "ffn.lin1",
            "ffn.lin2",
        ]
    }
    fn intermediate_size(&self) -> i64 {
        self.hidden_dim
    }
    fn layer_linear_shapes(&self) -> Vec<(i64, i64)> {
        let (d, i) = (self.dim, self.hidden_dim);
        vec![(d, d), (d, d), (d, d), (d, d), (d, i), (i, d)]
    }
    /// BERT's layer under other names.
    fn activation_bytes_per_width(&self) -> f64 {
        22.9
    }
    fn cpu_attention_keeps_scores(&self) -> bool {
        self.attention_dropout > 0.0
    }
    fn freeze_patterns(&self) -> &'static [&'static str] {
        &[
            "embeddings.*",
            "transformer.layer.*.attention.*",
            "transformer.layer.*.ffn.*",
            "transformer.layer.*_layer_norm.*",
        ]
    }
    /// Embeddings and layers (no pooler; `pre_classifier` belongs to the classification head).
    fn num_parameters(&self, _tied: bool) -> i64 {
        let d = self.dim;
        (self.vocab_size + self.max_position_embeddings) * d
            + 2 * d
            + self.n_layers * layer_parameters(d, self.hidden_dim)
    }
}
