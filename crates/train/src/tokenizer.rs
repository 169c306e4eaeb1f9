//! The tokenizer of a Hugging Face model folder: `tokenizer.json` through the `tokenizers`
//! crate, special tokens from `tokenizer_config.json`, and the chat template.
//!
//! - Special tokens (`bos_token`, `eos_token`, `pad_token`, `unk_token`, `cls_token`,
//!   `sep_token`) may be written as strings or as AddedToken objects (`{"content": ...}`); their
//!   ids come from the tokenizer's vocabulary. A decoder without a pad token pads with EOS (pad
//!   positions never reach the loss, so the choice does not change training).
//! - The chat template is, in order: `chat_template.jinja` (what transformers 5 writes),
//!   `chat_template` in `tokenizer_config.json` (a string, or a list of named templates from
//!   which `default` is taken). It is rendered with minijinja configured like transformers'
//!   Jinja environment (`trim_blocks`, `lstrip_blocks`, loop controls) plus Python string
//!   methods (`.strip()`, `.startswith()`, ... via minijinja-contrib's pycompat),
//!   `raise_exception(msg)`, `strftime_now(fmt)`, `tojson`, and the variables `messages`,
//!   `add_generation_prompt`, `bos_token`, `eos_token`, `pad_token`, `unk_token`.
//! - Models without a template use [`FALLBACK_CHAT_TEMPLATE`]: each turn on its own line as
//!   `<Role>: <content>`, the assistant's turn closed by the EOS token
//!   (`User: hi\nAssistant: hello<eos>\n`).
//!
//! Padding and truncation stored in `tokenizer.json` are switched off: the data code decides.

use std::path::Path;

use serde_json::Value;
use tokenizers::utils::truncation::{truncate_encodings, TruncationParams, TruncationStrategy};
use tokenizers::{PostProcessor, Tokenizer};

use crate::{Error, Result};

/// Used when the model ships no chat template (documented in the module header).
pub const FALLBACK_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\\n' }}{% else %}{{ message['role'] | capitalize }}{{ ': ' + message['content'] + '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}";

/// Tokenizer files copied into every checkpoint when present in the model folder.
pub const TOKENIZER_FILES: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
];

/// A special token: its text and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Special {
    pub content: String,
    pub id: u32,
}

/// One chat message as the template sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChatMessage<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

/// Token ids with their byte offsets in the encoded text.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
    pub type_ids: Vec<u32>,
}

/// One window of a question and its context ([`Tok::encode_question_windows`]).
#[derive(Debug, Clone, PartialEq)]
pub struct QaWindow {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// The characters of the context each token covers; None for the question's and the
    /// special tokens.
    pub offsets: Vec<Option<(usize, usize)>>,
}

/// Pre-split words encoded ([`Tok::encode_words_truncated`]).
#[derive(Debug, Clone, PartialEq)]
pub struct WordEncoding {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// The word each token belongs to; None for the special tokens.
    pub word_ids: Vec<Option<u32>>,
    pub cut: bool,
}

pub struct Tok {
    tokenizer: Tokenizer,
    pub bos: Option<Special>,
    pub eos: Option<Special>,
    pub pad: Option<Special>,
    pub unk: Option<Special>,
    /// The model's own template, if any.
    pub chat_template: Option<String>,
    env: minijinja::Environment<'static>,
}

impl std::fmt::Debug for Tok {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tok")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl Tok {
    /// Loads `dir/tokenizer.json`, `dir/tokenizer_config.json` (optional) and the chat template.
    /// `is_decoder` turns on the EOS fallback for the pad token.
    pub fn load(dir: &Path, is_decoder: bool) -> Result<Tok> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::Config(format!(
                "{} is missing: tuna needs a fast tokenizer (tokenizer.json) in the model folder",
                path.display()
            )));
        }
        let mut tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| {
            Error::Config(format!(
                "cannot reset truncation of {}: {e}",
                path.display()
            ))
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                Error::Config(format!("{} is not valid JSON: {e}", cfg_path.display()))
            })?,
            Err(_) => Value::Object(Default::default()),
        };
        let special = |key: &str| -> Option<Special> {
            let content = token_text(cfg.get(key))?;
            let id = tokenizer.token_to_id(&content)?;
            Some(Special { content, id })
        };
        let bos = special("bos_token").or_else(|| special("cls_token"));
        let eos = special("eos_token").or_else(|| special("sep_token"));
        let unk = special("unk_token");
        let mut pad = special("pad_token");
        if pad.is_none() && is_decoder {
            pad = eos.clone();
        }
        let chat_template = read_chat_template(dir, &cfg)?;
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            strftime_now(&fmt)
        });
        let source = chat_template
            .clone()
            .unwrap_or_else(|| FALLBACK_CHAT_TEMPLATE.to_string());
        env.add_template_owned("chat", source)
            .map_err(|e| Error::Config(format!("the chat template does not parse: {e}")))?;
        Ok(Tok {
            tokenizer,
            bos,
            eos,
            pad,
            unk,
            chat_template,
            env,
        })
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Encodes `text`; `special` adds the post-processor's tokens (BOS, [CLS]/[SEP]).
    pub fn encode(&self, text: &str, special: bool) -> Result<Encoded> {
        let enc = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| Error::Data(format!("tokenizer failed: {e}")))?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
        })
    }

    /// Ids of `text` only (no offsets).
    pub fn ids(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode_fast(text, special)
            .map_err(|e| Error::Data(format!("tokenizer failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes `text` with the special tokens and truncates to `max_len`, keeping the trailing
    /// special tokens (BERT's [SEP]) as transformers does. Returns the ids, type ids and whether
    /// it cut.
    pub fn encode_truncated(
        &self,
        text: &str,
        max_len: usize,
    ) -> Result<(Vec<u32>, Vec<u32>, bool)> {
        let enc = self
            .tokenizer
            .encode_fast(text, true)
            .map_err(|e| Error::Data(format!("tokenizer failed: {e}")))?;
        let ids = enc.get_ids();
        let types = enc.get_type_ids();
        if ids.len() <= max_len {
            return Ok((ids.to_vec(), types.to_vec(), false));
        }
        let tail = enc
            .get_special_tokens_mask()
            .iter()
            .rev()
            .take_while(|m| **m == 1)
            .count()
            .min(max_len);
        let keep = max_len - tail;
        let mut out_ids = ids[..keep].to_vec();
        let mut out_types = types[..keep].to_vec();
        out_ids.extend_from_slice(&ids[ids.len() - tail..]);
        out_types.extend_from_slice(&types[types.len() - tail..]);
        Ok((out_ids, out_types, true))
    }

    /// Encodes a question and its context as transformers' `tokenizer(question, context,
    /// truncation="only_second", max_length=max_len, stride=stride,
    /// return_overflowing_tokens=True, return_offsets_mapping=True)` does: the question whole,
    /// the context cut into windows of what is left of `max_len`, each sharing `stride` tokens
    /// with the one before, laid out with the pair template. Offsets are in characters.
    pub fn encode_question_windows(
        &self,
        question: &str,
        context: &str,
        max_len: usize,
        stride: usize,
    ) -> Result<Vec<QaWindow>> {
        let fail = |e: tokenizers::Error| Error::Data(format!("tokenizer failed: {e}"));
        let q = self
            .tokenizer
            .encode_char_offsets(question, false)
            .map_err(fail)?;
        let mut c = self
            .tokenizer
            .encode_char_offsets(context, false)
            .map_err(fail)?;
        let added = self
            .tokenizer
            .get_post_processor()
            .map(|p| p.added_tokens(true))
            .unwrap_or(0);
        let room = max_len.saturating_sub(added + q.len());
        if room <= stride {
            return Err(Error::Data(format!(
                "the question takes {} tokens: with max_seq_length {max_len} and doc_stride {stride} no window of the context fits (raise max_seq_length or lower doc_stride)",
                q.len()
            )));
        }
        c.truncate(room, stride, tokenizers::TruncationDirection::Right);
        let rest = c.take_overflowing();
        std::iter::once(c)
            .chain(rest)
            .map(|mut w| {
                w.take_overflowing();
                let enc = self
                    .tokenizer
                    .post_process(q.clone(), Some(w), true)
                    .map_err(fail)?;
                let offsets = enc
                    .get_sequence_ids()
                    .iter()
                    .zip(enc.get_offsets())
                    .map(|(s, o)| (*s == Some(1)).then_some(*o))
                    .collect();
                Ok(QaWindow {
                    ids: enc.get_ids().to_vec(),
                    type_ids: enc.get_type_ids().to_vec(),
                    offsets,
                })
            })
            .collect()
    }

    /// Encodes pre-split `words` as transformers' `tokenizer(words, is_split_into_words=True,
    /// truncation=True, max_length=max_len)` does: each word tokenized on its own, cut to fit
    /// `max_len` with the model's special tokens, then the template applied. Returns the ids,
    /// token types, the word each token came from (None for special tokens) and whether it cut.
    pub fn encode_words_truncated(&self, words: &[String], max_len: usize) -> Result<WordEncoding> {
        let fail = |e: tokenizers::Error| Error::Data(format!("tokenizer failed: {e}"));
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let mut enc = self.tokenizer.encode(words, false).map_err(fail)?;
        let added = self
            .tokenizer
            .get_post_processor()
            .map(|p| p.added_tokens(false))
            .unwrap_or(0);
        let room = max_len.saturating_sub(added);
        let cut = enc.len() > room;
        if cut {
            enc.truncate(room, 0, tokenizers::TruncationDirection::Right);
        }
        let enc = self.tokenizer.post_process(enc, None, true).map_err(fail)?;
        Ok(WordEncoding {
            ids: enc.get_ids().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
            word_ids: enc.get_word_ids().to_vec(),
            cut,
        })
    }

    /// Encodes the pair (`text`, `pair`) as transformers' `tokenizer(text, pair,
    /// truncation=True, max_length=max_len)` does: each text tokenized alone, the longer one cut
    /// a token at a time (`longest_first`) until the pair plus the model's special tokens fits,
    /// then the pair template applied (`[CLS] a [SEP] b [SEP]` with token types 0 and 1 for BERT,
    /// `<s> a </s></s> b </s>` for RoBERTa). Returns ids, token types and whether it cut.
    pub fn encode_pair_truncated(
        &self,
        text: &str,
        pair: &str,
        max_len: usize,
    ) -> Result<(Vec<u32>, Vec<u32>, bool)> {
        let fail = |e: tokenizers::Error| Error::Data(format!("tokenizer failed: {e}"));
        let a = self.tokenizer.encode_fast(text, false).map_err(fail)?;
        let b = self.tokenizer.encode_fast(pair, false).map_err(fail)?;
        let added = self
            .tokenizer
            .get_post_processor()
            .map(|p| p.added_tokens(true))
            .unwrap_or(0);
        let before = a.len() + b.len();
        let (a, b) = if before + added > max_len {
            let params = TruncationParams {
                max_length: max_len.saturating_sub(added),
                strategy: TruncationStrategy::LongestFirst,
                ..Default::default()
            };
            truncate_encodings(a, Some(b), &params).map_err(fail)?
        } else {
            (a, Some(b))
        };
        let cut = a.len() + b.as_ref().map_or(0, |b| b.len()) < before;
        let enc = self.tokenizer.post_process(a, b, true).map_err(fail)?;
        Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec(), cut))
    }

    /// The id that pads a batch: the tokenizer's pad token, else the model's, else its first
    /// end token (0 without any).
    pub fn pad_id(&self, info: &crate::model::ModelInfo) -> i64 {
        self.pad
            .as_ref()
            .map(|p| i64::from(p.id))
            .or(info.pad_token_id)
            .or(info.eos_token_ids.first().copied())
            .unwrap_or(0)
    }

    /// The tokens that end a generated text: the model's end tokens and the tokenizer's.
    pub fn stop_ids(&self, info: &crate::model::ModelInfo) -> Vec<i64> {
        let mut ids = info.eos_token_ids.clone();
        if let Some(e) = &self.eos {
            if !ids.contains(&i64::from(e.id)) {
                ids.push(i64::from(e.id));
            }
        }
        ids
    }

    /// Renders the chat template (the model's, else the fallback).
    pub fn render_chat(
        &self,
        messages: &[ChatMessage<'_>],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Config(e.to_string()))?;
        let text = |s: &Option<Special>| s.as_ref().map(|s| s.content.clone()).unwrap_or_default();
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => text(&self.bos),
            eos_token => text(&self.eos),
            pad_token => text(&self.pad),
            unk_token => text(&self.unk),
        })
        .map_err(|e| Error::Data(format!("the chat template failed: {e:#}")))
    }
}

/// The chat template of a model folder: `chat_template.jinja`, `chat_template.json`, then
/// `tokenizer_config.json`'s `chat_template` (string, or list of `{name, template}` → `default`).
pub fn read_chat_template(dir: &Path, cfg: &Value) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        let t = std::fs::read_to_string(&jinja)
            .map_err(|e| Error::io(format!("reading {}", jinja.display()), e))?;
        return Ok(Some(t));
    }
    let json = dir.join("chat_template.json");
    let from_json = std::fs::read_to_string(&json)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v.get("chat_template").cloned());
    match from_json.as_ref().or(cfg.get("chat_template")) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(items)) => {
            let named = |n: &str| {
                items.iter().find_map(|it| {
                    (it.get("name").and_then(|x| x.as_str()) == Some(n))
                        .then(|| {
                            it.get("template")
                                .and_then(|t| t.as_str())
                                .map(str::to_string)
                        })
                        .flatten()
                })
            };
            Ok(named("default").or_else(|| {
                items
                    .first()
                    .and_then(|it| it.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string)
            }))
        }
        Some(_) => Err(Error::Config(
            "`chat_template` in tokenizer_config.json must be a string or a list".into(),
        )),
    }
}

/// `strftime_now(fmt)` for templates that print today's date (UTC); supports the common
/// `%Y %m %d %B %b %H %M %S` directives.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_from_list_picks_default() {
        let cfg = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            read_chat_template(dir.path(), &cfg).unwrap().as_deref(),
            Some("D")
        );
        std::fs::write(dir.path().join("chat_template.jinja"), "J").unwrap();
        assert_eq!(
            read_chat_template(dir.path(), &cfg).unwrap().as_deref(),
            Some("J")
        );
    }

    #[test]
    fn strftime_formats() {
        let s = strftime_now("%d %B %Y");
        assert_eq!(s.split(' ').count(), 3);
        assert!(s.ends_with(|c: char| c.is_ascii_digit()));
    }
}
