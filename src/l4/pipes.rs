//! A process-wide pool of empty pipes. A connection takes a pipe only while
//! bytes are moving and gives it back as soon as its socket would block, so
//! idle connections (most of a device fleet) hold no pipe descriptors and
//! the two pipe fds are not paid per connection.

use std::io;
use std::sync::Mutex;

use super::splice::Pipe;

/// Bytes moved per splice call: the pipe's capacity.
pub const CHUNK: usize = 256 * 1024;

/// Idle pipes kept for reuse; beyond this they are closed.
const KEEP: usize = 256;

static IDLE: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

pub fn take() -> io::Result<Pipe> {
    if let Some(p) = IDLE.lock().unwrap_or_else(|e| e.into_inner()).pop() {
        return Ok(p);
    }
    let p = Pipe::new()?;
    // A larger pipe halves the syscalls per byte on bulk transfers; if the
    // system limit refuses it, the default 64 KiB still works.
    let _ = p.set_capacity(CHUNK);
    Ok(p)
}

/// Return a pipe that holds no data. A pipe with bytes in it must be
/// dropped instead, or another connection would receive them.
pub fn give(p: Pipe) {
    let mut idle = IDLE.lock().unwrap_or_else(|e| e.into_inner());
    if idle.len() < KEEP {
        idle.push(p);
    }
}
