//! GPT-2 (`GPT2LMHeadModel`, `GPT2ForSequenceClassification`): learned positions, pre-LayerNorm
//! blocks, fused `c_attn` q/k/v projection, GELU MLP. Hugging Face stores the projections as
//! Conv1D (`[in, out]`); tuna transposes them at load and back at save.

use std::path::Path;

use tch::{Kind, Tensor};
use tuna_core::hf_config::{Gpt2Config, HfConfig};

use super::{Architecture, Builder, Core, Head, Net};
use crate::freeze::Role;
use crate::layers::{
    activation, all_real, causal_mask, dropout, embedding, packed_mask, sdpa, step_mask,
    step_positions, AttnMask, Fwd, LayerNorm, Linear,
};
use crate::loader::Checkpoint;
use crate::model::{Batch, LoadOptions, Model, TaskHead};
use crate::Result;

struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
}

/// What every block of one pass reads.
pub struct Pass {
    f: Fwd,
    mask: AttnMask,
}

pub struct Gpt2 {
    cfg: Gpt2Config,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    head: Head,
}

pub(super) fn build(
    dir: &Path,
    hf: HfConfig,
    cfg: Gpt2Config,
    ckpt: &Checkpoint,
    opts: &LoadOptions,
) -> Result<Box<dyn Model>> {
    let mut b = Builder::new::<Gpt2>(ckpt, cfg.n_layer as usize, &hf, opts)?;
    let (d, eps) = (cfg.n_embd, cfg.layer_norm_epsilon);
    let wte = b.param("wte.weight", &[cfg.vocab_size, d], Role::Embedding)?;
    let wpe = b.param("wpe.weight", &[cfg.n_positions, d], Role::Embedding)?;
    let mut blocks = Vec::with_capacity(cfg.n_layer as usize);
    for i in 0..cfg.n_layer {
        let r = Role::Layer(i as usize);
        let p = format!("h.{i}");
        blocks.push(Block {
            ln_1: b.layer_norm(&format!("{p}.ln_1"), d, eps, r)?,
            c_attn: b.linear(&format!("{p}.attn.c_attn"), d, 3 * d, true, r, true)?,
            attn_proj: b.linear(&format!("{p}.attn.c_proj"), d, d, true, r, true)?,
            ln_2: b.layer_norm(&format!("{p}.ln_2"), d, eps, r)?,
            c_fc: b.linear(&format!("{p}.mlp.c_fc"), d, cfg.n_inner, true, r, true)?,
            mlp_proj: b.linear(&format!("{p}.mlp.c_proj"), cfg.n_inner, d, true, r, true)?,
        });
    }
    let ln_f = b.layer_norm("ln_f", d, eps, Role::Other)?;
    let tied = hf.common.tie_word_embeddings;
    let head = match &opts.task {
        TaskHead::CausalLm => Head::Lm(b.lm_head(&wte, tied, cfg.vocab_size, d)?),
        TaskHead::SequenceClassification { id2label, .. } => {
            Head::Cls(b.classifier("score", d, id2label.len() as i64, false)?)
        }
        TaskHead::TokenClassification { id2label } => Head::Tokens(
            b.classifier("classifier", d, id2label.len() as i64, true)?,
            super::decoder_token_dropout(dir),
        ),
        // GPT2ForQuestionAnswering: `qa_outputs` on every position, no dropout.
        TaskHead::QuestionAnswering => Head::Tokens(b.classifier("qa_outputs", d, 2, true)?, 0.0),
    };
    let core = b.finish(dir, hf, opts, tied)?;
    Ok(Box::new(Net {
        core,
        arch: Gpt2 {
            cfg,
            wte,
            wpe,
            blocks,
            ln_f,
            head,
        },
    }))
}

impl Architecture for Gpt2 {
    const BASE_PREFIX: &'static str = "transformer";

    fn hf_class(_model_type: &str, task: &TaskHead) -> String {
        match task {
            TaskHead::CausalLm => "GPT2LMHeadModel".into(),
            TaskHead::SequenceClassification { .. } => "GPT2ForSequenceClassification".into(),
            TaskHead::TokenClassification { .. } => "GPT2ForTokenClassification".into(),
            TaskHead::QuestionAnswering => "GPT2ForQuestionAnswering".into(),
        }
    }

    /// The causal-mask buffers older transformers saved.
    fn is_buffer(name: &str) -> bool {
        name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")
    }

    type Pass = Pass;

    fn embed(&self, core: &Core, batch: &Batch<'_>, train: bool) -> Result<(Pass, Tensor)> {
        let (_, t) = core.check_batch(batch, Some(self.cfg.n_positions))?;
        let f = Fwd {
            kind: core.compute_kind,
            train,
        };
        let pos = match batch.packed {
            Some(p) => p.position_ids.shallow_clone(),
            None => Tensor::f_arange(t, (Kind::Int64, core.device))?,
        };
        let h = embedding(&self.wte, batch.input_ids, f.kind)?
            .f_add(&embedding(&self.wpe, &pos, f.kind)?)?;
        let h = dropout(h, self.cfg.embd_pdrop, train)?;
        let mask = match batch.packed {
            Some(p) => packed_mask(&p.segment_ids, None)?,
            None => causal_mask(batch.attention_mask, None, all_real(batch.attention_mask)?)?,
        };
        Ok((Pass { f, mask }, h))
    }

    fn embed_step(&self, core: &Core, batch: &Batch<'_>, past: i64) -> Result<(Pass, Tensor)> {
        let t = batch.input_ids.size()[1];
        let total = batch.attention_mask.size()[1];
        if total != past + t || total > self.cfg.n_positions {
            return Err(crate::Error::Data(format!(
                "a decoding step of {t} token(s) after {past} needs a mask of {} and at most {} positions, got {total}",
                past + t,
                self.cfg.n_positions
            )));
        }
        let f = Fwd {
            kind: core.compute_kind,
            train: false,
        };
        let pos = step_positions(batch.attention_mask, t)?;
        let h = embedding(&self.wte, batch.input_ids, f.kind)?
            .f_add(&embedding(&self.wpe, &pos, f.kind)?)?;
        let mask = step_mask(batch.attention_mask, t, None)?;
        Ok((Pass { f, mask }, h))
    }

    fn layer_step(
        &self,
        i: usize,
        h: &Tensor,
        p: &Pass,
        kv: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        self.block(i, h, p, Some(kv))
    }

    fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    fn layer(&self, i: usize, h: &Tensor, p: &Pass) -> Result<Tensor> {
        self.block(i, h, p, None)
    }

    fn head(&self, h: &Tensor, batch: &Batch<'_>, p: &Pass) -> Result<Tensor> {
        let h = self.ln_f.forward(h)?;
        self.head.decoder_logits(&h, batch.attention_mask, p.f)
    }
}

impl Gpt2 {
    /// Block `i`; with `kv`, attending to the cached keys and values too (and adding its own).
    fn block(
        &self,
        i: usize,
        h: &Tensor,
        p: &Pass,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (c, blk, f) = (&self.cfg, &self.blocks[i], p.f);
        let (nh, d, s) = (c.n_head, c.n_embd, h.size());
        let (bsz, t) = (s[0], s[1]);
        let hd = d / nh;
        let attn_p = if f.train { c.attn_pdrop } else { 0.0 };
        let a = blk.ln_1.forward(h)?;
        let qkv = blk
            .c_attn
            .forward(&a, f)?
            .f_view([bsz, t, 3, nh, hd])?
            .f_permute([2, 0, 3, 1, 4])?;
        let (q, k, v) = (qkv.f_get(0)?, qkv.f_get(1)?, qkv.f_get(2)?);
        let (k, v) = match kv {
            Some(slot) => crate::model::extend_kv(slot, k, v)?,
            None => (k, v),
        };
        let mut scale = if c.scale_attn_weights {
            1.0 / (hd as f64).sqrt()
        } else {
            1.0
        };
        if c.scale_attn_by_inverse_layer_idx {
            scale /= (i + 1) as f64;
        }
        let y = sdpa(&q, &k, &v, &p.mask, attn_p, Some(scale), false)?;
        let y = y.f_transpose(1, 2)?.f_reshape([bsz, t, d])?;
        let y = dropout(blk.attn_proj.forward(&y, f)?, c.resid_pdrop, f.train)?;
        let h = h.f_add(&y)?;
        let m = blk.ln_2.forward(&h)?;
        let m = activation(&blk.c_fc.forward(&m, f)?, &c.activation_function)?;
        let m = dropout(blk.mlp_proj.forward(&m, f)?, c.resid_pdrop, f.train)?;
        Ok(h.f_add(&m)?)
    }
}
