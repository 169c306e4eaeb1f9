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
    assert_eq!(c.tasks(), Task::ALL[1..].to_vec());
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
    assert_eq!(c.tasks(), Task::ALL[1..].to_vec());
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

fn deberta_v3_base() -> Value {
    json!({
        "model_type": "deberta-v2", "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02,
        "intermediate_size": 3072, "max_position_embeddings": 512, "relative_attention": true,
        "position_buckets": 256, "norm_rel_ebd": "layer_norm", "share_att_key": true,
        "pos_att_type": "p2c|c2p", "layer_norm_eps": 1e-7, "max_relative_positions": -1,
        "position_biased_input": false, "num_attention_heads": 12, "num_hidden_layers": 12,
        "type_vocab_size": 0, "vocab_size": 128100
    })
}

#[test]
fn deberta_v3_and_v2_facts() {
    let c = parse(&deberta_v3_base());
    assert_eq!(c.family(), "deberta-v2");
    assert_eq!(c.tasks(), Task::ALL[1..].to_vec());
    assert_eq!(c.num_parameters(), 183_831_552, "deberta-v3-base");
    let Arch::DebertaV2(d) = &c.arch else {
        panic!()
    };
    let rel = d.relative.as_ref().unwrap();
    assert_eq!((rel.att_span(), rel.max_relative_positions), (256, 512));
    assert!(d.c2p && d.p2c && d.share_att_key && d.norm_rel_ebd && d.conv.is_none());
    assert_eq!(
        c.module_names(),
        vec!["query_proj", "key_proj", "value_proj", "dense"]
    );
    assert_eq!(
        c.freeze_patterns().last().map(String::as_str),
        Some("encoder.LayerNorm.*")
    );
    // The 5.x list form of pos_att_type reads the same.
    let mut v = deberta_v3_base();
    v["pos_att_type"] = json!(["p2c", "c2p"]);
    assert_eq!(parse(&v).arch, c.arch);

    // v2-xlarge: the convolution after the first layer, an explicit head size.
    let mut v = deberta_v3_base();
    let m = v.as_object_mut().unwrap();
    for (k, x) in [
        ("hidden_size", json!(1536)),
        ("intermediate_size", json!(6144)),
        ("num_attention_heads", json!(24)),
        ("attention_head_size", json!(64)),
        ("num_hidden_layers", json!(24)),
        ("conv_kernel_size", json!(3)),
        ("conv_act", json!("gelu")),
    ] {
        m.insert(k.into(), x);
    }
    let c = parse(&v);
    assert_eq!(c.num_parameters(), 884_593_152, "deberta-v2-xlarge");
    assert_eq!(
        c.freeze_patterns().last().map(String::as_str),
        Some("encoder.conv.*")
    );
}

#[test]
fn deberta_separate_position_projections_are_lora_targets() {
    let mut v = deberta_v3_base();
    v["share_att_key"] = json!(false);
    v["pos_att_type"] = json!("c2p");
    let c = parse(&v);
    assert_eq!(
        c.module_names(),
        vec![
            "query_proj",
            "key_proj",
            "value_proj",
            "pos_key_proj",
            "dense"
        ]
    );
    // One extra 768 × 768 projection with bias per layer.
    let shared = parse(&deberta_v3_base()).num_parameters();
    assert_eq!(c.num_parameters(), shared + 12 * (768 * 768 + 768));
}

#[test]
fn deberta_refusals_name_the_field() {
    for (key, value, needle) in [
        ("pos_att_type", json!("c2p|p2p"), "`pos_att_type` 'p2p'"),
        ("embedding_size", json!(128), "`embedding_size` (128)"),
        (
            "norm_rel_ebd",
            json!("rms_norm"),
            "`norm_rel_ebd` 'rms_norm'",
        ),
        (
            "attention_head_size",
            json!(32),
            "`attention_head_size` (32)",
        ),
        ("conv_kernel_size", json!(2), "`conv_kernel_size`"),
        ("position_buckets", json!(1024), "`position_buckets` (1024)"),
        (
            "hidden_act",
            json!("quick_gelu"),
            "`hidden_act` 'quick_gelu'",
        ),
    ] {
        let mut v = deberta_v3_base();
        v[key] = value;
        let e = refusal(&v);
        assert!(e.contains(needle), "{key}: {e}");
    }
}

fn modernbert_base() -> Value {
    json!({
        "architectures": ["ModernBertForMaskedLM"], "attention_bias": false,
        "attention_dropout": 0.0, "bos_token_id": 50281, "classifier_activation": "gelu",
        "classifier_bias": false, "classifier_dropout": 0.0, "classifier_pooling": "mean",
        "cls_token_id": 50281, "decoder_bias": true, "deterministic_flash_attn": false,
        "embedding_dropout": 0.0, "eos_token_id": 50282, "global_attn_every_n_layers": 3,
        "global_rope_theta": 160000.0, "gradient_checkpointing": false,
        "hidden_activation": "gelu", "hidden_size": 768, "initializer_cutoff_factor": 2.0,
        "initializer_range": 0.02, "intermediate_size": 1152, "layer_norm_eps": 1e-05,
        "local_attention": 128, "local_rope_theta": 10000.0, "max_position_embeddings": 8192,
        "mlp_bias": false, "mlp_dropout": 0.0, "model_type": "modernbert", "norm_bias": false,
        "norm_eps": 1e-05, "num_attention_heads": 12, "num_hidden_layers": 22,
        "pad_token_id": 50283, "position_embedding_type": "absolute", "sep_token_id": 50282,
        "tie_word_embeddings": true, "torch_dtype": "float32",
        "transformers_version": "4.47.0.dev0", "vocab_size": 50368
    })
}

#[test]
fn modernbert_facts_and_both_key_forms() {
    let c = parse(&modernbert_base());
    assert_eq!(c.family(), "modernbert");
    assert_eq!(c.tasks(), Task::ALL[1..].to_vec());
    assert_eq!(c.num_parameters(), 149_014_272, "ModernBERT-base");
    assert_eq!(c.dims().context_length, 8192);
    assert_eq!(c.module_names(), vec!["Wqkv", "Wo", "Wi"]);
    assert_eq!(c.linear_modules()[0], "layers.0.attn.Wqkv");
    let Arch::ModernBert(m) = &c.arch else {
        panic!()
    };
    assert_eq!(&m.local_layers[..4], &[false, true, true, false]);
    assert_eq!(
        (m.global_rope_theta, m.local_rope_theta),
        (160000.0, 10000.0)
    );
    assert_eq!(m.classifier_pooling, Pooling::Mean);

    // As transformers ≥ 5 writes it.
    let mut v = modernbert_base();
    let o = v.as_object_mut().unwrap();
    for k in [
        "global_attn_every_n_layers",
        "global_rope_theta",
        "local_rope_theta",
    ] {
        o.remove(k);
    }
    let types: Vec<&str> = (0..22)
        .map(|i| {
            if i % 3 == 0 {
                "full_attention"
            } else {
                "sliding_attention"
            }
        })
        .collect();
    o.insert("layer_types".into(), json!(types));
    o.insert(
        "rope_parameters".into(),
        json!({"full_attention": {"rope_type": "default", "rope_theta": 160000.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    );
    assert_eq!(parse(&v).arch, c.arch);
}

#[test]
fn modernbert_refusals_name_the_field() {
    let mut v = modernbert_base();
    v["rope_parameters"] = json!({"full_attention": {"rope_type": "yarn", "factor": 4.0}});
    let e = refusal(&v);
    assert!(
        e.contains("`rope_parameters.full_attention.rope_type` 'yarn'"),
        "{e}"
    );
    let mut v = modernbert_base();
    v["classifier_pooling"] = json!("max");
    assert!(refusal(&v).contains("`classifier_pooling` 'max'"));
    let mut v = modernbert_base();
    v["layer_types"] = json!(["full_attention"]);
    assert!(refusal(&v).contains("`layer_types` has 1 entries for 22 layers"));
    let mut v = modernbert_base();
    v["layer_types"] = json!(vec!["chunked_attention"; 22]);
    assert!(refusal(&v).contains("'chunked_attention'"));
}

#[test]
fn encoders_are_listed_among_the_supported_types() {
    let e = refusal(&json!({"model_type": "electra"}));
    for t in [
        "roberta",
        "xlm-roberta",
        "distilbert",
        "deberta-v2",
        "modernbert",
    ] {
        assert!(e.contains(t), "{t}: {e}");
    }
}
