//! The decoder families after the Llama family (Qwen3, Gemma 2, Gemma 3 text, Phi-3, OLMo 2)
//! on their tiny fixtures (`python/fixtures_decoders.py`): logits equal transformers' with a
//! right-padded row (fp32, within 1e-4); what tuna says of each model equals what transformers
//! says (`facts.json`); full fine-tunes, LoRA adapters and merged LoRA load in transformers /
//! PEFT with equal logits; bf16 runs stay close; and a short causal-LM run's loss goes down.

use std::collections::BTreeSet;

use serde_json::{json, Value};
use tch::Kind;
use tuna_train::load_model;
use tuna_train::model::{LoadOptions, LoraOptions, TaskHead};

use crate::export::{assert_exports_match, three_labels, Export};
use crate::parity::{
    assert_all_padding_row_finite, check_decoder_with, eval_logits, max_abs_diff, reference,
};
use crate::support::{cpu_options, fixture, lock};
use crate::train_loop::{run, spec, texts};

/// Every fixture of these families.
const FIXTURES: &[&str] = &[
    "qwen3",
    "qwen3-sliding",
    "gemma2",
    "gemma3",
    "phi3",
    "phi3-longrope",
    "olmo2",
];

fn parity(name: &str, alone: bool) {
    let diff = check_decoder_with(name, alone);
    eprintln!("{name}: max |tuna - transformers| = {diff:.2e}");
}

#[test]
fn qwen3_qk_norm_tied_matches_transformers() {
    parity("qwen3", true);
}

#[test]
fn qwen3_uneven_heads_sliding_layers_old_keys_match_transformers() {
    parity("qwen3-sliding", true);
}

#[test]
fn gemma2_soft_caps_sliding_layers_old_keys_match_transformers() {
    parity("gemma2", true);
}

#[test]
fn gemma3_qk_norm_local_rope_untied_matches_transformers() {
    parity("gemma3", true);
}

#[test]
fn phi3_fused_projections_sliding_window_old_keys_match_transformers() {
    parity("phi3", true);
}

#[test]
fn phi3_longrope_partial_rotary_beyond_original_length_matches_transformers() {
    // The 7-token row alone is within the original length, so it gets the short factors.
    parity("phi3-longrope", false);
}

#[test]
fn olmo2_post_norms_qk_norm_bias_matches_transformers() {
    parity("olmo2", true);
}

/// What `GET /v1/models/{id}` shows equals what transformers says of the fixture: its
/// `num_parameters()` (which the loaded model also holds) and its linear modules (the LoRA
/// targets, PEFT's names for them).
#[test]
fn described_facts_equal_transformers() {
    for name in FIXTURES {
        let dir = fixture(name);
        let facts = facts(&dir);
        let hf = tuna_train::models::read_config(&dir).unwrap();
        let d = hf.describe();
        assert_eq!(
            d.num_parameters,
            facts["num_parameters"].as_i64().unwrap(),
            "{name}"
        );
        let m = load_model(&dir, &cpu_options(TaskHead::CausalLm)).unwrap();
        let held: i64 = m.all_parameters().values().map(|t| t.numel() as i64).sum();
        assert_eq!(held, d.num_parameters, "{name}: loaded parameters");
        let theirs: BTreeSet<String> =
            serde_json::from_value(facts["linear_modules"].clone()).unwrap();
        let ours: BTreeSet<String> = d
            .lora_target_modules
            .iter()
            .filter(|t| *t != "all-linear")
            .cloned()
            .collect();
        assert_eq!(ours, theirs, "{name}: LoRA target names");
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let want = [
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        ]
        .map(|k| cfg[k].as_i64().unwrap());
        assert_eq!(
            [d.dims.num_layers, d.dims.num_heads, d.dims.num_kv_heads],
            want,
            "{name}"
        );
    }
}

/// Per family: a full fine-tune, a LoRA adapter (with the fused names on Phi-3) and LoRA merged
/// into full weights; Gemma 3 also as a classifier (`Gemma3TextForSequenceClassification`).
#[test]
fn decoder_exports_load_in_transformers_and_peft_with_equal_logits() {
    let causal = || TaskHead::CausalLm;
    assert_exports_match(&[
        Export::new("qwen3_full", "qwen3-sliding", causal(), &[]).first(1),
        Export::new("qwen3_lora", "qwen3", causal(), &["lora_B"])
            .lora(&["all-linear"])
            .first(1),
        Export::new("qwen3_merged", "qwen3-sliding", causal(), &["lora_B"])
            .lora(&["q_proj", "down_proj"])
            .merged(),
        Export::new("gemma2_full", "gemma2", causal(), &[]).first(1),
        Export::new("gemma2_lora", "gemma2", causal(), &["lora_B"]).lora(&["all-linear"]),
        Export::new("gemma2_merged", "gemma2", causal(), &["lora_B"])
            .lora(&["k_proj", "up_proj"])
            .merged(),
        Export::new("gemma3_full", "gemma3", causal(), &[]),
        Export::new("gemma3_lora", "gemma3", causal(), &["lora_B"]).lora(&["q_proj", "v_proj"]),
        Export::new("gemma3_merged", "gemma3", causal(), &["lora_B"])
            .lora(&["all-linear"])
            .merged(),
        Export::new(
            "gemma3_lora_cls",
            "gemma3",
            three_labels(),
            &["lora_B", "score"],
        )
        .lora(&["o_proj"]),
        Export::new("phi3_full", "phi3", causal(), &[]).first(1),
        Export::new("phi3_lora", "phi3", causal(), &["lora_B"]).lora(&["qkv_proj", "gate_up_proj"]),
        Export::new("phi3_merged", "phi3-longrope", causal(), &["lora_B"])
            .lora(&["all-linear"])
            .merged(),
        Export::new("olmo2_full", "olmo2", causal(), &[]),
        Export::new("olmo2_lora", "olmo2", causal(), &["lora_B"]).lora(&["all-linear"]),
        Export::new("olmo2_merged", "olmo2", causal(), &["lora_B"])
            .lora(&["v_proj", "gate_proj"])
            .merged(),
    ]);
}

fn facts(dir: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("facts.json")).unwrap()).unwrap()
}

/// The GPU path (bf16 frozen weights and activations) on CPU: each family's norms, scales and
/// soft-caps in bf16 land within 5% of the logits' scale from transformers' fp32 logits, or
/// within twice the distance of transformers' own bf16 forward where that is wider (the Gemma
/// fixtures' soft-caps squeeze the logits' scale, not their rounding).
#[test]
fn bf16_logits_stay_close() {
    let mut report = Vec::new();
    for name in FIXTURES {
        let dir = fixture(name);
        let r = reference(&dir);
        // A LoRA adapter (B = 0: no change) keeps every base weight frozen, so in bf16.
        let o = LoadOptions {
            base_kind: Kind::BFloat16,
            lora: Some(LoraOptions {
                r: 2,
                alpha: 4.0,
                dropout: 0.0,
                target_modules: vec!["o_proj".into()],
            }),
            ..cpu_options(TaskHead::CausalLm)
        };
        let m = load_model(&dir, &o).unwrap();
        let logits = eval_logits(m.as_ref(), &r["input_ids"], &r["attention_mask"]);
        assert_eq!(logits.kind(), Kind::BFloat16);
        let want = &r["logits"];
        let diff = max_abs_diff(&logits.to_kind(Kind::Float), want);
        let scale = f64::try_from(want.abs().max()).unwrap();
        let theirs = facts(&dir)["bf16_logits_max_diff"].as_f64().unwrap();
        report.push(format!(
            "{name}: tuna bf16 {diff:.3}, transformers bf16 {theirs:.3}, scale {scale:.2}"
        ));
        assert!(
            diff < (0.05 * scale).max(2.0 * theirs),
            "{}",
            report.join("\n")
        );
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn all_padding_rows_stay_finite() {
    for name in ["gemma2", "gemma3", "phi3", "olmo2"] {
        let m = load_model(&fixture(name), &cpu_options(TaskHead::CausalLm)).unwrap();
        assert_all_padding_row_finite(name, m.as_ref());
    }
}

/// A short causal-LM job per family through `trainer::train`: the loss goes down.
#[test]
fn causal_lm_loss_goes_down() {
    let _g = lock();
    let s = spec(
        json!({"n_epochs": 4, "batch_size": 4, "learning_rate": 3e-3, "log_interval": 1,
        "validation_split": 0.0, "warmup_steps": 2}),
    );
    let mut report = Vec::new();
    for name in ["qwen3", "gemma2", "gemma3", "phi3", "olmo2"] {
        let dir = tempfile::tempdir().unwrap();
        let r = run(&fixture(name), &s, &texts(), dir.path(), None, None);
        let (first, last) = (r.losses[0].1, r.losses.last().unwrap().1);
        report.push((name, first, last));
    }
    eprintln!("{report:?}");
    for (name, first, last) in &report {
        assert!(last < &(first * 0.7), "{name}: loss {first} -> {last}");
    }
}
