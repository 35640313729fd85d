//! The Postgres wire protocol over the views (`[pg] listen`): psql, Grafana,
//! Metabase and every language's driver read the views as read-only tables,
//! with the answers, limits and scopes of `POST /v1/sql`.
//!
//! ```text
//!  client ──TCP (TLS if [pg] tls or [http] tls)──▶ admission, deadlines, message
//!     │                                            bound: see `conn`
//!     │   startup: the password is a token with scope "query"
//!     ├─ simple query ─▶ query pool: parse (Postgres dialect, pg_catalog rewrites)
//!     │     DISCARD / RESET / DEALLOCATE / SHOW ALL ─▶ the session (`session`)
//!     │     in a failed transaction block ─▶ 25P02 until ROLLBACK
//!     │     SET / SHOW / BEGIN / COMMIT ─▶ hooks on the query pool, per connection
//!     │     anything but a query ───────▶ 25006, as HTTP's 403
//!     │     a query ─▶ query pool: plan, one snapshot, memory, time and row
//!     │                limits; the deadline is min(statement_timeout, sql timeout)
//!     └─ extended (Parse/Bind/Execute, `$1` parameters)
//!           Parse ─▶ query pool: parse and plan, once
//!           `SELECT … FROM view WHERE key = $1` ─▶ point read: one group merged
//!           anything else ─▶ run as above at Execute
//!     a cancel request (psql's Ctrl-C, psycopg's cancel()) ─▶ pgwire drops the
//!     statement's future, and the query pool aborts its task and frees its slot
//! ```
//!
//! Nothing a client sends is parsed, planned or answered on the runtime
//! that acknowledges ingest: a megabyte of SQL or 30,000 `SET`s in one
//! message take the query runtime's threads, at its lower priority.
//!
//! Built on pgwire (the protocol) and the pieces of datafusion-postgres that
//! make DataFusion look like Postgres to clients (`pg_catalog`, the dialect
//! rewrites, Arrow ⇄ Postgres types, `SET`/`SHOW`/transaction statements).
//! Its ready-made handler serves one fixed `SessionContext`; lambdaflow
//! plans each query in a session of its own (the snapshot it reads, its
//! memory pool), runs it on the query pool, and answers key lookups without
//! a scan, so the handlers are ours; so is the connection loop (`conn`),
//! for its deadlines and bounds.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::common::ParamValues;
use datafusion::logical_expr::{BinaryExpr, Expr, LogicalPlan, Operator};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion_postgres::QueryHook;
use datafusion_postgres::arrow_pg::datatypes::df::deserialize_parameters;
use datafusion_postgres::arrow_pg::datatypes::{
    arrow_schema_to_pg_fields, encode_recordbatch, into_pg_type,
};
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog;
use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::pgwire::api::auth::{
    DefaultServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use datafusion_postgres::pgwire::api::cancel::DefaultCancelHandler;
use datafusion_postgres::pgwire::api::portal::{Format, Portal};
use datafusion_postgres::pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use datafusion_postgres::pgwire::api::results::{FieldInfo, QueryResponse, Response};
use datafusion_postgres::pgwire::api::stmt::QueryParser;
use datafusion_postgres::pgwire::api::store::PortalStore;
use datafusion_postgres::pgwire::api::{
    ClientInfo, ClientPortalStore, ConnectionManager, PgWireConnectionState, PgWireServerHandlers,
    Type,
};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use datafusion_postgres::pgwire::messages::response::TransactionStatus;
use datafusion_postgres::pgwire::messages::startup::Authentication;
use datafusion_postgres::pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use datafusion_postgres::pgwire::types::format::FormatOptions;
use futures::{Sink, SinkExt, stream};

use crate::config::Scope;
use crate::error::Report;
use crate::frontend::auth::Auth;
use crate::serving::Serving;
use crate::serving::pool::QueryPool;
use crate::serving::query::{self, Catalog, QueryError, SqlLimits};

mod conn;
mod session;

pub use conn::{ConnError, MAX_MESSAGE, PgLimits, serve};

/// An error as a Postgres client gets it: message, detail, hint, SQLSTATE.
fn pg_error(r: Report) -> PgWireError {
    let mut info = ErrorInfo::new("ERROR".into(), r.sqlstate.into(), r.message);
    info.detail = r.detail;
    info.hint = r.hint;
    PgWireError::UserError(Box::new(info))
}

fn query_error(e: QueryError) -> PgWireError {
    pg_error(Report::of(&e))
}

fn pool_error(e: crate::serving::pool::PoolError) -> PgWireError {
    query_error(QueryError::Pool(e))
}

/// What the endpoint did since start (`/v1/status`).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct PgCounters {
    /// Connections accepted, and refused over `max_connections`.
    pub connections: AtomicU64,
    pub refused: AtomicU64,
    /// Logins turned away (bad token, no TLS).
    pub denied: AtomicU64,
    /// Queries planned and run, and key lookups answered as point reads.
    pub queries: AtomicU64,
    pub point_reads: AtomicU64,
    /// Queries answered with an error.
    pub errors: AtomicU64,
    /// Connections closed because they had not logged in within
    /// `pg.startup_timeout`, or sent nothing for `pg.idle_timeout`.
    pub startup_closed: AtomicU64,
    pub idle_closed: AtomicU64,
    /// Messages refused for their length (over [`MAX_MESSAGE`]).
    pub too_large: AtomicU64,
}

/// The counters now, for `/v1/status`.
impl Clone for PgCounters {
    fn clone(&self) -> PgCounters {
        let c = |a: &AtomicU64| AtomicU64::new(a.load(Ordering::Relaxed));
        PgCounters {
            connections: c(&self.connections),
            refused: c(&self.refused),
            denied: c(&self.denied),
            queries: c(&self.queries),
            point_reads: c(&self.point_reads),
            errors: c(&self.errors),
            startup_closed: c(&self.startup_closed),
            idle_closed: c(&self.idle_closed),
            too_large: c(&self.too_large),
        }
    }
}

/// The Postgres endpoint of a node: its handlers, shared by connections.
pub struct PgServer {
    service: Arc<Service>,
    startup: Arc<Startup>,
    cancel: Arc<DefaultCancelHandler>,
}

impl PgServer {
    /// `require_tls`: refuse clients that did not negotiate TLS (when the
    /// endpoint has a certificate, as an HTTPS listener serves no HTTP).
    pub fn new(
        serving: Arc<Serving>,
        catalog: &Catalog,
        pool: Arc<QueryPool>,
        auth: Arc<Auth>,
        limits: SqlLimits,
        require_tls: bool,
        counters: Arc<PgCounters>,
    ) -> PgServer {
        // pg_catalog and the functions clients call (`format_type`,
        // `pg_table_is_visible`, …) over the views' catalog; its tables are
        // computed from the catalog when read, so they list the views.
        let planner = SessionContext::new_with_state(catalog.context().state());
        setup_pg_catalog(&planner, query::CATALOG, EmptyContextProvider)
            .expect("the catalog the views are in exists");
        let planner = Arc::new(Catalog::from_context(planner));
        let connections = Arc::new(ConnectionManager::new());
        let service = Arc::new(Service {
            parser: Arc::new(Parser {
                sql: Arc::new(PostgresCompatibilityParser::new()),
                hooks: Arc::new(hooks()),
                planner: planner.clone(),
                serving: serving.clone(),
                pool: pool.clone(),
                limits,
            }),
            serving,
            planner,
            pool,
            limits,
            parameters: parameters(),
            counters: counters.clone(),
        });
        PgServer {
            service,
            startup: Arc::new(Startup {
                auth,
                parameters: parameters(),
                connections: connections.clone(),
                require_tls,
                counters,
            }),
            cancel: Arc::new(DefaultCancelHandler::new(connections)),
        }
    }
}

fn parameters() -> DefaultServerParameterProvider {
    let mut p = DefaultServerParameterProvider::default();
    // What psql prints at connect, and what drivers gate features on.
    p.server_version = "16.0 (lambdaflow)".into();
    p.is_superuser = false;
    p.default_transaction_read_only = true;
    p
}

fn hooks() -> Vec<Arc<dyn QueryHook>> {
    vec![Arc::new(SetShowHook), Arc::new(TransactionStatementHook)]
}

impl PgWireServerHandlers for PgServer {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.service.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.service.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }

    fn cancel_handler(&self) -> Arc<impl datafusion_postgres::pgwire::api::cancel::CancelHandler> {
        self.cancel.clone()
    }
}

/// Startup: with tokens configured, the password must be one with scope
/// `query` (the user name is free); without, anyone on loopback is in.
struct Startup {
    auth: Arc<Auth>,
    parameters: DefaultServerParameterProvider,
    connections: Arc<ConnectionManager>,
    require_tls: bool,
    counters: Arc<PgCounters>,
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                if self.require_tls && !client.is_secure() {
                    self.counters.denied.fetch_add(1, Ordering::Relaxed);
                    let mut info = ErrorInfo::new(
                        "FATAL".into(),
                        // invalid_authorization_specification
                        "28000".into(),
                        "this endpoint requires TLS".into(),
                    );
                    info.hint = Some("connect with sslmode=require (or verify-full)".into());
                    return Err(PgWireError::UserError(Box::new(info)));
                }
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                if self.auth.enabled() {
                    client.set_state(PgWireConnectionState::AuthenticationInProgress);
                    client
                        .send(PgWireBackendMessage::Authentication(
                            Authentication::CleartextPassword,
                        ))
                        .await?;
                } else {
                    self.admit(client).await?;
                }
            }
            PgWireFrontendMessage::PasswordMessageFamily(pwd) => {
                let pwd = pwd.into_password()?;
                if let Err(denied) = self.auth.check(pwd.password.as_bytes(), Scope::Query) {
                    self.counters.denied.fetch_add(1, Ordering::Relaxed);
                    let r = Report::of(&denied);
                    let mut info = ErrorInfo::new("FATAL".into(), r.sqlstate.into(), r.message);
                    info.hint = r.hint;
                    return Err(PgWireError::UserError(Box::new(info)));
                }
                self.admit(client).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

impl Startup {
    async fn admit<C>(&self, client: &mut C) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (pid, key) = datafusion_postgres::pgwire::api::PidSecretKeyGenerator::generate(
            &datafusion_postgres::pgwire::api::RandomPidSecretKeyGenerator::default(),
            client,
        );
        client.set_pid_and_secret_key(pid, key.clone());
        // Registered for cancel requests (psql's Ctrl-C) while connected.
        let (handle, guard) = self.connections.register(pid, key);
        client.session_extensions().insert(handle);
        client.session_extensions().insert(guard);
        // What `RESET ALL` and `DISCARD ALL` go back to.
        client
            .session_extensions()
            .insert(session::StartupSettings(client.metadata().clone()));
        finish_authentication(client, &self.parameters).await
    }
}

/// A parsed statement: its text, its AST and logical plan (planned once, at
/// Parse), and whether it is a key lookup the point-read path answers.
#[derive(Clone, Debug)]
pub struct Prepared {
    statement: Statement,
    plan: LogicalPlan,
    point: Option<Point>,
}

/// `SELECT cols FROM view WHERE key = $n`: one group of the view, merged
/// from its batch row and realtime states without a scan.
#[derive(Clone, Debug)]
struct Point {
    view: usize,
    /// The key's column among the view's states.
    key: usize,
    /// Which parameter holds the key (0-based).
    param: usize,
    /// The output columns, by index into the view's columns.
    columns: Vec<usize>,
}

/// The point lookup `plan` is, if it is one: a projection of plain columns
/// of one view, filtered by one key column equal to a parameter.
fn point_of(plan: &LogicalPlan, serving: &Serving) -> Option<Point> {
    let (columns, filter) = match plan {
        LogicalPlan::Projection(p) => {
            let LogicalPlan::Filter(f) = p.input.as_ref() else {
                return None;
            };
            let cols = p
                .expr
                .iter()
                .map(|e| match e {
                    Expr::Column(c) => Some(c.name.clone()),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?;
            (Some(cols), f)
        }
        LogicalPlan::Filter(f) => (None, f),
        _ => return None,
    };
    let LogicalPlan::TableScan(scan) = filter.input.as_ref() else {
        return None;
    };
    if !scan.filters.is_empty() || scan.fetch.is_some() {
        return None;
    }
    let view = serving.view_index(scan.table_name.table()).ok()?;
    let v = &serving.views()[view];
    let Expr::BinaryExpr(BinaryExpr {
        left,
        op: Operator::Eq,
        right,
    }) = &filter.predicate
    else {
        return None;
    };
    let (col, ph) = match (left.as_ref(), right.as_ref()) {
        (Expr::Column(c), Expr::Placeholder(p)) | (Expr::Placeholder(p), Expr::Column(c)) => (c, p),
        _ => return None,
    };
    let key = v.key_column(&col.name)?;
    let param = ph
        .id
        .strip_prefix('$')?
        .parse::<usize>()
        .ok()?
        .checked_sub(1)?;
    let schema = v.output_schema();
    let columns = match columns {
        Some(names) => names
            .iter()
            .map(|n| schema.index_of(n).ok())
            .collect::<Option<Vec<_>>>()?,
        None => (0..schema.fields().len()).collect(),
    };
    Some(Point {
        view,
        key,
        param,
        columns,
    })
}

/// The parameters of `plan`, `$1` first, with the types DataFusion
/// inferred (None where it could not).
fn parameter_types(plan: &LogicalPlan) -> PgWireResult<Vec<Option<DataType>>> {
    let types = plan
        .get_parameter_types()
        .map_err(|e| query_error(QueryError::from_df(e, &SqlLimits::default())))?;
    let mut ordered: Vec<(usize, Option<DataType>)> = types
        .into_iter()
        .filter_map(|(id, ty)| Some((id.strip_prefix('$')?.parse().ok()?, ty)))
        .collect();
    ordered.sort_by_key(|(n, _)| *n);
    Ok(ordered.into_iter().map(|(_, ty)| ty).collect())
}

/// Parses and plans statements, on the query pool: a statement of a
/// megabyte, or a message of 100,000 `SET`s, takes the query runtime's
/// threads, not those that acknowledge ingest.
#[derive(Clone)]
pub struct Parser {
    sql: Arc<PostgresCompatibilityParser>,
    hooks: Arc<Vec<Arc<dyn QueryHook>>>,
    planner: Arc<Catalog>,
    serving: Arc<Serving>,
    pool: Arc<QueryPool>,
    limits: SqlLimits,
}

impl Parser {
    /// The statements of `text`, in the Postgres dialect (with the
    /// rewrites that map Postgres idioms to DataFusion). Runs on the query
    /// pool ([`Parser::parse_on_pool`]).
    fn parse(&self, text: &str) -> PgWireResult<Vec<Statement>> {
        // Its size, tokens and expression depth, before any recursive pass.
        crate::view::guard::check_sql(text).map_err(|e| query_error(e.into()))?;
        self.sql
            .parse(text)
            .map_err(|e| pg_error(Report::new(format!("syntax error: {e}")).with_sqlstate("42601")))
    }

    /// [`Parser::parse`] on the query pool, within `deadline`.
    async fn parse_on_pool(&self, text: &str, deadline: Duration) -> PgWireResult<Vec<Statement>> {
        let (parser, text) = (self.clone(), text.to_owned());
        self.pool
            .run(deadline, async move { parser.parse(&text) })
            .await
            .map_err(pool_error)?
    }

    /// Parses and plans `text` (a Parse message) as `client`'s session
    /// stands; runs on the query pool.
    async fn prepare(
        self,
        text: String,
        detached: session::Detached,
    ) -> PgWireResult<Option<Prepared>> {
        let mut statements = self.parse(&text)?;
        if statements.is_empty() {
            return Ok(None);
        }
        let statement = statements.remove(0);
        session::check_aborted(detached.transaction_status(), &statement)?;
        if let Some(plan) = session::parse_plan(&statement) {
            return Ok(Some(Prepared {
                statement,
                plan: plan?,
                point: None,
            }));
        }
        // Views may have changed since the last statement.
        self.planner.sync(&self.serving);
        let ctx = self.planner.context();
        for hook in self.hooks.iter() {
            if let Some(plan) = hook
                .handle_extended_parse_query(&statement, ctx, &detached)
                .await
            {
                return Ok(Some(Prepared {
                    statement,
                    plan: plan?,
                    point: None,
                }));
            }
        }
        let plan = plan(ctx, &statement).await.map_err(query_error)?;
        Ok(Some(Prepared {
            point: point_of(&plan, &self.serving),
            statement,
            plan,
        }))
    }
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = Prepared;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Prepared>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let deadline = session::statement_timeout(client, self.limits.timeout);
        let work = self
            .clone()
            .prepare(sql.to_owned(), session::Detached::of(client));
        self.pool.run(deadline, work).await.map_err(pool_error)?
    }

    fn get_parameter_types(&self, stmt: &Prepared) -> PgWireResult<Vec<Type>> {
        parameter_types(&stmt.plan)?
            .into_iter()
            .map(|ty| match ty {
                Some(ty) => into_pg_type(&ty),
                None => Ok(Type::UNKNOWN),
            })
            .collect()
    }

    fn get_result_schema(
        &self,
        stmt: &Prepared,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        if matches!(stmt.plan, LogicalPlan::Ddl(_) | LogicalPlan::Dml(_)) {
            return Ok(Vec::new());
        }
        arrow_schema_to_pg_fields(
            stmt.plan.schema().as_arrow(),
            format.unwrap_or(&Format::UnifiedText),
            None,
        )
    }
}

/// Plans `statement` as a read-only query: anything else is refused.
async fn plan(ctx: &SessionContext, statement: &Statement) -> Result<LogicalPlan, QueryError> {
    let limits = SqlLimits::default();
    let plan = ctx
        .state()
        .statement_to_plan(DfStatement::Statement(Box::new(statement.clone())))
        .await
        .map_err(|e| QueryError::from_planning(e, &limits))?;
    query::read_only()
        .verify_plan(&plan)
        .map_err(|e| QueryError::from_planning(e, &limits))?;
    Ok(plan)
}

/// Runs `plan` over one snapshot, within the limits; called on the query
/// pool.
async fn execute(
    serving: Arc<Serving>,
    catalog: Arc<Catalog>,
    plan: LogicalPlan,
    limits: SqlLimits,
) -> Result<Rows, QueryError> {
    let snap = serving.snapshot();
    let ctx = catalog
        .session(&snap, &limits)
        .map_err(|e| QueryError::from_df(e, &limits))?;
    // EXPLAIN's few rows are not limited: a limit over it is no plan
    // DataFusion can run.
    let explain = matches!(plan, LogicalPlan::Explain(_) | LogicalPlan::Analyze(_));
    let df = ctx
        .execute_logical_plan(plan)
        .await
        .and_then(|df| {
            if explain {
                Ok(df)
            } else {
                df.limit(0, Some(limits.max_rows + 1))
            }
        })
        .map_err(|e| QueryError::from_df(e, &limits))?;
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let mut stream = df
        .execute_stream()
        .await
        .map_err(|e| QueryError::from_df(e, &limits))?;
    collect(&mut stream, schema, &limits).await
}

/// Rows read within a query's limits, and whether some were left out.
struct Rows {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    truncated: bool,
}

pub struct Service {
    serving: Arc<Serving>,
    planner: Arc<Catalog>,
    pool: Arc<QueryPool>,
    limits: SqlLimits,
    parser: Arc<Parser>,
    /// What `SHOW ALL` reports of the server.
    parameters: DefaultServerParameterProvider,
    counters: Arc<PgCounters>,
}

impl Service {
    /// Counts a query and its outcome.
    fn count<T>(&self, r: Result<T, QueryError>, point: bool) -> PgWireResult<T> {
        self.counters.queries.fetch_add(1, Ordering::Relaxed);
        if point {
            self.counters.point_reads.fetch_add(1, Ordering::Relaxed);
        }
        r.map_err(|e| {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            query_error(e)
        })
    }

    /// Runs `work` on the query pool within `deadline`.
    async fn on_pool<T, F>(&self, deadline: Duration, work: F) -> Result<T, QueryError>
    where
        F: std::future::Future<Output = Result<T, QueryError>> + Send + 'static,
        T: Send + 'static,
    {
        self.pool.run(deadline, work).await?
    }

    /// Plans and runs one statement of a simple query on the query pool,
    /// within the session's statement timeout.
    async fn query<C>(&self, client: &mut C, statement: Statement) -> PgWireResult<Response>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let deadline = session::statement_timeout(client, self.limits.timeout);
        let (serving, planner, limits) = (self.serving.clone(), self.planner.clone(), self.limits);
        let work = async move {
            // Views may have changed since the last statement.
            planner.sync(&serving);
            let plan = plan(planner.context(), &statement).await?;
            execute(serving, planner, plan, limits).await
        };
        let rows = self.count(self.on_pool(deadline, work).await, false)?;
        respond(client, rows, &Format::UnifiedText, &self.limits).await
    }

    /// Answers `batch` (SET, SHOW, BEGIN, COMMIT, …) with the hooks, on the
    /// query pool against a detached copy of the session, which then
    /// becomes the session. Stops at the first error.
    async fn hooks<C>(
        &self,
        client: &mut C,
        batch: Vec<Statement>,
        status: TransactionStatus,
    ) -> PgWireResult<Vec<PgWireResult<Response>>>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let mut detached = session::Detached::of(client);
        detached.set_transaction_status(status);
        let (hooks, planner) = (self.parser.hooks.clone(), self.planner.clone());
        let work = async move {
            // One copy of the planning context for the batch: a SET that
            // DataFusion answers changes the copy, not the shared one.
            let own = SessionContext::new_with_state(planner.context().state());
            let mut out = Vec::with_capacity(batch.len());
            for (i, statement) in batch.iter().enumerate() {
                // The hooks never wait: a yield now and then is where the
                // pool's deadline (or a cancel) can stop a long batch.
                if i % 256 == 255 {
                    tokio::task::yield_now().await;
                }
                let r = match session::check_aborted(detached.transaction_status(), statement) {
                    Err(e) => Err(e.into()),
                    Ok(()) => {
                        let mut answer = None;
                        for hook in hooks.iter() {
                            answer = hook
                                .handle_simple_query(statement, &own, &mut detached)
                                .await;
                            if answer.is_some() {
                                break;
                            }
                        }
                        answer.unwrap_or_else(|| {
                            Err(pg_error(
                                Report::new(format!("statement not supported: {statement}"))
                                    .with_sqlstate("0A000"),
                            ))
                        })
                    }
                };
                let failed = matches!(r, Err(_) | Ok(Response::Error(_)));
                let next = session::status_after(detached.transaction_status(), &r);
                detached.set_transaction_status(next);
                out.push(r);
                if failed {
                    break;
                }
            }
            Ok((out, detached))
        };
        let (out, detached) = self
            .on_pool(self.limits.timeout, work)
            .await
            .map_err(query_error)?;
        detached.settle(client).await?;
        Ok(out)
    }

    /// A key lookup: the group's rows, merged from the current snapshot.
    async fn point(
        &self,
        p: &Point,
        params: &ParamValues,
        deadline: Duration,
    ) -> Result<Rows, QueryError> {
        let key = match params {
            ParamValues::List(values) => values.get(p.param).map(|v| v.value.clone()),
            ParamValues::Map(_) => None,
        };
        let serving = self.serving.clone();
        let (p_view, p_key) = (p.view, p.key);
        let p = p.clone();
        let work = async move {
            let view = &serving.views()[p.view];
            let schema = Arc::new(view.output_schema().project(&p.columns).map_err(|e| {
                QueryError::Sql {
                    message: e.to_string(),
                    sqlstate: "XX000",
                }
            })?);
            // A NULL key equals nothing.
            let Some(key) = key.filter(|k| !k.is_null()) else {
                return Ok(Rows {
                    schema,
                    batches: Vec::new(),
                    truncated: false,
                });
            };
            // The key as its column's rows display it, which casts back to
            // the column's type (a timestamp's `ScalarValue` displays as
            // its integer, which does not).
            let text = key
                .to_array()
                .and_then(|a| Ok(arrow::util::display::array_value_to_string(&a, 0)?))
                .map_err(|e| QueryError::Sql {
                    message: e.to_string(),
                    sqlstate: "22P02",
                })?;
            let a = serving.point(p.view, p.key, &text).await?;
            let batches = a
                .rows
                .iter()
                .map(|b| b.project(&p.columns))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| QueryError::Sql {
                    message: e.to_string(),
                    sqlstate: "XX000",
                })?;
            Ok(Rows {
                schema,
                batches,
                truncated: false,
            })
        };
        // As over HTTP: a key lookup with its indexes built runs here.
        if self.serving.point_is_cheap(p_view, p_key) {
            self.pool.run_here(deadline, work).await?
        } else {
            self.pool.run(deadline, work).await?
        }
    }
}

/// Reads `stream` up to the row and byte limits.
async fn collect(
    stream: &mut datafusion::physical_plan::SendableRecordBatchStream,
    schema: SchemaRef,
    limits: &SqlLimits,
) -> Result<Rows, QueryError> {
    use futures::StreamExt;
    let (mut batches, mut rows, mut bytes, mut truncated) = (Vec::new(), 0, 0, false);
    while let Some(b) = stream.next().await {
        let b = b.map_err(|e| QueryError::from_df(e, limits))?;
        // The reply's rows and bytes are bounded as HTTP's are (a wide
        // row can be a megabyte).
        if bytes >= limits.max_bytes {
            truncated = true;
            break;
        }
        let room = limits.max_rows - rows;
        if b.num_rows() > room {
            batches.push(b.slice(0, room));
            truncated = true;
            break;
        }
        rows += b.num_rows();
        bytes += b.get_array_memory_size();
        batches.push(b);
    }
    Ok(Rows {
        schema,
        batches,
        truncated,
    })
}

/// The rows as a Postgres result, after a warning if some were left out.
async fn respond<C>(
    client: &mut C,
    rows: Rows,
    format: &Format,
    limits: &SqlLimits,
) -> PgWireResult<Response>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    if rows.truncated {
        let mut info = ErrorInfo::new(
            "WARNING".into(),
            "01000".into(),
            format!(
                "the reply holds the first {} rows; the rest were left out (at most {} rows or {})",
                rows.batches.iter().map(|b| b.num_rows()).sum::<usize>(),
                limits.max_rows,
                bytesize::ByteSize::b(limits.max_bytes as u64)
            ),
        );
        info.hint = Some("filter or aggregate more, or add LIMIT and OFFSET".into());
        client
            .send(PgWireBackendMessage::NoticeResponse(info.into()))
            .await?;
    }
    let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
    let fields = Arc::new(arrow_schema_to_pg_fields(
        &rows.schema,
        format,
        Some(options),
    )?);
    let encoded = fields.clone();
    let data = stream::iter(
        rows.batches
            .into_iter()
            .flat_map(move |b| encode_recordbatch(encoded.clone(), b)),
    );
    Ok(Response::Query(QueryResponse::new(fields, data)))
}

#[async_trait]
impl SimpleQueryHandler for Service {
    async fn do_query<C>(&self, client: &mut C, text: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let deadline = session::statement_timeout(client, self.limits.timeout);
        let statements = self.parser.parse_on_pool(text, deadline).await?;
        if statements.is_empty() {
            return Ok(vec![Response::EmptyQuery]);
        }
        // Answers so far; an error after some is sent after them, and ends
        // the message, as Postgres does.
        let mut out = Vec::new();
        let fail = |mut out: Vec<Response>, e: PgWireError| {
            if out.is_empty() {
                return Err(e);
            }
            out.push(Response::Error(Box::new(ErrorInfo::from(e))));
            Ok(out)
        };
        let mut status = client.transaction_status();
        let mut statements = statements.into_iter().peekable();
        while let Some(statement) = statements.next() {
            let r = if session::is_hook_statement(&statement) {
                // This one and the hook statements after it, in one go.
                let mut batch = vec![statement];
                while let Some(next) = statements.next_if(session::is_hook_statement) {
                    batch.push(next);
                }
                for r in self.hooks(client, batch, status).await? {
                    status = session::status_after(status, &r);
                    match r {
                        Ok(resp) => out.push(resp),
                        Err(e) => return fail(out, e),
                    }
                }
                continue;
            } else if let Some(r) =
                session::answer(&statement, client, &self.parameters, self.limits.timeout)
            {
                r
            } else {
                match session::check_aborted(status, &statement) {
                    Err(e) => Err(e.into()),
                    Ok(()) => self.query(client, statement).await,
                }
            };
            status = session::status_after(status, &r);
            match r {
                Ok(resp) => out.push(resp),
                Err(e) => return fail(out, e),
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl ExtendedQueryHandler for Service {
    type Statement = Prepared;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Prepared>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let prepared = &portal.statement.statement;
        if let Some(r) = session::answer(
            &prepared.statement,
            client,
            &self.parameters,
            self.limits.timeout,
        ) {
            return r;
        }
        session::check_aborted(client.transaction_status(), &prepared.statement)?;
        let types = parameter_types(&prepared.plan)?;
        let refs: Vec<Option<&DataType>> = types.iter().map(Option::as_ref).collect();
        let params = deserialize_parameters(portal, &refs)?;
        let deadline = session::statement_timeout(client, self.limits.timeout);
        if session::is_hook_statement(&prepared.statement) {
            let mut detached = session::Detached::of(client);
            let (hooks, planner) = (self.parser.hooks.clone(), self.planner.clone());
            let (statement, plan) = (prepared.statement.clone(), prepared.plan.clone());
            let work = async move {
                let own = SessionContext::new_with_state(planner.context().state());
                for hook in hooks.iter() {
                    if let Some(r) = hook
                        .handle_extended_query(&statement, &plan, &params, &own, &mut detached)
                        .await
                    {
                        return Ok((Some(r), detached));
                    }
                }
                Ok((None, detached))
            };
            let (answer, detached) = self
                .on_pool(self.limits.timeout, work)
                .await
                .map_err(query_error)?;
            detached.settle(client).await?;
            if let Some(r) = answer {
                return r;
            }
            return Err(pg_error(
                Report::new(format!("statement not supported: {}", prepared.statement))
                    .with_sqlstate("0A000"),
            ));
        }
        let rows = match &prepared.point {
            Some(p) => self.count(self.point(p, &params, deadline).await, true)?,
            None => {
                let (serving, planner, limits) =
                    (self.serving.clone(), self.planner.clone(), self.limits);
                let plan = prepared.plan.clone();
                let work = async move {
                    let plan = plan
                        .replace_params_with_values(&params)
                        .map_err(|e| QueryError::from_df(e, &limits))?;
                    execute(serving, planner, plan, limits).await
                };
                self.count(self.on_pool(deadline, work).await, false)?
            }
        };
        respond(client, rows, &portal.result_column_format, &self.limits).await
    }
}

/// Where the endpoint listens, as configured.
pub fn describe(addr: SocketAddr, tls: bool) -> String {
    format!(
        "postgres://{addr}/{}{}",
        query::CATALOG,
        if tls { "?sslmode=require" } else { "" }
    )
}
