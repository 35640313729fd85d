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
//!
//! Details and hints are found, not forwarded: every type that explains
//! itself registers its [`Explain`] impl with [`explained!`], and a
//! [`Report`] walks the error's `source()` chain, taking the first detail,
//! hint and SQLSTATE it finds, outermost first. A wrapper keeps its cause
//! as a `#[source]` (not `#[error(transparent)]`, which would hide the cause
//! from the walk), so no wrapper repeats its causes' hints and no front end
//! keeps a list of types to look for.

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

/// A registered [`Explain`] impl: how to find it on a `dyn Error`.
pub struct Explainer(pub for<'a> fn(&'a (dyn Error + 'static)) -> Option<&'a dyn Explain>);

inventory::collect!(Explainer);

/// Registers a type's [`Explain`] impl, so that a [`Report`] of any error
/// whose chain holds one finds its detail and hint.
#[macro_export]
macro_rules! explained {
    ($t:ty) => {
        const _: () = {
            fn find<'a>(
                e: &'a (dyn ::std::error::Error + 'static),
            ) -> Option<&'a dyn $crate::error::Explain> {
                e.downcast_ref::<$t>()
                    .map(|x| x as &dyn $crate::error::Explain)
            }
            ::inventory::submit! { $crate::error::Explainer(find) }
        };
    };
}

/// The [`Explain`] impl of `e` itself, if its type registered one.
pub fn explain_of<'a>(e: &'a (dyn Error + 'static)) -> Option<&'a dyn Explain> {
    for x in inventory::iter::<Explainer> {
        let find: for<'b> fn(&'b (dyn Error + 'static)) -> Option<&'b dyn Explain> = x.0;
        if let Some(found) = find(e) {
            return Some(found);
        }
    }
    None
}

/// `e` and its causes, outermost first.
fn causes<'a>(e: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    let mut next = Some(e);
    std::iter::from_fn(move || {
        let c = next?;
        next = c.source();
        Some(c)
    })
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
    /// The report of `e`: its message and causes, and the first detail,
    /// hint and SQLSTATE its chain gives.
    pub fn of(e: &(dyn Error + 'static)) -> Report {
        let mut r = Report::new(chain(e));
        for x in causes(e).filter_map(explain_of) {
            r.detail = r.detail.or_else(|| x.detail());
            r.hint = r.hint.or_else(|| x.hint());
            if r.sqlstate == "XX000" {
                r.sqlstate = x.sqlstate();
            }
        }
        r
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
    crate::explained!(Outer);

    #[derive(Debug, thiserror::Error)]
    enum Wrapper {
        #[error("{0}")]
        Outer(#[from] Outer),
    }

    #[test]
    fn a_hint_is_found_anywhere_in_the_chain() {
        let e = Wrapper::from(Outer {
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied"),
        });
        let r = Report::of(&e);
        assert_eq!(
            r.message, "could not open the log: denied",
            "a wrapper that displays its cause is not repeated"
        );
        assert_eq!(
            r.hint.as_deref(),
            Some("check the permissions of the data directory"),
            "the wrapper has no hint of its own; the cause's is found without forwarding"
        );
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
