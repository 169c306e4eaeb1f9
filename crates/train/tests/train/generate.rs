//! Generation with a KV cache (`tuna_train::generate`): greedy output equals transformers'
//! `generate` token for token on every causal-LM family's fixture (odd ones included: sliding
//! windows shorter than the text, soft-capping, dynamic NTK and LongRoPE past their original
//! length), for prompts of different lengths in one left-padded batch and each alone; sampling
//! is reproducible with its seed; stop tokens and stop sequences end a text.

use serde_json::json;
use tuna_train::generate::{complete, generate, sample, Finish, Prompt, Sampling};
use tuna_train::model::TaskHead;
use tuna_train::tokenizer::Tok;

use crate::support::{cpu_options, fixture, lock, run_check};

const FAMILIES: [&str; 14] = [
    "gpt2",
    "llama",
    "llama-tied",
    "llama-dynamic",
    "qwen2",
    "qwen2-yarn",
    "qwen3",
    "qwen3-sliding",
    "mistral",
    "gemma2",
    "gemma3",
    "phi3",
    "phi3-longrope",
    "olmo2",
];

/// Prompts of 3, 11 and 6 tokens, drawn from the vocabulary above the special tokens.
fn prompts(vocab: i64) -> Vec<Vec<i64>> {
    let mut x: i64 = 12345;
    let mut next = || {
        x = (x * 1_103_515_245 + 12_345) % 2_147_483_648;
        8 + x % (vocab - 8)
    };
    [3, 11, 6]
        .iter()
        .map(|n| (0..*n).map(|_| next()).collect())
        .collect()
}

#[test]
fn greedy_decoding_equals_transformers_generate_on_every_family() {
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    for name in FAMILIES {
        let model =
            tuna_train::load_model(&fixture(name), &cpu_options(TaskHead::CausalLm)).unwrap();
        let info = model.info().clone();
        let vocab = info.vocab_size;
        let ps = prompts(vocab);
        let pad = info
            .pad_token_id
            .or(info.eos_token_ids.first().copied())
            .unwrap_or(0);
        let s = Sampling {
            max_tokens: 12,
            stop_token_ids: info.eos_token_ids.clone(),
            ..Default::default()
        };
        let batched = generate(model.as_ref(), &ps, pad, &s, &mut |_, _| true).unwrap();
        let single: Vec<Vec<i64>> = ps
            .iter()
            .map(|p| {
                generate(
                    model.as_ref(),
                    std::slice::from_ref(p),
                    pad,
                    &s,
                    &mut |_, _| true,
                )
                .unwrap()[0]
                    .tokens
                    .clone()
            })
            .collect();
        let hf = run_check(
            "check_generate.py",
            dir.path(),
            &json!({"dir": fixture(name), "prompts": ps, "max_new_tokens": 12, "pad_id": pad,
                    "eos": info.eos_token_ids}),
        );
        let tokens: Vec<Vec<i64>> = batched.iter().map(|g| g.tokens.clone()).collect();
        assert_eq!(json!(tokens), hf["batched"], "{name}: batched");
        assert_eq!(json!(single), hf["single"], "{name}: one prompt at a time");
        for g in &batched {
            let want = if g.tokens.len() == 12 {
                Finish::Length
            } else {
                Finish::Stop
            };
            assert_eq!(g.finish, want, "{name}");
        }
        // Enough tokens that the sliding windows (6) and the original RoPE lengths (8) are
        // passed.
        assert!(tokens.iter().any(|t| t.len() >= 8), "{name}: {tokens:?}");
    }
}

#[test]
fn sampling_is_reproducible_with_its_seed_and_stops_where_asked() {
    let _g = lock();
    let model =
        tuna_train::load_model(&fixture("qwen2"), &cpu_options(TaskHead::CausalLm)).unwrap();
    let ps = prompts(model.info().vocab_size);
    let sampled = |seed: u64, top_k: usize, top_p: f64| {
        let s = Sampling {
            max_tokens: 10,
            temperature: 1.5,
            top_k,
            top_p,
            seed,
            ..Default::default()
        };
        generate(model.as_ref(), &ps, 0, &s, &mut |_, _| true)
            .unwrap()
            .into_iter()
            .map(|g| g.tokens)
            .collect::<Vec<_>>()
    };
    assert_eq!(sampled(7, 0, 1.0), sampled(7, 0, 1.0));
    assert_ne!(sampled(7, 0, 1.0), sampled(8, 0, 1.0));
    // top_k 1 and a tiny top_p keep only the most likely token: greedy.
    let greedy = generate(
        model.as_ref(),
        &ps,
        0,
        &Sampling {
            max_tokens: 10,
            ..Default::default()
        },
        &mut |_, _| true,
    )
    .unwrap()
    .into_iter()
    .map(|g| g.tokens)
    .collect::<Vec<_>>();
    assert_eq!(sampled(3, 1, 1.0), greedy);
    assert_eq!(sampled(3, 0, 1e-9), greedy);

    // The filters themselves, on a known distribution.
    let probs = [0.1f32, 0.5, 0.3, 0.1];
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    let draws: Vec<usize> = (0..2000)
        .map(|_| sample(&probs, 2, 1.0, &mut rng))
        .collect();
    assert!(draws.iter().all(|d| *d == 1 || *d == 2));
    let share = draws.iter().filter(|d| **d == 1).count() as f64 / 2000.0;
    assert!((share - 0.625).abs() < 0.04, "{share}");
    let draws: Vec<usize> = (0..500).map(|_| sample(&probs, 0, 0.7, &mut rng)).collect();
    assert!(
        draws.iter().all(|d| *d == 1 || *d == 2),
        "top_p 0.7 keeps 0.5 and 0.3"
    );

    // A stop sequence cuts the text before it; the model's end token stops it too.
    let tok = Tok::load(&fixture("qwen2"), true).unwrap();
    let prompt = [Prompt::Chat(vec![("user".into(), "hello there".into())])];
    let free = complete(
        model.as_ref(),
        &tok,
        &prompt,
        &[],
        &Sampling {
            max_tokens: 12,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(free[0].completion_tokens > 0);
    let text = &free[0].text;
    let stop: String = text
        .chars()
        .skip(text.chars().count() / 2)
        .take(2)
        .collect();
    let cut = complete(
        model.as_ref(),
        &tok,
        &prompt,
        std::slice::from_ref(&stop),
        &Sampling {
            max_tokens: 12,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(cut[0].finish, Finish::Stop);
    assert_eq!(
        cut[0].text,
        text[..text.find(&stop).unwrap()],
        "{text:?} / {stop:?}"
    );
    assert!(cut[0].prompt_tokens > 3);
}

#[test]
fn causal_lm_evaluations_show_completions_of_validation_prompts() {
    use tuna_core::data::Example;
    use tuna_train::trainer::{train, Control, TrainInputs, TrainerEvent};

    let _g = lock();
    // Every completion is the same: the samples show the model learning it.
    let data: Vec<(u64, Example)> = (0..24)
        .map(|i| {
            (
                i + 1,
                Example::PromptCompletion {
                    prompt: format!("item {i}:"),
                    completion: " yes it is".into(),
                },
            )
        })
        .collect();
    let s = crate::train_loop::spec(
        json!({"n_epochs": 4, "batch_size": 4, "learning_rate": 3e-3,
                                           "validation_split": 0.25, "eval_samples": 2, "eval_interval": 1}),
    );
    assert_eq!(s.eval_samples, Some(2));
    let dir = tempfile::tempdir().unwrap();
    let inputs = TrainInputs {
        model_dir: &fixture("gpt2"),
        spec: &s,
        train_examples: &data,
        valid_examples: None,
        output_dir: dir.path(),
        resume_from: None,
        device: tch::Device::Cpu,
    };
    let (mut evals, mut samples) = (Vec::new(), Vec::new());
    let mut cb = |ev: TrainerEvent| match ev {
        TrainerEvent::Eval { step, .. } => evals.push(step),
        TrainerEvent::Samples { step, samples: s } => samples.push((step, s)),
        _ => {}
    };
    train(&inputs, &mut cb, &Control::new()).unwrap();
    // One samples event after each evaluation, two validation prompts each, with the data's
    // answers beside them.
    assert_eq!(samples.iter().map(|(s, _)| *s).collect::<Vec<_>>(), evals);
    for (_, s) in &samples {
        assert_eq!(s.len(), 2);
        for x in s {
            assert!(x.prompt.starts_with("item "), "{x:?}");
            assert_eq!(x.reference, " yes it is");
        }
    }
    let last = &samples.last().unwrap().1;
    assert!(
        last.iter().all(|x| x.completion.starts_with(" yes it is")),
        "{last:?}"
    );
    // Not learned after the first step, learned at the end.
    assert_ne!(samples[0].1, *last);
}

/// Each text's token ids (with the tokenizer's special tokens).
fn text_ids(tok: &Tok, texts: &[&str]) -> Vec<Vec<i64>> {
    texts
        .iter()
        .map(|p| {
            tok.ids(p, true)
                .unwrap()
                .into_iter()
                .map(i64::from)
                .collect()
        })
        .collect()
}

/// Greedy decoding of `n` tokens, stopping at `model`'s end tokens.
fn greedy(n: usize, model: &dyn tuna_train::model::Model) -> Sampling {
    Sampling {
        max_tokens: n,
        stop_token_ids: model.info().eos_token_ids.clone(),
        ..Default::default()
    }
}

/// A prompt/completion job's data: every completion is `answer`.
pub(crate) fn answering(answer: &str) -> Vec<(u64, tuna_core::data::Example)> {
    (0..24)
        .map(|i| {
            (
                i + 1,
                tuna_core::data::Example::PromptCompletion {
                    prompt: format!("item {i}:"),
                    completion: answer.to_string(),
                },
            )
        })
        .collect()
}

#[test]
fn fine_tuned_models_and_adapters_generate_as_transformers_and_peft_do() {
    use crate::tasks::final_dir;
    use crate::train_loop::{run, spec};

    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let knobs = json!({"n_epochs": 3, "batch_size": 4, "learning_rate": 3e-3, "validation_split": 0.0,
                       "eval_samples": 0});
    // A full fine-tune of GPT-2, generating from its export.
    let full = run(
        &fixture("gpt2"),
        &spec(knobs.clone()),
        &answering(" yes it is"),
        &dir.path().join("full"),
        None,
        None,
    );
    let full_dir = final_dir(&full.outcome);
    let model = tuna_train::load_model(full_dir, &cpu_options(TaskHead::CausalLm)).unwrap();
    let tok = Tok::load(full_dir, true).unwrap();
    let ps = text_ids(&tok, &["item 3:", "item 40:", "what now"]);
    let s = greedy(8, model.as_ref());
    let tokens = |m: &dyn tuna_train::model::Model| -> Vec<Vec<i64>> {
        generate(m, &ps, 0, &s, &mut |_, _| true)
            .unwrap()
            .into_iter()
            .map(|g| g.tokens)
            .collect()
    };
    let hf = run_check(
        "check_generate.py",
        dir.path(),
        &json!({"dir": full_dir, "prompts": ps, "max_new_tokens": 8, "pad_id": 0,
                "eos": model.info().eos_token_ids}),
    );
    let out = tokens(model.as_ref());
    assert_eq!(json!(out), hf["batched"], "full fine-tune");
    assert!(tok
        .inner()
        .decode(&out[0].iter().map(|t| *t as u32).collect::<Vec<_>>(), true)
        .unwrap()
        .starts_with(" yes"));

    // Two LoRA adapters of one Llama base, swapped on one loaded model.
    let mut lora = knobs.clone();
    lora["lora_r"] = json!(8);
    lora["lora_target_modules"] = json!(["q_proj", "v_proj", "down_proj"]);
    let a = run(
        &fixture("llama"),
        &spec(lora.clone()),
        &answering(" yes it is"),
        &dir.path().join("a"),
        None,
        None,
    );
    let b = run(
        &fixture("llama"),
        &spec(lora),
        &answering(" no it is not"),
        &dir.path().join("b"),
        None,
        None,
    );
    let (a_dir, b_dir) = (final_dir(&a.outcome), final_dir(&b.outcome));
    let (opts, base) = tuna_train::models::adapter_options(a_dir).unwrap();
    assert_eq!((opts.r, opts.target_modules.len()), (8, 3));
    assert!(base.ends_with("llama"), "{base}");
    let mut load = cpu_options(TaskHead::CausalLm);
    load.lora = Some(opts);
    let shared = tuna_train::load_model(&fixture("llama"), &load).unwrap();
    let tok = Tok::load(a_dir, true).unwrap();
    let ps = text_ids(&tok, &["item 3:", "item 40:"]);
    let s = greedy(8, shared.as_ref());
    let gen = |adapter: &std::path::Path| -> Vec<Vec<i64>> {
        shared.load_adapter(adapter).unwrap();
        generate(shared.as_ref(), &ps, 0, &s, &mut |_, _| true)
            .unwrap()
            .into_iter()
            .map(|g| g.tokens)
            .collect()
    };
    let (with_a, with_b, a_again) = (gen(a_dir), gen(b_dir), gen(a_dir));
    assert_ne!(with_a, with_b);
    assert_eq!(
        with_a, a_again,
        "switching back to an adapter gives its output again"
    );
    for (adapter, out) in [(a_dir, &with_a), (b_dir, &with_b)] {
        let hf = run_check(
            "check_generate.py",
            dir.path(),
            &json!({"dir": fixture("llama"), "adapter": adapter, "prompts": ps, "max_new_tokens": 8,
                    "pad_id": 0, "eos": shared.info().eos_token_ids}),
        );
        assert_eq!(json!(out), hf["batched"], "{adapter:?}");
    }
    // An adapter for other modules does not fit this model.
    let mut other = cpu_options(TaskHead::CausalLm);
    other.lora = Some(tuna_train::model::LoraOptions {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into()],
    });
    let e = tuna_train::load_model(&fixture("llama"), &other)
        .unwrap()
        .load_adapter(a_dir)
        .unwrap_err()
        .to_string();
    assert!(e.contains("LoRA tensors"), "{e}");
}
