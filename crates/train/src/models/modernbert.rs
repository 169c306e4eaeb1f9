//! ModernBERT (`ModernBertForSequenceClassification`): token embeddings and a norm, pre-norm
//! layers (the first without an attention norm) with a fused `Wqkv`, rotary positions (one base
//! for the global layers, one for the local), GeGLU feed-forward (`Wi` gives input and gate), no
//! biases unless configured, a final norm. The local layers see the tokens at most
//! `local_attention / 2` away.
//!
//! The attention follows transformers' eager path with padding masks (its unpadded kernels are an
//! implementation detail): padding keys are masked additively with the kind's lowest value, so a
//! query that sees no real key (padding outside every window) attends uniformly, as there.
//!
//! The head: the first token or the mean of the real tokens (`classifier_pooling`), `head.dense`,
//! the activation, `head.norm`, dropout and `classifier`.

use std::path::Path;

use tch::{Device, Kind, Tensor};
use tuna_core::hf_config::{HfConfig, ModernBertConfig, Pooling};

use super::decoder::apply_rope;
use super::{encoder_labels, pass, unpacked, Architecture, Builder, Core, Net};
use crate::freeze::Role;
use crate::layers::{
    activation, all_real, dropout, embedding, lowest, sdpa, AttnMask, Fwd, LayerNorm, Linear,
};
use crate::loader::Checkpoint;
use crate::model::{Batch, LoadOptions, Model, TaskHead};
use crate::Result;

struct Layer {
    /// None for the first layer.
    attn_norm: Option<LayerNorm>,
    wqkv: Linear,
    attn_wo: Linear,
    mlp_norm: LayerNorm,
    wi: Linear,
    mlp_wo: Linear,
    local: bool,
}

pub struct ModernBert {
    cfg: ModernBertConfig,
    tok: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    head_dense: Linear,
    head_norm: LayerNorm,
    classifier: Linear,
    /// Token classification: the head on every position, not on a pooled one.
    per_token: bool,
}

pub(super) fn build(
    dir: &Path,
    hf: HfConfig,
    cfg: ModernBertConfig,
    ckpt: &Checkpoint,
    opts: &LoadOptions,
) -> Result<Box<dyn Model>> {
    let labels = encoder_labels(opts, "ModernBERT")?;
    let mut b = Builder::new::<ModernBert>(ckpt, cfg.num_hidden_layers as usize, &hf, opts)?;
    let (d, i_size, eps, nb) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.norm_eps,
        cfg.norm_bias,
    );
    let (ab, mb) = (cfg.attention_bias, cfg.mlp_bias);
    let e = Role::Embedding;
    let tok = b.param("embeddings.tok_embeddings.weight", &[cfg.vocab_size, d], e)?;
    let emb_norm = b.layer_norm_with("embeddings.norm", d, eps, nb, e)?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers as usize);
    for (i, &local) in cfg.local_layers.iter().enumerate() {
        let r = Role::Layer(i);
        let p = format!("layers.{i}");
        let attn_norm = if i == 0 {
            None
        } else {
            Some(b.layer_norm_with(&format!("{p}.attn_norm"), d, eps, nb, r)?)
        };
        layers.push(Layer {
            attn_norm,
            wqkv: b.linear(&format!("{p}.attn.Wqkv"), d, 3 * d, ab, r, false)?,
            attn_wo: b.linear(&format!("{p}.attn.Wo"), d, d, ab, r, false)?,
            mlp_norm: b.layer_norm_with(&format!("{p}.mlp_norm"), d, eps, nb, r)?,
            wi: b.linear(&format!("{p}.mlp.Wi"), d, 2 * i_size, mb, r, false)?,
            mlp_wo: b.linear(&format!("{p}.mlp.Wo"), i_size, d, mb, r, false)?,
            local,
        });
    }
    let final_norm = b.layer_norm_with("final_norm", d, eps, nb, Role::Other)?;
    let head_dense = b.classifier("head.dense", d, d, cfg.classifier_bias)?;
    let head_norm = b.head_layer_norm("head.norm", d, eps, nb)?;
    let classifier = b.classifier("classifier", d, labels, true)?;
    let core = b.finish(dir, hf, opts, false)?;
    Ok(Box::new(Net {
        core,
        arch: ModernBert {
            cfg,
            tok,
            emb_norm,
            layers,
            final_norm,
            head_dense,
            head_norm,
            classifier,
            per_token: opts.task.is_per_token(),
        },
    }))
}

/// What every layer reads in one pass: the rotary tables and masks of the global and the
/// local layers.
pub struct Pass {
    f: Fwd,
    rope_global: (Tensor, Tensor),
    rope_local: (Tensor, Tensor),
    global: AttnMask,
    local: AttnMask,
}

impl ModernBert {
    /// cos and sin `[t, head_dim]` in `kind` for RoPE base `theta`, computed as transformers
    /// does (float32 inverse frequencies `1 / theta^(2i/d)`).
    fn cos_sin(&self, theta: f64, t: i64, device: Device, kind: Kind) -> Result<(Tensor, Tensor)> {
        let hd = self.cfg.head_dim();
        let exponents =
            Tensor::f_arange_start_step(0, hd, 2, (Kind::Float, device))?.f_div_scalar(hd)?;
        let inv = Tensor::f_pow_scalar(theta, &exponents)?.f_reciprocal()?;
        let freqs = Tensor::f_arange(t, (Kind::Float, device))?.f_outer(&inv)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        Ok((emb.f_cos()?.f_to_kind(kind)?, emb.f_sin()?.f_to_kind(kind)?))
    }

    /// Additive masks for the global and the local layers: 0 where a query may see a key, the
    /// kind's lowest value elsewhere (None where nothing is masked).
    fn masks(&self, attention_mask: &Tensor, kind: Kind) -> Result<(AttnMask, AttnMask)> {
        let t = attention_mask.size()[1];
        let half = self.cfg.local_attention / 2;
        let unmasked = || AttnMask {
            mask: None,
            is_causal: false,
        };
        let all = all_real(attention_mask)?;
        let additive = |allowed: &Tensor| -> Result<AttnMask> {
            let zero = Tensor::f_zeros([1], (kind, allowed.device()))?;
            let low = Tensor::f_full([1], lowest(kind), (kind, allowed.device()))?;
            Ok(AttnMask {
                mask: Some(zero.f_where_self(allowed, &low)?),
                is_causal: false,
            })
        };
        let keys = attention_mask.f_ne(0)?.f_view([-1, 1, 1, t])?;
        let global = if all { unmasked() } else { additive(&keys)? };
        let local = if all && t - 1 <= half {
            unmasked()
        } else {
            let idx = Tensor::f_arange(t, (Kind::Int64, attention_mask.device()))?;
            let near = idx
                .f_view([t, 1])?
                .f_sub(&idx.f_view([1, t])?)?
                .f_abs()?
                .f_le(half)?
                .f_view([1, 1, t, t])?;
            additive(&near.f_logical_and(&keys)?)?
        };
        Ok((global, local))
    }

    fn attention(
        &self,
        l: &Layer,
        x: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        mask: &AttnMask,
        f: Fwd,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let s = x.size();
        let (bsz, t, nh, hd) = (s[0], s[1], c.num_attention_heads, c.head_dim());
        let qkv = l.wqkv.forward(x, f)?.f_view([bsz, t, 3, nh, hd])?;
        let part = |i: i64| qkv.f_select(2, i).and_then(|p| p.f_transpose(1, 2));
        // RoPE in float32, as transformers applies it.
        let rope = |p: Tensor| -> Result<Tensor> {
            let (cf, sf) = (cos.f_to_kind(Kind::Float)?, sin.f_to_kind(Kind::Float)?);
            apply_rope(&p.f_to_kind(Kind::Float)?, &cf, &sf)?
                .f_to_kind(f.kind)
                .map_err(Into::into)
        };
        let (q, k, v) = (rope(part(0)?)?, rope(part(1)?)?, part(2)?);
        let p = if f.train { c.attention_dropout } else { 0.0 };
        let y = sdpa(&q, &k, &v, mask, p, Some(1.0 / (hd as f64).sqrt()), false)?
            .f_transpose(1, 2)?
            .f_reshape([bsz, t, nh * hd])?;
        dropout(l.attn_wo.forward(&y, f)?, c.attention_dropout, f.train)
    }

    fn mlp(&self, l: &Layer, x: &Tensor, f: Fwd) -> Result<Tensor> {
        let c = &self.cfg;
        let parts = l.wi.forward(x, f)?.f_chunk(2, -1)?;
        let g = activation(&parts[0], &c.hidden_activation)?.f_mul(&parts[1])?;
        l.mlp_wo.forward(&dropout(g, c.mlp_dropout, f.train)?, f)
    }
}

impl Architecture for ModernBert {
    const BASE_PREFIX: &'static str = "model";

    fn hf_class(_model_type: &str, task: &TaskHead) -> String {
        match task {
            TaskHead::CausalLm => "ModernBertForMaskedLM".into(),
            TaskHead::SequenceClassification { .. } => "ModernBertForSequenceClassification".into(),
            TaskHead::TokenClassification { .. } => "ModernBertForTokenClassification".into(),
            TaskHead::QuestionAnswering => "ModernBertForQuestionAnswering".into(),
        }
    }

    /// The MLM decoder (`decoder.*`; its `head` is the classification head's starting point, as
    /// in transformers).
    fn is_buffer(name: &str) -> bool {
        name.starts_with("decoder.")
    }

    /// The layers' output through `final_norm`, as `ModernBertModel` returns it.
    fn last_hidden_state(&self, core: &Core, batch: &Batch<'_>, train: bool) -> Result<Tensor> {
        self.final_norm
            .forward(&pass::hidden(self, core, batch, train)?.1)
    }

    type Pass = Pass;

    fn embed(&self, core: &Core, batch: &Batch<'_>, train: bool) -> Result<(Pass, Tensor)> {
        unpacked(batch, "ModernBERT")?;
        // No table of positions bounds the length under RoPE.
        let (_, t) = core.check_batch(batch, None)?;
        let f = Fwd {
            kind: core.compute_kind,
            train,
        };
        let c = &self.cfg;
        let rope_global = self.cos_sin(c.global_rope_theta, t, core.device, f.kind)?;
        let rope_local = self.cos_sin(c.local_rope_theta, t, core.device, f.kind)?;
        let (global, local) = self.masks(batch.attention_mask, f.kind)?;
        let h = embedding(&self.tok, batch.input_ids, f.kind)?;
        let h = dropout(self.emb_norm.forward(&h)?, c.embedding_dropout, train)?;
        let p = Pass {
            f,
            rope_global,
            rope_local,
            global,
            local,
        };
        Ok((p, h))
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer(&self, i: usize, h: &Tensor, p: &Pass) -> Result<Tensor> {
        let l = &self.layers[i];
        let x = match &l.attn_norm {
            Some(n) => n.forward(h)?,
            None => h.shallow_clone(),
        };
        let (rope, mask) = if l.local {
            (&p.rope_local, &p.local)
        } else {
            (&p.rope_global, &p.global)
        };
        let h = h.f_add(&self.attention(l, &x, rope, mask, p.f)?)?;
        Ok(h.f_add(&self.mlp(l, &l.mlp_norm.forward(&h)?, p.f)?)?)
    }

    /// `final_norm`, the pooling (`[CLS]` or the mean over real tokens), the head's dense,
    /// activation and norm, dropout, `classifier`.
    fn head(&self, h: &Tensor, batch: &Batch<'_>, p: &Pass) -> Result<Tensor> {
        let (c, f) = (&self.cfg, p.f);
        let h = self.final_norm.forward(h)?;
        let pooled = match c.classifier_pooling {
            // Token classification: the same head on every position, no pooling.
            _ if self.per_token => h,
            Pooling::Cls => h.f_select(1, 0)?,
            Pooling::Mean => {
                // A row of padding only averages nothing: zeros (transformers divides 0 by 0).
                let m = batch.attention_mask.f_to_kind(f.kind)?;
                h.f_mul(&m.f_unsqueeze(-1)?)?
                    .f_sum_dim_intlist(1, false, f.kind)?
                    .f_div(&m.f_sum_dim_intlist(1, true, f.kind)?.f_clamp_min(1)?)?
            }
        };
        let x = activation(
            &self.head_dense.forward(&pooled, f)?,
            &c.classifier_activation,
        )?;
        let x = dropout(self.head_norm.forward(&x)?, c.classifier_dropout, f.train)?;
        self.classifier.forward(&x, f)
    }
}
