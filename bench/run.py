#!/usr/bin/env python3
"""registry-lb benchmark driver, run by `./dev bench` (which builds and installs first).

Everything runs on this machine, on loopback only: Envoy (`--concurrency 1` for the load
phases), wrk (1 thread x 32 connections), nginx backends answering `return 200` on many
ports and loopback addresses (127.0.0.0/8 is all loopback), hyper backends for the
slow-instance scenario, and a fake Consul agent (Python's http.server) for the registry
phases. Every load loop is bounded by wrk's -d and a subprocess timeout; the whole run is
bounded by --max-seconds. Timings are reported, never asserted.

Phases:
  main      native ROUND_ROBIN / native + empty wasm filter / registry-lb round_robin and
            least_request (100 instances) / least_request with 10 and 10,000 instances,
            run alternately (A B C ... A B C ...), medians of the rounds
  slow      4 backends, one 50 ms slower: native ROUND_ROBIN and LEAST_REQUEST,
            registry-lb round_robin, least_request and peak_ewma; then the same with the
            instance turning 50 ms slower halfway through each run (fresh Envoys)
  slowhosts (not in the default run; `--phases slowhosts --name slowhosts`) 4 fast
            backends; 1 of 4 +50 ms; 2 of 6 +20 ms; 1 of 4 +5 ms: native LEAST_REQUEST,
            peak_ewma as p2c (choices 2, cost) and as by default (choices 3, hot_cold),
            alternating rounds; the goal rows (p99 <= 1.25 x own all-fast p99, slow
            share <= 1 %, req/s >= native LEAST_REQUEST); then 3 Envoys x 2 workers on 6
            backends (2 of them +20 ms) at once, per-host shares sampled each second
  refresh   a 10,000-instance Consul answer parsed and published inside Envoy
  registry  registry requests per refresh interval at --concurrency 1, 2, 8, and memory
            per wasm VM (RSS of native / empty filter / registry-lb Envoys)
  memory    (not in the default run; alone: `./dev bench --phases memory`, writes memory.*)
            envoy/static.yaml at --concurrency 2 with the empty filter and registry-lb,
            alternately: VmRSS and admin /memory idle, after 2,000 requests, and settled;
            --memory-wasm adds builds, --memory-settings Envoy settings (overload manager)
  matching  (not in the default run; `--phases matching --name matching`) the service
            chosen by route metadata, by `upstream_clusters`, by `hosts`, and a request
            no service claims: Envoy CPU per request against route metadata's; and the
            host calls they differ by (route name, cluster name, :authority) priced
            with the probe in the same run
  hostcalls (not in the default run) one host call repeated N times per request by
            bench/hostcall-probe, priced against the probe doing nothing
  floor     (not in the default run) the probe making registry-lb's per-request host
            calls (and variants leaving parts out) against the empty filter and registry-lb

Results: <out>/<name>.json (every run), .csv, .md (the tables), throughput.png and
slow-instance.png. `--replot FILE.json` redoes tables and plots from a results file.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "bench" / "report.lua"
CONSUL_FIXTURE = ROOT / "tests" / "fixtures" / "consul" / "health_service_modern_shape.json"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
HZ = os.sysconf("SC_CLK_TCK")

# Policies of the slow-instance scenario beyond round_robin / least_request: each is
# tried, and included if registry-lb's configuration accepts it (Envoy starts with it).
EXTRA_SLOW_POLICIES = ["peak_ewma"]


def log(msg):
    print(f"\033[1m--> {msg}\033[0m", file=sys.stderr, flush=True)


def http_get(url, timeout=5.0):
    try:
        with NO_PROXY.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def can_bind(ip, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((ip, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pick_port_range(count, ips, start=20000, stop=32000, step=200):
    """A run of `count` ports free on every address of `ips` (below the ephemeral range)."""
    for base in range(start, stop, step):
        if all(can_bind(ip, p) for p in range(base, base + count) for ip in ips[:: max(1, len(ips) // 4)]):
            return base
    raise SystemExit("no free port range for the nginx backends")


def proc_ticks():
    """{pid: (ppid, utime + stime ticks)} of every process."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(d.name)] = (int(f[1]), int(f[11]) + int(f[12]))
        except (OSError, IndexError, ValueError):
            pass
    return out


def cpu_busy_ticks():
    """user + nice + system ticks of all CPUs (what processes' utime + stime add up to)."""
    with open("/proc/stat") as f:
        v = f.readline().split()[1:]
    return int(v[0]) + int(v[1]) + int(v[2])


class CpuAccount:
    """CPU used by processes that are not this run's during a measurement, in % of one CPU:
    on a shared machine that is the noise of the figure."""

    def __init__(self, procs):
        self.procs = procs

    def ours(self):
        table = proc_ticks()
        roots = {p.pid for p, _ in self.procs.items} | {os.getpid()}
        mine, frontier = set(roots), list(roots)
        children = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        while frontier:
            for c in children.get(frontier.pop(), []):
                if c not in mine:
                    mine.add(c)
                    frontier.append(c)
        import resource
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        reaped = (ru.ru_utime + ru.ru_stime) * HZ
        return sum(table[p][1] for p in mine if p in table) + reaped

    def begin(self):
        self.t0, self.b0, self.o0 = time.time(), cpu_busy_ticks(), self.ours()

    def others_pct(self):
        dt = time.time() - self.t0
        other = (cpu_busy_ticks() - self.b0) - (self.ours() - self.o0)
        return max(0.0, other / HZ / dt * 100) if dt > 0 else None


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


class Procs:
    """Processes started by this run; each is stopped by its own pid at the end."""

    def __init__(self):
        self.items = []

    def start(self, cmd, logfile, cpus=None, env=None):
        if cpus is not None:
            cmd = ["taskset", "-c", cpus] + cmd
        f = open(logfile, "wb")
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env=env)
        self.items.append((p, f))
        return p

    def stop(self, p, grace=10):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for q, f in self.items:
            if q is p:
                f.close()
        self.items = [(q, f) for q, f in self.items if q is not p]

    def stop_all(self):
        for p, _ in list(reversed(self.items)):
            self.stop(p)


# ---------------------------------------------------------------------------------------
# Envoy configuration


def sock(ip, port):
    return {"socket_address": {"address": ip, "port_value": port}}


CIRCUIT_BREAKERS = {"thresholds": [{"priority": "DEFAULT", "max_connections": 1000000,
                                    "max_pending_requests": 1000000, "max_requests": 1000000,
                                    "max_retries": 1000}]}


def static_cluster(name, policy, hosts):
    return {
        "name": name, "type": "STATIC", "lb_policy": policy, "connect_timeout": "1s",
        "circuit_breakers": CIRCUIT_BREAKERS,
        "load_assignment": {"cluster_name": name, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": sock(ip, port)}} for ip, port in hosts]}]},
    }


def original_dst_cluster():
    # cleanup_interval: an alternating benchmark leaves each Envoy idle for a minute
    # between its turns; the default 5 s would drop every host and its connections.
    return {"name": "registry_lb_original_dst", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "1s", "cleanup_interval": "3600s", "circuit_breakers": CIRCUIT_BREAKERS}


def wasm_filter(name, path, configuration=None):
    cfg = {"name": name, "root_id": name,
           "vm_config": {"vm_id": name, "runtime": "envoy.wasm.runtime.v8",
                         "code": {"local": {"filename": str(path)}}}}
    if configuration is not None:
        cfg["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                "value": configuration}
    return {"name": "envoy.filters.http.wasm",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                             "config": cfg}}


SERVICE_EXTRA = {}


def rlb_configuration(policy, source, refresh=None, extra=None):
    svc = {"name": "web", "policy": policy, "sources": [source], **SERVICE_EXTRA, **(extra or {})}
    if refresh:
        svc["refresh_interval"] = refresh
    return json.dumps({"services": [svc]}, separators=(",", ":"))


def static_source(hosts):
    return {"static": {"instances": [{"address": ip, "port": port} for ip, port in hosts]}}


def bootstrap(listen, admin, filters, route_cluster, clusters, rlb_route, warm_route=False):
    route = {"match": {"prefix": "/"}, "route": {"cluster": route_cluster}}
    if rlb_route:
        route["metadata"] = {"filter_metadata": {"registry_lb": {"service": "web"}}}
    routes = [route]
    if warm_route:
        # Warm-up only: a route registry-lb ignores (no metadata), whose requests name
        # their ORIGINAL_DST host in a header, to create the cluster's hosts in order.
        routes.insert(0, {"match": {"prefix": "/__warm"}, "route": {"cluster": route_cluster}})
    router = {"name": "envoy.filters.http.router",
              "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "ingress",
           "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
           "http_filters": filters + [router]}
    return {"admin": {"address": sock("127.0.0.1", admin)},
            "static_resources": {
                "listeners": [{"name": "ingress", "address": sock("127.0.0.1", listen),
                               "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                               "typed_config": hcm}]}]}],
                "clusters": clusters}}


def envoy_spec(kind, hosts, policy=None, empty_wasm=None, rlb_wasm=None, source=None, refresh=None, extra_clusters=(),
               warm_route=False, extra=None):
    """kind: native (policy = Envoy lb_policy) | empty | rlb (policy = registry-lb policy)."""
    listen, admin = free_port(), free_port()
    if kind == "native":
        return listen, admin, bootstrap(listen, admin, [], "backends", [static_cluster("backends", policy, hosts)], False)
    if kind == "empty":
        return listen, admin, bootstrap(listen, admin, [wasm_filter("empty", empty_wasm)], "backends",
                                        [static_cluster("backends", "ROUND_ROBIN", hosts)], False)
    if kind in ("probe_odst", "probe_odst_header"):
        # The probe hands its host over in the filter state, or in the header.
        odst = original_dst_cluster()
        if kind == "probe_odst_header" or warm_route:
            odst["original_dst_lb_config"] = {"use_http_header": True}
        return listen, admin, bootstrap(listen, admin, [wasm_filter("probe", empty_wasm, policy)], "registry_lb_original_dst",
                                        [odst], True, warm_route)
    if kind == "probe":
        # policy = "<op> <count>"; the route carries registry-lb's metadata for route_metadata.
        return listen, admin, bootstrap(listen, admin, [wasm_filter("probe", empty_wasm, policy)], "backends",
                                        [static_cluster("backends", "ROUND_ROBIN", hosts)], True)
    conf = rlb_configuration(policy, source or static_source(hosts), refresh, extra)
    odst = original_dst_cluster()
    if warm_route:
        # Requests handed a host by registry-lb (filter state) never read the header:
        # Envoy's ORIGINAL_DST load balancer looks at the filter state first.
        odst["original_dst_lb_config"] = {"use_http_header": True}
    return listen, admin, bootstrap(listen, admin, [wasm_filter("registry_lb", rlb_wasm, conf)],
                                    "registry_lb_original_dst", [odst, *extra_clusters], True, warm_route)


class Envoy:
    def __init__(self, run, name, spec, concurrency=1, component_log="wasm:info"):
        self.run, self.name = run, name
        self.listen, self.admin, cfg = spec
        self.concurrency = concurrency
        self.cfg_path = run.work / f"envoy-{name}.json"
        self.cfg_path.write_text(json.dumps(cfg))
        self.log_path = run.work / f"envoy-{name}.log"
        self.component_log = component_log
        self.proc = None

    def start(self):
        cmd = [str(self.run.envoy), "-c", str(self.cfg_path), "--concurrency", str(self.concurrency),
               "--disable-hot-restart", "--log-format", "%E.%f [%t][%l] %v", "-l", "warn",
               "--component-log-level", self.component_log]
        self.proc = self.run.procs.start(cmd, self.log_path, cpus=self.run.cpus_envoy)
        return self

    def wait_ready(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                return False
            code, _ = http_get(f"http://127.0.0.1:{self.admin}/ready", 1)
            if code == 200:
                return True
            time.sleep(0.1)
        return False

    def wait_routing(self, timeout=30):
        """Until a request through the listener answers 200 (first snapshot in place)."""
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                return False, "envoy exited"
            last = http_get(f"http://127.0.0.1:{self.listen}/", 3)
            if last[0] == 200:
                return True, last[1][:40]
            time.sleep(0.2)
        return False, last

    def log_tail(self, n=15):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stats(self, pattern="."):
        code, body = http_get(f"http://127.0.0.1:{self.admin}/stats?filter={urllib.parse.quote(pattern)}", 10)
        out = {}
        for line in body.decode(errors="replace").splitlines():
            k, _, v = line.partition(": ")
            try:
                out[k] = int(v)
            except ValueError:
                pass
        return out

    def host_rq(self, cluster):
        code, body = http_get(f"http://127.0.0.1:{self.admin}/clusters", 10)
        out = {}
        for line in body.decode(errors="replace").splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == cluster and parts[2] == "rq_total":
                # An ORIGINAL_DST cluster can list one address several times (hosts
                # created by concurrent first requests): add them up.
                out[parts[1]] = out.get(parts[1], 0) + int(parts[3])
        return out

    def memory(self):
        code, body = http_get(f"http://127.0.0.1:{self.admin}/memory", 5)
        try:
            return {k: int(v) for k, v in json.loads(body).items() if str(v).isdigit()}
        except (ValueError, AttributeError):
            return {}

    def rss_kb(self):
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return None

    def cpu_ticks(self):
        try:
            f = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return int(f[11]) + int(f[12])
        except (OSError, IndexError, ValueError):
            return None

    def thread_ticks(self):
        out = {}
        for t in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            try:
                comm = (t / "comm").read_text().strip()
                f = (t / "stat").read_text().rsplit(")", 1)[1].split()
                out[int(t.name)] = (comm, int(f[11]) + int(f[12]))
            except (OSError, IndexError, ValueError):
                pass
        return out

    def code_space_kb(self):
        """RSS of the process's writable and executable mappings: V8's wasm code space
        (Envoy's own code is read-only and executable)."""
        try:
            total, rwx = 0, False
            for line in Path(f"/proc/{self.proc.pid}/smaps").read_text().splitlines():
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    rwx = line.split()[1].startswith("rwx")
                elif rwx and line.startswith("Rss:"):
                    total += int(line.split()[1])
            return total
        except (OSError, IndexError, ValueError):
            return None

    def mem_snapshot(self):
        st = self.stats(r"^wasm\.|wasmcustom\.registry_lb\.web\.(snapshot_bytes|instances_known)")
        return {"rss_kb": self.rss_kb(), "code_space_kb": self.code_space_kb(), "memory": self.memory(),
                "wasm_vms_active": sum(v for k, v in st.items() if k.endswith(".active")),
                "snapshot_bytes": st.get("wasmcustom.registry_lb.web.snapshot_bytes")}

    def stop(self):
        if self.proc is not None:
            self.run.procs.stop(self.proc)


# ---------------------------------------------------------------------------------------
# Backends


class Nginx:
    """nginx instances answering `200 ok` on every (ip, port) given, ≤ 3,400 sockets each
    (each process stays well under the open-files limit with one upstream connection per
    listening socket)."""

    CHUNK = 3400

    def __init__(self, run, hosts):
        self.run, self.hosts, self.procs = run, hosts, []

    def start(self):
        nofile = 19000
        try:
            import resource
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            if hard != resource.RLIM_INFINITY:
                nofile = min(nofile, hard - 100)
        except (ImportError, ValueError):
            pass
        for i in range(0, len(self.hosts), self.CHUNK):
            chunk = self.hosts[i:i + self.CHUNK]
            d = self.run.work / f"nginx-{i // self.CHUNK}"
            d.mkdir(exist_ok=True)
            listens = "\n".join(f"    listen {ip}:{port} backlog=4096;" for ip, port in chunk)
            conf = f"""worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections {nofile - 200}; multi_accept on; }}
http {{
  access_log off;
  keepalive_timeout 900s;
  keepalive_requests 100000000;
  client_body_temp_path {d}/body;
  server {{
{listens}
    location / {{ return 200 "ok\\n"; }}
  }}
}}
"""
            (d / "nginx.conf").write_text(conf)
            self.procs.append(self.run.procs.start(["nginx", "-p", str(d), "-c", str(d / "nginx.conf")],
                                                   d / "stdout.log", cpus=self.run.cpus_load))
        deadline = time.time() + 60
        probes = self.hosts[:: max(1, len(self.hosts) // 20)] + [self.hosts[-1]]
        for ip, port in probes:
            while http_get(f"http://{ip}:{port}/", 2)[0] != 200:
                if time.time() > deadline or any(p.poll() is not None for p in self.procs):
                    raise SystemExit(f"nginx did not start; see {self.run.work}/nginx-*/error.log")
                time.sleep(0.1)


def nginx_version():
    r = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
    return (r.stderr or r.stdout).strip()


# ---------------------------------------------------------------------------------------
# Fake Consul agent


def consul_entries(hosts, weight_bump=-1):
    """Entries shaped like the recorded Consul 1.21 answer (tests/fixtures), one per host."""
    tpl = json.loads(CONSUL_FIXTURE.read_text())[0]
    tpl_s = json.dumps(tpl, separators=(",", ":"))
    out = []
    for i, (ip, port) in enumerate(hosts):
        e = json.loads(tpl_s)
        node = f"node-{i}"
        e["Node"].update({"ID": f"00000000-0000-0000-0000-{i:012d}", "Node": node, "Address": ip,
                          "TaggedAddresses": {k: ip for k in e["Node"]["TaggedAddresses"]}})
        s = e["Service"]
        s.update({"ID": f"web-{i}", "Service": "web", "Address": ip, "Port": port, "Tags": ["v1"],
                  "Meta": {"version": "v1"},
                  "Weights": {"Passing": 2 if i == weight_bump else 1, "Warning": 1}})
        for v in s["TaggedAddresses"].values():
            v.update({"Address": ip, "Port": port})
        for c in e["Checks"]:
            c["Node"] = node
            c["Status"] = "passing"
            if c["ServiceID"]:
                c.update({"ServiceID": f"web-{i}", "ServiceName": "web", "ServiceTags": ["v1"],
                          "CheckID": f"service:web-{i}", "Name": "Service 'web' check"})
        out.append(e)
    return json.dumps(out, separators=(",", ":")).encode()


class FakeConsul:
    """`GET /v1/health/service/web` with X-Consul-Index, blocking queries (`index`, `wait`),
    and a count of requests. Loopback only."""

    def __init__(self, body):
        self.index, self.body = 10, body
        self.cond = threading.Condition()
        self.requests = []  # (time, path)
        self.sent = {}  # index -> time the answer's last byte was written
        self.closing = False
        fc = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                u = urllib.parse.urlsplit(self.path)
                with fc.cond:
                    fc.requests.append((time.time(), self.path))
                if not u.path.startswith("/v1/health/service/"):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                q = urllib.parse.parse_qs(u.query)
                want = int(q.get("index", ["0"])[0] or 0)
                wait = q.get("wait", ["0"])[0]
                m = re.fullmatch(r"(\d+)(ms|s|m)?", wait)
                secs = 0.0
                if m:
                    secs = int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[m.group(2)]
                with fc.cond:
                    if want and want == fc.index:
                        fc.cond.wait_for(lambda: fc.index != want or fc.closing, timeout=min(secs, 120))
                    index, body = fc.index, fc.body
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Consul-Index", str(index))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                    self.wfile.flush()
                except OSError:
                    return  # Envoy went away (shut down while a query was blocked)
                fc.sent.setdefault(index, time.time())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def change(self, body):
        with self.cond:
            self.index += 1
            self.body = body
            self.cond.notify_all()
            return self.index

    def count(self):
        with self.cond:
            return len(self.requests)

    def stop(self):
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()


def consul_cluster(port):
    return static_cluster("consul", "ROUND_ROBIN", [("127.0.0.1", port)])


# ---------------------------------------------------------------------------------------
# Load


class Run:
    def __init__(self, args):
        self.args = args
        self.envoy = Path(args.envoy)
        self.rlb_wasm = Path(args.wasm).resolve()
        self.empty_wasm = Path(args.empty_wasm).resolve()
        self.backend_bin = Path(args.backend).resolve()
        self.compare_wasm = Path(args.compare_wasm).resolve() if getattr(args, "compare_wasm", None) else None
        self.probe_wasm = Path(args.probe_wasm).resolve() if getattr(args, "probe_wasm", None) else None
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.procs = Procs()
        pin = args.pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset")
        self.cpus_envoy = "0" if pin else None
        self.cpus_load = "1" if pin else None
        self.deadline = time.time() + args.max_seconds
        self.results = {}
        self.acct = CpuAccount(self.procs)
        self.quiet_budget = args.quiet_wait

    def wait_quiet(self):
        """Before a measurement: wait (within --quiet-wait seconds for the whole run) until
        other processes use under 5 % of a CPU over half a second."""
        if self.args.quiet_wait <= 0:
            return None
        while True:
            self.acct.begin()
            time.sleep(0.5)
            others = self.acct.others_pct()
            if others is None or others < 5 or self.quiet_budget <= 0:
                return others
            self.quiet_budget -= 0.5


    def time_left(self):
        return self.deadline - time.time()

    def wrk(self, port, duration):
        cmd = ["wrk", "-t1", "-c32", f"-d{int(duration)}s", "--timeout", "5s", "-s", str(LUA),
               f"http://127.0.0.1:{port}/"]
        if self.cpus_load is not None:
            cmd = ["taskset", "-c", self.cpus_load] + cmd
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
        for line in reversed(r.stdout.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"wrk printed no result: {r.stdout[-500:]} {r.stderr[-500:]}")

    def measure(self, envoy, duration, cluster=None, slow_host=None, midway=None):
        """midway: (at_seconds, start, end): start() is called that long into the
        load, end() after it (a backend that degrades midway)."""
        st0 = envoy.stats(r"^http\.ingress\.downstream_rq_[2-5]xx$|^cluster\.[a-z_]+\.upstream_cx_total$")
        hosts0 = envoy.host_rq(cluster) if slow_host is not None else {}
        quiet_before = self.wait_quiet()
        cpu0 = envoy.cpu_ticks()
        self.acct.begin()
        timer = threading.Timer(midway[0], midway[1]) if midway else None
        if timer:
            timer.start()
        try:
            w = self.wrk(envoy.listen, duration)
        finally:
            if timer:
                timer.cancel()
                timer.join()
                midway[2]()
        others = self.acct.others_pct()
        cpu1 = envoy.cpu_ticks()
        st1 = envoy.stats(r"^http\.ingress\.downstream_rq_[2-5]xx$|^cluster\.[a-z_]+\.upstream_cx_total$")
        d = {k: st1.get(k, 0) - st0.get(k, 0) for k in st1}
        secs = w["duration_us"] / 1e6
        out = {
            "rps": w["requests"] / secs if secs else 0,
            "p50_ms": w["p50_us"] / 1000, "p90_ms": w["p90_us"] / 1000, "p99_ms": w["p99_us"] / 1000,
            "p999_ms": w["p999_us"] / 1000, "mean_ms": w["mean_us"] / 1000, "requests": w["requests"],
            "wrk_errors": w["err_connect"] + w["err_read"] + w["err_write"] + w["err_timeout"] + w["err_status"],
            "rq_2xx": d.get("http.ingress.downstream_rq_2xx", 0),
            "rq_non2xx": sum(v for k, v in d.items() if re.search(r"downstream_rq_[345]xx$", k)),
            "upstream_cx_new": sum(v for k, v in d.items() if k.endswith("upstream_cx_total")),
            "others_cpu_pct": others, "others_cpu_pct_before": quiet_before,
            "envoy_cpu_us_per_rq": ((cpu1 - cpu0) / HZ * 1e6 / w["requests"]) if cpu0 is not None and cpu1 is not None and w["requests"] else None,
        }
        if slow_host is not None:
            hosts1 = envoy.host_rq(cluster)
            delta = {h: hosts1.get(h, 0) - hosts0.get(h, 0) for h in hosts1}
            total = sum(delta.values())
            slow = [slow_host] if isinstance(slow_host, str) else list(slow_host)
            out["slow_share"] = sum(delta.get(h, 0) for h in slow) / total if total else None
            out["host_share"] = {h: round(v / total, 5) for h, v in sorted(delta.items())} if total else {}
        return out


def paired(a, b, field):
    """Median over rounds of a[i][field] / b[i][field]."""
    r = [x[field] / y[field] for x, y in zip(a, b) if x.get(field) and y.get(field)]
    return statistics.median(r) if r else None


def summarize(runs, label, extra=None):
    s = {
        "label": label,
        "rounds": len(runs),
        "rps": median(r["rps"] for r in runs),
        "rps_min": min((r["rps"] for r in runs), default=None),
        "rps_max": max((r["rps"] for r in runs), default=None),
        "p50_ms": median(r["p50_ms"] for r in runs),
        "p99_ms": median(r["p99_ms"] for r in runs),
        "p999_ms": median(r["p999_ms"] for r in runs),
        "cpu_us_per_rq": median(r["envoy_cpu_us_per_rq"] for r in runs),
        "errors": sum(r["wrk_errors"] for r in runs),
        "non2xx": sum(r["rq_non2xx"] for r in runs),
        "upstream_cx_new": sum(r["upstream_cx_new"] for r in runs),
        "others_cpu_pct": median(r.get("others_cpu_pct") for r in runs),
    }
    if runs and "slow_share" in runs[0]:
        s["slow_share"] = median(r.get("slow_share") for r in runs)
    if extra:
        s.update(extra)
    return s


def alternate(run, envoys, rounds, duration, warmup, cluster_of=None, slow_host=None, midway=None):
    """Warm each Envoy up, then rounds of A B C ...; returns {key: [runs]}."""
    for key, e in envoys.items():
        w = warmup(key) if callable(warmup) else warmup
        if w > 0:
            run.wrk(e.listen, w)
    out = {k: [] for k in envoys}
    for r in range(rounds):
        if run.time_left() < duration * len(envoys) + 30:
            log(f"time budget reached: stopping after {r} round(s)")
            break
        for key, e in envoys.items():
            m = run.measure(e, duration, cluster=cluster_of(key) if cluster_of else None, slow_host=slow_host,
                            midway=midway)
            out[key].append(m)
            log(f"round {r + 1}/{rounds} {key:>16}: {m['rps']:9.0f} req/s  p50 {m['p50_ms']:6.2f} ms  "
                f"p99 {m['p99_ms']:6.2f} ms  cpu/rq {m['envoy_cpu_us_per_rq'] or 0:5.1f} us  "
                f"others {m['others_cpu_pct'] or 0:4.1f} %cpu"
                + (f"  slow share {m['slow_share']:.3f}" if m.get("slow_share") is not None else ""))
    return out


def start_all(run, specs, optional=(), skipped=None):
    """Starts every Envoy; an optional one that does not come up (e.g. a setting this
    build does not have) is left out and noted in `skipped`."""
    envoys = {}
    for key, (name, spec) in specs.items():
        envoys[key] = Envoy(run, name, spec).start()
    for key, e in list(envoys.items()):
        ok = e.wait_ready() and e.wait_routing()[0]
        if ok:
            continue
        if key in optional and skipped is not None:
            m = re.findall(r"invalid configuration[^\n]*", e.log_tail(40))
            skipped[key] = m[-1] if m else "Envoy did not start with it"
            log(f"{key} left out: {skipped[key]}")
            e.stop()
            del envoys[key]
            continue
        raise SystemExit(f"Envoy `{key}` did not come up; log {e.log_path}:\n{e.log_tail()}")
    return envoys


# ---------------------------------------------------------------------------------------
# Phases


# Diagnostic variants of the main phase: least_request (100) with one feature off, to
# show what it costs per request. Left out (and noted) if this build rejects the setting.
# Diagnostics of the size cost (docs/benchmark.md, Results, "Where the cost of size
# goes"): the host-call probe at 10 and at the large size; run only when named in --configs.
SIZE_PROBES = ("host_call_floor_10", "host_call_floor_10k", "host_call_floor_10k_random")

VARIANTS = {
    "rlb_lr_100_no_outlier": ("least_request (100), outlier_detection off", {"outlier_detection": {"consecutive_5xx": 0}}),
}


ACCESS_LOG_CONFIGS = ("rlb_lr_100_log", "rlb_lr_100_log_instance")
ACCESS_LOG_FORMAT = ("[%START_TIME%] \"%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL%\" %RESPONSE_CODE% "
                     "%RESPONSE_FLAGS% %DURATION%ms upstream=%UPSTREAM_HOST% "
                     "registry_lb_instance=%FILTER_STATE(wasm.registry_lb_instance:PLAIN)%\n")


def with_access_log(cfg, instance):
    """Adds envoy/static.yaml's access log (to /dev/null) to a registry-lb Envoy config;
    `instance`: the filter puts the chosen instance in filter state for it."""
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": "/dev/null",
        "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}}}}]
    if instance:
        wasm = hcm["http_filters"][0]["typed_config"]["config"]["configuration"]
        conf = json.loads(wasm["value"])
        conf["access_log_instance"] = True
        wasm["value"] = json.dumps(conf, separators=(",", ":"))


def phase_main(run):
    a = run.args
    large = a.large
    nips = (large + 99) // 100
    ips = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(nips)]
    base = pick_port_range(100, ["127.0.0.1"] + ips)
    h100 = [("127.0.0.1", base + i) for i in range(100)]
    h10 = h100[:10]
    hbig = [(ip, base + i) for ip in ips for i in range(100)][:large]
    log(f"nginx backends: 100 ports {base}-{base + 99} on 127.0.0.1, and {large:,} on "
        f"{nips} more loopback addresses x 100 ports")
    ngx = Nginx(run, h100 + hbig)
    ngx.start()
    W, E = run.rlb_wasm, run.empty_wasm
    specs = {
        "native_rr": ("native-rr", envoy_spec("native", h100, "ROUND_ROBIN")),
        "empty_filter": ("empty", envoy_spec("empty", h100, empty_wasm=E)),
        "rlb_rr_100": ("rlb-rr-100", envoy_spec("rlb", h100, "round_robin", rlb_wasm=W)),
        "rlb_lr_100": ("rlb-lr-100", envoy_spec("rlb", h100, "least_request", rlb_wasm=W)),
        "rlb_ring_100": ("rlb-ring-100", envoy_spec("rlb", h100, "ring_hash", rlb_wasm=W, extra={"hash_on": {"path": False}})),
        "rlb_lr_10": ("rlb-lr-10", envoy_spec("rlb", h10, "least_request", rlb_wasm=W)),
        "rlb_lr_10k": ("rlb-lr-10k", envoy_spec("rlb", hbig, "least_request", rlb_wasm=W, warm_route=True)),
        "native_rr_10k": ("native-rr-10k", envoy_spec("native", hbig, "ROUND_ROBIN")),
        # Envoy's own random-access policy at both sizes: what size costs Envoy itself.
        "native_lr_10": ("native-lr-10", envoy_spec("native", h10, "LEAST_REQUEST")),
        "native_lr_10k": ("native-lr-10k", envoy_spec("native", hbig, "LEAST_REQUEST")),
    }
    labels = {
        "native_rr": "native Envoy ROUND_ROBIN (100)",
        "empty_filter": "native + empty wasm filter (100)",
        "rlb_rr_100": "registry-lb round_robin (100)",
        "rlb_lr_100": "registry-lb least_request (100)",
        "rlb_ring_100": "registry-lb ring_hash on the path (100)",
        "host_call_floor": "probe: registry-lb's host calls only (100)",
        "host_call_floor_10": "probe: registry-lb's host calls only (10)",
        "host_call_floor_10k": f"probe: registry-lb's host calls only ({large:,})",
        "rlb_lr_10": "registry-lb least_request (10)",
        "rlb_lr_10k": f"registry-lb least_request ({large:,})",
        "native_rr_10k": f"native Envoy ROUND_ROBIN ({large:,})",
        "native_lr_10": "native Envoy LEAST_REQUEST (10)",
        "native_lr_10k": f"native Envoy LEAST_REQUEST ({large:,})",
        "host_call_floor_10k_random": f"probe: registry-lb's host calls only ({large:,}, random order)",
        "rlb_lr_100_cmp": "registry-lb least_request (100), --compare-wasm build",
    }
    instances = {"native_rr": 100, "empty_filter": 100, "rlb_rr_100": 100, "rlb_lr_100": 100, "rlb_ring_100": 100,
                 "host_call_floor": 100, "host_call_floor_10": 10, "host_call_floor_10k": large,
                 "rlb_lr_10": 10, "rlb_lr_10k": large, "native_rr_10k": large, "rlb_lr_100_cmp": 100,
                 "native_lr_10": 10, "native_lr_10k": large, "host_call_floor_10k_random": large}
    for key, (label, extra) in VARIANTS.items():
        specs[key] = (key.replace("_", "-"), envoy_spec("rlb", h100, "least_request", rlb_wasm=W, extra=extra))
        labels[key] = "registry-lb " + label
        instances[key] = 100
    if run.probe_wasm:
        # The host calls registry-lb's least_request makes per request (route name,
        # gauges, clock, filter state, response code), without any of its logic.
        specs["host_call_floor"] = ("host-call-floor", envoy_spec("probe_odst", h100, f"mimic 100 {base}",
                                                                  empty_wasm=run.probe_wasm))
        # The same at 10 and at the large size: how much of the cost of size is Envoy's
        # (ORIGINAL_DST hosts, connections), not registry-lb's.
        specs["host_call_floor_10"] = ("host-call-floor-10", envoy_spec("probe_odst", h10, f"mimic 10 {base}",
                                                                        empty_wasm=run.probe_wasm))
        specs["host_call_floor_10k"] = ("host-call-floor-10k", envoy_spec("probe_odst", hbig, f"mimic {large} {base} spread",
                                                                          empty_wasm=run.probe_wasm, warm_route=True))
        specs["host_call_floor_10k_random"] = ("host-call-floor-10k-random",
                                               envoy_spec("probe_odst", hbig, f"mimic {large} {base} spread random",
                                                          empty_wasm=run.probe_wasm, warm_route=True))
    for sname in a.memory_settings:
        # least_request (100) with an Envoy memory setting of the memory phase: what it
        # costs per request, side by side.
        key = "rlb_lr_100_" + sname.replace("+", "_")
        listen, admin, cfg = envoy_spec("rlb", h100, "least_request", rlb_wasm=W)
        for x in sname.split("+"):
            cfg.update(json.loads(json.dumps(MEMORY_SETTINGS[x])))
        specs[key] = (key.replace("_", "-"), (listen, admin, cfg))
        labels[key] = f"registry-lb least_request (100) + {sname}"
        instances[key] = 100
    # The access-log field (`access_log_instance`): least_request (100) with an
    # access log to /dev/null carrying %FILTER_STATE(wasm.registry_lb_instance:PLAIN)%,
    # with the filter setting it and without (the field then prints "-"): the
    # difference is the per-request cost of the field. Run only when named in --configs.
    for key, on in (("rlb_lr_100_log", False), ("rlb_lr_100_log_instance", True)):
        listen, admin, cfg = envoy_spec("rlb", h100, "least_request", rlb_wasm=W)
        with_access_log(cfg, on)
        specs[key] = (key.replace("_", "-"), (listen, admin, cfg))
        labels[key] = ("registry-lb least_request (100), access log with the chosen instance"
                       if on else "registry-lb least_request (100), access log without it")
        instances[key] = 100
    if run.compare_wasm:
        specs["rlb_lr_100_cmp"] = ("rlb-lr-100-cmp", envoy_spec("rlb", h100, "least_request", rlb_wasm=run.compare_wasm))
    if a.configs:
        keep = a.configs.split(",")
        specs = {k: v for k, v in specs.items() if k in keep}
    else:
        for k in (*SIZE_PROBES, *ACCESS_LOG_CONFIGS):
            specs.pop(k, None)
    log(f"starting {len(specs)} Envoys (--concurrency 1)")
    skipped = {}
    envoys = start_all(run, specs, optional=VARIANTS, skipped=skipped)
    mem_before = {k: e.mem_snapshot() for k, e in envoys.items()}
    prewarm = None
    for key in ("rlb_lr_10k", *(k for k in SIZE_PROBES if "10k" in k)):
        if key in envoys:
            pw = prewarm_original_dst(run, key, envoys[key], hbig, 90)
            prewarm = prewarm or pw
    log(f"warm-up, then {a.rounds} alternating round(s) of {a.duration} s per configuration")
    runs = alternate(run, envoys, a.rounds, a.duration,
                     lambda k: a.warmup * (3 if "10k" in k else 1))
    mem_after = {k: e.mem_snapshot() for k, e in envoys.items()}
    picks = envoys["rlb_lr_100"].stats(r"registry_lb\.web\.instance\.") if "rlb_lr_100" in envoys else {}
    for e in envoys.values():
        e.stop()
    summary = {k: summarize(v, labels[k], {"instances": instances[k], "mem_before": mem_before[k],
                                           "mem_after": mem_after[k]}) for k, v in runs.items()}
    none = {"rps": None, "p99_ms": None, "cpu_us_per_rq": None}
    nat, emp = summary.get("native_rr", none), summary.get("empty_filter", none)
    # Ratios are medians of per-round ratios: each round's runs are seconds apart, so a
    # slow spell of the machine moves both sides of a ratio alike.
    for k, s in summary.items():
        if "native_rr" in runs:
            s["vs_native"] = paired(runs[k], runs["native_rr"], "rps")
        if "empty_filter" in runs:
            s["vs_empty"] = paired(runs[k], runs["empty_filter"], "rps")
            s["p99_vs_empty"] = paired(runs[k], runs["empty_filter"], "p99_ms")
        if s["cpu_us_per_rq"] and nat["cpu_us_per_rq"]:
            s["cpu_us_over_native"] = s["cpu_us_per_rq"] - nat["cpu_us_per_rq"]
    lr, lr10, lr10k = (summary.get(k, dict(none)) for k in ("rlb_lr_100", "rlb_lr_10", "rlb_lr_10k"))
    targets = {}
    if lr.get("vs_empty") is not None:
        targets["least_request >= 0.97 x empty filter throughput"] = [round(lr["vs_empty"], 3), lr["vs_empty"] >= 0.97]
    if lr.get("vs_native") is not None:
        targets["least_request >= 0.83 x native throughput"] = [round(lr["vs_native"], 3), lr["vs_native"] >= 0.83]
    if lr.get("p99_vs_empty") is not None:
        targets["least_request p99 within 5 % of the empty filter's"] = [round(lr["p99_vs_empty"], 3), lr["p99_vs_empty"] <= 1.05]
    for key, name in (("rlb_rr_100", "round_robin"), ("rlb_ring_100", "ring_hash")):
        v = summary.get(key, {}).get("vs_empty")
        if v is not None:
            targets[f"{name} >= 0.97 x empty filter throughput"] = [round(v, 3), v >= 0.97]
    if "rlb_lr_10" in runs and "rlb_lr_10k" in runs:
        r = paired(runs["rlb_lr_10k"], runs["rlb_lr_10"], "rps")
        if r is not None:
            targets[f"{large:,} vs 10 instances within 10 %"] = [round(r, 3), abs(r - 1) <= 0.10]
    if "native_lr_10" in runs and "native_lr_10k" in runs:
        # Envoy itself slows down with many upstream hosts (connections and hosts spread
        # over 10,000 addresses instead of 10): registry-lb's own share is its throughput
        # relative to native LEAST_REQUEST over the same hosts, at each size.
        r = paired(runs["native_lr_10k"], runs["native_lr_10"], "rps")
        if r is not None:
            targets[f"native Envoy LEAST_REQUEST, {large:,} vs 10 instances (Envoy's own cost of size; no target)"] = [round(r, 3), None]
        if "rlb_lr_10" in runs and "rlb_lr_10k" in runs:
            small = paired(runs["rlb_lr_10"], runs["native_lr_10"], "rps")
            big = paired(runs["rlb_lr_10k"], runs["native_lr_10k"], "rps")
            if small and big:
                targets[f"least_request vs native LEAST_REQUEST at {large:,}, over the same at 10 (within 10 %)"] = [
                    round(big / small, 3), big / small >= 0.90]
    if "native_rr_10k" in summary and "native_rr" in summary and nat["rps"] and summary["native_rr_10k"]["rps"]:
        summary["native_rr_10k"]["vs_native_100"] = summary["native_rr_10k"]["rps"] / nat["rps"]
    run.results["main"] = {"summary": summary, "runs": runs, "targets": targets, "original_dst_prewarm": prewarm,
                           "large": large, "variants_left_out": skipped,
                           "per_instance_pick_stats_defined": sum(1 for k in picks if k.endswith(".picks"))}
    for p in ngx.procs:
        run.procs.stop(p)


def prewarm_original_dst(run, key, envoy, hosts, limit_s):
    """Creates every host of the ORIGINAL_DST cluster (and a connection to it) before the
    measurements, through the warm-up route, in order. Envoy adds each new host on its
    main thread by rebuilding the host set, so the first request to each of 10,000 hosts
    is expensive; what that costs is reported. Bounded by `limit_s`."""
    path = run.work / "warm-hosts.txt"
    path.write_text("".join(f"{ip}:{port}\n" for ip, port in hosts))
    stat = "cluster.registry_lb_original_dst.membership_total"
    t0, cpu0 = time.time(), envoy.cpu_ticks()
    have = 0
    log(f"creating the {len(hosts):,} ORIGINAL_DST hosts of {key} (at most {limit_s} s)")
    while time.time() - t0 < limit_s:
        cmd = ["wrk", "-t1", "-c32", "-d3s", "--timeout", "5s", "-s", str(ROOT / "bench" / "warm.lua"),
               f"http://127.0.0.1:{envoy.listen}/"]
        if run.cpus_load is not None:
            cmd = ["taskset", "-c", run.cpus_load] + cmd
        subprocess.run(cmd, capture_output=True, timeout=60, env={**os.environ, "BENCH_WARM_HOSTS": str(path)})
        have = envoy.stats(r"membership_total$").get(stat, 0)
        if have >= len(hosts):
            break
    secs = time.time() - t0
    cpu = (envoy.cpu_ticks() - cpu0) / HZ
    out = {"hosts": have, "seconds": round(secs, 1), "envoy_cpu_s": round(cpu, 1),
           "envoy_cpu_ms_per_new_host": round(cpu * 1000 / have, 2) if have else None}
    log(f"{have:,} hosts in {secs:.1f} s, Envoy CPU {cpu:.1f} s ({out['envoy_cpu_ms_per_new_host']} ms per new host)")
    return out


def peak_ewma_hook():
    return list(EXTRA_SLOW_POLICIES)


def phase_slow(run):
    a = run.args
    ports = []
    while len(ports) < 4:
        p = free_port()
        if p not in ports:
            ports.append(p)
    hosts = [("127.0.0.1", p) for p in ports]
    slow = f"127.0.0.1:{ports[3]}"
    args = [f"127.0.0.1:{p}" for p in ports[:3]] + [f"{slow}={a.slow_ms}"]
    backend = run.procs.start([str(run.backend_bin), *args], run.work / "slow-backends.log", cpus=run.cpus_load,
                              env={**os.environ, "BENCH_BACKEND_MAX_SECS": str(int(a.max_seconds) + 60)})
    for ip, p in hosts:
        deadline = time.time() + 20
        while http_get(f"http://{ip}:{p}/", 2)[0] != 200:
            if time.time() > deadline or backend.poll() is not None:
                raise SystemExit(f"bench-backend did not start; see {run.work}/slow-backends.log")
            time.sleep(0.1)
    W = run.rlb_wasm
    specs = {
        "native_rr": ("slow-native-rr", envoy_spec("native", hosts, "ROUND_ROBIN")),
        "native_lr": ("slow-native-lr", envoy_spec("native", hosts, "LEAST_REQUEST")),
        "rlb_rr": ("slow-rlb-rr", envoy_spec("rlb", hosts, "round_robin", rlb_wasm=W)),
        "rlb_lr": ("slow-rlb-lr", envoy_spec("rlb", hosts, "least_request", rlb_wasm=W)),
    }
    labels = {"native_rr": "native Envoy ROUND_ROBIN", "native_lr": "native Envoy LEAST_REQUEST",
              "rlb_rr": "registry-lb round_robin", "rlb_lr": "registry-lb least_request"}
    skipped = {}
    for pol in peak_ewma_hook():
        key = f"rlb_{pol}"
        e = Envoy(run, f"slow-probe-{pol}", envoy_spec("rlb", hosts, pol, rlb_wasm=W)).start()
        ok = e.wait_ready(30) and e.wait_routing(15)[0]
        if ok:
            specs[key] = (f"slow-rlb-{pol}", envoy_spec("rlb", hosts, pol, rlb_wasm=W))
            labels[key] = f"registry-lb {pol}"
        else:
            m = re.findall(r"invalid configuration[^\n]*", e.log_tail(40))
            skipped[pol] = m[-1] if m else "Envoy did not start with it"
            log(f"policy {pol} not accepted by this build: {skipped[pol]}")
        e.stop()
    log(f"slow-instance scenario: 4 backends, {slow} is {a.slow_ms} ms slower; {len(specs)} configurations")
    cluster_of = lambda k: "backends" if k.startswith("native") else "registry_lb_original_dst"
    envoys = start_all(run, specs)
    runs = alternate(run, envoys, a.slow_rounds, a.duration, a.warmup, cluster_of=cluster_of, slow_host=slow)
    for e in envoys.values():
        e.stop()
    summary = {k: summarize(v, labels[k]) for k, v in runs.items()}
    run.results["slow"] = {"summary": summary, "runs": runs, "slow_ms": a.slow_ms, "backends": 4,
                           "policies_not_accepted": skipped, "targets": slow_targets(runs)}

    # Second scenario: the same instance is fast for the first half of every run and
    # slow for the second (fresh Envoys: nothing learnt in the first scenario).
    def set_delay(ms):
        code, _ = http_get(f"http://{slow}/__delay?ms={ms}", 5)
        if code != 200:
            log(f"could not set the delay of {slow} to {ms} ms (HTTP {code})")
    set_delay(0)
    duration = a.duration * 2
    log(f"degrading-instance scenario: {slow} turns {a.slow_ms} ms slower {duration / 2:g} s into each {duration} s run")
    envoys = start_all(run, {k: (name.replace("slow-", "degrade-"), spec) for k, (name, spec) in specs.items()})
    runs = alternate(run, envoys, a.slow_rounds, duration, a.warmup, cluster_of=cluster_of, slow_host=slow,
                     midway=(duration / 2, lambda: set_delay(a.slow_ms), lambda: set_delay(0)))
    for e in envoys.values():
        e.stop()
    run.procs.stop(backend)
    summary = {k: summarize(v, labels[k]) for k, v in runs.items()}
    run.results["degrade"] = {"summary": summary, "runs": runs, "slow_ms": a.slow_ms, "backends": 4,
                              "duration_s": duration, "targets": slow_targets(runs)}


# The slow-host scenarios: (label, backends, {backend index: extra ms}).
SLOW_HOSTS_SCENARIOS = [("4 fast", 4, {}), ("1 of 4 +50 ms", 4, {3: 50}), ("2 of 6 +20 ms", 6, {4: 20, 5: 20}),
                        ("1 of 4 +5 ms", 4, {3: 5})]
# peak_ewma as it was (p2c over Finagle's cost) and as it is by default (hot-cold, 3 choices).
PEAK_P2C = {"peak_ewma": {"choices": 2, "rule": "cost"}}


def phase_slowhosts(run):
    """The slow-host table: each scenario with native LEAST_REQUEST, peak_ewma's old p2c
    and its default hot-cold rule, alternating rounds; then the goal rows, and a
    herding check (3 Envoys x 2 workers on the same 6 backends, per-host shares over time)."""
    a = run.args
    W = run.rlb_wasm
    labels = {"native_lr": "native Envoy LEAST_REQUEST", "rlb_p2c": "registry-lb peak_ewma p2c (choices 2, cost)",
              "rlb_hot_cold": "registry-lb peak_ewma (choices 3, hot_cold)"}
    cluster_of = lambda k: "backends" if k.startswith("native") else "registry_lb_original_dst"
    out = {"scenarios": {}, "labels": labels}
    for label, n, slow_ms in SLOW_HOSTS_SCENARIOS:
        if run.time_left() < 60:
            log(f"time budget reached: scenario {label} skipped")
            continue
        ports = pick_port_range(n, ["127.0.0.1"])
        hosts = [("127.0.0.1", ports + i) for i in range(n)]
        args = [f"127.0.0.1:{p}" + (f"={slow_ms[i]}" if i in slow_ms else "") for i, (_, p) in enumerate(hosts)]
        slow = [f"127.0.0.1:{hosts[i][1]}" for i in slow_ms]
        backend = start_backends(run, args, hosts, f"slowhosts-{n}-{len(slow_ms)}")
        specs = {"native_lr": ("sh-native-lr", envoy_spec("native", hosts, "LEAST_REQUEST")),
                 "rlb_p2c": ("sh-rlb-p2c", envoy_spec("rlb", hosts, "peak_ewma", rlb_wasm=W, extra=PEAK_P2C)),
                 "rlb_hot_cold": ("sh-rlb-hot-cold", envoy_spec("rlb", hosts, "peak_ewma", rlb_wasm=W))}
        log(f"slow hosts: {label}: {', '.join(args)}")
        envoys = start_all(run, specs)
        runs = alternate(run, envoys, a.slow_rounds, a.duration, a.warmup, cluster_of=cluster_of, slow_host=slow)
        for e in envoys.values():
            e.stop()
        run.procs.stop(backend)
        out["scenarios"][label] = {"backends": n, "slow_ms": {args[i]: ms for i, ms in slow_ms.items()},
                                   "summary": {k: summarize(v, labels[k]) for k, v in runs.items()}, "runs": runs}
    out["goals"] = slow_hosts_goals(out["scenarios"])
    if run.time_left() > 90:
        out["herding"] = herding(run)
    run.results["slowhosts"] = out


def start_backends(run, args, hosts, name):
    backend = run.procs.start([str(run.backend_bin), *args], run.work / f"{name}.log", cpus=run.cpus_load,
                              env={**os.environ, "BENCH_BACKEND_MAX_SECS": str(int(run.args.max_seconds) + 60)})
    for ip, p in hosts:
        deadline = time.time() + 20
        while http_get(f"http://{ip}:{p}/", 2)[0] != 200:
            if time.time() > deadline or backend.poll() is not None:
                raise SystemExit(f"bench-backend did not start; see {run.work}/{name}.log")
            time.sleep(0.1)
    return backend


def slow_hosts_goals(scenarios):
    """#15's goal rows per policy and slow scenario: p99 <= 1.25 x the same policy's
    all-fast p99 (medians, from different scenarios' rounds: not side by side), share
    to slow hosts <= 1 %, req/s >= native LEAST_REQUEST's (median of per-round ratios)."""
    fast = scenarios.get("4 fast", {}).get("summary", {})
    goals = {}
    for label, sc in scenarios.items():
        if label == "4 fast":
            continue
        for key, s in sc["summary"].items():
            if key == "native_lr":
                continue
            own = fast.get(key, {}).get("p99_ms")
            p99r = s["p99_ms"] / own if own and s.get("p99_ms") else None
            rpsr = paired(sc["runs"][key], sc["runs"].get("native_lr", []), "rps")
            share = s.get("slow_share")
            goals[f"{label} / {key}"] = {
                "p99_vs_own_all_fast": None if p99r is None else round(p99r, 3), "p99_met": None if p99r is None else p99r <= 1.25,
                "slow_share": share, "share_met": None if share is None else share <= 0.01,
                "rps_vs_native_lr": None if rpsr is None else round(rpsr, 3), "rps_met": None if rpsr is None else rpsr >= 1.0}
    return goals


def herding(run, seconds=12, step=1.0):
    """3 Envoys x 2 workers (--concurrency 2) share 6 backends, two of them 20 ms
    slower; each under its own wrk (1 thread x 16 connections) at once. Per-host
    shares of all three are sampled every `step` s; reported per policy: the share
    series and, per host, the coefficient of variation of its share over time."""
    n = 6
    base = pick_port_range(n, ["127.0.0.1"])
    hosts = [("127.0.0.1", base + i) for i in range(n)]
    args = [f"127.0.0.1:{p}" + ("=20" if i >= 4 else "") for i, (_, p) in enumerate(hosts)]
    backend = start_backends(run, args, hosts, "herding")
    res = {"backends": args, "envoys": 3, "concurrency": 2, "seconds": seconds, "step_s": step, "policies": {}}
    for key, extra in (("rlb_p2c", PEAK_P2C), ("rlb_hot_cold", None)):
        envoys = [Envoy(run, f"herd-{key}-{i}", envoy_spec("rlb", hosts, "peak_ewma", rlb_wasm=run.rlb_wasm, extra=extra),
                        concurrency=2).start() for i in range(3)]
        for e in envoys:
            if not (e.wait_ready() and e.wait_routing()[0]):
                raise SystemExit(f"Envoy {e.name} did not come up; log {e.log_path}")
        for e in envoys:
            run.wrk(e.listen, 1)
        series, rps = [], []
        prev = [e.host_rq("registry_lb_original_dst") for e in envoys]

        def load(e):
            cmd = ["wrk", "-t1", "-c16", f"-d{seconds}s", "--timeout", "5s", f"http://127.0.0.1:{e.listen}/"]
            if run.cpus_load is not None:
                cmd = ["taskset", "-c", run.cpus_load] + cmd
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
            m = re.search(r"Requests/sec:\s+([0-9.]+)", r.stdout)
            rps.append(float(m.group(1)) if m else None)

        threads = [threading.Thread(target=load, args=(e,)) for e in envoys]
        for t in threads:
            t.start()
        t0 = time.time()
        while time.time() - t0 < seconds - step / 2:
            time.sleep(step)
            cur = [e.host_rq("registry_lb_original_dst") for e in envoys]
            delta = {}
            for c, p in zip(cur, prev):
                for h, v in c.items():
                    delta[h] = delta.get(h, 0) + v - p.get(h, 0)
            prev = cur
            total = sum(delta.values())
            if total:
                series.append({h: round(delta.get(h, 0) / total, 4) for h in (x.split("=")[0] for x in args)})
        for t in threads:
            t.join()
        for e in envoys:
            e.stop()
        cv = {}
        for h in [x.split("=")[0] for x in args]:
            v = [x[h] for x in series]
            m = statistics.mean(v) if v else 0
            cv[h] = round(statistics.pstdev(v) / m, 3) if len(v) > 1 and m else None
        fast = [cv[h] for h in cv if cv[h] is not None and not any(x.startswith(h + "=") for x in args)]
        res["policies"][key] = {"series": series, "cv": cv, "max_cv_fast_hosts": max(fast) if fast else None,
                                "rps_per_envoy": rps,
                                "slow_share": round(statistics.mean(sum(x[a.split("=")[0]] for a in args if "=" in a)
                                                                    for x in series), 5) if series else None}
        log(f"herding {key}: per-host share CV over {len(series)} samples: {cv}; req/s per Envoy {rps}")
    run.procs.stop(backend)
    return res


def slow_targets(runs):
    """#4's targets: peak_ewma p99 <= 0.5 x native ROUND_ROBIN's and <= native
    LEAST_REQUEST's, as medians of per-round ratios."""
    pe = runs.get("rlb_peak_ewma")
    if not pe:
        return {}
    out = {}
    for key, bound, label in (("native_rr", 0.5, "peak_ewma p99 <= 0.5 x native ROUND_ROBIN p99"),
                              ("native_lr", 1.0, "peak_ewma p99 <= native LEAST_REQUEST p99")):
        r = [x["p99_ms"] / y["p99_ms"] for x, y in zip(pe, runs.get(key, [])) if x["p99_ms"] and y["p99_ms"]]
        if r:
            m = statistics.median(r)
            out[label] = {"ratio": round(m, 3), "bound": bound, "met": m <= bound}
    return out


# N per request is chosen so that N calls cost tens of µs: well above this machine's noise
# (filter_state can be set once per request only, so its figure is the noisiest).
HOSTCALL_OPS = [("none", 1), ("route_metadata", 20), ("route_name", 20), ("filter_state", 1), ("get_metric", 100),
                ("increment_metric", 100), ("current_time", 100), ("response_code", 20), ("status_header", 50),
                ("guest_format", 50), ("set_property", 20)]


def phase_hostcalls(run):
    """Prices single host calls: a probe filter repeats one call N times per request;
    (Envoy CPU per request − the probe doing nothing) / N is the cost of one call."""
    base = pick_port_range(10, ["127.0.0.1"])
    hosts = [("127.0.0.1", base + i) for i in range(10)]
    # --configs: only these ops (by name; the do-nothing baseline always runs).
    keep = run.args.configs.split(",") if run.args.configs else None
    ops = [(op, n) for op, n in HOSTCALL_OPS if keep is None or op == "none" or op in keep]
    specs = {f"{op}_x{n}": (f"probe-{op}", envoy_spec("probe", hosts, f"{op} {n}", empty_wasm=run.probe_wasm))
             for op, n in ops}
    runs = alternate_on_nginx(run, hosts, specs, run.args.slow_rounds)
    summary = {k: summarize(v, k) for k, v in runs.items()}
    base = runs["none_x1"]
    for (op, n), (k, s) in zip(ops, summary.items()):
        s["op"], s["count"] = op, n
        if op != "none":
            # Per round: (this op's CPU per request − the do-nothing probe's) / N.
            d = [(x["envoy_cpu_us_per_rq"] - y["envoy_cpu_us_per_rq"]) * 1000 / n
                 for x, y in zip(runs[k], base) if x["envoy_cpu_us_per_rq"] and y["envoy_cpu_us_per_rq"]]
            if d:
                s["ns_per_call"] = round(statistics.median(d))
                s["ns_per_call_min_max"] = [round(min(d)), round(max(d))]
    run.results["hostcalls"] = {"summary": summary, "runs": runs}


def alternate_on_nginx(run, hosts, specs, rounds):
    """nginx on `hosts`, the Envoys of `specs`, alternating rounds; everything stopped
    after. Returns {key: [runs]}."""
    ngx = Nginx(run, hosts)
    ngx.start()
    envoys = start_all(run, specs)
    try:
        return alternate(run, envoys, rounds, run.args.duration, run.args.warmup)
    finally:
        for e in envoys.values():
            e.stop()
        for p in ngx.procs:
            run.procs.stop(p)


FLOOR_CONFIGS = [
    ("empty_filter", "empty wasm filter"),
    ("mimic", "host calls of least_request, filter-state hand-off"),
    ("mimic_nofs", "the same without the filter state (cluster balances itself)"),
    ("mimic_nocode", "the same without response.code"),
    ("mimic_header", "the same, header hand-off instead of filter state"),
    ("rlb_lr_100", "registry-lb least_request"),
]


def phase_floor(run):
    """Where registry-lb's per-request cost goes: the probe making exactly its host
    calls (with parts left out) against the empty filter and registry-lb itself, 100
    nginx backends, alternating rounds; differences of Envoy CPU per request."""
    base = pick_port_range(100, ["127.0.0.1"])
    hosts = [("127.0.0.1", base + i) for i in range(100)]
    m = f"mimic 100 {base}"
    specs = {
        "empty_filter": ("floor-empty", envoy_spec("empty", hosts, empty_wasm=run.empty_wasm)),
        "mimic": ("floor-mimic", envoy_spec("probe_odst", hosts, m, empty_wasm=run.probe_wasm)),
        "mimic_nofs": ("floor-mimic-nofs", envoy_spec("probe", hosts, m + " nofs", empty_wasm=run.probe_wasm)),
        "mimic_nocode": ("floor-mimic-nocode", envoy_spec("probe_odst", hosts, m + " nocode", empty_wasm=run.probe_wasm)),
        "mimic_header": ("floor-mimic-header", envoy_spec("probe_odst_header", hosts, m + " header", empty_wasm=run.probe_wasm)),
        "rlb_lr_100": ("floor-rlb-lr", envoy_spec("rlb", hosts, "least_request", rlb_wasm=run.rlb_wasm)),
    }
    runs = alternate_on_nginx(run, hosts, specs, run.args.rounds)
    labels = dict(FLOOR_CONFIGS)
    summary = {k: summarize(v, labels[k]) for k, v in runs.items()}
    for k, s in summary.items():
        d = [x["envoy_cpu_us_per_rq"] - y["envoy_cpu_us_per_rq"] for x, y in zip(runs[k], runs["empty_filter"])
             if x["envoy_cpu_us_per_rq"] and y["envoy_cpu_us_per_rq"]]
        s["cpu_us_over_empty"] = round(statistics.median(d), 1) if d else None
        s["vs_empty"] = paired(runs[k], runs["empty_filter"], "rps")
    run.results["floor"] = {"summary": summary, "runs": runs}


MATCHING_CONFIGS = {
    "metadata": "route metadata names the service",
    "metadata_2": "the same, a second Envoy (noise between identical configurations)",
    "clusters": "`upstream_clusters` holds the route's cluster (xds.cluster_name)",
    "hosts": "`hosts` holds the request's authority",
    "untouched": "no service claims the request (routed by Envoy's ROUND_ROBIN)",
    "empty_filter": "empty wasm filter, Envoy's ROUND_ROBIN (reference)",
}

# The host calls the ways differ by, priced with bench/hostcall-probe in the same run:
# (op, calls per request); ns per call = (CPU per request − probe_none's) / calls.
MATCHING_PROBES = {
    "probe_none": ("none", 1),
    "probe_route_name": ("route_name", 20),
    "probe_cluster_name": ("cluster_name", 20),
    "probe_authority": ("authority", 20),
}


def matching_spec(kind, hosts, wasm):
    """One named route (as envoy/static.yaml's, Istio's and Envoy Gateway's are), the
    registry-lb service `web` round_robin over `hosts`, claimed by: route metadata
    (`metadata`), `upstream_clusters` (`clusters`), `hosts` (`hosts`), or nothing
    (`untouched`: the route goes to a STATIC cluster of the same hosts)."""
    listen, admin = free_port(), free_port()
    claim = {"clusters": {"upstream_clusters": ["registry_lb_original_dst"]}, "hosts": {"hosts": ["127.0.0.1"]}}
    conf = rlb_configuration("round_robin", static_source(hosts), extra=claim.get(kind))
    cluster = "backends" if kind == "untouched" else "registry_lb_original_dst"
    cfg = bootstrap(listen, admin, [wasm_filter("registry_lb", wasm, conf)], cluster,
                    [original_dst_cluster(), static_cluster("backends", "ROUND_ROBIN", hosts)],
                    kind in ("metadata", "metadata_2"))
    route = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"][0]["routes"][0]
    route["name"] = "web"
    return listen, admin, cfg


def phase_matching(run):
    """What choosing the service costs per request, by the way it is chosen: the same
    10 nginx backends and load through registry-lb with the service named by route
    metadata, by `upstream_clusters`, by `hosts`, and a request no service claims
    (plus a second metadata Envoy, the noise between identical configurations, and the
    empty filter); alternating rounds, Envoy CPU per request against metadata's."""
    base = pick_port_range(10, ["127.0.0.1"])
    hosts = [("127.0.0.1", base + i) for i in range(10)]
    specs = {k: (f"match-{k.replace('_', '-')}", matching_spec(k, hosts, run.rlb_wasm))
             for k in MATCHING_CONFIGS if k != "empty_filter"}
    specs["empty_filter"] = ("match-empty", envoy_spec("empty", hosts, empty_wasm=run.empty_wasm))
    labels = dict(MATCHING_CONFIGS)
    if run.probe_wasm:
        for k, (op, n) in MATCHING_PROBES.items():
            specs[k] = (k.replace("_", "-"), envoy_spec("probe", hosts, f"{op} {n}", empty_wasm=run.probe_wasm))
            labels[k] = f"probe: {op} x {n} per request"
    runs = alternate_on_nginx(run, hosts, specs, run.args.rounds)
    summary = {k: summarize(v, labels[k]) for k, v in runs.items()}
    for k, s in summary.items():
        if k not in MATCHING_PROBES or k == "probe_none":
            continue
        n = MATCHING_PROBES[k][1]
        d = [(x["envoy_cpu_us_per_rq"] - y["envoy_cpu_us_per_rq"]) * 1000 / n
             for x, y in zip(runs[k], runs["probe_none"]) if x["envoy_cpu_us_per_rq"] and y["envoy_cpu_us_per_rq"]]
        if d:
            s["ns_per_call"] = round(statistics.median(d))
            s["ns_per_call_min_max"] = [round(min(d)), round(max(d))]
    ref = runs["metadata"]
    for k, s in summary.items():
        if k in MATCHING_PROBES:
            continue
        d = [x["envoy_cpu_us_per_rq"] - y["envoy_cpu_us_per_rq"] for x, y in zip(runs[k], ref)
             if x["envoy_cpu_us_per_rq"] and y["envoy_cpu_us_per_rq"]]
        if d and k != "metadata":
            s["cpu_us_over_metadata"] = round(statistics.median(d), 2)
            s["cpu_us_over_metadata_min_max"] = [round(min(d), 2), round(max(d), 2)]
        s["vs_metadata"] = paired(runs[k], ref, "rps")
        r = [x["rps"] / y["rps"] for x, y in zip(runs[k], ref) if x["rps"] and y["rps"]]
        s["vs_metadata_min_max"] = [round(min(r), 3), round(max(r), 3)] if r else None
    run.results["matching"] = {"summary": summary, "runs": runs, "instances": len(hosts), "policy": "round_robin"}


def wait_log(path, pattern, count, timeout):
    """Lines matching `pattern` once at least `count` exist (or what there is at timeout)."""
    rx = re.compile(pattern)
    deadline = time.time() + timeout
    while True:
        lines = [l for l in path.read_text(errors="replace").splitlines() if rx.search(l)]
        if len(lines) >= count or time.time() > deadline:
            return lines
        time.sleep(0.05)


def log_time(line):
    m = re.match(r"(\d+\.\d+) \[(\d+)\]", line)
    return (float(m.group(1)), int(m.group(2))) if m else (None, None)


def phase_refresh(run):
    """Consul answers of `refresh_sizes` instances changed `refresh_changes` times: time
    from answer to published snapshot, the filter's own time, CPU by thread. With
    --compare-wasm, every size runs once per build (this build first), one after the other."""
    a = run.args
    out = {}
    builds = [("", run.rlb_wasm)] + ([(" (compare build)", run.compare_wasm)] if run.compare_wasm else [])
    for n, (label, wasm) in ((n, b) for n in a.refresh_sizes for b in builds):
        if run.time_left() < 60:
            log("time budget reached: skipping the rest of the refresh phase")
            break
        hosts = [(f"127.0.{1 + i // 250}.{1 + i % 250}", 20000 + i % 100) for i in range(n)]
        body0 = consul_entries(hosts)
        reg = FakeConsul(body0).start()
        src = {"consul": {"cluster": "consul", "service": "web", "wait": "30s"}}
        spec = envoy_spec("rlb", hosts, "least_request", rlb_wasm=wasm, source=src,
                          extra_clusters=[consul_cluster(reg.port)])
        tag = f"refresh-{n}" + ("-cmp" if label else "")
        e = Envoy(run, tag, spec, component_log="wasm:debug").start()
        if not e.wait_ready():
            raise SystemExit(f"Envoy (refresh) did not start:\n{e.log_tail()}")
        pub_rx = r"published snapshot version"
        first = wait_log(e.log_path, pub_rx, 1, 60)
        if not first:
            raise SystemExit(f"no snapshot published:\n{e.log_tail()}")
        time.sleep(0.5)
        threads = e.thread_ticks()
        samples = []
        for k in range(1, a.refresh_changes + 1):
            body = consul_entries(hosts, weight_bump=k)
            idx = reg.change(body)
            lines = wait_log(e.log_path, pub_rx, 1 + k, 30)
            if len(lines) < 1 + k:
                log(f"refresh {k}: no publication within 30 s")
                break
            t_pub, tid = log_time(lines[k])
            t_sent = reg.sent.get(idx)
            m = re.search(r"version (\d+)", lines[k])
            ver = m.group(1) if m else None
            tables = wait_log(e.log_path, rf"worker table at version {ver} ", 2, 2)
            tbl = [log_time(l) for l in tables]
            # The filter's own time on that answer (copy in, parse, publish), on its thread.
            handled = wait_log(e.log_path, r"handled in \d+ us \(updated\)", 1 + k, 5)
            m_us = re.search(r"handled in (\d+) us", handled[k]) if len(handled) > k else None
            samples.append({"index": idx, "answer_bytes": len(body),
                            "filter_ms": int(m_us.group(1)) / 1000 if m_us else None,
                            "sent_to_published_ms": (t_pub - t_sent) * 1000 if t_pub and t_sent else None,
                            "published_thread": threads.get(tid, ("?", 0))[0] if tid else None,
                            "published_to_tables_ms": [round((t - t_pub) * 1000, 2) for t, _ in tbl if t and t_pub]})
            time.sleep(0.3)
        after = e.thread_ticks()
        cpu = {}
        for tid, (comm, t1) in after.items():
            t0 = threads.get(tid, (comm, 0))[1]
            if t1 - t0 > 0:
                cpu[f"{comm}[{tid}]"] = round((t1 - t0) / HZ * 1000 / max(1, len(samples)), 1)
        st = e.stats(r"wasmcustom\.registry_lb\.web\.")
        mem = e.mem_snapshot()
        e.stop()
        reg.stop()
        lat = [s["sent_to_published_ms"] for s in samples if s["sent_to_published_ms"] is not None]
        filt = [s["filter_ms"] for s in samples if s.get("filter_ms") is not None]
        key = f"{n}{label}"
        out[key] = {
            "label": label.strip(" ()"),
            "instances": n, "answer_bytes": len(body0), "changes": len(samples), "samples": samples,
            "sent_to_published_ms_median": median(lat), "sent_to_published_ms_max": max(lat) if lat else None,
            "filter_ms_median": median(filt), "filter_ms_max": max(filt) if filt else None,
            "published_by_thread": sorted({s["published_thread"] for s in samples if s["published_thread"]}),
            "cpu_ms_per_refresh_by_thread": cpu,
            "snapshot_bytes": st.get("wasmcustom.registry_lb.web.snapshot_bytes"),
            "instances_known": st.get("wasmcustom.registry_lb.web.instances_known"),
            "refresh_ok": st.get("wasmcustom.registry_lb.web.refresh_ok"),
            "rss_kb": mem["rss_kb"],
        }
        log(f"refresh of {n} instances{label} ({len(body0) / 1e6:.1f} MB answer): registry sent -> published "
            f"median {out[key]['sent_to_published_ms_median']} ms; snapshot {out[key]['snapshot_bytes']} bytes")
    run.results["refresh"] = out


def phase_registry(run):
    """Registry requests per refresh interval at --concurrency 1, 2, 8 (one poller per
    Envoy), and the memory of native / empty-filter / registry-lb Envoys at each."""
    a = run.args
    hosts = [("127.0.0.1", 20000 + i) for i in range(100)]
    body = consul_entries(hosts)
    interval_s = a.registry_interval_ms / 1000
    out = {"refresh_interval_ms": a.registry_interval_ms, "window_s": a.registry_window, "by_concurrency": {}}
    mem = {}
    for c in a.concurrencies:
        if run.time_left() < a.registry_window + 30:
            log("time budget reached: skipping the rest of the registry phase")
            break
        reg = FakeConsul(body).start()
        src = {"consul": {"cluster": "consul", "service": "web", "blocking": False}}
        spec = envoy_spec("rlb", hosts, "least_request", rlb_wasm=run.rlb_wasm, source=src,
                          refresh=f"{a.registry_interval_ms}ms", extra_clusters=[consul_cluster(reg.port)])
        e = Envoy(run, f"registry-c{c}", spec, concurrency=c)
        e.start()
        if not e.wait_ready() or not wait_log(e.log_path, r"published snapshot version", 1, 30):
            raise SystemExit(f"Envoy (registry, concurrency {c}) did not publish:\n{e.log_tail()}")
        time.sleep(1.0)
        n0, t0 = reg.count(), time.time()
        time.sleep(a.registry_window)
        n1, t1 = reg.count(), time.time()
        intervals = (t1 - t0) / interval_s
        st = e.stats(r"wasmcustom\.registry_lb\.web\.refresh_|^wasm\.")
        out["by_concurrency"][str(c)] = {
            "requests": n1 - n0, "intervals": round(intervals, 2),
            "requests_per_interval": round((n1 - n0) / intervals, 3) if intervals else None,
            "refresh_unchanged": st.get("wasmcustom.registry_lb.web.refresh_unchanged"),
            "root_contexts_ticking": c + 1,
        }
        mem.setdefault("registry_lb", {})[str(c)] = e.mem_snapshot()
        e.stop()
        reg.stop()
        log(f"concurrency {c}: {n1 - n0} registry requests in {t1 - t0:.1f} s = "
            f"{out['by_concurrency'][str(c)]['requests_per_interval']} per {a.registry_interval_ms} ms interval")
        for kind in ("native", "empty"):
            spec = envoy_spec(kind, hosts, "ROUND_ROBIN", empty_wasm=run.empty_wasm)
            e = Envoy(run, f"mem-{kind}-c{c}", spec, concurrency=c).start()
            if e.wait_ready():
                time.sleep(1.0)
                mem.setdefault(kind, {})[str(c)] = e.mem_snapshot()
            e.stop()
    per_vm = {}
    for c in mem.get("registry_lb", {}):
        r, nat, emp = mem["registry_lb"][c], mem.get("native", {}).get(c), mem.get("empty", {}).get(c)
        if nat and r["rss_kb"] and nat["rss_kb"]:
            per_vm[c] = {"wasm_vms": r.get("wasm_vms_active"),
                         "registry_lb_rss_over_native_kb": r["rss_kb"] - nat["rss_kb"],
                         "empty_rss_over_native_kb": (emp["rss_kb"] - nat["rss_kb"]) if emp and emp["rss_kb"] else None,
                         "empty_wasm_vms": emp.get("wasm_vms_active") if emp else None}
    marginal = {}
    if "1" in per_vm and "8" in per_vm:
        a1, a8 = per_vm["1"], per_vm["8"]
        dv = (a8["wasm_vms"] or 0) - (a1["wasm_vms"] or 0)
        if dv > 0:
            marginal["registry_lb_kb_per_extra_vm"] = round((a8["registry_lb_rss_over_native_kb"] - a1["registry_lb_rss_over_native_kb"]) / dv)
        de = (a8["empty_wasm_vms"] or 0) - (a1["empty_wasm_vms"] or 0)
        if de > 0 and a8["empty_rss_over_native_kb"] is not None and a1["empty_rss_over_native_kb"] is not None:
            marginal["empty_kb_per_extra_vm"] = round((a8["empty_rss_over_native_kb"] - a1["empty_rss_over_native_kb"]) / de)
    out["memory_marginal"] = marginal
    out["memory"] = mem
    out["memory_per_vm"] = per_vm
    run.results["registry"] = out


# ---------------------------------------------------------------------------------------
# Memory of a sidecar: envoy/static.yaml with the empty filter / registry-lb


# Envoy settings the memory phase can add to both filters' configurations (--memory-settings).
MEMORY_SETTINGS = {
    # The overload manager's shrink_heap action: fixed_heap reports heap_size -
    # pageheap_unmapped - pageheap_free over the max; at >= the threshold, Envoy calls
    # tcmalloc's release of free memory on every refresh_interval.
    "shrink_heap": {"overload_manager": {
        "refresh_interval": "0.25s",
        "resource_monitors": [{"name": "envoy.resource_monitors.fixed_heap", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
            "max_heap_size_bytes": 1073741824}}],
        "actions": [{"name": "envoy.overload_actions.shrink_heap", "triggers": [
            {"name": "envoy.resource_monitors.fixed_heap", "threshold": {"value": 0.0}}]}]}},
    # tcmalloc releases up to bytes_to_release of free memory to the system every interval
    # (what the shipped configs set).
    "release": {"memory_allocator_manager": {"bytes_to_release": 134217728, "memory_release_interval": "1s"}},
    # No release: the shipped configs without their memory_allocator_manager.
    "no_release": {"memory_allocator_manager": {"bytes_to_release": 0}},
}


def static_yaml_spec(wasm, backends, empty=False, settings=()):
    """envoy/static.yaml with its ports, .wasm and instances replaced; `empty`: the
    empty filter instead, routing to a STATIC cluster of the same backends."""
    import yaml
    cfg = yaml.safe_load((ROOT / "envoy" / "static.yaml").read_text())
    listen, admin = free_port(), free_port()
    cfg["admin"]["address"] = sock("127.0.0.1", admin)
    lst = cfg["static_resources"]["listeners"][0]
    lst["address"] = sock("127.0.0.1", listen)
    hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
    wf = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm")["typed_config"]["config"]
    wf["vm_config"]["code"]["local"]["filename"] = str(wasm)
    conf = json.loads(wf["configuration"]["value"])
    insts = conf["services"][0]["sources"][0]["static"]["instances"]
    for inst, (ip, port) in zip(insts, backends):
        inst["address"], inst["port"] = ip, port
    wf["configuration"]["value"] = json.dumps(conf)
    if empty:
        wf["name"] = wf["root_id"] = wf["vm_config"]["vm_id"] = "empty"
        del wf["configuration"]
        route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
        route["route"]["cluster"] = "backends"
        route.pop("metadata", None)
        cfg["static_resources"]["clusters"] = [static_cluster("backends", "ROUND_ROBIN", backends)]
    for s in settings:
        cfg.update(json.loads(json.dumps(MEMORY_SETTINGS[s])))
    return listen, admin, cfg


def bounded_load(port, total, conns=8, timeout_s=60):
    """`total` GET / over `conns` keep-alive connections; each connection stops at its
    share or at the deadline. Returns (ok, failed)."""
    import http.client
    deadline = time.time() + timeout_s
    counts = []

    def worker(n):
        ok = bad = 0
        c = None
        for _ in range(n):
            if time.time() > deadline:
                break
            try:
                if c is None:
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/")
                r = c.getresponse()
                r.read()
                ok, bad = (ok + 1, bad) if r.status == 200 else (ok, bad + 1)
            except (OSError, http.client.HTTPException):
                bad += 1
                c = None
        counts.append((ok, bad))

    ts = [threading.Thread(target=worker, args=(total // conns + (i < total % conns),)) for i in range(conns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout_s + 10)
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


MEMORY_FIELDS = ("allocated", "heap_size", "pageheap_unmapped", "pageheap_free", "total_thread_cache")


def phase_memory(run):
    """envoy/static.yaml at --concurrency 2 with the empty filter and with registry-lb
    (and any --memory-wasm builds, --memory-settings variants), alternately for
    --memory-rounds rounds: VmRSS and admin /memory idle after start, after
    --memory-requests requests, and --memory-settle s later."""
    a = run.args
    ips = ["127.0.0.1"]
    base = pick_port_range(3, ips)
    backends = [("127.0.0.1", base + i) for i in range(3)]
    Nginx(run, backends).start()
    builds = [("registry-lb", run.rlb_wasm)] + [(lbl, Path(p)) for lbl, p in run.memory_wasm]
    configs = {}
    for settings in [()] + [tuple(s.split("+")) for s in a.memory_settings]:
        sfx = "" if not settings else " + " + "+".join(settings)
        configs["empty" + sfx] = {"label": "empty filter" + sfx, "wasm": run.empty_wasm, "empty": True,
                                  "settings": settings, "baseline": "empty" + sfx}
        for lbl, path in builds:
            configs[lbl + sfx] = {"label": lbl + sfx, "wasm": path, "empty": False, "settings": settings,
                                  "baseline": "empty" + sfx}
    if a.memory_configs:
        keep = set(a.memory_configs.split(","))
        keep |= {configs[k]["baseline"] for k in keep if k in configs}
        configs = {k: v for k, v in configs.items() if k in keep}
    runs = {k: [] for k in configs}
    for rnd in range(a.memory_rounds):
        for key, c in configs.items():
            if run.time_left() < 40:
                log("time budget reached: memory phase stops")
                break
            spec = static_yaml_spec(c["wasm"], backends, c["empty"], c["settings"])
            e = Envoy(run, "mem-" + re.sub(r"[^A-Za-z0-9_-]+", "_", key) + f"-{rnd}", spec, concurrency=a.memory_concurrency)
            e.start()
            if not e.wait_ready():
                raise SystemExit(f"Envoy ({key}) did not start:\n{e.log_tail()}")
            time.sleep(a.memory_idle)
            idle = e.mem_snapshot()
            t0 = time.time()
            ok, bad = bounded_load(e.listen, a.memory_requests)
            load_s = time.time() - t0
            time.sleep(1.0)
            after = e.mem_snapshot()
            time.sleep(a.memory_settle)
            settled = e.mem_snapshot()
            e.stop()
            runs[key].append({"round": rnd, "idle": idle, "after_load": after, "settled": settled,
                              "requests_ok": ok, "requests_failed": bad, "load_s": round(load_s, 2)})
            log(f"memory {c['label']} round {rnd + 1}: RSS idle {idle['rss_kb'] / 1024:.1f} MB, after "
                f"{ok} requests ({bad} failed) {after['rss_kb'] / 1024:.1f} MB, {a.memory_settle:g} s later "
                f"{settled['rss_kb'] / 1024:.1f} MB; heap {settled['memory'].get('heap_size', 0) / 2**20:.1f} MB")

    def summary(rs, when, field):
        xs = [(r[when].get(field) if field.endswith("_kb") else r[when]["memory"].get(field)) for r in rs]
        xs = [x for x in xs if x is not None]
        if not xs:
            return None
        kb = [x if field.endswith("_kb") else x / 1024 for x in xs]
        return {"median_kb": round(median(kb)), "min_kb": round(min(kb)), "max_kb": round(max(kb))}

    out = {"config_file": "envoy/static.yaml", "concurrency": a.memory_concurrency, "requests": a.memory_requests,
           "rounds": a.memory_rounds, "idle_s": a.memory_idle, "settle_s": a.memory_settle,
           "wasm_bytes": {k: Path(c["wasm"]).stat().st_size for k, c in configs.items()},
           "settings": {s: MEMORY_SETTINGS[s] for s in {x for c in configs.values() for x in c["settings"]}},
           "configs": {}}
    for key, c in configs.items():
        rs = runs[key]
        s = {"label": c["label"], "baseline": c["baseline"], "runs": rs,
             "wasm_bytes": Path(c["wasm"]).stat().st_size}
        for when in ("idle", "after_load", "settled"):
            s[when] = {f: summary(rs, when, f) for f in ("rss_kb", "code_space_kb") + MEMORY_FIELDS}
        out["configs"][key] = s
    # The figure of the goal: RSS over the empty filter (same settings), per round, median.
    for key, s in out["configs"].items():
        b = out["configs"].get(s["baseline"])
        if not b or b is s:
            continue
        for when in ("idle", "after_load", "settled"):
            d = [r[when]["rss_kb"] - q[when]["rss_kb"] for r, q in zip(s["runs"], b["runs"])
                 if r[when]["rss_kb"] and q[when]["rss_kb"]]
            s[f"{when}_rss_over_empty_kb"] = {"median": round(median(d)), "min": min(d), "max": max(d)} if d else None
    run.results["memory"] = out


def memory_tables(m):
    mb = lambda v: "—" if v is None else f"{v['median_kb'] / 1024:.1f}"
    sp = lambda v: "—" if v is None else f"{v['min_kb'] / 1024:.1f}–{v['max_kb'] / 1024:.1f}"
    out = [f"Memory of one Envoy ({m['config_file']}, --concurrency {m['concurrency']}): medians of "
           f"{m['rounds']} alternating rounds (min–max), MB. idle: {m['idle_s']:g} s after ready, no traffic; "
           f"load: 1 s after {m['requests']:,} requests; settled: {m['settle_s']:g} s after that.", "",
           "| configuration | .wasm bytes | RSS idle | RSS after load (min–max) | RSS settled | RSS over empty filter: idle / load / settled | "
           "wasm code space | heap_size | allocated | pageheap_free | pageheap_unmapped | thread caches |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in m["configs"].values():
        over = [s.get(f"{w}_rss_over_empty_kb") for w in ("idle", "after_load", "settled")]
        ov = " / ".join("—" if o is None else f"{o['median'] / 1024:+.1f}" for o in over) if any(over) else "—"
        al = s["after_load"]
        out.append(f"| {s['label']} | {s['wasm_bytes']:,} | {mb(s['idle']['rss_kb'])} | {mb(al['rss_kb'])} ({sp(al['rss_kb'])}) | "
                   f"{mb(s['settled']['rss_kb'])} | {ov} | {mb(al.get('code_space_kb'))} | {mb(al['heap_size'])} | {mb(al['allocated'])} | "
                   f"{mb(al['pageheap_free'])} | {mb(al['pageheap_unmapped'])} | {mb(al['total_thread_cache'])} |")
    out.append("")
    out.append("After load: wasm code space = RSS of the writable+executable mappings (V8's compiled wasm, "
               "outside tcmalloc); the other columns are admin /memory, tcmalloc's figures (heap_size = allocated + "
               "page-heap free + page-heap unmapped + caches).")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# Report


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def tables(res):
    out = []
    if "main" in res:
        m = res["main"]["summary"]
        out.append("| configuration | req/s (median) | min–max | p50 ms | p99 ms | Envoy CPU µs/req | vs native | vs empty filter | p99 vs empty | non-2xx | others' CPU % |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for s in m.values():
            out.append(f"| {s['label']} | {fmt(s['rps'], ',.0f')} | {fmt(s['rps_min'], ',.0f')}–{fmt(s['rps_max'], ',.0f')} | "
                       f"{fmt(s['p50_ms'], '.2f')} | {fmt(s['p99_ms'], '.2f')} | {fmt(s['cpu_us_per_rq'], '.1f')} | "
                       f"{fmt(s.get('vs_native'), '.3f')} | {fmt(s.get('vs_empty'), '.3f')} | {fmt(s.get('p99_vs_empty'), '.3f')} | "
                       f"{s['non2xx'] + s['errors']} | {fmt(s.get('others_cpu_pct'), '.0f')} |")
        t = res["main"]["targets"]
        if t:
            out.append("")
            out.append("| target | measured | met |")
            out.append("|---|---:|---|")
            for k, (v, ok) in t.items():
                out.append(f"| {k} | {v} | {'—' if ok is None else 'yes' if ok else 'no'} |")
    if "slow" in res:
        s = res["slow"]
        slow_scenario_rows(out, s, f"Slow instance: 4 backends, one {s['slow_ms']} ms slower (share of requests it got).",
                           "slow instance share")
    if "degrade" in res:
        s = res["degrade"]
        slow_scenario_rows(out, s, f"Degrading instance: 4 backends, one turns {s['slow_ms']} ms slower halfway through "
                           f"each {s['duration_s']} s run (its share of the whole run).", "degrading instance share")
    if "slowhosts" in res:
        g = res["slowhosts"]
        out.append("")
        out.append("Slow hosts: medians of alternating rounds (per-round req/s min–max); share = requests the slow hosts got.")
        out.append("")
        out.append("| backends | policy | req/s | min–max | p50 ms | p99 ms | share to slow hosts | Envoy CPU µs/req | others' CPU % |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for label, sc in g["scenarios"].items():
            for s in sc["summary"].values():
                share = s.get("slow_share")
                out.append(f"| {label} | {s['label']} | {fmt(s['rps'], ',.0f')} | {fmt(s['rps_min'], ',.0f')}–{fmt(s['rps_max'], ',.0f')} | "
                           f"{fmt(s['p50_ms'], '.2f')} | {fmt(s['p99_ms'], '.2f')} | "
                           f"{'—' if label == '4 fast' or share is None else f'{share * 100:.2f} %'} | "
                           f"{fmt(s['cpu_us_per_rq'], '.1f')} | {fmt(s.get('others_cpu_pct'), '.0f')} |")
        if g.get("goals"):
            out.append("")
            out.append("| scenario / policy | p99 / own all-fast p99 (≤ 1.25) | share to slow hosts (≤ 1 %) | req/s / native LEAST_REQUEST (≥ 1) |")
            out.append("|---|---:|---:|---:|")
            yn = lambda ok: "—" if ok is None else "met" if ok else "not met"
            for k, v in g["goals"].items():
                share = v["slow_share"]
                out.append(f"| {k} | {fmt(v['p99_vs_own_all_fast'], '.2f')} ({yn(v['p99_met'])}) | "
                           f"{'—' if share is None else f'{share * 100:.2f} %'} ({yn(v['share_met'])}) | "
                           f"{fmt(v['rps_vs_native_lr'], '.2f')} ({yn(v['rps_met'])}) |")
        h = g.get("herding")
        if h:
            out.append("")
            out.append(f"Herding: {h['envoys']} Envoys × {h['concurrency']} workers on the same {len(h['backends'])} backends "
                       f"({', '.join(h['backends'])}), each under wrk -t1 -c16 at once for {h['seconds']} s; per-host "
                       f"share of all three sampled every {h['step_s']} s.")
            out.append("")
            out.append("| policy | req/s per Envoy | share to slow hosts | per-host share CV over time (fast hosts, max) | per-host share (mean of samples) |")
            out.append("|---|---|---:|---:|---|")
            for k, v in h["policies"].items():
                hs = [x.split("=")[0] for x in h["backends"]]
                sh = "—" if v["slow_share"] is None else f"{v['slow_share'] * 100:.2f} %"
                mean = {x: statistics.mean(s[x] for s in v["series"]) for x in hs} if v["series"] else {}
                out.append(f"| {k} | {', '.join(fmt(r, ',.0f') for r in v['rps_per_envoy'])} | "
                           f"{sh} | "
                           f"{fmt(v['max_cv_fast_hosts'], '.3f')} | {' / '.join(f'{m * 100:.1f}' for m in mean.values())} % |")
    if "floor" in res:
        out.append("")
        out.append("| configuration (100 backends) | req/s (median) | Envoy CPU µs/req | µs/req over the empty filter (median of rounds) | vs empty filter |")
        out.append("|---|---:|---:|---:|---:|")
        for s in res["floor"]["summary"].values():
            out.append(f"| {s['label']} | {fmt(s['rps'], ',.0f')} | {fmt(s['cpu_us_per_rq'], '.1f')} | "
                       f"{fmt(s.get('cpu_us_over_empty'), '.1f')} | {fmt(s.get('vs_empty'), '.3f')} |")
    if "matching" in res:
        g = res["matching"]
        out.append("")
        out.append(f"How the service is chosen: {g['instances']} nginx backends, registry-lb {g['policy']}, one named "
                   f"route; medians of {max((s['rounds'] for s in g['summary'].values()), default=0)} alternating "
                   f"rounds (per-round min–max).")
        out.append("")
        out.append("| configuration | req/s (median) | min–max | p99 ms | Envoy CPU µs/req | µs/req over route metadata (min–max) | req/s vs route metadata (min–max) | non-2xx |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for k, s in g["summary"].items():
            if k.startswith("probe_"):
                continue
            d, dr, vr = s.get("cpu_us_over_metadata"), s.get("cpu_us_over_metadata_min_max"), s.get("vs_metadata_min_max")
            over = "—" if d is None else f"{d:+.2f} ({dr[0]:+.2f} … {dr[1]:+.2f})"
            vs = "—" if k == "metadata" or s.get("vs_metadata") is None else f"{s['vs_metadata']:.3f} ({vr[0]:.3f}–{vr[1]:.3f})"
            out.append(f"| {s['label']} | {fmt(s['rps'], ',.0f')} | {fmt(s['rps_min'], ',.0f')}–{fmt(s['rps_max'], ',.0f')} | "
                       f"{fmt(s['p99_ms'], '.2f')} | {fmt(s['cpu_us_per_rq'], '.1f')} | {over} | {vs} | "
                       f"{s['non2xx'] + s['errors']} |")
        probes = {k: s for k, s in g["summary"].items() if k.startswith("probe_")}
        if probes:
            out.append("")
            out.append("| host call (probe filter, same run) | Envoy CPU µs/req | ns per call: median of rounds | per-round range |")
            out.append("|---|---:|---:|---:|")
            for s in probes.values():
                rng = s.get("ns_per_call_min_max")
                out.append(f"| {s['label']} | {fmt(s['cpu_us_per_rq'], '.1f')} | {fmt(s.get('ns_per_call'), ',')} | "
                           f"{'—' if not rng else f'{rng[0]:,} … {rng[1]:,}'} |")
    if "hostcalls" in res:
        out.append("")
        out.append("| host call (probe filter, N per request) | N | Envoy CPU µs/req | ns per call: median of rounds | per-round range | req/s |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for s in res["hostcalls"]["summary"].values():
            rng = s.get("ns_per_call_min_max")
            out.append(f"| {s['op']} | {s['count']} | {fmt(s['cpu_us_per_rq'], '.1f')} | {fmt(s.get('ns_per_call'), ',')} | "
                       f"{'—' if not rng else f'{rng[0]:,} … {rng[1]:,}'} | {fmt(s['rps'], ',.0f')} |")
    if "refresh" in res and res["refresh"]:
        out.append("")
        out.append("| Consul answer | bytes | registry sent → snapshot published (median / max ms) | in the filter: copy, parse, publish (median / max ms) | published on | CPU ms per refresh by thread | snapshot bytes |")
        out.append("|---|---:|---:|---:|---|---|---:|")
        for r in res["refresh"].values():
            cpu = ", ".join(f"{k.split('[')[0]} {v}" for k, v in r["cpu_ms_per_refresh_by_thread"].items())
            build = f", {r['label']}" if r.get("label") else ""
            out.append(f"| {r['instances']:,} instances{build} | {r['answer_bytes']:,} | {fmt(r['sent_to_published_ms_median'], '.1f')} / "
                       f"{fmt(r['sent_to_published_ms_max'], '.1f')} | {fmt(r.get('filter_ms_median'), '.1f')} / {fmt(r.get('filter_ms_max'), '.1f')} | "
                       f"{', '.join(r['published_by_thread'])} | {cpu} | {fmt(r['snapshot_bytes'], ',')} |")
    if "registry" in res:
        g = res["registry"]
        out.append("")
        out.append(f"| Envoy --concurrency | root contexts ticking | registry requests in {g['window_s']} s | per {g['refresh_interval_ms']} ms refresh interval | wasm VMs | RSS registry-lb − native | RSS empty filter − native |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|")
        for c, v in g["by_concurrency"].items():
            pv = g["memory_per_vm"].get(c, {})
            out.append(f"| {c} | {v['root_contexts_ticking']} | {v['requests']} | {v['requests_per_interval']} | "
                       f"{pv.get('wasm_vms', '—')} | {fmt(pv.get('registry_lb_rss_over_native_kb'), ',')} KB | "
                       f"{fmt(pv.get('empty_rss_over_native_kb'), ',')} KB |")
        mg = g.get("memory_marginal", {})
        if mg:
            out.append("")
            out.append(f"Memory per additional wasm VM (RSS slope from --concurrency 1 to 8): registry-lb "
                       f"{fmt(mg.get('registry_lb_kb_per_extra_vm'), ',')} KB, empty filter {fmt(mg.get('empty_kb_per_extra_vm'), ',')} KB.")
    if "memory" in res:
        out.append("")
        out.append(memory_tables(res["memory"]))
    if "main" in res:
        out.append("")
        out.append("| configuration | wasm VMs | RSS before load | RSS after load | tcmalloc allocated after | snapshot bytes |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for s in res["main"]["summary"].values():
            b, a = s.get("mem_before") or {}, s.get("mem_after") or {}
            out.append(f"| {s['label']} | {a.get('wasm_vms_active', '—')} | {fmt(b.get('rss_kb'), ',')} KB | {fmt(a.get('rss_kb'), ',')} KB | "
                       f"{fmt((a.get('memory') or {}).get('allocated', None) and a['memory']['allocated'] // 1024, ',')} KB | "
                       f"{fmt(a.get('snapshot_bytes'), ',')} |")
        pw = res["main"].get("original_dst_prewarm")
        if pw:
            out.append("")
            out.append(f"Creating the {pw['hosts']:,} ORIGINAL_DST hosts (first request to each address) took {pw['seconds']} s "
                       f"and {pw['envoy_cpu_s']} s of Envoy CPU: {pw['envoy_cpu_ms_per_new_host']} ms per new host.")
    return "\n".join(out)


def write_csv(path, res):
    import csv
    cols = ["phase", "config", "label", "instances", "rounds", "rps", "rps_min", "rps_max", "p50_ms", "p99_ms",
            "p999_ms", "cpu_us_per_rq", "vs_native", "vs_empty", "p99_vs_empty", "slow_share", "errors", "non2xx"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for phase in ("main", "slow", "degrade", "matching"):
            for k, s in res.get(phase, {}).get("summary", {}).items():
                row = {"phase": phase, "config": k, **s}
                w.writerow([("" if row.get(c) is None else (round(row[c], 4) if isinstance(row.get(c), float) else row[c])) for c in cols])


def slow_scenario_rows(out, s, title, share_label):
    """A slow-instance scenario: its table, the policies left out, #4's targets."""
    out.append("")
    out.append(title)
    out.append("")
    out.append(f"| configuration | req/s (median) | p50 ms | p99 ms | {share_label} | non-2xx | others' CPU % |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for v in s["summary"].values():
        out.append(f"| {v['label']} | {fmt(v['rps'], ',.0f')} | {fmt(v['p50_ms'], '.2f')} | {fmt(v['p99_ms'], '.2f')} | "
                   f"{fmt(v.get('slow_share'), '.3f')} | {v['non2xx'] + v['errors']} | {fmt(v.get('others_cpu_pct'), '.0f')} |")
    for pol, why in s.get("policies_not_accepted", {}).items():
        out.append(f"\n`{pol}`: not measured — {why}")
    t = s.get("targets") or {}
    if t:
        out.append("")
        out.append("| target (median of per-round ratios) | measured | met |")
        out.append("|---|---:|---|")
        for k, v in t.items():
            out.append(f"| {k} | {v['ratio']:.3f} | {'yes' if v['met'] else 'no'} |")


def plot(res, outdir):
    sys.path.insert(0, str(ROOT / ".tools" / "py"))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        log(f"no plot: {e}")
        return []
    made = []
    if "main" in res:
        keys = list(res["main"]["summary"].keys())
        m = [res["main"]["summary"][k] for k in keys]

        def short(k, s):
            n = f"({s.get('instances', 0):,})"
            if k.startswith("native"):
                return f"native\nROUND_ROBIN\n{n}"
            if k == "empty_filter":
                return f"empty wasm\nfilter\n{n}"
            if k == "rlb_lr_100_no_outlier":
                return f"registry-lb\nleast_request\n{n}\noutlier off"
            if k == "rlb_lr_100_cmp":
                return f"registry-lb\nleast_request\n{n}\ncompare build"
            if k == "host_call_floor":
                return f"probe: host\ncalls only\n{n}"
            pol = "round_robin" if "_rr_" in k else "ring_hash" if "_ring_" in k else "least_request"
            return f"registry-lb\n{pol}\n{n}"

        labels = [short(k, s) for k, s in zip(keys, m)]
        colors = ["#4c72b0" if k.startswith("native") else "#8c8c8c" if k in ("empty_filter", "host_call_floor") else "#dd8452"
                  for k in keys]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 6))
        rps = [s["rps"] or 0 for s in m]
        err = [[(s["rps"] or 0) - (s["rps_min"] or 0) for s in m], [(s["rps_max"] or 0) - (s["rps"] or 0) for s in m]]
        ax1.bar(range(len(m)), rps, yerr=err, color=colors, capsize=4)
        for i, s in enumerate(m):
            if s.get("vs_native"):
                ax1.text(i, rps[i] * 1.01, f"{s['vs_native']:.2f}×", ha="center", va="bottom", fontsize=8)
        ax1.set_xticks(range(len(m)), labels, fontsize=7)
        ax1.set_ylabel("requests / s (median of rounds; whiskers min–max)")
        ax1.set_title("Throughput, Envoy --concurrency 1, wrk 1×32 (label: × native, median of per-round ratios)", fontsize=10)
        ax2.bar(range(len(m)), [s["p99_ms"] or 0 for s in m], color=colors)
        ax2.plot(range(len(m)), [s["p50_ms"] or 0 for s in m], "k_", markersize=18, label="p50")
        ax2.set_xticks(range(len(m)), labels, fontsize=7)
        ax2.set_ylabel("latency ms (bars p99, ticks p50)")
        ax2.set_title("Latency")
        ax2.legend()
        fig.tight_layout()
        p = outdir / "throughput.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    scen = [k for k in ("slow", "degrade") if k in res]
    if scen:
        fig, axes = plt.subplots(len(scen), 2, figsize=(12, 4.8 * len(scen)), squeeze=False)
        for row, key in enumerate(scen):
            ax1, ax2 = axes[row]
            m = list(res[key]["summary"].values())
            labels = [s["label"].replace("native Envoy ", "native\n").replace("registry-lb ", "registry-lb\n") for s in m]
            ax1.bar(range(len(m)), [s["rps"] or 0 for s in m],
                    color=["#4c72b0" if s["label"].startswith("native") else "#dd8452" for s in m])
            for i, s in enumerate(m):
                if s.get("slow_share") is not None:
                    ax1.text(i, (s["rps"] or 0) * 1.01, f"slow: {s['slow_share']:.1%}", ha="center", va="bottom", fontsize=8)
            ax1.set_xticks(range(len(m)), labels, fontsize=8)
            ax1.set_ylabel("requests / s")
            what = (f"one {res[key]['slow_ms']} ms slower" if key == "slow"
                    else f"one {res[key]['slow_ms']} ms slower from mid-run")
            ax1.set_title(f"4 backends, {what}: throughput")
            x = list(range(len(m)))
            ax2.bar([i - 0.2 for i in x], [s["p50_ms"] or 0 for s in m], width=0.4, label="p50")
            ax2.bar([i + 0.2 for i in x], [s["p99_ms"] or 0 for s in m], width=0.4, label="p99")
            ax2.set_xticks(x, labels, fontsize=8)
            ax2.set_ylabel("ms")
            ax2.set_title(f"latency ({what})")
            ax2.legend()
        fig.tight_layout()
        p = outdir / "slow-instance.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    return made


def machine_info(run):
    def out(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None
    cpu = None
    try:
        cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                    if l.startswith("model name")), None)
    except OSError:
        pass
    prof = re.search(r"\[profile\.release\][^\[]*", (ROOT / "Cargo.toml").read_text())
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(), "cpu_model": cpu, "kernel": os.uname().release,
        "envoy": out([str(run.envoy), "--version"]).replace(str(ROOT) + "/", ""), "wrk": out(["wrk", "-v"]), "nginx": nginx_version(),
        "git": run.git_at_start,
        "wasm_sha256": {"registry_lb": hashlib.sha256(run.rlb_wasm.read_bytes()).hexdigest()},
        "wasm_bytes": {"registry_lb": run.rlb_wasm.stat().st_size, "empty_filter": run.empty_wasm.stat().st_size,
                       "hostcall_probe": run.probe_wasm.stat().st_size if run.probe_wasm else None},
        "profile_release": prof.group(0).strip() if prof else None,
        "pinning": {"envoy": run.cpus_envoy, "wrk_and_backends": run.cpus_load},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~1 minute smoke run (short rounds, fewer of them)")
    ap.add_argument("--name", help="results name (default: full, or quick)")
    ap.add_argument("--out", help="results folder (default: bench/results, quick runs: target/bench)")
    ap.add_argument("--phases", default="main,slow,refresh,registry")
    ap.add_argument("--envoy", default=os.environ.get("ENVOY_BIN", str(ROOT / ".tools/envoy-1.40.0/envoy/_bin/envoy")))
    ap.add_argument("--wasm", default=str(ROOT / "target/wasm32-wasip1/release/registry_lb.wasm"))
    ap.add_argument("--compare-wasm", help="main phase: also least_request (100) with this build of registry_lb.wasm; "
                    "refresh phase: every size with this build too")
    ap.add_argument("--empty-wasm", default=str(ROOT / "target/wasm32-wasip1/release/empty_filter.wasm"))
    ap.add_argument("--probe-wasm", default=str(ROOT / "target/wasm32-wasip1/release/hostcall_probe.wasm"))
    ap.add_argument("--backend", default=str(ROOT / "target/release/bench-backend"))
    ap.add_argument("--work", default=str(ROOT / "target/bench/work"))
    ap.add_argument("--configs", help="main phase: only these configurations (comma-separated keys); "
                                      "hostcalls phase: only these ops")
    ap.add_argument("--large", type=int, help="instances of the large configurations (default 10,000; quick 2,000)")
    ap.add_argument("--refresh-sizes", help="refresh phase: instances per Consul answer, comma-separated "
                                            "(default 1000,10000; ~1.3 KB per instance)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--slow-rounds", type=int)
    ap.add_argument("--duration", type=int, help="seconds per measured run")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--slow-ms", type=int, default=50)
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not pin Envoy to CPU 0 and wrk + backends to CPU 1")
    ap.add_argument("--max-seconds", type=float)
    ap.add_argument("--replot", metavar="JSON", help="only redo the tables and plots of a results file")
    ap.add_argument("--service-extra", help="JSON merged into every registry-lb service config (experiments)")
    ap.add_argument("--memory-rounds", type=int, default=3, help="memory phase: alternating rounds (default 3)")
    ap.add_argument("--memory-requests", type=int, default=2000, help="memory phase: requests per Envoy (default 2,000)")
    ap.add_argument("--memory-concurrency", type=int, default=2, help="memory phase: Envoy --concurrency (default 2)")
    ap.add_argument("--memory-idle", type=float, default=3.0, help="memory phase: seconds from ready to the idle reading")
    ap.add_argument("--memory-settle", type=float, default=5.0,
                    help="memory phase: seconds from the after-load reading to the settled one")
    ap.add_argument("--memory-wasm", action="append", default=[], metavar="LABEL=PATH",
                    help="memory phase: also this build of registry_lb.wasm (repeatable)")
    ap.add_argument("--memory-settings", default="",
                    help="memory phase: Envoy setting variants to add to both filters (main phase: to least_request (100) as rlb_lr_100_<name>), comma-separated, "
                         "from: " + ", ".join(MEMORY_SETTINGS) + " (a+b: both at once)")
    ap.add_argument("--memory-configs", help="memory phase: only these configurations (keys; their empty-filter "
                                             "baselines stay)")
    ap.add_argument("--quiet-wait", type=float,
                    help="seconds (whole run) to wait for other processes to go quiet before measurements")
    a = ap.parse_args()
    if a.replot:
        path = Path(a.replot)
        res = json.loads(path.read_text())
        (path.parent / (path.stem + ".md")).write_text(tables(res) + "\n")
        write_csv(path.parent / (path.stem + ".csv"), res)
        made = plot(res, path.parent)
        print(tables(res))
        print("made", ", ".join(str(p) for p in made))
        return
    q = a.quick
    a.rounds = a.rounds or (1 if q else 10)
    a.slow_rounds = a.slow_rounds or (1 if q else 6)
    a.duration = a.duration or (2 if q else 3)
    a.large = a.large or (2000 if q else 10000)
    a.warmup = a.warmup if a.warmup is not None else (1 if q else 2)
    a.max_seconds = a.max_seconds or (300 if q else 1500)
    a.quiet_wait = a.quiet_wait if a.quiet_wait is not None else (0 if q else 120)
    a.refresh_sizes = ([int(x) for x in a.refresh_sizes.split(",")] if a.refresh_sizes
                       else [10000] if q else [1000, 10000])
    a.refresh_changes = 2 if q else 5
    a.registry_interval_ms = 500 if q else 1000
    a.registry_window = 2 if q else 6
    a.concurrencies = (1, 8) if q else (1, 2, 8)
    a.memory_settings = [x.strip() for x in a.memory_settings.split(",") if x.strip()]
    for v in a.memory_settings:
        for x in v.split("+"):
            if x not in MEMORY_SETTINGS:
                raise SystemExit(f"--memory-settings: unknown {x!r} (known: {', '.join(MEMORY_SETTINGS)})")
    # A memory-only or matching-only run writes memory.* or matching.*, not over the
    # full run's results.
    only = [p.strip() for p in a.phases.split(",") if p.strip()]
    name = a.name or ("quick" if q else only[0] if only in (["memory"], ["matching"], ["slowhosts"]) else "full")
    if a.service_extra:
        SERVICE_EXTRA.update(json.loads(a.service_extra))
    outdir = Path(a.out or (ROOT / ("target/bench" if q else "bench/results")))
    outdir.mkdir(parents=True, exist_ok=True)
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (./dev bench installs it)")
    run = Run(a)
    if run.work.exists():
        shutil.rmtree(run.work)
    run.work.mkdir(parents=True)
    # The measured binaries are copied first: a rebuild during the run must not change them.
    run.memory_wasm = []
    for spec in a.memory_wasm:
        lbl, _, path = spec.partition("=")
        src = Path(path).resolve()
        if not lbl or not src.exists():
            raise SystemExit(f"--memory-wasm {spec!r}: LABEL=PATH of an existing file")
        dst = run.work / f"memory-{len(run.memory_wasm)}-{src.name}"
        shutil.copy2(src, dst)
        run.memory_wasm.append((lbl, dst))
    for attr in ("rlb_wasm", "empty_wasm", "compare_wasm", "probe_wasm"):
        src = getattr(run, attr)
        if src is None or not src.exists():
            setattr(run, attr, None)
            continue
        dst = run.work / (src.name if attr != "compare_wasm" else "compare-" + src.name)
        shutil.copy2(src, dst)
        setattr(run, attr, dst)
    started = time.time()
    # The source the measured build came from (as the run starts: others may commit meanwhile).
    r = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    run.git_at_start = r.stdout.strip() or None
    r = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"], capture_output=True, text=True)
    if run.git_at_start and r.returncode == 0:
        run.git_at_start += " (src/ with uncommitted changes)" if r.stdout.strip() else " (src/ as committed)"
    phases = [p.strip() for p in a.phases.split(",") if p.strip()]
    try:
        for p in phases:
            if run.time_left() < 30:
                log(f"time budget reached: phase {p} skipped")
                continue
            log(f"phase {p}")
            {"main": phase_main, "slow": phase_slow, "refresh": phase_refresh, "registry": phase_registry,
             "hostcalls": phase_hostcalls, "floor": phase_floor, "memory": phase_memory,
             "matching": phase_matching, "slowhosts": phase_slowhosts}[p](run)
    finally:
        run.procs.stop_all()
    res = run.results
    res["meta"] = machine_info(run)
    res["meta"].update({"quick": q, "rounds": a.rounds, "slow_rounds": a.slow_rounds, "duration_s": a.duration,
                        "elapsed_s": round(time.time() - started, 1), "service_extra": SERVICE_EXTRA, "load": "wrk -t1 -c32, Envoy --concurrency 1"})
    (outdir / f"{name}.json").write_text(json.dumps(res, indent=1, sort_keys=False) + "\n")
    write_csv(outdir / f"{name}.csv", res)
    md = tables(res)
    (outdir / f"{name}.md").write_text(md + "\n")
    made = plot(res, outdir)
    print()
    print(f"registry_lb.wasm {res['meta']['wasm_bytes']['registry_lb']:,} bytes; empty_filter.wasm "
          f"{res['meta']['wasm_bytes']['empty_filter']:,} bytes; {res['meta']['envoy']}")
    print(md)
    print()
    print(f"results: {outdir}/{name}.json, {name}.csv, {name}.md" + "".join(f", {p.name}" for p in made)
          + f"  ({res['meta']['elapsed_s']} s)")


if __name__ == "__main__":
    main()
