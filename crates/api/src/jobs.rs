//! `/v1/fine_tuning/jobs`: create (with `Idempotency-Key`), list, retrieve, cancel, pause,
//! resume, events and checkpoints. Status changes go through `tuna_db::queue`.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use rand::Rng;
use serde_json::Value;
use tuna_core::hf_config::HfConfig;
use tuna_core::ids;
use tuna_core::spec::{self, CreateRequest, Device, SpecPolicy};
use tuna_core::status::JobStatus;
use tuna_db::queue::{self, Inserted, NewJob};
use tuna_db::rows::{FileRow, JobRow, ModelRow};
use tuna_db::{checkpoints, events, jobs as db};

use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ApiResult};
use crate::objects::Rendered;
use crate::query::{page, page_with_ids, ListParams};
use crate::routes::Routes;
use crate::{objects, validate, AppState, Config};

pub fn routes(config: &Config) -> Routes {
    let limit = axum::extract::DefaultBodyLimit::max(config.max_json_bytes);
    const JOB: &str = "/v1/fine_tuning/jobs/{fine_tuning_job_id}";
    Routes::new()
        .get("/v1/fine_tuning/jobs", list)
        .post_with("/v1/fine_tuning/jobs", create, |r| r.layer(limit))
        .get(JOB, retrieve)
        .post(&format!("{JOB}/cancel"), cancel)
        .post(&format!("{JOB}/pause"), pause)
        .post(&format!("{JOB}/resume"), resume)
        .get(&format!("{JOB}/events"), list_events)
        .get(&format!("{JOB}/checkpoints"), list_checkpoints)
}

#[tracing::instrument(skip_all, fields(job_id = tracing::field::Empty))]
async fn create(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Rendered> {
    let key = idempotency_key(&headers)?;
    let row = create_job(&st, &caller, &body, key).await?;
    tracing::Span::current().record("job_id", row.job_id.as_str());
    Ok(Rendered::new(&objects::job(&row)))
}

async fn list(State(st): State<AppState>, caller: Caller, q: ListParams) -> ApiResult<Rendered> {
    let limit = q.limit(20, 100)?;
    let filter = db::JobFilter {
        metadata: q.metadata()?,
        status: q.status()?,
        model: q.model().map(str::to_string),
    };
    let rows = db::list_jobs(
        &st.db,
        &caller.organization_id,
        q.after(),
        limit + 1,
        &filter,
    )
    .await?;
    Ok(page(&rows, limit, objects::job))
}

async fn retrieve(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Rendered> {
    Ok(Rendered::new(&objects::job(
        &find(&st, &caller, &id).await?,
    )))
}

async fn cancel(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Rendered> {
    Ok(Rendered::new(&objects::job(
        &queue::request_cancel(&st.db, &caller.organization_id, &id).await?,
    )))
}

async fn pause(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Rendered> {
    Ok(Rendered::new(&objects::job(
        &queue::request_pause(&st.db, &caller.organization_id, &id).await?,
    )))
}

async fn resume(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Rendered> {
    Ok(Rendered::new(&objects::job(
        &queue::resume(&st.db, &caller.organization_id, &id).await?,
    )))
}

async fn list_events(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    q: ListParams,
) -> ApiResult<Rendered> {
    let job = find(&st, &caller, &id).await?;
    let limit = q.limit(20, 100)?;
    let rows = events::list_events(&st.db, &job.job_id, q.after(), limit + 1).await?;
    Ok(page(&rows, limit, objects::event))
}

async fn list_checkpoints(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    q: ListParams,
) -> ApiResult<Rendered> {
    let job = find(&st, &caller, &id).await?;
    let limit = q.limit(10, 100)?;
    let rows = checkpoints::list_checkpoints(&st.db, &job.job_id, q.after(), limit + 1).await?;
    Ok(page_with_ids(&rows, limit, objects::checkpoint, |c| {
        c.checkpoint_id.as_str()
    }))
}

/// A job of the caller's organisation, or 404.
pub async fn find(st: &AppState, caller: &Caller, job_id: &str) -> ApiResult<JobRow> {
    let mut conn = st.direct.get().await?;
    let row = db::get_job(conn.conn(), &caller.organization_id, job_id).await?;
    conn.release();
    row.ok_or_else(|| ApiError::not_found("fine-tuning job", job_id))
}

fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(s) if !s.trim().is_empty() && s.len() <= 255 => Ok(Some(s.trim().to_string())),
            _ => Err(ApiError::bad_request(
                "`Idempotency-Key` must be 1 to 255 visible ASCII characters",
                None,
            )),
        },
    }
}

/// Validates a create request, checks its model and files, and inserts the job (or finds the
/// one with the same idempotency key). The job is checked inline from the upload-time scans of
/// its files and comes back `queued` (or `failed`, with the reason); files without a stored
/// scan send it through `validating_files`, checked in the background.
pub async fn create_job(
    st: &AppState,
    caller: &Caller,
    body: &Value,
    key: Option<String>,
) -> ApiResult<JobRow> {
    let policy = SpecPolicy {
        allow_file_urls: st.config.allow_file_urls,
    };
    let seed = rand::thread_rng().gen_range(0..=2_147_483_647u64);
    if let Some(existing) = replay(st, caller, key.as_deref()).await? {
        return Ok(existing);
    }
    let mut req = spec::parse_create_request(body, &policy, seed)?;
    let mut conn = st.direct.get().await?;
    // The model and file rows may come from `st.inputs`; the insert re-checks that the files
    // are still live and, when one is gone, the create runs once more from fresh rows.
    let mut fresh_read = false;
    let inserted = loop {
        let ctx = st
            .inputs
            .context(
                conn.conn(),
                &caller.organization_id,
                &req.spec.model,
                req.spec.training_file.as_deref(),
                req.spec.validation_file.as_deref(),
                fresh_read,
            )
            .await?;
        fit_auto_to_model(&mut req, ctx.model.as_ref());
        for (id, row, param) in [
            (&req.spec.training_file, &ctx.training_file, "training_file"),
            (
                &req.spec.validation_file,
                &ctx.validation_file,
                "validation_file",
            ),
        ] {
            if let Some(id) = id {
                check_input_file(row.as_ref(), id, param)?;
            }
        }
        st.pending
            .admit(&st.db, &caller.organization_id, st.config.max_pending_jobs)
            .await?;
        let hf = st.fit.config(ctx.model.as_ref()).await;
        let new = new_job(caller, &req, key.clone(), hf.as_deref())?;
        match validate::check_inline(st, &caller.organization_id, &req.spec, &ctx, hf.as_deref())
            .await?
        {
            Some(outcome) => match queue::insert_checked_job(conn.conn(), &new, &outcome).await? {
                Some(inserted) => break inserted,
                None if !fresh_read => fresh_read = true,
                None => {
                    return Err(ApiError::bad_request_code(
                        "a file of this job was deleted while the job was being created",
                        Some("training_file"),
                        "invalid_file",
                    ))
                }
            },
            None => {
                let inserted = queue::insert_job(&st.db, &new).await?;
                if let Inserted::Created(row) = &inserted {
                    validate::spawn(st.clone(), row.clone());
                }
                break inserted;
            }
        }
    };
    conn.release();
    match inserted {
        Inserted::Created(row) => {
            if matches!(row.status, JobStatus::Queued | JobStatus::ValidatingFiles) {
                st.pending.created(&caller.organization_id);
            }
            Ok(row)
        }
        Inserted::Existing(row) => Ok(row),
    }
}

/// The job an earlier request with the same idempotency key created, if any.
async fn replay(st: &AppState, caller: &Caller, key: Option<&str>) -> ApiResult<Option<JobRow>> {
    match key {
        Some(key) => Ok(db::by_idempotency_key(&st.db, &caller.organization_id, key).await?),
        None => Ok(None),
    }
}

fn check_input_file(file: Option<&FileRow>, file_id: &str, param: &str) -> ApiResult<()> {
    let file = file.ok_or_else(|| {
        ApiError::bad_request_code(
            format!("invalid {param}: no file '{file_id}'"),
            Some(param),
            "invalid_file",
        )
    })?;
    if file.status != "processed" {
        return Err(ApiError::bad_request_code(
            format!(
                "invalid {param}: file '{file_id}' has status '{}': {}",
                file.status,
                file.status_details.as_deref().unwrap_or_default()
            ),
            Some(param),
            "invalid_file",
        ));
    }
    if file.purpose != "fine-tune" {
        return Err(ApiError::bad_request_code(
            format!(
                "invalid {param}: file '{file_id}' was uploaded with purpose '{}', not 'fine-tune'",
                file.purpose
            ),
            Some(param),
            "invalid_file",
        ));
    }
    Ok(())
}

/// Resolves "auto" knobs that depend on the model: `max_seq_length` is capped at the model's
/// context length when the request left it to the server.
fn fit_auto_to_model(req: &mut CreateRequest, model: Option<&ModelRow>) {
    if req.max_seq_length_given {
        return;
    }
    let Some(ctx) = model
        .and_then(|m| m.architecture.get("context_length"))
        .and_then(Value::as_u64)
    else {
        return;
    };
    if ctx > 0 && u64::from(req.spec.max_seq_length) > ctx {
        req.spec.max_seq_length = ctx.min(u64::from(u32::MAX)) as u32;
    }
}

fn new_job(
    caller: &Caller,
    req: &CreateRequest,
    key: Option<String>,
    hf: Option<&HfConfig>,
) -> ApiResult<NewJob> {
    let s = &req.spec;
    Ok(NewJob {
        job_id: ids::new_id(ids::JOB),
        organization_id: caller.organization_id.clone(),
        model: s.model.clone(),
        training_file: s.training_file.clone(),
        validation_file: s.validation_file.clone(),
        spec: serde_json::to_value(s)
            .map_err(|e| ApiError::Internal(format!("serialising the job spec: {e}")))?,
        suffix: req.suffix.clone(),
        seed: s.seed as i64,
        metadata: req.metadata.clone().map(Value::Object),
        integrations: req.integrations.clone(),
        priority: req.priority,
        required_device: match s.device {
            Device::Cuda => Some("cuda".into()),
            Device::Cpu => Some("cpu".into()),
            Device::Auto => None,
        },
        min_gpu_memory_mb: None,
        idempotency_key: key,
        max_attempts: 1,
        memory_estimate: crate::fit::estimate_json(hf, s),
    })
}
