#!/usr/bin/env python3
"""Herald next to redis-server and nats-server (TLS) on the same workload, in the same run.

One channel, N followers (subscribers), P posts of B bytes, published at R posts/s (0: all at
once). Each repetition runs every system once, round-robin, so that drift on a shared machine
spreads over all of them; every figure is a median of the repetitions, and every ratio is Herald
over a peer *in the same repetition* (then the median of those ratios).

    python3 loadtest/compare.py --followers 5000 --posts 40 --rate 2      # paced, 3 repetitions
    python3 loadtest/compare.py --followers 5000 --posts 100 --rate 0     # burst
    python3 loadtest/compare.py --summarize target/compare/FILE.jsonl     # re-print a table

- Herald: `target/release/herald-loadtest --spawn` (it starts `target/release/herald` on a temporary
  data directory, connects the followers over QUIC + TLS 1.3, publishes over HTTP with durable
  commits, verifies every delivery).
- Peers: `target/peers/release/peers` (the crate in `loadtest/peers`): it starts `nats-server
  --tls` / `redis-server` (no persistence) as children, connects N subscribers on one subject or
  channel, publishes, and checks every delivery. Paced runs publish one post every 1/R s.
- Deliveries per server CPU-second: deliveries / (utime + stime of the server process from
  /proc/<pid>/stat) over the publish phase. Memory per connection: server RSS after all followers
  connected, minus RSS before, over N.

It builds what it runs (release), installs the two servers with apt-get when missing (as root),
bounds every run with --run-timeout, writes every run's result to a .jsonl file under
target/compare/, and exits non-zero if any run failed its delivery check.
"""

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.path.join(ROOT, "target")
HERALD = os.path.join(TARGET, "release", "herald")
LOADTEST = os.path.join(TARGET, "release", "herald-loadtest")
PEERS = os.path.join(TARGET, "peers", "release", "peers")
SYSTEMS = ["herald", "nats-tls", "redis"]


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, **kw)


def ensure_servers():
    missing = [p for p in ("nats-server", "redis-server")
               if not any(os.path.exists(os.path.join(d, p)) for d in ("/usr/sbin", "/usr/bin"))]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"missing {missing}: install with `apt-get install -y {' '.join(missing)}`")
    print(f"installing {missing} with apt-get", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sh(["apt-get", "install", "-y", "-q", *missing], env=env, stdout=subprocess.DEVNULL)


def build(systems):
    if "herald" in systems:
        sh(["cargo", "build", "--release", "--locked", "-p", "herald", "-p", "herald-loadtest"], cwd=ROOT)
    if any(s != "herald" for s in systems):
        sh(["cargo", "build", "--release", "--locked", "--manifest-path",
            os.path.join(ROOT, "loadtest", "peers", "Cargo.toml"),
            "--target-dir", os.path.join(TARGET, "peers")], cwd=ROOT)


def raise_open_files(followers):
    """Every connection is a descriptor on both sides (root may raise the hard limit)."""
    want = 2 * followers + 4096
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
        print(f"open-files limit {hard} is below the {want} this run needs: raise it (ulimit -n)",
              file=sys.stderr)


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def run_herald(a, timeout):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        path = tmp.name
    cmd = [LOADTEST, "--spawn", "--herald-bin", a.herald_bin or HERALD,
           "--followers", str(a.followers), "--channels", "1", "--follows", "1",
           "--posts", str(a.posts), "--size", str(a.size), "--rate", str(a.rate),
           "--timeout", str(a.timeout), "--quiet", "--json", path, *a.herald_arg]
    try:
        p = subprocess.run(cmd, text=True, capture_output=True, timeout=timeout)
        with open(path) as f:
            r = json.load(f)
    except (subprocess.TimeoutExpired, OSError, ValueError) as e:
        return {"ok": False, "error": str(e)[:300]}
    finally:
        if os.path.exists(path):
            os.unlink(path)
    s, d = r["server_stats"], r["delivery"]
    return {
        "ok": p.returncode == 0 and r["verify"]["ok"],
        "delivered": d["delivered"],
        "expected": d["expected"],
        "server_cpu_s": s.get("run_cpu_seconds"),
        "per_cpu_s": s.get("deliveries_per_cpu_second"),
        "deliveries_per_s": d.get("per_sec"),
        "p50_ms": d["latency_ms"]["p50"],
        "p99_ms": d["latency_ms"]["p99"],
        "last_p99_ms": d["last_follower_ms"]["p99"],
        "wall_s": d.get("wall_secs"),
        "publish_s": r["publish"]["wall_secs"],
        "rss_per_conn_kib": (s.get("bytes_per_idle_follower") or 0) / 1024,
        "idle_cpu_percent": s.get("idle_cpu_percent"),
        "cmd": " ".join(cmd[:1] + cmd[1:-3]),
    }


def run_peer(a, system, timeout):
    pace = 0 if a.rate == 0 else int(1e6 / a.rate)
    sub = ["nats", "--tls"] if system == "nats-tls" else [system]
    cmd = [PEERS, *sub, "--subscribers", str(a.followers), "--posts", str(a.posts),
           "--size", str(a.size), "--pace-us", str(pace), "--timeout-s", str(a.timeout)]
    try:
        p = subprocess.run(cmd, text=True, capture_output=True, timeout=timeout)
        r = json.loads(p.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, IndexError, ValueError) as e:
        return {"ok": False, "error": str(e)[:300]}
    return {
        "ok": p.returncode == 0 and r.get("clean", False),
        "delivered": r["received"],
        "expected": r["expected"],
        "server_cpu_s": r["server_cpu_s"],
        "per_cpu_s": r["deliveries_per_server_cpu_s"],
        "deliveries_per_s": r["deliveries_per_s"],
        "wall_s": r["wall_s"],
        "rss_per_conn_kib": (r.get("rss_per_conn_bytes") or 0) / 1024,
        "version": r.get("server_version"),
        "cmd": " ".join(cmd),
    }


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits=0):
    if x is None:
        return "-"
    if digits == 0 and abs(x) >= 1000:
        return f"{x / 1000:.1f}k"
    return f"{x:.{digits}f}"


def summarize(rows, out=sys.stdout):
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
    print("| system | deliveries / server CPU-s (median; runs) | server CPU s | "
          "latency p50 / p99 ms | KiB / connection | verified |", file=out)
    print("| --- | --: | --: | --: | --: | --- |", file=out)
    for s in systems:
        rs = [r for r in rows if r["system"] == s]
        runs = ", ".join(fmt(r.get("per_cpu_s")) for r in rs)
        lat = "-"
        if s == "herald":
            lat = f"{fmt(med(r.get('p50_ms') for r in rs))} / {fmt(med(r.get('p99_ms') for r in rs))}"
        ok = "all" if all(r["ok"] for r in rs) else f"{sum(r['ok'] for r in rs)} of {len(rs)}"
        print(f"| {s} | **{fmt(med(r.get('per_cpu_s') for r in rs))}** ({runs}) | "
              f"{fmt(med(r.get('server_cpu_s') for r in rs), 2)} | {lat} | "
              f"{fmt(med(r.get('rss_per_conn_kib') for r in rs), 1)} | {ok} |", file=out)
    by_rep = {}
    for r in rows:
        by_rep.setdefault(r["rep"], {})[r["system"]] = r
    for peer in [s for s in systems if s != "herald"]:
        ratios = []
        for rep in sorted(by_rep):
            h, p = by_rep[rep].get("herald"), by_rep[rep].get(peer)
            if h and p and h.get("per_cpu_s") and p.get("per_cpu_s"):
                ratios.append(h["per_cpu_s"] / p["per_cpu_s"])
        if ratios:
            print(f"\nHerald / {peer}, deliveries per server CPU-s, same repetition: "
                  f"**{med(ratios):.2f}x** (" + ", ".join(f"{x:.2f}" for x in ratios) + ")", file=out)
    loads = [r["loadavg"] for r in rows]
    print(f"\n1-minute load average before each run: {min(loads):.1f}-{max(loads):.1f}", file=out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--followers", type=int, default=5000)
    ap.add_argument("--posts", type=int, default=40)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rate", type=float, default=2.0, help="posts per second; 0 = all at once")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--timeout", type=int, default=120, help="seconds each tool waits for deliveries")
    ap.add_argument("--run-timeout", type=int, default=600, help="seconds before a run is killed")
    ap.add_argument("--herald-bin", help="herald binary to measure (default target/release/herald)")
    ap.add_argument("--herald-arg", action="append", default=[],
                    help="extra herald-loadtest argument (repeatable), e.g. --herald-arg=--endpoints=8")
    ap.add_argument("--pause", type=float, default=3.0, help="seconds between runs")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--summarize", metavar="JSONL")
    a = ap.parse_args()
    if a.summarize:
        with open(a.summarize) as f:
            summarize([json.loads(line) for line in f if line.strip()])
        return 0
    systems = [s for s in a.systems.split(",") if s]
    for s in systems:
        if s not in SYSTEMS:
            sys.exit(f"unknown system {s}; choose from {SYSTEMS}")
    if any(s != "herald" for s in systems):
        ensure_servers()
    raise_open_files(a.followers)
    if not a.no_build:
        build(systems)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = a.out or os.path.join(TARGET, "compare", f"{stamp}-n{a.followers}-p{a.posts}-r{a.rate:g}.jsonl")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    rows = []
    print(f"writing {out}", file=sys.stderr)
    for rep in range(a.reps):
        for system in systems:
            la = loadavg()
            t0 = time.time()
            res = run_herald(a, a.run_timeout) if system == "herald" else run_peer(a, system, a.run_timeout)
            res.update(system=system, rep=rep, loadavg=la, secs=round(time.time() - t0, 1),
                       followers=a.followers, posts=a.posts, size=a.size, rate=a.rate)
            rows.append(res)
            with open(out, "a") as f:
                f.write(json.dumps(res) + "\n")
            print(f"rep {rep} {system}: {fmt(res.get('per_cpu_s'))} deliveries/CPU-s, "
                  f"ok={res['ok']} (load {la:.1f}, {res['secs']} s)"
                  + (f" error: {res['error']}" if "error" in res else ""), file=sys.stderr)
            time.sleep(a.pause)
    summarize(rows)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
