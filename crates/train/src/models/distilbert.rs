//! DistilBERT (`DistilBertForSequenceClassification`): BERT's encoder ([`BertEncoder`]) without
//! token types, under DistilBERT's names (`transformer.layer.{i}.attention.q_lin`, ...), with no
//! dropout after the attention output and LayerNorm epsilon 1e-12; then `pre_classifier`, ReLU,
//! dropout and `classifier` on the first token.

use std::path::Path;

use tch::{Kind, Tensor};
use tuna_core::hf_config::{DistilBertConfig, HfConfig, DISTILBERT_LAYER_NORM_EPS};

use super::bert::{BertEncoder, EncoderPass, EncoderSpec, LayerDropout, LayerNames};
use super::{encoder_labels, pass, unpacked, Architecture, Builder, Core, Net};
use crate::layers::{dropout, Linear};
use crate::loader::Checkpoint;
use crate::model::{Batch, LoadOptions, Model, TaskHead};
use crate::Result;

const LAYER: LayerNames = LayerNames {
    query: "attention.q_lin",
    key: "attention.k_lin",
    value: "attention.v_lin",
    attn_out: "attention.out_lin",
    attn_ln: "sa_layer_norm",
    inter: "ffn.lin1",
    out: "ffn.lin2",
    out_ln: "output_layer_norm",
};

fn spec(c: &DistilBertConfig) -> EncoderSpec {
    EncoderSpec {
        vocab_size: c.vocab_size,
        max_positions: c.max_position_embeddings,
        type_vocab_size: 0,
        hidden: c.dim,
        intermediate: c.hidden_dim,
        heads: c.n_heads,
        layers: c.n_layers,
        eps: DISTILBERT_LAYER_NORM_EPS,
        act: c.activation.clone(),
        dropout: c.dropout,
        layer_dropout: LayerDropout {
            attn_out: 0.0,
            ffn: c.dropout,
        },
        attn_dropout: c.attention_dropout,
        layer_prefix: "transformer.layer",
        names: &LAYER,
    }
}

pub struct DistilBert {
    cfg: DistilBertConfig,
    encoder: BertEncoder,
    /// None under token classification.
    pre_classifier: Option<Linear>,
    /// `classifier`, or question answering's `qa_outputs`.
    classifier: Linear,
    /// Dropout before a per-token head (`dropout`; `qa_dropout` for question answering).
    token_dropout: f64,
}

pub(super) fn build(
    dir: &Path,
    hf: HfConfig,
    cfg: DistilBertConfig,
    ckpt: &Checkpoint,
    opts: &LoadOptions,
) -> Result<Box<dyn Model>> {
    let labels = encoder_labels(opts, "DistilBERT")?;
    let mut b = Builder::new::<DistilBert>(ckpt, cfg.n_layers as usize, &hf, opts)?;
    let encoder = BertEncoder::load(&mut b, spec(&cfg))?;
    // DistilBertForTokenClassification has no `pre_classifier`.
    let pre_classifier = match opts.task.is_per_token() {
        true => None,
        false => Some(b.classifier("pre_classifier", cfg.dim, cfg.dim, true)?),
    };
    let qa = opts.task == TaskHead::QuestionAnswering;
    let name = if qa { "qa_outputs" } else { "classifier" };
    let classifier = b.classifier(name, cfg.dim, labels, true)?;
    let token_dropout = if qa { cfg.qa_dropout } else { cfg.dropout };
    let core = b.finish(dir, hf, opts, false)?;
    Ok(Box::new(Net {
        core,
        arch: DistilBert {
            cfg,
            encoder,
            pre_classifier,
            classifier,
            token_dropout,
        },
    }))
}

impl Architecture for DistilBert {
    const BASE_PREFIX: &'static str = "distilbert";

    fn hf_class(_model_type: &str, task: &TaskHead) -> String {
        match task {
            TaskHead::CausalLm => "DistilBertForMaskedLM".into(),
            TaskHead::SequenceClassification { .. } => "DistilBertForSequenceClassification".into(),
            TaskHead::TokenClassification { .. } => "DistilBertForTokenClassification".into(),
            TaskHead::QuestionAnswering => "DistilBertForQuestionAnswering".into(),
        }
    }

    /// The position-id buffer older transformers saved, and the MLM head (`vocab_*`).
    fn is_buffer(name: &str) -> bool {
        name.ends_with("embeddings.position_ids") || name.starts_with("vocab_")
    }

    fn last_hidden_state(&self, core: &Core, batch: &Batch<'_>, train: bool) -> Result<Tensor> {
        Ok(pass::hidden(self, core, batch, train)?.1)
    }

    type Pass = EncoderPass;

    fn embed(&self, core: &Core, batch: &Batch<'_>, train: bool) -> Result<(EncoderPass, Tensor)> {
        unpacked(batch, "DistilBERT")?;
        let (_, t) = core.check_batch(batch, Some(self.cfg.max_position_embeddings))?;
        let pos = Tensor::f_arange(t, (Kind::Int64, core.device))?;
        self.encoder.embed(core, batch, &pos, None, train)
    }

    fn num_layers(&self) -> usize {
        self.encoder.num_layers()
    }

    fn layer(&self, i: usize, h: &Tensor, p: &EncoderPass) -> Result<Tensor> {
        self.encoder.layer(i, h, p)
    }

    /// `pre_classifier` and ReLU on `[CLS]`, dropout, `classifier`; token classification:
    /// dropout (`dropout`) and `classifier` on every position.
    fn head(&self, h: &Tensor, _batch: &Batch<'_>, p: &EncoderPass) -> Result<Tensor> {
        let f = p.f;
        let Some(pre) = &self.pre_classifier else {
            return super::token_logits(h, &self.classifier, self.token_dropout, f);
        };
        let x = pre.forward(&h.f_select(1, 0)?, f)?.f_relu()?;
        let x = dropout(x, self.cfg.seq_classif_dropout, f.train)?;
        self.classifier.forward(&x, f)
    }
}
