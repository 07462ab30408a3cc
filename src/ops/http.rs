//! The HTTP/1.1 endpoint: `/healthz`, `/readyz`, `/metrics` on a thread of its own with its
//! own current-thread runtime, a task per connection (at most [`MAX_CONNECTIONS`], each bounded
//! in size and time). One request per connection; it never touches the network beyond its own
//! listener.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::process::render_process;
use super::proxy_metrics::render_proxy;
use super::state::Ops;

// ----------------------------------------------------------------------------------------------
// HTTP
/// Largest request head we read; anything longer is refused with 431.
pub const MAX_REQUEST: usize = 8 * 1024;

/// Time a client has to send its request head, and to take the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections served at once; one more is closed at once (and counted at debug level). Each
/// lives at most 2 x [`IO_TIMEOUT`], so slow clients cannot hold up a health probe: every
/// connection is its own task, none waits for another.
pub const MAX_CONNECTIONS: usize = 512;

/// A running endpoint. Dropping it (or [`Server::shutdown`]) stops the thread.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Bind `addr` (e.g. `127.0.0.1:10551`) and serve `ops` from a new thread.
    pub fn start(addr: SocketAddr, ops: Arc<Ops>) -> io::Result<Server> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("metrics address {addr}: cannot listen: {e}")))?;
        Server::serve(listener, ops)
    }

    /// Serve on an already bound listener (tests bind port 0).
    pub fn serve(listener: TcpListener, ops: Arc<Ops>) -> io::Result<Server> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        listener.set_nonblocking(true)?;
        // Its own thread and single-threaded runtime: a slow scrape never touches the proxy loop.
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
        let thread = std::thread::Builder::new().name("ops-http".into()).spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return log::error!("ops endpoint: {e}"),
                };
                let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                loop {
                    let conn = listener.accept().await;
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    match conn {
                        Ok((stream, peer)) => {
                            if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                                log::debug!("ops endpoint: {MAX_CONNECTIONS} connections open; closed {peer}");
                                continue;
                            }
                            active.fetch_add(1, Ordering::Relaxed);
                            let (ops, active) = (ops.clone(), active.clone());
                            tokio::spawn(async move {
                                match tokio::time::timeout(2 * IO_TIMEOUT, handle(stream, &ops)).await {
                                    Ok(Err(e)) => log::debug!("ops endpoint: {peer}: {e}"),
                                    Err(_) => log::debug!("ops endpoint: {peer}: too slow to take the answer"),
                                    Ok(Ok(())) => {}
                                }
                                active.fetch_sub(1, Ordering::Relaxed);
                            });
                        }
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            log::warn!("ops endpoint: accept: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            })
        })?;
        Ok(Server { addr, stop, thread: Some(thread) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting and join the thread.
    pub fn shutdown(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept with a connection of our own.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_thread();
        }
    }
}

/// A parsed request line.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
}

/// Parse the head (up to and without the blank line). `Err` carries status and reason.
pub fn parse_head(head: &str) -> Result<Request<'_>, (u16, &'static str)> {
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err((400, "malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err((400, "only HTTP/1.x is spoken here"));
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    Ok(Request { method, path })
}

/// The response for a request: status, content type, body.
fn route(req: &Request<'_>, ops: &Ops) -> (u16, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method != "GET" && req.method != "HEAD" {
        return (405, TEXT, "only GET and HEAD\n".into());
    }
    match req.path {
        // kube-proxy's contract: unhealthy when an update has been queued but not applied for
        // longer than the timeout; /healthz answers JSON.
        "/healthz" => {
            let h = ops.health.freshness(std::time::SystemTime::now());
            let body = format!(
                "{{\"lastUpdated\": \"{}\", \"currentTime\": \"{}\", \"nodeEligible\": true}}\n",
                h.last_updated, h.current_time
            );
            (if h.stale { 503 } else { 200 }, "application/json", body)
        }
        "/livez" => match ops.health.freshness(std::time::SystemTime::now()) {
            h if h.stale => (503, TEXT, format!("stale: a rules update has waited since {}\n", h.last_queued)),
            _ => (200, TEXT, "ok\n".into()),
        },
        "/readyz" => match ops.health.ready() {
            Ok(()) if ops.health.serving_cache() => {
                (200, TEXT, "ready: serving the offline cache (the source has not synced since the start)\n".into())
            }
            Ok(()) => (200, TEXT, "ready\n".into()),
            Err(why) => (503, TEXT, format!("not ready: {why}\n")),
        },
        "/metrics" => {
            let mut text = ops.metrics.registry.render();
            render_proxy(&ops.proxy, &mut text);
            render_process(&mut text);
            (200, "text/plain; version=0.0.4; charset=utf-8", text)
        }
        _ => (404, TEXT, "not found; try /healthz, /readyz or /metrics\n".into()),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Read one request head with a size and a time bound.
async fn read_head(stream: &mut tokio::net::TcpStream) -> Result<String, (u16, &'static str)> {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return String::from_utf8(buf).map_err(|_| (400, "request head is not UTF-8"));
        }
        // Some clients (and people with nc) end lines with a bare LF.
        if let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            buf.truncate(end);
            return String::from_utf8(buf).map_err(|_| (400, "request head is not UTF-8"));
        }
        if buf.len() >= MAX_REQUEST {
            return Err((431, "request head too large"));
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return Err((408, "request head not received in time")),
            Ok(Ok(0)) => return Err((400, "connection closed before the request head ended")),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => return Err((400, "read error")),
        }
    }
}

async fn handle(mut stream: tokio::net::TcpStream, ops: &Ops) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let (status, ctype, body, head_only) = match read_head(&mut stream).await {
        Ok(head) => match parse_head(&head) {
            Ok(req) => {
                let (s, c, b) = route(&req, ops);
                (s, c, b, req.method == "HEAD")
            }
            Err((s, why)) => (s, "text/plain; charset=utf-8", format!("{why}\n"), false),
        },
        Err((s, why)) => (s, "text/plain; charset=utf-8", format!("{why}\n"), false),
    };
    let mut resp = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    if !head_only {
        resp.push_str(&body);
    }
    stream.write_all(resp.as_bytes()).await?;
    let _ = stream.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(parse_head("GET /metrics?x=1 HTTP/1.1\r\nHost: a"), Ok(Request { method: "GET", path: "/metrics" }));
        assert_eq!(parse_head("GET /metrics").unwrap_err().0, 400);
        assert_eq!(parse_head("GET / HTTP/2 extra").unwrap_err().0, 400);
        assert_eq!(parse_head("GET / SPDY/3").unwrap_err().0, 400);
        assert_eq!(parse_head("").unwrap_err().0, 400);
    }
}
