//! The gRPC counterpart of [`crate::allot_client`]: one HTTP/2 connection
//! per client (a tonic channel of its own, never shared), one call at a
//! time, the unary `Allocate` and `Release` of `proto/allot/v1/allot.proto`.

use std::net::SocketAddr;

use allot_proto::pb;
use allot_proto::pb::allot_client::AllotClient as Grpc;
use tonic::transport::{Channel, Endpoint};

use crate::allot_client::{Workload, POOL_HI};
use crate::driver::{Client, OpError};

fn transport(what: &str, e: impl std::fmt::Display) -> OpError {
    OpError::Transport(format!("{what}: {e}"))
}

/// A non-OK status: the server answered, with a refusal (or a transport
/// failure tonic reports as a status: those make the client reconnect).
fn refused(s: &tonic::Status) -> OpError {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
            transport("call", s)
        }
        _ => OpError::Answer(format!("gRPC {:?}: {}", s.code(), s.message())),
    }
}

/// A benchmark client of one pool over gRPC.
pub struct GrpcClient {
    addr: SocketAddr,
    token: Option<tonic::metadata::AsciiMetadataValue>,
    grpc: Option<Grpc<Channel>>,
    pool: String,
    workload: Workload,
    key_prefix: String,
}

impl GrpcClient {
    /// Client number `id` of run `run` (keys are `{run}-{id}-{seq}`, as over
    /// REST); connects at its first call.
    pub fn new(
        addr: SocketAddr,
        token: Option<&str>,
        pool: &str,
        workload: Workload,
        run: &str,
        id: usize,
    ) -> Result<GrpcClient, String> {
        let token = token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|e| format!("token: {e}"))
            })
            .transpose()?;
        Ok(GrpcClient {
            addr,
            token,
            grpc: None,
            pool: pool.to_string(),
            workload,
            key_prefix: format!("{run}-{id}-"),
        })
    }

    async fn client(&mut self) -> Result<&mut Grpc<Channel>, OpError> {
        if self.grpc.is_none() {
            let endpoint = Endpoint::from_shared(format!("http://{}", self.addr))
                .map_err(|e| OpError::Answer(format!("address {}: {e}", self.addr)))?
                .tcp_nodelay(true);
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| transport("connect", e))?;
            self.grpc = Some(Grpc::new(channel));
        }
        self.grpc
            .as_mut()
            .ok_or_else(|| OpError::Transport("no connection".into()))
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            req.metadata_mut().insert("authorization", t.clone());
        }
        req
    }

    /// Runs `call`; a transport failure drops the connection so the next
    /// operation opens a new one.
    async fn allocate(
        &mut self,
        msg: pb::AllocateRequest,
    ) -> Result<pb::AllocateResponse, OpError> {
        let req = self.request(msg);
        let r = self.client().await?.allocate(req).await;
        self.settle(r)
    }

    async fn release(&mut self, msg: pb::ReleaseRequest) -> Result<pb::Claim, OpError> {
        let req = self.request(msg);
        let r = self.client().await?.release(req).await;
        self.settle(r)
    }

    fn settle<T>(&mut self, r: Result<tonic::Response<T>, tonic::Status>) -> Result<T, OpError> {
        match r {
            Ok(resp) => Ok(resp.into_inner()),
            Err(s) => {
                let e = refused(&s);
                if matches!(e, OpError::Transport(_)) {
                    self.grpc = None;
                }
                Err(e)
            }
        }
    }

    async fn claim(&mut self, seq: u64) -> Result<u64, OpError> {
        let key = format!("{}{seq}", self.key_prefix);
        let answer = self
            .allocate(pb::AllocateRequest {
                pool: self.pool.clone(),
                key: Some(key.clone()),
                ..Default::default()
            })
            .await?;
        let value = first_value(&answer)?;
        // The claim must be bound to our key.
        if answer.claims.first().and_then(|c| c.key.as_deref()) != Some(key.as_str()) {
            return Err(OpError::Answer(format!(
                "answer does not carry key {key}: {answer:?}"
            )));
        }
        Ok(value)
    }

    async fn claim_any(&mut self) -> Result<u64, OpError> {
        let answer = self
            .allocate(pb::AllocateRequest {
                pool: self.pool.clone(),
                ..Default::default()
            })
            .await?;
        first_value(&answer)
    }

    async fn claim_release(&mut self) -> Result<u64, OpError> {
        let value = self.claim_any().await?;
        let released = self
            .release(pb::ReleaseRequest {
                pool: self.pool.clone(),
                target: Some(pb::release_request::Target::Value(value.to_string())),
                request_id: None,
            })
            .await?;
        if released.value != value.to_string() {
            return Err(OpError::Answer(format!(
                "release answer is not for {value}: {released:?}"
            )));
        }
        Ok(value)
    }
}

/// The single claimed value of an answer, as an integer of the benchmark
/// pool.
fn first_value(answer: &pb::AllocateResponse) -> Result<u64, OpError> {
    match answer.values.as_slice() {
        [v] => v
            .parse::<u64>()
            .ok()
            .filter(|v| (1..=POOL_HI).contains(v))
            .ok_or_else(|| OpError::Answer(format!("not a value of the pool: {v:?}"))),
        other => Err(OpError::Answer(format!(
            "expected one value, got {other:?}"
        ))),
    }
}

impl Client for GrpcClient {
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
    fn takes_exactly_one_value_of_the_pool() {
        let answer = |values: &[&str]| pb::AllocateResponse {
            pool: "bench".into(),
            values: values.iter().map(|v| v.to_string()).collect(),
            claims: Vec::new(),
        };
        assert_eq!(first_value(&answer(&["1234"])), Ok(1234));
        assert!(first_value(&answer(&["0"])).is_err());
        assert!(first_value(&answer(&["x"])).is_err());
        assert!(first_value(&answer(&[])).is_err());
        assert!(first_value(&answer(&["1", "2"])).is_err());
    }
}
