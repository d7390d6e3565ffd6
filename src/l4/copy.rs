//! One direction of the pump through a user-space buffer: the portable
//! path, and the one used when splice is turned off.

use std::io;

use tokio::net::TcpStream;

use super::{shutdown_write, Progress};

const BUF: usize = 16 * 1024;

pub(super) async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    progress: &Progress<'_>,
) -> io::Result<()> {
    loop {
        from.readable().await?;
        if move_ready(from, to, progress).await? {
            return Ok(());
        }
    }
}

/// Move what `from` has ready, until it would block. Returns true once
/// `from` reached end-of-stream (the FIN has then been passed on). Also
/// the splice path's fallback when it cannot get a pipe.
pub(super) async fn move_ready(
    from: &TcpStream,
    to: &TcpStream,
    progress: &Progress<'_>,
) -> io::Result<bool> {
    // The buffer lives only while bytes flow: an idle connection holds no
    // buffer memory.
    let mut buf = vec![0u8; BUF];
    loop {
        match from.try_read(&mut buf) {
            Ok(0) => return shutdown_write(to).map(|()| true),
            Ok(n) => write_all(to, &buf[..n], progress).await?,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8], progress: &Progress<'_>) -> io::Result<()> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                data = &data[n..];
                progress.add(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
