//! Per-shard counters, gauges and histograms, and their Prometheus text rendering.
//!
//! Owns: what the server counts. Each shard writes only its own `ShardMetrics` (relaxed atomic
//! stores on a cache line no other shard writes, so counting costs no contention); the admin
//! thread only reads. Must not be read on a hot path or used to make decisions.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::protocol::ErrorCode;

/// Client frame types, for `frames_in_total{type=..}`.
pub const FRAME_TYPES: [&str; 12] = [
    "ack",
    "send",
    "read",
    "typing",
    "edit",
    "delete",
    "group",
    "devices",
    "unlink",
    "history",
    "dev_clock",
    "invalid",
];

/// Upper bounds (ms) of the commit latency buckets.
const COMMIT_MS_BUCKETS: [f64; 12] = [
    0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0,
];
/// Upper bounds of the commit batch size buckets (writes per transaction).
const BATCH_OPS_BUCKETS: [f64; 10] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0,
];

/// A fixed-bucket histogram (cumulative on render).
pub struct Histogram<const N: usize> {
    bounds: &'static [f64; N],
    buckets: [AtomicU64; N],
    over: AtomicU64,
    sum_micro: AtomicU64,
    count: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    fn new(bounds: &'static [f64; N]) -> Self {
        Histogram {
            bounds,
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            over: AtomicU64::new(0),
            sum_micro: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        match self.bounds.iter().position(|bound| value <= *bound) {
            Some(i) => bump(&self.buckets[i]),
            None => bump(&self.over),
        }
        self.sum_micro
            .fetch_add((value * 1e6) as u64, Ordering::Relaxed);
        bump(&self.count);
    }

    /// The value below which `q` of the observations fall (bucket upper bound; 0 when empty).
    pub fn quantile(&self, q: f64) -> f64 {
        let total = self.count.load(Ordering::Relaxed);
        if total == 0 {
            return 0.0;
        }
        let target = (total as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (bucket, bound) in self.buckets.iter().zip(self.bounds) {
            seen += bucket.load(Ordering::Relaxed);
            if seen >= target {
                return *bound;
            }
        }
        self.bounds[N - 1] * 2.0
    }

    fn render(&self, out: &mut String, name: &str, shard: usize) {
        let mut cumulative = 0;
        for (bucket, bound) in self.buckets.iter().zip(self.bounds) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{shard=\"{shard}\",le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.over.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{shard=\"{shard}\",le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{shard=\"{shard}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{shard=\"{shard}\"}} {cumulative}");
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// One shard's metrics. Written by that shard only.
pub struct ShardMetrics {
    pub shard: usize,
    pub connections: AtomicU64,
    pub online_devices: AtomicU64,
    pub handshakes_total: AtomicU64,
    pub auth_failures_total: AtomicU64,
    pub frames_in_total: [AtomicU64; FRAME_TYPES.len()],
    pub frames_out_total: AtomicU64,
    pub errors_total: [AtomicU64; 16],
    pub messages_total: AtomicU64,
    pub events_appended_total: AtomicU64,
    pub deliveries_total: AtomicU64,
    pub commits_total: AtomicU64,
    pub commit_failures_total: AtomicU64,
    pub slow_consumer_closes_total: AtomicU64,
    pub cross_shard_queue_depth: AtomicU64,
    pub pending_commits: AtomicU64,
    pub owned_users: AtomicU64,
    /// 1 once the shard accepts connections; 0 when it stopped or its storage failed.
    pub ready: AtomicU64,
    /// 1 while the last commit failed (storage full or broken).
    pub storage_failing: AtomicU64,
    pub commit_ms: Histogram<12>,
    pub commit_batch_ops: Histogram<10>,
}

impl ShardMetrics {
    pub fn new(shard: usize) -> Arc<Self> {
        Arc::new(ShardMetrics {
            shard,
            connections: AtomicU64::new(0),
            online_devices: AtomicU64::new(0),
            handshakes_total: AtomicU64::new(0),
            auth_failures_total: AtomicU64::new(0),
            frames_in_total: std::array::from_fn(|_| AtomicU64::new(0)),
            frames_out_total: AtomicU64::new(0),
            errors_total: std::array::from_fn(|_| AtomicU64::new(0)),
            messages_total: AtomicU64::new(0),
            events_appended_total: AtomicU64::new(0),
            deliveries_total: AtomicU64::new(0),
            commits_total: AtomicU64::new(0),
            commit_failures_total: AtomicU64::new(0),
            slow_consumer_closes_total: AtomicU64::new(0),
            cross_shard_queue_depth: AtomicU64::new(0),
            pending_commits: AtomicU64::new(0),
            owned_users: AtomicU64::new(0),
            ready: AtomicU64::new(0),
            storage_failing: AtomicU64::new(0),
            commit_ms: Histogram::new(&COMMIT_MS_BUCKETS),
            commit_batch_ops: Histogram::new(&BATCH_OPS_BUCKETS),
        })
    }

    pub fn count(counter: &AtomicU64) {
        bump(counter);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }

    pub fn frame_in(&self, kind: &str) {
        let index = FRAME_TYPES
            .iter()
            .position(|t| *t == kind)
            .unwrap_or(FRAME_TYPES.len() - 1);
        bump(&self.frames_in_total[index]);
    }

    pub fn error(&self, code: ErrorCode) {
        bump(&self.errors_total[code as usize]);
    }

    pub fn commit(&self, latency: Duration, ops: usize) {
        bump(&self.commits_total);
        self.commit_ms.observe(latency.as_secs_f64() * 1000.0);
        self.commit_batch_ops.observe(ops as f64);
    }

    pub fn get(gauge: &AtomicU64) -> u64 {
        gauge.load(Ordering::Relaxed)
    }
}

/// (name, type, help, which field) of a metric with one sample per shard.
type SimpleMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ShardMetrics) -> &AtomicU64,
);

/// Renders every shard's metrics in the Prometheus text exposition format (0.0.4).
pub fn render_prometheus(shards: &[Arc<ShardMetrics>], uptime: Duration) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let _ = writeln!(
        out,
        "# HELP courier_uptime_seconds Seconds since the server started."
    );
    let _ = writeln!(out, "# TYPE courier_uptime_seconds gauge");
    let _ = writeln!(out, "courier_uptime_seconds {}", uptime.as_secs_f64());
    let simple: [SimpleMetric; 16] = [
        (
            "courier_connections",
            "gauge",
            "Open client connections.",
            |m| &m.connections,
        ),
        (
            "courier_online_devices",
            "gauge",
            "Devices online, counted on their owner shard.",
            |m| &m.online_devices,
        ),
        (
            "courier_handshakes_total",
            "counter",
            "Completed WebSocket upgrades.",
            |m| &m.handshakes_total,
        ),
        (
            "courier_auth_failures_total",
            "counter",
            "Upgrades refused with 401.",
            |m| &m.auth_failures_total,
        ),
        (
            "courier_frames_out_total",
            "counter",
            "Frames written to clients.",
            |m| &m.frames_out_total,
        ),
        (
            "courier_messages_total",
            "counter",
            "Sends accepted (sender's owner).",
            |m| &m.messages_total,
        ),
        (
            "courier_events_appended_total",
            "counter",
            "Events committed to users' logs.",
            |m| &m.events_appended_total,
        ),
        (
            "courier_deliveries_total",
            "counter",
            "Live events handed to connections.",
            |m| &m.deliveries_total,
        ),
        (
            "courier_commits_total",
            "counter",
            "Batches committed by the storage writer.",
            |m| &m.commits_total,
        ),
        (
            "courier_commit_failures_total",
            "counter",
            "Batches the storage writer failed.",
            |m| &m.commit_failures_total,
        ),
        (
            "courier_slow_consumer_closes_total",
            "counter",
            "Connections closed with 4009.",
            |m| &m.slow_consumer_closes_total,
        ),
        (
            "courier_cross_shard_queue_depth",
            "gauge",
            "Messages waiting for other shards.",
            |m| &m.cross_shard_queue_depth,
        ),
        (
            "courier_pending_commits",
            "gauge",
            "Batches handed to the writer, not yet committed.",
            |m| &m.pending_commits,
        ),
        (
            "courier_owned_users",
            "gauge",
            "Users whose state this shard holds in memory.",
            |m| &m.owned_users,
        ),
        (
            "courier_shard_ready",
            "gauge",
            "1 while the shard accepts connections.",
            |m| &m.ready,
        ),
        (
            "courier_storage_failing",
            "gauge",
            "1 while the shard's last commit failed.",
            |m| &m.storage_failing,
        ),
    ];
    for (name, kind, help, field) in simple {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for m in shards {
            let _ = writeln!(
                out,
                "{name}{{shard=\"{}\"}} {}",
                m.shard,
                field(m).load(Ordering::Relaxed)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP courier_frames_in_total Client frames received, by type."
    );
    let _ = writeln!(out, "# TYPE courier_frames_in_total counter");
    for m in shards {
        for (kind, counter) in FRAME_TYPES.iter().zip(&m.frames_in_total) {
            let _ = writeln!(
                out,
                "courier_frames_in_total{{shard=\"{}\",type=\"{kind}\"}} {}",
                m.shard,
                counter.load(Ordering::Relaxed)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP courier_errors_total Error frames sent, by code."
    );
    let _ = writeln!(out, "# TYPE courier_errors_total counter");
    for m in shards {
        for (code, counter) in ErrorCode::ALL.iter().zip(&m.errors_total) {
            let _ = writeln!(
                out,
                "courier_errors_total{{shard=\"{}\",code=\"{}\"}} {}",
                m.shard,
                code.as_str(),
                counter.load(Ordering::Relaxed)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP courier_commit_latency_ms Time from handing a batch to the writer to its completion."
    );
    let _ = writeln!(out, "# TYPE courier_commit_latency_ms histogram");
    for m in shards {
        m.commit_ms
            .render(&mut out, "courier_commit_latency_ms", m.shard);
    }
    let _ = writeln!(
        out,
        "# HELP courier_commit_batch_ops Writes per committed batch."
    );
    let _ = writeln!(out, "# TYPE courier_commit_batch_ops histogram");
    for m in shards {
        m.commit_batch_ops
            .render(&mut out, "courier_commit_batch_ops", m.shard);
    }
    out
}

/// The dashboard's JSON view of every shard.
pub fn render_stats(shards: &[Arc<ShardMetrics>], uptime: Duration) -> String {
    let list: Vec<serde_json::Value> = shards
        .iter()
        .map(|m| {
            serde_json::json!({
                "shard": m.shard,
                "connections": ShardMetrics::get(&m.connections),
                "online_devices": ShardMetrics::get(&m.online_devices),
                "messages_total": ShardMetrics::get(&m.messages_total),
                "deliveries_total": ShardMetrics::get(&m.deliveries_total),
                "events_total": ShardMetrics::get(&m.events_appended_total),
                "commits_total": ShardMetrics::get(&m.commits_total),
                "commit_ms_p50": m.commit_ms.quantile(0.5),
                "commit_ms_p99": m.commit_ms.quantile(0.99),
                "queue_depth": ShardMetrics::get(&m.cross_shard_queue_depth),
                "pending_commits": ShardMetrics::get(&m.pending_commits),
                "owned_users": ShardMetrics::get(&m.owned_users),
            })
        })
        .collect();
    serde_json::json!({"uptime_s": uptime.as_secs(), "shards": list}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_help_type_and_cumulative_buckets() {
        let m = ShardMetrics::new(0);
        ShardMetrics::count(&m.messages_total);
        m.commit(Duration::from_micros(700), 3);
        m.commit(Duration::from_millis(5), 40);
        m.frame_in("send");
        m.frame_in("bogus");
        m.error(ErrorCode::Busy);
        let text = render_prometheus(std::slice::from_ref(&m), Duration::from_secs(3));
        assert!(text.contains("courier_messages_total{shard=\"0\"} 1"));
        assert!(text.contains("courier_frames_in_total{shard=\"0\",type=\"send\"} 1"));
        assert!(text.contains("courier_frames_in_total{shard=\"0\",type=\"invalid\"} 1"));
        assert!(text.contains("courier_errors_total{shard=\"0\",code=\"busy\"} 1"));
        assert!(text.contains("courier_commit_latency_ms_bucket{shard=\"0\",le=\"1\"} 1"));
        assert!(text.contains("courier_commit_latency_ms_bucket{shard=\"0\",le=\"+Inf\"} 2"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "not a sample: {line}");
        }
        assert_eq!(m.commit_ms.quantile(0.5), 1.0);
    }
}
