//! The key index on disk: sorted runs of `(key hash, clock)` — the clock
//! of the key's latest occurrence in the run — one file each.
//!
//! ```text
//!  file:    "LFKR" | version u32 | count u64 | count × (hash u128 LE, clock i64 LE) | crc32c u32
//!  memory:  the first hash and the CRC-32C of every block of 512 entries (20 bytes per 512 keys)
//!  lookup:  binary search of the fences, one read of ≤ 12 KiB checked against its CRC, binary search
//! ```
//!
//! A run is a cache of what the master dataset holds: a file that does not
//! check out is thrown away with its index and the index is rebuilt.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::KeyError;

const MAGIC: &[u8; 4] = b"LFKR";
const VERSION: u32 = 1;
const HEADER: usize = 16;
const ENTRY: usize = 24;
/// Entries per block: one fence each.
const BLOCK: usize = 512;

/// One key's latest occurrence in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub hash: u128,
    pub clock: i64,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A run file, with its fences in memory.
#[derive(Debug)]
pub struct Run {
    path: PathBuf,
    count: u64,
    fences: Vec<u128>,
    /// Each block's CRC-32C: a lookup reads a block, never the whole file,
    /// and a block damaged since the run was written is found there.
    blocks: Vec<u32>,
}

/// Writes entries (sorted by hash, one per hash) to a run file.
struct Writer {
    out: BufWriter<File>,
    crc: u32,
    count: u64,
    fences: Vec<u128>,
    blocks: Vec<u32>,
    path: PathBuf,
    tmp: PathBuf,
}

impl Writer {
    fn create(path: &Path) -> Result<Writer, KeyError> {
        let tmp = path.with_extension("tmp");
        let f = File::create(&tmp).map_err(io(&tmp))?;
        let mut w = Writer {
            out: BufWriter::with_capacity(1 << 16, f),
            crc: 0,
            count: 0,
            fences: Vec::new(),
            blocks: Vec::new(),
            path: path.to_path_buf(),
            tmp,
        };
        // The count is not known yet: the header is written again at the end.
        w.bytes(&[0; HEADER])?;
        Ok(w)
    }

    fn bytes(&mut self, b: &[u8]) -> Result<(), KeyError> {
        self.out.write_all(b).map_err(io(&self.tmp))
    }

    fn push(&mut self, e: Entry) -> Result<(), KeyError> {
        if self.count.is_multiple_of(BLOCK as u64) {
            self.fences.push(e.hash);
            self.blocks.push(0);
        }
        let mut b = [0u8; ENTRY];
        b[..16].copy_from_slice(&e.hash.to_le_bytes());
        b[16..].copy_from_slice(&e.clock.to_le_bytes());
        self.crc = crc32c::crc32c_append(self.crc, &b);
        let block = self.blocks.last_mut().expect("a block");
        *block = crc32c::crc32c_append(*block, &b);
        self.count += 1;
        self.bytes(&b)
    }

    fn finish(mut self) -> Result<Run, KeyError> {
        let mut header = [0u8; HEADER];
        header[..4].copy_from_slice(MAGIC);
        header[4..8].copy_from_slice(&VERSION.to_le_bytes());
        header[8..].copy_from_slice(&self.count.to_le_bytes());
        let crc = crc32c::crc32c_append(self.crc, &header);
        self.bytes(&crc.to_le_bytes())?;
        let f = self
            .out
            .into_inner()
            .map_err(|e| io(&self.tmp)(e.into_error()))?;
        f.write_all_at(&header, 0).map_err(io(&self.tmp))?;
        drop(f);
        std::fs::rename(&self.tmp, &self.path).map_err(io(&self.path))?;
        Ok(Run {
            path: self.path,
            count: self.count,
            fences: self.fences,
            blocks: self.blocks,
        })
    }
}

impl Run {
    /// Writes `entries` (sorted by hash, one per hash) as the run at `path`.
    pub fn write(path: &Path, entries: &[Entry]) -> Result<Run, KeyError> {
        let mut w = Writer::create(path)?;
        for &e in entries {
            w.push(e)?;
        }
        w.finish()
    }

    /// Opens the run at `path`, handing each entry to `each` in order: the
    /// whole file is read and its checksum checked.
    pub fn open(path: &Path, mut each: impl FnMut(Entry)) -> Result<Run, KeyError> {
        let bad = |why: String| KeyError::BadRun {
            path: path.to_path_buf(),
            why,
        };
        let f = File::open(path).map_err(io(path))?;
        let len = f.metadata().map_err(io(path))?.len();
        let mut r = BufReader::with_capacity(1 << 16, f);
        let mut header = [0u8; HEADER];
        r.read_exact(&mut header).map_err(io(path))?;
        if &header[..4] != MAGIC || header[4..8] != VERSION.to_le_bytes() {
            return Err(bad("not a key run of this version".into()));
        }
        let count = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
        if len != (HEADER + ENTRY * count as usize + 4) as u64 {
            return Err(bad(format!("{len} bytes for {count} entries")));
        }
        let mut crc = 0;
        let mut fences = Vec::with_capacity(count as usize / BLOCK + 1);
        let mut blocks: Vec<u32> = Vec::with_capacity(count as usize / BLOCK + 1);
        let mut b = [0u8; ENTRY];
        let mut last: Option<u128> = None;
        for i in 0..count {
            r.read_exact(&mut b).map_err(io(path))?;
            crc = crc32c::crc32c_append(crc, &b);
            let e = Entry {
                hash: u128::from_le_bytes(b[..16].try_into().expect("16 bytes")),
                clock: i64::from_le_bytes(b[16..].try_into().expect("8 bytes")),
            };
            if last.is_some_and(|l| l >= e.hash) {
                return Err(bad(format!("entry {i} is out of order")));
            }
            last = Some(e.hash);
            if i % BLOCK as u64 == 0 {
                fences.push(e.hash);
                blocks.push(0);
            }
            let block = blocks.last_mut().expect("a block");
            *block = crc32c::crc32c_append(*block, &b);
            each(e);
        }
        crc = crc32c::crc32c_append(crc, &header);
        let mut t = [0u8; 4];
        r.read_exact(&mut t).map_err(io(path))?;
        if u32::from_le_bytes(t) != crc {
            return Err(bad("checksum mismatch".into()));
        }
        Ok(Run {
            path: path.to_path_buf(),
            count,
            fences,
            blocks,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Bytes its fences take in memory.
    pub fn memory(&self) -> usize {
        self.fences.capacity() * 16 + self.blocks.capacity() * 4
    }

    /// The clock of `hash`'s latest occurrence in this run, if it has one.
    pub fn get(&self, hash: u128) -> Result<Option<i64>, KeyError> {
        let block = self.fences.partition_point(|&f| f <= hash);
        if block == 0 {
            return Ok(None);
        }
        let first = (block - 1) * BLOCK;
        let n = BLOCK.min(self.count as usize - first);
        let mut buf = vec![0u8; n * ENTRY];
        let f = File::open(&self.path).map_err(io(&self.path))?;
        f.read_exact_at(&mut buf, (HEADER + first * ENTRY) as u64)
            .map_err(io(&self.path))?;
        if crc32c::crc32c(&buf) != self.blocks[block - 1] {
            return Err(KeyError::BadRun {
                path: self.path.clone(),
                why: format!("block {} does not match its checksum", block - 1),
            });
        }
        let at = |i: usize| {
            let b = &buf[i * ENTRY..(i + 1) * ENTRY];
            Entry {
                hash: u128::from_le_bytes(b[..16].try_into().expect("16 bytes")),
                clock: i64::from_le_bytes(b[16..].try_into().expect("8 bytes")),
            }
        };
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let e = at(mid);
            match e.hash.cmp(&hash) {
                std::cmp::Ordering::Equal => return Ok(Some(e.clock)),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        Ok(None)
    }

    /// Every entry, in order (expiring a run reads it once).
    pub fn scan(&self, each: impl FnMut(Entry)) -> Result<(), KeyError> {
        Run::open(&self.path, each).map(|_| ())
    }

    /// Merges `runs` into one run at `path` (a key in several keeps its
    /// latest clock), reading each once, in order.
    pub fn merge(runs: &[Run], path: &Path) -> Result<Run, KeyError> {
        // Runs are small next to memory only at the start; merge by streams.
        let mut readers = runs
            .iter()
            .map(Stream::open)
            .collect::<Result<Vec<_>, _>>()?;
        let mut heads: Vec<Option<Entry>> = readers
            .iter_mut()
            .map(Stream::next)
            .collect::<Result<_, _>>()?;
        let mut w = Writer::create(path)?;
        while let Some(min) = heads.iter().flatten().map(|e| e.hash).min() {
            let mut clock = i64::MIN;
            for (h, r) in heads.iter_mut().zip(readers.iter_mut()) {
                if let Some(e) = *h
                    && e.hash == min
                {
                    clock = clock.max(e.clock);
                    *h = r.next()?;
                }
            }
            w.push(Entry { hash: min, clock })?;
        }
        w.finish()
    }
}

/// A run read in order; its checksum is checked when its last entry is read.
struct Stream<'a> {
    run: &'a Run,
    r: BufReader<File>,
    left: u64,
    crc: u32,
    header: [u8; HEADER],
}

impl<'a> Stream<'a> {
    fn open(run: &'a Run) -> Result<Stream<'a>, KeyError> {
        let f = File::open(&run.path).map_err(io(&run.path))?;
        let mut r = BufReader::with_capacity(1 << 16, f);
        let mut header = [0u8; HEADER];
        r.read_exact(&mut header).map_err(io(&run.path))?;
        Ok(Stream {
            run,
            r,
            left: run.count,
            crc: 0,
            header,
        })
    }

    fn next(&mut self) -> Result<Option<Entry>, KeyError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let mut b = [0u8; ENTRY];
        self.r.read_exact(&mut b).map_err(io(&self.run.path))?;
        self.crc = crc32c::crc32c_append(self.crc, &b);
        if self.left == 0 {
            let crc = crc32c::crc32c_append(self.crc, &self.header);
            let mut t = [0u8; 4];
            self.r.read_exact(&mut t).map_err(io(&self.run.path))?;
            if u32::from_le_bytes(t) != crc {
                return Err(KeyError::BadRun {
                    path: self.run.path.clone(),
                    why: "checksum mismatch".into(),
                });
            }
        }
        Ok(Some(Entry {
            hash: u128::from_le_bytes(b[..16].try_into().expect("16 bytes")),
            clock: i64::from_le_bytes(b[16..].try_into().expect("8 bytes")),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(keys: impl IntoIterator<Item = (u128, i64)>) -> Vec<Entry> {
        let mut v: Vec<Entry> = keys
            .into_iter()
            .map(|(hash, clock)| Entry { hash, clock })
            .collect();
        v.sort();
        v.dedup_by_key(|e| e.hash);
        v
    }

    #[test]
    fn a_run_finds_every_key_it_holds_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let want = entries((0..5_000u128).map(|k| (k * 7919 * (1 << 70) + k, k as i64)));
        let run = Run::write(&dir.path().join("a.run"), &want).unwrap();
        for e in &want {
            assert_eq!(
                run.get(e.hash).unwrap(),
                Some(e.clock),
                "{e:?} is in the run"
            );
            assert_eq!(run.get(e.hash + 1).unwrap(), None, "{} is not", e.hash + 1);
        }
        let mut read = Vec::new();
        Run::open(run.path(), |e| read.push(e)).unwrap();
        assert_eq!(read, want, "reading it back gives what was written");
    }

    #[test]
    fn merging_keeps_each_keys_latest_clock_and_a_damaged_run_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Run::write(
            &dir.path().join("a.run"),
            &entries([(1, 10), (3, 10), (5, 10)]),
        )
        .unwrap();
        let b = Run::write(&dir.path().join("b.run"), &entries([(3, 20), (4, 20)])).unwrap();
        let m = Run::merge(&[a, b], &dir.path().join("m.run")).unwrap();
        let mut read = Vec::new();
        Run::open(m.path(), |e| read.push((e.hash, e.clock))).unwrap();
        assert_eq!(read, vec![(1, 10), (3, 20), (4, 20), (5, 10)]);
        assert_eq!(m.get(3).unwrap(), Some(20));

        let mut bytes = std::fs::read(m.path()).unwrap();
        bytes[HEADER + 3] ^= 1;
        std::fs::write(m.path(), bytes).unwrap();
        let err = m.get(3).unwrap_err();
        assert!(
            matches!(err, KeyError::BadRun { .. }),
            "a lookup finds a bit flipped after the run was opened: {err}"
        );
        let err = Run::open(m.path(), |_| {}).unwrap_err();
        assert!(
            matches!(err, KeyError::BadRun { .. }),
            "a flipped bit is found: {err}"
        );
    }
}
