//! Saving: [`Core::save_pretrained`] writes what transformers (full checkpoint, LoRA merged or
//! not) or PEFT (adapter) loads unchanged: Hugging Face tensor names and layouts (Conv1D weights
//! transposed back), config.json with the task's `architectures` entry and labels, and PEFT's
//! adapter files.

use std::path::Path;

use serde_json::{json, Map, Value};
use tch::{Kind, Tensor};

use super::{Core, LoraRef, ParamEntry};
use crate::loader::{dtype_name, save_safetensors, save_safetensors_lazy};
use crate::lora;
use crate::model::TaskHead;
use crate::{Error, Result};

impl Core {
    fn lora_of(&self, module: &str) -> Option<&LoraRef> {
        self.loras.iter().find(|l| l.module == module)
    }

    /// config.json for a saved full checkpoint.
    fn saved_config(&self) -> Value {
        let mut c = self.config_json.clone();
        c.insert("architectures".into(), json!([self.hf_class]));
        let dtype = dtype_name(self.save_kind);
        if c.contains_key("torch_dtype") && !c.contains_key("dtype") {
            c.insert("torch_dtype".into(), json!(dtype));
        } else {
            c.insert("dtype".into(), json!(dtype));
        }
        c.remove("num_labels");
        // Question answering's two outputs are transformers' default labels (`num_labels` 2).
        let qa_labels = ["LABEL_0".to_string(), "LABEL_1".to_string()];
        let labels = match self.task {
            TaskHead::QuestionAnswering => Some(&qa_labels[..]),
            _ => self.task.id2label(),
        };
        if let Some(id2label) = labels {
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
        }
        match &self.task {
            TaskHead::SequenceClassification { problem_type, .. } => {
                c.insert("problem_type".into(), json!(problem_type.as_str()));
                if self.info.is_decoder && c.get("pad_token_id").is_none_or(|v| v.is_null()) {
                    let pad = self
                        .info
                        .pad_token_id
                        .or(self.info.eos_token_ids.first().copied());
                    c.insert("pad_token_id".into(), json!(pad));
                }
            }
            TaskHead::TokenClassification { .. } | TaskHead::QuestionAnswering => {
                c.remove("problem_type");
            }
            TaskHead::CausalLm => {
                c.remove("id2label");
                c.remove("label2id");
                c.remove("problem_type");
            }
        }
        Value::Object(c)
    }

    /// Parameter `p` as saved: LoRA merged in (if asked), Conv1D transposed, in the save kind.
    fn saved_tensor(&self, p: &ParamEntry, merge: bool) -> Result<Tensor> {
        let _g = tch::no_grad_guard();
        // A QLoRA base weight saves as it trained: dequantised from NF4.
        let mut t = match &p.nf4 {
            Some(q) => q.dequantize(Kind::Float)?,
            None => p.tensor.f_detach()?,
        };
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
        save_safetensors_lazy(&dir.join("model.safetensors"), &items, |i| {
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
            // The head's top-level module (`classifier` for RoBERTa's `classifier.dense` and
            // `classifier.out_proj`), which PEFT saves whole.
            let top = p.name.split('.').next().unwrap_or(&p.name).to_string();
            if !heads.contains(&top) {
                heads.push(top);
            }
        }
        let modules: Vec<String> = self.loras.iter().map(|l| l.module.clone()).collect();
        let (task_type, to_save) = match self.task {
            TaskHead::CausalLm => ("CAUSAL_LM", None),
            TaskHead::SequenceClassification { .. } => ("SEQ_CLS", Some(heads)),
            TaskHead::TokenClassification { .. } => ("TOKEN_CLS", Some(heads)),
            TaskHead::QuestionAnswering => ("QUESTION_ANS", Some(heads)),
        };
        let cfg = lora::adapter_config(
            opts,
            &lora::saved_targets(opts, &modules),
            task_type,
            &self.source.display().to_string(),
            // PEFT's flag for Conv1D weights (stored `[in, out]`), which GPT-2 has.
            self.params.iter().any(|p| p.conv1d),
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
