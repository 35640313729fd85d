//! Key indexes for point reads: the rows of a state batch by the value of
//! one group column, found in constant time.
//!
//! ```text
//!  KeyIndex of a state batch, column c:
//!    first: hash table, key → its first row         next: row → the next row
//!                                                          with the same key
//!  lookup(k) = first[k], next[first[k]], …   (every row of k, in row order)
//! ```
//!
//! A point read under ingest probes the published run's index and one per
//! realtime state batch (up to 16 of a growing chunk, one per closed
//! chunk): dozens per read. A probe is one hash and one or two compares,
//! whatever the batch's size. Null keys are not indexed: a point read's
//! key is never null.

use std::hash::BuildHasher;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::buffer::ScalarBuffer;
use arrow::datatypes::{DataType, Int64Type};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, Rows, SortField};
use hashbrown::HashTable;

/// The end of a chain of rows.
const END: u32 = u32::MAX;

/// A point read's key, converted once to what every index of its column
/// compares: its int64 value, or its bytes in Arrow's row format (the
/// indexes of one column share the column's type, so the same encoding).
pub struct KeyProbe {
    pub(super) key: ArrayRef,
    row: Vec<u8>,
    /// The key as an integer, when it is an int64.
    int64: Option<i64>,
}

impl KeyProbe {
    /// The probe of `key`'s first value.
    pub fn new(key: &ArrayRef) -> Result<KeyProbe, ArrowError> {
        let key = &canonical(key);
        let converter = RowConverter::new(vec![SortField::new(key.data_type().clone())])?;
        let rows = converter.convert_columns(std::slice::from_ref(key))?;
        let int64 = (key.data_type() == &DataType::Int64 && key.is_valid(0))
            .then(|| key.as_primitive::<Int64Type>().value(0));
        Ok(KeyProbe {
            key: key.clone(),
            row: rows.row(0).as_ref().to_vec(),
            int64,
        })
    }
}

/// `keys` with each float that SQL equality does not tell apart written
/// one way: `-0.0` as `0.0` (DataFusion groups them as one, stored as
/// `0.0`), and every NaN as one NaN (a computed NaN may carry its sign bit;
/// the NaN a reader types does not). Other types as they are.
pub fn canonical(keys: &ArrayRef) -> ArrayRef {
    use arrow::datatypes::{Float32Type, Float64Type};
    use std::sync::Arc;
    match keys.data_type() {
        DataType::Float64 => Arc::new(keys.as_primitive::<Float64Type>().unary::<_, Float64Type>(
            |v| {
                if v == 0.0 {
                    0.0
                } else if v.is_nan() {
                    f64::NAN
                } else {
                    v
                }
            },
        )),
        DataType::Float32 => Arc::new(keys.as_primitive::<Float32Type>().unary::<_, Float32Type>(
            |v| {
                if v == 0.0 {
                    0.0
                } else if v.is_nan() {
                    f32::NAN
                } else {
                    v
                }
            },
        )),
        _ => keys.clone(),
    }
}

/// Rows of a state batch by the value of one column (see the module doc).
#[derive(Debug)]
pub struct KeyIndex {
    keys: IndexKeys,
    /// The first row of each distinct key, hashed by the key.
    first: HashTable<u32>,
    /// Per row: the next row with the same key, or [`END`].
    next: Vec<u32>,
}

/// The keys an index compares.
#[derive(Debug)]
enum IndexKeys {
    /// An int64 column (zipcodes, ids): its values, compared as integers.
    Int64(ScalarBuffer<i64>),
    /// Any other column, in Arrow's row format (equality is the type's own:
    /// `-0.0` and `0.0` are different keys, as in the views' groups).
    Rows(Rows),
}

/// The hasher of every index and probe of this process, seeded at random
/// when the process starts: keys are the events' values, and with a seed
/// anyone can know, a producer could send keys that all land in one run of
/// the table (each index build, on the speed layer's path, then takes
/// quadratic time — 3.6 s for 200,000 such zipcodes, against 2 ms).
fn hasher() -> &'static foldhash::fast::RandomState {
    static SEEDED: std::sync::LazyLock<foldhash::fast::RandomState> =
        std::sync::LazyLock::new(foldhash::fast::RandomState::default);
    &SEEDED
}

impl IndexKeys {
    fn hash(&self, row: u32) -> u64 {
        match self {
            IndexKeys::Int64(v) => hasher().hash_one(v[row as usize]),
            IndexKeys::Rows(r) => hasher().hash_one(r.row(row as usize).as_ref()),
        }
    }

    fn same(&self, a: u32, b: u32) -> bool {
        match self {
            IndexKeys::Int64(v) => v[a as usize] == v[b as usize],
            IndexKeys::Rows(r) => r.row(a as usize) == r.row(b as usize),
        }
    }
}

impl KeyIndex {
    /// Indexes column `col` of `states`.
    pub fn build(states: &RecordBatch, col: usize) -> Result<KeyIndex, ArrowError> {
        let column = states.column(col);
        let n = states.num_rows();
        if n >= END as usize {
            return Err(ArrowError::ComputeError(format!(
                "a state batch of {n} rows is too large to index"
            )));
        }
        let keys = if column.data_type() == &DataType::Int64 {
            IndexKeys::Int64(column.as_primitive::<Int64Type>().values().clone())
        } else {
            let converter = RowConverter::new(vec![SortField::new(column.data_type().clone())])?;
            IndexKeys::Rows(converter.convert_columns(&[canonical(column)])?)
        };
        let mut first: HashTable<u32> = HashTable::with_capacity(n);
        let mut next = vec![END; n];
        // Last row first: each row goes to the head of its key's chain, so
        // a chain lists its rows in row order.
        for r in (0..n as u32).rev() {
            if column.is_null(r as usize) {
                continue;
            }
            let h = keys.hash(r);
            match first.find_mut(h, |&f| keys.same(f, r)) {
                Some(f) => {
                    next[r as usize] = *f;
                    *f = r;
                }
                None => {
                    first.insert_unique(h, r, |&f| keys.hash(f));
                }
            }
        }
        Ok(KeyIndex { keys, first, next })
    }

    /// Rows whose key is the probe's, in row order.
    pub fn lookup(&self, probe: &KeyProbe) -> Vec<u32> {
        let found = match &self.keys {
            IndexKeys::Int64(v) => match probe.int64 {
                Some(k) => self
                    .first
                    .find(hasher().hash_one(k), |&f| v[f as usize] == k),
                None => None,
            },
            IndexKeys::Rows(r) => {
                let k = probe.row.as_slice();
                self.first
                    .find(hasher().hash_one(k), |&f| r.row(f as usize).as_ref() == k)
            }
        };
        let mut rows = Vec::new();
        let mut at = found.copied().unwrap_or(END);
        while at != END {
            rows.push(at);
            at = self.next[at as usize];
        }
        rows
    }

    /// Bytes the index holds besides the batch's own buffers.
    pub fn size(&self) -> usize {
        let keys = match &self.keys {
            IndexKeys::Int64(_) => 0, // the column's buffer, shared
            IndexKeys::Rows(r) => r.size(),
        };
        keys + self.first.allocation_size() + self.next.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    fn batch(keys: ArrayRef) -> RecordBatch {
        let n = Int64Array::from_iter_values(0..keys.len() as i64);
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", keys.data_type().clone(), true),
            Field::new("n", DataType::Int64, false),
        ]));
        RecordBatch::try_new(schema, vec![keys, Arc::new(n)]).unwrap()
    }

    #[test]
    fn a_key_index_finds_every_row_of_a_key_and_none_of_another() {
        let states = batch(Arc::new(StringArray::from(vec![
            Some("b"),
            Some("a"),
            None,
            Some("b"),
            Some("c"),
            Some("a"),
        ])));
        let index = KeyIndex::build(&states, 0).unwrap();
        let find = |k: &str| {
            let key: ArrayRef = Arc::new(StringArray::from(vec![k]));
            index.lookup(&KeyProbe::new(&key).unwrap())
        };
        assert_eq!(find("a"), vec![1, 5], "both rows of `a`, in row order");
        assert_eq!(find("b"), vec![0, 3], "both rows of `b`, in row order");
        assert_eq!(find("c"), vec![4]);
        assert!(find("ab").is_empty() && find("").is_empty() && find("z").is_empty());

        // An int64 key column is indexed by its values: the same answers.
        let states = batch(Arc::new(Int64Array::from(vec![
            95126, -3, 95126, 7, -3, 95126,
        ])));
        let index = KeyIndex::build(&states, 0).unwrap();
        assert!(matches!(index.keys, IndexKeys::Int64(_)));
        let find = |k: i64| {
            let key: ArrayRef = Arc::new(Int64Array::from(vec![k]));
            index.lookup(&KeyProbe::new(&key).unwrap())
        };
        assert_eq!(
            find(95126),
            vec![0, 2, 5],
            "every row of the key, in row order"
        );
        assert_eq!(find(-3), vec![1, 4]);
        assert_eq!(find(7), vec![3]);
        assert!(find(8).is_empty() && find(i64::MIN).is_empty() && find(i64::MAX).is_empty());
    }

    #[test]
    fn a_null_key_is_never_found_whatever_value_its_slot_holds() {
        // A null int64's slot holds a value (here 0): a probe of 0 must not
        // find it.
        let states = batch(Arc::new(Int64Array::from(vec![Some(0), None, Some(5)])));
        let index = KeyIndex::build(&states, 0).unwrap();
        let key: ArrayRef = Arc::new(Int64Array::from(vec![0]));
        assert_eq!(
            index.lookup(&KeyProbe::new(&key).unwrap()),
            vec![0],
            "only the row whose key is 0, not the null one"
        );
    }

    #[test]
    fn a_key_index_agrees_with_sql_equality_on_many_keys() {
        // 20,000 rows of 3,000 keys (with repeats), and the floats SQL
        // equality does not tell apart: 0.0 and -0.0, NaN with and without
        // its sign bit. Every key finds the rows SQL's `=` finds (NaN = NaN,
        // as in Postgres and DataFusion's ordering).
        let values: Vec<f64> = (0..20_000)
            .map(|i: i64| match i % 9 {
                0 => 0.0,
                1 => -0.0,
                2 => f64::NAN,
                3 => -f64::NAN,
                _ => ((i * 7919) % 3000) as f64 / 4.0,
            })
            .collect();
        let states = batch(Arc::new(Float64Array::from(values.clone())));
        let index = KeyIndex::build(&states, 0).unwrap();
        let same = |a: f64, b: f64| a == b || (a.is_nan() && b.is_nan());
        for probe in [0.0, -0.0, f64::NAN, -f64::NAN, 1.25, 749.75, 3000.0] {
            let key: ArrayRef = Arc::new(Float64Array::from(vec![probe]));
            let want: Vec<u32> = (0..values.len() as u32)
                .filter(|&r| same(values[r as usize], probe))
                .collect();
            assert!(probe == 3000.0 || !want.is_empty());
            assert_eq!(
                index.lookup(&KeyProbe::new(&key).unwrap()),
                want,
                "the rows of {probe:?}"
            );
        }
    }

    #[test]
    fn keys_crafted_against_a_known_seed_spread_under_the_index_hasher() {
        let known = foldhash::fast::FixedState::with_seed(0x1f0c_a5e5);
        let crafted: Vec<i64> = (0i64..)
            .filter(|k| known.hash_one(*k) & 0xfff == 0)
            .take(2_000)
            .collect();
        let spread = |h: &dyn Fn(i64) -> u64| {
            let mut slots: Vec<u64> = crafted.iter().map(|&k| h(k) & 0xfff).collect();
            slots.sort_unstable();
            slots.dedup();
            slots.len()
        };
        assert_eq!(spread(&|k| known.hash_one(k)), 1, "crafted to collide");
        let ours = spread(&|k| hasher().hash_one(k));
        assert!(
            ours > 1_000,
            "2,000 crafted keys fall into {ours} of 4,096 slots under the index's hasher: it must be seeded where a producer cannot know the seed"
        );
    }
}
