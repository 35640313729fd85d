//! A Postgres session as poolers and BI tools expect it: what `DISCARD ALL`,
//! `RESET`, `DEALLOCATE` and `SHOW ALL` answer, the transaction block a
//! failed statement aborts (25P02 until `ROLLBACK`), `statement_timeout`
//! bounded by the server's, and a detached copy of the connection's
//! settings that `SET`/`SHOW` hooks run against on the query pool.
//!
//! ```text
//!  statement ─▶ DISCARD / RESET / DEALLOCATE / SHOW ALL ─▶ answered here (the
//!     │           connection's store and settings, on its own runtime: O(1))
//!     ├─ in a failed transaction block, not COMMIT/ROLLBACK ─▶ 25P02
//!     ├─ SET / SHOW / BEGIN / COMMIT ─▶ hooks on the query pool, against a
//!     │     Detached copy; its settings and ParameterStatus go back after
//!     └─ a query ─▶ the query pool, within min(statement_timeout, sql timeout)
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use datafusion::common::ToDFSchema;
use datafusion::logical_expr::{EmptyRelation, LogicalPlan};
use datafusion::sql::sqlparser::ast::{DiscardObject, Reset, Statement};
use datafusion_postgres::pgwire::api::auth::DefaultServerParameterProvider;
use datafusion_postgres::pgwire::api::results::{
    DataRowEncoder, FieldFormat, FieldInfo, QueryResponse, Response, Tag,
};
use datafusion_postgres::pgwire::api::store::{MemPortalStore, PortalStore};
use datafusion_postgres::pgwire::api::{
    ClientInfo, ClientPortalStore, PgWireConnectionState, SessionExtensions, Type,
};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use datafusion_postgres::pgwire::messages::response::TransactionStatus;
use datafusion_postgres::pgwire::messages::startup::SecretKey;
use datafusion_postgres::pgwire::messages::{PgWireBackendMessage, ProtocolVersion};
use futures::{Sink, SinkExt};

use super::Prepared;
use super::conn::Names;
use crate::error::{Explain, Report};

/// Where `SET statement_timeout` keeps its value (datafusion-postgres's key).
const STATEMENT_TIMEOUT: &str = "statement_timeout_ms";

/// A statement the session refuses.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("current transaction is aborted, commands ignored until end of transaction block")]
    Aborted,
    #[error("prepared statement \"{0}\" does not exist")]
    NoSuchStatement(String),
    #[error("DISCARD ALL cannot run inside a transaction block")]
    InTransaction,
}

crate::explained!(SessionError);

impl Explain for SessionError {
    fn hint(&self) -> Option<String> {
        match self {
            SessionError::Aborted => Some("send ROLLBACK (or COMMIT) to end the block".into()),
            SessionError::NoSuchStatement(_) => None,
            SessionError::InTransaction => Some("send it after COMMIT or ROLLBACK".into()),
        }
    }

    fn sqlstate(&self) -> &'static str {
        match self {
            // in_failed_sql_transaction
            SessionError::Aborted => "25P02",
            // invalid_sql_statement_name
            SessionError::NoSuchStatement(_) => "26000",
            // active_sql_transaction
            SessionError::InTransaction => "25001",
        }
    }
}

impl From<SessionError> for PgWireError {
    fn from(e: SessionError) -> PgWireError {
        let r = Report::of(&e);
        let mut info = ErrorInfo::new("ERROR".into(), r.sqlstate.into(), r.message);
        info.hint = r.hint;
        PgWireError::UserError(Box::new(info))
    }
}

/// The settings a connection logged in with, for `RESET` and `DISCARD ALL`.
#[derive(Debug, Default)]
pub struct StartupSettings(pub HashMap<String, String>);

/// Whether `statement` ends a transaction block (and so runs in a failed one).
fn ends_block(statement: &Statement) -> bool {
    matches!(
        statement,
        Statement::Commit { .. } | Statement::Rollback { .. }
    )
}

/// 25P02 for anything but COMMIT/ROLLBACK in a failed transaction block.
pub fn check_aborted(status: TransactionStatus, statement: &Statement) -> Result<(), SessionError> {
    if status == TransactionStatus::Error && !ends_block(statement) {
        return Err(SessionError::Aborted);
    }
    Ok(())
}

/// The status after a statement answered `r`, as pgwire tracks it.
pub fn status_after(status: TransactionStatus, r: &PgWireResult<Response>) -> TransactionStatus {
    match r {
        Ok(Response::TransactionStart(_)) => status.to_in_transaction_state(),
        Ok(Response::TransactionEnd(_)) => status.to_idle_state(),
        Ok(Response::Error(_)) | Err(_) => status.to_error_state(),
        Ok(_) => status,
    }
}

/// Statements the SET/SHOW and transaction hooks answer (but those
/// answered here, [`is_own`]).
pub fn is_hook_statement(statement: &Statement) -> bool {
    !is_own(statement)
        && matches!(
            statement,
            Statement::Set(_)
                | Statement::ShowVariable { .. }
                | Statement::ShowStatus { .. }
                | Statement::ShowCatalogs { .. }
                | Statement::StartTransaction { .. }
                | Statement::Commit { .. }
                | Statement::Rollback { .. }
        )
}

/// The deadline of a statement: the client's `statement_timeout`, within
/// the server's (0 or unset: the server's).
pub fn statement_timeout(client: &(impl ClientInfo + ?Sized), server: Duration) -> Duration {
    client
        .metadata()
        .get(STATEMENT_TIMEOUT)
        .and_then(|ms| ms.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map_or(server, |ms| Duration::from_millis(ms).min(server))
}

fn is_show_all(statement: &Statement) -> bool {
    matches!(statement, Statement::ShowVariable { variable }
        if variable.len() == 1 && variable[0].value.eq_ignore_ascii_case("all"))
}

/// Statements answered here, not planned.
pub fn is_own(statement: &Statement) -> bool {
    matches!(
        statement,
        Statement::Discard { .. } | Statement::Reset(_) | Statement::Deallocate { .. }
    ) || is_show_all(statement)
}

/// The plan a Parse of one of [`is_own`]'s statements describes.
pub fn parse_plan(statement: &Statement) -> Option<PgWireResult<LogicalPlan>> {
    if !is_own(statement) {
        return None;
    }
    let fields = if is_show_all(statement) {
        ["name", "setting", "description"]
            .iter()
            .map(|n| arrow::datatypes::Field::new(*n, arrow::datatypes::DataType::Utf8, false))
            .collect()
    } else {
        Vec::new()
    };
    let schema = arrow::datatypes::Schema::new(fields);
    Some(
        schema
            .to_dfschema()
            .map(|s| {
                LogicalPlan::EmptyRelation(EmptyRelation {
                    produce_one_row: false,
                    schema: Arc::new(s),
                })
            })
            .map_err(|e| PgWireError::ApiError(Box::new(e))),
    )
}

/// Answers one of [`is_own`]'s statements on `client`; None for others.
pub fn answer<C>(
    statement: &Statement,
    client: &mut C,
    parameters: &DefaultServerParameterProvider,
    server_timeout: Duration,
) -> Option<PgWireResult<Response>>
where
    C: ClientInfo + ClientPortalStore + ?Sized,
    C::PortalStore: PortalStore,
{
    if !is_own(statement) {
        return None;
    }
    if let Err(e) = check_aborted(client.transaction_status(), statement) {
        return Some(Err(e.into()));
    }
    Some(match statement {
        Statement::Discard { object_type } => match object_type {
            DiscardObject::ALL => {
                if client.transaction_status() != TransactionStatus::Idle {
                    return Some(Err(SessionError::InTransaction.into()));
                }
                reset_all(client);
                deallocate_all(client);
                client.portal_store().clear_portals();
                if let Some(names) = client.session_extensions().get::<Mutex<Names>>() {
                    names.lock().expect("names").clear_portals();
                }
                Ok(Response::Execution(Tag::new("DISCARD ALL")))
            }
            other => Ok(Response::Execution(Tag::new(&format!("DISCARD {other}")))),
        },
        Statement::Reset(r) => {
            match &r.reset {
                Reset::ALL => reset_all(client),
                Reset::ConfigurationParameter(name) => {
                    let name = name.to_string().to_lowercase();
                    let key = match name.as_str() {
                        "statement_timeout" => STATEMENT_TIMEOUT.to_string(),
                        "time zone" | "timezone" => "timezone".to_string(),
                        _ => name,
                    };
                    let startup = startup_value(client, &key);
                    match startup {
                        Some(v) => client.metadata_mut().insert(key, v),
                        None => client.metadata_mut().remove(&key),
                    };
                }
            }
            Ok(Response::Execution(Tag::new("RESET")))
        }
        Statement::Deallocate { name, .. } => {
            if name.quote_style.is_none() && name.value.eq_ignore_ascii_case("all") {
                deallocate_all(client);
                Ok(Response::Execution(Tag::new("DEALLOCATE ALL")))
            } else if client.portal_store().get_statement(&name.value).is_some() {
                client.portal_store().rm_statement(&name.value);
                if let Some(names) = client.session_extensions().get::<Mutex<Names>>() {
                    names.lock().expect("names").remove_statement(&name.value);
                }
                Ok(Response::Execution(Tag::new("DEALLOCATE")))
            } else {
                Err(SessionError::NoSuchStatement(name.value.clone()).into())
            }
        }
        _ => show_all(client, parameters, server_timeout),
    })
}

fn startup_value<C: ClientInfo + ?Sized>(client: &C, key: &str) -> Option<String> {
    client
        .session_extensions()
        .get::<StartupSettings>()
        .and_then(|s| s.0.get(key).cloned())
}

/// The settings back to those of the login.
fn reset_all<C: ClientInfo + ?Sized>(client: &mut C) {
    if let Some(startup) = client.session_extensions().get::<StartupSettings>() {
        *client.metadata_mut() = startup.0.clone();
    }
}

/// Every named prepared statement removed.
fn deallocate_all<C>(client: &mut C)
where
    C: ClientInfo + ClientPortalStore + ?Sized,
    C::PortalStore: PortalStore,
{
    let Some(names) = client.session_extensions().get::<Mutex<Names>>() else {
        return;
    };
    let taken = names.lock().expect("names").take_statements();
    for n in taken {
        client.portal_store().rm_statement(&n);
    }
    // The unnamed statement too, as Postgres drops it.
    client.portal_store().rm_statement("");
}

/// `SHOW ALL`: one row per setting, as Postgres answers it.
fn show_all<C: ClientInfo + ?Sized>(
    client: &C,
    p: &DefaultServerParameterProvider,
    server_timeout: Duration,
) -> PgWireResult<Response> {
    let m = client.metadata();
    let get = |k: &str, default: &str| m.get(k).cloned().unwrap_or_else(|| default.to_string());
    let timeout = statement_timeout(client, server_timeout);
    let rows: Vec<(&str, String, &str)> = vec![
        (
            "application_name",
            get("application_name", ""),
            "Sets the application name to be reported in statistics and logs.",
        ),
        (
            "bytea_output",
            get("bytea_output", "hex"),
            "Sets the output format for bytea.",
        ),
        (
            "client_encoding",
            get("client_encoding", "UTF8"),
            "Sets the client's character set encoding.",
        ),
        (
            "DateStyle",
            get("datestyle", &p.date_style),
            "Sets the display format for date and time values.",
        ),
        (
            "default_transaction_read_only",
            if p.default_transaction_read_only {
                "on"
            } else {
                "off"
            }
            .into(),
            "Sets the default read-only status of new transactions.",
        ),
        (
            "extra_float_digits",
            get("extra_float_digits", "1"),
            "Sets the number of digits displayed for floating-point values.",
        ),
        (
            "integer_datetimes",
            if p.integer_datetimes { "on" } else { "off" }.into(),
            "Shows whether datetimes are integer based.",
        ),
        (
            "IntervalStyle",
            get("intervalstyle", &p.interval_style),
            "Sets the display format for interval values.",
        ),
        (
            "is_superuser",
            if p.is_superuser { "on" } else { "off" }.into(),
            "Shows whether the current user is a superuser.",
        ),
        (
            "search_path",
            get("search_path", &p.search_path),
            "Sets the schema search order for names that are not schema-qualified.",
        ),
        (
            "server_encoding",
            p.server_encoding.clone(),
            "Shows the server (database) character set encoding.",
        ),
        (
            "server_version",
            p.server_version.clone(),
            "Shows the server version.",
        ),
        (
            "standard_conforming_strings",
            if p.standard_conforming_strings {
                "on"
            } else {
                "off"
            }
            .into(),
            "Causes '...' strings to treat backslashes literally.",
        ),
        (
            "statement_timeout",
            format!("{}ms", timeout.as_millis()),
            "Sets the maximum allowed duration of any statement (at most the server's sql timeout).",
        ),
        (
            "TimeZone",
            get("timezone", &p.time_zone),
            "Sets the time zone for displaying and interpreting time stamps.",
        ),
        (
            "transaction_isolation",
            "read committed".into(),
            "Sets the current transaction's isolation level.",
        ),
    ];
    let fields: Arc<Vec<FieldInfo>> = Arc::new(
        ["name", "setting", "description"]
            .iter()
            .map(|n| FieldInfo::new(n.to_string(), None, None, Type::TEXT, FieldFormat::Text))
            .collect(),
    );
    let mut data = Vec::with_capacity(rows.len());
    for (name, setting, description) in rows {
        let mut e = DataRowEncoder::new(fields.clone());
        e.encode_field(&Some(name))?;
        e.encode_field(&Some(setting.as_str()))?;
        e.encode_field(&Some(description))?;
        data.push(Ok(e.take_row()));
    }
    Ok(Response::Query(QueryResponse::new(
        fields,
        futures::stream::iter(data),
    )))
}

/// A copy of a connection's settings and transaction status that hooks run
/// against off the connection's runtime; what they change and send is
/// applied to the connection afterwards ([`Detached::settle`]).
pub struct Detached {
    addr: SocketAddr,
    secure: bool,
    protocol: ProtocolVersion,
    status: TransactionStatus,
    metadata: HashMap<String, String>,
    extensions: SessionExtensions,
    store: MemPortalStore<Prepared>,
    sent: Vec<PgWireBackendMessage>,
}

impl Detached {
    pub fn of(client: &(impl ClientInfo + ?Sized)) -> Detached {
        Detached {
            addr: client.socket_addr(),
            secure: client.is_secure(),
            protocol: client.protocol_version(),
            status: client.transaction_status(),
            metadata: client.metadata().clone(),
            extensions: SessionExtensions::new(),
            store: MemPortalStore::new(),
            sent: Vec::new(),
        }
    }

    /// Its settings to `client`, and the messages hooks sent.
    pub async fn settle<C>(self, client: &mut C) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        *client.metadata_mut() = self.metadata;
        for m in self.sent {
            client.feed(m).await?;
        }
        Ok(())
    }
}

impl ClientInfo for Detached {
    fn socket_addr(&self) -> SocketAddr {
        self.addr
    }

    fn is_secure(&self) -> bool {
        self.secure
    }

    fn protocol_version(&self) -> ProtocolVersion {
        self.protocol
    }

    fn set_protocol_version(&mut self, version: ProtocolVersion) {
        self.protocol = version;
    }

    fn pid_and_secret_key(&self) -> (i32, SecretKey) {
        (0, SecretKey::I32(0))
    }

    fn set_pid_and_secret_key(&mut self, _pid: i32, _secret_key: SecretKey) {}

    fn state(&self) -> PgWireConnectionState {
        PgWireConnectionState::QueryInProgress
    }

    fn set_state(&mut self, _new_state: PgWireConnectionState) {}

    fn transaction_status(&self) -> TransactionStatus {
        self.status
    }

    fn set_transaction_status(&mut self, new_status: TransactionStatus) {
        self.status = new_status;
    }

    fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut HashMap<String, String> {
        &mut self.metadata
    }

    fn session_extensions(&self) -> &SessionExtensions {
        &self.extensions
    }

    fn sni_server_name(&self) -> Option<&str> {
        None
    }

    fn client_certificates<'a>(
        &self,
    ) -> Option<&[tokio_rustls::rustls::pki_types::CertificateDer<'a>]> {
        None
    }
}

impl ClientPortalStore for Detached {
    type PortalStore = MemPortalStore<Prepared>;

    fn portal_store(&self) -> &Self::PortalStore {
        &self.store
    }
}

impl Sink<PgWireBackendMessage> for Detached {
    type Error = std::io::Error;

    fn poll_ready(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn start_send(mut self: Pin<&mut Self>, item: PgWireBackendMessage) -> Result<(), Self::Error> {
        self.sent.push(item);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
}
