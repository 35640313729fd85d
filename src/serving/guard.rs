//! What a statement may be before anything parses it: its size in bytes and
//! tokens, and how deep its expressions can nest — checked on the token
//! stream, which the tokenizer builds in a loop, before the parser, the
//! planner, the Postgres rewrites or `Drop` walk a tree recursively.
//!
//! ```text
//!  SQL text ──▶ ≤ MAX_SQL_BYTES ──▶ tokens (iterative) ──▶ ≤ MAX_SQL_TOKENS
//!                                        │
//!                                        └─▶ depth estimate ≤ MAX_EXPR_DEPTH ──▶ parse, plan, run
//! ```
//!
//! Why the tokens: sqlparser builds an operator chain (`1+1+…`, `a = 0 OR
//! a = 1 OR …`) in a loop, so its recursion limit never sees it, yet the
//! chain is a tree as deep as it is long, and every pass after the parser
//! (planning, rewriting, hashing, dropping) recurses over it. 4 KB of such
//! SQL overflowed a 2 MiB stack; 1 MiB is 500,000 terms. The estimate below
//! is never below the depth of the tree the parser would build.

use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

/// A statement's text, at most (HTTP's body limit for SQL is the same).
pub const MAX_SQL_BYTES: usize = 1 << 20;
/// A statement's tokens (words, literals, operators), at most: planning
/// is linear in them, and a 100,000-item `IN` list plans in about a second.
pub const MAX_SQL_TOKENS: usize = 200_000;
/// How deep a statement's expressions may nest, at most (operators chained
/// at one level, parentheses, subqueries and `CASE` each add a level).
/// Planning time grows faster than linearly with the depth: a chain of 400
/// `+` over a column plans in 3 s in a debug build, 0.3 s in a release
/// build; of 1,000, past the 10 s deadline, where planning (one synchronous
/// call) cannot be stopped. Nesting by parentheses and function calls
/// stops sooner, at the parser's recursion limit (50).
pub const MAX_EXPR_DEPTH: usize = 400;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuardError {
    #[error("the statement is {bytes} bytes long; a statement may be at most {limit} bytes")]
    TooLong { bytes: usize, limit: usize },
    #[error("the statement has over {limit} tokens; a statement may have at most {limit}")]
    TooManyTokens { limit: usize },
    #[error(
        "the statement nests expressions over {limit} deep (near byte {at}); a statement may nest at most {limit} deep"
    )]
    TooDeep { limit: usize, at: usize },
    #[error("the statement cannot be read: {detail}")]
    Syntax { detail: String },
}

impl crate::error::Explain for GuardError {
    fn hint(&self) -> Option<String> {
        match self {
            GuardError::TooLong { .. } | GuardError::TooManyTokens { .. } => Some(
                "filter with a shorter condition: a long list of values is better as a view or a join".into(),
            ),
            GuardError::TooDeep { .. } => Some(
                "write a long chain of OR as `col IN (…)`, and a long sum as an aggregate".into(),
            ),
            GuardError::Syntax { .. } => None,
        }
    }

    fn sqlstate(&self) -> &'static str {
        match self {
            // program_limit_exceeded
            GuardError::TooLong { .. } | GuardError::TooManyTokens { .. } => "54000",
            // statement_too_complex
            GuardError::TooDeep { .. } => "54001",
            // syntax_error
            GuardError::Syntax { .. } => "42601",
        }
    }
}

/// Checks `sql` against [`MAX_SQL_BYTES`], [`MAX_SQL_TOKENS`] and
/// [`MAX_EXPR_DEPTH`]. Linear in the text, no recursion.
pub fn check_sql(sql: &str) -> Result<(), GuardError> {
    check(sql, MAX_SQL_BYTES, MAX_SQL_TOKENS, MAX_EXPR_DEPTH)
}

fn check(
    sql: &str,
    max_bytes: usize,
    max_tokens: usize,
    max_depth: usize,
) -> Result<(), GuardError> {
    if sql.len() > max_bytes {
        return Err(GuardError::TooLong {
            bytes: sql.len(),
            limit: max_bytes,
        });
    }
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
        .with_unescape(false)
        .tokenize_with_location()
        .map_err(|e| GuardError::Syntax {
            detail: e.to_string(),
        })?;
    // Per open level (the statement, each parenthesis, bracket and CASE):
    // the operators seen since its last separator. The tree under an
    // operator chain is as deep as the chain; a level adds one.
    let mut levels: Vec<usize> = vec![0];
    let mut depth = 0usize; // the sum of `levels`
    let mut counted = 0usize;
    for t in &tokens {
        let token = &t.token;
        if matches!(token, Token::Whitespace(_) | Token::EOF) {
            continue;
        }
        counted += 1;
        if counted > max_tokens {
            return Err(GuardError::TooManyTokens { limit: max_tokens });
        }
        match token {
            Token::LParen | Token::LBracket | Token::LBrace => levels.push(0),
            Token::Word(w) if w.quote_style.is_none() && w.keyword == Keyword::CASE => {
                depth += 1; // CASE itself is a node of the level it is in
                *levels.last_mut().expect("a level") += 1;
                levels.push(0);
            }
            Token::RParen | Token::RBracket | Token::RBrace => pop(&mut levels, &mut depth),
            Token::Word(w) if w.quote_style.is_none() && w.keyword == Keyword::END => {
                pop(&mut levels, &mut depth)
            }
            // Separators: what follows is a sibling, not a child.
            Token::Comma => reset(&mut levels, &mut depth),
            Token::Word(w)
                if w.quote_style.is_none()
                    && matches!(w.keyword, Keyword::WHEN | Keyword::THEN | Keyword::ELSE) =>
            {
                reset(&mut levels, &mut depth)
            }
            Token::SemiColon => {
                levels = vec![0];
                depth = 0;
            }
            // Leaves: names and literals.
            Token::Word(w) if w.quote_style.is_some() || w.keyword == Keyword::NoKeyword => {}
            Token::Number(..)
            | Token::Char(_)
            | Token::Placeholder(_)
            | Token::Period
            | Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::TripleSingleQuotedString(_)
            | Token::TripleDoubleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::DoubleQuotedByteStringLiteral(_)
            | Token::TripleSingleQuotedByteStringLiteral(_)
            | Token::TripleDoubleQuotedByteStringLiteral(_)
            | Token::SingleQuotedRawStringLiteral(_)
            | Token::DoubleQuotedRawStringLiteral(_)
            | Token::TripleSingleQuotedRawStringLiteral(_)
            | Token::TripleDoubleQuotedRawStringLiteral(_)
            | Token::NationalStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::HexStringLiteral(_) => {}
            // Everything else — operators, and keywords (AND, OR, NOT, IS,
            // LIKE, UNION, JOIN, …) — may make a node over what precedes it.
            _ => {
                *levels.last_mut().expect("a level") += 1;
                depth += 1;
            }
        }
        if depth + levels.len() > max_depth {
            return Err(GuardError::TooDeep {
                limit: max_depth,
                at: offset_of(sql, t.span.start.line, t.span.start.column),
            });
        }
    }
    Ok(())
}

/// Closes the innermost level (never the statement's own).
fn pop(levels: &mut Vec<usize>, depth: &mut usize) {
    if levels.len() > 1 {
        *depth -= levels.pop().expect("a level");
    }
}

/// A separator at the innermost level: its operator count starts again.
fn reset(levels: &mut [usize], depth: &mut usize) {
    let top = levels.last_mut().expect("a level");
    *depth -= *top;
    *top = 0;
}

/// The byte offset of a 1-based line and column (characters) in `sql`.
fn offset_of(sql: &str, line: u64, column: u64) -> usize {
    let mut at = 0;
    for (i, l) in sql.split_inclusive('\n').enumerate() {
        if i as u64 + 1 == line {
            return at
                + l.char_indices()
                    .nth(column.saturating_sub(1) as usize)
                    .map_or(l.len(), |(b, _)| b);
        }
        at += l.len();
    }
    sql.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(op: &str, n: usize) -> String {
        let terms: Vec<String> = (0..n).map(|i| format!("orders = {i}")).collect();
        format!("SELECT * FROM v WHERE {}", terms.join(op))
    }

    #[test]
    fn long_chains_are_refused_before_parsing() {
        let plus = format!("SELECT 1{}", "+1".repeat(2_000));
        assert!(
            matches!(check_sql(&plus), Err(GuardError::TooDeep { .. })),
            "2,000 terms chained by + make a tree 2,000 deep"
        );
        assert!(matches!(
            check_sql(&chain(" OR ", 3_000)),
            Err(GuardError::TooDeep { .. })
        ));
        let parens = format!("SELECT {}1{}", "(".repeat(1_500), ")".repeat(1_500));
        assert!(matches!(
            check_sql(&parens),
            Err(GuardError::TooDeep { .. })
        ));
    }

    #[test]
    fn wide_statements_are_not_deep() {
        // Siblings: a select list, an IN list, CASE branches, many statements.
        let list: Vec<String> = (0..5_000).map(|i| format!("a + {i} AS c{i}")).collect();
        check_sql(&format!("SELECT {} FROM v", list.join(", "))).expect("5,000 columns");
        let values: Vec<String> = (0..50_000).map(|i| i.to_string()).collect();
        check_sql(&format!(
            "SELECT * FROM v WHERE zipcode IN ({})",
            values.join(",")
        ))
        .expect("an IN list of 50,000");
        let whens: Vec<String> = (0..2_000)
            .map(|i| format!("WHEN a = {i} THEN {i}"))
            .collect();
        check_sql(&format!(
            "SELECT CASE {} ELSE 0 END FROM v",
            whens.join(" ")
        ))
        .expect("2,000 CASE branches");
        check_sql(&chain(" OR ", 150)).expect("a filter of 150 terms");
        check_sql(&"SELECT 1+1+1;".repeat(1_000)).expect("statements are siblings");
    }

    #[test]
    fn a_closing_level_gives_its_depth_back() {
        let nested = "(1+1+1+1) + ".repeat(100);
        // 100 groups at the outer level, each 4 deep inside.
        check(&format!("SELECT {nested} 1"), usize::MAX, usize::MAX, 110)
            .expect("the groups' inner operators do not add up");
        assert!(check(&format!("SELECT {nested} 1"), usize::MAX, usize::MAX, 90).is_err());
        // Unbalanced closers do not underflow.
        check_sql("SELECT 1)))) END END").expect("the parser will refuse it, not the guard");
    }

    #[test]
    fn size_bounds_hold_and_say_where() {
        let big = format!("SELECT '{}'", "x".repeat(MAX_SQL_BYTES));
        assert!(matches!(check_sql(&big), Err(GuardError::TooLong { .. })));
        let many = format!("SELECT {}", "1,".repeat(MAX_SQL_TOKENS));
        assert!(matches!(
            check_sql(&many[..many.len() - 1]),
            Err(GuardError::TooManyTokens { .. })
        ));
        let deep = format!("SELECT 1\n, 2{}", " - 2".repeat(10));
        match check(&deep, usize::MAX, usize::MAX, 5) {
            Err(GuardError::TooDeep { at, .. }) => {
                assert!(
                    at > 11 && at < deep.len(),
                    "the offset is inside the chain: {at}"
                )
            }
            other => panic!("a 10-deep chain over a limit of 5 is refused: {other:?}"),
        }
    }
}
