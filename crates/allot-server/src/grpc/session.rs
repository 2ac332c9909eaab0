//! The `MemberSession` stream: a remote process as a member (see the rpc's
//! comment in `allot.proto` and [`allot::MemberSession`]).
//!
//! Each request is handled in its own task, so a slow one (taking a block
//! while the store is slow) never holds up the keep-alives behind it; the
//! answers carry the request's id. A stream that ends without `leave` does
//! not revoke the lease: the process may still be allocating, trusting it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use allot::{CommitOutcome, Grant, MemberOptions, MemberSession, SessionNews};

use super::{convert, errors, pb, Service};
use crate::Readiness;

use pb::session_request::Request;
use pb::session_response::Response;

type Answer = Result<pb::SessionResponse, Status>;

/// How often a session looks for orphans when nothing changes.
const TEND_EVERY: Duration = Duration::from_secs(1);

/// Waits for the `join` request, joins, and hands the rest of the stream
/// to a task.
pub(super) async fn open(
    service: &Service,
    mut requests: Streaming<pb::SessionRequest>,
) -> Result<BoxStream<'static, Answer>, Status> {
    let first = match requests.next().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => return Err(e),
        None => return Err(errors::invalid("the session ended before its join request")),
    };
    let Some(Request::Join(join)) = first.request else {
        return Err(errors::invalid(
            "the first request of a member session must be join",
        ));
    };
    let (name, can_scan) = (join.name.clone(), join.can_scan);
    let options = member_options(join);
    let session = service
        .allot
        .open_session(&name, options, can_scan)
        .await
        .map_err(errors::from_engine)?;
    let record = session.record().clone();
    tracing::info!(member = %record.name, incarnation = record.incarnation, "remote member joined");
    let joined = pb::SessionResponse {
        id: first.id,
        response: Some(Response::Joined(pb::MemberJoined {
            name: record.name.clone(),
            incarnation: record.incarnation,
            ttl_ms: session.ttl().as_millis() as u64,
            margin_ms: session.margin().as_millis() as u64,
        })),
    };
    let (tx, rx) = mpsc::channel::<Answer>(256);
    // Capacity is ample: nothing has been sent yet.
    let _ = tx.try_send(Ok(joined));
    let session = Arc::new(session);
    tokio::spawn(serve(session, requests, tx, service.ready.clone()));
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
}

fn member_options(join: pb::JoinMember) -> MemberOptions {
    let mut options = MemberOptions::default();
    if join.ttl_ms != 0 {
        options.ttl = Duration::from_millis(join.ttl_ms);
    }
    if join.margin_ms != 0 {
        options.margin = Some(Duration::from_millis(join.margin_ms));
    }
    options.address = join.address;
    options.zone = join.zone;
    options.attributes = join.attributes;
    options
}

async fn serve(
    session: Arc<MemberSession>,
    mut requests: Streaming<pb::SessionRequest>,
    tx: mpsc::Sender<Answer>,
    ready: Arc<Readiness>,
) {
    let member = session.record().name.clone();
    let tend = tokio::spawn(tend(session.clone(), tx.clone()));
    // Set before the lease is revoked by `leave`: a request that then finds
    // the lease gone must not end the stream before `leave` is answered.
    let leaving = Arc::new(AtomicBool::new(false));
    loop {
        let next = tokio::select! {
            biased;
            () = ready.stopped() => {
                let _ = tx.send(Err(errors::status(
                    "unavailable",
                    "the server is shutting down; join again through another server \
                     (or this one when it is back)",
                ))).await;
                break;
            }
            () = tx.closed() => break,
            next = requests.next() => next,
        };
        let req = match next {
            Some(Ok(req)) => req,
            Some(Err(e)) => {
                tracing::debug!(%member, "member session stream failed: {e}");
                break;
            }
            None => break,
        };
        if req.id == 0 {
            let _ = tx
                .send(Err(errors::invalid("a request id must not be 0")))
                .await;
            break;
        }
        if let Some(Request::Leave(_)) = req.request {
            // Nothing else of this member may run once the lease is gone.
            tend.abort();
            leaving.store(true, Ordering::Release);
            let answer = session.leave().await;
            let _ = tx
                .send(Ok(reply(
                    req.id,
                    answer.map(|()| Response::Left(pb::MemberLeft {})),
                )))
                .await;
            tracing::info!(%member, "remote member left");
            return;
        }
        let (session, tx, leaving) = (session.clone(), tx.clone(), leaving.clone());
        tokio::spawn(async move {
            let answer = handle(&session, req.request).await;
            let fenced =
                matches!(&answer, Err(allot::Error::Fenced(_))) && !leaving.load(Ordering::Acquire);
            if tx.send(Ok(reply(req.id, answer))).await.is_ok() && fenced {
                let _ = tx
                    .send(Err(errors::status(
                        "fenced",
                        "the member's lease is gone; join again",
                    )))
                    .await;
            }
        });
    }
    tend.abort();
    tracing::info!(%member, "member session ended; the lease runs out unless renewed elsewhere");
}

fn reply(id: u64, answer: allot::Result<Response>) -> pb::SessionResponse {
    let response = match answer {
        Ok(r) => r,
        Err(e) => Response::Error(pb::SessionError {
            code: e.code().to_string(),
            message: e.to_string(),
        }),
    };
    pb::SessionResponse {
        id,
        response: Some(response),
    }
}

async fn handle(session: &MemberSession, request: Option<Request>) -> allot::Result<Response> {
    let invalid = |m: &str| allot::Error::InvalidInput(m.to_string());
    match request.ok_or_else(|| invalid("empty request"))? {
        Request::Join(_) => Err(invalid("this session has joined already")),
        Request::KeepAlive(_) => {
            session.keep_alive().await?;
            Ok(Response::KeepAlive(pb::KeepAliveAck {}))
        }
        Request::OpenPool(r) => {
            let info = session.open_pool(&r.pool).await?;
            Ok(Response::Pool(convert::pool_to_pb(info)))
        }
        Request::Acquire(r) => Ok(Response::Granted(grant_to_pb(
            session.acquire(&r.pool).await?,
        ))),
        Request::Commit(r) => {
            let changes: Vec<allot::BlockChange> = r
                .changes
                .into_iter()
                .map(|c| allot::BlockChange {
                    block: c.block,
                    allocated: c.allocated,
                    released: c.released,
                })
                .collect();
            let lost = match session.commit(&r.pool, &changes).await? {
                CommitOutcome::Stored => Vec::new(),
                CommitOutcome::Lost(lost) => lost,
            };
            Ok(Response::Committed(pb::CommitResult { lost }))
        }
        Request::GiveBack(r) => {
            let given_back = session.give_back(&r.pool, r.block).await?;
            Ok(Response::GivenBack(pb::GiveBackResult { given_back }))
        }
        Request::Leave(_) => Err(invalid("leave is handled by the session")),
    }
}

fn grant_to_pb(g: Grant) -> pb::BlockGrant {
    pb::BlockGrant {
        pool: g.pool,
        block: g.block,
        epoch: g.epoch,
        in_use: g
            .in_use
            .into_iter()
            .map(|(start, end)| pb::OffsetRun { start, end })
            .collect(),
        scan: g.scan,
        from: g.from,
    }
}

/// Takes over orphans for the member whenever members or owners change,
/// and tells it.
async fn tend(session: Arc<MemberSession>, tx: mpsc::Sender<Answer>) {
    loop {
        let seen = session.version();
        match session.tend().await {
            Ok(news) => {
                for n in news {
                    let response = match n {
                        SessionNews::Granted(g) => Response::Granted(grant_to_pb(g)),
                        SessionNews::PoolGone(pool) => Response::PoolGone(pb::PoolGone { pool }),
                    };
                    let msg = pb::SessionResponse {
                        id: 0,
                        response: Some(response),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => tracing::debug!(member = %session.record().name, "session housekeeping: {e}"),
        }
        tokio::select! {
            () = tx.closed() => return,
            () = session.changed_since(seen, TEND_EVERY) => {}
        }
    }
}
