//! What is wrong right now, and what was repaired: the layers report here,
//! `/v1/status` and `lambdaflow status` show it.
//!
//! ```text
//!  speed / archive / batch / retention ── report(component, error) ──▶ problems
//!                                      ── clear(component)          ──▶ recovered
//!  startup: a corrupt batch view rebuilt ── recovered(component, what)
//! ```
//!
//! A background loop that fails keeps retrying (nothing is skipped); without
//! this registry its error would only be in the log, and an operator looking
//! at `status` would see a lag but not why.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;

/// Recoveries kept for `status`.
const KEEP_RECOVERED: usize = 32;

/// One component's current failure.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Problem {
    pub component: String,
    pub error: String,
    /// First failure of this streak (ms since the epoch).
    pub since_ms: i64,
    pub last_ms: i64,
    /// Failures in this streak.
    pub count: u64,
}

/// Something that went wrong and was dealt with.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Recovered {
    pub component: String,
    pub what: String,
    pub at_ms: i64,
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct HealthReport {
    pub problems: Vec<Problem>,
    pub recovered: Vec<Recovered>,
    /// Limits that were reached and what was done (nothing is retrying):
    /// dead letters dropped or removed, say.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub warnings: Vec<Problem>,
}

#[derive(Debug, Default)]
pub struct Health {
    problems: Mutex<BTreeMap<String, Problem>>,
    recovered: Mutex<VecDeque<Recovered>>,
    warnings: Mutex<BTreeMap<String, Problem>>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Records one more occurrence of `component`'s problem; returns how many.
fn bump(
    map: &Mutex<BTreeMap<String, Problem>>,
    component: &str,
    message: &dyn std::fmt::Display,
) -> u64 {
    let now = now_ms();
    let mut m = map.lock().expect("health lock");
    let e = m.entry(component.to_string()).or_insert_with(|| Problem {
        component: component.to_string(),
        error: String::new(),
        since_ms: now,
        last_ms: now,
        count: 0,
    });
    e.error = message.to_string();
    e.last_ms = now;
    e.count += 1;
    e.count
}

impl Health {
    /// `component` failed with `error` (again); returns the streak's length
    /// (callers log the first and then rarely, not every retry).
    pub fn report(&self, component: &str, error: &dyn std::fmt::Display) -> u64 {
        bump(&self.problems, component, error)
    }

    /// [`Health::report`] of an error with its causes, one after another
    /// ("cannot read partition 0: Broker: Offset out of range"): the
    /// component's problem must say why, not only what.
    pub fn report_error(&self, component: &str, error: &dyn std::error::Error) -> u64 {
        bump(&self.problems, component, &crate::error::chain(error))
    }

    /// `component` reached a limit and dealt with it as documented (the
    /// latest message is kept, with how often it happened).
    pub fn warn(&self, component: &str, message: &dyn std::fmt::Display) {
        bump(&self.warnings, component, message);
    }

    /// `component`'s warning no longer applies (what it named is gone).
    pub fn unwarn(&self, component: &str) {
        self.warnings.lock().expect("health lock").remove(component);
    }

    /// `component` works again: its problem, if any, moves to `recovered`.
    pub fn clear(&self, component: &str) {
        let gone = self.problems.lock().expect("health lock").remove(component);
        if let Some(p) = gone {
            self.recovered(
                component,
                &format!("recovered after {} failures: {}", p.count, p.error),
            );
        }
    }

    /// `component`'s work is no longer this node's (another node drives
    /// now): its problem, if any, is not this node's to fix; it moves to
    /// `recovered` with `why`.
    pub fn handed_over(&self, component: &str, why: &str) {
        let gone = self.problems.lock().expect("health lock").remove(component);
        if let Some(p) = gone {
            self.recovered(component, &format!("{why}; its last failure: {}", p.error));
        }
    }

    /// Records a repair (e.g. a corrupt batch view rebuilt at startup).
    pub fn recovered(&self, component: &str, what: &str) {
        let mut r = self.recovered.lock().expect("health lock");
        if r.len() == KEEP_RECOVERED {
            r.pop_front();
        }
        r.push_back(Recovered {
            component: component.to_string(),
            what: what.to_string(),
            at_ms: now_ms(),
        });
    }

    pub fn report_all(&self) -> HealthReport {
        HealthReport {
            problems: self
                .problems
                .lock()
                .expect("health lock")
                .values()
                .cloned()
                .collect(),
            recovered: self
                .recovered
                .lock()
                .expect("health lock")
                .iter()
                .cloned()
                .collect(),
            warnings: self
                .warnings
                .lock()
                .expect("health lock")
                .values()
                .cloned()
                .collect(),
        }
    }

    pub fn is_ok(&self) -> bool {
        self.problems.lock().expect("health lock").is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streak_counts_until_cleared_then_is_remembered() {
        let h = Health::default();
        h.report("archive/p0", &"disk full");
        h.report("archive/p0", &"disk still full");
        let r = h.report_all();
        assert_eq!(r.problems.len(), 1, "one problem per component");
        assert_eq!(r.problems[0].count, 2);
        assert_eq!(
            r.problems[0].error, "disk still full",
            "the latest error is shown"
        );
        h.clear("archive/p0");
        h.clear("speed/p1");
        let r = h.report_all();
        assert!(r.problems.is_empty() && h.is_ok());
        assert_eq!(
            r.recovered.len(),
            1,
            "clearing a healthy component records nothing"
        );
        assert!(r.recovered[0].what.contains("2 failures"));
        for i in 0..100 {
            h.recovered("batch", &format!("repair {i}"));
        }
        assert_eq!(h.report_all().recovered.len(), KEEP_RECOVERED, "bounded");
    }
}
