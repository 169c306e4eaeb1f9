//! RoBERTa and XLM-RoBERTa (`model_type`: `roberta`, `xlm-roberta`): BERT's keys (read through
//! [`RawBertConfig`]) plus `pad_token_id`, which is also the position embeddings' padding index:
//! positions count the non-pad tokens from `pad_token_id + 1`, so the model takes
//! `max_position_embeddings - pad_token_id - 1` tokens. An encoder: sequence classification only,
//! with no pooler (RoBERTa's classification head reads `<s>` itself).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::bert::{RawBertConfig, FREEZE_PATTERNS, LAYER_LINEARS};
use super::{err, from_json, int, Arch, ArchFacts, BertConfig, Dims, Family, HfConfigError, Int};

pub(super) const FAMILY: Family = Family {
    model_types: &["roberta", "xlm-roberta"],
    parse,
};

fn parse(value: &Value, model_type: &str) -> Result<Arch, HfConfigError> {
    let name = if model_type == "roberta" {
        "RoBERTa"
    } else {
        "XLM-RoBERTa"
    };
    let bert = from_json::<RawBertConfig>(value)?.into_config(name)?;
    let RawPad { pad_token_id } = from_json(value)?;
    // transformers' RobertaConfig and XLMRobertaConfig default.
    let padding_idx = int(pad_token_id).unwrap_or(1);
    if padding_idx < 0 || padding_idx + 1 >= bert.max_position_embeddings {
        return err(format!(
            "`pad_token_id` ({padding_idx}) must leave positions below `max_position_embeddings` ({}): {name} numbers positions from pad_token_id + 1",
            bert.max_position_embeddings
        ));
    }
    Ok(Arch::Roberta(RobertaConfig { bert, padding_idx }))
}

#[derive(Deserialize)]
struct RawPad {
    pad_token_id: Option<Int>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RobertaConfig {
    #[serde(flatten)]
    pub bert: BertConfig,
    /// `pad_token_id`: the padding index of the word and position embeddings.
    pub padding_idx: i64,
}

impl RobertaConfig {
    /// The longest input: positions run from `padding_idx + 1` to `max_position_embeddings - 1`.
    pub fn max_tokens(&self) -> i64 {
        self.bert.max_position_embeddings - self.padding_idx - 1
    }
}

impl ArchFacts for RobertaConfig {
    fn family(&self) -> &'static str {
        "roberta"
    }
    fn is_decoder(&self) -> bool {
        false
    }
    fn ties_embeddings_by_default(&self) -> bool {
        true
    }
    fn dims(&self) -> Dims {
        Dims {
            context_length: self.max_tokens(),
            ..self.bert.dims()
        }
    }
    fn layer_prefix(&self) -> &'static str {
        "encoder.layer"
    }
    fn layer_linears(&self) -> &'static [&'static str] {
        LAYER_LINEARS
    }
    fn intermediate_size(&self) -> i64 {
        self.bert.intermediate_size
    }
    fn layer_linear_shapes(&self) -> Vec<(i64, i64)> {
        self.bert.layer_linear_shapes()
    }
    fn activation_bytes_per_width(&self) -> f64 {
        self.bert.activation_bytes_per_width()
    }
    fn cpu_attention_keeps_scores(&self) -> bool {
        self.bert.cpu_attention_keeps_scores()
    }
    fn freeze_patterns(&self) -> &'static [&'static str] {
        &FREEZE_PATTERNS[..4]
    }
    /// Embeddings and layers: the classification model has no pooler.
    fn num_parameters(&self, _tied: bool) -> i64 {
        self.bert.encoder_parameters()
    }
}
