//! The cluster's wing: who drives, and what the driver does.
//!
//! ```text
//!  nodes on one storage root ── lease.json (term, holder, acked marks) ── one driver
//!        │                                                                   │
//!        └─ followers: serve reads, forward nothing, watch CURRENT      archive · batch loop
//!                                                                           · retention · repair
//! ```
//!
//! [`lease`] is the driver lease (compare-and-swap on the storage root,
//! fencing of acknowledgements and commits); [`driver`] is what its holder
//! runs: startup checks, the archive and batch loops, retention and repair.
//! The driver hands new views to the rest of the node as a
//! [`crate::serving::Adopt`] message; `node.rs` wires it to the speed layer,
//! so the driver never names the speed layer.

pub mod driver;
pub mod identity;
pub mod lease;
