//! CPU time spent during the publishing window, by the server under test (`--server-pid`) and
//! by this tool itself, from `/proc/<pid>/stat`: the load tool shares the machine with the
//! server, so a result is only readable next to what each side burned to produce it.

use std::time::Instant;

use serde::Serialize;

/// User plus system CPU seconds of process `pid` so far (`/proc/<pid>/stat` fields 14 and 15).
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat).map(|ticks| ticks as f64 / clock_ticks_per_second())
}

/// utime + stime, in clock ticks. The command name (field 2) is in parentheses and may itself
/// hold spaces and parentheses, so fields are counted from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: field 3 (state) is index 0, so utime (14) is index 11, stime (15) 12.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// A measurement in progress: the CPU counters at its start.
pub struct CpuWindow {
    began: Instant,
    server_pid: Option<u32>,
    server: Option<f64>,
    own: Option<f64>,
}

/// What a window measured: cores = CPU seconds / wall seconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CpuReport {
    pub window_s: f64,
    /// `None` without `--server-pid`, or when the server's stat could not be read.
    pub server_cores: Option<f64>,
    pub loadtest_cores: Option<f64>,
}

impl CpuWindow {
    pub fn start(server_pid: Option<u32>) -> CpuWindow {
        CpuWindow {
            began: Instant::now(),
            server_pid,
            server: server_pid.and_then(process_cpu_seconds),
            own: process_cpu_seconds(std::process::id()),
        }
    }

    pub fn finish(self) -> CpuReport {
        let window_s = self.began.elapsed().as_secs_f64();
        let cores = |before: Option<f64>, now: Option<f64>| match (before, now) {
            (Some(b), Some(n)) if window_s > 0.0 => Some((n - b).max(0.0) / window_s),
            _ => None,
        };
        CpuReport {
            window_s,
            server_cores: cores(self.server, self.server_pid.and_then(process_cpu_seconds)),
            loadtest_cores: cores(self.own, process_cpu_seconds(std::process::id())),
        }
    }
}

impl CpuReport {
    /// Microseconds of server CPU per acknowledged operation.
    pub fn server_us_per(&self, ops: u64) -> Option<f64> {
        let cores = self.server_cores?;
        (ops > 0).then(|| cores * self.window_s * 1e6 / ops as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_read_after_the_command_name() {
        let stat = "4242 (tokio (rt) 2) S 1 4242 4242 0 -1 4194560 1234 0 0 0 350 75 0 0 20 0 9 0 \
                    100 2000000 500 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(425));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn this_process_is_measured_and_burning_cpu_shows() {
        let window = CpuWindow::start(Some(std::process::id()));
        let began = Instant::now();
        let mut x = 0u64;
        while began.elapsed().as_millis() < 200 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let report = window.finish();
        let own = report.loadtest_cores.expect("own stat readable");
        assert!(own > 0.2, "a busy loop of 200 ms used {own} cores");
        assert!(report.server_cores.is_some());
        assert!(report.server_us_per(10).unwrap() > 0.0);
        assert_eq!(report.server_us_per(0), None);
    }
}
