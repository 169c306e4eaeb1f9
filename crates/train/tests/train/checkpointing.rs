//! Activation (gradient) checkpointing: the same losses and gradients as the ordinary
//! backward, for every family (decoders as language models, encoders as classifiers), full and
//! LoRA, with padding.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tch::Tensor;
use tuna_core::data::{Example, Label};
use tuna_core::spec::Task;
use tuna_train::data::{Features, LabelMap};
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
        task: if model.info().is_decoder {
            Task::CausalLm
        } else {
            Task::SequenceClassification
        },
        with_types: model.uses_token_type_ids(),
        pack_len: None,
        group_overhead_tokens: None,
        checkpointing,
        dpo_beta: None,
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

/// The fixtures that are encoders (trained here as classifiers).
const ENCODERS: [&str; 7] = [
    "bert",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "deberta-v3",
    "deberta-odd",
    "modernbert",
];

/// What the model is trained for here: a language model, or (encoders) the labels of the
/// fixture's head (two where it has none).
pub(crate) fn task(name: &str) -> TaskHead {
    if !ENCODERS.contains(&name) {
        return TaskHead::CausalLm;
    }
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap())
            .unwrap();
    let n = cfg["id2label"].as_object().map_or(2, |m| m.len());
    TaskHead::SequenceClassification {
        id2label: (0..n).map(|i| i.to_string()).collect(),
        problem_type: Default::default(),
    }
}

/// [`TEXTS`] as the examples of `task`: text, or labelled text.
pub(crate) fn features(dir: &Path, task: &TaskHead) -> Vec<Features> {
    let decoder = matches!(task, TaskHead::CausalLm);
    let tok = tuna_train::tokenizer::Tok::load(dir, decoder).unwrap();
    let (examples, labels) = if decoder {
        (text_examples(&TEXTS), None)
    } else {
        let labelled = TEXTS
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let label = Label::Int(i as i64 % 2);
                (
                    i as u64 + 1,
                    Example::Labeled {
                        text: t.to_string(),
                        text_pair: None,
                        label,
                    },
                )
            })
            .collect();
        let map = LabelMap::new(vec![Label::Int(0), Label::Int(1)]);
        (labelled, Some(map))
    };
    let t = if decoder {
        Task::CausalLm
    } else {
        Task::SequenceClassification
    };
    tuna_train::data::featurize(&tok, t, &examples, 64, labels.as_ref(), "t")
        .unwrap()
        .0
}

/// Every family's dropout knobs, off.
pub(crate) fn no_dropout() -> Value {
    json!({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "attention_dropout": 0.0,
           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
           "classifier_dropout": 0.0, "dropout": 0.0, "seq_classif_dropout": 0.0,
           "pooler_dropout": 0.0, "cls_dropout": 0.0, "mlp_dropout": 0.0,
           "embedding_dropout": 0.0})
}

fn compare(name: &str, lora: bool) {
    // Without dropout, so that both runs compute the same function.
    let tmp = tempfile::tempdir().unwrap();
    let dir = with_config(name, tmp.path(), no_dropout());
    let task = task(name);
    let mut opts = cpu_options(task.clone());
    if lora {
        opts.lora = Some(LoraOptions {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: vec!["all-linear".into()],
        });
    }
    let model = tuna_train::load_model(&dir, &opts).unwrap();
    let feats = features(&dir, &task);
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
fn checkpointed_gradients_equal_the_ordinary_backward_for_every_family() {
    let _g = lock();
    for name in [
        "gpt2",
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
    ]
    .into_iter()
    .chain(ENCODERS)
    {
        compare(name, false);
    }
}

#[test]
fn checkpointed_lora_gradients_equal_the_ordinary_backward() {
    let _g = lock();
    for name in [
        "llama",
        "phi3",
        "gemma2",
        "gpt2",
        "distilbert",
        "modernbert",
    ] {
        compare(name, true);
    }
}

/// With dropout on, the recomputed layers must drop the units the forward dropped: the
/// checkpointed gradient is then the true gradient of the checkpointed loss (same seed, so the
/// same masks), which a central difference along a random direction checks. A decoder, GPT-2
/// (whose attention dropout is in SDPA) and an encoder.
#[test]
fn with_dropout_the_recomputation_drops_what_the_forward_dropped() {
    let _g = lock();
    for (name, edits) in [
        ("llama", json!({"attention_dropout": 0.3})),
        ("gpt2", json!({"attn_pdrop": 0.3, "resid_pdrop": 0.2})),
        ("bert", json!({"attention_probs_dropout_prob": 0.3})),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = with_config(name, tmp.path(), edits);
        let task = task(name);
        let model = tuna_train::load_model(&dir, &cpu_options(task.clone())).unwrap();
        let feats = features(&dir, &task);
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
            "{name}: directional derivative {numeric} vs the checkpointed gradient's {slope}"
        );
        // Dropout was on: the loss differs from the one without it.
        let (plain, _) = loss_and_grads(model.as_ref(), &items, false);
        assert!((plain - loss).abs() > 1e-4, "{name}: {plain} vs {loss}");
    }
}
