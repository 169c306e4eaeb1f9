//! DeBERTa-v2 and -v3 (`model_type: deberta-v2`; v3 checkpoints use the same type): config.json as
//! transformers' `DebertaV2Config` writes it, resolved into [`DebertaV2Config`]. An encoder with
//! disentangled attention: content-to-position (`c2p`) and position-to-content (`p2c`) scores over
//! relative positions (log-bucketed with `position_buckets`, clipped at `max_relative_positions`),
//! projected by the layer's own query/key projections (`share_att_key`) or by separate ones, with
//! optionally LayerNorm'd relative embeddings (`norm_rel_ebd`) and v2's convolution after the
//! first layer (`conv_kernel_size`). Sequence classification through `pooler` (transformers'
//! `ContextPooler`) and `classifier`.
//!
//! `pos_att_type` is a list (transformers ≥ 5) or a `|`-separated string (earlier, and the
//! published v2/v3 configs).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::bert::layer_parameters;
use super::{
    activation, check_heads, dropout, err, from_json, int, positive, Arch, ArchFacts, Dims, Family,
    HfConfigError, Int,
};

pub(super) const FAMILY: Family = Family {
    model_types: &["deberta-v2"],
    parse,
};

fn parse(value: &Value, _model_type: &str) -> Result<Arch, HfConfigError> {
    Ok(Arch::DebertaV2(
        from_json::<RawDebertaV2Config>(value)?.into_config()?,
    ))
}

/// `pos_att_type` as it is.
#[derive(Deserialize)]
#[serde(untagged, expecting = "a list of strings or a '|'-separated string")]
enum RawPosAttType {
    List(Vec<String>),
    Joined(String),
}

/// config.json as it is. `legacy` (which MLM head) and `z_steps` do not touch classification.
#[derive(Deserialize)]
struct RawDebertaV2Config {
    vocab_size: Option<Int>,
    hidden_size: Option<Int>,
    num_hidden_layers: Option<Int>,
    num_attention_heads: Option<Int>,
    intermediate_size: Option<Int>,
    hidden_act: Option<String>,
    hidden_dropout_prob: Option<f64>,
    attention_probs_dropout_prob: Option<f64>,
    max_position_embeddings: Option<Int>,
    type_vocab_size: Option<Int>,
    layer_norm_eps: Option<f64>,
    relative_attention: Option<bool>,
    max_relative_positions: Option<Int>,
    position_buckets: Option<Int>,
    position_biased_input: Option<bool>,
    pos_att_type: Option<RawPosAttType>,
    share_att_key: Option<bool>,
    norm_rel_ebd: Option<String>,
    attention_head_size: Option<Int>,
    embedding_size: Option<Int>,
    conv_kernel_size: Option<Int>,
    conv_groups: Option<Int>,
    conv_act: Option<String>,
    pooler_hidden_size: Option<Int>,
    pooler_hidden_act: Option<String>,
    pooler_dropout: Option<f64>,
    cls_dropout: Option<f64>,
}

/// Relative-position attention (`relative_attention: true`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelativeAttention {
    /// Log buckets of the relative positions (`position_buckets`), None when not bucketed.
    pub position_buckets: Option<i64>,
    /// `max_relative_positions`, or `max_position_embeddings` when below 1.
    pub max_relative_positions: i64,
}

impl RelativeAttention {
    /// Relative embeddings span `-att_span..att_span`: `position_buckets`, else
    /// `max_relative_positions`.
    pub fn att_span(&self) -> i64 {
        self.position_buckets.unwrap_or(self.max_relative_positions)
    }
}

/// v2's convolution after the first layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConvConfig {
    pub kernel_size: i64,
    pub groups: i64,
    pub act: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DebertaV2Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub hidden_act: String,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: i64,
    /// Token type embeddings when positive.
    pub type_vocab_size: i64,
    pub layer_norm_eps: f64,
    /// Absolute position embeddings added to the input (`position_biased_input`).
    pub position_biased_input: bool,
    pub relative: Option<RelativeAttention>,
    /// `pos_att_type` contains `c2p` / `p2c` (they also scale the scores without relative
    /// attention, as transformers does).
    pub c2p: bool,
    pub p2c: bool,
    /// Relative positions go through the layer's `query_proj`/`key_proj`; else through
    /// `pos_query_proj` (p2c) and `pos_key_proj` (c2p).
    pub share_att_key: bool,
    /// `norm_rel_ebd` contains `layer_norm`: `encoder.LayerNorm` over the relative embeddings.
    pub norm_rel_ebd: bool,
    pub conv: Option<ConvConfig>,
    pub pooler_hidden_act: String,
    pub pooler_dropout: f64,
    /// Dropout before `classifier` (`cls_dropout`, else `hidden_dropout_prob`).
    pub cls_dropout: f64,
}

impl DebertaV2Config {
    /// Separate position projections: relative attention without `share_att_key`.
    pub fn pos_key_proj(&self) -> bool {
        self.relative.is_some() && !self.share_att_key && self.c2p
    }

    pub fn pos_query_proj(&self) -> bool {
        self.relative.is_some() && !self.share_att_key && self.p2c
    }
}

/// `key`, when present, must equal `hidden_size` (tuna has no projection for another width).
fn same_as_hidden(v: Option<Int>, hidden: i64, key: &str) -> Result<(), HfConfigError> {
    match int(v) {
        Some(n) if n != hidden => err(format!(
            "`{key}` ({n}) differs from `hidden_size` ({hidden}): not supported"
        )),
        _ => Ok(()),
    }
}

impl RawDebertaV2Config {
    fn into_config(self) -> Result<DebertaV2Config, HfConfigError> {
        let hidden_size = positive(self.hidden_size, "hidden_size")?;
        let heads = positive(self.num_attention_heads, "num_attention_heads")?;
        check_heads(hidden_size, heads, "hidden_size")?;
        if let Some(n) = int(self.attention_head_size) {
            if n * heads != hidden_size {
                return err(format!(
                    "`attention_head_size` ({n}) × num_attention_heads ({heads}) must equal hidden_size ({hidden_size})"
                ));
            }
        }
        same_as_hidden(self.embedding_size, hidden_size, "embedding_size")?;
        same_as_hidden(self.pooler_hidden_size, hidden_size, "pooler_hidden_size")?;
        let max_position_embeddings =
            positive(self.max_position_embeddings, "max_position_embeddings")?;
        let (mut c2p, mut p2c) = (false, false);
        let kinds = match self.pos_att_type {
            None => Vec::new(),
            Some(RawPosAttType::List(v)) => v,
            Some(RawPosAttType::Joined(s)) => {
                s.to_lowercase().split('|').map(String::from).collect()
            }
        };
        for k in kinds {
            match k.trim() {
                "c2p" => c2p = true,
                "p2c" => p2c = true,
                other => {
                    return err(format!(
                        "`pos_att_type` '{other}' is not supported (supported: c2p, p2c)"
                    ))
                }
            }
        }
        let relative = if self.relative_attention.unwrap_or(false) {
            let max_rel = int(self.max_relative_positions).unwrap_or(-1);
            Some(RelativeAttention {
                position_buckets: int(self.position_buckets).filter(|&b| b > 0),
                max_relative_positions: if max_rel < 1 {
                    max_position_embeddings
                } else {
                    max_rel
                },
            })
        } else {
            None
        };
        if let Some(RelativeAttention {
            position_buckets: Some(b),
            max_relative_positions: m,
        }) = &relative
        {
            // The log buckets start at b / 2 and reach m - 1.
            if *b < 2 || m - 1 <= b / 2 {
                return err(format!(
                    "`position_buckets` ({b}) must be at least 2 and below 2 × (max_relative_positions - 1) ({m} - 1)"
                ));
            }
        }
        let mut norm_rel_ebd = false;
        for part in self.norm_rel_ebd.as_deref().unwrap_or("none").split('|') {
            match part.trim().to_lowercase().as_str() {
                "layer_norm" => norm_rel_ebd = true,
                "none" => {}
                other => {
                    return err(format!(
                        "`norm_rel_ebd` '{other}' is not supported (supported: layer_norm, none)"
                    ))
                }
            }
        }
        let conv = match int(self.conv_kernel_size).unwrap_or(0) {
            k if k <= 0 => None,
            k if k % 2 == 0 => {
                return err(format!(
                    "`conv_kernel_size` must be odd (the convolution keeps the length), got {k}"
                ))
            }
            k => {
                let groups = int(self.conv_groups).unwrap_or(1);
                if groups <= 0 || hidden_size % groups != 0 {
                    return err(format!(
                        "`conv_groups` ({groups}) must divide hidden_size ({hidden_size})"
                    ));
                }
                Some(ConvConfig {
                    kernel_size: k,
                    groups,
                    act: activation(self.conv_act, "tanh", "conv_act")?,
                })
            }
        };
        let hidden_dropout_prob = dropout(self.hidden_dropout_prob, 0.1, "hidden_dropout_prob")?;
        Ok(DebertaV2Config {
            vocab_size: positive(self.vocab_size, "vocab_size")?,
            hidden_size,
            num_hidden_layers: positive(self.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads: heads,
            intermediate_size: positive(self.intermediate_size, "intermediate_size")?,
            hidden_act: activation(self.hidden_act, "gelu", "hidden_act")?,
            hidden_dropout_prob,
            attention_probs_dropout_prob: dropout(
                self.attention_probs_dropout_prob,
                0.1,
                "attention_probs_dropout_prob",
            )?,
            max_position_embeddings,
            type_vocab_size: int(self.type_vocab_size).unwrap_or(0).max(0),
            layer_norm_eps: self.layer_norm_eps.unwrap_or(1e-7),
            position_biased_input: self.position_biased_input.unwrap_or(true),
            relative,
            c2p,
            p2c,
            share_att_key: self.share_att_key.unwrap_or(false),
            norm_rel_ebd,
            conv,
            pooler_hidden_act: activation(self.pooler_hidden_act, "gelu", "pooler_hidden_act")?,
            pooler_dropout: dropout(self.pooler_dropout, 0.0, "pooler_dropout")?,
            cls_dropout: dropout(self.cls_dropout, hidden_dropout_prob, "cls_dropout")?,
        })
    }
}

/// Freeze examples: the parts every model has, then the relative embeddings, their LayerNorm and
/// the convolution where the model has them.
macro_rules! freeze_patterns {
    ($($extra:expr),*) => {
        &[
            "embeddings.*",
            "encoder.layer.*.attention.*",
            "encoder.layer.*.intermediate.*",
            "encoder.layer.*.output.*",
            $($extra),*
        ]
    };
}

impl ArchFacts for DebertaV2Config {
    fn family(&self) -> &'static str {
        "deberta-v2"
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
        const Q: &str = "attention.self.query_proj";
        const K: &str = "attention.self.key_proj";
        const V: &str = "attention.self.value_proj";
        const PK: &str = "attention.self.pos_key_proj";
        const PQ: &str = "attention.self.pos_query_proj";
        const O: &str = "attention.output.dense";
        const I: &str = "intermediate.dense";
        const OUT: &str = "output.dense";
        match (self.pos_key_proj(), self.pos_query_proj()) {
            (false, false) => &[Q, K, V, O, I, OUT],
            (true, false) => &[Q, K, V, PK, O, I, OUT],
            (false, true) => &[Q, K, V, PQ, O, I, OUT],
            (true, true) => &[Q, K, V, PK, PQ, O, I, OUT],
        }
    }
    fn intermediate_size(&self) -> i64 {
        self.intermediate_size
    }
    fn layer_linear_shapes(&self) -> Vec<(i64, i64)> {
        let (d, i) = (self.hidden_size, self.intermediate_size);
        let attention = self.layer_linears().len() - 2;
        let mut shapes = vec![(d, d); attention];
        shapes.extend([(d, i), (i, d)]);
        shapes
    }
    fn freeze_patterns(&self) -> &'static [&'static str] {
        const REL: &str = "encoder.rel_embeddings.*";
        const NORM: &str = "encoder.LayerNorm.*";
        const CONV: &str = "encoder.conv.*";
        match (
            self.relative.is_some(),
            self.norm_rel_ebd,
            self.conv.is_some(),
        ) {
            (false, false, false) => freeze_patterns!(),
            (true, false, false) => freeze_patterns!(REL),
            (false, true, false) => freeze_patterns!(NORM),
            (false, false, true) => freeze_patterns!(CONV),
            (true, true, false) => freeze_patterns!(REL, NORM),
            (true, false, true) => freeze_patterns!(REL, CONV),
            (false, true, true) => freeze_patterns!(NORM, CONV),
            (true, true, true) => freeze_patterns!(REL, NORM, CONV),
        }
    }
    /// The base model (`DebertaV2Model`); `pooler` belongs to the classification head.
    fn num_parameters(&self, _tied: bool) -> i64 {
        let d = self.hidden_size;
        let mut n = self.vocab_size * d + 2 * d;
        if self.position_biased_input {
            n += self.max_position_embeddings * d;
        }
        n += self.type_vocab_size * d;
        if let Some(r) = &self.relative {
            n += 2 * r.att_span() * d;
        }
        if self.norm_rel_ebd {
            n += 2 * d;
        }
        if let Some(c) = &self.conv {
            n += d * (d / c.groups) * c.kernel_size + d + 2 * d;
        }
        let pos = (self.pos_key_proj() as i64 + self.pos_query_proj() as i64) * (d * d + d);
        n + self.num_hidden_layers * (layer_parameters(d, self.intermediate_size) + pos)
    }
}
