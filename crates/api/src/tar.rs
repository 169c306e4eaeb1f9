//! A small POSIX tar (ustar + pax) writer for archives built on the fly: the caller writes
//! [`header`] before each file's bytes, [`padding`] after them, and [`END`] at the end, so a
//! whole model is streamed file by file without ever being held in memory. [`archive_len`]
//! gives the exact archive size up front (for `Content-Length`).
//!
//! Names that do not fit ustar's 100 + 155 bytes and sizes of 8 GiB or more get a pax extended
//! header (`path=` / `size=` records), which GNU tar, bsdtar and Python's `tarfile` read.

/// Tar block size.
pub const BLOCK: usize = 512;

/// The end-of-archive marker: two zero blocks.
pub const END: [u8; 2 * BLOCK] = [0u8; 2 * BLOCK];

/// Largest size the 11-digit octal `size` field holds.
const MAX_OCTAL_SIZE: u64 = 0o77_777_777_777;

/// One regular file of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `/`-separated relative name.
    pub name: String,
    pub size: u64,
    /// Modification time, Unix seconds.
    pub mtime: u64,
}

/// Zero bytes after `size` bytes of content, up to the next block boundary.
pub fn padding(size: u64) -> usize {
    let rem = (size % BLOCK as u64) as usize;
    if rem == 0 {
        0
    } else {
        BLOCK - rem
    }
}

/// The header block(s) written before an entry's content.
pub fn header(entry: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLOCK);
    let split = split_name(&entry.name);
    let big = entry.size > MAX_OCTAL_SIZE;
    if split.is_none() || big {
        let mut records = String::new();
        if split.is_none() {
            records.push_str(&pax_record("path", &entry.name));
        }
        if big {
            records.push_str(&pax_record("size", &entry.size.to_string()));
        }
        let pax_name = format!("PaxHeaders/{}", truncate(&entry.name, 80));
        let pax = Entry {
            name: pax_name,
            size: records.len() as u64,
            mtime: entry.mtime,
        };
        out.extend_from_slice(&ustar_block(&pax, b'x'));
        out.extend_from_slice(records.as_bytes());
        out.resize(out.len() + padding(records.len() as u64), 0);
    }
    out.extend_from_slice(&ustar_block(entry, b'0'));
    out
}

/// The exact size of an archive of `entries`.
pub fn archive_len(entries: &[Entry]) -> u64 {
    entries
        .iter()
        .map(|e| header(e).len() as u64 + e.size + padding(e.size) as u64)
        .sum::<u64>()
        + END.len() as u64
}

/// A pax record `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
fn pax_record(key: &str, value: &str) -> String {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    format!("{len} {key}={value}\n")
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `(prefix, name)` for ustar, or `None` when the name needs a pax header.
fn split_name(name: &str) -> Option<(&str, &str)> {
    if name.len() <= 100 {
        return Some(("", name));
    }
    for (i, _) in name.match_indices('/') {
        let (prefix, rest) = (&name[..i], &name[i + 1..]);
        if prefix.len() <= 155 && !rest.is_empty() && rest.len() <= 100 {
            return Some((prefix, rest));
        }
    }
    None
}

fn put(block: &mut [u8], at: usize, len: usize, bytes: &[u8]) {
    let n = bytes.len().min(len);
    block[at..at + n].copy_from_slice(&bytes[..n]);
}

/// `value` as `len - 1` octal digits and a NUL.
fn octal(block: &mut [u8], at: usize, len: usize, value: u64) {
    let s = format!("{value:0width$o}", width = len - 1);
    put(block, at, len - 1, s.as_bytes());
}

fn ustar_block(entry: &Entry, kind: u8) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    let (prefix, name) = split_name(&entry.name).unwrap_or(("", truncate(&entry.name, 100)));
    put(&mut b, 0, 100, name.as_bytes());
    octal(&mut b, 100, 8, 0o644);
    octal(&mut b, 108, 8, 0);
    octal(&mut b, 116, 8, 0);
    octal(&mut b, 124, 12, entry.size.min(MAX_OCTAL_SIZE));
    octal(&mut b, 136, 12, entry.mtime.min(MAX_OCTAL_SIZE));
    b[156] = kind;
    put(&mut b, 257, 6, b"ustar\0");
    put(&mut b, 263, 2, b"00");
    put(&mut b, 265, 32, b"tuna");
    put(&mut b, 297, 32, b"tuna");
    put(&mut b, 345, 155, prefix.as_bytes());
    b[148..156].fill(b' ');
    let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
    let s = format!("{sum:06o}\0 ");
    put(&mut b, 148, 8, s.as_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(b: &[u8], at: usize, len: usize) -> String {
        let raw = &b[at..at + len];
        let end = raw.iter().position(|&c| c == 0).unwrap_or(len);
        String::from_utf8_lossy(&raw[..end]).trim().to_string()
    }

    #[test]
    fn short_names_are_one_ustar_block() {
        let e = Entry {
            name: "config.json".into(),
            size: 700,
            mtime: 1_700_000_000,
        };
        let h = header(&e);
        assert_eq!(h.len(), BLOCK);
        assert_eq!(field(&h, 0, 100), "config.json");
        assert_eq!(u64::from_str_radix(&field(&h, 124, 12), 8).unwrap(), 700);
        assert_eq!(&h[257..263], b"ustar\0");
        let stored = u32::from_str_radix(&field(&h, 148, 7), 8).unwrap();
        let mut copy = h.clone();
        copy[148..156].fill(b' ');
        assert_eq!(stored, copy.iter().map(|&x| u32::from(x)).sum::<u32>());
        assert_eq!(padding(700), 324);
        assert_eq!(padding(1024), 0);
        assert_eq!(archive_len(&[e]), 512 + 1024 + 1024);
    }

    #[test]
    fn long_names_use_prefix_or_pax() {
        let mid = format!("{}/{}", "d".repeat(120), "f".repeat(50));
        let h = header(&Entry {
            name: mid.clone(),
            size: 1,
            mtime: 0,
        });
        assert_eq!(h.len(), BLOCK);
        assert_eq!(field(&h, 345, 155), "d".repeat(120));
        let long = "x".repeat(300);
        let h = header(&Entry {
            name: long.clone(),
            size: 1,
            mtime: 0,
        });
        assert_eq!(h[156], b'x');
        assert_eq!(h.len(), 3 * BLOCK);
        let text = String::from_utf8_lossy(&h[BLOCK..2 * BLOCK]);
        let record = pax_record("path", &long);
        assert!(text.starts_with(&record));
        let (len, _) = record.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), record.len());
    }

    #[test]
    fn huge_sizes_get_a_pax_size() {
        let h = header(&Entry {
            name: "model.safetensors".into(),
            size: 10 << 30,
            mtime: 0,
        });
        assert!(String::from_utf8_lossy(&h[BLOCK..2 * BLOCK]).contains(" size=10737418240\n"));
    }
}
