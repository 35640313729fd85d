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

use datafusion::sql::sqlparser::dialect::{Dialect, GenericDialect, PostgreSqlDialect};
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
/// The relations a statement names, at most: tables (each item of a FROM
/// list), joins, CTEs and set operations. Planning joins grows faster than linearly
/// with their number (50 comma-joined views took 2.5 s to plan in a debug
/// build, 200 over 10 s), and a chain of CTEs is a plan as deep as it is
/// long.
pub const MAX_RELATIONS: usize = 24;

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
    #[error(
        "the statement names over {limit} tables, joins, CTEs and subqueries (near byte {at}); a statement may name at most {limit}"
    )]
    TooManyRelations { limit: usize, at: usize },
    #[error("the statement cannot be read: {detail}")]
    Syntax { detail: String },
}

crate::explained!(GuardError);

impl crate::error::Explain for GuardError {
    fn hint(&self) -> Option<String> {
        match self {
            GuardError::TooLong { .. } | GuardError::TooManyTokens { .. } => Some(
                "filter with a shorter condition: a long list of values is better as a view or a join".into(),
            ),
            GuardError::TooDeep { .. } => Some(
                "write a long chain of OR as `col IN (…)`, and a long sum as an aggregate".into(),
            ),
            GuardError::TooManyRelations { .. } => Some(
                "join fewer views in one statement, or aggregate before joining".into(),
            ),
            GuardError::Syntax { .. } => None,
        }
    }

    fn sqlstate(&self) -> &'static str {
        match self {
            // program_limit_exceeded
            GuardError::TooLong { .. } | GuardError::TooManyTokens { .. } => "54000",
            // statement_too_complex
            GuardError::TooDeep { .. } | GuardError::TooManyRelations { .. } => "54001",
            // syntax_error
            GuardError::Syntax { .. } => "42601",
        }
    }
}

/// The dialect a surface parses in: the guard must read the statement as
/// its parser will (a backtick or a `/*! … */` comment is a quote or a
/// comment in one dialect and code in another).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// Postgres: the wire protocol's parser.
    Postgres,
    /// `POST /v1/sql`: DataFusion's own parser, in its default dialect.
    Http,
}

/// Checks `sql` against [`MAX_SQL_BYTES`], [`MAX_SQL_TOKENS`],
/// [`MAX_EXPR_DEPTH`] and [`MAX_RELATIONS`], read as the Postgres endpoint
/// parses it. Linear in the text, no recursion.
pub fn check_sql(sql: &str) -> Result<(), GuardError> {
    check_on(sql, Surface::Postgres)
}

/// [`check_sql`], read as `surface` parses it.
pub fn check_on(sql: &str, surface: Surface) -> Result<(), GuardError> {
    let dialect: &dyn Dialect = match surface {
        Surface::Postgres => &PostgreSqlDialect {},
        Surface::Http => &GenericDialect {},
    };
    check(sql, dialect, MAX_SQL_BYTES, MAX_SQL_TOKENS, MAX_EXPR_DEPTH)
}

/// Which clause a level is in, for counting relations: a comma in a FROM
/// list is another table, in a WITH list another CTE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clause {
    Other,
    From,
    With,
}

struct Level {
    /// Operators seen since the level's last separator.
    ops: usize,
    clause: Clause,
}

impl Level {
    fn new() -> Level {
        Level {
            ops: 0,
            clause: Clause::Other,
        }
    }
}

fn check(
    sql: &str,
    dialect: &dyn Dialect,
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
    let tokens = Tokenizer::new(dialect, sql)
        .with_unescape(false)
        .tokenize_with_location()
        .map_err(|e| GuardError::Syntax {
            detail: e.to_string(),
        })?;
    // Per open level (the statement, each parenthesis, bracket and CASE):
    // the operators seen since its last separator. The tree under an
    // operator chain is as deep as the chain; a level adds one.
    let mut levels: Vec<Level> = vec![Level::new()];
    let mut depth = 0usize; // the sum of the levels' `ops`
    let mut counted = 0usize;
    // Tables, joins, CTEs and subqueries: each a node of the plan's tree.
    let mut relations = 0usize;
    for t in &tokens {
        let token = &t.token;
        if matches!(token, Token::Whitespace(_) | Token::EOF) {
            continue;
        }
        counted += 1;
        if counted > max_tokens {
            return Err(GuardError::TooManyTokens { limit: max_tokens });
        }
        let keyword = match token {
            Token::Word(w) if w.quote_style.is_none() => w.keyword,
            _ => Keyword::NoKeyword,
        };
        match token {
            // A subscript or slice applies to what precedes it: it chains
            // like an operator, and its inside is a level of its own.
            Token::LBracket => {
                bump(&mut levels, &mut depth);
                levels.push(Level::new());
            }
            Token::LParen | Token::LBrace => levels.push(Level::new()),
            Token::Word(_) if keyword == Keyword::CASE => {
                bump(&mut levels, &mut depth);
                levels.push(Level::new());
            }
            Token::RParen | Token::RBracket | Token::RBrace => pop(&mut levels, &mut depth),
            Token::Word(_) if keyword == Keyword::END => pop(&mut levels, &mut depth),
            // Separators: what follows is a sibling, not a child — but a
            // sibling table or CTE is one more relation to plan.
            Token::Comma => {
                if levels.last().expect("a level").clause != Clause::Other {
                    relations += 1;
                }
                reset(&mut levels, &mut depth)
            }
            Token::Word(_) if matches!(keyword, Keyword::WHEN | Keyword::THEN | Keyword::ELSE) => {
                reset(&mut levels, &mut depth)
            }
            Token::SemiColon => {
                levels = vec![Level::new()];
                depth = 0;
                relations = 0;
            }
            // Leaves: names and literals.
            Token::Word(w) if w.quote_style.is_some() || w.keyword == Keyword::NoKeyword => {}
            Token::Number(..)
            | Token::Char(_)
            | Token::Placeholder(_)
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
            // Everything else — operators, `.` (a field of what precedes
            // it), and keywords (AND, OR, NOT, IS, LIKE, UNION, JOIN, …) —
            // may make a node over what precedes it.
            _ => {
                bump(&mut levels, &mut depth);
                let level = levels.last_mut().expect("a level");
                match keyword {
                    Keyword::FROM => {
                        relations += 1;
                        level.clause = Clause::From;
                    }
                    Keyword::WITH => {
                        relations += 1;
                        level.clause = Clause::With;
                    }
                    Keyword::JOIN | Keyword::UNION | Keyword::VALUES => {
                        relations += 1;
                        if keyword != Keyword::JOIN {
                            level.clause = Clause::Other;
                        }
                    }
                    Keyword::SELECT => level.clause = Clause::Other,
                    Keyword::WHERE
                    | Keyword::GROUP
                    | Keyword::HAVING
                    | Keyword::ORDER
                    | Keyword::LIMIT
                    | Keyword::OFFSET
                    | Keyword::WINDOW
                    | Keyword::QUALIFY
                    | Keyword::INTERSECT
                    | Keyword::EXCEPT
                    | Keyword::ON
                    | Keyword::USING => level.clause = Clause::Other,
                    _ => {}
                }
            }
        }
        if depth + levels.len() > max_depth {
            return Err(GuardError::TooDeep {
                limit: max_depth,
                at: offset_of(sql, t.span.start.line, t.span.start.column),
            });
        }
        if relations > MAX_RELATIONS {
            return Err(GuardError::TooManyRelations {
                limit: MAX_RELATIONS,
                at: offset_of(sql, t.span.start.line, t.span.start.column),
            });
        }
    }
    Ok(())
}

/// One more operator at the innermost level.
fn bump(levels: &mut [Level], depth: &mut usize) {
    levels.last_mut().expect("a level").ops += 1;
    *depth += 1;
}

/// Closes the innermost level (never the statement's own).
fn pop(levels: &mut Vec<Level>, depth: &mut usize) {
    if levels.len() > 1 {
        *depth -= levels.pop().expect("a level").ops;
    }
}

/// A separator at the innermost level: its operator count starts again.
fn reset(levels: &mut [Level], depth: &mut usize) {
    let top = levels.last_mut().expect("a level");
    *depth -= top.ops;
    top.ops = 0;
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
        check(
            &format!("SELECT {nested} 1"),
            &PostgreSqlDialect {},
            usize::MAX,
            usize::MAX,
            110,
        )
        .expect("the groups' inner operators do not add up");
        assert!(
            check(
                &format!("SELECT {nested} 1"),
                &PostgreSqlDialect {},
                usize::MAX,
                usize::MAX,
                90
            )
            .is_err()
        );
        // Unbalanced closers do not underflow.
        check_sql("SELECT 1)))) END END").expect("the parser will refuse it, not the guard");
    }

    #[test]
    fn each_surface_is_read_in_its_parsers_dialect() {
        // A backtick quotes a name for DataFusion's parser, and opens
        // nothing for Postgres: read as Postgres, the chain hides in a
        // string literal (found by the red team: a stack overflow).
        let chain = "1+1".repeat(1_500);
        let q = format!("SELECT 1 AS `a'`, {chain} AS `b'`");
        assert!(
            matches!(check_on(&q, Surface::Http), Err(GuardError::TooDeep { .. })),
            "read as the HTTP parser reads it, the chain is seen"
        );
        let q = format!("SELECT 1 /*!{chain}*/ AS x");
        let http = check_on(&q, Surface::Http);
        let generic_runs_it = datafusion::sql::sqlparser::parser::Parser::parse_sql(
            &GenericDialect {},
            "SELECT 1 /*! +1 */ AS x",
        )
        .map(|s| s[0].to_string().contains('+'))
        .unwrap_or(false);
        if generic_runs_it {
            assert!(matches!(http, Err(GuardError::TooDeep { .. })), "{http:?}");
        }
    }

    #[test]
    fn subscripts_fields_and_relations_are_counted() {
        let slices = format!("SELECT make_array(1){}", "[1:1]".repeat(2_000));
        assert!(matches!(
            check_on(&slices, Surface::Http),
            Err(GuardError::TooDeep { .. })
        ));
        let ctes: Vec<String> = (1..3_000)
            .map(|i| format!("c{i} AS (SELECT x FROM c{})", i - 1))
            .collect();
        let q = format!(
            "WITH c0 AS (SELECT 1 AS x), {} SELECT x FROM c2999",
            ctes.join(", ")
        );
        assert!(matches!(
            check_sql(&q),
            Err(GuardError::TooManyRelations { .. })
        ));
        let from: Vec<String> = (0..100).map(|i| format!("v a{i}")).collect();
        let q = format!("SELECT count(*) FROM {}", from.join(", "));
        assert!(matches!(
            check_sql(&q),
            Err(GuardError::TooManyRelations { .. })
        ));
        let joins = " CROSS JOIN v".repeat(190);
        assert!(matches!(
            check_sql(&format!("SELECT count(*) FROM v{joins}")),
            Err(GuardError::TooManyRelations { .. })
        ));
        // What a dashboard sends passes.
        check_sql(
            "WITH a AS (SELECT * FROM v1), b AS (SELECT * FROM v2) \
             SELECT a.x, b.y FROM a JOIN b ON a.k = b.k, v3 WHERE a.x IN (SELECT x FROM v4) \
             UNION ALL SELECT 1, 2",
        )
        .expect("a few CTEs, joins and a subquery");
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
        match check(&deep, &PostgreSqlDialect {}, usize::MAX, usize::MAX, 5) {
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
