//! BERT (`BertModel` + pooler, trained as `BertForSequenceClassification`): absolute position
//! and token-type embeddings, post-LayerNorm encoder layers, tanh pooler on `[CLS]`, dropout and
//! `classifier` on the pooled output. A checkpoint without pooler weights (some sentence-embedding
//! exports) gets a freshly initialised pooler, said in the load notes.
//!
//! Also what BERT's relatives take from it: [`BertEncoder`] (embeddings and layers, shaped by an
//! [`EncoderSpec`]) for RoBERTa and DistilBERT, and [`EncoderLayer`] (a post-LayerNorm layer under
//! the family's [`LayerNames`], the attention left to the caller) for DeBERTa too.

use std::path::Path;

use tch::{Kind, Tensor};
use tuna_core::hf_config::{BertConfig, HfConfig};

use super::{encoder_labels, pass, read_config, unpacked, Architecture, Builder, Core, Net};
use crate::freeze::Role;
use crate::layers::{
    activation, all_real, dropout, embedding, padding_mask, sdpa, AttnMask, Fwd, LayerNorm, Linear,
};
use crate::loader::Checkpoint;
use crate::model::{Batch, LoadOptions, Model, TaskHead};
use crate::{Error, Result};

/// The module names of one post-LayerNorm encoder layer, relative to the layer.
pub(super) struct LayerNames {
    pub query: &'static str,
    pub key: &'static str,
    pub value: &'static str,
    pub attn_out: &'static str,
    pub attn_ln: &'static str,
    pub inter: &'static str,
    pub out: &'static str,
    pub out_ln: &'static str,
}

/// BERT's (and RoBERTa's) names.
const BERT_LAYER: LayerNames = LayerNames {
    query: "attention.self.query",
    key: "attention.self.key",
    value: "attention.self.value",
    attn_out: "attention.output.dense",
    attn_ln: "attention.output.LayerNorm",
    inter: "intermediate.dense",
    out: "output.dense",
    out_ln: "output.LayerNorm",
};

/// One post-LayerNorm encoder layer (BERT, RoBERTa, DistilBERT, DeBERTa): q/k/v projections, the
/// attention output projection, residual and LayerNorm, the feed-forward pair, residual and
/// LayerNorm. The attention itself is the architecture's.
pub(super) struct EncoderLayer {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    attn_out: Linear,
    attn_ln: LayerNorm,
    inter: Linear,
    out: Linear,
    out_ln: LayerNorm,
}

/// Dropout probabilities of [`EncoderLayer::finish`].
pub(super) struct LayerDropout {
    /// After the attention output projection.
    pub attn_out: f64,
    /// After the feed-forward output.
    pub ffn: f64,
}

impl EncoderLayer {
    /// Layer `prefix` (`encoder.layer.3`) of width `d`, feed-forward width `inter`.
    pub(super) fn load(
        b: &mut Builder,
        prefix: &str,
        names: &LayerNames,
        (d, inter, eps): (i64, i64, f64),
        role: Role,
    ) -> Result<Self> {
        let p = |n: &str| format!("{prefix}.{n}");
        Ok(EncoderLayer {
            query: b.linear(&p(names.query), d, d, true, role, false)?,
            key: b.linear(&p(names.key), d, d, true, role, false)?,
            value: b.linear(&p(names.value), d, d, true, role, false)?,
            attn_out: b.linear(&p(names.attn_out), d, d, true, role, false)?,
            attn_ln: b.layer_norm(&p(names.attn_ln), d, eps, role)?,
            inter: b.linear(&p(names.inter), d, inter, true, role, false)?,
            out: b.linear(&p(names.out), inter, d, true, role, false)?,
            out_ln: b.layer_norm(&p(names.out_ln), d, eps, role)?,
        })
    }

    /// The layer's output from its input `h` and the attention's context `ctx` (`[b, t, d]`, heads
    /// merged), the feed-forward activation `act`.
    pub(super) fn finish(
        &self,
        h: &Tensor,
        ctx: &Tensor,
        act: &str,
        p: &LayerDropout,
        f: Fwd,
    ) -> Result<Tensor> {
        let y = dropout(self.attn_out.forward(ctx, f)?, p.attn_out, f.train)?;
        let a = self.attn_ln.forward(&y.f_add(h)?)?;
        let m = activation(&self.inter.forward(&a, f)?, act)?;
        let m = dropout(self.out.forward(&m, f)?, p.ffn, f.train)?;
        self.out_ln.forward(&m.f_add(&a)?)
    }
}

/// Self-attention of a BERT-style layer over SDPA: `[b, t, d]` in, heads merged out.
fn self_attention(
    l: &EncoderLayer,
    h: &Tensor,
    mask: &AttnMask,
    heads: i64,
    attn_dropout: f64,
    f: Fwd,
) -> Result<Tensor> {
    let s = h.size();
    let (bsz, t, d) = (s[0], s[1], s[2]);
    let split = |x: Tensor| {
        x.f_view([bsz, t, heads, d / heads])
            .and_then(|x| x.f_transpose(1, 2))
    };
    let q = split(l.query.forward(h, f)?)?;
    let k = split(l.key.forward(h, f)?)?;
    let v = split(l.value.forward(h, f)?)?;
    let p = if f.train { attn_dropout } else { 0.0 };
    Ok(sdpa(&q, &k, &v, mask, p, None, false)?
        .f_transpose(1, 2)?
        .f_reshape([bsz, t, d])?)
}

/// The shape of a BERT-style encoder: what [`BertEncoder`] needs of BERT's, RoBERTa's or
/// DistilBERT's config.
pub(super) struct EncoderSpec {
    pub vocab_size: i64,
    pub max_positions: i64,
    /// Token type embeddings when positive.
    pub type_vocab_size: i64,
    pub hidden: i64,
    pub intermediate: i64,
    pub heads: i64,
    pub layers: i64,
    pub eps: f64,
    pub act: String,
    /// Dropout after the embeddings (and [`LayerDropout`] in the layers).
    pub dropout: f64,
    pub layer_dropout: LayerDropout,
    pub attn_dropout: f64,
    /// Where the layers are (`encoder.layer`) and what their modules are called.
    pub layer_prefix: &'static str,
    pub names: &'static LayerNames,
}

impl EncoderSpec {
    pub(super) fn bert(c: &BertConfig) -> Self {
        EncoderSpec {
            vocab_size: c.vocab_size,
            max_positions: c.max_position_embeddings,
            type_vocab_size: c.type_vocab_size,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            layers: c.num_hidden_layers,
            eps: c.layer_norm_eps,
            act: c.hidden_act.clone(),
            dropout: c.hidden_dropout_prob,
            layer_dropout: LayerDropout {
                attn_out: c.hidden_dropout_prob,
                ffn: c.hidden_dropout_prob,
            },
            attn_dropout: c.attention_probs_dropout_prob,
            layer_prefix: "encoder.layer",
            names: &BERT_LAYER,
        }
    }
}

/// BERT's encoder, which RoBERTa and DistilBERT share: word, position and (but for DistilBERT)
/// token-type embeddings with their LayerNorm, then the post-LayerNorm layers over SDPA.
pub(super) struct BertEncoder {
    spec: EncoderSpec,
    word: Tensor,
    position: Tensor,
    token_type: Option<Tensor>,
    emb_ln: LayerNorm,
    layers: Vec<EncoderLayer>,
}

impl BertEncoder {
    pub(super) fn load(b: &mut Builder, spec: EncoderSpec) -> Result<Self> {
        let (d, eps) = (spec.hidden, spec.eps);
        let e = Role::Embedding;
        let word = b.param(
            "embeddings.word_embeddings.weight",
            &[spec.vocab_size, d],
            e,
        )?;
        let position = b.param(
            "embeddings.position_embeddings.weight",
            &[spec.max_positions, d],
            e,
        )?;
        let token_type = if spec.type_vocab_size > 0 {
            let shape = [spec.type_vocab_size, d];
            Some(b.param("embeddings.token_type_embeddings.weight", &shape, e)?)
        } else {
            None
        };
        let emb_ln = b.layer_norm("embeddings.LayerNorm", d, eps, e)?;
        let layers = (0..spec.layers)
            .map(|i| {
                let p = format!("{}.{i}", spec.layer_prefix);
                let r = Role::Layer(i as usize);
                EncoderLayer::load(b, &p, spec.names, (d, spec.intermediate, eps), r)
            })
            .collect::<Result<_>>()?;
        Ok(BertEncoder {
            spec,
            word,
            position,
            token_type,
            emb_ln,
            layers,
        })
    }

    /// The embeddings for positions `position_ids` (`[b or 1, t]`) and token types
    /// `token_types` (zeros when None), and what the layers read.
    pub(super) fn embed(
        &self,
        core: &Core,
        batch: &Batch<'_>,
        position_ids: &Tensor,
        token_types: Option<&Tensor>,
        train: bool,
    ) -> Result<(EncoderPass, Tensor)> {
        let f = Fwd {
            kind: core.compute_kind,
            train,
        };
        let t = batch.input_ids.size()[1];
        let mut h = embedding(&self.word, batch.input_ids, f.kind)?.f_add(&embedding(
            &self.position,
            position_ids,
            f.kind,
        )?)?;
        if let Some(table) = &self.token_type {
            let tt = match token_types {
                Some(tt) => embedding(table, tt, f.kind)?,
                None => embedding(
                    table,
                    &Tensor::f_zeros([1, t], (Kind::Int64, core.device))?,
                    f.kind,
                )?,
            };
            h = h.f_add(&tt)?;
        }
        let h = dropout(self.emb_ln.forward(&h)?, self.spec.dropout, train)?;
        let mask = padding_mask(batch.attention_mask, all_real(batch.attention_mask)?)?;
        Ok((EncoderPass { f, mask }, h))
    }

    pub(super) fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Layer `i` on `h`.
    pub(super) fn layer(&self, i: usize, h: &Tensor, p: &EncoderPass) -> Result<Tensor> {
        let (c, l) = (&self.spec, &self.layers[i]);
        let ctx = self_attention(l, h, &p.mask, c.heads, c.attn_dropout, p.f)?;
        l.finish(h, &ctx, &c.act, &c.layer_dropout, p.f)
    }
}

/// What the layers of a `BertEncoder` read in one pass.
pub struct EncoderPass {
    pub(super) f: Fwd,
    mask: AttnMask,
}

pub struct Bert {
    cfg: BertConfig,
    encoder: BertEncoder,
    /// None under token classification (`BertForTokenClassification` has no pooler).
    pooler: Option<Linear>,
    /// The head reads every position rather than the pooled `[CLS]`.
    per_token: bool,
    classifier: Linear,
    classifier_dropout: f64,
}

/// Loads a BERT checkpoint as its concrete type (for [`Net::<Bert>::encode`]).
pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Net<Bert>> {
    let hf = read_config(dir)?;
    let tuna_core::hf_config::Arch::Bert(cfg) = hf.arch.clone() else {
        return Err(Error::Config(format!(
            "{} is not a BERT model",
            dir.display()
        )));
    };
    let ckpt = Checkpoint::open(dir)?;
    let _g = tch::no_grad_guard();
    build_net(dir, hf, cfg, &ckpt, opts)
}

pub(super) fn build(
    dir: &Path,
    hf: HfConfig,
    cfg: BertConfig,
    ckpt: &Checkpoint,
    opts: &LoadOptions,
) -> Result<Box<dyn Model>> {
    Ok(Box::new(build_net(dir, hf, cfg, ckpt, opts)?))
}

fn build_net(
    dir: &Path,
    hf: HfConfig,
    cfg: BertConfig,
    ckpt: &Checkpoint,
    opts: &LoadOptions,
) -> Result<Net<Bert>> {
    let labels = encoder_labels(opts, "BERT")?;
    let mut b = Builder::new::<Bert>(ckpt, cfg.num_hidden_layers as usize, &hf, opts)?;
    let d = cfg.hidden_size;
    let encoder = BertEncoder::load(&mut b, EncoderSpec::bert(&cfg))?;
    let per_token = opts.task.is_per_token();
    // BertForQuestionAnswering: `qa_outputs` on the hidden states, no dropout.
    let qa = opts.task == TaskHead::QuestionAnswering;
    let pooler = if per_token {
        None
    } else {
        Some(b.linear_or_init("pooler.dense", d, d, Role::Other)?)
    };
    let classifier = b.classifier(
        if qa { "qa_outputs" } else { "classifier" },
        d,
        labels,
        true,
    )?;
    let tied = false;
    let core = b.finish(dir, hf, opts, tied)?;
    let classifier_dropout = match qa {
        true => 0.0,
        false => cfg.classifier_dropout.unwrap_or(cfg.hidden_dropout_prob),
    };
    Ok(Net {
        core,
        arch: Bert {
            cfg,
            encoder,
            pooler,
            per_token,
            classifier,
            classifier_dropout,
        },
    })
}

impl Bert {
    /// `last_hidden_state [b, t, d]` and `pooler_output [b, d]`.
    fn encode(&self, core: &Core, batch: &Batch<'_>, train: bool) -> Result<(Tensor, Tensor)> {
        let (p, h) = pass::hidden(self, core, batch, train)?;
        let pooled = self.pool(&h, &p)?;
        Ok((h, pooled))
    }

    /// The tanh pooler on `[CLS]`.
    fn pool(&self, h: &Tensor, p: &EncoderPass) -> Result<Tensor> {
        let Some(pooler) = &self.pooler else {
            return Err(Error::Config(
                "a token-classification BERT has no pooler".into(),
            ));
        };
        Ok(pooler.forward(&h.f_select(1, 0)?, p.f)?.f_tanh()?)
    }
}

impl Net<Bert> {
    /// `(last_hidden_state, pooler_output)` in eval mode, as transformers' `BertModel` returns them.
    pub fn encode(&self, batch: &Batch<'_>) -> Result<(Tensor, Tensor)> {
        let _g = tch::no_grad_guard();
        self.arch.encode(&self.core, batch, false)
    }
}

impl Architecture for Bert {
    const BASE_PREFIX: &'static str = "bert";
    const TOKEN_TYPE_IDS: bool = true;

    fn hf_class(_model_type: &str, task: &TaskHead) -> String {
        match task {
            TaskHead::CausalLm => "BertForCausalLM".into(),
            TaskHead::SequenceClassification { .. } => "BertForSequenceClassification".into(),
            TaskHead::TokenClassification { .. } => "BertForTokenClassification".into(),
            TaskHead::QuestionAnswering => "BertForQuestionAnswering".into(),
        }
    }

    /// The position-id buffer older transformers saved, and the pre-training heads (`cls.*`).
    fn is_buffer(name: &str) -> bool {
        name.ends_with("embeddings.position_ids")
            || name.starts_with("cls.")
            || name.starts_with("bert.cls.")
    }

    /// Old BERT checkpoints name LayerNorm parameters gamma/beta (transformers renames them).
    fn legacy_name(rel: &str) -> Option<String> {
        rel.contains("LayerNorm.").then(|| {
            rel.replace("LayerNorm.weight", "LayerNorm.gamma")
                .replace("LayerNorm.bias", "LayerNorm.beta")
        })
    }

    fn last_hidden_state(&self, core: &Core, batch: &Batch<'_>, train: bool) -> Result<Tensor> {
        Ok(pass::hidden(self, core, batch, train)?.1)
    }

    type Pass = EncoderPass;

    fn embed(&self, core: &Core, batch: &Batch<'_>, train: bool) -> Result<(EncoderPass, Tensor)> {
        unpacked(batch, "BERT")?;
        let (_, t) = core.check_batch(batch, Some(self.cfg.max_position_embeddings))?;
        let pos = Tensor::f_arange(t, (Kind::Int64, core.device))?;
        self.encoder
            .embed(core, batch, &pos, batch.token_type_ids, train)
    }

    fn num_layers(&self) -> usize {
        self.encoder.num_layers()
    }

    fn layer(&self, i: usize, h: &Tensor, p: &EncoderPass) -> Result<Tensor> {
        self.encoder.layer(i, h, p)
    }

    fn head(&self, h: &Tensor, _batch: &Batch<'_>, p: &EncoderPass) -> Result<Tensor> {
        if self.per_token {
            return super::token_logits(h, &self.classifier, self.classifier_dropout, p.f);
        }
        let pooled = dropout(self.pool(h, p)?, self.classifier_dropout, p.f.train)?;
        self.classifier.forward(&pooled, p.f)
    }
}
