//! Activation (gradient) checkpointing: the same losses and gradients as the ordinary
//! backward, for every Llama-style decoder family, full and LoRA, with padding.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tch::Tensor;
use tuna_train::data::Features;
use tuna_train::model::{LoraOptions, Model, TaskHead};
use tuna_train::trainer::{accumulate, StepConfig};

use crate::support::{cpu_options, fixture, lock, text_examples};

const TEXTS: [&str; 5] = [
    "a",
    "the cat sat on the mat",
    "fish and chips for two",
    "the dog ran",
    "go",
];

/// The step's mean loss and every trainable parameter's gradient, with or without
/// checkpointing, micro-batches of 3 (so rows are padded).
pub(crate) fn loss_and_grads(
    model: &dyn Model,
    items: &[&Features],
    checkpointing: bool,
) -> (f64, Vec<(String, Tensor)>) {
    for (_, mut p) in model.trainable_parameters() {
        p.zero_grad();
    }
    let cfg = StepConfig {
        micro: 3,
        pad_id: 0,
        causal: true,
        with_types: false,
        pack_len: None,
        group_overhead_tokens: None,
        checkpointing,
    };
    let acc = accumulate(model, items, &cfg, 1, 0).unwrap();
    let loss = f64::try_from(&acc.loss_sum).unwrap() / acc.targets as f64;
    let grads = model
        .trainable_parameters()
        .into_iter()
        .map(|(n, p)| (n, p.grad().copy()))
        .collect();
    (loss, grads)
}

/// The fixture `name` copied to `dest` with `edits` over its config.json.
pub(crate) fn with_config(name: &str, dest: &Path, edits: Value) -> PathBuf {
    let src = fixture(name);
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dest.join(e.file_name())).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    for (k, v) in edits.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    std::fs::write(dest.join("config.json"), cfg.to_string()).unwrap();
    dest.to_path_buf()
}

pub(crate) fn features(dir: &Path) -> Vec<Features> {
    let tok = tuna_train::tokenizer::Tok::load(dir, true).unwrap();
    tuna_train::data::featurize(
        &tok,
        tuna_core::spec::Task::CausalLm,
        &text_examples(&TEXTS),
        64,
        None,
        "t",
    )
    .unwrap()
    .0
}

fn compare(name: &str, lora: bool) {
    // Without dropout, so that both runs compute the same function.
    let tmp = tempfile::tempdir().unwrap();
    let dir = with_config(
        name,
        tmp.path(),
        json!({"resid_pdrop": 0.0, "attention_dropout": 0.0}),
    );
    let mut opts = cpu_options(TaskHead::CausalLm);
    if lora {
        opts.lora = Some(LoraOptions {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: vec!["all-linear".into()],
        });
    }
    let model = tuna_train::load_model(&dir, &opts).unwrap();
    assert!(model.supports_checkpointing(), "{name}");
    let feats = features(&dir);
    let items: Vec<&Features> = feats.iter().collect();
    let (loss, plain) = loss_and_grads(model.as_ref(), &items, false);
    let (loss_ck, ck) = loss_and_grads(model.as_ref(), &items, true);
    assert!(
        (loss - loss_ck).abs() < 1e-6,
        "{name}: loss {loss} vs {loss_ck}"
    );
    assert_eq!(plain.len(), ck.len());
    let mut largest = 0.0f64;
    for ((n, a), (m, b)) in plain.iter().zip(&ck) {
        assert_eq!(n, m);
        let d = f64::try_from((a - b).abs().max()).unwrap();
        assert!(
            d < 1e-6,
            "{name} (lora {lora}) {n}: gradients differ by {d}"
        );
        largest = largest.max(f64::try_from(a.abs().max()).unwrap());
    }
    assert!(
        largest > 1e-4,
        "{name}: the gradients are not all zero ({largest})"
    );
}

#[test]
fn checkpointed_gradients_equal_the_ordinary_backward_for_every_decoder_family() {
    let _g = lock();
    for name in [
        "llama",
        "llama-tied",
        "mistral",
        "qwen2",
        "qwen3",
        "qwen3-sliding",
        "gemma2",
        "gemma3",
        "phi3",
        "olmo2",
    ] {
        compare(name, false);
    }
}

#[test]
fn checkpointed_lora_gradients_equal_the_ordinary_backward() {
    let _g = lock();
    for name in ["llama", "phi3", "gemma2"] {
        compare(name, true);
    }
}

/// With dropout on, the recomputed layers must drop the units the forward dropped: the
/// checkpointed gradient is then the true gradient of the checkpointed loss (same seed, so the
/// same masks), which a central difference along a random direction checks.
#[test]
fn with_dropout_the_recomputation_drops_what_the_forward_dropped() {
    let _g = lock();
    let tmp = tempfile::tempdir().unwrap();
    let dir = with_config("llama", tmp.path(), json!({"attention_dropout": 0.3}));
    let model = tuna_train::load_model(&dir, &cpu_options(TaskHead::CausalLm)).unwrap();
    let feats = features(&dir);
    let items: Vec<&Features> = feats.iter().collect();
    let (loss, grads) = loss_and_grads(model.as_ref(), &items, true);
    tch::manual_seed(7);
    let params = model.trainable_parameters();
    let dirs: Vec<Tensor> = params.iter().map(|(_, p)| Tensor::randn_like(p)).collect();
    let slope: f64 = grads
        .iter()
        .zip(&dirs)
        .map(|((_, g), v)| f64::try_from((g * v).sum(tch::Kind::Double)).unwrap())
        .sum();
    let eps = 1e-3;
    let shift = |by: f64| {
        let _ng = tch::no_grad_guard();
        for ((_, p), v) in params.iter().zip(&dirs) {
            let _ = p.shallow_clone().f_add_(&(v * by)).unwrap();
        }
    };
    shift(eps);
    let (up, _) = loss_and_grads(model.as_ref(), &items, true);
    shift(-2.0 * eps);
    let (down, _) = loss_and_grads(model.as_ref(), &items, true);
    shift(eps);
    let numeric = (up - down) / (2.0 * eps);
    assert!(
        (numeric - slope).abs() < 2e-2 * slope.abs().max(1e-3),
        "directional derivative {numeric} vs the checkpointed gradient's {slope}"
    );
    // Dropout was on: the loss differs from the one without it.
    let (plain, _) = loss_and_grads(model.as_ref(), &items, false);
    assert!((plain - loss).abs() > 1e-4, "{plain} vs {loss}");
}

#[test]
fn gpt2_and_encoders_say_they_have_no_checkpointing() {
    let _g = lock();
    let model = tuna_train::load_model(&fixture("gpt2"), &cpu_options(TaskHead::CausalLm)).unwrap();
    assert!(!model.supports_checkpointing());
    let err = model
        .forward_backward_checkpointed(
            &tuna_train::model::Batch {
                input_ids: &Tensor::zeros([1, 2], (tch::Kind::Int64, tch::Device::Cpu)),
                attention_mask: &Tensor::ones([1, 2], (tch::Kind::Int64, tch::Device::Cpu)),
                token_type_ids: None,
                packed: None,
            },
            true,
            &mut |_| Ok(()),
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("gradient checkpointing is not available"),
        "{err}"
    );
}
