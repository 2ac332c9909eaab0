//! A client of `allot serve`: one HTTP/1.1 keep-alive connection (hyper's
//! connection-level client, no pool), one request at a time.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::driver::{Client, OpError};

/// Largest value of the benchmark pool: a range pool `1..=2^40`.
pub const POOL_HI: u64 = 1 << 40;

/// What each operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Claim with a key never used before (`{"key": ...}`): one request.
    Claim,
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
    sender: Option<SendRequest<Full<Bytes>>>,
}

fn transport(what: &str, e: impl std::fmt::Display) -> OpError {
    OpError::Transport(format!("{what}: {e}"))
}

impl Conn {
    /// A connection, opened at the first request.
    pub fn new(target: Target) -> Conn {
        Conn {
            target,
            sender: None,
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, OpError> {
        let stream = TcpStream::connect(self.target.addr)
            .await
            .map_err(|e| transport("connect", e))?;
        stream
            .set_nodelay(true)
            .map_err(|e| transport("TCP_NODELAY", e))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport("handshake", e))?;
        tokio::spawn(async move {
            // Ends when the sender is dropped or the connection breaks; the
            // next request then reports the error and reconnects.
            let _ = conn.await;
        });
        Ok(sender)
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
        if matches!(r, Err(OpError::Transport(_))) {
            self.sender = None;
        }
        r
    }

    async fn request_inner(
        &mut self,
        method: Method,
        uri: Uri,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), OpError> {
        let sender = match &mut self.sender {
            Some(s) => s,
            None => {
                let s = self.connect().await?;
                self.sender.insert(s)
            }
        };
        sender
            .ready()
            .await
            .map_err(|e| transport("connection", e))?;
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        let h = req.headers_mut();
        h.insert(HOST, self.target.host.clone());
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(a) = &self.target.auth {
            h.insert(AUTHORIZATION, a.clone());
        }
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| transport("request", e))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| transport("reading the body", e))?
            .to_bytes();
        Ok((status, body))
    }
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

    async fn claim_release(&mut self) -> Result<u64, OpError> {
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
        let value = first_value(&answer).ok_or_else(|| refused(status, &answer))?;
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
}
