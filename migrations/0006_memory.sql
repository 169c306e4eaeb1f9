-- Will the job fit? (tuna_core::memory)
--
-- jobs.memory_estimate: the planner's estimate of the job's peak memory, made when the job is
-- created from the model's config.json and the job's knobs, one object per accelerator
-- ({"cpu": {...}, "cuda": {...}}, bytes by what holds them). Null for jobs created before this
-- migration or whose model config could not be read.
alter table jobs add column memory_estimate jsonb;

-- workers.memory_bytes: the memory a job may use on the worker (the GPU's for cuda workers, the
-- machine's for cpu ones, less when --memory-limit-mb says so). The API checks a new job
-- against the live workers' figures; null: unknown, nothing is checked against this worker.
alter table workers add column memory_bytes bigint;
