//! CPU time used by this process and by another one (the server), so a
//! run shows where the two cores went.

use std::time::Duration;

/// User plus system CPU time of this process.
pub fn own() -> Option<Duration> {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return None;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    Some(tv(usage.ru_utime) + tv(usage.ru_stime))
}

/// User plus system CPU time of process `pid` (all its threads), from
/// `/proc/PID/stat`; `None` where that cannot be read.
pub fn of_pid(pid: u32) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    ticks_from_stat(&text).map(|t| Duration::from_secs_f64(t as f64 / clock_ticks()))
}

/// utime + stime in clock ticks from the text of `/proc/PID/stat`.
fn ticks_from_stat(text: &str) -> Option<u64> {
    // The command name may contain spaces and parentheses: fields start
    // after the last ')'. Then: state(3) ... utime(14) stime(15).
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Busy CPU time of the whole machine (all cores, every process: user,
/// nice, system, irq, softirq, steal), from `/proc/stat`.
pub fn host() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    busy_ticks(&text).map(|t| Duration::from_secs_f64(t as f64 / clock_ticks()))
}

/// Busy ticks from the `cpu` line of `/proc/stat` (idle and iowait are not
/// busy; guest time is already counted in user).
fn busy_ticks(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 8 {
        return None;
    }
    // user nice system idle iowait irq softirq steal
    Some(v[0] + v[1] + v[2] + v[5] + v[6] + v[7])
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        let stat = "123 (a b) c)) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 8 0";
        assert_eq!(ticks_from_stat(stat), Some(300));
        assert_eq!(ticks_from_stat("garbage"), None);
    }

    #[test]
    fn parses_proc_stat() {
        let stat = "cpu  10 1 5 100 7 2 3 4 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n";
        assert_eq!(busy_ticks(stat), Some(25));
        assert_eq!(busy_ticks("cpu  1 2\n"), None);
    }

    #[test]
    fn reads_own_cpu() {
        assert!(host().is_some());
        assert!(own().is_some());
        assert!(of_pid(std::process::id()).is_some());
    }
}
