//! Training runs on the tiny fixtures (CPU): the loss goes down for causal LM (GPT-2) and
//! sequence classification (BERT); a paused-then-resumed run repeats the uninterrupted one
//! exactly; one step of 8 examples equals 8 accumulated micro-batches of 1; checkpoints hold
//! what transformers needs plus the training state. Seeds are process-global in libtorch, so the
//! tests take the global lock (`support::lock`).

use std::path::{Path, PathBuf};

use serde_json::json;
use tch::Tensor;
use tuna_core::data::{Example, Label};
use tuna_core::spec::JobSpec;
use tuna_train::trainer::{train, Control, TrainInputs, TrainOutcome, TrainerEvent};

use crate::support::{cpu_options, fixture, job_spec, lock, text_examples};

pub(crate) fn spec(extra: serde_json::Value) -> JobSpec {
    let mut body = json!({"model": "m", "training_file": "file-x", "seed": 3});
    for (k, v) in extra.as_object().unwrap() {
        if ["n_epochs", "batch_size", "learning_rate_multiplier"].contains(&k.as_str()) {
            body["hyperparameters"][k] = v.clone();
        } else {
            body[k] = v.clone();
        }
    }
    job_spec(&body)
}

pub(crate) fn texts() -> Vec<(u64, Example)> {
    let base = [
        "the cat sat on the mat",
        "the dog sat on the log",
        "a bird sang in the tree",
        "the cat ate the fish",
        "a dog ran to the park",
        "the bird flew over the tree",
    ];
    (0..24)
        .map(|i| {
            (
                i as u64 + 1,
                Example::Text {
                    text: base[i % base.len()].to_string(),
                },
            )
        })
        .collect()
}

pub(crate) struct Run {
    pub(crate) losses: Vec<(u64, f64)>,
    /// `peak_memory_bytes` of each metrics event.
    pub peaks: Vec<Option<u64>>,
    pub evals: Vec<serde_json::Value>,
    pub checkpoints: Vec<PathBuf>,
    pub outcome: TrainOutcome,
}

pub(crate) fn run(
    model: &Path,
    spec: &JobSpec,
    data: &[(u64, Example)],
    out: &Path,
    resume: Option<&Path>,
    pause_at: Option<u64>,
) -> Run {
    let control = Control::new();
    let mut losses = Vec::new();
    let mut peaks = Vec::new();
    let mut evals = Vec::new();
    let mut checkpoints = Vec::new();
    let mut cb = |ev: TrainerEvent| match ev {
        TrainerEvent::Metrics(m) => {
            losses.push((m.step, m.train_loss));
            peaks.push(m.peak_memory_bytes);
            if Some(m.step) == pause_at {
                control.pause();
            }
        }
        TrainerEvent::Eval { metrics, .. } => evals.push(serde_json::to_value(metrics).unwrap()),
        TrainerEvent::Checkpoint { path, .. } => checkpoints.push(path),
        _ => {}
    };
    let inputs = TrainInputs {
        model_dir: model,
        spec,
        train_examples: data,
        valid_examples: None,
        output_dir: out,
        resume_from: resume,
        device: tch::Device::Cpu,
    };
    let outcome = train(&inputs, &mut cb, &control).unwrap();
    Run {
        losses,
        peaks,
        evals,
        checkpoints,
        outcome,
    }
}

#[test]
fn causal_lm_loss_goes_down_and_checkpoints_are_complete() {
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        json!({"n_epochs": 8, "batch_size": 4, "learning_rate": 3e-3, "log_interval": 1, "validation_split": 0.25, "warmup_steps": 2}),
    );
    let r = run(&fixture("gpt2"), &s, &texts(), dir.path(), None, None);
    let first = r.losses[0].1;
    let last = r.losses.last().unwrap().1;
    assert!(last < first * 0.6, "loss {first} -> {last}");
    assert_eq!(
        r.losses.len(),
        8 * 5,
        "18 train examples / 4 = 5 steps per epoch"
    );
    assert_eq!(r.evals.len(), 8, "one evaluation per epoch");
    // Every step reports the process's peak memory on CPU, which never falls: at least the
    // model's weights (the tiny GPT-2 is a few MB; libtorch itself is far more).
    let peaks: Vec<u64> = r.peaks.iter().map(|p| p.expect("peak memory")).collect();
    assert!(peaks.windows(2).all(|w| w[0] <= w[1]), "{peaks:?}");
    assert!(peaks[0] > 50 << 20, "{peaks:?}");
    let e0 = r.evals[0]["valid_loss"].as_f64().unwrap();
    let e1 = r.evals.last().unwrap()["valid_loss"].as_f64().unwrap();
    assert!(e1 < e0, "valid loss {e0} -> {e1}");
    assert!(r.evals[0]["valid_mean_token_accuracy"].is_number());
    let TrainOutcome::Done {
        final_dir, steps, ..
    } = &r.outcome
    else {
        panic!("{:?}", r.outcome)
    };
    assert_eq!(*steps, 40);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(final_dir.join(f).is_file(), "final/{f}");
    }
    let ck = r.checkpoints.last().unwrap().clone();
    assert!(ck.ends_with("checkpoints/step-40"));
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "training_state/optimizer.safetensors",
        "training_state/trainer_state.json",
    ] {
        assert!(ck.join(f).is_file(), "checkpoint {f}");
    }
}

/// 24 short reviews, "positive" and "negative" in turn.
pub(crate) fn reviews() -> Vec<(u64, Example)> {
    let pos = [
        "good great fine",
        "great good",
        "fine good nice",
        "nice great",
    ];
    let neg = [
        "bad awful poor",
        "awful bad",
        "poor bad terrible",
        "terrible awful",
    ];
    let mut data = Vec::new();
    for i in 0..24 {
        let (t, l) = if i % 2 == 0 {
            (pos[i / 2 % 4], "positive")
        } else {
            (neg[i / 2 % 4], "negative")
        };
        data.push((
            i as u64 + 2,
            Example::Labeled {
                text: t.into(),
                text_pair: None,
                label: Label::Name(l.into()),
            },
        ));
    }
    data
}

#[test]
fn classification_loss_goes_down_bert() {
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let data = reviews();
    let s = spec(
        json!({"task": "sequence_classification", "n_epochs": 15, "batch_size": 8, "learning_rate": 2e-3, "log_interval": 1, "validation_split": 0.0}),
    );
    let r = run(&fixture("bert"), &s, &data, dir.path(), None, None);
    let first = r.losses[0].1;
    let last = r.losses.last().unwrap().1;
    assert!(last < first * 0.6, "loss {first} -> {last}");
    let TrainOutcome::Done { final_dir, .. } = &r.outcome else {
        panic!()
    };
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(final_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["id2label"], json!({"0": "negative", "1": "positive"}));
}

#[test]
fn resume_after_pause_repeats_the_uninterrupted_run() {
    let _g = lock();
    // Dropout is on in the fixture (0.1): the masks must repeat too.
    let s = spec(
        json!({"n_epochs": 3, "batch_size": 4, "learning_rate": 2e-3, "log_interval": 1, "validation_split": 0.0, "gradient_accumulation_steps": 2, "lr_scheduler": "cosine", "warmup_steps": 2, "weight_decay": 0.01}),
    );
    let data = texts();
    let a = tempfile::tempdir().unwrap();
    let full = run(&fixture("gpt2"), &s, &data, a.path(), None, None);
    assert_eq!(full.losses.len(), 18);
    let b = tempfile::tempdir().unwrap();
    let first = run(&fixture("gpt2"), &s, &data, b.path(), None, Some(7));
    let TrainOutcome::Paused { checkpoint, step } = &first.outcome else {
        panic!("{:?}", first.outcome)
    };
    assert_eq!(*step, 7);
    assert!(checkpoint.ends_with("checkpoints/step-7"));
    let second = run(
        &fixture("gpt2"),
        &s,
        &data,
        b.path(),
        Some(checkpoint),
        None,
    );
    let resumed: Vec<(u64, f64)> = first
        .losses
        .iter()
        .chain(second.losses.iter())
        .copied()
        .collect();
    assert_eq!(
        resumed, full.losses,
        "losses after resume equal the uninterrupted run's"
    );
    let wa =
        tuna_train::loader::read_safetensors(&a.path().join("final/model.safetensors")).unwrap();
    let wb =
        tuna_train::loader::read_safetensors(&b.path().join("final/model.safetensors")).unwrap();
    for (k, t) in &wa {
        assert!(t.equal(&wb[k]), "{k} differs");
    }
}

/// A copy of a fixture with every dropout set to 0.
fn without_dropout(name: &str, dest: &Path) -> PathBuf {
    let src = fixture(name);
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dest.join(e.file_name())).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    for k in [
        "attn_pdrop",
        "embd_pdrop",
        "resid_pdrop",
        "summary_first_dropout",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
    ] {
        if cfg.get(k).is_some() {
            cfg[k] = json!(0.0);
        }
    }
    std::fs::write(dest.join("config.json"), cfg.to_string()).unwrap();
    dest.to_path_buf()
}

#[test]
fn one_step_of_8_equals_8_accumulated_micro_batches() {
    let _g = lock();
    let m = tempfile::tempdir().unwrap();
    let model = without_dropout("gpt2", m.path());
    // Examples of different lengths, so padding and per-token normalisation matter.
    let data = text_examples(&[
        "the cat",
        "the cat sat on the mat today",
        "a bird",
        "the dog ran to the park and back again",
        "fish",
        "the bird flew over the tree",
        "a dog ran",
        "the cat ate the fish in the kitchen",
    ]);
    let mut finals = Vec::new();
    for accum in [1, 8] {
        let out = tempfile::tempdir().unwrap();
        let s = spec(
            json!({"n_epochs": 1, "batch_size": 8, "gradient_accumulation_steps": accum, "learning_rate": 1e-3, "lr_scheduler": "constant", "validation_split": 0.0, "log_interval": 1, "max_grad_norm": 0.0}),
        );
        let r = run(&model, &s, &data, out.path(), None, None);
        assert_eq!(r.losses.len(), 1);
        finals.push((
            r.losses[0].1,
            tuna_train::loader::read_safetensors(&out.path().join("final/model.safetensors"))
                .unwrap(),
        ));
    }
    assert!(
        (finals[0].0 - finals[1].0).abs() < 1e-5,
        "loss {} vs {}",
        finals[0].0,
        finals[1].0
    );
    let base = tuna_train::loader::read_safetensors(&model.join("model.safetensors")).unwrap();
    let mut moved = 0.0f64;
    for (k, t) in &finals[0].1 {
        let (mut a, mut b) = (t.shallow_clone(), finals[1].1[k].shallow_clone());
        if k.ends_with("attn.c_attn.bias") {
            // The key bias's gradient is zero in exact arithmetic (softmax ignores a constant
            // added to a row of scores), so both runs hold round-off there, which Adam's first
            // step (update ≈ lr·g/|g|) blows up to ~lr. Compare the query and value parts only.
            let d = a.size()[0] / 3;
            a = Tensor::cat(&[a.narrow(0, 0, d), a.narrow(0, 2 * d, d)], 0);
            b = Tensor::cat(&[b.narrow(0, 0, d), b.narrow(0, 2 * d, d)], 0);
        }
        let d = f64::try_from((&a - &b).abs().max()).unwrap();
        assert!(d < 1e-5, "{k}: max diff {d}");
        if let Some(b0) = base.get(k) {
            moved = moved.max(f64::try_from((t - b0).abs().max()).unwrap());
        }
    }
    assert!(moved > 1e-4, "the step changed the weights ({moved})");
}

#[test]
fn accumulated_gradients_do_not_depend_on_the_micro_batch_size() {
    let _g = lock();
    let m = tempfile::tempdir().unwrap();
    let dir = without_dropout("gpt2", m.path());
    let opts = cpu_options(tuna_train::model::TaskHead::CausalLm);
    let model = tuna_train::load_model(&dir, &opts).unwrap();
    let tok = tuna_train::tokenizer::Tok::load(&dir, true).unwrap();
    let data = text_examples(&[
        "a",
        "the cat sat on the mat",
        "fish and chips for two",
        "the dog ran",
        "go",
    ]);
    let (feats, _) =
        tuna_train::data::featurize(&tok, tuna_core::spec::Task::CausalLm, &data, 64, None, "t")
            .unwrap();
    let items: Vec<&tuna_train::data::Features> = feats.iter().collect();
    let mut grads = Vec::new();
    for micro in [5, 2, 1] {
        for (_, mut p) in model.trainable_parameters() {
            p.zero_grad();
        }
        let acc = tuna_train::trainer::accumulate_gradients(
            model.as_ref(),
            &items,
            micro,
            0,
            tuna_core::spec::Task::CausalLm,
            false,
            1,
            0,
        )
        .unwrap();
        let loss = f64::try_from(&acc.loss_sum).unwrap() / acc.targets as f64;
        let g: Vec<(String, Tensor)> = model
            .trainable_parameters()
            .into_iter()
            .map(|(n, p)| (n, p.grad().copy()))
            .collect();
        grads.push((loss, g));
    }
    for (loss, g) in &grads[1..] {
        assert!((loss - grads[0].0).abs() < 1e-6);
        for ((n, a), (_, b)) in g.iter().zip(&grads[0].1) {
            let d = f64::try_from((a - b).abs().max()).unwrap();
            assert!(d < 1e-6, "{n}: gradient differs by {d}");
        }
    }
}

#[test]
fn lora_job_saves_adapter_and_merged_weights() {
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        json!({"n_epochs": 6, "batch_size": 4, "learning_rate": 1e-2, "log_interval": 1,
        "validation_split": 0.0, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "merge_lora": true}),
    );
    let r = run(&fixture("llama"), &s, &texts(), dir.path(), None, None);
    let (first, last) = (r.losses[0].1, r.losses.last().unwrap().1);
    assert!(last < first * 0.8, "loss {first} -> {last}");
    let TrainOutcome::Done { final_dir, .. } = &r.outcome else {
        panic!("{:?}", r.outcome)
    };
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
    ] {
        assert!(final_dir.join(f).is_file(), "final/{f}");
    }
    assert!(final_dir.join("merged/model.safetensors").is_file());
    let ck = r.checkpoints.last().unwrap().clone();
    let state =
        tuna_train::loader::read_safetensors(&ck.join("training_state/optimizer.safetensors"))
            .unwrap();
    assert!(
        state.keys().all(|k| k == "step" || k.contains("lora_")),
        "only adapter moments: {:?}",
        state.keys().collect::<Vec<_>>()
    );
}

/// `optimizer_moments: "bf16"` keeps AdamW's moments in bf16 (saved so in the checkpoint's
/// optimizer state) and trains as the fp32 moments do: the same job's losses agree within 1% at
/// every step, where they fall by more than a third.
#[test]
fn bf16_moments_train_within_the_loss_tolerance_of_fp32_moments() {
    let _g = lock();
    let body = json!({"n_epochs": 4, "batch_size": 4, "learning_rate": 2e-3, "log_interval": 1,
                      "validation_split": 0.0, "checkpoint_interval": 6});
    let mut bf16_body = body.clone();
    bf16_body["optimizer_moments"] = json!("bf16");
    let (fp32, bf16) = (spec(body), spec(bf16_body));
    assert_eq!(bf16.optimizer_moments, tuna_core::spec::Moments::Bf16);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ra = run(&fixture("gpt2"), &fp32, &texts(), a.path(), None, None);
    let rb = run(&fixture("gpt2"), &bf16, &texts(), b.path(), None, None);
    assert_eq!(ra.losses.len(), rb.losses.len());
    let (first, last) = (ra.losses[0].1, ra.losses.last().unwrap().1);
    assert!(last < first * 0.66, "loss {first} -> {last}");
    for ((step, x), (_, y)) in ra.losses.iter().zip(&rb.losses) {
        assert!(
            (x - y).abs() < 0.01 * x,
            "step {step}: fp32 moments {x}, bf16 {y}"
        );
    }
    let ck = rb.checkpoints.last().unwrap().clone();
    let state =
        tuna_train::loader::read_safetensors(&ck.join("training_state/optimizer.safetensors"))
            .unwrap();
    let moments: Vec<_> = state
        .iter()
        .filter(|(k, _)| k.starts_with("exp_avg"))
        .collect();
    assert!(!moments.is_empty());
    assert!(
        moments.iter().all(|(_, t)| t.kind() == tch::Kind::BFloat16),
        "bf16 moments in the checkpoint"
    );
}

/// Checkpointing and QLoRA are not the decoders' alone: a DistilBERT classifier trained as a
/// QLoRA job (checkpointed, as QLoRA always is) learns the reviews.
#[test]
fn qlora_classification_job_on_an_encoder_learns() {
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        json!({"task": "sequence_classification", "n_epochs": 15, "batch_size": 8,
        "learning_rate": 5e-3, "log_interval": 1, "validation_split": 0.0, "lora_r": 8,
        "quantization": "nf4"}),
    );
    assert_eq!(s.gradient_checkpointing, Some(true));
    let r = run(
        &fixture("distilbert"),
        &s,
        &reviews(),
        dir.path(),
        None,
        None,
    );
    let (first, last) = (r.losses[0].1, r.losses.last().unwrap().1);
    assert!(last < first * 0.6, "loss {first} -> {last}");
    let TrainOutcome::Done { final_dir, .. } = &r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert!(final_dir.join("adapter_model.safetensors").is_file());
}

#[test]
fn qlora_job_trains_adapters_over_an_nf4_base() {
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        json!({"n_epochs": 6, "batch_size": 4, "learning_rate": 1e-2, "log_interval": 1,
        "validation_split": 0.0, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "quantization": "nf4", "merge_lora": true}),
    );
    assert_eq!(s.gradient_checkpointing, Some(true));
    let r = run(&fixture("llama"), &s, &texts(), dir.path(), None, None);
    let (first, last) = (r.losses[0].1, r.losses.last().unwrap().1);
    assert!(last < first * 0.8, "loss {first} -> {last}");
    let TrainOutcome::Done { final_dir, .. } = &r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert!(final_dir.join("adapter_model.safetensors").is_file());
    // merged/: the dequantised base with the adapters folded in (alpha / r = 2).
    let read = |p: &std::path::Path| tuna_train::loader::read_safetensors(p).unwrap();
    let merged = read(&final_dir.join("merged/model.safetensors"));
    let orig = read(&fixture("llama").join("model.safetensors"));
    let adapter = read(&final_dir.join("adapter_model.safetensors"));
    let m = "model.layers.0.self_attn.o_proj";
    let (a, b) = (
        &adapter[&format!("base_model.model.{m}.lora_A.weight")],
        &adapter[&format!("base_model.model.{m}.lora_B.weight")],
    );
    let base = tuna_train::quant::Nf4Weight::quantize(&orig[&format!("{m}.weight")], true)
        .unwrap()
        .dequantize(tch::Kind::Float)
        .unwrap();
    let want = base + b.matmul(a) * 2.0;
    let d = f64::try_from((&merged[&format!("{m}.weight")] - want).abs().max()).unwrap();
    assert!(d < 1e-5, "{m}: merged differs by {d}");
    assert!(f64::try_from(b.abs().max()).unwrap() > 1e-4, "B trained");
    let ck = r.checkpoints.last().unwrap().clone();
    let state =
        tuna_train::loader::read_safetensors(&ck.join("training_state/optimizer.safetensors"))
            .unwrap();
    assert!(state.keys().all(|k| k == "step" || k.contains("lora_")));
}

#[test]
fn early_stopping_ends_the_run_when_valid_loss_stalls() {
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    // A learning rate far below fp32 resolution of the weights: the validation loss cannot fall.
    let s = spec(
        json!({"n_epochs": 5, "batch_size": 4, "learning_rate": 1e-15, "log_interval": 1,
        "validation_split": 0.25, "eval_interval": 1, "early_stopping_patience": 2, "lr_scheduler": "constant"}),
    );
    let r = run(&fixture("gpt2"), &s, &texts(), dir.path(), None, None);
    let TrainOutcome::Done { steps, .. } = &r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert_eq!(
        *steps, 3,
        "first evaluation sets the best loss, two more without improvement stop the run"
    );
    assert_eq!(r.evals.len(), 3);
    assert!(r.checkpoints.last().unwrap().ends_with("step-3"));
}

#[test]
fn non_finite_loss_stops_with_an_error() {
    let _g = lock();
    let m = tempfile::tempdir().unwrap();
    let model = without_dropout("gpt2", m.path());
    let path = model.join("model.safetensors");
    let mut w = tuna_train::loader::read_safetensors(&path).unwrap();
    let ln = w.get_mut("transformer.ln_f.weight").unwrap();
    *ln = ln.fill(f64::NAN);
    let tensors: Vec<(String, Tensor)> = w.into_iter().collect();
    tuna_train::loader::save_safetensors(&path, &tensors).unwrap();
    let out = tempfile::tempdir().unwrap();
    let s = spec(json!({"n_epochs": 1, "batch_size": 4, "validation_split": 0.0}));
    let control = Control::new();
    let inputs = TrainInputs {
        model_dir: &model,
        spec: &s,
        train_examples: &texts(),
        valid_examples: None,
        output_dir: out.path(),
        resume_from: None,
        device: tch::Device::Cpu,
    };
    let err = train(&inputs, &mut |_| {}, &control).unwrap_err();
    assert!(
        matches!(err, tuna_train::Error::NonFiniteLoss { step: 1, .. }),
        "{err}"
    );
}
