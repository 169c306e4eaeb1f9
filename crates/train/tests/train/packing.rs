//! Sequence packing (several causal-LM examples per row, `data::collate_packed`): on the tiny
//! fixtures (fp32, CPU, eval mode) a packed batch gives the same summed loss, the same number of
//! correct predictions and the same token and target counts as the examples run one by one, so
//! examples do not attend to each other and positions restart per example (GPT-2's learned
//! positions, Llama's rotary ones with llama3 scaling, Mistral's sliding window, Qwen2's q/k/v
//! bias). A packing job trains like the unpacked one. For classification, `packing` groups a
//! step's examples by length into separately padded micro-batches: same loss and gradients.

use serde_json::json;
use tch::Device;
use tuna_core::spec::Task;
use tuna_train::data::group_by_length;
use tuna_train::data::{
    collate, collate_packed, loss_and_correct, pack_rows, Collated, Features, Target,
};
use tuna_train::model::{Batch, Model, TaskHead};
use tuna_train::trainer::{accumulate, train, Control, StepConfig, TrainInputs, TrainerEvent};

use crate::support::{cpu_options, fixture, job_spec, lock, text_examples};

fn load(name: &str) -> Box<dyn Model> {
    tuna_train::load_model(&fixture(name), &cpu_options(TaskHead::CausalLm)).unwrap()
}

/// Examples of varied lengths with deterministic ids; the second has a masked prompt.
fn examples(vocab: i64) -> Vec<Features> {
    [5usize, 9, 3, 12, 7, 16, 4, 10, 2]
        .iter()
        .enumerate()
        .map(|(e, n)| {
            let ids: Vec<i64> = (0..*n)
                .map(|j| ((e * 31 + j * 17 + 3) as i64 * 7919) % vocab)
                .collect();
            let mut labels = ids.clone();
            if e == 1 {
                labels[..4].iter_mut().for_each(|l| *l = -100);
            }
            Features {
                line: e as u64 + 1,
                input_ids: ids,
                labels,
                token_type_ids: vec![],
                target: Target::Tokens,
            }
        })
        .collect()
}

fn loss_of(model: &dyn Model, c: &Collated) -> (f64, f64) {
    let _g = tch::no_grad_guard();
    let logits = model
        .forward(
            &Batch {
                input_ids: &c.input_ids,
                attention_mask: &c.attention_mask,
                token_type_ids: None,
                packed: c.packed.as_ref(),
            },
            false,
        )
        .unwrap();
    let (l, k) = loss_and_correct(&logits, &c.labels, Task::CausalLm).unwrap();
    (l.double_value(&[]), k.double_value(&[]))
}

fn check(name: &str) {
    let _g = lock();
    let model = load(name);
    let feats = examples(model.info().vocab_size);
    let refs: Vec<&Features> = feats.iter().collect();
    // One by one (no padding at all).
    let (mut loss, mut correct, mut tokens, mut targets) = (0.0, 0.0, 0, 0);
    for f in &refs {
        let c = collate(&[*f], 0, Device::Cpu, false).unwrap();
        let (l, k) = loss_of(model.as_ref(), &c);
        loss += l;
        correct += k;
        tokens += c.tokens;
        targets += c.targets;
    }
    let packed = collate_packed(&refs, 0, Device::Cpu, 24).unwrap();
    assert!(
        packed.batch_size < refs.len(),
        "{name}: {} rows for {} examples",
        packed.batch_size,
        refs.len()
    );
    assert!(packed.seq_len <= 24);
    let (pl, pk) = loss_of(model.as_ref(), &packed);
    assert_eq!((packed.tokens, packed.targets), (tokens, targets), "{name}");
    assert!(
        (pl - loss).abs() <= 1e-5 * loss.abs().max(1.0),
        "{name}: packed loss {pl} vs unpacked {loss}"
    );
    assert_eq!(pk, correct, "{name}: correct predictions");
    // The padded batch agrees too (sanity check of the reference).
    let padded = collate(&refs, 0, Device::Cpu, false).unwrap();
    let (ql, _) = loss_of(model.as_ref(), &padded);
    assert!(
        (ql - loss).abs() <= 1e-5 * loss.abs().max(1.0),
        "{name}: padded {ql} vs {loss}"
    );
}

#[test]
fn packed_gpt2_equals_unpacked() {
    check("gpt2");
}

#[test]
fn packed_llama_equals_unpacked() {
    check("llama");
}

#[test]
fn packed_mistral_sliding_window_and_qwen2_equal_unpacked() {
    check("mistral");
    check("qwen2");
}

#[test]
fn pack_rows_places_every_example_once_within_the_limit() {
    let lengths = [5usize, 9, 3, 12, 7, 16, 4, 10, 2, 30];
    let rows = pack_rows(&lengths, 24);
    let mut seen: Vec<usize> = rows.iter().flatten().copied().collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
    for r in &rows {
        let used: usize = r.iter().map(|i| lengths[*i]).sum();
        assert!(used <= 24 || r.len() == 1, "{r:?} holds {used}");
    }
    // 98 tokens in rows of 24: 5 rows at best; the one too long gets its own.
    assert!(rows.len() <= 6, "{rows:?}");
}

#[test]
fn packing_job_trains_like_the_unpacked_one() {
    let _g = lock();
    let texts = text_examples(&[
        "the cat sat on the mat",
        "a dog",
        "the bird flew over the tall green tree today",
        "hello",
        "machine learning models learn patterns from many examples",
        "rust is fast",
    ]);
    let losses = |packing: bool| {
        let body = json!({"model": "m", "training_file": "file-x", "seed": 3,
            "hyperparameters": {"n_epochs": 1, "batch_size": 6},
            "max_steps": 3, "log_interval": 1, "packing": packing, "validation_split": 0.0,
            "learning_rate": 0.001});
        let spec = job_spec(&body);
        assert_eq!(spec.packing, packing);
        assert_eq!(
            serde_json::to_value(spec.method_hyperparameters()).unwrap()["packing"],
            json!(packing)
        );
        let out = tempfile::tempdir().unwrap();
        let mut l = Vec::new();
        let mut cb = |ev: TrainerEvent| {
            if let TrainerEvent::Metrics(m) = ev {
                l.push(m.train_loss);
            }
        };
        // Llama fixture: no dropout, so both layouts compute the same numbers.
        let inputs = TrainInputs {
            model_dir: &fixture("llama"),
            spec: &spec,
            train_examples: &texts,
            valid_examples: None,
            output_dir: out.path(),
            resume_from: None,
            device: Device::Cpu,
        };
        train(&inputs, &mut cb, &Control::new()).unwrap();
        l
    };
    let (plain, packed) = (losses(false), losses(true));
    assert_eq!(plain.len(), packed.len());
    assert!(!plain.is_empty());
    for (a, b) in plain.iter().zip(&packed) {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs().max(1.0),
            "{plain:?} vs {packed:?}"
        );
    }
}

#[test]
fn group_by_length_splits_sorted_lengths_and_keeps_every_example() {
    let lengths = [40usize, 3, 5, 38, 4, 41, 6];
    let groups = group_by_length(&lengths, 8);
    let mut seen: Vec<usize> = groups.iter().flatten().copied().collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
    assert_eq!(groups, vec![vec![1, 2, 4, 6], vec![0, 3, 5]]);
    // A large overhead keeps one group; none splits into equal lengths only.
    assert_eq!(group_by_length(&lengths, 10_000).len(), 1);
    assert_eq!(group_by_length(&[], 8), Vec::<Vec<usize>>::new());
}

#[test]
fn length_grouped_classification_gives_the_same_loss_and_gradients() {
    let _g = lock();
    // Llama fixture as a classifier: no dropout, so both layouts compute the same numbers.
    let opts = cpu_options(TaskHead::SequenceClassification {
        id2label: vec!["a".into(), "b".into()],
        problem_type: Default::default(),
    });
    let model = tuna_train::load_model(&fixture("llama"), &opts).unwrap();
    let feats: Vec<Features> = examples(model.info().vocab_size)
        .into_iter()
        .enumerate()
        .map(|(i, mut f)| {
            f.labels.clear();
            f.target = Target::Class((i % 2) as i64);
            f
        })
        .collect();
    let refs: Vec<&Features> = feats.iter().collect();
    let run = |group: Option<usize>| {
        for (_, mut p) in model.trainable_parameters() {
            p.zero_grad();
        }
        let cfg = StepConfig {
            micro: refs.len(),
            pad_id: 0,
            task: Task::SequenceClassification,
            with_types: false,
            pack_len: None,
            group_overhead_tokens: group,
            checkpointing: false,
            dpo_beta: None,
        };
        let acc = accumulate(model.as_ref(), &refs, &cfg, 1, 0).unwrap();
        let grads: Vec<tch::Tensor> = model
            .trainable_parameters()
            .iter()
            .map(|(_, p)| p.grad().copy())
            .collect();
        (acc.loss_sum.double_value(&[]), acc.tokens, grads)
    };
    let (l0, t0, g0) = run(None);
    let (l1, t1, g1) = run(Some(2));
    assert_eq!(t0, t1);
    assert!((l0 - l1).abs() <= 1e-5 * l0.abs().max(1.0), "{l0} vs {l1}");
    let mut worst = 0.0f64;
    for (a, b) in g0.iter().zip(&g1) {
        worst = worst.max((a - b).abs().max().double_value(&[]));
    }
    assert!(worst < 1e-5, "gradients differ by {worst}");
}
