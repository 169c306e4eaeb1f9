//! The memory planner (`tuna_core::memory`) counts from config.json alone what the model really
//! trains: under LoRA on every linear layer, its adapter parameters equal those of the loaded
//! model, for every family's fixtures.

use serde_json::json;
use tuna_core::memory::trainable_parameters;
use tuna_core::spec::parse_create_request;
use tuna_train::load_model;
use tuna_train::model::{LoadOptions, LoraOptions, Model, TaskHead};
use tuna_train::models::read_config;

use crate::support::{cpu_options, fixture};

#[test]
fn planned_lora_parameters_equal_the_models_adapters() {
    let spec = parse_create_request(
        &json!({"model": "m", "training_file": "f", "lora_r": 4}),
        &Default::default(),
        0,
    )
    .unwrap()
    .spec;
    let mut checked = Vec::new();
    for name in [
        "gpt2",
        "llama",
        "qwen2",
        "mistral",
        "qwen3",
        "gemma2",
        "gemma3",
        "phi3",
        "olmo2",
        "bert",
        "roberta",
        "distilbert",
        "deberta-v3",
        "deberta-odd",
        "modernbert",
    ] {
        let dir = fixture(name);
        let hf = read_config(&dir).unwrap();
        let task = if hf.is_decoder() {
            TaskHead::CausalLm
        } else {
            // The labels of a fixture saved with a classification head.
            let id2label = hf.common.id2label.clone();
            TaskHead::SequenceClassification {
                id2label: id2label.unwrap_or_else(|| vec!["a".into(), "b".into()]),
                problem_type: Default::default(),
            }
        };
        let opts = LoadOptions {
            lora: Some(LoraOptions {
                r: 4,
                alpha: 8.0,
                dropout: 0.0,
                target_modules: vec!["all-linear".into()],
            }),
            ..cpu_options(task)
        };
        let model = load_model(&dir, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        let adapters: i64 = adapter_parameters(model.as_ref());
        let planned = trainable_parameters(&hf, &spec) as i64;
        assert_eq!(
            planned, adapters,
            "{name}: planned LoRA parameters against the model's adapters"
        );
        checked.push(name);
    }
    assert_eq!(checked.len(), 15);
}

fn adapter_parameters(m: &dyn Model) -> i64 {
    m.trainable_parameters()
        .iter()
        .filter(|(n, _)| n.contains("lora_"))
        .map(|(_, t)| t.numel() as i64)
        .sum()
}
