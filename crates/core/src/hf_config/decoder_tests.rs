//! config.json parsing of the Qwen3, Gemma 2 / 3, Phi-3 and OLMo 2 families: both key forms,
//! the facts the API shows (parameter counts are transformers' `num_parameters()` for the same
//! config), and the features refused with the field named.

use super::*;
use serde_json::json;

fn parse(v: &Value) -> HfConfig {
    HfConfig::from_value(v).unwrap_or_else(|e| panic!("{e}"))
}

fn refused(v: &Value) -> String {
    match HfConfig::from_value(v) {
        Ok(c) => panic!("accepted: {c:?}"),
        Err(e) => e.to_string(),
    }
}

/// What `GET /v1/models/{id}` shows: layers, heads, KV heads, parameters, LoRA targets, tasks.
fn assert_facts(c: &HfConfig, family: &str, layers_heads_kv: [i64; 3], params: i64, lora: &[&str]) {
    let d = c.describe();
    assert_eq!(d.family, family);
    assert_eq!(
        [d.dims.num_layers, d.dims.num_heads, d.dims.num_kv_heads],
        layers_heads_kv
    );
    assert_eq!(d.num_parameters, params, "transformers' num_parameters()");
    let mut want: Vec<String> = lora.iter().map(|s| s.to_string()).collect();
    want.push("all-linear".into());
    assert_eq!(d.lora_target_modules, want);
    // transformers has no *ForTokenClassification for Gemma 3 and OLMo 2.
    let token_cls = !matches!(c.model_type(), "gemma3_text" | "olmo2");
    let tasks: Vec<Task> = Task::ALL
        .into_iter()
        .filter(|t| token_cls || *t != Task::TokenClassification)
        // Question answering: GPT-2 only among the decoders, so far.
        .filter(|t| *t != Task::QuestionAnswering)
        .collect();
    assert_eq!(d.tasks, tasks);
    // The memory planner's LoRA sizes: one (in, out) per linear module of a layer, whose
    // weights add up to the attention and MLP parameters.
    let f = c.arch.facts();
    let shapes = f.layer_linear_shapes();
    assert_eq!(shapes.len(), f.layer_linears().len());
    let weights: i64 = shapes.iter().map(|(i, o)| i * o).sum();
    let s = match &c.arch {
        Arch::Llama(x) => &x.shape,
        Arch::Qwen3(x) => &x.shape,
        Arch::Gemma(x) => &x.shape,
        Arch::Phi3(x) => &x.shape,
        Arch::Olmo2(x) => &x.shape,
        _ => unreachable!("a decoder"),
    };
    assert_eq!(
        weights,
        s.attention_parameters(false, false) + s.mlp_parameters()
    );
    assert_eq!(f.intermediate_size(), s.intermediate_size);
    assert!(d
        .freeze_patterns
        .contains(&"model.layers.*.self_attn.*".to_string()));
}

const SPLIT: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Shaped like Qwen3-0.6B, as transformers ≥ 5 writes it.
fn qwen3() -> Value {
    json!({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "dtype": "bfloat16",
        "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": true, "attention_bias": false, "use_sliding_window": false,
        "sliding_window": null, "max_window_layers": 28,
        "layer_types": vec!["full_attention"; 28],
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}
    })
}

#[test]
fn qwen3_keys_facts_and_sliding_layers() {
    let new = parse(&qwen3());
    let mut old = qwen3();
    let m = old.as_object_mut().unwrap();
    for k in ["rope_parameters", "layer_types", "dtype"] {
        m.remove(k);
    }
    m.insert("rope_theta".into(), json!(1000000.0));
    m.insert("rope_scaling".into(), Value::Null);
    m.insert("torch_dtype".into(), json!("bfloat16"));
    assert_eq!(parse(&old), new);
    assert_facts(&new, "qwen3", [28, 16, 8], 596_049_920, SPLIT);
    let Arch::Qwen3(q) = &new.arch else { panic!() };
    assert_eq!((q.shape.head_dim, q.sliding_window), (128, None));
    // head_dim is not hidden / heads (64) when left out: transformers defaults it to 128.
    let mut v = qwen3();
    v.as_object_mut().unwrap().remove("head_dim");
    let Arch::Qwen3(q) = parse(&v).arch else {
        panic!()
    };
    assert_eq!(q.shape.head_dim, 128);
    // With use_sliding_window, the layers from max_window_layers on attend through the window.
    let mut v = old;
    v["use_sliding_window"] = json!(true);
    v["sliding_window"] = json!(512);
    v["max_window_layers"] = json!(26);
    let Arch::Qwen3(q) = parse(&v).arch else {
        panic!()
    };
    assert_eq!(q.sliding_window, Some(512));
    assert_eq!(q.layer_types[25], LayerType::FullAttention);
    assert_eq!(q.layer_types[26], LayerType::SlidingAttention);
    v["layer_types"] = json!(["full_attention"]);
    assert!(refused(&v).contains("`layer_types` lists 1 layers, the model has 28"));
}

/// Shaped like gemma-2-2b, as transformers 4.42 wrote it.
fn gemma2_old() -> Value {
    json!({
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "torch_dtype": "float32",
        "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0, "rope_theta": 10000.0, "cache_implementation": "hybrid",
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2
    })
}

#[test]
fn gemma2_facts_layer_pattern_soft_caps_and_nulls() {
    let c = parse(&gemma2_old());
    assert_facts(&c, "gemma", [26, 8, 4], 2_614_341_888, SPLIT);
    assert!(c.common.tie_word_embeddings, "Gemma ties by default");
    let Arch::Gemma(g) = &c.arch else { panic!() };
    assert_eq!(g.layer_types[0], LayerType::SlidingAttention);
    assert_eq!(g.layer_types[1], LayerType::FullAttention);
    assert_eq!(g.attn_logit_softcapping, Some(50.0));
    assert_eq!(g.final_logit_softcapping, Some(30.0));
    assert_eq!(
        (g.sliding_window, g.qk_norm, g.local_rope.is_none()),
        (Some(4096), false, true)
    );
    // Left out, the soft-caps take Gemma 2's defaults; written as null, they are off.
    let mut v = gemma2_old();
    let m = v.as_object_mut().unwrap();
    m.remove("attn_logit_softcapping");
    m.insert("final_logit_softcapping".into(), Value::Null);
    let Arch::Gemma(g) = parse(&v).arch else {
        panic!()
    };
    assert_eq!(
        (g.attn_logit_softcapping, g.final_logit_softcapping),
        (Some(50.0), None)
    );
    let mut v = gemma2_old();
    v["use_bidirectional_attention"] = json!(true);
    assert!(refused(&v).contains("`use_bidirectional_attention` is not supported"));
    v["use_bidirectional_attention"] = json!(null);
    v["rope_scaling"] = json!({"rope_type": "longrope", "factor": 2.0});
    let e = refused(&v);
    assert!(
        e.contains("`rope_scaling`: rope type 'longrope' is not supported"),
        "{e}"
    );
}

/// Shaped like gemma-3-1b, as transformers ≥ 5 writes it.
fn gemma3() -> Value {
    let mut types = vec!["sliding_attention"; 26];
    for i in (5..26).step_by(6) {
        types[i] = "full_attention";
    }
    json!({
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "dtype": "bfloat16",
        "vocab_size": 262144, "hidden_size": 1152, "intermediate_size": 6912,
        "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 256, "max_position_embeddings": 32768, "query_pre_attn_scalar": 256,
        "sliding_window": 512, "layer_types": types, "final_logit_softcapping": null,
        "attn_logit_softcapping": null, "use_bidirectional_attention": false,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}
        }
    })
}

#[test]
fn gemma3_text_old_and_new_keys_local_rope_and_facts() {
    let new = parse(&gemma3());
    let old = parse(&json!({
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "torch_dtype": "bfloat16",
        "vocab_size": 262144, "hidden_size": 1152, "intermediate_size": 6912,
        "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 256, "max_position_embeddings": 32768, "query_pre_attn_scalar": 256,
        "sliding_window": 512, "sliding_window_pattern": 6, "final_logit_softcapping": null,
        "attn_logit_softcapping": null, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}
    }));
    assert_eq!(old, new);
    assert_facts(&new, "gemma", [26, 4, 1], 999_885_952, SPLIT);
    let Arch::Gemma(g) = &new.arch else { panic!() };
    assert!(g.qk_norm);
    assert_eq!(g.rope.theta, 1e6);
    assert_eq!(g.rope.scaling, RopeScaling::Linear { factor: 8.0 });
    let local = g.local_rope.as_ref().unwrap();
    assert_eq!((local.theta, &local.scaling), (1e4, &RopeScaling::Default));
    assert_eq!(
        g.layer_types[4..7],
        [
            LayerType::SlidingAttention,
            LayerType::FullAttention,
            LayerType::SlidingAttention
        ]
    );
    assert_eq!(
        (g.attn_logit_softcapping, g.final_logit_softcapping),
        (None, None)
    );
    // The multimodal checkpoint is another model type.
    let e = refused(&json!({"model_type": "gemma3"}));
    assert!(
        e.contains("'gemma3' is not supported") && e.contains("gemma3_text"),
        "{e}"
    );
}

/// Shaped like Phi-3-mini-4k-instruct, as transformers 4.x wrote it.
fn phi3_old() -> Value {
    json!({
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "torch_dtype": "bfloat16",
        "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
        "rope_theta": 10000.0, "rope_scaling": null, "sliding_window": 2047,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000
    })
}

#[test]
fn phi3_fused_names_longrope_and_refusals() {
    let c = parse(&phi3_old());
    assert_facts(
        &c,
        "phi3",
        [32, 32, 32],
        3_821_079_552,
        &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    );
    assert_eq!(c.linear_modules()[0], "model.layers.0.self_attn.qkv_proj");
    let Arch::Phi3(p) = &c.arch else { panic!() };
    assert_eq!(
        (p.sliding_window, &p.rope.scaling),
        (Some(2047), &RopeScaling::Default)
    );
    // LongRoPE as Phi-3.5 writes it (old keys), the attention factor from the length ratio.
    let mut v = phi3_old();
    v["max_position_embeddings"] = json!(131072);
    v["rope_scaling"] =
        json!({"type": "longrope", "short_factor": vec![1.0; 48], "long_factor": vec![2.0; 48]});
    let Arch::Phi3(p) = parse(&v).arch else {
        panic!()
    };
    let RopeScaling::LongRope {
        original_max_position_embeddings,
        attention_factor,
        ..
    } = p.rope.scaling
    else {
        panic!()
    };
    assert_eq!(original_max_position_embeddings, 4096);
    assert!((attention_factor - (1.0 + 32f64.ln() / 4096f64.ln()).sqrt()).abs() < 1e-12);
    v["rope_scaling"]["long_factor"] = json!([2.0]);
    assert!(refused(&v)
        .contains("`rope_scaling.long_factor` has 1 entries; 96 rotary dimensions need 48"));
    v["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
    let e = refused(&v);
    assert!(
        e.contains("`rope_scaling`: rope type 'linear' is not supported for phi3"),
        "{e}"
    );
}

#[test]
fn olmo2_facts() {
    let c = parse(&json!({
        "architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2",
        "vocab_size": 100352, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": false,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}
    }));
    assert_facts(&c, "olmo2", [16, 16, 16], 1_484_916_736, SPLIT);
    let Arch::Olmo2(o) = &c.arch else { panic!() };
    assert_eq!((o.rope.theta, o.shape.rms_norm_eps), (500000.0, 1e-6));
}
