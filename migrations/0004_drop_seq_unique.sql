-- `seq` comes from a sequence, so it is unique without an index of its own; every query that
-- orders or pages by it is scoped to one job or one organisation and uses (job_id, seq) or
-- (organization_id, seq). Creating a job wrote an entry into both unique indexes for the job
-- and for each of its events (BENCHMARKS.md, control plane).
alter table jobs drop constraint jobs_seq_key;
alter table job_events drop constraint job_events_seq_key;
