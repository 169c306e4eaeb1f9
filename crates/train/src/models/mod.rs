//! The architectures (one per file) and what they share: [`load_model`] (dispatch on
//! config.json), the parameter registry and builder that load weights by Hugging Face name, and
//! the generic parts of [`Model`] (parameter listings, resume, `save_pretrained` in transformers'
//! and PEFT's formats).

pub mod bert;
pub mod gpt2;
pub mod llama;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use tch::{Device, Kind, Tensor};
use tuna_core::hf_config::{Arch, HfConfig};

use crate::freeze::{FreezePlan, Role};
use crate::layers::{HostRng, LayerNorm, Linear, RmsNorm};
use crate::loader::{dtype_name, kind_from_name, save_safetensors, Checkpoint, WeightLoader};
use crate::lora::{self, LoraAdapter};
use crate::model::{Batch, LoadOptions, LoraOptions, Model, ModelInfo, TaskHead};
use crate::{Error, Result};

/// One parameter, by its Hugging Face name in the task model (`model.layers.0.mlp.up_proj.weight`,
/// `score.weight`, ...).
pub struct ParamEntry {
    pub name: String,
    pub tensor: Tensor,
    pub trainable: bool,
    /// Saved transposed (GPT-2 Conv1D weights).
    pub conv1d: bool,
    /// The linear module the weight belongs to (for merging LoRA).
    pub module: Option<String>,
    /// Part of the classification head (PEFT's `modules_to_save`).
    pub head: bool,
}

/// Handles to one LoRA adapter, by module name.
pub struct LoraRef {
    pub module: String,
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
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
}

/// The forward pass of one architecture.
pub trait Forward: Send {
    fn forward(&self, core: &Core, batch: &Batch<'_>, train: bool) -> Result<Tensor>;
}

/// A loaded model: shared state plus the architecture's modules.
pub struct Net<A> {
    pub core: Core,
    pub arch: A,
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
                "model type '{}' is an encoder: it supports sequence_classification only",
                hf.model_type()
            )))
        }
        TaskHead::SequenceClassification { id2label } if id2label.is_empty() => {
            return Err(Error::Config(
                "sequence classification needs at least one label".into(),
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
    match hf.arch.clone() {
        Arch::Gpt2(c) => gpt2::build(dir, hf, c, &ckpt, opts),
        Arch::Llama(c) => llama::build(dir, hf, c, &ckpt, opts),
        Arch::Bert(c) => bert::build(dir, hf, c, &ckpt, opts),
    }
}

/// Reads and resolves `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<HfConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    HfConfig::parse(&text).map_err(|e| Error::Config(format!("{}: {}", path.display(), e.0)))
}

/// Reads the pad token id from config.json, else from the tokenizer files in `dir`.
pub fn resolve_pad_token_id(dir: &Path, hf: &HfConfig) -> Option<i64> {
    if let Some(p) = hf.common.pad_token_id {
        return Some(p);
    }
    let tc: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?)
            .ok()?;
    let pad = match tc.get("pad_token")? {
        Value::String(s) => s.clone(),
        Value::Object(o) => o.get("content")?.as_str()?.to_string(),
        _ => return None,
    };
    let tok: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).ok()?).ok()?;
    if let Some(added) = tok.get("added_tokens").and_then(|a| a.as_array()) {
        for t in added {
            if t.get("content").and_then(|c| c.as_str()) == Some(pad.as_str()) {
                return t.get("id").and_then(|i| i.as_i64());
            }
        }
    }
    tok.get("model")?.get("vocab")?.get(&pad)?.as_i64()
}

/// Builds the parameter registry while loading weights.
pub struct Builder<'a> {
    pub ld: WeightLoader<'a>,
    pub plan: FreezePlan,
    pub lora: Option<LoraOptions>,
    pub base_kind: Kind,
    pub device: Device,
    pub seed: i64,
    pub prefix: String,
    pub params: Vec<ParamEntry>,
    pub loras: Vec<LoraRef>,
    /// Every linear module of the transformer (LoRA candidates), full names.
    pub linear_modules: Vec<String>,
    pub init_std: f64,
}

impl<'a> Builder<'a> {
    pub fn new(
        ckpt: &'a Checkpoint,
        prefix: &str,
        num_layers: usize,
        hf: &HfConfig,
        opts: &LoadOptions,
    ) -> Result<Self> {
        Ok(Builder {
            ld: WeightLoader::new(ckpt, prefix, opts.device),
            plan: FreezePlan::new(&opts.freeze, opts.lora.is_some(), prefix, num_layers)?,
            lora: opts.lora.clone(),
            base_kind: opts.base_kind,
            device: opts.device,
            seed: opts.init_seed,
            prefix: prefix.to_string(),
            params: Vec::new(),
            loras: Vec::new(),
            linear_modules: Vec::new(),
            init_std: hf.common.initializer_range,
        })
    }

    pub fn full(&self, rel: &str) -> String {
        format!("{}.{rel}", self.prefix)
    }

    fn kind_for(&self, trainable: bool) -> Kind {
        if trainable {
            Kind::Float
        } else {
            self.base_kind
        }
    }

    /// A base-model parameter by its name inside the base model.
    pub fn param(&mut self, rel: &str, shape: &[i64], role: Role) -> Result<Tensor> {
        let name = self.full(rel);
        let trainable = self.plan.trainable(&name, role);
        let t = self
            .ld
            .base(rel, shape, self.kind_for(trainable))?
            .set_requires_grad(trainable);
        self.params.push(ParamEntry {
            name,
            tensor: t.shallow_clone(),
            trainable,
            conv1d: false,
            module: None,
            head: false,
        });
        Ok(t)
    }

    /// A linear module of the base model (`rel` without `.weight`), LoRA attached when targeted.
    pub fn linear(
        &mut self,
        rel: &str,
        in_f: i64,
        out_f: i64,
        bias: bool,
        role: Role,
        conv1d: bool,
    ) -> Result<Linear> {
        let module = self.full(rel);
        let wname = format!("{module}.weight");
        let trainable = self.plan.trainable(&wname, role);
        let kind = self.kind_for(trainable);
        let weight = if conv1d {
            self.ld
                .base(&format!("{rel}.weight"), &[in_f, out_f], kind)?
                .f_tr()?
                .f_contiguous()?
        } else {
            self.ld
                .base(&format!("{rel}.weight"), &[out_f, in_f], kind)?
        }
        .set_requires_grad(trainable);
        self.params.push(ParamEntry {
            name: wname,
            tensor: weight.shallow_clone(),
            trainable,
            conv1d,
            module: Some(module.clone()),
            head: false,
        });
        let bias = if bias {
            let bname = format!("{module}.bias");
            let bt = self.plan.trainable(&bname, role);
            let b = self
                .ld
                .base(&format!("{rel}.bias"), &[out_f], self.kind_for(bt))?
                .set_requires_grad(bt);
            self.params.push(ParamEntry {
                name: bname,
                tensor: b.shallow_clone(),
                trainable: bt,
                conv1d: false,
                module: None,
                head: false,
            });
            Some(b)
        } else {
            None
        };
        self.linear_modules.push(module.clone());
        let lora = self.lora_for(&module, in_f, out_f)?;
        Ok(Linear {
            name: module,
            weight,
            bias,
            lora,
            conv1d,
        })
    }

    /// Like [`Builder::linear`], but a module absent from the checkpoint is initialised
    /// N(0, initializer_range) with zero bias (and noted) instead of reported missing.
    pub fn linear_or_init(
        &mut self,
        rel: &str,
        in_f: i64,
        out_f: i64,
        role: Role,
    ) -> Result<Linear> {
        if self.ld.has_base(&format!("{rel}.weight")) {
            return self.linear(rel, in_f, out_f, true, role, false);
        }
        let module = self.full(rel);
        let mut rng = HostRng::new(self.seed, &module);
        let wt = self.plan.trainable(&format!("{module}.weight"), role);
        let bt = self.plan.trainable(&format!("{module}.bias"), role);
        let w = Tensor::f_from_slice(&rng.normal((out_f * in_f) as usize, self.init_std))?
            .f_view([out_f, in_f])?
            .f_to_device(self.device)?
            .f_to_kind(self.kind_for(wt))?
            .set_requires_grad(wt);
        let b = Tensor::f_zeros([out_f], (self.kind_for(bt), self.device))?.set_requires_grad(bt);
        self.ld.notes.push(format!(
            "{module} is not in the checkpoint: initialised afresh"
        ));
        self.params.push(ParamEntry {
            name: format!("{module}.weight"),
            tensor: w.shallow_clone(),
            trainable: wt,
            conv1d: false,
            module: Some(module.clone()),
            head: false,
        });
        self.params.push(ParamEntry {
            name: format!("{module}.bias"),
            tensor: b.shallow_clone(),
            trainable: bt,
            conv1d: false,
            module: None,
            head: false,
        });
        self.linear_modules.push(module.clone());
        let lora = self.lora_for(&module, in_f, out_f)?;
        Ok(Linear {
            name: module,
            weight: w,
            bias: Some(b),
            lora,
            conv1d: false,
        })
    }

    fn lora_for(&mut self, module: &str, in_f: i64, out_f: i64) -> Result<Option<LoraAdapter>> {
        match &self.lora {
            Some(o)
                if lora::is_all_linear(o)
                    || o.target_modules
                        .iter()
                        .any(|t| lora::matches_target(module, t)) =>
            {
                let ad = LoraAdapter::new(module, in_f, out_f, o, self.seed, self.device)?;
                self.loras.push(LoraRef {
                    module: module.to_string(),
                    a: ad.a.shallow_clone(),
                    b: ad.b.shallow_clone(),
                    scaling: ad.scaling,
                });
                Ok(Some(ad))
            }
            _ => Ok(None),
        }
    }

    pub fn layer_norm(&mut self, rel: &str, d: i64, eps: f64, role: Role) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.param(&format!("{rel}.weight"), &[d], role)?,
            bias: self.param(&format!("{rel}.bias"), &[d], role)?,
            eps,
        })
    }

    pub fn rms_norm(&mut self, rel: &str, d: i64, eps: f64, role: Role) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: self.param(&format!("{rel}.weight"), &[d], role)?,
            eps,
        })
    }

    /// The LM head: the embedding matrix when tied, else `lm_head.weight`.
    pub fn lm_head(
        &mut self,
        embed: &Tensor,
        tied: bool,
        vocab: i64,
        hidden: i64,
    ) -> Result<Tensor> {
        if tied {
            return Ok(embed.shallow_clone());
        }
        let trainable = self.plan.trainable("lm_head.weight", Role::LmHead);
        let t = self
            .ld
            .require("lm_head.weight", &[vocab, hidden], self.kind_for(trainable))?
            .set_requires_grad(trainable);
        self.params.push(ParamEntry {
            name: "lm_head.weight".into(),
            tensor: t.shallow_clone(),
            trainable,
            conv1d: false,
            module: Some("lm_head".into()),
            head: false,
        });
        Ok(t)
    }

    /// A classification head (`score` or `classifier`), from the checkpoint when it has one of the
    /// right shape, else initialised N(0, initializer_range) (bias zeros), seeded.
    pub fn classifier(&mut self, name: &str, in_f: i64, n: i64, bias: bool) -> Result<Linear> {
        let wname = format!("{name}.weight");
        let trainable = self.plan.trainable(&wname, Role::ClassifierHead);
        let kind = self.kind_for(trainable);
        let from_ckpt = self.ld.head(&wname, &[n, in_f], kind)?;
        let b_ckpt = if bias && from_ckpt.is_some() {
            self.ld.head(&format!("{name}.bias"), &[n], kind)?
        } else {
            None
        };
        let (w, b) = match (from_ckpt, b_ckpt, bias) {
            (Some(w), Some(b), true) => (w, Some(b)),
            (Some(w), _, false) => (w, None),
            _ => {
                let mut rng = HostRng::new(self.seed, &wname);
                let w = Tensor::f_from_slice(&rng.normal((n * in_f) as usize, self.init_std))?
                    .f_view([n, in_f])?
                    .f_to_device(self.device)?
                    .f_to_kind(kind)?;
                let b = if bias {
                    Some(Tensor::f_zeros([n], (kind, self.device))?)
                } else {
                    None
                };
                self.ld.notes.push(format!(
                    "{name} initialised afresh ({n} labels, std {})",
                    self.init_std
                ));
                (w, b)
            }
        };
        let w = w.set_requires_grad(trainable);
        self.params.push(ParamEntry {
            name: wname,
            tensor: w.shallow_clone(),
            trainable,
            conv1d: false,
            module: Some(name.into()),
            head: true,
        });
        let b = b.map(|b| {
            let bt = self
                .plan
                .trainable(&format!("{name}.bias"), Role::ClassifierHead);
            let b = b.set_requires_grad(bt);
            self.params.push(ParamEntry {
                name: format!("{name}.bias"),
                tensor: b.shallow_clone(),
                trainable: bt,
                conv1d: false,
                module: None,
                head: true,
            });
            b
        });
        Ok(Linear {
            name: name.into(),
            weight: w,
            bias: b,
            lora: None,
            conv1d: false,
        })
    }

    /// Checks every mismatch and pattern, and assembles the shared state.
    pub fn finish(
        self,
        dir: &Path,
        hf: HfConfig,
        opts: &LoadOptions,
        tied: bool,
        benign: impl Fn(&str) -> bool,
    ) -> Result<Core> {
        let Builder {
            ld,
            plan,
            lora,
            params,
            loras,
            linear_modules,
            ..
        } = self;
        let is_cls = matches!(opts.task, TaskHead::SequenceClassification { .. });
        let notes = ld.finish(
            |n| benign(n) || (tied && n == "lm_head.weight"),
            |n| {
                n.starts_with("cls.")
                    || n.starts_with("qa_outputs.")
                    || (is_cls && n.starts_with("lm_head."))
                    || (!is_cls && (n.starts_with("score.") || n.starts_with("classifier.")))
            },
        )?;
        let names: Vec<String> = params.iter().map(|p| p.name.clone()).collect();
        plan.check_patterns(&names)?;
        if let Some(l) = &lora {
            lora::check_targets(l, &linear_modules)?;
        }
        let text = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| Error::io("reading config.json", e))?;
        let config_json: Map<String, Value> =
            serde_json::from_str(&text).map_err(|e| Error::Config(e.to_string()))?;
        let save_kind = hf
            .common
            .dtype
            .as_deref()
            .and_then(kind_from_name)
            .unwrap_or(Kind::Float);
        let info = ModelInfo {
            model_type: hf.model_type().to_string(),
            family: hf.family().to_string(),
            vocab_size: hf.vocab_size(),
            hidden_size: hf.hidden_size(),
            num_layers: hf.num_layers(),
            num_heads: hf.num_heads(),
            num_kv_heads: hf.num_kv_heads(),
            max_positions: hf.context_length(),
            is_decoder: hf.is_decoder(),
            bos_token_id: hf.common.bos_token_id,
            eos_token_ids: hf.common.eos_token_ids.clone(),
            pad_token_id: resolve_pad_token_id(dir, &hf),
        };
        Ok(Core {
            info,
            device: opts.device,
            compute_kind: opts.base_kind,
            save_kind,
            hf,
            config_json,
            task: opts.task.clone(),
            params,
            loras,
            lora,
            source: dir.to_path_buf(),
            notes,
            tied,
        })
    }
}

/// The `architectures` entry transformers uses for a model type and task.
pub fn architecture_name(model_type: &str, task: &TaskHead) -> String {
    let base = match model_type {
        "gpt2" => "GPT2",
        "llama" => "Llama",
        "mistral" => "Mistral",
        "qwen2" => "Qwen2",
        "bert" => "Bert",
        other => other,
    };
    match (model_type, task) {
        ("gpt2", TaskHead::CausalLm) => "GPT2LMHeadModel".into(),
        (_, TaskHead::CausalLm) => format!("{base}ForCausalLM"),
        (_, TaskHead::SequenceClassification { .. }) => format!("{base}ForSequenceClassification"),
    }
}

impl Core {
    /// Checks the batch shape against the model.
    pub fn check_batch(&self, batch: &Batch<'_>) -> Result<(i64, i64)> {
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
        if s[1] > self.info.max_positions && matches!(self.info.family.as_str(), "gpt2" | "bert") {
            return Err(Error::Data(format!(
                "sequence length {} exceeds the model's {} positions",
                s[1], self.info.max_positions
            )));
        }
        Ok((s[0], s[1]))
    }

    fn lora_of(&self, module: &str) -> Option<&LoraRef> {
        self.loras.iter().find(|l| l.module == module)
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

    /// config.json for a saved full checkpoint.
    fn saved_config(&self) -> Value {
        let mut c = self.config_json.clone();
        c.insert(
            "architectures".into(),
            json!([architecture_name(self.hf.model_type(), &self.task)]),
        );
        let dtype = dtype_name(self.save_kind);
        if c.contains_key("torch_dtype") && !c.contains_key("dtype") {
            c.insert("torch_dtype".into(), json!(dtype));
        } else {
            c.insert("dtype".into(), json!(dtype));
        }
        c.remove("num_labels");
        match &self.task {
            TaskHead::SequenceClassification { id2label } => {
                let id2: Map<String, Value> = id2label
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (i.to_string(), json!(l)))
                    .collect();
                let l2i: Map<String, Value> = id2label
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (l.clone(), json!(i)))
                    .collect();
                c.insert("id2label".into(), Value::Object(id2));
                c.insert("label2id".into(), Value::Object(l2i));
                if self.info.is_decoder && c.get("pad_token_id").is_none_or(|v| v.is_null()) {
                    let pad = self
                        .info
                        .pad_token_id
                        .or(self.info.eos_token_ids.first().copied());
                    c.insert("pad_token_id".into(), json!(pad));
                }
            }
            TaskHead::CausalLm => {
                c.remove("id2label");
                c.remove("label2id");
            }
        }
        Value::Object(c)
    }

    /// Parameter `p` as saved: LoRA merged in (if asked), Conv1D transposed, in the save kind.
    fn saved_tensor(&self, p: &ParamEntry, merge: bool) -> Result<Tensor> {
        let _g = tch::no_grad_guard();
        let mut t = p.tensor.f_detach()?;
        if merge && p.name.ends_with(".weight") {
            if let Some(l) = p.module.as_deref().and_then(|m| self.lora_of(m)) {
                let delta =
                    l.b.f_detach()?
                        .f_matmul(&l.a.f_detach()?)?
                        .f_mul_scalar(l.scaling)?;
                t = t.f_to_kind(Kind::Float)?.f_add(&delta)?;
            }
        }
        if p.conv1d {
            t = t.f_tr()?;
        }
        Ok(t.f_to_kind(self.save_kind)?.f_contiguous()?)
    }

    fn save_full(&self, dir: &Path, merge: bool) -> Result<()> {
        let items: Vec<(String, Kind, Vec<i64>)> = self
            .params
            .iter()
            .map(|p| {
                let mut shape = p.tensor.size();
                if p.conv1d {
                    shape.reverse();
                }
                (p.name.clone(), self.save_kind, shape)
            })
            .collect();
        crate::loader::save_safetensors_lazy(&dir.join("model.safetensors"), &items, |i| {
            self.saved_tensor(&self.params[i], merge)
        })?;
        write_json(&dir.join("config.json"), &self.saved_config())
    }

    fn save_adapter(&self, dir: &Path) -> Result<()> {
        let Some(opts) = &self.lora else {
            return Err(Error::Config("no LoRA adapter to save".into()));
        };
        let mut tensors = Vec::new();
        for l in &self.loras {
            tensors.push((
                lora::peft_key(&l.module, "lora_A"),
                l.a.f_detach()?.f_to_kind(Kind::Float)?.f_contiguous()?,
            ));
            tensors.push((
                lora::peft_key(&l.module, "lora_B"),
                l.b.f_detach()?.f_to_kind(Kind::Float)?.f_contiguous()?,
            ));
        }
        let mut heads = Vec::new();
        for p in self.params.iter().filter(|p| p.head) {
            tensors.push((
                lora::peft_saved_key(&p.name),
                p.tensor
                    .f_detach()?
                    .f_to_kind(Kind::Float)?
                    .f_contiguous()?,
            ));
            if let Some(m) = &p.module {
                heads.push(m.clone());
            }
        }
        let modules: Vec<String> = self.loras.iter().map(|l| l.module.clone()).collect();
        let (task_type, to_save) = match self.task {
            TaskHead::CausalLm => ("CAUSAL_LM", None),
            TaskHead::SequenceClassification { .. } => ("SEQ_CLS", Some(heads)),
        };
        let cfg = lora::adapter_config(
            opts,
            &lora::saved_targets(opts, &modules),
            task_type,
            &self.source.display().to_string(),
            self.info.family == "gpt2",
            to_save,
        );
        save_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
        write_json(&dir.join("adapter_config.json"), &cfg)
    }

    pub fn save_pretrained(&self, dir: &Path, merge_lora: bool) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        if self.lora.is_some() && !merge_lora {
            self.save_adapter(dir)
        } else {
            self.save_full(dir, merge_lora)
        }
    }
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Other(e.into()))?;
    std::fs::write(path, text + "\n")
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// Benign checkpoint tensors: buffers that are not parameters.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
        || name.ends_with("embeddings.position_ids")
        || name.ends_with("rotary_emb.inv_freq")
}

impl<A: Forward> Model for Net<A> {
    fn info(&self) -> &ModelInfo {
        &self.core.info
    }
    fn device(&self) -> Device {
        self.core.device
    }
    fn forward(&self, batch: &Batch<'_>, train: bool) -> Result<Tensor> {
        self.arch.forward(&self.core, batch, train)
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
    fn load_notes(&self) -> Vec<String> {
        self.core.notes.clone()
    }
}

/// The output layer per task.
pub enum Head {
    /// LM head weight `[vocab, hidden]` (the embedding matrix when tied).
    Lm(Tensor),
    /// Classification head read at the last real token (decoders) or on the pooled output (BERT).
    Cls(Linear),
}

impl Head {
    /// Decoder output: logits `[b, t, vocab]` or, for classification, `[b, labels]` at each row's
    /// last real token.
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
        }
    }
}
