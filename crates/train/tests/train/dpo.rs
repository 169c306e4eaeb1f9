//! Preference tuning (DPO): jobs on conversations (OpenAI's pair layout) and on plain text
//! (TRL's) that learn to prefer the preferred answers, under full fine-tuning and LoRA; a
//! paused-then-resumed job repeats the uninterrupted one (the reference log-probabilities are
//! computed again from the base); records of the wrong kind fail with their line. The loss and
//! rewards are checked against TRL's `DPOTrainer` in tests/python/test_dpo.py.

use serde_json::{json, Value};
use tuna_core::data::{parse_json_line, Example};
use tuna_train::trainer::{train, Control, TrainInputs, TrainOutcome, TrainerEvent};

use crate::support::{fixture, lock};
use crate::tasks::{final_dir, metric};
use crate::train_loop::{run, spec};

const SUBJECTS: [&str; 8] = [
    "cats", "dogs", "birds", "fish", "trees", "rivers", "stars", "boats",
];

/// `n` pairs whose preferred answer praises the subject and whose rejected one does not, as
/// OpenAI's layout (`chat`) or TRL's plain-text one.
pub(crate) fn pairs(n: usize, chat: bool) -> Vec<(u64, Example)> {
    (0..n)
        .map(|i| {
            let s = SUBJECTS[i % SUBJECTS.len()];
            let (good, bad) = (
                format!("{s} are wonderful and kind"),
                format!("{s} are awful and rude"),
            );
            let record = if chat {
                json!({
                    "input": {"messages": [{"role": "user", "content": format!("tell me about {s}")}]},
                    "preferred_output": [{"role": "assistant", "content": good}],
                    "non_preferred_output": [{"role": "assistant", "content": bad}],
                })
            } else {
                json!({"prompt": format!("about {s}:"), "chosen": format!(" {good}"), "rejected": format!(" {bad}")})
            };
            let line = i as u64 + 1;
            (line, parse_json_line(&record.to_string(), line).unwrap())
        })
        .collect()
}

fn dpo_spec(extra: Value) -> tuna_core::spec::JobSpec {
    let mut body = json!({
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}},
        "validation_split": 0.25, "log_interval": 1, "max_seq_length": 48,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    spec(body)
}

#[test]
fn dpo_jobs_learn_to_prefer_the_preferred_answers() {
    let _g = lock();
    let cases = [
        // Conversations through the ChatML template, full fine-tuning.
        (
            "qwen2",
            true,
            json!({"n_epochs": 3, "batch_size": 8, "learning_rate": 2e-3}),
        ),
        // LoRA: the reference is the base (the adapters start at zero).
        (
            "llama",
            true,
            json!({"n_epochs": 3, "batch_size": 8, "learning_rate": 1e-2, "lora_r": 8, "lora_dropout": 0.1}),
        ),
        // Plain text, the end-of-text token appended to each completion.
        (
            "gpt2",
            false,
            json!({"n_epochs": 3, "batch_size": 8, "learning_rate": 2e-3}),
        ),
    ];
    for (model, chat, extra) in cases {
        let dir = tempfile::tempdir().unwrap();
        let s = dpo_spec(extra);
        assert!(s.dpo.is_some());
        let r = run(
            &fixture(model),
            &s,
            &pairs(32, chat),
            dir.path(),
            None,
            None,
        );
        let (first, last) = (&r.evals[0], r.evals.last().unwrap());
        // Before any update the policy is the reference: loss ln 2, rewards 0. After the first
        // epoch the preferred answers already lead; at the end they win every pair.
        assert!(metric(last, "valid_loss") < 0.5, "{model}: {last}");
        assert!(
            metric(last, "valid_loss") < metric(first, "valid_loss"),
            "{model}: {first} -> {last}"
        );
        assert_eq!(
            metric(last, "valid_rewards/accuracies"),
            1.0,
            "{model}: {last}"
        );
        assert!(
            metric(last, "valid_rewards/margins") > 0.5,
            "{model}: {last}"
        );
        let margin = metric(last, "valid_rewards/chosen") - metric(last, "valid_rewards/rejected");
        assert!(
            (margin - metric(last, "valid_rewards/margins")).abs() < 1e-5,
            "{model}: {last}"
        );
        assert_eq!(last["valid_examples"], 8);
        assert!(last.get("valid_mean_token_accuracy").is_none(), "{last}");
        // The export is a causal LM as any other.
        let out = final_dir(&r.outcome);
        assert!(
            out.join("model.safetensors").exists()
                || out.join("adapter_model.safetensors").exists(),
            "{model}: {out:?}"
        );
    }
}

#[test]
fn a_resumed_dpo_job_repeats_the_uninterrupted_one() {
    let _g = lock();
    let s = dpo_spec(
        json!({"n_epochs": 2, "batch_size": 8, "learning_rate": 2e-3, "checkpoint_interval": 2}),
    );
    let data = pairs(24, true);
    let whole = tempfile::tempdir().unwrap();
    let a = run(&fixture("qwen2"), &s, &data, whole.path(), None, None);
    let parts = tempfile::tempdir().unwrap();
    let paused = run(&fixture("qwen2"), &s, &data, parts.path(), None, Some(2));
    let TrainOutcome::Paused { checkpoint, step } = &paused.outcome else {
        panic!("{:?}", paused.outcome)
    };
    assert_eq!(*step, 2);
    let b = run(
        &fixture("qwen2"),
        &s,
        &data,
        parts.path(),
        Some(checkpoint),
        None,
    );
    let (ea, eb) = (a.evals.last().unwrap(), b.evals.last().unwrap());
    for k in [
        "valid_loss",
        "valid_rewards/chosen",
        "valid_rewards/rejected",
        "valid_rewards/margins",
    ] {
        assert!(
            (metric(ea, k) - metric(eb, k)).abs() < 1e-6,
            "{k}: {ea} vs {eb}"
        );
    }
    assert_eq!(a.losses.last(), b.losses.last());
}

#[test]
fn records_of_the_other_method_fail_with_their_line() {
    let _g = lock();
    let run_err = |spec: &tuna_core::spec::JobSpec, data: &[(u64, Example)]| {
        let dir = tempfile::tempdir().unwrap();
        let inputs = TrainInputs {
            model_dir: &fixture("qwen2"),
            spec,
            train_examples: data,
            valid_examples: None,
            output_dir: dir.path(),
            resume_from: None,
            device: tch::Device::Cpu,
        };
        let mut cb = |_: TrainerEvent| {};
        train(&inputs, &mut cb, &Control::new())
            .unwrap_err()
            .to_string()
    };
    let mut mixed = pairs(4, true);
    mixed.push((
        5,
        parse_json_line(r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#, 5).unwrap(),
    ));
    let e = run_err(&dpo_spec(json!({})), &mixed);
    assert!(
        e.contains("training file line 5") && e.contains("preference pairs"),
        "{e}"
    );
    let e = run_err(&spec(json!({})), &pairs(3, true));
    assert!(
        e.contains("training file line 1") && e.contains("method 'dpo'"),
        "{e}"
    );
}
