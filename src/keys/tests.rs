//! The rule against a naive reading of it, through every path the index has.

use super::*;
use proptest::prelude::*;
use std::time::Duration;

/// The rule as written in the module doc, over a whole partition.
fn naive(events: &[(u128, i64)], within_ms: i64) -> Vec<bool> {
    let mut clock = i64::MIN;
    let mut clocks = Vec::with_capacity(events.len());
    let mut out = Vec::with_capacity(events.len());
    for (o, &(k, t)) in events.iter().enumerate() {
        clock = clock.max(t);
        let since = clock.saturating_sub(within_ms);
        out.push((0..o).any(|o2| events[o2].0 == k && clocks[o2] >= since));
        clocks.push(clock);
    }
    out
}

fn rule(within_ms: u64) -> KeyRule {
    KeyRule {
        field: 0,
        within: Duration::from_millis(within_ms),
    }
}

/// What a test does between events.
#[derive(Debug, Clone)]
enum Step {
    Event {
        key: u8,
        dt: i64,
    },
    /// The published coverage moves to this fraction of what was decided.
    Settle(u8),
    /// Back to this fraction of the way from the edge to the last decided.
    Rewind(u8),
    /// The process restarts: the index is opened again from its directory.
    Reopen,
    /// Time leaps on: 150 s, or exactly 65,536 epochs (where the filter's
    /// 16 bits of epoch wrap).
    Leap(bool),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        12 => (0u8..40, -3_000i64..4_000).prop_map(|(key, dt)| Step::Event { key, dt }),
        2 => (0u8..=100).prop_map(Step::Settle),
        1 => (0u8..=100).prop_map(Step::Rewind),
        1 => Just(Step::Reopen),
        1 => any::<bool>().prop_map(Step::Leap),
    ]
}

fn key_hash(k: u8) -> u128 {
    KeyHasher::new([7; 16]).hash(0, &[k])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Whatever the horizon, the out-of-order times, the settles (runs
    /// written, merged, expired), rewinds and restarts: every decision
    /// equals the rule's over the partition's events.
    #[test]
    fn the_index_decides_as_the_rule(within in 1_000u64..30_000, steps in proptest::collection::vec(step(), 1..400)) {
        let dir = tempfile::tempdir().unwrap();
        let r = rule(within);
        let mut index = KeyIndex::open(dir.path(), 3, &r, "k:utf8").unwrap();
        // The events at offsets 0.., and the decisions made (the last one
        // made for each offset: a rewind decides again).
        let mut events: Vec<(u128, i64)> = Vec::new();
        let mut decided: Vec<bool> = Vec::new();
        let mut t = 1_700_000_000_000i64;
        for s in steps {
            match s {
                Step::Event { key, dt } => {
                    t += dt;
                    let o = index.next();
                    prop_assert!(o as usize <= events.len());
                    events.truncate(o as usize);
                    decided.truncate(o as usize);
                    let h = key_hash(key);
                    events.push((h, t));
                    decided.push(index.decide(o, h, t).unwrap());
                }
                Step::Settle(f) => {
                    let to = index.edge() + (index.next() - index.edge()) * u64::from(f) / 100;
                    index.settle(to).unwrap();
                }
                Step::Rewind(f) => {
                    let to = index.edge() + (index.next() - index.edge()) * u64::from(f) / 100;
                    index.rewind(to).unwrap();
                }
                Step::Leap(wrap) => {
                    t += if wrap { 65_536 * super::epoch_ms(&r) } else { 150_000 };
                }
                Step::Reopen => {
                    let edge = index.edge();
                    drop(index);
                    index = KeyIndex::open(dir.path(), 3, &r, "k:utf8").unwrap();
                    prop_assert_eq!(index.edge(), edge, "a reopened index starts at its edge");
                }
            }
        }
        let n = index.next() as usize;
        let want = naive(&events[..n], super::within_ms(&r));
        for o in 0..n {
            prop_assert_eq!(decided[o], want[o], "offset {} (key {:x}): the index and the rule disagree", o, events[o].0 >> 120);
        }
    }
}

#[test]
fn an_index_of_another_rule_is_thrown_away() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = KeyIndex::open(dir.path(), 0, &rule(60_000), "k:utf8").unwrap();
    for o in 0..10 {
        a.decide(o, key_hash(o as u8), 1_000 * o as i64).unwrap();
    }
    a.settle(10).unwrap();
    drop(a);
    let b = KeyIndex::open(dir.path(), 0, &rule(60_000), "k:utf8").unwrap();
    assert_eq!(b.edge(), 10, "the same rule reopens where it was");
    drop(b);
    let c = KeyIndex::open(dir.path(), 0, &rule(120_000), "k:utf8").unwrap();
    assert_eq!(
        c.edge(),
        0,
        "another horizon starts again from the master dataset"
    );
    drop(c);
    let mut d = KeyIndex::open(dir.path(), 0, &rule(60_000), "k:utf8").unwrap();
    for o in 0..10 {
        d.decide(o, key_hash(o as u8), 1_000 * o as i64).unwrap();
    }
    d.settle(10).unwrap();
    drop(d);
    let e = KeyIndex::open(dir.path(), 0, &rule(60_000), "other:utf8").unwrap();
    assert_eq!(
        e.edge(),
        0,
        "another key field starts again from the master dataset"
    );
}

#[test]
fn a_damaged_run_starts_the_index_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = KeyIndex::open(dir.path(), 0, &rule(60_000), "k:utf8").unwrap();
    for o in 0..100 {
        a.decide(o, key_hash(o as u8), 1_000).unwrap();
    }
    a.settle(100).unwrap();
    drop(a);
    let run = std::fs::read_dir(dir.path().join("p0000"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "run"))
        .unwrap();
    let mut bytes = std::fs::read(&run).unwrap();
    bytes[40] ^= 0x10;
    std::fs::write(&run, bytes).unwrap();
    let b = KeyIndex::open(dir.path(), 0, &rule(60_000), "k:utf8").unwrap();
    assert_eq!(
        b.edge(),
        0,
        "a damaged run is not trusted: rebuild from the master dataset"
    );
}

#[test]
fn keys_of_each_type_hash_apart() {
    use arrow::array::{Int32Array, Int64Array, StringArray};
    use std::sync::Arc;
    let s: ArrayRef = Arc::new(StringArray::from(vec![Some("1"), None, Some("1")]));
    let i: ArrayRef = Arc::new(Int64Array::from(vec![1, 2, 1]));
    let j: ArrayRef = Arc::new(Int32Array::from(vec![1, 2, 1]));
    let (s, i, j) = (
        KeyHasher::new([7; 16]).column(&s).unwrap(),
        KeyHasher::new([7; 16]).column(&i).unwrap(),
        KeyHasher::new([7; 16]).column(&j).unwrap(),
    );
    assert_eq!(s[0], s[2]);
    assert_eq!(s[1], None, "a null key has no hash");
    assert_ne!(s[0], i[0], "the string \"1\" is not the number 1");
    assert_eq!(i[0], j[0], "an int32 and an int64 of one value are one key");
}

/// The red team's case: a key seen again 150 epochs later (past where 8
/// bits of epoch wrap), settled, then again within the horizon — and the
/// same 65,536 epochs later (where 16 bits wrap), in one settle or two.
#[test]
fn a_key_seen_again_after_the_epochs_wrap_is_still_found() {
    for leap_s in [150, 65_536, 65_536 * 2] {
        for settle_between in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let r = rule(8_000); // an epoch of 1 s
            let mut index = KeyIndex::open(dir.path(), 0, &r, "k:utf8").unwrap();
            let k = key_hash(1);
            let t0 = 1_700_000_000_000i64;
            assert!(!index.decide(0, k, t0).unwrap());
            index.decide(1, key_hash(2), t0 + 100).unwrap();
            index.settle(2).unwrap();
            let t1 = t0 + leap_s * 1000;
            assert!(
                !index.decide(2, k, t1).unwrap(),
                "{leap_s} s later: past the horizon"
            );
            index.decide(3, key_hash(3), t1 + 200).unwrap();
            if settle_between {
                index.settle(4).unwrap();
            }
            assert!(
                index.decide(4, k, t1 + 1_500).unwrap(),
                "{leap_s} s later, then 1.5 s after (settled between: {settle_between}): a duplicate"
            );
            index.settle(5).unwrap();
            assert!(
                index.decide(5, k, t1 + 3_000).unwrap(),
                "and again after the settle"
            );
            drop(index);
            let mut index = KeyIndex::open(dir.path(), 0, &r, "k:utf8").unwrap();
            assert!(
                index.decide(6, k, t1 + 4_000).unwrap(),
                "and after a reopen"
            );
        }
    }
}
