//! Phi-3 (`model_type: phi3`; Phi-3, Phi-3.5 and Phi-4-mini): config.json as transformers'
//! `Phi3Config` writes it, resolved into [`Phi3Config`]. The Llama layout with fused
//! projections (`self_attn.qkv_proj`: q, k and v stacked; `mlp.gate_up_proj`: gate then up),
//! which are also the LoRA target names, as PEFT has them. RoPE is plain or LongRoPE (`longrope`;
//! `su` and `yarn` are its older names here), possibly on part of each head
//! (`partial_rotary_factor`); dropout on the residual branches (`resid_pdrop`); one sliding
//! window on every layer when `sliding_window` is set.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::decoder::{
    theta, window, DecoderFacts, DecoderShape, RawRope, RawShape, RopeConfig, RopeScaling,
};
use super::{activation, dropout, err, from_json, int, Arch, Family, HfConfigError, Int};

pub(super) const FAMILY: Family = Family {
    model_types: &["phi3"],
    parse,
};

fn parse(value: &Value, _model_type: &str) -> Result<Arch, HfConfigError> {
    let shape = from_json::<RawShape>(value)?.resolve(None, 1e-5)?;
    Ok(Arch::Phi3(
        from_json::<RawPhi3Config>(value)?.into_config(shape)?,
    ))
}

/// config.json as it is, beyond the sizes. `embd_pdrop` is not used by transformers' Phi-3.
#[derive(Deserialize)]
struct RawPhi3Config {
    hidden_act: Option<String>,
    attention_dropout: Option<f64>,
    resid_pdrop: Option<f64>,
    sliding_window: Option<Int>,
    rope_parameters: Option<RawRope>,
    rope_scaling: Option<RawRope>,
    rope_theta: Option<f64>,
    /// LongRoPE's pretraining length (4096 when left out).
    original_max_position_embeddings: Option<Int>,
    partial_rotary_factor: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Phi3Config {
    #[serde(flatten)]
    pub shape: DecoderShape,
    /// Default or [`RopeScaling::LongRope`].
    pub rope: RopeConfig,
    pub hidden_act: String,
    pub attention_dropout: f64,
    /// Dropout on the attention and MLP outputs before they join the residual stream.
    pub resid_pdrop: f64,
    /// The window of every layer. None = full attention.
    pub sliding_window: Option<i64>,
}

impl RawPhi3Config {
    fn into_config(self, shape: DecoderShape) -> Result<Phi3Config, HfConfigError> {
        let (p, key) = match (self.rope_parameters, self.rope_scaling) {
            (Some(p), _) => (p, "rope_parameters"),
            (None, s) => (s.unwrap_or_default(), "rope_scaling"),
        };
        let partial = p
            .partial_rotary_factor
            .or(self.partial_rotary_factor)
            .unwrap_or(1.0);
        let rotary = (shape.head_dim as f64 * partial) as i64;
        if !(partial > 0.0 && partial <= 1.0) || rotary < 2 || rotary % 2 != 0 {
            return err(format!(
                "`partial_rotary_factor` {partial} leaves {rotary} rotary dimensions of {}: they must be a positive even number",
                shape.head_dim
            ));
        }
        let scaling = match p.kind().as_str() {
            "default" => RopeScaling::Default,
            kind @ ("longrope" | "su" | "yarn") => {
                // transformers puts its top-level value (default 4096) into the RoPE object for
                // `longrope`, and keeps the object's own for the older names, which need one.
                let orig = match (kind, int(p.original_max_position_embeddings)) {
                    ("longrope", _) => int(self.original_max_position_embeddings).unwrap_or(4096),
                    (_, Some(o)) => o,
                    (_, None) => {
                        return err(format!(
                            "`{key}.original_max_position_embeddings` is missing for rope type '{kind}'"
                        ))
                    }
                };
                if orig <= 0 {
                    return err("`original_max_position_embeddings` must be positive");
                }
                let factors = |v: Option<Vec<f64>>, name: &str| match v {
                    Some(f) if f.len() as i64 == rotary / 2 => Ok(f),
                    Some(f) => err(format!(
                        "`{key}.{name}` has {} entries; {rotary} rotary dimensions need {}",
                        f.len(),
                        rotary / 2
                    )),
                    None => err(format!("`{key}.{name}` is missing for rope type 'longrope'")),
                };
                let factor = p
                    .factor
                    .unwrap_or(shape.max_position_embeddings as f64 / orig as f64);
                let attention_factor = p.attention_factor.unwrap_or(if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / (orig as f64).ln()).sqrt()
                });
                RopeScaling::LongRope {
                    short_factor: factors(p.short_factor, "short_factor")?,
                    long_factor: factors(p.long_factor, "long_factor")?,
                    original_max_position_embeddings: orig,
                    attention_factor,
                }
            }
            other => {
                return err(format!(
                    "`{key}`: rope type '{other}' is not supported for phi3 (supported: default, longrope)"
                ))
            }
        };
        Ok(Phi3Config {
            rope: RopeConfig {
                theta: theta(p.rope_theta.or(self.rope_theta).unwrap_or(10000.0))?,
                scaling,
                partial_rotary_factor: partial,
            },
            shape,
            hidden_act: activation(self.hidden_act, "silu", "hidden_act")?,
            attention_dropout: dropout(self.attention_dropout, 0.0, "attention_dropout")?,
            resid_pdrop: dropout(self.resid_pdrop, 0.0, "resid_pdrop")?,
            sliding_window: window(int(self.sliding_window))?,
        })
    }
}

impl DecoderFacts for Phi3Config {
    const FAMILY: &'static str = "phi3";
    const LINEARS: &'static [&'static str] = &[
        "self_attn.qkv_proj",
        "self_attn.o_proj",
        "mlp.gate_up_proj",
        "mlp.down_proj",
    ];
    fn shape(&self) -> &DecoderShape {
        &self.shape
    }
    fn attention_dropout(&self) -> f64 {
        self.attention_dropout
    }
    fn linear_shapes(s: &DecoderShape) -> Vec<(i64, i64)> {
        let (d, i) = (s.hidden_size, s.intermediate_size);
        let q = s.num_attention_heads * s.head_dim;
        let qkv = q + 2 * s.num_key_value_heads * s.head_dim;
        vec![(d, qkv), (q, d), (d, 2 * i), (i, d)]
    }
    fn layer_parameters(&self, s: &DecoderShape) -> i64 {
        // Two norms; the fused projections hold as many weights as separate ones.
        2 * s.hidden_size + s.attention_parameters(false, false) + s.mlp_parameters()
    }
}
