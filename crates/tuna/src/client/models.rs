//! `tuna models list|show` through the API, and `tuna models register` (the operator command
//! of `admin.rs`, which works on the database directly).

use clap::Subcommand;
use serde_json::Value;

use super::http::{seg, Api};
use super::output::{self, print_json};
use super::{ClientOpts, Failure, Result};

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// List the base models and the caller's fine-tuned models.
    List {
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Show one model.
    Show {
        /// Model id.
        id: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    #[command(flatten)]
    Admin(crate::admin::ModelsCommand),
}

pub async fn run(command: ModelsCommand) -> Result<()> {
    match command {
        ModelsCommand::List { opts } => {
            let api = Api::new(&opts)?;
            let list = api.get("/v1/models").await?;
            if opts.json {
                print_json(&list);
            } else {
                let rows: Vec<Vec<String>> = list["data"]
                    .as_array()
                    .map(|d| d.iter().map(row).collect())
                    .unwrap_or_default();
                output::table(
                    &[
                        "ID", "KIND", "TYPE", "PARAMS", "CONTEXT", "OWNED BY", "CREATED",
                    ],
                    &rows,
                );
            }
            Ok(())
        }
        ModelsCommand::Show { id, opts } => {
            let api = Api::new(&opts)?;
            let m = api.get(&format!("/v1/models/{}", seg(&id))).await?;
            if opts.json {
                print_json(&m);
            } else {
                let mut pairs = vec![
                    ("id", output::text(&m["id"])),
                    ("kind", output::text(&m["kind"])),
                    ("owned by", output::text(&m["owned_by"])),
                    ("created", output::time(&m["created"])),
                ];
                if let Some(a) = m["architecture"].as_object() {
                    for (k, v) in a {
                        pairs.push((k.as_str(), compact(v)));
                    }
                }
                output::fields(&pairs);
            }
            Ok(())
        }
        ModelsCommand::Admin(c) => crate::admin::models(c)
            .await
            .map_err(|e| Failure::Api(format!("{e:#}"))),
    }
}

fn compact(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a.iter().map(compact).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

fn row(m: &Value) -> Vec<String> {
    let arch = &m["architecture"];
    let params = arch["num_parameters"]
        .as_f64()
        .filter(|n| *n > 0.0)
        .map(|n| {
            if n >= 1e9 {
                format!("{:.1}B", n / 1e9)
            } else if n >= 1e6 {
                format!("{:.1}M", n / 1e6)
            } else {
                format!("{:.0}K", n / 1e3)
            }
        })
        .unwrap_or_else(|| "-".into());
    vec![
        output::text(&m["id"]),
        output::text(&m["kind"]),
        output::text(&arch["model_type"]),
        params,
        output::text(&arch["context_length"]),
        output::text(&m["owned_by"]),
        output::time(&m["created"]),
    ]
}
