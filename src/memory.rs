//! The process's heap, as the allocator sees it: what the program holds
//! (`allocated`) beside what the allocator keeps from the system
//! (`resident`). A soak tells a leak (allocated grows) from allocator
//! retention (resident grows, allocated does not) by these two.
//!
//! The `lambdaflow` binary allocates with jemalloc (`main.rs`): with glibc's
//! malloc, every batch run's transient buffers — freed on threads that come
//! and go with the blocking pool — left resident memory creeping by a few MiB
//! a minute in the bounded soak (RELIABILITY.md, "Soak").

use serde::Serialize;

/// Bytes, from jemalloc's statistics (`stats.*`).
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct MemoryReport {
    /// Bytes the program has allocated and not freed.
    pub allocated: u64,
    /// Bytes in pages holding allocations (allocated plus fragmentation).
    pub active: u64,
    /// Bytes of the allocator's mappings resident in memory (RSS it owns).
    pub resident: u64,
    /// Bytes kept mapped but returned to the system (not resident).
    pub retained: u64,
}

/// The allocator's current figures; `None` when jemalloc cannot report them.
///
/// In a test binary, which keeps the system allocator, jemalloc reports only
/// its own bookkeeping.
pub fn report() -> Option<MemoryReport> {
    use tikv_jemalloc_ctl::{epoch, stats};
    // The statistics are a snapshot taken when the epoch advances.
    epoch::advance().ok()?;
    Some(MemoryReport {
        allocated: stats::allocated::read().ok()? as u64,
        active: stats::active::read().ok()? as u64,
        resident: stats::resident::read().ok()? as u64,
        retained: stats::retained::read().ok()? as u64,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_allocator_reports_its_figures() {
        let m = super::report().expect("jemalloc statistics");
        assert!(
            m.resident >= m.active && m.active >= m.allocated,
            "resident ≥ active ≥ allocated: {m:?}"
        );
    }
}
