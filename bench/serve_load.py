#!/usr/bin/python3
"""Continuous batching under load: `pipemoe serve` with several --max-batch values, each given the
same requests by C concurrent clients (each sends its share one after another), in interleaved
rounds (each round runs every batch size once, starting at another). Reports per batch size the
throughput (generated tokens/s over the whole load) and the latency of a request (median, p90),
as medians over rounds; prints a table and writes CSV. With --ranks 2 the server runs under
mpirun, its experts spread over both ranks. --keep-alive: each client sends its requests on one
connection (HTTP/1.1 keep-alive) instead of one connection per request. --n K: K choices per
request (each takes a row; their prompt runs once); --prompt-words W: prompts of W words (the
prompts below repeated) instead of a few; --system-words W: every prompt after the same W words (a
system prompt); --prefix-ab: every batch size also with --no-prefix-reuse in each round (prompts
run whole), the table giving both and the server's prefix_tokens_reused.

  /usr/bin/python3 bench/serve_load.py --checkpoint runs/demo --batches 1,4,16 --clients 16 \\
      --requests 48 --tokens 48 --rounds 3 --csv out/serve_load.csv --plot out/serve_load.png
"""
import argparse
import csv
import http.client
import json
import os
import re
import statistics
import subprocess
import threading
import time
import urllib.request

PROMPTS = ["The jury said", "In the city", "The old county", "A new law was", "The report", "It was the",
           "He said that", "The committee"]


SYSTEM = ("You are a careful reader of old newspapers and answer in the plain style of the Brown corpus, "
          "with short sentences, names of places and people, and dates where they are known")


def serve(o, batch, reuse=True):
    launch = [os.environ.get("PIPEMOE_BIN", "build/pipemoe")]
    if o.ranks > 1:
        launch = ["mpirun", "-q", "--oversubscribe", "--allow-run-as-root", "-np", str(o.ranks)] + launch
    proc = subprocess.Popen(["timeout", "900"] + launch + ["serve", "--checkpoint", o.checkpoint, "--port", "0",
                                                           "--max-batch", str(batch), "--max-requests", str(o.requests)]
                            + ([] if reuse else ["--no-prefix-reuse"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = re.search(r":(\d+) ", proc.stdout.readline()).group(1)
    return proc, f"http://127.0.0.1:{port}/v1/completions"


def load(o, batch, reuse=True):
    """One run: every client's requests in turn; returns (tokens/s, latencies, the server's summary)."""
    proc, url = serve(o, batch, reuse)
    latencies, tokens, lock = [], [0], threading.Lock()

    def client(c):
        host, port = url.split("/")[2].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=600) if o.keep_alive else None
        for i in range(c, o.requests, o.clients):
            prompt = PROMPTS[i % len(PROMPTS)]
            if o.prompt_words:
                words = " ".join(PROMPTS[(i + j) % len(PROMPTS)] for j in range(o.prompt_words)).split()
                prompt = " ".join(words[:o.prompt_words])
            if o.system_words:
                prompt = " ".join(SYSTEM.split()[:o.system_words]) + ". " + prompt
            body = {"prompt": prompt, "max_tokens": o.tokens, "temperature": 0.8, "seed": i, "n": o.n}
            start = time.perf_counter()
            if conn:
                conn.request("POST", "/v1/completions", json.dumps(body))
                n = json.loads(conn.getresponse().read())["usage"]["completion_tokens"]
            else:
                with urllib.request.urlopen(urllib.request.Request(url, data=json.dumps(body).encode()), timeout=600) as r:
                    n = json.loads(r.read())["usage"]["completion_tokens"]
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += n

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(o.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    out, _ = proc.communicate(timeout=120)
    lines = out.strip().splitlines()
    return tokens[0] / seconds, latencies, json.loads(lines[-1]) if lines else {}


def plot(rows, batches, o):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for r in sorted({x["round"] for x in rows}):
        for reuse in (True, False):
            mine = sorted((x for x in rows if x["round"] == r and x["prefix_reuse"] == reuse), key=lambda x: x["max_batch"])
            if not mine:
                continue
            style, label = ("o-", f"round {r}") if reuse else ("x--", f"round {r}, prompts whole")
            a.plot([x["max_batch"] for x in mine], [x["tokens_per_s"] for x in mine], style, alpha=0.6, label=label)
            b.plot([x["max_batch"] for x in mine], [x["latency_p50_s"] for x in mine], style, alpha=0.6, label=label)
    for ax, what in ((a, "generated tokens/s"), (b, "request latency p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(x) for x in batches])
        ax.set_xlabel("--max-batch")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"pipemoe serve: {o.clients} clients, {o.requests} requests of {o.tokens} tokens, {o.ranks} rank(s)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(o.plot) or ".", exist_ok=True)
    fig.savefig(o.plot, dpi=100)
    print(f"wrote {o.plot}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--keep-alive", action="store_true", help="one connection per client for all its requests")
    p.add_argument("--n", type=int, default=1, help="choices per request")
    p.add_argument("--prompt-words", type=int, default=0, help="prompts of this many words (0: the short ones)")
    p.add_argument("--system-words", type=int, default=0, help="every prompt after the same W words (at most 30)")
    p.add_argument("--prefix-ab", action="store_true", help="each batch size also with --no-prefix-reuse, interleaved")
    p.add_argument("--csv")
    p.add_argument("--plot", help="a PNG of tokens/s and latency per max batch (matplotlib)")
    o = p.parse_args()
    batches = [int(b) for b in o.batches.split(",")]
    rows = []
    modes = [True, False] if o.prefix_ab else [True]
    for r in range(o.rounds):
        for b in batches[r % len(batches):] + batches[:r % len(batches)]:
            for reuse in (modes if r % 2 == 0 else modes[::-1]):
                tps, lat, summary = load(o, b, reuse)
                lat.sort()
                rows.append({"round": r, "max_batch": b, "prefix_reuse": reuse, "tokens_per_s": tps,
                             "latency_p50_s": statistics.median(lat), "latency_p90_s": lat[int(0.9 * (len(lat) - 1))],
                             "prompt_tokens_run": summary.get("prompt_tokens_run"),
                             "prefix_tokens_reused": summary.get("prefix_tokens_reused")})
                print(f"round {r}: max batch {b}{'' if reuse else ', prompts whole'}: {tps:.1f} tokens/s, latency p50 "
                      f"{rows[-1]['latency_p50_s'] * 1e3:.1f} ms, prompt tokens run {summary.get('prompt_tokens_run')}, "
                      f"reused {summary.get('prefix_tokens_reused')}", flush=True)
    base = statistics.median(x["tokens_per_s"] for x in rows if x["max_batch"] == batches[0] and x["prefix_reuse"])
    print(f"\n{o.clients} clients, {o.requests} requests of {o.tokens} tokens, {o.ranks} rank(s), medians of {o.rounds} rounds")
    print(f"{'max batch':>9} {'prefix':>7} {'tokens/s':>10} {'vs ' + str(batches[0]):>8} {'p50 s':>8} {'p90 s':>8} "
          f"{'run':>7} {'reused':>7}")
    for b in batches:
        for reuse in modes:
            mine = [x for x in rows if x["max_batch"] == b and x["prefix_reuse"] == reuse]
            tps = statistics.median(x["tokens_per_s"] for x in mine)
            print(f"{b:>9} {'reused' if reuse else 'whole':>7} {tps:>10.1f} {tps / base:>7.2f}x "
                  f"{statistics.median(x['latency_p50_s'] for x in mine):>8.3f} "
                  f"{statistics.median(x['latency_p90_s'] for x in mine):>8.3f} {mine[0]['prompt_tokens_run']!s:>7} "
                  f"{mine[0]['prefix_tokens_reused']!s:>7}")
    if o.plot:
        plot(rows, batches, o)
    if o.csv:
        os.makedirs(os.path.dirname(o.csv) or ".", exist_ok=True)
        with open(o.csv, "w", newline="") as out:
            w = csv.DictWriter(out, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
