//! From parsed records ([`tuna_core::data::Example`]) to token features and padded batches.
//!
//! Causal LM (`labels[i]` is the target for position `i`; the loss compares position `i - 1`'s
//! logits with it, so position 0 is never a target):
//! - `{"text"}`: the text with the tokenizer's special tokens (BOS for Llama) plus EOS; every
//!   token is a target.
//! - `{"prompt", "completion"}`: the prompt (with special tokens) and the completion (without)
//!   are tokenized separately and concatenated, plus EOS; only completion tokens and EOS are
//!   targets.
//! - `{"messages"}`: rendered with the model's chat template (see [`crate::tokenizer`]) and
//!   tokenized without extra special tokens, as transformers' `apply_chat_template` does. Only
//!   assistant turns are targets: the span of turn `i` is the text that
//!   `render(messages[..=i])` adds to `render(messages[..i], add_generation_prompt=true)`; it
//!   includes the end-of-turn token (`<|im_end|>`, EOS, ...) so the model learns to stop. Tokens
//!   are mapped to spans by their byte offsets. An assistant message with `weight: 0` is not a
//!   target. When a template does not render prefixes consistently, the span falls back to the
//!   message content found in the full text plus the token that follows it.
//!
//! Sequence-level tasks: the text with the tokenizer's special tokens ([CLS] ... [SEP]),
//! truncated keeping the trailing special tokens; a sentence pair (`text_pair`) as the
//! tokenizer's pair template lays it out ([`Tok::encode_pair_truncated`], the longer text cut
//! first). Classification labels are mapped to ids by [`LabelMap`] (sorted: integers in numeric
//! order, then names); a multi-label record becomes one 0/1 target per label of the map; a
//! regression label must read as a number.
//!
//! Token classification: the words tokenized as pre-split input (each word on its own, as
//! transformers' `is_split_into_words=True` does) with the special tokens; each word's tag on
//! its first sub-token, -100 on the rest ([`first_subtoken_labels`]); cut keeping the trailing
//! special tokens, so the words past the cut are not scored.
//!
//! Everything is cut to `max_len` tokens (the start is kept). Cuts are counted in [`DataStats`];
//! a causal example left with no target after the cut is dropped and counted. A record that
//! yields nothing to learn from, a record of the wrong shape and (at evaluation) a label unseen
//! in training are [`Error::Data`] naming the file and line.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::{Device, Kind, Tensor};
use tuna_core::data::{Example, Label, Turns};
use tuna_core::spec::Task;

use crate::tokenizer::{ChatMessage, Tok};
use crate::{Error, Result};

/// One tokenized example.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    /// 1-based line in the source file.
    pub line: u64,
    pub input_ids: Vec<i64>,
    /// Causal LM: per-position target id or -100. Sequence-level tasks: empty.
    pub labels: Vec<i64>,
    pub token_type_ids: Vec<i64>,
    /// What the example is trained towards.
    pub target: Target,
}

/// The target of one example.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Causal LM: the per-position targets are [`Features::labels`].
    Tokens,
    /// Single-label classification: the label id.
    Class(i64),
    /// Regression (one number) or multi-label classification (0 or 1 per label).
    Values(Vec<f32>),
    /// Token classification: the per-position tag ids are [`Features::labels`] (-100 where
    /// no word starts), not shifted.
    Tags,
    /// Question answering: one window of a record's context.
    Span(Box<Span>),
    /// DPO: [`Features::input_ids`] and [`Features::labels`] are the preferred sequence
    /// (prompt and completion, the completion's tokens as labels), this the rejected one.
    Pair(Box<Pair>),
}

/// The rejected side of a preference pair and the reference model's log-probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub rejected_ids: Vec<i64>,
    pub rejected_labels: Vec<i64>,
    /// The summed log-probabilities of the preferred and the rejected completion under the
    /// reference model ([`completion_logps`]); NaN until the trainer has computed them.
    pub reference: [f32; 2],
}

/// A question-answering window: where its answer lies and what evaluation needs to read a span
/// back as text.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// The positions of the answer's first and last token; both 0 (the first token, `[CLS]`)
    /// when the window does not hold the whole answer or the question has none.
    pub start: i64,
    pub end: i64,
    /// The record's index in the file's examples (its windows share it).
    pub example: usize,
    /// The context characters each token covers (None outside the context).
    pub offsets: Vec<Option<(usize, usize)>>,
    pub context: std::sync::Arc<Vec<char>>,
    /// The record's answers (none: unanswerable).
    pub answers: std::sync::Arc<Vec<String>>,
}

impl Features {
    /// What counts in the loss's mean: target tokens (causal LM) or one per example.
    pub fn targets(&self) -> usize {
        match self.target {
            Target::Tokens => self.labels.iter().skip(1).filter(|l| **l != -100).count(),
            Target::Tags => self.labels.iter().filter(|l| **l != -100).count(),
            Target::Class(_) | Target::Values(_) | Target::Span(_) | Target::Pair(_) => 1,
        }
    }

    /// A causal-LM example (its targets are per token).
    pub fn is_causal(&self) -> bool {
        self.target == Target::Tokens
    }
}

pub use tuna_core::protocol::DataStats;

/// Label names ↔ ids for (single- and multi-label) sequence classification.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelMap {
    pub labels: Vec<Label>,
    index: BTreeMap<Label, i64>,
}

impl LabelMap {
    /// The sorted distinct labels of the training examples (the labels of every multi-label
    /// record).
    pub fn from_examples(examples: &[(u64, Example)]) -> LabelMap {
        let set: std::collections::BTreeSet<Label> = examples
            .iter()
            .flat_map(|(_, e)| e.labels().iter().cloned())
            .collect();
        Self::new(set.into_iter().collect())
    }

    pub fn new(labels: Vec<Label>) -> LabelMap {
        let index = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), i as i64))
            .collect();
        LabelMap { labels, index }
    }

    /// `id2label` as transformers writes it in config.json.
    pub fn id2label(&self) -> Vec<String> {
        self.labels.iter().map(ToString::to_string).collect()
    }

    pub fn get(&self, label: &Label) -> Option<i64> {
        self.index.get(label).copied().or_else(|| match label {
            // "1" in a JSONL string and 1 in a TSV are the same label.
            Label::Name(s) => s
                .parse::<i64>()
                .ok()
                .and_then(|i| self.index.get(&Label::Int(i)).copied()),
            Label::Int(i) => self.index.get(&Label::Name(i.to_string())).copied(),
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Tokenizes `examples` for `task`. `source` names the file in error messages.
pub fn featurize(
    tok: &Tok,
    task: Task,
    examples: &[(u64, Example)],
    max_len: usize,
    labels: Option<&LabelMap>,
    source: &str,
) -> Result<(Vec<Features>, DataStats)> {
    let stride = (max_len / 3).min(128);
    featurize_with(tok, task, examples, max_len, stride, labels, source)
}

/// [`featurize`] with question answering's windows sharing `doc_stride` tokens.
pub fn featurize_with(
    tok: &Tok,
    task: Task,
    examples: &[(u64, Example)],
    max_len: usize,
    doc_stride: usize,
    labels: Option<&LabelMap>,
    source: &str,
) -> Result<(Vec<Features>, DataStats)> {
    let mut out = Vec::with_capacity(examples.len());
    let mut stats = DataStats::default();
    let err = |line: u64, msg: String| Error::Data(format!("{source} line {line}: {msg}"));
    for (index, (line, ex)) in examples.iter().enumerate() {
        let line = *line;
        if let (Task::QuestionAnswering, Example::Answered { .. }) = (task, ex) {
            let windows = qa_windows(tok, ex, index, max_len, doc_stride)
                .map_err(|e| err(line, e.to_string()))?;
            if windows.len() > 1 {
                stats.truncated += 1;
            }
            for input_ids in windows {
                stats.examples += 1;
                stats.tokens += input_ids.input_ids.len();
                stats.target_tokens += 1;
                out.push(input_ids.with_line(line));
            }
            continue;
        }
        let mut f = match (task, ex) {
            (Task::CausalLm, Example::Text { text }) => {
                let mut ids = tok.ids(text, true).map_err(|e| err(line, e.to_string()))?;
                ids.extend(eos(tok));
                let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
                Features {
                    line,
                    labels: ids.clone(),
                    input_ids: ids,
                    token_type_ids: vec![],
                    target: Target::Tokens,
                }
            }
            (Task::CausalLm, Example::PromptCompletion { prompt, completion }) => {
                let p = if prompt.is_empty() {
                    Vec::new()
                } else {
                    tok.ids(prompt, true)
                        .map_err(|e| err(line, e.to_string()))?
                };
                let mut c = tok
                    .ids(completion, false)
                    .map_err(|e| err(line, e.to_string()))?;
                c.extend(eos(tok));
                let input_ids: Vec<i64> = p.iter().chain(c.iter()).map(|i| i64::from(*i)).collect();
                let labels: Vec<i64> = std::iter::repeat_n(-100, p.len())
                    .chain(c.iter().map(|i| i64::from(*i)))
                    .collect();
                Features {
                    line,
                    input_ids,
                    labels,
                    token_type_ids: vec![],
                    target: Target::Tokens,
                }
            }
            (
                Task::CausalLm,
                Example::Preference {
                    prompt,
                    chosen,
                    rejected,
                },
            ) => {
                let Some((f, cut)) = pair_features(tok, prompt, chosen, rejected, max_len)
                    .map_err(|e| err(line, e.to_string()))?
                else {
                    stats.dropped += 1;
                    continue;
                };
                let Target::Pair(p) = &f.target else {
                    unreachable!("pair_features makes pairs")
                };
                stats.truncated += usize::from(cut);
                stats.examples += 1;
                stats.tokens += f.input_ids.len() + p.rejected_ids.len();
                stats.target_tokens += [&f.labels, &p.rejected_labels]
                    .iter()
                    .map(|l| l.iter().filter(|i| **i != -100).count())
                    .sum::<usize>();
                out.push(f.with_line(line));
                continue;
            }
            (Task::CausalLm, Example::Chat { messages }) => chat_features(tok, messages)
                .map_err(|e| err(line, e.to_string()))?
                .with_line(line),
            (
                Task::SequenceClassification | Task::SequenceRegression,
                Example::Labeled {
                    text,
                    text_pair,
                    label: _,
                },
            )
            | (
                Task::MultiLabelClassification,
                Example::MultiLabeled {
                    text,
                    text_pair,
                    labels: _,
                },
            ) => {
                let target = sequence_target(task, ex, labels).map_err(|m| err(line, m))?;
                let (ids, types, cut) = match text_pair {
                    None => tok.encode_truncated(text, max_len),
                    Some(pair) => tok.encode_pair_truncated(text, pair, max_len),
                }
                .map_err(|e| err(line, e.to_string()))?;
                if cut {
                    stats.truncated += 1;
                }
                Features {
                    line,
                    input_ids: ids.into_iter().map(i64::from).collect(),
                    labels: vec![],
                    token_type_ids: types.into_iter().map(i64::from).collect(),
                    target,
                }
            }
            (Task::TokenClassification, Example::Tagged { tokens, tags }) => {
                let map = labels.ok_or_else(|| err(line, "no label map".into()))?;
                let ids = tags
                    .iter()
                    .map(|t| {
                        map.get(t).ok_or_else(|| {
                            err(
                                line,
                                format!(
                                    "tag `{t}` does not occur in the training data (tags: {})",
                                    map.id2label().join(", ")
                                ),
                            )
                        })
                    })
                    .collect::<Result<Vec<i64>>>()?;
                let enc = tok
                    .encode_words_truncated(tokens, max_len)
                    .map_err(|e| err(line, e.to_string()))?;
                if enc.cut {
                    stats.truncated += 1;
                }
                Features {
                    line,
                    input_ids: enc.ids.iter().map(|i| i64::from(*i)).collect(),
                    labels: first_subtoken_labels(&enc.word_ids, &ids),
                    token_type_ids: enc.type_ids.iter().map(|i| i64::from(*i)).collect(),
                    target: Target::Tags,
                }
            }
            (task, ex) => {
                return Err(err(
                    line,
                    format!(
                        "a `{}` record cannot train a {} job",
                        ex.shape().as_str(),
                        task.as_str()
                    ),
                ))
            }
        };
        let per_token = matches!(f.target, Target::Tokens | Target::Tags);
        if f.input_ids.is_empty() || (per_token && f.targets() == 0) {
            return Err(err(line, "the example has no tokens to learn from".into()));
        }
        if f.input_ids.len() > max_len {
            stats.truncated += 1;
            f.input_ids.truncate(max_len);
            f.labels.truncate(max_len);
            f.token_type_ids.truncate(max_len);
            if f.is_causal() && f.targets() == 0 {
                stats.dropped += 1;
                continue;
            }
        }
        stats.examples += 1;
        stats.tokens += f.input_ids.len();
        stats.target_tokens += f.targets();
        out.push(f);
    }
    Ok((out, stats))
}

/// The windows of a question-answering record ([`Tok::encode_question_windows`]), each with its
/// answer's token span as transformers' `run_qa.py` finds it (the first answer: the last token
/// starting at or before its first character, the first token ending at or after its last; the
/// first token when the window does not hold it all).
fn qa_windows(
    tok: &Tok,
    ex: &Example,
    example: usize,
    max_len: usize,
    stride: usize,
) -> Result<Vec<Features>> {
    let Example::Answered {
        question,
        context,
        answers,
    } = ex
    else {
        return Err(Error::Data("not a question-answering record".into()));
    };
    let chars = std::sync::Arc::new(context.chars().collect::<Vec<char>>());
    let texts = std::sync::Arc::new(answers.iter().map(|a| a.text.clone()).collect::<Vec<_>>());
    let span = answers
        .first()
        .map(|a| (a.start, a.start + a.text.chars().count()));
    let windows = tok.encode_question_windows(question, context, max_len, stride)?;
    Ok(windows
        .into_iter()
        .map(|w| {
            let ctx: Vec<(usize, (usize, usize))> = w
                .offsets
                .iter()
                .enumerate()
                .filter_map(|(j, o)| o.map(|o| (j, o)))
                .collect();
            let (start, end) = match (span, ctx.first(), ctx.last()) {
                (Some((s, e)), Some((_, first)), Some((_, last)))
                    if first.0 <= s && last.1 >= e =>
                {
                    let start = ctx.iter().rev().find(|(_, o)| o.0 <= s).map(|(j, _)| *j);
                    let end = ctx.iter().find(|(_, o)| o.1 >= e).map(|(j, _)| *j);
                    (start.unwrap_or(0) as i64, end.unwrap_or(0) as i64)
                }
                _ => (0, 0),
            };
            Features {
                line: 0,
                input_ids: w.ids.iter().map(|i| i64::from(*i)).collect(),
                labels: vec![],
                token_type_ids: w.type_ids.iter().map(|i| i64::from(*i)).collect(),
                target: Target::Span(Box::new(Span {
                    start,
                    end,
                    example,
                    offsets: w.offsets,
                    context: chars.clone(),
                    answers: texts.clone(),
                })),
            }
        })
        .collect())
}

/// Token classification's labels, as transformers' examples align them: each word's tag on its
/// first sub-token, -100 on the word's other sub-tokens and on the special tokens.
pub fn first_subtoken_labels(word_ids: &[Option<u32>], tags: &[i64]) -> Vec<i64> {
    let mut prev = None;
    word_ids
        .iter()
        .map(|w| {
            let label = match *w {
                Some(i) if Some(i) != prev => tags.get(i as usize).copied().unwrap_or(-100),
                _ => -100,
            };
            prev = *w;
            label
        })
        .collect()
}

/// The target of a sequence-level record: its label id (classification), its number
/// (regression) or a 0/1 per label of `labels` (multi-label). The error is the line's message.
fn sequence_target(
    task: Task,
    ex: &Example,
    labels: Option<&LabelMap>,
) -> std::result::Result<Target, String> {
    let map = || labels.ok_or_else(|| "no label map".to_string());
    let unseen = |label: &Label, map: &LabelMap| {
        format!(
            "label `{label}` does not occur in the training data (labels: {})",
            map.id2label().join(", ")
        )
    };
    match (task, ex) {
        (Task::SequenceClassification, Example::Labeled { label, .. }) => {
            let map = map()?;
            map.get(label)
                .map(Target::Class)
                .ok_or_else(|| unseen(label, map))
        }
        (Task::SequenceRegression, Example::Labeled { label, .. }) => match label.as_number() {
            Some(v) => Ok(Target::Values(vec![v as f32])),
            None => Err(format!(
                "label `{label}` is not a number; task sequence_regression trains on numeric labels"
            )),
        },
        (Task::MultiLabelClassification, Example::MultiLabeled { labels: ls, .. }) => {
            let map = map()?;
            let mut v = vec![0f32; map.len()];
            for label in ls {
                let id = map.get(label).ok_or_else(|| unseen(label, map))?;
                v[id as usize] = 1.0;
            }
            Ok(Target::Values(v))
        }
        _ => Err(format!(
            "a `{}` record cannot train a {} job",
            ex.shape().as_str(),
            task.as_str()
        )),
    }
}

fn eos(tok: &Tok) -> Option<u32> {
    tok.eos.as_ref().map(|e| e.id)
}

impl Features {
    fn with_line(mut self, line: u64) -> Features {
        self.line = line;
        self
    }
}

/// Byte spans of the assistant turns to learn from, in the rendered conversation.
pub fn assistant_spans(
    tok: &Tok,
    messages: &[tuna_core::data::Message],
    full: &str,
) -> Result<Vec<(usize, usize, bool)>> {
    let msgs: Vec<ChatMessage<'_>> = messages
        .iter()
        .map(|m| ChatMessage {
            role: &m.role,
            content: &m.content,
        })
        .collect();
    let mut spans = Vec::new();
    let mut cursor = 0usize;
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = tok.render_chat(&msgs[..i], true).ok();
        let upto = tok.render_chat(&msgs[..=i], false).ok();
        let exact = match (&before, &upto) {
            (Some(b), Some(u))
                if u.starts_with(b.as_str())
                    && full.starts_with(u.as_str())
                    && u.len() > b.len() =>
            {
                Some((b.len(), u.len()))
            }
            _ => None,
        };
        let span = match exact {
            Some((s, e)) => (s, e, false),
            None => match full[cursor..].find(m.content.as_str()) {
                Some(pos) if !m.content.is_empty() => {
                    (cursor + pos, cursor + pos + m.content.len(), true)
                }
                _ => {
                    return Err(Error::Data(format!(
                        "cannot locate assistant message {i} in the rendered chat template output"
                    )))
                }
            },
        };
        cursor = span.1;
        if m.weight != Some(0) {
            spans.push(span);
        }
    }
    Ok(spans)
}

/// A preference pair tokenised as TRL's `DPOTrainer` does: the prompt alone (with the chat
/// template's generation prompt) and the prompt followed by each completion (a conversation
/// rendered whole; plain text with the end-of-sequence token appended and the tokenizer's
/// special tokens), the completions starting where the prompt's tokens and each full
/// sequence's first differ. Each sequence is cut to `max_len` tokens from the end; `None` when
/// the prompt alone fills `max_len` (nothing of the completions is left), else the pair and
/// whether a sequence was cut. Line set by the caller.
fn pair_features(
    tok: &Tok,
    prompt: &Turns,
    chosen: &Turns,
    rejected: &Turns,
    max_len: usize,
) -> Result<Option<(Features, bool)>> {
    let ids = |text: &str, special: bool| -> Result<Vec<i64>> {
        Ok(tok.ids(text, special)?.into_iter().map(i64::from).collect())
    };
    let (p, pc, pr) = match (prompt, chosen, rejected) {
        (Turns::Chat(p), Turns::Chat(c), Turns::Chat(r)) => {
            let render = |parts: &[&[tuna_core::data::Message]], generation: bool| {
                let msgs: Vec<ChatMessage<'_>> = parts
                    .iter()
                    .flat_map(|m| m.iter())
                    .map(|m| ChatMessage {
                        role: &m.role,
                        content: &m.content,
                    })
                    .collect();
                tok.render_chat(&msgs, generation)
            };
            (
                ids(&render(&[p], true)?, false)?,
                ids(&render(&[p, c], false)?, false)?,
                ids(&render(&[p, r], false)?, false)?,
            )
        }
        (Turns::Text(p), Turns::Text(c), Turns::Text(r)) => {
            let eos = tok.eos.as_ref().map_or("", |e| e.content.as_str());
            let with_eos = |s: &str| {
                if s.ends_with(eos) {
                    s.to_string()
                } else {
                    format!("{s}{eos}")
                }
            };
            (
                ids(p, true)?,
                ids(&format!("{p}{}", with_eos(c)), true)?,
                ids(&format!("{p}{}", with_eos(r)), true)?,
            )
        }
        _ => {
            return Err(Error::Data(
                "a preference pair mixes messages and plain text".into(),
            ))
        }
    };
    let common = |a: &[i64], b: &[i64]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let n = common(&p, &pc).min(common(&p, &pr));
    if n >= max_len {
        return Ok(None);
    }
    let cut = pc.len() > max_len || pr.len() > max_len;
    let side = |mut full: Vec<i64>| {
        full.truncate(max_len);
        let labels: Vec<i64> = full
            .iter()
            .enumerate()
            .map(|(i, t)| if i < n { -100 } else { *t })
            .collect();
        (full, labels)
    };
    let ((input_ids, labels), (rejected_ids, rejected_labels)) = (side(pc), side(pr));
    if labels.len() <= n || rejected_labels.len() <= n {
        return Err(Error::Data(
            "a completion of the pair has no tokens after the prompt".into(),
        ));
    }
    Ok(Some((
        Features {
            line: 0,
            input_ids,
            labels,
            token_type_ids: vec![],
            target: Target::Pair(Box::new(Pair {
                rejected_ids,
                rejected_labels,
                reference: [f32::NAN; 2],
            })),
        },
        cut,
    )))
}

/// Tokens and labels of one conversation (line set by the caller).
fn chat_features(tok: &Tok, messages: &[tuna_core::data::Message]) -> Result<Features> {
    let msgs: Vec<ChatMessage<'_>> = messages
        .iter()
        .map(|m| ChatMessage {
            role: &m.role,
            content: &m.content,
        })
        .collect();
    let full = tok.render_chat(&msgs, false)?;
    let spans = assistant_spans(tok, messages, &full)?;
    let enc = tok.encode(&full, false)?;
    let mut labels = vec![-100i64; enc.ids.len()];
    for (s, e, extend) in spans {
        let mut last = None;
        for (j, (a, b)) in enc.offsets.iter().enumerate() {
            // A token belongs to the span if it starts inside it (or, for zero-width tokens, sits in it).
            if (*a >= s && *a < e) || (*a == *b && *a > s && *a <= e) {
                labels[j] = i64::from(enc.ids[j]);
                last = Some(j);
            }
        }
        if extend {
            if let Some(j) = last {
                if j + 1 < labels.len() {
                    labels[j + 1] = i64::from(enc.ids[j + 1]);
                }
            }
        }
    }
    Ok(Features {
        line: 0,
        input_ids: enc.ids.iter().map(|i| i64::from(*i)).collect(),
        labels,
        token_type_ids: vec![],
        target: Target::Tokens,
    })
}

/// Splits off `fraction` of `examples` for validation, seeded (`floor(n * fraction)` examples;
/// none when that is 0 or would leave no training data).
pub fn split_validation<T: Clone>(examples: &[T], fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let n = examples.len();
    let k = (n as f64 * fraction).floor() as usize;
    if k == 0 || k >= n {
        return (examples.to_vec(), Vec::new());
    }
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ SPLIT_SALT);
    idx.shuffle(&mut rng);
    let mut valid_idx: Vec<usize> = idx[..k].to_vec();
    valid_idx.sort_unstable();
    let mut is_valid = vec![false; n];
    for i in &valid_idx {
        is_valid[*i] = true;
    }
    let train = examples
        .iter()
        .enumerate()
        .filter(|(i, _)| !is_valid[*i])
        .map(|(_, e)| e.clone())
        .collect();
    let valid = valid_idx.into_iter().map(|i| examples[i].clone()).collect();
    (train, valid)
}

/// Mixed into the seed so the validation split and the epoch orders differ.
const SPLIT_SALT: u64 = 0x5eed_5911_da7a;

/// The order of the training examples in `epoch` (0-based): a permutation seeded by
/// `(seed, epoch)`, so a resumed run sees the same order.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(epoch),
    );
    idx.shuffle(&mut rng);
    idx
}

/// A padded batch on the model's device.
pub struct Collated {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    /// Causal: `[b, t]` with -100 on padding and non-targets. Classification: `[b]` label ids.
    /// Regression and multi-label: `[b, n]` fp32 (one number; a 0/1 per label).
    pub labels: Tensor,
    pub token_type_ids: Option<Tensor>,
    pub batch_size: usize,
    pub seq_len: usize,
    /// Non-padding tokens.
    pub tokens: usize,
    /// Tokens (causal) or examples (classification) in the loss.
    pub targets: usize,
    /// Packed rows: where each example sits (see [`collate_packed`]).
    pub packed: Option<PackedLayout>,
    /// Preference pairs: the reference log-probabilities of the rows ([`collate_pairs`]).
    pub reference: Option<Tensor>,
}

/// The layout of packed rows (several causal-LM examples per row), `[b, t]` Int64 each on the
/// model's device: `segment_ids` numbers the examples of a row from 1 (0 = padding) and
/// `position_ids` restarts at 0 with every example. The model lets a token attend only to
/// earlier tokens of its own example, so a packed row computes what the separate rows would.
pub struct PackedLayout {
    pub segment_ids: Tensor,
    pub position_ids: Tensor,
}

/// Groups examples of these lengths into rows of at most `max_len` tokens (first fit over the
/// lengths in decreasing order; an example longer than `max_len` gets a row of its own). Returns
/// the indices of each row, in input order within a row.
pub fn pack_rows(lengths: &[usize], max_len: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|i| std::cmp::Reverse(lengths[*i]));
    let mut rows: Vec<(usize, Vec<usize>)> = Vec::new();
    for i in order {
        let n = lengths[i];
        match rows.iter_mut().find(|(used, _)| used + n <= max_len) {
            Some((used, members)) => {
                *used += n;
                members.push(i);
            }
            None => rows.push((n, vec![i])),
        }
    }
    rows.into_iter()
        .map(|(_, mut m)| {
            m.sort_unstable();
            m
        })
        .collect()
}

/// Splits examples of these lengths into groups of similar length, each to be padded to its own
/// longest: the split (of the lengths sorted) that minimises the padded tokens plus
/// `overhead_tokens` per group (what one more forward/backward pass costs, in tokens). Returns
/// indices; the groups are in increasing length and each keeps input order.
pub fn group_by_length(lengths: &[usize], overhead_tokens: usize) -> Vec<Vec<usize>> {
    let n = lengths.len();
    if n == 0 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|i| (lengths[*i], *i));
    // best[j]: cheapest split of the first j sorted examples; from[j]: where its last group starts.
    let mut best = vec![usize::MAX; n + 1];
    let mut from = vec![0usize; n + 1];
    best[0] = 0;
    for j in 1..=n {
        let longest = lengths[order[j - 1]];
        for i in 0..j {
            let c = best[i] + (j - i) * longest + overhead_tokens;
            if c < best[j] {
                best[j] = c;
                from[j] = i;
            }
        }
    }
    let mut groups = Vec::new();
    let mut j = n;
    while j > 0 {
        let i = from[j];
        let mut g: Vec<usize> = order[i..j].to_vec();
        g.sort_unstable();
        groups.push(g);
        j = i;
    }
    groups.reverse();
    groups
}

/// Packs causal-LM `items` into rows of at most `max_len` tokens ([`pack_rows`]), right-padded
/// to the longest row. Each example's first label is masked (-100) so no position predicts the
/// next example's first token; [`Features::targets`] never counts it anyway, so the loss sums
/// over exactly the targets of the unpacked batch.
pub fn collate_packed(
    items: &[&Features],
    pad_id: i64,
    device: Device,
    max_len: usize,
) -> Result<Collated> {
    if items.iter().any(|f| !f.is_causal()) {
        return Err(Error::Data(
            "packing applies to causal language modelling only".into(),
        ));
    }
    let lengths: Vec<usize> = items.iter().map(|f| f.input_ids.len()).collect();
    let rows = pack_rows(&lengths, max_len.max(1));
    let b = rows.len();
    let t = rows
        .iter()
        .map(|r| r.iter().map(|i| lengths[*i]).sum::<usize>())
        .max()
        .unwrap_or(0);
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0i64; b * t];
    let mut labels = vec![-100i64; b * t];
    let mut seg = vec![0i64; b * t];
    let mut pos = vec![0i64; b * t];
    let (mut tokens, mut targets) = (0, 0);
    for (r, members) in rows.iter().enumerate() {
        let mut at = r * t;
        for (k, i) in members.iter().enumerate() {
            let f = items[*i];
            let n = f.input_ids.len();
            ids[at..at + n].copy_from_slice(&f.input_ids);
            labels[at..at + n].copy_from_slice(&f.labels);
            labels[at] = -100;
            for j in 0..n {
                mask[at + j] = 1;
                seg[at + j] = k as i64 + 1;
                pos[at + j] = j as i64;
            }
            at += n;
            tokens += n;
            targets += f.targets();
        }
    }
    let to = |v: &[i64]| rows_on(v, b, t, device);
    Ok(Collated {
        input_ids: to(&ids)?,
        attention_mask: to(&mask)?,
        labels: to(&labels)?,
        token_type_ids: None,
        batch_size: b,
        seq_len: t,
        tokens,
        targets,
        packed: Some(PackedLayout {
            segment_ids: to(&seg)?,
            position_ids: to(&pos)?,
        }),
        reference: None,
    })
}

/// Right-pads `items` to the longest one: `pad_id` in `input_ids`, 0 in the attention mask and
/// -100 in the labels.
pub fn collate(
    items: &[&Features],
    pad_id: i64,
    device: Device,
    with_types: bool,
) -> Result<Collated> {
    if let Some(Target::Pair(_)) = items.first().map(|f| &f.target) {
        return collate_pairs(items, pad_id, device);
    }
    let b = items.len();
    let t = items.iter().map(|f| f.input_ids.len()).max().unwrap_or(0);
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0i64; b * t];
    let mut types = vec![0i64; b * t];
    // Every item's target is of the first one's kind (and, for numbers, its width).
    let first = items.first().map(|f| &f.target);
    let width = match first {
        Some(Target::Values(v)) => v.len(),
        _ => 0,
    };
    let same_kind = |f: &Features| match (first, &f.target) {
        (Some(Target::Values(_)), Target::Values(v)) => v.len() == width,
        (Some(a), b) => std::mem::discriminant(a) == std::mem::discriminant(b),
        (None, _) => true,
    };
    if !items.iter().all(|f| same_kind(f)) {
        return Err(Error::Data(
            "a batch mixes examples of different tasks".into(),
        ));
    }
    let mut labels = match first {
        Some(Target::Tokens | Target::Tags | Target::Pair(_)) | None => vec![-100i64; b * t],
        Some(Target::Class(_)) => vec![0i64; b],
        Some(Target::Span(_)) => vec![0i64; 2 * b],
        Some(Target::Values(_)) => Vec::new(),
    };
    let mut values = vec![0f32; b * width];
    let mut tokens = 0;
    let mut targets = 0;
    for (r, f) in items.iter().enumerate() {
        let n = f.input_ids.len();
        ids[r * t..r * t + n].copy_from_slice(&f.input_ids);
        mask[r * t..r * t + n].iter_mut().for_each(|m| *m = 1);
        if !f.token_type_ids.is_empty() {
            types[r * t..r * t + n].copy_from_slice(&f.token_type_ids[..n]);
        }
        match &f.target {
            Target::Class(c) => labels[r] = *c,
            Target::Tokens | Target::Tags => labels[r * t..r * t + n].copy_from_slice(&f.labels),
            Target::Values(v) => values[r * width..(r + 1) * width].copy_from_slice(v),
            Target::Span(s) => {
                labels[2 * r] = s.start;
                labels[2 * r + 1] = s.end;
            }
            Target::Pair(_) => unreachable!("pairs are collated by collate_pairs"),
        }
        tokens += n;
        targets += f.targets();
    }
    let shape = [b as i64, t as i64];
    let to = |v: &[i64], s: &[i64]| -> Result<Tensor> {
        Ok(Tensor::f_from_slice(v)?.f_view(s)?.f_to_device(device)?)
    };
    let labels = match first {
        Some(Target::Class(_)) => to(&labels, &[b as i64])?,
        Some(Target::Span(_)) => to(&labels, &[b as i64, 2])?,
        Some(Target::Values(_)) => Tensor::f_from_slice(&values)?
            .f_view([b as i64, width as i64])?
            .f_to_device(device)?,
        _ => to(&labels, &shape)?,
    };
    Ok(Collated {
        input_ids: to(&ids, &shape)?,
        attention_mask: to(&mask, &shape)?,
        labels,
        token_type_ids: if with_types {
            Some(to(&types, &shape)?)
        } else {
            None
        },
        batch_size: b,
        seq_len: t,
        tokens,
        targets,
        packed: None,
        reference: None,
    })
}

/// `b` rows of `t` values (row after row) as a `[b, t]` Int64 tensor on `device`.
fn rows_on(v: &[i64], b: usize, t: usize, device: Device) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(v)?
        .f_view([b as i64, t as i64])?
        .f_to_device(device)?)
}

/// DPO: a micro-batch of preference pairs as `2b` rows, the `b` preferred sequences then the
/// `b` rejected ones (as TRL batches them), padded on the right to the longest; labels are each
/// completion's tokens (-100 elsewhere), `reference` the reference log-probabilities in the
/// same order (`[2b]` fp32). `targets` counts pairs.
pub fn collate_pairs(items: &[&Features], pad_id: i64, device: Device) -> Result<Collated> {
    let pairs: Vec<&Pair> = items
        .iter()
        .map(|f| match &f.target {
            Target::Pair(p) => Ok(p.as_ref()),
            _ => Err(Error::Data(
                "a batch mixes preference pairs and other examples".into(),
            )),
        })
        .collect::<Result<_>>()?;
    let rows: Vec<(&[i64], &[i64])> = items
        .iter()
        .map(|f| (f.input_ids.as_slice(), f.labels.as_slice()))
        .chain(
            pairs
                .iter()
                .map(|p| (p.rejected_ids.as_slice(), p.rejected_labels.as_slice())),
        )
        .collect();
    let (b, t) = (
        rows.len(),
        rows.iter().map(|r| r.0.len()).max().unwrap_or(0),
    );
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0i64; b * t];
    let mut labels = vec![-100i64; b * t];
    let mut tokens = 0;
    for (r, (row_ids, row_labels)) in rows.iter().enumerate() {
        let n = row_ids.len();
        ids[r * t..r * t + n].copy_from_slice(row_ids);
        mask[r * t..r * t + n].iter_mut().for_each(|m| *m = 1);
        labels[r * t..r * t + n].copy_from_slice(row_labels);
        tokens += n;
    }
    let reference: Vec<f32> = pairs
        .iter()
        .map(|p| p.reference[0])
        .chain(pairs.iter().map(|p| p.reference[1]))
        .collect();
    let to = |v: &[i64]| rows_on(v, b, t, device);
    Ok(Collated {
        input_ids: to(&ids)?,
        attention_mask: to(&mask)?,
        labels: to(&labels)?,
        token_type_ids: None,
        batch_size: b,
        seq_len: t,
        tokens,
        targets: items.len(),
        packed: None,
        reference: Some(Tensor::f_from_slice(&reference)?.f_to_device(device)?),
    })
}

/// Each row's summed log-probability of its labelled tokens (`[r, t, vocab]` logits, `[r, t]`
/// labels with -100 where nothing counts, the token at `i` predicted from position `i - 1`):
/// `[r]` fp32, what TRL's `DPOTrainer` sums over a completion.
pub fn completion_logps(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let logits = logits.f_to_kind(Kind::Float)?;
    let v = *logits.size().last().unwrap_or(&1);
    let s = labels.size();
    let shifted = shifted_labels(labels)?;
    // Cross-entropy without reduction is each position's -log p (0 where the label is -100).
    let nll = logits.f_reshape([-1, v])?.f_cross_entropy_loss(
        &shifted,
        None::<Tensor>,
        tch::Reduction::None,
        -100,
        0.0,
    )?;
    Ok(nll
        .f_view([s[0], s[1]])?
        .f_sum_dim_intlist(1, false, Kind::Float)?
        .f_neg()?)
}

/// DPO's sigmoid loss and TRL's reward statistics for `b` pairs, from the policy's and the
/// reference's `[2b]` log-probabilities (the preferred completions first). All 0-dim fp32
/// tensors on the device but the per-pair rewards.
pub struct DpoTerms {
    /// Σ -log σ(β((π_c - ref_c) - (π_r - ref_r))).
    pub loss_sum: Tensor,
    /// Pairs whose preferred completion has the higher reward.
    pub correct: Tensor,
    /// Σ (reward_c - reward_r).
    pub margin_sum: Tensor,
    /// `[b]` β(π_c - ref_c) and β(π_r - ref_r), detached.
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
}

pub fn dpo_terms(logps: &Tensor, reference: &Tensor, beta: f64) -> Result<DpoTerms> {
    let b = logps.size()[0] / 2;
    let ratios = logps.f_sub(reference)?;
    let (c, r) = (ratios.f_narrow(0, 0, b)?, ratios.f_narrow(0, b, b)?);
    let margin = c.f_sub(&r)?.f_mul_scalar(beta)?;
    let loss_sum = margin.f_log_sigmoid()?.f_neg()?.f_sum(Kind::Float)?;
    let (chosen_rewards, rejected_rewards) = (
        c.f_detach()?.f_mul_scalar(beta)?,
        r.f_detach()?.f_mul_scalar(beta)?,
    );
    Ok(DpoTerms {
        loss_sum,
        correct: chosen_rewards
            .f_gt_tensor(&rejected_rewards)?
            .f_sum(Kind::Float)?,
        margin_sum: margin.f_detach()?.f_sum(Kind::Float)?,
        chosen_rewards,
        rejected_rewards,
    })
}

/// The loss of `task` summed over the batch's targets, in fp32, plus the number of correct
/// predictions; both 0-dim tensors on the device (no host sync).
/// - causal LM: token cross-entropy, logits at `i - 1` against labels at `i`; correct tokens;
/// - classification: example cross-entropy; correct examples;
/// - regression: squared error (`[b, 1]` logits against `[b, 1]` labels); correct is 0;
/// - token classification: cross-entropy of every tagged position (`[b, t, labels]` logits
///   against `[b, t]` tag ids, -100 elsewhere); correct tags;
/// - multi-label: binary cross-entropy with logits, the mean over the labels of each example
///   (so the mean over examples is transformers' `BCEWithLogitsLoss`); correct is 0.
pub fn loss_and_correct(logits: &Tensor, labels: &Tensor, task: Task) -> Result<(Tensor, Tensor)> {
    let logits = logits.f_to_kind(Kind::Float)?;
    match task {
        Task::CausalLm => {
            // Shift the labels, not the logits: `logits[:, :-1]` is not contiguous, so
            // flattening it would copy the whole `[b, t, vocab]` tensor (and its gradient) once
            // more.
            let v = *logits.size().last().unwrap_or(&1);
            per_position(&logits.f_reshape([-1, v])?, &shifted_labels(labels)?)
        }
        Task::TokenClassification => {
            let v = *logits.size().last().unwrap_or(&1);
            per_position(&logits.f_reshape([-1, v])?, &labels.f_reshape([-1])?)
        }
        Task::QuestionAnswering => {
            // transformers' `*ForQuestionAnswering`: the mean of the start and the end
            // position's cross-entropy, per window.
            let (start, end) = (logits.f_select(-1, 0)?, logits.f_select(-1, 1)?);
            let ce = |x: &Tensor, i: i64| -> Result<Tensor> {
                Ok(x.f_cross_entropy_loss(
                    &labels.f_select(1, i)?,
                    None::<Tensor>,
                    tch::Reduction::Sum,
                    -100,
                    0.0,
                )?)
            };
            let loss = ce(&start, 0)?.f_add(&ce(&end, 1)?)?.f_div_scalar(2.0)?;
            Ok((loss, Tensor::f_zeros([], (Kind::Int64, logits.device()))?))
        }
        Task::SequenceClassification => {
            let loss = logits.f_cross_entropy_loss(
                labels,
                None::<Tensor>,
                tch::Reduction::Sum,
                -100,
                0.0,
            )?;
            let pred = logits.f_argmax(-1, false)?;
            let correct = pred.f_eq_tensor(labels)?.f_sum(Kind::Int64)?;
            Ok((loss, correct))
        }
        Task::SequenceRegression => {
            let loss = logits.f_mse_loss(labels, tch::Reduction::Sum)?;
            Ok((loss, Tensor::f_zeros([], (Kind::Int64, logits.device()))?))
        }
        Task::MultiLabelClassification => {
            let loss = logits
                .f_binary_cross_entropy_with_logits(
                    labels,
                    None::<Tensor>,
                    None::<Tensor>,
                    tch::Reduction::None,
                )?
                .f_mean_dim(-1, false, Kind::Float)?
                .f_sum(Kind::Float)?;
            Ok((loss, Tensor::f_zeros([], (Kind::Int64, logits.device()))?))
        }
    }
}

/// `[b, t]` labels moved one position left (-100 last), flattened: position `i`'s target is the
/// token at `i + 1`.
fn shifted_labels(labels: &Tensor) -> Result<Tensor> {
    let s = labels.size();
    Ok(Tensor::f_cat(
        &[
            labels.f_narrow(1, 1, s[1] - 1)?,
            Tensor::f_full([s[0], 1], -100, (Kind::Int64, labels.device()))?,
        ],
        1,
    )?
    .f_reshape([-1])?)
}

/// Cross-entropy summed over the positions whose label is not -100 (`[n, classes]` logits,
/// `[n]` labels), and how many of them the argmax gets right.
fn per_position(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let loss =
        logits.f_cross_entropy_loss(labels, None::<Tensor>, tch::Reduction::Sum, -100, 0.0)?;
    let correct = logits
        .f_argmax(-1, false)?
        .f_eq_tensor(labels)?
        .f_logical_and(&labels.f_ne(-100)?)?
        .f_sum(Kind::Int64)?;
    Ok((loss, correct))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_seeded_and_disjoint() {
        let v: Vec<u32> = (0..100).collect();
        let (t, va) = split_validation(&v, 0.1, 7);
        assert_eq!((t.len(), va.len()), (90, 10));
        assert_eq!(split_validation(&v, 0.1, 7).1, va);
        assert_ne!(split_validation(&v, 0.1, 8).1, va);
        assert!(va.iter().all(|x| !t.contains(x)));
        assert_eq!(split_validation(&v[..5], 0.1, 7).1.len(), 0);
    }

    #[test]
    fn epoch_order_is_a_permutation() {
        let o = epoch_order(50, 1, 0);
        let mut s = o.clone();
        s.sort_unstable();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_eq!(o, epoch_order(50, 1, 0));
        assert_ne!(o, epoch_order(50, 1, 1));
    }

    #[test]
    fn label_map_orders_ints_numerically() {
        let ex: Vec<(u64, Example)> = [10, 2, 1]
            .iter()
            .map(|i| {
                (
                    1,
                    Example::Labeled {
                        text: "x".into(),
                        text_pair: None,
                        label: Label::Int(*i),
                    },
                )
            })
            .collect();
        let m = LabelMap::from_examples(&ex);
        assert_eq!(m.id2label(), vec!["1", "2", "10"]);
        assert_eq!(m.get(&Label::Name("10".into())), Some(2));
        assert_eq!(m.get(&Label::Int(3)), None);
    }

    #[test]
    fn collate_pads_right() {
        let a = Features {
            line: 1,
            input_ids: vec![5, 6, 7],
            labels: vec![5, 6, 7],
            token_type_ids: vec![],
            target: Target::Tokens,
        };
        let b = Features {
            line: 2,
            input_ids: vec![8],
            labels: vec![-100],
            token_type_ids: vec![],
            target: Target::Tokens,
        };
        let c = collate(&[&a, &b], 0, Device::Cpu, false).unwrap();
        assert_eq!(c.input_ids.size(), vec![2, 3]);
        let labels: Vec<i64> = Vec::try_from(c.labels.view([-1])).unwrap();
        assert_eq!(labels, vec![5, 6, 7, -100, -100, -100]);
        let mask: Vec<i64> = Vec::try_from(c.attention_mask.view([-1])).unwrap();
        assert_eq!(mask, vec![1, 1, 1, 1, 0, 0]);
        assert_eq!((c.tokens, c.targets), (4, 2));
    }
}
