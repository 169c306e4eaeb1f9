//! ModernBERT (`model_type: modernbert`): config.json as transformers' `ModernBertConfig` writes
//! it, resolved into [`ModernBertConfig`]. A pre-LayerNorm encoder with rotary positions, a fused
//! `Wqkv`, GeGLU feed-forward (`Wi` produces input and gate), no biases by default, a final norm,
//! and global attention on some layers and local (sliding-window) attention on the others.
//! Sequence classification through `head` (dense, activation, norm) and `classifier`, on `[CLS]` or
//! on the mean of the real tokens (`classifier_pooling`).
//!
//! Both key forms in circulation: transformers ≥ 5 writes `layer_types` and per-type
//! `rope_parameters` (`full_attention`, `sliding_attention`); earlier versions (the published
//! checkpoints) write `global_attn_every_n_layers`, `global_rope_theta` and `local_rope_theta`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    activation, check_heads, dropout, err, from_json, int, positive, Arch, ArchFacts, Dims, Family,
    HfConfigError, Int,
};

pub(super) const FAMILY: Family = Family {
    model_types: &["modernbert"],
    parse,
};

fn parse(value: &Value, _model_type: &str) -> Result<Arch, HfConfigError> {
    Ok(Arch::ModernBert(
        from_json::<RawModernBertConfig>(value)?.into_config()?,
    ))
}

/// One layer type's entry of `rope_parameters`, or `rope_scaling`.
#[derive(Deserialize, Default)]
#[serde(expecting = "an object")]
struct RawRope {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    old_type: Option<String>,
    rope_theta: Option<f64>,
}

/// config.json as it is. Flash-attention, MLM-head and compile settings
/// (`deterministic_flash_attn`, `sparse_prediction`, `decoder_bias`, `reference_compile`, ...) do
/// not touch classification, nor does the leftover `position_embedding_type`.
#[derive(Deserialize)]
struct RawModernBertConfig {
    vocab_size: Option<Int>,
    hidden_size: Option<Int>,
    intermediate_size: Option<Int>,
    num_hidden_layers: Option<Int>,
    num_attention_heads: Option<Int>,
    head_dim: Option<Int>,
    hidden_activation: Option<String>,
    max_position_embeddings: Option<Int>,
    norm_eps: Option<f64>,
    norm_bias: Option<bool>,
    attention_bias: Option<bool>,
    attention_dropout: Option<f64>,
    mlp_bias: Option<bool>,
    mlp_dropout: Option<f64>,
    embedding_dropout: Option<f64>,
    layer_types: Option<Vec<String>>,
    global_attn_every_n_layers: Option<Int>,
    local_attention: Option<Int>,
    rope_parameters: Option<BTreeMap<String, RawRope>>,
    rope_scaling: Option<RawRope>,
    global_rope_theta: Option<f64>,
    local_rope_theta: Option<f64>,
    classifier_pooling: Option<String>,
    classifier_dropout: Option<f64>,
    classifier_bias: Option<bool>,
    classifier_activation: Option<String>,
}

/// How the classification head pools the last hidden state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The first token (`[CLS]`).
    Cls,
    /// The mean over the real tokens.
    Mean,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModernBertConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub hidden_activation: String,
    pub max_position_embeddings: i64,
    pub norm_eps: f64,
    pub norm_bias: bool,
    pub attention_bias: bool,
    pub attention_dropout: f64,
    pub mlp_bias: bool,
    pub mlp_dropout: f64,
    pub embedding_dropout: f64,
    /// Per layer: attends within the local window (`sliding_attention`) instead of globally.
    pub local_layers: Vec<bool>,
    /// `local_attention`: the local window's total width; a token sees the tokens at most
    /// `local_attention / 2` away.
    pub local_attention: i64,
    /// RoPE base of the global and of the local layers.
    pub global_rope_theta: f64,
    pub local_rope_theta: f64,
    pub classifier_pooling: Pooling,
    pub classifier_dropout: f64,
    pub classifier_bias: bool,
    pub classifier_activation: String,
}

impl ModernBertConfig {
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }
}

/// The RoPE base of layer type `kind` ("full_attention", "sliding_attention"), as transformers
/// resolves it: `rope_parameters[kind]`, updated by `rope_scaling`, else the old top-level key.
fn rope_theta(
    params: &mut Option<BTreeMap<String, RawRope>>,
    scaling: &Option<RawRope>,
    kind: &str,
    old_theta: Option<f64>,
    default: f64,
) -> Result<f64, HfConfigError> {
    let own = params
        .as_mut()
        .and_then(|p| p.remove(kind))
        .unwrap_or_default();
    let scaling_type = scaling
        .as_ref()
        .and_then(|s| s.rope_type.clone().or(s.old_type.clone()));
    let kind_type = scaling_type.or(own.rope_type).or(own.old_type);
    if let Some(t) = kind_type.filter(|t| t != "default") {
        return err(format!(
            "`rope_parameters.{kind}.rope_type` '{t}' is not supported (only 'default')"
        ));
    }
    let theta = scaling
        .as_ref()
        .and_then(|s| s.rope_theta)
        .or(own.rope_theta)
        .or(old_theta)
        .unwrap_or(default);
    if theta <= 0.0 {
        return err(format!(
            "`rope_parameters.{kind}.rope_theta` must be positive"
        ));
    }
    Ok(theta)
}

impl RawModernBertConfig {
    fn into_config(mut self) -> Result<ModernBertConfig, HfConfigError> {
        let hidden_size = positive(self.hidden_size, "hidden_size")?;
        let heads = positive(self.num_attention_heads, "num_attention_heads")?;
        check_heads(hidden_size, heads, "hidden_size")?;
        if let Some(hd) = int(self.head_dim).filter(|&hd| hd != hidden_size / heads) {
            return err(format!(
                "`head_dim` ({hd}) differs from hidden_size / num_attention_heads ({}): not supported",
                hidden_size / heads
            ));
        }
        if (hidden_size / heads) % 2 != 0 {
            return err(format!(
                "the head dimension ({}) must be even for rotary embeddings",
                hidden_size / heads
            ));
        }
        let layers = positive(self.num_hidden_layers, "num_hidden_layers")?;
        let local_layers = match self.layer_types.take() {
            Some(types) => {
                if types.len() as i64 != layers {
                    return err(format!(
                        "`layer_types` has {} entries for {layers} layers",
                        types.len()
                    ));
                }
                let mut out = Vec::with_capacity(types.len());
                for t in types {
                    out.push(match t.as_str() {
                        "full_attention" => false,
                        "sliding_attention" => true,
                        other => {
                            return err(format!(
                                "`layer_types` entry '{other}' is not supported (full_attention, sliding_attention)"
                            ))
                        }
                    });
                }
                out
            }
            None => {
                let every = int(self.global_attn_every_n_layers).unwrap_or(3);
                if every <= 0 {
                    return err(format!(
                        "`global_attn_every_n_layers` must be positive, got {every}"
                    ));
                }
                (0..layers).map(|i| i % every != 0).collect()
            }
        };
        let local_attention = positive(self.local_attention.or(Some(Int(128))), "local_attention")?;
        let global_rope_theta = rope_theta(
            &mut self.rope_parameters,
            &self.rope_scaling,
            "full_attention",
            self.global_rope_theta,
            160_000.0,
        )?;
        let local_rope_theta = rope_theta(
            &mut self.rope_parameters,
            &self.rope_scaling,
            "sliding_attention",
            self.local_rope_theta,
            10_000.0,
        )?;
        let classifier_pooling = match self.classifier_pooling.as_deref().unwrap_or("cls") {
            "cls" => Pooling::Cls,
            "mean" => Pooling::Mean,
            other => {
                return err(format!(
                    "`classifier_pooling` '{other}' is not supported (cls, mean)"
                ))
            }
        };
        Ok(ModernBertConfig {
            vocab_size: positive(self.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: positive(self.intermediate_size, "intermediate_size")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            hidden_activation: activation(self.hidden_activation, "gelu", "hidden_activation")?,
            max_position_embeddings: positive(
                self.max_position_embeddings.or(Some(Int(8192))),
                "max_position_embeddings",
            )?,
            norm_eps: self.norm_eps.unwrap_or(1e-5),
            norm_bias: self.norm_bias.unwrap_or(false),
            attention_bias: self.attention_bias.unwrap_or(false),
            attention_dropout: dropout(self.attention_dropout, 0.0, "attention_dropout")?,
            mlp_bias: self.mlp_bias.unwrap_or(false),
            mlp_dropout: dropout(self.mlp_dropout, 0.0, "mlp_dropout")?,
            embedding_dropout: dropout(self.embedding_dropout, 0.0, "embedding_dropout")?,
            local_layers,
            local_attention,
            global_rope_theta,
            local_rope_theta,
            classifier_pooling,
            classifier_dropout: dropout(self.classifier_dropout, 0.0, "classifier_dropout")?,
            classifier_bias: self.classifier_bias.unwrap_or(false),
            classifier_activation: activation(
                self.classifier_activation,
                "gelu",
                "classifier_activation",
            )?,
        })
    }
}

impl ArchFacts for ModernBertConfig {
    fn family(&self) -> &'static str {
        "modernbert"
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
        "layers"
    }
    fn layer_linears(&self) -> &'static [&'static str] {
        &["attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo"]
    }
    fn cpu_attention_keeps_scores(&self) -> bool {
        self.attention_dropout > 0.0
    }
    fn intermediate_size(&self) -> i64 {
        self.intermediate_size
    }
    /// `Wi` holds GeGLU's input and gate halves.
    fn layer_linear_shapes(&self) -> Vec<(i64, i64)> {
        let (d, i) = (self.hidden_size, self.intermediate_size);
        vec![(d, 3 * d), (d, d), (d, 2 * i), (i, d)]
    }
    fn freeze_patterns(&self) -> &'static [&'static str] {
        &[
            "embeddings.*",
            "layers.*.attn.*",
            "layers.*.mlp.*",
            "layers.*_norm.*",
            "final_norm.*",
        ]
    }
    /// The base model (`ModernBertModel`); `head` belongs to the classification head.
    fn num_parameters(&self, _tied: bool) -> i64 {
        let (d, i) = (self.hidden_size, self.intermediate_size);
        let norm = if self.norm_bias { 2 * d } else { d };
        let (ab, mb) = (self.attention_bias as i64, self.mlp_bias as i64);
        let attn = 3 * d * d + ab * 3 * d + d * d + ab * d;
        let mlp = d * 2 * i + mb * 2 * i + i * d + mb * d;
        // Every layer has an attention and an MLP norm but the first, which has no attention
        // norm: as many norms as the final one makes up for.
        self.vocab_size * d + norm + self.num_hidden_layers * (attn + mlp + 2 * norm)
    }
}
