//! The CLI's tables, through `comfy-table`: no outer borders, no wrapping
//! (a pipe or a narrow terminal gets whole lines), trailing spaces trimmed.
//!
//! ```text
//!  separated (query, sql)      aligned (status)
//!  name | orders               partition      stream end
//!  -----+-------                       0           1,500
//!  a    | 3
//! ```

use comfy_table::{CellAlignment, ColumnConstraint, Table, Width};

/// Columns apart by ` | `, a `-+-` line under the header (as psql draws).
pub fn separated<'a>(header: impl IntoIterator<Item = &'a str>) -> Table {
    // One character per part of a table (comfy-table's preset order); a
    // space draws nothing: only the header line, its crossings and the
    // lines between columns.
    table("     -+ |          ", header)
}

/// Right-aligned columns two spaces apart, each at least its `width`.
pub fn aligned<'a>(columns: impl IntoIterator<Item = (&'a str, u16)>) -> Table {
    let (header, widths): (Vec<&str>, Vec<u16>) = columns.into_iter().unzip();
    let mut t = table("                   ", header);
    for (c, w) in t.column_iter_mut().zip(widths) {
        // A constraint counts the column's padding too.
        let pad = c.padding_width();
        c.set_constraint(ColumnConstraint::LowerBoundary(Width::Fixed(w + pad)));
        c.set_cell_alignment(CellAlignment::Right);
    }
    t
}

fn table<'a>(preset: &str, header: impl IntoIterator<Item = &'a str>) -> Table {
    let mut t = Table::new();
    t.load_preset(preset);
    t.set_header(header.into_iter().collect::<Vec<_>>());
    // One space either side of a column's line, none at the table's edges.
    let last = t.column_count().saturating_sub(1);
    for (i, c) in t.column_iter_mut().enumerate() {
        c.set_padding((u16::from(i != 0), u16::from(i != last)));
    }
    t
}

/// The table's lines, each ending in a newline (none for an empty table).
pub fn lines(t: &Table) -> String {
    let mut out = String::new();
    for line in t.trim_fmt().lines() {
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// `query` and `sql` print the table the hand-padded code printed:
    /// psql's layout, trailing spaces trimmed, NULL for a null.
    #[test]
    fn a_reply_renders_as_before() {
        let body = json!({
            "columns": [{"name": "ProductName"}, {"name": "orders"}, {"name": "revenue"}],
            "rows": [
                {"ProductName": "product2", "orders": 100, "revenue": 1000},
                {"ProductName": "a longer product name", "orders": null, "revenue": 7},
            ]
        });
        assert_eq!(
            super::super::render_table(&body),
            "ProductName           | orders | revenue\n\
             ----------------------+--------+--------\n\
             product2              | 100    | 1000\n\
             a longer product name | NULL   | 7\n\
             (2 rows)\n",
            "the layout of the hand-padded table"
        );
        let empty = json!({"columns": [{"name": "a"}, {"name": "b"}], "rows": []});
        assert_eq!(
            super::super::render_table(&empty),
            "a | b\n--+--\n(0 rows)\n",
            "no rows: the header, its line and the count"
        );
    }
}
