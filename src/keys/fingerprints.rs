//! The filter in front of the key index: one open-addressing table of 64-bit
//! slots, one per key within the horizon, each holding 56 bits of the key's
//! hash and the epoch of its latest occurrence.
//!
//! ```text
//!  slot = fingerprint (48 bits of the key's hash, never 0) << 16 | epoch (u16, wrapping)
//!  home = fingerprint × φ >> (64 − log2 capacity)         linear probing, load ≤ 0.8
//! ```
//!
//! A miss is exact: every key within the horizon has a slot. A slot holds
//! the epoch of the last occurrence recorded in it — occurrences are
//! recorded in the order of their clocks, so that is the latest, also for a
//! fingerprint two keys share — and is removed only when that epoch
//! expires. A hit is only a candidate — the runs on disk confirm it — so
//! two keys sharing a fingerprint (about one lookup in 3 × 10⁶ at 100 M
//! keys) cost a disk read, never a wrong answer. Epochs wrap at 65,536: the
//! index keeps the epochs alive within a few of each other (see `expire`).
//! 8 bytes a slot: 100 M keys at load 0.8 take 1 GiB.

/// A slot that holds nothing.
const EMPTY: u64 = 0;
/// Fibonacci hashing's multiplier: spreads fingerprints over the table.
const PHI: u64 = 0x9E37_79B9_7F4A_7C15;
/// The table grows (doubles) beyond this load, in fifths.
const MAX_LOAD_FIFTHS: usize = 4;

/// Bits of a slot that hold the epoch.
const EPOCH_BITS: u32 = 16;

/// The 48-bit fingerprint of a key's 128-bit hash (never 0, which marks an empty slot).
pub fn fingerprint(hash: u128) -> u64 {
    let f = (hash >> 80) as u64;
    if f == 0 { 1 } else { f }
}

/// An epoch as a slot holds it.
pub fn short(epoch: i64) -> u16 {
    epoch.rem_euclid(1 << EPOCH_BITS) as u16
}

#[derive(Debug)]
pub struct Fingerprints {
    slots: Vec<u64>,
    len: usize,
    shift: u32,
}

impl Default for Fingerprints {
    fn default() -> Self {
        Fingerprints::with_capacity_log2(10)
    }
}

impl Fingerprints {
    fn with_capacity_log2(bits: u32) -> Fingerprints {
        Fingerprints {
            slots: vec![EMPTY; 1 << bits],
            len: 0,
            shift: 64 - bits,
        }
    }

    /// Keys (fingerprints) held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the table takes.
    pub fn bytes(&self) -> usize {
        self.slots.len() * 8
    }

    /// Asks the CPU to fetch `hash`'s home slot now: a decision made a few
    /// keys later finds it in cache instead of waiting on memory (the table
    /// is far larger than the caches; a probe is one random access).
    #[inline]
    pub fn prefetch(&self, hash: u128) {
        #[cfg(target_arch = "x86_64")]
        {
            let i = self.home(fingerprint(hash));
            // SAFETY: a prefetch is only a hint, and the address is in bounds.
            unsafe {
                use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
                _mm_prefetch::<_MM_HINT_T0>(self.slots.as_ptr().add(i).cast());
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = hash;
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    fn home(&self, fp: u64) -> usize {
        (fp.wrapping_mul(PHI) >> self.shift) as usize
    }

    /// The slot holding `fp`, if any.
    fn find(&self, fp: u64) -> Option<usize> {
        let mask = self.mask();
        let mut i = self.home(fp);
        loop {
            let s = self.slots[i];
            if s == EMPTY {
                return None;
            }
            if s >> EPOCH_BITS == fp {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// The epoch of the latest occurrence of a key with `hash`'s
    /// fingerprint, if one is held.
    pub fn get(&self, hash: u128) -> Option<u16> {
        self.find(fingerprint(hash)).map(|i| self.slots[i] as u16)
    }

    /// Records an occurrence of `hash` in `epoch` (the latest yet).
    pub fn insert(&mut self, hash: u128, epoch: u16) {
        self.upsert(hash, epoch);
    }

    /// Records an occurrence of `hash` in `epoch` (the latest yet), in one
    /// probe: the epoch its fingerprint had before, if any.
    pub fn upsert(&mut self, hash: u128, epoch: u16) -> Option<u16> {
        let fp = fingerprint(hash);
        let mask = self.mask();
        let mut i = self.home(fp);
        loop {
            let s = self.slots[i];
            if s == EMPTY {
                break;
            }
            if s >> EPOCH_BITS == fp {
                self.slots[i] = fp << EPOCH_BITS | u64::from(epoch);
                return Some(s as u16);
            }
            i = (i + 1) & mask;
        }
        if (self.len + 1) * 5 > self.slots.len() * MAX_LOAD_FIFTHS {
            self.grow();
            self.place(fp << EPOCH_BITS | u64::from(epoch));
        } else {
            self.slots[i] = fp << EPOCH_BITS | u64::from(epoch);
        }
        self.len += 1;
        None
    }

    /// Puts a slot known not to be held into the first empty place of its probe.
    fn place(&mut self, slot: u64) {
        let mask = self.mask();
        let mut i = self.home(slot >> EPOCH_BITS);
        while self.slots[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.slots[i] = slot;
    }

    fn grow(&mut self) {
        let bits = 64 - self.shift + 1;
        let old = std::mem::replace(&mut self.slots, vec![EMPTY; 1 << bits]);
        self.shift = 64 - bits;
        for s in old.into_iter().filter(|&s| s != EMPTY) {
            self.place(s);
        }
    }

    /// Forgets `hash` if its latest occurrence is in `epoch` (an epoch that
    /// expired): a key seen again later keeps its slot.
    pub fn remove_if(&mut self, hash: u128, epoch: u16) {
        let Some(mut i) = self.find(fingerprint(hash)) else {
            return;
        };
        if self.slots[i] as u16 != epoch {
            return;
        }
        // Knuth's deletion for linear probing: move back each slot after it
        // whose home does not lie between the hole and itself.
        let mask = self.mask();
        self.slots[i] = EMPTY;
        self.len -= 1;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let s = self.slots[j];
            if s == EMPTY {
                return;
            }
            let k = self.home(s >> EPOCH_BITS);
            let stays = if i <= j {
                i < k && k <= j
            } else {
                i < k || k <= j
            };
            if stays {
                continue;
            }
            self.slots[i] = s;
            self.slots[j] = EMPTY;
            i = j;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// Hashes whose fingerprints share their home slots often (a small
    /// table), to exercise probing, growth and deletion.
    fn hash(k: u32) -> u128 {
        let h = blake3::hash(&k.to_le_bytes());
        u128::from_le_bytes(h.as_bytes()[..16].try_into().unwrap())
    }

    proptest! {
        /// Against a map: every key inserted and not removed is found with
        /// its latest epoch, every removed one is gone, whatever the order
        /// of inserts, growths and removals.
        #[test]
        fn behaves_as_a_map_of_latest_epochs(ops in proptest::collection::vec((0u32..300, 0u16..6, any::<bool>()), 1..2000)) {
            let mut t = Fingerprints::with_capacity_log2(2);
            let mut want: HashMap<u32, u16> = HashMap::new();
            for (k, e, remove) in ops {
                if remove {
                    t.remove_if(hash(k), e);
                    if want.get(&k) == Some(&e) {
                        want.remove(&k);
                    }
                } else {
                    t.insert(hash(k), e);
                    want.insert(k, e);
                }
                prop_assert_eq!(t.len(), want.len(), "the table holds one slot per key");
            }
            for k in 0..300 {
                prop_assert_eq!(t.get(hash(k)), want.get(&k).copied(), "key {} must be found with its latest epoch", k);
            }
        }
    }

    #[test]
    fn an_epoch_is_its_last_sixteen_bits() {
        assert_eq!(short(65_537), 1);
        assert_eq!(short(-1), 65_535, "epochs before 1970 wrap too");
    }
}
