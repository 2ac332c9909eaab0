//! An async client for the allot REST API (`allot serve`).
//!
//! The methods mirror the engine's ([`allot::Allot`]) and return the
//! engine's own types ([`PoolInfo`], [`Claim`], [`ClaimPage`],
//! [`ResyncReport`], [`Event`]), so code can move between an embedded
//! engine and a server with few changes. Refusals come back as
//! [`Error::Api`] with the server's stable code, message and HTTP status.
//!
//! ```no_run
//! use allot::{AllocRequest, PoolKind, PoolSpec};
//! use futures::StreamExt;
//!
//! # async fn demo() -> Result<(), allot_client::Error> {
//! let client = allot_client::Client::new("http://127.0.0.1:7070")?.with_token("s3cret");
//! let spec = PoolSpec::new(PoolKind::Range { lo: 100, hi: 4094 });
//! client.create_pool("vlans", spec, Default::default(), None).await?;
//! // Safe to retry: the same request id returns the first answer.
//! let claims = client
//!     .allocate("vlans", AllocRequest::key("site-a").request_id("req-1"))
//!     .await?;
//! println!("site-a holds {}", claims[0].value);
//!
//! // Every change from revision 1 on; reconnects by itself.
//! let mut events = client.watch(1);
//! while let Some(event) = events.next().await {
//!     let event = event?;
//!     println!("{} {:?}", event.revision, event.change);
//! }
//! # Ok(()) }
//! ```

mod error;
mod member;
mod watch;

use std::collections::BTreeMap;
use std::time::Duration;

pub use allot::{
    AllocRequest, BlockScan, Change, Claim, ClaimPage, Durability, Event, EventClaim, MemberInfo,
    MemberOptions, OwnedOffset, OwnedValue, OwnerInfo, ParentRef, PoolInfo, PoolKind, PoolSpec,
    ResyncReport, ScanFn, Strategy, Target,
};
use futures::stream::BoxStream;
use reqwest::{Method, RequestBuilder, Url};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

pub use error::{Error, Result};
pub use member::{RemoteAllocator, RemoteMember};
pub use watch::WatchRetry;

/// The request header that makes allocate and release safe to retry.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// A client of one allot server. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
    retry: WatchRetry,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// How long establishing a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    /// A client of the server at `base_url` (`http://host:port`, optionally
    /// with a path prefix when the server sits behind a proxy).
    pub fn new(base_url: impl AsRef<str>) -> Result<Client> {
        let text = base_url.as_ref().trim();
        let mut base = Url::parse(text).map_err(|e| {
            Error::InvalidInput(format!(
                "invalid server URL '{text}': {e} (expected e.g. http://127.0.0.1:7070)"
            ))
        })?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(Error::InvalidInput(format!(
                "invalid server URL '{text}': expected http://HOST:PORT"
            )));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(Error::InvalidInput(format!(
                "invalid server URL '{text}': no query or fragment, please"
            )));
        }
        // Path segments are appended to the base, so it must not end in '/'
        // (an empty last segment would give `//v1`).
        if let Ok(mut segments) = base.path_segments_mut() {
            segments.pop_if_empty();
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| Error::InvalidInput(format!("setting up HTTP: {}", error::chain(&e))))?;
        Ok(Client {
            http,
            base,
            token: None,
            retry: WatchRetry::default(),
        })
    }

    /// Sends `Authorization: Bearer <token>` (servers started with a token
    /// require it on every `/v1` route).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Uses this HTTP client (proxies, TLS, timeouts of your choosing).
    pub fn with_http_client(mut self, http: reqwest::Client) -> Self {
        self.http = http;
        self
    }

    /// How [`Client::watch`] reconnects after a dropped connection.
    pub fn with_watch_retry(mut self, retry: WatchRetry) -> Self {
        self.retry = retry;
        self
    }

    /// The server's base URL.
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    /// Creates a pool, optionally nested in a claimed value of another
    /// pool (see [`allot::Allot::create_pool_in`]).
    pub async fn create_pool(
        &self,
        name: &str,
        spec: PoolSpec,
        labels: BTreeMap<String, String>,
        parent: Option<ParentRef>,
    ) -> Result<PoolInfo> {
        let mut body = match serde_json::to_value(&spec) {
            Ok(Value::Object(m)) => m,
            _ => {
                return Err(Error::InvalidInput(
                    "the pool spec is not a JSON object".into(),
                ))
            }
        };
        body.insert("name".into(), json!(name));
        if !labels.is_empty() {
            body.insert("labels".into(), json!(labels));
        }
        if let Some(p) = parent {
            body.insert("parent".into(), json!(p));
        }
        self.send(self.request(Method::POST, &["pools"])?.json(&body))
            .await
    }

    /// A pool with its counters.
    pub async fn pool(&self, name: &str) -> Result<PoolInfo> {
        self.send(self.request(Method::GET, &["pools", name])?)
            .await
    }

    /// Every pool carrying all of `labels` (all pools if empty), by name.
    pub async fn list_pools(&self, labels: &BTreeMap<String, String>) -> Result<Vec<PoolInfo>> {
        #[derive(Deserialize)]
        struct PoolList {
            pools: Vec<PoolInfo>,
        }
        let filter: Vec<(&str, String)> = labels
            .iter()
            .map(|(k, v)| ("label", format!("{k}={v}")))
            .collect();
        let list: PoolList = self
            .send(self.request(Method::GET, &["pools"])?.query(&filter))
            .await?;
        Ok(list.pools)
    }

    /// The live members, with the blocks each owns.
    pub async fn members(&self) -> Result<Vec<MemberInfo>> {
        #[derive(Deserialize)]
        struct MemberList {
            members: Vec<MemberInfo>,
        }
        let list: MemberList = self.send(self.request(Method::GET, &["members"])?).await?;
        Ok(list.members)
    }

    /// Which member owns the block holding `value` of member-blocks pool
    /// `pool` (the server answers from its owner map, without a store
    /// round trip).
    pub async fn owner(&self, pool: &str, value: &str) -> Result<OwnerInfo> {
        self.send(
            self.request(Method::GET, &["pools", pool, "owner"])?
                .query(&[("value", value)]),
        )
        .await
    }

    /// Deletes a pool and everything in it; refused while values are
    /// claimed unless `force`.
    pub async fn delete_pool(&self, name: &str, force: bool) -> Result<()> {
        let mut rb = self.request(Method::DELETE, &["pools", name])?;
        if force {
            rb = rb.query(&[("force", "true")]);
        }
        let _: Value = self.send(rb).await?;
        Ok(())
    }

    /// Allocates (see [`allot::Allot::allocate`]). A `request_id` on the
    /// request is sent as the `Idempotency-Key` header: retrying after a
    /// lost answer returns the first answer and claims nothing more.
    pub async fn allocate(&self, pool: &str, mut req: AllocRequest) -> Result<Vec<Claim>> {
        #[derive(Deserialize)]
        struct Allocated {
            claims: Vec<Claim>,
        }
        let id = req.request_id.take();
        let mut rb = self
            .request(Method::POST, &["pools", pool, "allocate"])?
            .json(&req);
        if let Some(id) = id {
            rb = rb.header(IDEMPOTENCY_KEY, id);
        }
        let a: Allocated = self.send(rb).await?;
        Ok(a.claims)
    }

    /// Releases a claim by value or key and returns it. With a
    /// `request_id`, a retry returns the first answer instead of
    /// `not_found` (see [`allot::Allot::release_once`]).
    pub async fn release(
        &self,
        pool: &str,
        target: Target,
        request_id: Option<&str>,
    ) -> Result<Claim> {
        let mut rb = self
            .request(Method::POST, &["pools", pool, "release"])?
            .json(&target_body(&target));
        if let Some(id) = request_id {
            rb = rb.header(IDEMPOTENCY_KEY, id);
        }
        self.send(rb).await
    }

    /// Looks a claim up by value or key.
    pub async fn lookup(&self, pool: &str, target: Target) -> Result<Claim> {
        let query = match &target {
            Target::Value(v) => [("value", v.as_str())],
            Target::Key(k) => [("key", k.as_str())],
        };
        self.send(
            self.request(Method::GET, &["pools", pool, "lookup"])?
                .query(&query),
        )
        .await
    }

    /// A page of at most `limit` claims (1-10000) after `after`, in value
    /// order; pass the page's `next` as `after` for the following one.
    pub async fn list_claims(
        &self,
        pool: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ClaimPage> {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(a) = after {
            query.push(("after", a.to_string()));
        }
        self.send(
            self.request(Method::GET, &["pools", pool, "claims"])?
                .query(&query),
        )
        .await
    }

    /// Opens a mark-and-sweep pass (see [`allot::Allot::resync_begin`]).
    pub async fn resync_begin(&self, pool: &str, owner: Option<&str>) -> Result<ResyncReport> {
        self.send(
            self.request(Method::POST, &["pools", pool, "resync", "begin"])?
                .json(&json!({ "owner": owner })),
        )
        .await
    }

    /// Closes a pass, releasing what it marked and was not claimed again.
    pub async fn resync_end(&self, pool: &str, owner: Option<&str>) -> Result<ResyncReport> {
        self.send(
            self.request(Method::POST, &["pools", pool, "resync", "end"])?
                .json(&json!({ "owner": owner })),
        )
        .await
    }

    /// Every change from revision `from` on (0: from now), as a stream.
    ///
    /// A dropped connection is resumed from the last revision received + 1,
    /// with backoff, so the stream has no gaps or duplicates; it ends with
    /// an error after [`WatchRetry::max_retries`] failed attempts in a row,
    /// or at once when the server refuses (for example
    /// [`Error::is_compacted`]: the history is gone; read the state again
    /// and watch from now).
    pub fn watch(&self, from: u64) -> BoxStream<'static, Result<Event>> {
        watch::stream(self.clone(), from)
    }

    /// A request to `/v1/{segments...}` (segments are percent-encoded).
    fn request(&self, method: Method, segments: &[&str]) -> Result<RequestBuilder> {
        let url = self.url(segments)?;
        let mut rb = self.http.request(method, url);
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        Ok(rb)
    }

    pub(crate) fn url(&self, segments: &[&str]) -> Result<Url> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| Error::InvalidInput(format!("invalid server URL '{}'", self.base)))?
            .push("v1")
            .extend(segments);
        Ok(url)
    }

    /// Sends a request and decodes a success, or turns the answer into an
    /// [`Error`].
    async fn send<T: DeserializeOwned>(&self, rb: RequestBuilder) -> Result<T> {
        let resp = rb
            .send()
            .await
            .map_err(|e| Error::transport(self.base.as_str(), &e))?;
        let url = resp.url().to_string();
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| Error::transport(self.base.as_str(), &e))?;
        if !status.is_success() {
            return Err(api_error(status.as_u16(), &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| Error::Protocol {
            url,
            message: format!("cannot decode the answer: {e}"),
        })
    }
}

/// The JSON body addressing a claim by value or key.
fn target_body(t: &Target) -> Value {
    match t {
        Target::Value(v) => json!({ "value": v }),
        Target::Key(k) => json!({ "key": k }),
    }
}

/// The server's error body `{"error": {"code", "message"}}`.
#[derive(Deserialize)]
pub(crate) struct ErrorBody {
    pub(crate) error: ErrorDetail,
}

#[derive(Deserialize)]
pub(crate) struct ErrorDetail {
    pub(crate) code: String,
    pub(crate) message: String,
}

/// An error answer as an [`Error::Api`]; a body that is not the server's
/// error shape (a proxy's page, say) is summarized.
pub(crate) fn api_error(status: u16, body: &[u8]) -> Error {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => Error::Api {
            status,
            code: b.error.code,
            message: b.error.message,
        },
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
            let text: String = text.chars().take(200).collect();
            Error::Api {
                status,
                code: format!("http_{status}"),
                message: if text.is_empty() {
                    format!("the server answered HTTP {status}")
                } else {
                    format!("the server answered HTTP {status}: {text}")
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_join_segments_under_the_base() {
        let c = Client::new("http://127.0.0.1:7070").unwrap();
        assert_eq!(
            c.url(&["pools", "a b", "claims"]).unwrap().as_str(),
            "http://127.0.0.1:7070/v1/pools/a%20b/claims"
        );
        let c = Client::new("http://h:1/prefix/").unwrap();
        assert_eq!(
            c.url(&["pools"]).unwrap().as_str(),
            "http://h:1/prefix/v1/pools"
        );
        for bad in [
            "",
            "127.0.0.1:7070",
            "ftp://h/",
            "http://h/?x=1",
            "mailto:a@b",
        ] {
            let e = Client::new(bad).unwrap_err();
            assert!(e.to_string().contains("invalid server URL"), "{bad}: {e}");
        }
    }

    #[test]
    fn error_bodies_become_api_errors() {
        let e = api_error(
            404,
            br#"{"error": {"code": "pool_not_found", "message": "pool 'x' not found"}}"#,
        );
        assert_eq!(e.to_string(), "pool 'x' not found");
        assert_eq!((e.code(), e.status()), ("pool_not_found", Some(404)));
        let e = api_error(502, b"<html>\n bad gateway </html>");
        assert_eq!(e.code(), "http_502");
        assert_eq!(
            e.to_string(),
            "the server answered HTTP 502: <html> bad gateway </html>"
        );
        assert!(e.is_retryable());
        assert!(
            api_error(410, br#"{"error": {"code": "compacted", "message": "m"}}"#).is_compacted()
        );
    }

    #[test]
    fn debug_hides_the_token() {
        let c = Client::new("http://h:1").unwrap().with_token("s3cret");
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
