//! The measuring loop: N clients, each one connection doing one operation
//! at a time (no pipelining), for a warm-up and then a measured window.
//!
//! Only operations that start after the warm-up count. An operation counts
//! as done only when its answer was verified (2xx and the expected body, or
//! the expected Redis reply); everything else is an error, counted apart and
//! never in the latencies. The window runs from the end of the warm-up to
//! the last answer, so the operations in flight when time is up (at most
//! one per client) are counted with the time they took.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::cpu;
use crate::stats::{self, Summary};

/// Why an operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpError {
    /// The connection failed or broke; the client reconnects before its
    /// next operation, after a short pause.
    Transport(String),
    /// The server answered, but not with a verified success.
    Answer(String),
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpError::Transport(m) => write!(f, "transport: {m}"),
            OpError::Answer(m) => write!(f, "answer: {m}"),
        }
    }
}

impl std::error::Error for OpError {}

/// One benchmark client: a connection and the operation it repeats.
pub trait Client: Send + 'static {
    /// Runs operation number `seq` of this client and verifies the answer.
    /// Returns the value claimed (for the duplicate check).
    fn op(&mut self, seq: u64) -> impl Future<Output = Result<u64, OpError>> + Send;
}

/// Timing of a level.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub warmup: Duration,
    pub measure: Duration,
}

/// What a level measured, with what is needed to check it.
#[derive(Debug, Clone)]
pub struct LevelResult {
    pub summary: Summary,
    /// Up to a few distinct error messages, for the report.
    pub error_samples: Vec<String>,
    /// The values claimed in the window, when `keep_values` was set.
    pub values: Vec<u64>,
}

struct ClientOut {
    latencies: Vec<u64>,
    values: Vec<u64>,
    errors: u64,
    error_samples: Vec<String>,
    last: Option<Instant>,
}

const MAX_ERROR_SAMPLES: usize = 3;

async fn client_loop<C: Client>(
    mut client: C,
    warm_end: Instant,
    end: Instant,
    keep_values: bool,
) -> ClientOut {
    let mut out = ClientOut {
        latencies: Vec::with_capacity(1 << 14),
        values: Vec::new(),
        errors: 0,
        error_samples: Vec::new(),
        last: None,
    };
    let mut seq = 0u64;
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let r = client.op(seq).await;
        seq += 1;
        let t1 = Instant::now();
        let measured = t0 >= warm_end;
        if measured {
            out.last = Some(t1);
        }
        match r {
            Ok(v) => {
                if measured {
                    out.latencies
                        .push(u64::try_from((t1 - t0).as_nanos()).unwrap_or(u64::MAX));
                    if keep_values {
                        out.values.push(v);
                    }
                }
            }
            Err(e) => {
                if measured {
                    out.errors += 1;
                    let msg = e.to_string();
                    if out.error_samples.len() < MAX_ERROR_SAMPLES
                        && !out.error_samples.contains(&msg)
                    {
                        out.error_samples.push(msg);
                    }
                }
                if matches!(e, OpError::Transport(_)) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    out
}

/// Runs `clients` concurrently for `timing` and summarizes. `server_pid`
/// (Linux) adds the server's CPU use over the window.
pub async fn run_level<C: Client>(
    clients: Vec<C>,
    timing: Timing,
    keep_values: bool,
    server_pid: Option<u32>,
) -> LevelResult {
    let n = clients.len();
    let start = Instant::now();
    let warm_end = start + timing.warmup;
    let end = warm_end + timing.measure;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(client_loop(c, warm_end, end, keep_values)))
        .collect();
    tokio::time::sleep_until(tokio::time::Instant::from_std(warm_end)).await;
    let cpu0 = cpu::own();
    let srv0 = server_pid.and_then(cpu::of_pid);
    let host0 = cpu::host();
    let mut latencies = Vec::new();
    let mut values = Vec::new();
    let mut errors = 0;
    let mut error_samples: Vec<String> = Vec::new();
    let mut last = warm_end;
    for t in tasks {
        match t.await {
            Ok(out) => {
                latencies.extend_from_slice(&out.latencies);
                values.extend_from_slice(&out.values);
                errors += out.errors;
                for m in out.error_samples {
                    if error_samples.len() < MAX_ERROR_SAMPLES && !error_samples.contains(&m) {
                        error_samples.push(m);
                    }
                }
                if let Some(l) = out.last {
                    last = last.max(l);
                }
            }
            Err(e) => {
                errors += 1;
                error_samples.push(format!("client task failed: {e}"));
            }
        }
    }
    let finished = Instant::now();
    let window = last.saturating_duration_since(warm_end);
    let window = if window.is_zero() {
        timing.measure
    } else {
        window
    };
    // CPU over the span the snapshots cover (window plus joining).
    let span = finished.saturating_duration_since(warm_end).as_secs_f64();
    let per_core = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
        (Some(a), Some(b)) if span > 0.0 => Some(b.saturating_sub(a).as_secs_f64() / span),
        _ => None,
    };
    let client_cpu = per_core(cpu0, cpu::own()).unwrap_or(0.0);
    let server_cpu = per_core(srv0, server_pid.and_then(cpu::of_pid));
    let host_cpu = per_core(host0, cpu::host());
    // Only meaningful when the server's share is known.
    let other_cpu = match (host_cpu, server_cpu) {
        (Some(h), Some(s)) => Some((h - s - client_cpu).max(0.0)),
        _ => None,
    };
    let (mean, p50, p99, max) = stats::latencies(&mut latencies);
    LevelResult {
        summary: Summary {
            clients: n,
            ops: latencies.len() as u64,
            errors,
            window,
            mean,
            p50,
            p99,
            max,
            client_cpu,
            server_cpu,
            other_cpu,
        },
        error_samples,
        values,
    }
}

/// How many values occur more than once (sorts `values`).
pub fn duplicates(values: &mut [u64]) -> usize {
    values.sort_unstable();
    values.windows(2).filter(|w| w[0] == w[1]).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counter {
        id: u64,
        fail_every: u64,
    }

    impl Client for Counter {
        async fn op(&mut self, seq: u64) -> Result<u64, OpError> {
            tokio::time::sleep(Duration::from_millis(1)).await;
            if self.fail_every > 0 && seq % self.fail_every == 0 {
                return Err(OpError::Answer("no".into()));
            }
            Ok(self.id * 1_000_000 + seq)
        }
    }

    #[tokio::test]
    async fn counts_verified_answers_and_errors_apart() {
        let clients = (0..4)
            .map(|id| Counter { id, fail_every: 5 })
            .collect::<Vec<_>>();
        let timing = Timing {
            warmup: Duration::from_millis(20),
            measure: Duration::from_millis(200),
        };
        let r = run_level(clients, timing, true, None).await;
        let s = &r.summary;
        assert_eq!(s.clients, 4);
        assert!(s.ops > 100, "{s:?}");
        assert!(s.errors > 10, "{s:?}");
        assert_eq!(r.values.len() as u64, s.ops);
        assert!(s.window >= Duration::from_millis(200));
        assert!(s.p50 >= Duration::from_millis(1));
        assert_eq!(r.error_samples, vec!["answer: no".to_string()]);
        let mut v = r.values.clone();
        assert_eq!(duplicates(&mut v), 0);
        assert_eq!(duplicates(&mut [3, 1, 3, 2, 1]), 2);
    }
}
