//! The Llama family: Llama, Mistral and Qwen2 (`*ForCausalLM`, `*ForSequenceClassification`).
//! RMSNorm, rotary embeddings (default, linear, dynamic NTK, llama3 and YaRN scaling),
//! grouped-query attention, SwiGLU MLP, tied or untied output head, q/k/v bias (Qwen2), sliding
//! window (Mistral).

use std::path::Path;

use tch::{Device, Kind, Tensor};
use tuna_core::hf_config::{HfConfig, LlamaConfig, RopeScaling};

use super::{Architecture, Builder, Core, Head, Net};
use crate::freeze::Role;
use crate::layers::{
    activation, all_real, causal_mask, embedding, packed_mask, sdpa, Fwd, Linear, RmsNorm,
};
use crate::loader::Checkpoint;
use crate::model::{Batch, LoadOptions, Model, TaskHead};
use crate::Result;

struct Layer {
    input_ln: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_ln: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    head: Head,
    inv_freq: Tensor,
    attn_factor: f64,
}

/// Inverse frequencies `[head_dim / 2]` and the cos/sin scale, as transformers'
/// `ROPE_INIT_FUNCTIONS` compute them. `seq_len` matters for dynamic NTK only.
pub fn rope_inv_freq(cfg: &LlamaConfig, seq_len: i64) -> (Vec<f32>, f64) {
    let dim = cfg.head_dim as f64;
    let half = (cfg.head_dim / 2) as usize;
    let base = cfg.rope.theta;
    let plain = |base: f64| -> Vec<f64> {
        (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / dim))
            .collect()
    };
    let (inv, attn) = match &cfg.rope.scaling {
        RopeScaling::Default => (plain(base), 1.0),
        RopeScaling::Linear { factor } => {
            (plain(base).into_iter().map(|f| f / factor).collect(), 1.0)
        }
        RopeScaling::Dynamic {
            factor,
            original_max_position_embeddings: orig,
        } => {
            let s = seq_len.max(*orig) as f64;
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
    };
    (inv.into_iter().map(|f| f as f32).collect(), attn)
}

pub(super) fn build(
    dir: &Path,
    hf: HfConfig,
    cfg: LlamaConfig,
    ckpt: &Checkpoint,
    opts: &LoadOptions,
) -> Result<Box<dyn Model>> {
    let mut b = Builder::new::<Llama>(ckpt, cfg.num_hidden_layers as usize, &hf, opts)?;
    let (d, eps, hd) = (cfg.hidden_size, cfg.rms_norm_eps, cfg.head_dim);
    let (nh, nkv, inter) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
    );
    let embed = b.param("embed_tokens.weight", &[cfg.vocab_size, d], Role::Embedding)?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers as usize);
    for i in 0..cfg.num_hidden_layers {
        let r = Role::Layer(i as usize);
        let p = format!("layers.{i}");
        layers.push(Layer {
            input_ln: b.rms_norm(&format!("{p}.input_layernorm"), d, eps, r)?,
            q: b.linear(
                &format!("{p}.self_attn.q_proj"),
                d,
                nh * hd,
                cfg.qkv_bias,
                r,
                false,
            )?,
            k: b.linear(
                &format!("{p}.self_attn.k_proj"),
                d,
                nkv * hd,
                cfg.qkv_bias,
                r,
                false,
            )?,
            v: b.linear(
                &format!("{p}.self_attn.v_proj"),
                d,
                nkv * hd,
                cfg.qkv_bias,
                r,
                false,
            )?,
            o: b.linear(
                &format!("{p}.self_attn.o_proj"),
                nh * hd,
                d,
                cfg.o_bias,
                r,
                false,
            )?,
            post_ln: b.rms_norm(&format!("{p}.post_attention_layernorm"), d, eps, r)?,
            gate: b.linear(
                &format!("{p}.mlp.gate_proj"),
                d,
                inter,
                cfg.mlp_bias,
                r,
                false,
            )?,
            up: b.linear(
                &format!("{p}.mlp.up_proj"),
                d,
                inter,
                cfg.mlp_bias,
                r,
                false,
            )?,
            down: b.linear(
                &format!("{p}.mlp.down_proj"),
                inter,
                d,
                cfg.mlp_bias,
                r,
                false,
            )?,
        });
    }
    let norm = b.rms_norm("norm", d, eps, Role::Other)?;
    let tied = hf.common.tie_word_embeddings;
    let head = match &opts.task {
        TaskHead::CausalLm => Head::Lm(b.lm_head(&embed, tied, cfg.vocab_size, d)?),
        TaskHead::SequenceClassification { id2label } => {
            Head::Cls(b.classifier("score", d, id2label.len() as i64, false)?)
        }
    };
    let core = b.finish(dir, hf, opts, tied)?;
    let (inv, attn_factor) = rope_inv_freq(&cfg, cfg.max_position_embeddings);
    let inv_freq = Tensor::f_from_slice(&inv)?.f_to_device(opts.device)?;
    Ok(Box::new(Net {
        core,
        arch: Llama {
            cfg,
            embed,
            layers,
            norm,
            head,
            inv_freq,
            attn_factor,
        },
    }))
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let h = x.size()[3] / 2;
    let x1 = x.f_narrow(3, 0, h)?;
    let x2 = x.f_narrow(3, h, h)?;
    Ok(Tensor::f_cat(&[x2.f_neg()?, x1], 3)?)
}

/// `x·cos + rotate_half(x)·sin` over `[b, heads, t, head_dim]` (also ModernBERT's).
pub(super) fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(x.f_mul(cos)?.f_add(&rotate_half(x)?.f_mul(sin)?)?)
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

impl Llama {
    /// cos and sin `[t, head_dim]`, or `[b, 1, t, head_dim]` for explicit `positions` `[b, t]`
    /// (packed rows).
    fn cos_sin(
        &self,
        t: i64,
        positions: Option<&Tensor>,
        device: Device,
        kind: Kind,
    ) -> Result<(Tensor, Tensor)> {
        let dynamic_long = matches!(self.cfg.rope.scaling, RopeScaling::Dynamic { original_max_position_embeddings: o, .. } if t > o);
        let inv = if dynamic_long {
            Tensor::f_from_slice(&rope_inv_freq(&self.cfg, t).0)?.f_to_device(device)?
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

impl Architecture for Llama {
    const BASE_PREFIX: &'static str = "model";

    fn hf_class(model_type: &str, task: &TaskHead) -> String {
        let base = match model_type {
            "llama" => "Llama",
            "mistral" => "Mistral",
            "qwen2" => "Qwen2",
            other => other,
        };
        match task {
            TaskHead::CausalLm => format!("{base}ForCausalLM"),
            TaskHead::SequenceClassification { .. } => format!("{base}ForSequenceClassification"),
        }
    }

    /// The rotary frequencies older transformers saved.
    fn is_buffer(name: &str) -> bool {
        name.ends_with("rotary_emb.inv_freq")
    }

    fn forward(&self, core: &Core, batch: &Batch<'_>, train: bool) -> Result<Tensor> {
        // No table of positions bounds the length under RoPE.
        let (bsz, t) = core.check_batch(batch, None)?;
        let f = Fwd {
            kind: core.compute_kind,
            train,
        };
        let c = &self.cfg;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (cos, sin) = self.cos_sin(
            t,
            batch.packed.map(|p| &p.position_ids),
            core.device,
            f.kind,
        )?;
        let mask = match batch.packed {
            Some(p) => packed_mask(&p.segment_ids, c.sliding_window)?,
            None => causal_mask(
                batch.attention_mask,
                c.sliding_window,
                all_real(batch.attention_mask)?,
            )?,
        };
        let attn_p = if train { c.attention_dropout } else { 0.0 };
        let scale = 1.0 / (hd as f64).sqrt();
        let mut h = embedding(&self.embed, batch.input_ids, f.kind)?;
        for l in &self.layers {
            let a = l.input_ln.forward(&h)?;
            let q =
                l.q.forward(&a, f)?
                    .f_view([bsz, t, nh, hd])?
                    .f_transpose(1, 2)?;
            let k =
                l.k.forward(&a, f)?
                    .f_view([bsz, t, nkv, hd])?
                    .f_transpose(1, 2)?;
            let v =
                l.v.forward(&a, f)?
                    .f_view([bsz, t, nkv, hd])?
                    .f_transpose(1, 2)?;
            let q = apply_rope(&q, &cos, &sin)?;
            let k = apply_rope(&k, &cos, &sin)?;
            // With an explicit mask SDPA's memory-efficient kernel has no GQA support, so expand
            // the kv heads (as transformers does); without one, let SDPA broadcast them.
            let y = if mask.mask.is_none() && nkv != nh {
                sdpa(&q, &k, &v, &mask, attn_p, Some(scale), true)?
            } else {
                sdpa(
                    &q,
                    &repeat_kv(&k, nh / nkv)?,
                    &repeat_kv(&v, nh / nkv)?,
                    &mask,
                    attn_p,
                    Some(scale),
                    false,
                )?
            };
            let y = y.f_transpose(1, 2)?.f_reshape([bsz, t, nh * hd])?;
            h = h.f_add(&l.o.forward(&y, f)?)?;
            let m = l.post_ln.forward(&h)?;
            let g = activation(&l.gate.forward(&m, f)?, &c.hidden_act)?;
            let m = l.down.forward(&g.f_mul(&l.up.forward(&m, f)?)?, f)?;
            h = h.f_add(&m)?;
        }
        let h = self.norm.forward(&h)?;
        self.head.decoder_logits(&h, batch.attention_mask, f)
    }
}
