//! The architectures, one per file (`gpt2.rs`, `llama.rs`, `qwen3.rs`, `gemma.rs`, `phi3.rs`,
//! `olmo2.rs`; the encoders `bert.rs`, `roberta.rs`, `distilbert.rs`, `deberta_v2.rs`,
//! `modernbert.rs`), and what they share (`decoder.rs` runs the Llama-style decoders).
//!
//! - this file: the [`Architecture`] trait each file implements (its checkpoint names, the
//!   class transformers saves it as, its embeddings, layers and head), [`load_model`] (the registry: one arm per
//!   family of config.json), the shared state [`Core`] and [`Net`], which implements [`Model`]
//!   for every architecture (parameter listings, resume), and the decoder output [`Head`].
//! - `builder.rs`: the parameter registry and builder that load weights by Hugging Face name.
//! - `decoder.rs`: the layers the Llama-style decoders (Llama, Qwen3, Gemma, Phi-3, OLMo 2)
//!   share, and their loading; each of those files says where its norms sit and how its
//!   projections are named.
//! - `export.rs`: `save_pretrained` in transformers' and PEFT's formats.
//! - `pass.rs`: one pass over an architecture's layers, written once: the forward, the
//!   encoders' last hidden state, and the forward and backward with activation checkpointing.
//!
//! Adding an architecture: its config in `tuna_core::hf_config`, a file here with a
//! `build(dir, hf, cfg, ckpt, opts)` that loads its weights through `Builder::new::<Self>` and
//! its [`Architecture`] impl, and its arm in [`load_model`]. A Llama-style decoder instead
//! describes its layers to `decoder::build` and implements `decoder::DecoderFamily` (the
//! classes it saves as); its `Architecture` is `decoder::DecoderNet`'s.

pub mod bert;
mod builder;
pub mod deberta_v2;
pub mod decoder;
pub mod distilbert;
mod export;
pub mod gemma;
pub mod gpt2;
pub mod llama;
pub mod modernbert;
pub mod olmo2;
mod pass;
pub mod phi3;
pub mod qwen3;
pub mod roberta;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tch::{Device, Kind, Tensor};
use tuna_core::hf_config::{Arch, HfConfig};

pub use builder::{Builder, LoraRef, ParamEntry};

use crate::layers::Linear;
use crate::loader::Checkpoint;
use crate::lora;
use crate::model::{Batch, LoadOptions, LoraOptions, Model, ModelInfo, TaskHead};
use crate::{Error, Result};

/// One architecture, as its file describes it to the shared code (builder, export, [`Net`]),
/// which asks it rather than comparing model types.
pub trait Architecture: Send {
    /// The base model's prefix in task checkpoints (`transformer`, `model`, `bert`).
    const BASE_PREFIX: &'static str;
    /// Whether [`Architecture::embed`] reads `Batch::token_type_ids`.
    const TOKEN_TYPE_IDS: bool = false;
    /// The `architectures` entry transformers writes for `model_type` trained for `task`.
    fn hf_class(model_type: &str, task: &TaskHead) -> String;
    /// Checkpoint tensors that are not parameters (buffers, heads this architecture never
    /// trains): left unused without a word.
    fn is_buffer(name: &str) -> bool;
    /// The older spelling of base tensor `rel` that some checkpoints still use.
    fn legacy_name(_rel: &str) -> Option<String> {
        None
    }
    /// What every layer of one pass reads (masks, rotary tables, relative positions, whether
    /// dropout is on): nothing that needs a gradient, since the checkpointed backward runs each
    /// layer's graph apart and frees it.
    type Pass;
    /// The pass's inputs and the first layer's input (the embeddings).
    fn embed(&self, core: &Core, batch: &Batch<'_>, train: bool) -> Result<(Self::Pass, Tensor)>;
    /// How many layers [`Architecture::layer`] runs.
    fn num_layers(&self) -> usize;
    /// Layer `i` on the hidden states `h`: a function of `h` and the pass alone, so that
    /// `pass.rs` can run it again for activation checkpointing.
    fn layer(&self, i: usize, h: &Tensor, pass: &Self::Pass) -> Result<Tensor>;
    /// The output for the task (see [`Model::forward`]) from the last layer's output.
    fn head(&self, h: &Tensor, batch: &Batch<'_>, pass: &Self::Pass) -> Result<Tensor>;
    /// Incremental decoding: the pass inputs and embeddings of `batch`'s tokens, which follow
    /// `past` tokens in the cache (`batch.attention_mask` covers all of them, left padded).
    fn embed_step(
        &self,
        _core: &Core,
        _batch: &Batch<'_>,
        _past: i64,
    ) -> Result<(Self::Pass, Tensor)> {
        Err(Error::Config(
            "only causal language models decode incrementally".into(),
        ))
    }
    /// Layer `i` of an incremental step: attends to the cached keys and values of `kv` and
    /// appends its own.
    fn layer_step(
        &self,
        _i: usize,
        _h: &Tensor,
        _pass: &Self::Pass,
        _kv: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        Err(Error::Config(
            "only causal language models decode incrementally".into(),
        ))
    }
    /// See [`Model::rope_switch_length`].
    fn rope_switch_length(&self) -> Option<i64> {
        None
    }
    /// An encoder's `last_hidden_state [b, t, d]`, as transformers' base model returns it.
    fn last_hidden_state(&self, _core: &Core, _batch: &Batch<'_>, _train: bool) -> Result<Tensor> {
        Err(Error::Config(
            "only encoders return a last hidden state".into(),
        ))
    }
}

/// What every architecture shares once loaded.
pub struct Core {
    pub info: ModelInfo,
    pub device: Device,
    /// Kind of the activations.
    pub compute_kind: Kind,
    /// Kind full checkpoints are saved in (the source checkpoint's dtype).
    pub save_kind: Kind,
    pub hf: HfConfig,
    pub config_json: Map<String, Value>,
    pub task: TaskHead,
    pub params: Vec<ParamEntry>,
    pub loras: Vec<LoraRef>,
    pub lora: Option<LoraOptions>,
    pub source: PathBuf,
    /// Load report: heads initialised, tensors ignored.
    pub notes: Vec<String>,
    pub tied: bool,
    /// The `architectures` entry of saved full checkpoints ([`Architecture::hf_class`]).
    pub hf_class: String,
}

/// A loaded model: shared state plus the architecture's modules.
pub struct Net<A> {
    pub core: Core,
    pub arch: A,
}

/// The LoRA settings of the PEFT adapter in `dir` (`adapter_config.json`: `r`, `lora_alpha`,
/// `lora_dropout`, `target_modules`) and the base it names (`base_model_name_or_path`), to load
/// the base with before [`Model::load_adapter`].
pub fn adapter_options(dir: &Path) -> Result<(LoraOptions, String)> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let cfg: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    let bad = |what: &str| Error::Config(format!("{}: {what}", path.display()));
    if cfg
        .get("peft_type")
        .and_then(Value::as_str)
        .is_some_and(|t| t != "LORA")
    {
        return Err(bad("only LoRA adapters are supported"));
    }
    let r = cfg["r"].as_i64().ok_or_else(|| bad("no integer `r`"))?;
    let targets = match &cfg["target_modules"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => return Err(bad("no `target_modules`")),
    };
    Ok((
        LoraOptions {
            r,
            alpha: cfg["lora_alpha"].as_f64().unwrap_or(8.0),
            dropout: cfg["lora_dropout"].as_f64().unwrap_or(0.0),
            target_modules: targets,
        },
        cfg["base_model_name_or_path"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    ))
}

/// Loads the Hugging Face model in `dir` (config.json + safetensors weights) for `opts.task`.
pub fn load_model(dir: &Path, opts: &LoadOptions) -> Result<Box<dyn Model>> {
    let hf = read_config(dir)?;
    if let Some(l) = &opts.lora {
        lora::validate_options(l)?;
    }
    match &opts.task {
        TaskHead::CausalLm if !hf.is_decoder() => {
            return Err(Error::Config(format!(
                "model type '{}' is an encoder: it supports the sequence-level tasks only (sequence_classification, sequence_regression, multi_label_classification)",
                hf.model_type()
            )))
        }
        TaskHead::SequenceClassification { id2label, .. }
        | TaskHead::TokenClassification { id2label }
            if id2label.is_empty() =>
        {
            return Err(Error::Config(
                "a classification head needs at least one label".into(),
            ))
        }
        _ => {}
    }
    if !matches!(opts.base_kind, Kind::Float | Kind::BFloat16 | Kind::Half) {
        return Err(Error::Config(format!(
            "unsupported base kind {:?}",
            opts.base_kind
        )));
    }
    let ckpt = Checkpoint::open(dir)?;
    let _guard = tch::no_grad_guard();
    let src = decoder::Source {
        dir,
        ckpt: &ckpt,
        opts,
    };
    match hf.arch.clone() {
        Arch::Gpt2(c) => gpt2::build(dir, hf, c, &ckpt, opts),
        Arch::Llama(c) => llama::build(src, hf, c),
        Arch::Qwen3(c) => qwen3::build(src, hf, c),
        Arch::Gemma(c) => gemma::build(src, hf, c),
        Arch::Phi3(c) => phi3::build(src, hf, c),
        Arch::Olmo2(c) => olmo2::build(src, hf, c),
        Arch::Bert(c) => bert::build(dir, hf, c, &ckpt, opts),
        Arch::Roberta(c) => roberta::build(dir, hf, c, &ckpt, opts),
        Arch::DistilBert(c) => distilbert::build(dir, hf, c, &ckpt, opts),
        Arch::DebertaV2(c) => deberta_v2::build(dir, hf, c, &ckpt, opts),
        Arch::ModernBert(c) => modernbert::build(dir, hf, c, &ckpt, opts),
    }
}

/// The number of labels of an encoder's task (encoders train classification heads only).
fn encoder_labels(opts: &LoadOptions, family: &str) -> Result<i64> {
    match opts.task.num_outputs() {
        Some(n) => Ok(n),
        None => Err(Error::Config(format!(
            "{family} is an encoder: it trains classification heads, not causal_lm"
        ))),
    }
}

/// A token-classification head's logits `[b, t, labels]`: dropout `p` on every position's
/// hidden state `h`, then `classifier`.
fn token_logits(h: &Tensor, classifier: &Linear, p: f64, f: crate::layers::Fwd) -> Result<Tensor> {
    classifier.forward(&crate::layers::dropout(h.shallow_clone(), p, f.train)?, f)
}

/// The dropout transformers' decoder `*ForTokenClassification` classes put before their head:
/// `classifier_dropout` of `dir/config.json`, else `hidden_dropout`, else 0.1.
fn decoder_token_dropout(dir: &Path) -> f64 {
    let config: Option<Map<String, Value>> = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    ["classifier_dropout", "hidden_dropout"]
        .iter()
        .find_map(|k| config.as_ref()?.get(*k).and_then(Value::as_f64))
        .unwrap_or(0.1)
}

/// Encoders read whole rows: packing several examples into one is for causal language models.
fn unpacked(batch: &Batch<'_>, family: &str) -> Result<()> {
    if batch.packed.is_some() {
        return Err(Error::Config(format!(
            "packing applies to causal language models, not to {family}"
        )));
    }
    Ok(())
}

/// Reads and resolves `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<HfConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    HfConfig::parse(&text).map_err(|e| Error::Config(format!("{}: {}", path.display(), e.0)))
}

impl Core {
    /// Checks the batch shape against the model; `max_positions` bounds the sequence length of
    /// architectures with learned position embeddings.
    pub fn check_batch(&self, batch: &Batch<'_>, max_positions: Option<i64>) -> Result<(i64, i64)> {
        let s = batch.input_ids.size();
        if s.len() != 2 {
            return Err(Error::Data(format!(
                "input_ids must be [batch, seq], got {s:?}"
            )));
        }
        if batch.attention_mask.size() != s {
            return Err(Error::Data(format!(
                "attention_mask {:?} does not match input_ids {s:?}",
                batch.attention_mask.size()
            )));
        }
        if s[0] == 0 || s[1] == 0 {
            return Err(Error::Data(format!("empty batch {s:?}")));
        }
        if let Some(max) = max_positions.filter(|&m| s[1] > m) {
            return Err(Error::Data(format!(
                "sequence length {} exceeds the model's {max} positions",
                s[1]
            )));
        }
        Ok((s[0], s[1]))
    }

    pub fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .params
            .iter()
            .filter(|p| p.trainable)
            .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
            .collect();
        for l in &self.loras {
            out.push((lora::peft_key(&l.module, "lora_A"), l.a.shallow_clone()));
            out.push((lora::peft_key(&l.module, "lora_B"), l.b.shallow_clone()));
        }
        out
    }

    pub fn all_parameters(&self) -> BTreeMap<String, Tensor> {
        let mut out: BTreeMap<String, Tensor> = self
            .params
            .iter()
            .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
            .collect();
        for l in &self.loras {
            out.insert(lora::peft_key(&l.module, "lora_A"), l.a.shallow_clone());
            out.insert(lora::peft_key(&l.module, "lora_B"), l.b.shallow_clone());
        }
        out
    }

    /// Loads the PEFT LoRA adapter in `dir` (`adapter_model.safetensors`, as tuna and PEFT save
    /// it) into this model's LoRA weights, and a task head saved beside them: switching
    /// adapters of one base copies their weights, the base stays as loaded. The model must
    /// have been loaded with the adapter's rank and target modules ([`adapter_options`]).
    pub fn load_adapter(&self, dir: &Path) -> Result<()> {
        let path = dir.join("adapter_model.safetensors");
        let tensors = crate::loader::read_safetensors(&path)?;
        let _g = tch::no_grad_guard();
        let copy = |key: &str, dst: &Tensor| -> Result<()> {
            let src = tensors.get(key).ok_or_else(|| {
                Error::Weights(format!(
                    "{} has no {key}: the adapter was made for other target modules",
                    path.display()
                ))
            })?;
            if src.size() != dst.size() {
                return Err(Error::Weights(format!(
                    "{key}: the adapter's shape {:?}, the model's {:?}",
                    src.size(),
                    dst.size()
                )));
            }
            let mut d = dst.shallow_clone();
            d.f_copy_(src)?;
            Ok(())
        };
        for l in &self.loras {
            copy(&lora::peft_key(&l.module, "lora_A"), &l.a)?;
            copy(&lora::peft_key(&l.module, "lora_B"), &l.b)?;
        }
        let lora_keys = tensors.keys().filter(|k| k.contains(".lora_")).count();
        if lora_keys != 2 * self.loras.len() {
            return Err(Error::Weights(format!(
                "{} holds {lora_keys} LoRA tensors; this model has {} (other target modules)",
                path.display(),
                2 * self.loras.len()
            )));
        }
        for p in self.params.iter().filter(|p| p.head) {
            let key = lora::peft_saved_key(&p.name);
            if tensors.contains_key(&key) {
                copy(&key, &p.tensor)?;
            }
        }
        Ok(())
    }

    pub fn load_trainable(&self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        let _g = tch::no_grad_guard();
        let mut missing = Vec::new();
        for (name, dst) in self.trainable_parameters() {
            match tensors.get(&name) {
                None => missing.push(name),
                Some(src) => {
                    if src.size() != dst.size() {
                        return Err(Error::Weights(format!(
                            "{name}: saved shape {:?}, model {:?}",
                            src.size(),
                            dst.size()
                        )));
                    }
                    let mut d = dst;
                    d.f_copy_(src)?;
                }
            }
        }
        if !missing.is_empty() {
            return Err(Error::Weights(format!(
                "resume state lacks trainable parameters: {}",
                missing.join(", ")
            )));
        }
        Ok(())
    }
}

impl<A: Architecture> Model for Net<A> {
    fn info(&self) -> &ModelInfo {
        &self.core.info
    }
    fn device(&self) -> Device {
        self.core.device
    }
    fn uses_token_type_ids(&self) -> bool {
        A::TOKEN_TYPE_IDS
    }
    fn forward(&self, batch: &Batch<'_>, train: bool) -> Result<Tensor> {
        pass::forward(&self.arch, &self.core, batch, train)
    }
    fn forward_step(&self, batch: &Batch<'_>, cache: &mut crate::model::KvCache) -> Result<Tensor> {
        if self.core.task != TaskHead::CausalLm {
            return Err(Error::Config(
                "only a causal language model generates text".into(),
            ));
        }
        let _g = tch::no_grad_guard();
        pass::forward_step(&self.arch, &self.core, batch, cache)
    }
    fn rope_switch_length(&self) -> Option<i64> {
        self.arch.rope_switch_length()
    }
    fn forward_backward_checkpointed(
        &self,
        batch: &Batch<'_>,
        train: bool,
        backward: &mut dyn FnMut(&Tensor) -> Result<()>,
    ) -> Result<()> {
        pass::forward_backward_checkpointed(&self.arch, &self.core, batch, train, backward)
    }
    fn last_hidden_state(&self, batch: &Batch<'_>) -> Result<Tensor> {
        let _g = tch::no_grad_guard();
        self.arch.last_hidden_state(&self.core, batch, false)
    }
    fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        self.core.trainable_parameters()
    }
    fn all_parameters(&self) -> BTreeMap<String, Tensor> {
        self.core.all_parameters()
    }
    fn save_pretrained(&self, dir: &Path, merge_lora: bool) -> Result<()> {
        self.core.save_pretrained(dir, merge_lora)
    }
    fn load_trainable(&self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        self.core.load_trainable(tensors)
    }
    fn load_adapter(&self, dir: &Path) -> Result<()> {
        self.core.load_adapter(dir)
    }
    fn load_notes(&self) -> Vec<String> {
        self.core.notes.clone()
    }
    fn nf4_storage(&self) -> (u64, u64) {
        let stored = self.core.params.iter().filter_map(|p| p.nf4.as_ref());
        stored.fold((0, 0), |(n, b), w| (n + w.numel() as u64, b + w.bytes()))
    }
}

/// The output layer per task.
pub enum Head {
    /// LM head weight `[vocab, hidden]` (the embedding matrix when tied).
    Lm(Tensor),
    /// Classification head read at the last real token (decoders) or on the pooled output (BERT).
    Cls(Linear),
    /// Token classification: dropout and the head on every position.
    Tokens(Linear, f64),
}

impl Head {
    /// Decoder output: logits `[b, t, vocab]`, for classification `[b, labels]` at each row's
    /// last real token, for token classification `[b, t, labels]`.
    pub fn decoder_logits(
        &self,
        h: &Tensor,
        attention_mask: &Tensor,
        f: crate::layers::Fwd,
    ) -> Result<Tensor> {
        match self {
            Head::Lm(w) => Ok(h.f_linear(&crate::layers::cast(w, f.kind)?, None::<Tensor>)?),
            Head::Cls(lin) => {
                let idx = crate::layers::last_token_index(attention_mask)?;
                lin.forward(&crate::layers::gather_rows(h, &idx)?, f)
            }
            Head::Tokens(lin, p) => token_logits(h, lin, *p, f),
        }
    }
}
