#!/usr/bin/env python3
"""registry-lb soak, run by `./dev soak` (which builds and installs first).

Two Envoys side by side, each `--concurrency 2` with registry-lb reading service `web` from
one real etcd (Debian etcd-server 3.4), under the same churn, each loaded by its own wrk
(1 thread, 16 connections) for --duration seconds:

  filter_state   the default hand-off: filter state -> ORIGINAL_DST cluster; no route
                 retries (they would go to the same host)
  override_host  a ranked list in `x-lb-host` -> a STATIC cluster of the whole pool with
                 Envoy's override_host policy; route retries (connect-failure, reset,
                 5xx; 2) go to the next entries

Both have the same outlier detection (consecutive_5xx 5, base_ejection_time 3 s,
max_ejection_time 6 s, max_ejection_percent 10).
What happens during the run, on one schedule for both:

  churn     every 200 ms one change in etcd: an instance joins, leaves, changes weight, or
            changes state (healthy / unhealthy / draining); at least 6 registered, at most
            2 not healthy, and instances whose process is down are left alone
  kills     every --kill-every s a registered healthy backend is SIGKILLed (still
            registered: the registry is not told) and restarted --kill-down s later
  registry  every --etcd-every s etcd is SIGKILLed and restarted --etcd-down s later
            (same data directory: the registry comes back with what it had)
  reloads   every --reload-every s each Envoy's listener file (LDS, path_config_source
            with watched_directory) is atomically replaced by one that differs in a
            response header: an in-place filter-chain update, draining the old chain

Every second: requests and non-2xx answers as wrk saw them, Envoy's RSS, its stat count,
the snapshot version and the wasm VMs alive. Results: <out>/soak.json (series, events,
summary, budget), soak.csv (the series), soak.md (the summary), soak.png (the plot).

Failure = what the client saw go wrong: wrk's non-2xx answers (status errors; nothing
here answers 1xx or 3xx) plus its socket errors (connect, read, write, timeout). A
connection Envoy closes after a complete answer with `connection: close` (how a draining
HTTP/1 listener lets clients go) is no failure: wrk reconnects and loses nothing; a
connection closed under a request in flight is a read error and counts.

Budget (a run over budget exits 1):
  failures   filter_state: <= consecutive_5xx x backends killed + the requests already
             handed to a killed instance when it was ejected, none routed to it after
             its ejection, none that no kill explains (kill_accounting); override_host: 0
  RSS        RssAnon (the heap; VmRSS also counts file pages the kernel may drop) at the
             end <= 1.05 x at the end of warm-up (each a median of the 5 samples up to then)
  stats      no stat name appears after the warm-up other than per-instance and per-slot
             registry-lb stats, and those stay within what the pool explains: one
             `picks` per pool address (+ overflow), slots below 2 x the pool size; and
             Envoy's per-response-code `upstream_rq_<code>` (bounded by the codes)

Every load loop is bounded: wrk by -d and a timeout, backends by BENCH_BACKEND_MAX_SECS,
the run by its duration plus a fixed margin.
"""

import argparse
import base64
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import run as bench  # noqa: E402  (bench/run.py: processes, ports, Envoy config pieces)

LUA = ROOT / "tools" / "soak.lua"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
PREFIX = "/services/web/"
HANDOFFS = ("filter_state", "override_host")
CONSECUTIVE_5XX = 5
OUTLIER = {"consecutive_5xx": CONSECUTIVE_5XX, "base_ejection_time": "3s", "max_ejection_time": "6s"}
MIN_REGISTERED = 6
MAX_NOT_HEALTHY = 2
RSS_GROWTH_MAX = 0.05
# Envoy's per-response-code stats appear at a code's first answer (e.g. etcd's first 408
# while it shuts down): bounded by the codes HTTP has, not by anything that churns.
# registry-lb's per-service and global stats are one fixed list (src/stats.rs), each
# defined at its first use (e.g. outlier_trial_failed at the first failed trial).
SERVICE_STAT = re.compile(r"^wasmcustom\.registry_lb\.(web\.)?[a-z0-9_]+$")
CODE_STAT = re.compile(r"(^|\.|_)(upstream|downstream)_rq_\d{3}$")
INSTANCE_STAT = re.compile(r"^wasmcustom\.registry_lb\.web\.(instance\.[^.]+\.picks|slot_(\d+)\.[a-z0-9_]+)$")


def log(msg):
    print(f"\033[1m--> {msg}\033[0m", file=sys.stderr, flush=True)


def post_json(url, body, timeout=1.0):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with NO_PROXY.open(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}
    except (urllib.error.URLError, OSError, ValueError):
        return 0, {}


def b64(s):
    return base64.b64encode(s.encode()).decode()


# ---------------------------------------------------------------------------------------
# The things under test and around it


class Backend:
    """One bench-backend process serving one pool address, killed and restarted by pid."""

    def __init__(self, soak, port):
        self.soak, self.port, self.proc = soak, port, None
        self.kills = 0
        self.last_kill = -1e9

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    def spawn(self):
        """Starts the process; `ready()` says when it answers."""
        if self.proc is not None:
            self.soak.procs.stop(self.proc)
        env = dict(os.environ, BENCH_BACKEND_MAX_SECS=str(int(self.soak.args.duration + 600)))
        self.proc = self.soak.procs.start([str(self.soak.backend_bin), self.addr],
                                          self.soak.work / f"backend-{self.port}.log", env=env)

    def ready(self):
        return self.alive() and bench.http_get(f"http://{self.addr}/", 0.3)[0] == 200

    def start(self):
        for _ in range(20):
            self.spawn()
            deadline = time.time() + 5
            while time.time() < deadline and self.proc.poll() is None:
                if self.ready():
                    return
                time.sleep(0.05)
            time.sleep(0.2)  # could not bind (port busy a moment): again
        raise SystemExit(f"backend {self.addr} did not start; see {self.soak.work}/backend-{self.port}.log")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)
        self.soak.procs.stop(self.proc)
        self.kills += 1


class Etcd:
    """A real single-member etcd on loopback; SIGKILLed and restarted on the same data."""

    def __init__(self, soak):
        self.soak, self.proc = soak, None
        self.client, self.peer = bench.free_port(), bench.free_port()
        self.data = soak.work / "etcd-data"
        self.starts = 0

    def url(self, path):
        return f"http://127.0.0.1:{self.client}{path}"

    def spawn(self):
        """Starts etcd; `ready()` says when it answers."""
        c, p = f"http://127.0.0.1:{self.client}", f"http://127.0.0.1:{self.peer}"
        cmd = ["etcd", "--name", "soak", "--data-dir", str(self.data), "--listen-client-urls", c,
               "--advertise-client-urls", c, "--listen-peer-urls", p, "--initial-advertise-peer-urls", p,
               "--initial-cluster", f"soak={p}", "--initial-cluster-state", "new", "--logger", "zap",
               "--log-outputs", "stderr"]
        self.starts += 1
        log_path = self.soak.work / f"etcd-{self.starts}.log"
        self.proc = self.soak.procs.start(cmd, log_path)

    def ready(self):
        return self.proc.poll() is None and post_json(self.url("/v3/kv/range"), {"key": b64("/")}, 0.3)[0] == 200

    def start(self):
        self.spawn()
        deadline = time.time() + 20
        while time.time() < deadline and self.proc.poll() is None:
            if self.ready():
                return
            time.sleep(0.1)
        raise SystemExit(f"etcd did not start; see {self.soak.work}/etcd-{self.starts}.log")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)
        self.soak.procs.stop(self.proc)

    def put(self, port, value):
        return post_json(self.url("/v3/kv/put"), {"key": b64(f"{PREFIX}{port}"), "value": b64(json.dumps(value))},
                         0.5)[0] == 200

    def delete(self, port):
        return post_json(self.url("/v3/kv/deleterange"), {"key": b64(f"{PREFIX}{port}")}, 0.5)[0] == 200


def rlb_config(handoff):
    svc = {"name": "web", "policy": "round_robin", "refresh_interval": "100ms", "outlier_detection": OUTLIER,
           "sources": [{"etcd": {"cluster": "etcd", "prefix": PREFIX}}]}
    top = {"services": [svc]}
    if handoff == "override_host":
        top = {"handoff": "override_host", "handoff_header": "x-lb-host", **top}
    return json.dumps(top, separators=(",", ":"))


# override_host: attempt k goes to entry k of the ranked list, so retries go elsewhere.
RETRY_POLICY = {"retry_on": "connect-failure,reset,5xx", "num_retries": 2}
# Envoy's default allows 3 retries in flight per cluster: with 16 connections more than
# 3 requests can be retrying when a host dies, and the rest get 503 UO.
RETRY_CIRCUIT_BREAKER = {"thresholds": [{"priority": "DEFAULT", "max_retries": 64}]}

# Start (unix seconds, µs) and duration (µs, first byte received to last byte sent):
# which failures were in flight when their instance was ejected.
ACCESS_LOG_FORMAT = ("%START_TIME(%s.%6f)% %COMMON_DURATION(DS_RX_BEG:DS_TX_END:us)% %RESPONSE_CODE% "
                     "%RESPONSE_FLAGS% %UPSTREAM_HOST% %UPSTREAM_REQUEST_ATTEMPT_COUNT% %RESPONSE_CODE_DETAILS%\n")


def listener(soak, env, generation):
    """The LDS resource of Envoy `env`; `generation` changes one response header."""
    if env.handoff == "filter_state":
        # No retries: they would go to the same host (ORIGINAL_DST), and against a dead
        # host they only postpone the failure that counts towards its ejection.
        target = {"cluster": "registry_lb_original_dst"}
    else:
        target = {"cluster": "web_hosts", "retry_policy": RETRY_POLICY}
    route = {"name": "web", "match": {"prefix": "/"}, "route": target,
             "metadata": {"filter_metadata": {"registry_lb": {"service": "web"}}},
             "response_headers_to_add": [{"header": {"key": "x-soak-listener", "value": str(generation)}}]}
    # Every answer that is not a 2xx, and every request Envoy flagged (reset, retried
    # out, downstream gone...), one line each: the failures' times, hosts and reasons.
    access_log = {"name": "envoy.access_loggers.file",
                  "filter": {"or_filter": {"filters": [
                      {"status_code_filter": {"comparison": {"op": "GE", "value": {"default_value": 300,
                                                                                      "runtime_key": "soak_log_min"}}}},
                      {"response_flag_filter": {}}]}},
                  "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                                   "path": str(env.access_log),
                                   "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}}}}
    router = {"name": "envoy.filters.http.router",
              "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "ingress", "access_log": [access_log],
           "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
           "http_filters": [bench.wasm_filter("registry_lb", soak.wasm, rlb_config(env.handoff)), router]}
    # enable_reuse_port off: with SO_REUSEPORT another process of the same user (other
    # Envoys on this machine) could bind the same port and take some of the connections.
    return {"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "ingress",
            "address": bench.sock("127.0.0.1", env.listen), "enable_reuse_port": False,
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}


class Envoy:
    def __init__(self, soak, handoff):
        self.soak, self.handoff = soak, handoff
        self.listen, self.admin = bench.free_port(), bench.free_port()
        self.dir = soak.work / f"envoy-{handoff}"
        self.lds_dir = self.dir / "lds"
        self.lds_dir.mkdir(parents=True)
        self.lds = self.lds_dir / "lds.json"
        self.access_log = self.dir / "access.log"
        self.log_path = self.dir / "envoy.log"
        self.proc = None
        self.generation = 0

    def write_listener(self):
        """Atomically replaces the LDS file (rename in the watched directory)."""
        self.generation += 1
        tmp = self.lds_dir / ".lds.json.tmp"
        tmp.write_text(json.dumps({"version_info": str(self.generation),
                                   "resources": [listener(self.soak, self, self.generation)]}))
        os.replace(tmp, self.lds)

    def start(self):
        clusters = [{"name": "etcd", "type": "STATIC", "connect_timeout": "1s",
                     "load_assignment": {"cluster_name": "etcd", "endpoints": [
                         {"lb_endpoints": [{"endpoint": {"address": bench.sock("127.0.0.1", self.soak.etcd.client)}}]}]}}]
        if self.handoff == "filter_state":
            clusters.append({"name": "registry_lb_original_dst", "type": "ORIGINAL_DST",
                             "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "1s"})
        else:
            rr = {"policies": [{"typed_extension_config": {
                "name": "envoy.load_balancing_policies.round_robin",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"}}}]}
            clusters.append({
                "name": "web_hosts", "type": "STATIC", "connect_timeout": "1s",
                "circuit_breakers": RETRY_CIRCUIT_BREAKER,
                "load_balancing_policy": {"policies": [{"typed_extension_config": {
                    "name": "envoy.load_balancing_policies.override_host",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
                                     "override_host_sources": [{"header": "x-lb-host"}], "fallback_policy": rr}}}]},
                "load_assignment": {"cluster_name": "web_hosts", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": bench.sock("127.0.0.1", b.port)}} for b in self.soak.pool]}]}})
        cfg = {"node": {"id": f"soak-{self.handoff}", "cluster": "soak"},
               "admin": {"address": bench.sock("127.0.0.1", self.admin)},
               "dynamic_resources": {"lds_config": {"resource_api_version": "V3", "path_config_source": {
                   "path": str(self.lds), "watched_directory": {"path": str(self.lds_dir)}}}},
               "static_resources": {"clusters": clusters}}
        path = self.dir / "bootstrap.json"
        path.write_text(json.dumps(cfg))
        self.write_listener()
        # --drain-time-s 5: a replaced filter chain drains for 5 s (default 600 s), less than
        # the reload period, so draining chains do not pile up.
        cmd = [str(self.soak.envoy), "-c", str(path), "--concurrency", "2", "--disable-hot-restart",
               "--drain-time-s", "5", "--log-format", "%E.%f [%t][%l][%n] %v", "-l", "warn",
               "--component-log-level", "wasm:info"]
        self.proc = self.soak.procs.start(cmd, self.log_path)
        return self

    def wait_serving(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            if bench.http_get(f"http://127.0.0.1:{self.listen}/", 2)[0] == 200:
                return True
            time.sleep(0.2)
        return False

    def stats(self):
        code, body = bench.http_get(f"http://127.0.0.1:{self.admin}/stats", 5)
        if code != 200:
            return None
        out = {}
        for line in body.decode(errors="replace").splitlines():
            k, _, v = line.partition(": ")
            try:
                out[k] = int(v)
            except ValueError:
                out[k] = None  # histograms
        return out

    def rss_kb(self, field="VmRSS"):
        """VmRSS, or RssAnon: the anonymous part (heap), which a leak grows; the
        file-backed rest (Envoy's binary) can leave RSS when the machine is short of
        page cache (both Envoys dropped 20 MB at once in a 10 min run)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return None

    def log_tail(self, n=30):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


# ---------------------------------------------------------------------------------------
# The run


class Soak:
    def __init__(self, args):
        self.args = args
        self.envoy = Path(args.envoy)
        self.work = Path(args.work).resolve()
        self.procs = bench.Procs()
        self.rng = random.Random(args.seed)
        self.events = []  # (t, kind, detail)
        self.lock = threading.Lock()
        self.registered = {}  # port -> {"weight", "state"}: what the soak wrote to etcd
        self.churn_ops = {"join": 0, "leave": 0, "weight": 0, "state": 0, "refused": 0}
        self.t0 = None

    def now(self):
        return time.time() - self.t0 if self.t0 else 0.0

    def event(self, kind, detail="", t=None):
        with self.lock:
            self.events.append((round(self.now() if t is None else t, 3), kind, detail))

    # -- the registry ---------------------------------------------------------------------

    def churn_once(self):
        """One registry change (or none when etcd is down: it is counted as refused)."""
        with self.lock:
            alive = [b for b in self.pool if b.alive()]
            reg = [b for b in alive if b.port in self.registered]
            unreg = [b for b in alive if b.port not in self.registered]
            not_healthy = [b for b in reg if self.registered[b.port]["state"] != "healthy"]
            if not reg:
                return
            ops = ["weight"]
            if unreg:
                ops.append("join")
            if len([b for b in self.pool if b.port in self.registered]) > MIN_REGISTERED:
                ops.append("leave")
            if len(not_healthy) < MAX_NOT_HEALTHY or not_healthy:
                ops.append("state")
            op = self.rng.choice(ops)
            if op == "join":
                b = self.rng.choice(unreg)
                value = {"weight": self.rng.randint(1, 10), "state": "healthy"}
            elif op == "leave":
                b = self.rng.choice(reg)
                value = None
            elif op == "weight":
                b = self.rng.choice(reg)
                value = dict(self.registered[b.port], weight=self.rng.randint(1, 10))
            else:
                healthy = [x for x in reg if x not in not_healthy]
                if not_healthy and (len(not_healthy) >= MAX_NOT_HEALTHY or self.rng.random() < 0.5):
                    b, state = self.rng.choice(not_healthy), "healthy"
                else:
                    b, state = self.rng.choice(healthy), self.rng.choice(["unhealthy", "draining"])
                value = dict(self.registered[b.port], state=state)
        ok = self.etcd.delete(b.port) if value is None else self.etcd.put(
            b.port, {"address": "127.0.0.1", "port": b.port, **value})
        with self.lock:
            if not ok:
                self.churn_ops["refused"] += 1
                return
            self.churn_ops[op] += 1
            if value is None:
                self.registered.pop(b.port, None)
            else:
                self.registered[b.port] = value

    def kill_one(self):
        """SIGKILLs a registered, healthy, running backend (the registry is not told)."""
        with self.lock:
            cands = [b for b in self.pool if b.alive() and self.registered.get(b.port, {}).get("state") == "healthy"
                     and self.now() - b.last_kill > 30]
            if not cands:
                return None
            least = min(b.kills for b in cands)
            b = self.rng.choice([x for x in cands if x.kills == least])
            # The time before the signal: under load kill() can take a while to return,
            # and the failures (and the ejection) start at the signal.
            b.last_kill = self.now()
            b.kill()
        self.event("backend_killed", b.addr, t=b.last_kill)
        return b

    # -- sampling -------------------------------------------------------------------------

    def sample(self):
        row = {"t": round(self.now(), 2)}
        for e in self.envoys:
            st = e.stats() or {}
            p = "wasmcustom.registry_lb.web."
            row[e.handoff] = {
                "rss_kb": e.rss_kb(), "rss_anon_kb": e.rss_kb("RssAnon"), "stats": len(st),
                "snapshot_version": st.get(p + "snapshot_version"),
                "instances_known": st.get(p + "instances_known"),
                "instances_ejected": st.get(p + "instances_ejected"),
                "outlier_ejections": st.get(p + "outlier_ejections"),
                "refresh_failed": st.get(p + "refresh_failed"),
                "wasm_vms": sum(v or 0 for k, v in st.items() if k.startswith("wasm.") and k.endswith(".active")),
                "lds_updates": st.get("listener_manager.lds.update_success"),
                "retries": st.get("cluster.web_hosts.upstream_rq_retry", st.get("cluster.registry_lb_original_dst.upstream_rq_retry")),
            }
            self.last_stats[e.handoff] = st
        return row


def wrk_series(path, t0):
    """{second since t0: (2xx, non-2xx)} from the wrk script's lines."""
    out = {}
    try:
        for line in path.read_text().splitlines():
            if line.startswith("#"):
                continue
            s, ok, bad = (int(x) for x in line.split())
            out[s - int(t0)] = (ok, bad)
    except (OSError, ValueError):
        pass
    return out


def wrk_samples(path):
    """The non-2xx answers the wrk script wrote in full (the first 20)."""
    try:
        return [l[2:] for l in path.read_text().splitlines() if l.startswith("# ")]
    except OSError:
        return []


def read_access_log(path, t0):
    out = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(" ", 6)
        if len(parts) < 7:
            continue
        try:
            t = float(parts[0]) - t0
            end = t + (int(parts[1]) / 1e6 if parts[1].isdigit() else 0)
        except ValueError:
            continue
        out.append({"t": round(t, 6), "end": round(end, 6), "code": parts[2], "flags": parts[3],
                    "upstream": parts[4], "attempts": parts[5], "details": parts[6]})
    return out


def breaker_log(log_path, t0):
    """Times (s since t0) at which Envoy logged ejections and failed half-open trials
    (`--log-format %E.%f`)."""
    out = {"ejected": [], "trial_failed": []}
    try:
        for line in log_path.read_text(errors="replace").splitlines():
            m = re.match(r"^(\d+\.\d+) .*(ejecting slot \d+|trial request failed)", line)
            if m:
                out["ejected" if m.group(2).startswith("ejecting") else "trial_failed"].append(float(m.group(1)) - t0)
    except OSError:
        pass
    return {k: sorted(v) for k, v in out.items()}


# The other worker reads the ejection state at most once per millisecond.
SYNC_S = 0.001


def kill_accounting(soak, access, breaker):
    """Each failed request of the filter_state Envoy, put against the kill it belongs to.

    A kill's failures are requests to the killed address that started between one
    second before the kill (requests in flight when it died) and one second after
    the restart. In the order they ended, the first
    consecutive_5xx are `counted` (they cause the ejection). The ejection takes effect
    when the filter judges the last of them, which it logs (`ejecting slot`; the log
    time, not the request's end: under load Envoy's on_log runs milliseconds after the
    answer was sent). A later failure that started before that log time (+ SYNC_S, the
    other worker's delay) was `in_flight`: already handed to the instance, beyond any
    filter's reach. One that started after it is a `trial` if the filter logged a
    failed half-open trial then (the one probe the breaker sends when the ejection
    ends; it fails when the backend is not back yet), else `after`: the filter routed
    to an ejected instance, a defect. Failures of no kill are `unexplained`."""
    ejected = breaker["ejected"]
    kills = []
    for i, (t, kind, addr) in enumerate(soak.events):
        if kind != "backend_killed":
            continue
        back = next((et for et, k, a in soak.events[i + 1:] if k == "backend_restarted" and a == addr), None)
        kills.append({"t": t, "addr": addr, "restarted": back})
    failed = [a for a in access if a["code"][0] not in "20"]
    used = set()
    for k in kills:
        until = (k["restarted"] if k["restarted"] is not None else 1e9) + 1.0
        mine = sorted((j for j, a in enumerate(failed)
                       if a["upstream"] == k["addr"] and k["t"] - 1.0 <= a["t"] <= until),
                      key=lambda j: failed[j]["end"])
        used.update(mine)
        te = next((e for e in ejected if k["t"] - 0.5 <= e <= until), None)
        k["ejected_after_s"] = None if te is None else round(te - k["t"], 4)
        k["failures"] = len(mine)
        k["counted"] = min(len(mine), CONSECUTIVE_5XX)
        rest = mine[CONSECUTIVE_5XX:]
        if te is None:
            # Never ejected: every failure beyond consecutive_5xx is over budget.
            k["in_flight"], k["trial"], k["after"] = 0, 0, len(rest)
            continue
        k["in_flight"] = sum(1 for j in rest if failed[j]["t"] <= te + SYNC_S)
        trials = sum(1 for x in breaker["trial_failed"] if te < x <= until)
        k["trial"] = min(trials, len(rest) - k["in_flight"])
        k["after"] = len(rest) - k["in_flight"] - k["trial"]
    unexplained = [a for j, a in enumerate(failed) if j not in used]
    return kills, unexplained


def cause_of(a, events):
    """A failure's likely cause: its upstream was killed within the last 4 s, else the
    most recent disruption before it (within 10 s)."""
    t, best = a["t"], None
    for et, kind, detail in events:
        if kind == "backend_killed" and detail == a["upstream"] and 0 <= t - et <= 4:
            return f"backend_killed {detail} at {et:.1f} s"
    for et, kind, detail in events:
        if et <= t + 0.05 and t - et <= 10 and kind in ("backend_killed", "etcd_killed", "listener_reload"):
            best = f"{kind} {detail}".strip() + f" at {et:.1f} s"
    return best or "none within 10 s"


def median_at(series, key, handoff, t_end, n=5):
    vals = [r[handoff][key] for r in series if r["t"] <= t_end and r[handoff][key] is not None][-n:]
    return statistics.median(vals) if vals else None


def judge(soak, series, wrk, warm_t, access, breaker):
    budget = {}
    for h in HANDOFFS:
        w = wrk[h]
        failures = w["err_status"] + w["err_connect"] + w["err_read"] + w["err_write"] + w["err_timeout"]
        kills = sum(1 for _, k, _ in soak.events if k == "backend_killed")
        literal = CONSECUTIVE_5XX * kills if h == "filter_state" else 0
        limit, per_kill, unexplained, kills_ok = literal, [], [], True
        if h == "filter_state":
            per_kill, unexplained = kill_accounting(soak, access[h], breaker[h])
            limit = literal + sum(k["in_flight"] + k["trial"] for k in per_kill)
            kills_ok = all(k["after"] == 0 for k in per_kill) and not unexplained
        rss_warm = median_at(series, "rss_anon_kb", h, warm_t)
        rss_end = median_at(series, "rss_anon_kb", h, series[-1]["t"])
        vm_warm = median_at(series, "rss_kb", h, warm_t)
        vm_end = median_at(series, "rss_kb", h, series[-1]["t"])
        growth = (rss_end / rss_warm - 1) if rss_warm and rss_end else None
        warm_names = soak.stat_names_at_warm.get(h, set())
        end_names = set(soak.last_stats.get(h, {}))
        new = sorted(end_names - warm_names)
        new_other = [n for n in new
                     if not INSTANCE_STAT.match(n) and not CODE_STAT.search(n) and not SERVICE_STAT.match(n)]
        picks = [n for n in end_names if re.match(r"^wasmcustom\.registry_lb\.web\.instance\.[^.]+\.picks$", n)]
        slots = {int(m.group(2)) for n in end_names for m in [INSTANCE_STAT.match(n)] if m and m.group(2)}
        pool = len(soak.pool)
        stats_ok = not new_other and len(picks) <= pool + 1 and (max(slots) < 2 * pool if slots else True)
        budget[h] = {
            "requests": w["requests"], "failures": failures,
            "failures_detail": {k: w[k] for k in ("err_status", "err_connect", "err_read", "err_write", "err_timeout")},
            "failure_budget": limit, "failure_budget_literal": literal,
            "failures_ok": failures <= limit and kills_ok, "backends_killed": kills,
            "kills": per_kill, "failures_unexplained": unexplained[:50],
            "rss_anon_kb_warm": rss_warm, "rss_anon_kb_end": rss_end, "rss_growth": growth,
            "vm_rss_kb_warm": vm_warm, "vm_rss_kb_end": vm_end,
            "rss_ok": growth is not None and growth <= RSS_GROWTH_MAX,
            "stats_warm": len(warm_names), "stats_end": len(end_names), "stats_new_after_warmup": new,
            "stats_new_unexplained": new_other, "instance_picks_stats": len(picks),
            "slots_max": max(slots) if slots else None, "stats_ok": stats_ok,
        }
        budget[h]["ok"] = budget[h]["failures_ok"] and budget[h]["rss_ok"] and budget[h]["stats_ok"]
    return budget


def run(args):
    soak = Soak(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if soak.work.exists():
        shutil.rmtree(soak.work)
    soak.work.mkdir(parents=True)
    # The tested build is copied first: a rebuild during the run must not change it.
    soak.wasm = soak.work / "registry_lb.wasm"
    shutil.copy2(args.wasm, soak.wasm)
    soak.backend_bin = soak.work / "bench-backend"
    shutil.copy2(args.backend, soak.backend_bin)
    for tool in ("wrk", "etcd"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (./dev soak installs it)")
    base = bench.pick_port_range(args.pool, ["127.0.0.1"])
    soak.pool = [Backend(soak, base + i) for i in range(args.pool)]
    soak.last_stats, soak.stat_names_at_warm = {}, {}
    series, wrks = [], {}
    try:
        soak.etcd = Etcd(soak)
        soak.etcd.start()
        for b in soak.pool:
            b.start()
        # Start with 8 of the pool registered, healthy, weight 1..10.
        for b in soak.pool[:min(8, len(soak.pool))]:
            value = {"weight": soak.rng.randint(1, 10), "state": "healthy"}
            if not soak.etcd.put(b.port, {"address": "127.0.0.1", "port": b.port, **value}):
                raise SystemExit("etcd refused the first registrations")
            soak.registered[b.port] = value
        soak.envoys = [Envoy(soak, h).start() for h in HANDOFFS]
        for e in soak.envoys:
            if not e.wait_serving():
                raise SystemExit(f"Envoy {e.handoff} did not serve; log {e.log_path}:\n{e.log_tail()}")
        log(f"pool {soak.pool[0].addr}..{soak.pool[-1].port}, etcd :{soak.etcd.client}, "
            + ", ".join(f"{e.handoff} :{e.listen} (admin :{e.admin})" for e in soak.envoys))
        for e in soak.envoys:
            e.series_path = e.dir / "wrk-series.txt"
            env = dict(os.environ, SOAK_SERIES=str(e.series_path), SOAK_DELAY_MS=str(args.delay_ms))
            cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--timeout", "5s", "-s", str(LUA),
                   f"http://127.0.0.1:{e.listen}/"]
            wrks[e.handoff] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                               env=env, start_new_session=True)
        soak.t0 = time.time()
        log(f"load for {args.duration} s (warm-up {args.warmup} s)")
        schedule(soak, args, series)
        results = {}
        for h, p in wrks.items():
            try:
                so, se = p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                so, se = p.communicate()
            line = next((l for l in reversed(so.splitlines()) if l.startswith("{")), None)
            if line is None:
                raise SystemExit(f"wrk ({h}) printed no result: {so[-400:]} {se[-400:]}")
            results[h] = json.loads(line)
        # The churn has stopped: both filters must end with the registry's last list.
        final = {}
        for e in soak.envoys:
            want = len(soak.registered)
            deadline = time.time() + 15
            got = None
            while time.time() < deadline:
                got = (e.stats() or {}).get("wasmcustom.registry_lb.web.instances_known")
                if got == want:
                    break
                time.sleep(0.2)
            final[e.handoff] = {"registered": want, "instances_known": got, "ok": got == want}
        series.append(soak.sample())
    finally:
        for p in wrks.values():
            if p.poll() is None:
                p.kill()
                p.wait(5)
        soak.procs.stop_all()
    return soak, series, results, final, out


def schedule(soak, args, series):
    """The event loop: churn every 200 ms, kills, registry outages, reloads, a sample per second."""
    d = args.duration
    next_churn, next_sample = 0.5, 1.0
    next_kill, next_etcd, next_reload = args.kill_at, args.etcd_at, args.reload_at
    restart_backend, restart_etcd = [], None
    etcd_down = False
    while True:
        t = soak.now()
        if t >= d:
            break
        if t >= next_sample:
            series.append(soak.sample())
            if not soak.stat_names_at_warm and t >= args.warmup:
                soak.stat_names_at_warm = {h: set(s) for h, s in soak.last_stats.items()}
            next_sample += 1.0
        # Restarts do not block the loop: started when due, "restarted" once answering.
        for item in list(restart_backend):
            at, b = item
            if t >= at:
                if b.proc is None or b.proc.poll() is not None:
                    b.spawn()
                elif b.ready():
                    soak.event("backend_restarted", b.addr)
                    restart_backend.remove(item)
        if etcd_down and t >= restart_etcd:
            if soak.etcd.proc.poll() is not None:
                soak.etcd.spawn()
            elif soak.etcd.ready():
                etcd_down = False
                soak.event("etcd_restarted")
        if t >= next_churn and t < d - 1:
            if not etcd_down:
                soak.churn_once()
            else:
                with soak.lock:
                    soak.churn_ops["refused"] += 1
            next_churn += 0.2
        if t >= next_kill and t < d - args.kill_down - 1 and not restart_backend:
            b = soak.kill_one()
            if b is not None:
                restart_backend.append((t + args.kill_down, b))
            next_kill += args.kill_every
        if t >= next_etcd and not etcd_down and t < d - args.etcd_down - 1:
            soak.etcd.kill()
            soak.event("etcd_killed")
            etcd_down, restart_etcd = True, t + args.etcd_down
            next_etcd += args.etcd_every
        if t >= next_reload and t < d - 1:
            for e in soak.envoys:
                e.write_listener()
            soak.event("listener_reload", f"generation {soak.envoys[0].generation}")
            next_reload += args.reload_every
        for e in soak.envoys:
            if e.proc.poll() is not None:
                raise SystemExit(f"Envoy {e.handoff} exited ({e.proc.returncode}); log {e.log_path}:\n{e.log_tail()}")
        time.sleep(max(0.0, min(next_churn, next_sample) - soak.now()) if t < d - 1 else 0.05)
    # Anything still down comes back before the final checks.
    for _, b in restart_backend:
        b.start()
        soak.event("backend_restarted", b.addr)
    if etcd_down:
        if soak.etcd.proc.poll() is None:
            soak.etcd.kill()
        soak.etcd.start()
        soak.event("etcd_restarted")


# ---------------------------------------------------------------------------------------
# Reporting


def report(soak, series, wrk, final, out, args):
    warm_t = args.warmup
    per_sec = {e.handoff: wrk_series(e.series_path, soak.t0) for e in soak.envoys}
    access = {e.handoff: read_access_log(e.access_log, soak.t0) for e in soak.envoys}
    breaker = {e.handoff: breaker_log(e.log_path, soak.t0) for e in soak.envoys}
    budget = judge(soak, series, wrk, warm_t, access, breaker)
    failures = {}
    for h, entries in access.items():
        by = {}
        for a in entries:
            # Code 0: the client left before an answer (wrk stopping at the end of the
            # load); wrk does not count it and neither does the budget.
            if a["code"].startswith("2") or a["code"] == "0":
                continue
            key = f"{a['code']} {a['flags']} ({cause_of(a, soak.events).split(' at ')[0].split(' 127')[0]})"
            by[key] = by.get(key, 0) + 1
        failures[h] = {"non_2xx_logged_by_envoy": sum(by.values()), "by_code_flags_cause": by,
                       "non_2xx_seen_by_wrk": wrk_samples(next(e.series_path for e in soak.envoys if e.handoff == h)),
                       "client_gone": sum(1 for a in entries if a["code"] == "0"),
                       "first": [a for a in entries if a["code"][0] not in "20"][:50]}
    ok = all(b["ok"] for b in budget.values()) and all(f["ok"] for f in final.values())
    kinds = {}
    for _, k, _ in soak.events:
        kinds[k] = kinds.get(k, 0) + 1
    res = {
        "meta": {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(soak.t0)), "t0_unix": soak.t0,
                 "envoy": subprocess.run([str(soak.envoy), "--version"], capture_output=True, text=True).stdout.strip()
                 .splitlines()[-1].replace(str(ROOT) + "/", ""),
                 "etcd": subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
                 "git": subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                                       text=True).stdout.strip(),
                 "cpus": os.cpu_count(), "wasm_bytes": soak.wasm.stat().st_size},
        "settings": {k: v for k, v in vars(args).items() if k not in ("envoy", "wasm", "backend", "work", "out")},
        "outlier_detection": OUTLIER,
        "events": [{"t": t, "kind": k, "detail": d} for t, k, d in soak.events],
        "event_counts": kinds, "churn_ops": soak.churn_ops,
        "wrk": wrk, "budget": budget, "final_registry": final, "failures": failures,
        "series": series,
        "client_per_second": {h: {str(k): v for k, v in sorted(s.items())} for h, s in per_sec.items()},
        "passed": ok,
    }
    (out / "soak.json").write_text(dump_json(res))
    write_csv(out / "soak.csv", series, per_sec)
    md = summary_md(res)
    (out / "soak.md").write_text(md + "\n")
    made = plot(res, per_sec, out / "soak.png")
    print(md)
    print(f"\nresults: {out}/soak.json, soak.csv, soak.md" + (", soak.png" if made else "") + f"; logs in {soak.work}")
    return ok


def dump_json(res):
    """One line per top-level key, per series row, per event (small, still diffable)."""
    c = lambda v: json.dumps(v, separators=(",", ":"))  # noqa: E731
    parts = []
    for k, v in res.items():
        if k in ("series", "events") and isinstance(v, list):
            parts.append(f'"{k}":[\n' + ",\n".join(c(x) for x in v) + "\n]")
        else:
            parts.append(f'"{k}":{c(v)}')
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write_csv(path, series, per_sec):
    cols = ["rss_kb", "stats", "snapshot_version", "instances_known", "instances_ejected", "outlier_ejections",
            "refresh_failed", "wasm_vms", "lds_updates", "retries"]
    lines = ["t,handoff,rq_2xx,rq_non2xx," + ",".join(cols)]
    for r in series:
        for h in HANDOFFS:
            ok, bad = per_sec.get(h, {}).get(int(r["t"]) - 1, ("", ""))
            lines.append(",".join([str(r["t"]), h, str(ok), str(bad)] + ["" if r[h][c] is None else str(r[h][c]) for c in cols]))
    path.write_text("\n".join(lines) + "\n")


def summary_md(res):
    s = res["settings"]
    c = res["event_counts"]
    out = [f"Soak of {s['duration']} s (warm-up {s['warmup']} s), {res['meta']['envoy']}, {res['meta']['etcd']}, "
           f"git {res['meta']['git']}, {res['meta']['date_utc']}; wrk -t1 -c{s['connections']} per Envoy.",
           f"Events: {c.get('backend_killed', 0)} backends killed (down {s['kill_down']} s), "
           f"{c.get('etcd_killed', 0)} etcd outages ({s['etcd_down']} s), {c.get('listener_reload', 0)} listener reloads; "
           f"registry changes: " + ", ".join(f"{k} {v}" for k, v in res["churn_ops"].items()) + ".", "",
           "| | filter_state | override_host |", "|---|---:|---:|"]
    b = res["budget"]

    def row(label, f):
        out.append(f"| {label} | " + " | ".join(f(b[h], h) for h in HANDOFFS) + " |")

    row("requests", lambda x, h: f"{x['requests']:,}")
    row("failures (budget)", lambda x, h: f"{x['failures']} (≤ {x['failure_budget']}) {'ok' if x['failures_ok'] else 'OVER'}")
    row("consecutive_5xx × kills", lambda x, h: f"{x['failure_budget_literal']}" if h == "filter_state" else "–")

    def kill_sums(x, h):
        if h != "filter_state":
            return "–"
        k = x["kills"]
        return (f"{sum(v['counted'] for v in k)} / {sum(v['in_flight'] for v in k)} / {sum(v['trial'] for v in k)}"
                f" / {sum(v['after'] for v in k)} / {len(x['failures_unexplained'])}")

    row("  failures: causing ejections / in flight at them / failed trials / after them / of no kill", kill_sums)
    row("  of which status / connect / read / write / timeout",
        lambda x, h: " / ".join(str(v) for v in x["failures_detail"].values()))
    row("RssAnon MB end of warm-up → end (growth)",
        lambda x, h: f"{(x['rss_anon_kb_warm'] or 0) / 1024:.1f} → {(x['rss_anon_kb_end'] or 0) / 1024:.1f} "
                     f"({(x['rss_growth'] or 0) * 100:+.1f} %) {'ok' if x['rss_ok'] else 'OVER'}")
    row("VmRSS MB end of warm-up → end",
        lambda x, h: f"{(x['vm_rss_kb_warm'] or 0) / 1024:.1f} → {(x['vm_rss_kb_end'] or 0) / 1024:.1f}")
    row("stats end of warm-up → end", lambda x, h: f"{x['stats_warm']} → {x['stats_end']} {'ok' if x['stats_ok'] else 'OVER'}")
    row("stat names new after warm-up (unexplained)",
        lambda x, h: f"{len(x['stats_new_after_warmup'])} ({len(x['stats_new_unexplained'])})")
    last = res["series"][-1]
    row("snapshot version at end", lambda x, h: str(last[h]["snapshot_version"]))
    row("outlier ejections", lambda x, h: str(last[h]["outlier_ejections"]))
    row("retries (cluster)", lambda x, h: str(last[h]["retries"]))
    row("listener updates (LDS)", lambda x, h: str(last[h]["lds_updates"]))
    row("instances known at end = registered",
        lambda x, h: f"{res['final_registry'][h]['instances_known']} = {res['final_registry'][h]['registered']}")
    for h in HANDOFFS:
        by = res["failures"][h]["by_code_flags_cause"]
        if by:
            out.append(f"\n{h}: non-2xx by code, flags and last disruption: "
                       + "; ".join(f"{k}: {v}" for k, v in sorted(by.items(), key=lambda kv: -kv[1])))
        new = b[h]["stats_new_unexplained"]
        if new:
            out.append(f"\n{h}: stat names new after warm-up: {', '.join(new[:20])}")
    out.append(f"\n**{'PASSED' if res['passed'] else 'FAILED'}**")
    return "\n".join(out)


def envoy_version(res):
    m = re.search(r"/(\d+\.\d+\.\d+)/", res["meta"]["envoy"])
    return f"Envoy {m.group(1)}" if m else res["meta"]["envoy"]


def plot(res, per_sec, path):
    sys.path.insert(0, str(ROOT / ".tools" / "py"))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        log(f"no plot: {e}")
        return False
    colors = {"filter_state": "#dd8452", "override_host": "#4c72b0"}
    series = res["series"]
    fig, axes = plt.subplots(5, 1, figsize=(12, 13), sharex=True)
    for h in HANDOFFS:
        secs = sorted(per_sec[h])
        axes[0].plot(secs, [per_sec[h][s][0] for s in secs], color=colors[h], lw=0.8, label=f"{h}: 2xx/s")
        axes[1].bar([s + (0.2 if h == "override_host" else -0.2) for s in secs], [per_sec[h][s][1] for s in secs],
                    width=0.4, color=colors[h], label=f"{h}: non-2xx/s")
        t = [r["t"] for r in series]
        axes[2].plot(t, [(r[h]["rss_kb"] or 0) / 1024 for r in series], color=colors[h], label=f"{h}: VmRSS")
        axes[2].plot(t, [(r[h].get("rss_anon_kb") or 0) / 1024 for r in series], color=colors[h], ls="--",
                     label=f"{h}: RssAnon (budget)")
        axes[3].plot(t, [r[h]["stats"] for r in series], color=colors[h], label=h)
        axes[4].plot(t, [r[h]["snapshot_version"] for r in series], color=colors[h], label=h)
        rw = res["budget"][h]["rss_anon_kb_warm"]
        if rw:
            axes[2].axhline(rw / 1024 * (1 + RSS_GROWTH_MAX), color=colors[h], ls=":", lw=0.8)
    b = res["budget"]
    axes[0].set_ylabel("answers 2xx / s")
    axes[0].set_title(f"registry-lb soak: {res['settings']['duration']} s, Envoy ×2 side by side "
                      f"({envoy_version(res)}), etcd churn every 200 ms",
                      fontsize=10)
    axes[1].set_ylabel("non-2xx / s")
    axes[1].set_title("failures: " + ", ".join(f"{h} {b[h]['failures']} (budget {b[h]['failure_budget']})" for h in HANDOFFS),
                      fontsize=9)
    axes[2].set_ylabel("Envoy RSS MB")
    axes[2].set_title("dotted: RssAnon at the end of warm-up + 5 %", fontsize=9)
    axes[3].set_ylabel("stats (/stats lines)")
    axes[4].set_ylabel("snapshot version")
    axes[4].set_xlabel("seconds")
    for ax in axes:
        ax.axvline(res["settings"]["warmup"], color="k", ls="--", lw=0.8)
        down = None
        for ev in res["events"]:
            if ev["kind"] == "backend_killed":
                ax.axvline(ev["t"], color="red", lw=0.5, alpha=0.6)
            elif ev["kind"] == "etcd_killed":
                down = ev["t"]
            elif ev["kind"] == "etcd_restarted" and down is not None:
                ax.axvspan(down, ev["t"], color="grey", alpha=0.2, lw=0)
                down = None
        ax.legend(loc="upper left", fontsize=7)
    for ev in res["events"]:
        if ev["kind"] == "listener_reload":
            axes[0].plot([ev["t"]], [0], marker="|", color="green", ms=8)
    fig.text(0.01, 0.005, "red lines: backend killed; grey: etcd down; green ticks: listener reload; "
             "dashed: end of warm-up", fontsize=8)
    fig.tight_layout(rect=(0, 0.01, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=600, help="seconds of load (default 600)")
    ap.add_argument("--warmup", type=float, help="seconds before RSS and stat names are taken as the baseline "
                                                 "(default: max(20, duration / 6))")
    ap.add_argument("--out", default=str(ROOT / "target" / "soak"))
    ap.add_argument("--work", default=str(ROOT / "target" / "soak" / "work"))
    ap.add_argument("--envoy", default=os.environ.get("ENVOY_BIN", str(ROOT / ".tools/envoy-1.40.0/envoy/_bin/envoy")))
    ap.add_argument("--wasm", default=str(ROOT / "target/wasm32-wasip1/release/registry_lb.wasm"))
    ap.add_argument("--backend", default=str(ROOT / "target/release/bench-backend"))
    ap.add_argument("--pool", type=int, default=10, help="backend addresses (default 10)")
    ap.add_argument("--connections", type=int, default=16, help="wrk connections per Envoy (default 16)")
    ap.add_argument("--delay-ms", type=int, default=0, help="wrk: pause per connection between requests")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--kill-at", type=float, default=5)
    ap.add_argument("--kill-every", type=float, default=12)
    ap.add_argument("--kill-down", type=float, default=2)
    ap.add_argument("--etcd-at", type=float, default=9)
    ap.add_argument("--etcd-every", type=float, default=30)
    ap.add_argument("--etcd-down", type=float, default=4)
    ap.add_argument("--reload-at", type=float, default=3)
    ap.add_argument("--reload-every", type=float, default=6)
    a = ap.parse_args()
    if a.warmup is None:
        a.warmup = max(20.0, a.duration / 6)
    if a.duration < 30 or a.warmup >= a.duration - 10:
        raise SystemExit("--duration must be at least 30 s and leave 10 s after the warm-up")
    if a.pool < MIN_REGISTERED + 2:
        raise SystemExit(f"--pool must be at least {MIN_REGISTERED + 2}")
    soak, series, wrk, final, out = run(a)
    ok = report(soak, series, wrk, final, out, a)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
