//! What the Llama-style decoders share (`llama.rs`, `qwen3.rs`, `gemma.rs`, `phi3.rs`,
//! `olmo2.rs`): rotary embeddings ([`Rope`]), attention with grouped-query heads, optional q/k
//! norms, logit soft-capping and a sliding window on some layers ([`Attention`]), the gated MLP
//! ([`Mlp`]), a layer with its norms wherever the family puts them ([`Layer`]), and the whole
//! stack ([`Decoder`]), loaded by [`build`] from the family's per-layer description.
//!
//! A family file says where its norms sit and how its projections are named; everything that
//! runs is here.

use std::marker::PhantomData;
use std::path::Path;

use tch::{Device, Kind, Tensor};
use tuna_core::hf_config::{DecoderShape, HfConfig, LayerType, RopeConfig, RopeScaling};

use super::{Architecture, Builder, Core, Head, Net};
use crate::freeze::Role;
use crate::layers::{
    activation, all_real, causal_mask, dropout, embedding, packed_mask, sdpa, step_mask,
    step_positions, AttnMask, Fwd, Linear, RmsNorm, RmsScale,
};
use crate::loader::Checkpoint;
use crate::model::{Batch, LoadOptions, Model, TaskHead};
use crate::Result;

// ---- rotary embeddings -------------------------------------------------------------------------

/// Inverse frequencies `[dim / 2]` of the `dim` rotating dimensions and the cos/sin scale, as
/// transformers' `ROPE_INIT_FUNCTIONS` compute them. `seq_len` (the positions in play) matters
/// for dynamic NTK and LongRoPE only; None gives their base frequencies.
pub fn rope_inv_freq(rope: &RopeConfig, dim: i64, seq_len: Option<i64>) -> (Vec<f32>, f64) {
    let half = (dim / 2) as usize;
    let dim = dim as f64;
    let base = rope.theta;
    let plain = |base: f64| -> Vec<f64> {
        (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / dim))
            .collect()
    };
    let (inv, attn) = match &rope.scaling {
        RopeScaling::Default => (plain(base), 1.0),
        RopeScaling::Linear { factor } => {
            (plain(base).into_iter().map(|f| f / factor).collect(), 1.0)
        }
        RopeScaling::Dynamic {
            factor,
            original_max_position_embeddings: orig,
        } => {
            let s = seq_len.unwrap_or(0).max(*orig) as f64;
            let b = base * ((factor * s / *orig as f64) - (factor - 1.0)).powf(dim / (dim - 2.0));
            (plain(b), 1.0)
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = *original_max_position_embeddings as f64;
            let low_wl = old / low_freq_factor;
            let high_wl = old / high_freq_factor;
            let inv = plain(base)
                .into_iter()
                .map(|f| {
                    let wl = 2.0 * std::f64::consts::PI / f;
                    if wl < high_wl {
                        f
                    } else if wl > low_wl {
                        f / factor
                    } else {
                        let smooth =
                            (old / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect();
            (inv, 1.0)
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            attention_factor,
            mscale,
            mscale_all_dim,
            truncate,
        } => {
            let get_mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attn = match (attention_factor, mscale, mscale_all_dim) {
                (Some(a), _, _) => *a,
                (None, Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => {
                    get_mscale(*factor, *m) / get_mscale(*factor, *ma)
                }
                _ => get_mscale(*factor, 1.0),
            };
            let orig = *original_max_position_embeddings as f64;
            let corr = |rot: f64| {
                (dim * (orig / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln())
            };
            let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
            if *truncate {
                low = low.floor();
                high = high.ceil();
            }
            let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
            if low == high {
                high += 0.001;
            }
            let inv = (0..half)
                .map(|i| {
                    let pos = base.powf((2 * i) as f64 / dim);
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let extra = 1.0 - ramp;
                    (1.0 / (factor * pos)) * (1.0 - extra) + (1.0 / pos) * extra
                })
                .collect();
            (inv, attn)
        }
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings: orig,
            attention_factor,
        } => {
            let ext = match seq_len {
                Some(s) if s > *orig => long_factor,
                _ => short_factor,
            };
            let inv = plain(base)
                .into_iter()
                .zip(ext)
                .map(|(f, e)| f / e)
                .collect();
            (inv, *attention_factor)
        }
    };
    (inv.into_iter().map(|f| f as f32).collect(), attn)
}

/// Rotary embeddings over the first `dim` dimensions of each head.
pub struct Rope {
    cfg: RopeConfig,
    dim: i64,
    inv_freq: Tensor,
    attn_factor: f64,
}

impl Rope {
    pub fn new(cfg: &RopeConfig, head_dim: i64, device: Device) -> Result<Rope> {
        let dim = (head_dim as f64 * cfg.partial_rotary_factor) as i64;
        let (inv, attn_factor) = rope_inv_freq(cfg, dim, None);
        Ok(Rope {
            cfg: cfg.clone(),
            dim,
            inv_freq: Tensor::f_from_slice(&inv)?.f_to_device(device)?,
            attn_factor,
        })
    }

    /// cos and sin `[t, dim]`, or `[b, 1, t, dim]` for explicit `positions` `[b, t]` (packed
    /// rows). Sequences longer than the pretraining length switch dynamic NTK and LongRoPE to
    /// their long frequencies, as transformers does.
    pub fn cos_sin(
        &self,
        t: i64,
        positions: Option<&Tensor>,
        device: Device,
        kind: Kind,
    ) -> Result<(Tensor, Tensor)> {
        let long = match &self.cfg.scaling {
            RopeScaling::Dynamic {
                original_max_position_embeddings: o,
                ..
            }
            | RopeScaling::LongRope {
                original_max_position_embeddings: o,
                ..
            } => t > *o,
            _ => false,
        };
        let inv = if long {
            Tensor::f_from_slice(&rope_inv_freq(&self.cfg, self.dim, Some(t)).0)?
                .f_to_device(device)?
        } else {
            self.inv_freq.shallow_clone()
        };
        let freqs = match positions {
            Some(p) => p
                .f_to_kind(Kind::Float)?
                .f_unsqueeze(-1)?
                .f_mul(&inv)?
                .f_unsqueeze(1)?,
            None => Tensor::f_arange(t, (Kind::Float, device))?.f_outer(&inv)?,
        };
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        let (mut cos, mut sin) = (emb.f_cos()?, emb.f_sin()?);
        if self.attn_factor != 1.0 {
            cos = cos.f_mul_scalar(self.attn_factor)?;
            sin = sin.f_mul_scalar(self.attn_factor)?;
        }
        Ok((cos.f_to_kind(kind)?, sin.f_to_kind(kind)?))
    }
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let h = x.size()[3] / 2;
    let x1 = x.f_narrow(3, 0, h)?;
    let x2 = x.f_narrow(3, h, h)?;
    Ok(Tensor::f_cat(&[x2.f_neg()?, x1], 3)?)
}

/// Rotates the first `cos.size(-1)` dimensions of each head of `x` `[b, h, t, head_dim]`; the
/// rest pass unchanged (partial rotary embeddings). Computed in the kind of `cos` and `sin`,
/// returned in `x`'s. (ModernBERT's rotary embeddings too.)
pub(super) fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if cos.kind() != x.kind() {
        return Ok(apply_rope(&x.f_to_kind(cos.kind())?, cos, sin)?.f_to_kind(x.kind())?);
    }
    let (hd, rd) = (x.size()[3], *cos.size().last().expect("non-scalar"));
    let rot =
        |x: &Tensor| -> Result<Tensor> { Ok(x.f_mul(cos)?.f_add(&rotate_half(x)?.f_mul(sin)?)?) };
    if rd == hd {
        return rot(x);
    }
    Ok(Tensor::f_cat(
        &[rot(&x.f_narrow(3, 0, rd)?)?, x.f_narrow(3, rd, hd - rd)?],
        3,
    )?)
}

/// `[b, kv, t, d]` -> `[b, kv * rep, t, d]` (each kv head repeated for its query group).
fn repeat_kv(x: &Tensor, rep: i64) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.shallow_clone());
    }
    let s = x.size();
    Ok(x.f_unsqueeze(2)?
        .f_expand([s[0], s[1], rep, s[2], s[3]], false)?
        .f_reshape([s[0], s[1] * rep, s[2], s[3]])?)
}

// ---- attention and MLP -------------------------------------------------------------------------

/// The query, key and value projections.
// One per layer, built once and never moved in a hot path: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Qkv {
    Split {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// Phi-3's `qkv_proj`: q, k and v stacked along the output.
    Fused(Linear),
}

/// RMSNorms over the queries and keys, before RoPE.
pub enum QkNorm {
    None,
    /// Over each head (Qwen3, Gemma 3: `[head_dim]` weights).
    PerHead {
        q: RmsNorm,
        k: RmsNorm,
    },
    /// Over the whole projection (OLMo 2: `[heads * head_dim]` weights).
    Whole {
        q: RmsNorm,
        k: RmsNorm,
    },
}

impl Norms {
    /// `{p}.self_attn.q_norm` and `{p}.self_attn.k_norm`, of widths `dq` and `dk`.
    pub fn qk(
        &self,
        b: &mut Builder<'_>,
        p: &str,
        (dq, dk): (i64, i64),
        r: Role,
    ) -> Result<(RmsNorm, RmsNorm)> {
        Ok((
            self.load(b, &format!("{p}.self_attn.q_norm"), dq, r)?,
            self.load(b, &format!("{p}.self_attn.k_norm"), dk, r)?,
        ))
    }
}

pub struct Attention {
    pub qkv: Qkv,
    pub o: Linear,
    pub qk_norm: QkNorm,
}

/// What every layer's attention shares.
pub struct AttnSpec {
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    /// Multiplies q·k (usually head_dim ** -0.5).
    pub scale: f64,
    /// Scores become `cap * tanh(scores / cap)` (Gemma 2).
    pub softcap: Option<f64>,
    pub dropout: f64,
}

impl AttnSpec {
    /// Scores scaled by head_dim ** -0.5, no soft-cap.
    pub fn new(s: &DecoderShape, dropout: f64) -> AttnSpec {
        AttnSpec {
            heads: s.num_attention_heads,
            kv_heads: s.num_key_value_heads,
            head_dim: s.head_dim,
            scale: 1.0 / (s.head_dim as f64).sqrt(),
            softcap: None,
            dropout,
        }
    }
}

impl Attention {
    /// With `kv`, the queries also attend to the cached keys and values, and this pass's are
    /// appended to them.
    fn forward(
        &self,
        x: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        mask: &AttnMask,
        s: &AttnSpec,
        f: Fwd,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (nh, nkv, hd) = (s.heads, s.kv_heads, s.head_dim);
        let (mut q, mut k, v) = match &self.qkv {
            Qkv::Split { q, k, v } => (q.forward(x, f)?, k.forward(x, f)?, v.forward(x, f)?),
            Qkv::Fused(qkv) => {
                let y = qkv.forward(x, f)?;
                (
                    y.f_narrow(-1, 0, nh * hd)?,
                    y.f_narrow(-1, nh * hd, nkv * hd)?,
                    y.f_narrow(-1, (nh + nkv) * hd, nkv * hd)?,
                )
            }
        };
        if let QkNorm::Whole { q: qn, k: kn } = &self.qk_norm {
            (q, k) = (qn.forward(&q)?, kn.forward(&k)?);
        }
        let heads = |y: &Tensor, n: i64| -> Result<Tensor> {
            Ok(y.f_reshape([b, t, n, hd])?.f_transpose(1, 2)?)
        };
        let (mut q, mut k, v) = (heads(&q, nh)?, heads(&k, nkv)?, heads(&v, nkv)?);
        if let QkNorm::PerHead { q: qn, k: kn } = &self.qk_norm {
            (q, k) = (qn.forward(&q)?, kn.forward(&k)?);
        }
        let q = apply_rope(&q, cos, sin)?;
        let k = apply_rope(&k, cos, sin)?;
        let (k, v) = match kv {
            Some(slot) => crate::model::extend_kv(slot, k, v)?,
            None => (k, v),
        };
        let p = if f.train { s.dropout } else { 0.0 };
        let y = match s.softcap {
            Some(cap) => softcapped_attention(&q, &k, &v, mask, s, cap, p, f.train)?,
            // With an explicit mask SDPA's memory-efficient kernel has no GQA support, so expand
            // the kv heads (as transformers does); without one, let SDPA broadcast them.
            None if mask.mask.is_none() && nkv != nh => {
                sdpa(&q, &k, &v, mask, p, Some(s.scale), true)?
            }
            None => sdpa(
                &q,
                &repeat_kv(&k, nh / nkv)?,
                &repeat_kv(&v, nh / nkv)?,
                mask,
                p,
                Some(s.scale),
                false,
            )?,
        };
        let y = y.f_transpose(1, 2)?.f_reshape([b, t, nh * hd])?;
        self.o.forward(&y, f)
    }
}

/// Attention with soft-capped scores, spelled out as transformers' eager attention (SDPA has no
/// soft-cap). `mask` must be explicit.
#[allow(clippy::too_many_arguments)]
fn softcapped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    s: &AttnSpec,
    cap: f64,
    p: f64,
    train: bool,
) -> Result<Tensor> {
    let rep = s.heads / s.kv_heads;
    let scores = q
        .f_matmul(&repeat_kv(k, rep)?.f_transpose(-2, -1)?)?
        .f_mul_scalar(s.scale)?
        .f_div_scalar(cap)?
        .f_tanh()?
        .f_mul_scalar(cap)?;
    let allowed = mask
        .mask
        .as_ref()
        .expect("soft-capped attention takes an explicit mask");
    let w = scores
        .f_masked_fill(&allowed.f_logical_not()?, f64::NEG_INFINITY)?
        .f_softmax(-1, Kind::Float)?
        .f_to_kind(q.kind())?;
    Ok(dropout(w, p, train)?.f_matmul(&repeat_kv(v, rep)?)?)
}

/// The gate and up projections of a gated MLP.
pub enum GateUp {
    Split {
        gate: Linear,
        up: Linear,
    },
    /// Phi-3's `gate_up_proj`: gate then up along the output.
    Fused(Linear),
}

/// `down(act(gate(x)) * up(x))`.
pub struct Mlp {
    pub gate_up: GateUp,
    pub down: Linear,
    pub act: String,
}

impl Mlp {
    fn forward(&self, x: &Tensor, f: Fwd) -> Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUp::Split { gate, up } => (gate.forward(x, f)?, up.forward(x, f)?),
            GateUp::Fused(gu) => {
                let y = gu.forward(x, f)?;
                let i = y.size()[2] / 2;
                (y.f_narrow(-1, 0, i)?, y.f_narrow(-1, i, i)?)
            }
        };
        self.down
            .forward(&activation(&gate, &self.act)?.f_mul(&up)?, f)
    }
}

// ---- the layer and the stack -------------------------------------------------------------------

/// One decoder layer: `h += out(attn(in(h)))`, then `h += out(mlp(in(h)))`, each norm present
/// where the family has one (Llama: before both blocks; Gemma: before and after both; OLMo 2:
/// after both).
pub struct Layer {
    pub attn_in: Option<RmsNorm>,
    pub attn: Attention,
    pub attn_out: Option<RmsNorm>,
    pub mlp_in: Option<RmsNorm>,
    pub mlp: Mlp,
    pub mlp_out: Option<RmsNorm>,
}

impl Layer {
    /// Llama's layout: `input_layernorm` before attention, `post_attention_layernorm` before
    /// the MLP, of layer `p`.
    pub fn pre_norm(
        b: &mut Builder<'_>,
        p: &str,
        n: &Norms,
        r: Role,
        attn: Attention,
        mlp: Mlp,
    ) -> Result<Layer> {
        let d = attn.o.out_features();
        Ok(Layer {
            attn_in: Some(n.load(b, &format!("{p}.input_layernorm"), d, r)?),
            attn,
            attn_out: None,
            mlp_in: Some(n.load(b, &format!("{p}.post_attention_layernorm"), d, r)?),
            mlp,
            mlp_out: None,
        })
    }
}

fn norm(n: &Option<RmsNorm>, x: Tensor) -> Result<Tensor> {
    match n {
        Some(n) => n.forward(&x),
        None => Ok(x),
    }
}

/// How a decoder runs, beyond its weights.
pub struct Settings<'a> {
    /// The sliding layers attend through `sliding_window` (globally when it is None) with the
    /// local RoPE (when there is one).
    pub layer_types: Vec<LayerType>,
    pub sliding_window: Option<i64>,
    pub rope: &'a RopeConfig,
    /// RoPE of the sliding layers, when it differs (Gemma 3).
    pub local_rope: Option<&'a RopeConfig>,
    pub attn: AttnSpec,
    /// Embeddings are multiplied by this (Gemma: sqrt(hidden_size)).
    pub embed_scale: Option<f64>,
    /// Dropout on each block's output before the residual sum (Phi-3).
    pub resid_dropout: f64,
    /// LM logits become `cap * tanh(logits / cap)`.
    pub final_softcap: Option<f64>,
    /// How the family's RMSNorms apply their weight.
    pub norm: RmsScale,
    /// RoPE runs in fp32 whatever the compute kind (OLMo 2).
    pub rope_in_fp32: bool,
}

impl<'a> Settings<'a> {
    /// Llama's: every layer global, RMSNorm weights after the cast, no scaling, no soft-caps.
    pub fn new(s: &DecoderShape, rope: &'a RopeConfig, attention_dropout: f64) -> Settings<'a> {
        Settings {
            layer_types: vec![LayerType::FullAttention; s.num_hidden_layers as usize],
            sliding_window: None,
            rope,
            local_rope: None,
            attn: AttnSpec::new(s, attention_dropout),
            embed_scale: None,
            resid_dropout: 0.0,
            final_softcap: None,
            norm: RmsScale::AfterCast,
            rope_in_fp32: false,
        }
    }
}

/// A Llama-style decoder.
pub struct Decoder {
    embed: Tensor,
    layers: Vec<Layer>,
    /// Per layer: a sliding one.
    sliding: Vec<bool>,
    norm: RmsNorm,
    head: Head,
    rope: Rope,
    local_rope: Option<Rope>,
    sliding_window: Option<i64>,
    attn: AttnSpec,
    embed_scale: Option<f64>,
    resid_dropout: f64,
    final_softcap: Option<f64>,
    rope_in_fp32: bool,
}

/// A Llama-style decoder family as its file describes it: the classes transformers saves it
/// as. Its [`Architecture`] is [`DecoderNet<F>`]'s.
pub trait DecoderFamily: Send + 'static {
    /// `Qwen3` of `Qwen3ForCausalLM` and `Qwen3ForSequenceClassification`.
    const CLASS: &'static str;
    /// The `architectures` entry for `model_type` trained for `task`.
    fn hf_class(_model_type: &str, task: &TaskHead) -> String {
        class(Self::CLASS, task)
    }
}

/// `{base}ForCausalLM`, `{base}ForSequenceClassification` or `{base}ForTokenClassification`.
pub(super) fn class(base: &str, task: &TaskHead) -> String {
    match task {
        TaskHead::CausalLm => format!("{base}ForCausalLM"),
        TaskHead::SequenceClassification { .. } => format!("{base}ForSequenceClassification"),
        TaskHead::TokenClassification { .. } => format!("{base}ForTokenClassification"),
        TaskHead::QuestionAnswering => format!("{base}ForQuestionAnswering"),
    }
}

/// A loaded decoder of family `F`.
pub struct DecoderNet<F> {
    decoder: Decoder,
    family: PhantomData<F>,
}

impl<F: DecoderFamily> Architecture for DecoderNet<F> {
    const BASE_PREFIX: &'static str = "model";

    fn hf_class(model_type: &str, task: &TaskHead) -> String {
        F::hf_class(model_type, task)
    }

    /// The rotary frequencies older transformers saved.
    fn is_buffer(name: &str) -> bool {
        name.ends_with("rotary_emb.inv_freq")
    }

    type Pass = PassInputs;

    fn embed(&self, core: &Core, batch: &Batch<'_>, train: bool) -> Result<(PassInputs, Tensor)> {
        let p = self.decoder.pass_inputs(core, batch, train)?;
        let h = self.decoder.embed(core, batch, &p)?;
        Ok((p, h))
    }

    fn num_layers(&self) -> usize {
        self.decoder.layers.len()
    }

    fn layer(&self, i: usize, h: &Tensor, p: &PassInputs) -> Result<Tensor> {
        self.decoder.layer(i, h, p, None)
    }

    fn head(&self, h: &Tensor, batch: &Batch<'_>, p: &PassInputs) -> Result<Tensor> {
        self.decoder.head_logits(h, batch, p)
    }

    fn embed_step(
        &self,
        core: &Core,
        batch: &Batch<'_>,
        past: i64,
    ) -> Result<(PassInputs, Tensor)> {
        let p = self.decoder.step_inputs(core, batch, past)?;
        let h = self.decoder.embed(core, batch, &p)?;
        Ok((p, h))
    }

    fn layer_step(
        &self,
        i: usize,
        h: &Tensor,
        p: &PassInputs,
        kv: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        self.decoder.layer(i, h, p, Some(kv))
    }

    fn rope_switch_length(&self) -> Option<i64> {
        match self.decoder.rope.cfg.scaling {
            RopeScaling::LongRope {
                original_max_position_embeddings,
                ..
            } => Some(original_max_position_embeddings),
            _ => None,
        }
    }
}

/// What a model loads from.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    pub dir: &'a Path,
    pub ckpt: &'a Checkpoint,
    pub opts: &'a LoadOptions,
}

/// Loads a decoder of family `F`: `model.embed_tokens`, the layers `layer(b, "layers.{i}",
/// norms, role)` loads (`norms` loads an RMSNorm of the family's kind), `model.norm`, and the
/// head for the task (`lm_head`, tied or not, or `score`).
pub(super) fn build<F: DecoderFamily>(
    src: Source<'_>,
    hf: HfConfig,
    s: &DecoderShape,
    settings: Settings<'_>,
    mut layer: impl FnMut(&mut Builder<'_>, &str, &Norms, Role) -> Result<Layer>,
) -> Result<Box<dyn Model>> {
    let Source { dir, ckpt, opts } = src;
    let mut b = Builder::new::<DecoderNet<F>>(ckpt, s.num_hidden_layers as usize, &hf, opts)?;
    let (d, vocab) = (s.hidden_size, s.vocab_size);
    let norms = Norms {
        eps: s.rms_norm_eps,
        scale: settings.norm,
    };
    let embed = b.param("embed_tokens.weight", &[vocab, d], Role::Embedding)?;
    let mut layers = Vec::with_capacity(s.num_hidden_layers as usize);
    for i in 0..s.num_hidden_layers as usize {
        layers.push(layer(
            &mut b,
            &format!("layers.{i}"),
            &norms,
            Role::Layer(i),
        )?);
    }
    let norm = norms.load(&mut b, "norm", d, Role::Other)?;
    let tied = hf.common.tie_word_embeddings;
    let head = match &opts.task {
        TaskHead::CausalLm => Head::Lm(b.lm_head(&embed, tied, vocab, d)?),
        TaskHead::SequenceClassification { id2label, .. } => {
            Head::Cls(b.classifier("score", d, id2label.len() as i64, false)?)
        }
        TaskHead::TokenClassification { id2label } => Head::Tokens(
            b.classifier("score", d, id2label.len() as i64, true)?,
            super::decoder_token_dropout(dir),
        ),
        // transformers' Llama-style `*ForQuestionAnswering` classes keep their base under
        // `transformer.`, which the export does not write yet.
        TaskHead::QuestionAnswering => {
            return Err(crate::Error::Config(format!(
                "question answering is not supported on {} yet",
                hf.model_type()
            )))
        }
    };
    let core = b.finish(dir, hf, opts, tied)?;
    let hd = s.head_dim;
    let decoder = Decoder {
        embed,
        layers,
        sliding: settings
            .layer_types
            .iter()
            .map(|t| *t == LayerType::SlidingAttention)
            .collect(),
        norm,
        head,
        rope: Rope::new(settings.rope, hd, opts.device)?,
        local_rope: match settings.local_rope {
            Some(r) => Some(Rope::new(r, hd, opts.device)?),
            None => None,
        },
        sliding_window: settings.sliding_window,
        attn: settings.attn,
        embed_scale: settings.embed_scale,
        resid_dropout: settings.resid_dropout,
        final_softcap: settings.final_softcap,
        rope_in_fp32: settings.rope_in_fp32,
    };
    Ok(Box::new(Net {
        core,
        arch: DecoderNet::<F> {
            decoder,
            family: PhantomData,
        },
    }))
}

/// Loads the family's RMSNorms.
pub struct Norms {
    eps: f64,
    scale: RmsScale,
}

impl Norms {
    pub fn load(&self, b: &mut Builder<'_>, rel: &str, d: i64, role: Role) -> Result<RmsNorm> {
        Ok(RmsNorm {
            scale: self.scale,
            ..b.rms_norm(rel, d, self.eps, role)?
        })
    }
}

/// `{p}.self_attn.{q,k,v,o}_proj`, bias on q/k/v when `qkv_bias` and on o when `o_bias`, no
/// q/k norm.
pub(super) fn split_attention(
    b: &mut Builder<'_>,
    p: &str,
    s: &DecoderShape,
    (qkv_bias, o_bias): (bool, bool),
    r: Role,
) -> Result<Attention> {
    let (d, q, kv) = (
        s.hidden_size,
        s.num_attention_heads * s.head_dim,
        s.num_key_value_heads * s.head_dim,
    );
    let a = format!("{p}.self_attn");
    Ok(Attention {
        qkv: Qkv::Split {
            q: b.linear(&format!("{a}.q_proj"), d, q, qkv_bias, r, false)?,
            k: b.linear(&format!("{a}.k_proj"), d, kv, qkv_bias, r, false)?,
            v: b.linear(&format!("{a}.v_proj"), d, kv, qkv_bias, r, false)?,
        },
        o: b.linear(&format!("{a}.o_proj"), q, d, o_bias, r, false)?,
        qk_norm: QkNorm::None,
    })
}

/// `{p}.mlp.{gate,up,down}_proj`.
pub(super) fn split_mlp(
    b: &mut Builder<'_>,
    p: &str,
    s: &DecoderShape,
    bias: bool,
    act: &str,
    r: Role,
) -> Result<Mlp> {
    let (d, i) = (s.hidden_size, s.intermediate_size);
    Ok(Mlp {
        gate_up: GateUp::Split {
            gate: b.linear(&format!("{p}.mlp.gate_proj"), d, i, bias, r, false)?,
            up: b.linear(&format!("{p}.mlp.up_proj"), d, i, bias, r, false)?,
        },
        down: b.linear(&format!("{p}.mlp.down_proj"), i, d, bias, r, false)?,
        act: act.to_string(),
    })
}

fn softcap(x: Tensor, cap: f64) -> Result<Tensor> {
    Ok(x.f_div_scalar(cap)?.f_tanh()?.f_mul_scalar(cap)?)
}

/// What every layer of one forward pass reads: rotary tables and attention masks.
pub struct PassInputs {
    f: Fwd,
    cs: (Tensor, Tensor),
    local_cs: Option<(Tensor, Tensor)>,
    global: Option<AttnMask>,
    local: Option<AttnMask>,
}

impl Decoder {
    fn pass_inputs(&self, core: &Core, batch: &Batch<'_>, train: bool) -> Result<PassInputs> {
        // No table of positions bounds the length under RoPE.
        let (_, t) = core.check_batch(batch, None)?;
        let f = Fwd {
            kind: core.compute_kind,
            train,
        };
        let positions = batch.packed.map(|p| &p.position_ids);
        let rope_kind = if self.rope_in_fp32 {
            Kind::Float
        } else {
            f.kind
        };
        let cs = self.rope.cos_sin(t, positions, core.device, rope_kind)?;
        let any_sliding = self.sliding.iter().any(|s| *s);
        let local_cs = match &self.local_rope {
            Some(r) if any_sliding => Some(r.cos_sin(t, positions, core.device, rope_kind)?),
            _ => None,
        };
        // Soft-capped attention is spelled out, so it needs the mask even without padding.
        let unpadded = self.attn.softcap.is_none() && all_real(batch.attention_mask)?;
        let mask = |window: Option<i64>| match batch.packed {
            Some(p) => packed_mask(&p.segment_ids, window),
            None => causal_mask(batch.attention_mask, window, unpadded),
        };
        let global = match self.sliding.iter().any(|s| !s) {
            true => Some(mask(None)?),
            false => None,
        };
        let local = match any_sliding {
            true => Some(mask(self.sliding_window)?),
            false => None,
        };
        Ok(PassInputs {
            f,
            cs,
            local_cs,
            global,
            local,
        })
    }

    /// The pass inputs of an incremental step: `batch`'s tokens follow `past` cached ones,
    /// `batch.attention_mask` covers all of them (left padded); positions count each row's
    /// real tokens, as transformers' `generate` does.
    fn step_inputs(&self, core: &Core, batch: &Batch<'_>, past: i64) -> Result<PassInputs> {
        let t = batch.input_ids.size()[1];
        let total = batch.attention_mask.size()[1];
        if total != past + t {
            return Err(crate::Error::Data(format!(
                "a decoding step of {t} token(s) after {past} needs a mask of {} positions, got {total}",
                past + t
            )));
        }
        let f = Fwd {
            kind: core.compute_kind,
            train: false,
        };
        let positions = step_positions(batch.attention_mask, t)?;
        let rope_kind = if self.rope_in_fp32 {
            Kind::Float
        } else {
            f.kind
        };
        // The sequence's whole length decides long-context RoPE (dynamic NTK, LongRoPE).
        let cs = self
            .rope
            .cos_sin(total, Some(&positions), core.device, rope_kind)?;
        let any_sliding = self.sliding.iter().any(|s| *s);
        let local_cs = match &self.local_rope {
            Some(r) if any_sliding => {
                Some(r.cos_sin(total, Some(&positions), core.device, rope_kind)?)
            }
            _ => None,
        };
        let mask = |window: Option<i64>| step_mask(batch.attention_mask, t, window);
        Ok(PassInputs {
            f,
            cs,
            local_cs,
            global: match self.sliding.iter().any(|s| !s) {
                true => Some(mask(None)?),
                false => None,
            },
            local: match any_sliding {
                true => Some(mask(self.sliding_window)?),
                false => None,
            },
        })
    }

    fn embed(&self, core: &Core, batch: &Batch<'_>, p: &PassInputs) -> Result<Tensor> {
        let mut h = embedding(&self.embed, batch.input_ids, p.f.kind)?;
        if let Some(s) = self.embed_scale {
            // In the compute kind, as transformers rounds it (sqrt(3072) is 55.5 in bf16).
            let s = Tensor::f_scalar_tensor(s, (Kind::Float, core.device))?.f_to_kind(p.f.kind)?;
            h = h.f_mul(&s)?;
        }
        Ok(h)
    }

    /// Layer `i` on the hidden states `h` (with `kv`, an incremental step's: see
    /// [`Attention::forward`]).
    fn layer(
        &self,
        i: usize,
        h: &Tensor,
        p: &PassInputs,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (l, f) = (&self.layers[i], p.f);
        let (m, cs) = match (self.sliding[i], &p.local_cs) {
            (true, Some(lcs)) => (p.local.as_ref(), lcs),
            (true, None) => (p.local.as_ref(), &p.cs),
            (false, _) => (p.global.as_ref(), &p.cs),
        };
        let m = m.expect("a mask for every kind of layer");
        let a = l.attn.forward(
            &norm(&l.attn_in, h.shallow_clone())?,
            cs,
            m,
            &self.attn,
            f,
            kv,
        )?;
        let a = dropout(norm(&l.attn_out, a)?, self.resid_dropout, f.train)?;
        let h = h.f_add(&a)?;
        let y = l.mlp.forward(&norm(&l.mlp_in, h.shallow_clone())?, f)?;
        let y = dropout(norm(&l.mlp_out, y)?, self.resid_dropout, f.train)?;
        Ok(h.f_add(&y)?)
    }

    fn head_logits(&self, h: &Tensor, batch: &Batch<'_>, p: &PassInputs) -> Result<Tensor> {
        let h = self.norm.forward(h)?;
        let logits = self.head.decoder_logits(&h, batch.attention_mask, p.f)?;
        match (&self.head, self.final_softcap) {
            (Head::Lm(_), Some(cap)) => softcap(logits, cap),
            _ => Ok(logits),
        }
    }
}
