//! Dataset formats, parsed and checked one record at a time.
//!
//! Accepted inputs:
//! - JSONL, one object per line, all lines of one shape:
//!   - chat: `{"messages": [{"role", "content", "weight"?}, ...]}`
//!   - prompt/completion: `{"prompt", "completion"}`
//!   - text: `{"text"}`
//!   - text + label: `{"text", "label"}` (label a string or a number: a class name or id, or
//!     the target of a regression)
//!   - text + labels: `{"text", "labels": [...]}` (multi-label classification; the list may be
//!     empty)
//!   - both labelled shapes take a second text, `text_pair` (sentence-pair tasks); GLUE's
//!     `sentence1` / `sentence2` keys are read as `text` / `text_pair`
//!   - question answering: `{"question", "context", "answers": {"text": [...],
//!     "answer_start": [...]}}` (SQuAD's layout: each answer's text and its character offset in
//!     the context, which must match; empty lists for an unanswerable question, as in SQuAD v2)
//!   - tokens + tags: `{"tokens": [...], "tags": [...]}` (token classification: a word list and
//!     one tag per word, names or ids; `ner_tags` is read as `tags`, as Hugging Face datasets
//!     name them)
//! - CSV or TSV with a header row: `question`, `context` and `answers` (SQuAD's object as JSON)
//!   columns; or a `text` column (aliases `sentence`, `content`, and
//!   `sentence1` beside `sentence2`), an optional `text_pair` (or `sentence2`) column, and a
//!   `label` column or a `labels` column (a JSON list, or names separated by commas); or
//!   `prompt` and `completion` columns.
//! - CoNLL (`.conll`, `.iob`, `.bio`): a word and its tag per line, separated by whitespace
//!   (the first column is the word, the last the tag: CoNLL-2003's four columns read as word and
//!   NER tag), a blank line between sentences, `-DOCSTART-` lines skipped.
//!
//! Errors carry the 1-based line number and a rule name (`invalid_json`, `unrecognized_role`, …)
//! so a user can find and fix the record. The readers never hold the whole file in memory.

use std::io::BufRead;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::spec::Task;

/// How the bytes are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jsonl,
    Csv,
    Tsv,
    Conll,
}

impl Format {
    /// By file name: `.csv`, `.tsv`, `.conll` (or `.iob`, `.iob2`, `.bio`), anything else is
    /// JSONL.
    pub fn from_filename(name: &str) -> Format {
        let lower = name.to_ascii_lowercase();
        let lower = lower.split(['?', '#']).next().unwrap_or_default();
        if lower.ends_with(".csv") {
            Format::Csv
        } else if lower.ends_with(".tsv") {
            Format::Tsv
        } else if [".conll", ".iob", ".iob2", ".bio"]
            .iter()
            .any(|e| lower.ends_with(e))
        {
            Format::Conll
        } else {
            Format::Jsonl
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
            Format::Tsv => "tsv",
            Format::Conll => "conll",
        }
    }
}

/// What each record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    Messages,
    PromptCompletion,
    Text,
    TextLabel,
    /// Multi-label: a list of labels per text.
    TextLabels,
    /// Token classification: a word list and a tag per word.
    TokensTags,
    /// Extractive question answering: a question, a context and the answers' spans in it.
    QuestionAnswers,
    /// Preference tuning (DPO): a prompt, a preferred and a rejected completion.
    Preference,
}

impl Shape {
    pub fn as_str(self) -> &'static str {
        match self {
            Shape::Messages => "messages",
            Shape::PromptCompletion => "prompt_completion",
            Shape::Text => "text",
            Shape::TextLabel => "text_label",
            Shape::TextLabels => "text_labels",
            Shape::TokensTags => "tokens_tags",
            Shape::QuestionAnswers => "question_answers",
            Shape::Preference => "preference",
        }
    }

    /// The shape [`Shape::as_str`] names.
    pub fn parse(name: &str) -> Option<Shape> {
        [
            Shape::Messages,
            Shape::PromptCompletion,
            Shape::Text,
            Shape::TextLabel,
            Shape::TextLabels,
            Shape::TokensTags,
            Shape::QuestionAnswers,
            Shape::Preference,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }

    /// Shapes a causal-LM job can train on.
    pub fn fits_causal_lm(self) -> bool {
        matches!(
            self,
            Shape::Messages | Shape::PromptCompletion | Shape::Text
        )
    }

    /// Whether `spec`'s job can train on records of this shape: preference pairs for a DPO
    /// job, else what its task takes ([`Shape::fits`]).
    pub fn fits_spec(self, spec: &crate::spec::JobSpec) -> bool {
        match spec.dpo {
            Some(_) => self == Shape::Preference,
            None => self.fits(spec.task),
        }
    }

    /// Whether a supervised job of `task` can train on records of this shape.
    pub fn fits(self, task: Task) -> bool {
        match task {
            Task::CausalLm => self.fits_causal_lm(),
            Task::SequenceClassification | Task::SequenceRegression => self == Shape::TextLabel,
            Task::MultiLabelClassification => self == Shape::TextLabels,
            Task::TokenClassification => self == Shape::TokensTags,
            Task::QuestionAnswering => self == Shape::QuestionAnswers,
        }
    }

    /// Whether the shape carries labels (and the scan collects them: a token-classification
    /// file's tags).
    pub fn is_labelled(self) -> bool {
        matches!(
            self,
            Shape::TextLabel | Shape::TextLabels | Shape::TokensTags
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// Assistant messages only: 0 excludes the message from the loss.
    pub weight: Option<u8>,
}

/// A label as written in the data: classification labels may be names or integers; a number
/// that is not an integer is kept as written, as a name (regression reads it back as a number).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Label {
    Int(i64),
    Name(String),
}

impl Label {
    /// The label as a regression target: a number, or a name that reads as one.
    pub fn as_number(&self) -> Option<f64> {
        match self {
            Label::Int(i) => Some(*i as f64),
            Label::Name(s) => s.trim().parse::<f64>().ok().filter(|v| v.is_finite()),
        }
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Label::Int(i) => write!(f, "{i}"),
            Label::Name(s) => f.write_str(s),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Example {
    Chat {
        messages: Vec<Message>,
    },
    PromptCompletion {
        prompt: String,
        completion: String,
    },
    Text {
        text: String,
    },
    Labeled {
        text: String,
        /// The second text of a sentence pair.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text_pair: Option<String>,
        label: Label,
    },
    /// Multi-label classification: every label that applies (none is allowed).
    MultiLabeled {
        text: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text_pair: Option<String>,
        labels: Vec<Label>,
    },
    /// Token classification: words and one tag per word (as many tags as tokens).
    Tagged {
        tokens: Vec<String>,
        tags: Vec<Label>,
    },
    /// Extractive question answering: none, one or several answers, each a span of `context`.
    Answered {
        question: String,
        context: String,
        answers: Vec<Answer>,
    },
    /// Preference tuning: a prompt and two completions of it, `chosen` preferred to `rejected`.
    /// The three are all conversations or all plain text.
    Preference {
        prompt: Turns,
        chosen: Turns,
        rejected: Turns,
    },
}

/// A part of a preference pair: chat messages (rendered with the model's chat template) or
/// plain text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Turns {
    Chat(Vec<Message>),
    Text(String),
}

/// An answer of a question-answering record: its text and where it starts in the context, in
/// characters (Unicode scalar values), as SQuAD's `answer_start` counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub text: String,
    pub start: usize,
}

impl Example {
    pub fn shape(&self) -> Shape {
        match self {
            Example::Chat { .. } => Shape::Messages,
            Example::PromptCompletion { .. } => Shape::PromptCompletion,
            Example::Text { .. } => Shape::Text,
            Example::Labeled { .. } => Shape::TextLabel,
            Example::MultiLabeled { .. } => Shape::TextLabels,
            Example::Tagged { .. } => Shape::TokensTags,
            Example::Answered { .. } => Shape::QuestionAnswers,
            Example::Preference { .. } => Shape::Preference,
        }
    }

    /// The labels of a labelled record (one, or a multi-label record's list).
    pub fn labels(&self) -> &[Label] {
        match self {
            Example::Labeled { label, .. } => std::slice::from_ref(label),
            Example::MultiLabeled { labels, .. } => labels,
            Example::Tagged { tags, .. } => tags,
            _ => &[],
        }
    }
}

/// One defect in one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineError {
    /// 1-based line number in the file (for CSV, the line where the record starts).
    pub line: u64,
    /// Stable rule name, e.g. `invalid_json`.
    pub rule: String,
    pub message: String,
}

impl LineError {
    fn new(line: u64, rule: &str, message: impl Into<String>) -> Self {
        LineError {
            line,
            rule: rule.to_string(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {} ({})", self.line, self.message, self.rule)
    }
}

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];
const MESSAGE_KEYS: [&str; 6] = [
    "role",
    "content",
    "weight",
    "name",
    "tool_calls",
    "tool_call_id",
];

/// Parses one JSONL line (already known to be non-blank).
pub fn parse_json_line(line: &str, line_no: u64) -> Result<Example, LineError> {
    let value: Value = serde_json::from_str(line)
        .map_err(|e| LineError::new(line_no, "invalid_json", format!("not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(LineError::new(
            line_no,
            "not_an_object",
            "each line must be a JSON object",
        ));
    };
    if ["input", "preferred_output", "non_preferred_output"]
        .iter()
        .any(|k| obj.contains_key(*k))
    {
        return openai_preference(&obj, line_no);
    }
    if obj.contains_key("chosen") || obj.contains_key("rejected") {
        return trl_preference(&obj, line_no);
    }
    if let Some(messages) = obj.get("messages") {
        return parse_messages(messages, line_no).map(|messages| Example::Chat { messages });
    }
    if obj.contains_key("tokens") {
        return parse_tagged(&obj, line_no);
    }
    if obj.contains_key("question") || obj.contains_key("context") {
        let question = string_field(&obj, "question", line_no)?;
        let context = string_field(&obj, "context", line_no)?;
        let answers = obj.get("answers").ok_or_else(|| {
            LineError::new(
                line_no,
                "missing_key",
                "a question needs `answers` (`{\"text\": [...], \"answer_start\": [...]}`; empty lists when the context has no answer)",
            )
        })?;
        return answered(question, context, answers, line_no);
    }
    if obj.contains_key("prompt") || obj.contains_key("completion") {
        let prompt = string_field(&obj, "prompt", line_no)?;
        let completion = string_field(&obj, "completion", line_no)?;
        if completion.trim().is_empty() {
            return Err(LineError::new(
                line_no,
                "empty_completion",
                "`completion` is empty",
            ));
        }
        return Ok(Example::PromptCompletion { prompt, completion });
    }
    // GLUE's sentence-pair files name the two texts `sentence1` and `sentence2`.
    let (text_key, pair_key) = if obj.contains_key("text") || !obj.contains_key("sentence1") {
        ("text", "text_pair")
    } else {
        ("sentence1", "sentence2")
    };
    if obj.contains_key(text_key) {
        let text = string_field(&obj, text_key, line_no)?;
        if text.trim().is_empty() {
            return Err(LineError::new(
                line_no,
                "empty_text",
                format!("`{text_key}` is empty"),
            ));
        }
        let text_pair = match obj.get(pair_key) {
            None | Some(Value::Null) => None,
            Some(_) => {
                let pair = string_field(&obj, pair_key, line_no)?;
                if pair.trim().is_empty() {
                    return Err(LineError::new(
                        line_no,
                        "empty_text",
                        format!("`{pair_key}` is empty"),
                    ));
                }
                Some(pair)
            }
        };
        let label = obj.get("label").filter(|v| !v.is_null());
        let labels = obj.get("labels").filter(|v| !v.is_null());
        return match (label, labels) {
            (Some(_), Some(_)) => Err(LineError::new(
                line_no,
                "invalid_label",
                "a record has `label` (one label) or `labels` (a list), not both",
            )),
            (Some(label), None) => Ok(Example::Labeled {
                text,
                text_pair,
                label: parse_label(label, line_no)?,
            }),
            (None, Some(labels)) => Ok(Example::MultiLabeled {
                text,
                text_pair,
                labels: parse_label_list(labels, line_no)?,
            }),
            (None, None) if text_pair.is_some() => Err(LineError::new(
                line_no,
                "missing_key",
                format!("a record with `{pair_key}` needs a `label` or `labels`"),
            )),
            (None, None) => Ok(Example::Text { text }),
        };
    }
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    Err(LineError::new(
        line_no,
        "unknown_shape",
        format!(
            "expected `messages`, `prompt`/`completion`, `text`, `text`/`label`, `text`/`labels`, `tokens`/`tags`, `question`/`context`/`answers` or a preference pair (`input`/`preferred_output`/`non_preferred_output`, or `prompt`/`chosen`/`rejected`); found keys {keys:?}"
        ),
    ))
}

/// A question-answering record, its answers checked against the context.
fn answered(
    question: String,
    context: String,
    answers: &Value,
    line_no: u64,
) -> Result<Example, LineError> {
    if question.trim().is_empty() {
        return Err(LineError::new(
            line_no,
            "empty_question",
            "`question` is empty",
        ));
    }
    if context.trim().is_empty() {
        return Err(LineError::new(
            line_no,
            "empty_context",
            "`context` is empty",
        ));
    }
    let bad = |m: String| LineError::new(line_no, "invalid_answers", m);
    let Value::Object(a) = answers else {
        return Err(bad(format!(
            "`answers` must be an object with `text` and `answer_start` lists, found {}",
            type_name(answers)
        )));
    };
    let list = |k: &str| match a.get(k) {
        Some(Value::Array(v)) => Ok(v),
        other => Err(bad(format!(
            "`answers.{k}` must be a list, found {}",
            other.map_or("nothing", type_name)
        ))),
    };
    let (texts, starts) = (list("text")?, list("answer_start")?);
    if texts.len() != starts.len() {
        return Err(bad(format!(
            "`answers` has {} texts but {} answer_start offsets",
            texts.len(),
            starts.len()
        )));
    }
    let chars: Vec<char> = context.chars().collect();
    let mut out = Vec::with_capacity(texts.len());
    for (i, (t, s)) in texts.iter().zip(starts).enumerate() {
        let (Value::String(text), Some(start)) = (t, s.as_u64()) else {
            return Err(bad(format!(
                "answer {i}: `text` must be a string and `answer_start` a non-negative integer"
            )));
        };
        if text.is_empty() {
            return Err(bad(format!("answer {i} is empty")));
        }
        let start = start as usize;
        let n = text.chars().count();
        let found: String = chars.iter().skip(start).take(n).collect();
        if found != *text {
            return Err(LineError::new(
                line_no,
                "answer_not_found",
                format!(
                    "answer {i} `{text}` is not at character {start} of the context (found `{found}` there)"
                ),
            ));
        }
        out.push(Answer {
            text: text.clone(),
            start,
        });
    }
    Ok(Example::Answered {
        question,
        context,
        answers: out,
    })
}

/// A token-classification record: `tokens` (non-empty strings) and as many `tags` (names or
/// ids; `ner_tags` is the Hugging Face datasets spelling).
fn parse_tagged(obj: &serde_json::Map<String, Value>, line_no: u64) -> Result<Example, LineError> {
    let Some(Value::Array(items)) = obj.get("tokens") else {
        return Err(LineError::new(
            line_no,
            "invalid_type",
            format!(
                "`tokens` must be a list of words, found {}",
                obj.get("tokens").map_or("nothing", type_name)
            ),
        ));
    };
    if items.is_empty() {
        return Err(LineError::new(line_no, "empty_tokens", "`tokens` is empty"));
    }
    let mut tokens = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match item {
            Value::String(w) if !w.trim().is_empty() => tokens.push(w.clone()),
            other => {
                return Err(LineError::new(
                    line_no,
                    "invalid_type",
                    format!(
                        "`tokens[{i}]` must be a non-empty string, found {}",
                        match other {
                            Value::String(_) => "an empty string",
                            o => type_name(o),
                        }
                    ),
                ))
            }
        }
    }
    let key = if obj.contains_key("tags") || !obj.contains_key("ner_tags") {
        "tags"
    } else {
        "ner_tags"
    };
    let tags = match obj.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) if !s.trim().is_empty() => Ok(Label::Name(s.trim().to_string())),
                Value::Number(n) if n.as_i64().is_some() => {
                    Ok(Label::Int(n.as_i64().unwrap_or_default()))
                }
                other => Err(LineError::new(
                    line_no,
                    "invalid_label",
                    format!(
                        "`{key}[{i}]` must be a non-empty string or an integer, found {}",
                        type_name(other)
                    ),
                )),
            })
            .collect::<Result<Vec<Label>, LineError>>()?,
        Some(other) => {
            return Err(LineError::new(
                line_no,
                "invalid_label",
                format!("`{key}` must be a list, found {}", type_name(other)),
            ))
        }
        None => {
            return Err(LineError::new(
                line_no,
                "missing_key",
                "a record with `tokens` needs `tags`, one per token",
            ))
        }
    };
    if tags.len() != tokens.len() {
        return Err(LineError::new(
            line_no,
            "length_mismatch",
            format!(
                "{} tokens but {} tags: each token needs exactly one tag",
                tokens.len(),
                tags.len()
            ),
        ));
    }
    Ok(Example::Tagged { tokens, tags })
}

fn string_field(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    line_no: u64,
) -> Result<String, LineError> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(LineError::new(
            line_no,
            "invalid_type",
            format!("`{key}` must be a string, found {}", type_name(other)),
        )),
        None => Err(LineError::new(
            line_no,
            "missing_key",
            format!("`{key}` is missing"),
        )),
    }
}

fn parse_label(value: &Value, line_no: u64) -> Result<Label, LineError> {
    match value {
        Value::String(s) if !s.trim().is_empty() => Ok(Label::Name(s.trim().to_string())),
        Value::Number(n) => Ok(match n.as_i64() {
            Some(i) => Label::Int(i),
            None => Label::Name(n.to_string()),
        }),
        other => Err(LineError::new(
            line_no,
            "invalid_label",
            format!(
                "`label` must be a non-empty string or a number, found {}",
                type_name(other)
            ),
        )),
    }
}

/// A multi-label record's `labels`: a list of names or integers, duplicates dropped.
fn parse_label_list(value: &Value, line_no: u64) -> Result<Vec<Label>, LineError> {
    let Value::Array(items) = value else {
        return Err(LineError::new(
            line_no,
            "invalid_label",
            format!("`labels` must be a list, found {}", type_name(value)),
        ));
    };
    let mut out: Vec<Label> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let label = match item {
            Value::String(s) if !s.trim().is_empty() => Label::Name(s.trim().to_string()),
            Value::Number(n) if n.as_i64().is_some() => Label::Int(n.as_i64().unwrap_or_default()),
            other => {
                return Err(LineError::new(
                    line_no,
                    "invalid_label",
                    format!(
                        "`labels[{i}]` must be a non-empty string or an integer, found {}",
                        type_name(other)
                    ),
                ))
            }
        };
        if !out.contains(&label) {
            out.push(label);
        }
    }
    Ok(out)
}

/// A CSV/TSV `labels` field: a JSON list, or names separated by commas (empty: no labels).
fn parse_label_field(raw: &str, line_no: u64) -> Result<Vec<Label>, LineError> {
    let raw = raw.trim();
    if raw.starts_with('[') {
        let value: Value = serde_json::from_str(raw).map_err(|e| {
            LineError::new(
                line_no,
                "invalid_label",
                format!("`labels` is not a valid JSON list: {e}"),
            )
        })?;
        return parse_label_list(&value, line_no);
    }
    let mut out: Vec<Label> = Vec::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let label = part
            .parse::<i64>()
            .map(Label::Int)
            .unwrap_or_else(|_| Label::Name(part.to_string()));
        if !out.contains(&label) {
            out.push(label);
        }
    }
    Ok(out)
}

fn parse_messages(value: &Value, line_no: u64) -> Result<Vec<Message>, LineError> {
    let out = message_list(value, "messages", line_no)?;
    if !out.iter().any(|m| m.role == "assistant") {
        return Err(LineError::new(
            line_no,
            "example_missing_assistant_message",
            "the conversation has no assistant message to learn from",
        ));
    }
    Ok(out)
}

/// A non-empty list of chat messages at `key`.
fn message_list(value: &Value, key: &str, line_no: u64) -> Result<Vec<Message>, LineError> {
    let Value::Array(items) = value else {
        return Err(LineError::new(
            line_no,
            "missing_messages_list",
            format!("`{key}` must be a list of messages"),
        ));
    };
    if items.is_empty() {
        return Err(LineError::new(
            line_no,
            "missing_messages_list",
            format!("`{key}` is empty"),
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(m) = item else {
            return Err(LineError::new(
                line_no,
                "message_not_object",
                format!("message {i} is not an object"),
            ));
        };
        if let Some(k) = m.keys().find(|k| !MESSAGE_KEYS.contains(&k.as_str())) {
            return Err(LineError::new(
                line_no,
                "message_unrecognized_key",
                format!("message {i} has an unrecognised key `{k}`"),
            ));
        }
        let role = match m.get("role") {
            Some(Value::String(r)) => r.clone(),
            Some(_) => {
                return Err(LineError::new(
                    line_no,
                    "message_missing_key",
                    format!("message {i}: `role` must be a string"),
                ))
            }
            None => {
                return Err(LineError::new(
                    line_no,
                    "message_missing_key",
                    format!("message {i} has no `role`"),
                ))
            }
        };
        if !ROLES.contains(&role.as_str()) {
            return Err(LineError::new(
                line_no,
                "unrecognized_role",
                format!("message {i} has role `{role}`; expected one of {ROLES:?}"),
            ));
        }
        let content = match m.get("content") {
            Some(Value::String(c)) => c.clone(),
            Some(Value::Null) | None if m.contains_key("tool_calls") => String::new(),
            Some(Value::Null) | None => {
                return Err(LineError::new(
                    line_no,
                    "missing_content",
                    format!("message {i} has no `content`"),
                ))
            }
            Some(other) => {
                return Err(LineError::new(
                    line_no,
                    "missing_content",
                    format!(
                        "message {i}: `content` must be a string, found {}",
                        type_name(other)
                    ),
                ))
            }
        };
        let weight = match m.get("weight") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) if n.as_u64() == Some(0) || n.as_u64() == Some(1) => {
                if role != "assistant" {
                    return Err(LineError::new(
                        line_no,
                        "invalid_weight",
                        format!("message {i}: `weight` is only allowed on assistant messages"),
                    ));
                }
                n.as_u64().map(|w| w as u8)
            }
            Some(_) => {
                return Err(LineError::new(
                    line_no,
                    "invalid_weight",
                    format!("message {i}: `weight` must be 0 or 1"),
                ))
            }
        };
        out.push(Message {
            role,
            content,
            weight,
        });
    }
    Ok(out)
}

/// OpenAI's preference record: `{"input": {"messages": [...]}, "preferred_output": [assistant
/// message], "non_preferred_output": [assistant message]}` (`input` may also carry `tools` and
/// `parallel_tool_calls`, which tuna does not render: an error when tools are given).
fn openai_preference(
    obj: &serde_json::Map<String, Value>,
    line_no: u64,
) -> Result<Example, LineError> {
    let bad = |m: String| LineError::new(line_no, "invalid_preference", m);
    for k in obj.keys() {
        if !["input", "preferred_output", "non_preferred_output"].contains(&k.as_str()) {
            return Err(bad(format!(
                "unrecognised key `{k}` (a preference pair has `input`, `preferred_output` and `non_preferred_output`)"
            )));
        }
    }
    let input = match obj.get("input") {
        Some(Value::Object(i)) => i,
        Some(other) => {
            return Err(bad(format!(
                "`input` must be an object with `messages`, found {}",
                type_name(other)
            )))
        }
        None => {
            return Err(bad(
                "the pair has no `input` (`{\"messages\": [...]}`)".into()
            ))
        }
    };
    if let Some(k) = input
        .keys()
        .find(|k| !["messages", "tools", "parallel_tool_calls"].contains(&k.as_str()))
    {
        return Err(bad(format!("unrecognised key `input.{k}`")));
    }
    if input
        .get("tools")
        .is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(bad(
            "`input.tools` is not supported: tuna renders messages without tool definitions".into(),
        ));
    }
    let messages = input
        .get("messages")
        .ok_or_else(|| bad("`input` has no `messages`".into()))?;
    let prompt = message_list(messages, "input.messages", line_no)?;
    let output = |key: &str| -> Result<Vec<Message>, LineError> {
        let v = obj
            .get(key)
            .ok_or_else(|| bad(format!("the pair has no `{key}`")))?;
        let out = message_list(v, key, line_no)?;
        if let Some(m) = out.iter().find(|m| m.role != "assistant") {
            return Err(bad(format!(
                "`{key}` holds a `{}` message; the completions of a pair are assistant messages",
                m.role
            )));
        }
        Ok(out)
    };
    pair(
        Turns::Chat(prompt),
        Turns::Chat(output("preferred_output")?),
        Turns::Chat(output("non_preferred_output")?),
        line_no,
    )
}

/// TRL's preference records: `prompt`, `chosen` and `rejected` as strings or message lists
/// (without `prompt`, the prompt is what `chosen` and `rejected` begin with, as TRL's
/// `extract_prompt` finds it).
fn trl_preference(
    obj: &serde_json::Map<String, Value>,
    line_no: u64,
) -> Result<Example, LineError> {
    let bad = |m: String| LineError::new(line_no, "invalid_preference", m);
    for k in obj.keys() {
        if !["prompt", "chosen", "rejected"].contains(&k.as_str()) {
            return Err(bad(format!(
                "unrecognised key `{k}` (a preference pair has `prompt`, `chosen` and `rejected`)"
            )));
        }
    }
    let part = |key: &str| -> Result<Option<Turns>, LineError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(Turns::Text(s.clone()))),
            Some(v @ Value::Array(_)) => Ok(Some(Turns::Chat(message_list(v, key, line_no)?))),
            Some(other) => Err(bad(format!(
                "`{key}` must be a string or a list of messages, found {}",
                type_name(other)
            ))),
        }
    };
    let (Some(chosen), Some(rejected)) = (part("chosen")?, part("rejected")?) else {
        return Err(bad(
            "a preference pair needs both `chosen` and `rejected`".into()
        ));
    };
    let (prompt, chosen, rejected) = match (part("prompt")?, chosen, rejected) {
        (Some(p), c, r) => (p, c, r),
        (None, Turns::Chat(c), Turns::Chat(r)) => {
            let n = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
            (
                Turns::Chat(c[..n].to_vec()),
                Turns::Chat(c[n..].to_vec()),
                Turns::Chat(r[n..].to_vec()),
            )
        }
        (None, Turns::Text(c), Turns::Text(r)) => {
            let (cb, rb) = (c.as_bytes(), r.as_bytes());
            let mut n = cb.iter().zip(rb).take_while(|(a, b)| a == b).count();
            // TRL's rule: a space before the point they differ goes with the completions.
            if n > 0 && n < cb.len().min(rb.len()) && cb[n - 1] == b' ' {
                n -= 1;
            }
            while !c.is_char_boundary(n) {
                n -= 1;
            }
            (
                Turns::Text(c[..n].to_string()),
                Turns::Text(c[n..].to_string()),
                Turns::Text(r[n..].to_string()),
            )
        }
        _ => {
            return Err(bad(
                "`chosen` and `rejected` must both be strings or both lists of messages".into(),
            ))
        }
    };
    pair(prompt, chosen, rejected, line_no)
}

/// A preference pair's checks: the three parts of one kind, a prompt and two different,
/// non-empty completions.
fn pair(prompt: Turns, chosen: Turns, rejected: Turns, line_no: u64) -> Result<Example, LineError> {
    let bad = |rule: &str, m: &str| Err(LineError::new(line_no, rule, m));
    let empty = |t: &Turns| match t {
        Turns::Chat(m) => m.is_empty() || m.iter().all(|m| m.content.trim().is_empty()),
        Turns::Text(s) => s.trim().is_empty(),
    };
    match (&prompt, &chosen, &rejected) {
        (Turns::Chat(_), Turns::Chat(_), Turns::Chat(_))
        | (Turns::Text(_), Turns::Text(_), Turns::Text(_)) => {}
        _ => {
            return bad(
                "invalid_preference",
                "`prompt`, `chosen` and `rejected` must all be strings or all lists of messages",
            )
        }
    }
    if let Turns::Chat(p) = &prompt {
        if p.is_empty() {
            return bad(
                "invalid_preference",
                "the pair has no prompt: the two completions start differently from their first message",
            );
        }
    }
    if chosen == rejected {
        return bad(
            "identical_pair",
            "the preferred and the rejected completion are the same; the pair teaches nothing",
        );
    }
    if empty(&chosen) || empty(&rejected) {
        return bad("empty_completion", "a completion of the pair is empty");
    }
    Ok(Example::Preference {
        prompt,
        chosen,
        rejected,
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Result of checking a whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub shape: Option<Shape>,
    pub examples: u64,
    /// The first errors found, at most `max_errors`.
    pub errors: Vec<LineError>,
    /// Total number of bad records (may exceed `errors.len()`).
    pub error_count: u64,
    /// Distinct labels (text+label and text+labels data), sorted, at most 10,000 kept.
    pub labels: Vec<Label>,
    /// Text+label data: the first record whose label is not a number (what a regression job
    /// cannot train on), with its line.
    #[serde(default)]
    pub first_non_numeric_label: Option<(u64, Label)>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.error_count == 0 && self.examples > 0
    }

    /// A one-paragraph summary of the first errors, for API messages.
    pub fn summary(&self) -> String {
        if self.examples == 0 && self.error_count == 0 {
            return "the file holds no examples".to_string();
        }
        let shown: Vec<String> = self.errors.iter().map(ToString::to_string).collect();
        let more = self.error_count.saturating_sub(self.errors.len() as u64);
        let mut s = format!(
            "{} invalid record(s): {}",
            self.error_count,
            shown.join("; ")
        );
        if more > 0 {
            s.push_str(&format!("; and {more} more"));
        }
        s
    }
}

/// Streams `reader`, calling `on_example` for every valid record, and returns a [`Report`].
/// All records must have the same shape as the first valid one (`mixed_shapes` otherwise).
pub fn scan<R: BufRead>(
    reader: R,
    format: Format,
    max_errors: usize,
    mut on_example: impl FnMut(u64, Example),
) -> Report {
    let mut report = Report::default();
    let mut labels = std::collections::BTreeSet::new();
    let mut push = |report: &mut Report, line: u64, parsed: Result<Example, LineError>| {
        let parsed = parsed.and_then(|ex| match report.shape {
            Some(shape) if shape != ex.shape() => Err(LineError::new(
                line,
                "mixed_shapes",
                format!(
                    "this record is `{}` but earlier records are `{}`",
                    ex.shape().as_str(),
                    shape.as_str()
                ),
            )),
            _ => Ok(ex),
        });
        match parsed {
            Ok(ex) => {
                report.shape.get_or_insert(ex.shape());
                for label in ex.labels() {
                    if labels.len() < 10_000 {
                        labels.insert(label.clone());
                    }
                }
                if let Example::Labeled { label, .. } = &ex {
                    if report.first_non_numeric_label.is_none() && label.as_number().is_none() {
                        report.first_non_numeric_label = Some((line, label.clone()));
                    }
                }
                report.examples += 1;
                on_example(line, ex);
            }
            Err(e) => {
                report.error_count += 1;
                if report.errors.len() < max_errors {
                    report.errors.push(e);
                }
            }
        }
    };
    match format {
        Format::Jsonl => scan_jsonl(reader, &mut report, &mut push),
        Format::Csv | Format::Tsv => scan_delimited(reader, format, &mut report, &mut push),
        Format::Conll => scan_conll(reader, &mut report, &mut push),
    }
    report.labels = labels.into_iter().collect();
    report
}

fn scan_jsonl<R: BufRead>(
    mut reader: R,
    report: &mut Report,
    push: &mut impl FnMut(&mut Report, u64, Result<Example, LineError>),
) {
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                push(
                    report,
                    line_no + 1,
                    Err(LineError::new(line_no + 1, "read_error", e.to_string())),
                );
                break;
            }
        }
        line_no += 1;
        let text = match std::str::from_utf8(&buf) {
            Ok(t) => t,
            Err(_) => {
                push(
                    report,
                    line_no,
                    Err(LineError::new(
                        line_no,
                        "invalid_utf8",
                        "the line is not valid UTF-8",
                    )),
                );
                continue;
            }
        };
        let text = text.trim_start_matches('\u{feff}').trim();
        if text.is_empty() {
            continue;
        }
        push(report, line_no, parse_json_line(text, line_no));
    }
}

/// CoNLL: one `word ... tag` line per token, sentences separated by blank lines. A sentence is
/// reported at the line of its first word; a line without a tag at its own line.
fn scan_conll<R: BufRead>(
    mut reader: R,
    report: &mut Report,
    push: &mut impl FnMut(&mut Report, u64, Result<Example, LineError>),
) {
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    // The sentence being read: its first line, words and tags, and its first bad line.
    let mut start = 0u64;
    let mut tokens: Vec<String> = Vec::new();
    let mut tags: Vec<Label> = Vec::new();
    let mut bad: Option<LineError> = None;
    let mut flush = |report: &mut Report,
                     start: u64,
                     tokens: &mut Vec<String>,
                     tags: &mut Vec<Label>,
                     bad: &mut Option<LineError>| {
        let parsed = match bad.take() {
            Some(e) => Err(e),
            None => Ok(Example::Tagged {
                tokens: std::mem::take(tokens),
                tags: std::mem::take(tags),
            }),
        };
        tokens.clear();
        tags.clear();
        push(report, start, parsed);
    };
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                bad.get_or_insert(LineError::new(line_no + 1, "read_error", e.to_string()));
                break;
            }
        }
        line_no += 1;
        let text = match std::str::from_utf8(&buf) {
            Ok(t) => t.trim_start_matches('\u{feff}').trim(),
            Err(_) => {
                if tokens.is_empty() && bad.is_none() {
                    start = line_no;
                }
                bad.get_or_insert(LineError::new(
                    line_no,
                    "invalid_utf8",
                    "the line is not valid UTF-8",
                ));
                continue;
            }
        };
        if text.is_empty() {
            if !tokens.is_empty() || bad.is_some() {
                flush(report, start, &mut tokens, &mut tags, &mut bad);
            }
            continue;
        }
        if text.starts_with("-DOCSTART-") {
            continue;
        }
        if tokens.is_empty() && bad.is_none() {
            start = line_no;
        }
        let cols: Vec<&str> = text.split_whitespace().collect();
        if cols.len() < 2 {
            bad.get_or_insert(LineError::new(
                line_no,
                "conll_missing_tag",
                format!(
                    "`{text}` has no tag: each line is a word and its tag, separated by whitespace"
                ),
            ));
            continue;
        }
        let tag = cols[cols.len() - 1];
        tokens.push(cols[0].to_string());
        tags.push(
            tag.parse::<i64>()
                .map(Label::Int)
                .unwrap_or_else(|_| Label::Name(tag.to_string())),
        );
    }
    if !tokens.is_empty() || bad.is_some() {
        flush(report, start, &mut tokens, &mut tags, &mut bad);
    }
}

fn scan_delimited<R: BufRead>(
    reader: R,
    format: Format,
    report: &mut Report,
    push: &mut impl FnMut(&mut Report, u64, Result<Example, LineError>),
) {
    let delimiter = if format == Format::Tsv { b'\t' } else { b',' };
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .quoting(format == Format::Csv)
        .from_reader(reader);
    let headers: Vec<String> = match rdr.headers() {
        Ok(h) => h
            .iter()
            .map(|s| s.trim().trim_start_matches('\u{feff}').to_ascii_lowercase())
            .collect(),
        Err(e) => {
            push(
                report,
                1,
                Err(LineError::new(
                    1,
                    "invalid_header",
                    format!("cannot read the header row: {e}"),
                )),
            );
            return;
        }
    };
    let find = |names: &[&str]| headers.iter().position(|h| names.contains(&h.as_str()));
    let pair_col = find(&["text_pair", "sentence2"]);
    let text_col = match find(&["text", "sentence", "content"]) {
        None if pair_col.is_some() => find(&["sentence1"]),
        found => found,
    };
    let label_col = find(&["label"]);
    let labels_col = find(&["labels"]);
    let prompt_col = find(&["prompt"]);
    let qa_cols = (find(&["question"]), find(&["context"]), find(&["answers"]));
    let completion_col = find(&["completion"]);
    let pref_cols = (find(&["chosen"]), find(&["rejected"]));
    let layout = match (text_col, label_col, labels_col, prompt_col, completion_col) {
        _ if pref_cols.0.is_some() || pref_cols.1.is_some() => match (prompt_col, pref_cols) {
            (Some(p), (Some(c), Some(r))) => Layout::Preference(p, c, r),
            _ => {
                push(
                    report,
                    1,
                    Err(LineError::new(
                        1,
                        "csv_missing_column",
                        format!("preference pairs need `prompt`, `chosen` and `rejected` columns; found {headers:?}"),
                    )),
                );
                return;
            }
        },
        _ if qa_cols.0.is_some() || qa_cols.1.is_some() => match qa_cols {
            (Some(q), Some(c), Some(a)) => Layout::Answered(q, c, a),
            _ => {
                push(
                    report,
                    1,
                    Err(LineError::new(
                        1,
                        "csv_missing_column",
                        format!("question answering needs `question`, `context` and `answers` columns; found {headers:?}"),
                    )),
                );
                return;
            }
        },
        (_, _, _, Some(p), Some(c)) => Layout::PromptCompletion(p, c),
        (Some(t), Some(l), None, _, _) => Layout::TextLabel(t, pair_col, l),
        (Some(t), None, Some(l), _, _) => Layout::TextLabels(t, pair_col, l),
        (Some(_), Some(_), Some(_), _, _) => {
            push(
                report,
                1,
                Err(LineError::new(
                    1,
                    "csv_missing_column",
                    "the header has both `label` (one label per row) and `labels` (a list per row); keep one",
                )),
            );
            return;
        }
        (Some(_), None, None, _, _) if pair_col.is_some() => {
            push(
                report,
                1,
                Err(LineError::new(
                    1,
                    "csv_missing_column",
                    format!("sentence pairs need a `label` or `labels` column; found {headers:?}"),
                )),
            );
            return;
        }
        (Some(t), None, None, _, _) => Layout::Text(t),
        _ => {
            push(
                report,
                1,
                Err(LineError::new(
                    1,
                    "csv_missing_column",
                    format!("the header needs a `text` (or `sentence`) column, optionally `text_pair` and `label` or `labels`, or `prompt` and `completion`; found {headers:?}"),
                )),
            );
            return;
        }
    };
    let width = headers.len();
    let mut record = csv::StringRecord::new();
    loop {
        let line = rdr.position().line();
        match rdr.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let rule = if matches!(e.kind(), csv::ErrorKind::Utf8 { .. }) {
                    "invalid_utf8"
                } else {
                    "invalid_csv"
                };
                push(report, line, Err(LineError::new(line, rule, e.to_string())));
                continue;
            }
        }
        if record.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        if record.len() != width {
            push(
                report,
                line,
                Err(LineError::new(
                    line,
                    "csv_field_count",
                    format!("expected {width} fields, found {}", record.len()),
                )),
            );
            continue;
        }
        let get = |i: usize| record.get(i).unwrap_or_default().to_string();
        let parsed = match layout {
            Layout::PromptCompletion(p, c) => {
                let completion = get(c);
                if completion.trim().is_empty() {
                    Err(LineError::new(
                        line,
                        "empty_completion",
                        "`completion` is empty",
                    ))
                } else {
                    Ok(Example::PromptCompletion {
                        prompt: get(p),
                        completion,
                    })
                }
            }
            Layout::Preference(p, c, r) => pair(
                Turns::Text(get(p)),
                Turns::Text(get(c)),
                Turns::Text(get(r)),
                line,
            ),
            Layout::Answered(q, c, a) => match serde_json::from_str::<Value>(&get(a)) {
                Ok(answers) => answered(get(q), get(c), &answers, line),
                Err(e) => Err(LineError::new(
                    line,
                    "invalid_answers",
                    format!("`answers` is not valid JSON: {e}"),
                )),
            },
            Layout::Text(t) | Layout::TextLabel(t, _, _) | Layout::TextLabels(t, _, _)
                if get(t).trim().is_empty() =>
            {
                Err(LineError::new(line, "empty_text", "`text` is empty"))
            }
            Layout::TextLabel(_, Some(p), _) | Layout::TextLabels(_, Some(p), _)
                if get(p).trim().is_empty() =>
            {
                Err(LineError::new(line, "empty_text", "`text_pair` is empty"))
            }
            Layout::Text(t) => Ok(Example::Text { text: get(t) }),
            Layout::TextLabel(t, p, l) => {
                let raw = get(l);
                let raw = raw.trim();
                if raw.is_empty() {
                    Err(LineError::new(line, "invalid_label", "`label` is empty"))
                } else {
                    let label = raw
                        .parse::<i64>()
                        .map(Label::Int)
                        .unwrap_or_else(|_| Label::Name(raw.to_string()));
                    Ok(Example::Labeled {
                        text: get(t),
                        text_pair: p.map(get),
                        label,
                    })
                }
            }
            Layout::TextLabels(t, p, l) => {
                parse_label_field(&get(l), line).map(|labels| Example::MultiLabeled {
                    text: get(t),
                    text_pair: p.map(get),
                    labels,
                })
            }
        };
        push(report, line, parsed);
    }
}

/// Column indices: text, the optional second text, the label(s).
#[derive(Clone, Copy)]
enum Layout {
    PromptCompletion(usize, usize),
    Text(usize),
    TextLabel(usize, Option<usize>, usize),
    TextLabels(usize, Option<usize>, usize),
    /// Question, context, answers (JSON).
    Answered(usize, usize, usize),
    /// Prompt, chosen, rejected (plain text).
    Preference(usize, usize, usize),
}

/// Reads every example of a file, or the first `max_errors` errors if any record is bad.
pub fn read_all<R: BufRead>(
    reader: R,
    format: Format,
    max_errors: usize,
) -> Result<Vec<(u64, Example)>, Report> {
    let mut out = Vec::new();
    let report = scan(reader, format, max_errors, |line, ex| out.push((line, ex)));
    if report.is_ok() {
        Ok(out)
    } else {
        Err(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_str(s: &str, f: Format) -> Report {
        scan(s.as_bytes(), f, 10, |_, _| {})
    }

    #[test]
    fn chat_lines_parse_and_weight_is_kept() {
        let line = r#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"},{"role":"assistant","content":"hello","weight":0},{"role":"user","content":"again"},{"role":"assistant","content":"hi"}]}"#;
        let Example::Chat { messages } = parse_json_line(line, 1).unwrap() else {
            panic!("not chat")
        };
        assert_eq!(messages.len(), 5);
        assert_eq!(messages[2].weight, Some(0));
        assert_eq!(messages[4].weight, None);
    }

    #[test]
    fn errors_name_line_and_rule() {
        let data = "{\"text\":\"ok\"}\n\nnot json\n{\"messages\":[{\"role\":\"bot\",\"content\":\"x\"}]}\n[1]\n{\"prompt\":\"a\",\"completion\":\"b\"}\n";
        let r = scan_str(data, Format::Jsonl);
        assert_eq!(r.examples, 1);
        let got: Vec<(u64, &str)> = r.errors.iter().map(|e| (e.line, e.rule.as_str())).collect();
        assert_eq!(
            got,
            vec![
                (3, "invalid_json"),
                (4, "unrecognized_role"),
                (5, "not_an_object"),
                (6, "mixed_shapes")
            ]
        );
        assert!(!r.is_ok());
        assert!(r.summary().contains("line 3"));
    }

    #[test]
    fn chat_rules() {
        let cases = [
            (r#"{"messages":"hi"}"#, "missing_messages_list"),
            (
                r#"{"messages":[{"role":"user","content":"x"}]}"#,
                "example_missing_assistant_message",
            ),
            (r#"{"messages":[{"role":"assistant"}]}"#, "missing_content"),
            (r#"{"messages":[{"content":"x"}]}"#, "message_missing_key"),
            (
                r#"{"messages":[{"role":"assistant","content":"x","mood":1}]}"#,
                "message_unrecognized_key",
            ),
            (
                r#"{"messages":[{"role":"assistant","content":"x","weight":2}]}"#,
                "invalid_weight",
            ),
            (r#"{"text":""}"#, "empty_text"),
            (r#"{"text":"a","label":[1]}"#, "invalid_label"),
            (r#"{"text":"a","labels":"x"}"#, "invalid_label"),
            (r#"{"text":"a","labels":[1.5]}"#, "invalid_label"),
            (r#"{"text":"a","label":1,"labels":[1]}"#, "invalid_label"),
            (r#"{"text":"a","text_pair":""}"#, "empty_text"),
            (r#"{"text":"a","text_pair":"b"}"#, "missing_key"),
            (
                r#"{"sentence1":"","sentence2":"b","label":0}"#,
                "empty_text",
            ),
            (r#"{"foo":1}"#, "unknown_shape"),
        ];
        for (line, rule) in cases {
            assert_eq!(parse_json_line(line, 7).unwrap_err().rule, rule, "{line}");
        }
    }

    #[test]
    fn labels_collected_from_jsonl_and_tsv() {
        let r = scan_str(
            "{\"text\":\"good\",\"label\":\"pos\"}\n{\"text\":\"bad\",\"label\":\"neg\"}\n",
            Format::Jsonl,
        );
        assert_eq!(r.shape, Some(Shape::TextLabel));
        assert_eq!(
            r.labels,
            vec![Label::Name("neg".into()), Label::Name("pos".into())]
        );
        let tsv = "sentence\tlabel\nit is great \t1\nawful\t0\n";
        let mut seen = vec![];
        let r = scan(tsv.as_bytes(), Format::Tsv, 10, |line, ex| {
            seen.push((line, ex))
        });
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.labels, vec![Label::Int(0), Label::Int(1)]);
        assert_eq!(seen[0].0, 2);
        assert_eq!(
            seen[1].1,
            Example::Labeled {
                text: "awful".into(),
                text_pair: None,
                label: Label::Int(0)
            }
        );
    }

    #[test]
    fn csv_with_quotes_and_bad_rows() {
        let csv = "text,label\n\"hello, world\",pos\n\"multi\nline\",neg\nonly-one-field\n";
        let r = scan_str(csv, Format::Csv);
        assert_eq!(r.examples, 2);
        assert_eq!(r.errors.len(), 1);
        assert_eq!(r.errors[0].rule, "csv_field_count");
        assert_eq!(r.errors[0].line, 5);
        let r = scan_str("foo,bar\n1,2\n", Format::Csv);
        assert_eq!(r.errors[0].rule, "csv_missing_column");
    }

    #[test]
    fn regression_labels_multi_labels_and_pairs_parse() {
        let lines = [
            r#"{"text":"a","label":3.25}"#,
            r#"{"text":"b","label":-1}"#,
            r#"{"text":"c","text_pair":"d","label":"0.5"}"#,
        ];
        let got: Vec<Example> = lines
            .iter()
            .map(|l| parse_json_line(l, 1).unwrap())
            .collect();
        assert_eq!(got[0].labels()[0].as_number(), Some(3.25));
        assert_eq!(got[1].labels()[0].as_number(), Some(-1.0));
        assert_eq!(
            got[2],
            Example::Labeled {
                text: "c".into(),
                text_pair: Some("d".into()),
                label: Label::Name("0.5".into())
            }
        );
        assert_eq!(Label::Name("pos".into()).as_number(), None);
        let glue = parse_json_line(r#"{"sentence1":"x","sentence2":"y","label":1}"#, 1).unwrap();
        assert_eq!(
            glue,
            Example::Labeled {
                text: "x".into(),
                text_pair: Some("y".into()),
                label: Label::Int(1)
            }
        );
        let multi = parse_json_line(r#"{"text":"t","labels":["b","a","b",2]}"#, 1).unwrap();
        assert_eq!(multi.shape(), Shape::TextLabels);
        assert_eq!(
            multi.labels(),
            &[
                Label::Name("b".into()),
                Label::Name("a".into()),
                Label::Int(2)
            ]
        );
        let none = parse_json_line(r#"{"text":"t","labels":[]}"#, 1).unwrap();
        assert!(none.labels().is_empty());
        let r = scan_str(
            "{\"text\":\"a\",\"labels\":[\"x\"]}\n{\"text\":\"b\",\"labels\":[\"y\",\"x\"]}\n{\"text\":\"c\",\"label\":\"x\"}\n",
            Format::Jsonl,
        );
        assert_eq!(r.shape, Some(Shape::TextLabels));
        assert_eq!(
            r.labels,
            vec![Label::Name("x".into()), Label::Name("y".into())]
        );
        assert_eq!(r.first_non_numeric_label, None);
        let numbers = scan_str(
            "{\"text\":\"a\",\"label\":1.5}\n{\"text\":\"b\",\"label\":\"2\"}\n{\"text\":\"c\",\"label\":\"high\"}\n",
            Format::Jsonl,
        );
        assert_eq!(
            numbers.first_non_numeric_label,
            Some((3, Label::Name("high".into())))
        );
        assert_eq!(
            (r.errors[0].line, r.errors[0].rule.as_str()),
            (3, "mixed_shapes")
        );
        assert!(Shape::TextLabels.fits(Task::MultiLabelClassification));
        assert!(!Shape::TextLabels.fits(Task::SequenceClassification));
        assert!(Shape::TextLabel.fits(Task::SequenceRegression));
    }

    #[test]
    fn csv_pairs_and_label_lists() {
        let mut seen = vec![];
        let csv = "sentence1,sentence2,label\nthe cat,a cat,0.8\n\"x, y\",z,1\n";
        let r = scan(csv.as_bytes(), Format::Csv, 10, |_, ex| seen.push(ex));
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(
            seen[0],
            Example::Labeled {
                text: "the cat".into(),
                text_pair: Some("a cat".into()),
                label: Label::Name("0.8".into())
            }
        );
        let mut seen = vec![];
        let tsv = "text\tlabels\nfirst\tsports,news\nsecond\t[\"news\", 3]\nthird\t\n";
        let r = scan(tsv.as_bytes(), Format::Tsv, 10, |_, ex| seen.push(ex));
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.shape, Some(Shape::TextLabels));
        assert_eq!(
            seen[0].labels(),
            &[Label::Name("sports".into()), Label::Name("news".into())]
        );
        assert_eq!(
            seen[1].labels(),
            &[Label::Name("news".into()), Label::Int(3)]
        );
        assert!(seen[2].labels().is_empty());
        let r = scan_str("text,text_pair,label\na,,1\n", Format::Csv);
        assert_eq!(
            (r.errors[0].line, r.errors[0].rule.as_str()),
            (2, "empty_text")
        );
        let r = scan_str("text\tlabels\na\t[1.5]\n", Format::Tsv);
        assert_eq!(
            (r.errors[0].line, r.errors[0].rule.as_str()),
            (2, "invalid_label")
        );
        let r = scan_str("text,text_pair\na,b\n", Format::Csv);
        assert_eq!(r.errors[0].rule, "csv_missing_column");
    }

    #[test]
    fn read_all_returns_examples_or_report() {
        let ok = read_all(
            "{\"text\":\"a\"}\n{\"text\":\"b\"}".as_bytes(),
            Format::Jsonl,
            5,
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        let err = read_all("".as_bytes(), Format::Jsonl, 5).unwrap_err();
        assert_eq!(err.examples, 0);
        assert_eq!(Format::from_filename("x.TSV"), Format::Tsv);
        assert_eq!(Format::from_filename("https://h/x.csv?sig=1"), Format::Csv);
    }

    #[test]
    fn tagged_records_from_jsonl_and_conll() {
        let jsonl = "{\"tokens\":[\"EU\",\"rejects\",\"German\"],\"tags\":[\"B-ORG\",\"O\",\"B-MISC\"]}\n{\"tokens\":[\"Peter\"],\"ner_tags\":[1]}\n";
        let mut seen = vec![];
        let r = scan(jsonl.as_bytes(), Format::Jsonl, 10, |l, e| {
            seen.push((l, e))
        });
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.shape, Some(Shape::TokensTags));
        assert!(Shape::TokensTags.fits(Task::TokenClassification));
        assert!(!Shape::TokensTags.fits(Task::SequenceClassification));
        assert_eq!(
            seen[0].1,
            Example::Tagged {
                tokens: vec!["EU".into(), "rejects".into(), "German".into()],
                tags: vec![
                    Label::Name("B-ORG".into()),
                    Label::Name("O".into()),
                    Label::Name("B-MISC".into())
                ],
            }
        );
        assert_eq!(seen[1].1.labels(), &[Label::Int(1)]);
        assert_eq!(r.labels.len(), 4);

        // CoNLL-2003's four columns, a document marker, sentences at the line of their first word.
        let conll = "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n";
        let mut seen = vec![];
        let r = scan(conll.as_bytes(), Format::Conll, 10, |l, e| {
            seen.push((l, e))
        });
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(seen.len(), 2);
        assert_eq!((seen[0].0, seen[1].0), (3, 7));
        assert_eq!(
            seen[1].1,
            Example::Tagged {
                tokens: vec!["Peter".into(), "Blackburn".into()],
                tags: vec![Label::Name("B-PER".into()), Label::Name("I-PER".into())],
            }
        );
        assert_eq!(Format::from_filename("train.conll"), Format::Conll);
        assert_eq!(Format::from_filename("dev.iob2"), Format::Conll);
    }

    #[test]
    fn tagged_errors_name_their_line() {
        let cases = [
            (r#"{"tokens":["a","b"],"tags":["O"]}"#, "length_mismatch"),
            (r#"{"tokens":[],"tags":[]}"#, "empty_tokens"),
            (r#"{"tokens":"a b","tags":["O"]}"#, "invalid_type"),
            (r#"{"tokens":["a",""],"tags":["O","O"]}"#, "invalid_type"),
            (r#"{"tokens":["a"]}"#, "missing_key"),
            (r#"{"tokens":["a"],"tags":[1.5]}"#, "invalid_label"),
            (r#"{"tokens":["a"],"tags":"O"}"#, "invalid_label"),
        ];
        for (line, rule) in cases {
            let e = parse_json_line(line, 4).unwrap_err();
            assert_eq!((e.line, e.rule.as_str()), (4, rule), "{line}");
        }
        let e = parse_json_line(r#"{"tokens":["a","b"],"tags":["O"]}"#, 4).unwrap_err();
        assert!(e.message.contains("2 tokens but 1 tags"), "{}", e.message);
        // The bad line of a sentence, and the sentences around it still read.
        let conll = "a O\nb O\n\nc O\nd\ne O\n\nf O\n";
        let r = scan(conll.as_bytes(), Format::Conll, 10, |_, _| {});
        assert_eq!(r.examples, 2);
        assert_eq!(
            (r.errors[0].line, r.errors[0].rule.as_str()),
            (5, "conll_missing_tag")
        );
    }

    #[test]
    fn question_answering_records_from_jsonl_and_csv() {
        let jsonl = "{\"question\":\"Who?\",\"context\":\"Élise met Bob.\",\"answers\":{\"text\":[\"Bob\"],\"answer_start\":[10]}}\n{\"id\":\"x\",\"question\":\"Why?\",\"context\":\"No reason.\",\"answers\":{\"text\":[],\"answer_start\":[]}}\n";
        let mut seen = vec![];
        let r = scan(jsonl.as_bytes(), Format::Jsonl, 10, |l, e| {
            seen.push((l, e))
        });
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.shape, Some(Shape::QuestionAnswers));
        assert!(Shape::QuestionAnswers.fits(Task::QuestionAnswering));
        // Offsets count characters, as SQuAD's do (`É` is two bytes).
        assert_eq!(
            seen[0].1,
            Example::Answered {
                question: "Who?".into(),
                context: "Élise met Bob.".into(),
                answers: vec![Answer {
                    text: "Bob".into(),
                    start: 10
                }],
            }
        );
        let Example::Answered { answers, .. } = &seen[1].1 else {
            panic!()
        };
        assert!(answers.is_empty());
        let csv = "question,context,answers\nWho?,\"Ann, then Bob\",\"{\"\"text\"\": [\"\"Bob\"\"], \"\"answer_start\"\": [10]}\"\n";
        let r = scan_str(csv, Format::Csv);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.shape, Some(Shape::QuestionAnswers));
    }

    #[test]
    fn question_answering_errors_name_their_line() {
        let cases = [
            (
                r#"{"question":"q","context":"a b","answers":{"text":["b"],"answer_start":[0]}}"#,
                "answer_not_found",
            ),
            (
                r#"{"question":"","context":"a","answers":{"text":[],"answer_start":[]}}"#,
                "empty_question",
            ),
            (
                r#"{"question":"q","context":" ","answers":{"text":[],"answer_start":[]}}"#,
                "empty_context",
            ),
            (r#"{"question":"q","context":"a"}"#, "missing_key"),
            (
                r#"{"question":"q","context":"a","answers":{"text":["a"],"answer_start":[]}}"#,
                "invalid_answers",
            ),
            (
                r#"{"question":"q","context":"a","answers":["a"]}"#,
                "invalid_answers",
            ),
            (
                r#"{"question":"q","context":"a","answers":{"text":["a"],"answer_start":[-1]}}"#,
                "invalid_answers",
            ),
        ];
        for (line, rule) in cases {
            let e = parse_json_line(line, 6).unwrap_err();
            assert_eq!((e.line, e.rule.as_str()), (6, rule), "{line}");
        }
        let e = parse_json_line(cases[0].0, 6).unwrap_err();
        assert!(
            e.message
                .contains("answer 0 `b` is not at character 0 of the context (found `a`"),
            "{}",
            e.message
        );
        let r = scan_str("question,context\nq,a\n", Format::Csv);
        assert_eq!(r.errors[0].rule, "csv_missing_column");
    }

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
            weight: None,
        }
    }

    #[test]
    fn preference_pairs_in_openai_and_trl_layouts() {
        let openai = r#"{"input":{"messages":[{"role":"system","content":"be kind"},{"role":"user","content":"hi"}],"tools":[],"parallel_tool_calls":true},"preferred_output":[{"role":"assistant","content":"hello!"}],"non_preferred_output":[{"role":"assistant","content":"go away"}]}"#;
        let want = Example::Preference {
            prompt: Turns::Chat(vec![msg("system", "be kind"), msg("user", "hi")]),
            chosen: Turns::Chat(vec![msg("assistant", "hello!")]),
            rejected: Turns::Chat(vec![msg("assistant", "go away")]),
        };
        assert_eq!(parse_json_line(openai, 1).unwrap(), want);
        // TRL's explicit prompt, and its implicit one: the turns both conversations begin with.
        let explicit = r#"{"prompt":[{"role":"system","content":"be kind"},{"role":"user","content":"hi"}],"chosen":[{"role":"assistant","content":"hello!"}],"rejected":[{"role":"assistant","content":"go away"}]}"#;
        assert_eq!(parse_json_line(explicit, 1).unwrap(), want);
        let implicit = r#"{"chosen":[{"role":"system","content":"be kind"},{"role":"user","content":"hi"},{"role":"assistant","content":"hello!"}],"rejected":[{"role":"system","content":"be kind"},{"role":"user","content":"hi"},{"role":"assistant","content":"go away"}]}"#;
        assert_eq!(parse_json_line(implicit, 1).unwrap(), want);
        // Plain text; without a prompt, TRL's extract_prompt keeps the space with the answers.
        let text = r#"{"prompt":"Q: sky?","chosen":" blue","rejected":" green"}"#;
        let Example::Preference { prompt, chosen, .. } = parse_json_line(text, 1).unwrap() else {
            panic!()
        };
        assert_eq!(
            (prompt, chosen),
            (Turns::Text("Q: sky?".into()), Turns::Text(" blue".into()))
        );
        let implicit = r#"{"chosen":"The sky is blue","rejected":"The sky is green"}"#;
        assert_eq!(
            parse_json_line(implicit, 1).unwrap(),
            Example::Preference {
                prompt: Turns::Text("The sky is".into()),
                chosen: Turns::Text(" blue".into()),
                rejected: Turns::Text(" green".into()),
            }
        );
        let r = scan_str(&format!("{openai}\n{explicit}\n"), Format::Jsonl);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.shape, Some(Shape::Preference));
        assert_eq!(Shape::parse("preference"), Some(Shape::Preference));
        assert!(!Shape::Preference.fits(Task::CausalLm));
        let r = scan_str(
            "prompt,chosen,rejected\nQ: sky?, blue, green\n",
            Format::Csv,
        );
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.shape, Some(Shape::Preference));
    }

    #[test]
    fn malformed_pairs_name_their_line() {
        let pair = |input: &str, good: &str, bad: &str| {
            format!(r#"{{"input":{input},"preferred_output":{good},"non_preferred_output":{bad}}}"#)
        };
        let user = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
        let a = |c: &str| format!(r#"[{{"role":"assistant","content":"{c}"}}]"#);
        let cases = [
            (pair(user, &a("yes"), r#"[{"role":"user","content":"no"}]"#), "invalid_preference"),
            (pair(user, &a("yes"), "[]"), "missing_messages_list"),
            (pair(user, &a("same"), &a("same")), "identical_pair"),
            (pair(user, &a(" "), &a("no")), "empty_completion"),
            (pair(r#"{"messages":[]}"#, &a("yes"), &a("no")), "missing_messages_list"),
            (pair(r#""hi""#, &a("yes"), &a("no")), "invalid_preference"),
            (
                pair(r#"{"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function"}]}"#, &a("yes"), &a("no")),
                "invalid_preference",
            ),
            (format!(r#"{{"input":{user},"preferred_output":{}}}"#, a("yes")), "invalid_preference"),
            (r#"{"prompt":"q","chosen":"a"}"#.to_string(), "invalid_preference"),
            (r#"{"prompt":"q","chosen":"a","rejected":[{"role":"assistant","content":"b"}]}"#.to_string(), "invalid_preference"),
            (r#"{"chosen":"same start","rejected":"same start"}"#.to_string(), "identical_pair"),
            (
                r#"{"chosen":[{"role":"user","content":"a"}],"rejected":[{"role":"assistant","content":"b"}]}"#.to_string(),
                "invalid_preference",
            ),
        ];
        for (line, rule) in &cases {
            let e = parse_json_line(line, 9).unwrap_err();
            assert_eq!((e.line, e.rule.as_str()), (9, *rule), "{line}: {e}");
        }
        let e = parse_json_line(&cases[0].0, 9).unwrap_err();
        assert!(
            e.message
                .contains("`non_preferred_output` holds a `user` message"),
            "{e}"
        );
        let r = scan_str("prompt,chosen\nq,a\n", Format::Csv);
        assert_eq!(r.errors[0].rule, "csv_missing_column");
        // A pair among chat records is a mixed file.
        let r = scan_str(
            &format!(
                "{}\n{}\n",
                r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}"#,
                pair(user, &a("yes"), &a("no"))
            ),
            Format::Jsonl,
        );
        assert_eq!(
            (r.errors[0].line, r.errors[0].rule.as_str()),
            (2, "mixed_shapes")
        );
    }
}
