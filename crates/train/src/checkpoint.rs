//! Checkpoint folders: a model folder that transformers/PEFT loads as is, plus the training state
//! that lets a run resume exactly.
//!
//! Layout of `output_dir/checkpoints/step-<n>/` (and of `output_dir/final/`, without the state):
//! - `config.json` + `model.safetensors` (full fine-tune) or `adapter_config.json` +
//!   `adapter_model.safetensors` (LoRA), written by [`crate::model::Model::save_pretrained`];
//!   `merged/` holds merged full weights too when the job asks for `merge_lora`;
//! - the tokenizer files of the base model folder ([`crate::tokenizer::TOKENIZER_FILES`]);
//! - `training_state/`: `trainer_state.json` ([`TrainState`]), `optimizer.safetensors`
//!   (AdamW moments and step, see [`crate::optim`]) and `trainable.safetensors` (the trainable
//!   parameters in fp32, so resume does not go through the rounding of a bf16 export).
//!
//! A folder is written under a temporary name and renamed when complete, so a crash never leaves
//! a half-written checkpoint under its final name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::model::Model;
use crate::optim::AdamW;
use crate::tokenizer::TOKENIZER_FILES;
use crate::{Error, Result};

pub const STATE_DIR: &str = "training_state";

/// Where the run stands: everything but tensors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format: u32,
    /// Completed optimiser steps.
    pub step: u64,
    pub total_steps: u64,
    pub steps_per_epoch: u64,
    /// Data order: epoch `e` uses `data::epoch_order(n, seed, e)`, and step `s` reads the
    /// examples of batch `s % steps_per_epoch` of epoch `s / steps_per_epoch`.
    pub seed: u64,
    pub train_examples: usize,
    pub batch_size: usize,
    pub micro_batch_size: usize,
    pub trained_tokens: u64,
    pub elapsed_seconds: f64,
    pub best_valid_loss: Option<f64>,
    pub evals_without_improvement: u32,
    pub id2label: Option<Vec<String>>,
    /// Latest metrics (for the checkpoint event and the final report).
    pub last_metrics: serde_json::Map<String, serde_json::Value>,
}

pub fn checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join("checkpoints").join(format!("step-{step}"))
}

/// Copies the tokenizer files of `model_dir` that exist into `dest`.
pub fn copy_tokenizer_files(model_dir: &Path, dest: &Path) -> Result<()> {
    for name in TOKENIZER_FILES {
        let src = model_dir.join(name);
        if src.is_file() {
            std::fs::copy(&src, dest.join(name))
                .map_err(|e| Error::io(format!("copying {}", src.display()), e))?;
        }
    }
    Ok(())
}

/// Writes the model (and merged weights when asked) plus tokenizer files into `dest`, through a
/// temporary folder renamed at the end. `state` adds the training state.
pub fn save(
    dest: &Path,
    model: &dyn Model,
    model_dir: &Path,
    lora: bool,
    merge_lora: bool,
    state: Option<(&TrainState, &AdamW)>,
) -> Result<()> {
    let parent = dest
        .parent()
        .ok_or_else(|| Error::Config(format!("bad checkpoint path {}", dest.display())))?;
    std::fs::create_dir_all(parent)
        .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .map_err(|e| Error::io(format!("removing {}", tmp.display()), e))?;
    }
    std::fs::create_dir_all(&tmp)
        .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    model.save_pretrained(&tmp, false)?;
    copy_tokenizer_files(model_dir, &tmp)?;
    if lora && merge_lora {
        let merged = tmp.join("merged");
        model.save_pretrained(&merged, true)?;
        copy_tokenizer_files(model_dir, &merged)?;
    }
    if let Some((st, opt)) = state {
        let sd = tmp.join(STATE_DIR);
        std::fs::create_dir_all(&sd)
            .map_err(|e| Error::io(format!("creating {}", sd.display()), e))?;
        opt.save(&sd.join("optimizer.safetensors"))?;
        let mut params = Vec::new();
        for (n, t) in model.trainable_parameters() {
            params.push((
                n,
                t.f_detach()?
                    .f_to_kind(tch::Kind::Float)?
                    .f_to_device(tch::Device::Cpu)?
                    .f_contiguous()?,
            ));
        }
        Tensor::write_safetensors(&params, sd.join("trainable.safetensors"))?;
        let text = serde_json::to_string_pretty(st).map_err(|e| Error::Other(e.into()))?;
        std::fs::write(sd.join("trainer_state.json"), text)
            .map_err(|e| Error::io(format!("writing {}", sd.display()), e))?;
    }
    if dest.exists() {
        std::fs::remove_dir_all(dest)
            .map_err(|e| Error::io(format!("replacing {}", dest.display()), e))?;
    }
    std::fs::rename(&tmp, dest).map_err(|e| {
        Error::io(
            format!("renaming {} to {}", tmp.display(), dest.display()),
            e,
        )
    })
}

/// What a resume needs from a checkpoint folder.
pub struct Resume {
    pub state: TrainState,
    pub trainable: BTreeMap<String, Tensor>,
    pub optimizer: PathBuf,
}

pub fn load(checkpoint: &Path) -> Result<Resume> {
    let sd = checkpoint.join(STATE_DIR);
    let state_path = sd.join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| {
        Error::Config(format!(
            "{} is not a resumable checkpoint (cannot read {}: {e})",
            checkpoint.display(),
            state_path.display()
        ))
    })?;
    let state: TrainState = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{} is not valid: {e}", state_path.display())))?;
    let trainable = Tensor::read_safetensors(sd.join("trainable.safetensors"))?
        .into_iter()
        .collect();
    Ok(Resume {
        state,
        trainable,
        optimizer: sd.join("optimizer.safetensors"),
    })
}
