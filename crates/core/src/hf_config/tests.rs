//! config.json parsing across the families: both key forms, defaults, facts, errors.

use super::*;
use serde_json::json;

fn llama_new() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16",
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009], "tie_word_embeddings": true,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    })
}

#[test]
fn llama_new_and_old_keys_resolve_the_same() {
    let new = HfConfig::from_value(&llama_new()).unwrap();
    let old = HfConfig::parse(
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009], "tie_word_embeddings": true,
        "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#,
    )
    .unwrap();
    assert_eq!(new, old);
    let Arch::Llama(c) = &new.arch else { panic!() };
    assert_eq!(c.shape.head_dim, 64);
    assert_eq!(c.rope.theta, 500000.0);
    assert!(
        matches!(c.rope.scaling, RopeScaling::Llama3 { factor, original_max_position_embeddings: 8192, .. } if factor == 32.0)
    );
    assert_eq!(new.common.dtype.as_deref(), Some("bfloat16"));
    assert_eq!(new.common.eos_token_ids, vec![128001, 128008, 128009]);
    assert!(new.common.tie_word_embeddings);
    assert_eq!(new.num_parameters(), 1_235_814_400, "Llama-3.2-1B");
    assert_eq!(new.dims().num_kv_heads, 8);
    assert_eq!(new.dims().context_length, 131072);
}

#[test]
fn old_type_key_and_null_scaling() {
    let mut v = llama_new();
    let m = v.as_object_mut().unwrap();
    m.remove("rope_parameters");
    m.insert(
        "rope_scaling".into(),
        json!({"type": "linear", "factor": 2.0}),
    );
    let c = HfConfig::from_value(&v).unwrap();
    let Arch::Llama(l) = c.arch else { panic!() };
    assert_eq!(l.rope.scaling, RopeScaling::Linear { factor: 2.0 });
    assert_eq!(l.rope.theta, 10000.0);
    let m = v.as_object_mut().unwrap();
    m.insert("rope_scaling".into(), Value::Null);
    m.insert("rope_theta".into(), json!(1e6));
    let Arch::Llama(l) = HfConfig::from_value(&v).unwrap().arch else {
        panic!()
    };
    assert_eq!(l.rope.scaling, RopeScaling::Default);
    assert_eq!(l.rope.theta, 1e6);
}

#[test]
fn qwen2_has_qkv_bias_and_untied_default() {
    let c = HfConfig::from_value(&json!({
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "use_sliding_window": false,
        "sliding_window": 32768, "max_window_layers": 21, "tie_word_embeddings": true
    }))
    .unwrap();
    let Arch::Llama(l) = &c.arch else { panic!() };
    assert!(l.qkv_bias && !l.o_bias);
    assert_eq!(l.sliding_window, None);
    assert_eq!(l.shape.head_dim, 64);
    // No question answering on the Llama-style decoders yet.
    assert_eq!(c.tasks(), Task::ALL[..5].to_vec());
}

#[test]
fn mistral_sliding_window() {
    let c = HfConfig::from_value(&json!({
        "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 32768, "sliding_window": 4096
    }))
    .unwrap();
    let Arch::Llama(l) = &c.arch else { panic!() };
    assert_eq!(l.sliding_window, Some(4096));
    assert!(!c.common.tie_word_embeddings);
}

#[test]
fn gpt2_and_module_names() {
    let c = HfConfig::parse(
        r#"{"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768,
            "n_layer": 12, "n_head": 12, "eos_token_id": 50256}"#,
    )
    .unwrap();
    assert_eq!(c.family(), "gpt2");
    assert_eq!(module_names(&c), vec!["c_attn", "c_proj", "c_fc"]);
    assert_eq!(c.linear_modules().len(), 48);
    assert_eq!(c.linear_modules()[0], "transformer.h.0.attn.c_attn");
    let Arch::Gpt2(g) = &c.arch else { panic!() };
    assert_eq!(g.n_inner, 3072);
    assert_eq!(c.num_parameters(), 124_439_808, "GPT-2 small");
    assert_eq!(g.activation_function, "gelu_new");
    assert!(c.common.tie_word_embeddings);
    let d = c.describe();
    assert_eq!(d.dims.context_length, 1024);
    assert!(d.lora_target_modules.contains(&"all-linear".to_string()));
}

#[test]
fn bert_is_classification_only_with_labels() {
    let c = HfConfig::parse(
        r#"{"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 384,
            "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
            "max_position_embeddings": 512, "id2label": {"1": "positive", "0": "negative"}}"#,
    )
    .unwrap();
    assert_eq!(c.tasks(), Task::ALL[1..].to_vec());
    assert_eq!(
        c.common.id2label,
        Some(vec!["negative".to_string(), "positive".to_string()])
    );
    assert_eq!(c.module_names(), vec!["query", "key", "value", "dense"]);
    assert!(c.linear_modules().contains(&"pooler.dense".to_string()));
    assert_eq!(c.num_parameters(), 22_713_216, "all-MiniLM-L6-v2");
}

#[test]
fn clear_errors() {
    let e = HfConfig::parse(r#"{"model_type": "t5"}"#).unwrap_err();
    assert!(e.to_string().contains("'t5' is not supported"), "{e}");
    assert!(e.to_string().contains("llama"), "{e}");
    let e = HfConfig::parse("{").unwrap_err();
    assert!(e.to_string().contains("not valid JSON"), "{e}");
    let e = HfConfig::parse(r#"{"vocab_size": 3}"#).unwrap_err();
    assert!(e.to_string().contains("`model_type` is missing"), "{e}");
    let mut v = llama_new();
    v["num_key_value_heads"] = json!(5);
    let e = HfConfig::from_value(&v).unwrap_err();
    assert!(
        e.to_string().contains("multiple of num_key_value_heads"),
        "{e}"
    );
    let mut v = llama_new();
    v["rope_parameters"]["rope_type"] = json!("longrope");
    let e = HfConfig::from_value(&v).unwrap_err();
    assert!(e.to_string().contains("'longrope' is not supported"), "{e}");
    let mut v = llama_new();
    v.as_object_mut().unwrap().remove("hidden_size");
    let e = HfConfig::from_value(&v).unwrap_err();
    assert!(e.to_string().contains("`hidden_size` is missing"), "{e}");
}

#[test]
fn gpt2_accepts_the_names_transformers_maps_and_float_integers() {
    let plain = HfConfig::parse(
        r#"{"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768,
            "n_layer": 12, "n_head": 12}"#,
    )
    .unwrap();
    let mapped = HfConfig::parse(
        r#"{"model_type": "gpt2", "vocab_size": 50257.0, "max_position_embeddings": 1024,
            "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}"#,
    )
    .unwrap();
    assert_eq!(plain, mapped);
    let e = HfConfig::parse(
        r#"{"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768.5,
            "n_layer": 12, "n_head": 12}"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("`n_embd`"), "{e}");
    assert!(e.to_string().contains("expected an integer"), "{e}");
}
