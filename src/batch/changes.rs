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

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::Progress;
use crate::config::ViewConfig;
use crate::storage::{Storage, StorageError};
use crate::view::View;

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
            Some(b) => serde_json::from_slice(&b).map_err(|e| StorageError::BadRoot {
                root: storage.dir_url(SAVED).to_string(),
                reason: format!("the saved view changes are unreadable: {e}"),
            }),
        }
    }

    async fn save(&self, storage: &Storage) -> Result<(), StorageError> {
        let json = serde_json::to_vec_pretty(self).expect("view changes serialize");
        storage.put(SAVED, Bytes::from(json)).await?;
        storage.sync(SAVED).await
    }

    /// Saved views whose names the storage layout cannot hold (accepted by
    /// a version that did not check them): a view `CURRENT`, or a name past
    /// the file-name limit, would stop every batch run from publishing.
    /// [`Saved::apply`] leaves them out.
    pub fn refused(&self) -> Vec<crate::view::ViewError> {
        self.put
            .iter()
            .filter_map(|p| crate::view::check_name(&p.name).err())
            .collect()
    }

    /// `views` (the config's) with the changes applied, but for the
    /// [`Saved::refused`] ones.
    pub fn apply(&self, mut views: Vec<ViewConfig>) -> Vec<ViewConfig> {
        views.retain(|v| !self.dropped.contains(&v.name));
        for p in self
            .put
            .iter()
            .filter(|p| crate::view::check_name(&p.name).is_ok())
        {
            match views.iter_mut().find(|v| v.name == p.name) {
                Some(v) => *v = p.clone(),
                None => views.push(p.clone()),
            }
        }
        views
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
    /// `waiting` (for the batch loop), `building`, `published`, `failed`.
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
    state: Mutex<(Vec<Entry>, VecDeque<ChangeStatus>)>,
    /// Serializes requests, so the saved file follows their order.
    saving: tokio::sync::Mutex<()>,
    /// The build in progress (the run computing the changed views).
    pub progress: Mutex<Arc<Progress>>,
}

impl ViewChanges {
    pub fn new(storage: Storage) -> ViewChanges {
        ViewChanges {
            storage,
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
        Ok(status)
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
