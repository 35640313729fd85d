//! Values a query builds, bounded: every scalar function of a query's
//! session goes through [`Bounded`], which checks a call before and after
//! it runs.
//!
//! ```text
//!  f(args) ─▶ before: a function that can build far more than it is given
//!             in one call (repeat, lpad, replace, range, array_repeat, …) or
//!             do quadratic work (levenshtein) is priced from its arguments,
//!             and refused over the bound, before anything is allocated
//!        ─▶ after: whatever it returned (every other function) is measured:
//!             no value over MAX_VALUE_BYTES and no call over MAX_CALL_BYTES,
//!             beyond what its arguments already were
//! ```
//!
//! Why both: a function's values are not in the query's memory pool, so a
//! check before the call is the only bound on one call that multiplies its
//! input (`replace(repeat('x', 400), 'x', repeat('y', 1000000))` is 400 MB);
//! and the check after stops a chain of calls that each grow a little
//! (`concat(s, s)` over and over, through CTEs) at the first that passes
//! the bound. Together a call allocates at most about twice the bounds.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, FieldRef, Int64Type, TimeUnit};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Result, ScalarValue, exec_err};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::interval_arithmetic::Interval;
use datafusion::logical_expr::preimage::PreimageResult;
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::{
    BinaryExpr, ColumnarValue, Documentation, Expr, ExpressionPlacement, LogicalPlan, Operator,
    ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, StructFieldMapping,
    Volatility,
};
use datafusion::optimizer::analyzer::AnalyzerRule;
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};
use datafusion::prelude::SessionContext;

/// One value a function builds, at most (`repeat('x', 1e9)` would otherwise
/// allocate outside any memory pool).
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// The values one call builds (a batch of rows), at most.
pub const MAX_CALL_BYTES: usize = 64 << 20;
/// The steps of quadratic work one call may do (a `levenshtein` of two
/// strings of n and m characters is n·m): about a second.
pub const MAX_CALL_STEPS: u64 = 1 << 28;

/// Bounds every value the queries planned in `ctx` build: after analysis
/// (and after each optimizer pass, which may simplify a call into new
/// ones), every scalar function call is a call of its [`Bounded`] wrapper,
/// and `a || b` of strings a call of the bounded [`ConcatOp`].
pub fn install(ctx: &SessionContext) {
    ctx.add_analyzer_rule(Arc::new(BoundValues));
    ctx.add_optimizer_rule(Arc::new(BoundValues));
}

/// The rule that puts every scalar call of a plan under [`Bounded`].
#[derive(Debug)]
struct BoundValues;

impl BoundValues {
    fn plan(plan: LogicalPlan) -> Result<Transformed<LogicalPlan>> {
        let out = plan.transform_up_with_subqueries(|p| {
            let p = p.map_expressions(|e| e.transform_up(|e| Ok(bound_expr(e))))?;
            if p.transformed {
                Ok(Transformed::yes(p.data.recompute_schema()?))
            } else {
                Ok(p)
            }
        })?;
        Ok(out)
    }
}

/// `e` with its scalar call bounded (its children are done already).
fn bound_expr(e: Expr) -> Transformed<Expr> {
    match e {
        Expr::ScalarFunction(f) if !f.func.inner().is::<Bounded>() => {
            Transformed::yes(Expr::ScalarFunction(ScalarFunction {
                func: Arc::new(wrap(f.func.as_ref().clone())),
                args: f.args,
            }))
        }
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::StringConcat,
            right,
        }) => Transformed::yes(Expr::ScalarFunction(ScalarFunction {
            func: Arc::new(wrap(ScalarUDF::new_from_impl(ConcatOp::new()))),
            args: vec![*left, *right],
        })),
        e => Transformed::no(e),
    }
}

/// `e` with every scalar call in it bounded.
fn bound_tree(e: Expr) -> Result<Expr> {
    Ok(e.transform_up(|e| Ok(bound_expr(e)))?.data)
}

impl AnalyzerRule for BoundValues {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        Ok(Self::plan(plan)?.data)
    }
    fn name(&self) -> &str {
        "lambdaflow_bound_values"
    }
}

impl OptimizerRule for BoundValues {
    fn name(&self) -> &str {
        "lambdaflow_bound_values"
    }
    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        Self::plan(plan)
    }
}

/// `a || b` over strings or binaries, as DataFusion's operator computes it
/// (NULL if either is), as a function so that it is bounded like the rest:
/// a chain of `||` builds its value one call at a time.
#[derive(Debug, PartialEq, Eq, Hash)]
struct ConcatOp {
    signature: Signature,
}

impl ConcatOp {
    fn new() -> ConcatOp {
        ConcatOp {
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for ConcatOp {
    fn name(&self) -> &str {
        "||"
    }
    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        // As the operator names its column: `a || b`.
        Ok(format!(
            "{} || {}",
            args[0].schema_name(),
            args[1].schema_name()
        ))
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        // The analyzer coerced both sides to one type before this exists.
        Ok(args[0].clone())
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let scalar = args
            .args
            .iter()
            .all(|v| matches!(v, ColumnarValue::Scalar(_)));
        let rows = if scalar { 1 } else { args.number_rows };
        let l = args.args[0].to_array(rows)?;
        let r = args.args[1].to_array(rows)?;
        let out = arrow::compute::kernels::concat_elements::concat_elements_dyn(&l, &r)?;
        if scalar {
            Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&out, 0)?))
        } else {
            Ok(ColumnarValue::Array(out))
        }
    }
}

/// `f` under [`Bounded`], priced by its name.
///
/// A function that can build more than it is given is marked volatile, so
/// the planner never folds its calls into constants. Folding builds the
/// value at plan time, where nothing can stop it, and then every pass
/// that names, clones or re-folds the expression copies it: 40
/// `repeat('x', 1000000)` joined by `||` (971 bytes of SQL) kept a query
/// thread busy for minutes past its deadline, naming and re-evaluating
/// megabyte literals at every level of the chain. Unfolded, the call runs
/// once per batch when the query executes, where it is priced and the
/// deadline holds.
fn wrap(f: ScalarUDF) -> ScalarUDF {
    let price = Price::of(f.name());
    let mut signature = f.signature().clone();
    if price != Price::After {
        signature.volatility = Volatility::Volatile;
    }
    ScalarUDF::new_from_impl(Bounded {
        inner: f,
        price,
        signature,
    })
}

/// How a function is priced before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Price {
    /// Its output is about as large as its inputs: measured after.
    After,
    /// `repeat(s, n)`: len(s)·n.
    Repeat,
    /// `lpad/rpad(s, n[, fill])`: n characters of up to 4 bytes.
    Pad,
    /// `replace(s, from, to)`: every position of s may become `to`.
    Replace,
    /// `regexp_replace(s, re, to[, flags])`: as replace, and each match may
    /// repeat s through references (`\1`, `$1`).
    RegexpReplace,
    /// `concat(a, b, …)`, `concat_ws(sep, a, …)`: the sum.
    Concat,
    /// `array_repeat(x, n)`: n copies of x.
    ArrayRepeat,
    /// `array_resize(a, n[, fill])`: n elements.
    ArrayResize,
    /// `range/generate_series(start, stop[, step])`: (stop-start)/step elements.
    Series,
    /// `levenshtein(a, b)`: len(a)·len(b) steps.
    Quadratic,
    /// `array_to_string(list, sep[, null])`: each element and a separator.
    Join,
    /// `array_replace(_n, _all)(list, from, to)`: every element may become `to`.
    ReplaceElements,
    /// A format (`to_char(t, format)`): a directive may print 16 times its
    /// length (`%c` prints 24 bytes).
    Format,
    /// At most `.0` times its first argument (`translate`: a byte may
    /// become a 4-byte character; `encode(x, 'hex')`: two digits a byte).
    Scale(usize),
}

impl Price {
    fn of(name: &str) -> Price {
        match name {
            "repeat" => Price::Repeat,
            "lpad" | "rpad" => Price::Pad,
            "replace" => Price::Replace,
            "regexp_replace" => Price::RegexpReplace,
            "concat" | "concat_ws" | "||" | "overlay" | "make_array" | "make_list"
            | "array_concat" | "array_cat" | "list_concat" | "list_cat" | "array_append"
            | "array_prepend" | "list_append" | "list_prepend" | "array_push_back"
            | "array_push_front" | "list_push_back" | "list_push_front" | "array_union"
            | "list_union" => Price::Concat,
            "array_to_string" | "array_join" | "list_to_string" | "list_join" => Price::Join,
            "array_replace" | "array_replace_n" | "array_replace_all" | "list_replace"
            | "list_replace_n" | "list_replace_all" => Price::ReplaceElements,
            "to_char" | "date_format" => Price::Format,
            "translate" => Price::Scale(4),
            "encode" => Price::Scale(2),
            "array_repeat" | "list_repeat" => Price::ArrayRepeat,
            "array_resize" | "list_resize" => Price::ArrayResize,
            "range" | "generate_series" => Price::Series,
            "levenshtein" => Price::Quadratic,
            _ => Price::After,
        }
    }
}

/// A scalar function whose calls are priced before and measured after (see
/// the module doc); otherwise the function itself.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Bounded {
    inner: ScalarUDF,
    price: Price,
    /// The inner function's, volatile if it can grow (see [`wrap`]).
    signature: Signature,
}

/// The sizes of an argument's or a result's values: the largest, and all.
#[derive(Debug, Default, Clone, Copy)]
struct Sizes {
    max: usize,
    total: usize,
}

fn sizes(v: &ColumnarValue) -> Sizes {
    match v {
        ColumnarValue::Scalar(s) => {
            let n = scalar_bytes(s);
            Sizes { max: n, total: n }
        }
        ColumnarValue::Array(a) => array_sizes(a.as_ref()),
    }
}

fn scalar_bytes(s: &ScalarValue) -> usize {
    match s {
        ScalarValue::Utf8(Some(s))
        | ScalarValue::LargeUtf8(Some(s))
        | ScalarValue::Utf8View(Some(s)) => s.len(),
        ScalarValue::Binary(Some(b))
        | ScalarValue::LargeBinary(Some(b))
        | ScalarValue::BinaryView(Some(b)) => b.len(),
        ScalarValue::List(a) => array_sizes(a.as_ref()).total,
        ScalarValue::LargeList(a) => array_sizes(a.as_ref()).total,
        ScalarValue::FixedSizeList(a) => array_sizes(a.as_ref()).total,
        other => other.size(),
    }
}

/// The sizes of `a`'s values, from its offsets where it has them (a slice
/// of a large array is measured as the slice).
fn array_sizes(a: &dyn Array) -> Sizes {
    fn by_lengths(lengths: impl Iterator<Item = usize>) -> Sizes {
        lengths.fold(Sizes::default(), |s, n| Sizes {
            max: s.max.max(n),
            total: s.total + n,
        })
    }
    fn lists(lengths: Vec<usize>, values: &dyn Array) -> Sizes {
        let inner = array_sizes(values);
        // Per element: its share of the values' bytes (at least 1).
        let each = inner.total.div_ceil(values.len().max(1)).max(1);
        let rows = lengths.len();
        Sizes {
            max: by_lengths(lengths.into_iter()).max * each,
            total: inner.total + 8 * rows,
        }
    }
    match a.data_type() {
        DataType::Utf8 => by_lengths(a.as_string::<i32>().offsets().lengths()),
        DataType::LargeUtf8 => by_lengths(a.as_string::<i64>().offsets().lengths()),
        DataType::Binary => by_lengths(a.as_binary::<i32>().offsets().lengths()),
        DataType::LargeBinary => by_lengths(a.as_binary::<i64>().offsets().lengths()),
        DataType::Utf8View => by_lengths(
            a.as_string_view()
                .views()
                .iter()
                .map(|v| *v as u32 as usize),
        ),
        DataType::BinaryView => by_lengths(
            a.as_binary_view()
                .views()
                .iter()
                .map(|v| *v as u32 as usize),
        ),
        DataType::List(_) => {
            let l = a.as_list::<i32>();
            let (first, last) = (l.offsets()[0] as usize, l.offsets()[l.len()] as usize);
            lists(
                l.offsets().lengths().collect(),
                l.values().slice(first, last - first).as_ref(),
            )
        }
        DataType::LargeList(_) => {
            let l = a.as_list::<i64>();
            let (first, last) = (l.offsets()[0] as usize, l.offsets()[l.len()] as usize);
            lists(
                l.offsets().lengths().collect(),
                l.values().slice(first, last - first).as_ref(),
            )
        }
        _ => {
            let total = a.get_array_memory_size();
            Sizes {
                max: total / a.len().max(1),
                total,
            }
        }
    }
}

/// The largest integer of an argument (0 for nulls and non-integers).
fn max_int(v: &ColumnarValue) -> i64 {
    match v {
        ColumnarValue::Scalar(s) => match s.cast_to(&DataType::Int64) {
            Ok(ScalarValue::Int64(Some(n))) => n,
            _ => 0,
        },
        ColumnarValue::Array(a) => match arrow::compute::cast(a, &DataType::Int64) {
            Ok(a) => arrow::compute::max(a.as_primitive::<Int64Type>()).unwrap_or(0),
            Err(_) => 0,
        },
    }
}

/// An argument's values as one array of `rows` (a scalar repeated).
fn as_array(v: &ColumnarValue, rows: usize) -> Option<ArrayRef> {
    v.to_array(rows.max(1)).ok()
}

/// A `range`/`generate_series` call's largest element count: over integers,
/// dates or timestamps (the step's shortest length: a month is 28 days).
fn series_len(args: &[ColumnarValue], rows: usize) -> Option<u128> {
    let (start, stop) = match args.len() {
        1 => (None, &args[0]),
        _ => (Some(&args[0]), &args[1]),
    };
    let numeric = |v: &ColumnarValue| -> Option<Vec<Option<i128>>> {
        let a = as_array(v, rows)?;
        let a = match a.data_type() {
            DataType::Date32 | DataType::Date64 | DataType::Timestamp(..) => {
                arrow::compute::cast(&a, &DataType::Timestamp(TimeUnit::Nanosecond, None)).ok()?
            }
            _ => a,
        };
        let a = arrow::compute::cast(&a, &DataType::Int64).ok()?;
        Some(
            a.as_primitive::<Int64Type>()
                .iter()
                .map(|v| v.map(i128::from))
                .collect(),
        )
    };
    let stop = numeric(stop)?;
    let start = match start {
        Some(s) => numeric(s)?,
        None => vec![Some(0); stop.len()],
    };
    let step: Vec<Option<i128>> = match args.get(2) {
        None => vec![Some(1); stop.len()],
        Some(v) => {
            let a = as_array(v, rows)?;
            match a.data_type() {
                DataType::Interval(_) => {
                    let a = arrow::compute::cast(
                        &a,
                        &DataType::Interval(arrow::datatypes::IntervalUnit::MonthDayNano),
                    )
                    .ok()?;
                    a.as_primitive::<arrow::datatypes::IntervalMonthDayNanoType>()
                        .iter()
                        .map(|v| {
                            v.map(|i| {
                                const DAY: i128 = 86_400_000_000_000;
                                i128::from(i.months) * 28 * DAY
                                    + i128::from(i.days) * DAY
                                    + i128::from(i.nanoseconds)
                            })
                        })
                        .collect()
                }
                _ => numeric(v)?,
            }
        }
    };
    let mut most = 0u128;
    for (i, b) in stop.iter().enumerate() {
        if let (Some(a), Some(b), Some(s)) = (
            start.get(i).copied().flatten(),
            *b,
            step.get(i).copied().flatten(),
        ) {
            let n = (b - a).unsigned_abs() / s.unsigned_abs().max(1) + 1;
            most = most.max(n);
        }
    }
    Some(most)
}

impl Bounded {
    /// How an error names the call: `repeat()`, or the `||` operator.
    fn what(&self) -> String {
        match self.name() {
            "||" => "||".to_string(),
            name => format!("{name}()"),
        }
    }

    /// The largest value and all values this call would build, or the
    /// steps it would take, before it runs; None if it is not priced.
    fn before(&self, args: &ScalarFunctionArgs) -> Result<()> {
        let a = &args.args;
        let rows = if a.iter().all(|v| matches!(v, ColumnarValue::Scalar(_))) {
            1
        } else {
            args.number_rows.max(1)
        };
        let len = |i: usize| a.get(i).map(sizes).unwrap_or_default().max;
        let int = |i: usize| a.get(i).map(max_int).unwrap_or(0).max(0) as u128;
        let value: u128 = match self.price {
            Price::After => return Ok(()),
            Price::Repeat => len(0) as u128 * int(1),
            Price::Pad => int(1) * 4,
            Price::Replace => (len(0) as u128 + 1) * (len(2) as u128 + 1),
            Price::RegexpReplace => {
                // Each of up to len(s)+1 matches becomes `to`; a reference
                // (`\\1`, `$1`) repeats part of its match, and the matches
                // are disjoint, so each reference adds at most len(s).
                let (s, to) = (len(0) as u128, len(2) as u128);
                let refs = a.get(2).map(references).unwrap_or(0) as u128;
                (s + 1) * (to + 1) + refs * s
            }
            Price::Concat => a.iter().map(|v| sizes(v).max as u128).sum(),
            Price::ArrayRepeat => int(1) * (len(0).max(8) as u128),
            Price::ArrayResize => {
                // New elements are the fill (or null), old ones kept.
                let each = a.first().map(element_bytes).unwrap_or(8).max(len(2)).max(8);
                int(1) * each as u128
            }
            Price::Join => {
                let n = a.first().map(list_len).unwrap_or(0) as u128;
                let each = a.first().map(element_bytes).unwrap_or(0).max(20) as u128;
                n * (each + len(1) as u128 + len(2) as u128)
            }
            Price::ReplaceElements => {
                let n = a.first().map(list_len).unwrap_or(0) as u128;
                let each = a.first().map(element_bytes).unwrap_or(0).max(len(2)).max(8);
                n * each as u128
            }
            Price::Format => (len(1) as u128 * 16).max(64),
            Price::Scale(k) => len(0) as u128 * k as u128,
            Price::Series => series_len(a, args.number_rows).unwrap_or(0) * 8,
            Price::Quadratic => {
                let (x, y) = (a.first(), a.get(1));
                let steps = match (x, y) {
                    (Some(x), Some(y)) => pairwise_steps(x, y, args.number_rows),
                    _ => 0,
                };
                if steps > MAX_CALL_STEPS as u128 {
                    return exec_err!(
                        "{} would take {steps} steps on these arguments; a call may take at most {MAX_CALL_STEPS}",
                        self.what()
                    );
                }
                return Ok(());
            }
        };
        let all = value.saturating_mul(rows as u128);
        if value > MAX_VALUE_BYTES as u128 {
            return exec_err!(
                "{} would build a value of {value} bytes; a query may build values of at most {MAX_VALUE_BYTES} bytes",
                self.what()
            );
        }
        if all > MAX_CALL_BYTES as u128 {
            return exec_err!(
                "{} would build {all} bytes over {rows} rows; one call may build at most {MAX_CALL_BYTES} bytes",
                self.what()
            );
        }
        Ok(())
    }

    /// Refuses a result larger than the bounds beyond its arguments' sizes
    /// (a function may hand back what it was given).
    fn after(&self, args: &[Sizes], out: &ColumnarValue) -> Result<()> {
        let got = sizes(out);
        let given_max = args.iter().map(|s| s.max).max().unwrap_or(0);
        let given_total: usize = args.iter().map(|s| s.total).sum();
        if got.max > MAX_VALUE_BYTES.max(given_max) {
            return exec_err!(
                "{} built a value of {} bytes; a query may build values of at most {MAX_VALUE_BYTES} bytes",
                self.what(),
                got.max
            );
        }
        if got.total > MAX_CALL_BYTES.max(given_total) {
            return exec_err!(
                "{} built {} bytes in one call; one call may build at most {MAX_CALL_BYTES} bytes",
                self.what(),
                got.total
            );
        }
        Ok(())
    }
}

/// The most elements of a list in `v` (0 if it holds no lists).
fn list_len(v: &ColumnarValue) -> usize {
    let most = |a: &dyn Array| match a.data_type() {
        DataType::List(_) => a.as_list::<i32>().offsets().lengths().max().unwrap_or(0),
        DataType::LargeList(_) => a.as_list::<i64>().offsets().lengths().max().unwrap_or(0),
        DataType::FixedSizeList(_, n) => *n as usize,
        _ => 0,
    };
    match v {
        ColumnarValue::Array(a) => most(a.as_ref()),
        ColumnarValue::Scalar(ScalarValue::List(a)) => most(a.as_ref()),
        ColumnarValue::Scalar(ScalarValue::LargeList(a)) => most(a.as_ref()),
        ColumnarValue::Scalar(ScalarValue::FixedSizeList(a)) => most(a.as_ref()),
        ColumnarValue::Scalar(_) => 0,
    }
}

/// The bytes of one element of `v` (a list's elements, or `v` itself).
fn element_bytes(v: &ColumnarValue) -> usize {
    let list = |a: &dyn Array| {
        let s = array_sizes(a);
        s.total / a.len().max(1)
    };
    match v {
        ColumnarValue::Array(a) => match a.data_type() {
            DataType::List(_) => list(a.as_list::<i32>().values().as_ref()),
            DataType::LargeList(_) => list(a.as_list::<i64>().values().as_ref()),
            _ => sizes(v).max,
        },
        ColumnarValue::Scalar(ScalarValue::List(a)) => list(a.values().as_ref()),
        ColumnarValue::Scalar(ScalarValue::LargeList(a)) => list(a.values().as_ref()),
        ColumnarValue::Scalar(_) => sizes(v).max,
    }
}

/// The most group references (`\\1`, `$1`, `${name}`) in a replacement.
fn references(v: &ColumnarValue) -> usize {
    let count = |s: &str| s.bytes().filter(|b| *b == b'\\' || *b == b'$').count();
    match v {
        ColumnarValue::Scalar(s) => match s {
            ScalarValue::Utf8(Some(s))
            | ScalarValue::LargeUtf8(Some(s))
            | ScalarValue::Utf8View(Some(s)) => count(s),
            _ => 0,
        },
        ColumnarValue::Array(a) => match arrow::compute::cast(a, &DataType::Utf8) {
            Ok(a) => a
                .as_string::<i32>()
                .iter()
                .flatten()
                .map(count)
                .max()
                .unwrap_or(0),
            Err(_) => 0,
        },
    }
}

/// Σ len(x)·len(y) over the rows of two string arguments.
fn pairwise_steps(x: &ColumnarValue, y: &ColumnarValue, rows: usize) -> u128 {
    let lengths = |v: &ColumnarValue| -> Vec<u128> {
        match v {
            ColumnarValue::Scalar(s) => vec![scalar_bytes(s) as u128],
            ColumnarValue::Array(a) => {
                let n = a.len();
                (0..n)
                    .map(|i| array_sizes(a.slice(i, 1).as_ref()).total as u128)
                    .collect()
            }
        }
    };
    let (lx, ly) = (lengths(x), lengths(y));
    (0..rows.max(1))
        .map(|i| {
            let a = *lx.get(i).or(lx.first()).unwrap_or(&0);
            let b = *ly.get(i).or(ly.first()).unwrap_or(&0);
            a * b
        })
        .sum()
}

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }
    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.inner().schema_name(args)
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        self.inner.inner().return_type(args)
    }
    fn with_updated_config(&self, config: &ConfigOptions) -> Option<ScalarUDF> {
        self.inner.inner().with_updated_config(config).map(wrap)
    }
    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.inner().return_field_from_args(args)
    }
    fn is_strict(&self) -> bool {
        self.inner.inner().is_strict()
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        self.before(&args)?;
        let given: Vec<Sizes> = args.args.iter().map(sizes).collect();
        let out = self.inner.inner().invoke_with_args(args)?;
        self.after(&given, &out)?;
        Ok(out)
    }
    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        // What a call simplifies into (other calls, made without the
        // registry) is bounded too.
        match self.inner.inner().simplify(args, info)? {
            ExprSimplifyResult::Simplified(e) => Ok(ExprSimplifyResult::Simplified(bound_tree(e)?)),
            original => Ok(original),
        }
    }
    fn preimage(
        &self,
        args: &[Expr],
        lit_expr: &Expr,
        info: &SimplifyContext,
    ) -> Result<PreimageResult> {
        self.inner.inner().preimage(args, lit_expr, info)
    }
    fn short_circuits(&self) -> bool {
        self.inner.inner().short_circuits()
    }
    fn conditional_arguments<'a>(
        &self,
        args: &'a [Expr],
    ) -> Option<(Vec<&'a Expr>, Vec<&'a Expr>)> {
        self.inner.inner().conditional_arguments(args)
    }
    fn evaluate_bounds(&self, input: &[&Interval]) -> Result<Interval> {
        self.inner.inner().evaluate_bounds(input)
    }
    fn propagate_constraints(
        &self,
        interval: &Interval,
        inputs: &[&Interval],
    ) -> Result<Option<Vec<Interval>>> {
        self.inner.inner().propagate_constraints(interval, inputs)
    }
    fn output_ordering(&self, inputs: &[ExprProperties]) -> Result<SortProperties> {
        self.inner.inner().output_ordering(inputs)
    }
    fn preserves_lex_ordering(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.inner().preserves_lex_ordering(inputs)
    }
    fn strictly_order_preserving(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.inner().strictly_order_preserving(inputs)
    }
    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.inner().coerce_types(args)
    }
    fn struct_field_mapping(
        &self,
        literal_args: &[Option<ScalarValue>],
    ) -> Option<StructFieldMapping> {
        self.inner.inner().struct_field_mapping(literal_args)
    }
    fn documentation(&self) -> Option<&Documentation> {
        self.inner.inner().documentation()
    }
    fn placement(&self, args: &[ExpressionPlacement]) -> ExpressionPlacement {
        self.inner.inner().placement(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> SessionContext {
        let ctx = SessionContext::new();
        install(&ctx);
        ctx
    }

    async fn run(ctx: &SessionContext, sql: &str) -> Result<Vec<arrow::record_batch::RecordBatch>> {
        ctx.sql(sql).await?.collect().await
    }

    async fn refused(sql: &str, what: &str) {
        match run(&ctx(), sql).await {
            Ok(b) => panic!("{sql} must be refused before it builds its value; got {b:?}"),
            Err(e) => assert!(
                e.to_string().contains(what),
                "{sql}: the refusal names {what:?}: {e}"
            ),
        }
    }

    /// The largest literal in `sql`'s optimized plan, in bytes.
    async fn largest_planned_literal(sql: &str) -> usize {
        let plan = ctx().sql(sql).await.unwrap().into_optimized_plan().unwrap();
        let mut largest = 0;
        plan.apply_with_subqueries(|p| {
            p.apply_expressions(|e| {
                e.apply(|e| {
                    if let Expr::Literal(v, _) = e {
                        largest = largest.max(scalar_bytes(v));
                    }
                    Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
                })
            })
        })
        .unwrap();
        largest
    }

    #[tokio::test]
    async fn the_planner_never_folds_a_call_that_can_grow_into_a_constant() {
        // Folded, each `repeat` became a megabyte literal that every later
        // pass named and copied, and each `||` re-folded the chain below it
        // and failed: minutes of planning nothing could stop.
        let chain = vec!["repeat('x', 1000000)"; 40].join(" || ");
        let largest = largest_planned_literal(&format!("SELECT length({chain})")).await;
        assert!(
            largest < 1000,
            "a call that can grow runs when the query does, not in the planner; the plan held a {largest}-byte literal"
        );
        refused(&format!("SELECT length({chain})"), "would build a value").await;
        // What cannot grow still folds.
        assert_eq!(
            largest_planned_literal("SELECT upper('abc') AS u").await,
            3,
            "upper('abc') folds to 'ABC'"
        );
    }

    #[tokio::test]
    async fn functions_that_multiply_their_input_are_refused_before_the_call() {
        refused(
            "SELECT length(replace(repeat('x', 400), 'x', repeat('y', 1000000)))",
            "replace() would build",
        )
        .await;
        refused(
            "SELECT cardinality(range(0, 80000000))",
            "range() would build",
        )
        .await;
        refused(
            "SELECT cardinality(generate_series(TIMESTAMP '1970-01-01', TIMESTAMP '2100-01-01', INTERVAL '1 second'))",
            "generate_series() would build",
        )
        .await;
        refused(
            "SELECT cardinality(array_repeat('abc', 10000000))",
            "array_repeat()",
        )
        .await;
        refused(
            "SELECT cardinality(array_resize([1], 100000000, 0))",
            "array_resize()",
        )
        .await;
        refused("SELECT repeat('x', 100000000)", "repeat() would build").await;
        refused("SELECT lpad('x', 500000000)", "lpad() would build").await;
        refused(
            r"SELECT length(regexp_replace(repeat('ab', 300000), '(a)', '\1\1\1\1', 'g'))",
            "regexp_replace() would build",
        )
        .await;
        refused(
            "SELECT levenshtein(repeat('a', 150000), repeat('b', 150000))",
            "levenshtein() would take",
        )
        .await;
        // Found by the red team: a separator, a fill or a replacement
        // repeated once per element (100 GB from 76 bytes of SQL).
        refused(
            "SELECT length(array_to_string(range(1, 100001), repeat('x', 1000000)))",
            "array_to_string() would build",
        )
        .await;
        refused(
            "SELECT cardinality(array_resize(make_array('a'), 20, repeat('x', 1000000)))",
            "array_resize() would build",
        )
        .await;
        refused(
            "SELECT cardinality(array_replace_all(array_repeat('a', 20), 'a', repeat('x', 1000000)))",
            "array_replace_all() would build",
        )
        .await;
        refused(
            "SELECT length(to_char(now(), repeat('%c', 100000)))",
            "to_char() would build",
        )
        .await;
    }

    #[tokio::test]
    async fn values_grown_a_step_at_a_time_stop_at_the_bound() {
        let x = "repeat('x', 1000000)";
        refused(
            &format!("SELECT length({x} || {x} || {x} || {x} || {x} || {x})"),
            "|| would build",
        )
        .await;
        refused(
            &format!("SELECT length(concat({x}, {x}, {x}))"),
            "concat() would build",
        )
        .await;
        // A function priced after the call: the first result past the
        // bound (and past what it was given) is refused.
        refused(
            "SELECT struct(repeat('x', 500000), repeat('y', 500000), repeat('z', 500000)) IS NOT NULL",
            "struct() built a value",
        )
        .await;
        refused(
            "SELECT length(encode(encode(encode(repeat('x', 300000), 'hex'), 'hex'), 'hex'))",
            "encode() would build a value",
        )
        .await;
        // Each step at most doubles; the one past the bound is refused.
        refused(
            "WITH a AS (SELECT repeat('x', 600000) AS s), \
             b AS (SELECT concat(s, s) AS s FROM a), \
             c AS (SELECT concat(s, s) AS s FROM b), \
             d AS (SELECT concat(s, s) AS s FROM c) SELECT length(s) FROM d",
            "concat() would build",
        )
        .await;
    }

    #[tokio::test]
    async fn bounded_calls_answer_as_the_functions_do() {
        let sql = "SELECT upper('abc') || 'x' AS a, concat('a', NULL, 'b') AS b, \
                   'a' || NULL AS c, length(repeat('ab', 10)) AS d, \
                   cardinality(range(0, 1000)) AS e, levenshtein('kitten', 'sitting') AS f, \
                   now() IS NOT NULL AS g, cardinality([1, 2, 3] || [4]) AS h";
        let got = run(&ctx(), sql).await.expect("ordinary calls run");
        let want = run(&SessionContext::new(), sql).await.unwrap();
        assert_eq!(
            arrow::util::pretty::pretty_format_batches(&got)
                .unwrap()
                .to_string(),
            arrow::util::pretty::pretty_format_batches(&want)
                .unwrap()
                .to_string(),
            "the bounded calls give what the functions give"
        );
        // Column names are the operator's and the functions' own.
        let sql = "SELECT 'a' || 'b', upper('x'), 1 + 2";
        let named =
            |ctx: SessionContext| async move { ctx.sql(sql).await.unwrap().schema().field_names() };
        assert_eq!(named(ctx()).await, named(SessionContext::new()).await);
    }
}
