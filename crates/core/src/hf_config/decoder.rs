//! What the Llama-style decoder families (`llama.rs`, `qwen3.rs`, `gemma.rs`, `phi3.rs`,
//! `olmo2.rs`) share: their sizes and attention heads under the same config.json keys
//! ([`DecoderShape`]), rotary embeddings ([`RopeConfig`], read from `rope_parameters` or the
//! older `rope_theta` + `rope_scaling`), which layers attend through a sliding window
//! ([`LayerType`]), and the pieces of their facts (linear module names, freeze patterns,
//! parameter counts).

use serde::{Deserialize, Serialize};

use super::{check_heads, err, int, positive, ArchFacts, Dims, HfConfigError, Int};

// ---- sizes and heads ---------------------------------------------------------------------------

/// The size keys every Llama-style decoder writes, as config.json has them.
#[derive(Deserialize)]
pub(super) struct RawShape {
    vocab_size: Option<Int>,
    hidden_size: Option<Int>,
    intermediate_size: Option<Int>,
    num_hidden_layers: Option<Int>,
    num_attention_heads: Option<Int>,
    num_key_value_heads: Option<Int>,
    head_dim: Option<Int>,
    max_position_embeddings: Option<Int>,
    rms_norm_eps: Option<f64>,
}

/// The sizes of a Llama-style decoder, checked.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecoderShape {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
}

impl RawShape {
    /// `head_dim`: the family's default when config.json leaves it out (None: hidden_size /
    /// num_attention_heads); `eps`: its default `rms_norm_eps`.
    pub(super) fn resolve(
        self,
        head_dim: Option<i64>,
        eps: f64,
    ) -> Result<DecoderShape, HfConfigError> {
        let hidden_size = positive(self.hidden_size, "hidden_size")?;
        let heads = positive(self.num_attention_heads, "num_attention_heads")?;
        let kv_heads = int(self.num_key_value_heads).unwrap_or(heads);
        if kv_heads <= 0 || heads % kv_heads != 0 {
            return err(format!(
                "num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            ));
        }
        let head_dim = match int(self.head_dim).or(head_dim) {
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
        Ok(DecoderShape {
            max_position_embeddings: positive(
                self.max_position_embeddings,
                "max_position_embeddings",
            )?,
            vocab_size: positive(self.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: positive(self.intermediate_size, "intermediate_size")?,
            num_hidden_layers: positive(self.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(eps),
        })
    }
}

impl DecoderShape {
    pub fn dims(&self) -> Dims {
        Dims {
            num_layers: self.num_hidden_layers,
            hidden_size: self.hidden_size,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads,
            context_length: self.max_position_embeddings,
            vocab_size: self.vocab_size,
        }
    }

    /// Weights (and biases) of q/k/v/o; `o_bias` when o_proj has one too.
    pub(super) fn attention_parameters(&self, qkv_bias: bool, o_bias: bool) -> i64 {
        let d = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let bias = if qkv_bias { q + 2 * kv } else { 0 } + if o_bias { d } else { 0 };
        d * (q + 2 * kv) + q * d + bias
    }

    /// Weights of a gated MLP (gate, up, down) without biases.
    pub(super) fn mlp_parameters(&self) -> i64 {
        3 * self.hidden_size * self.intermediate_size
    }

    /// The whole model: `layer` parameters per layer, the embeddings, the final norm and the LM
    /// head unless `tied`.
    fn parameters(&self, layer: i64, tied: bool) -> i64 {
        let (v, d) = (self.vocab_size, self.hidden_size);
        let head = if tied { 0 } else { v * d };
        v * d + self.num_hidden_layers * layer + d + head
    }
}

/// What a Llama-style decoder family says of itself; its [`ArchFacts`] follow (base model
/// `model`, layers `model.layers`, causal LM and classification).
pub(super) trait DecoderFacts {
    /// See [`ArchFacts::family`].
    const FAMILY: &'static str;
    /// `tie_word_embeddings` when config.json leaves it out.
    const TIES_BY_DEFAULT: bool = false;
    /// The linear modules of one layer, relative to the layer.
    const LINEARS: &'static [&'static str] = LINEARS;
    /// See [`ArchFacts::activation_bytes_per_width`]. Measured for Llama (SmolLM-135M's shape,
    /// batches of 2 and 4 x 256 and 2 x 512 tokens; BENCHMARKS.md, memory); the other decoders
    /// are not measured yet and take the same, the largest measured so far.
    const ACTIVATION_BYTES_PER_WIDTH: f64 = 33.0;
    fn shape(&self) -> &DecoderShape;
    /// `attention_dropout` (see [`ArchFacts::cpu_attention_keeps_scores`]).
    fn attention_dropout(&self) -> f64;
    /// Parameters of one layer (`s` is [`DecoderFacts::shape`]).
    fn layer_parameters(&self, s: &DecoderShape) -> i64;
    /// `(in_features, out_features)` of each of `LINEARS`, in that order (separate q, k, v, o,
    /// gate, up and down projections unless the family says otherwise).
    fn linear_shapes(s: &DecoderShape) -> Vec<(i64, i64)> {
        let (d, i) = (s.hidden_size, s.intermediate_size);
        let (q, kv) = (
            s.num_attention_heads * s.head_dim,
            s.num_key_value_heads * s.head_dim,
        );
        vec![(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]
    }
}

impl<T: DecoderFacts> ArchFacts for T {
    fn family(&self) -> &'static str {
        T::FAMILY
    }
    fn is_decoder(&self) -> bool {
        true
    }
    fn ties_embeddings_by_default(&self) -> bool {
        T::TIES_BY_DEFAULT
    }
    fn dims(&self) -> Dims {
        self.shape().dims()
    }
    fn layer_prefix(&self) -> &'static str {
        "model.layers"
    }
    fn layer_linears(&self) -> &'static [&'static str] {
        T::LINEARS
    }
    fn intermediate_size(&self) -> i64 {
        self.shape().intermediate_size
    }
    fn layer_linear_shapes(&self) -> Vec<(i64, i64)> {
        T::linear_shapes(self.shape())
    }
    fn activation_bytes_per_width(&self) -> f64 {
        T::ACTIVATION_BYTES_PER_WIDTH
    }
    fn cpu_attention_keeps_scores(&self) -> bool {
        self.attention_dropout() > 0.0
    }
    fn freeze_patterns(&self) -> &'static [&'static str] {
        FREEZE_PATTERNS
    }
    fn num_parameters(&self, tied: bool) -> i64 {
        let s = self.shape();
        s.parameters(self.layer_parameters(s), tied)
    }
}

/// The linear modules of a Llama-style layer with separate projections.
const LINEARS: &[&str] = &[
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Freeze examples for the decoders (norms named `*_layernorm`).
const FREEZE_PATTERNS: &[&str] = &[
    "model.embed_tokens.*",
    "model.layers.*.self_attn.*",
    "model.layers.*.mlp.*",
    "model.layers.*_layernorm.*",
    "model.norm.*",
];

// ---- sliding-window layers ---------------------------------------------------------------------

/// How one layer attends (transformers' `layer_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    FullAttention,
    /// Within `sliding_window` tokens.
    SlidingAttention,
}

/// `layer_types` as config.json lists them, else `sliding(i)` for layer `i` (the family's older
/// rule: a pattern key or a fixed alternation).
pub(super) fn layer_types(
    listed: Option<Vec<String>>,
    num_layers: i64,
    sliding: impl Fn(i64) -> bool,
) -> Result<Vec<LayerType>, HfConfigError> {
    let Some(listed) = listed else {
        return Ok((0..num_layers)
            .map(|i| {
                if sliding(i) {
                    LayerType::SlidingAttention
                } else {
                    LayerType::FullAttention
                }
            })
            .collect());
    };
    if listed.len() as i64 != num_layers {
        return err(format!(
            "`layer_types` lists {} layers, the model has {num_layers}",
            listed.len()
        ));
    }
    listed
        .iter()
        .map(|t| match t.as_str() {
            "full_attention" => Ok(LayerType::FullAttention),
            "sliding_attention" => Ok(LayerType::SlidingAttention),
            other => err(format!(
                "`layer_types`: '{other}' is not supported (supported: full_attention, sliding_attention)"
            )),
        })
        .collect()
}

/// A sliding window, when config.json sets one, must be positive.
pub(super) fn window(w: Option<i64>) -> Result<Option<i64>, HfConfigError> {
    match w {
        Some(w) if w <= 0 => err(format!("`sliding_window` must be positive, got {w}")),
        w => Ok(w),
    }
}

// ---- rotary embeddings -------------------------------------------------------------------------

/// The RoPE keys of config.json, in both forms.
#[derive(Deserialize)]
pub(super) struct RawRopeKeys {
    /// transformers ≥ 5: everything about RoPE, `rope_theta` included.
    rope_parameters: Option<RawRope>,
    /// Earlier versions: the scaling only, beside a top-level `rope_theta`.
    rope_scaling: Option<RawRope>,
    rope_theta: Option<f64>,
    original_max_position_embeddings: Option<Int>,
    partial_rotary_factor: Option<f64>,
}

impl RawRopeKeys {
    /// See [`rope`].
    pub(super) fn resolve(
        self,
        max_pos: i64,
        default_theta: f64,
    ) -> Result<RopeConfig, HfConfigError> {
        rope(
            self.rope_parameters,
            self.rope_scaling,
            self.rope_theta,
            int(self.original_max_position_embeddings),
            self.partial_rotary_factor,
            max_pos,
            default_theta,
        )
    }
}

/// `rope_parameters` or `rope_scaling` as it is.
#[derive(Deserialize, Default)]
#[serde(expecting = "an object")]
pub(super) struct RawRope {
    pub rope_theta: Option<f64>,
    pub rope_type: Option<String>,
    /// The older spelling of `rope_type`.
    #[serde(rename = "type")]
    pub old_type: Option<String>,
    pub factor: Option<f64>,
    pub original_max_position_embeddings: Option<Int>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    beta_fast: Option<f64>,
    beta_slow: Option<f64>,
    pub attention_factor: Option<f64>,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
    truncate: Option<bool>,
    pub partial_rotary_factor: Option<f64>,
    /// LongRoPE (Phi-3).
    pub short_factor: Option<Vec<f64>>,
    pub long_factor: Option<Vec<f64>>,
}

impl RawRope {
    /// `rope_type`, or the older `type`; "default" when neither is written.
    pub(super) fn kind(&self) -> String {
        self.rope_type
            .clone()
            .or(self.old_type.clone())
            .unwrap_or_else(|| "default".to_string())
    }
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
    /// LongRoPE (Phi-3): per-frequency factors, `short_factor` up to
    /// `original_max_position_embeddings` tokens and `long_factor` beyond; cos and sin are
    /// scaled by `attention_factor` at every length.
    #[serde(rename = "longrope")]
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: i64,
        attention_factor: f64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
    /// Fraction of the head dimension that rotates (below 1 only for Phi-3).
    pub partial_rotary_factor: f64,
}

/// Resolves RoPE from `rope_parameters` (transformers ≥ 5) or `rope_theta` + `rope_scaling`
/// (earlier); the top-level `rope_theta` (else `default_theta`), `original_max_position_embeddings`
/// and `partial_rotary_factor` fill what the object leaves out. Partial rotary embeddings are
/// refused: only Phi-3 has them, and it reads its own (`phi3.rs`).
pub(super) fn rope(
    parameters: Option<RawRope>,
    scaling: Option<RawRope>,
    top_theta: Option<f64>,
    top_orig: Option<i64>,
    top_partial: Option<f64>,
    max_pos: i64,
    default_theta: f64,
) -> Result<RopeConfig, HfConfigError> {
    let (p, key) = match (parameters, scaling) {
        (Some(p), _) => (Some(p), "rope_parameters"),
        (None, s) => (s, "rope_scaling"),
    };
    let p = p.unwrap_or_default();
    let theta = theta(p.rope_theta.or(top_theta).unwrap_or(default_theta))?;
    let kind = p.kind();
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
                "`{key}`: rope type '{other}' is not supported (supported: default, linear, dynamic, llama3, yarn)"
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

/// A rotary base, checked.
pub(super) fn theta(t: f64) -> Result<f64, HfConfigError> {
    if t <= 0.0 {
        return err("`rope_theta` must be positive");
    }
    Ok(t)
}
