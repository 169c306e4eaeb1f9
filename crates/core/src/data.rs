//! Dataset formats, parsed and checked one record at a time.
//!
//! Accepted inputs:
//! - JSONL, one object per line, all lines of one shape:
//!   - chat: `{"messages": [{"role", "content", "weight"?}, ...]}`
//!   - prompt/completion: `{"prompt", "completion"}`
//!   - text: `{"text"}`
//!   - text + label: `{"text", "label"}` (label a string or an integer)
//! - CSV or TSV with a header row: a `text` column (aliases `sentence`, `content`) and an
//!   optional `label` column, or `prompt` and `completion` columns.
//!
//! Errors carry the 1-based line number and a rule name (`invalid_json`, `unrecognized_role`, …)
//! so a user can find and fix the record. The readers never hold the whole file in memory.

use std::io::BufRead;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How the bytes are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jsonl,
    Csv,
    Tsv,
}

impl Format {
    /// By file name: `.csv`, `.tsv`, anything else is JSONL.
    pub fn from_filename(name: &str) -> Format {
        let lower = name.to_ascii_lowercase();
        let lower = lower.split(['?', '#']).next().unwrap_or_default();
        if lower.ends_with(".csv") {
            Format::Csv
        } else if lower.ends_with(".tsv") {
            Format::Tsv
        } else {
            Format::Jsonl
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
            Format::Tsv => "tsv",
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
}

impl Shape {
    pub fn as_str(self) -> &'static str {
        match self {
            Shape::Messages => "messages",
            Shape::PromptCompletion => "prompt_completion",
            Shape::Text => "text",
            Shape::TextLabel => "text_label",
        }
    }

    /// The shape [`Shape::as_str`] names.
    pub fn parse(name: &str) -> Option<Shape> {
        [
            Shape::Messages,
            Shape::PromptCompletion,
            Shape::Text,
            Shape::TextLabel,
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

    /// Shapes a sequence-classification job can train on.
    pub fn fits_classification(self) -> bool {
        matches!(self, Shape::TextLabel)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// Assistant messages only: 0 excludes the message from the loss.
    pub weight: Option<u8>,
}

/// A label as written in the data: classification labels may be names or integers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Label {
    Int(i64),
    Name(String),
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
    Chat { messages: Vec<Message> },
    PromptCompletion { prompt: String, completion: String },
    Text { text: String },
    Labeled { text: String, label: Label },
}

impl Example {
    pub fn shape(&self) -> Shape {
        match self {
            Example::Chat { .. } => Shape::Messages,
            Example::PromptCompletion { .. } => Shape::PromptCompletion,
            Example::Text { .. } => Shape::Text,
            Example::Labeled { .. } => Shape::TextLabel,
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
    if let Some(messages) = obj.get("messages") {
        return parse_messages(messages, line_no).map(|messages| Example::Chat { messages });
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
    if obj.contains_key("text") {
        let text = string_field(&obj, "text", line_no)?;
        if text.trim().is_empty() {
            return Err(LineError::new(line_no, "empty_text", "`text` is empty"));
        }
        return match obj.get("label") {
            None | Some(Value::Null) => Ok(Example::Text { text }),
            Some(label) => Ok(Example::Labeled {
                text,
                label: parse_label(label, line_no)?,
            }),
        };
    }
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    Err(LineError::new(
        line_no,
        "unknown_shape",
        format!(
            "expected `messages`, `prompt`/`completion`, `text` or `text`/`label`; found keys {keys:?}"
        ),
    ))
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
        Value::Number(n) if n.as_i64().is_some() => Ok(Label::Int(n.as_i64().unwrap_or_default())),
        other => Err(LineError::new(
            line_no,
            "invalid_label",
            format!(
                "`label` must be a non-empty string or an integer, found {}",
                type_name(other)
            ),
        )),
    }
}

fn parse_messages(value: &Value, line_no: u64) -> Result<Vec<Message>, LineError> {
    let Value::Array(items) = value else {
        return Err(LineError::new(
            line_no,
            "missing_messages_list",
            "`messages` must be a list",
        ));
    };
    if items.is_empty() {
        return Err(LineError::new(
            line_no,
            "missing_messages_list",
            "`messages` is empty",
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
    if !out.iter().any(|m| m.role == "assistant") {
        return Err(LineError::new(
            line_no,
            "example_missing_assistant_message",
            "the conversation has no assistant message to learn from",
        ));
    }
    Ok(out)
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
    /// Distinct labels (text+label data), sorted, at most 10,000 kept.
    pub labels: Vec<Label>,
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
                if let Example::Labeled { label, .. } = &ex {
                    if labels.len() < 10_000 {
                        labels.insert(label.clone());
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
    let text_col = find(&["text", "sentence", "content"]);
    let label_col = find(&["label"]);
    let prompt_col = find(&["prompt"]);
    let completion_col = find(&["completion"]);
    let layout = match (text_col, label_col, prompt_col, completion_col) {
        (_, _, Some(p), Some(c)) => Layout::PromptCompletion(p, c),
        (Some(t), Some(l), _, _) => Layout::TextLabel(t, l),
        (Some(t), None, _, _) => Layout::Text(t),
        _ => {
            push(
                report,
                1,
                Err(LineError::new(
                    1,
                    "csv_missing_column",
                    format!("the header needs a `text` (or `sentence`) column, optionally `label`, or `prompt` and `completion`; found {headers:?}"),
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
            Layout::Text(t) | Layout::TextLabel(t, _) if get(t).trim().is_empty() => {
                Err(LineError::new(line, "empty_text", "`text` is empty"))
            }
            Layout::Text(t) => Ok(Example::Text { text: get(t) }),
            Layout::TextLabel(t, l) => {
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
                        label,
                    })
                }
            }
        };
        push(report, line, parsed);
    }
}

#[derive(Clone, Copy)]
enum Layout {
    PromptCompletion(usize, usize),
    Text(usize),
    TextLabel(usize, usize),
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
}
