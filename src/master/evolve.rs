//! A schema that grows: what the configured event schema may change in a
//! master dataset that already exists, and the Delta commit that does it.
//!
//! ```text
//!  table columns (Delta log)      [schema] fields          result
//!  zipcode long                   zipcode int64            same
//!  —                              coupon utf8 nullable     added: one Delta commit (metadata only);
//!                                                          older files read it as null
//!  price long                     price float64            refused: retyped
//!  channel string                 —                        refused: removed
//! ```
//!
//! Only adding nullable fields is allowed. The master dataset is immutable:
//! its files keep every column they were written with, in the type they
//! were written with, so a removed or retyped field could only be had by
//! rewriting history, and a new field that may not be null has no value in
//! the events already archived. Each refusal says which field, why, and
//! what to do instead.

use deltalake::kernel::{DataType as DeltaType, StructField};

/// One column: name, Delta type, nullable.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub ty: DeltaType,
    pub nullable: bool,
}

impl From<&StructField> for Column {
    fn from(f: &StructField) -> Column {
        Column {
            name: f.name().clone(),
            ty: f.data_type().clone(),
            nullable: f.is_nullable(),
        }
    }
}

/// Why a schema change is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub field: String,
    /// "remove", "retype", …: what the schema would do to the field.
    pub change: &'static str,
    pub detail: String,
    pub hint: String,
}

fn type_name(t: &DeltaType) -> String {
    match t {
        DeltaType::Primitive(p) => format!("{p:?}").to_lowercase(),
        other => format!("{other:?}"),
    }
}

/// The columns to add to a table holding `have` so that it holds `want`, or
/// why that is refused. Column order does not matter: readers match by name.
pub fn plan(have: &[Column], want: &[Column]) -> Result<Vec<Column>, Refusal> {
    for h in have {
        match want.iter().find(|w| w.name == h.name) {
            None => {
                return Err(Refusal {
                    field: h.name.clone(),
                    change: "remove",
                    detail: format!(
                        "the master dataset has field `{}` ({}); [schema] does not",
                        h.name,
                        type_name(&h.ty)
                    ),
                    hint: format!(
                        "the master dataset is immutable and its files keep `{}`: keep the field in [schema] (with `nullable = true` if new events may leave it out); views need not read it",
                        h.name
                    ),
                });
            }
            Some(w) if w.ty != h.ty => {
                return Err(Refusal {
                    field: h.name.clone(),
                    change: "retype",
                    detail: format!(
                        "`{}` is {} in the master dataset; [schema] says {}",
                        h.name,
                        type_name(&h.ty),
                        type_name(&w.ty)
                    ),
                    hint: format!(
                        "the master dataset is immutable and its files hold `{0}` as {1}: keep `{0}` as it is, and add a new nullable field with the new type (e.g. `{0}_v2`) for views to read",
                        h.name,
                        type_name(&h.ty)
                    ),
                });
            }
            Some(w) if w.nullable != h.nullable => {
                return Err(Refusal {
                    field: h.name.clone(),
                    change: "change whether null is allowed in",
                    detail: format!(
                        "`{}` is {} in the master dataset; [schema] makes it {}",
                        h.name,
                        if h.nullable { "nullable" } else { "required" },
                        if w.nullable { "nullable" } else { "required" }
                    ),
                    hint: format!(
                        "set `nullable = {}` on `{}` as it was, or add a new field",
                        h.nullable, h.name
                    ),
                });
            }
            Some(_) => {}
        }
    }
    let mut added = Vec::new();
    for w in want {
        if have.iter().any(|h| h.name == w.name) {
            continue;
        }
        if !w.nullable {
            return Err(Refusal {
                field: w.name.clone(),
                change: "add a required",
                detail: format!(
                    "`{}` is new, and the events already archived have no value for it",
                    w.name
                ),
                hint: format!(
                    "add `nullable = true` to `{}`: older events read it as null",
                    w.name
                ),
            });
        }
        added.push(w.clone());
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, ty: DeltaType, nullable: bool) -> Column {
        Column {
            name: name.into(),
            ty,
            nullable,
        }
    }

    fn table() -> Vec<Column> {
        vec![
            col("zipcode", DeltaType::LONG, false),
            col("price", DeltaType::LONG, false),
        ]
    }

    #[test]
    fn a_nullable_field_is_added_and_nothing_else_changes() {
        let mut want = table();
        want.insert(1, col("coupon", DeltaType::STRING, true));
        assert_eq!(
            plan(&table(), &want).unwrap(),
            vec![col("coupon", DeltaType::STRING, true)]
        );
        assert!(plan(&table(), &table()).unwrap().is_empty());
    }

    #[test]
    fn removing_retyping_or_adding_a_required_field_is_refused_with_what_to_do() {
        let r = plan(&table(), &table()[..1]).unwrap_err();
        assert_eq!((r.field.as_str(), r.change), ("price", "remove"));
        assert!(r.hint.contains("immutable"), "{}", r.hint);

        let mut want = table();
        want[1].ty = DeltaType::DOUBLE;
        let r = plan(&table(), &want).unwrap_err();
        assert_eq!(r.change, "retype");
        assert!(
            r.detail.contains("long") && r.detail.contains("double"),
            "{}",
            r.detail
        );
        assert!(r.hint.contains("price_v2"), "{}", r.hint);

        let mut want = table();
        want.push(col("coupon", DeltaType::STRING, false));
        let r = plan(&table(), &want).unwrap_err();
        assert_eq!(r.change, "add a required");
        assert!(r.hint.contains("nullable = true"), "{}", r.hint);
    }
}
