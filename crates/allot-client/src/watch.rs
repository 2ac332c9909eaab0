//! The change stream: `GET /v1/watch` read as Server-Sent Events, resumed
//! after a dropped connection from the last revision seen + 1.

use std::collections::VecDeque;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use reqwest::Method;

use crate::error::{Error, Result};
use crate::{api_error, Client, ErrorBody, Event};

/// How [`Client::watch`] reconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchRetry {
    /// Failed connection attempts in a row before the stream ends with the
    /// last error. Receiving anything resets the count.
    pub max_retries: u32,
    /// Wait before the first retry; doubles with every failure.
    pub initial_backoff: Duration,
    /// Longest wait between retries.
    pub max_backoff: Duration,
    /// A stream silent for this long is taken for dead and reconnected (the
    /// server sends a keep-alive every 15 s).
    pub idle_timeout: Duration,
}

impl Default for WatchRetry {
    fn default() -> Self {
        WatchRetry {
            max_retries: 8,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(45),
        }
    }
}

impl WatchRetry {
    /// The wait before retry number `attempt` (1-based).
    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// One parsed SSE message.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Message {
    pub(crate) id: Option<String>,
    pub(crate) event: Option<String>,
    pub(crate) data: Option<String>,
}

/// Incremental SSE parser (the subset the server writes, read per the
/// spec: `field: value` lines, `:` comments, a blank line ends a message).
#[derive(Debug, Default)]
pub(crate) struct Parser {
    buf: Vec<u8>,
}

impl Parser {
    /// Feeds bytes; returns the messages completed by them.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Vec<Message> {
        // Line ends may be CRLF; the data itself is JSON, which escapes
        // control characters, so dropping every CR loses nothing.
        self.buf.extend(bytes.iter().filter(|&&b| b != b'\r'));
        let mut out = Vec::new();
        while let Some(end) = find(&self.buf, b"\n\n") {
            let block: Vec<u8> = self.buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&block);
            let mut msg = Message::default();
            let mut any = false;
            for line in text.lines() {
                if line.is_empty() || line.starts_with(':') {
                    continue;
                }
                let (field, value) = match line.split_once(':') {
                    Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                    None => (line, ""),
                };
                match field {
                    "id" => msg.id = Some(value.to_string()),
                    "event" => msg.event = Some(value.to_string()),
                    "data" => {
                        let d = msg.data.get_or_insert_with(String::new);
                        if !d.is_empty() {
                            d.push('\n');
                        }
                        d.push_str(value);
                    }
                    _ => continue,
                }
                any = true;
            }
            if any {
                out.push(msg);
            }
        }
        out
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The state of one watch across reconnections.
struct Watch {
    client: Client,
    /// The revision to start from when nothing was received yet (0: now).
    from: u64,
    /// The last revision the server named (an event's or the first
    /// message's id): resume after it.
    last: Option<u64>,
    resp: Option<reqwest::Response>,
    parser: Parser,
    pending: VecDeque<Result<Event>>,
    /// Failed attempts in a row.
    failures: u32,
    done: bool,
}

pub(crate) fn stream(client: Client, from: u64) -> BoxStream<'static, Result<Event>> {
    let w = Watch {
        client,
        from,
        last: None,
        resp: None,
        parser: Parser::default(),
        pending: VecDeque::new(),
        failures: 0,
        done: false,
    };
    futures::stream::unfold(w, |mut w| async move {
        let item = w.next().await?;
        Some((item, w))
    })
    .boxed()
}

impl Watch {
    async fn next(&mut self) -> Option<Result<Event>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                if item.is_err() {
                    self.done = true;
                    self.pending.clear();
                }
                return Some(item);
            }
            if self.done {
                return None;
            }
            let Some(resp) = self.resp.as_mut() else {
                if let Err(e) = self.connect().await {
                    self.fail(e).await;
                }
                continue;
            };
            let idle = self.client.retry.idle_timeout;
            match tokio::time::timeout(idle, resp.chunk()).await {
                Ok(Ok(Some(bytes))) => {
                    let messages = self.parser.feed(&bytes);
                    for m in messages {
                        self.accept(m);
                    }
                }
                // The server ended the stream (shutting down, say): resume.
                Ok(Ok(None)) => {
                    self.resp = None;
                    let url = self.client.base.to_string();
                    self.fail(Error::Transport {
                        url,
                        message: "the event stream ended".into(),
                    })
                    .await;
                }
                Ok(Err(e)) => {
                    self.resp = None;
                    let e = Error::transport(self.client.base.as_str(), &e);
                    self.fail(e).await;
                }
                Err(_) => {
                    self.resp = None;
                    let url = self.client.base.to_string();
                    self.fail(Error::Transport {
                        url,
                        message: format!("no data for {idle:?}"),
                    })
                    .await;
                }
            }
        }
    }

    /// Opens the stream where the last one left off.
    async fn connect(&mut self) -> Result<()> {
        let url = self.client.url(&["watch"])?;
        let mut rb = self.client.http.request(Method::GET, url);
        if let Some(t) = &self.client.token {
            rb = rb.bearer_auth(t);
        }
        rb = match self.last {
            Some(id) => rb.header("Last-Event-ID", id.to_string()),
            None => rb.query(&[("from", self.from)]),
        };
        let resp = rb
            .send()
            .await
            .map_err(|e| Error::transport(self.client.base.as_str(), &e))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.bytes().await.unwrap_or_default();
            return Err(api_error(status.as_u16(), &body));
        }
        self.parser = Parser::default();
        self.resp = Some(resp);
        Ok(())
    }

    /// Counts a failure: retryable ones wait and try again (up to the
    /// limit), others end the stream with the error.
    async fn fail(&mut self, e: Error) {
        self.resp = None;
        self.failures += 1;
        let retry = self.client.retry;
        if !e.is_retryable() || self.failures > retry.max_retries {
            self.pending.push_back(Err(e));
            return;
        }
        let wait = retry.backoff(self.failures);
        tracing::debug!(attempt = self.failures, ?wait, "watch: {e}; reconnecting");
        tokio::time::sleep(wait).await;
    }

    /// Handles one message: an event, the server's first (id-only)
    /// message, or an error that ends the stream.
    fn accept(&mut self, m: Message) {
        self.failures = 0;
        let id = m.id.as_deref().and_then(|i| i.trim().parse::<u64>().ok());
        match m.event.as_deref() {
            Some("error") => {
                let data = m.data.unwrap_or_default();
                let err = match serde_json::from_str::<ErrorBody>(&data) {
                    Ok(b) => Error::Api {
                        status: status_of(&b.error.code),
                        code: b.error.code,
                        message: b.error.message,
                    },
                    Err(_) => self.protocol(format!("malformed error event: {data}")),
                };
                self.pending.push_back(Err(err));
            }
            Some(_) => {
                let data = m.data.unwrap_or_default();
                let event: Event = match serde_json::from_str(&data) {
                    Ok(e) => e,
                    Err(e) => {
                        let err = self.protocol(format!("cannot decode event {data}: {e}"));
                        self.pending.push_back(Err(err));
                        return;
                    }
                };
                // A duplicate can only come from a server that resumed
                // wrongly; dropping it keeps the promise of no repeats.
                if self.last.is_some_and(|l| event.revision <= l) {
                    return;
                }
                self.last = Some(event.revision);
                self.pending.push_back(Ok(event));
            }
            None => {
                if let Some(id) = id {
                    self.last = Some(id);
                }
            }
        }
    }

    fn protocol(&self, message: String) -> Error {
        Error::Protocol {
            url: self.client.base.to_string(),
            message,
        }
    }
}

/// The HTTP status the server gives an error code when it answers with it
/// rather than streaming it.
fn status_of(code: &str) -> u16 {
    match code {
        "compacted" => 410,
        "invalid_argument" => 400,
        "unavailable" => 503,
        _ => 500,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_messages_split_anywhere() {
        let text = ": watching from revision 5\nid: 4\nretry: 1000\n\n:keep-alive\n\nid: 5\nevent: claims\ndata: {\"a\":1}\n\nid: 6\r\nevent: x\r\ndata:y\r\ndata: z\r\n\r\n";
        for split in 0..text.len() {
            let mut p = Parser::default();
            let mut got = p.feed(&text.as_bytes()[..split]);
            got.extend(p.feed(&text.as_bytes()[split..]));
            assert_eq!(
                got,
                [
                    Message {
                        id: Some("4".into()),
                        event: None,
                        data: None
                    },
                    Message {
                        id: Some("5".into()),
                        event: Some("claims".into()),
                        data: Some("{\"a\":1}".into())
                    },
                    Message {
                        id: Some("6".into()),
                        event: Some("x".into()),
                        data: Some("y\nz".into())
                    },
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let r = WatchRetry::default();
        assert_eq!(r.backoff(1), Duration::from_millis(100));
        assert_eq!(r.backoff(2), Duration::from_millis(200));
        assert_eq!(r.backoff(7), Duration::from_millis(5000));
        assert_eq!(r.backoff(100), Duration::from_millis(5000));
    }
}
