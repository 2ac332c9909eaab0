//! A client of `allot serve`: one HTTP/1.1 keep-alive connection, one
//! request at a time, written and parsed in the calling task.
//!
//! Hand-written on purpose, like the RESP client of [`crate::redis_client`]:
//! the issue asks for a load generator as lean as Redis's, and hyper's
//! client runs each connection in a task of its own behind a channel, two
//! task wake-ups per request that cost the load generator about twice the
//! CPU of the Redis client on the two cores it shares with the server.
//! Responses are parsed with `httparse` (hyper's own parser); only what
//! `allot serve` sends is supported: a `Content-Length` body.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use hyper::header::HeaderValue;
use hyper::{Method, StatusCode, Uri};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::driver::{Client, OpError};

/// Largest value of the benchmark pool: a range pool `1..=2^40`.
pub const POOL_HI: u64 = 1 << 40;

/// Largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Largest response body accepted.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// What each operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Claim with a key never used before (`{"key": ...}`): one request.
    Claim,
    /// Claim any value (`{}`), keep it: one request. The like-for-like of
    /// Redis's SPOP, which binds no key either.
    ClaimAny,
    /// Claim any value (`{}`), then release it by value: two requests.
    ClaimRelease,
}

/// Where the server is and how to talk to it.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    host: HeaderValue,
    auth: Option<HeaderValue>,
}

impl Target {
    /// `addr` to connect to, `host` for the Host header, and an optional
    /// bearer token.
    pub fn new(addr: SocketAddr, host: &str, token: Option<&str>) -> Result<Target, String> {
        let host = HeaderValue::from_str(host).map_err(|e| format!("host {host:?}: {e}"))?;
        let auth = token
            .map(|t| {
                HeaderValue::from_str(&format!("Bearer {t}")).map_err(|e| format!("token: {e}"))
            })
            .transpose()?;
        Ok(Target { addr, host, auth })
    }
}

/// One connection to the server.
pub struct Conn {
    target: Target,
    stream: Option<TcpStream>,
    /// The request being written, reused.
    out: Vec<u8>,
    /// What was read from the server and not used yet.
    buf: Vec<u8>,
}

fn transport(what: &str, e: impl std::fmt::Display) -> OpError {
    OpError::Transport(format!("{what}: {e}"))
}

/// A parsed response head: status, body length, and whether the server
/// closes the connection after it.
struct Head {
    status: StatusCode,
    len: usize,
    head_len: usize,
    close: bool,
}

/// Parses the response head at the start of `buf`; `Ok(None)` when more
/// bytes are needed.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, OpError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => {
            return Err(OpError::Answer(format!(
                "response head longer than {MAX_HEAD} bytes"
            )))
        }
        Err(e) => return Err(transport("parsing the response", e)),
    };
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| transport("parsing the response", "no status"))?;
    let mut len = None;
    let mut close = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| transport("parsing the response", "bad Content-Length"))?;
            len = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(OpError::Answer(
                "chunked responses are not supported by this load generator".into(),
            ));
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.eq_ignore_ascii_case(b"close");
        }
    }
    let len = len.ok_or_else(|| transport("parsing the response", "no Content-Length"))?;
    if len > MAX_BODY {
        return Err(OpError::Answer(format!("response body of {len} bytes")));
    }
    Ok(Some(Head {
        status,
        len,
        head_len,
        close,
    }))
}

impl Conn {
    /// A connection, opened at the first request.
    pub fn new(target: Target) -> Conn {
        Conn {
            target,
            stream: None,
            out: Vec::with_capacity(512),
            buf: Vec::with_capacity(4096),
        }
    }

    async fn connect(&self) -> Result<TcpStream, OpError> {
        let stream = TcpStream::connect(self.target.addr)
            .await
            .map_err(|e| transport("connect", e))?;
        stream
            .set_nodelay(true)
            .map_err(|e| transport("TCP_NODELAY", e))?;
        Ok(stream)
    }

    /// Sends one request and reads the whole answer. A transport error
    /// drops the connection so the next request opens a new one.
    pub async fn request(
        &mut self,
        method: Method,
        uri: Uri,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), OpError> {
        let r = self.request_inner(method, uri, body).await;
        match &r {
            Err(OpError::Transport(_)) | Ok((_, _, true)) => {
                self.stream = None;
                self.buf.clear();
            }
            _ => {}
        }
        r.map(|(status, body, _)| (status, body))
    }

    async fn request_inner(
        &mut self,
        method: Method,
        uri: Uri,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes, bool), OpError> {
        if self.stream.is_none() {
            self.stream = Some(self.connect().await?);
            self.buf.clear();
        }
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(self.target.host.as_bytes());
        out.extend_from_slice(b"\r\ncontent-type: application/json\r\n");
        if let Some(a) = &self.target.auth {
            out.extend_from_slice(b"authorization: ");
            out.extend_from_slice(a.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
        out.extend_from_slice(&body);
        let Some(stream) = self.stream.as_mut() else {
            return Err(OpError::Transport("no connection".into()));
        };
        stream
            .write_all(out)
            .await
            .map_err(|e| transport("sending the request", e))?;
        let buf = &mut self.buf;
        let head = loop {
            if let Some(h) = parse_head(buf)? {
                break h;
            }
            read_more(stream, buf).await?;
        };
        let end = head.head_len + head.len;
        while buf.len() < end {
            read_more(stream, buf).await?;
        }
        let answer = Bytes::copy_from_slice(&buf[head.head_len..end]);
        buf.drain(..end);
        Ok((head.status, answer, head.close))
    }
}

/// Reads what the server sent next into `buf`; the end of the stream is a
/// transport error (an answer was still due).
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), OpError> {
    buf.reserve(4096);
    let n = stream
        .read_buf(buf)
        .await
        .map_err(|e| transport("reading the response", e))?;
    if n == 0 {
        return Err(OpError::Transport(
            "the server closed the connection".into(),
        ));
    }
    Ok(())
}

fn path(p: String) -> Result<Uri, String> {
    Uri::try_from(p.as_str()).map_err(|e| format!("path {p:?}: {e}"))
}

fn refused(status: StatusCode, body: &[u8]) -> OpError {
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    OpError::Answer(format!("HTTP {}: {}", status.as_u16(), text.trim()))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The first claimed value in an allocate answer (`"values":["N"`), as an
/// integer of the benchmark pool.
pub fn first_value(body: &[u8]) -> Option<u64> {
    const TAG: &[u8] = b"\"values\":[\"";
    let at = body.windows(TAG.len()).position(|w| w == TAG)? + TAG.len();
    let rest = &body[at..];
    let len = rest.iter().position(|&b| b == b'"')?;
    let v: u64 = std::str::from_utf8(&rest[..len]).ok()?.parse().ok()?;
    (1..=POOL_HI).contains(&v).then_some(v)
}

/// Creates the benchmark pool (a range pool `1..=2^40`) unless it exists.
/// Returns whether it was created.
pub async fn ensure_pool(conn: &mut Conn, pool: &str) -> Result<bool, OpError> {
    let body = format!(
        "{{\"name\":\"{pool}\",\"kind\":{{\"type\":\"range\",\"lo\":1,\"hi\":{POOL_HI}}}}}"
    );
    let uri = path("/v1/pools".into()).map_err(OpError::Answer)?;
    let (status, answer) = conn.request(Method::POST, uri, body.into()).await?;
    match status {
        StatusCode::CREATED => Ok(true),
        StatusCode::CONFLICT if contains(&answer, b"pool_exists") => Ok(false),
        s => Err(refused(s, &answer)),
    }
}

/// Waits until `/readyz` answers 200, for at most `timeout`.
pub async fn wait_ready(conn: &mut Conn, timeout: Duration) -> Result<(), OpError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let uri = path("/readyz".into()).map_err(OpError::Answer)?;
        let last = match conn.request(Method::GET, uri, Bytes::new()).await {
            Ok((StatusCode::OK, _)) => return Ok(()),
            Ok((s, body)) => refused(s, &body),
            Err(e) => e,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A benchmark client of one pool.
pub struct AllotClient {
    conn: Conn,
    workload: Workload,
    allocate: Uri,
    release: Uri,
    /// Unique per run and client: keys are `{prefix}{seq}`.
    key_prefix: String,
}

impl AllotClient {
    /// Client number `id` of run `run` (any string of `[A-Za-z0-9-]`, unique
    /// per run so keys are never reused across runs on the same pool).
    pub fn new(
        target: Target,
        pool: &str,
        workload: Workload,
        run: &str,
        id: usize,
    ) -> Result<AllotClient, String> {
        Ok(AllotClient {
            conn: Conn::new(target),
            workload,
            allocate: path(format!("/v1/pools/{pool}/allocate"))?,
            release: path(format!("/v1/pools/{pool}/release"))?,
            key_prefix: format!("{run}-{id}-"),
        })
    }

    async fn claim(&mut self, seq: u64) -> Result<u64, OpError> {
        let key = format!("{}{seq}", self.key_prefix);
        let body = format!("{{\"key\":\"{key}\"}}");
        let (status, answer) = self
            .conn
            .request(Method::POST, self.allocate.clone(), body.into())
            .await?;
        if status != StatusCode::OK {
            return Err(refused(status, &answer));
        }
        let value = first_value(&answer).ok_or_else(|| refused(status, &answer))?;
        // The claim must be bound to our key.
        if !contains(&answer, format!("\"key\":\"{key}\"").as_bytes()) {
            return Err(OpError::Answer(format!(
                "answer does not carry key {key}: {}",
                String::from_utf8_lossy(&answer)
            )));
        }
        Ok(value)
    }

    async fn claim_any(&mut self) -> Result<u64, OpError> {
        let (status, answer) = self
            .conn
            .request(
                Method::POST,
                self.allocate.clone(),
                Bytes::from_static(b"{}"),
            )
            .await?;
        if status != StatusCode::OK {
            return Err(refused(status, &answer));
        }
        first_value(&answer).ok_or_else(|| refused(status, &answer))
    }

    async fn claim_release(&mut self) -> Result<u64, OpError> {
        let value = self.claim_any().await?;
        let body = format!("{{\"value\":\"{value}\"}}");
        let (status, answer) = self
            .conn
            .request(Method::POST, self.release.clone(), body.into())
            .await?;
        if status != StatusCode::OK {
            return Err(refused(status, &answer));
        }
        if !contains(&answer, format!("\"value\":\"{value}\"").as_bytes()) {
            return Err(OpError::Answer(format!(
                "release answer is not for {value}: {}",
                String::from_utf8_lossy(&answer)
            )));
        }
        Ok(value)
    }
}

impl Client for AllotClient {
    async fn op(&mut self, seq: u64) -> Result<u64, OpError> {
        match self.workload {
            Workload::Claim => self.claim(seq).await,
            Workload::ClaimAny => self.claim_any().await,
            Workload::ClaimRelease => self.claim_release().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_first_value() {
        let body = br#"{"pool":"bench","values":["1234"],"claims":[{"value":"1234","key":"k"}]}"#;
        assert_eq!(first_value(body), Some(1234));
        assert_eq!(first_value(br#"{"values":["0"]}"#), None);
        assert_eq!(first_value(br#"{"values":["x"]}"#), None);
        assert_eq!(first_value(br#"{"values":[]}"#), None);
        assert_eq!(first_value(b"{}"), None);
        assert!(contains(body, b"\"key\":\"k\""));
        assert!(!contains(body, b""));
    }

    #[test]
    fn parses_response_heads() {
        let ok =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        let h = parse_head(ok).ok().flatten().expect("complete head");
        assert_eq!((h.status, h.len, h.close), (StatusCode::OK, 2, false));
        assert_eq!(&ok[h.head_len..], b"{}");
        assert!(matches!(parse_head(&ok[..20]), Ok(None)));
        let closing =
            b"HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        let h = parse_head(closing).ok().flatten().expect("complete head");
        assert_eq!((h.status, h.close), (StatusCode::PAYLOAD_TOO_LARGE, true));
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(matches!(parse_head(chunked), Err(OpError::Answer(_))));
        let no_len = b"HTTP/1.1 200 OK\r\n\r\n";
        assert!(matches!(parse_head(no_len), Err(OpError::Transport(_))));
        assert!(matches!(
            parse_head(b"garbage\r\n\r\n"),
            Err(OpError::Transport(_))
        ));
    }
}
