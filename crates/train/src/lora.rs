//! LoRA with PEFT's semantics, so adapters tuna writes load with `PeftModel.from_pretrained`.
//!
//! - `scaling = alpha / r`; A `[r, in]` Kaiming-uniform with `a = sqrt(5)` (bound `1/sqrt(in)`),
//!   B `[out, r]` zeros; dropout on the LoRA input only; A and B are fp32.
//! - Target modules match like PEFT's list form: a target `q_proj` matches every module whose name
//!   is `q_proj` or ends with `.q_proj`; `all-linear` means every linear layer but the output and
//!   classification heads.
//! - Saved keys: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`; a classification
//!   head kept trainable (PEFT's `modules_to_save`) as `base_model.model.<head>.weight`.

use std::collections::BTreeSet;

use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::layers::{cast, dropout, Fwd, HostRng};
use crate::model::LoraOptions;
use crate::{Error, Result};

/// The LoRA matrices of one linear layer.
pub struct LoraAdapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
    pub dropout: f64,
}

impl LoraAdapter {
    /// Fresh adapter for a layer `in_features -> out_features`, seeded per module name.
    pub fn new(
        module: &str,
        in_features: i64,
        out_features: i64,
        opts: &LoraOptions,
        seed: i64,
        device: Device,
    ) -> Result<Self> {
        let mut rng = HostRng::new(seed, &format!("lora_A:{module}"));
        let bound = 1.0 / (in_features as f64).sqrt();
        let a = Tensor::f_from_slice(&rng.uniform((opts.r * in_features) as usize, bound))?
            .f_view([opts.r, in_features])?
            .f_to_device(device)?
            .set_requires_grad(true);
        let b =
            Tensor::f_zeros([out_features, opts.r], (Kind::Float, device))?.set_requires_grad(true);
        Ok(LoraAdapter {
            a,
            b,
            scaling: opts.alpha / opts.r as f64,
            dropout: opts.dropout,
        })
    }

    /// `scaling · B · A · dropout(x)`.
    pub fn forward(&self, x: &Tensor, f: Fwd) -> Result<Tensor> {
        let x = dropout(x.shallow_clone(), self.dropout, f.train)?;
        let h = x.f_linear(&cast(&self.a, f.kind)?, None::<Tensor>)?;
        let h = h.f_linear(&cast(&self.b, f.kind)?, None::<Tensor>)?;
        Ok(h.f_mul_scalar(self.scaling)?)
    }

    /// The weight update `scaling · B · A` (`[out, in]`, fp32) that merging adds to the base weight.
    pub fn delta(&self) -> Result<Tensor> {
        Ok(self
            .b
            .f_detach()?
            .f_matmul(&self.a.f_detach()?)?
            .f_mul_scalar(self.scaling)?)
    }
}

/// PEFT's saved name of a LoRA matrix (`which` is "lora_A" or "lora_B").
pub fn peft_key(module: &str, which: &str) -> String {
    format!("base_model.model.{module}.{which}.weight")
}

/// PEFT's saved name of a `modules_to_save` parameter (`score.weight` -> `base_model.model.score.weight`).
pub fn peft_saved_key(param: &str) -> String {
    format!("base_model.model.{param}")
}

/// Whether module `name` is targeted (PEFT's list matching).
pub fn matches_target(name: &str, target: &str) -> bool {
    name == target || name.ends_with(&format!(".{target}"))
}

pub fn validate_options(opts: &LoraOptions) -> Result<()> {
    if opts.r <= 0 {
        return Err(Error::Config(format!(
            "LoRA rank r must be positive, got {}",
            opts.r
        )));
    }
    if opts.alpha.is_nan() || opts.alpha <= 0.0 {
        return Err(Error::Config(format!(
            "LoRA alpha must be positive, got {}",
            opts.alpha
        )));
    }
    if !(0.0..1.0).contains(&opts.dropout) {
        return Err(Error::Config(format!(
            "LoRA dropout must be in [0, 1), got {}",
            opts.dropout
        )));
    }
    if opts.target_modules.is_empty() {
        return Err(Error::Config(
            "LoRA needs at least one target module (or `all-linear`)".into(),
        ));
    }
    Ok(())
}

pub fn is_all_linear(opts: &LoraOptions) -> bool {
    opts.target_modules.iter().any(|t| t == "all-linear")
}

/// Checks that each target matched a module; the error names the modules that exist.
pub fn check_targets(opts: &LoraOptions, linear_modules: &[String]) -> Result<()> {
    if is_all_linear(opts) {
        return Ok(());
    }
    let unmatched: Vec<&String> = opts
        .target_modules
        .iter()
        .filter(|t| !linear_modules.iter().any(|m| matches_target(m, t)))
        .collect();
    if unmatched.is_empty() {
        return Ok(());
    }
    let short: BTreeSet<&str> = linear_modules
        .iter()
        .map(|m| m.rsplit('.').next().unwrap_or(m))
        .collect();
    Err(Error::Config(format!(
        "LoRA target module(s) {} match no linear layer of this model; available: {}, all-linear",
        unmatched
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(", "),
        short.into_iter().collect::<Vec<_>>().join(", ")
    )))
}

/// The target list to save: the user's, or for `all-linear` the short names it resolved to.
pub fn saved_targets(opts: &LoraOptions, targeted_modules: &[String]) -> Vec<String> {
    if is_all_linear(opts) {
        let set: BTreeSet<String> = targeted_modules
            .iter()
            .map(|m| m.rsplit('.').next().unwrap_or(m).to_string())
            .collect();
        set.into_iter().collect()
    } else {
        opts.target_modules.clone()
    }
}

/// `adapter_config.json` as PEFT 0.21 writes it (the keys PEFT needs; others take PEFT's defaults).
pub fn adapter_config(
    opts: &LoraOptions,
    targets: &[String],
    task_type: &str,
    base_model: &str,
    fan_in_fan_out: bool,
    modules_to_save: Option<Vec<String>>,
) -> Value {
    json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "exclude_modules": null,
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": true,
        "init_lora_weights": true,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        "lora_alpha": opts.alpha,
        "lora_bias": false,
        "lora_dropout": opts.dropout,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": modules_to_save,
        "peft_type": "LORA",
        "r": opts.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "task_type": task_type,
        "use_dora": false,
        "use_rslora": false
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(t: &[&str]) -> LoraOptions {
        LoraOptions {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: t.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn peft_matching_and_names() {
        assert!(matches_target("model.layers.0.self_attn.q_proj", "q_proj"));
        assert!(matches_target(
            "model.layers.0.self_attn.q_proj",
            "self_attn.q_proj"
        ));
        assert!(!matches_target("model.layers.0.self_attn.q_proj", "proj"));
        assert!(matches_target("score", "score"));
        assert_eq!(
            peft_key("transformer.h.0.attn.c_attn", "lora_A"),
            "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
        );
        let modules = vec![
            "bert.encoder.layer.0.attention.self.query".to_string(),
            "bert.pooler.dense".to_string(),
        ];
        check_targets(&opts(&["query", "dense"]), &modules).unwrap();
        let e = check_targets(&opts(&["query", "q_proj"]), &modules)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'q_proj'") && e.contains("dense, query, all-linear"),
            "{e}"
        );
        assert_eq!(
            saved_targets(&opts(&["all-linear"]), &modules),
            vec!["dense", "query"]
        );
        assert_eq!(saved_targets(&opts(&["query"]), &modules), vec!["query"]);
        let cfg = adapter_config(
            &opts(&["query"]),
            &["query".into()],
            "SEQ_CLS",
            "/m",
            false,
            Some(vec!["classifier".into()]),
        );
        assert_eq!(cfg["r"], 8);
        assert_eq!(cfg["lora_alpha"], 16.0);
        assert_eq!(cfg["modules_to_save"], serde_json::json!(["classifier"]));
        assert!(validate_options(&LoraOptions {
            r: 0,
            ..opts(&["q"])
        })
        .is_err());
        assert!(validate_options(&LoraOptions {
            dropout: 1.0,
            ..opts(&["q"])
        })
        .is_err());
        assert!(validate_options(&opts(&[])).is_err());
    }
}
