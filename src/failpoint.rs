//! Failpoints: named places where a test can make the process die, to prove
//! that a crash there loses nothing and counts nothing twice; and the
//! durability trace, which shows a test the order of fsyncs and deletions.
//!
//! `LAMBDAFLOW_FAILPOINTS=archive-after-parquet,batch-after-publish` makes the
//! process abort (like `kill -9`: no destructors, no flush) the first time it
//! reaches one of the named points; `name=sleep:MS` makes it wait there
//! instead (to hold two processes at the same step, so they race). Unset, a
//! failpoint costs one branch.

use std::sync::OnceLock;

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("LAMBDAFLOW_FAILPOINTS")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Aborts the process if the failpoint `name` is armed (or sleeps, if it
/// is armed as `name=sleep:MS`).
pub fn hit(name: &str) {
    for a in armed() {
        if a == name {
            eprintln!("lambdaflow: failpoint `{name}` hit, aborting");
            std::process::abort();
        }
        if let Some(ms) = a
            .strip_prefix(name)
            .and_then(|r| r.strip_prefix("=sleep:"))
            .and_then(|ms| ms.parse::<u64>().ok())
        {
            eprintln!("lambdaflow: failpoint `{name}` hit, sleeping {ms} ms");
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }
}

/// Appends `<what> <path>` to the file named by `LAMBDAFLOW_TRACE_DURABILITY`
/// (unset: one branch). Storage records each fsync, the log each segment it
/// deletes and the batch loop each retention it starts, so a test can check
/// that nothing leaves the log before its copies are durable — the order a
/// power cut would expose, without cutting the power.
pub fn trace(what: &str, path: &std::path::Path) {
    use std::io::Write;
    use std::sync::Mutex;
    static TRACE: OnceLock<Option<Mutex<std::fs::File>>> = OnceLock::new();
    let file = TRACE.get_or_init(|| {
        let path = std::env::var_os("LAMBDAFLOW_TRACE_DURABILITY")?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()
            .map(Mutex::new)
    });
    if let Some(f) = file {
        let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(f, "{what} {}", path.display());
    }
}
