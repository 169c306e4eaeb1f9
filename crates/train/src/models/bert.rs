//! BERT (`BertModel` + pooler, trained as `BertForSequenceClassification`): absolute position
//! and token-type embeddings, post-LayerNorm encoder layers, tanh pooler on `[CLS]`, dropout and
//! `classifier` on the pooled output. A checkpoint without pooler weights (some sentence-embedding
//! exports) gets a freshly initialised pooler, said in the load notes.

use std::path::Path;

use tch::{Kind, Tensor};
use tuna_core::hf_config::{BertConfig, HfConfig};

use super::{read_config, Architecture, Builder, Core, Net};
use crate::freeze::Role;
use crate::layers::{
    activation, all_real, dropout, embedding, padding_mask, sdpa, Fwd, LayerNorm, Linear,
};
use crate::loader::Checkpoint;
use crate::model::{Batch, LoadOptions, Model, TaskHead};
use crate::{Error, Result};

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_ln: LayerNorm,
    inter: Linear,
    out: Linear,
    out_ln: LayerNorm,
}

pub struct Bert {
    cfg: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_ln: LayerNorm,
    layers: Vec<Layer>,
    pooler: Linear,
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
    let TaskHead::SequenceClassification { id2label } = &opts.task else {
        return Err(Error::Config(
            "BERT supports sequence_classification only".into(),
        ));
    };
    let mut b = Builder::new::<Bert>(ckpt, cfg.num_hidden_layers as usize, &hf, opts)?;
    let (d, eps, inter) = (cfg.hidden_size, cfg.layer_norm_eps, cfg.intermediate_size);
    let e = Role::Embedding;
    let word = b.param("embeddings.word_embeddings.weight", &[cfg.vocab_size, d], e)?;
    let position = b.param(
        "embeddings.position_embeddings.weight",
        &[cfg.max_position_embeddings, d],
        e,
    )?;
    let token_type = b.param(
        "embeddings.token_type_embeddings.weight",
        &[cfg.type_vocab_size, d],
        e,
    )?;
    let emb_ln = b.layer_norm("embeddings.LayerNorm", d, eps, e)?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers as usize);
    for i in 0..cfg.num_hidden_layers {
        let r = Role::Layer(i as usize);
        let p = format!("encoder.layer.{i}");
        layers.push(Layer {
            query: b.linear(&format!("{p}.attention.self.query"), d, d, true, r, false)?,
            key: b.linear(&format!("{p}.attention.self.key"), d, d, true, r, false)?,
            value: b.linear(&format!("{p}.attention.self.value"), d, d, true, r, false)?,
            attn_out: b.linear(&format!("{p}.attention.output.dense"), d, d, true, r, false)?,
            attn_ln: b.layer_norm(&format!("{p}.attention.output.LayerNorm"), d, eps, r)?,
            inter: b.linear(&format!("{p}.intermediate.dense"), d, inter, true, r, false)?,
            out: b.linear(&format!("{p}.output.dense"), inter, d, true, r, false)?,
            out_ln: b.layer_norm(&format!("{p}.output.LayerNorm"), d, eps, r)?,
        });
    }
    let pooler = b.linear_or_init("pooler.dense", d, d, Role::Other)?;
    let classifier = b.classifier("classifier", d, id2label.len() as i64, true)?;
    let tied = false;
    let core = b.finish(dir, hf, opts, tied)?;
    let classifier_dropout = cfg.classifier_dropout.unwrap_or(cfg.hidden_dropout_prob);
    Ok(Net {
        core,
        arch: Bert {
            cfg,
            word,
            position,
            token_type,
            emb_ln,
            layers,
            pooler,
            classifier,
            classifier_dropout,
        },
    })
}

impl Bert {
    /// `last_hidden_state [b, t, d]` and `pooler_output [b, d]`.
    fn encode(&self, core: &Core, batch: &Batch<'_>, train: bool) -> Result<(Tensor, Tensor)> {
        let (bsz, t) = core.check_batch(batch, Some(self.cfg.max_position_embeddings))?;
        let f = Fwd {
            kind: core.compute_kind,
            train,
        };
        let c = &self.cfg;
        let (nh, d) = (c.num_attention_heads, c.hidden_size);
        let hd = d / nh;
        let pos = Tensor::f_arange(t, (Kind::Int64, core.device))?;
        let tt = match batch.token_type_ids {
            Some(tt) => embedding(&self.token_type, tt, f.kind)?,
            None => embedding(
                &self.token_type,
                &Tensor::f_zeros([1, t], (Kind::Int64, core.device))?,
                f.kind,
            )?,
        };
        let h = embedding(&self.word, batch.input_ids, f.kind)?
            .f_add(&embedding(&self.position, &pos, f.kind)?)?
            .f_add(&tt)?;
        let mut h = dropout(self.emb_ln.forward(&h)?, c.hidden_dropout_prob, train)?;
        let mask = padding_mask(batch.attention_mask, all_real(batch.attention_mask)?)?;
        let attn_p = if train {
            c.attention_probs_dropout_prob
        } else {
            0.0
        };
        let split = |x: Tensor| x.f_view([bsz, t, nh, hd]).and_then(|x| x.f_transpose(1, 2));
        for l in &self.layers {
            let q = split(l.query.forward(&h, f)?)?;
            let k = split(l.key.forward(&h, f)?)?;
            let v = split(l.value.forward(&h, f)?)?;
            let y = sdpa(&q, &k, &v, &mask, attn_p, None, false)?
                .f_transpose(1, 2)?
                .f_reshape([bsz, t, d])?;
            let y = dropout(l.attn_out.forward(&y, f)?, c.hidden_dropout_prob, train)?;
            let a = l.attn_ln.forward(&y.f_add(&h)?)?;
            let m = activation(&l.inter.forward(&a, f)?, &c.hidden_act)?;
            let m = dropout(l.out.forward(&m, f)?, c.hidden_dropout_prob, train)?;
            h = l.out_ln.forward(&m.f_add(&a)?)?;
        }
        let cls = h.f_select(1, 0)?;
        let pooled = self.pooler.forward(&cls, f)?.f_tanh()?;
        Ok((h, pooled))
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

    fn forward(&self, core: &Core, batch: &Batch<'_>, train: bool) -> Result<Tensor> {
        if batch.packed.is_some() {
            return Err(crate::Error::Config(
                "packing applies to causal language models, not to BERT".into(),
            ));
        }
        let (_, pooled) = self.encode(core, batch, train)?;
        let pooled = dropout(pooled, self.classifier_dropout, train)?;
        self.classifier.forward(
            &pooled,
            Fwd {
                kind: core.compute_kind,
                train,
            },
        )
    }
}
