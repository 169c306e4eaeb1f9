//! `tuna-trainer serve`, the inference process, driven as the worker will drive it: requests
//! on stdin, events on stdout. Its greedy texts are what in-process generation gives;
//! streamed deltas add up to the final text; chat prompts go through the chat template; an
//! adapter is applied over its base; the least recently used model is evicted past the memory
//! budget; bad requests and missing models answer errors and the process goes on.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use tuna_train::generate::{complete, Prompt, Sampling};
use tuna_train::model::TaskHead;
use tuna_train::tokenizer::Tok;

use crate::support::{cpu_options, fixture, lock};

struct Proc {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Proc {
    fn start(budget_mib: u64) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tuna-trainer"))
            .args([
                "serve",
                "--device",
                "cpu",
                "--threads",
                "2",
                "--memory-budget-mib",
            ])
            .arg(budget_mib.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut p = Proc { child, out };
        assert_eq!(p.next()["event"], "ready");
        p
    }

    fn send(&mut self, v: &Value) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{v}").unwrap();
        stdin.flush().unwrap();
    }

    fn next(&mut self) -> Value {
        let mut line = String::new();
        assert!(
            self.out.read_line(&mut line).unwrap() > 0,
            "the process ended"
        );
        serde_json::from_str(&line).unwrap()
    }

    /// The events of one request, up to its `done` or `error`.
    fn request(&mut self, mut v: Value) -> Vec<Value> {
        v["op"] = json!("complete");
        if v.get("max_tokens").is_none() {
            v["max_tokens"] = json!(10);
        }
        self.send(&v);
        let mut evs = Vec::new();
        loop {
            let ev = self.next();
            let end = ev["event"] == "done" || ev["event"] == "error";
            evs.push(ev);
            if end {
                return evs;
            }
        }
    }
}

/// What in-process generation gives for `prompts` (10 greedy tokens) with the model in `dir`,
/// or the LoRA `adapter` over it.
fn in_process(
    dir: &std::path::Path,
    adapter: Option<&std::path::Path>,
    prompts: &[Prompt],
) -> Vec<tuna_train::generate::Completion> {
    let mut opts = cpu_options(TaskHead::CausalLm);
    opts.lora = adapter.map(|a| tuna_train::models::adapter_options(a).unwrap().0);
    let model = tuna_train::load_model(dir, &opts).unwrap();
    if let Some(a) = adapter {
        model.load_adapter(a).unwrap();
    }
    let tok = Tok::load(adapter.unwrap_or(dir), true).unwrap();
    let s = Sampling {
        max_tokens: 10,
        ..Default::default()
    };
    complete(model.as_ref(), &tok, prompts, &[], &s).unwrap()
}

#[test]
fn the_inference_process_answers_completion_requests_in_order() {
    let _g = lock();
    let mut p = Proc::start(4096);
    // Greedy text as in-process generation gives it.
    let gpt2 = fixture("gpt2");
    let evs =
        p.request(json!({"id": "a", "model_dir": gpt2, "prompts": ["the cat", "a dog sat on"]}));
    assert_eq!(evs[0]["event"], "loaded", "{evs:?}");
    let done = evs.last().unwrap();
    assert_eq!(done["event"], "done", "{evs:?}");
    assert_eq!(done["id"], "a");
    let want = in_process(
        &gpt2,
        None,
        &[
            Prompt::Text("the cat".into()),
            Prompt::Text("a dog sat on".into()),
        ],
    );
    for (c, w) in done["choices"].as_array().unwrap().iter().zip(&want) {
        assert_eq!(c["text"], w.text.as_str());
        assert_eq!(c["completion_tokens"], w.completion_tokens);
        assert_eq!(c["prompt_tokens"], w.prompt_tokens);
        assert_eq!(c["finish_reason"], w.finish.as_str());
    }

    // Streaming: the deltas of each prompt add up to its text; the model stays loaded.
    let evs = p.request(
        json!({"id": "b", "model_dir": gpt2, "prompts": ["the cat", "a dog sat on"],
                               "stream": true, "temperature": 0.9, "seed": 5}),
    );
    assert!(evs.iter().all(|e| e["event"] != "loaded"), "{evs:?}");
    let done = evs.last().unwrap();
    for i in 0..2 {
        let streamed: String = evs
            .iter()
            .filter(|e| e["event"] == "delta" && e["index"] == i)
            .map(|e| e["text"].as_str().unwrap())
            .collect();
        assert_eq!(streamed, done["choices"][i]["text"].as_str().unwrap());
    }
    // The same seed, the same text.
    let again = p.request(
        json!({"id": "c", "model_dir": gpt2, "prompts": ["the cat", "a dog sat on"],
                                 "temperature": 0.9, "seed": 5}),
    );
    assert_eq!(again.last().unwrap()["choices"], done["choices"]);

    // Chat messages through the model's chat template.
    let qwen = fixture("qwen2");
    let evs = p.request(json!({"id": "d", "model_dir": qwen,
                               "prompts": [[{"role": "user", "content": "hello"}]]}));
    assert_eq!(evs.last().unwrap()["event"], "done", "{evs:?}");
    let want = in_process(
        &qwen,
        None,
        &[Prompt::Chat(vec![("user".into(), "hello".into())])],
    );
    assert_eq!(
        evs.last().unwrap()["choices"][0]["text"],
        want[0].text.as_str()
    );

    // A LoRA adapter over its base (tokenizer from the adapter's folder), beside the base alone.
    let dir = tempfile::tempdir().unwrap();
    let knobs = json!({"n_epochs": 3, "batch_size": 4, "learning_rate": 3e-3, "validation_split": 0.0,
                       "eval_samples": 0, "lora_r": 8, "lora_target_modules": ["q_proj", "v_proj", "down_proj"]});
    let trained = crate::train_loop::run(
        &fixture("llama"),
        &crate::train_loop::spec(knobs),
        &crate::generate::answering(" yes it is"),
        dir.path(),
        None,
        None,
    );
    let adapter = crate::tasks::final_dir(&trained.outcome);
    let llama = fixture("llama");
    let tuned = p.request(
        json!({"id": "l", "model_dir": llama, "adapter_dir": adapter, "prompts": ["item 3:"]}),
    );
    let want = in_process(&llama, Some(adapter), &[Prompt::Text("item 3:".into())]);
    assert_eq!(
        tuned.last().unwrap()["choices"][0]["text"],
        want[0].text.as_str(),
        "{tuned:?}"
    );
    let base = p.request(json!({"id": "m", "model_dir": llama, "prompts": ["item 3:"]}));
    assert_eq!(
        base[0]["event"], "loaded",
        "the base alone is another loaded model: {base:?}"
    );
    assert_ne!(
        base.last().unwrap()["choices"],
        tuned.last().unwrap()["choices"]
    );

    // Errors answer and the process goes on.
    let evs = p.request(json!({"id": "e", "model_dir": "/nonexistent", "prompts": ["x"]}));
    assert_eq!(
        (evs[0]["code"].as_str(), evs[0]["id"].as_str()),
        (Some("model_not_found"), Some("e"))
    );
    let evs = p.request(json!({"id": "f", "model_dir": gpt2, "prompts": []}));
    assert_eq!(evs[0]["code"], "invalid_request", "{evs:?}");
    p.send(&json!({"op": "fly"}));
    assert_eq!(p.next()["code"], "invalid_request");
    let evs = p.request(json!({"id": "g", "model_dir": gpt2, "prompts": ["the cat"]}));
    assert_eq!(evs.last().unwrap()["event"], "done");
    p.send(&json!({"op": "shutdown"}));
    assert!(p.child.wait().unwrap().success());
}

#[test]
fn models_beyond_the_budget_are_evicted_least_recently_used_first() {
    let _g = lock();
    let (gpt2, llama, qwen) = (fixture("gpt2"), fixture("llama"), fixture("qwen2"));
    // Each tiny model is well under 1 MiB: a budget of 1 MiB holds about two of them.
    let bytes = |dir: &std::path::Path| -> u64 {
        let m = tuna_train::load_model(dir, &cpu_options(TaskHead::CausalLm)).unwrap();
        m.all_parameters()
            .values()
            .map(|t| t.numel() as u64 * 4)
            .sum()
    };
    let sizes = [bytes(&gpt2), bytes(&llama), bytes(&qwen)];
    assert!(sizes.iter().all(|b| *b < 600 << 10), "{sizes:?}");
    assert!(sizes[0] + sizes[1] + sizes[2] > 1 << 20, "{sizes:?}");
    let mut p = Proc::start(1);
    let load = |p: &mut Proc, dir: &std::path::Path| -> Vec<String> {
        p.request(json!({"id": "x", "model_dir": dir, "prompts": ["hi"], "max_tokens": 2}))
            .iter()
            .filter_map(|e| match e["event"].as_str() {
                Some("evicted") => Some(format!("evicted {}", e["model_dir"].as_str().unwrap())),
                Some("loaded") => Some(format!("loaded {}", e["model_dir"].as_str().unwrap())),
                _ => None,
            })
            .collect()
    };
    let name = |d: &std::path::Path| d.display().to_string();
    assert_eq!(load(&mut p, &gpt2), [format!("loaded {}", name(&gpt2))]);
    assert_eq!(load(&mut p, &llama), [format!("loaded {}", name(&llama))]);
    // gpt2 is used again, so llama is the least recently used when qwen2 comes.
    assert!(load(&mut p, &gpt2).is_empty());
    let evs = load(&mut p, &qwen);
    assert_eq!(evs[0], format!("evicted {}", name(&llama)), "{evs:?}");
    assert_eq!(evs.last().unwrap(), &format!("loaded {}", name(&qwen)));
    // A model larger than the whole budget is refused, with what it needs.
    let mut none = Proc::start(0);
    let evs = none.request(json!({"id": "y", "model_dir": gpt2, "prompts": ["hi"]}));
    assert_eq!(evs[0]["code"], "insufficient_memory", "{evs:?}");
    assert!(
        evs[0]["message"]
            .as_str()
            .unwrap()
            .contains("the inference budget is 0 MiB"),
        "{evs:?}"
    );
}
