//! Where a batch run computes each view's states: in this process, or on an
//! Apache DataFusion Ballista cluster.
//!
//! ```text
//!  local     files ─▶ k size-balanced groups ─▶ states plan per group (one task per core) ─▶ merge
//!  ballista  files ─▶ one plan of DataFusion's built-in nodes ─▶ scheduler ─▶ executors:
//!              stage 1  Parquet scan → Partial          (one task per file group)
//!              stage 2  hash shuffle by the group keys → PartialReduce → one partition
//!            ─▶ Arrow Flight ─▶ states
//! ```
//!
//! Either way the states come back here: rollup, finalize, the files and the
//! publish are the batch layer's, identical for both engines. What each run
//! cost, stage by stage, is its [`Compute`], shown by `status`.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{BatchConfig, EngineKind};
use crate::runs::{Compute, StageTime};
use crate::view::View;

/// Why the cluster could not compute a view's states.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the Ballista scheduler at {scheduler} is unreachable")]
    Unreachable { scheduler: String, detail: String },
    #[error("the Ballista scheduler at {scheduler} did not accept view `{view}`'s job")]
    Rejected {
        scheduler: String,
        view: String,
        detail: String,
    },
    #[error("Ballista job {job} (view `{view}`) failed")]
    JobFailed {
        job: String,
        view: String,
        detail: String,
    },
    #[error("could not fetch view `{view}`'s states from executor {executor}")]
    Fetch {
        view: String,
        executor: String,
        detail: String,
    },
    #[error("view `{view}` cannot run on a stock Ballista cluster")]
    Refused { view: String, detail: String },
    #[error("invalid Ballista setting")]
    Config(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("could not start the Ballista {role}")]
    Start { role: &'static str, detail: String },
}

crate::explained!(EngineError);

impl crate::error::Explain for EngineError {
    fn detail(&self) -> Option<String> {
        match self {
            EngineError::Unreachable { detail, .. }
            | EngineError::Rejected { detail, .. }
            | EngineError::JobFailed { detail, .. }
            | EngineError::Fetch { detail, .. }
            | EngineError::Refused { detail, .. }
            | EngineError::Start { detail, .. } => Some(detail.clone()),
            EngineError::Config(_) => None,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            EngineError::Unreachable { .. } => Some(
                "start one with `lambdaflow ballista scheduler`; the published views stay as they are until a run succeeds".into(),
            ),
            EngineError::JobFailed { .. } | EngineError::Fetch { .. } => Some(
                "the run published nothing; the next run starts afresh (see the scheduler's and executors' logs)".into(),
            ),
            EngineError::Refused { .. } => Some(
                "Ballista executors run DataFusion's built-in operators and functions only; rewrite the view without what the detail names, or use engine = \"local\"".into(),
            ),
            _ => None,
        }
    }
}

/// The engine a batch layer computes with.
#[derive(Clone, Default)]
pub enum Engine {
    /// DataFusion in this process, one task per core.
    #[default]
    Local,
    /// An Apache DataFusion Ballista cluster.
    #[cfg(feature = "ballista")]
    Ballista(Arc<super::ballista::Cluster>),
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Engine {
    /// The engine `[batch]` asks for.
    pub fn from_config(config: &BatchConfig) -> Result<Engine, EngineError> {
        match config.engine {
            EngineKind::Local => Ok(Engine::Local),
            #[cfg(feature = "ballista")]
            EngineKind::Ballista => Ok(Engine::Ballista(Arc::new(super::ballista::Cluster::new(
                config,
            )?))),
            #[cfg(not(feature = "ballista"))]
            EngineKind::Ballista => Err(EngineError::Config(
                "this lambdaflow was built without the `ballista` feature".into(),
            )),
        }
    }

    /// `local` or `ballista`.
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Local => "local",
            #[cfg(feature = "ballista")]
            Engine::Ballista(_) => "ballista",
        }
    }

    /// The Ballista scheduler, as configured.
    pub fn scheduler(&self) -> Option<String> {
        match self {
            Engine::Local => None,
            #[cfg(feature = "ballista")]
            Engine::Ballista(c) => Some(c.scheduler().to_string()),
        }
    }

    pub fn describe(&self) -> String {
        match self.scheduler() {
            Some(s) => format!("{} at {s}", self.name()),
            None => self.name().to_string(),
        }
    }

    /// Refuses, before the first run, a view whose plan the engine cannot run.
    pub fn check(&self, views: &[Arc<View>], store_url: &str) -> Result<(), EngineError> {
        let _ = (views, store_url);
        match self {
            Engine::Local => Ok(()),
            #[cfg(feature = "ballista")]
            Engine::Ballista(c) => views.iter().try_for_each(|v| c.check(v, store_url)),
        }
    }

    /// A record of a run on this engine, stages to be added as they end.
    pub fn compute(&self) -> Compute {
        Compute {
            engine: self.name().to_string(),
            scheduler: self.scheduler(),
            stages: Vec::new(),
        }
    }
}

impl Compute {
    /// Adds `took` to `stage` (a new stage goes last).
    pub fn add(&mut self, stage: &str, took: Duration) {
        let ms = took.as_millis() as u64;
        match self.stages.iter_mut().find(|s| s.stage == stage) {
            Some(s) => s.ms += ms,
            None => self.stages.push(StageTime {
                stage: stage.to_string(),
                ms,
            }),
        }
    }

    /// "scan+states 812 ms, rollup+finalize 40 ms, …".
    pub fn summary(&self) -> String {
        self.stages
            .iter()
            .map(|s| format!("{} {} ms", s.stage, s.ms))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_sum_by_name_in_first_seen_order() {
        let mut c = Engine::Local.compute();
        c.add("plan", Duration::from_millis(3));
        c.add("cluster", Duration::from_millis(10));
        c.add("plan", Duration::from_millis(2));
        assert_eq!(c.engine, "local");
        assert_eq!(c.summary(), "plan 5 ms, cluster 10 ms");
    }
}
