//! What a stat says about a file's contents, cheaply: the certificate
//! watch compares these to see a renewed file without reading it.

use std::path::Path;

/// Device, inode, size and modification time of a file (following
/// symlinks, so a swapped link changes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl FileStamp {
    /// `None` when the file cannot be looked at (missing for a moment
    /// during a swap).
    pub fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}
