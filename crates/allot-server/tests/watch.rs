//! `GET /v1/watch` over real sockets: Server-Sent Events as they arrive,
//! disconnecting and resuming with `Last-Event-ID` or `from` without loss or
//! duplicates, 410 for history the store has compacted, bad revisions, and
//! the bearer token.

mod common;

use std::time::Duration;

use common::{check_content, check_response, TestServer};
use serde_json::{json, Value};

/// One SSE message (comment-only keep-alives are skipped).
#[derive(Debug, Clone, PartialEq)]
struct Msg {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

/// Reads SSE messages off a streaming response.
struct SseReader {
    resp: reqwest::Response,
    buf: String,
}

impl SseReader {
    /// Opens `/v1/watch{query}` with extra headers and asserts a 200 event stream.
    async fn open(s: &TestServer, query: &str, headers: &[(&str, &str)]) -> SseReader {
        let resp = watch_request(s, query, headers).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        SseReader {
            resp,
            buf: String::new(),
        }
    }

    /// The next message with a field other than a comment; None when the
    /// stream ends. Fails the test after 10 s.
    async fn next(&mut self) -> Option<Msg> {
        tokio::time::timeout(Duration::from_secs(10), self.next_inner())
            .await
            .expect("no SSE message within 10 s")
    }

    async fn next_inner(&mut self) -> Option<Msg> {
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut msg = Msg {
                    id: None,
                    event: None,
                    data: String::new(),
                };
                let mut any = false;
                for line in block.lines() {
                    let (field, value) = line.split_once(": ").unwrap_or((line, ""));
                    match field {
                        "id" => msg.id = Some(value.to_string()),
                        "event" => msg.event = Some(value.to_string()),
                        "data" => msg.data.push_str(value),
                        _ => continue,
                    }
                    any = true;
                }
                if any {
                    return Some(msg);
                }
            }
            match self.resp.chunk().await.expect("reading the stream") {
                Some(bytes) => self.buf.push_str(std::str::from_utf8(&bytes).unwrap()),
                None => return None,
            }
        }
    }

    /// The next `n` change events (after the id-only first message, if it
    /// comes first).
    async fn changes(&mut self, n: usize) -> Vec<Msg> {
        let mut out = Vec::new();
        while out.len() < n {
            let m = self.next().await.expect("stream ended early");
            if m.event.is_some() {
                out.push(m);
            }
        }
        out
    }
}

async fn watch_request(s: &TestServer, query: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut rb = s.client.get(format!("{}/v1/watch{query}", s.base));
    if let Some(t) = &s.token {
        rb = rb.bearer_auth(t);
    }
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    rb.send().await.expect("watch request")
}

fn rev(m: &Msg) -> u64 {
    m.id.as_deref().expect("an id").parse().expect("numeric id")
}

fn data(m: &Msg) -> Value {
    serde_json::from_str(&m.data).unwrap_or_else(|e| panic!("data of {m:?}: {e}"))
}

/// Checks a change message: id is its revision, event its type, and the
/// data matches the documented Event schema.
fn check_change(doc: &Value, m: &Msg) -> Value {
    let d = data(m);
    assert_eq!(d["revision"].as_u64(), Some(rev(m)), "{m:?}");
    assert_eq!(d["type"].as_str(), m.event.as_deref(), "{m:?}");
    check_content(doc, "get", "/v1/watch", 200, "text/event-stream", &d);
    d
}

/// (type, values allocated, values released) of a change.
fn summary(d: &Value) -> (String, Vec<String>, Vec<String>) {
    let vals = |k: &str| -> Vec<String> {
        d[k].as_array()
            .map(|a| {
                a.iter()
                    .map(|c| c["value"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    (
        d["type"].as_str().unwrap().to_string(),
        vals("allocated"),
        vals("released"),
    )
}

fn s(t: &str, a: &[&str], r: &[&str]) -> (String, Vec<String>, Vec<String>) {
    (
        t.to_string(),
        a.iter().map(|x| x.to_string()).collect(),
        r.iter().map(|x| x.to_string()).collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_and_resume_without_loss_or_duplicates() {
    let srv = TestServer::start_with(|c| c.token = Some("tok".into())).await;
    let doc = srv.ok("/openapi.json").await;

    // From now: the first message only names the revision it starts after.
    let mut live = SseReader::open(&srv, "", &[]).await;
    let hello = live.next().await.unwrap();
    assert_eq!(hello.event, None);
    assert!(hello.data.is_empty(), "{hello:?}");
    let start = rev(&hello);

    let r = srv
        .post(
            "/v1/pools",
            json!({"name": "ids", "kind": {"type": "range", "lo": 1, "hi": 100}}),
        )
        .await;
    assert_eq!(r.status, 201);
    for body in [
        json!({}),
        json!({"key": "k", "owner": "o"}),
        json!({"count": 2}),
    ] {
        assert_eq!(srv.post("/v1/pools/ids/allocate", body).await.status, 200);
    }
    let first = live.changes(4).await;
    let got: Vec<_> = first
        .iter()
        .map(|m| summary(&check_change(&doc, m)))
        .collect();
    assert_eq!(
        got,
        [
            s("pool_created", &[], &[]),
            s("claims", &["1"], &[]),
            s("claims", &["2"], &[]),
            s("claims", &["3", "4"], &[]),
        ]
    );
    assert_eq!(data(&first[0])["description"], "integers 1-100");
    assert_eq!(data(&first[2])["allocated"][0]["key"], "k");
    assert!(rev(&first[0]) > start);
    assert!(first.windows(2).all(|w| rev(&w[0]) < rev(&w[1])));
    let last_seen = rev(&first[3]);
    // Disconnect, and change things while nobody listens.
    drop(live);
    assert_eq!(
        srv.post("/v1/pools/ids/release", json!({"value": "1"}))
            .await
            .status,
        200
    );
    assert_eq!(
        srv.post("/v1/pools/ids/resync/begin", json!({"owner": "o"}))
            .await
            .status,
        200
    );
    assert_eq!(
        srv.post("/v1/pools/ids/resync/end", json!({"owner": "o"}))
            .await
            .status,
        200
    );

    // Resume after the last id seen: exactly what was missed, in order;
    // `from` in the URL loses to the header (a reconnecting EventSource
    // keeps its original URL).
    let id = last_seen.to_string();
    let mut resumed = SseReader::open(&srv, "?from=1", &[("Last-Event-ID", id.as_str())]).await;
    let hello = resumed.next().await.unwrap();
    assert_eq!(hello.id.as_deref(), Some(id.as_str()));
    let missed = resumed.changes(4).await;
    let got: Vec<_> = missed
        .iter()
        .map(|m| summary(&check_change(&doc, m)))
        .collect();
    assert_eq!(
        got,
        [
            s("claims", &[], &["1"]),
            s("resync_begun", &[], &[]),
            s("claims", &[], &["2"]),
            s("resync_ended", &[], &[]),
        ]
    );
    assert_eq!(rev(&missed[0]), last_seen + 1, "a revision was skipped");
    assert!(missed.windows(2).all(|w| rev(&w[0]) < rev(&w[1])));
    assert_eq!(data(&missed[3])["released"], 1);
    assert_eq!(data(&missed[1])["owner"], "o");

    // And it follows live changes afterwards.
    assert_eq!(
        srv.call(reqwest::Method::DELETE, "/v1/pools/ids?force=true", None)
            .await
            .status,
        200
    );
    let deleted = resumed.changes(1).await;
    assert_eq!(summary(&check_change(&doc, &deleted[0])).0, "pool_deleted");
    assert_eq!(rev(&deleted[0]), rev(&missed[3]) + 1);

    // `from` replays the same history as the header does.
    let from = format!("?from={}", last_seen + 1);
    let mut again = SseReader::open(&srv, &from, &[]).await;
    assert_eq!(again.next().await.unwrap().id, Some(id.clone()));
    let replay = again.changes(5).await;
    assert_eq!(replay[..4], missed[..]);
    assert_eq!(replay[4], deleted[0]);

    // Resuming from a stream's id-only first message loses nothing either.
    let mut quiet = SseReader::open(&srv, "", &[]).await;
    let pinned = quiet.next().await.unwrap().id.unwrap();
    drop(quiet);
    let r = srv
        .post(
            "/v1/pools",
            json!({"name": "late", "kind": {"type": "set", "values": ["a"]}}),
        )
        .await;
    assert_eq!(r.status, 201);
    let mut back = SseReader::open(&srv, "", &[("Last-Event-ID", pinned.as_str())]).await;
    let late = back.changes(1).await;
    assert_eq!(data(&late[0])["pool"], "late");
    assert_eq!(rev(&late[0]), pinned.parse::<u64>().unwrap() + 1);
    drop((resumed, again, back));

    // The token guards the stream like every other /v1 route.
    let resp = srv
        .client
        .get(format!("{}/v1/watch", srv.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_history_is_410_and_bad_revisions_are_400() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::config(&dir.path().join("data"));
    let srv = TestServer::start_config(config.clone()).await.unwrap();
    let r = srv
        .post(
            "/v1/pools",
            json!({"name": "ids", "kind": {"type": "range", "lo": 1, "hi": 9}}),
        )
        .await;
    assert_eq!(r.status, 201);
    for _ in 0..3 {
        assert_eq!(
            srv.post("/v1/pools/ids/allocate", json!({})).await.status,
            200
        );
    }
    srv.stop().await.unwrap();

    // Compact the history away through the store itself.
    // A new data dir gets the log store.
    let db = config.data_dir.join(allot_server::LOG_DIR);
    let store = allot_store::LogStore::open(&db, allot_store::LogOptions::default()).unwrap();
    let engine = allot::Allot::new(std::sync::Arc::new(store.clone()));
    let current = engine.store().current_revision().await.unwrap();
    engine.store().compact(current).await.unwrap();
    engine.close().await;
    store.close().unwrap();

    let srv = TestServer::start_config(config).await.unwrap();
    let doc = srv.ok("/openapi.json").await;
    let resp = watch_request(&srv, "?from=1", &[]).await;
    assert_eq!(resp.status(), 410);
    let body: Value = resp.json().await.unwrap();
    check_response(&doc, "get", "/v1/watch", 410, &body);
    assert_eq!(body["error"]["code"], "compacted");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("compacted") && msg.contains("watch from now"),
        "{msg}"
    );
    let resp = watch_request(&srv, "", &[("Last-Event-ID", "1")]).await;
    assert_eq!(resp.status(), 410);

    // The retained history still streams.
    let from = format!("?from={current}");
    let mut ok = SseReader::open(&srv, &from, &[]).await;
    assert_eq!(ok.next().await.unwrap().id, Some((current - 1).to_string()));
    drop(ok);

    // (query, headers, what the message must mention)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let bad: &[Case] = &[
        ("?from=abc", &[], "invalid query string"),
        ("?from=-1", &[], "invalid query string"),
        ("?since=1", &[], "unknown field"),
        ("?from=99999999", &[], "in the future"),
        ("", &[("Last-Event-ID", "x")], "Last-Event-ID"),
        (
            "",
            &[("Last-Event-ID", "18446744073709551615")],
            "out of range",
        ),
    ];
    for (query, headers, needle) in bad {
        let resp = watch_request(&srv, query, headers).await;
        assert_eq!(resp.status(), 400, "{query} {headers:?}");
        let body: Value = resp.json().await.unwrap();
        check_response(&doc, "get", "/v1/watch", 400, &body);
        assert_eq!(body["error"]["code"], "invalid_argument");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{query}: {msg}");
    }
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams_promptly() {
    let srv = TestServer::start().await;
    let mut open = SseReader::open(&srv, "", &[]).await;
    open.next().await.unwrap();
    let t = std::time::Instant::now();
    // The test server's shutdown timeout is 5 s; an open stream must not
    // hold shutdown up until then.
    srv.stop().await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(open.next().await, None);
}
