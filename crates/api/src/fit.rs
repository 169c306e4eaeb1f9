//! Will the job fit? The create-time half of the memory planner (`tuna_core::memory`).
//!
//! When a job is created, its estimate on either accelerator is stored with it (the job
//! object's `memory_estimate`), and it is checked against the live workers: when some worker
//! said how much memory a job may use there (`workers.memory_bytes`) and the job fits none of
//! those the job may go to (its `device`), it fails at validation with `insufficient_memory`,
//! saying what it needs, what the largest of them has and what would fit. With no such worker
//! nothing is checked here: the worker that claims the job checks it against its own device
//! before training (`tuna_worker::job`), the other half.
//!
//! Both inputs are remembered for [`TTL`], as `inputs::InputCache` remembers rows: a model's
//! parsed `config.json` (by its directory) and the live workers' figures, so that a create
//! reads neither a file nor another row in the common case.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tuna_core::hf_config::HfConfig;
use tuna_core::memory::{self, Accelerator};
use tuna_core::spec::{Device, JobSpec};
use tuna_db::queue::{self, JobError, WorkerCapacity};
use tuna_db::rows::ModelRow;
use tuna_db::PgPool;

use crate::error::ApiError;

/// How long a remembered config or worker list is used before it is read again.
pub const TTL: Duration = Duration::from_secs(5);
/// A worker not heard from for this long is not counted (a working one heartbeats every few
/// seconds, busy or idle).
pub const LIVE_WITHIN: Duration = Duration::from_secs(60);
/// Configs beyond this are dropped all at once (a bound on memory).
const MAX_CONFIGS: usize = 1_000;

type Workers = (Arc<Vec<WorkerCapacity>>, Instant);
/// A model directory's config (`None`: none that parses) and when it was read.
type Config = (Option<Arc<HfConfig>>, Instant);

#[derive(Debug, Default)]
pub struct FitCache {
    configs: RwLock<HashMap<String, Config>>,
    workers: RwLock<Option<Workers>>,
}

impl FitCache {
    /// The model's parsed `config.json`, `None` when its directory has none that parses (a
    /// model in the artifact store, or a config of another version).
    pub async fn config(&self, model: Option<&ModelRow>) -> Option<Arc<HfConfig>> {
        let dir = &model?.location;
        {
            let map = self.configs.read().unwrap_or_else(|e| e.into_inner());
            if let Some((hf, at)) = map.get(dir) {
                if at.elapsed() < TTL {
                    return hf.clone();
                }
            }
        }
        let hf = read_config(Path::new(dir)).await.map(Arc::new);
        let mut map = self.configs.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_CONFIGS {
            map.clear();
        }
        map.insert(dir.clone(), (hf.clone(), Instant::now()));
        hf
    }

    /// The live workers that said how much memory a job may use on them.
    pub async fn workers(&self, pool: &PgPool) -> Result<Arc<Vec<WorkerCapacity>>, ApiError> {
        {
            let cached = self.workers.read().unwrap_or_else(|e| e.into_inner());
            if let Some((list, at)) = cached.as_ref() {
                if at.elapsed() < TTL {
                    return Ok(list.clone());
                }
            }
        }
        let list = Arc::new(queue::worker_capacities(pool, LIVE_WITHIN).await?);
        *self.workers.write().unwrap_or_else(|e| e.into_inner()) =
            Some((list.clone(), Instant::now()));
        Ok(list)
    }
}

pub async fn read_config(dir: &Path) -> Option<HfConfig> {
    let text = tokio::fs::read_to_string(dir.join("config.json"))
        .await
        .ok()?;
    HfConfig::parse(&text).ok()
}

/// The job's estimates as the job row stores them.
pub fn estimate_json(hf: Option<&HfConfig>, spec: &JobSpec) -> Option<serde_json::Value> {
    serde_json::to_value(memory::estimates(hf?, spec)).ok()
}

/// `Err` when some live worker the job may go to said what it has and the job fits none.
pub fn check(hf: &HfConfig, spec: &JobSpec, workers: &[WorkerCapacity]) -> Result<(), JobError> {
    let candidates: Vec<(&WorkerCapacity, Accelerator, u64)> = workers
        .iter()
        .filter_map(|w| {
            let accelerator = match w.device_kind.as_str() {
                "cuda" => Accelerator::Cuda,
                _ => Accelerator::Cpu,
            };
            let allowed = match spec.device {
                Device::Auto => true,
                Device::Cpu => accelerator == Accelerator::Cpu,
                Device::Cuda => accelerator == Accelerator::Cuda,
            };
            allowed.then_some((w, accelerator, w.memory_bytes.max(0) as u64))
        })
        .collect();
    // Under `batch_size: "auto"` the worker may split the micro-batches to fit.
    let fits = |&(_, accelerator, bytes): &(&WorkerCapacity, Accelerator, u64)| {
        memory::fit(hf, spec, accelerator, bytes).is_ok()
    };
    if candidates.is_empty() || candidates.iter().any(fits) {
        return Ok(());
    }
    // Against the worker with the most memory (a GPU before a CPU with as much).
    let &(w, accelerator, bytes) = candidates
        .iter()
        .max_by_key(|(_, a, b)| (*b, *a == Accelerator::Cuda))
        .expect("candidates is not empty");
    let e = memory::estimate(hf, spec, accelerator);
    let kind = match accelerator {
        Accelerator::Cuda => w.gpu_name.clone().unwrap_or_else(|| "GPU".into()),
        Accelerator::Cpu => "CPU".into(),
    };
    let of = if candidates.len() == 1 {
        "the only live worker".to_string()
    } else {
        format!("the most memory of the {} live workers", candidates.len())
    };
    let device = format!("{kind} of worker {} ({of})", w.worker_id);
    Err(JobError {
        code: "insufficient_memory".into(),
        message: memory::does_not_fit(hf, spec, &e, bytes, &device),
        param: Some("batch_size".into()),
    })
}
