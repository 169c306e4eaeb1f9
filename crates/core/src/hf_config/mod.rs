//! Hugging Face `config.json`, deserialised per family with serde and resolved into a strict
//! per-architecture configuration.
//!
//! Pure parsing, no IO: the caller reads the file. Both key forms in circulation are accepted:
//! transformers ≥ 5 writes `rope_parameters` (with `rope_theta` and `rope_type` inside) and
//! `dtype`; earlier versions (most published checkpoints) write top-level `rope_theta`,
//! `rope_scaling` (with `rope_type` or the older `type`) and `torch_dtype`. `null` counts as
//! absent everywhere, and integers may be written as floats with no fraction (`768.0`).
//!
//! Supported families: GPT-2 (`gpt2`), the Llama family (`llama`, `mistral`, `qwen2`), Qwen3
//! (`qwen3`), Gemma (`gemma2`, `gemma3_text`), Phi-3 (`phi3`), OLMo 2 (`olmo2`), and the encoders
//! BERT (`bert`), RoBERTa (`roberta`, `xlm-roberta`), DistilBERT (`distilbert`), DeBERTa-v2/v3
//! (`deberta-v2`) and ModernBERT (`modernbert`). [`HfConfig::module_names`] lists the linear
//! module names a user may name as LoRA target modules, and [`HfConfig::describe`] summarises a
//! model for the API.
//!
//! Layout: this file holds what every family shares ([`HfConfig`], [`Common`], [`Arch`], the
//! facts the API shows, the family registry and the checks); one file per family (`gpt2.rs`,
//! `llama.rs`, `qwen3.rs`, `gemma.rs`, `phi3.rs`, `olmo2.rs`, `bert.rs`, `roberta.rs`, ...)
//! holds its `RawXxxConfig` (config.json as it is, serde), the strict `XxxConfig` that
//! `into_config()` resolves it into, and its [`ArchFacts`]; `decoder.rs` holds what the
//! Llama-style decoders share (sizes and heads, RoPE, sliding-window layers, parts of their facts).
//!
//! Adding a family: a new file here with those three parts, a variant of [`Arch`] with its arm in
//! [`Arch::facts`], and its line in `FAMILIES`.

mod bert;
mod deberta_v2;
mod decoder;
#[cfg(test)]
mod decoder_tests;
mod distilbert;
#[cfg(test)]
mod encoder_tests;
mod gemma;
mod gpt2;
mod llama;
mod modernbert;
mod olmo2;
mod phi3;
mod qwen3;
mod roberta;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde::de::{self, Deserializer, IgnoredAny, Unexpected, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use bert::BertConfig;
pub use deberta_v2::{ConvConfig, DebertaV2Config, RelativeAttention};
pub use decoder::{DecoderShape, LayerType, RopeConfig, RopeScaling};
pub use distilbert::{DistilBertConfig, DISTILBERT_LAYER_NORM_EPS};
pub use gemma::GemmaConfig;
pub use gpt2::Gpt2Config;
pub use llama::LlamaConfig;
pub use modernbert::{ModernBertConfig, Pooling};
pub use olmo2::Olmo2Config;
pub use phi3::Phi3Config;
pub use qwen3::Qwen3Config;
pub use roberta::RobertaConfig;

use crate::spec::Task;

/// Why a config.json could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("config.json: {0}")]
pub struct HfConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, HfConfigError> {
    Err(HfConfigError(msg.into()))
}

/// One family: the `model_type`s it covers and how its config.json is read.
struct Family {
    model_types: &'static [&'static str],
    parse: fn(&Value, &str) -> Result<Arch, HfConfigError>,
}

/// Every family tuna trains, in the order error messages list them. One line per family.
const FAMILIES: &[Family] = &[
    gpt2::FAMILY,
    llama::FAMILY,
    qwen3::FAMILY,
    gemma::FAMILY,
    phi3::FAMILY,
    olmo2::FAMILY,
    bert::FAMILY,
    roberta::FAMILY,
    distilbert::FAMILY,
    deberta_v2::FAMILY,
    modernbert::FAMILY,
];

/// The model types tuna can train.
pub fn supported_model_types() -> Vec<&'static str> {
    FAMILIES
        .iter()
        .flat_map(|f| f.model_types.iter().copied())
        .collect()
}

/// Fields every family shares.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Common {
    pub model_type: String,
    pub architectures: Vec<String>,
    /// `dtype` (transformers ≥ 5) or `torch_dtype` (earlier), e.g. "bfloat16".
    pub dtype: Option<String>,
    pub bos_token_id: Option<i64>,
    /// `eos_token_id` may be a number or a list in config.json.
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
    /// Label names by index, when config.json has `id2label`.
    pub id2label: Option<Vec<String>>,
    pub initializer_range: f64,
    pub tie_word_embeddings: bool,
}

/// The resolved configuration of one family.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "family", rename_all = "snake_case")]
pub enum Arch {
    Gpt2(Gpt2Config),
    Llama(LlamaConfig),
    Qwen3(Qwen3Config),
    Gemma(GemmaConfig),
    Phi3(Phi3Config),
    Olmo2(Olmo2Config),
    Bert(BertConfig),
    Roberta(RobertaConfig),
    DistilBert(DistilBertConfig),
    DebertaV2(DebertaV2Config),
    ModernBert(ModernBertConfig),
}

impl Arch {
    /// The family's facts (one arm per family).
    pub fn facts(&self) -> &dyn ArchFacts {
        match self {
            Arch::Gpt2(c) => c,
            Arch::Llama(c) => c,
            Arch::Qwen3(c) => c,
            Arch::Gemma(c) => c,
            Arch::Phi3(c) => c,
            Arch::Olmo2(c) => c,
            Arch::Bert(c) => c,
            Arch::Roberta(c) => c,
            Arch::DistilBert(c) => c,
            Arch::DebertaV2(c) => c,
            Arch::ModernBert(c) => c,
        }
    }
}

/// What the API and the trainer read off one family's resolved config; each family's file
/// implements it for its `XxxConfig`.
pub trait ArchFacts {
    /// "gpt2", "llama" (Llama, Mistral, Qwen2), "qwen3", "gemma" (Gemma 2, Gemma 3 text),
    /// "phi3", "olmo2", or an encoder's: "bert", "roberta" (RoBERTa, XLM-RoBERTa),
    /// "distilbert", "deberta-v2", "modernbert".
    fn family(&self) -> &'static str;
    /// Decoders train for causal LM and sequence classification, encoders for classification.
    fn is_decoder(&self) -> bool;
    /// `tie_word_embeddings` when config.json leaves it out (transformers' default).
    fn ties_embeddings_by_default(&self) -> bool;
    /// The sizes, whatever the family calls them.
    fn dims(&self) -> Dims;
    /// Name of the transformer layers in the state dict; layer `i` is `{layer_prefix}.{i}`.
    fn layer_prefix(&self) -> &'static str;
    /// The linear modules of one layer, relative to the layer, in order (`self_attn.q_proj`).
    fn layer_linears(&self) -> &'static [&'static str];
    /// Linear modules outside the layers (BERT's pooler), full names. Not the output head.
    fn other_linears(&self) -> &'static [&'static str] {
        &[]
    }
    /// Glob patterns over parameter names, one per kind of module, to show as freeze examples.
    fn freeze_patterns(&self) -> &'static [&'static str];
    /// See [`HfConfig::num_parameters`]; `tied`: the LM head is the embedding matrix.
    fn num_parameters(&self, tied: bool) -> i64;
    /// The MLP's inner width.
    fn intermediate_size(&self) -> i64 {
        4 * self.dims().hidden_size
    }
    /// `(in_features, out_features)` of each of [`ArchFacts::layer_linears`], in that order (a
    /// LoRA adapter of rank r has `r * (in + out)` parameters and keeps its input for the
    /// backward pass). The default takes the hidden size for both.
    fn layer_linear_shapes(&self) -> Vec<(i64, i64)> {
        let d = self.dims().hidden_size;
        vec![(d, d); self.layer_linears().len()]
    }
    /// Bytes one transformer layer keeps for the backward pass per token, per unit of
    /// `hidden_size + intermediate_size`, in fp32 (attention scores aside; see
    /// `crate::memory`). Measured per family with `scripts/bench-memory.sh`; the default is the
    /// largest measured so far, so an unmeasured family is not underestimated.
    fn activation_bytes_per_width(&self) -> f64 {
        33.0
    }
    /// Whether training on the CPU keeps each head's attention scores for the backward pass:
    /// libtorch's fused CPU attention kernel keeps none, but it takes no dropout, so a model
    /// with attention dropout falls back to the kernel that materialises them (measured with
    /// GPT-2, dropout 0.1, against SmolLM's Llama shape, none; BENCHMARKS.md, memory). The
    /// default (a family with its own attention code) keeps them.
    fn cpu_attention_keeps_scores(&self) -> bool {
        true
    }
}

/// The sizes every family has, under the family's own key names in config.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Dims {
    pub num_layers: i64,
    pub hidden_size: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    /// Longest sequence the position embeddings (or RoPE training length) cover.
    pub context_length: i64,
    pub vocab_size: i64,
}

/// A resolved config.json.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HfConfig {
    pub common: Common,
    pub arch: Arch,
}

/// What the API shows about a model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelDescription {
    pub model_type: String,
    pub family: String,
    pub architectures: Vec<String>,
    #[serde(flatten)]
    pub dims: Dims,
    /// See [`HfConfig::num_parameters`].
    pub num_parameters: i64,
    pub dtype: Option<String>,
    pub tasks: Vec<Task>,
    /// Linear module names usable as LoRA target modules (plus `all-linear`).
    pub lora_target_modules: Vec<String>,
    /// Parameter name patterns, one per module kind, usable as freeze patterns.
    pub freeze_patterns: Vec<String>,
}

// ---- config.json as it is ----------------------------------------------------------------------

/// An integer as config.json writes it: `768`, or `768.0`.
#[derive(Debug, Clone, Copy)]
struct Int(i64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct IntVisitor;
        impl Visitor<'_> for IntVisitor {
            type Value = Int;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Int, E> {
                Ok(Int(n))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Int, E> {
                Ok(Int(i64::try_from(n).unwrap_or(i64::MAX)))
            }
            fn visit_f64<E: de::Error>(self, f: f64) -> Result<Int, E> {
                if f.fract() == 0.0 {
                    Ok(Int(f as i64))
                } else {
                    Err(E::invalid_value(Unexpected::Float(f), &self))
                }
            }
        }
        d.deserialize_any(IntVisitor)
    }
}

fn int(v: Option<Int>) -> Option<i64> {
    v.map(|Int(n)| n)
}

/// A string where config.json may hold anything (non-strings are ignored).
#[derive(Deserialize)]
#[serde(untagged)]
enum MaybeString {
    Str(String),
    Other(IgnoredAny),
}

impl MaybeString {
    fn into_string(self) -> Option<String> {
        match self {
            MaybeString::Str(s) => Some(s),
            MaybeString::Other(_) => None,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged, expecting = "an integer or a list of integers")]
enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

/// A label name; a non-string is kept as its JSON text.
#[derive(Deserialize)]
#[serde(untagged)]
enum LabelName {
    Str(String),
    Other(Value),
}

#[derive(Deserialize)]
struct ModelType {
    model_type: Option<String>,
}

/// The keys every family shares, as config.json spells them.
#[derive(Deserialize)]
struct RawCommon {
    architectures: Option<Vec<MaybeString>>,
    dtype: Option<MaybeString>,
    torch_dtype: Option<MaybeString>,
    bos_token_id: Option<Int>,
    eos_token_id: Option<TokenIds>,
    pad_token_id: Option<Int>,
    id2label: Option<BTreeMap<String, LabelName>>,
    initializer_range: Option<f64>,
    tie_word_embeddings: Option<bool>,
}

impl RawCommon {
    fn into_common(self, model_type: String, tie_default: bool) -> Result<Common, HfConfigError> {
        let id2label = match self.id2label {
            None => None,
            Some(m) => {
                let mut pairs = Vec::with_capacity(m.len());
                for (k, v) in m {
                    let Ok(i) = k.parse::<usize>() else {
                        return err(format!("`id2label` keys must be label indices, got {k:?}"));
                    };
                    let name = match v {
                        LabelName::Str(s) => s,
                        LabelName::Other(v) => v.to_string(),
                    };
                    pairs.push((i, name));
                }
                pairs.sort();
                if pairs.iter().enumerate().any(|(n, (i, _))| n != *i) {
                    return err("`id2label` must number its labels 0, 1, 2, ...");
                }
                Some(pairs.into_iter().map(|(_, n)| n).collect())
            }
        };
        Ok(Common {
            model_type,
            architectures: self
                .architectures
                .unwrap_or_default()
                .into_iter()
                .filter_map(MaybeString::into_string)
                .collect(),
            dtype: self
                .dtype
                .or(self.torch_dtype)
                .and_then(MaybeString::into_string),
            bos_token_id: int(self.bos_token_id),
            eos_token_ids: match self.eos_token_id {
                None => Vec::new(),
                Some(TokenIds::One(n)) => vec![n],
                Some(TokenIds::Many(v)) => v,
            },
            pad_token_id: int(self.pad_token_id),
            id2label,
            initializer_range: self.initializer_range.unwrap_or(0.02),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(tie_default),
        })
    }
}

/// Deserialises `T` from config.json, naming the key in the error.
fn from_json<'a, T: Deserialize<'a>>(value: &'a Value) -> Result<T, HfConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        HfConfigError(if path == "." {
            inner.to_string()
        } else {
            format!("`{path}`: {inner}")
        })
    })
}

// ---- checks the families share -----------------------------------------------------------------

/// `key`, which config.json must have, as a positive integer.
fn positive(v: Option<Int>, key: &str) -> Result<i64, HfConfigError> {
    match int(v) {
        None => err(format!("`{key}` is missing")),
        Some(n) if n <= 0 => err(format!("`{key}` must be positive, got {n}")),
        Some(n) => Ok(n),
    }
}

/// A dropout probability, `default` when absent.
fn dropout(v: Option<f64>, default: f64, key: &str) -> Result<f64, HfConfigError> {
    let p = v.unwrap_or(default);
    if !(0.0..1.0).contains(&p) {
        return err(format!("`{key}` must be in [0, 1), got {p}"));
    }
    Ok(p)
}

fn check_heads(hidden: i64, heads: i64, what: &str) -> Result<(), HfConfigError> {
    if hidden % heads != 0 {
        return err(format!(
            "{what} ({hidden}) is not divisible by the number of attention heads ({heads})"
        ));
    }
    Ok(())
}

/// Activations the models implement.
pub const ACTIVATIONS: &[&str] = &[
    "gelu",
    "gelu_new",
    "gelu_pytorch_tanh",
    "gelu_fast",
    "relu",
    "silu",
    "swish",
    "tanh",
];

/// The activation named by `key` (`default` when absent), if the models implement it.
fn activation(v: Option<String>, default: &str, key: &str) -> Result<String, HfConfigError> {
    let act = v.unwrap_or_else(|| default.to_string());
    if !ACTIVATIONS.contains(&act.as_str()) {
        return err(format!(
            "`{key}` '{act}' is not supported (supported: {})",
            ACTIVATIONS.join(", ")
        ));
    }
    Ok(act)
}

// ---- the resolved config -----------------------------------------------------------------------

impl HfConfig {
    /// Parses the text of a config.json.
    pub fn parse(text: &str) -> Result<Self, HfConfigError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| HfConfigError(format!("not valid JSON: {e}")))?;
        Self::from_value(&value)
    }

    pub fn from_value(value: &Value) -> Result<Self, HfConfigError> {
        if !value.is_object() {
            return err("expected a JSON object");
        }
        let Some(model_type) = from_json::<ModelType>(value)?.model_type else {
            return err("`model_type` is missing");
        };
        let raw: RawCommon = from_json(value)?;
        let Some(family) = FAMILIES
            .iter()
            .find(|f| f.model_types.contains(&model_type.as_str()))
        else {
            return err(format!(
                "model type '{model_type}' is not supported; tuna trains {}",
                supported_model_types().join(", ")
            ));
        };
        let arch = (family.parse)(value, &model_type)?;
        let common = raw.into_common(model_type, arch.facts().ties_embeddings_by_default())?;
        Ok(HfConfig { common, arch })
    }

    pub fn model_type(&self) -> &str {
        &self.common.model_type
    }

    /// The family's name (see [`ArchFacts::family`]).
    pub fn family(&self) -> &'static str {
        self.arch.facts().family()
    }

    pub fn is_decoder(&self) -> bool {
        self.arch.facts().is_decoder()
    }

    /// Layers, widths, heads, context length and vocabulary size.
    pub fn dims(&self) -> Dims {
        self.arch.facts().dims()
    }

    /// Decoders: causal LM and the sequence-level tasks (classification, regression,
    /// multi-label: one `*ForSequenceClassification` head with its `problem_type`); encoders: the
    /// sequence-level tasks. Token classification on every family transformers has a
    /// `*ForTokenClassification` class for (all but Gemma 3 and OLMo 2); question answering on
    /// the encoders and GPT-2.
    pub fn tasks(&self) -> Vec<Task> {
        let token_cls = !matches!(self.model_type(), "gemma3_text" | "gemma3" | "olmo2");
        Task::ALL
            .into_iter()
            .filter(|t| match t {
                Task::CausalLm => self.is_decoder(),
                Task::TokenClassification => token_cls,
                // The span head on the encoders and GPT-2 (the Llama-style classes keep their
                // base under another prefix, not written yet).
                Task::QuestionAnswering => !self.is_decoder() || self.model_type() == "gpt2",
                _ => true,
            })
            .collect()
    }

    /// Short names of the linear modules inside the transformer layers (what PEFT's
    /// `target_modules` takes), in layer order. The output head is not among them.
    pub fn module_names(&self) -> Vec<String> {
        let f = self.arch.facts();
        let mut out: Vec<String> = Vec::new();
        for m in f.layer_linears().iter().chain(f.other_linears()) {
            let short = m.rsplit('.').next().unwrap_or(m);
            if !out.iter().any(|s| s == short) {
                out.push(short.to_string());
            }
        }
        out
    }

    /// Full Hugging Face names (as in the base model's state dict, without a task prefix) of
    /// every linear module in the transformer layers, e.g. `model.layers.0.self_attn.q_proj`.
    pub fn linear_modules(&self) -> Vec<String> {
        let f = self.arch.facts();
        let mut out = Vec::new();
        for i in 0..f.dims().num_layers {
            for m in f.layer_linears() {
                out.push(format!("{}.{i}.{m}", f.layer_prefix()));
            }
        }
        out.extend(f.other_linears().iter().map(|m| m.to_string()));
        out
    }

    /// Glob patterns over parameter names, one per kind of module, to show as freeze examples.
    pub fn freeze_patterns(&self) -> Vec<String> {
        let f = self.arch.facts();
        f.freeze_patterns().iter().map(|s| s.to_string()).collect()
    }

    /// Parameters of the base model with its LM head (tied heads counted once; no
    /// classification head), as `sum(p.numel() for p in model.parameters())` counts them.
    pub fn num_parameters(&self) -> i64 {
        self.arch
            .facts()
            .num_parameters(self.common.tie_word_embeddings)
    }

    pub fn describe(&self) -> ModelDescription {
        let mut lora = self.module_names();
        lora.push("all-linear".into());
        ModelDescription {
            model_type: self.common.model_type.clone(),
            family: self.family().to_string(),
            architectures: self.common.architectures.clone(),
            dims: self.dims(),
            num_parameters: self.num_parameters(),
            dtype: self.common.dtype.clone(),
            tasks: self.tasks(),
            lora_target_modules: lora,
            freeze_patterns: self.freeze_patterns(),
        }
    }
}

/// Free function form of [`HfConfig::module_names`].
pub fn module_names(cfg: &HfConfig) -> Vec<String> {
    cfg.module_names()
}
