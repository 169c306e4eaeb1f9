//! The Llama family (`model_type`: `llama`, `mistral`, `qwen2`): one decoder layout (RMSNorm,
//! RoPE, GQA, SwiGLU), config.json as transformers' `LlamaConfig`, `MistralConfig` and
//! `Qwen2Config` write it, resolved into [`LlamaConfig`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    activation, check_heads, dropout, err, from_json, int, positive, Arch, ArchFacts, Dims, Family,
    HfConfigError, Int,
};

pub(super) const FAMILY: Family = Family {
    model_types: &["llama", "mistral", "qwen2"],
    parse,
};

fn parse(value: &Value, model_type: &str) -> Result<Arch, HfConfigError> {
    Ok(Arch::Llama(
        from_json::<RawLlamaConfig>(value)?.into_config(model_type)?,
    ))
}

/// config.json as it is.
#[derive(Deserialize)]
struct RawLlamaConfig {
    vocab_size: Option<Int>,
    hidden_size: Option<Int>,
    intermediate_size: Option<Int>,
    num_hidden_layers: Option<Int>,
    num_attention_heads: Option<Int>,
    num_key_value_heads: Option<Int>,
    head_dim: Option<Int>,
    max_position_embeddings: Option<Int>,
    rms_norm_eps: Option<f64>,
    /// transformers ≥ 5: everything about RoPE, `rope_theta` included.
    rope_parameters: Option<RawRope>,
    /// Earlier versions: the scaling only, beside a top-level `rope_theta`.
    rope_scaling: Option<RawRope>,
    rope_theta: Option<f64>,
    original_max_position_embeddings: Option<Int>,
    partial_rotary_factor: Option<f64>,
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

/// `rope_parameters` or `rope_scaling` as it is.
#[derive(Deserialize, Default)]
#[serde(expecting = "an object")]
struct RawRope {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
    /// The older spelling of `rope_type`.
    #[serde(rename = "type")]
    old_type: Option<String>,
    factor: Option<f64>,
    original_max_position_embeddings: Option<Int>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    beta_fast: Option<f64>,
    beta_slow: Option<f64>,
    attention_factor: Option<f64>,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
    truncate: Option<bool>,
    partial_rotary_factor: Option<f64>,
}

/// Rotary embedding scaling, as transformers' `ROPE_INIT_FUNCTIONS` know them.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    Default,
    Linear {
        factor: f64,
    },
    /// Dynamic NTK: the base grows once the sequence exceeds `original_max_position_embeddings`.
    Dynamic {
        factor: f64,
        original_max_position_embeddings: i64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: i64,
    },
    Yarn {
        factor: f64,
        original_max_position_embeddings: i64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
    /// Fraction of the head dimension that rotates (1.0 for the supported families).
    pub partial_rotary_factor: f64,
}

/// Llama, Mistral and Qwen2 share one decoder layout (RMSNorm, RoPE, GQA, SwiGLU).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LlamaConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    /// Bias on q/k/v (Qwen2 always; Llama when `attention_bias`). o_proj gets a bias only on Llama
    /// with `attention_bias`.
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub attention_dropout: f64,
    pub hidden_act: String,
    /// Sliding-window attention width (Mistral; Qwen2 when `use_sliding_window`). None = full.
    pub sliding_window: Option<i64>,
}

impl RawLlamaConfig {
    fn into_config(self, model_type: &str) -> Result<LlamaConfig, HfConfigError> {
        let hidden_size = positive(self.hidden_size, "hidden_size")?;
        let heads = positive(self.num_attention_heads, "num_attention_heads")?;
        let kv_heads = int(self.num_key_value_heads).unwrap_or(heads);
        if kv_heads <= 0 || heads % kv_heads != 0 {
            return err(format!(
                "num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            ));
        }
        let head_dim = match int(self.head_dim) {
            Some(d) if d > 0 => d,
            Some(d) => return err(format!("`head_dim` must be positive, got {d}")),
            None => {
                check_heads(hidden_size, heads, "hidden_size")?;
                hidden_size / heads
            }
        };
        if head_dim % 2 != 0 {
            return err(format!(
                "`head_dim` must be even for rotary embeddings, got {head_dim}"
            ));
        }
        let max_pos = positive(self.max_position_embeddings, "max_position_embeddings")?;
        let hidden_act = activation(self.hidden_act, "silu", "hidden_act")?;
        let attention_bias = self.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match model_type {
            "qwen2" => (true, false),
            "llama" => (attention_bias, attention_bias),
            _ => (false, false),
        };
        let num_hidden_layers = positive(self.num_hidden_layers, "num_hidden_layers")?;
        let sliding_window = match model_type {
            "mistral" => int(self.sliding_window),
            "qwen2" if self.use_sliding_window == Some(true) => {
                if int(self.max_window_layers).unwrap_or(0) < num_hidden_layers {
                    return err("Qwen2 with sliding-window attention on only some layers (`max_window_layers`) is not supported");
                }
                int(self.sliding_window)
            }
            _ => None,
        };
        if let Some(w) = sliding_window {
            if w <= 0 {
                return err(format!("`sliding_window` must be positive, got {w}"));
            }
        }
        let rope = rope(
            self.rope_parameters,
            self.rope_scaling,
            self.rope_theta,
            int(self.original_max_position_embeddings),
            self.partial_rotary_factor,
            max_pos,
        )?;
        Ok(LlamaConfig {
            vocab_size: positive(self.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: positive(self.intermediate_size, "intermediate_size")?,
            num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: max_pos,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope,
            qkv_bias,
            o_bias,
            mlp_bias: model_type == "llama" && self.mlp_bias.unwrap_or(false),
            attention_dropout: dropout(self.attention_dropout, 0.0, "attention_dropout")?,
            hidden_act,
            sliding_window,
        })
    }
}

/// Resolves RoPE from `rope_parameters` (transformers ≥ 5) or `rope_theta` + `rope_scaling`
/// (earlier); the top-level `rope_theta`, `original_max_position_embeddings` and
/// `partial_rotary_factor` fill what the object leaves out.
fn rope(
    parameters: Option<RawRope>,
    scaling: Option<RawRope>,
    top_theta: Option<f64>,
    top_orig: Option<i64>,
    top_partial: Option<f64>,
    max_pos: i64,
) -> Result<RopeConfig, HfConfigError> {
    let (p, key) = match (parameters, scaling) {
        (Some(p), _) => (Some(p), "rope_parameters"),
        (None, s) => (s, "rope_scaling"),
    };
    let p = p.unwrap_or_default();
    let theta = p.rope_theta.or(top_theta).unwrap_or(10000.0);
    if theta <= 0.0 {
        return err("`rope_theta` must be positive");
    }
    let kind = p
        .rope_type
        .or(p.old_type)
        .unwrap_or_else(|| "default".to_string());
    let factor = || -> Result<f64, HfConfigError> {
        match p.factor {
            Some(f) if f >= 1.0 => Ok(f),
            Some(f) => err(format!("`{key}.factor` must be at least 1, got {f}")),
            None => err(format!("`{key}.factor` is missing for rope type '{kind}'")),
        }
    };
    let own_orig = int(p.original_max_position_embeddings);
    let scaling = match kind.as_str() {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor()? },
        // transformers compares against max_position_embeddings for dynamic NTK.
        "dynamic" => RopeScaling::Dynamic {
            factor: factor()?,
            original_max_position_embeddings: max_pos,
        },
        "llama3" => {
            let low = p.low_freq_factor.unwrap_or(1.0);
            let high = p.high_freq_factor.unwrap_or(4.0);
            if high <= low {
                return err(format!(
                    "`{key}.high_freq_factor` must exceed `low_freq_factor`"
                ));
            }
            let factor = factor()?;
            let Some(orig) = own_orig else {
                return err(format!(
                    "`{key}.original_max_position_embeddings` is missing for llama3"
                ));
            };
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: orig,
            }
        }
        "yarn" => RopeScaling::Yarn {
            factor: factor()?,
            original_max_position_embeddings: own_orig.or(top_orig).unwrap_or(max_pos),
            beta_fast: p.beta_fast.unwrap_or(32.0),
            beta_slow: p.beta_slow.unwrap_or(1.0),
            attention_factor: p.attention_factor,
            mscale: p.mscale,
            mscale_all_dim: p.mscale_all_dim,
            truncate: p.truncate.unwrap_or(true),
        },
        other => {
            return err(format!(
                "rope type '{other}' is not supported (supported: default, linear, dynamic, llama3, yarn)"
            ))
        }
    };
    let partial = p.partial_rotary_factor.or(top_partial).unwrap_or(1.0);
    if partial != 1.0 {
        return err("partial rotary embeddings (`partial_rotary_factor` < 1) are not supported");
    }
    Ok(RopeConfig {
        theta,
        scaling,
        partial_rotary_factor: partial,
    })
}

impl ArchFacts for LlamaConfig {
    fn family(&self) -> &'static str {
        "llama"
    }
    fn is_decoder(&self) -> bool {
        true
    }
    fn ties_embeddings_by_default(&self) -> bool {
        false
    }
    fn dims(&self) -> Dims {
        Dims {
            num_layers: self.num_hidden_layers,
            hidden_size: self.hidden_size,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads,
            context_length: self.max_position_embeddings,
            vocab_size: self.vocab_size,
        }
    }
    fn layer_prefix(&self) -> &'static str {
        "model.layers"
    }
    fn layer_linears(&self) -> &'static [&'static str] {
        &[
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
    }
    fn intermediate_size(&self) -> i64 {
        self.intermediate_size
    }
    fn layer_linear_shapes(&self) -> Vec<(i64, i64)> {
        let (d, i) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        );
        vec![(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]
    }
    /// SmolLM-135M's shape, batches of 2 and 4 x 256 and 2 x 512 tokens (BENCHMARKS.md, memory).
    fn activation_bytes_per_width(&self) -> f64 {
        33.0
    }
    fn freeze_patterns(&self) -> &'static [&'static str] {
        &[
            "model.embed_tokens.*",
            "model.layers.*.self_attn.*",
            "model.layers.*.mlp.*",
            "model.layers.*_layernorm.*",
            "model.norm.*",
        ]
    }
    fn num_parameters(&self, tied: bool) -> i64 {
        let (d, hd, i) = (self.hidden_size, self.head_dim, self.intermediate_size);
        let (q, kv) = (self.num_attention_heads * hd, self.num_key_value_heads * hd);
        let qkv_bias = if self.qkv_bias { q + 2 * kv } else { 0 };
        let o_bias = if self.o_bias { d } else { 0 };
        let mlp_bias = if self.mlp_bias { 2 * i + d } else { 0 };
        let layer = 2 * d + d * (q + 2 * kv) + qkv_bias + q * d + o_bias + 3 * d * i + mlp_bias;
        let head = if tied { 0 } else { self.vocab_size * d };
        self.vocab_size * d + self.num_hidden_layers * layer + d + head
    }
}
