//! The encoders beyond BERT on the tiny fixtures of `python/fixtures_encoders.py`, two per family
//! (the published form and an odd configuration):
//!
//! - parity: `last_hidden_state` (and the logits of the fixtures saved with a head) equal
//!   transformers' within 1e-4 with a right-padded row; the padded row's real tokens equal the
//!   same tokens run alone; a row of padding only stays finite;
//! - facts: the parameter count `GET /v1/models/{id}` shows equals transformers', the layer and
//!   head counts, LoRA target names and freeze patterns name what the loaded model has;
//! - training: a short classification run's loss goes down (full fine-tune and LoRA);
//! - export: full, LoRA and merged-LoRA checkpoints load in transformers / PEFT with the same
//!   logits, adapters keep the whole classification head, tuna reloads its full exports.

use std::collections::BTreeMap;

use serde_json::json;
use tch::{Kind, Tensor};
use tuna_train::load_model;
use tuna_train::model::{Batch, FreezeOptions, LoadOptions, LoraOptions, TaskHead};
use tuna_train::trainer::TrainOutcome;

use crate::export::{
    assert_equal_logits, assert_tuna_reloads, check_export, export, read_json, three_labels,
    two_labels, Export,
};
use crate::parity::{
    self, assert_all_padding_row_finite, assert_padding_does_not_leak, copy_fixture_with,
    max_abs_diff,
};
use crate::support::{cpu_options, fixture, lock};
use crate::train_loop::{reviews, run, spec};

fn reference(name: &str) -> BTreeMap<String, Tensor> {
    parity::reference(&fixture(name))
}

fn labels(n: usize) -> TaskHead {
    TaskHead::SequenceClassification {
        id2label: (0..n).map(|i| format!("l{i}")).collect(),
        problem_type: Default::default(),
    }
}

/// The task of fixture `r`: its head's labels, or two.
fn task_of(r: &BTreeMap<String, Tensor>) -> TaskHead {
    labels(r.get("logits").map_or(2, |l| l.size()[1] as usize))
}

fn batch<'a>(r: &'a BTreeMap<String, Tensor>) -> Batch<'a> {
    Batch {
        input_ids: &r["input_ids"],
        attention_mask: &r["attention_mask"],
        token_type_ids: r.get("token_type_ids"),
        packed: None,
    }
}

/// Checks fixture `name` against transformers; prints the largest differences of the hidden
/// states and (when the fixture has a head) the logits.
fn check_parity(name: &str) {
    let r = reference(name);
    let model = load_model(&fixture(name), &cpu_options(task_of(&r))).unwrap();
    let hidden = model.last_hidden_state(&batch(&r)).unwrap();
    let want = &r["last_hidden_state"];
    let scale = f64::try_from(want.abs().max()).unwrap();
    assert!(scale > 0.5, "{name}: reference too small to mean anything");
    let d_hidden = max_abs_diff(&hidden, want);
    assert!(
        d_hidden < 1e-4,
        "{name}: last_hidden_state differs from transformers by {d_hidden}"
    );
    let d_logits = r.get("logits").map(|want| {
        let logits = tch::no_grad(|| model.forward(&batch(&r), false)).unwrap();
        let d = max_abs_diff(&logits, want);
        assert!(d < 1e-4, "{name}: logits differ from transformers by {d}");
        d
    });
    assert_padding_does_not_leak(name, &r, &hidden, |b| model.last_hidden_state(b).unwrap());
    assert_all_padding_row_finite(name, model.as_ref());
    let d_logits = d_logits.map_or("-".to_string(), |d| format!("{d:.2e}"));
    eprintln!("{name}: last_hidden_state max diff {d_hidden:.2e}, logits {d_logits}");
}

#[test]
fn roberta_and_xlm_roberta_match_transformers() {
    check_parity("roberta");
    check_parity("xlm-roberta");
}

#[test]
fn distilbert_matches_transformers() {
    check_parity("distilbert");
    check_parity("distilbert-odd");
}

#[test]
fn deberta_v2_matches_transformers() {
    check_parity("deberta-v3");
    check_parity("deberta-odd");
}

#[test]
fn modernbert_matches_transformers() {
    check_parity("modernbert");
    check_parity("modernbert-odd");
}

const FIXTURES: &[&str] = &[
    "roberta",
    "xlm-roberta",
    "distilbert",
    "distilbert-odd",
    "deberta-v3",
    "deberta-odd",
    "modernbert",
    "modernbert-odd",
];

/// What the API describes (`HfConfig::describe`) is what the loaded model has.
#[test]
fn described_facts_match_the_loaded_models_and_transformers() {
    for &name in FIXTURES {
        let dir = fixture(name);
        let r = reference(name);
        let hf = tuna_train::models::read_config(&dir).unwrap();
        let d = hf.describe();
        let want = i64::try_from(&r["num_parameters"].get(0)).unwrap();
        assert_eq!(d.num_parameters, want, "{name}: transformers' count");
        let m = load_model(&dir, &cpu_options(task_of(&r))).unwrap();
        let base = format!("{}.", base_prefix(name));
        let params = m.all_parameters();
        let counted: i64 = params
            .iter()
            .filter(|(k, _)| k.starts_with(&base))
            .map(|(_, t)| t.numel() as i64)
            .sum();
        assert_eq!(counted, want, "{name}: the loaded base model");
        let cfg = read_json(&dir.join("config.json"));
        let (layers, heads) = match name {
            n if n.starts_with("distilbert") => (&cfg["n_layers"], &cfg["n_heads"]),
            _ => (&cfg["num_hidden_layers"], &cfg["num_attention_heads"]),
        };
        assert_eq!(json!(d.dims.num_layers), *layers, "{name}");
        assert_eq!(json!(d.dims.num_heads), *heads, "{name}");
        assert_eq!(m.info().num_layers, d.dims.num_layers);
        // Every LoRA target and every freeze pattern names something the model has (the load
        // fails on a target or pattern that matches nothing).
        let targets: Vec<String> = d
            .lora_target_modules
            .iter()
            .filter(|t| *t != "all-linear")
            .cloned()
            .collect();
        let o = LoadOptions {
            lora: Some(LoraOptions {
                r: 2,
                alpha: 4.0,
                dropout: 0.0,
                target_modules: targets,
            }),
            ..cpu_options(task_of(&r))
        };
        load_model(&dir, &o).unwrap_or_else(|e| panic!("{name}: LoRA targets: {e}"));
        let o = LoadOptions {
            freeze: FreezeOptions {
                patterns: d.freeze_patterns.clone(),
                ..Default::default()
            },
            ..cpu_options(task_of(&r))
        };
        let frozen = load_model(&dir, &o).unwrap_or_else(|e| panic!("{name}: freeze: {e}"));
        assert!(
            frozen
                .trainable_parameters()
                .iter()
                .all(|(n, _)| !n.starts_with(&base)),
            "{name}: the freeze patterns leave base parameters trainable: {:?}",
            frozen
                .trainable_parameters()
                .iter()
                .map(|(n, _)| n.clone())
                .filter(|n| n.starts_with(&base))
                .collect::<Vec<_>>()
        );
    }
}

fn base_prefix(fixture: &str) -> &'static str {
    match fixture.split('-').next().unwrap() {
        "roberta" | "xlm" => "roberta",
        "distilbert" => "distilbert",
        "deberta" => "deberta",
        _ => "model",
    }
}

/// The GPU mixed-precision path (bf16 frozen weights and activations, fp32 trainables) on CPU:
/// transformers' hidden states up to bf16 rounding, fp32 gradients.
#[test]
fn bf16_base_stays_close_and_keeps_fp32_gradients() {
    // Training-mode forwards draw dropout masks from libtorch's generator.
    let _g = lock();
    for (name, targets) in [
        ("xlm-roberta", None::<&str>),
        ("distilbert-odd", Some("all-linear")),
        ("deberta-odd", Some("all-linear")),
        ("modernbert-odd", None),
    ] {
        let r = reference(name);
        let o = LoadOptions {
            base_kind: Kind::BFloat16,
            lora: targets.map(|t| LoraOptions {
                r: 2,
                alpha: 4.0,
                dropout: 0.0,
                target_modules: vec![t.into()],
            }),
            ..cpu_options(task_of(&r))
        };
        let m = load_model(&fixture(name), &o).unwrap();
        let hidden = m.last_hidden_state(&batch(&r)).unwrap();
        assert_eq!(hidden.kind(), Kind::BFloat16, "{name}");
        let want = &r["last_hidden_state"];
        let diff = max_abs_diff(&hidden.to_kind(Kind::Float), want);
        let scale = f64::try_from(want.abs().max()).unwrap();
        assert!(
            diff < 0.05 * scale,
            "{name}: bf16 off by {diff} (scale {scale})"
        );
        let y = m.forward(&batch(&r), true).unwrap();
        y.to_kind(Kind::Float).square().mean(Kind::Float).backward();
        for (n, t) in m.trainable_parameters() {
            assert!(
                t.kind() == Kind::Float && t.grad().defined() && t.grad().kind() == Kind::Float,
                "{name}: {n} has no fp32 gradient"
            );
        }
        for (n, t) in m.all_parameters() {
            if !t.requires_grad() {
                assert_eq!(t.kind(), Kind::BFloat16, "{name}: frozen {n}");
                assert!(!t.grad().defined(), "{name}: frozen {n} got a gradient");
            }
        }
    }
}

/// A short classification run on `fixture` (`extra` adds to the job spec): the loss goes down
/// and the final model names the labels.
fn classification_run(fixture_name: &str, extra: serde_json::Value, factor: f64) {
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let mut body = json!({"task": "sequence_classification", "n_epochs": 10, "batch_size": 8,
        "learning_rate": 2e-3, "log_interval": 1, "validation_split": 0.0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = run(
        &fixture(fixture_name),
        &spec(body),
        &reviews(),
        dir.path(),
        None,
        None,
    );
    let (first, last) = (r.losses[0].1, r.losses.last().unwrap().1);
    assert!(
        last < first * factor,
        "{fixture_name}: loss {first} -> {last}"
    );
    let TrainOutcome::Done { final_dir, .. } = &r.outcome else {
        panic!("{:?}", r.outcome)
    };
    let cfg = if final_dir.join("config.json").is_file() {
        read_json(&final_dir.join("config.json"))
    } else {
        read_json(&final_dir.join("merged/config.json"))
    };
    assert_eq!(cfg["id2label"], json!({"0": "negative", "1": "positive"}));
}

#[test]
fn roberta_classification_trains() {
    classification_run("roberta", json!({}), 0.6);
}

#[test]
fn distilbert_classification_trains_with_lora() {
    classification_run(
        "distilbert",
        json!({"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "merge_lora": true,
               "learning_rate": 1e-2}),
        0.8,
    );
}

#[test]
fn deberta_classification_trains() {
    classification_run("deberta-v3", json!({}), 0.6);
}

#[test]
fn modernbert_classification_trains_with_lora() {
    classification_run(
        "modernbert",
        json!({"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "merge_lora": true,
               "learning_rate": 1e-2}),
        0.8,
    );
}

/// The encoders' exports: a full fine-tune, a LoRA adapter over a checkpoint without the
/// classification head, and merged LoRA, per family.
fn encoder_exports() -> Vec<Export> {
    vec![
        Export::new("roberta_full", "roberta", two_labels(), &[]).first(0),
        Export::new(
            "roberta_lora",
            "roberta",
            two_labels(),
            &["lora_B", "classifier"],
        )
        .lora(&["all-linear"])
        .first(0),
        Export::new("xlmr_merged", "xlm-roberta", three_labels(), &["lora_B"])
            .lora(&["query", "value"])
            .merged()
            .first(0),
        Export::new("distilbert_odd_full", "distilbert-odd", two_labels(), &[]).first(2),
        Export::new(
            "distilbert_lora",
            "distilbert",
            two_labels(),
            &["lora_B", "classifier"],
        )
        .lora(&["q_lin", "v_lin"])
        .first(2),
        Export::new("distilbert_merged", "distilbert", two_labels(), &["lora_B"])
            .lora(&["all-linear"])
            .merged()
            .first(2),
        Export::new("deberta_odd_full", "deberta-odd", three_labels(), &[]).first(1),
        Export::new(
            "deberta_v3_lora",
            "deberta-v3",
            two_labels(),
            &["lora_B", "pooler", "classifier"],
        )
        .lora(&["all-linear"])
        .first(1),
        Export::new(
            "deberta_odd_merged",
            "deberta-odd",
            three_labels(),
            &["lora_B"],
        )
        .lora(&["query_proj", "pos_key_proj", "pos_query_proj"])
        .merged()
        .first(1),
        Export::new("modernbert_odd_full", "modernbert-odd", two_labels(), &[]).first(1),
        Export::new(
            "modernbert_lora",
            "modernbert",
            two_labels(),
            &["lora_B", "head", "classifier"],
        )
        .lora(&["Wqkv", "Wi"])
        .first(1),
        Export::new("modernbert_merged", "modernbert", two_labels(), &["lora_B"])
            .lora(&["all-linear"])
            .merged()
            .first(1),
    ]
}

#[test]
fn encoder_exports_load_in_transformers_and_peft_with_equal_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cases: Vec<_> = encoder_exports().iter().map(|e| export(t, e)).collect();
    let (lines, theirs) = check_export(t, &cases);
    assert_equal_logits(&cases, &theirs);
    for v in &lines {
        let name = v["name"].as_str().unwrap();
        if name.ends_with("_full") {
            let arch = v["architectures"][0].as_str().unwrap();
            assert!(
                arch.ends_with("ForSequenceClassification"),
                "{name}: {arch}"
            );
        }
    }
    assert_eq!(lines.len(), cases.len(), "{lines:?}");
    // The adapters keep every part of the head (PEFT's modules_to_save).
    for (name, heads) in [
        ("roberta_lora", json!(["classifier"])),
        ("distilbert_lora", json!(["pre_classifier", "classifier"])),
        ("deberta_v3_lora", json!(["pooler", "classifier"])),
        ("modernbert_lora", json!(["head", "classifier"])),
    ] {
        let cfg = read_json(&t.join(name).join("adapter_config.json"));
        assert_eq!(cfg["modules_to_save"], heads, "{name}");
    }
    for c in cases.iter().filter(|c| c.name.ends_with("_full")) {
        assert_tuna_reloads(t, c);
    }
}

/// Checkpoints without the classification head (pre-training ones) get every part of it afresh,
/// and their pre-training heads are left unused, as the load notes say.
#[test]
fn heads_start_afresh_on_pretraining_checkpoints() {
    let load = |dir: &std::path::Path| load_model(dir, &cpu_options(two_labels())).unwrap();
    let notes = |dir: &std::path::Path| load(dir).load_notes().join("; ");
    let n = notes(&fixture("roberta"));
    for needle in [
        "classifier.dense initialised afresh",
        "classifier.out_proj initialised afresh",
        "not used (head of another task): lm_head.bias",
    ] {
        assert!(n.contains(needle), "roberta: {n}");
    }
    let n = notes(&fixture("distilbert"));
    assert!(n.contains("pre_classifier initialised afresh"), "{n}");
    let n = notes(&fixture("deberta-v3"));
    assert!(n.contains("pooler.dense initialised afresh"), "{n}");
    // ModernBERT's MLM checkpoint has the head the classifier starts from; without it, afresh.
    let n = notes(&fixture("modernbert"));
    assert!(!n.contains("head."), "{n}");
    let tmp = copy_fixture_with("modernbert", |t| {
        t.retain(|k, _| !k.starts_with("head."));
    });
    let m = load(tmp.path());
    let n = m.load_notes().join("; ");
    for needle in [
        "head.dense initialised afresh",
        "head.norm initialised afresh",
    ] {
        assert!(n.contains(needle), "{n}");
    }
    let w = &m.all_parameters()["head.norm.weight"];
    assert_eq!(
        w.eq(1.0).all().int64_value(&[]),
        1,
        "head.norm starts at ones"
    );
}

#[test]
fn encoders_refuse_causal_lm_and_a_config_tuna_cannot_train() {
    let msg = load_model(&fixture("roberta"), &cpu_options(TaskHead::CausalLm))
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("sequence_classification"), "{msg}");
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = read_json(&fixture("deberta-v3").join("config.json"));
    cfg["pos_att_type"] = json!("p2c|p2p");
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let msg = load_model(tmp.path(), &cpu_options(two_labels()))
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("`pos_att_type` 'p2p'"), "{msg}");
}
