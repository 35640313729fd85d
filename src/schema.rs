//! The event schema: which fields an event has, their Arrow types, and how the
//! event-time field is written in the JSON a producer sends.
//!
//! The schema is the contract between producers and every layer: ingest
//! validates against it, the log stores events already normalized to it (so no
//! reader validates again), and views are planned against its Arrow form.

use std::fmt;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use chrono::{DateTime, NaiveDate, NaiveDateTime};
use serde::{Deserialize, Serialize};

/// The types a field may have. Names follow Arrow's (`int64`, `utf8`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum FieldType {
    Boolean,
    Int32,
    Int64,
    Float64,
    Utf8,
    /// Milliseconds since the Unix epoch, no time zone (read as UTC).
    TimestampMs,
    /// Microseconds since the Unix epoch, no time zone (read as UTC).
    TimestampUs,
}

impl FieldType {
    pub const ALL: [FieldType; 7] = [
        FieldType::Boolean,
        FieldType::Int32,
        FieldType::Int64,
        FieldType::Float64,
        FieldType::Utf8,
        FieldType::TimestampMs,
        FieldType::TimestampUs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FieldType::Boolean => "boolean",
            FieldType::Int32 => "int32",
            FieldType::Int64 => "int64",
            FieldType::Float64 => "float64",
            FieldType::Utf8 => "utf8",
            FieldType::TimestampMs => "timestamp_ms",
            FieldType::TimestampUs => "timestamp_us",
        }
    }

    pub fn arrow(self) -> DataType {
        match self {
            FieldType::Boolean => DataType::Boolean,
            FieldType::Int32 => DataType::Int32,
            FieldType::Int64 => DataType::Int64,
            FieldType::Float64 => DataType::Float64,
            FieldType::Utf8 => DataType::Utf8,
            FieldType::TimestampMs => DataType::Timestamp(TimeUnit::Millisecond, None),
            FieldType::TimestampUs => DataType::Timestamp(TimeUnit::Microsecond, None),
        }
    }

    pub fn is_timestamp(self) -> bool {
        matches!(self, FieldType::TimestampMs | FieldType::TimestampUs)
    }
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl TryFrom<String> for FieldType {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        // Accept the spellings users bring from Arrow, Spark and SQL.
        let t = match s.to_ascii_lowercase().as_str() {
            "boolean" | "bool" => FieldType::Boolean,
            "int32" | "int" | "integer" => FieldType::Int32,
            "int64" | "long" | "bigint" => FieldType::Int64,
            "float64" | "double" => FieldType::Float64,
            "utf8" | "string" | "text" | "varchar" => FieldType::Utf8,
            "timestamp_ms" | "timestamp" => FieldType::TimestampMs,
            "timestamp_us" => FieldType::TimestampUs,
            _ => {
                let names: Vec<_> = FieldType::ALL.iter().map(|t| t.name()).collect();
                return Err(format!(
                    "unknown field type `{s}`; expected one of: {}",
                    names.join(", ")
                ));
            }
        };
        Ok(t)
    }
}

impl From<FieldType> for String {
    fn from(t: FieldType) -> String {
        t.name().to_string()
    }
}

/// How a timestamp field is written in the incoming JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeFormat {
    /// `2014-11-01 19:35:41.158`: the paper's format (`%Y-%m-%d %H:%M:%S%.3f`),
    /// parsed by a fast path with chrono as the fallback for other shapes.
    Paper,
    /// RFC 3339 / ISO 8601 with an offset, e.g. `2014-11-01T19:35:41.158Z`.
    Rfc3339,
    /// A JSON number: seconds since the Unix epoch.
    EpochSeconds,
    /// A JSON number: milliseconds since the Unix epoch.
    EpochMillis,
    /// A JSON number: microseconds since the Unix epoch.
    EpochMicros,
    /// Any other chrono `strftime` format; naive times are read as UTC.
    Strftime { format: String, has_offset: bool },
}

pub const PAPER_TIME_FORMAT: &str = "%Y-%m-%d %H:%M:%S%.3f";

impl TimeFormat {
    pub fn parse(spec: &str) -> TimeFormat {
        match spec {
            PAPER_TIME_FORMAT => TimeFormat::Paper,
            "rfc3339" | "iso8601" => TimeFormat::Rfc3339,
            "epoch_s" => TimeFormat::EpochSeconds,
            "epoch_ms" => TimeFormat::EpochMillis,
            "epoch_us" => TimeFormat::EpochMicros,
            other => TimeFormat::Strftime {
                format: other.to_string(),
                has_offset: other.contains("%z") || other.contains("%:z") || other.contains("%#z"),
            },
        }
    }

    pub fn spec(&self) -> &str {
        match self {
            TimeFormat::Paper => PAPER_TIME_FORMAT,
            TimeFormat::Rfc3339 => "rfc3339",
            TimeFormat::EpochSeconds => "epoch_s",
            TimeFormat::EpochMillis => "epoch_ms",
            TimeFormat::EpochMicros => "epoch_us",
            TimeFormat::Strftime { format, .. } => format,
        }
    }

    /// True when the JSON value is a number rather than a string.
    pub fn is_numeric(&self) -> bool {
        matches!(
            self,
            TimeFormat::EpochSeconds | TimeFormat::EpochMillis | TimeFormat::EpochMicros
        )
    }

    /// An example of a valid value, for error messages.
    pub fn example(&self) -> String {
        match self {
            TimeFormat::Paper => "2014-11-01 19:35:41.158".into(),
            TimeFormat::Rfc3339 => "2014-11-01T19:35:41.158Z".into(),
            TimeFormat::EpochSeconds => "1414870541".into(),
            TimeFormat::EpochMillis => "1414870541158".into(),
            TimeFormat::EpochMicros => "1414870541158000".into(),
            TimeFormat::Strftime { format, .. } => {
                let t = DateTime::from_timestamp_millis(1_414_870_541_158).expect("valid");
                let mut out = String::new();
                use std::fmt::Write;
                // A format chrono cannot render gives no example rather than a panic.
                if write!(out, "{}", t.format(format)).is_err() {
                    out.clear();
                }
                out
            }
        }
    }

    /// Parses a textual timestamp to microseconds since the epoch (UTC).
    pub fn parse_str_micros(&self, s: &str) -> Option<i64> {
        match self {
            TimeFormat::Paper => parse_paper_fast(s).or_else(|| {
                NaiveDateTime::parse_from_str(s, PAPER_TIME_FORMAT)
                    .ok()
                    .map(|t| t.and_utc().timestamp_micros())
            }),
            TimeFormat::Rfc3339 => DateTime::parse_from_rfc3339(s)
                .ok()
                .map(|t| t.timestamp_micros()),
            TimeFormat::Strftime { format, has_offset } => {
                if *has_offset {
                    DateTime::parse_from_str(s, format)
                        .ok()
                        .map(|t| t.timestamp_micros())
                } else {
                    NaiveDateTime::parse_from_str(s, format)
                        .ok()
                        .map(|t| t.and_utc().timestamp_micros())
                }
            }
            TimeFormat::EpochSeconds | TimeFormat::EpochMillis | TimeFormat::EpochMicros => None,
        }
    }

    /// Converts a numeric epoch value to microseconds, checking range.
    pub fn epoch_to_micros(&self, v: i64) -> Option<i64> {
        match self {
            TimeFormat::EpochSeconds => v.checked_mul(1_000_000),
            TimeFormat::EpochMillis => v.checked_mul(1_000),
            TimeFormat::EpochMicros => Some(v),
            _ => None,
        }
    }
}

/// Fast path for `YYYY-MM-DD HH:MM:SS.fff`, exactly 23 bytes; `None` for any
/// other shape (the caller falls back to chrono, which decides).
fn parse_paper_fast(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 23
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b' '
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'.'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let mut v = 0u32;
        for &c in &b[r] {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + u32::from(c - b'0');
        }
        Some(v)
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    if h > 23 || mi > 59 || sec > 59 {
        // chrono accepts a leap second (60); let it decide.
        return None;
    }
    let date = NaiveDate::from_ymd_opt(y as i32, mo, d)?;
    let days = date
        .signed_duration_since(NaiveDate::from_ymd_opt(1970, 1, 1)?)
        .num_days();
    let secs = days * 86_400 + i64::from(h * 3600 + mi * 60 + sec);
    Some(secs * 1_000_000 + i64::from(ms) * 1_000)
}

/// What ingest does with a field that is not in the schema.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownFields {
    /// Reject the event, naming the field (the default: nothing is dropped silently).
    #[default]
    Reject,
    /// Accept the event without the field.
    Drop,
}

/// One field of the event schema.
#[derive(Debug, Clone)]
pub struct EventField {
    pub name: String,
    pub ty: FieldType,
    pub nullable: bool,
    /// Only for timestamp fields.
    pub time_format: Option<TimeFormat>,
}

/// The validated event schema.
#[derive(Debug, Clone)]
pub struct EventSchema {
    fields: Vec<EventField>,
    event_time: usize,
    arrow: SchemaRef,
    unknown_fields: UnknownFields,
    key: Option<EventKey>,
}

/// `[schema] key`: which field tells events apart, and for how long a key
/// is remembered (`crate::keys` has the rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventKey {
    /// The key field's index in the schema.
    pub field: usize,
    pub within: std::time::Duration,
}

impl EventSchema {
    /// Builds a schema; the caller (config) has checked names and the event-time field.
    pub fn new(fields: Vec<EventField>, event_time: usize) -> EventSchema {
        let arrow = Arc::new(Schema::new(
            fields
                .iter()
                .map(|f| Field::new(&f.name, f.ty.arrow(), f.nullable))
                .collect::<Vec<_>>(),
        ));
        EventSchema {
            fields,
            event_time,
            arrow,
            unknown_fields: UnknownFields::Reject,
            key: None,
        }
    }

    /// The events' key, if duplicates are to be found.
    pub fn key(&self) -> Option<EventKey> {
        self.key
    }

    pub fn set_key(&mut self, key: Option<EventKey>) {
        self.key = key;
    }

    /// The paper's schema: `zipcode`, `ProductName`, `price`, `timestamp`.
    pub fn paper() -> EventSchema {
        let f = |name: &str, ty| EventField {
            name: name.into(),
            ty,
            nullable: false,
            time_format: None,
        };
        EventSchema::new(
            vec![
                f("zipcode", FieldType::Int64),
                f("ProductName", FieldType::Utf8),
                f("price", FieldType::Int64),
                EventField {
                    time_format: Some(TimeFormat::Paper),
                    ..f("timestamp", FieldType::TimestampMs)
                },
            ],
            3,
        )
    }

    pub fn fields(&self) -> &[EventField] {
        &self.fields
    }

    pub fn event_time_index(&self) -> usize {
        self.event_time
    }

    pub fn event_time(&self) -> &EventField {
        &self.fields[self.event_time]
    }

    pub fn arrow(&self) -> &SchemaRef {
        &self.arrow
    }

    pub fn unknown_fields(&self) -> UnknownFields {
        self.unknown_fields
    }

    pub fn set_unknown_fields(&mut self, policy: UnknownFields) {
        self.unknown_fields = policy;
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name == name)
    }

    /// The schema's field closest to `name`, for "did you mean" hints.
    pub fn suggest(&self, name: &str) -> Option<&str> {
        suggest(name, self.fields.iter().map(|f| f.name.as_str()))
    }
}

/// The candidate closest to `name`: equal ignoring case, or within a small edit distance.
pub fn suggest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = if c.eq_ignore_ascii_case(name) {
            0
        } else {
            strsim::levenshtein(&c.to_ascii_lowercase(), &name.to_ascii_lowercase())
        };
        let limit = (name.len().max(c.len()) / 3).max(1);
        if d <= limit && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// A batch written under an older event schema (a field added since),
/// brought to `target`: columns matched by name, each field the batch lacks
/// read as null. The embedded log's frames keep the schema they were
/// written with; this is how they read after the schema grew.
pub fn conform(
    batch: &arrow::record_batch::RecordBatch,
    target: &SchemaRef,
) -> Result<arrow::record_batch::RecordBatch, arrow::error::ArrowError> {
    if batch.schema().fields() == target.fields() {
        return Ok(batch.clone());
    }
    let columns = target
        .fields()
        .iter()
        .map(|f| match batch.schema().index_of(f.name()) {
            Ok(i) => Ok(batch.column(i).clone()),
            Err(_) if f.is_nullable() => Ok(arrow::array::new_null_array(
                f.data_type(),
                batch.num_rows(),
            )),
            Err(_) => Err(arrow::error::ArrowError::SchemaError(format!(
                "an event written before field `{}` existed has no value for it, and it is not nullable",
                f.name()
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    arrow::record_batch::RecordBatch::try_new_with_options(
        target.clone(),
        columns,
        &arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn paper_fast_path_matches_chrono_on_the_papers_example() {
        let s = "2014-11-01 19:35:41.158";
        let fast = parse_paper_fast(s).expect("fast path takes the paper's shape");
        let slow = NaiveDateTime::parse_from_str(s, PAPER_TIME_FORMAT)
            .unwrap()
            .and_utc()
            .timestamp_micros();
        assert_eq!(fast, slow);
        assert_eq!(fast, 1_414_870_541_158_000);
    }

    #[test]
    fn paper_format_falls_back_to_chrono_for_other_shapes() {
        let f = TimeFormat::Paper;
        // chrono's `%.3f` makes the fraction optional.
        assert_eq!(
            f.parse_str_micros("2014-11-01 19:35:41"),
            Some(1_414_870_541_000_000)
        );
        assert_eq!(f.parse_str_micros("2014-02-30 19:35:41.158"), None);
        assert_eq!(f.parse_str_micros("yesterday"), None);
    }

    #[test]
    fn suggestions_find_case_and_typo_slips() {
        let s = EventSchema::paper();
        assert_eq!(s.suggest("productname"), Some("ProductName"));
        assert_eq!(s.suggest("prise"), Some("price"));
        assert_eq!(s.suggest("zzzzzzzzzzzzzz"), None);
    }

    proptest! {
        #[test]
        fn paper_fast_path_agrees_with_chrono(
            y in 1000u32..9999, mo in 0u32..14, d in 0u32..33,
            h in 0u32..25, mi in 0u32..61, s in 0u32..61, ms in 0u32..1000
        ) {
            let text = format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{ms:03}");
            let chrono = NaiveDateTime::parse_from_str(&text, PAPER_TIME_FORMAT)
                .ok()
                .map(|t| t.and_utc().timestamp_micros());
            if let Some(fast) = parse_paper_fast(&text) {
                prop_assert_eq!(Some(fast), chrono, "fast path disagrees on {}", text);
            }
            prop_assert_eq!(TimeFormat::Paper.parse_str_micros(&text), chrono);
        }
    }
}
