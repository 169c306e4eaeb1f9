//! Training-side pieces that need no training run: AdamW against PyTorch, chat/prompt/text
//! label masking with real tokenizers and chat templates, classification features, and bad data
//! turning into errors that name the line (never a panic).

use tch::{Device, Kind, Tensor};
use tuna_core::data::{parse_json_line, Example, Label};
use tuna_core::spec::Task;
use tuna_train::data::{featurize, Features, LabelMap};
use tuna_train::optim::{AdamW, AdamWConfig};
use tuna_train::tokenizer::Tok;
use tuna_train::Error;

use crate::support::fixture;

fn targets_text(tok: &Tok, f: &Features) -> String {
    let ids: Vec<u32> = f
        .labels
        .iter()
        .filter(|l| **l >= 0)
        .map(|l| *l as u32)
        .collect();
    tok.inner().decode(&ids, false).unwrap()
}

fn line(s: &str) -> (u64, Example) {
    (1, parse_json_line(s, 1).unwrap())
}

#[test]
fn adamw_matches_pytorch() {
    // Reference: torch 2.11.0, torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8) with
    // weight_decay 0.1 on w and 0.0 on b, 5 steps of loss = ((x @ w + b - y) ** 2).sum() with
    // the x, y, w, b below; printed with "%.9f".
    let w = Tensor::from_slice(&[0.5f32, -0.3, 0.1, 0.8, -0.6, 0.2])
        .view([3, 2])
        .set_requires_grad(true);
    let b = Tensor::from_slice(&[0.05f32, -0.05]).set_requires_grad(true);
    let x = Tensor::from_slice(&[1.0f32, 2.0, -1.0, 0.5, -1.5, 2.0]).view([2, 3]);
    let y = Tensor::from_slice(&[1.0f32, 0.0, -1.0, 2.0]).view([2, 2]);
    let mut opt = AdamW::new(
        vec![
            ("lin.weight".into(), w.shallow_clone()),
            ("lin.bias".into(), b.shallow_clone()),
        ],
        AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(opt.decayed(), vec!["lin.weight".to_string()]);
    for _ in 0..5 {
        opt.zero_grad();
        let loss = (x.matmul(&w) + &b - &y)
            .pow_tensor_scalar(2)
            .sum(Kind::Float);
        loss.backward();
        opt.step(0.1).unwrap();
    }
    let want_w = [
        0.415_872_84_f32,
        0.129_511_53,
        0.086_240_49,
        0.286_196_62,
        -0.582_254_2,
        0.662_749_9,
    ];
    let want_b = [-0.050_736_744_f32, 0.421_909_15];
    let got_w: Vec<f32> = Vec::try_from(w.detach().view([-1])).unwrap();
    let got_b: Vec<f32> = Vec::try_from(b.detach()).unwrap();
    for (g, e) in got_w.iter().chain(&got_b).zip(want_w.iter().chain(&want_b)) {
        assert!((g - e).abs() < 2e-6, "got {got_w:?} {got_b:?}");
    }
    // State round trip.
    let dir = tempfile::tempdir().unwrap();
    opt.save(&dir.path().join("o.safetensors")).unwrap();
    let mut fresh = AdamW::new(
        vec![
            ("lin.weight".into(), w.shallow_clone()),
            ("lin.bias".into(), b.shallow_clone()),
        ],
        AdamWConfig::default(),
    )
    .unwrap();
    fresh.load(&dir.path().join("o.safetensors")).unwrap();
    assert_eq!(fresh.step, 5);
    let a = opt.state_tensors().unwrap();
    let c = fresh.state_tensors().unwrap();
    for ((na, ta), (nc, tc)) in a.iter().zip(c.iter()) {
        assert_eq!(na, nc);
        assert!(ta.equal(tc), "{na}");
    }
}

#[test]
fn clipping_scales_to_max_norm() {
    let p = Tensor::zeros([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let loss = (&p * Tensor::from_slice(&[3.0f32, 4.0, 0.0, 0.0])).sum(Kind::Float);
    loss.backward();
    let mut opt = AdamW::new(
        vec![("p".into(), p.shallow_clone())],
        AdamWConfig::default(),
    )
    .unwrap();
    let norm = opt.grad_norm().unwrap();
    assert!((f64::try_from(&norm).unwrap() - 5.0).abs() < 1e-6);
    opt.clip_grad_norm(&norm, 1.0).unwrap();
    let g: Vec<f32> = Vec::try_from(p.grad()).unwrap();
    assert!(
        (g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5,
        "{g:?}"
    );
}

#[test]
fn chat_loss_only_on_assistant_turns_with_end_of_turn() {
    let dir = fixture("llama");
    let tok = Tok::load(&dir, true).unwrap();
    assert!(tok.chat_template.is_some(), "chat_template.jinja is read");
    let ex = line(
        r#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"hi there"},{"role":"assistant","content":"skip me","weight":0},{"role":"user","content":"again"},{"role":"assistant","content":"learn this"}]}"#,
    );
    let (f, stats) = featurize(&tok, Task::CausalLm, &[ex], 512, None, "t").unwrap();
    assert_eq!(stats.examples, 1);
    let f = &f[0];
    let im_end = tok.token_to_id("<|im_end|>").unwrap() as i64;
    assert_eq!(targets_text(&tok, f), "learn this<|im_end|>\n");
    assert!(f.labels.contains(&im_end), "end-of-turn token is a target");
    // Every target sits after the last user turn; the input holds the whole conversation.
    let full = tok
        .inner()
        .decode(
            &f.input_ids.iter().map(|i| *i as u32).collect::<Vec<_>>(),
            false,
        )
        .unwrap();
    assert!(full.contains("skip me") && full.contains("Be brief."));
    // Both assistant turns when no weight is 0.
    let ex = line(
        r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"one"},{"role":"user","content":"b"},{"role":"assistant","content":"two"}]}"#,
    );
    let (f, _) = featurize(&tok, Task::CausalLm, &[ex], 512, None, "t").unwrap();
    assert_eq!(targets_text(&tok, &f[0]), "one<|im_end|>\ntwo<|im_end|>\n");
}

#[test]
fn chat_template_from_tokenizer_config_and_fallback() {
    // qwen2: template inside tokenizer_config.json, eos <|im_end|>.
    let tok = Tok::load(&fixture("qwen2"), true).unwrap();
    assert!(tok.chat_template.is_some());
    let ex = line(
        r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}"#,
    );
    let (f, _) = featurize(
        &tok,
        Task::CausalLm,
        std::slice::from_ref(&ex),
        512,
        None,
        "t",
    )
    .unwrap();
    assert_eq!(targets_text(&tok, &f[0]), "hello<|im_end|>\n");
    // gpt2: no template → fallback; the assistant turn ends with EOS, which is a target.
    let tok = Tok::load(&fixture("gpt2"), true).unwrap();
    assert!(tok.chat_template.is_none());
    let rendered = tok
        .render_chat(
            &[tuna_train::tokenizer::ChatMessage {
                role: "user",
                content: "hi",
            }],
            true,
        )
        .unwrap();
    assert_eq!(rendered, "User: hi\nAssistant: ");
    let (f, _) = featurize(&tok, Task::CausalLm, &[ex], 512, None, "t").unwrap();
    let t = targets_text(&tok, &f[0]);
    assert!(t.starts_with("hello<|endoftext|>"), "{t:?}");
    assert_eq!(
        tok.pad.as_ref().unwrap().content,
        "<|endoftext|>",
        "pad falls back to eos"
    );
}

#[test]
fn prompt_completion_and_text_labels() {
    let tok = Tok::load(&fixture("llama"), true).unwrap();
    let eos = tok.eos.as_ref().unwrap().id as i64;
    let bos = tok.bos.as_ref().unwrap().id as i64;
    let ex = line(r#"{"prompt":"Question: two plus two?","completion":" four"}"#);
    let (f, _) = featurize(&tok, Task::CausalLm, &[ex], 512, None, "t").unwrap();
    let f = &f[0];
    assert_eq!(f.input_ids[0], bos, "prompt keeps the tokenizer's BOS");
    assert_eq!(*f.labels.last().unwrap(), eos);
    assert_eq!(targets_text(&tok, f), " four</s>");
    let ex = line(r#"{"text":"hello world"}"#);
    let (f, _) = featurize(&tok, Task::CausalLm, &[ex], 512, None, "t").unwrap();
    assert_eq!(f[0].labels, f[0].input_ids);
    assert_eq!(*f[0].input_ids.last().unwrap(), eos);
}

#[test]
fn classification_features_and_truncation_keep_sep() {
    let tok = Tok::load(&fixture("bert"), false).unwrap();
    let cls = tok.token_to_id("[CLS]").unwrap() as i64;
    let sep = tok.token_to_id("[SEP]").unwrap() as i64;
    let long = "word ".repeat(300);
    let examples = vec![
        (
            2,
            Example::Labeled {
                text: "good".into(),
                text_pair: None,
                label: Label::Name("pos".into()),
            },
        ),
        (
            3,
            Example::Labeled {
                text: long,
                text_pair: None,
                label: Label::Name("neg".into()),
            },
        ),
    ];
    let map = LabelMap::from_examples(&examples);
    assert_eq!(map.id2label(), vec!["neg", "pos"]);
    let (f, stats) = featurize(
        &tok,
        Task::SequenceClassification,
        &examples,
        16,
        Some(&map),
        "t",
    )
    .unwrap();
    assert_eq!(stats.truncated, 1);
    assert_eq!(f[0].target, tuna_train::data::Target::Class(1));
    assert_eq!(
        (f[0].input_ids[0], *f[0].input_ids.last().unwrap()),
        (cls, sep)
    );
    assert_eq!(f[1].input_ids.len(), 16);
    assert_eq!((f[1].input_ids[0], f[1].input_ids[15]), (cls, sep));
}

#[test]
fn bad_data_is_an_error_naming_the_line() {
    let tok = Tok::load(&fixture("gpt2"), true).unwrap();
    let map = LabelMap::new(vec![Label::Int(0), Label::Int(1)]);
    let unseen = vec![(
        7,
        Example::Labeled {
            text: "x".into(),
            text_pair: None,
            label: Label::Int(5),
        },
    )];
    let e = featurize(
        &tok,
        Task::SequenceClassification,
        &unseen,
        32,
        Some(&map),
        "validation file",
    )
    .unwrap_err();
    assert!(
        matches!(&e, Error::Data(m) if m.contains("validation file line 7") && m.contains("`5`")),
        "{e}"
    );
    let wrong = vec![(4, Example::Text { text: "x".into() })];
    let e = featurize(
        &tok,
        Task::SequenceClassification,
        &wrong,
        32,
        Some(&map),
        "training file",
    )
    .unwrap_err();
    assert!(matches!(&e, Error::Data(m) if m.contains("line 4")), "{e}");
    let empty = vec![(
        9,
        Example::Text {
            text: String::new(),
        },
    )];
    let e = featurize(&tok, Task::CausalLm, &empty, 32, None, "training file").unwrap_err();
    assert!(matches!(&e, Error::Data(m) if m.contains("line 9")), "{e}");
    // Over-long: cut and counted; a prompt that fills the window leaves nothing and is dropped.
    let long = vec![
        (
            1,
            Example::Text {
                text: "a b c d e f g h i j k l m n o p q r s t u v w x y z ".repeat(20),
            },
        ),
        (
            2,
            Example::PromptCompletion {
                prompt: "p ".repeat(200),
                completion: "done".into(),
            },
        ),
    ];
    let (f, stats) = featurize(&tok, Task::CausalLm, &long, 32, None, "training file").unwrap();
    assert_eq!((f.len(), stats.truncated, stats.dropped), (1, 2, 1));
    assert_eq!(f[0].input_ids.len(), 32);
}
