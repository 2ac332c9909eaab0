//! Latency summaries and the table every run prints.

use std::time::Duration;

/// What one concurrency level measured.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Concurrent clients (one connection each).
    pub clients: usize,
    /// Operations answered and verified inside the measured window.
    pub ops: u64,
    /// Operations that failed (transport error, non-2xx, unexpected body).
    pub errors: u64,
    /// Measured window: from the end of the warm-up to the last answer.
    pub window: Duration,
    /// Mean, p50, p99 and max latency of the verified operations.
    pub mean: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// CPU used by this process during the window, in cores (1.0 = one
    /// core busy all the time).
    pub client_cpu: f64,
    /// CPU used by the server process during the window, when its pid is
    /// known.
    pub server_cpu: Option<f64>,
    /// CPU used by everything else on the machine during the window (other
    /// people's builds, ...): busy CPU of the host minus client and server.
    pub other_cpu: Option<f64>,
}

impl Summary {
    /// Verified operations per second.
    pub fn rate(&self) -> f64 {
        let secs = self.window.as_secs_f64();
        if secs > 0.0 {
            self.ops as f64 / secs
        } else {
            0.0
        }
    }
}

/// Mean and percentiles of latencies in nanoseconds; sorts `ns` in place.
/// Returns zeros for an empty slice.
pub fn latencies(ns: &mut [u64]) -> (Duration, Duration, Duration, Duration) {
    if ns.is_empty() {
        return (
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
        );
    }
    ns.sort_unstable();
    let sum: u128 = ns.iter().map(|&n| u128::from(n)).sum();
    let mean = u64::try_from(sum / ns.len() as u128).unwrap_or(u64::MAX);
    let pct = |p: f64| {
        // Nearest rank: the smallest value with at least p of the sample at
        // or below it.
        let rank = (p * ns.len() as f64).ceil() as usize;
        ns[rank.clamp(1, ns.len()) - 1]
    };
    (
        Duration::from_nanos(mean),
        Duration::from_nanos(pct(0.50)),
        Duration::from_nanos(pct(0.99)),
        Duration::from_nanos(ns[ns.len() - 1]),
    )
}

/// The table header.
pub fn header() -> String {
    format!(
        "{:>8} | {:>9} | {:>9} | {:>8} | {:>8} | {:>8} | {:>8} | {:>6} | {:>10} | {:>10} | {:>9}",
        "clients",
        "requests",
        "req/s",
        "mean ms",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errors",
        "client cpu",
        "server cpu",
        "other cpu"
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One table row.
pub fn row(s: &Summary) -> String {
    let cores = |c: Option<f64>| c.map_or("-".to_string(), |c| format!("{c:.2}"));
    format!(
        "{:>8} | {:>9} | {:>9.0} | {:>8.3} | {:>8.3} | {:>8.3} | {:>8.3} | {:>6} | {:>10.2} | {:>10} | {:>9}",
        s.clients,
        s.ops,
        s.rate(),
        ms(s.mean),
        ms(s.p50),
        ms(s.p99),
        ms(s.max),
        s.errors,
        s.client_cpu,
        cores(s.server_cpu),
        cores(s.other_cpu)
    )
}

/// One tab-separated line for `--results`: label, workload, then the
/// row's numbers (latencies in ms).
pub fn tsv(label: &str, workload: &str, s: &Summary) -> String {
    format!(
        "{label}\t{workload}\t{}\t{}\t{:.1}\t{:.3}\t{:.3}\t{:.3}\t{:.3}\t{}\t{:.2}\t{}\t{}",
        s.clients,
        s.ops,
        s.rate(),
        ms(s.mean),
        ms(s.p50),
        ms(s.p99),
        ms(s.max),
        s.errors,
        s.client_cpu,
        s.server_cpu.map_or("-".to_string(), |c| format!("{c:.2}")),
        s.other_cpu.map_or("-".to_string(), |c| format!("{c:.2}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).rev().collect();
        let (mean, p50, p99, max) = latencies(&mut v);
        assert_eq!(mean, Duration::from_nanos(50));
        assert_eq!(p50, Duration::from_nanos(50));
        assert_eq!(p99, Duration::from_nanos(99));
        assert_eq!(max, Duration::from_nanos(100));
        let (mean, p50, p99, max) = latencies(&mut [7]);
        assert_eq!(
            (mean, p50, p99, max),
            (
                Duration::from_nanos(7),
                Duration::from_nanos(7),
                Duration::from_nanos(7),
                Duration::from_nanos(7)
            )
        );
        assert_eq!(latencies(&mut []).0, Duration::ZERO);
    }

    #[test]
    fn rate_uses_the_window() {
        let s = Summary {
            ops: 500,
            window: Duration::from_millis(250),
            ..Default::default()
        };
        assert_eq!(s.rate(), 2000.0);
        assert_eq!(Summary::default().rate(), 0.0);
    }
}
