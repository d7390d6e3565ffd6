//! The only `unsafe` in fleetgate: pipe2(2), splice(2) and fcntl(2) for
//! moving bytes between sockets without copying them into user space.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A kernel pipe used as the in-kernel buffer between two sockets.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid, writable array of two c_ints, which is
        // exactly what pipe2 expects; it writes both only on success.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: on success pipe2 returned two new descriptors that nothing
        // else owns; wrapping them makes this Pipe their only owner.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { read, write })
    }

    /// Ask for a pipe buffer of `bytes`; returns the size granted.
    pub fn set_capacity(&self, bytes: usize) -> io::Result<usize> {
        // SAFETY: F_SETPIPE_SZ takes an int argument and only acts on the
        // descriptor, which is open for the lifetime of `self`.
        let rc = unsafe {
            libc::fcntl(
                self.write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                bytes as libc::c_int,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc as usize)
        }
    }

    /// Move up to `len` bytes from `socket` into the pipe.
    pub fn fill_from(&self, socket: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        splice(socket, self.write.as_fd(), len)
    }

    /// Move up to `len` bytes from the pipe into `socket`.
    pub fn drain_to(&self, socket: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        splice(self.read.as_fd(), socket, len)
    }
}

fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are borrowed, so they stay open for the call;
    // null offsets are required for pipes and sockets; the kernel reads and
    // writes no user memory here.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
