//! Readers for the few /proc files the benchmarks sample: a process's resident memory and CPU
//! time, its smaps_rollup breakdown, and the kernel's TCP socket memory.

use std::time::{Duration, Instant};

/// `VmRSS` of a process in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&s, "VmRSS:").map(|k| k * 1024)
}

fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l[name.len()..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The interesting lines of `/proc/PID/smaps_rollup`, in bytes.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Rollup {
    pub rss: u64,
    pub anonymous: u64,
    pub private_dirty: u64,
    pub shared_clean: u64,
    pub anon_huge_pages: u64,
}

pub fn smaps_rollup(pid: u32) -> Option<Rollup> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let f = |n: &str| kib_field(&s, n).unwrap_or(0) * 1024;
    Some(Rollup {
        rss: f("Rss:"),
        anonymous: f("Anonymous:"),
        private_dirty: f("Private_Dirty:"),
        shared_clean: f("Shared_Clean:"),
        anon_huge_pages: f("AnonHugePages:"),
    })
}

/// User + system CPU time of a whole process (all threads), in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 overall, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) as f64 / hz)
}

/// Number of threads of a process.
pub fn threads(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&s, "Threads:")
}

/// Kernel TCP memory from /proc/net/sockstat: (`inuse` sockets, `mem` pages).
pub fn tcp_sockstat() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = s.lines().find(|l| l.starts_with("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let get = |k: &str| {
        words
            .iter()
            .position(|w| *w == k)
            .and_then(|i| words.get(i + 1))
            .and_then(|v| v.parse().ok())
    };
    Some((get("inuse")?, get("mem")?))
}

pub fn page_size() -> u64 {
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

/// Waits until the RSS of `pid` stops moving (less than 0.5 % change over `quiet`), at most
/// `limit`. Returns the last reading.
pub fn settled_rss(pid: u32, quiet: Duration, limit: Duration) -> Option<u64> {
    let start = Instant::now();
    let mut last = rss_bytes(pid)?;
    let mut since = Instant::now();
    while start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(250));
        let now = rss_bytes(pid)?;
        let diff = now.abs_diff(last) as f64;
        if diff > last as f64 * 0.005 {
            since = Instant::now();
            last = now;
        } else if since.elapsed() >= quiet {
            return Some(now);
        }
    }
    Some(last)
}

/// System-wide kernel slab memory (`Slab:` in /proc/meminfo), in bytes: socket structures live
/// there, not in the process's RSS.
pub fn slab_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    kib_field(&s, "Slab:").map(|k| k * 1024)
}
