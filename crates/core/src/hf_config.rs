//! Hugging Face `config.json`, parsed into a resolved per-architecture configuration.
//!
//! Pure parsing, no IO: the caller reads the file. Both key forms in circulation are accepted:
//! transformers ≥ 5 writes `rope_parameters` (with `rope_theta` and `rope_type` inside) and
//! `dtype`; earlier versions (most published checkpoints) write top-level `rope_theta`,
//! `rope_scaling` (with `rope_type` or the older `type`) and `torch_dtype`.
//!
//! Supported families: GPT-2 (`gpt2`), the Llama family (`llama`, `mistral`, `qwen2`) and BERT
//! (`bert`). [`HfConfig::module_names`] lists the linear module names a user may name as LoRA
//! target modules, and [`HfConfig::describe`] summarises a model for the API.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::spec::Task;

/// Why a config.json could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("config.json: {0}")]
pub struct HfConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, HfConfigError> {
    Err(HfConfigError(msg.into()))
}

/// The model types tuna can train.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["gpt2", "llama", "mistral", "qwen2", "bert"];

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

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gpt2Config {
    pub vocab_size: i64,
    pub n_positions: i64,
    pub n_embd: i64,
    pub n_layer: i64,
    pub n_head: i64,
    /// MLP width (`n_inner`, default 4 × n_embd).
    pub n_inner: i64,
    pub activation_function: String,
    pub layer_norm_epsilon: f64,
    pub attn_pdrop: f64,
    pub resid_pdrop: f64,
    pub embd_pdrop: f64,
    pub scale_attn_weights: bool,
    pub scale_attn_by_inverse_layer_idx: bool,
}

/// Rotary embedding scaling, as transformers' `ROPE_INIT_FUNCTIONS` know them.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    Default,
    Linear {
        factor: f64,
    },
    /// Dynamic NTK: the base grows once the sequence exceeds `original_max_position_embeddings`.
    Dynamic {
        factor: f64,
        original_max_position_embeddings: i64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: i64,
    },
    Yarn {
        factor: f64,
        original_max_position_embeddings: i64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
    /// Fraction of the head dimension that rotates (1.0 for the supported families).
    pub partial_rotary_factor: f64,
}

/// Llama, Mistral and Qwen2 share one decoder layout (RMSNorm, RoPE, GQA, SwiGLU).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LlamaConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    /// Bias on q/k/v (Qwen2 always; Llama when `attention_bias`). o_proj gets a bias only on Llama
    /// with `attention_bias`.
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub attention_dropout: f64,
    pub hidden_act: String,
    /// Sliding-window attention width (Mistral; Qwen2 when `use_sliding_window`). None = full.
    pub sliding_window: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BertConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub hidden_act: String,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub classifier_dropout: Option<f64>,
    pub max_position_embeddings: i64,
    pub type_vocab_size: i64,
    pub layer_norm_eps: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "family", rename_all = "snake_case")]
pub enum Arch {
    Gpt2(Gpt2Config),
    Llama(LlamaConfig),
    Bert(BertConfig),
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
    pub num_layers: i64,
    pub hidden_size: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub context_length: i64,
    pub vocab_size: i64,
    /// See [`HfConfig::num_parameters`].
    pub num_parameters: i64,
    pub dtype: Option<String>,
    pub tasks: Vec<Task>,
    /// Linear module names usable as LoRA target modules (plus `all-linear`).
    pub lora_target_modules: Vec<String>,
    /// Parameter name patterns, one per module kind, usable as freeze patterns.
    pub freeze_patterns: Vec<String>,
}

struct Obj<'a>(&'a Map<String, Value>);

impl Obj<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }
    fn int_opt(&self, key: &str) -> Result<Option<i64>, HfConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_i64() {
                Some(n) => Ok(Some(n)),
                None => match v.as_f64() {
                    Some(f) if f.fract() == 0.0 => Ok(Some(f as i64)),
                    _ => err(format!("`{key}` must be an integer, got {v}")),
                },
            },
        }
    }
    fn int(&self, key: &str) -> Result<i64, HfConfigError> {
        match self.int_opt(key)? {
            Some(n) => Ok(n),
            None => err(format!("`{key}` is missing")),
        }
    }
    fn pos_int(&self, key: &str) -> Result<i64, HfConfigError> {
        let n = self.int(key)?;
        if n <= 0 {
            return err(format!("`{key}` must be positive, got {n}"));
        }
        Ok(n)
    }
    fn int_or(&self, key: &str, default: i64) -> Result<i64, HfConfigError> {
        Ok(self.int_opt(key)?.unwrap_or(default))
    }
    fn float_opt(&self, key: &str) -> Result<Option<f64>, HfConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(f) => Ok(Some(f)),
                None => err(format!("`{key}` must be a number, got {v}")),
            },
        }
    }
    fn float_or(&self, key: &str, default: f64) -> Result<f64, HfConfigError> {
        Ok(self.float_opt(key)?.unwrap_or(default))
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool, HfConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => err(format!("`{key}` must be true or false, got {v}")),
        }
    }
    fn str_or(&self, key: &str, default: &str) -> Result<String, HfConfigError> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => err(format!("`{key}` must be a string, got {v}")),
        }
    }
    fn dropout(&self, key: &str, default: f64) -> Result<f64, HfConfigError> {
        let p = self.float_or(key, default)?;
        if !(0.0..1.0).contains(&p) {
            return err(format!("`{key}` must be in [0, 1), got {p}"));
        }
        Ok(p)
    }
}

impl HfConfig {
    /// Parses the text of a config.json.
    pub fn parse(text: &str) -> Result<Self, HfConfigError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| HfConfigError(format!("not valid JSON: {e}")))?;
        Self::from_value(&value)
    }

    pub fn from_value(value: &Value) -> Result<Self, HfConfigError> {
        let Some(map) = value.as_object() else {
            return err("expected a JSON object");
        };
        let o = Obj(map);
        let model_type = match o.get("model_type") {
            Some(Value::String(s)) => s.clone(),
            Some(v) => return err(format!("`model_type` must be a string, got {v}")),
            None => return err("`model_type` is missing"),
        };
        let architectures = match o.get("architectures") {
            None => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            Some(v) => return err(format!("`architectures` must be a list, got {v}")),
        };
        let dtype = match o.get("dtype").or_else(|| o.get("torch_dtype")) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let eos_token_ids = match o.get("eos_token_id") {
            None => Vec::new(),
            Some(Value::Array(a)) => {
                let mut ids = Vec::with_capacity(a.len());
                for v in a {
                    match v.as_i64() {
                        Some(n) => ids.push(n),
                        None => return err(format!("`eos_token_id` must be integers, got {v}")),
                    }
                }
                ids
            }
            Some(v) => match v.as_i64() {
                Some(n) => vec![n],
                None => {
                    return err(format!(
                        "`eos_token_id` must be an integer or a list, got {v}"
                    ))
                }
            },
        };
        let id2label = match o.get("id2label") {
            None => None,
            Some(Value::Object(m)) => {
                let mut pairs = Vec::with_capacity(m.len());
                for (k, v) in m {
                    let Ok(i) = k.parse::<usize>() else {
                        return err(format!("`id2label` keys must be label indices, got {k:?}"));
                    };
                    let name = v
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string());
                    pairs.push((i, name));
                }
                pairs.sort();
                if pairs.iter().enumerate().any(|(n, (i, _))| n != *i) {
                    return err("`id2label` must number its labels 0, 1, 2, ...");
                }
                Some(pairs.into_iter().map(|(_, n)| n).collect())
            }
            Some(v) => return err(format!("`id2label` must be an object, got {v}")),
        };
        let tie_default = model_type != "qwen2" && model_type != "llama" && model_type != "mistral";
        let common = Common {
            model_type: model_type.clone(),
            architectures,
            dtype,
            bos_token_id: o.int_opt("bos_token_id")?,
            eos_token_ids,
            pad_token_id: o.int_opt("pad_token_id")?,
            id2label,
            initializer_range: o.float_or("initializer_range", 0.02)?,
            tie_word_embeddings: o.bool_or("tie_word_embeddings", tie_default)?,
        };
        let arch = match model_type.as_str() {
            "gpt2" => Arch::Gpt2(parse_gpt2(&o)?),
            "llama" | "mistral" | "qwen2" => Arch::Llama(parse_llama(&o, &model_type)?),
            "bert" => Arch::Bert(parse_bert(&o)?),
            other => {
                return err(format!(
                    "model type '{other}' is not supported; tuna trains {}",
                    SUPPORTED_MODEL_TYPES.join(", ")
                ))
            }
        };
        Ok(HfConfig { common, arch })
    }

    pub fn model_type(&self) -> &str {
        &self.common.model_type
    }

    /// "gpt2", "llama" (Llama, Mistral, Qwen2) or "bert".
    pub fn family(&self) -> &'static str {
        match self.arch {
            Arch::Gpt2(_) => "gpt2",
            Arch::Llama(_) => "llama",
            Arch::Bert(_) => "bert",
        }
    }

    pub fn is_decoder(&self) -> bool {
        !matches!(self.arch, Arch::Bert(_))
    }

    pub fn num_layers(&self) -> i64 {
        match &self.arch {
            Arch::Gpt2(c) => c.n_layer,
            Arch::Llama(c) => c.num_hidden_layers,
            Arch::Bert(c) => c.num_hidden_layers,
        }
    }

    pub fn hidden_size(&self) -> i64 {
        match &self.arch {
            Arch::Gpt2(c) => c.n_embd,
            Arch::Llama(c) => c.hidden_size,
            Arch::Bert(c) => c.hidden_size,
        }
    }

    pub fn num_heads(&self) -> i64 {
        match &self.arch {
            Arch::Gpt2(c) => c.n_head,
            Arch::Llama(c) => c.num_attention_heads,
            Arch::Bert(c) => c.num_attention_heads,
        }
    }

    pub fn num_kv_heads(&self) -> i64 {
        match &self.arch {
            Arch::Llama(c) => c.num_key_value_heads,
            _ => self.num_heads(),
        }
    }

    /// Longest sequence the position embeddings (or RoPE training length) cover.
    pub fn context_length(&self) -> i64 {
        match &self.arch {
            Arch::Gpt2(c) => c.n_positions,
            Arch::Llama(c) => c.max_position_embeddings,
            Arch::Bert(c) => c.max_position_embeddings,
        }
    }

    pub fn vocab_size(&self) -> i64 {
        match &self.arch {
            Arch::Gpt2(c) => c.vocab_size,
            Arch::Llama(c) => c.vocab_size,
            Arch::Bert(c) => c.vocab_size,
        }
    }

    /// Decoders: causal LM and sequence classification; BERT: sequence classification only.
    pub fn tasks(&self) -> Vec<Task> {
        if self.is_decoder() {
            vec![Task::CausalLm, Task::SequenceClassification]
        } else {
            vec![Task::SequenceClassification]
        }
    }

    /// Short names of the linear modules inside the transformer layers (what PEFT's
    /// `target_modules` takes), in layer order. The output head is not among them.
    pub fn module_names(&self) -> Vec<String> {
        let names: &[&str] = match &self.arch {
            Arch::Gpt2(_) => &["c_attn", "c_proj", "c_fc"],
            Arch::Llama(_) => &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            Arch::Bert(_) => &["query", "key", "value", "dense"],
        };
        names.iter().map(|s| s.to_string()).collect()
    }

    /// Full Hugging Face names (as in the base model's state dict, without a task prefix) of
    /// every linear module in the transformer layers, e.g. `model.layers.0.self_attn.q_proj`.
    pub fn linear_modules(&self) -> Vec<String> {
        let n = self.num_layers();
        let mut out = Vec::new();
        for i in 0..n {
            match &self.arch {
                Arch::Gpt2(_) => {
                    for m in ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"] {
                        out.push(format!("transformer.h.{i}.{m}"));
                    }
                }
                Arch::Llama(_) => {
                    for m in [
                        "self_attn.q_proj",
                        "self_attn.k_proj",
                        "self_attn.v_proj",
                        "self_attn.o_proj",
                        "mlp.gate_proj",
                        "mlp.up_proj",
                        "mlp.down_proj",
                    ] {
                        out.push(format!("model.layers.{i}.{m}"));
                    }
                }
                Arch::Bert(_) => {
                    for m in [
                        "attention.self.query",
                        "attention.self.key",
                        "attention.self.value",
                        "attention.output.dense",
                        "intermediate.dense",
                        "output.dense",
                    ] {
                        out.push(format!("encoder.layer.{i}.{m}"));
                    }
                }
            }
        }
        if let Arch::Bert(_) = self.arch {
            out.push("pooler.dense".into());
        }
        out
    }

    /// Glob patterns over parameter names, one per kind of module, to show as freeze examples.
    pub fn freeze_patterns(&self) -> Vec<String> {
        let v: &[&str] = match &self.arch {
            Arch::Gpt2(_) => &[
                "transformer.wte.*",
                "transformer.wpe.*",
                "transformer.h.*.attn.*",
                "transformer.h.*.mlp.*",
                "transformer.h.*.ln_*",
            ],
            Arch::Llama(_) => &[
                "model.embed_tokens.*",
                "model.layers.*.self_attn.*",
                "model.layers.*.mlp.*",
                "model.layers.*_layernorm.*",
                "model.norm.*",
            ],
            Arch::Bert(_) => &[
                "embeddings.*",
                "encoder.layer.*.attention.*",
                "encoder.layer.*.intermediate.*",
                "encoder.layer.*.output.*",
                "pooler.*",
            ],
        };
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Parameters of the base model with its LM head (tied heads counted once; no
    /// classification head), as `sum(p.numel() for p in model.parameters())` counts them.
    pub fn num_parameters(&self) -> i64 {
        match &self.arch {
            Arch::Gpt2(c) => {
                let (d, ni) = (c.n_embd, c.n_inner);
                let layer =
                    4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * ni + ni) + (ni * d + d);
                let head = if self.common.tie_word_embeddings {
                    0
                } else {
                    c.vocab_size * d
                };
                c.vocab_size * d + c.n_positions * d + c.n_layer * layer + 2 * d + head
            }
            Arch::Llama(c) => {
                let (d, hd, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
                let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
                let qkv_bias = if c.qkv_bias { q + 2 * kv } else { 0 };
                let o_bias = if c.o_bias { d } else { 0 };
                let mlp_bias = if c.mlp_bias { 2 * i + d } else { 0 };
                let layer =
                    2 * d + d * (q + 2 * kv) + qkv_bias + q * d + o_bias + 3 * d * i + mlp_bias;
                let head = if self.common.tie_word_embeddings {
                    0
                } else {
                    c.vocab_size * d
                };
                c.vocab_size * d + c.num_hidden_layers * layer + d + head
            }
            Arch::Bert(c) => {
                let (d, i) = (c.hidden_size, c.intermediate_size);
                let layer = 4 * (d * d + d) + 4 * d + (d * i + i) + (i * d + d);
                (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * d
                    + 2 * d
                    + c.num_hidden_layers * layer
                    + (d * d + d)
            }
        }
    }

    pub fn describe(&self) -> ModelDescription {
        let mut lora = self.module_names();
        lora.push("all-linear".into());
        ModelDescription {
            model_type: self.common.model_type.clone(),
            family: self.family().to_string(),
            architectures: self.common.architectures.clone(),
            num_layers: self.num_layers(),
            hidden_size: self.hidden_size(),
            num_heads: self.num_heads(),
            num_kv_heads: self.num_kv_heads(),
            context_length: self.context_length(),
            vocab_size: self.vocab_size(),
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

fn check_heads(hidden: i64, heads: i64, what: &str) -> Result<(), HfConfigError> {
    if hidden % heads != 0 {
        return err(format!(
            "{what} ({hidden}) is not divisible by the number of attention heads ({heads})"
        ));
    }
    Ok(())
}

fn parse_gpt2(o: &Obj<'_>) -> Result<Gpt2Config, HfConfigError> {
    let n_embd = o.pos_int("n_embd")?;
    let n_head = o.pos_int("n_head")?;
    check_heads(n_embd, n_head, "n_embd")?;
    if o.bool_or("add_cross_attention", false)? {
        return err("GPT-2 with cross-attention is not supported");
    }
    if o.bool_or("reorder_and_upcast_attn", false)? {
        // Numerically the same attention up to rounding; accepted.
    }
    let activation_function = o.str_or("activation_function", "gelu_new")?;
    check_activation(&activation_function, "activation_function")?;
    Ok(Gpt2Config {
        vocab_size: o.pos_int("vocab_size")?,
        n_positions: o.pos_int("n_positions")?,
        n_embd,
        n_layer: o.pos_int("n_layer")?,
        n_head,
        n_inner: o.int_opt("n_inner")?.unwrap_or(4 * n_embd),
        activation_function,
        layer_norm_epsilon: o.float_or("layer_norm_epsilon", 1e-5)?,
        attn_pdrop: o.dropout("attn_pdrop", 0.1)?,
        resid_pdrop: o.dropout("resid_pdrop", 0.1)?,
        embd_pdrop: o.dropout("embd_pdrop", 0.1)?,
        scale_attn_weights: o.bool_or("scale_attn_weights", true)?,
        scale_attn_by_inverse_layer_idx: o.bool_or("scale_attn_by_inverse_layer_idx", false)?,
    })
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
];

fn check_activation(act: &str, key: &str) -> Result<(), HfConfigError> {
    if !ACTIVATIONS.contains(&act) {
        return err(format!(
            "`{key}` '{act}' is not supported (supported: {})",
            ACTIVATIONS.join(", ")
        ));
    }
    Ok(())
}

fn parse_rope(o: &Obj<'_>, max_pos: i64) -> Result<RopeConfig, HfConfigError> {
    // transformers ≥ 5: everything in `rope_parameters`; earlier: `rope_theta` + `rope_scaling`.
    let (params, key) = match o.get("rope_parameters") {
        Some(Value::Object(m)) => (Some(m), "rope_parameters"),
        Some(v) => return err(format!("`rope_parameters` must be an object, got {v}")),
        None => match o.get("rope_scaling") {
            Some(Value::Object(m)) => (Some(m), "rope_scaling"),
            Some(v) => return err(format!("`rope_scaling` must be an object or null, got {v}")),
            None => (None, "rope_scaling"),
        },
    };
    let empty = Map::new();
    let p = Obj(params.unwrap_or(&empty));
    let theta = match p.float_opt("rope_theta")? {
        Some(t) => t,
        None => o.float_or("rope_theta", 10000.0)?,
    };
    if theta <= 0.0 {
        return err("`rope_theta` must be positive");
    }
    let kind = match p.get("rope_type").or_else(|| p.get("type")) {
        None => "default".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => return err(format!("`{key}.rope_type` must be a string, got {v}")),
    };
    let factor = || -> Result<f64, HfConfigError> {
        match p.float_opt("factor")? {
            Some(f) if f >= 1.0 => Ok(f),
            Some(f) => err(format!("`{key}.factor` must be at least 1, got {f}")),
            None => err(format!("`{key}.factor` is missing for rope type '{kind}'")),
        }
    };
    let orig = |default: i64| -> Result<i64, HfConfigError> {
        Ok(p.int_opt("original_max_position_embeddings")?
            .or(o.int_opt("original_max_position_embeddings")?)
            .unwrap_or(default))
    };
    let scaling = match kind.as_str() {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor()? },
        // transformers compares against max_position_embeddings for dynamic NTK.
        "dynamic" => RopeScaling::Dynamic { factor: factor()?, original_max_position_embeddings: max_pos },
        "llama3" => {
            let low = p.float_or("low_freq_factor", 1.0)?;
            let high = p.float_or("high_freq_factor", 4.0)?;
            if high <= low {
                return err(format!("`{key}.high_freq_factor` must exceed `low_freq_factor`"));
            }
            RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: match p.int_opt("original_max_position_embeddings")? {
                    Some(n) => n,
                    None => return err(format!("`{key}.original_max_position_embeddings` is missing for llama3")),
                },
            }
        }
        "yarn" => {
            let f = factor()?;
            RopeScaling::Yarn {
                factor: f,
                original_max_position_embeddings: orig(max_pos)?,
                beta_fast: p.float_or("beta_fast", 32.0)?,
                beta_slow: p.float_or("beta_slow", 1.0)?,
                attention_factor: p.float_opt("attention_factor")?,
                mscale: p.float_opt("mscale")?,
                mscale_all_dim: p.float_opt("mscale_all_dim")?,
                truncate: p.bool_or("truncate", true)?,
            }
        }
        other => {
            return err(format!(
                "rope type '{other}' is not supported (supported: default, linear, dynamic, llama3, yarn)"
            ))
        }
    };
    let partial = p
        .float_opt("partial_rotary_factor")?
        .or(o.float_opt("partial_rotary_factor")?)
        .unwrap_or(1.0);
    if partial != 1.0 {
        return err("partial rotary embeddings (`partial_rotary_factor` < 1) are not supported");
    }
    Ok(RopeConfig {
        theta,
        scaling,
        partial_rotary_factor: partial,
    })
}

fn parse_llama(o: &Obj<'_>, model_type: &str) -> Result<LlamaConfig, HfConfigError> {
    let hidden_size = o.pos_int("hidden_size")?;
    let heads = o.pos_int("num_attention_heads")?;
    let kv_heads = o.int_opt("num_key_value_heads")?.unwrap_or(heads);
    if kv_heads <= 0 || heads % kv_heads != 0 {
        return err(format!(
            "num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
        ));
    }
    let head_dim = match o.int_opt("head_dim")? {
        Some(d) if d > 0 => d,
        Some(d) => return err(format!("`head_dim` must be positive, got {d}")),
        None => {
            check_heads(hidden_size, heads, "hidden_size")?;
            hidden_size / heads
        }
    };
    if head_dim % 2 != 0 {
        return err(format!(
            "`head_dim` must be even for rotary embeddings, got {head_dim}"
        ));
    }
    let max_pos = o.pos_int("max_position_embeddings")?;
    let hidden_act = o.str_or("hidden_act", "silu")?;
    check_activation(&hidden_act, "hidden_act")?;
    if o.int_or("pretraining_tp", 1)? != 1 {
        // Only changes how the original code sliced matmuls; the math is the same.
    }
    let attention_bias = o.bool_or("attention_bias", false)?;
    let (qkv_bias, o_bias) = match model_type {
        "qwen2" => (true, false),
        "llama" => (attention_bias, attention_bias),
        _ => (false, false),
    };
    let sliding_window = match model_type {
        "mistral" => o.int_opt("sliding_window")?,
        "qwen2" if o.bool_or("use_sliding_window", false)? => {
            let max_window_layers = o.int_or("max_window_layers", 0)?;
            if max_window_layers < o.pos_int("num_hidden_layers")? {
                return err("Qwen2 with sliding-window attention on only some layers (`max_window_layers`) is not supported");
            }
            o.int_opt("sliding_window")?
        }
        _ => None,
    };
    if let Some(w) = sliding_window {
        if w <= 0 {
            return err(format!("`sliding_window` must be positive, got {w}"));
        }
    }
    Ok(LlamaConfig {
        vocab_size: o.pos_int("vocab_size")?,
        hidden_size,
        intermediate_size: o.pos_int("intermediate_size")?,
        num_hidden_layers: o.pos_int("num_hidden_layers")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        max_position_embeddings: max_pos,
        rms_norm_eps: o.float_or("rms_norm_eps", 1e-6)?,
        rope: parse_rope(o, max_pos)?,
        qkv_bias,
        o_bias,
        mlp_bias: model_type == "llama" && o.bool_or("mlp_bias", false)?,
        attention_dropout: o.dropout("attention_dropout", 0.0)?,
        hidden_act,
        sliding_window,
    })
}

fn parse_bert(o: &Obj<'_>) -> Result<BertConfig, HfConfigError> {
    let hidden_size = o.pos_int("hidden_size")?;
    let heads = o.pos_int("num_attention_heads")?;
    check_heads(hidden_size, heads, "hidden_size")?;
    let pet = o.str_or("position_embedding_type", "absolute")?;
    if pet != "absolute" {
        return err(format!(
            "BERT `position_embedding_type` '{pet}' is not supported (only 'absolute')"
        ));
    }
    if o.bool_or("is_decoder", false)? || o.bool_or("add_cross_attention", false)? {
        return err("BERT as a decoder is not supported");
    }
    let hidden_act = o.str_or("hidden_act", "gelu")?;
    check_activation(&hidden_act, "hidden_act")?;
    let classifier_dropout = match o.float_opt("classifier_dropout")? {
        Some(p) if !(0.0..1.0).contains(&p) => {
            return err(format!("`classifier_dropout` must be in [0, 1), got {p}"))
        }
        other => other,
    };
    Ok(BertConfig {
        vocab_size: o.pos_int("vocab_size")?,
        hidden_size,
        num_hidden_layers: o.pos_int("num_hidden_layers")?,
        num_attention_heads: heads,
        intermediate_size: o.pos_int("intermediate_size")?,
        hidden_act,
        hidden_dropout_prob: o.dropout("hidden_dropout_prob", 0.1)?,
        attention_probs_dropout_prob: o.dropout("attention_probs_dropout_prob", 0.1)?,
        classifier_dropout,
        max_position_embeddings: o.pos_int("max_position_embeddings")?,
        type_vocab_size: o.int_or("type_vocab_size", 2)?,
        layer_norm_eps: o.float_or("layer_norm_eps", 1e-12)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama_new() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16",
            "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009], "tie_word_embeddings": true,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        })
    }

    #[test]
    fn llama_new_and_old_keys_resolve_the_same() {
        let new = HfConfig::from_value(&llama_new()).unwrap();
        let old = HfConfig::parse(
            r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
            "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009], "tie_word_embeddings": true,
            "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#,
        )
        .unwrap();
        assert_eq!(new, old);
        let Arch::Llama(c) = &new.arch else { panic!() };
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.rope.theta, 500000.0);
        assert!(
            matches!(c.rope.scaling, RopeScaling::Llama3 { factor, original_max_position_embeddings: 8192, .. } if factor == 32.0)
        );
        assert_eq!(new.common.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(new.common.eos_token_ids, vec![128001, 128008, 128009]);
        assert!(new.common.tie_word_embeddings);
        assert_eq!(new.num_parameters(), 1_235_814_400, "Llama-3.2-1B");
        assert_eq!(new.num_kv_heads(), 8);
        assert_eq!(new.context_length(), 131072);
    }

    #[test]
    fn old_type_key_and_null_scaling() {
        let mut v = llama_new();
        let m = v.as_object_mut().unwrap();
        m.remove("rope_parameters");
        m.insert(
            "rope_scaling".into(),
            json!({"type": "linear", "factor": 2.0}),
        );
        let c = HfConfig::from_value(&v).unwrap();
        let Arch::Llama(l) = c.arch else { panic!() };
        assert_eq!(l.rope.scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(l.rope.theta, 10000.0);
        let m = v.as_object_mut().unwrap();
        m.insert("rope_scaling".into(), Value::Null);
        m.insert("rope_theta".into(), json!(1e6));
        let Arch::Llama(l) = HfConfig::from_value(&v).unwrap().arch else {
            panic!()
        };
        assert_eq!(l.rope.scaling, RopeScaling::Default);
        assert_eq!(l.rope.theta, 1e6);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_untied_default() {
        let c = HfConfig::from_value(&json!({
            "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "use_sliding_window": false,
            "sliding_window": 32768, "max_window_layers": 21, "tie_word_embeddings": true
        }))
        .unwrap();
        let Arch::Llama(l) = &c.arch else { panic!() };
        assert!(l.qkv_bias && !l.o_bias);
        assert_eq!(l.sliding_window, None);
        assert_eq!(l.head_dim, 64);
        assert_eq!(
            c.tasks(),
            vec![Task::CausalLm, Task::SequenceClassification]
        );
    }

    #[test]
    fn mistral_sliding_window() {
        let c = HfConfig::from_value(&json!({
            "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 32768, "sliding_window": 4096
        }))
        .unwrap();
        let Arch::Llama(l) = &c.arch else { panic!() };
        assert_eq!(l.sliding_window, Some(4096));
        assert!(!c.common.tie_word_embeddings);
    }

    #[test]
    fn gpt2_and_module_names() {
        let c = HfConfig::parse(
            r#"{"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768,
                "n_layer": 12, "n_head": 12, "eos_token_id": 50256}"#,
        )
        .unwrap();
        assert_eq!(c.family(), "gpt2");
        assert_eq!(module_names(&c), vec!["c_attn", "c_proj", "c_fc"]);
        assert_eq!(c.linear_modules().len(), 48);
        assert_eq!(c.linear_modules()[0], "transformer.h.0.attn.c_attn");
        let Arch::Gpt2(g) = &c.arch else { panic!() };
        assert_eq!(g.n_inner, 3072);
        assert_eq!(c.num_parameters(), 124_439_808, "GPT-2 small");
        assert_eq!(g.activation_function, "gelu_new");
        assert!(c.common.tie_word_embeddings);
        let d = c.describe();
        assert_eq!(d.context_length, 1024);
        assert!(d.lora_target_modules.contains(&"all-linear".to_string()));
    }

    #[test]
    fn bert_is_classification_only_with_labels() {
        let c = HfConfig::parse(
            r#"{"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 384,
                "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
                "max_position_embeddings": 512, "id2label": {"1": "positive", "0": "negative"}}"#,
        )
        .unwrap();
        assert_eq!(c.tasks(), vec![Task::SequenceClassification]);
        assert_eq!(
            c.common.id2label,
            Some(vec!["negative".to_string(), "positive".to_string()])
        );
        assert_eq!(c.module_names(), vec!["query", "key", "value", "dense"]);
        assert!(c.linear_modules().contains(&"pooler.dense".to_string()));
        assert_eq!(c.num_parameters(), 22_713_216, "all-MiniLM-L6-v2");
    }

    #[test]
    fn clear_errors() {
        let e = HfConfig::parse(r#"{"model_type": "t5"}"#).unwrap_err();
        assert!(e.to_string().contains("'t5' is not supported"), "{e}");
        assert!(e.to_string().contains("llama"), "{e}");
        let e = HfConfig::parse("{").unwrap_err();
        assert!(e.to_string().contains("not valid JSON"), "{e}");
        let e = HfConfig::parse(r#"{"vocab_size": 3}"#).unwrap_err();
        assert!(e.to_string().contains("`model_type` is missing"), "{e}");
        let mut v = llama_new();
        v["num_key_value_heads"] = json!(5);
        let e = HfConfig::from_value(&v).unwrap_err();
        assert!(
            e.to_string().contains("multiple of num_key_value_heads"),
            "{e}"
        );
        let mut v = llama_new();
        v["rope_parameters"]["rope_type"] = json!("longrope");
        let e = HfConfig::from_value(&v).unwrap_err();
        assert!(e.to_string().contains("'longrope' is not supported"), "{e}");
        let mut v = llama_new();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = HfConfig::from_value(&v).unwrap_err();
        assert!(e.to_string().contains("`hidden_size` is missing"), "{e}");
    }
}
