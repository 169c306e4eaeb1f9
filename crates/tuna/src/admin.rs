//! `tuna keys …` and `tuna models …`: operator commands working on the database directly.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use tuna_db::keys;

use crate::db::{Database, DbArgs};

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an API key and print its secret (shown only once).
    Create {
        #[command(flatten)]
        db: DbArgs,
        /// Organisation name or id; created when no organisation has that name. Default: the
        /// default organisation.
        #[arg(long)]
        org: Option<String>,
        /// A label for the key.
        #[arg(long, default_value = "")]
        name: String,
        /// Give the key admin rights (registering models).
        #[arg(long)]
        admin: bool,
    },
    /// List API keys (never their secrets).
    List {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Revoke an API key (by the id `tuna keys list` shows). Running servers stop accepting it
    /// within 5 s (they remember valid keys that long).
    Revoke {
        #[command(flatten)]
        db: DbArgs,
        /// The key's id (`key-…`).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Register a Hugging Face checkpoint directory (with config.json) as base model `id`.
    Register {
        #[command(flatten)]
        db: DbArgs,
        /// The model id clients use as `model`.
        id: String,
        /// The checkpoint directory.
        dir: PathBuf,
    },
}

pub async fn keys(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create {
            db,
            org,
            name,
            admin,
        } => {
            let database = Database::open(&db).await?;
            let result = create_key(&database, org, &name, admin).await;
            database.close().await;
            let (org_id, key) = result?;
            println!("{}", key.secret);
            eprintln!(
                "created key {} for organisation {org_id}{}",
                key.row.api_key_id,
                if admin { " (admin)" } else { "" }
            );
            Ok(())
        }
        KeysCommand::List { db } => {
            let database = Database::open(&db).await?;
            let rows = keys::list_keys(&database.pool).await;
            database.close().await;
            println!(
                "{:<32} {:<32} {:<14} {:<6} {:<8} name",
                "id", "organization", "prefix", "admin", "revoked"
            );
            for k in rows? {
                println!(
                    "{:<32} {:<32} {:<14} {:<6} {:<8} {}",
                    k.api_key_id,
                    k.organization_id,
                    k.key_prefix,
                    k.is_admin,
                    k.revoked_at.is_some(),
                    k.name
                );
            }
            Ok(())
        }
        KeysCommand::Revoke { db, id } => {
            let database = Database::open(&db).await?;
            let result = keys::revoke_key(&database.pool, &id).await;
            database.close().await;
            if !result? {
                anyhow::bail!("no live API key with id '{id}' (see `tuna keys list`)");
            }
            eprintln!("revoked key {id}");
            Ok(())
        }
    }
}

async fn create_key(
    database: &Database,
    org: Option<String>,
    name: &str,
    admin: bool,
) -> anyhow::Result<(String, keys::NewKey)> {
    let pool = &database.pool;
    keys::ensure_default_org(pool).await?;
    let org_id = match org {
        None => keys::DEFAULT_ORG.to_string(),
        Some(o) => match keys::org_by_name(pool, &o).await? {
            Some(id) => id,
            None => keys::create_org(pool, &o).await?,
        },
    };
    let key = keys::create_key(pool, &org_id, name, admin)
        .await
        .context("creating the key")?;
    Ok((org_id, key))
}

pub async fn models(command: ModelsCommand) -> anyhow::Result<()> {
    match command {
        ModelsCommand::Register { db, id, dir } => {
            let database = Database::open(&db).await?;
            let result = tuna_api::models::register_base_model(&database.pool, &id, &dir).await;
            database.close().await;
            let row = result.map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("registered base model {} at {}", row.model_id, row.location);
            Ok(())
        }
    }
}
