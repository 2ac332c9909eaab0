//! Shared helpers: an in-process server on 127.0.0.1:0 over a temporary
//! data dir, a small JSON client, and a checker of JSON bodies against the
//! server's own OpenAPI document.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use allot_server::{Config, Server, ServerError};
use reqwest::Method;
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running in-process server.
pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub token: Option<String>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
    pub data_dir: PathBuf,
    config: Config,
    // Kept alive for the data dir unless the caller owns it.
    dir: Option<TempDir>,
}

/// One response: status and parsed JSON body (Null when not JSON).
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub text: String,
}

impl Resp {
    /// The error code of an error body.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    pub fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
}

pub fn config(data_dir: &Path) -> Config {
    let mut c = Config::new(data_dir);
    c.listen = "127.0.0.1:0".into();
    c.shutdown_timeout = Duration::from_secs(5);
    c
}

impl TestServer {
    /// A server on a fresh temporary data dir with default settings.
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// A server on a fresh temporary data dir; `tweak` adjusts the config.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(&dir.path().join("data"));
        tweak(&mut c);
        let mut s = Self::start_config(c).await.unwrap();
        s.dir = Some(dir);
        s
    }

    /// A server with exactly this config (the caller owns the data dir).
    pub async fn start_config(c: Config) -> Result<TestServer, ServerError> {
        let token = c.token.clone();
        let data_dir = c.data_dir.clone();
        let config = c.clone();
        let server = Server::bind(c).await?;
        let base = format!("http://{}", server.local_addr());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        let s = TestServer {
            base,
            client: reqwest::Client::new(),
            token,
            stop: Some(tx),
            task: Some(task),
            data_dir,
            config,
            dir: None,
        };
        s.wait_ready().await;
        Ok(s)
    }

    /// Polls /readyz until 200 (at most 10 s).
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self.call(Method::GET, "/readyz", None).await;
            if r.status == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server never became ready: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(t) => t.await.unwrap(),
            None => Ok(()),
        }
    }

    /// Stops the server and starts a new one on the same data dir and
    /// settings (on a new port).
    pub async fn restart(mut self) -> TestServer {
        let dir = self.dir.take();
        let config = self.config.clone();
        self.stop().await.unwrap();
        let mut s = Self::start_config(config).await.unwrap();
        s.dir = dir;
        s
    }

    /// Sends a request with an optional JSON body (and the token, if any).
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Resp {
        let mut rb = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        send(rb).await
    }

    /// Sends raw bytes as the body with the given content type.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Resp {
        let mut rb = self
            .client
            .request(method, format!("{}{path}", self.base))
            .body(body);
        if let Some(ct) = content_type {
            rb = rb.header("content-type", ct);
        }
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        send(rb).await
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Resp {
        self.call(Method::POST, path, Some(body)).await
    }

    /// GET that must answer 200; returns the body.
    pub async fn ok(&self, path: &str) -> Value {
        let r = self.get(path).await;
        assert_eq!(r.status, 200, "GET {path}: {r:?}");
        r.body
    }

    /// Every pool plus every claim of every pool (all pages): the whole
    /// observable state.
    pub async fn snapshot(&self) -> Value {
        let pools = self.ok("/v1/pools").await;
        let mut claims = serde_json::Map::new();
        for p in pools["pools"].as_array().unwrap() {
            let name = p["name"].as_str().unwrap();
            claims.insert(name.to_string(), Value::Array(self.all_claims(name).await));
        }
        serde_json::json!({"pools": pools, "claims": claims})
    }

    /// Every claim of a pool, following `next`.
    pub async fn all_claims(&self, pool: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                Some(a) => format!("/v1/pools/{pool}/claims?limit=1000&after={a}"),
                None => format!("/v1/pools/{pool}/claims?limit=1000"),
            };
            let page = self.ok(&path).await;
            out.extend(page["claims"].as_array().unwrap().iter().cloned());
            match page["next"].as_str() {
                Some(n) => after = Some(n.to_string()),
                None => return out,
            }
        }
    }
}

async fn send(rb: reqwest::RequestBuilder) -> Resp {
    let resp = rb.send().await.expect("request failed");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("reading body");
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Resp { status, body, text }
}

/// Checks `value` against the response schema the document gives for
/// `method path` and `status`; panics with the JSON path of the first
/// mismatch. Objects may carry only documented properties.
pub fn check_response(doc: &Value, method: &str, path: &str, status: u16, value: &Value) {
    let op = &doc["paths"][path][method];
    assert!(op.is_object(), "{method} {path} is not documented");
    let resp = &op["responses"][status.to_string()];
    assert!(
        resp.is_object(),
        "{method} {path}: status {status} is not documented"
    );
    let schema = &resp["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "{method} {path} {status}: no JSON schema"
    );
    if let Err(e) = check(doc, schema, value, "$") {
        panic!("{method} {path} {status}: {e}\nvalue: {value}");
    }
}

/// Checks `value` against a request body schema.
pub fn check_request(doc: &Value, method: &str, path: &str, value: &Value) {
    let schema =
        &doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"];
    assert!(schema.is_object(), "{method} {path}: no request schema");
    if let Err(e) = check(doc, schema, value, "$") {
        panic!("{method} {path} request: {e}\nvalue: {value}");
    }
}

/// Checks `value` against the response schema the document gives for
/// `method path`, `status` and a non-JSON `content_type` (the data of
/// `text/event-stream` events, say).
pub fn check_content(
    doc: &Value,
    method: &str,
    path: &str,
    status: u16,
    content_type: &str,
    value: &Value,
) {
    let schema = &doc["paths"][path][method]["responses"][status.to_string()]["content"]
        [content_type]["schema"];
    assert!(
        schema.is_object(),
        "{method} {path} {status}: no {content_type} schema"
    );
    if let Err(e) = check(doc, schema, value, "$") {
        panic!("{method} {path} {status} {content_type}: {e}\nvalue: {value}");
    }
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.trim_start_matches("#/components/schemas/");
            let s = &doc["components"]["schemas"][name];
            assert!(s.is_object(), "dangling $ref {r}");
            resolve(doc, s)
        }
        None => schema,
    }
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "number" => v.is_number(),
        // Counters above u64 come back as floats from serde_json.
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        _ => false,
    }
}

fn check(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if let Some(alts) = schema["oneOf"].as_array() {
        let ok = alts.iter().filter(|s| check(doc, s, v, at).is_ok()).count();
        return if ok == 1 {
            Ok(())
        } else {
            Err(format!("{at}: matches {ok} of the oneOf alternatives"))
        };
    }
    if let Some(alts) = schema["anyOf"].as_array() {
        return if alts.iter().any(|s| check(doc, s, v, at).is_ok()) {
            Ok(())
        } else {
            Err(format!("{at}: matches none of anyOf"))
        };
    }
    if let Some(all) = schema["allOf"].as_array() {
        for s in all {
            check(doc, s, v, at)?;
        }
    }
    match &schema["type"] {
        Value::String(t) if !type_ok(t, v) => return Err(format!("{at}: expected {t}, got {v}")),
        Value::Array(ts) if !ts.iter().any(|t| type_ok(t.as_str().unwrap_or(""), v)) => {
            return Err(format!("{at}: expected one of {ts:?}, got {v}"))
        }
        _ => {}
    }
    if let Some(e) = schema["enum"].as_array() {
        if !e.contains(v) {
            return Err(format!("{at}: {v} not in {e:?}"));
        }
    }
    if let Some(obj) = v.as_object() {
        let props = schema["properties"].as_object();
        if let Some(req) = schema["required"].as_array() {
            for r in req {
                let r = r.as_str().unwrap_or("");
                if !obj.contains_key(r) {
                    return Err(format!("{at}: required `{r}` missing"));
                }
            }
        }
        let extra = &schema["additionalProperties"];
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => check(doc, s, val, &format!("{at}.{k}"))?,
                None if extra.is_object() => check(doc, extra, val, &format!("{at}.{k}"))?,
                None if (props.is_some() || schema["type"] == "object")
                    && extra != &Value::Bool(true) =>
                {
                    return Err(format!("{at}: undocumented property `{k}`"));
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            check(doc, items, x, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// One Prometheus sample: name, labels, value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// Parses Prometheus text into samples.
pub fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (head, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap();
        let (name, labels) = match head.split_once('{') {
            Some((n, rest)) => {
                let rest = rest.trim_end_matches('}');
                let labels = rest
                    .split("\",")
                    .filter(|s| !s.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap();
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect();
                (n.to_string(), labels)
            }
            None => (head.to_string(), Vec::new()),
        };
        out.push((name, labels, value));
    }
    out
}

/// The value of the sample `name` whose labels include all of `want`.
pub fn sample(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    samples(text)
        .into_iter()
        .find(|(n, labels, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| v)
}
