//! Which parameters train. Full fine-tunes train everything except what [`FreezeOptions`]
//! freezes (embeddings, the first N layers, glob patterns over Hugging Face parameter names);
//! LoRA trains only the adapters and a classification head (PEFT's `modules_to_save`).
//!
//! A pattern that matches no parameter is an error naming the parameter and module names that
//! exist, so a typo does not silently train everything.

use std::collections::BTreeSet;

use crate::model::FreezeOptions;
use crate::{Error, Result};

/// What a parameter is, for the freezing rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Token / position / token-type embeddings (and BERT's embedding LayerNorm).
    Embedding,
    /// Inside transformer layer `i`.
    Layer(usize),
    /// Final norm, BERT pooler: trained unless a pattern freezes it.
    Other,
    /// An untied LM head.
    LmHead,
    /// A classification head (`score`, `classifier`).
    ClassifierHead,
}

/// `*` matches any run of characters (dots included), `?` one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0usize, 0usize);
    let (mut star, mut mark) = (None::<usize>, 0usize);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Decides trainability per parameter.
pub struct FreezePlan {
    pub opts: FreezeOptions,
    pub lora: bool,
    /// The base-model prefix (`transformer`, `model`, `bert`), so patterns may omit it.
    pub base_prefix: String,
    pub num_layers: usize,
}

impl FreezePlan {
    pub fn new(
        opts: &FreezeOptions,
        lora: bool,
        base_prefix: &str,
        num_layers: usize,
    ) -> Result<Self> {
        if !lora && opts.first_n_layers > num_layers {
            return Err(Error::Config(format!(
                "cannot freeze the first {} layers: the model has {num_layers}",
                opts.first_n_layers
            )));
        }
        for p in &opts.patterns {
            if p.trim().is_empty() {
                return Err(Error::Config("empty freeze pattern".into()));
            }
        }
        Ok(FreezePlan {
            opts: opts.clone(),
            lora,
            base_prefix: base_prefix.to_string(),
            num_layers,
        })
    }

    fn pattern_hits(&self, pattern: &str, name: &str) -> bool {
        if glob_match(pattern, name) {
            return true;
        }
        let prefix = format!("{}.", self.base_prefix);
        name.strip_prefix(&prefix)
            .is_some_and(|rest| glob_match(pattern, rest))
    }

    pub fn trainable(&self, name: &str, role: Role) -> bool {
        if self.lora {
            return role == Role::ClassifierHead;
        }
        match role {
            Role::Embedding if self.opts.embeddings => return false,
            Role::Layer(i) if i < self.opts.first_n_layers => return false,
            _ => {}
        }
        !self
            .opts
            .patterns
            .iter()
            .any(|p| self.pattern_hits(p, name))
    }

    /// Every pattern must match at least one parameter name (ignored under LoRA).
    pub fn check_patterns(&self, names: &[String]) -> Result<()> {
        if self.lora {
            return Ok(());
        }
        let bad: Vec<&String> = self
            .opts
            .patterns
            .iter()
            .filter(|p| !names.iter().any(|n| self.pattern_hits(p, n)))
            .collect();
        if bad.is_empty() {
            return Ok(());
        }
        let modules: BTreeSet<String> = names
            .iter()
            .map(|n| {
                // Collapse layer numbers so the list stays short: model.layers.*.self_attn.q_proj.weight
                n.split('.')
                    .map(|c| {
                        if c.chars().all(|ch| ch.is_ascii_digit()) {
                            "*"
                        } else {
                            c
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(".")
            })
            .collect();
        Err(Error::Config(format!(
            "freeze pattern(s) {} match no parameter; parameter names look like: {}",
            bad.iter()
                .map(|s| format!("'{s}'"))
                .collect::<Vec<_>>()
                .join(", "),
            modules.into_iter().collect::<Vec<_>>().join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match(
            "model.layers.*.mlp.*",
            "model.layers.3.mlp.up_proj.weight"
        ));
        assert!(glob_match("*bias", "h.0.attn.c_attn.bias"));
        assert!(!glob_match(
            "*.q_proj",
            "model.layers.0.self_attn.q_proj.weight"
        ));
        assert!(glob_match(
            "*.q_proj.*",
            "model.layers.0.self_attn.q_proj.weight"
        ));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "abbc"));
        assert!(glob_match("*", ""));
    }

    #[test]
    fn plan() {
        let opts = FreezeOptions {
            embeddings: true,
            first_n_layers: 1,
            patterns: vec!["layers.*.mlp.*".into()],
        };
        let p = FreezePlan::new(&opts, false, "model", 2).unwrap();
        assert!(!p.trainable("model.embed_tokens.weight", Role::Embedding));
        assert!(!p.trainable("model.layers.0.self_attn.q_proj.weight", Role::Layer(0)));
        assert!(p.trainable("model.layers.1.self_attn.q_proj.weight", Role::Layer(1)));
        assert!(!p.trainable("model.layers.1.mlp.up_proj.weight", Role::Layer(1)));
        assert!(p.trainable("score.weight", Role::ClassifierHead));
        let names = vec!["model.layers.1.mlp.up_proj.weight".to_string()];
        p.check_patterns(&names).unwrap();
        let bad = FreezePlan::new(
            &FreezeOptions {
                patterns: vec!["nope.*".into()],
                ..Default::default()
            },
            false,
            "model",
            2,
        )
        .unwrap();
        let e = bad.check_patterns(&names).unwrap_err().to_string();
        assert!(
            e.contains("'nope.*'") && e.contains("model.layers.*.mlp.up_proj.weight"),
            "{e}"
        );
        assert!(FreezePlan::new(
            &FreezeOptions {
                first_n_layers: 3,
                ..Default::default()
            },
            false,
            "model",
            2
        )
        .is_err());
        let lora = FreezePlan::new(&FreezeOptions::default(), true, "model", 2).unwrap();
        assert!(!lora.trainable("model.norm.weight", Role::Other));
        assert!(lora.trainable("score.weight", Role::ClassifierHead));
    }
}
