-- Keep the planner's statistics of the hot queue table fresh: after a burst of inserts, stale
-- statistics made the claim query scan and sort every queued job instead of using jobs_claim
-- (BENCHMARKS.md, control plane). Oban and River tune their job tables the same way.
alter table jobs set (
    autovacuum_analyze_scale_factor = 0.0,
    autovacuum_analyze_threshold = 200,
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 1000
);

-- The per-organisation cap on waiting jobs counts these on every create.
create index jobs_org_waiting on jobs (organization_id) where status in ('validating_files', 'queued');
