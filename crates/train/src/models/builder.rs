//! The parameter registry: [`Builder`] loads each weight by its Hugging Face name (through
//! [`WeightLoader`]), decides whether it trains ([`FreezePlan`]), attaches LoRA adapters to the
//! targeted linear modules and records every parameter as a [`ParamEntry`]; [`Builder::finish`]
//! reports every mismatch at once and assembles the [`Core`] the architectures share.

use std::path::Path;

use serde_json::{Map, Value};
use tch::{Device, Kind, Tensor};
use tuna_core::hf_config::HfConfig;

use super::{Architecture, Core};
use crate::freeze::{FreezePlan, Role};
use crate::layers::{HostRng, LayerNorm, Linear, RmsNorm, RmsScale};
use crate::loader::{kind_from_name, Checkpoint, WeightLoader};
use crate::lora::{self, LoraAdapter};
use crate::model::{LoadOptions, LoraOptions, ModelInfo, Nf4Options};
use crate::quant::Nf4Weight;
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
    /// Stored in NF4 (QLoRA); `tensor` is then a zero-stride placeholder of the weight's shape.
    pub nf4: Option<Nf4Weight>,
}

impl ParamEntry {
    /// A parameter outside any linear module and head, in Hugging Face's layout.
    fn new(name: impl Into<String>, tensor: &Tensor, trainable: bool) -> Self {
        ParamEntry {
            name: name.into(),
            tensor: tensor.shallow_clone(),
            trainable,
            conv1d: false,
            module: None,
            head: false,
            nf4: None,
        }
    }

    /// The weight of linear module `module`.
    fn of_module(self, module: &str) -> Self {
        ParamEntry {
            module: Some(module.to_string()),
            ..self
        }
    }

    /// Part of the classification head.
    fn in_head(self) -> Self {
        ParamEntry { head: true, ..self }
    }
}

/// Handles to one LoRA adapter, by module name.
pub struct LoraRef {
    pub module: String,
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
}

/// Builds the parameter registry while loading weights.
pub struct Builder<'a> {
    pub ld: WeightLoader<'a>,
    pub plan: FreezePlan,
    pub lora: Option<LoraOptions>,
    pub quantization: Option<Nf4Options>,
    pub base_kind: Kind,
    pub device: Device,
    pub seed: i64,
    pub prefix: String,
    pub params: Vec<ParamEntry>,
    pub loras: Vec<LoraRef>,
    /// Every linear module of the transformer (LoRA candidates), full names.
    pub linear_modules: Vec<String>,
    pub init_std: f64,
    /// The architecture's [`Architecture::is_buffer`].
    is_buffer: fn(&str) -> bool,
    /// The architecture's [`Architecture::hf_class`] for the task.
    hf_class: String,
}

impl<'a> Builder<'a> {
    /// A builder for architecture `A`: its base prefix, tensor names and saved class name.
    pub fn new<A: Architecture>(
        ckpt: &'a Checkpoint,
        num_layers: usize,
        hf: &HfConfig,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let prefix = A::BASE_PREFIX;
        Ok(Builder {
            ld: WeightLoader::new(ckpt, prefix, A::legacy_name, opts.device),
            plan: FreezePlan::new(&opts.freeze, opts.lora.is_some(), prefix, num_layers)?,
            lora: opts.lora.clone(),
            quantization: opts.quantization.filter(|_| opts.lora.is_some()),
            base_kind: opts.base_kind,
            device: opts.device,
            seed: opts.init_seed,
            prefix: prefix.to_string(),
            params: Vec::new(),
            loras: Vec::new(),
            linear_modules: Vec::new(),
            init_std: hf.common.initializer_range,
            is_buffer: A::is_buffer,
            hf_class: A::hf_class(hf.model_type(), &opts.task),
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
        self.params.push(ParamEntry::new(name, &t, trainable));
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
        // QLoRA stores a frozen linear in NF4, read in fp32 one weight at a time, with a
        // zero-stride placeholder of its shape where the weight would be. A Conv1D weight is
        // quantised as `[out, in]`, as transformers transposes it for bitsandbytes.
        let nf4 = match self.quantization.filter(|_| !trainable) {
            Some(q) => {
                let name = format!("{rel}.weight");
                let w = if conv1d {
                    let w = self.ld.base(&name, &[in_f, out_f], Kind::Float)?;
                    w.f_tr()?.f_contiguous()?
                } else {
                    self.ld.base(&name, &[out_f, in_f], Kind::Float)?
                };
                Some(Nf4Weight::quantize(&w, q.double_quant)?)
            }
            None => None,
        };
        let weight = if nf4.is_some() {
            Tensor::f_zeros([1, 1], (self.base_kind, self.device))?
                .f_expand([out_f, in_f], false)?
        } else if conv1d {
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
            conv1d,
            nf4: nf4.as_ref().map(Nf4Weight::shallow_clone),
            ..ParamEntry::new(wname, &weight, trainable).of_module(&module)
        });
        let bias = if bias {
            let bname = format!("{module}.bias");
            let bt = self.plan.trainable(&bname, role);
            let b = self
                .ld
                .base(&format!("{rel}.bias"), &[out_f], self.kind_for(bt))?
                .set_requires_grad(bt);
            self.params.push(ParamEntry::new(bname, &b, bt));
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
            nf4: nf4.map(Box::new),
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
        self.params
            .push(ParamEntry::new(format!("{module}.weight"), &w, wt).of_module(&module));
        self.params
            .push(ParamEntry::new(format!("{module}.bias"), &b, bt));
        self.linear_modules.push(module.clone());
        let lora = self.lora_for(&module, in_f, out_f)?;
        Ok(Linear {
            name: module,
            weight: w,
            bias: Some(b),
            lora,
            conv1d: false,
            nf4: None,
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
        self.layer_norm_with(rel, d, eps, true, role)
    }

    /// A LayerNorm with or without its bias.
    pub fn layer_norm_with(
        &mut self,
        rel: &str,
        d: i64,
        eps: f64,
        bias: bool,
        role: Role,
    ) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.param(&format!("{rel}.weight"), &[d], role)?,
            bias: if bias {
                Some(self.param(&format!("{rel}.bias"), &[d], role)?)
            } else {
                None
            },
            eps,
        })
    }

    pub fn rms_norm(&mut self, rel: &str, d: i64, eps: f64, role: Role) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: self.param(&format!("{rel}.weight"), &[d], role)?,
            eps,
            scale: RmsScale::AfterCast,
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
        self.params
            .push(ParamEntry::new("lm_head.weight", &t, trainable).of_module("lm_head"));
        Ok(t)
    }

    /// A linear module of the classification head (`score`, `classifier`, or a part of a larger
    /// head: RoBERTa's `classifier.dense`, DistilBERT's `pre_classifier`), from the checkpoint when
    /// it has one of the right shape, else initialised N(0, initializer_range) (bias zeros),
    /// seeded. Saved adapters keep the head's top-level module (PEFT's `modules_to_save`).
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
                    "{name} initialised afresh ({in_f} -> {n}, std {})",
                    self.init_std
                ));
                (w, b)
            }
        };
        let w = w.set_requires_grad(trainable);
        self.params.push(
            ParamEntry::new(wname, &w, trainable)
                .of_module(name)
                .in_head(),
        );
        let b = b.map(|b| {
            let bt = self
                .plan
                .trainable(&format!("{name}.bias"), Role::ClassifierHead);
            let b = b.set_requires_grad(bt);
            self.params
                .push(ParamEntry::new(format!("{name}.bias"), &b, bt).in_head());
            b
        });
        Ok(Linear {
            name: name.into(),
            weight: w,
            bias: b,
            lora: None,
            conv1d: false,
            nf4: None,
        })
    }

    /// A LayerNorm of the classification head (ModernBERT's `head.norm`), from the checkpoint
    /// when it has all of it, else ones (and zero bias).
    pub fn head_layer_norm(
        &mut self,
        name: &str,
        d: i64,
        eps: f64,
        bias: bool,
    ) -> Result<LayerNorm> {
        let (wname, bname) = (format!("{name}.weight"), format!("{name}.bias"));
        let kind = self.kind_for(self.plan.trainable(&wname, Role::ClassifierHead));
        let w = self.ld.head(&wname, &[d], kind)?;
        let b = match (&w, bias) {
            (Some(_), true) => self.ld.head(&bname, &[d], kind)?,
            _ => None,
        };
        let (w, b) = match (w, b) {
            (Some(w), b) if b.is_some() == bias => (w, b),
            _ => {
                self.ld.notes.push(format!("{name} initialised afresh"));
                let zeros = || Tensor::f_zeros([d], (kind, self.device));
                let b = if bias { Some(zeros()?) } else { None };
                (zeros()?.f_add_scalar(1.0)?, b)
            }
        };
        let mut norm = |n: String, t: Tensor| {
            let trainable = self.plan.trainable(&n, Role::ClassifierHead);
            let t = t.set_requires_grad(trainable);
            self.params
                .push(ParamEntry::new(n, &t, trainable).in_head());
            t
        };
        Ok(LayerNorm {
            weight: norm(wname, w),
            bias: b.map(|b| norm(bname, b)),
            eps,
        })
    }

    /// Checks every mismatch and pattern, and assembles the shared state.
    pub fn finish(self, dir: &Path, hf: HfConfig, opts: &LoadOptions, tied: bool) -> Result<Core> {
        let Builder {
            ld,
            plan,
            lora,
            params,
            loras,
            linear_modules,
            is_buffer,
            hf_class,
            ..
        } = self;
        let is_cls = opts.task.num_outputs().is_some();
        // Token classification has no pooler (BERT's `pooler`, DeBERTa's `pooler`), no
        // DistilBERT `pre_classifier` and none of a sequence head's other parts (RoBERTa's
        // `classifier.dense`): noted as another task's.
        let per_token = opts.task.is_per_token();
        // Heads of the other tasks, by the names transformers' task classes give them on every
        // architecture, are left unused with a note.
        let notes = ld.finish(
            |n| is_buffer(n) || (tied && n == "lm_head.weight"),
            |n| {
                n.starts_with("cls.")
                    || n.starts_with("qa_outputs.")
                    || (is_cls && n.starts_with("lm_head."))
                    || (!is_cls && (n.starts_with("score.") || n.starts_with("classifier.")))
                    || (per_token
                        && ["pooler.", "pre_classifier.", "classifier.", "score."]
                            .iter()
                            .any(|p| n.starts_with(p) || n.contains(&format!(".{p}"))))
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
        let d = hf.dims();
        let info = ModelInfo {
            model_type: hf.model_type().to_string(),
            family: hf.family().to_string(),
            vocab_size: d.vocab_size,
            hidden_size: d.hidden_size,
            num_layers: d.num_layers,
            num_heads: d.num_heads,
            num_kv_heads: d.num_kv_heads,
            max_positions: d.context_length,
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
            hf_class,
        })
    }
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
