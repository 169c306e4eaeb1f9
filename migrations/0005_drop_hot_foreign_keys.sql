-- Creating a job checked two foreign keys: the job's organisation and, for each of its two
-- creation events, the job. Each check is a query of its own run by a trigger at the end of
-- the statement, and each takes a share lock on the referenced row: on the organisation's
-- row, every concurrent create of that organisation piles up in one multixact. Together they
-- were about a tenth of PostgreSQL's work per create (BENCHMARKS.md, control plane).
--
-- Both references hold by construction instead: a job's organisation is the one of the API
-- key that created it (api_keys keeps its foreign key), organisations and jobs are never
-- deleted, and events are only written by `tuna_db::queue` for a job it just inserted or
-- holds the lease of. crates/db/tests/queue.rs checks that no event or job is left dangling.
alter table jobs drop constraint jobs_organization_id_fkey;
alter table job_events drop constraint job_events_job_id_fkey;
