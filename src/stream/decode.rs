//! NDJSON → typed Arrow columns, validated against the event schema.
//!
//! Each line is parsed by serde_json straight into the schema's column
//! builders (through a row of borrowed scalars, so a line that fails half-way
//! leaves no trace in the columns) — no `serde_json::Value` per event. A line
//! that does not fit the schema becomes a [`Reject`] naming the line, the field
//! and the reason; the good lines of the same body are kept.
//!
//! Policy, documented for users:
//! - blank (or whitespace-only) lines are skipped: they carry no event;
//! - a field missing or `null` is rejected unless the field is `nullable`;
//! - an unknown field is rejected (`schema.unknown_fields = "reject"`, the
//!   default) so nothing a producer sent is dropped silently, or dropped when
//!   the schema says `unknown_fields = "drop"`;
//! - a field given twice is rejected;
//! - numbers must fit the field's type exactly (`16.5` is not an int64, `16`
//!   is a valid float64).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder, TimestampMillisecondBuilder,
};
use arrow::record_batch::RecordBatch;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};

use crate::schema::{EventField, EventSchema, FieldType, TimeFormat, UnknownFields};

/// Why one line of a body was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// 1-based line number within the request body.
    pub line: u64,
    /// The field at fault, when one is.
    pub field: Option<String>,
    pub reason: String,
    /// Byte range of the raw line within the body.
    pub raw: std::ops::Range<usize>,
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "line {}: field `{field}`: {}", self.line, self.reason),
            None => write!(f, "line {}: {}", self.line, self.reason),
        }
    }
}

/// The outcome of decoding one body.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Accepted events, one batch per target partition, in line order.
    pub batches: Vec<(u32, RecordBatch)>,
    pub rejects: Vec<Reject>,
    pub accepted: usize,
}

/// How accepted events are spread over partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partitioning {
    /// The whole body goes to one partition, chosen by the caller.
    RoundRobin,
    /// Each event goes where its key field's value places it.
    Key {
        field: usize,
        partitions: u32,
        by: KeyPlacement,
    },
}

/// Where a key's events go: the stream's own rule, so that lambdaflow's
/// HTTP ingest and any other producer keyed by the same field put a key in
/// the same partition (duplicates are found per partition). The key's
/// bytes are its text: a string's UTF-8, an integer's decimal digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPlacement {
    /// The embedded log: crc32c of the key, modulo the partitions.
    Crc32c,
    /// Kafka: the Java client's default partitioner for a keyed record
    /// (murmur2 of the key, made positive, modulo the partitions; librdkafka
    /// calls it `murmur2_random`).
    Murmur2,
    /// Kinesis: the hash key Kinesis derives from a partition key, MD5 of
    /// it as a 128-bit big-endian integer (sent as the explicit hash key,
    /// so the shard that owns it takes the record, whatever the layout).
    Md5,
}

impl KeyPlacement {
    /// The key's hash under this placement; its partition is
    /// [`KeyPlacement::partition`] of it.
    fn hash(self, v: &Scalar<'_>) -> u128 {
        match self {
            KeyPlacement::Crc32c => u128::from(key_hash(v)),
            KeyPlacement::Murmur2 => u128::from(murmur2(&key_text(v)) & 0x7fff_ffff),
            KeyPlacement::Md5 => {
                use md5::Digest;
                u128::from_be_bytes(md5::Md5::digest(key_text(v)).into())
            }
        }
    }

    fn partition(self, hash: u128, partitions: u32) -> u32 {
        match self {
            KeyPlacement::Crc32c | KeyPlacement::Murmur2 => (hash % u128::from(partitions)) as u32,
            // Not where Kinesis puts it (the shard owning the hash key does):
            // a group of the body's events, for the decoder's batches.
            KeyPlacement::Md5 => ((hash >> 96) % u128::from(partitions)) as u32,
        }
    }
}

/// A key's text, the bytes a producer keys its records by.
fn key_text<'a>(v: &'a Scalar<'_>) -> Cow<'a, [u8]> {
    match v {
        Scalar::Str(s) => Cow::Borrowed(s.as_bytes()),
        Scalar::Int(i) => Cow::Owned(i.to_string().into_bytes()),
        Scalar::Bool(b) => Cow::Owned(b.to_string().into_bytes()),
        Scalar::Float(f) => Cow::Owned(f.to_string().into_bytes()),
        Scalar::Missing | Scalar::Null => Cow::Borrowed(b""),
    }
}

/// MurmurHash2 (32-bit) with the seed and byte order Kafka's clients use
/// for keyed records.
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        let mut k = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        for (i, &b) in rest.iter().enumerate().rev() {
            h ^= u32::from(b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

/// Decodes NDJSON bodies against one schema. Cheap to share between threads.
#[derive(Debug, Clone)]
pub struct Decoder {
    schema: Arc<EventSchema>,
    partitioning: Partitioning,
    /// Lines longer than this are refused (the stream's record limit).
    max_line: Option<MaxLine>,
}

/// The longest line a decoder accepts, and whose limit it is.
#[derive(Debug, Clone)]
struct MaxLine {
    bytes: usize,
    what: Arc<str>,
}

/// One accepted line of a body, as [`Decoder::decode_each`] hands it on.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// Its bytes within the body, without the line end.
    pub range: std::ops::Range<usize>,
    /// 1-based line number within the body.
    pub line: u64,
    pub partition: u32,
    /// The hash of its key field, under key partitioning: events of one
    /// key share it (so a stream can keep them on one shard; Kinesis's
    /// explicit hash key under [`KeyPlacement::Md5`]).
    pub key: Option<u128>,
}

impl Decoder {
    pub fn new(schema: Arc<EventSchema>, partitioning: Partitioning) -> Decoder {
        Decoder {
            schema,
            partitioning,
            max_line: None,
        }
    }

    /// Refuses lines longer than `bytes` (`what`: whose limit, for the
    /// reason: "Kinesis's record limit").
    pub fn with_max_line(mut self, bytes: usize, what: &str) -> Decoder {
        self.max_line = Some(MaxLine {
            bytes,
            what: what.into(),
        });
        self
    }

    pub fn schema(&self) -> &Arc<EventSchema> {
        &self.schema
    }

    /// Decodes `body`. With round-robin partitioning every accepted event goes
    /// to `default_partition`.
    pub fn decode(&self, body: &[u8], default_partition: u32) -> Decoded {
        let mut rejects = Vec::new();
        let mut out = self.decode_with(body, default_partition, &mut |r| rejects.push(r));
        out.rejects = rejects;
        out
    }

    /// Decodes `body`, handing each refused line to `on_reject` as it is
    /// found instead of collecting them (`Decoded::rejects` stays empty): a
    /// body of millions of bad lines costs the memory of its good ones only.
    pub fn decode_with(
        &self,
        body: &[u8],
        default_partition: u32,
        on_reject: &mut dyn FnMut(Reject),
    ) -> Decoded {
        self.decode_each(body, default_partition, on_reject, &mut |_| {})
    }

    /// [`Decoder::decode_with`], also handing each accepted line (its byte
    /// range without the line end, line number, partition and key hash) to
    /// `on_accept`, in order: what a node that produces into an external
    /// stream sends.
    pub fn decode_each(
        &self,
        body: &[u8],
        default_partition: u32,
        on_reject: &mut dyn FnMut(Reject),
        on_accept: &mut dyn FnMut(Accepted),
    ) -> Decoded {
        let mut out = Decoded::default();
        let n_parts = match self.partitioning {
            Partitioning::RoundRobin => 1,
            Partitioning::Key { partitions, .. } => partitions as usize,
        };
        let mut columns: Vec<Option<Columns>> = (0..n_parts).map(|_| None).collect();
        let fields = self.schema.fields();
        let mut line_no = 0u64;
        let mut start = 0usize;
        while start < body.len() {
            let end = memchr::memchr(b'\n', &body[start..]).map_or(body.len(), |i| start + i);
            line_no += 1;
            let mut line = &body[start..end];
            let range = start..end;
            start = end + 1;
            if let [rest @ .., b'\r'] = line {
                line = rest;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if let Some(max) = &self.max_line
                && line.len() > max.bytes
            {
                // Refused before anything is sent: the stream would refuse
                // the record, and with it a whole call of other records.
                on_reject(Reject {
                    line: line_no,
                    field: None,
                    reason: format!(
                        "the event is {} bytes, over the {} bytes {} takes as one record",
                        line.len(),
                        max.bytes,
                        max.what,
                    ),
                    raw: range,
                });
                continue;
            }
            let text = match std::str::from_utf8(line) {
                Ok(t) => t,
                Err(e) => {
                    on_reject(Reject {
                        line: line_no,
                        field: None,
                        reason: format!(
                            "invalid UTF-8 at byte {} of the line; events must be UTF-8 JSON",
                            e.valid_up_to() + 1
                        ),
                        raw: range,
                    });
                    continue;
                }
            };
            match self.parse_line(text) {
                Ok(row) => {
                    let key = match self.partitioning {
                        Partitioning::RoundRobin => None,
                        Partitioning::Key { field, by, .. } => Some(by.hash(&row[field])),
                    };
                    let slot = match self.partitioning {
                        Partitioning::RoundRobin => 0,
                        Partitioning::Key { partitions, by, .. } => {
                            by.partition(key.unwrap_or(0), partitions) as usize
                        }
                    };
                    let partition = match self.partitioning {
                        Partitioning::RoundRobin => default_partition,
                        Partitioning::Key { .. } => slot as u32,
                    };
                    on_accept(Accepted {
                        range: range.start..range.start + line.len(),
                        line: line_no,
                        partition,
                        key,
                    });
                    columns[slot]
                        .get_or_insert_with(|| Columns::new(fields))
                        .push(row);
                    out.accepted += 1;
                }
                Err(e) => on_reject(Reject {
                    line: line_no,
                    field: e.field,
                    reason: e.reason,
                    raw: range,
                }),
            }
        }
        for (slot, cols) in columns.into_iter().enumerate() {
            if let Some(cols) = cols {
                let partition = match self.partitioning {
                    Partitioning::RoundRobin => default_partition,
                    Partitioning::Key { .. } => slot as u32,
                };
                out.batches.push((partition, cols.finish(&self.schema)));
            }
        }
        out
    }

    /// Parses one line into a row of scalars, or says why it does not fit.
    fn parse_line<'a>(&self, text: &'a str) -> Result<Vec<Scalar<'a>>, FieldError> {
        let fields = self.schema.fields();
        let mut row: Vec<Scalar<'a>> = vec![Scalar::Missing; fields.len()];
        let mut err: Option<FieldError> = None;
        let mut de = serde_json::Deserializer::from_str(text);
        let parsed = RowSeed {
            schema: &self.schema,
            row: &mut row,
            err: &mut err,
        }
        .deserialize(&mut de)
        .and_then(|()| de.end());
        if let Err(e) = parsed {
            return Err(err.unwrap_or_else(|| FieldError {
                field: None,
                reason: json_syntax_reason(&e),
            }));
        }
        for (f, v) in fields.iter().zip(row.iter_mut()) {
            if matches!(v, Scalar::Missing) {
                if f.nullable {
                    *v = Scalar::Null;
                } else {
                    return Err(FieldError {
                        field: Some(f.name.clone()),
                        reason: "missing (the field is required)".into(),
                    });
                }
            }
        }
        Ok(row)
    }
}

/// serde_json's message without its "at line 1 column N" (we know the line).
fn json_syntax_reason(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let msg = match msg.rfind(" at line ") {
        Some(i) => &msg[..i],
        None => &msg,
    };
    format!("malformed JSON: {msg} at column {}", e.column())
}

/// A stable hash of a key value: crc32c of its canonical bytes.
fn key_hash(v: &Scalar<'_>) -> u32 {
    match v {
        Scalar::Missing | Scalar::Null => 0,
        Scalar::Bool(b) => crc32c::crc32c(&[u8::from(*b)]),
        Scalar::Int(i) => crc32c::crc32c(&i.to_le_bytes()),
        Scalar::Float(f) => crc32c::crc32c(&f.to_bits().to_le_bytes()),
        Scalar::Str(s) => crc32c::crc32c(s.as_bytes()),
    }
}

#[derive(Debug)]
struct FieldError {
    field: Option<String>,
    reason: String,
}

/// One field's value, borrowed from the line where possible.
#[derive(Debug, Clone)]
enum Scalar<'a> {
    Missing,
    Null,
    Bool(bool),
    /// Integers and timestamps (already in the field's unit).
    Int(i64),
    Float(f64),
    Str(Cow<'a, str>),
}

/// The column builders of one partition's batch.
struct Columns(Vec<ColumnBuilder>);

enum ColumnBuilder {
    Bool(BooleanBuilder),
    I32(Int32Builder),
    I64(Int64Builder),
    F64(Float64Builder),
    Utf8(StringBuilder),
    TsMs(TimestampMillisecondBuilder),
    TsUs(TimestampMicrosecondBuilder),
}

impl Columns {
    fn new(fields: &[EventField]) -> Columns {
        Columns(
            fields
                .iter()
                .map(|f| match f.ty {
                    FieldType::Boolean => ColumnBuilder::Bool(BooleanBuilder::new()),
                    FieldType::Int32 => ColumnBuilder::I32(Int32Builder::new()),
                    FieldType::Int64 => ColumnBuilder::I64(Int64Builder::new()),
                    FieldType::Float64 => ColumnBuilder::F64(Float64Builder::new()),
                    FieldType::Utf8 => ColumnBuilder::Utf8(StringBuilder::new()),
                    FieldType::TimestampMs => {
                        ColumnBuilder::TsMs(TimestampMillisecondBuilder::new())
                    }
                    FieldType::TimestampUs => {
                        ColumnBuilder::TsUs(TimestampMicrosecondBuilder::new())
                    }
                })
                .collect(),
        )
    }

    /// Appends a row whose scalars already match the field types.
    fn push(&mut self, row: Vec<Scalar<'_>>) {
        for (b, v) in self.0.iter_mut().zip(row) {
            match (b, v) {
                (ColumnBuilder::Bool(b), Scalar::Bool(x)) => b.append_value(x),
                (ColumnBuilder::I32(b), Scalar::Int(x)) => b.append_value(x as i32),
                (ColumnBuilder::I64(b), Scalar::Int(x)) => b.append_value(x),
                (ColumnBuilder::F64(b), Scalar::Float(x)) => b.append_value(x),
                (ColumnBuilder::Utf8(b), Scalar::Str(x)) => b.append_value(x),
                (ColumnBuilder::TsMs(b), Scalar::Int(x)) => b.append_value(x),
                (ColumnBuilder::TsUs(b), Scalar::Int(x)) => b.append_value(x),
                (ColumnBuilder::Bool(b), _) => b.append_null(),
                (ColumnBuilder::I32(b), _) => b.append_null(),
                (ColumnBuilder::I64(b), _) => b.append_null(),
                (ColumnBuilder::F64(b), _) => b.append_null(),
                (ColumnBuilder::Utf8(b), _) => b.append_null(),
                (ColumnBuilder::TsMs(b), _) => b.append_null(),
                (ColumnBuilder::TsUs(b), _) => b.append_null(),
            }
        }
    }

    fn finish(self, schema: &EventSchema) -> RecordBatch {
        let arrays: Vec<ArrayRef> = self
            .0
            .into_iter()
            .map(|b| -> ArrayRef {
                match b {
                    ColumnBuilder::Bool(mut b) => Arc::new(b.finish()),
                    ColumnBuilder::I32(mut b) => Arc::new(b.finish()),
                    ColumnBuilder::I64(mut b) => Arc::new(b.finish()),
                    ColumnBuilder::F64(mut b) => Arc::new(b.finish()),
                    ColumnBuilder::Utf8(mut b) => Arc::new(b.finish()),
                    ColumnBuilder::TsMs(mut b) => Arc::new(b.finish()),
                    ColumnBuilder::TsUs(mut b) => Arc::new(b.finish()),
                }
            })
            .collect();
        RecordBatch::try_new(schema.arrow().clone(), arrays)
            .expect("decoder builds columns of the schema's types")
    }
}

// ---- serde plumbing: one object per line, each value checked against its field.

/// A marker error: the real reason is in the `err` slot the seeds share.
fn stash<E: de::Error>(slot: &mut Option<FieldError>, field: Option<&str>, reason: String) -> E {
    *slot = Some(FieldError {
        field: field.map(str::to_string),
        reason,
    });
    E::custom("rejected")
}

struct RowSeed<'s, 'a> {
    schema: &'s EventSchema,
    row: &'s mut Vec<Scalar<'a>>,
    err: &'s mut Option<FieldError>,
}

impl<'de, 's> DeserializeSeed<'de> for RowSeed<'s, 'de> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 's> Visitor<'de> for RowSeed<'s, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object (one event per line)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let RowSeed { schema, row, err } = self;
        while let Some(key) = map.next_key_seed(KeySeed {
            schema,
            err: &mut *err,
        })? {
            let Some(idx) = key else {
                // An unknown field under `unknown_fields = "drop"`.
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            let field = &schema.fields()[idx];
            if !matches!(row[idx], Scalar::Missing) {
                return Err(stash(
                    err,
                    Some(&field.name),
                    "appears twice in the event".into(),
                ));
            }
            row[idx] = map.next_value_seed(ValueSeed {
                field,
                err: &mut *err,
            })?;
        }
        Ok(())
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(stash(
            self.err,
            None,
            "expected a JSON object, got an array".into(),
        ))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        Err(stash(
            self.err,
            None,
            format!("expected a JSON object, got string {}", quote(v)),
        ))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        Err(stash(
            self.err,
            None,
            format!("expected a JSON object, got number {v}"),
        ))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        Err(stash(
            self.err,
            None,
            format!("expected a JSON object, got number {v}"),
        ))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        Err(stash(
            self.err,
            None,
            format!("expected a JSON object, got number {v}"),
        ))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        Err(stash(
            self.err,
            None,
            format!("expected a JSON object, got {v}"),
        ))
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(stash(
            self.err,
            None,
            "expected a JSON object, got null".into(),
        ))
    }
}

/// Maps a key to its field index; `Ok(None)` for an unknown key that is dropped.
struct KeySeed<'s> {
    schema: &'s EventSchema,
    err: &'s mut Option<FieldError>,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<usize>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Option<usize>, E> {
        if let Some(i) = self.schema.fields().iter().position(|f| f.name == key) {
            return Ok(Some(i));
        }
        match self.schema.unknown_fields() {
            UnknownFields::Drop => Ok(None),
            UnknownFields::Reject => {
                let hint = match self.schema.suggest(key) {
                    Some(s) => format!(" (did you mean `{s}`?)"),
                    None => {
                        let names: Vec<_> = self
                            .schema
                            .fields()
                            .iter()
                            .map(|f| format!("`{}`", f.name))
                            .collect();
                        format!(" (the schema's fields are {})", names.join(", "))
                    }
                };
                Err(stash(
                    self.err,
                    Some(key),
                    format!("unknown field, not in the schema{hint}"),
                ))
            }
        }
    }
}

/// Reads one value and checks it against its field's type.
struct ValueSeed<'s> {
    field: &'s EventField,
    err: &'s mut Option<FieldError>,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Scalar<'de>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Scalar<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl ValueSeed<'_> {
    fn wrong<E: de::Error>(self, got: String) -> E {
        let expected = match (&self.field.time_format, self.field.ty.is_timestamp()) {
            (Some(tf), true) if tf.is_numeric() => {
                format!("{} (a number, e.g. {})", self.field.ty, tf.example())
            }
            (Some(tf), true) => format!(
                "a timestamp like \"{}\" (format `{}`)",
                tf.example(),
                tf.spec()
            ),
            _ => self.field.ty.to_string(),
        };
        stash(
            self.err,
            Some(&self.field.name),
            format!("expected {expected}, got {got}"),
        )
    }

    fn int<E: de::Error>(self, v: i64, shown: &dyn fmt::Display) -> Result<Scalar<'static>, E> {
        match self.field.ty {
            FieldType::Int64 => Ok(Scalar::Int(v)),
            FieldType::Int32 => match i32::try_from(v) {
                Ok(_) => Ok(Scalar::Int(v)),
                Err(_) => Err(stash(
                    self.err,
                    Some(&self.field.name),
                    format!("number {shown} is out of range for int32"),
                )),
            },
            FieldType::Float64 => Ok(Scalar::Float(v as f64)),
            FieldType::TimestampMs | FieldType::TimestampUs => {
                let tf = self.field.time_format.as_ref();
                match tf.and_then(|tf| tf.epoch_to_micros(v)) {
                    Some(us) => Ok(Scalar::Int(self.to_unit(us))),
                    None if tf.is_some_and(TimeFormat::is_numeric) => Err(stash(
                        self.err,
                        Some(&self.field.name),
                        format!("timestamp {shown} is out of range"),
                    )),
                    None => Err(self.wrong(format!("number {shown}"))),
                }
            }
            _ => Err(self.wrong(format!("number {shown}"))),
        }
    }

    fn to_unit(&self, micros: i64) -> i64 {
        match self.field.ty {
            FieldType::TimestampMs => micros.div_euclid(1000),
            _ => micros,
        }
    }

    fn string<'de, E: de::Error>(self, v: Cow<'de, str>) -> Result<Scalar<'de>, E> {
        match self.field.ty {
            FieldType::Utf8 => Ok(Scalar::Str(v)),
            FieldType::TimestampMs | FieldType::TimestampUs => {
                let tf = self.field.time_format.as_ref();
                match tf.and_then(|tf| tf.parse_str_micros(&v)) {
                    Some(us) => Ok(Scalar::Int(self.to_unit(us))),
                    None => Err(self.wrong(format!("string {}", quote(&v)))),
                }
            }
            _ => Err(self.wrong(format!("string {}", quote(&v)))),
        }
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a value of type {}", self.field.ty)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar<'de>, E> {
        match self.field.ty {
            FieldType::Boolean => Ok(Scalar::Bool(v)),
            _ => Err(self.wrong(format!("boolean {v}"))),
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar<'de>, E> {
        self.int(v, &v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar<'de>, E> {
        match i64::try_from(v) {
            Ok(i) => self.int(i, &v),
            Err(_) if self.field.ty == FieldType::Float64 => Ok(Scalar::Float(v as f64)),
            Err(_) => Err(stash(
                self.err,
                Some(&self.field.name),
                format!("number {v} is out of range for {}", self.field.ty),
            )),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar<'de>, E> {
        match self.field.ty {
            FieldType::Float64 => Ok(Scalar::Float(v)),
            FieldType::Int32 | FieldType::Int64 => Err(stash(
                self.err,
                Some(&self.field.name),
                format!(
                    "expected {}, got number {v} (not an integer in range)",
                    self.field.ty
                ),
            )),
            _ => Err(self.wrong(format!("number {v}"))),
        }
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Scalar<'de>, E> {
        self.string(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar<'de>, E> {
        self.string(Cow::Owned(v.to_string()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar<'de>, E> {
        self.string(Cow::Owned(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Scalar<'de>, E> {
        if self.field.nullable {
            Ok(Scalar::Null)
        } else {
            Err(stash(
                self.err,
                Some(&self.field.name),
                "is null, but the field is not nullable".into(),
            ))
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Scalar<'de>, A::Error> {
        Err(self.wrong("an object".into()))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Scalar<'de>, A::Error> {
        Err(self.wrong("an array".into()))
    }
}

/// A value shown in an error: JSON-quoted and cut to a readable length.
fn quote(s: &str) -> String {
    const MAX: usize = 48;
    if s.chars().count() <= MAX {
        serde_json::to_string(s).expect("strings serialize")
    } else {
        let cut: String = s.chars().take(MAX).collect();
        let q = serde_json::to_string(&cut).expect("strings serialize");
        format!("{}…\"", &q[..q.len() - 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Int64Type, TimestampMillisecondType};

    fn paper() -> Decoder {
        Decoder::new(Arc::new(EventSchema::paper()), Partitioning::RoundRobin)
    }

    fn reasons(body: &str) -> Vec<String> {
        paper()
            .decode(body.as_bytes(), 0)
            .rejects
            .iter()
            .map(|r| r.to_string())
            .collect()
    }

    const GOOD: &str = r#"{"zipcode":95126,"ProductName":"product2","price":16,"timestamp":"2014-11-01 19:35:41.158"}"#;

    #[test]
    fn decodes_the_papers_event_into_typed_columns() {
        let d = paper().decode(GOOD.as_bytes(), 1);
        assert!(d.rejects.is_empty(), "{:?}", d.rejects);
        assert_eq!(d.accepted, 1);
        let (p, b) = &d.batches[0];
        assert_eq!(*p, 1, "round-robin keeps the caller's partition");
        assert_eq!(b.column(0).as_primitive::<Int64Type>().value(0), 95126);
        assert_eq!(b.column(1).as_string::<i32>().value(0), "product2");
        assert_eq!(b.column(2).as_primitive::<Int64Type>().value(0), 16);
        assert_eq!(
            b.column(3)
                .as_primitive::<TimestampMillisecondType>()
                .value(0),
            1_414_870_541_158
        );
    }

    #[test]
    fn the_issue_example_message_reads_as_promised() {
        let body = format!(
            "{GOOD}\n{}",
            GOOD.replace("\"price\":16", "\"price\":\"abc\"")
        );
        assert_eq!(
            reasons(&body),
            ["line 2: field `price`: expected int64, got string \"abc\""]
        );
    }

    #[test]
    fn every_kind_of_bad_line_gets_a_clear_reason() {
        let cases = [
            (
                r#"{"zipcode":95126,"ProductName":"p""#,
                "line 1: malformed JSON: EOF while parsing an object at column 34",
            ),
            (
                r#"{"zipcode":95126,"ProductName":"p","timestamp":"2014-11-01 19:35:41.158"}"#,
                "line 1: field `price`: missing (the field is required)",
            ),
            (
                &GOOD.replace("\"price\":16", "\"price\":16.5"),
                "line 1: field `price`: expected int64, got number 16.5 (not an integer in range)",
            ),
            (
                &GOOD.replace("19:35:41.158", "25:35:41.158"),
                "line 1: field `timestamp`: expected a timestamp like \"2014-11-01 19:35:41.158\" (format `%Y-%m-%d %H:%M:%S%.3f`), got string \"2014-11-01 25:35:41.158\"",
            ),
            (
                &GOOD.replace("\"price\":16", "\"price\":16,\"color\":\"red\""),
                "line 1: field `color`: unknown field, not in the schema (the schema's fields are `zipcode`, `ProductName`, `price`, `timestamp`)",
            ),
            (
                &GOOD.replace("ProductName", "productname"),
                "line 1: field `productname`: unknown field, not in the schema (did you mean `ProductName`?)",
            ),
            (
                &GOOD.replace("\"price\":16", "\"price\":16,\"price\":17"),
                "line 1: field `price`: appears twice in the event",
            ),
            (
                &GOOD.replace("\"price\":16", "\"price\":null"),
                "line 1: field `price`: is null, but the field is not nullable",
            ),
            (
                &GOOD.replace("\"price\":16", "\"price\":99999999999999999999"),
                "line 1: field `price`: expected int64, got number 100000000000000000000 (not an integer in range)",
            ),
            ("[1,2,3]", "line 1: expected a JSON object, got an array"),
            ("42", "line 1: expected a JSON object, got number 42"),
            (
                &format!("{GOOD} x"),
                "line 1: malformed JSON: trailing characters at column 93",
            ),
            (
                &GOOD.replace("\"price\":16", "\"price\":{\"a\":[[[[1]]]]}"),
                "line 1: field `price`: expected int64, got an object",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(reasons(line), [want], "for line {line}");
        }
    }

    #[test]
    fn invalid_utf8_is_rejected_with_its_position() {
        let mut body = GOOD.as_bytes().to_vec();
        body.push(b'\n');
        body.extend_from_slice(b"{\"ProductName\":\"\xff\"}\n");
        let d = paper().decode(&body, 0);
        assert_eq!(d.accepted, 1);
        assert_eq!(
            d.rejects[0].to_string(),
            "line 2: invalid UTF-8 at byte 17 of the line; events must be UTF-8 JSON"
        );
        assert_eq!(
            &body[d.rejects[0].raw.clone()],
            b"{\"ProductName\":\"\xff\"}"
        );
    }

    #[test]
    fn blank_lines_and_crlf_are_tolerated_and_lines_are_counted() {
        let body = format!("\n{GOOD}\r\n   \n{{\"bad\"\r\n{GOOD}");
        let d = paper().decode(body.as_bytes(), 0);
        assert_eq!(d.accepted, 2);
        assert_eq!(d.rejects.len(), 1);
        assert_eq!(d.rejects[0].line, 4);
        assert_eq!(&body.as_bytes()[d.rejects[0].raw.clone()], b"{\"bad\"\r");
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let d = paper().decode(GOOD.replace("product2", "pro\\u0064uct\\\"2").as_bytes(), 0);
        assert_eq!(
            d.batches[0].1.column(1).as_string::<i32>().value(0),
            "product\"2"
        );
    }

    /// Kafka's clients' murmur2, checked against the values Kafka's own
    /// tests give (signed, as Java prints them).
    #[test]
    fn murmur2_is_kafkas() {
        for (key, want) in [
            ("21", -973_932_308i32),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ] {
            assert_eq!(murmur2(key.as_bytes()) as i32, want, "murmur2({key:?})");
        }
    }

    #[test]
    fn key_partitioning_is_stable_and_by_value() {
        let schema = Arc::new(EventSchema::paper());
        let dec = Decoder::new(
            schema,
            Partitioning::Key {
                field: 1,
                partitions: 4,
                by: KeyPlacement::Crc32c,
            },
        );
        let body: String = (0..100)
            .map(|i| GOOD.replace("product2", &format!("product{}", i % 7)) + "\n")
            .collect();
        let d = dec.decode(body.as_bytes(), 0);
        assert_eq!(d.accepted, 100);
        let mut seen = std::collections::HashMap::new();
        for (p, b) in &d.batches {
            let names = b.column(1).as_string::<i32>();
            for i in 0..names.len() {
                let prev = seen.insert(names.value(i).to_string(), *p);
                assert!(prev.is_none_or(|q| q == *p), "one key, one partition");
            }
        }
        assert_eq!(seen.len(), 7);
    }

    #[test]
    fn dropping_unknown_fields_when_asked() {
        let mut schema = EventSchema::paper();
        schema.set_unknown_fields(UnknownFields::Drop);
        let dec = Decoder::new(Arc::new(schema), Partitioning::RoundRobin);
        let d = dec.decode(
            GOOD.replace("\"price\":16", "\"price\":16,\"extra\":{\"a\":[1]}")
                .as_bytes(),
            0,
        );
        assert_eq!(d.accepted, 1, "{:?}", d.rejects);
    }

    /// Hostile input: arbitrary bytes, and valid events with bytes flipped,
    /// cut or spliced in. The decoder never panics; every non-blank line is
    /// either accepted or rejected with its line number and raw bytes.
    mod arbitrary_bytes {
        use super::*;
        use proptest::prelude::*;

        fn check(body: &[u8]) {
            let d = paper().decode(body, 0);
            let lines: Vec<(usize, &[u8])> = body
                .split(|&b| b == b'\n')
                .enumerate()
                .filter(|(_, l)| !l.iter().all(|b| b.is_ascii_whitespace()))
                .collect();
            let rows: usize = d.batches.iter().map(|(_, b)| b.num_rows()).sum();
            assert_eq!(rows, d.accepted, "accepted count = rows decoded");
            assert_eq!(
                d.accepted + d.rejects.len(),
                lines.len(),
                "every non-blank line is accepted or rejected exactly once"
            );
            for r in &d.rejects {
                let (_, raw) = lines
                    .iter()
                    .find(|(i, _)| *i as u64 + 1 == r.line)
                    .unwrap_or_else(|| panic!("reject names a non-blank line: {r}"));
                let got = &body[r.raw.clone()];
                assert_eq!(
                    got.trim_ascii(),
                    raw.trim_ascii(),
                    "the reject keeps the raw line"
                );
                assert!(!r.reason.is_empty());
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            #[test]
            fn any_bytes(body in proptest::collection::vec(any::<u8>(), 0..512)) {
                check(&body);
            }

            #[test]
            fn events_damaged(
                n in 1usize..8,
                edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 0..6),
            ) {
                let mut body: Vec<u8> = std::iter::repeat_n(format!("{GOOD}\n"), n).collect::<String>().into_bytes();
                for (at, byte, kind) in edits {
                    if body.is_empty() { break; }
                    let i = at.index(body.len());
                    match kind {
                        0 => body[i] = byte,
                        1 => { body.remove(i); }
                        _ => body.insert(i, byte),
                    }
                }
                check(&body);
            }
        }

        #[test]
        fn the_classic_hostile_lines() {
            let deep = "[".repeat(100_000);
            let huge_number = "9".repeat(10_000);
            let huge_string = "x".repeat(2 << 20);
            let body = [
                format!("{{\"zipcode\":{deep}"),
                deep.clone(),
                format!("{{\"zipcode\":{huge_number},\"ProductName\":\"a\",\"price\":1,\"timestamp\":\"2014-11-01 19:35:41.158\"}}"),
                "{\"zipcode\":1e400,\"ProductName\":\"a\",\"price\":1,\"timestamp\":\"2014-11-01 19:35:41.158\"}".into(),
                "{\"zipcode\":9223372036854775808,\"ProductName\":\"a\",\"price\":1,\"timestamp\":\"2014-11-01 19:35:41.158\"}".into(),
                format!("{{\"zipcode\":1,\"ProductName\":\"{huge_string}\",\"price\":1,\"timestamp\":\"+262143-01-01 00:00:00.000\"}}"),
                "{\"zipcode\":1,\"ProductName\":\"a\\u0000b\",\"price\":1,\"timestamp\":\"2014-11-01 19:35:41.158\"}".into(),
            ]
            .join("\n");
            let mut body = body.into_bytes();
            body.extend_from_slice(
                b"\n{\"zipcode\":1,\"ProductName\":\"\xff\xfe\",\"price\":1}\n\0\0\0\n",
            );
            check(&body);
            let d = paper().decode(&body, 0);
            assert_eq!(
                d.accepted, 1,
                "only the escaped NUL is a valid event: {:?}",
                d.rejects
            );
            let reasons: Vec<String> = d.rejects.iter().map(|r| r.to_string()).collect();
            assert!(
                reasons[0].starts_with("line 1: field `zipcode`"),
                "{reasons:?}"
            );
            assert!(
                reasons
                    .iter()
                    .any(|r| r.starts_with("line 3:") && r.contains("out of range")),
                "{reasons:?}"
            );
            assert!(
                reasons
                    .iter()
                    .any(|r| r.starts_with("line 5: field `zipcode`")
                        && r.contains("out of range for int64")),
                "{reasons:?}"
            );
            assert!(
                reasons
                    .iter()
                    .any(|r| r.starts_with("line 8:") && r.contains("UTF-8")),
                "{reasons:?}"
            );
        }
    }
}
