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

use crate::schema::{EventSchema, FieldType};
use crate::storage::{Storage, StorageError};
use crate::stream::source::{ChunkRange, Source, SourceBatch, read_exact};

/// Columns lambdaflow adds to every event in the master dataset.
pub const PARTITION_COLUMN: &str = "_partition";
pub const OFFSET_COLUMN: &str = "_offset";
pub const INGEST_TIME_COLUMN: &str = "_ingest_time";

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
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("master dataset: could not encode a chunk as Parquet: {0}")]
    Encode(String),
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
}

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
            MasterError::Storage(e) => return e.hint(),
            MasterError::SchemaRefused { hint, .. } => hint.clone(),
            MasterError::PartitionMismatch { .. } => "the partition count of an existing data directory cannot change; set stream.partitions to what it was, or use a new data directory".into(),
            MasterError::Corrupt { .. } => "lambdaflow rewrites it from the log while the log still holds those offsets; otherwise restore the file from a backup. The published views stay as they are meanwhile".into(),
            _ => return None,
        })
    }
}

fn delta(op: &'static str) -> impl FnOnce(deltalake::DeltaTableError) -> MasterError {
    move |source| MasterError::Delta { op, source }
}

/// A table version and the coverage `H[p]` it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    pub version: i64,
    pub h: Vec<u64>,
}

/// A data file of a table version.
#[derive(Debug, Clone)]
pub struct DataFile {
    /// Path within the object store (absolute, as DataFusion wants it).
    pub location: object_store::path::Path,
    pub size: u64,
    pub records: Option<u64>,
}

/// One version of the master dataset: its files and coverage.
#[derive(Debug, Clone)]
pub struct MasterSnapshot {
    pub coverage: Coverage,
    pub files: Vec<DataFile>,
}

impl MasterSnapshot {
    pub fn events(&self) -> u64 {
        self.files.iter().filter_map(|f| f.records).sum()
    }

    /// The committed chunks of partition `p`, in order (ranges from the file
    /// names lambdaflow gives them, event counts from the Delta statistics).
    pub fn chunks(&self, p: u32) -> Vec<ChunkRange> {
        let mut out: Vec<ChunkRange> = self
            .files
            .iter()
            .filter_map(|f| {
                let (q, s, e, _) = parse_chunk_name(f.location.filename()?)?;
                let events = f.records.unwrap_or(e.saturating_sub(s));
                (q == p).then(|| ChunkRange::new(q, s, e, events))?
            })
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
    storage: Storage,
    table: tokio::sync::Mutex<DeltaTable>,
    events: Arc<EventSchema>,
    file_schema: SchemaRef,
    /// The partitions of the stream: those it had at open, and more as
    /// chunks of new ones are committed (a stream may gain partitions).
    partitions: std::sync::atomic::AtomicU32,
    coverage: std::sync::Mutex<Coverage>,
    /// Files whose checksum this process has verified (files never change).
    verified: std::sync::Mutex<std::collections::HashSet<object_store::path::Path>>,
    /// The driver lease's term this process commits under (0: a local root,
    /// not fenced). See [`MasterDataset::commit_chunks`].
    term: std::sync::atomic::AtomicU64,
}

/// The application transaction every commit on a shared root carries: its
/// version is the driver lease's term.
pub const TERM_APP: &str = "lambdaflow-term";

/// The Parquet metadata key of a chunk file's resume token.
const RESUME_KEY: &str = "lambdaflow.resume_token";

fn app_id(partition: u32) -> String {
    format!("lambdaflow-p{partition}")
}

/// The master dataset's Arrow schema: event fields (timestamps as Delta's
/// `timestamp`: microseconds, UTC) and the three lambdaflow columns.
pub fn file_schema(events: &EventSchema) -> SchemaRef {
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
    Arc::new(Schema::new(fields))
}

fn delta_columns(events: &EventSchema) -> Vec<StructField> {
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
    cols
}

impl MasterDataset {
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
                .with_columns(delta_columns(&events))
                .with_save_mode(SaveMode::Ignore)
                .await
                .map_err(delta("create the table"))?;
            storage
                .sync(&format!("{TABLE_DIR}/_delta_log/{:020}.json", 0))
                .await?;
            tracing::info!(table = %storage.dir_url(TABLE_DIR), "created the master dataset");
        }
        let file_schema = file_schema(&events);
        let master = MasterDataset {
            storage: storage.clone(),
            table: tokio::sync::Mutex::new(table),
            events,
            file_schema,
            partitions: partitions.into(),
            coverage: std::sync::Mutex::new(Coverage {
                version: -1,
                h: vec![0; partitions as usize],
            }),
            verified: Default::default(),
            term: 0.into(),
        };
        master.evolve_schema().await?;
        // Loads the latest version and its coverage, as `refresh` would.
        let snapshot = master.snapshot().await?;
        if let Some(found) = snapshot
            .files
            .iter()
            .filter_map(|f| parse_chunk_name(f.location.filename()?))
            .map(|(p, ..)| p)
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
        let want: Vec<evolve::Column> =
            delta_columns(&self.events).iter().map(Into::into).collect();
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

    /// The coverage of the latest version this process has seen.
    pub fn coverage(&self) -> Coverage {
        self.coverage.lock().expect("coverage lock").clone()
    }

    /// Commits from now on carry `term` and are refused once the table holds
    /// a higher one (the driver lease's term; see `batch::lease`).
    pub fn set_term(&self, term: u64) {
        self.term.store(term, std::sync::atomic::Ordering::SeqCst);
    }

    /// The highest driver lease term any commit of the table carries.
    pub async fn table_term(&self) -> Result<u64, MasterError> {
        let mut table = self.table.lock().await;
        table
            .update_state()
            .await
            .map_err(delta("read the table log"))?;
        Self::term_of(&table).await
    }

    async fn term_of(table: &DeltaTable) -> Result<u64, MasterError> {
        let snapshot = table.snapshot().map_err(delta("read the table"))?;
        let v = snapshot
            .transaction_version(table.log_store().as_ref(), TERM_APP)
            .await
            .map_err(delta("read the application transactions"))?;
        Ok(v.map_or(0, |v| v.max(0) as u64))
    }

    /// Reloads the latest table version and its coverage.
    pub async fn refresh(&self) -> Result<Coverage, MasterError> {
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

    async fn coverage_of(table: &DeltaTable, partitions: u32) -> Result<Coverage, MasterError> {
        let snapshot = table.snapshot().map_err(delta("read the table"))?;
        let log_store = table.log_store();
        let mut h = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            let v = snapshot
                .transaction_version(log_store.as_ref(), app_id(p))
                .await
                .map_err(delta("read the application transactions"))?;
            h.push(v.map_or(0, |v| v.max(0) as u64));
        }
        Ok(Coverage {
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
    /// ends at `at[p]` (none at 0, or when the stream keeps none).
    pub async fn resume_tokens(&self, at: &[u64]) -> Result<Vec<Option<String>>, MasterError> {
        let snapshot = self.snapshot().await?;
        let mut out = Vec::with_capacity(at.len());
        for (p, &end) in at.iter().enumerate() {
            let file = snapshot.files.iter().find(|f| {
                f.location
                    .filename()
                    .and_then(parse_chunk_name)
                    .is_some_and(|(q, s, e, _)| q == p as u32 && e == end && s < e)
            });
            let Some(file) = file else {
                out.push(None);
                continue;
            };
            let bytes = self.storage.read_at(&file.location).await?;
            let reader = datafusion::parquet::file::reader::SerializedFileReader::new(bytes)
                .map_err(|e| MasterError::Encode(format!("{}: {e}", file.location)))?;
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

    async fn snapshot_of(&self, table: &DeltaTable) -> Result<MasterSnapshot, MasterError> {
        let coverage = Self::coverage_of(table, self.partitions()).await?;
        let snapshot = table.snapshot().map_err(delta("read the table"))?;
        let table_prefix = self.storage.path(TABLE_DIR);
        let mut files = Vec::new();
        for f in snapshot.log_data().iter() {
            let rel = f.object_store_path();
            let mut location = table_prefix.clone();
            for part in rel.parts() {
                location = location.join(part);
            }
            files.push(DataFile {
                location,
                size: f.size().max(0) as u64,
                records: f.num_records().map(|n| n as u64),
            });
        }
        files.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(MasterSnapshot { coverage, files })
    }

    /// Checks each file's bytes against the checksum in its name (once per
    /// file and process: files are immutable). Reads them in full, so the
    /// batch layer never computes a view over damaged events.
    pub async fn verify(&self, files: &[DataFile]) -> Result<(), MasterError> {
        for f in files {
            if self
                .verified
                .lock()
                .expect("verified lock")
                .contains(&f.location)
            {
                continue;
            }
            let Some((partition, start, end, Some(expected))) =
                f.location.filename().and_then(parse_chunk_name)
            else {
                continue; // written by an older version or another tool: no checksum
            };
            let bytes = self.storage.read_at(&f.location).await?;
            let found = crc32c::crc32c(&bytes);
            if found != expected {
                return Err(MasterError::Corrupt {
                    path: f.location.to_string(),
                    partition,
                    start,
                    end,
                    expected,
                    found,
                });
            }
            self.verified
                .lock()
                .expect("verified lock")
                .insert(f.location.clone());
        }
        Ok(())
    }

    /// Rewrites a corrupt chunk file from the stream's copy of its events, if
    /// the rewrite reproduces the checksum the file was committed with (the
    /// encoding is deterministic); otherwise leaves it alone.
    pub async fn repair(
        &self,
        bad: &MasterError,
        source: &dyn Source,
    ) -> Result<bool, MasterError> {
        let MasterError::Corrupt {
            path,
            partition,
            start,
            end,
            expected,
            ..
        } = bad
        else {
            return Ok(false);
        };
        let (p, start, end) = (*partition, *start, *end);
        if source.start(p).map_or(true, |s| s > start) {
            return Ok(false); // retention already removed them
        }
        let Ok(batches) = read_exact(source, p, start, end).await else {
            return Ok(false);
        };
        let file_schema = self.file_schema.clone();
        // The same token as at the commit, or the checksum will not match.
        let token = source.resume_token(p, end);
        let encoded =
            tokio::task::spawn_blocking(move || encode_chunk(&file_schema, p, &batches, token))
                .await
                .map_err(|e| MasterError::Encode(e.to_string()))??;
        if crc32c::crc32c(&encoded) != *expected {
            return Ok(false);
        }
        let location = object_store::path::Path::from(path.as_str());
        self.storage.put_at(&location, encoded.into()).await?;
        Ok(true)
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
        let coverage = self.coverage();
        let mut todo = Vec::with_capacity(chunks.len());
        for c in chunks {
            let ChunkRange {
                partition,
                start,
                end,
                events: n,
            } = c.range;
            self.partitions
                .fetch_max(partition + 1, std::sync::atomic::Ordering::Relaxed);
            let committed = coverage.h.get(partition as usize).copied().unwrap_or(0);
            if committed >= end {
                continue;
            }
            if committed != start {
                return Err(MasterError::Gap {
                    partition,
                    start,
                    end,
                    committed,
                });
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
            let table_term = Self::term_of(&table).await?;
            if table_term > term {
                return Err(MasterError::Fenced { term, table_term });
            }
        }

        let mut actions = Vec::with_capacity(todo.len());
        let mut txns = Vec::with_capacity(todo.len());
        for c in todo {
            let (partition, start, end, n) = (
                c.range.partition,
                c.range.start,
                c.range.end,
                c.range.events,
            );
            let file_schema = self.file_schema.clone();
            let (batches, resume) = (c.batches, c.resume);
            let encoded = tokio::task::spawn_blocking(move || {
                encode_chunk(&file_schema, partition, &batches, resume)
            })
            .await
            .map_err(|e| MasterError::Encode(e.to_string()))??;
            let name = chunk_name(partition, start, end, crc32c::crc32c(&encoded));
            let size = encoded.len() as u64;
            self.storage
                .put(&format!("{TABLE_DIR}/{name}"), Bytes::from(encoded))
                .await?;
            crate::failpoint::hit("archive-after-parquet");
            let stats = serde_json::json!({
                "numRecords": n,
                "minValues": { PARTITION_COLUMN: partition, OFFSET_COLUMN: start },
                "maxValues": { PARTITION_COLUMN: partition, OFFSET_COLUMN: end.saturating_sub(1) },
                "nullCount": { PARTITION_COLUMN: 0, OFFSET_COLUMN: 0 },
            });
            actions.push(Action::Add(Add {
                path: name,
                partition_values: HashMap::new(),
                size: size as i64,
                modification_time: chrono::Utc::now().timestamp_millis(),
                data_change: true,
                stats: Some(stats.to_string()),
                tags: None,
                deletion_vector: None,
                base_row_id: None,
                default_row_commit_version: None,
                clustering_provider: None,
            }));
            txns.push((partition, end));
        }

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
        let props = CommitProperties::default()
            .with_application_transactions(
                txns.iter()
                    .map(|&(p, end)| Transaction::new(app_id(p), end as i64))
                    .chain((term > 0).then(|| Transaction::new(TERM_APP, term as i64)))
                    .collect::<Vec<_>>(),
            )
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
            .map_err(delta("commit a chunk"))?;
        let version = commit.version() as i64;
        // The commit file is Delta's to write, and it does not fsync it.
        self.storage
            .sync(&format!("{TABLE_DIR}/_delta_log/{version:020}.json"))
            .await?;
        crate::failpoint::hit("archive-after-commit");
        // The commit returns the new state: no need to re-read the log.
        table.state = Some(commit.snapshot());
        let mut cov = self.coverage.lock().expect("coverage lock");
        cov.version = version;
        for (partition, end) in txns {
            if cov.h.len() <= partition as usize {
                cov.h.resize(partition as usize + 1, 0);
            }
            cov.h[partition as usize] = end;
        }
        Ok(CommitOutcome::Committed { version })
    }
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
    resume: Option<String>,
) -> Result<Vec<u8>, MasterError> {
    let enc = |e: String| MasterError::Encode(e);
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
        let chunk = |p: u32, i: u64| {
            let batch = crate::bench::paper_batches(2, 2, 10).remove(0);
            ChunkData {
                range: ChunkRange::dense(p, 2 * i, 2 * i + 2),
                batches: vec![SourceBatch::dense(p, 2 * i, 1_000, batch)],
                resume: None,
            }
        };
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
