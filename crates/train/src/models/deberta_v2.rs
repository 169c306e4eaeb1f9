//! DeBERTa-v2/v3 (`DebertaV2ForSequenceClassification`): disentangled attention, written as
//! transformers' eager code computes it so the numbers agree:
//!
//! - scores `q·kᵀ / √(d_head · s)`, `s` = 1 + one per `pos_att_type` entry;
//! - content→position (`c2p`): `q · pos_kᵀ` read at `clamp(δ + span)` for each query/key pair,
//!   position→content (`p2c`): `k · pos_qᵀ` read at `clamp(-δ + span)`, transposed; `δ` = query
//!   minus key index, log-bucketed when `position_buckets` is set; `pos_q`/`pos_k` are the relative
//!   embeddings (LayerNorm'd with `norm_rel_ebd`) through the layer's query/key projections
//!   (`share_att_key`) or through `pos_query_proj`/`pos_key_proj`;
//! - a query or key that is padding is masked with the kind's lowest value (a padding query thus
//!   attends uniformly, as in transformers), and the embeddings of padding are zeroed;
//! - v2's convolution (`encoder.conv`) adds to the first layer's output.
//!
//! The head is transformers' `ContextPooler` (`pooler.dense` and its activation on the first
//! token) and `classifier`, both part of the classification head.

use std::path::Path;

use tch::{Device, Kind, Tensor};
use tuna_core::hf_config::{DebertaV2Config, HfConfig};

use super::bert::{EncoderLayer, LayerDropout, LayerNames};
use super::{encoder_labels, pass, unpacked, Architecture, Builder, Core, Net};
use crate::freeze::Role;
use crate::layers::{activation, cast, dropout, embedding, lowest, Fwd, LayerNorm, Linear};
use crate::loader::Checkpoint;
use crate::model::{Batch, LoadOptions, Model, TaskHead};
use crate::Result;

const LAYER: LayerNames = LayerNames {
    query: "attention.self.query_proj",
    key: "attention.self.key_proj",
    value: "attention.self.value_proj",
    attn_out: "attention.output.dense",
    attn_ln: "attention.output.LayerNorm",
    inter: "intermediate.dense",
    out: "output.dense",
    out_ln: "output.LayerNorm",
};

struct Layer {
    base: EncoderLayer,
    pos_key: Option<Linear>,
    pos_query: Option<Linear>,
}

/// v2's `ConvLayer`.
struct Conv {
    weight: Tensor,
    bias: Tensor,
    ln: LayerNorm,
}

pub struct DebertaV2 {
    cfg: DebertaV2Config,
    word: Tensor,
    position: Option<Tensor>,
    token_type: Option<Tensor>,
    emb_ln: LayerNorm,
    rel_embeddings: Option<Tensor>,
    rel_ln: Option<LayerNorm>,
    conv: Option<Conv>,
    layers: Vec<Layer>,
    /// `ContextPooler`'s dense; None under token classification (no pooler there).
    pooler: Option<Linear>,
    classifier: Linear,
    /// Dropout before a per-token head.
    token_dropout: f64,
}

pub(super) fn build(
    dir: &Path,
    hf: HfConfig,
    cfg: DebertaV2Config,
    ckpt: &Checkpoint,
    opts: &LoadOptions,
) -> Result<Box<dyn Model>> {
    let labels = encoder_labels(opts, "DeBERTa")?;
    let mut b = Builder::new::<DebertaV2>(ckpt, cfg.num_hidden_layers as usize, &hf, opts)?;
    let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
    let e = Role::Embedding;
    let word = b.param("embeddings.word_embeddings.weight", &[cfg.vocab_size, d], e)?;
    let position = if cfg.position_biased_input {
        let shape = [cfg.max_position_embeddings, d];
        Some(b.param("embeddings.position_embeddings.weight", &shape, e)?)
    } else {
        None
    };
    let token_type = if cfg.type_vocab_size > 0 {
        let shape = [cfg.type_vocab_size, d];
        Some(b.param("embeddings.token_type_embeddings.weight", &shape, e)?)
    } else {
        None
    };
    let emb_ln = b.layer_norm("embeddings.LayerNorm", d, eps, e)?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers as usize);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        let r = Role::Layer(i as usize);
        let base = EncoderLayer::load(&mut b, &p, &LAYER, (d, cfg.intermediate_size, eps), r)?;
        let mut pos = |name: &str, on: bool| {
            on.then(|| b.linear(&format!("{p}.attention.self.{name}"), d, d, true, r, false))
                .transpose()
        };
        layers.push(Layer {
            base,
            pos_key: pos("pos_key_proj", cfg.pos_key_proj())?,
            pos_query: pos("pos_query_proj", cfg.pos_query_proj())?,
        });
    }
    let rel_embeddings = match &cfg.relative {
        Some(r) => Some(b.param("encoder.rel_embeddings.weight", &[2 * r.att_span(), d], e)?),
        None => None,
    };
    let rel_ln = if cfg.norm_rel_ebd {
        Some(b.layer_norm("encoder.LayerNorm", d, eps, e)?)
    } else {
        None
    };
    let conv = match &cfg.conv {
        Some(c) => {
            let r = Role::Layer(0);
            let shape = [d, d / c.groups, c.kernel_size];
            Some(Conv {
                weight: b.param("encoder.conv.conv.weight", &shape, r)?,
                bias: b.param("encoder.conv.conv.bias", &[d], r)?,
                ln: b.layer_norm("encoder.conv.LayerNorm", d, eps, r)?,
            })
        }
        None => None,
    };
    let pooler = match opts.task.is_per_token() {
        true => None,
        false => Some(b.classifier("pooler.dense", d, d, true)?),
    };
    // DebertaV2ForQuestionAnswering: `qa_outputs`, no dropout.
    let qa = opts.task == TaskHead::QuestionAnswering;
    let token_dropout = if qa { 0.0 } else { cfg.hidden_dropout_prob };
    let classifier = b.classifier(
        if qa { "qa_outputs" } else { "classifier" },
        d,
        labels,
        true,
    )?;
    let core = b.finish(dir, hf, opts, false)?;
    Ok(Box::new(Net {
        core,
        arch: DebertaV2 {
            cfg,
            word,
            position,
            token_type,
            emb_ln,
            rel_embeddings,
            rel_ln,
            conv,
            layers,
            pooler,
            classifier,
            token_dropout,
        },
    }))
}

/// transformers' `make_log_bucket_position`, op for op (float32, as it computes).
fn log_buckets(rel: &Tensor, bucket_size: i64, max_position: i64) -> Result<Tensor> {
    let mid = bucket_size / 2;
    let sign = rel.f_sign()?;
    let inside = rel.f_lt(mid)?.f_logical_and(&rel.f_gt(-mid)?)?;
    let abs_pos = rel
        .f_abs()?
        .f_masked_fill(&inside, mid - 1)?
        .f_to_kind(Kind::Float)?;
    let denom = Tensor::from((max_position - 1) as f64 / mid as f64)
        .f_to_kind(Kind::Float)?
        .f_log()?;
    let log_pos = abs_pos
        .f_div_scalar(mid)?
        .f_log()?
        .f_div(&denom)?
        .f_mul_scalar(mid - 1)?
        .f_ceil()?
        .f_add_scalar(mid)?;
    let near = abs_pos.f_le(mid)?;
    let far = log_pos.f_mul(&sign.f_to_kind(Kind::Float)?)?;
    Ok(far
        .f_where_self(&near.f_logical_not()?, &rel.f_to_kind(Kind::Float)?)?
        .f_to_kind(Kind::Int64)?)
}

/// `√(d_head · s)` as transformers' `scaled_size_sqrt`, in `kind`.
fn score_scale(head_dim: i64, factor: i64, kind: Kind) -> Result<Tensor> {
    Ok(Tensor::from(head_dim as f32)
        .f_mul_scalar(factor)?
        .f_sqrt()?
        .f_to_kind(kind)?)
}

/// What every layer reads in one pass: the attention inputs and the real tokens `[b, t]`.
pub struct Pass {
    f: Fwd,
    attn: AttnInputs,
    real: Tensor,
}

/// What every layer's attention shares in one forward.
struct AttnInputs {
    /// `[b, 1, t, t]`: both query and key are real tokens.
    mask: Tensor,
    /// Relative positions `[t, t]` (query minus key, bucketed), when the model has relative
    /// attention. The relative embeddings are normed in each layer (see `relative_embeddings`).
    rel_pos: Option<Tensor>,
}

impl DebertaV2 {
    fn heads(&self) -> i64 {
        self.cfg.num_attention_heads
    }

    /// `[b, t, h·d_head]` to transformers' `[b·h, t, d_head]` layout, kept 4-D: `[b, h, t, d_head]`.
    fn split(&self, x: Tensor) -> Result<Tensor> {
        let s = x.size();
        let h = self.heads();
        Ok(x.f_view([s[0], s[1], h, s[2] / h])?
            .f_permute([0, 2, 1, 3])?)
    }

    fn scale_factor(&self) -> i64 {
        1 + self.cfg.c2p as i64 + self.cfg.p2c as i64
    }

    fn attention(&self, l: &Layer, h: &Tensor, a: &AttnInputs, f: Fwd) -> Result<Tensor> {
        let c = &self.cfg;
        let b = &l.base;
        let q = self.split(b.query.forward(h, f)?)?;
        let k = self.split(b.key.forward(h, f)?)?;
        let v = self.split(b.value.forward(h, f)?)?;
        let hd = q.size()[3];
        let scale = score_scale(hd, self.scale_factor(), f.kind)?;
        let mut scores = q.f_matmul(&k.f_transpose(-1, -2)?.f_div(&scale)?)?;
        if let (Some(rel_pos), Some(r)) = (&a.rel_pos, &c.relative) {
            let span = r.att_span();
            let rel_emb = dropout(self.relative_embeddings(f)?, c.hidden_dropout_prob, f.train)?;
            let (pos_q, pos_k) = if c.share_att_key {
                (Some(&b.query), Some(&b.key))
            } else {
                (l.pos_query.as_ref(), l.pos_key.as_ref())
            };
            let s = scores.size();
            let index = |pos: Tensor| -> Result<Tensor> {
                Ok(pos
                    .f_add_scalar(span)?
                    .f_clamp(0, 2 * span - 1)?
                    .f_expand([s[0], s[1], s[2], s[3]], false)?)
            };
            // transformers sums the relative scores first, then adds them.
            let mut bias: Option<Tensor> = None;
            let mut add = |x: Tensor| -> Result<()> {
                bias = Some(match bias.take() {
                    None => x,
                    Some(b) => b.f_add(&x)?,
                });
                Ok(())
            };
            if c.c2p {
                let pk = self.split(pos_k.expect("c2p projection").forward(&rel_emb, f)?)?;
                let att = q.f_matmul(&pk.f_transpose(-1, -2)?)?;
                let att = att.f_gather(-1, &index(rel_pos.shallow_clone())?, false)?;
                add(att.f_div(&scale)?)?;
            }
            if c.p2c {
                let pq = self.split(pos_q.expect("p2c projection").forward(&rel_emb, f)?)?;
                let att = k.f_matmul(&pq.f_transpose(-1, -2)?)?;
                let att = att
                    .f_gather(-1, &index(rel_pos.f_neg()?)?, false)?
                    .f_transpose(-1, -2)?;
                add(att.f_div(&scale)?)?;
            }
            if let Some(bias) = bias {
                scores = scores.f_add(&bias)?;
            }
        }
        let scores = scores.f_masked_fill(&a.mask.f_logical_not()?, lowest(f.kind))?;
        let probs = scores.f_softmax(-1, f.kind)?;
        let probs = dropout(probs, c.attention_probs_dropout_prob, f.train)?;
        let s = h.size();
        Ok(probs
            .f_matmul(&v)?
            .f_permute([0, 2, 1, 3])?
            .f_reshape([s[0], s[1], -1])?)
    }

    /// The relative embeddings `[1, 2·span, d]` through their LayerNorm. transformers norms them
    /// once per forward; tuna does it in each layer (the same values), so that a layer reads
    /// nothing from the pass that holds a graph: the checkpointed backward runs each layer's
    /// graph on its own.
    fn relative_embeddings(&self, f: Fwd) -> Result<Tensor> {
        let w = cast(
            self.rel_embeddings.as_ref().expect("relative embeddings"),
            f.kind,
        )?;
        let w = match &self.rel_ln {
            Some(ln) => ln.forward(&w)?,
            None => w,
        };
        Ok(w.f_unsqueeze(0)?)
    }

    /// Relative positions `[t, t]` as transformers' `build_relative_position`.
    fn relative_positions(&self, t: i64, device: Device) -> Result<Option<Tensor>> {
        let Some(r) = &self.cfg.relative else {
            return Ok(None);
        };
        let ids = Tensor::f_arange(t, (Kind::Int64, device))?;
        let rel = ids.f_view([t, 1])?.f_sub(&ids.f_view([1, t])?)?;
        Ok(Some(match r.position_buckets {
            Some(b) => log_buckets(&rel, b, r.max_relative_positions)?,
            None => rel,
        }))
    }

    /// v2's convolution over the embeddings `emb`, added to the first layer's output `out`.
    fn conv(
        &self,
        conv: &Conv,
        emb: &Tensor,
        out: &Tensor,
        real: &Tensor,
        f: Fwd,
    ) -> Result<Tensor> {
        let c = self.cfg.conv.as_ref().expect("conv config");
        let y = emb
            .f_permute([0, 2, 1])?
            .f_conv1d(
                &cast(&conv.weight, f.kind)?,
                Some(&cast(&conv.bias, f.kind)?),
                [1],
                [(c.kernel_size - 1) / 2],
                [1],
                c.groups,
            )?
            .f_permute([0, 2, 1])?
            .f_masked_fill(&real.f_logical_not()?.f_unsqueeze(-1)?, 0.0)?;
        let y = activation(&dropout(y, self.cfg.hidden_dropout_prob, f.train)?, &c.act)?;
        let y = conv.ln.forward(&out.f_add(&y)?)?;
        Ok(y.f_mul(&real.f_unsqueeze(-1)?.f_to_kind(f.kind)?)?)
    }
}

impl Architecture for DebertaV2 {
    const BASE_PREFIX: &'static str = "deberta";
    const TOKEN_TYPE_IDS: bool = true;

    fn hf_class(_model_type: &str, task: &TaskHead) -> String {
        match task {
            TaskHead::CausalLm => "DebertaV2ForMaskedLM".into(),
            TaskHead::SequenceClassification { .. } => "DebertaV2ForSequenceClassification".into(),
            TaskHead::TokenClassification { .. } => "DebertaV2ForTokenClassification".into(),
            TaskHead::QuestionAnswering => "DebertaV2ForQuestionAnswering".into(),
        }
    }

    /// The position-id buffer, position embeddings a model without `position_biased_input` has
    /// no use for (transformers ignores them too), and the MLM heads (`cls`, `lm_predictions`,
    /// `mask_predictions`).
    fn is_buffer(name: &str) -> bool {
        name.ends_with("embeddings.position_ids")
            || name.ends_with("embeddings.position_embeddings.weight")
            || ["cls.", "lm_predictions.", "mask_predictions."]
                .iter()
                .any(|p| name.starts_with(p))
    }

    fn last_hidden_state(&self, core: &Core, batch: &Batch<'_>, train: bool) -> Result<Tensor> {
        Ok(pass::hidden(self, core, batch, train)?.1)
    }

    type Pass = Pass;

    fn embed(&self, core: &Core, batch: &Batch<'_>, train: bool) -> Result<(Pass, Tensor)> {
        unpacked(batch, "DeBERTa")?;
        let c = &self.cfg;
        let max = c.position_biased_input.then_some(c.max_position_embeddings);
        let (bsz, t) = core.check_batch(batch, max)?;
        let f = Fwd {
            kind: core.compute_kind,
            train,
        };
        let mut emb = embedding(&self.word, batch.input_ids, f.kind)?;
        if let Some(p) = &self.position {
            let pos = Tensor::f_arange(t, (Kind::Int64, core.device))?;
            emb = emb.f_add(&embedding(p, &pos, f.kind)?)?;
        }
        if let Some(tt) = &self.token_type {
            let types = match batch.token_type_ids {
                Some(ids) => embedding(tt, ids, f.kind)?,
                None => embedding(
                    tt,
                    &Tensor::f_zeros([1, t], (Kind::Int64, core.device))?,
                    f.kind,
                )?,
            };
            emb = emb.f_add(&types)?;
        }
        let real = batch.attention_mask.f_ne(0)?;
        let emb = self
            .emb_ln
            .forward(&emb)?
            .f_mul(&real.f_unsqueeze(-1)?.f_to_kind(f.kind)?)?;
        let emb = dropout(emb, c.hidden_dropout_prob, train)?;
        let mask = real
            .f_view([bsz, 1, 1, t])?
            .f_logical_and(&real.f_view([bsz, 1, t, 1])?)?;
        let rel_pos = match &self.rel_embeddings {
            Some(_) => self.relative_positions(t, core.device)?,
            None => None,
        };
        let attn = AttnInputs { mask, rel_pos };
        Ok((Pass { f, attn, real }, emb))
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Layer `i`; v2's convolution reads the first layer's input, the embeddings.
    fn layer(&self, i: usize, h: &Tensor, p: &Pass) -> Result<Tensor> {
        let (c, l, f) = (&self.cfg, &self.layers[i], p.f);
        let drop = LayerDropout {
            attn_out: c.hidden_dropout_prob,
            ffn: c.hidden_dropout_prob,
        };
        let ctx = self.attention(l, h, &p.attn, f)?;
        let out = l.base.finish(h, &ctx, &c.hidden_act, &drop, f)?;
        match (i, &self.conv) {
            (0, Some(conv)) => self.conv(conv, h, &out, &p.real, f),
            _ => Ok(out),
        }
    }

    /// Dropout, the pooler on `[CLS]` with its activation, dropout, `classifier`; token
    /// classification: dropout (`hidden_dropout_prob`) and `classifier` on every position.
    fn head(&self, h: &Tensor, _batch: &Batch<'_>, p: &Pass) -> Result<Tensor> {
        let (c, f) = (&self.cfg, p.f);
        let Some(pooler) = &self.pooler else {
            return super::token_logits(h, &self.classifier, self.token_dropout, f);
        };
        let x = dropout(h.f_select(1, 0)?, c.pooler_dropout, f.train)?;
        let x = activation(&pooler.forward(&x, f)?, &c.pooler_hidden_act)?;
        let x = dropout(x, c.cls_dropout, f.train)?;
        self.classifier.forward(&x, f)
    }
}
