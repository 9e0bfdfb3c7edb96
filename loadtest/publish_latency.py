#!/usr/bin/env python3
"""Durable publish latency with 64 publishers, alone and while a large channel is fanned out.

Starts one `target/release/herald serve` on a temporary data directory, then:

1. alone: REPS times, `herald-loadtest` publishes POSTS posts at once (64 requests in flight) to a
   fresh channel with one follower, and reports each request's send-to-answer time (the answer
   comes once the post is durable: fsync);
2. during a fan-out: a second `herald-loadtest` connects FANOUT followers to another channel and
   publishes to it at RATE posts/s; while it is publishing, the same REPS publish runs as in 1.

It prints the publish p50/p99 of every run and their medians, and the fan-out run's verdict. Both
phases use the same server process and disk, so the difference is the fan-out.

    python3 loadtest/publish_latency.py                      # 3 reps, 6,400 posts, 10,000 followers at 5/s
    python3 loadtest/publish_latency.py --fanout 10000 --rate 5 --reps 3
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERALD = os.path.join(ROOT, "target", "release", "herald")
LOADTEST = os.path.join(ROOT, "target", "release", "herald-loadtest")


def start_server(herald, data_dir):
    p = subprocess.Popen([herald, "serve", "--data-dir", data_dir, "--quic-addr", "127.0.0.1:0",
                          "--http-addr", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, env=dict(os.environ, RUST_LOG="warn"))
    deadline = time.time() + 30
    while time.time() < deadline:
        line = p.stdout.readline()
        if line.startswith("herald listening:"):
            parts = line.split()
            return p, parts[3], parts[5]
        if not line and p.poll() is not None:
            break
    p.kill()
    sys.exit("herald did not start")


def loadtest(target, args, json_path):
    quic, http, data_dir = target
    return [LOADTEST, "--server", quic, "--api", f"http://{http}", "--data-dir", data_dir,
            "--channels", "1", "--follows", "1", "--size", "256", "--quiet", "--json", json_path, *args]


def publish_run(target, a, tmp, tag):
    path = os.path.join(tmp, f"{tag}.json")
    args = ["--followers", "1", "--posts", str(a.posts), "--rate", "0", "--publish-concurrency", "64",
            "--idle-secs", "0"]
    t0 = time.time()
    p = subprocess.run(loadtest(target, args, path), capture_output=True, text=True, timeout=a.run_timeout)
    t1 = time.time()
    r = json.load(open(path))
    pub = r["publish"]
    v = r["verify"]
    if not v["ok"]:
        bad = {k: x for k, x in v.items() if x and k not in ("ok", "examples")}
        print(f"{tag}: verify failed: {bad} {v['examples'][:3]}", file=sys.stderr)
    return {"tag": tag, "start": t0, "end": t1, "ok": p.returncode == 0 and v["ok"],
            "p50_ms": pub["latency_ms"]["p50"], "p99_ms": pub["latency_ms"]["p99"],
            "max_ms": pub["latency_ms"]["max"], "posts_per_s": pub["ok"] / max(pub["wall_secs"], 1e-9)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--posts", type=int, default=6400, help="posts per publish run")
    ap.add_argument("--fanout", type=int, default=10000, help="followers of the fanned-out channel")
    ap.add_argument("--rate", type=float, default=5.0, help="posts/s to the fanned-out channel")
    ap.add_argument("--fanout-posts", type=int, default=200)
    ap.add_argument("--run-timeout", type=int, default=600)
    ap.add_argument("--herald-bin", default=HERALD, help="server binary (default target/release/herald)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="herald-publish-") as tmp:
        data = os.path.join(tmp, "data")
        server, quic, http = start_server(a.herald_bin, data)
        target = (quic, http, data)
        try:
            rows = []
            for i in range(a.reps):
                rows.append(publish_run(target, a, tmp, f"alone-{i}"))
                print(f"alone {i}: p50 {rows[-1]['p50_ms']:.1f} ms, p99 {rows[-1]['p99_ms']:.1f} ms", file=sys.stderr)
            fan_json = os.path.join(tmp, "fanout.json")
            fan_launch = time.time()
            fan = subprocess.Popen(loadtest(target, ["--followers", str(a.fanout), "--posts", str(a.fanout_posts),
                                                     "--rate", str(a.rate), "--timeout", "300"], fan_json),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # Wait until its followers are connected and it publishes: it
            # connects at 2,000/s and idles 2 s first.
            time.sleep(a.fanout / 2000 + 6)
            for i in range(a.reps):
                rows.append(publish_run(target, a, tmp, f"fanout-{i}"))
                print(f"during fan-out {i}: p50 {rows[-1]['p50_ms']:.1f} ms, p99 {rows[-1]['p99_ms']:.1f} ms",
                      file=sys.stderr)
            fan.wait(timeout=a.run_timeout)
            f = json.load(open(fan_json))
            pub_wall = f["publish"]["wall_secs"]
            pub_start = fan_launch + f["connect"]["wall_secs"] + f["options"]["idle_secs"]
        finally:
            server.kill()
            server.wait()
        print(f"| phase | publish p50 ms (runs) | publish p99 ms (runs) | posts/s | verified |")
        print("| --- | --: | --: | --: | --- |")
        for phase in ("alone", "fanout"):
            rs = [r for r in rows if r["tag"].startswith(phase)]
            p50 = statistics.median(r["p50_ms"] for r in rs)
            p99 = statistics.median(r["p99_ms"] for r in rs)
            rate = statistics.median(r["posts_per_s"] for r in rs)
            name = "alone" if phase == "alone" else f"during a {a.fanout:,}-follower fan-out at {a.rate:g} posts/s"
            p50s = ", ".join(f"{r['p50_ms']:.1f}" for r in rs)
            p99s = ", ".join(f"{r['p99_ms']:.1f}" for r in rs)
            ok = "all" if all(r["ok"] for r in rs) else "NO"
            print(f"| {name} | **{p50:.1f}** ({p50s}) | **{p99:.1f}** ({p99s}) | {rate:,.0f} | {ok} |")
        d = f["delivery"]
        # Start-up of the fan-out run before its connect phase is not in
        # `pub_start`, so this errs towards "not inside".
        inside = all(pub_start <= r["start"] and r["end"] <= pub_start + pub_wall
                     for r in rows if r["tag"].startswith("fanout"))
        print(f"\nfan-out run: {d['delivered']:,} of {d['expected']:,} delivered, verify "
              f"{'OK' if f['verify']['ok'] else 'FAILED'}, latency p50 {d['latency_ms']['p50']:.0f} ms, "
              f"p99 {d['latency_ms']['p99']:.0f} ms; its publishing lasted {pub_wall:.1f} s and the loaded "
              f"publish runs {'all ended inside it' if inside else 'did NOT all end inside it'}")
        return 0 if all(r["ok"] for r in rows) and f["verify"]["ok"] and inside else 1


if __name__ == "__main__":
    sys.exit(main())
