//! A check of the stream's keying. Duplicates are found per partition, so
//! every occurrence of a key must land in one partition: the producer keys
//! its records by the event key (HTTP ingest does it itself). When it does
//! not — a Kafka producer with another key or none, partitions added to a
//! keyed topic, a Kinesis reshard that sends a key to a child shard — a
//! duplicate in another partition than its first occurrence is counted
//! again, and nothing in one partition's records can tell.
//!
//! [`Placement`] looks across partitions: one key in [`SAMPLE`] (chosen by
//! its hash, so the same keys everywhere) is remembered in a fixed table
//! with the partition and time it was last seen. A sampled key seen in
//! another partition within the horizon is a *stray*: a duplicate the rule
//! cannot find. It is best effort by design — a slot is overwritten by a
//! later key, so strays are found, not all of them — and it never names a
//! key that was not seen in two partitions (but for a 2⁻⁶⁴ chance of two
//! keys sharing a fingerprint and a slot).
//!
//! ```text
//!  hash h ── sampled? (1 in 16) ──▶ slot[h mod 2¹⁷] = (fingerprint, partition, second)
//!                                       │ same fingerprint, other partition, within the horizon
//!                                       ▼
//!                                   stray: counted per partition, the latest named in health
//! ```

/// One key in this many is checked.
pub const SAMPLE: u64 = 16;

/// Slots of the table (16 bytes each: 2 MiB).
const SLOTS: usize = 1 << 17;

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// 0: empty.
    fingerprint: u64,
    partition: u32,
    /// Stream time in seconds since the epoch, clamped to u32.
    secs: u32,
}

/// A key seen in two partitions within the horizon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stray {
    /// Where it was seen before.
    pub first: u32,
    /// Where it came again, and at which position (unknown for a key
    /// read back from the index's runs at startup).
    pub again: u32,
    pub offset: Option<u64>,
}

impl std::fmt::Display for Stray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.offset {
            Some(o) => write!(
                f,
                "the event at offset {o} of partition {} has a key seen in partition {} within the horizon",
                self.again, self.first
            ),
            None => write!(
                f,
                "an event of partition {} has a key seen in partition {} within the horizon",
                self.again, self.first
            ),
        }
    }
}

/// Where sampled keys were last seen (see the module doc).
pub struct Placement {
    slots: Box<[Slot]>,
    within_secs: u64,
    /// Strays per partition (of the sampled keys), since the process started.
    found: Vec<u64>,
    latest: Option<Stray>,
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placement")
            .field("found", &self.found)
            .field("latest", &self.latest)
            .finish_non_exhaustive()
    }
}

fn secs(time_ms: i64) -> u32 {
    (time_ms.div_euclid(1000)).clamp(0, u32::MAX as i64) as u32
}

impl Placement {
    pub fn new(within_ms: i64) -> Placement {
        Placement {
            slots: vec![Slot::default(); SLOTS].into_boxed_slice(),
            // Rounded up: a key within the horizon to the ms is within it here.
            within_secs: (within_ms.max(0) as u64).div_ceil(1000) + 1,
            found: Vec::new(),
            latest: None,
        }
    }

    /// Notes that partition `p` has key hash `h` at `offset`, stream time
    /// `time_ms`; true when it is a stray.
    #[inline]
    pub fn note(&mut self, p: u32, h: u128, offset: Option<u64>, time_ms: i64) -> bool {
        let hi = (h >> 64) as u64;
        if !hi.is_multiple_of(SAMPLE) {
            return false;
        }
        let slot = &mut self.slots[(hi / SAMPLE) as usize % SLOTS];
        let fingerprint = (h as u64).max(1);
        let now = secs(time_ms);
        let stray = slot.fingerprint == fingerprint
            && slot.partition != p
            && (now as u64).abs_diff(slot.secs as u64) <= self.within_secs;
        if stray {
            let i = p as usize;
            if self.found.len() <= i {
                self.found.resize(i + 1, 0);
            }
            self.found[i] += 1;
            self.latest = Some(Stray {
                first: slot.partition,
                again: p,
                offset,
            });
        }
        *slot = Slot {
            fingerprint,
            partition: p,
            secs: now,
        };
        stray
    }

    /// Strays found in partition `p`.
    pub fn found(&self, p: u32) -> u64 {
        self.found.get(p as usize).copied().unwrap_or(0)
    }

    /// Strays found in every partition.
    pub fn total(&self) -> u64 {
        self.found.iter().sum()
    }

    /// The latest stray, if any.
    pub fn latest(&self) -> Option<&Stray> {
        self.latest.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hashes that are sampled, spread over the table.
    fn sampled(i: u64) -> u128 {
        (((i * SAMPLE) as u128) << 64) | (i as u128 * 0x9E37_79B9 + 7)
    }

    #[test]
    fn a_key_in_two_partitions_within_the_horizon_is_a_stray() {
        let mut pl = Placement::new(60_000);
        assert!(!pl.note(0, sampled(1), Some(10), 1_000_000));
        assert!(
            !pl.note(0, sampled(1), Some(11), 1_001_000),
            "the same partition again: a duplicate the rule finds, no stray"
        );
        assert!(
            pl.note(1, sampled(1), Some(5), 1_002_000),
            "the same key in partition 1 within the minute"
        );
        assert_eq!(
            pl.latest(),
            Some(&Stray {
                first: 0,
                again: 1,
                offset: Some(5)
            })
        );
        assert_eq!((pl.found(0), pl.found(1)), (0, 1));
        assert!(
            !pl.note(0, sampled(1), Some(12), 1_000_000 + 120_000),
            "two minutes later, past the horizon: not a duplicate at all"
        );
    }

    #[test]
    fn distinct_keys_and_unsampled_keys_are_never_strays() {
        let mut pl = Placement::new(3_600_000);
        for i in 0..100_000u64 {
            assert!(!pl.note((i % 4) as u32, sampled(i), Some(i), 0));
        }
        // Not sampled: a key whose high half is not a multiple of SAMPLE.
        let h = (1u128 << 64) | 5;
        assert!(!pl.note(0, h, Some(0), 0));
        assert!(!pl.note(1, h, Some(0), 0));
        assert_eq!(pl.found(1) + pl.found(2) + pl.found(3), 0);
    }
}
