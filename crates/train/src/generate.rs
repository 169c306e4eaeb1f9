//! Text generation with a KV cache, for every causal LM tuna trains.
//!
//! [`generate`] takes token prompts of any lengths, pads them on the left into one batch, runs
//! the prompt through the model once ([`Model::forward_step`] fills the cache), then one token
//! per step, each attending to the cache, as transformers' `generate` does (the positions count
//! each row's real tokens). Greedy decoding picks the most likely token (its output equals
//! transformers' greedy `generate`, tested on every fixture family); sampling applies
//! temperature, then top-k, then top-p, and draws from a generator seeded per request and row,
//! so the same seed gives the same text. A row stops at one of its stop tokens (the model's end
//! tokens, not part of the output) or after `max_tokens`.
//!
//! [`complete`] is the text-level call on top: it tokenizes prompts (chat messages through the
//! model's chat template with the generation prompt), generates, decodes, and cuts each text at
//! the first stop sequence.

use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

use crate::model::{Batch, KvCache, Model};
use crate::tokenizer::{ChatMessage, Tok};
use crate::{Error, Result};

/// How the next token is chosen, and when a sequence ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// New tokens at most.
    pub max_tokens: usize,
    /// 0: greedy. Otherwise the logits are divided by it before sampling.
    pub temperature: f64,
    /// Sample from the smallest set of tokens whose probabilities reach `top_p` (1: all).
    pub top_p: f64,
    /// Sample from the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    pub seed: u64,
    /// Tokens that end a sequence (not included in its output).
    pub stop_token_ids: Vec<i64>,
}

impl Default for Sampling {
    fn default() -> Sampling {
        Sampling {
            max_tokens: 16,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop_token_ids: Vec::new(),
        }
    }
}

/// Why a sequence ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token or stop sequence.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// One prompt's generated tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub tokens: Vec<i64>,
    pub finish: Finish,
}

/// Generates for each prompt of `prompts` (token ids) in one batch, padded on the left with
/// `pad_id`. `keep_going(row, tokens)` is asked after each new token of an unfinished row; false
/// stops it (a stop sequence found; [`Finish::Stop`]).
pub fn generate(
    model: &dyn Model,
    prompts: &[Vec<i64>],
    pad_id: i64,
    s: &Sampling,
    keep_going: &mut dyn FnMut(usize, &[i64]) -> bool,
) -> Result<Vec<Generated>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    if prompts.iter().any(Vec::is_empty) {
        return Err(Error::Data("a prompt has no tokens".into()));
    }
    let device = model.device();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * width);
    let mut mask = Vec::with_capacity(b * width);
    for p in prompts {
        let pad = width - p.len();
        ids.extend(std::iter::repeat_n(pad_id, pad).chain(p.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1, p.len())));
    }
    let shape = [b as i64, width as i64];
    let mut input = Tensor::f_from_slice(&ids)?
        .f_view(shape)?
        .f_to_device(device)?;
    let mut attention = Tensor::f_from_slice(&mask)?
        .f_view(shape)?
        .f_to_device(device)?;
    let mut cache = KvCache::default();
    let mut rngs: Vec<rand::rngs::StdRng> = (0..b)
        .map(|r| {
            rand::rngs::StdRng::seed_from_u64(
                s.seed.wrapping_mul(0x9E37_79B9).wrapping_add(r as u64),
            )
        })
        .collect();
    let mut out: Vec<Generated> = (0..b)
        .map(|_| Generated {
            tokens: Vec::new(),
            finish: Finish::Length,
        })
        .collect();
    let mut done = vec![false; b];
    // Every token so far (for a cache computed again: LongRoPE past its switch).
    let mut history = input.shallow_clone();
    let switch = model.rope_switch_length();
    for _ in 0..s.max_tokens {
        let past = cache.len();
        let total = attention.size()[1];
        if switch.is_some_and(|o| past > 0 && past <= o && total > o) {
            cache = KvCache::default();
            input = history.shallow_clone();
        }
        let logits = model.forward_step(
            &Batch {
                input_ids: &input,
                attention_mask: &attention,
                token_type_ids: None,
                packed: None,
            },
            &mut cache,
        )?;
        let next = choose(&logits, s, &mut rngs)?;
        let mut step = Vec::with_capacity(b);
        for (r, tok) in next.into_iter().enumerate() {
            if done[r] {
                step.push(pad_id);
                continue;
            }
            step.push(tok);
            if s.stop_token_ids.contains(&tok) {
                done[r] = true;
                out[r].finish = Finish::Stop;
                continue;
            }
            out[r].tokens.push(tok);
            if !keep_going(r, &out[r].tokens) {
                done[r] = true;
                out[r].finish = Finish::Stop;
            }
        }
        if done.iter().all(|d| *d) {
            break;
        }
        input = Tensor::f_from_slice(&step)?
            .f_view([b as i64, 1])?
            .f_to_device(device)?;
        if switch.is_some() {
            history = Tensor::f_cat(&[&history, &input], 1)?;
        }
        attention = Tensor::f_cat(
            &[
                attention,
                Tensor::f_ones([b as i64, 1], (Kind::Int64, device))?,
            ],
            1,
        )?;
    }
    Ok(out)
}

/// The next token of each row from its logits `[b, vocab]`.
fn choose(logits: &Tensor, s: &Sampling, rngs: &mut [rand::rngs::StdRng]) -> Result<Vec<i64>> {
    if s.temperature <= 0.0 || s.top_k == 1 {
        let best = logits.f_argmax(-1, false)?.f_to_device(Device::Cpu)?;
        return Ok(Vec::<i64>::try_from(best)?);
    }
    let probs = logits
        .f_to_kind(Kind::Float)?
        .f_div_scalar(s.temperature)?
        .f_softmax(-1, Kind::Float)?
        .f_to_device(Device::Cpu)?;
    let rows = Vec::<Vec<f32>>::try_from(probs)?;
    Ok(rows
        .iter()
        .zip(rngs.iter_mut())
        .map(|(p, rng)| sample(p, s.top_k, s.top_p, rng) as i64)
        .collect())
}

/// A draw from `probs` restricted to its `top_k` largest (0: all), then to the smallest prefix
/// of those, largest first, whose mass reaches `top_p`; renormalised.
pub fn sample(probs: &[f32], top_k: usize, top_p: f64, rng: &mut impl Rng) -> usize {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|a, b| probs[*b].total_cmp(&probs[*a]).then(a.cmp(b)));
    if top_k > 0 {
        order.truncate(top_k);
    }
    if top_p < 1.0 {
        let mut mass = 0.0f64;
        let mut keep = 0;
        for i in &order {
            mass += f64::from(probs[*i]);
            keep += 1;
            if mass >= top_p {
                break;
            }
        }
        order.truncate(keep.max(1));
    }
    let total: f64 = order.iter().map(|i| f64::from(probs[*i])).sum();
    let mut x = rng.gen::<f64>() * total;
    for i in &order {
        x -= f64::from(probs[*i]);
        if x <= 0.0 {
            return *i;
        }
    }
    *order.last().unwrap_or(&0)
}

/// A prompt: plain text (tokenized with the tokenizer's special tokens) or chat messages (the
/// chat template with its generation prompt, tokenized without adding any).
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Chat(Vec<(String, String)>),
}

/// One completion as text.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub finish: Finish,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Tokenizes `prompts`, generates ([`generate`]; the model's end tokens stop a sequence besides
/// `s.stop_token_ids`) and decodes, cutting each text before the first of `stop` it holds.
pub fn complete(
    model: &dyn Model,
    tok: &Tok,
    prompts: &[Prompt],
    stop: &[String],
    s: &Sampling,
) -> Result<Vec<Completion>> {
    complete_streaming(model, tok, prompts, stop, s, &mut |_, _| {})
}

/// [`complete`], handing each prompt's text to `on_text(index, delta)` as it grows: the deltas
/// of a prompt add up to its final text. Text that may still turn out to begin a stop sequence,
/// or that ends inside a character, is held back until it cannot.
pub fn complete_streaming(
    model: &dyn Model,
    tok: &Tok,
    prompts: &[Prompt],
    stop: &[String],
    s: &Sampling,
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<Vec<Completion>> {
    let ids = prompts
        .iter()
        .map(|p| prompt_ids(tok, p))
        .collect::<Result<Vec<_>>>()?;
    let info = model.info();
    let mut s = s.clone();
    for id in tok.stop_ids(info) {
        if !s.stop_token_ids.contains(&id) {
            s.stop_token_ids.push(id);
        }
    }
    let pad = tok.pad_id(info);
    let stop: Vec<&str> = stop
        .iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    let text_of = |t: &[i64]| -> String {
        let u: Vec<u32> = t.iter().map(|i| *i as u32).collect();
        tok.inner().decode(&u, true).unwrap_or_default()
    };
    // The text before the first stop sequence, and whether one was found.
    let cut = |text: &str| -> (usize, bool) {
        match stop.iter().filter_map(|st| text.find(st)).min() {
            Some(i) => (i, true),
            None => (text.len(), false),
        }
    };
    let hold = stop.iter().map(|s| s.chars().count()).max().unwrap_or(1) - 1;
    let mut sent = vec![0usize; ids.len()];
    let generated = {
        let mut keep_going = |r: usize, t: &[i64]| {
            let text = text_of(t);
            let (end, found) = cut(&text);
            // Safe to show: up to a stop sequence, or all but what could begin one and a
            // trailing partial character.
            let safe = if found {
                end
            } else {
                let body = text.trim_end_matches('\u{FFFD}');
                let keep = body.chars().count().saturating_sub(hold);
                body.char_indices().nth(keep).map_or(body.len(), |(i, _)| i)
            };
            if safe > sent[r] && text.is_char_boundary(sent[r]) {
                on_text(r, &text[sent[r]..safe]);
                sent[r] = safe;
            }
            !found
        };
        generate(model, &ids, pad, &s, &mut keep_going)?
    };
    Ok(generated
        .into_iter()
        .zip(&ids)
        .enumerate()
        .map(|(r, (g, p))| {
            let mut text = text_of(&g.tokens);
            let (end, found) = cut(&text);
            text.truncate(end);
            if text.len() > sent[r] && text.is_char_boundary(sent[r]) {
                on_text(r, &text[sent[r]..]);
            }
            Completion {
                text,
                finish: if found { Finish::Stop } else { g.finish },
                prompt_tokens: p.len(),
                completion_tokens: g.tokens.len(),
            }
        })
        .collect())
}

/// A prompt's token ids.
pub fn prompt_ids(tok: &Tok, p: &Prompt) -> Result<Vec<i64>> {
    let ids = match p {
        Prompt::Text(t) => tok.ids(t, true)?,
        Prompt::Chat(messages) => {
            let msgs: Vec<ChatMessage<'_>> = messages
                .iter()
                .map(|(role, content)| ChatMessage { role, content })
                .collect();
            tok.ids(&tok.render_chat(&msgs, true)?, false)?
        }
    };
    Ok(ids.into_iter().map(i64::from).collect())
}
