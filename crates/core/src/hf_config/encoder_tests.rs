//! The encoder families beyond BERT, on their published config.json files: the facts the API
//! shows (sizes, parameter count as transformers' `base_model.num_parameters()` counts it for
//! the classification model, LoRA targets, freeze patterns, tasks), both key forms where they
//! differ, and refusals that name the field.

use super::*;
use serde_json::json;

fn parse(v: &Value) -> HfConfig {
    HfConfig::from_value(v).unwrap()
}

fn refusal(v: &Value) -> String {
    HfConfig::from_value(v).unwrap_err().to_string()
}

fn roberta_base() -> Value {
    json!({
        "architectures": ["RobertaForMaskedLM"], "attention_probs_dropout_prob": 0.1,
        "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
        "layer_norm_eps": 1e-05, "max_position_embeddings": 514, "model_type": "roberta",
        "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
        "type_vocab_size": 1, "vocab_size": 50265
    })
}

#[test]
fn roberta_and_xlm_roberta_facts() {
    let c = parse(&roberta_base());
    assert_eq!(c.family(), "roberta");
    assert_eq!(c.tasks(), vec![Task::SequenceClassification]);
    assert_eq!(c.num_parameters(), 124_055_040, "roberta-base");
    // Positions start after the padding index: 514 - 1 - 1 tokens.
    assert_eq!(c.dims().context_length, 512);
    let d = c.describe();
    assert_eq!(
        d.lora_target_modules,
        vec!["query", "key", "value", "dense", "all-linear"]
    );
    assert!(!d.freeze_patterns.iter().any(|p| p.contains("pooler")));
    assert!(!c.linear_modules().iter().any(|m| m.contains("pooler")));
    let Arch::Roberta(r) = &c.arch else { panic!() };
    assert_eq!(r.padding_idx, 1);
    assert_eq!(r.bert.layer_norm_eps, 1e-5);

    let mut x = roberta_base();
    x["model_type"] = json!("xlm-roberta");
    x["vocab_size"] = json!(250002);
    x["position_embedding_type"] = json!("absolute");
    let x = parse(&x);
    assert_eq!(x.family(), "roberta");
    assert_eq!(x.num_parameters(), 277_453_056, "xlm-roberta-base");
}

#[test]
fn roberta_refusals_name_the_field() {
    let mut v = roberta_base();
    v["position_embedding_type"] = json!("relative_key");
    let e = refusal(&v);
    assert!(
        e.contains("RoBERTa `position_embedding_type` 'relative_key'"),
        "{e}"
    );
    let mut v = roberta_base();
    v["model_type"] = json!("xlm-roberta");
    v["is_decoder"] = json!(true);
    let e = refusal(&v);
    assert!(
        e.contains("XLM-RoBERTa as a decoder") && e.contains("`is_decoder`"),
        "{e}"
    );
    let mut v = roberta_base();
    v["pad_token_id"] = json!(513);
    assert!(refusal(&v).contains("`pad_token_id` (513)"));
}

fn distilbert_base() -> Value {
    json!({
        "activation": "gelu", "architectures": ["DistilBertForMaskedLM"], "attention_dropout": 0.1,
        "dim": 768, "dropout": 0.1, "hidden_dim": 3072, "initializer_range": 0.02,
        "max_position_embeddings": 512, "model_type": "distilbert", "n_heads": 12, "n_layers": 6,
        "pad_token_id": 0, "qa_dropout": 0.1, "seq_classif_dropout": 0.2,
        "sinusoidal_pos_embds": false, "tie_weights_": true,
        "transformers_version": "4.10.0.dev0", "vocab_size": 30522
    })
}

#[test]
fn distilbert_facts_and_bert_style_names() {
    let c = parse(&distilbert_base());
    assert_eq!(c.family(), "distilbert");
    assert_eq!(c.tasks(), vec![Task::SequenceClassification]);
    assert_eq!(c.num_parameters(), 66_362_880, "distilbert-base-uncased");
    let d = c.dims();
    assert_eq!((d.num_layers, d.hidden_size, d.num_heads), (6, 768, 12));
    assert_eq!(
        c.module_names(),
        vec!["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"]
    );
    assert_eq!(c.linear_modules()[0], "transformer.layer.0.attention.q_lin");
    assert!(c
        .freeze_patterns()
        .contains(&"transformer.layer.*.ffn.*".to_string()));
    // The names transformers' attribute_map accepts resolve the same.
    let mut v = distilbert_base();
    let m = v.as_object_mut().unwrap();
    for (old, new) in [
        ("dim", "hidden_size"),
        ("n_layers", "num_hidden_layers"),
        ("n_heads", "num_attention_heads"),
    ] {
        let x = m.remove(old).unwrap();
        m.insert(new.into(), x);
    }
    assert_eq!(parse(&v).arch, c.arch);
    let mut v = distilbert_base();
    v.as_object_mut().unwrap().remove("hidden_dim");
    assert!(refusal(&v).contains("`hidden_dim` is missing"));
    let mut v = distilbert_base();
    v["n_heads"] = json!(5);
    assert!(refusal(&v).contains("dim (768) is not divisible"));
}

#[test]
fn encoders_are_listed_among_the_supported_types() {
    let e = refusal(&json!({"model_type": "electra"}));
    for t in ["roberta", "xlm-roberta", "distilbert"] {
        assert!(e.contains(t), "{t}: {e}");
    }
}
