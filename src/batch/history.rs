//! The published runs a batch layer keeps: time travel (`?as_of=`) and
//! retention.
//!
//! ```text
//!  views/runs/000000000040.json  ┐ kept: the last `keep_runs` before the
//!  views/runs/000000000041.json  │ published one, and any published less
//!  …                             │ than `keep_for` ago; each names its
//!  views/runs/000000000049.json  ┘ views' files under views/<view>/<run>-*/
//!  views/CURRENT  = run 50
//! ```
//!
//! A run's manifest is written (created, never replaced) before `CURRENT`
//! names it, and its files before that, so a kept manifest answers for
//! exactly the events below its `H`: the batch view alone, as it was. The
//! master dataset is not touched by retention (it is immutable); a run that
//! goes takes its states and TSV files with it, unless a kept run reuses
//! them (a `rebuild VIEW` run reuses the other views' files).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use arrow::record_batch::RecordBatch;

use super::{BatchError, BatchLayer, Manifest, run_of_dir};
use crate::view::View;

/// How many runs and how long they are kept (`[batch] keep_runs`, `keep_for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub keep_runs: usize,
    pub keep_for: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            keep_runs: 10,
            keep_for: Duration::from_secs(3600),
        }
    }
}

/// Which past run a read asks for: `?as_of=42` or `?as_of=2026-11-29T10:00:00Z`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    Run(u64),
    /// The run that was published at this time (ms since the epoch).
    Time(i64),
}

impl std::str::FromStr for AsOf {
    type Err = String;

    fn from_str(s: &str) -> Result<AsOf, String> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s.parse::<u64>().map(AsOf::Run).map_err(|_| {
                format!(
                    "`{s}` is too large for a run number (runs are numbered from 1 to {})",
                    u64::MAX
                )
            });
        }
        if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
            return Ok(AsOf::Time(t.timestamp_millis()));
        }
        // A `+` offset written unescaped in a query string arrives as a
        // space (`…T00:00:00 01:00`): read it as the `+` it was.
        if let Some((time, offset)) = s.rsplit_once(' ')
            && offset.len() == 5
            && offset.as_bytes()[2] == b':'
            && let Ok(t) = chrono::DateTime::parse_from_rfc3339(&format!("{time}+{offset}"))
        {
            return Ok(AsOf::Time(t.timestamp_millis()));
        }
        let e = chrono::DateTime::parse_from_rfc3339(s).expect_err("not a time");
        let hint = if s.contains(' ') {
            " (a `+` in a URL's query is read as a space: write it as %2B)"
        } else {
            ""
        };
        Err(format!(
            "`{s}` is neither a run number nor an RFC 3339 time ({e}){hint}; write e.g. 42 or 2026-11-29T10:00:00Z"
        ))
    }
}

impl std::fmt::Display for AsOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AsOf::Run(r) => write!(f, "numbered {r}"),
            AsOf::Time(ms) => write!(f, "as of {}", rfc3339(*ms)),
        }
    }
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("{ms} ms"))
}

impl Manifest {
    /// When the run was published (its manifest written): start + duration.
    pub fn published_ms(&self) -> i64 {
        self.started_ms + self.duration_ms as i64
    }
}

/// Parsed run manifests by run number. A number whose manifest was removed
/// (a run that lost the race to publish) is never used again — a higher one
/// exists by then — so an entry stays right while its number is listed.
pub(super) type ManifestCache = std::sync::Mutex<std::collections::HashMap<u64, Arc<Manifest>>>;

pub(super) fn run_path(run: u64) -> String {
    format!("views/runs/{run:012}.json")
}

impl BatchLayer {
    /// The numbers of the run manifests on storage, newest first.
    pub(super) async fn run_numbers(&self) -> Result<Vec<u64>, BatchError> {
        let mut runs: Vec<u64> = self
            .storage
            .list_files("views/runs")
            .await?
            .iter()
            .filter_map(|f| f.strip_suffix(".json")?.parse().ok())
            .collect();
        runs.sort_unstable_by(|a, b| b.cmp(a));
        Ok(runs)
    }

    /// Which runs were published: the chain from `CURRENT` back through
    /// each manifest's `previous`. A claimed run whose publish failed or was
    /// cut short (its manifest created, `CURRENT` never naming it) is not in
    /// the chain, and time travel never answers for it.
    pub(super) async fn published(&self) -> Result<Published, BatchError> {
        let mut p = Published::default();
        let Some(current) = self.current().await? else {
            return Ok(p);
        };
        p.chain.insert(current.run);
        let mut previous = current.previous;
        loop {
            match previous {
                // Written before the chain was kept: every older run counts.
                None => {
                    p.legacy_below = p.chain.iter().min().copied();
                    break;
                }
                Some(0) => break,
                Some(r) => {
                    if !p.chain.insert(r) {
                        break; // a loop cannot happen; never spin on one
                    }
                    match self.run_manifest(r).await? {
                        Some(m) => previous = m.previous,
                        None => break, // gone with retention, and all before it
                    }
                }
            }
        }
        Ok(p)
    }

    /// A run's manifest, if kept (read from storage once per process).
    async fn run_manifest(&self, run: u64) -> Result<Option<Arc<Manifest>>, BatchError> {
        if let Some(m) = self.manifests.lock().expect("manifest cache").get(&run) {
            return Ok(Some(m.clone()));
        }
        let path = run_path(run);
        let Some(bytes) = self.storage.get(&path).await? else {
            return Ok(None);
        };
        let m = Arc::new(
            self.parse_manifest(&bytes)
                .map_err(|detail| BatchError::BadManifest { path, detail })?,
        );
        self.manifests
            .lock()
            .expect("manifest cache")
            .insert(run, m.clone());
        Ok(Some(m))
    }

    /// The manifest of a past run: by number, or the one published last at
    /// or before a time. Its views are read with [`BatchLayer::read_states`]
    /// (checked against their checksums and the views' fingerprints: a run
    /// of another version of a view is refused, not misread).
    pub async fn manifest_as_of(&self, as_of: AsOf) -> Result<Manifest, BatchError> {
        let published = self.published().await?;
        let runs: Vec<u64> = self
            .run_numbers()
            .await?
            .into_iter()
            .filter(|&r| published.contains(r))
            .collect();
        let found = match as_of {
            AsOf::Run(r) if runs.contains(&r) => self.run_manifest(r).await?,
            AsOf::Run(_) => None,
            AsOf::Time(t) => {
                let mut found = None;
                for &r in &runs {
                    match self.run_manifest(r).await? {
                        Some(m) if m.published_ms() <= t => {
                            found = Some(m);
                            break;
                        }
                        _ => {}
                    }
                }
                found
            }
        };
        match found {
            Some(m) => Ok((*m).clone()),
            None => Err(BatchError::NoSuchRun {
                as_of,
                kept: self.describe_kept(&runs).await,
            }),
        }
    }

    /// A past run's manifest and the states of `view` in it (time travel):
    /// [`BatchLayer::manifest_as_of`], then [`BatchLayer::read_states`]; a
    /// run from before the view existed is [`BatchError::NotInRun`] (with
    /// the oldest kept run that holds it), not a corrupt manifest.
    pub async fn past_states(
        &self,
        as_of: AsOf,
        view: &View,
    ) -> Result<(Manifest, RecordBatch), BatchError> {
        let m = self.manifest_as_of(as_of).await?;
        if !m.views.contains_key(view.name()) {
            let mut added = None;
            for r in self.run_numbers().await?.into_iter().rev() {
                if r > m.run
                    && let Some(later) = self.run_manifest(r).await?
                    && later.views.contains_key(view.name())
                {
                    added = Some(r);
                    break;
                }
            }
            return Err(BatchError::NotInRun {
                view: view.name().to_string(),
                run: m.run,
                added,
            });
        }
        let states = self.read_states(&m, view).await?;
        Ok((m, states))
    }

    /// "runs 41 (published …) to 50 (published …) are kept", for errors.
    async fn describe_kept(&self, runs: &[u64]) -> String {
        let (Some(&newest), Some(&oldest)) = (runs.first(), runs.last()) else {
            return "no run is kept yet".into();
        };
        let at = |m: Option<Arc<Manifest>>| {
            m.map(|m| format!(" (published {})", rfc3339(m.published_ms())))
                .unwrap_or_default()
        };
        let first = at(self.run_manifest(oldest).await.ok().flatten());
        let last = at(self.run_manifest(newest).await.ok().flatten());
        if newest == oldest {
            format!("only run {newest}{last} is kept")
        } else {
            format!("runs {oldest}{first} to {newest}{last} are kept")
        }
    }

    /// Removes the runs retention lets go, and the view files no kept run
    /// names. Files of runs newer than the published one are left alone
    /// (another driver's run in flight).
    pub(super) async fn remove_old_runs(&self, published: &Manifest) -> Result<(), BatchError> {
        let now = chrono::Utc::now().timestamp_millis();
        let keep_for = self.retention.keep_for.as_millis() as i64;
        let chain = self.published().await?;
        let oldest_in_chain = chain.chain.iter().min().copied().unwrap_or(published.run);
        let mut kept = vec![Arc::new(published.clone())];
        let mut older = 0usize;
        for r in self.run_numbers().await? {
            if r >= published.run {
                continue;
            }
            if !chain.contains(r) && r > oldest_in_chain {
                // Claimed and never published (the chain passes over it):
                // nothing will ever answer for it.
                self.storage.delete(&run_path(r)).await?;
                self.manifests.lock().expect("manifest cache").remove(&r);
                continue;
            }
            older += 1;
            let m = self.run_manifest(r).await.ok().flatten();
            let young = m
                .as_ref()
                .is_some_and(|m| now.saturating_sub(m.published_ms()) < keep_for);
            if older <= self.retention.keep_runs || young {
                kept.extend(m);
            } else {
                self.storage.delete(&run_path(r)).await?;
                self.manifests.lock().expect("manifest cache").remove(&r);
            }
        }
        let live: HashSet<&str> = kept
            .iter()
            .flat_map(|m| m.views.values())
            .filter_map(|e| e.states.path.rsplit_once('/').map(|(d, _)| d))
            .collect();
        // Every view directory, a dropped view's included: its runs go with
        // retention like the others'.
        for name in self.storage.list_dirs("views").await? {
            if name == "runs" {
                continue;
            }
            for d in self.storage.list_dirs(&format!("views/{name}")).await? {
                let dir = format!("views/{name}/{d}");
                if run_of_dir(&d).is_some_and(|r| r < published.run) && !live.contains(dir.as_str())
                {
                    self.storage.delete_dir(&dir).await?;
                }
            }
        }
        Ok(())
    }
}

/// The published runs ([`BatchLayer::published`]).
#[derive(Debug, Default)]
pub(super) struct Published {
    /// `CURRENT` and the runs it replaced, as far back as they are kept.
    chain: HashSet<u64>,
    /// Runs below this one were written before manifests named their
    /// predecessor: taken as published, as they were then.
    legacy_below: Option<u64>,
}

impl Published {
    pub(super) fn contains(&self, run: u64) -> bool {
        self.chain.contains(&run) || self.legacy_below.is_some_and(|b| run < b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_of_is_a_run_number_or_an_rfc3339_time() {
        assert_eq!("42".parse::<AsOf>(), Ok(AsOf::Run(42)));
        assert_eq!(
            "2026-11-29T10:00:00Z".parse::<AsOf>(),
            Ok(AsOf::Time(1_795_946_400_000))
        );
        let e = "yesterday".parse::<AsOf>().unwrap_err();
        assert!(
            e.contains("neither a run number nor an RFC 3339 time"),
            "{e}"
        );
    }

    #[test]
    fn a_plus_offset_that_arrived_as_a_space_is_read_as_the_plus() {
        let plus = "2099-01-01T00:00:00+01:00".parse::<AsOf>();
        assert_eq!(plus, Ok(AsOf::Time(4_070_905_200_000)));
        assert_eq!(
            "2099-01-01T00:00:00 01:00".parse::<AsOf>(),
            plus,
            "a `+` decoded from a query string as a space means the `+`"
        );
        let e = "2099-01-01 00:00:00 1".parse::<AsOf>().unwrap_err();
        assert!(e.contains("%2B"), "a space in a time hints at %2B: {e}");
    }

    #[test]
    fn a_run_number_past_u64_is_told_it_is_too_large() {
        let e = "99999999999999999999999".parse::<AsOf>().unwrap_err();
        assert!(
            e.contains("too large for a run number"),
            "digits are a run number, too large, not 'neither': {e}"
        );
        assert_eq!(
            "18446744073709551615".parse::<AsOf>(),
            Ok(AsOf::Run(u64::MAX))
        );
    }
}
