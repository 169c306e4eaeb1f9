//! RoBERTa and XLM-RoBERTa (`RobertaForSequenceClassification`,
//! `XLMRobertaForSequenceClassification`): BERT's encoder ([`BertEncoder`]) with positions
//! counted over the non-pad tokens from `padding_idx + 1` (pad tokens keep `padding_idx`), as
//! transformers computes them from `input_ids`; token type 0 throughout; no pooler. The head
//! (`classifier.dense`, tanh, `classifier.out_proj`, dropout before each) reads `<s>`.

use std::path::Path;

use tch::{Kind, Tensor};
use tuna_core::hf_config::{HfConfig, RobertaConfig};

use super::bert::{BertEncoder, EncoderPass, EncoderSpec};
use super::{encoder_labels, pass, unpacked, Architecture, Builder, Core, Net};
use crate::layers::{dropout, Linear};
use crate::loader::Checkpoint;
use crate::model::{Batch, LoadOptions, Model, TaskHead};
use crate::Result;

pub struct Roberta {
    cfg: RobertaConfig,
    encoder: BertEncoder,
    head: RobertaHead,
    classifier_dropout: f64,
}

/// `RobertaClassificationHead` on `<s>`, or token classification's `classifier` on every
/// position.
enum RobertaHead {
    Sequence { dense: Linear, out_proj: Linear },
    Tokens { classifier: Linear },
}

pub(super) fn build(
    dir: &Path,
    hf: HfConfig,
    cfg: RobertaConfig,
    ckpt: &Checkpoint,
    opts: &LoadOptions,
) -> Result<Box<dyn Model>> {
    let labels = encoder_labels(opts, "RoBERTa")?;
    let c = &cfg.bert;
    let mut b = Builder::new::<Roberta>(ckpt, c.num_hidden_layers as usize, &hf, opts)?;
    let d = c.hidden_size;
    let encoder = BertEncoder::load(&mut b, EncoderSpec::bert(c))?;
    let head = match opts.task {
        TaskHead::TokenClassification { .. } => RobertaHead::Tokens {
            classifier: b.classifier("classifier", d, labels, true)?,
        },
        TaskHead::QuestionAnswering => RobertaHead::Tokens {
            classifier: b.classifier("qa_outputs", d, labels, true)?,
        },
        _ => RobertaHead::Sequence {
            dense: b.classifier("classifier.dense", d, d, true)?,
            out_proj: b.classifier("classifier.out_proj", d, labels, true)?,
        },
    };
    let core = b.finish(dir, hf, opts, false)?;
    // RobertaForQuestionAnswering has no dropout before `qa_outputs`.
    let classifier_dropout = match opts.task {
        TaskHead::QuestionAnswering => 0.0,
        _ => c.classifier_dropout.unwrap_or(c.hidden_dropout_prob),
    };
    Ok(Box::new(Net {
        core,
        arch: Roberta {
            cfg,
            encoder,
            head,
            classifier_dropout,
        },
    }))
}

impl Roberta {
    /// transformers' `create_position_ids_from_input_ids`: `padding_idx + 1, + 2, ...` over the
    /// tokens that are not `padding_idx`, which keep `padding_idx`.
    fn position_ids(&self, input_ids: &Tensor) -> Result<Tensor> {
        let pad = self.cfg.padding_idx;
        let real = input_ids.f_ne(pad)?.f_to_kind(Kind::Int64)?;
        Ok(real
            .f_cumsum(1, Kind::Int64)?
            .f_mul(&real)?
            .f_add_scalar(pad)?)
    }
}

impl Architecture for Roberta {
    const BASE_PREFIX: &'static str = "roberta";

    fn hf_class(model_type: &str, task: &TaskHead) -> String {
        let family = if model_type == "xlm-roberta" {
            "XLMRoberta"
        } else {
            "Roberta"
        };
        match task {
            TaskHead::CausalLm => format!("{family}ForCausalLM"),
            TaskHead::SequenceClassification { .. } => format!("{family}ForSequenceClassification"),
            TaskHead::TokenClassification { .. } => format!("{family}ForTokenClassification"),
            TaskHead::QuestionAnswering => format!("{family}ForQuestionAnswering"),
        }
    }

    /// The position-id buffer older transformers saved, and the pooler of `RobertaModel`
    /// checkpoints, which the classification model does not have (the MLM head, `lm_head`, is
    /// noted as another task's).
    fn is_buffer(name: &str) -> bool {
        name.ends_with("embeddings.position_ids")
            || name.starts_with("pooler.")
            || name.starts_with("roberta.pooler.")
    }

    fn last_hidden_state(&self, core: &Core, batch: &Batch<'_>, train: bool) -> Result<Tensor> {
        Ok(pass::hidden(self, core, batch, train)?.1)
    }

    type Pass = EncoderPass;

    fn embed(&self, core: &Core, batch: &Batch<'_>, train: bool) -> Result<(EncoderPass, Tensor)> {
        unpacked(batch, "RoBERTa")?;
        core.check_batch(batch, Some(self.cfg.max_tokens()))?;
        let pos = self.position_ids(batch.input_ids)?;
        self.encoder.embed(core, batch, &pos, None, train)
    }

    fn num_layers(&self) -> usize {
        self.encoder.num_layers()
    }

    fn layer(&self, i: usize, h: &Tensor, p: &EncoderPass) -> Result<Tensor> {
        self.encoder.layer(i, h, p)
    }

    /// The classification head on `<s>`: dropout, dense, tanh, dropout, `out_proj`; or
    /// dropout and `classifier` on every position.
    fn head(&self, h: &Tensor, _batch: &Batch<'_>, p: &EncoderPass) -> Result<Tensor> {
        let (f, drop) = (p.f, self.classifier_dropout);
        match &self.head {
            RobertaHead::Tokens { classifier } => super::token_logits(h, classifier, drop, f),
            RobertaHead::Sequence { dense, out_proj } => {
                let x = dropout(h.f_select(1, 0)?, drop, f.train)?;
                let x = dense.forward(&x, f)?.f_tanh()?;
                let x = dropout(x, drop, f.train)?;
                out_proj.forward(&x, f)
            }
        }
    }
}
