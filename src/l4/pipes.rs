//! A per-thread pool of empty pipes. A connection takes a pipe only while
//! bytes are moving and gives it back as soon as its socket would block, so
//! idle connections (most of a device fleet) hold no pipe descriptors and
//! the two pipe fds are not paid per connection. Per thread because a
//! connection lives on one worker thread: taking and giving back is then a
//! plain push and pop, with no lock shared between workers.

use std::cell::RefCell;
use std::io;

use super::splice::Pipe;

/// Bytes moved per splice call: the pipe's capacity.
pub const CHUNK: usize = 256 * 1024;

/// Idle pipes kept for reuse per thread; beyond this they are closed.
const KEEP: usize = 128;

thread_local! {
    static IDLE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

pub fn take() -> io::Result<Pipe> {
    if let Some(p) = IDLE.with(|idle| idle.borrow_mut().pop()) {
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
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        if idle.len() < KEEP {
            idle.push(p);
        }
    });
}
