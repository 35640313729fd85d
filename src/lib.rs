//! lambdaflow: the Lambda Architecture — batch layer, serving layer and speed
//! layer over one immutable master dataset — as one Rust program.
//!
//! ```text
//!  producers ──HTTP/NDJSON──▶ api ──▶ stream (embedded log: partition p, offset o)
//!                                       │
//!                  speed layer ◀────────┴────────▶ master dataset ─▶ batch layer
//!                       └──────────▶ serving layer ◀─────────────────────┘
//! ```
//!
//! Modules are named after the layers they implement; see `DESIGN.md`.

pub mod batch;
pub mod bench;
pub mod chunk;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod error;
pub mod failpoint;
pub mod frontend;
pub mod health;
pub mod human;
pub mod keys;
pub mod master;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod produce;
pub mod runs;
pub mod schema;
pub mod serving;
#[cfg(test)]
mod sim;
pub mod speed;
pub mod storage;
pub mod stream;
pub mod view;
