//! The `files` table: uploaded files of an organisation (bytes live in the file store).

use sqlx::PgPool;

use crate::rows::FileRow;
use crate::Result;

/// A file row to insert (status `uploaded` until checked).
#[derive(Debug, Clone)]
pub struct NewFile {
    pub file_id: String,
    pub organization_id: String,
    pub filename: String,
    pub purpose: String,
    pub bytes: i64,
    pub storage_key: String,
    pub sha256: String,
}

/// The outcome of checking an upload.
#[derive(Debug, Clone)]
pub struct FileCheck {
    /// `processed` or `error`.
    pub status: String,
    pub status_details: Option<String>,
    pub format: Option<String>,
    pub example_count: Option<i64>,
    /// Distinct labels (text+label data only).
    pub label_count: Option<i32>,
    /// Text+label data: the first line whose label is not a number.
    pub non_numeric_label_line: Option<i64>,
}

/// Sort order of a listing by creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Asc,
    Desc,
}

pub async fn insert_file(pool: &PgPool, f: &NewFile) -> Result<FileRow> {
    Ok(sqlx::query_as(
        "insert into files (file_id, organization_id, filename, purpose, bytes, status, storage_key, sha256) \
         values ($1, $2, $3, $4, $5, 'uploaded', $6, $7) returning *",
    )
    .bind(&f.file_id)
    .bind(&f.organization_id)
    .bind(&f.filename)
    .bind(&f.purpose)
    .bind(f.bytes)
    .bind(&f.storage_key)
    .bind(&f.sha256)
    .fetch_one(pool)
    .await?)
}

/// Stores the result of checking a file.
pub async fn set_check(pool: &PgPool, file_id: &str, check: &FileCheck) -> Result<FileRow> {
    Ok(sqlx::query_as(
        "update files set status = $2, status_details = $3, format = $4, example_count = $5, label_count = $6, non_numeric_label_line = $7 where file_id = $1 returning *",
    )
    .bind(file_id)
    .bind(&check.status)
    .bind(&check.status_details)
    .bind(&check.format)
    .bind(check.example_count)
    .bind(check.label_count)
    .bind(check.non_numeric_label_line)
    .fetch_one(pool)
    .await?)
}

/// A live (not deleted) file of the organisation.
pub async fn get_file(
    pool: &PgPool,
    organization_id: &str,
    file_id: &str,
) -> Result<Option<FileRow>> {
    Ok(sqlx::query_as(
        "select * from files where file_id = $1 and organization_id = $2 and deleted_at is null",
    )
    .bind(file_id)
    .bind(organization_id)
    .fetch_optional(pool)
    .await?)
}

/// Up to `limit` live files of the organisation in creation order, after the file `after`
/// (in the same order). An unknown `after` gives an empty page.
pub async fn list_files(
    pool: &PgPool,
    organization_id: &str,
    purpose: Option<&str>,
    after: Option<&str>,
    limit: i64,
    order: Order,
) -> Result<Vec<FileRow>> {
    let (cmp, dir) = match order {
        Order::Asc => (">", "asc"),
        Order::Desc => ("<", "desc"),
    };
    let sql = format!(
        "select * from files where organization_id = $1 and deleted_at is null \
           and ($2::text is null or purpose = $2) \
           and ($3::text is null or seq {cmp} (select seq from files where file_id = $3 and organization_id = $1)) \
         order by seq {dir} limit $4"
    );
    Ok(sqlx::query_as(&sql)
        .bind(organization_id)
        .bind(purpose)
        .bind(after)
        .bind(limit)
        .fetch_all(pool)
        .await?)
}

/// Marks a file deleted; returns it, or `None` when there is no such live file.
pub async fn delete_file(
    pool: &PgPool,
    organization_id: &str,
    file_id: &str,
) -> Result<Option<FileRow>> {
    Ok(sqlx::query_as(
        "update files set deleted_at = now() where file_id = $1 and organization_id = $2 and deleted_at is null returning *",
    )
    .bind(file_id)
    .bind(organization_id)
    .fetch_optional(pool)
    .await?)
}
