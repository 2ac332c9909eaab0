//! A TCP proxy in front of the throw-away PostgreSQL server that holds every
//! chunk of bytes for a fixed time in each direction, so the bench can show
//! how the store behaves with a database on another host
//! (`ALLOT_BENCH_PG_DELAY_US`). Loopback has no such knob here: the kernel's
//! `netem` queueing discipline is not available on this machine.
//!
//! Chunks keep their order and are released at `read time + delay`, so the
//! delay adds latency without limiting throughput. tokio's timer has 1 ms
//! resolution: a delay below 1 ms is rounded up to the next tick, so the
//! round trip added is 2–4 ms whatever smaller value is asked for; the bench
//! prints the delay it was given, and BENCHMARKS.md states what was measured.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Starts the proxy for the server listening on `127.0.0.1:{port}` and
/// returns the port it listens on. It runs until the runtime ends.
pub async fn start(port: u16, delay: Duration) -> std::io::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let mine = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(("127.0.0.1", port)).await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            relay(client_read, server_write, delay);
            relay(server_read, client_write, delay);
        }
    });
    Ok(mine)
}

/// Copies `from` to `to`, each chunk `delay` after it was read.
fn relay(
    mut from: impl AsyncRead + Unpin + Send + 'static,
    mut to: impl AsyncWrite + Unpin + Send + 'static,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0
                || tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
            {
                break;
            }
        }
    });
    tokio::spawn(async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    });
}
