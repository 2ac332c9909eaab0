//! Redis used the way people use it instead of a resource manager: a SET of
//! free IDs, `SPOP` to allocate, `SADD` to release. A minimal RESP2 client
//! over one TCP connection, one command at a time (no pipelining), so each
//! operation costs a round trip like an HTTP request does.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::allot_client::Workload;
use crate::driver::{Client, OpError};

/// A RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// Parses one reply from the start of `buf`: `Ok(None)` when more bytes
/// are needed, else the reply and the bytes it used.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    if eol == 0 {
        return Err("empty reply line".into());
    }
    let line = std::str::from_utf8(&buf[1..eol]).map_err(|_| "reply line is not UTF-8")?;
    let after = eol + 2;
    let int = |s: &str| {
        s.parse::<i64>()
            .map_err(|_| format!("bad integer in reply: {s:?}"))
    };
    match buf[0] {
        b'+' => Ok(Some((Reply::Status(line.to_string()), after))),
        b'-' => Ok(Some((Reply::Error(line.to_string()), after))),
        b':' => Ok(Some((Reply::Int(int(line)?), after))),
        b'$' => {
            let n = int(line)?;
            if n < 0 {
                return Ok(Some((Reply::Bulk(None), after)));
            }
            let n = usize::try_from(n).map_err(|_| "bulk length")?;
            if buf.len() < after + n + 2 {
                return Ok(None);
            }
            if &buf[after + n..after + n + 2] != b"\r\n" {
                return Err("bulk string not terminated by CRLF".into());
            }
            Ok(Some((
                Reply::Bulk(Some(buf[after..after + n].to_vec())),
                after + n + 2,
            )))
        }
        b'*' => {
            let n = int(line)?;
            if n < 0 {
                return Ok(Some((Reply::Array(None), after)));
            }
            let mut items = Vec::new();
            let mut at = after;
            for _ in 0..n {
                match parse(&buf[at..])? {
                    Some((r, used)) => {
                        items.push(r);
                        at += used;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(Some(items)), at)))
        }
        b => Err(format!("unknown reply type {:?}", b as char)),
    }
}

/// Appends a command in RESP form.
pub fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// One connection to Redis.
pub struct Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    rbuf: Vec<u8>,
    filled: usize,
}

fn transport(what: &str, e: impl std::fmt::Display) -> OpError {
    OpError::Transport(format!("{what}: {e}"))
}

impl Conn {
    /// A connection, opened at the first command.
    pub fn new(addr: SocketAddr) -> Conn {
        Conn {
            addr,
            stream: None,
            rbuf: vec![0; 4096],
            filled: 0,
        }
    }

    /// Sends one encoded command and reads its reply. A transport error
    /// drops the connection so the next command opens a new one.
    pub async fn call(&mut self, cmd: &[u8]) -> Result<Reply, OpError> {
        let r = self.call_inner(cmd).await;
        if matches!(r, Err(OpError::Transport(_))) {
            self.stream = None;
            self.filled = 0;
        }
        r
    }

    async fn call_inner(&mut self, cmd: &[u8]) -> Result<Reply, OpError> {
        let stream = match &mut self.stream {
            Some(s) => s,
            None => {
                let s = TcpStream::connect(self.addr)
                    .await
                    .map_err(|e| transport("connect", e))?;
                s.set_nodelay(true)
                    .map_err(|e| transport("TCP_NODELAY", e))?;
                self.filled = 0;
                self.stream.insert(s)
            }
        };
        stream
            .write_all(cmd)
            .await
            .map_err(|e| transport("write", e))?;
        loop {
            match parse(&self.rbuf[..self.filled]).map_err(|e| transport("protocol", e))? {
                Some((reply, used)) => {
                    // One command in flight: nothing may follow its reply.
                    if used != self.filled {
                        return Err(transport("protocol", "unexpected bytes after the reply"));
                    }
                    self.filled = 0;
                    return Ok(reply);
                }
                None => {
                    if self.filled == self.rbuf.len() {
                        let len = self.rbuf.len() * 2;
                        self.rbuf.resize(len, 0);
                    }
                    let n = stream
                        .read(&mut self.rbuf[self.filled..])
                        .await
                        .map_err(|e| transport("read", e))?;
                    if n == 0 {
                        return Err(transport("read", "connection closed"));
                    }
                    self.filled += n;
                }
            }
        }
    }

    /// Runs a command given as arguments; a Redis error is an `Answer`.
    pub async fn command(&mut self, args: &[&[u8]]) -> Result<Reply, OpError> {
        let mut cmd = Vec::new();
        encode(&mut cmd, args);
        match self.call(&cmd).await? {
            Reply::Error(e) => Err(OpError::Answer(e)),
            r => Ok(r),
        }
    }
}

/// Number of members of set `key`.
pub async fn scard(conn: &mut Conn, key: &str) -> Result<i64, OpError> {
    match conn.command(&[b"SCARD", key.as_bytes()]).await? {
        Reply::Int(n) => Ok(n),
        r => Err(OpError::Answer(format!("SCARD: unexpected {r:?}"))),
    }
}

/// Replaces set `key` with the integers `1..=n`, in `SADD`s of `chunk`
/// members. Returns the set's size afterwards.
pub async fn fill(conn: &mut Conn, key: &str, n: u64, chunk: u64) -> Result<i64, OpError> {
    conn.command(&[b"UNLINK", key.as_bytes()]).await?;
    let mut lo = 1;
    while lo <= n {
        let hi = (lo + chunk - 1).min(n);
        let members: Vec<Vec<u8>> = (lo..=hi).map(|v| v.to_string().into_bytes()).collect();
        let mut args: Vec<&[u8]> = vec![b"SADD", key.as_bytes()];
        args.extend(members.iter().map(|m| m.as_slice()));
        match conn.command(&args).await? {
            Reply::Int(_) => {}
            r => return Err(OpError::Answer(format!("SADD: unexpected {r:?}"))),
        }
        lo = hi + 1;
    }
    scard(conn, key).await
}

/// `CONFIG GET` of one parameter, as text.
pub async fn config_get(conn: &mut Conn, name: &str) -> Result<String, OpError> {
    match conn.command(&[b"CONFIG", b"GET", name.as_bytes()]).await? {
        Reply::Array(Some(items)) => match items.get(1) {
            Some(Reply::Bulk(Some(v))) => Ok(String::from_utf8_lossy(v).into_owned()),
            _ => Err(OpError::Answer(format!("CONFIG GET {name}: not set"))),
        },
        r => Err(OpError::Answer(format!(
            "CONFIG GET {name}: unexpected {r:?}"
        ))),
    }
}

/// A benchmark client on set `key`.
pub struct RedisClient {
    conn: Conn,
    workload: Workload,
    spop: Vec<u8>,
    key: Vec<u8>,
    sadd: Vec<u8>,
}

impl RedisClient {
    pub fn new(addr: SocketAddr, key: &str, workload: Workload) -> RedisClient {
        let mut spop = Vec::new();
        encode(&mut spop, &[b"SPOP", key.as_bytes()]);
        RedisClient {
            conn: Conn::new(addr),
            workload,
            spop,
            key: key.as_bytes().to_vec(),
            sadd: Vec::with_capacity(64),
        }
    }

    async fn spop(&mut self) -> Result<u64, OpError> {
        match self.conn.call(&self.spop).await? {
            Reply::Bulk(Some(v)) => std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| {
                    OpError::Answer(format!(
                        "SPOP: not an ID: {:?}",
                        String::from_utf8_lossy(&v)
                    ))
                }),
            Reply::Bulk(None) => Err(OpError::Answer("SPOP: the set is empty".into())),
            r => Err(OpError::Answer(format!("SPOP: unexpected {r:?}"))),
        }
    }

    async fn sadd(&mut self, id: u64) -> Result<(), OpError> {
        let member = id.to_string();
        self.sadd.clear();
        encode(&mut self.sadd, &[b"SADD", &self.key, member.as_bytes()]);
        let cmd = std::mem::take(&mut self.sadd);
        let r = self.conn.call(&cmd).await;
        self.sadd = cmd;
        match r? {
            Reply::Int(1) => Ok(()),
            // 0: the ID was in the set already, i.e. held twice.
            r => Err(OpError::Answer(format!("SADD {id}: unexpected {r:?}"))),
        }
    }
}

impl Client for RedisClient {
    async fn op(&mut self, _seq: u64) -> Result<u64, OpError> {
        let id = self.spop().await?;
        if self.workload == Workload::ClaimRelease {
            self.sadd(id).await?;
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies() {
        assert_eq!(parse(b"$3\r\n12"), Ok(None));
        assert_eq!(
            parse(b"$3\r\n123\r\n"),
            Ok(Some((Reply::Bulk(Some(b"123".to_vec())), 9)))
        );
        assert_eq!(parse(b"$-1\r\n"), Ok(Some((Reply::Bulk(None), 5))));
        assert_eq!(parse(b":1\r\n"), Ok(Some((Reply::Int(1), 4))));
        assert_eq!(
            parse(b"-ERR x\r\n"),
            Ok(Some((Reply::Error("ERR x".into()), 8)))
        );
        assert_eq!(
            parse(b"*2\r\n$1\r\na\r\n$3\r\nyes\r\n"),
            Ok(Some((
                Reply::Array(Some(vec![
                    Reply::Bulk(Some(b"a".to_vec())),
                    Reply::Bulk(Some(b"yes".to_vec()))
                ])),
                20
            )))
        );
        assert_eq!(parse(b"*2\r\n$1\r\na\r\n"), Ok(None));
        assert!(parse(b"?\r\n").is_err());
        assert!(parse(b"$1\r\nabc").is_err());
    }

    #[test]
    fn encodes_commands() {
        let mut out = Vec::new();
        encode(&mut out, &[b"SPOP", b"ids"]);
        assert_eq!(out, b"*2\r\n$4\r\nSPOP\r\n$3\r\nids\r\n");
    }
}
