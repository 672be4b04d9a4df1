#!/usr/bin/python3
"""pipemoe serve end to end on a small model trained here: concurrent completions (more of them
than the batch has rows, some longer than the model's window so that it slides, greedy and
sampled) each give the text `pipemoe generate` gives for that prompt, settings and seed alone; a
streamed completion's pieces add up to the same text; a stop string cuts it; on 1 rank and on 2
(mpirun: the experts spread, rank 0 serving). Bad requests get a 4xx answer with a message and the
server goes on, also when a client leaves in the middle of its stream; --max-requests ends it with
exit 0 and a summary line; SIGTERM ends it with exit 0; bad flags and a taken port get one error.
Prompts that begin as a sequence some row holds (being decoded, or kept after it finished: the next
turn of a conversation) run only their new tokens, and still give generate's text; with
--no-prefix-reuse they run whole; on 2 ranks the store has 2 rows, so that it keeps evicting.

Run: /usr/bin/python3 tests/cli/test_serve.py   (needs build/pipemoe)
"""
import http.client
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference"))
from harness import BINARY, TIMEOUT_SCALE, Failures, mpi_env, mpirun  # noqa: E402
from test_train_cli import tiny_config  # noqa: E402

# (prompt, max_tokens, temperature, seed): 40 tokens after a prompt pass the window of 32
REQUESTS = [("The jury said", 40, 0.0, 1), ("The old county", 12, 0.8, 7), ("In the city", 45, 0.9, 3),
            ("The report", 5, 0.0, 1), ("A new law was", 20, 0.7, 11), ("The river", 33, 1.0, 5)]


def start(ranks, checkpoint, *extra, env=None):
    """The server on `ranks` ranks (`env` added to the environment); returns (process, base url)."""
    args = ["serve", "--checkpoint", checkpoint, "--port", "0", "--max-batch", "4"] + [str(a) for a in extra]
    timeout = str(int(240 * TIMEOUT_SCALE))
    launch = ["mpirun", "-q", "--oversubscribe", "-np", str(ranks), BINARY] if ranks > 1 else [BINARY]
    proc = subprocess.Popen(["timeout", "--kill-after=5", timeout] + launch + args, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(mpi_env(), **(env or {})))
    line = proc.stdout.readline()
    found = re.search(r"http://[\d.]+:(\d+)", line)
    if not found:
        proc.kill()
        raise AssertionError(f"serve did not say where it listens: {line!r} {proc.stderr.read()[-500:]}")
    return proc, f"http://127.0.0.1:{found.group(1)}"


def call(url, path, body=None, method=None, headers=None):
    """(status, text) of one request."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120 * TIMEOUT_SCALE) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def completion(prompt, max_tokens, temperature, seed, **extra):
    return dict(dict(prompt=prompt, max_tokens=max_tokens, temperature=temperature, seed=seed, top_k=40), **extra)


def serve_concurrently(url):
    """Every request of REQUESTS at once, each on its own thread: {prompt: text}."""
    texts, threads = {}, []

    def one(prompt, n, t, seed):
        status, body = call(url, "/v1/completions", completion(prompt, n, t, seed))
        texts[prompt] = json.loads(body)["choices"][0]["text"] if status == 200 else f"HTTP {status}: {body}"

    for r in REQUESTS:
        threads.append(threading.Thread(target=one, args=r))
        threads[-1].start()
    for t in threads:
        t.join()
    return texts


def stream(url, path, body):
    """The JSON events of a streamed request (without the closing [DONE], which must be there)."""
    with urllib.request.urlopen(urllib.request.Request(url + path, data=json.dumps(dict(body, stream=True)).encode()),
                                timeout=120 * TIMEOUT_SCALE) as answer:
        events = [line[6:] for line in answer.read().decode().splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-2:]
    return [json.loads(e) for e in events[:-1]]


def more_requests(f, ranks, url, rows, expected, pair, pair_rows):
    """n choices, several prompts, streamed log-probabilities and connections kept alive (17 requests served)."""
    # n choices: choice i is generate's row i of the prompt repeated, whole and streamed
    prompt, n, t, seed = REQUESTS[1]
    status, body = call(url, "/v1/completions", completion(prompt, n, t, seed, n=3))
    whole = json.loads(body) if status == 200 else {}
    f.check([c["index"] for c in whole.get("choices", [])] == [0, 1, 2] and
            [c["text"] for c in whole["choices"]] == rows and whole["usage"]["completion_tokens"] == 3 * n,
            f"{ranks} rank(s): n=3 gives generate's three rows: {body[:500]}")
    chunks = stream(url, "/v1/completions", completion(prompt, n, t, seed, n=3, stream_options={"include_usage": True}))
    texts, finished = ["", "", ""], [None] * 3
    for chunk in chunks:
        for c in chunk["choices"]:
            texts[c["index"]] += c["text"]
            finished[c["index"]] = finished[c["index"]] or c["finish_reason"]
    f.check(texts == rows and finished == ["length"] * 3 and chunks[-1]["usage"]["completion_tokens"] == 3 * n and
            chunks[-1]["choices"] == [] and chunks[-2]["usage"] == chunks[-1]["usage"],
            f"{ranks} rank(s): n=3 streamed adds up to the three rows: {texts} {finished} {chunks[-1]}")
    # the same prompt from three clients at once (admitted together, they share one prefill): each
    # is the text generate gives it alone
    same = {}
    threads = [threading.Thread(target=lambda k=k: same.update({k: call(url, "/v1/completions", completion(prompt, n, t, seed))}))
               for k in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    f.check(all(same[k][0] == 200 and json.loads(same[k][1])["choices"][0]["text"] == rows[0] for k in range(3)),
            f"{ranks} rank(s): one prompt from three clients at once: {same}")
    # several prompts in one request, n choices each: choice p * n + i is generate's row of the
    # prompts each given n times
    status, body = call(url, "/v1/completions", dict(prompt=pair, max_tokens=10, temperature=0.9, seed=5, top_k=40, n=2))
    answer = json.loads(body) if status == 200 else {}
    alone = [json.loads(call(url, "/v1/completions", completion(one, 1, 0.0, 1))[1]).get("usage", {}).get("prompt_tokens")
             for one in pair]
    f.check([c["text"] for c in answer.get("choices", [])] == pair_rows and [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
            and answer["usage"]["completion_tokens"] == 40 and answer["usage"]["prompt_tokens"] == sum(alone),
            f"{ranks} rank(s): two prompts x n=2 give generate's rows of [A, A, B, B]: {body[:500]} vs {pair_rows}")
    # greedy choices share the prompt's one prefill: the same echoed scores and text each
    status, body = call(url, "/v1/completions", completion(REQUESTS[0][0], 6, 0.0, 1, n=2, logprobs=1, echo=True))
    two = json.loads(body)["choices"] if status == 200 else [{}, {}]
    f.check(len(two) == 2 and dict(two[0], index=1) == two[1] and two[0]["logprobs"]["token_logprobs"][0] is None and
            len(two[0]["logprobs"]["tokens"]) > 6, f"{ranks} rank(s): two greedy choices with echo: {body[:400]}")
    print(f"ok: {ranks} rank(s): n=3 choices, whole and streamed, are generate's rows of the prompt", flush=True)

    # log-probabilities streamed: each piece with its tokens', together the whole answer's (also
    # when a stop string cuts the last token)
    prompt, n, t, seed = REQUESTS[2]
    for extra in ({}, {"stop": [expected[prompt][10:13]]}):
        body = completion(prompt, n, t, seed, logprobs=2, **extra)
        status, answer = call(url, "/v1/completions", body)
        want = json.loads(answer)["choices"][0]["logprobs"] if status == 200 else {}
        got = {k: [] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        for chunk in stream(url, "/v1/completions", body):
            for k in got:
                got[k] += chunk["choices"][0]["logprobs"][k]
        f.check(want and got == want and len(got["tokens"]) > 3,
                f"{ranks} rank(s): streamed logprobs {extra} add up to the whole answer's: {got} vs {want}")
    body = dict(messages=[{"role": "user", "content": prompt}], max_tokens=15, temperature=0.9, seed=2, logprobs=True,
                top_logprobs=2)
    status, answer = call(url, "/v1/chat/completions", body)
    want = json.loads(answer)["choices"][0]["logprobs"]["content"] if status == 200 else []
    got = [e for chunk in stream(url, "/v1/chat/completions", body) for e in chunk["choices"][0]["logprobs"]["content"]]
    f.check(len(want) == 15 and got == want, f"{ranks} rank(s): a streamed chat's logprobs: {got} vs {want}")
    print(f"ok: {ranks} rank(s): streamed log-probabilities add up to the whole answer's", flush=True)

    # one connection, several requests (HTTP/1.1 keep-alive), until the client asks to close it
    host, port = url[len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120 * TIMEOUT_SCALE)
    answers, socks = [], []
    for method, path, payload, headers in [("GET", "/health", None, {}),
                                           ("POST", "/v1/completions", completion(*REQUESTS[3]), {}),
                                           ("POST", "/v1/completions", {"prompt": 5}, {}),
                                           ("POST", "/v1/completions", completion(*REQUESTS[3]), {"Connection": "close"})]:
        conn.request(method, path, None if payload is None else json.dumps(payload), headers)
        r = conn.getresponse()
        answers.append((r.status, r.getheader("Connection"), r.read().decode()))
        socks.append(conn.sock)
    conn.close()
    texts = [json.loads(a[2])["choices"][0]["text"] if a[0] == 200 else None for a in answers[1::2]]
    f.check([a[:2] for a in answers] == [(200, "keep-alive"), (200, "keep-alive"), (400, "keep-alive"), (200, "close")] and
            socks[0] is not None and socks[:3] == [socks[0]] * 3 and socks[3] is None and
            texts == [expected[REQUESTS[3][0]]] * 2, f"{ranks} rank(s): keep-alive: {answers} {socks}")
    print(f"ok: {ranks} rank(s): four requests on one connection, closed when the client asks", flush=True)


def sampling_fields(f, ranks, url, penalised, penalised_text):
    """Penalties, min-p and logit_bias (3 requests served; the bad ones first: --max-requests ends it)."""
    for bad, word in [({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": -2.5}, "frequency_penalty"),
                      ({"min_p": 1.5}, "min_p"), ({"logit_bias": {"x": 1}}, "token id"), ({"logit_bias": {"1": 101}}, "[-100, 100]"),
                      ({"logit_bias": {"100000": 1}}, "outside the vocabulary"), ({"logit_bias": [1]}, "object")]:
        status, answer = call(url, "/v1/completions", dict(prompt="a", **bad))
        f.check(status == 400 and word in json.loads(answer)["error"]["message"], f"{ranks} rank(s): {bad}: {answer}")
    status, body = call(url, "/v1/completions", completion(REQUESTS[2][0], 30, 0.9, 2, **penalised))
    f.check(status == 200 and json.loads(body)["choices"][0]["text"] == penalised_text,
            f"{ranks} rank(s): penalties and min-p give generate's text: {body[:300]} vs {penalised_text!r}")
    # token ids are bytes here (101 "e", 120 "x"): +100 makes "e" the greedy pick over "x" at +99;
    # -100 bans it, and "x" wins
    texts = []
    for bias in ({"101": 100, "120": 99}, {"101": -100, "120": 99}):
        status, body = call(url, "/v1/completions", completion("The jury", 6, 0.0, 1, logit_bias=bias))
        texts.append(json.loads(body)["choices"][0]["text"] if status == 200 else body)
    f.check(texts == ["e" * 6, "x" * 6], f"{ranks} rank(s): logit_bias forces and bans tokens: {texts}")
    print(f"ok: {ranks} rank(s): penalties and min-p as generate's flags; logit_bias forces and bans tokens", flush=True)


def main():
    f = Failures()
    with tempfile.TemporaryDirectory() as tmp:
        config = tiny_config(tmp, max_steps=12)
        ck = os.path.join(tmp, "ck")
        mpirun(2, ["train", "--config", config, "--save", ck])

        # what generate gives for each request alone
        expected = {}
        for prompt, n, t, seed in REQUESTS:
            out = mpirun(1, ["generate", "--checkpoint", ck, "--prompt", prompt, "--tokens", n, "--temperature", t,
                             "--seed", seed, "--top-k", 40, "--json"])
            full = json.loads(out.stdout.strip().splitlines()[-1])["texts"][0]
            f.check(full.startswith(prompt), f"generate's text starts with its prompt: {full!r}")
            expected[prompt] = full[len(prompt):]
        # n choices of one prompt: generate's rows of the prompt repeated
        prompt, n, t, seed = REQUESTS[1]
        out = mpirun(1, ["generate", "--checkpoint", ck, "--prompt", prompt, "--prompt", prompt, "--prompt", prompt,
                         "--tokens", n, "--temperature", t, "--seed", seed, "--top-k", 40, "--json"])
        rows = [text[len(prompt):] for text in json.loads(out.stdout.strip().splitlines()[-1])["texts"]]
        f.check(len(rows) == 3 and rows[0] == expected[prompt] and len(set(rows)) == 3,
                f"generate's three rows of one prompt differ, row 0 as alone: {rows}")
        # penalties and min-p: generate's flags and serve's fields give the same text, not the plain one
        penalised = dict(presence_penalty=0.7, frequency_penalty=1.3, min_p=0.1)
        out = mpirun(1, ["generate", "--checkpoint", ck, "--prompt", REQUESTS[2][0], "--tokens", 30, "--temperature", 0.9,
                         "--seed", 2, "--top-k", 40, "--presence-penalty", 0.7, "--frequency-penalty", 1.3, "--min-p", 0.1, "--json"])
        penalised_text = json.loads(out.stdout.strip().splitlines()[-1])["texts"][0][len(REQUESTS[2][0]):]
        out = mpirun(1, ["generate", "--checkpoint", ck, "--prompt", REQUESTS[2][0], "--tokens", 30, "--temperature", 0.9,
                         "--seed", 2, "--top-k", 40, "--json"])
        f.check(penalised_text != json.loads(out.stdout.strip().splitlines()[-1])["texts"][0][len(REQUESTS[2][0]):],
                f"penalties and min-p change generate's text: {penalised_text!r}")
        # two prompts, two choices each: generate's rows of [A, A, B, B]
        pair = [REQUESTS[0][0], REQUESTS[4][0]]
        out = mpirun(1, ["generate", "--checkpoint", ck, "--prompt", pair[0], "--prompt", pair[0], "--prompt", pair[1],
                         "--prompt", pair[1], "--tokens", 10, "--temperature", 0.9, "--seed", 5, "--top-k", 40, "--json"])
        pair_rows = [text[len(pair[i // 2]):] for i, text in enumerate(json.loads(out.stdout.strip().splitlines()[-1])["texts"])]
        # the next turn: a served prompt, its answer and more (its start is kept in the prefix store)
        turn = REQUESTS[3][0] + expected[REQUESTS[3][0]] + " and"
        out = mpirun(1, ["generate", "--checkpoint", ck, "--prompt", turn, "--tokens", 8, "--temperature", 0.8,
                         "--seed", 2, "--top-k", 40, "--json"])
        turn_text = json.loads(out.stdout.strip().splitlines()[-1])["texts"][0][len(turn):]

        for ranks in (1, 2):
            served = len(REQUESTS) + 2 + 24 + 3 + 6 + 17 + 3 + 2
            proc, url = start(ranks, ck, "--max-requests", served, *(["--prefix-cache", 2] if ranks == 2 else []))
            status, body = call(url, "/health")
            f.check(status == 200 and json.loads(body)["status"] == "ok" and json.loads(body)["dtype"] == "fp32",
                    f"{ranks} rank(s): /health {status} {body}")
            got = serve_concurrently(url)
            for prompt, *_ in REQUESTS:
                f.check(got.get(prompt) == expected[prompt],
                        f"{ranks} rank(s), {prompt!r}: served {got.get(prompt)!r}, generate gives {expected[prompt]!r}")
            print(f"ok: {ranks} rank(s): {len(REQUESTS)} concurrent completions, each generate's text", flush=True)

            # the next turn of a conversation starts from the kept keys and values of the last (asked
            # again just before: the 2 rows of the store on 2 ranks have kept later sequences since)
            status, body = call(url, "/v1/completions", completion(*REQUESTS[3]))
            f.check(status == 200 and json.loads(body)["choices"][0]["text"] == expected[REQUESTS[3][0]],
                    f"{ranks} rank(s): the previous turn: {body[:300]}")
            before = json.loads(call(url, "/health")[1])
            status, body = call(url, "/v1/completions", completion(turn, 8, 0.8, 2))
            after = json.loads(call(url, "/health")[1])
            reused = after["prefix_tokens_reused"] - before["prefix_tokens_reused"]
            usage = json.loads(body).get("usage", {}) if status == 200 else {}
            f.check(status == 200 and json.loads(body)["choices"][0]["text"] == turn_text and
                    after["prefix_hits"] == before["prefix_hits"] + 1 and reused >= 5 and
                    usage.get("prompt_tokens_details") == {"cached_tokens": reused},
                    f"{ranks} rank(s): the next turn ({reused} positions reused) gives generate's text: {body[:300]} "
                    f"vs {turn_text!r}; {before} -> {after}")
            print(f"ok: {ranks} rank(s): the next turn of a conversation reuses {reused} cached positions, "
                  f"generate's text", flush=True)

            # /metrics: Prometheus's text format, the counts /health gives, the latency histograms
            with urllib.request.urlopen(url + "/metrics", timeout=60) as answer:
                kind, text = answer.headers.get("Content-Type", ""), answer.read().decode()
            health = json.loads(call(url, "/health")[1])
            values = {}
            for line in text.splitlines():
                if line and not line.startswith("#"):
                    name, value = line.rsplit(" ", 1)
                    values[name] = float(value)
            buckets = [v for k, v in values.items() if k.startswith("pipemoe_request_seconds_bucket")]
            f.check(kind.startswith("text/plain") and "# TYPE pipemoe_requests_served_total counter" in text and
                    values.get("pipemoe_requests_served_total") == health["served"] == len(REQUESTS) + 2 and
                    values.get("pipemoe_generated_tokens_total") == health["tokens"] and
                    values.get("pipemoe_prefix_tokens_reused_total") == health["prefix_tokens_reused"] and
                    values.get("pipemoe_active_rows") == 0 and values.get("pipemoe_max_batch") == 4 and
                    values.get("pipemoe_kv_cache_bytes") == health["kv_cache_bytes"] > 0 and
                    buckets == sorted(buckets) and len(buckets) == 12 and buckets[-1] == health["served"] and
                    values.get("pipemoe_request_seconds_count") == health["served"] and
                    values.get("pipemoe_time_to_first_token_seconds_count") == health["served"] and
                    0 < values.get("pipemoe_time_to_first_token_seconds_sum", 0) <= values.get("pipemoe_request_seconds_sum", 0),
                    f"{ranks} rank(s): /metrics ({kind}) against /health {health}:\n{text}")
            print(f"ok: {ranks} rank(s): /metrics gives /health's counts and the latency histograms", flush=True)

            # bad requests: an answer with a message, and the server goes on
            for body, path, method, code, word in [(b"{not json", "/v1/completions", None, 400, "not JSON"),
                                                   ({"prompt": 5}, "/v1/completions", None, 400, "prompt"),
                                                   ({"prompt": "a", "max_tokens": 0}, "/v1/completions", None, 400, "max_tokens"),
                                                   ({"prompt": "a", "temperature": -1}, "/v1/completions", None, 400, "temperature"),
                                                   ({"prompt": "a", "n": 0}, "/v1/completions", None, 400, "n must be"),
                                                   ({"prompt": "a", "n": 17}, "/v1/completions", None, 400, "n must be"),
                                                   (None, "/nowhere", None, 404, "no such path"),
                                                   (None, "/v1/completions", "GET", 405, "POST")]:
                status, answer = call(url, path, body, method)
                message = json.loads(answer).get("error", {}).get("message", "") if answer.startswith("{") else answer
                f.check(status == code and word in message, f"{ranks} rank(s): {path} {body!r}: {status} {answer[:200]}")
            print(f"ok: {ranks} rank(s): bad requests answered 4xx with a message", flush=True)

            # a stream adds up to the whole text; a stop string cuts it
            prompt, n, t, seed = REQUESTS[2]
            with urllib.request.urlopen(urllib.request.Request(
                    url + "/v1/completions", data=json.dumps(completion(prompt, n, t, seed, stream=True)).encode()),
                    timeout=120 * TIMEOUT_SCALE) as answer:
                events = [line[6:] for line in answer.read().decode().splitlines() if line.startswith("data: ")]
            pieces = [json.loads(e)["choices"][0] for e in events[:-1]]
            f.check(events and events[-1] == "[DONE]" and pieces[-1]["finish_reason"] == "length",
                    f"{ranks} rank(s): the stream ends with a finish reason and [DONE]: {events[-2:]}")
            f.check("".join(p["text"] for p in pieces) == expected[prompt] and len(pieces) > 5,
                    f"{ranks} rank(s): the stream's {len(pieces)} pieces add up to generate's text")
            stop = expected[prompt][10:13]
            status, body = call(url, "/v1/completions", completion(prompt, n, t, seed, stop=[stop]))
            choice = json.loads(body)["choices"][0]
            f.check(choice["finish_reason"] == "stop" and choice["text"] == expected[prompt][:expected[prompt].index(stop)],
                    f"{ranks} rank(s): stop {stop!r} cuts the text: {choice}")
            print(f"ok: {ranks} rank(s): a stream adds up to the text, a stop string cuts it", flush=True)

            # a young model at a high temperature writes bytes that are not whole UTF-8 characters:
            # the stream still adds up to the text (no character split between two events)
            differ = 0
            for seed in range(12):
                body = completion("The jury", 30, 4.0, seed, top_k=300)
                status, whole = call(url, "/v1/completions", body)
                with urllib.request.urlopen(urllib.request.Request(
                        url + "/v1/completions", data=json.dumps(dict(body, stream=True)).encode()),
                        timeout=120 * TIMEOUT_SCALE) as answer:
                    events = [line[6:] for line in answer.read().decode().splitlines() if line.startswith("data: ")]
                streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
                differ += status != 200 or streamed != json.loads(whole)["choices"][0]["text"]
            f.check(differ == 0, f"{ranks} rank(s): {differ} of 12 high-temperature streams differ from their text")
            print(f"ok: {ranks} rank(s): high-temperature streams add up to their texts", flush=True)

            # the chat API: the messages' prompt by the documented template, answered as a message,
            # or streamed as deltas (the first naming the role), the text that prompt's completion gets
            for bad, word in [({}, "messages"), ({"messages": []}, "non-empty"),
                              ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
                              ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text parts")]:
                status, answer = call(url, "/v1/chat/completions", bad)
                f.check(status == 400 and word in json.loads(answer)["error"]["message"], f"{ranks} rank(s): {bad}: {answer}")
            messages = [{"role": "system", "content": "Short answers."}, {"role": "user", "content": "The jury"},
                        {"role": "assistant", "content": "said it"}, {"role": "user", "content": "Why?"}]
            rendered = "System: Short answers.\nUser: The jury\nAssistant: said it\nUser: Why?\nAssistant:"
            settings = dict(max_completion_tokens=20, temperature=0.8, seed=4, top_k=40)
            status, body = call(url, "/v1/chat/completions", dict(settings, messages=messages))
            chat = json.loads(body) if status == 200 else {}
            status2, body2 = call(url, "/v1/completions", dict(completion(rendered, 20, 0.8, 4)))
            plain = json.loads(body2)["choices"][0] if status2 == 200 else {}
            message = chat.get("choices", [{}])[0].get("message", {})
            f.check(chat.get("object") == "chat.completion" and message.get("role") == "assistant" and
                    message.get("content") == plain.get("text") and len(plain.get("text", "")) > 0 and
                    chat["choices"][0]["finish_reason"] == "length" and chat["usage"]["completion_tokens"] == 20,
                    f"{ranks} rank(s): a chat completion is its prompt's completion: {body[:300]} vs {body2[:300]}")
            parts = [dict(m, content=[{"type": "text", "text": m["content"][:3]}, {"type": "text", "text": m["content"][3:]}])
                     for m in messages]
            with urllib.request.urlopen(urllib.request.Request(
                    url + "/v1/chat/completions", data=json.dumps(dict(settings, messages=parts, stream=True)).encode()),
                    timeout=120 * TIMEOUT_SCALE) as answer:
                events = [line[6:] for line in answer.read().decode().splitlines() if line.startswith("data: ")]
            chunks = [json.loads(e) for e in events[:-1]]
            deltas = [c["choices"][0]["delta"] for c in chunks]
            f.check(events[-1] == "[DONE]" and all(c["object"] == "chat.completion.chunk" for c in chunks) and
                    deltas[0].get("role") == "assistant" and all("role" not in d for d in deltas[1:]) and
                    "".join(d["content"] for d in deltas) == message.get("content"),
                    f"{ranks} rank(s): a streamed chat (content in parts) adds up to the same message: {events[:3]}")
            print(f"ok: {ranks} rank(s): chat completions, whole and streamed, are their prompt's completion", flush=True)

            # log-probabilities: the model's own (greedy picks the most likely token, whose logprob
            # tops the alternatives); asking for them changes no text; a prompt's echoed scores (from
            # one prefill) are the bits the same tokens got one decode step at a time
            for bad, word in [({"prompt": "a", "logprobs": 6}, "logprobs"), ({"prompt": "a", "echo": True, "stream": True}, "stream"),
                              ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
                              ({"prompt": "a", "best_of": 3}, "best_of"), ({"prompt": "a", "suffix": "x"}, "suffix"),
                              ({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}, "tools"),
                              ({"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json_object"}},
                               "response_format"),
                              ({"prompt": "a", "echo": "yes"}, "echo"), ({"prompt": ["a", 5]}, "one prompt each"),
                              ({"prompt": ["a"] * 20, "n": 16}, "at most 256"),
                              ({"prompt": [1, 100000]}, "outside the vocabulary"), ({"prompt": []}, "prompt"),
                              ({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "top_logprobs")]:
                status, answer = call(url, "/v1/chat/completions" if "messages" in bad else "/v1/completions", bad)
                f.check(status == 400 and word in json.loads(answer)["error"]["message"], f"{ranks} rank(s): {bad}: {answer}")
            prompt = REQUESTS[0][0]
            status, body = call(url, "/v1/completions", completion(prompt, 12, 0.0, 1, logprobs=5, echo=True))
            a = json.loads(body)["choices"][0] if status == 200 else {}
            lp = a.get("logprobs") or {}
            tokens, lps, tops, offsets = (lp.get(k, []) for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset"))
            prompt_tokens = len(tokens) - 12
            f.check(a.get("text") == prompt + expected[prompt][:len(a.get("text", "")) - len(prompt)] and
                    "".join(tokens) == a.get("text") and offsets == [sum(len(t.encode()) for t in tokens[:i]) for i in range(len(tokens))],
                    f"{ranks} rank(s): echo gives the prompt, generate's text and its tokens: {a.get('text')!r} {tokens}")
            f.check(prompt_tokens >= 2 and lps[0] is None and tops[0] is None and
                    all(len(t) == 5 and max(t.values()) == lps[i] and t.get(tokens[i]) == lps[i] and
                        sum(math.exp(v) for v in t.values()) <= 1 + 1e-9 for i, t in enumerate(tops) if i >= prompt_tokens),
                    f"{ranks} rank(s): greedy tokens are the most likely of their top 5: {lps} {tops}")
            f.check(all(v is not None and v <= 0 for v in lps[1:]), f"{ranks} rank(s): log-probabilities: {lps}")
            status, body = call(url, "/v1/completions", completion(a.get("text", ""), 1, 0.0, 1, logprobs=1, echo=True))
            b = (json.loads(body)["choices"][0].get("logprobs") or {}) if status == 200 else {}
            same = 0
            while same < min(len(tokens), len(b.get("tokens", []))) and tokens[same] == b["tokens"][same]:
                same += 1
            f.check(same >= prompt_tokens + 3 and b["token_logprobs"][:same] == lps[:same],
                    f"{ranks} rank(s): {same} tokens in common, whose echoed log-probabilities must be the decoded "
                    f"ones: {b.get('token_logprobs', [])[:same]} vs {lps[:same]}")
            status, body = call(url, "/v1/chat/completions", dict(messages=[{"role": "user", "content": prompt}], max_tokens=6,
                                                                  temperature=0, logprobs=True, top_logprobs=3))
            choice = json.loads(body)["choices"][0] if status == 200 else {}
            content = (choice.get("logprobs") or {}).get("content", [])
            f.check(len(content) == 6 and "".join(e["token"] for e in content) == choice["message"]["content"] and
                    all(bytes(e["bytes"]).decode() == e["token"] and len(e["top_logprobs"]) == 3 and
                        e["top_logprobs"][0]["logprob"] == e["logprob"] for e in content),
                    f"{ranks} rank(s): chat logprobs: {body[:400]}")
            # max_tokens 0 with echo: the prompt scored, nothing generated (two prompts at once)
            status, body = call(url, "/v1/completions", dict(prompt=[prompt, a.get("text", "")], max_tokens=0, logprobs=1, echo=True))
            scored = json.loads(body)["choices"] if status == 200 else []
            f.check(len(scored) == 2 and scored[0]["text"] == prompt and scored[0]["logprobs"]["tokens"] == tokens[:prompt_tokens]
                    and scored[0]["logprobs"]["token_logprobs"] == lps[:prompt_tokens] and scored[1]["logprobs"]["tokens"] == b["tokens"][:-1]
                    and scored[1]["logprobs"]["token_logprobs"] == b["token_logprobs"][:-1] and json.loads(body)["usage"]["completion_tokens"] == 0,
                    f"{ranks} rank(s): max_tokens 0 scores the prompts: {body[:400]}")
            status, body = call(url, "/v1/completions", dict(prompt="a", max_tokens=0))
            f.check(status == 400 and "0 with echo" in body, f"{ranks} rank(s): max_tokens 0 without echo: {body}")
            # the prompt as a list of one (what batching clients send) and as token ids (here bytes)
            status, body = call(url, "/v1/completions", completion([prompt], 12, 0.0, 1))
            f.check(status == 200 and json.loads(body)["choices"][0]["text"] == a.get("text", "")[len(prompt):],
                    f"{ranks} rank(s): a prompt in a list of one: {body[:300]}")
            status, body = call(url, "/v1/completions", completion(list(b"The"), 2, 0.0, 1, logprobs=0, echo=True))
            ids = (json.loads(body)["choices"][0]["logprobs"] or {}) if status == 200 else {}
            f.check(ids.get("tokens", [])[:3] == ["T", "h", "e"] and len(ids["tokens"]) == 5,
                    f"{ranks} rank(s): a prompt of token ids: {body[:300]}")
            print(f"ok: {ranks} rank(s): log-probabilities (completions with echo, chat): greedy picks the top one, "
                  f"echo scores a prompt as decoding did, bit for bit", flush=True)

            more_requests(f, ranks, url, rows, expected, pair, pair_rows)
            sampling_fields(f, ranks, url, penalised, penalised_text)
            out, err = proc.communicate(timeout=120 * TIMEOUT_SCALE)
            summary = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
            f.check(proc.returncode == 0 and summary.get("served") == served,
                    f"{ranks} rank(s): --max-requests ends it with exit 0: {proc.returncode} {summary} {err[-300:]}")
            f.check(summary.get("peak_batch") == 4, f"{ranks} rank(s): the batch filled its 4 rows: {summary}")
            f.check(summary.get("prompts_shared", 0) >= 4 and summary.get("prompts_run", 0) > 30,
                    f"{ranks} rank(s): choices admitted together shared their prompt's run: {summary}")
            f.check(summary.get("prefix_hits", 0) >= 10 and summary.get("prefix_tokens_reused", 0) >= 50,
                    f"{ranks} rank(s): prompts started from cached prefixes: {summary}")
            print(f"ok: {ranks} rank(s): served {summary.get('served')}, at most {summary.get('peak_batch')} rows at once, "
                  f"{summary.get('prompts_run')} prompts run, {summary.get('prompts_shared')} shared, "
                  f"{summary.get('prefix_hits')} from a cached prefix ({summary.get('prefix_tokens_reused')} positions), "
                  f"exit {proc.returncode}", flush=True)

        # a client that leaves in the middle of its stream: the server goes on with the others (and
        # every prompt runs whole: the same texts)
        proc, url = start(1, ck, "--no-prefix-reuse")
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            body = json.dumps(completion("The jury said", 2000, 0.8, 1, stream=True)).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            received = b""
            while b"data: " not in received and len(received) < 100000:
                received += sock.recv(4096)
            f.check(b"data: " in received, f"the stream started: {received[:200]}")
        status, body = call(url, "/v1/completions", completion(*REQUESTS[0]))
        f.check(status == 200 and json.loads(body)["choices"][0]["text"] == expected[REQUESTS[0][0]],
                f"after a client left its stream: {status} {body[:200]}")
        # and one that waits for a whole answer: its row is freed as soon as it leaves (not after all
        # of its 8192 tokens)
        tokens_before = json.loads(call(url, "/health")[1])["tokens"]
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            body = json.dumps(completion("The jury said", 8192, 0.8, 1)).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            for _ in range(600):
                if json.loads(call(url, "/health")[1])["active"] == 1:
                    break
                time.sleep(0.05)
        freed, health = None, {}
        start_wait = time.perf_counter()
        while time.perf_counter() - start_wait < 60 * TIMEOUT_SCALE:
            health = json.loads(call(url, "/health")[1])
            if health["active"] == 0:
                freed = time.perf_counter() - start_wait
                break
            time.sleep(0.05)
        f.check(freed is not None and health["tokens"] - tokens_before < 8192,
                f"a client that left its whole answer frees its row: {tokens_before} tokens before, {health}")
        status, body = call(url, "/v1/completions", completion(turn, 8, 0.8, 2))
        f.check(status == 200 and json.loads(body)["choices"][0]["text"] == turn_text and
                json.loads(body)["usage"]["prompt_tokens_details"] == {"cached_tokens": 0},
                f"--no-prefix-reuse: the next turn's text, no cached tokens: {status} {body[:300]}")
        status, body = call(url, "/health")
        f.check(status == 200 and json.loads(body)["active"] == 0, f"the stream left no row behind: {body}")
        f.check(json.loads(body).get("prefix_hits") == 0, f"--no-prefix-reuse: no prefix reused: {body}")
        print(f"ok: a client leaving its stream, or its whole answer (row freed after {freed:.2f} s), ends its "
              f"request; the others go on", flush=True)

        # SIGTERM: the server ends cleanly
        status, _ = call(url, "/v1/completions", completion("The jury said", 4, 0.0, 1))
        f.check(status == 200, f"a completion before SIGTERM: {status}")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60 * TIMEOUT_SCALE)
        f.check(proc.returncode == 0 and '"served":5' in out, f"SIGTERM: exit {proc.returncode}, {out[-200:]} {err[-200:]}")
        print(f"ok: SIGTERM ends the server with exit {proc.returncode}", flush=True)

        # SIGTERM with choices waiting for a row: the live ones finish, the request is answered 503
        proc, url = start(1, ck)
        answer = {}
        waiter = threading.Thread(target=lambda: answer.update(
            zip(("status", "body"), call(url, "/v1/completions", completion("The jury said", 1000, 0.8, 1, n=8)))))
        waiter.start()
        health = {}
        for _ in range(600):
            health = json.loads(call(url, "/health")[1])
            if health["active"] == 4 and health["waiting"] == 4:
                break
            time.sleep(0.05)
        # to the server itself: `timeout`, passing a signal on, kills its command 5 s later, and
        # the live choices take longer than that under the sanitizers
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as children:
            os.kill(int(children.read().split()[0]), signal.SIGTERM)
        waiter.join(timeout=120 * TIMEOUT_SCALE)
        out, err = proc.communicate(timeout=60 * TIMEOUT_SCALE)
        f.check(health.get("waiting") == 4 and answer.get("status") == 503 and "shutting down" in answer.get("body", "") and
                proc.returncode == 0, f"SIGTERM with 4 choices waiting: {health} {answer} exit {proc.returncode} {err[-200:]}")
        print(f"ok: SIGTERM with choices waiting: {answer.get('status')}, exit {proc.returncode}", flush=True)

        # an API key, from the flag or the environment: /health answers anyone, the rest only with the key
        for how, extra, env in [("--api-key", ["--api-key", "s3cret"], None), ("PIPEMOE_API_KEY", [], {"PIPEMOE_API_KEY": "s3cret"})]:
            proc, url = start(1, ck, "--max-requests", 1, *extra, env=env)
            statuses = [call(url, "/health")[0]]
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer s3cret2"},
                            {"Authorization": "s3cret"}, {"Authorization": "Bearer s3cret"}]:
                statuses.append(call(url, "/v1/completions", completion("The jury said", 3, 0.0, 1), headers=headers)[0])
            out, err = proc.communicate(timeout=60 * TIMEOUT_SCALE)
            f.check(statuses == [200, 401, 401, 401, 401, 200] and proc.returncode == 0,
                    f"the API key by {how}: statuses {statuses}, exit {proc.returncode} {err[-200:]}")
        print("ok: an API key (flag or environment) shuts out requests without it; /health stays open", flush=True)

        # bad flags: one clear error
        for args, word in [(["serve"], "--checkpoint"), (["serve", "--checkpoint", ck, "--max-batch", "0"], "--max-batch"),
                           (["serve", "--checkpoint", ck, "--prefix-cache", "-1"], "--prefix-cache"),
                           (["serve", "--checkpoint", os.path.join(tmp, "none")], "none")]:
            bad = mpirun(1, args, check=False)
            lines = [l for l in bad.stderr.splitlines() if l.startswith("pipemoe: error")]
            f.check(bad.returncode != 0 and len(lines) == 1 and word in lines[0], f"{args}: {bad.stderr[-300:]}")
        print("ok: serve without a checkpoint, with --max-batch 0 or --prefix-cache -1, with a missing checkpoint: "
              "one error line each", flush=True)

        # a port that is taken: one clear error
        proc, url = start(1, ck)
        port = url.rsplit(":", 1)[1]
        taken = mpirun(1, ["serve", "--checkpoint", ck, "--port", port], check=False)
        lines = [l for l in taken.stderr.splitlines() if l.startswith("pipemoe: error")]
        f.check(taken.returncode == 2 and len(lines) == 1 and "cannot listen" in lines[0],
                f"a taken port: exit {taken.returncode}, {taken.stderr[-300:]}")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60 * TIMEOUT_SCALE)
        print(f"ok: a taken port -> {lines[0] if lines else taken.stderr[-200:]}", flush=True)
    f.finish("test_serve")


if __name__ == "__main__":
    main()
