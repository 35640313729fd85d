//! Where reads run: a runtime of their own, a bounded number at once, a
//! bounded queue, and a deadline for each.
//!
//! ```text
//!  GET /v1/views/{name}, POST /v1/sql
//!        │ a slot free? ── no ──▶ wait in the queue (≤ max_queued, ≤ queue_wait)
//!        │                          └─ full or too long ──▶ 503 + Retry-After
//!        ▼
//!  query runtime (own threads, lower CPU priority) ── deadline ──▶ 408
//! ```
//!
//! Ingest acknowledgements, micro-batches and archive commits run on the
//! main runtime. A query that merges a large view, sorts, or encodes a wide
//! reply runs here instead, so however heavy it is, it can only take its own
//! threads, and the OS schedules them after the layers' (nice 10).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

/// The stack of a query thread.
pub const QUERY_STACK_BYTES: usize = 32 << 20;

/// How many reads run and wait at once.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// Reads running at once.
    pub running: usize,
    /// Reads waiting for a slot, at most; beyond it 503.
    pub queued: usize,
    /// How long a read may wait for a slot before it gets 503.
    pub queue_wait: Duration,
    /// Threads of the query runtime.
    pub threads: usize,
}

impl Default for PoolLimits {
    fn default() -> Self {
        PoolLimits {
            running: 4,
            queued: 64,
            queue_wait: Duration::from_secs(2),
            threads: 2,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("too many queries at once: {running} running and {queued} waiting")]
    Busy { running: usize, queued: usize },
    #[error(
        "the query ran longer than {} and was stopped",
        humantime::format_duration(*.0)
    )]
    Timeout(Duration),
    #[error("the query failed inside the query runtime: {0}")]
    Panicked(String),
}

crate::explained!(PoolError);

impl crate::error::Explain for PoolError {
    fn hint(&self) -> Option<String> {
        match self {
            PoolError::Busy { .. } => Some("retry after a short pause".into()),
            PoolError::Timeout(_) => {
                Some("filter or aggregate more, or query a smaller view".into())
            }
            PoolError::Panicked(_) => None,
        }
    }

    fn sqlstate(&self) -> &'static str {
        match self {
            // too_many_connections: what poolers and drivers retry on
            PoolError::Busy { .. } => "53300",
            // query_canceled, as for statement_timeout
            PoolError::Timeout(_) => "57014",
            PoolError::Panicked(_) => "XX000",
        }
    }
}

/// The runtime reads run on, and its admission.
pub struct QueryPool {
    runtime: Option<tokio::runtime::Runtime>,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    limits: PoolLimits,
}

impl QueryPool {
    pub fn new(limits: PoolLimits) -> std::io::Result<QueryPool> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(limits.threads.max(1))
            .thread_name("lambdaflow-query")
            // Planning and evaluating recurse over a statement's tree; the
            // depth is bounded (see `guard`), the stack holds that bound
            // with room to spare. Only the pages touched are resident.
            .thread_stack_size(QUERY_STACK_BYTES)
            .on_thread_start(|| {
                // Linux keeps a nice value per thread: these yield the CPU
                // to ingest and the layers. Failure only loses the hint.
                // SAFETY: setpriority has no memory effects.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, 0, 10);
                }
            })
            .enable_all()
            .build()?;
        Ok(QueryPool {
            runtime: Some(runtime),
            slots: Arc::new(Semaphore::new(limits.running.max(1))),
            waiting: AtomicUsize::new(0),
            limits,
        })
    }

    pub fn limits(&self) -> PoolLimits {
        self.limits
    }

    /// A slot, once one is free (within the queue's bounds).
    async fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, PoolError> {
        let busy = || PoolError::Busy {
            running: self.limits.running,
            queued: self.waiting.load(Ordering::Relaxed),
        };
        match self.slots.clone().try_acquire_owned() {
            Ok(p) => Ok(p),
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.limits.queued {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Err(busy());
                }
                let waited = tokio::time::timeout(
                    self.limits.queue_wait,
                    self.slots.clone().acquire_owned(),
                )
                .await;
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                match waited {
                    Ok(Ok(p)) => Ok(p),
                    _ => Err(busy()),
                }
            }
        }
    }

    /// Runs small, bounded `work` (a point read: one group, every index it
    /// needs built) where the request arrived, with a slot and the deadline
    /// like [`QueryPool::run`]. Handing it to the query runtime costs more
    /// than the work: two thread wake-ups and context switches a request,
    /// which capped point reads at a fifth of what the HTTP server answers.
    pub async fn run_here<T, F>(&self, deadline: Duration, work: F) -> Result<T, PoolError>
    where
        F: Future<Output = T>,
    {
        let _permit = self.admit().await?;
        tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| PoolError::Timeout(deadline))
    }

    /// Runs `work` on the query runtime once a slot is free, stopping it at
    /// `deadline`. The task owns its slot and its deadline, and the caller's
    /// [`Running`] guard owns the task: a caller that goes away (a client
    /// that hung up, a Postgres cancel) aborts it, and its slot is free at
    /// its next await point instead of when the query would have ended.
    pub async fn run<T, F>(&self, deadline: Duration, work: F) -> Result<T, PoolError>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let permit = self.admit().await?;
        // The slot goes with the task once it starts; until then the
        // caller's guard holds it, so a task that never got a thread (both
        // busy) does not keep its slot after its caller gave up.
        let slot = Arc::new(std::sync::Mutex::new(Some(permit)));
        let taken = slot.clone();
        let handle = self
            .runtime
            .as_ref()
            .expect("query runtime")
            .spawn(async move {
                let Some(_permit) = taken.lock().expect("query slot").take() else {
                    return None; // the caller is gone
                };
                Some(tokio::time::timeout(deadline, work).await)
            });
        let mut running = Running { task: handle, slot };
        // The task's own deadline stops it at an await point; this one
        // answers the caller on time even if the task is inside a long call.
        match tokio::time::timeout(deadline + Duration::from_millis(50), &mut running.task).await {
            Ok(Ok(Some(Ok(v)))) => Ok(v),
            Ok(Ok(Some(Err(_)) | None)) | Err(_) => Err(PoolError::Timeout(deadline)),
            Ok(Err(e)) => Err(PoolError::Panicked(e.to_string())),
        }
    }
}

/// A query's task, aborted when its caller is done with it — answered,
/// timed out, or dropped mid-way — and its slot, if the task has not
/// taken it yet. Aborting a finished task does nothing.
struct Running<T> {
    task: tokio::task::JoinHandle<T>,
    slot: Arc<std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>>,
}

impl<T> Drop for Running<T> {
    fn drop(&mut self) {
        self.task.abort();
        self.slot.lock().expect("query slot").take();
    }
}

impl Drop for QueryPool {
    fn drop(&mut self) {
        // Dropped from async code at shutdown: do not block on its tasks.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn beyond_its_queue_a_read_is_refused_and_a_slow_one_is_stopped() {
        let pool = Arc::new(
            QueryPool::new(PoolLimits {
                running: 1,
                queued: 1,
                queue_wait: Duration::from_secs(2),
                threads: 1,
            })
            .unwrap(),
        );
        let slow = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.run(Duration::from_millis(300), async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let queued = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(Duration::from_secs(5), async { 7 }).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let third = pool.run(Duration::from_secs(5), async { 8 }).await;
        assert!(
            matches!(third, Err(PoolError::Busy { .. })),
            "one running, one queued: the third is refused: {third:?}"
        );
        assert!(matches!(slow.await.unwrap(), Err(PoolError::Timeout(_))));
        // The slow one was stopped at its deadline, so the queued one ran.
        assert_eq!(queued.await.unwrap().unwrap(), 7);
    }

    #[tokio::test]
    async fn a_task_that_never_got_a_thread_gives_its_slot_back_with_its_caller() {
        let pool = Arc::new(
            QueryPool::new(PoolLimits {
                running: 2,
                queued: 0,
                queue_wait: Duration::from_millis(100),
                threads: 1,
            })
            .unwrap(),
        );
        // The one thread is stuck in a synchronous call for 1.5 s.
        let stuck = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.run(Duration::from_millis(100), async {
                    std::thread::sleep(Duration::from_millis(1_500));
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The second slot's task waits for the thread; its caller times out.
        let waiting = pool.run(Duration::from_millis(100), async { 1 }).await;
        assert!(matches!(waiting, Err(PoolError::Timeout(_))), "{waiting:?}");
        assert!(matches!(stuck.await.unwrap(), Err(PoolError::Timeout(_))));
        // The stuck one still holds its slot (its thread is busy), the
        // waiting one's caller is gone: one slot is free at once.
        let t = std::time::Instant::now();
        let free = pool.slots.clone().try_acquire_owned();
        assert!(
            free.is_ok(),
            "the task that never ran gave its slot back ({:?} after)",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_frees_its_slot() {
        let pool = Arc::new(
            QueryPool::new(PoolLimits {
                running: 1,
                queued: 0,
                queue_wait: Duration::from_millis(100),
                threads: 1,
            })
            .unwrap(),
        );
        let ran = Arc::new(AtomicUsize::new(0));
        let caller = {
            let (pool, ran) = (pool.clone(), ran.clone());
            tokio::spawn(async move {
                pool.run(Duration::from_secs(3600), async move {
                    loop {
                        ran.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A client hung up: the server drops the future that waited.
        caller.abort();
        let _ = caller.await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let after = ran.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            ran.load(Ordering::Relaxed),
            after,
            "the query stops with its caller instead of running for its hour"
        );
        let next = pool.run(Duration::from_secs(5), async { 9 }).await;
        assert!(
            matches!(next, Ok(9)),
            "the one slot is free again: {next:?}"
        );
    }
}
