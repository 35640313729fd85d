//! User-facing errors in the three parts Postgres gives them: what happened,
//! a detail, and a hint, plus the SQLSTATE a Postgres client gets. Each
//! front end renders one error in its own form:
//!
//! ```text
//!                       ┌─▶ HTTP: {"error": …, "detail": …, "hint": …}
//!  error ─▶ Report ─────┼─▶ Postgres wire: ErrorResponse M / D / H / C fields
//!  (Explain)            └─▶ CLI: "error: …" then "detail: …", "hint: …" lines
//! ```
//!
//! An error's `Display` says what happened and nothing else: not its source
//! (that is `source()`, joined in by [`chain`]), not its hint ([`Explain`]).

use std::error::Error;

/// The parts of an error beyond what happened.
pub trait Explain: Error {
    /// More about what happened (which file, which offsets).
    fn detail(&self) -> Option<String> {
        None
    }

    /// What the user can do about it.
    fn hint(&self) -> Option<String> {
        None
    }

    /// The SQLSTATE of a Postgres client's ErrorResponse.
    fn sqlstate(&self) -> &'static str {
        "XX000"
    }
}

/// One error, ready to render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// What happened, and why (the error and its causes).
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    pub sqlstate: &'static str,
}

impl Report {
    pub fn of(e: &(impl Explain + ?Sized)) -> Report {
        Report {
            message: chain(e),
            detail: e.detail(),
            hint: e.hint(),
            sqlstate: e.sqlstate(),
        }
    }

    /// A report of a message alone.
    pub fn new(message: impl Into<String>) -> Report {
        Report {
            message: message.into(),
            detail: None,
            hint: None,
            sqlstate: "XX000",
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Report {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_sqlstate(mut self, code: &'static str) -> Report {
        self.sqlstate = code;
        self
    }
}

/// The CLI's form: the message, then a line each for detail and hint.
impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        if let Some(d) = &self.detail {
            write!(f, "\ndetail: {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "\nhint: {h}")?;
        }
        Ok(())
    }
}

/// An error and its causes, one after another ("could not read x: No such
/// file or directory"). A cause whose text the message already ends with
/// (a transparent wrapper) is not repeated.
pub fn chain(e: &(impl Error + ?Sized)) -> String {
    let mut message = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.ends_with(&text) {
            message = format!("{message}: {text}");
        }
        cause = c.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("could not open the log")]
    struct Outer {
        #[source]
        source: std::io::Error,
    }

    impl Explain for Outer {
        fn hint(&self) -> Option<String> {
            Some("check the permissions of the data directory".into())
        }
    }

    #[test]
    fn a_report_names_the_cause_once_and_keeps_the_hint_apart() {
        let e = Outer {
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied"),
        };
        let r = Report::of(&e);
        assert_eq!(r.message, "could not open the log: denied");
        assert_eq!(
            r.hint.as_deref(),
            Some("check the permissions of the data directory")
        );
        assert_eq!(
            r.to_string(),
            "could not open the log: denied\nhint: check the permissions of the data directory"
        );
    }
}
