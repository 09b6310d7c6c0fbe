#!/usr/bin/env python3
"""End-to-end test of the web page (examples/web) in headless Chromium with WebGPU.

Drives Debian's chromium through chromedriver's W3C WebDriver protocol (plain HTTP, no
client library): opens the page served on localhost with a scripted pass (load SmolLM2 from
the server, greedy generation, a short LoRA update, a question with the adapter), waits for
`window.emberRun`, saves a screenshot, and checks the results against the native runs:

- the greedy continuation equals, token for token, the committed lavapipe run
  (tests/fixtures/smollm2_greedy.json, the prompt's first case) for as many tokens as the
  page generated;
- the training losses equal, step by step, those of `ember finetune` with the same data,
  seed and settings on this machine's native driver (within LOSS_RTOL), and fall;
- the answer with the trained adapter equals, token for token, `ember generate --json`'s
  with the natively trained adapter;
- `ember selfcheck` in the page (every inference kernel family on random data against its
  CPU reference) passes: the browser's WGSL compiler takes them and they compute right.

Usage: web-e2e.py --url URL --fixture FILE --screenshot PNG
       [--native-losses JSONL] [--native-after JSON]
       [--chromedriver PATH] [--chromium PATH] [--timeout SECONDS] [--result JSON]
"""
import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

# SwiftShader in the browser and lavapipe natively add in different orders; the first loss
# is the base model's (B = 0), later ones follow the same updates.
LOSS_RTOL = 2e-3

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu-sandbox",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    # WebGPU in headless Chromium on a machine without a GPU: Dawn on SwiftShader (Vulkan).
    "--enable-unsafe-webgpu",
    "--enable-features=Vulkan",
    "--window-size=1100,1040",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriver:
    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"
        self.session = None

    def call(self, method, path, body=None, timeout=60):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path, data=data, method=method,
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"{}").get("value")
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"webdriver {method} {path}: {e.code} {e.read()[:2000]!r}")

    def wait_ready(self, deadline):
        while time.time() < deadline:
            try:
                v = self.call("GET", "/status", timeout=5)
                if v and v.get("ready"):
                    return
            except (OSError, RuntimeError):
                pass
            time.sleep(0.2)
        raise RuntimeError("chromedriver did not start")

    def start(self, chromium, profile):
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": CHROMIUM_FLAGS + [f"--user-data-dir={profile}"],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }}}
        v = self.call("POST", "/session", caps, timeout=120)
        self.session = v["sessionId"]

    def s(self, path):
        return f"/session/{self.session}{path}"

    def get(self, url):
        self.call("POST", self.s("/url"), {"url": url}, timeout=120)

    def js(self, script):
        return self.call("POST", self.s("/execute/sync"), {"script": script, "args": []})

    def screenshot(self, path):
        png = base64.b64decode(self.call("GET", self.s("/screenshot"), timeout=120))
        with open(path, "wb") as f:
            f.write(png)

    def browser_log(self):
        try:
            return self.call("POST", self.s("/se/log"), {"type": "browser"}) or []
        except RuntimeError:
            return []

    def quit(self):
        if self.session:
            try:
                self.call("DELETE", self.s(""), timeout=30)
            except (OSError, RuntimeError):
                pass


def check(run, fixture, native_losses, native_after):
    problems = []
    info = run.get("info") or {}
    print(f"web-e2e: adapter {info.get('gpu')} backend {info.get('backend')} "
          f"variant {info.get('variant')} f16 {info.get('f16')} subgroups {info.get('subgroups')}")

    sc = run.get("selfcheck")
    if sc is None:
        problems.append("no kernel self-check")
    else:
        bad = [c for c in sc["checks"] if not c["ok"]]
        if bad or len(sc["checks"]) < 20:
            problems.append(f"kernel self-check: {len(bad)} of {len(sc['checks'])} failed: {bad}")
        else:
            worst = max(sc["checks"], key=lambda c: c["max_error"] / max(c["tolerance"], 1e-30))
            print(f"web-e2e: kernel self-check: all {len(sc['checks'])} checks within tolerance "
                  f"(closest: {worst['kernel']} {worst['max_error']:.2e} of {worst['tolerance']:.0e})")

    case = fixture["cases"][0]
    base = run.get("base")
    if not base:
        problems.append("no base generation")
    else:
        if base["prompt_ids"] != case["prompt_ids"]:
            problems.append(f"prompt ids {base['prompt_ids']} != fixture {case['prompt_ids']}")
        got, want = base["tokens"], case["greedy"]
        n = min(len(got), len(want))
        if n == 0 or got[:n] != want[:n]:
            first = next((i for i in range(n) if got[i] != want[i]), n)
            problems.append(f"greedy tokens differ from the native run from token {first}: "
                            f"{got} vs {want[:len(got)]}")
        else:
            print(f"web-e2e: greedy: {n} tokens equal to the native lavapipe run: {base['text']!r}")

    tr = run.get("train")
    if native_losses is not None:
        if not tr:
            problems.append("no training result")
        else:
            got = tr["losses"]
            if len(got) != len(native_losses):
                problems.append(f"{len(got)} web losses, {len(native_losses)} native")
            for i, (g, w) in enumerate(zip(got, native_losses)):
                if not abs(g - w) <= LOSS_RTOL * abs(w):
                    problems.append(f"step {i + 1}: web loss {g} vs native {w}")
            if not all(map(lambda x: x == x and abs(x) != float("inf"), got)):
                problems.append(f"non-finite losses {got}")
            elif got[-1] >= got[0]:
                problems.append(f"the loss did not fall: {got}")
            print(f"web-e2e: training losses web {got} native {native_losses}")
    for key, label in (("before", "before training"), ("after", "after training")):
        if run.get(key):
            print(f"web-e2e: {label}: {run[key]['text']!r}")
    if native_after is not None:
        after = run.get("after")
        if not after:
            problems.append("no answer after training")
        elif after["tokens"] != native_after["tokens"]:
            problems.append(f"the trained answer differs from the native one: {after['text']!r} "
                            f"{after['tokens']} vs {native_after['text']!r} {native_after['tokens']}")
        else:
            print(f"web-e2e: the trained answer equals the native one ({len(after['tokens'])} tokens)")
    return problems


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--fixture", required=True)
    ap.add_argument("--native-losses")
    ap.add_argument("--native-after")
    ap.add_argument("--screenshot", required=True)
    ap.add_argument("--result")
    ap.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--timeout", type=float, default=1200)
    a = ap.parse_args()

    with open(a.fixture) as f:
        fixture = json.load(f)
    native = None
    if a.native_losses:
        with open(a.native_losses) as f:
            rows = [json.loads(l) for l in f if l.strip().startswith("{")]
        native = [r["loss"] for r in rows if "step" in r and "loss" in r]

    native_after = None
    if a.native_after:
        with open(a.native_after) as f:
            native_after = json.load(f)

    port = free_port()
    profile = tempfile.mkdtemp(prefix="ember-chromium-")
    driver_log = open(os.path.join(profile, "chromedriver.log"), "w")
    proc = subprocess.Popen([a.chromedriver, f"--port={port}"], stdout=driver_log, stderr=subprocess.STDOUT)
    wd = WebDriver(port)
    t0 = time.time()
    run = None
    try:
        wd.wait_ready(time.time() + 30)
        wd.start(a.chromium, os.path.join(profile, "profile"))
        wd.get(a.url)
        deadline = time.time() + a.timeout
        last = None
        while time.time() < deadline:
            run = wd.js("return window.emberRun || null;")
            st = wd.js("return document.getElementById('status').textContent;")
            if st != last:
                print(f"web-e2e: [{time.time() - t0:6.1f} s] {st}", flush=True)
                last = st
            if run and run.get("state") in ("done", "error"):
                break
            time.sleep(1)
        wd.screenshot(a.screenshot)
        print(f"web-e2e: screenshot {a.screenshot}")
        for entry in wd.browser_log():
            msg = entry.get("message", "")
            if entry.get("level") in ("SEVERE", "WARNING") and "favicon" not in msg:
                print(f"web-e2e: console {entry.get('level')}: {msg[:500]}")
    finally:
        wd.quit()
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)

    if a.result and run:
        with open(a.result, "w") as f:
            json.dump(run, f, indent=1)
    if not run or run.get("state") != "done":
        print(f"web-e2e: FAILED: the page did not finish: {run}", file=sys.stderr)
        return 1
    problems = check(run, fixture, native, native_after)
    for p in problems:
        print(f"web-e2e: FAILED: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"web-e2e: passed in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
