//! A local syslog receiver for HAProxy's request log: a UDP socket on
//! 127.0.0.1 drained by a thread that counts the datagrams (one per log
//! line), so the bench can check that every request was logged.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use anyhow::Result;

use crate::procs::free_port;

pub struct SyslogSink {
    pub port: u16,
    received: Arc<AtomicU64>,
}

impl SyslogSink {
    /// Binds the socket and starts the draining thread; it lives as long
    /// as the bench process.
    pub fn start() -> Result<SyslogSink> {
        let port = free_port()?;
        let socket = UdpSocket::bind(("127.0.0.1", port))?;
        // A burst of log lines while the thread is descheduled must not
        // overflow the default ~200 KiB receive buffer.
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(8 << 20);
        let received = Arc::new(AtomicU64::new(0));
        let count = received.clone();
        thread::Builder::new()
            .name("syslog sink".into())
            .spawn(move || {
                let mut buf = [0u8; 65536];
                while socket.recv(&mut buf).is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })?;
        Ok(SyslogSink { port, received })
    }

    /// The count of datagrams received, shared with its readers.
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.received.clone()
    }
}
