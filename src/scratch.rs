//! Per-thread scratch buffers for the data path. A connection reads into
//! its thread's buffer and passes the bytes on before it returns, so an
//! idle connection (most of a device fleet) holds no buffer at all; only
//! bytes that could not move at once are copied out into the connection.
//!
//! Each buffer is borrowed for one synchronous step and never across an
//! await. A step that holds one buffer may poll a stream that borrows
//! another (the relay reads from a TLS stream, which reads into its own
//! buffer), never the same one: borrowing it twice panics, loudly, instead
//! of mixing two connections' bytes.

use std::cell::RefCell;
use std::thread::LocalKey;

/// The size of the read buffers: one full TLS record, so bulk transfers
/// move whole records.
pub const CHUNK: usize = 16 * 1024;

/// One per-thread buffer; see the module docs.
pub struct Scratch(&'static LocalKey<RefCell<Vec<u8>>>);

impl Scratch {
    /// Run `f` with this thread's buffer. Read buffers are `CHUNK` bytes
    /// long; the others start empty and keep the capacity they grew to.
    #[inline]
    pub fn with<R>(&'static self, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        self.0.with_borrow_mut(f)
    }
}

thread_local! {
    static PUMP_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; CHUNK]);
    static TLS_READ_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; CHUNK]);
    static TLS_WRITE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static TLS_GATHER_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The byte pumps' read buffer (l4/way.rs between sockets, l4/relay.rs
/// between any streams). One for both: neither calls the other.
pub static PUMP: Scratch = Scratch(&PUMP_BUF);
/// Received TLS bytes on their way through rustls (tls/server_stream.rs).
pub static TLS_READ: Scratch = Scratch(&TLS_READ_BUF);
/// Encrypted records on their way to the socket.
pub static TLS_WRITE: Scratch = Scratch(&TLS_WRITE_BUF);
/// Plaintext gathered from a vectored write, so that it becomes one record
/// rather than one per slice.
pub static TLS_GATHER: Scratch = Scratch(&TLS_GATHER_BUF);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_buffers_are_a_record_long_and_others_start_empty() {
        assert_eq!(PUMP.with(|b| b.len()), CHUNK);
        assert_eq!(TLS_READ.with(|b| b.len()), CHUNK);
        assert!(TLS_WRITE.with(|b| b.is_empty()));
        TLS_GATHER.with(|b| b.extend_from_slice(b"kept"));
        assert!(TLS_GATHER.with(|b| b.capacity() >= 4));
    }

    #[test]
    fn two_buffers_can_be_held_at_once_but_not_one_twice() {
        PUMP.with(|_| TLS_READ.with(|_| ()));
        let twice = std::panic::catch_unwind(|| PUMP.with(|_| PUMP.with(|_| ())));
        assert!(twice.is_err());
    }
}
