#!/usr/bin/env python3
"""Medians of the JSON results in bench/results/ (written by bench/run-all.sh), as markdown."""
import glob, json, os, statistics, sys

R = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results")

def load(pat):
    return [json.load(open(p)) for p in sorted(glob.glob(os.path.join(R, pat)))]

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")

def kib(b):
    return f"{b / 1024:.2f}"

print("### connect (medians)\n")
print("| server | N | runs | connects/s | RSS/conn KiB | anon/conn KiB | RSS after MiB | kernel slab/conn KiB (both ends) | sockstat TCP mem/conn KiB | failed |")
print("|---|---|---|---|---|---|---|---|---|---|")
for tag, label in [("s1", "courier 1 shard, cpu0"), ("s2", "courier 2 shards, unpinned"), ("nats", "nats-server, cpu0"), ("ejabberd", "ejabberd 23.01, cpu0")]:
    for n in [1000, 5000, 10000, 19000]:
        rs = load(f"connect-{tag}-{n}-*.json")
        if not rs:
            continue
        print(f"| {label} | {n} | {len(rs)} | {med([r['connects_per_sec'] for r in rs]):.0f} | "
              f"{kib(med([r['rss_per_conn'] for r in rs]))} | {kib(med([r['anon_per_conn'] for r in rs]))} | "
              f"{med([r['rss_after'] for r in rs]) / 1048576:.1f} | {kib(med([r['slab_per_conn'] for r in rs]))} | "
              f"{kib(med([r['kernel_tcp_per_conn'] for r in rs]))} | {sum(r['failed'] for r in rs)} |")
# marginal slope between N values for courier 1 shard
pts = []
for n in [1000, 5000, 10000, 19000]:
    rs = load(f"connect-s1-{n}-*.json")
    if rs:
        pts.append((n, med([r['rss_after'] - r['rss_before'] for r in rs])))
if len(pts) >= 2:
    print("\nMarginal server RSS per connection (courier 1 shard, difference of medians):\n")
    for (n0, b0), (n1, b1) in zip(pts, pts[1:]):
        print(f"- {n0} → {n1}: {kib((b1 - b0) / (n1 - n0))} KiB/conn")

def fan(pat, label):
    rs = load(pat)
    if not rs:
        return
    g = lambda f: med([f(r) for r in rs])
    print(f"| {label} | {len(rs)} | {g(lambda r: r['rate_target']):.0f} | {g(lambda r: r['sends_per_sec']):.0f} | "
          f"{g(lambda r: r['deliveries_per_sec']):.0f} | {g(lambda r: r['device_latency']['p50_us'])/1000:.2f} | "
          f"{g(lambda r: r['device_latency']['p90_us'])/1000:.2f} | {g(lambda r: r['device_latency']['p99_us'])/1000:.2f} | "
          f"{g(lambda r: r['device_latency']['p999_us'])/1000:.2f} | {g(lambda r: r['device_latency']['max_us'])/1000:.2f} | "
          f"{g(lambda r: r['all_devices_latency']['p99_us'])/1000:.2f} | {g(lambda r: r['sent_latency']['p99_us'])/1000:.2f} | "
          f"{g(lambda r: r['server_cpu_us_per_delivery']):.2f} | {g(lambda r: r['server_cpu_util'])*100:.0f}% | "
          f"{g(lambda r: r['bench_cpu_util'])*100:.0f}% | {sum(r['expected_deliveries'] - r['received_deliveries'] for r in rs)} |")

print("\n### fanout (medians; latency in ms; rate 0 = max)\n")
print("| server | runs | rate msg/s | sends/s | deliveries/s | p50 | p90 | p99 | p99.9 | max | p99 all devices | p99 sent | server CPU µs/delivery | server CPU | bench CPU | lost |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for tag, label in [("s1", "courier 1 shard, cpu0"), ("s2", "courier 2 shards, unpinned"), ("nats", "nats-server, cpu0"), ("ejabberd", "ejabberd 23.01, cpu0")]:
    for mode in ["max", "half"]:
        fan(f"fanout-{tag}-{mode}-*.json", f"{label}, {mode}")

for f in sorted(glob.glob(os.path.join(R, "catchup-*.json"))):
    c = json.load(open(f))
    print(f"\n### {os.path.basename(f)}: {c['server']}\n")
    print("| run | events | fill sends/s | hello ms | replay s | events/s | MiB/s |\n|---|---|---|---|---|---|---|")
    for i, x in enumerate(c["runs"]):
        print(f"| {i} | {x['events']} | {x['fill_sends_per_sec']:.0f} | {x['hello_ms']:.1f} | {x['replay_secs']:.3f} | {x['events_per_sec']:.0f} | {x['mib_per_sec']:.1f} |")
    print(f"\nmedian: **{c['median_events_per_sec']:.0f} events/s** replayed")

for f in sorted(glob.glob(os.path.join(R, "group-*.json"))):
    rows = json.load(open(f))
    print(f"\n### {os.path.basename(f)}\n")
    print("| members | msgs/s | deliveries/s | server CPU µs/msg | µs/delivery | p50 ms | p99 ms | p99 all members ms | p99 sent ms | lost |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        x = r["result"]
        print(f"| {r['members']} | {r['msgs_per_sec']:.1f} | {x['deliveries_per_sec']:.0f} | {r['server_cpu_us_per_msg']:.0f} | "
              f"{x['server_cpu_us_per_delivery']:.2f} | {x['device_latency']['p50_us']/1000:.2f} | {x['device_latency']['p99_us']/1000:.2f} | "
              f"{x['all_devices_latency']['p99_us']/1000:.2f} | {x['sent_latency']['p99_us']/1000:.2f} | {x['expected_deliveries'] - x['received_deliveries']} |")
