//! The embedded log as a [`Source`]: dense offsets, each frame's ingest
//! time, retention by deleting whole segments below H.

use std::time::Duration;

use super::{Log, LogError};
use crate::stream::source::{Source, SourceBatch, SourceError};

/// A damaged frame is damage at its first offset, for the speed layer to
/// serve what precedes it; the rest is the log's own error.
impl From<LogError> for SourceError {
    fn from(e: LogError) -> SourceError {
        match e {
            LogError::Corrupt {
                partition,
                first_offset,
                ..
            } => SourceError::Damaged {
                partition,
                offset: first_offset,
                error: Box::new(e),
            },
            e => SourceError::backend(e),
        }
    }
}

/// The embedded log as a source: dense offsets, each frame's ingest time.
#[async_trait::async_trait]
impl Source for Log {
    fn describe(&self) -> String {
        format!("embedded log {}", self.dir().display())
    }

    fn partitions(&self) -> u32 {
        Log::partitions(self)
    }

    fn keeps_unarchived(&self) -> bool {
        true
    }

    fn release_below(&self, p: u32, end: u64) -> Result<Option<u64>, SourceError> {
        Ok(Some(self.delete_below(p, end)?))
    }

    fn end(&self, p: u32) -> Result<u64, SourceError> {
        Ok(self.end_offset(p)?)
    }

    fn start(&self, p: u32) -> Result<u64, SourceError> {
        Ok(self.start_offset(p)?)
    }

    async fn read(
        &self,
        p: u32,
        from: u64,
        until: u64,
        max_events: usize,
    ) -> Result<Vec<SourceBatch>, SourceError> {
        let until = until.min(self.end_offset(p)?);
        if from >= until {
            return Ok(Vec::new());
        }
        let max = max_events.min((until - from) as usize).max(1);
        let mut out = Vec::new();
        for b in Log::read(self, p, from, max)? {
            if b.first_offset >= until {
                break;
            }
            let keep = (until - b.first_offset).min(b.batch.num_rows() as u64) as usize;
            let mut batch = b.batch.slice(0, keep);
            if let Some(events) = self.events_schema() {
                batch =
                    crate::schema::conform(&batch, events).map_err(|e| SourceError::Conform {
                        partition: p,
                        offset: b.first_offset,
                        detail: e.to_string(),
                    })?;
            }
            out.push(SourceBatch::dense(
                p,
                b.first_offset,
                b.ingest_time_ms,
                batch,
            ));
        }
        Ok(out)
    }

    async fn wait(&self, p: u32, from: u64, timeout: Duration) {
        let Ok(mut sub) = self.subscribe(p) else {
            tokio::time::sleep(timeout).await;
            return;
        };
        // Subscribed first, then checked: an append in between is not missed.
        let _ = tokio::time::timeout(timeout, sub.wait_for(|&end| end > from)).await;
    }
}
