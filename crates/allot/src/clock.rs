/// Time as the engine reads it, injectable so tests can move it: wall-clock
/// milliseconds (quarantine, timestamps) and a monotonic reading (a
/// member's judgement of its own lease: never the wall clock, which can
/// jump).
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;

    /// Monotonic nanoseconds since an arbitrary origin fixed for the
    /// process.
    fn mono_ns(&self) -> u64 {
        static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        ORIGIN
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_nanos() as u64
    }
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    /// Linux's coarse monotonic clock: a few ns to read instead of ~20 (it
    /// is on every value a member hands out), at the price of lagging by up
    /// to one scheduler tick (≤ 10 ms), far inside a member's safety margin
    /// (≥ 100 ms), so a lease is never trusted past its end because of it.
    #[cfg(target_os = "linux")]
    fn mono_ns(&self) -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime only writes the timespec we own.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
        if rc != 0 {
            // Fail closed: "time far past every lease end", so a member
            // stops trusting its lease rather than trusting it forever.
            return u64::MAX;
        }
        (ts.tv_sec as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec as u64)
    }
}

/// A clock that only moves when told to (tests and simulation).
#[derive(Debug, Default)]
pub struct ManualClock(std::sync::atomic::AtomicU64);

impl ManualClock {
    pub fn new(start_ms: u64) -> Self {
        ManualClock(std::sync::atomic::AtomicU64::new(start_ms))
    }
    pub fn advance_ms(&self, ms: u64) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn mono_ns(&self) -> u64 {
        self.now_ms().saturating_mul(1_000_000)
    }
}

/// The system's wall clock with tokio's monotonic clock, so that tests on
/// tokio's paused clock (`start_paused`) drive member leases and fencing.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    pub fn new() -> Self {
        TokioClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> u64 {
        SystemClock.now_ms()
    }
    fn mono_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
}

impl<C: Clock> Clock for std::sync::Arc<C> {
    fn now_ms(&self) -> u64 {
        (**self).now_ms()
    }
    fn mono_ns(&self) -> u64 {
        (**self).mono_ns()
    }
}
