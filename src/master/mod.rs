//! The master dataset: every accepted event, immutable and append-only, as a
//! Delta Lake table (the paper's S3 master dataset), readable as it stands by
//! Spark, DuckDB or Trino.
//!
//! ```text
//!  log partition p: ──[start,end)──▶ part-p-start-end.parquet ──▶ Delta commit
//!                                     (schema columns +            Add(file)
//!                                      _partition, _offset,        Txn(app "lambdaflow-p<p>",
//!                                      _ingest_time)                   version = end)
//! ```
//!
//! Each chunk of a partition is one Parquet file, committed with a Delta
//! application transaction whose version is the chunk's end offset. Committed
//! chunks of a partition are contiguous from offset 0, so a table version's
//! coverage is one number per partition, `H[p]` — the txn version of its app
//! id. A chunk replayed after a crash is recognized by that version and not
//! committed twice; its file name is a function of (partition, start, end), so
//! a rewrite after a crash between the write and the commit replaces it.

pub mod archiver;
pub mod evolve;
pub mod files;

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Array, Int64Array, TimestampMicrosecondArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, Encoding};
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::parquet::schema::types::ColumnPath;
use deltalake::DeltaTable;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add, DataType as DeltaType, StructField, Transaction};
use deltalake::protocol::{DeltaOperation, SaveMode};
use serde::{Deserialize, Serialize};

use crate::chunk::{self, ChunkRange, Coverage};
use crate::schema::{EventSchema, FieldType};
use crate::storage::{Storage, StorageError};
use crate::stream::source::{Source, SourceBatch, read_exact};

/// Columns lambdaflow adds to every event in the master dataset.
use crate::chunk::{OFFSET_COLUMN, PARTITION_COLUMN};
pub const INGEST_TIME_COLUMN: &str = "_ingest_time";
/// With `[schema] key`: true for a row whose key its partition saw within
/// the horizon (`crate::keys`): kept, as everything that arrived is, and
/// counted by no view. Null in files written before the key was set.
pub const DUPLICATE_COLUMN: &str = "_duplicate";

/// Where the table lives under the storage root.
pub const TABLE_DIR: &str = "master";

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("master dataset: could not {op}")]
    Delta {
        op: &'static str,
        #[source]
        source: deltalake::DeltaTableError,
    },
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("master dataset: what must be durable before a commit could not be written: {detail}")]
    BeforeCommit { detail: String },
    #[error("master dataset: could not encode a chunk as Parquet")]
    Encode(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the schema cannot {change} field `{field}` of the master dataset")]
    SchemaRefused {
        field: String,
        change: &'static str,
        detail: String,
        hint: String,
    },
    #[error(
        "the master dataset holds events of partition {found}, but the configuration has {configured} partitions"
    )]
    PartitionMismatch { found: u32, configured: u32 },
    #[error(
        "the master dataset holds commits of driver lease term {table_term}; this node drives under the older term {term} and commits nothing more"
    )]
    Fenced { term: u64, table_term: u64 },
    #[error(
        "chunk [{start}, {end}) of partition {partition} does not follow the master dataset, which covers partition {partition} up to {committed}"
    )]
    Gap {
        partition: u32,
        start: u64,
        end: u64,
        committed: u64,
    },
    #[error("{chunk} was read back with {got} events{}", if *.out_of_range { " (some outside its range)" } else { "" })]
    ShortChunk {
        chunk: ChunkRange,
        got: u64,
        out_of_range: bool,
    },
    #[error(
        "master dataset file {path} is corrupt: its CRC-32C is {found:08x}, it was written as {expected:08x}"
    )]
    Corrupt {
        path: String,
        partition: u32,
        start: u64,
        end: u64,
        expected: u32,
        found: u32,
    },
    #[error("master dataset file {path} is missing")]
    Missing {
        path: String,
        /// From its lambdaflow name (none for a file another engine wrote).
        chunk: Option<(u32, u64, u64, u32)>,
    },
    #[error(
        "master dataset file {path} is {what}, and the log no longer holds its events (partition {partition}, offsets {start}..{end})"
    )]
    Unrepairable {
        path: String,
        what: &'static str,
        partition: u32,
        start: u64,
        end: u64,
    },
    #[error(
        "no file of the master dataset holds partition {partition}'s offsets {start}..{end}, and the log no longer holds them"
    )]
    LostForGood {
        partition: u32,
        start: u64,
        end: u64,
    },
    #[error(
        "no file of the master dataset holds partition {partition}'s offsets {start}..{end}, which its coverage includes"
    )]
    Lost {
        partition: u32,
        start: u64,
        end: u64,
    },
}

crate::explained!(MasterError);

impl crate::error::Explain for MasterError {
    fn detail(&self) -> Option<String> {
        match self {
            MasterError::Corrupt {
                partition,
                start,
                end,
                ..
            } => Some(format!("partition {partition}, offsets {start}..{end}")),
            MasterError::SchemaRefused { detail, .. } => Some(detail.clone()),
            _ => None,
        }
    }

    fn hint(&self) -> Option<String> {
        Some(match self {
            MasterError::SchemaRefused { hint, .. } => hint.clone(),
            MasterError::PartitionMismatch { .. } => "the partition count of an existing data directory cannot change; set stream.partitions to what it was, or use a new data directory".into(),
            MasterError::Corrupt { .. } => "lambdaflow rewrites it from the log while the log still holds those offsets; otherwise restore the file from a backup. The published views stay as they are meanwhile".into(),
            MasterError::Missing { chunk: Some((p, s, e, _)), .. } => format!("lambdaflow rewrites it from the log while the log still holds partition {p}'s offsets {s}..{e}; otherwise restore the file from a backup. The published views stay as they are meanwhile"),
            MasterError::Missing { path, .. } => format!("restore {path} from a backup (another engine wrote it; lambdaflow cannot rewrite it). The published views stay as they are meanwhile"),
            MasterError::Unrepairable { path, partition, start, end, .. } => format!("restore {path} (partition {partition}, offsets {start}..{end}) from a backup of the master dataset; the published views stay as they are meanwhile"),
            MasterError::LostForGood { partition, start, end } => format!("restore the files holding partition {partition}'s offsets {start}..{end} from a backup of the master dataset; if another engine rewrote them into a file with copies of its own (`master-foreign` in health lists it), a rewrite without the copies lets lambdaflow read them again. The published views stay as they are meanwhile"),
            MasterError::Lost { partition, start, end } => format!("a rewrite of the table by another engine lost them, or mixed them with rows of its own; restore the table's files holding partition {partition}'s offsets {start}..{end} from a backup"),
            _ => return None,
        })
    }
}

fn delta(op: &'static str) -> impl FnOnce(deltalake::DeltaTableError) -> MasterError {
    move |source| MasterError::Delta { op, source }
}

/// A table version and the coverage `H[p]` it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableCoverage {
    pub version: i64,
    pub h: Coverage,
}

/// A data file of a table version.
#[derive(Debug, Clone)]
pub struct DataFile {
    /// Path within the object store (absolute, as DataFusion wants it).
    pub location: object_store::path::Path,
    pub size: u64,
    pub records: Option<u64>,
    /// The ranges of events it holds (one for a chunk file lambdaflow
    /// wrote; any number for a compaction by another engine).
    pub chunks: Vec<ChunkRange>,
}

/// A file of the table holding rows lambdaflow did not write (appended by
/// another engine): left out of batch runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ForeignFile {
    pub path: String,
    pub rows: u64,
    pub why: String,
}

/// One version of the master dataset: its files and coverage.
#[derive(Debug, Clone)]
pub struct MasterSnapshot {
    pub coverage: TableCoverage,
    /// The files holding lambdaflow's events (foreign ones left out).
    pub files: Vec<DataFile>,
    pub foreign: Vec<ForeignFile>,
    /// Ranges below the coverage that no file holds.
    pub lost: Vec<ChunkRange>,
}

impl MasterSnapshot {
    pub fn events(&self) -> u64 {
        self.files.iter().filter_map(|f| f.records).sum()
    }

    /// The committed chunks of partition `p`, in order (ranges from the file
    /// names lambdaflow gives them, or from the rows of a file another
    /// engine rewrote them into).
    pub fn chunks(&self, p: u32) -> Vec<ChunkRange> {
        let mut out: Vec<ChunkRange> = self
            .files
            .iter()
            .flat_map(|f| f.chunks.iter().filter(|c| c.partition() == p).copied())
            .collect();
        out.sort_unstable();
        out
    }
}

/// A chunk's file name carries the CRC-32C of its bytes: Delta's `Add`
/// has no checksum field that the reader exposes, and a name travels with
/// the file to any tool (`ls` shows it, a copy keeps it). It ends with the
/// writing process's id: two drivers racing for one chunk (a failover's
/// overlap) write two files, and the one whose commit loses is never named
/// by the table — a loser can never overwrite a committed file.
fn chunk_name(partition: u32, start: u64, end: u64, crc: u32) -> String {
    let writer = crate::storage::writer_id();
    format!("part-p{partition:04}-{start:020}-{end:020}-{crc:08x}-{writer}.parquet")
}

/// `part-p0001-…start…-…end…[-crc[-writer]].parquet` → (1, start, end, crc).
pub(crate) fn parse_chunk_name(name: &str) -> Option<(u32, u64, u64, Option<u32>)> {
    let rest = name.strip_prefix("part-p")?.strip_suffix(".parquet")?;
    let mut it = rest.split('-');
    let (p, s, e) = (it.next()?, it.next()?, it.next()?);
    let crc = match it.next() {
        Some(c) => Some(u32::from_str_radix(c, 16).ok()?),
        None => None,
    };
    Some((p.parse().ok()?, s.parse().ok()?, e.parse().ok()?, crc))
}

/// A closed chunk read back from the stream, ready to commit.
pub struct ChunkData {
    pub range: ChunkRange,
    /// Its records, in order.
    pub batches: Vec<SourceBatch>,
    /// The offsets of its duplicates, in order (with `[schema] key`).
    pub duplicates: Vec<u64>,
    /// What the stream needs to read on after its last record (a Kinesis
    /// sequence number); the file keeps it.
    pub resume: Option<String>,
}

/// What committing a chunk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed {
        version: i64,
    },
    /// The chunk was already in the table (a replay after a crash).
    AlreadyCommitted,
}

/// The Delta Lake table of all events.
pub struct MasterDataset {
    /// The Delta table's id: what tells this dataset from another made
    /// with the same config (a cache of it, as the key index, names it).
    id: String,
    storage: Storage,
    table: tokio::sync::Mutex<DeltaTable>,
    events: Arc<EventSchema>,
    file_schema: SchemaRef,
    /// Whether its files have the `_duplicate` column (`[schema] key` is
    /// set, or was once: the column stays).
    keyed: bool,
    /// The partitions of the stream: those it had at open, and more as
    /// chunks of new ones are committed (a stream may gain partitions).
    partitions: std::sync::atomic::AtomicU32,
    coverage: std::sync::Mutex<TableCoverage>,
    /// Files whose checksum was verified (files never change), by this
    /// process or, as `INDEX_DIR/verified.json` says, an earlier one.
    verified: std::sync::Mutex<std::collections::HashSet<object_store::path::Path>>,
    /// Whether `verified` holds what `verified.json` held.
    verified_loaded: std::sync::atomic::AtomicBool,
    /// How many files `verified.json` names, as this process last wrote it.
    saved: std::sync::atomic::AtomicUsize,
    /// The files of the latest verified snapshot, and where re-reading them goes on.
    last_files: std::sync::Mutex<Vec<DataFile>>,
    recheck: std::sync::Mutex<usize>,
    last_recheck: std::sync::Mutex<std::time::Instant>,
    /// The rows of files lambdaflow did not name (`None`: unreadable).
    rows: std::sync::Mutex<HashMap<object_store::path::Path, Option<files::FileRows>>>,
    /// The foreign files of the latest snapshot read.
    foreign: std::sync::Mutex<Vec<ForeignFile>>,
    /// The driver lease's term this process commits under (0: a local root,
    /// not fenced). See [`MasterDataset::commit_chunks`].
    term: std::sync::atomic::AtomicU64,
    /// The highest term the table held at a version: (version, term). A
    /// version's content never changes, so a commit on the version last
    /// checked (the usual case: the driver's own previous commit) does not
    /// scan the log's application transactions again.
    term_seen: std::sync::Mutex<(i64, u64)>,
    /// Called before each commit with the coverage it reaches (the
    /// partitions it extends, with their new ends); a failure fails the
    /// commit. The request ledger's snapshot is written there.
    before_commit: std::sync::OnceLock<BeforeCommit>,
}

/// See [`MasterDataset::set_before_commit`].
pub type BeforeCommit = Arc<
    dyn Fn(Vec<(u32, u64)>) -> futures::future::BoxFuture<'static, Result<(), String>>
        + Send
        + Sync,
>;

/// The application transaction every commit on a shared root carries: its
/// version is the driver lease's term.
pub const TERM_APP: &str = "lambdaflow-term";

/// The Parquet metadata key of a chunk file's resume token.
const RESUME_KEY: &str = "lambdaflow.resume_token";

/// Lambdaflow's records about the table, under the root beside it (not in
/// it: a vacuum by another engine removes what the table does not name):
/// `resume/p<p>-<end>` the resume token of the chunk of p ending at end
/// (a compaction drops the chunk file's own copy), `files/<name>.json` the
/// rows of a file another engine wrote, `verified.json` the files whose
/// checksum was verified.
pub const INDEX_DIR: &str = "master_index";

/// An idle driver reads one verified file again this often (a pass over a
/// table of 1,000 files takes under 1.5 h).
const RECHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

fn resume_path(partition: u32, end: u64) -> String {
    format!("{INDEX_DIR}/resume/p{partition:04}-{end:020}")
}

fn app_id(partition: u32) -> String {
    format!("lambdaflow-p{partition}")
}

/// The master dataset's Arrow schema: event fields (timestamps as Delta's
/// `timestamp`: microseconds, UTC), the three lambdaflow columns, and
/// `_duplicate` when the table is `keyed`.
pub fn file_schema(events: &EventSchema, keyed: bool) -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let mut fields: Vec<Field> = events
        .fields()
        .iter()
        .map(|f| {
            let t = if f.ty.is_timestamp() {
                ts.clone()
            } else {
                f.ty.arrow()
            };
            Field::new(&f.name, t, f.nullable)
        })
        .collect();
    fields.push(Field::new(PARTITION_COLUMN, DataType::Int32, false));
    fields.push(Field::new(OFFSET_COLUMN, DataType::Int64, false));
    fields.push(Field::new(INGEST_TIME_COLUMN, ts, false));
    if keyed {
        fields.push(Field::new(DUPLICATE_COLUMN, DataType::Boolean, true));
    }
    Arc::new(Schema::new(fields))
}

fn delta_columns(events: &EventSchema, keyed: bool) -> Vec<StructField> {
    let mut cols: Vec<StructField> = events
        .fields()
        .iter()
        .map(|f| {
            let t = match f.ty {
                FieldType::Boolean => DeltaType::BOOLEAN,
                FieldType::Int32 => DeltaType::INTEGER,
                FieldType::Int64 => DeltaType::LONG,
                FieldType::Float64 => DeltaType::DOUBLE,
                FieldType::Utf8 => DeltaType::STRING,
                FieldType::TimestampMs | FieldType::TimestampUs => DeltaType::TIMESTAMP,
            };
            StructField::new(f.name.clone(), t, f.nullable)
        })
        .collect();
    cols.push(StructField::new(
        PARTITION_COLUMN,
        DeltaType::INTEGER,
        false,
    ));
    cols.push(StructField::new(OFFSET_COLUMN, DeltaType::LONG, false));
    cols.push(StructField::new(
        INGEST_TIME_COLUMN,
        DeltaType::TIMESTAMP,
        false,
    ));
    if keyed {
        cols.push(StructField::new(DUPLICATE_COLUMN, DeltaType::BOOLEAN, true));
    }
    cols
}

fn duplicates_dir(partition: u32) -> String {
    format!("{INDEX_DIR}/duplicates/p{partition:04}")
}

/// Where a committed range's duplicates are listed, beside the table: a
/// repair or restore of its file writes the same rows again, and the list
/// outlives a compaction, as the resume tokens do.
fn duplicates_path(partition: u32, start: u64, end: u64) -> String {
    format!("{}/{start:020}-{end:020}", duplicates_dir(partition))
}

/// Offsets as LEB128 deltas from `start`.
fn encode_offsets(start: u64, offsets: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(offsets.len() * 2);
    let mut at = start;
    for &o in offsets {
        let mut d = o - at;
        at = o;
        loop {
            let b = (d & 0x7f) as u8;
            d >>= 7;
            if d == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
    }
    out
}

fn decode_offsets(start: u64, bytes: &[u8]) -> Option<Vec<u64>> {
    let mut out = Vec::new();
    let (mut at, mut d, mut shift) = (start, 0u64, 0u32);
    for &b in bytes {
        d |= u64::from(b & 0x7f).checked_shl(shift)?;
        if b & 0x80 == 0 {
            at = at.checked_add(d)?;
            out.push(at);
            (d, shift) = (0, 0);
        } else {
            shift += 7;
            if shift > 63 {
                return None;
            }
        }
    }
    (shift == 0).then_some(out)
}

impl MasterDataset {
    /// Runs `hook` before each commit of chunks, with the coverage the commit
    /// reaches; what must be durable before the log may drop the chunks'
    /// events goes there. Set once.
    pub fn set_before_commit(&self, hook: BeforeCommit) {
        let _ = self.before_commit.set(hook);
    }

    /// Opens the table under `storage`, creating it on first use.
    pub async fn open(
        storage: &Storage,
        events: Arc<EventSchema>,
        partitions: u32,
    ) -> Result<MasterDataset, MasterError> {
        if let Some(dir) = storage.local_path(TABLE_DIR) {
            std::fs::create_dir_all(&dir).map_err(|e| {
                MasterError::Storage(StorageError::BadRoot {
                    root: dir.display().to_string(),
                    reason: e.to_string(),
                })
            })?;
        }
        // A table that was never created has no log; asking the kernel to load
        // it would only log an error.
        let exists = !storage
            .list_files(&format!("{TABLE_DIR}/_delta_log"))
            .await?
            .is_empty();
        let builder = table_builder(storage).map_err(delta("open the table"))?;
        let mut table = if exists {
            builder.load().await.map_err(delta("open the table"))?
        } else {
            builder.build().map_err(delta("open the table"))?
        };
        if table.version().is_none() {
            table = table
                .create()
                .with_table_name("events")
                .with_comment("lambdaflow master dataset: every accepted event, append-only")
                .with_columns(delta_columns(&events, events.key().is_some()))
                .with_save_mode(SaveMode::Ignore)
                .await
                .map_err(delta("create the table"))?;
            storage
                .sync(&format!("{TABLE_DIR}/_delta_log/{:020}.json", 0))
                .await?;
            tracing::info!(table = %storage.dir_url(TABLE_DIR), "created the master dataset");
        }
        let had_key = table
            .snapshot()
            .is_ok_and(|s| s.schema().fields().any(|f| f.name() == DUPLICATE_COLUMN));
        let keyed = had_key || events.key().is_some();
        let file_schema = file_schema(&events, keyed);
        // The Delta table's id (a UUID made when it was created).
        let id = table
            .snapshot()
            .ok()
            .and_then(|s| serde_json::to_value(s.metadata()).ok())
            .and_then(|m| m["id"].as_str().map(str::to_string))
            .unwrap_or_default();
        let master = MasterDataset {
            id,
            storage: storage.clone(),
            table: tokio::sync::Mutex::new(table),
            events,
            file_schema,
            keyed,
            partitions: partitions.into(),
            coverage: std::sync::Mutex::new(TableCoverage {
                version: -1,
                h: Coverage::zeros(partitions),
            }),
            verified: Default::default(),
            verified_loaded: Default::default(),
            saved: Default::default(),
            recheck: Default::default(),
            last_files: Default::default(),
            last_recheck: std::sync::Mutex::new(std::time::Instant::now()),
            rows: Default::default(),
            foreign: Default::default(),
            term: 0.into(),
            term_seen: std::sync::Mutex::new((i64::MIN, 0)),
            before_commit: std::sync::OnceLock::new(),
        };
        master.evolve_schema().await?;
        // Loads the latest version and its coverage, as `refresh` would.
        let snapshot = master.snapshot().await?;
        if let Some(found) = snapshot
            .files
            .iter()
            .filter_map(|f| parse_chunk_name(f.location.filename()?))
            .map(|(p, ..)| p)
            .chain(
                snapshot
                    .files
                    .iter()
                    .flat_map(|f| f.chunks.iter().map(|c| c.partition())),
            )
            .chain(
                snapshot
                    .foreign
                    .iter()
                    .filter_map(|f| parse_chunk_name(f.path.rsplit('/').next()?).map(|(p, ..)| p)),
            )
            .find(|&p| p >= partitions)
        {
            return Err(MasterError::PartitionMismatch {
                found,
                configured: partitions,
            });
        }
        Ok(master)
    }

    /// Brings the table's schema to the configured one: adds the nullable
    /// fields the schema gained (one metadata-only Delta commit), and
    /// refuses any other change ([`evolve`]).
    async fn evolve_schema(&self) -> Result<(), MasterError> {
        let mut table = self.table.lock().await;
        let snapshot = table.snapshot().map_err(delta("read the table"))?;
        let have: Vec<evolve::Column> = snapshot.schema().fields().map(Into::into).collect();
        let want: Vec<evolve::Column> = delta_columns(&self.events, self.keyed)
            .iter()
            .map(Into::into)
            .collect();
        let added = evolve::plan(&have, &want).map_err(|r| MasterError::SchemaRefused {
            field: r.field,
            change: r.change,
            detail: r.detail,
            hint: r.hint,
        })?;
        if added.is_empty() {
            return Ok(());
        }
        let fields: Vec<StructField> = added
            .iter()
            .map(|c| StructField::new(c.name.clone(), c.ty.clone(), c.nullable))
            .collect();
        let evolved = table
            .clone()
            .add_columns()
            .with_fields(fields)
            .await
            .map_err(delta("add the schema's new fields to the table"))?;
        let version = evolved.version().unwrap_or(0);
        self.storage
            .sync(&format!("{TABLE_DIR}/_delta_log/{version:020}.json"))
            .await?;
        *table = evolved;
        let names: Vec<&str> = added.iter().map(|c| c.name.as_str()).collect();
        tracing::info!(fields = ?names, version, "the master dataset's schema grew: older events read the new fields as null");
        Ok(())
    }

    pub fn partitions(&self) -> u32 {
        self.partitions.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The Arrow schema of the event columns as views read them.
    pub fn events_schema(&self) -> &Arc<EventSchema> {
        &self.events
    }

    /// The Arrow schema of the files.
    pub fn file_schema(&self) -> &SchemaRef {
        &self.file_schema
    }

    /// The Delta table's id (see the field).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether its files say which rows are duplicates (`_duplicate`).
    pub fn keyed(&self) -> bool {
        self.keyed
    }

    /// The offsets of the duplicates among partition `p`'s committed events
    /// in `[start, end)`, from the lists kept beside the table (none when
    /// the table is not keyed).
    pub async fn duplicates_in(
        &self,
        p: u32,
        start: u64,
        end: u64,
    ) -> Result<Vec<u64>, MasterError> {
        if !self.keyed {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for name in self.storage.list_files(&duplicates_dir(p)).await? {
            let file = name.rsplit('/').next().unwrap_or_default();
            let Some((s, e)) = file
                .split_once('-')
                .and_then(|(s, e)| Some((s.parse::<u64>().ok()?, e.parse::<u64>().ok()?)))
            else {
                continue;
            };
            if e <= start || s >= end {
                continue;
            }
            let path = duplicates_path(p, s, e);
            let Some(bytes) = self.storage.get(&path).await? else {
                continue;
            };
            let offsets = decode_offsets(s, &bytes).ok_or_else(|| {
                MasterError::Encode(format!("{path}: not a list of offsets").into())
            })?;
            out.extend(offsets.into_iter().filter(|o| (start..end).contains(o)));
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// The coverage of the latest version this process has seen.
    pub fn coverage(&self) -> TableCoverage {
        self.coverage.lock().expect("coverage lock").clone()
    }

    /// Commits from now on carry `term` and are refused once the table holds
    /// a higher one (the driver lease's term; see `cluster::lease`).
    pub fn set_term(&self, term: u64) {
        self.term.store(term, std::sync::atomic::Ordering::SeqCst);
    }

    /// The highest driver lease term any commit of the table carries.
    pub async fn table_term(&self) -> Result<u64, MasterError> {
        // The table's state and its cached coverage move together: a state
        // updated alone made a commit check its chunks against an older
        // coverage and commit them on the newer state, past the conflict
        // check (two drivers' overlapping chunks both committed).
        self.refresh().await?;
        let table = self.table.lock().await;
        self.term_of(&table).await
    }

    /// The highest term `table`'s version holds (cached per version).
    async fn term_of(&self, table: &DeltaTable) -> Result<u64, MasterError> {
        let version = table.version().map_or(-1, |v| v as i64);
        {
            let seen = self.term_seen.lock().expect("term lock");
            if seen.0 == version {
                return Ok(seen.1);
            }
        }
        let snapshot = table.snapshot().map_err(delta("read the table"))?;
        let v = snapshot
            .transaction_version(table.log_store().as_ref(), TERM_APP)
            .await
            .map_err(delta("read the application transactions"))?;
        let term = v.map_or(0, |v| v.max(0) as u64);
        *self.term_seen.lock().expect("term lock") = (version, term);
        Ok(term)
    }

    /// A commit of this process at `version`, carrying `term`, was built on
    /// the version whose term was last checked: the new version's term
    /// follows without a scan. (Built on another, it is scanned next time.)
    fn committed_term(&self, built_on: i64, version: i64, term: u64) {
        let mut seen = self.term_seen.lock().expect("term lock");
        if seen.0 == built_on && version == built_on + 1 {
            *seen = (version, seen.1.max(term));
        }
    }

    /// Reloads the latest table version and its coverage.
    pub async fn refresh(&self) -> Result<TableCoverage, MasterError> {
        let mut table = self.table.lock().await;
        table
            .update_state()
            .await
            .map_err(delta("read the table log"))?;
        let version = table.version().map_or(-1, |v| v as i64);
        let cached = self.coverage();
        if cached.version == version {
            // Reading the application transactions scans the log: skip it when nothing moved.
            return Ok(cached);
        }
        let cov = Self::coverage_of(&table, self.partitions()).await?;
        *self.coverage.lock().expect("coverage lock") = cov.clone();
        Ok(cov)
    }

    async fn coverage_of(
        table: &DeltaTable,
        partitions: u32,
    ) -> Result<TableCoverage, MasterError> {
        let snapshot = table.snapshot().map_err(delta("read the table"))?;
        let log_store = table.log_store();
        let mut h = Coverage::zeros(partitions);
        for p in 0..partitions {
            let v = snapshot
                .transaction_version(log_store.as_ref(), app_id(p))
                .await
                .map_err(delta("read the application transactions"))?;
            h.set(p, v.map_or(0, |v| v.max(0) as u64));
        }
        Ok(TableCoverage {
            version: table.version().map_or(-1, |v| v as i64),
            h,
        })
    }

    /// The latest version's files and coverage.
    pub async fn snapshot(&self) -> Result<MasterSnapshot, MasterError> {
        self.refresh().await?;
        let table = self.table.lock().await;
        self.snapshot_of(&table).await
    }

    /// A given version's files and coverage.
    pub async fn snapshot_at(&self, version: i64) -> Result<MasterSnapshot, MasterError> {
        let mut table = table_builder(&self.storage)
            .and_then(|b| b.build())
            .map_err(delta("open the table"))?;
        table
            .load_version(version.max(0) as u64)
            .await
            .map_err(delta("load a table version"))?;
        self.snapshot_of(&table).await
    }

    /// Per partition, the resume token kept by the committed chunk that
    /// ends at `at[p]` (none at 0, or when the stream keeps none): from the
    /// index beside the table, or (a table written before it) the chunk
    /// file's own metadata.
    pub async fn resume_tokens(&self, at: &Coverage) -> Result<Vec<Option<String>>, MasterError> {
        let snapshot = self.snapshot().await?;
        let mut out = Vec::with_capacity(at.partitions() as usize);
        for (p, end) in at.iter() {
            if end == 0 {
                out.push(None);
                continue;
            }
            if let Some(b) = self.storage.get(&resume_path(p, end)).await? {
                out.push(Some(String::from_utf8_lossy(&b).into_owned()));
                continue;
            }
            let file = snapshot.files.iter().find(|f| {
                f.location
                    .filename()
                    .and_then(parse_chunk_name)
                    .is_some_and(|(q, s, e, _)| q == p && e == end && s < e)
            });
            let Some(file) = file else {
                out.push(None);
                continue;
            };
            let bytes = self.storage.read_at(&file.location).await?;
            let reader = datafusion::parquet::file::reader::SerializedFileReader::new(bytes)
                .map_err(|e| MasterError::Encode(format!("{}: {e}", file.location).into()))?;
            use datafusion::parquet::file::reader::FileReader;
            let token = reader
                .metadata()
                .file_metadata()
                .key_value_metadata()
                .and_then(|kv| kv.iter().find(|k| k.key == RESUME_KEY))
                .and_then(|k| k.value.clone());
            out.push(token);
        }
        Ok(out)
    }

    /// The foreign files of the latest snapshot read (rows another engine
    /// appended, left out of batch runs).
    pub fn foreign(&self) -> Vec<ForeignFile> {
        self.foreign.lock().expect("foreign lock").clone()
    }

    async fn snapshot_of(&self, table: &DeltaTable) -> Result<MasterSnapshot, MasterError> {
        let coverage = Self::coverage_of(table, self.partitions()).await?;
        let snapshot = table.snapshot().map_err(delta("read the table"))?;
        let table_prefix = self.storage.path(TABLE_DIR);
        let mut raw = Vec::new();
        for f in snapshot.log_data().iter() {
            let rel = f.object_store_path();
            let mut location = table_prefix.clone();
            for part in rel.parts() {
                location = location.join(part);
            }
            let file = DataFile {
                location,
                size: f.size().max(0) as u64,
                records: f.num_records().map(|n| n as u64),
                chunks: Vec::new(),
            };
            raw.push((f.modification_time(), file));
        }
        // Oldest first: of two rewrites holding one event, the older keeps it.
        raw.sort_by(|a, b| (a.0, &a.1.location).cmp(&(b.0, &b.1.location)));
        let mut candidates = Vec::with_capacity(raw.len());
        for (_, f) in &raw {
            let named = f
                .location
                .filename()
                .and_then(parse_chunk_name)
                .map(|(p, s, e, _)| (p, s, e));
            let rows = match named {
                Some(_) => None,
                None => self.rows_of(f).await?,
            };
            candidates.push(files::Candidate {
                named,
                rows,
                records: f.records,
            });
        }
        let (held, lost) = files::classify(coverage.h.ends(), &candidates);
        let mut out = Vec::with_capacity(raw.len());
        let mut foreign = Vec::new();
        for (((_, mut f), held), c) in raw.into_iter().zip(held).zip(&candidates) {
            match held {
                files::Held::Chunks(chunks) => {
                    f.chunks = chunks;
                    out.push(f);
                }
                files::Held::Foreign(why) => foreign.push(ForeignFile {
                    path: f.location.to_string(),
                    rows: c.rows.as_ref().map(|r| r.rows).or(f.records).unwrap_or(0),
                    why,
                }),
            }
        }
        out.sort_by(|a, b| a.location.cmp(&b.location));
        if !foreign.is_empty() {
            let mut seen = self.foreign.lock().expect("foreign lock");
            if *seen != foreign {
                for f in &foreign {
                    tracing::warn!(path = %f.path, rows = f.rows, why = %f.why, "the master dataset holds a file lambdaflow did not write; its rows are left out of the batch views");
                }
            }
            *seen = foreign.clone();
        } else {
            self.foreign.lock().expect("foreign lock").clear();
        }
        Ok(MasterSnapshot {
            coverage,
            files: out,
            foreign,
            lost,
        })
    }

    /// The (partition, offset) rows of a file lambdaflow did not name: read
    /// once (its two columns) and kept beside the table. `None` when they
    /// cannot be read (no such columns): a foreign file.
    async fn rows_of(&self, f: &DataFile) -> Result<Option<files::FileRows>, MasterError> {
        if let Some(r) = self.rows.lock().expect("rows lock").get(&f.location) {
            return Ok(r.clone());
        }
        let name = f.location.filename().unwrap_or("file").to_string();
        let kept = format!("{INDEX_DIR}/files/{name}.json");
        let rows = match self.storage.get(&kept).await? {
            Some(b) => serde_json::from_slice::<files::FileRows>(&b).ok(),
            None => None,
        };
        let rows = match rows {
            Some(r) => Some(r),
            None => {
                let bytes = match self.storage.read_at(&f.location).await {
                    Ok(b) => b,
                    // Gone: what it held is unheld (`lost`), found by `verify`.
                    Err(e) if is_not_found(&e) => return Ok(None),
                    Err(e) => return Err(e.into()),
                };
                let rows = tokio::task::spawn_blocking(move || read_rows(bytes))
                    .await
                    .map_err(|e| MasterError::Encode(e.into()))?;
                if let Some(r) = &rows {
                    let json = serde_json::to_vec(r).expect("rows serialize");
                    self.storage.put(&kept, json.into()).await?;
                }
                rows
            }
        };
        self.rows
            .lock()
            .expect("rows lock")
            .insert(f.location.clone(), rows.clone());
        Ok(rows)
    }

    /// Checks a snapshot's files before a run reads them: every file is
    /// there (one listing of the table), no range below the coverage is
    /// unheld, and each file's bytes match the checksum in its name. A file
    /// is read for its checksum once, ever: the files verified (or written
    /// by this process) are recorded beside the table and trusted after a
    /// restart or a failover, so the first run of a new driver reads only
    /// what changed. Damage done to a verified file later is still found:
    /// [`MasterDataset::recheck`] reads them again, one at a time, between runs.
    pub async fn verify(&self, snapshot: &MasterSnapshot) -> Result<(), MasterError> {
        if let Some(l) = snapshot.lost.first() {
            return Err(MasterError::Lost {
                partition: l.partition(),
                start: l.start(),
                end: l.end(),
            });
        }
        self.load_verified().await?;
        let present = self.listing().await?;
        let chunk_of = |f: &DataFile| f.location.filename().and_then(parse_chunk_name);
        for f in &snapshot.files {
            if !present.contains_key(&f.location) {
                self.verified
                    .lock()
                    .expect("verified lock")
                    .remove(&f.location);
                return Err(MasterError::Missing {
                    path: f.location.to_string(),
                    chunk: chunk_of(f).and_then(|(p, s, e, c)| Some((p, s, e, c?))),
                });
            }
        }
        let mut fresh = false;
        let todo: Vec<&DataFile> = {
            let verified = self.verified.lock().expect("verified lock");
            snapshot
                .files
                .iter()
                .filter(|f| {
                    !verified.contains(&f.location) || present.get(&f.location) != Some(&f.size)
                })
                .collect()
        };
        for f in todo {
            self.check(f).await?;
            fresh |= self
                .verified
                .lock()
                .expect("verified lock")
                .insert(f.location.clone());
        }
        *self.last_files.lock().expect("last files lock") = snapshot.files.clone();
        // Files this process wrote are verified without being read: record them too.
        let recorded = {
            let v = self.verified.lock().expect("verified lock");
            snapshot
                .files
                .iter()
                .filter(|f| v.contains(&f.location))
                .count()
        };
        let saved = self
            .saved
            .swap(recorded, std::sync::atomic::Ordering::Relaxed);
        if fresh || recorded != saved {
            self.save_verified(snapshot).await;
        }
        Ok(())
    }

    /// Reads a file and checks it against the checksum in its name (a file
    /// without one — another engine's — only has to be there).
    async fn check(&self, f: &DataFile) -> Result<(), MasterError> {
        {
            if let Some((partition, start, end, Some(expected))) =
                f.location.filename().and_then(parse_chunk_name)
            {
                let bytes = self.storage.read_at(&f.location).await.map_err(|e| {
                    if is_not_found(&e) {
                        MasterError::Missing {
                            path: f.location.to_string(),
                            chunk: Some((partition, start, end, expected)),
                        }
                    } else {
                        e.into()
                    }
                })?;
                let found = crc32c::crc32c(&bytes);
                if found != expected {
                    self.verified
                        .lock()
                        .expect("verified lock")
                        .remove(&f.location);
                    return Err(MasterError::Corrupt {
                        path: f.location.to_string(),
                        partition,
                        start,
                        end,
                        expected,
                        found,
                    });
                }
            }
        }
        Ok(())
    }

    /// Reads again the next verified file of the latest verified snapshot,
    /// in turn (between runs, when the driver is idle): damage done to a
    /// file after it was verified is found within one pass over the table,
    /// and repaired as at a run.
    pub async fn recheck(&self) -> Result<(), MasterError> {
        let f = {
            let files = self.last_files.lock().expect("last files lock");
            let mut last = self.last_recheck.lock().expect("recheck lock");
            if files.is_empty() || last.elapsed() < RECHECK_EVERY {
                return Ok(());
            }
            *last = std::time::Instant::now();
            let mut at = self.recheck.lock().expect("recheck lock");
            *at %= files.len();
            let f = files[*at].clone();
            *at += 1;
            f
        };
        if let Err(e) = self.check(&f).await {
            self.verified
                .lock()
                .expect("verified lock")
                .remove(&f.location);
            return Err(e);
        }
        Ok(())
    }

    /// The table's files and their sizes (one listing).
    async fn listing(&self) -> Result<HashMap<object_store::path::Path, u64>, MasterError> {
        let prefix = self.storage.path(TABLE_DIR);
        let listed = match self
            .storage
            .store()
            .list_with_delimiter(Some(&prefix))
            .await
        {
            Ok(l) => l.objects,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(source) => {
                return Err(StorageError::Io {
                    op: "list",
                    path: prefix.to_string(),
                    source,
                }
                .into());
            }
        };
        Ok(listed.into_iter().map(|o| (o.location, o.size)).collect())
    }

    /// The paths of `snapshot`'s files that are not on storage.
    pub async fn absent(&self, snapshot: &MasterSnapshot) -> Result<Vec<String>, MasterError> {
        let present = self.listing().await?;
        Ok(snapshot
            .files
            .iter()
            .filter(|f| !present.contains_key(&f.location))
            .map(|f| f.location.to_string())
            .collect())
    }

    async fn load_verified(&self) -> Result<(), MasterError> {
        use std::sync::atomic::Ordering;
        if self.verified_loaded.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Some(b) = self
            .storage
            .get(&format!("{INDEX_DIR}/verified.json"))
            .await?
        {
            let names: Vec<String> = serde_json::from_slice(&b).unwrap_or_default();
            let prefix = self.storage.path(TABLE_DIR);
            let mut v = self.verified.lock().expect("verified lock");
            v.extend(names.iter().map(|n| prefix.clone().join(n.as_str())));
        }
        self.verified_loaded.store(true, Ordering::Release);
        Ok(())
    }

    /// Records the verified files of `snapshot` (best effort: a file not
    /// recorded is only verified again).
    async fn save_verified(&self, snapshot: &MasterSnapshot) {
        let names: Vec<String> = {
            let v = self.verified.lock().expect("verified lock");
            snapshot
                .files
                .iter()
                .filter(|f| v.contains(&f.location))
                .filter_map(|f| f.location.filename().map(str::to_string))
                .collect()
        };
        let json = serde_json::to_vec(&names).expect("names serialize");
        if let Err(e) = self
            .storage
            .put(&format!("{INDEX_DIR}/verified.json"), json.into())
            .await
        {
            tracing::warn!(error = %crate::error::chain(&e), "could not record the verified master dataset files");
        }
    }

    /// Rewrites a corrupt or missing chunk file from the stream's copy of its events, if
    /// the rewrite reproduces the checksum the file was committed with (the
    /// encoding is deterministic); otherwise leaves it alone.
    pub async fn repair(
        &self,
        bad: &MasterError,
        source: &dyn Source,
    ) -> Result<Repair, MasterError> {
        let (path, p, start, end, expected) = match bad {
            MasterError::Corrupt {
                path,
                partition,
                start,
                end,
                expected,
                ..
            } => (path, *partition, *start, *end, expected),
            MasterError::Missing {
                path,
                chunk: Some((partition, start, end, expected)),
            } => (path, *partition, *start, *end, expected),
            _ => return Ok(Repair::Cannot),
        };
        // The table may have moved on since the snapshot that found it (a
        // compaction removed the file, and a vacuum deleted it): a file the
        // latest version does not name is not put back — nothing would
        // read it.
        let location = object_store::path::Path::from(path.as_str());
        if !self
            .snapshot()
            .await?
            .files
            .iter()
            .any(|f| f.location == location)
        {
            return Ok(Repair::NotInTable);
        }
        if source.start(p).map_or(true, |s| s > start) {
            return Ok(Repair::Cannot); // retention already removed them
        }
        let Ok(batches) = read_exact(source, p, start, end).await else {
            return Ok(Repair::Cannot);
        };
        let file_schema = self.file_schema.clone();
        // The same token and duplicates as at the commit, or the checksum
        // will not match.
        let token = source.resume_token(p, end);
        let dups = self.duplicates_in(p, start, end).await?;
        let encoded = tokio::task::spawn_blocking(move || {
            encode_chunk(&file_schema, p, &batches, &dups, token)
        })
        .await
        .map_err(|e| MasterError::Encode(e.into()))??;
        if crc32c::crc32c(&encoded) != *expected {
            return Ok(Repair::Cannot);
        }
        self.storage.put_at(&location, encoded.into()).await?;
        Ok(Repair::Rewrote)
    }

    /// Commits the events of `chunk` (read from the stream, in order) as one
    /// file. Idempotent: a chunk already committed is skipped.
    ///
    /// `resume` is what the stream needs to read on after the chunk's last
    /// record (a Kinesis sequence number): the file keeps it, and
    /// [`MasterDataset::resume_tokens`] gives it back after a restart.
    pub async fn commit_chunk(
        &self,
        chunk: ChunkRange,
        batches: Vec<SourceBatch>,
        resume: Option<String>,
    ) -> Result<CommitOutcome, MasterError> {
        self.commit_chunks(vec![ChunkData {
            range: chunk,
            batches,
            duplicates: Vec::new(),
            resume,
        }])
        .await
    }

    /// Commits chunks of several partitions (at most one per partition) in
    /// one Delta commit: one file and one application transaction each.
    /// Chunks the table already holds are skipped; the commit is idempotent
    /// per partition, and a concurrent commit of the same partition by
    /// another writer (a failover's overlap) makes this one fail with a
    /// conflict rather than commit the events twice.
    pub async fn commit_chunks(
        &self,
        chunks: Vec<ChunkData>,
    ) -> Result<CommitOutcome, MasterError> {
        // The table's state and its coverage change together under this
        // lock (here and in `refresh`), and the commit is built on that
        // state: checked against one version and committed on a later one, a
        // chunk another driver committed in between would be committed
        // twice. Against another process, Delta's conflict check on the
        // partitions' application transactions does the same.
        let mut table = self.table.lock().await;
        let mut coverage = self.coverage();
        let version = table.version().map_or(-1, |v| v as i64);
        if coverage.version != version {
            // Never check against a coverage of another version than the
            // state the commit is built on.
            coverage = Self::coverage_of(&table, self.partitions()).await?;
            *self.coverage.lock().expect("coverage lock") = coverage.clone();
        }
        let mut todo = Vec::with_capacity(chunks.len());
        for c in chunks {
            let (partition, start, end, n) = (
                c.range.partition(),
                c.range.start(),
                c.range.end(),
                c.range.events(),
            );
            self.partitions
                .fetch_max(partition + 1, std::sync::atomic::Ordering::Relaxed);
            let committed = coverage.h.get(partition);
            match chunk::next_commit(committed, &c.range) {
                chunk::Commit::Held => continue,
                chunk::Commit::Gap => {
                    return Err(MasterError::Gap {
                        partition,
                        start,
                        end,
                        committed,
                    });
                }
                chunk::Commit::Extends => {}
            }
            // The records must be the chunk's: as many, all inside its range.
            let got: u64 = c.batches.iter().map(|b| b.rows() as u64).sum();
            let out_of_range = c.batches.iter().any(|b| {
                b.partition != partition
                    || (b.rows() > 0 && (b.position(0) < start || b.end() > end))
            });
            if got != n || out_of_range {
                return Err(MasterError::ShortChunk {
                    chunk: c.range,
                    got,
                    out_of_range,
                });
            }
            todo.push(c);
        }
        if todo.is_empty() {
            return Ok(CommitOutcome::AlreadyCommitted);
        }
        // Fencing: a commit carries the lease term as an application
        // transaction, and Delta fails a commit when one committed since its
        // snapshot carries the same application id — so this check against
        // the snapshot cannot be overtaken by a newer term's commit.
        let term = self.term.load(std::sync::atomic::Ordering::SeqCst);
        if term > 0 {
            let table_term = self.term_of(&table).await?;
            if table_term > term {
                return Err(MasterError::Fenced { term, table_term });
            }
        }

        let mut actions = Vec::with_capacity(todo.len());
        let mut txns = Vec::with_capacity(todo.len());
        let mut written = Vec::with_capacity(todo.len());
        for c in todo {
            let (partition, end) = (c.range.partition(), c.range.end());
            // The token outlives a compaction of the file (which drops the
            // file's metadata) beside the table; a racer's is the same.
            if let Some(t) = &c.resume {
                self.storage
                    .put(&resume_path(partition, end), Bytes::from(t.clone()))
                    .await?;
            }
            if self.keyed {
                self.storage
                    .put(
                        &duplicates_path(partition, c.range.start(), end),
                        Bytes::from(encode_offsets(c.range.start(), &c.duplicates)),
                    )
                    .await?;
            }
            let (add, location) = self
                .write_chunk(c.range, c.batches, c.duplicates, c.resume)
                .await?;
            written.push(location);
            crate::failpoint::hit("archive-after-parquet");
            actions.push(Action::Add(add));
            txns.push((partition, end));
        }

        if let Some(hook) = self.before_commit.get() {
            hook(txns.clone())
                .await
                .map_err(|detail| MasterError::BeforeCommit { detail })?;
        }
        let txns_of = txns
            .iter()
            .map(|&(p, end)| Transaction::new(app_id(p), end as i64))
            .collect();
        let version = self
            .commit_on(&mut table, actions, txns_of, term, "commit a chunk")
            .await?;
        crate::failpoint::hit("archive-after-commit");
        // Their checksums are of the bytes written: no need to read them back.
        self.verified.lock().expect("verified lock").extend(written);
        if version != coverage.version + 1 {
            // Delta committed past other writers' commits (ones that did not
            // conflict with this one): the state holds them, and so must the
            // coverage cached for its version, or `refresh` would keep
            // answering the coverage from before them.
            let cov = Self::coverage_of(&table, self.partitions()).await?;
            *self.coverage.lock().expect("coverage lock") = cov;
            return Ok(CommitOutcome::Committed { version });
        }
        let mut cov = self.coverage.lock().expect("coverage lock");
        cov.version = version;
        for (partition, end) in txns {
            cov.h.set(partition, end);
        }
        Ok(CommitOutcome::Committed { version })
    }
}

impl MasterDataset {
    /// Commits `actions` on `table`'s state (the caller holds the table's
    /// lock and has checked the lease term against it), with `txns` and the
    /// term as application transactions; fsyncs the commit file and keeps
    /// the new state. The version committed.
    async fn commit_on(
        &self,
        table: &mut DeltaTable,
        actions: Vec<Action>,
        mut txns: Vec<Transaction>,
        term: u64,
        op: &'static str,
    ) -> Result<i64, MasterError> {
        let built_on = table.version().map_or(-1, |v| v as i64);
        let snapshot = table.snapshot().map_err(delta("read the table"))?;
        // After every commit Delta lists its whole log to remove expired
        // entries — O(commits) per commit, quadratic over a table of small
        // chunks — though it can only remove entries below a checkpoint. So
        // clean up on the commits that write one (every 100th, by default;
        // Delta writes the checkpoint itself, so opening the table stays fast).
        let next = snapshot.version() + 1;
        let interval = {
            use deltalake::kernel::transaction::TableReference;
            use deltalake::table::config::TablePropertiesExt;
            snapshot.config().checkpoint_interval().get()
        };
        if term > 0 {
            txns.push(Transaction::new(TERM_APP, term as i64));
        }
        let props = CommitProperties::default()
            .with_application_transactions(txns)
            .with_cleanup_expired_logs(Some((next + 1) % interval == 0));
        let commit = CommitBuilder::from(props)
            .with_actions(actions)
            .build(
                Some(snapshot),
                table.log_store(),
                DeltaOperation::Write {
                    mode: SaveMode::Append,
                    partition_by: None,
                    predicate: None,
                },
            )
            .await
            .map_err(delta(op))?;
        let version = commit.version() as i64;
        self.committed_term(built_on, version, term);
        // The commit file is Delta's to write, and it does not fsync it.
        self.storage
            .sync(&format!("{TABLE_DIR}/_delta_log/{version:020}.json"))
            .await?;
        // The commit returns the new state: no need to re-read the log.
        table.state = Some(commit.snapshot());
        Ok(version)
    }

    /// Encodes one chunk's events as a file of the table, named by its
    /// range and checksum, and puts it: the `Add` that commits it, and where
    /// it is.
    async fn write_chunk(
        &self,
        range: ChunkRange,
        batches: Vec<SourceBatch>,
        duplicates: Vec<u64>,
        resume: Option<String>,
    ) -> Result<(Add, object_store::path::Path), MasterError> {
        let (partition, start, end, events) = (
            range.partition(),
            range.start(),
            range.end(),
            range.events(),
        );
        let file_schema = self.file_schema.clone();
        let encoded = tokio::task::spawn_blocking(move || {
            encode_chunk(&file_schema, partition, &batches, &duplicates, resume)
        })
        .await
        .map_err(|e| MasterError::Encode(e.into()))??;
        let name = chunk_name(partition, start, end, crc32c::crc32c(&encoded));
        let size = encoded.len() as i64;
        self.storage
            .put(&format!("{TABLE_DIR}/{name}"), Bytes::from(encoded))
            .await?;
        let location = self.storage.path(TABLE_DIR).join(name.as_str());
        let stats = serde_json::json!({
            "numRecords": events,
            "minValues": { PARTITION_COLUMN: partition, OFFSET_COLUMN: start },
            "maxValues": { PARTITION_COLUMN: partition, OFFSET_COLUMN: end.saturating_sub(1) },
            "nullCount": { PARTITION_COLUMN: 0, OFFSET_COLUMN: 0 },
        });
        let add = Add {
            path: name,
            partition_values: HashMap::new(),
            size,
            modification_time: chrono::Utc::now().timestamp_millis(),
            data_change: true,
            stats: Some(stats.to_string()),
            tags: None,
            deletion_vector: None,
            base_row_id: None,
            default_row_commit_version: None,
            clustering_provider: None,
        };
        Ok((add, location))
    }

    /// Commits again, from the log, the events of lambdaflow that the
    /// table's files no longer hold, and removes from the table the files
    /// gone from storage that [`MasterDataset::repair`] cannot put back byte
    /// for byte:
    ///
    /// ```text
    ///  ranges below the coverage no file holds   another engine's rewrite mixed
    ///  (MasterError::Lost)                        them with rows of its own, or
    ///                                             dropped them
    ///  a gone file lambdaflow did not name        a compaction's file deleted by
    ///  (MasterError::Missing, no chunk)           hand: its ranges, from the index
    ///                   ─▶ one commit: the gone files removed, the ranges added
    ///                      again as chunk files; the coverage does not move
    /// ```
    ///
    /// `Ok(None)` when there is nothing to restore;
    /// [`MasterError::Unrepairable`] when the log no longer holds a range
    /// (then only a backup can bring it back). The commit carries the lease
    /// term, and Delta's conflict check fails it should another writer
    /// remove the same files meanwhile: the next cycle looks again.
    pub async fn restore(&self, source: &dyn Source) -> Result<Option<Restored>, MasterError> {
        let snapshot = self.snapshot().await?;
        let present = self.listing().await?;
        let table_prefix = self.storage.path(TABLE_DIR);
        let relative = |location: &object_store::path::Path| -> String {
            match location.prefix_match(&table_prefix) {
                Some(parts) => parts
                    .map(|p| p.as_ref().to_string())
                    .collect::<Vec<_>>()
                    .join("/"),
                None => location.to_string(),
            }
        };
        // What must come back, and from which file (none: a lost range).
        let mut todo: Vec<(String, ChunkRange)> = snapshot
            .lost
            .iter()
            .map(|r| ("the table".to_string(), *r))
            .collect();
        let mut gone: Vec<(String, i64)> = Vec::new();
        for f in &snapshot.files {
            if present.contains_key(&f.location) {
                continue;
            }
            let byte_for_byte = f
                .location
                .filename()
                .and_then(parse_chunk_name)
                .is_some_and(|(.., crc)| crc.is_some());
            if byte_for_byte {
                continue; // `repair` puts it back where it was
            }
            gone.push((relative(&f.location), f.size as i64));
            todo.extend(f.chunks.iter().map(|c| (f.location.to_string(), *c)));
        }
        for f in &snapshot.foreign {
            let location = object_store::path::Path::from(f.path.as_str());
            if !present.contains_key(&location) {
                // Its rows were never counted; a table naming a file that is
                // not there cannot be read by any engine.
                gone.push((relative(&location), 0));
            }
        }
        if todo.is_empty() && gone.is_empty() {
            return Ok(None);
        }
        // Every range from the log, or none of them: a partial restore
        // would leave the table no better for a reader.
        let mut pieces = Vec::new();
        for (path, r) in &todo {
            let readable = source.start(r.partition()).is_ok_and(|s| s <= r.start())
                && source.end(r.partition()).is_ok_and(|e| e >= r.end());
            if !readable {
                return Err(if path == "the table" {
                    MasterError::LostForGood {
                        partition: r.partition(),
                        start: r.start(),
                        end: r.end(),
                    }
                } else {
                    MasterError::Unrepairable {
                        path: path.clone(),
                        what: "missing",
                        partition: r.partition(),
                        start: r.start(),
                        end: r.end(),
                    }
                });
            }
            // Bounded pieces: one piece's events are in memory at a time.
            let mut at = r.start();
            while at < r.end() {
                let to = r.end().min(at + RESTORE_PIECE);
                pieces.push((path.clone(), r.partition(), at, to));
                at = to;
            }
        }
        let term = self.term.load(std::sync::atomic::Ordering::SeqCst);
        let mut actions = Vec::new();
        let mut written = Vec::new();
        let mut ranges = Vec::new();
        for (path, p, start, end) in pieces {
            let batches =
                read_exact(source, p, start, end)
                    .await
                    .map_err(|_| MasterError::Unrepairable {
                        path: path.clone(),
                        what: "missing",
                        partition: p,
                        start,
                        end,
                    })?;
            let events: u64 = batches.iter().map(|b| b.rows() as u64).sum();
            let range =
                ChunkRange::new(p, start, end, events).ok_or_else(|| MasterError::ShortChunk {
                    chunk: ChunkRange::dense(p, start, end),
                    got: events,
                    out_of_range: true,
                })?;
            let resume = source.resume_token(p, end);
            let dups = self.duplicates_in(p, start, end).await?;
            let (add, location) = self.write_chunk(range, batches, dups, resume).await?;
            actions.push(Action::Add(add));
            written.push(location);
            ranges.push(range);
        }
        let now = chrono::Utc::now().timestamp_millis();
        for (path, size) in &gone {
            actions.push(Action::Remove(deltalake::kernel::Remove {
                path: path.clone(),
                data_change: true,
                deletion_timestamp: Some(now),
                extended_file_metadata: None,
                partition_values: None,
                size: (*size > 0).then_some(*size),
                tags: None,
                deletion_vector: None,
                base_row_id: None,
                default_row_commit_version: None,
            }));
        }
        let mut table = self.table.lock().await;
        if term > 0 {
            let table_term = self.term_of(&table).await?;
            if table_term > term {
                return Err(MasterError::Fenced { term, table_term });
            }
        }
        let version = self
            .commit_on(&mut table, actions, Vec::new(), term, "commit a restore")
            .await?;
        // The coverage did not move, but it is of the state's version: read
        // it (a restore is rare) rather than assume the cached one was of the
        // version the commit was built on.
        let coverage = Self::coverage_of(&table, self.partitions()).await?;
        *self.coverage.lock().expect("coverage lock") = coverage;
        self.verified.lock().expect("verified lock").extend(written);
        Ok(Some(Restored {
            ranges,
            removed: gone.into_iter().map(|(p, _)| p).collect(),
            version,
        }))
    }
}

/// What [`MasterDataset::repair`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Put back, byte for byte, from the log.
    Rewrote,
    /// The latest table version no longer names the file: nothing to do.
    NotInTable,
    /// The log no longer holds its events (or they encode otherwise).
    Cannot,
}

/// What [`MasterDataset::restore`] committed.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The ranges committed again, from the log.
    pub ranges: Vec<ChunkRange>,
    /// The files removed from the table (gone from storage).
    pub removed: Vec<String>,
    pub version: i64,
}

/// The most offsets one file of a restore holds.
const RESTORE_PIECE: u64 = 1 << 20;

fn is_not_found(e: &StorageError) -> bool {
    matches!(
        e,
        StorageError::Io {
            source: object_store::Error::NotFound { .. },
            ..
        }
    )
}

/// The key index reads the events it lacks from here: each file holding
/// some of `[from, to)` of the partition, its key, offset and ingest time.
#[async_trait::async_trait]
impl crate::keys::History for MasterDataset {
    async fn recorded(&self, p: u32, start: u64, end: u64) -> Result<Vec<u64>, String> {
        self.duplicates_in(p, start, end)
            .await
            .map_err(|e| crate::error::chain(&e))
    }

    async fn keys(
        &self,
        p: u32,
        from: u64,
        to: u64,
        hasher: &crate::keys::KeyHasher,
    ) -> Result<Vec<crate::keys::KeyRow>, String> {
        let Some(key) = self.events.key() else {
            return Ok(Vec::new());
        };
        let name = self.events.fields()[key.field].name.clone();
        let snapshot = self.snapshot().await.map_err(|e| crate::error::chain(&e))?;
        let mut rows = Vec::new();
        for f in snapshot.files.iter().filter(|f| {
            f.chunks
                .iter()
                .any(|c| c.partition() == p && c.end() > from && c.start() < to)
        }) {
            let bytes = self
                .storage
                .read_at(&f.location)
                .await
                .map_err(|e| crate::error::chain(&e))?;
            let (name, hasher) = (name.clone(), *hasher);
            let read =
                tokio::task::spawn_blocking(move || read_keys(bytes, &name, &hasher, p, from, to))
                    .await
                    .map_err(|e| e.to_string())?;
            rows.extend(read.map_err(|e| format!("{}: {e}", f.location))?);
        }
        rows.sort_unstable_by_key(|r| r.offset);
        rows.dedup_by_key(|r| r.offset);
        Ok(rows)
    }
}

/// The rows of partition `p` in `[from, to)` of a Parquet file: offset, key
/// hash, ingest time.
fn read_keys(
    bytes: Bytes,
    key: &str,
    hasher: &crate::keys::KeyHasher,
    p: u32,
    from: u64,
    to: u64,
) -> Result<Vec<crate::keys::KeyRow>, String> {
    use arrow::array::{Array, AsArray};
    use datafusion::parquet::arrow::ProjectionMask;
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| e.to_string())?;
    let schema = builder.schema().clone();
    let at = |c: &str| schema.index_of(c).map_err(|_| format!("no column `{c}`"));
    let cols = [
        at(key)?,
        at(PARTITION_COLUMN)?,
        at(OFFSET_COLUMN)?,
        at(INGEST_TIME_COLUMN)?,
    ];
    let mask = ProjectionMask::roots(builder.parquet_schema(), cols);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        let col = |c: &str| batch.column_by_name(c).ok_or(format!("no column `{c}`"));
        let hashes = hasher.column(col(key)?).map_err(|e| e.to_string())?;
        let parts = cast(col(PARTITION_COLUMN)?, &DataType::Int64).map_err(|e| e.to_string())?;
        let offsets = cast(col(OFFSET_COLUMN)?, &DataType::Int64).map_err(|e| e.to_string())?;
        let times = cast(col(INGEST_TIME_COLUMN)?, &DataType::Int64).map_err(|e| e.to_string())?;
        let (parts, offsets, times) = (
            parts.as_primitive::<arrow::datatypes::Int64Type>(),
            offsets.as_primitive::<arrow::datatypes::Int64Type>(),
            times.as_primitive::<arrow::datatypes::Int64Type>(),
        );
        for (i, hash) in hashes.into_iter().enumerate() {
            if parts.is_null(i) || offsets.is_null(i) || times.is_null(i) {
                continue;
            }
            let o = offsets.value(i) as u64;
            if parts.value(i) != i64::from(p) || !(from..to).contains(&o) {
                continue;
            }
            out.push(crate::keys::KeyRow {
                offset: o,
                hash,
                time_ms: times.value(i).div_euclid(1000),
            });
        }
    }
    Ok(out)
}

/// The (partition, offset) pairs of a Parquet file's `_partition` and
/// `_offset` columns, as runs; `None` if it has no such columns.
fn read_rows(bytes: Bytes) -> Option<files::FileRows> {
    use arrow::array::Array;
    use datafusion::parquet::arrow::ProjectionMask;
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).ok()?;
    let schema = builder.schema().clone();
    let ip = schema.index_of(PARTITION_COLUMN).ok()?;
    let io = schema.index_of(OFFSET_COLUMN).ok()?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), [ip, io]);
    let reader = builder.with_projection(mask).build().ok()?;
    let mut pairs = Vec::new();
    for batch in reader {
        let batch = batch.ok()?;
        let p = cast(batch.column_by_name(PARTITION_COLUMN)?, &DataType::Int64).ok()?;
        let o = cast(batch.column_by_name(OFFSET_COLUMN)?, &DataType::Int64).ok()?;
        let p = p.as_any().downcast_ref::<Int64Array>()?;
        let o = o.as_any().downcast_ref::<Int64Array>()?;
        for i in 0..batch.num_rows() {
            if p.is_null(i) || o.is_null(i) || p.value(i) < 0 || o.value(i) < 0 {
                return None;
            }
            pairs.push((p.value(i) as u32, o.value(i) as u64));
        }
    }
    Some(files::FileRows::of(pairs))
}

/// Delta's access to the table: an object-store root lends Delta its own
/// client, so Delta and lambdaflow read and write with one configuration
/// (endpoint, credentials, retries); a local root lets Delta open the path.
fn table_builder(
    storage: &Storage,
) -> Result<deltalake::DeltaTableBuilder, deltalake::DeltaTableError> {
    let url = storage.dir_url(TABLE_DIR);
    let builder = deltalake::DeltaTableBuilder::from_url(url.clone())?;
    Ok(if storage.url().scheme() == "file" {
        builder
    } else {
        builder.with_storage_backend(storage.store().clone(), url)
    })
}

/// Encodes a chunk's batches as one Parquet file of the master dataset.
fn encode_chunk(
    file_schema: &SchemaRef,
    partition: u32,
    batches: &[SourceBatch],
    duplicates: &[u64],
    resume: Option<String>,
) -> Result<Vec<u8>, MasterError> {
    let keyed = file_schema.column_with_name(DUPLICATE_COLUMN).is_some();
    let mut dups = duplicates.iter().copied().peekable();
    let enc = |e: String| MasterError::Encode(e.into());
    let delta_cols = [OFFSET_COLUMN, INGEST_TIME_COLUMN];
    let mut props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(1 << 20))
        .set_key_value_metadata(resume.map(|r| {
            vec![datafusion::parquet::file::metadata::KeyValue::new(
                RESUME_KEY.to_string(),
                r,
            )]
        }));
    for c in delta_cols {
        // Offsets and ingest times climb steadily: delta encoding makes them nearly free.
        props = props
            .set_column_dictionary_enabled(ColumnPath::from(c), false)
            .set_column_encoding(ColumnPath::from(c), Encoding::DELTA_BINARY_PACKED);
    }
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, file_schema.clone(), Some(props.build()))
        .map_err(|e| enc(e.to_string()))?;
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    for b in batches {
        let rows = b.batch.num_rows();
        if rows == 0 {
            continue;
        }
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(file_schema.fields().len());
        for c in b.batch.columns() {
            cols.push(match c.data_type() {
                DataType::Timestamp(_, _) => cast(c, &ts).map_err(|e| enc(e.to_string()))?,
                _ => c.clone(),
            });
        }
        cols.push(std::sync::Arc::new(Int32Array::from_value(
            partition as i32,
            rows,
        )));
        cols.push(std::sync::Arc::new(Int64Array::from_iter_values(
            (0..rows).map(|r| b.position(r) as i64),
        )));
        cols.push(std::sync::Arc::new(
            TimestampMicrosecondArray::from_iter_values((0..rows).map(|r| b.time_ms(r) * 1000))
                .with_timezone("UTC"),
        ));
        if keyed {
            cols.push(std::sync::Arc::new(arrow::array::BooleanArray::from_iter(
                (0..rows).map(|r| {
                    let at = b.position(r);
                    while dups.next_if(|&d| d < at).is_some() {}
                    Some(dups.next_if_eq(&at).is_some())
                }),
            )));
        }
        let out = RecordBatch::try_new(file_schema.clone(), cols).map_err(|e| {
            enc(format!(
                "events of partition {partition} from offset {} do not fit the master dataset: {e}",
                b.position(0)
            ))
        })?;
        w.write(&out).map_err(|e| enc(e.to_string()))?;
    }
    w.close().map_err(|e| enc(e.to_string()))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::source::{Positions, StreamTimes};
    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    /// The `i`th chunk of two events of partition `p`.
    fn chunk(p: u32, i: u64) -> ChunkData {
        let batch = crate::bench::paper_batches(2, 2, 10).remove(0);
        ChunkData {
            range: ChunkRange::dense(p, 2 * i, 2 * i + 2),
            batches: vec![SourceBatch::dense(p, 2 * i, 1_000, batch)],
            duplicates: Vec::new(),
            resume: None,
        }
    }

    /// Opening a table reads its last checkpoint and the commits after it,
    /// not every commit since the first: Delta writes one every 100th
    /// version, and several partitions' chunks go into one commit.
    #[tokio::test]
    async fn the_table_is_checkpointed_and_partitions_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::local(dir.path()).unwrap();
        let master = MasterDataset::open(&storage, Arc::new(EventSchema::paper()), 2)
            .await
            .unwrap();
        for i in 0..100 {
            master
                .commit_chunks(vec![chunk(0, i), chunk(1, i)])
                .await
                .unwrap();
        }
        let cov = master.refresh().await.unwrap();
        assert_eq!(cov.h, vec![200, 200], "both partitions' chunks committed");
        assert_eq!(cov.version, 100, "one commit per round, not one per chunk");
        let log = dir.path().join("master/_delta_log");
        assert!(
            log.join(format!("{:020}.checkpoint.parquet", 99)).exists(),
            "a checkpoint at version 99: {:?}",
            std::fs::read_dir(&log)
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.contains("checkpoint"))
                .collect::<Vec<_>>()
        );
    }

    /// Fencing: once a commit of a newer lease term is in the table, an
    /// older holder commits nothing more — also when its own last commit
    /// is the version it checked last (the term cached per version must
    /// not hide the newer one once the table has moved).
    #[tokio::test]
    async fn a_commit_under_an_older_term_is_refused_once_a_newer_one_committed() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::local(dir.path()).unwrap();
        let open = || MasterDataset::open(&storage, Arc::new(EventSchema::paper()), 2);
        let (old, new) = (open().await.unwrap(), open().await.unwrap());
        old.set_term(1);
        old.commit_chunks(vec![chunk(0, 0)]).await.unwrap();
        old.commit_chunks(vec![chunk(0, 1)]).await.unwrap();
        assert_eq!(old.table_term().await.unwrap(), 1);
        new.set_term(2);
        new.refresh().await.unwrap();
        new.commit_chunks(vec![chunk(1, 0)]).await.unwrap();
        // The old holder, paused meanwhile, comes back and commits on.
        let refused = match old.commit_chunks(vec![chunk(0, 2)]).await {
            Err(e) => e,
            Ok(o) => panic!("a commit under term 1 after term 2 committed must be refused: {o:?}"),
        };
        old.refresh().await.unwrap();
        let again = old.commit_chunks(vec![chunk(0, 2)]).await;
        assert!(
            matches!(
                again,
                Err(MasterError::Fenced {
                    term: 1,
                    table_term: 2
                })
            ),
            "once it reads the newer version the old holder is fenced: first {refused:?}, then {again:?}"
        );
        assert_eq!(
            new.refresh().await.unwrap().h,
            vec![4, 2],
            "nothing of term 1 after term 2"
        );
    }

    /// A Kafka-like chunk: positions with gaps (transaction markers,
    /// aborted records) and a time per record.
    #[tokio::test]
    async fn a_chunk_with_gaps_is_committed_with_its_records_at_their_positions() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::local(dir.path()).unwrap();
        let master = MasterDataset::open(&storage, Arc::new(EventSchema::paper()), 1)
            .await
            .unwrap();
        let records = SourceBatch {
            partition: 0,
            batch: crate::bench::paper_batches(3, 3, 10).remove(0),
            positions: Positions::Listed {
                at: vec![2, 5, 9].into(),
                end: 10,
            },
            times: StreamTimes::Each(vec![1_000, 1_001, 1_002].into()),
        };
        let wrong = ChunkRange::new(0, 0, 10, 4).unwrap();
        let refused = master
            .commit_chunk(wrong, vec![records.clone()], None)
            .await;
        assert!(
            matches!(refused, Err(MasterError::ShortChunk { got: 3, .. })),
            "a chunk that should hold 4 events but was read with 3 is refused: {refused:?}"
        );
        let chunk = ChunkRange::new(0, 0, 10, 3).unwrap();
        master
            .commit_chunk(chunk, vec![records], None)
            .await
            .unwrap();
        let snap = master.snapshot().await.unwrap();
        assert_eq!(snap.chunks(0), vec![chunk], "the range and its event count");
        assert_eq!(
            snap.coverage.h,
            vec![10],
            "coverage is the range's end, not its count"
        );
        let bytes = storage.read_at(&snap.files[0].location).await.unwrap();
        let read: Vec<RecordBatch> = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let offsets: Vec<i64> = read
            .iter()
            .flat_map(|b| {
                let c = b
                    .column_by_name(OFFSET_COLUMN)
                    .unwrap()
                    .as_primitive::<Int64Type>();
                c.values().to_vec()
            })
            .collect();
        assert_eq!(offsets, vec![2, 5, 9], "each record keeps its own position");
    }
}
