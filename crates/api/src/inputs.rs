//! The model and file rows a new job refers to, remembered between creates.
//!
//! Creating a job needs its model's row (architecture, location) and its files' rows (status,
//! the shape the upload scan stored). A `processed` file's row does not change until the file
//! is deleted, and that change is caught where it counts: the job's insert only happens while
//! its files are still live (`tuna_db::queue::insert_checked_job`), and a create that finds a
//! file gone reads everything again from the database. A base model's row changes only when an
//! operator registers the id again (`tuna models register`); creates on a server that
//! remembered the old row check against it for at most [`TTL`], as revoked API keys keep
//! working for at most `Config::key_cache_ttl`. The worker reads the model itself when the job
//! runs. The cache is emptied at [`MAX_ENTRIES`], to bound memory.
//!
//! Only rows that exist are remembered (a missing model or file is looked up every time, so it
//! works as soon as it is registered or uploaded), and only files in `processed` status.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use sqlx::PgConnection;
use tuna_db::jobs::{self, CreateContext};
use tuna_db::rows::{FileRow, ModelRow};

/// How long an entry is used before it is read again. At thousands of creates per second
/// nearly all of them still hit; at a few per minute the cache hardly matters.
pub const TTL: Duration = Duration::from_secs(5);
/// Entries beyond this are dropped all at once (a bound on memory, not an eviction policy).
pub const MAX_ENTRIES: usize = 10_000;

/// `(organization, id)`: model visibility and file ownership are per organisation.
type Key = (String, String);

#[derive(Debug, Default)]
pub struct InputCache {
    models: RwLock<HashMap<Key, (ModelRow, Instant)>>,
    files: RwLock<HashMap<Key, (FileRow, Instant)>>,
}

fn fresh<T: Clone>(map: &RwLock<HashMap<Key, (T, Instant)>>, org: &str, id: &str) -> Option<T> {
    let map = map.read().unwrap_or_else(|e| e.into_inner());
    let (row, at) = map.get(&(org.to_string(), id.to_string()))?;
    (at.elapsed() < TTL).then(|| row.clone())
}

fn remember<T>(map: &RwLock<HashMap<Key, (T, Instant)>>, org: &str, id: &str, row: T) {
    let mut map = map.write().unwrap_or_else(|e| e.into_inner());
    if map.len() >= MAX_ENTRIES {
        map.clear();
    }
    map.insert((org.to_string(), id.to_string()), (row, Instant::now()));
}

impl InputCache {
    /// The rows of a new job's model and files: from the cache when every one of them is
    /// there and fresh, else read with one statement ([`jobs::create_context`]) and remembered.
    /// `fresh_read` skips the cache (a retry after a file was found deleted).
    pub async fn context(
        &self,
        conn: &mut PgConnection,
        organization_id: &str,
        model_id: &str,
        training_file: Option<&str>,
        validation_file: Option<&str>,
        fresh_read: bool,
    ) -> tuna_db::Result<CreateContext> {
        if !fresh_read {
            if let Some(ctx) =
                self.cached(organization_id, model_id, training_file, validation_file)
            {
                return Ok(ctx);
            }
        }
        let ctx = jobs::create_context(
            conn,
            organization_id,
            model_id,
            training_file,
            validation_file,
        )
        .await?;
        if let Some(model) = &ctx.model {
            remember(&self.models, organization_id, model_id, model.clone());
        }
        for file in [&ctx.training_file, &ctx.validation_file]
            .into_iter()
            .flatten()
        {
            if file.status == "processed" {
                remember(&self.files, organization_id, &file.file_id, file.clone());
            }
        }
        Ok(ctx)
    }

    fn cached(
        &self,
        organization_id: &str,
        model_id: &str,
        training_file: Option<&str>,
        validation_file: Option<&str>,
    ) -> Option<CreateContext> {
        let file = |id: Option<&str>| -> Option<Option<FileRow>> {
            match id {
                None => Some(None),
                Some(id) => fresh(&self.files, organization_id, id).map(Some),
            }
        };
        Some(CreateContext {
            model: Some(fresh(&self.models, organization_id, model_id)?),
            training_file: file(training_file)?,
            validation_file: file(validation_file)?,
        })
    }

    /// Forgets a file (deleted through this server).
    pub fn forget_file(&self, organization_id: &str, file_id: &str) {
        self.files
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(organization_id.to_string(), file_id.to_string()));
    }
}
