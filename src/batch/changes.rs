//! Views changed while serving: added, changed or dropped through the API
//! (`POST /v1/views`, `DELETE /v1/views/{name}`) or a config reload
//! (SIGHUP), with no restart and no moment without an answer.
//!
//! ```text
//!  request ─▶ compiled and checked as at startup ─▶ saved (views/CHANGES.json) ─▶ pending
//!  next batch cycle (woken at once):
//!    views' = views ± pending ─▶ run: new/changed views in full, the others incremental
//!           ─▶ publish (CURRENT: one H, every view of views')
//!           ─▶ speed layer: states of the new views for each realtime chunk above H,
//!              read again from the stream ─▶ serving.adopt: views', the run, the
//!              chunks — one swap
//! ```
//!
//! Until the swap, readers get the previous version of a changed view (its
//! answer names its fingerprint); after it, the new one, exact from its
//! first answer: its batch states cover exactly `H`, its realtime states
//! exactly the chunks above. A change survives a crash: it is saved before
//! it is acknowledged, and at startup the saved changes apply on top of the
//! config's views, so a view whose build was cut short is built before the
//! node serves (a view missing from the published run is rebuilt then).
//!
//! On a cluster a change is the cluster's: every run names its views'
//! definitions (`Manifest::definitions`), followers serve those (and adopt
//! a run's changed ones as the driver does), and a node that starts driving
//! queues what its config file and the saved changes say
//! ([`ViewChanges::reconcile`]). A saved change overrides the file's entry
//! of its view until [`ViewChanges::revert`] forgets it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::Progress;
use crate::config::ViewConfig;
use crate::storage::{Storage, StorageError};
use crate::view::View;

/// A saved change a node cannot apply, and why: left out (reported in
/// `health`) until it is reverted or saved over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftOut {
    pub view: String,
    pub why: String,
}

impl std::fmt::Display for LeftOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "view `{}`: {} (`DELETE /v1/views/{}/change` forgets it)",
            self.view, self.why, self.view
        )
    }
}

/// Where accepted changes are kept, under the storage root.
pub const SAVED: &str = "views/CHANGES.json";

/// Changes made while serving, on top of the config's views: what a restart
/// or a reload applies again.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Saved {
    /// Views added or changed, by name (the latest definition).
    pub put: Vec<ViewConfig>,
    /// Views dropped.
    pub dropped: Vec<String>,
}

impl Saved {
    pub async fn load(storage: &Storage) -> Result<Saved, StorageError> {
        match storage.get(SAVED).await? {
            None => Ok(Saved::default()),
            Some(b) => serde_json::from_slice(&b).map_err(|e| StorageError::Unreadable {
                path: storage.dir_url(SAVED).to_string(),
                reason: format!("the view changes saved through the API are not valid: {e}"),
                hint: "fix its JSON (`{\"put\": [{\"name\": …, \"sql\": …}], \"dropped\": [names]}`), or delete it to serve the config file's views (the changes made through the API are then forgotten)",
            }),
        }
    }

    async fn save(&self, storage: &Storage) -> Result<(), StorageError> {
        let json = serde_json::to_vec_pretty(self).expect("view changes serialize");
        storage.put(SAVED, Bytes::from(json)).await?;
        storage.sync(SAVED).await
    }

    /// The saved changes this node can apply, and those it leaves out: a
    /// name the storage layout cannot hold (accepted by a version that did
    /// not check names: a view `CURRENT`, or a name past the file-name
    /// limit, would stop every batch run from publishing), or a definition
    /// that no longer compiles against `schema` (a field it reads renamed in
    /// the config, a function an upgrade removed). Applied, either would
    /// stop every node at startup.
    pub async fn usable(mut self, schema: &crate::schema::EventSchema) -> (Saved, Vec<LeftOut>) {
        let mut left_out = Vec::new();
        let mut keep = Vec::new();
        for p in std::mem::take(&mut self.put) {
            let why = match crate::view::check_name(&p.name) {
                Err(e) => Some(e.to_string()),
                Ok(()) => crate::view::compile(&p, schema)
                    .await
                    .err()
                    .map(|e| crate::error::chain(&e)),
            };
            match why {
                Some(why) => left_out.push(LeftOut { view: p.name, why }),
                None => keep.push(p),
            }
        }
        self.put = keep;
        (self, left_out)
    }

    /// `views` (the config's) with the changes applied (those of
    /// [`Saved::usable`]).
    pub fn apply(&self, mut views: Vec<ViewConfig>) -> Vec<ViewConfig> {
        views.retain(|v| !self.dropped.contains(&v.name));
        for p in &self.put {
            match views.iter_mut().find(|v| v.name == p.name) {
                Some(v) => *v = p.clone(),
                None => views.push(p.clone()),
            }
        }
        views
    }

    /// The saved changes that override an entry of the config file `file`:
    /// a reload of the file does not apply those entries (the saved change
    /// stays in force until it is reverted, `DELETE /v1/views/{name}/change`).
    pub fn overrides(&self, file: &[ViewConfig]) -> Vec<Override> {
        let mut out = Vec::new();
        for p in &self.put {
            if let Some(f) = file.iter().find(|f| f.name == p.name)
                && f != p
            {
                out.push(Override {
                    view: p.name.clone(),
                    saved: "change",
                    file_sql: f.sql.clone(),
                    saved_sql: Some(p.sql.clone()),
                });
            }
        }
        for d in &self.dropped {
            if let Some(f) = file.iter().find(|f| f.name == *d) {
                out.push(Override {
                    view: d.clone(),
                    saved: "drop",
                    file_sql: f.sql.clone(),
                    saved_sql: None,
                });
            }
        }
        out
    }

    /// Forgets the saved change to `name`; whether there was one.
    fn forget(&mut self, name: &str) -> bool {
        let before = self.put.len() + self.dropped.len();
        self.put.retain(|p| p.name != name);
        self.dropped.retain(|d| d != name);
        before != self.put.len() + self.dropped.len()
    }

    fn record(&mut self, change: &Requested) {
        // The refused ones are dropped with the next change saved.
        self.put
            .retain(|p| crate::view::check_name(&p.name).is_ok());
        match change {
            Requested::Put(def, _) => {
                self.dropped.retain(|n| *n != def.name);
                self.put.retain(|p| p.name != def.name);
                self.put.push(def.clone());
            }
            Requested::Drop(name) => {
                self.put.retain(|p| p.name != *name);
                if !self.dropped.contains(name) {
                    self.dropped.push(name.clone());
                }
            }
        }
    }
}

/// A saved change (made through the API) in force over an entry of the
/// config file: what a reload reports.
#[derive(Debug, Clone, Serialize)]
pub struct Override {
    pub view: String,
    /// `change` (another definition) or `drop`.
    pub saved: &'static str,
    /// The file's SQL, not applied.
    pub file_sql: String,
    /// The SQL in force, for a change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saved_sql: Option<String>,
}

impl std::fmt::Display for Override {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.saved {
            "drop" => write!(
                f,
                "view `{}` was dropped through the API; the config file's entry is not applied",
                self.view
            ),
            _ => write!(
                f,
                "view `{}` was changed through the API; its saved definition overrides the config file's",
                self.view
            ),
        }
    }
}

/// One requested change.
#[derive(Clone)]
pub enum Requested {
    /// Add or replace a view (compiled and checked).
    Put(ViewConfig, Arc<View>),
    Drop(String),
}

impl Requested {
    /// The view the change is to.
    pub fn name(&self) -> &str {
        match self {
            Requested::Put(d, _) => &d.name,
            Requested::Drop(n) => n,
        }
    }
}

/// A change as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeStatus {
    pub view: String,
    /// `add`, `change` or `drop`.
    pub change: &'static str,
    /// The new version's fingerprint (not for a drop).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    pub requested_ms: i64,
    /// `waiting` (for the batch loop), `building`, `published`, `failed`,
    /// `cancelled` (an add dropped before it was built).
    pub state: &'static str,
    /// The run that published it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Changes kept for `status` after they finished.
const RECENT: usize = 20;

struct Entry {
    change: Requested,
    status: ChangeStatus,
}

/// The node's view changes: pending, in progress, recent.
pub struct ViewChanges {
    storage: Storage,
    /// The config file's views, as last read (at startup or reload).
    file: Mutex<Vec<ViewConfig>>,
    /// What views compile against.
    schema: Arc<crate::schema::EventSchema>,
    state: Mutex<(Vec<Entry>, VecDeque<ChangeStatus>)>,
    /// Serializes requests, so the saved file follows their order.
    saving: tokio::sync::Mutex<()>,
    /// The build in progress (the run computing the changed views).
    pub progress: Mutex<Arc<Progress>>,
}

impl ViewChanges {
    pub fn new(
        storage: Storage,
        file: Vec<ViewConfig>,
        schema: Arc<crate::schema::EventSchema>,
    ) -> ViewChanges {
        ViewChanges {
            storage,
            file: Mutex::new(file),
            schema,
            state: Mutex::new((Vec::new(), VecDeque::new())),
            saving: tokio::sync::Mutex::new(()),
            progress: Mutex::new(Arc::default()),
        }
    }

    /// Accepts a change: saved first (it survives a crash), then pending
    /// for the next batch cycle. `change` is `add` or `change`, as the
    /// caller found the view served now.
    pub async fn request(
        &self,
        change: Requested,
        kind: &'static str,
    ) -> Result<ChangeStatus, StorageError> {
        let _one = self.saving.lock().await;
        let mut saved = Saved::load(&self.storage).await?;
        saved.record(&change);
        saved.save(&self.storage).await?;
        Ok(self.queue(change, kind))
    }

    /// A change pending for the next batch cycle, not saved: one that
    /// brings the views to what the config file and the saved changes say
    /// (a reload, a new driver).
    fn queue(&self, change: Requested, kind: &'static str) -> ChangeStatus {
        let status = ChangeStatus {
            view: change.name().to_string(),
            change: kind,
            fingerprint: match &change {
                Requested::Put(_, v) => Some(v.fingerprint().to_string()),
                Requested::Drop(_) => None,
            },
            requested_ms: chrono::Utc::now().timestamp_millis(),
            state: "waiting",
            run: None,
            error: None,
        };
        let mut s = self.state.lock().expect("changes lock");
        // A newer request for the same view replaces a waiting one.
        s.0.retain(|e| e.status.view != status.view || e.status.state != "waiting");
        s.0.push(Entry {
            change,
            status: status.clone(),
        });
        status
    }

    /// `DELETE /v1/views/{name}`: a view served now (`served`) is dropped at
    /// the next cycle; an add still waiting is cancelled (the view was never
    /// served); an add or change being built is followed by its drop.
    /// `None` when there is no such view, served or pending.
    pub async fn drop_view(
        &self,
        name: &str,
        served: bool,
    ) -> Result<Option<ChangeStatus>, StorageError> {
        let _one = self.saving.lock().await;
        let pending = |s: &(Vec<Entry>, VecDeque<ChangeStatus>)| {
            s.0.iter()
                .any(|e| e.status.view == name && matches!(e.change, Requested::Put(..)))
        };
        if !served && !pending(&self.state.lock().expect("changes lock")) {
            return Ok(None);
        }
        let drop = Requested::Drop(name.to_string());
        let mut saved = Saved::load(&self.storage).await?;
        if self.file().iter().any(|f| f.name == name) {
            saved.record(&drop);
        } else {
            // Added through the API: forgetting it is dropping it.
            saved.forget(name);
        }
        saved.save(&self.storage).await?;
        {
            let mut s = self.state.lock().expect("changes lock");
            let building =
                s.0.iter()
                    .any(|e| e.status.view == name && e.status.state == "building");
            let waiting_add = s.0.iter().position(|e| {
                e.status.view == name
                    && e.status.state == "waiting"
                    && matches!(e.change, Requested::Put(..))
            });
            if !served
                && !building
                && let Some(i) = waiting_add
            {
                let mut e = s.0.remove(i);
                e.status.state = "cancelled";
                let status = e.status.clone();
                s.1.push_front(e.status);
                s.1.truncate(RECENT);
                return Ok(Some(status));
            }
        }
        Ok(Some(self.queue(drop, "drop")))
    }

    /// The config file's views, as last read.
    pub fn file(&self) -> Vec<ViewConfig> {
        self.file.lock().expect("file views lock").clone()
    }

    /// A reload read the config file again.
    pub fn set_file(&self, views: Vec<ViewConfig>) {
        *self.file.lock().expect("file views lock") = views;
    }

    /// The saved changes, and the views the node should serve: the config
    /// file's with the saved changes on top.
    pub async fn target(&self) -> Result<(Saved, Vec<ViewConfig>), StorageError> {
        let saved = Saved::load(&self.storage).await?;
        let (usable, _) = saved.clone().usable(&self.schema).await;
        let views = usable.apply(self.file());
        Ok((saved, views))
    }

    /// Returns view `name` to the config file's definition (or drops it, if
    /// the file has none): the saved change to it is forgotten. False when
    /// there was none.
    ///
    /// A change to it still waiting is cancelled (it would build and
    /// publish what was just reverted); one being built is followed by the
    /// revert (see [`ViewChanges::after_building`]).
    pub async fn revert(&self, name: &str) -> Result<Option<Vec<ChangeStatus>>, StorageError> {
        let _one = self.saving.lock().await;
        let mut saved = Saved::load(&self.storage).await?;
        if !saved.forget(name) {
            return Ok(None);
        }
        saved.save(&self.storage).await?;
        let mut s = self.state.lock().expect("changes lock");
        let (pending, recent) = &mut *s;
        let mut cancelled = Vec::new();
        pending.retain(|e| {
            if e.status.view == name && e.status.state == "waiting" {
                let mut st = e.status.clone();
                st.state = "cancelled";
                cancelled.push(st);
                false
            } else {
                true
            }
        });
        for st in &cancelled {
            recent.push_front(st.clone());
        }
        recent.truncate(RECENT);
        Ok(Some(cancelled))
    }

    /// The views `served` as they will be once the changes being built now
    /// are published: what a new change must be compared with.
    pub fn after_building(&self, served: &[Arc<View>]) -> Vec<Arc<View>> {
        let building: Vec<Requested> = self
            .state
            .lock()
            .expect("changes lock")
            .0
            .iter()
            .filter(|e| e.status.state == "building")
            .map(|e| e.change.clone())
            .collect();
        apply(served, &building)
    }

    /// The one view diff (reloads, reverts and `POST /v1/views`): what
    /// bringing the views `served` to `new` is — `None` when a view of its
    /// name answers with the same fingerprint, else `"change"` or `"add"`.
    pub fn diff(served: &[Arc<View>], new: &View) -> Option<&'static str> {
        match served.iter().find(|s| s.name() == new.name()) {
            Some(s) if s.fingerprint() == new.fingerprint() => None,
            Some(_) => Some("change"),
            None => Some("add"),
        }
    }

    /// Queues the changes that bring the views served (`served`) to
    /// `target` (the file's with the saved changes on top), each compiled
    /// and checked by `batch`'s engine first: nothing is queued if one is
    /// refused. Not saved: `target` is what the file and the saved changes
    /// say already.
    pub async fn reconcile(
        &self,
        target: &[ViewConfig],
        served: &[Arc<View>],
        batch: &super::BatchLayer,
    ) -> Result<Vec<ChangeStatus>, super::BatchError> {
        let mut todo = Vec::new();
        for def in target {
            let v = Arc::new(crate::view::compile(def, &self.schema).await?);
            let Some(kind) = ViewChanges::diff(served, &v) else {
                continue;
            };
            batch.check_views(std::slice::from_ref(&v))?;
            todo.push((Requested::Put(def.clone(), v), kind));
        }
        for s in served {
            if !target.iter().any(|d| d.name == s.name()) {
                todo.push((Requested::Drop(s.name().to_string()), "drop"));
            }
        }
        Ok(todo
            .into_iter()
            .map(|(change, kind)| self.queue(change, kind))
            .collect())
    }

    pub fn pending(&self) -> bool {
        self.state
            .lock()
            .expect("changes lock")
            .0
            .iter()
            .any(|e| e.status.state == "waiting")
    }

    /// The waiting changes, now building; `views` with them applied.
    pub fn take(&self, views: &[Arc<View>]) -> (Vec<Requested>, Vec<Arc<View>>) {
        let mut s = self.state.lock().expect("changes lock");
        let mut taken = Vec::new();
        for e in s.0.iter_mut().filter(|e| e.status.state == "waiting") {
            e.status.state = "building";
            taken.push(e.change.clone());
        }
        *self.progress.lock().expect("progress lock") = Arc::default();
        (taken.clone(), apply(views, &taken))
    }

    /// The building changes are published by `run`, or failed (`retry`:
    /// they wait for the next cycle again).
    pub fn finish(&self, result: Result<u64, (String, bool)>) {
        let mut s = self.state.lock().expect("changes lock");
        let (pending, recent) = &mut *s;
        let mut keep = Vec::new();
        for mut e in pending.drain(..) {
            if e.status.state != "building" {
                keep.push(e);
                continue;
            }
            match &result {
                Ok(run) => {
                    e.status.state = "published";
                    e.status.run = Some(*run);
                    e.status.error = None;
                }
                Err((why, retry)) => {
                    e.status.error = Some(why.clone());
                    if *retry {
                        e.status.state = "waiting";
                        keep.push(e);
                        continue;
                    }
                    e.status.state = "failed";
                }
            }
            recent.push_front(e.status);
            recent.truncate(RECENT);
        }
        *pending = keep;
    }

    /// Pending and recent changes, newest first.
    pub fn status(&self) -> Vec<ChangeStatus> {
        let s = self.state.lock().expect("changes lock");
        s.0.iter()
            .rev()
            .map(|e| e.status.clone())
            .chain(s.1.iter().cloned())
            .collect()
    }
}

/// `views` with `changes` applied, in order: a changed view keeps its place,
/// a new one goes last.
pub fn apply(views: &[Arc<View>], changes: &[Requested]) -> Vec<Arc<View>> {
    let mut out: Vec<Arc<View>> = views.to_vec();
    for c in changes {
        match c {
            Requested::Put(_, v) => match out.iter_mut().find(|x| x.name() == v.name()) {
                Some(x) => *x = v.clone(),
                None => out.push(v.clone()),
            },
            Requested::Drop(name) => out.retain(|x| x.name() != name),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str, sql: &str) -> ViewConfig {
        ViewConfig {
            name: name.into(),
            sql: sql.into(),
            rollup: Vec::new(),
        }
    }

    #[test]
    fn saved_changes_apply_on_top_of_the_configs_views() {
        let config = vec![def("a", "SELECT 1"), def("b", "SELECT 2")];
        let mut saved = Saved::default();
        saved.record(&Requested::Drop("a".into()));
        let v = Arc::new(
            futures::executor::block_on(crate::view::compile(
                &def("c", "SELECT count(*) AS n FROM events"),
                &crate::schema::EventSchema::paper(),
            ))
            .unwrap(),
        );
        saved.record(&Requested::Put(
            def("c", "SELECT count(*) AS n FROM events"),
            v.clone(),
        ));
        saved.record(&Requested::Put(def("b", "SELECT 3"), v));
        let names: Vec<(String, String)> = saved
            .apply(config)
            .into_iter()
            .map(|d| (d.name, d.sql))
            .collect();
        assert_eq!(
            names,
            [
                ("b".to_string(), "SELECT 3".to_string()),
                ("c".into(), "SELECT count(*) AS n FROM events".into())
            ]
        );
        // Adding back a dropped view undoes the drop.
        saved.record(&Requested::Put(def("a", "SELECT 1"), saved_view()));
        assert!(!saved.dropped.contains(&"a".to_string()));
    }

    /// A saved change that no longer compiles (or whose name the layout
    /// cannot hold) is left out with why and how to forget it; the others
    /// apply. Before, one such entry stopped every node at startup.
    #[test]
    fn saved_changes_a_node_cannot_apply_are_left_out_with_why() {
        let saved = Saved {
            put: vec![
                def("good", "SELECT count(*) AS n FROM events"),
                def(
                    "renamed",
                    "SELECT count(*) AS n FROM events GROUP BY colour",
                ),
                def("CURRENT", "SELECT count(*) AS n FROM events"),
            ],
            dropped: Vec::new(),
        };
        let (usable, left_out) =
            futures::executor::block_on(saved.usable(&crate::schema::EventSchema::paper()));
        let names: Vec<&str> = usable.put.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["good"], "only the change this node can apply");
        let out: Vec<&str> = left_out.iter().map(|l| l.view.as_str()).collect();
        assert_eq!(out, ["renamed", "CURRENT"]);
        let text = left_out[0].to_string();
        assert!(
            text.contains("colour") && text.contains("DELETE /v1/views/renamed/change"),
            "says why and how to forget it: {text}"
        );
    }

    fn saved_view() -> Arc<View> {
        Arc::new(
            futures::executor::block_on(crate::view::compile(
                &def("a", "SELECT count(*) AS n FROM events"),
                &crate::schema::EventSchema::paper(),
            ))
            .unwrap(),
        )
    }
}
