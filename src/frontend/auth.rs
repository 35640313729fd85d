//! Bearer tokens with scopes.
//!
//! ```text
//!  request ─▶ scope of the route (ingest: POST /v1/events, /v1/batch/run;
//!             admin: POST /v1/views, DELETE /v1/views/{name}[/change]; query: the rest)
//!          ─▶ no tokens configured (loopback only)   → on
//!          ─▶ Authorization: Bearer <t> missing/unknown → 401
//!          ─▶ t lacks the scope                        → 403
//! ```
//!
//! Tokens are compared in constant time, against every configured token (no
//! early exit), so timing tells an attacker nothing about how close a guess
//! was. Tokens are never logged, and never echoed in errors.

use axum::http::Method;
use subtle::ConstantTimeEq;

use crate::config::{AuthConfig, Scope};
use crate::error::Explain;

/// The configured tokens, resolved (from the file or the environment).
#[derive(Default)]
pub struct Auth {
    tokens: Vec<(Vec<u8>, Vec<Scope>)>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Auth({} tokens)", self.tokens.len())
    }
}

impl Auth {
    pub fn from_config(c: &AuthConfig) -> Auth {
        Auth {
            tokens: c
                .tokens
                .iter()
                .filter_map(|t| t.value().map(|v| (v.into_bytes(), t.scopes.clone())))
                .collect(),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Whether `presented` is a token with scope `need`.
    pub fn check(&self, presented: &[u8], need: Scope) -> Result<(), Denied> {
        match self.scopes(presented) {
            None => Err(Denied::Invalid),
            Some(scopes) if !scopes.contains(&need) => Err(Denied::Scope(need)),
            Some(_) => Ok(()),
        }
    }

    /// The scopes of `presented`, or `None` if it is no configured token.
    fn scopes(&self, presented: &[u8]) -> Option<&[Scope]> {
        let mut found = None;
        for (token, scopes) in &self.tokens {
            // `ct_eq` on slices of unequal length is false without comparing
            // bytes; the length of a token is not a secret worth hiding.
            if bool::from(token.as_slice().ct_eq(presented)) {
                found = Some(scopes.as_slice());
            }
        }
        found
    }
}

/// The scope a request needs.
pub fn scope_of(method: &Method, path: &str) -> Scope {
    match (method, path) {
        (&Method::POST, "/v1/events" | "/v1/batch/run") => Scope::Ingest,
        // A view change alters what every reader sees: an operator's act,
        // not a producer's.
        (&Method::POST, "/v1/views") => Scope::Admin,
        (&Method::DELETE, p) if p.starts_with("/v1/views/") => Scope::Admin,
        _ => Scope::Query,
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is
/// case-insensitive (RFC 7235 §2.1: `bearer` and `BEARER` are `Bearer`),
/// and one or more spaces may follow it.
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| rest.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// Why a client was turned away.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    #[error("this server requires an access token")]
    Missing,
    #[error("the access token is not valid")]
    Invalid,
    #[error("the access token does not have the `{}` scope", scope_name(*.0))]
    Scope(Scope),
}

crate::explained!(Denied);

impl Explain for Denied {
    fn hint(&self) -> Option<String> {
        Some(match self {
            Denied::Missing => "send `Authorization: Bearer <token>`".into(),
            Denied::Invalid => {
                "check the token you were given; tokens are configured in [auth] on the server"
                    .into()
            }
            Denied::Scope(s) => format!("use a token with scope \"{}\"", scope_name(*s)),
        })
    }

    fn sqlstate(&self) -> &'static str {
        match self {
            // invalid_password
            Denied::Missing | Denied::Invalid => "28P01",
            // insufficient_privilege
            Denied::Scope(_) => "42501",
        }
    }
}

fn scope_name(s: Scope) -> &'static str {
    match s {
        Scope::Ingest => "ingest",
        Scope::Query => "query",
        Scope::Admin => "admin",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenConfig;

    fn auth() -> Auth {
        Auth::from_config(&AuthConfig {
            tokens: vec![
                TokenConfig {
                    token: Some("ingest-only-0123456789".into()),
                    env: None,
                    scopes: vec![Scope::Ingest],
                },
                TokenConfig {
                    token: Some("both-scopes-0123456789".into()),
                    env: None,
                    scopes: vec![Scope::Ingest, Scope::Query],
                },
            ],
        })
    }

    #[test]
    fn tokens_resolve_to_their_scopes_and_nothing_else_does() {
        let a = auth();
        assert_eq!(
            a.scopes(b"ingest-only-0123456789"),
            Some(&[Scope::Ingest][..])
        );
        assert_eq!(
            a.scopes(b"both-scopes-0123456789"),
            Some(&[Scope::Ingest, Scope::Query][..])
        );
        assert_eq!(
            a.scopes(b"ingest-only-012345678"),
            None,
            "a prefix is no token"
        );
        assert_eq!(
            a.scopes(b"ingest-only-01234567890"),
            None,
            "nor a longer string"
        );
        assert_eq!(a.scopes(b""), None);
        assert!(
            !format!("{a:?}").contains("0123"),
            "Debug must not print tokens"
        );
    }

    #[test]
    fn the_scheme_is_case_insensitive() {
        for v in ["Bearer tok", "bearer tok", "BEARER  tok", "beArer tok "] {
            assert_eq!(bearer(v.as_bytes()), Some(&b"tok"[..]), "{v:?}");
        }
        for v in ["Basic tok", "Bearertok", "Bearer ", "tok", ""] {
            assert_eq!(bearer(v.as_bytes()), None, "{v:?}");
        }
    }

    #[test]
    fn writes_need_ingest_and_everything_else_query() {
        assert_eq!(scope_of(&Method::POST, "/v1/events"), Scope::Ingest);
        assert_eq!(scope_of(&Method::POST, "/v1/batch/run"), Scope::Ingest);
        assert_eq!(scope_of(&Method::POST, "/v1/sql"), Scope::Query);
        assert_eq!(scope_of(&Method::GET, "/v1/views/x"), Scope::Query);
        assert_eq!(scope_of(&Method::GET, "/metrics"), Scope::Query);
        assert_eq!(scope_of(&Method::GET, "/v1/events"), Scope::Query);
    }
}
