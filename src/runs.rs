//! The published-run store: what a batch run leaves under the storage root
//! and how a reader takes it — the manifest types, `views/CURRENT`, and
//! verified reads of a run's states. The batch layer writes runs through
//! it; serving, the cluster's driver and time travel read through it,
//! without the batch engines.
//!
//! ```text
//!  views/CURRENT                   the published manifest (one run, one H), replaced whole
//!  views/runs/<run>.json           every run's manifest, created once
//!  views/<view>/<run>/states.parquet, rows.tsv   checked against the manifest's
//!                                                sizes and crc32c on every read
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::chunk::Coverage;
use crate::master::MasterDataset;
use crate::storage::{Storage, StorageError, Version};
use crate::view::{View, ViewError};

/// The published manifest's object.
pub const CURRENT: &str = "views/CURRENT";

/// Why a published run cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RunsError {
    #[error("batch view file {path} is corrupt: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("the published manifest {path} is unreadable: {detail}")]
    BadManifest { path: String, detail: String },
    #[error("{0}")]
    View(#[from] ViewError),
    #[error("{0}")]
    Storage(#[from] StorageError),
}

/// The runs of one storage root.
pub struct RunStore {
    storage: Storage,
    master: Arc<MasterDataset>,
}

impl RunStore {
    /// The run store of `storage`, whose manifests must fit `master`'s
    /// partitions.
    pub fn new(storage: Storage, master: Arc<MasterDataset>) -> RunStore {
        RunStore { storage, master }
    }

    /// The published manifest, if any.
    pub async fn current(&self) -> Result<Option<Manifest>, RunsError> {
        let Some(bytes) = self.storage.get(CURRENT).await? else {
            return Ok(None);
        };
        self.parse_manifest(&bytes)
            .map(Some)
            .map_err(|detail| RunsError::BadManifest {
                path: CURRENT.into(),
                detail,
            })
    }

    /// The published manifest (`None` if absent or unusable) and the
    /// version of `CURRENT` it was read at, for the compare-and-swap publish.
    pub(crate) async fn current_versioned(&self) -> Result<(Option<Manifest>, Version), RunsError> {
        let (bytes, version) = self.storage.get_versioned(CURRENT).await?;
        let m = match bytes {
            Some(b) => self.parse_manifest(&b).ok(),
            None => None,
        };
        Ok((m, version))
    }

    /// The version of `CURRENT` now: a node that does not drive polls it to
    /// learn of a new publish.
    pub async fn current_version(&self) -> Result<Version, RunsError> {
        Ok(self.storage.version(CURRENT).await?)
    }

    /// A manifest of this stream, or why it is unusable.
    pub(crate) fn parse_manifest(&self, bytes: &[u8]) -> Result<Manifest, String> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let partitions = self.master.partitions() as usize;
        if m.h.partitions() as usize > partitions {
            // A stream never loses partitions (a topic cannot shrink, a
            // closed Kinesis shard stays in the registry): a manifest of more
            // is not this stream's, as unusable as a corrupt one. Fewer is a
            // run from before the stream gained some.
            return Err(format!(
                "it covers {} partitions, the stream has {partitions}",
                m.h.partitions()
            ));
        }
        Ok(m)
    }

    /// Reads a file of a run and checks it against its entry.
    pub(crate) async fn read_checked(&self, entry: &FileEntry) -> Result<Bytes, RunsError> {
        let corrupt = |detail: String| RunsError::Corrupt {
            path: entry.path.clone(),
            detail,
        };
        let bytes = self
            .storage
            .get(&entry.path)
            .await?
            .ok_or_else(|| corrupt("missing".into()))?;
        if bytes.len() as u64 != entry.bytes {
            return Err(corrupt(format!(
                "{} bytes, the manifest says {}",
                bytes.len(),
                entry.bytes
            )));
        }
        let crc = crc_hex(&bytes);
        if crc != entry.crc32c {
            return Err(corrupt(format!(
                "crc32c {crc}, the manifest says {}",
                entry.crc32c
            )));
        }
        Ok(bytes)
    }

    /// The published states of `view`, verified: never corrupt rows.
    pub async fn read_states(
        &self,
        manifest: &Manifest,
        view: &View,
    ) -> Result<RecordBatch, RunsError> {
        let entry = manifest
            .views
            .get(view.name())
            .ok_or_else(|| RunsError::Corrupt {
                path: CURRENT.into(),
                detail: format!("the published run has no view `{}`", view.name()),
            })?;
        self.read_entry_states(entry, view).await
    }

    /// The states of one view entry, verified against the view's
    /// fingerprint and the entry's checksum.
    pub(crate) async fn read_entry_states(
        &self,
        entry: &ViewEntry,
        view: &View,
    ) -> Result<RecordBatch, RunsError> {
        if entry.fingerprint != view.fingerprint() {
            return Err(RunsError::View(ViewError::StateMismatch {
                view: view.name().to_string(),
                detail: format!(
                    "published for fingerprint {}, the view's is {}",
                    entry.fingerprint,
                    view.fingerprint()
                ),
            }));
        }
        let bytes = self.read_checked(&entry.states).await?;
        Ok(view.states_from_parquet(bytes)?)
    }
}

/// A file of a run, with what it must be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path under the storage root.
    pub path: String,
    pub bytes: u64,
    /// crc32c of the whole file, hex.
    pub crc32c: String,
}

/// One view of a published run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewEntry {
    pub fingerprint: String,
    /// The run that computed these files (older than the manifest's when reused).
    pub run: u64,
    pub states: FileEntry,
    /// The finalized rows as TSV, for views of at most `[batch]
    /// tsv_max_rows` groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tsv: Option<FileEntry>,
    /// State rows (groups) and finalized rows.
    pub groups: u64,
    pub rows: u64,
    pub duration_ms: u64,
    /// Events left out because the view's expressions fail on them (listed
    /// in the dead-letter store's `views/<view>.ndjson`).
    #[serde(default)]
    pub excluded: u64,
    /// Full or incremental, and what the run read for the view.
    #[serde(default)]
    pub lineage: Lineage,
    /// Why the view's rows could not be finalized (an expression over its
    /// aggregates fails on some group, as a division by zero does). Its
    /// states are published all the same: a read of the whole view
    /// finalizes them and reports the same failure, and the other views'
    /// runs go on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unfinalized: Option<String>,
}

/// What `views/CURRENT` holds: one run of every view at one coverage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(flatten)]
    pub info: RunInfo,
    pub views: BTreeMap<String, ViewEntry>,
    /// The definitions of the run's views, in the order they are served:
    /// every node of a cluster serves these (a follower compiles and adopts
    /// them, whatever its own config says). Absent from runs of older
    /// versions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub definitions: Vec<crate::view::ViewConfig>,
}

impl std::ops::Deref for Manifest {
    type Target = RunInfo;

    fn deref(&self) -> &RunInfo {
        &self.info
    }
}

/// A run: what it read and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    pub run: u64,
    /// The master dataset version the run read.
    pub table_version: i64,
    /// Coverage: the run holds exactly the events with offset < h[p] of each partition p.
    pub h: Coverage,
    /// Events the run read.
    pub events: u64,
    /// Rollup time (ms since the epoch).
    pub as_of_ms: i64,
    pub started_ms: i64,
    pub duration_ms: u64,
    pub engine: String,
    /// Which engine computed the run, and its stages' times.
    #[serde(default)]
    pub compute: Compute,
    /// How the run computed its views: how many in full, how many
    /// incrementally, how many it kept from an earlier run.
    #[serde(default)]
    pub kinds: RunKinds,
    /// The run `CURRENT` named when this run replaced it (0: none), so the
    /// published runs are a chain from `CURRENT` and a run that was claimed
    /// but never published is never answered for. `None` in manifests
    /// written before the chain was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<u64>,
}

/// What [`RunInfo::kinds`] counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunKinds {
    pub full: u32,
    pub incremental: u32,
    pub kept: u32,
    /// Events the run read, over all its views' scans.
    pub events_read: u64,
}

impl RunKinds {
    pub(crate) fn of(run: u64, views: &BTreeMap<String, ViewEntry>) -> RunKinds {
        let mut k = RunKinds::default();
        for e in views.values() {
            if e.run != run {
                k.kept += 1;
                continue;
            }
            match e.lineage.kind {
                RunKind::Full => k.full += 1,
                RunKind::Incremental => k.incremental += 1,
            }
            k.events_read += e.lineage.events;
        }
        k
    }
}

impl std::fmt::Display for RunKinds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.incremental > 0 {
            parts.push(format!("{} incremental", self.incremental));
        }
        if self.full > 0 {
            parts.push(format!("{} full", self.full));
        }
        if self.kept > 0 {
            parts.push(format!("{} kept", self.kept));
        }
        write!(
            f,
            "{} (read {} events)",
            parts.join(", "),
            crate::human::group(self.events_read)
        )
    }
}

pub(crate) fn crc_hex(bytes: &[u8]) -> String {
    format!("{:08x}", crc32c::crc32c(bytes))
}

/// How a view's states of a run were computed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    /// From every file of the master dataset.
    #[default]
    Full,
    /// The base run's states merged with the files added since.
    Incremental,
}

impl std::fmt::Display for RunKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunKind::Full => "full",
            RunKind::Incremental => "incremental",
        })
    }
}

/// How a view's published states came to be, in its run's manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    pub kind: RunKind,
    /// Why a full run was full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The run whose states an incremental run merged into…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_run: Option<u64>,
    /// …and that run's coverage: an incremental run added exactly the
    /// events `[from[p], h[p])` of each partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Coverage>,
    /// Master dataset files and events this run read for the view.
    pub files: u64,
    pub events: u64,
    /// The full recompute this chain of runs started from, and when it started.
    pub full_run: u64,
    pub full_started_ms: i64,
    /// Incremental runs since that full recompute.
    pub since_full: u32,
}

/// Which engine computed a run, and how long each stage took (summed over
/// the run's views, in the order the stages first ran).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compute {
    /// `local` or `ballista`; empty in runs of versions that did not say.
    #[serde(default)]
    pub engine: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    #[serde(default)]
    pub stages: Vec<StageTime>,
}

/// One stage of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageTime {
    pub stage: String,
    pub ms: u64,
}
