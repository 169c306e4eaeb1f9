//! BERT (`model_type: bert`): config.json as transformers' `BertConfig` writes it, resolved into
//! [`BertConfig`]. An encoder: sequence classification only. RoBERTa (`roberta.rs`) has the same
//! keys and reads them through [`RawBertConfig`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    activation, check_heads, dropout, err, from_json, int, positive, Arch, ArchFacts, Dims, Family,
    HfConfigError, Int,
};

pub(super) const FAMILY: Family = Family {
    model_types: &["bert"],
    parse,
};

fn parse(value: &Value, _model_type: &str) -> Result<Arch, HfConfigError> {
    Ok(Arch::Bert(
        from_json::<RawBertConfig>(value)?.into_config("BERT")?,
    ))
}

/// config.json as it is.
#[derive(Deserialize)]
pub(super) struct RawBertConfig {
    vocab_size: Option<Int>,
    hidden_size: Option<Int>,
    num_hidden_layers: Option<Int>,
    num_attention_heads: Option<Int>,
    intermediate_size: Option<Int>,
    hidden_act: Option<String>,
    hidden_dropout_prob: Option<f64>,
    attention_probs_dropout_prob: Option<f64>,
    classifier_dropout: Option<f64>,
    max_position_embeddings: Option<Int>,
    type_vocab_size: Option<Int>,
    layer_norm_eps: Option<f64>,
    position_embedding_type: Option<String>,
    is_decoder: Option<bool>,
    add_cross_attention: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BertConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub hidden_act: String,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub classifier_dropout: Option<f64>,
    pub max_position_embeddings: i64,
    pub type_vocab_size: i64,
    pub layer_norm_eps: f64,
}

impl RawBertConfig {
    /// `family` names the model in errors ("BERT", "RoBERTa").
    pub(super) fn into_config(self, family: &str) -> Result<BertConfig, HfConfigError> {
        let hidden_size = positive(self.hidden_size, "hidden_size")?;
        let heads = positive(self.num_attention_heads, "num_attention_heads")?;
        check_heads(hidden_size, heads, "hidden_size")?;
        let pet = self
            .position_embedding_type
            .unwrap_or_else(|| "absolute".to_string());
        if pet != "absolute" {
            return err(format!(
                "{family} `position_embedding_type` '{pet}' is not supported (only 'absolute')"
            ));
        }
        if self.is_decoder == Some(true) || self.add_cross_attention == Some(true) {
            return err(format!(
                "{family} as a decoder is not supported (`is_decoder`)"
            ));
        }
        let hidden_act = activation(self.hidden_act, "gelu", "hidden_act")?;
        let classifier_dropout = match self.classifier_dropout {
            Some(p) if !(0.0..1.0).contains(&p) => {
                return err(format!("`classifier_dropout` must be in [0, 1), got {p}"))
            }
            other => other,
        };
        Ok(BertConfig {
            vocab_size: positive(self.vocab_size, "vocab_size")?,
            hidden_size,
            num_hidden_layers: positive(self.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads: heads,
            intermediate_size: positive(self.intermediate_size, "intermediate_size")?,
            hidden_act,
            hidden_dropout_prob: dropout(self.hidden_dropout_prob, 0.1, "hidden_dropout_prob")?,
            attention_probs_dropout_prob: dropout(
                self.attention_probs_dropout_prob,
                0.1,
                "attention_probs_dropout_prob",
            )?,
            classifier_dropout,
            max_position_embeddings: positive(
                self.max_position_embeddings,
                "max_position_embeddings",
            )?,
            type_vocab_size: int(self.type_vocab_size).unwrap_or(2),
            layer_norm_eps: self.layer_norm_eps.unwrap_or(1e-12),
        })
    }
}

/// The linear modules of a BERT (and RoBERTa) layer.
pub(super) const LAYER_LINEARS: &[&str] = &[
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

/// BERT's freeze examples; the last one, the pooler, is BERT's own (RoBERTa's classification
/// model has none).
pub(super) const FREEZE_PATTERNS: [&str; 5] = [
    "embeddings.*",
    "encoder.layer.*.attention.*",
    "encoder.layer.*.intermediate.*",
    "encoder.layer.*.output.*",
    "pooler.*",
];

impl ArchFacts for BertConfig {
    fn family(&self) -> &'static str {
        "bert"
    }
    fn is_decoder(&self) -> bool {
        false
    }
    fn ties_embeddings_by_default(&self) -> bool {
        true
    }
    fn dims(&self) -> Dims {
        Dims {
            num_layers: self.num_hidden_layers,
            hidden_size: self.hidden_size,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_attention_heads,
            context_length: self.max_position_embeddings,
            vocab_size: self.vocab_size,
        }
    }
    fn layer_prefix(&self) -> &'static str {
        "encoder.layer"
    }
    fn layer_linears(&self) -> &'static [&'static str] {
        LAYER_LINEARS
    }
    fn other_linears(&self) -> &'static [&'static str] {
        &["pooler.dense"]
    }
    fn intermediate_size(&self) -> i64 {
        self.intermediate_size
    }
    fn layer_linear_shapes(&self) -> Vec<(i64, i64)> {
        let (d, i) = (self.hidden_size, self.intermediate_size);
        vec![(d, d), (d, d), (d, d), (d, d), (d, i), (i, d)]
    }
    /// Like GPT-2 (post-norm blocks with a GELU MLP): all-MiniLM-L6-v2's SST-2 batches are too
    /// short to measure it apart from the runtime.
    fn activation_bytes_per_width(&self) -> f64 {
        22.9
    }
    fn cpu_attention_keeps_scores(&self) -> bool {
        self.attention_probs_dropout_prob > 0.0
    }
    fn freeze_patterns(&self) -> &'static [&'static str] {
        &FREEZE_PATTERNS
    }
    /// No LM head: `tied` does not matter.
    fn num_parameters(&self, _tied: bool) -> i64 {
        let d = self.hidden_size;
        self.encoder_parameters() + (d * d + d)
    }
}

impl BertConfig {
    /// Embeddings and layers (what BERT and RoBERTa share; BERT adds its pooler).
    pub(super) fn encoder_parameters(&self) -> i64 {
        let d = self.hidden_size;
        (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * d
            + 2 * d
            + self.num_hidden_layers * layer_parameters(d, self.intermediate_size)
    }
}

/// One post-LayerNorm encoder layer of width `d` and feed-forward width `i` (BERT, RoBERTa,
/// DistilBERT, DeBERTa without its relative-position projections): q, k, v and output
/// projections, two LayerNorms, the feed-forward pair, every linear with a bias.
pub(super) fn layer_parameters(d: i64, i: i64) -> i64 {
    4 * (d * d + d) + 4 * d + (d * i + i) + (i * d + d)
}
