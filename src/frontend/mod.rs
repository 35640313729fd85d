//! The query surfaces, in one wing: everything a client talks to.
//!
//! ```text
//!  clients ──HTTP──▶ conn (admission) ──▶ http (events, views, SQL, status, metrics, dashboard)
//!          ──pgwire─▶ conn (admission) ──▶ pg (simple + extended protocol)
//!                                             │ both through auth (token scopes)
//!                                             ▼
//!                                          serving (snapshot, merge, query pool)
//! ```
//!
//! [`serve`] binds the listeners in front of a node; [`conn`] admits and
//! bounds connections for both protocols; [`auth`] checks tokens for both;
//! [`client`] is the HTTP client the CLI and the producer use; [`status`]
//! is the `/v1/status` reply both the server and the CLI use.

pub mod auth;
pub mod client;
pub mod conn;
pub mod http;
pub mod pg;
pub mod serve;
pub mod status;
