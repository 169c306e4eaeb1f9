-- tuna's schema. Conventions: migrations/README.md.
-- Ids are text with OpenAI-style prefixes (ftjob-, file-, ftevent-, ftckpt-, org-, key-);
-- every table also has a bigserial `seq` where lists need a stable order for cursor pagination.

create table organizations (
    organization_id text primary key,
    name            text not null,
    created_at      timestamptz not null default now()
);

create table api_keys (
    api_key_id      text primary key,
    organization_id text not null references organizations (organization_id),
    name            text not null default '',
    -- sha256 of the secret; the secret itself is shown once, when created.
    key_hash        text not null unique,
    -- first characters of the secret, to recognise a key in listings.
    key_prefix      text not null,
    is_admin        boolean not null default false,
    created_at      timestamptz not null default now(),
    last_used_at    timestamptz,
    revoked_at      timestamptz
);

create table files (
    file_id         text primary key,
    seq             bigserial unique,
    organization_id text not null references organizations (organization_id),
    filename        text not null,
    purpose         text not null,
    bytes           bigint not null,
    status          text not null check (status in ('uploaded', 'processed', 'error')),
    status_details  text,
    -- detected data format: messages, prompt_completion, text, text_label, csv, tsv, ...
    format          text,
    example_count   bigint,
    -- where the bytes are, relative to the file store.
    storage_key     text not null,
    sha256          text,
    created_at      timestamptz not null default now(),
    expires_at      timestamptz,
    deleted_at      timestamptz
);
create index files_org_seq on files (organization_id, seq) where deleted_at is null;

create table workers (
    worker_id         text primary key,
    hostname          text not null,
    -- 'cpu' or 'cuda'
    device_kind       text not null,
    gpu_name          text,
    gpu_memory_mb     bigint,
    labels            jsonb not null default '{}',
    started_at        timestamptz not null default now(),
    last_heartbeat_at timestamptz not null default now(),
    draining          boolean not null default false
);

create table jobs (
    job_id              text primary key,
    seq                 bigserial unique,
    organization_id     text not null references organizations (organization_id),
    status              text not null check (status in
                            ('validating_files', 'queued', 'running', 'paused', 'succeeded', 'failed', 'cancelled')),
    model               text not null,
    training_file       text,
    validation_file     text,
    -- the resolved job spec (tuna_core::spec::JobSpec) as JSON.
    spec                jsonb not null,
    suffix              text,
    seed                bigint not null,
    metadata            jsonb,
    integrations        jsonb,
    -- higher runs first.
    priority            integer not null default 0,
    -- what a worker must offer: device kind ('cpu', 'cuda' or null for any) and GPU memory.
    required_device     text check (required_device in ('cpu', 'cuda')),
    min_gpu_memory_mb   bigint,
    -- attempts of the job itself (failures count against max_attempts) and infrastructure
    -- retries (lost leases), counted apart.
    attempt             integer not null default 0,
    max_attempts        integer not null default 1,
    infra_retries       integer not null default 0,
    max_infra_retries   integer not null default 10,
    -- the lease: set while running, null otherwise.
    lease_owner         text references workers (worker_id) on delete set null,
    lease_token         uuid,
    lease_expires_at    timestamptz,
    attempted_at        timestamptz,
    cancel_requested_at timestamptz,
    pause_requested_at  timestamptz,
    -- latest checkpoint the job can resume from.
    checkpoint_step     bigint,
    checkpoint_uri      text,
    progress            jsonb,
    estimated_finish    timestamptz,
    fine_tuned_model    text,
    trained_tokens      bigint,
    result_files        jsonb not null default '[]',
    error               jsonb,
    idempotency_key     text,
    scheduled_at        timestamptz not null default now(),
    created_at          timestamptz not null default now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    updated_at          timestamptz not null default now(),
    constraint jobs_lease_iff_running check ((status = 'running') = (lease_token is not null)),
    constraint jobs_finished_iff_terminal check
        ((status in ('succeeded', 'failed', 'cancelled')) = (finished_at is not null))
);
create unique index jobs_idempotency on jobs (organization_id, idempotency_key) where idempotency_key is not null;
create index jobs_claim on jobs (priority desc, scheduled_at, seq) where status = 'queued';
create index jobs_lease_expiry on jobs (lease_expires_at) where status = 'running';
create index jobs_org_seq on jobs (organization_id, seq);
create index jobs_validating on jobs (seq) where status = 'validating_files';

create table job_events (
    event_id    text primary key,
    seq         bigserial unique,
    job_id      text not null references jobs (job_id) on delete cascade,
    created_at  timestamptz not null default now(),
    level       text not null check (level in ('info', 'warn', 'error')),
    message     text not null,
    data        jsonb,
    -- 'message' or 'metrics'
    type        text not null default 'message'
);
create index job_events_job_seq on job_events (job_id, seq);

create table checkpoints (
    checkpoint_id               text primary key,
    seq                         bigserial unique,
    job_id                      text not null references jobs (job_id) on delete cascade,
    step_number                 bigint not null,
    metrics                     jsonb not null default '{}',
    fine_tuned_model_checkpoint text not null,
    -- prefix of the checkpoint's files in the artifact store.
    artifact_prefix             text not null,
    created_at                  timestamptz not null default now(),
    unique (job_id, step_number)
);

-- Base models registered on the server (organization_id null: visible to all) and fine-tuned
-- models produced by jobs (owned by the job's organization).
create table models (
    model_id        text primary key,
    seq             bigserial unique,
    organization_id text references organizations (organization_id),
    kind            text not null check (kind in ('base', 'fine_tuned')),
    -- a directory (base models) or an artifact-store prefix (fine-tuned models).
    location        text not null,
    job_id          text references jobs (job_id) on delete set null,
    -- architecture summary read from config.json (family, layers, hidden size, ...).
    architecture    jsonb not null default '{}',
    created_at      timestamptz not null default now()
);

create or replace function tuna_touch_updated_at() returns trigger language plpgsql as $$
begin
    new.updated_at = now();
    return new;
end $$;
create trigger jobs_touch before update on jobs for each row execute function tuna_touch_updated_at();
