//! Checkpoints tuna writes load unchanged in transformers and PEFT and compute the same logits.
//!
//! tuna writes (a) full fine-tunes (weights perturbed so they differ from the base), (b) LoRA
//! adapters with non-zero B (causal LM and, with the head in `modules_to_save`, classification),
//! (c) classification checkpoints with `id2label`, (d) merged LoRA weights. Then
//! `python/check_export.py` (run with `.venv/bin/python`, `HF_HUB_OFFLINE=1`) loads each with
//! transformers / `PeftModel.from_pretrained` and the logits must match tuna's within 1e-4.

use std::path::Path;

use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
use tuna_train::load_model;
use tuna_train::loader::read_safetensors;
use tuna_train::model::{Batch, LoadOptions, LoraOptions, Model, TaskHead};

use crate::support::{cpu_options, fixture, lock, python, workspace};

fn opts(task: TaskHead, lora: Option<LoraOptions>) -> LoadOptions {
    LoadOptions {
        lora,
        init_seed: 7,
        ..cpu_options(task)
    }
}

fn lora(targets: &[&str]) -> Option<LoraOptions> {
    Some(LoraOptions {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
    })
}

/// Adds noise to every trainable parameter whose name contains one of `which` (all when empty).
fn perturb(model: &dyn Model, which: &[&str]) {
    // Seeds and draws from libtorch's process-wide generator.
    let _lock = lock();
    tch::manual_seed(11);
    let _g = tch::no_grad_guard();
    let mut n = 0;
    for (name, mut t) in model.trainable_parameters() {
        if which.is_empty() || which.iter().any(|w| name.contains(w)) {
            let noise = Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.2;
            let _ = t.f_add_(&noise.to_kind(t.kind())).unwrap();
            n += 1;
        }
    }
    assert!(n > 0, "nothing perturbed");
}

/// Two rows, the second right-padded with `pad`; real tokens avoid ids < 5 (specials, pad).
fn inputs(vocab: i64, pad: i64, first: Option<i64>) -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
    let mut ids = vec![vec![0i64; 10], vec![0i64; 10]];
    let mut mask = vec![vec![1i64; 10], vec![1i64; 10]];
    for (r, row) in ids.iter_mut().enumerate() {
        for (i, v) in row.iter_mut().enumerate() {
            *v = 5 + ((r as i64 * 37 + i as i64 * 101 + 13) % (vocab - 5));
        }
        if let Some(f) = first {
            row[0] = f;
        }
    }
    for i in 6..10 {
        ids[1][i] = pad;
        mask[1][i] = 0;
    }
    (ids, mask)
}

struct Case {
    name: String,
    spec: Value,
    tuna: Tensor,
}

fn to_tensor(v: &[Vec<i64>]) -> Tensor {
    let flat: Vec<i64> = v.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([v.len() as i64, -1])
}

#[allow(clippy::too_many_arguments)]
fn make_case(
    tmp: &Path,
    name: &str,
    base: &str,
    task: TaskHead,
    lora_opts: Option<LoraOptions>,
    merge: bool,
    perturb_which: &[&str],
    first_token: Option<i64>,
) -> Case {
    let base_dir = fixture(base);
    let model = load_model(&base_dir, &opts(task.clone(), lora_opts.clone())).unwrap();
    perturb(model.as_ref(), perturb_which);
    let info = model.info().clone();
    let pad = info
        .pad_token_id
        .or(info.eos_token_ids.first().copied())
        .unwrap_or(0);
    let (ids, mask) = inputs(info.vocab_size, pad, first_token);
    let (ids_t, mask_t) = (to_tensor(&ids), to_tensor(&mask));
    let tuna = tch::no_grad(|| {
        model.forward(
            &Batch {
                input_ids: &ids_t,
                attention_mask: &mask_t,
                token_type_ids: None,
                packed: None,
            },
            false,
        )
    })
    .unwrap();
    let out = tmp.join(name);
    model.save_pretrained(&out, merge).unwrap();
    let is_lora = lora_opts.is_some() && !merge;
    let task_name = match task {
        TaskHead::CausalLm => "causal_lm",
        TaskHead::SequenceClassification { .. } => "sequence_classification",
    };
    let mut base_kwargs = json!({});
    if let TaskHead::SequenceClassification { id2label } = &task {
        base_kwargs = json!({"num_labels": id2label.len(), "pad_token_id": pad});
    }
    let spec = json!({
        "name": name, "kind": if is_lora { "lora" } else { "full" }, "task": task_name,
        "dir": out, "base": base_dir, "base_kwargs": base_kwargs,
        "input_ids": ids, "attention_mask": mask,
    });
    Case {
        name: name.to_string(),
        spec,
        tuna,
    }
}

#[test]
fn exports_load_in_transformers_and_peft_with_equal_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let labels = TaskHead::SequenceClassification {
        id2label: vec!["negative".into(), "neutral".into(), "positive".into()],
    };
    let two = TaskHead::SequenceClassification {
        id2label: vec!["bad".into(), "good".into()],
    };
    let cases = vec![
        // (a) full fine-tunes: GPT-2 (Conv1D layout, tied head) and Llama (GQA, untied head).
        make_case(
            t,
            "gpt2_full",
            "gpt2",
            TaskHead::CausalLm,
            None,
            false,
            &["c_attn", "wte", "mlp.c_proj"],
            None,
        ),
        make_case(
            t,
            "llama_full",
            "llama",
            TaskHead::CausalLm,
            None,
            false,
            &[],
            Some(1),
        ),
        // (b) LoRA adapters with non-zero B.
        make_case(
            t,
            "llama_lora",
            "llama",
            TaskHead::CausalLm,
            lora(&["all-linear"]),
            false,
            &["lora_B"],
            Some(1),
        ),
        make_case(
            t,
            "gpt2_lora",
            "gpt2",
            TaskHead::CausalLm,
            lora(&["c_attn", "c_fc"]),
            false,
            &["lora_B"],
            None,
        ),
        make_case(
            t,
            "qwen2_lora_cls",
            "qwen2",
            labels.clone(),
            lora(&["q_proj", "v_proj"]),
            false,
            &["lora_B", "score"],
            None,
        ),
        make_case(
            t,
            "bert_lora_cls",
            "bert",
            two.clone(),
            lora(&["query", "value"]),
            false,
            &["lora_B", "classifier"],
            Some(2),
        ),
        // (c) classification checkpoints with id2label.
        make_case(
            t,
            "llama_tied_cls",
            "llama-tied",
            labels.clone(),
            None,
            false,
            &["score", "layers.1"],
            Some(1),
        ),
        make_case(
            t,
            "gpt2_cls",
            "gpt2",
            two.clone(),
            None,
            false,
            &["score"],
            None,
        ),
        make_case(
            t,
            "bert_cls",
            "bert",
            two.clone(),
            None,
            false,
            &["classifier", "pooler"],
            Some(2),
        ),
        // (d) LoRA merged into full weights.
        make_case(
            t,
            "mistral_merged",
            "mistral",
            TaskHead::CausalLm,
            lora(&["q_proj", "down_proj"]),
            true,
            &["lora_B"],
            Some(1),
        ),
        make_case(
            t,
            "gpt2_merged",
            "gpt2",
            TaskHead::CausalLm,
            lora(&["c_attn", "c_proj"]),
            true,
            &["lora_B"],
            None,
        ),
    ];
    // Spot-check the files.
    let adapter: Value = serde_json::from_str(
        &std::fs::read_to_string(t.join("qwen2_lora_cls/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(adapter["peft_type"], "LORA");
    assert_eq!(adapter["task_type"], "SEQ_CLS");
    assert_eq!(adapter["modules_to_save"], json!(["score"]));
    let keys = read_safetensors(&t.join("qwen2_lora_cls/adapter_model.safetensors")).unwrap();
    assert!(
        keys.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
        "{:?}",
        keys.keys()
    );
    assert!(keys.contains_key("base_model.model.score.weight"));
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(t.join("bert_cls/config.json")).unwrap())
            .unwrap();
    assert_eq!(
        cfg["architectures"],
        json!(["BertForSequenceClassification"])
    );
    assert_eq!(cfg["id2label"], json!({"0": "bad", "1": "good"}));
    assert_eq!(cfg["label2id"], json!({"bad": 0, "good": 1}));
    let full = read_safetensors(&t.join("gpt2_full/model.safetensors")).unwrap();
    assert_eq!(
        full["transformer.h.0.attn.c_attn.weight"].size(),
        vec![64, 192],
        "Conv1D layout [in, out]"
    );

    let specs: Vec<Value> = cases.iter().map(|c| c.spec.clone()).collect();
    let cases_path = t.join("cases.json");
    std::fs::write(&cases_path, serde_json::to_string(&specs).unwrap()).unwrap();
    let out_path = t.join("out.safetensors");
    let out = std::process::Command::new(python())
        .arg(workspace().join("python/check_export.py"))
        .arg(&cases_path)
        .arg(&out_path)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "check_export.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs = read_safetensors(&out_path).unwrap();
    let mut report = Vec::new();
    let mut bad = false;
    for c in &cases {
        let want = &theirs[&c.name];
        assert_eq!(c.tuna.size(), want.size(), "{}: shapes differ", c.name);
        let diff = f64::try_from((&c.tuna - want).abs().max()).unwrap();
        report.push(format!("{}: max diff {diff:.2e}", c.name));
        bad |= diff >= 1e-4;
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        !bad,
        "logits differ from transformers/PEFT:\n{}",
        report.join("\n")
    );
    // tuna reloads its own exports (prefixed `bert.`/`model.` keys, trained heads kept).
    for (name, task) in [
        ("bert_cls", two.clone()),
        ("llama_tied_cls", labels.clone()),
        ("gpt2_full", TaskHead::CausalLm),
    ] {
        let c = cases.iter().find(|c| c.name == name).unwrap();
        let m = load_model(&t.join(name), &opts(task, None)).unwrap();
        assert!(
            !m.load_notes().iter().any(|n| n.contains("initialised")),
            "{name}: {:?}",
            m.load_notes()
        );
        let ids = to_tensor(
            &serde_json::from_value::<Vec<Vec<i64>>>(c.spec["input_ids"].clone()).unwrap(),
        );
        let mask = to_tensor(
            &serde_json::from_value::<Vec<Vec<i64>>>(c.spec["attention_mask"].clone()).unwrap(),
        );
        let again = tch::no_grad(|| {
            m.forward(
                &Batch {
                    input_ids: &ids,
                    attention_mask: &mask,
                    token_type_ids: None,
                    packed: None,
                },
                false,
            )
        })
        .unwrap();
        let diff = f64::try_from((&again - &c.tuna).abs().max()).unwrap();
        assert!(diff < 1e-5, "{name}: reloaded export differs by {diff}");
    }
    for line in stdout.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        match v["name"].as_str().unwrap() {
            "llama_tied_cls" => {
                assert_eq!(
                    v["id2label"],
                    json!({"0": "negative", "1": "neutral", "2": "positive"})
                );
                assert_eq!(
                    v["architectures"],
                    json!(["LlamaForSequenceClassification"])
                );
            }
            "bert_cls" => assert_eq!(v["id2label"], json!({"0": "bad", "1": "good"})),
            _ => {}
        }
    }
}
