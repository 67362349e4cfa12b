"""The demo's gated service, and what happens outside any sluice sandbox.

usage:
  python3 -u demo_shipping.py service PORT
      A mock shipping API, plain HTTP on 127.0.0.1:PORT (the gate in front of it speaks HTTPS):
      GET /v1/rates, POST /v1/shipments, POST /v1/refunds. Prints `ready`, then one `service: …`
      line per request that reached it (with the gate's Sluice-Passport-Id). Exits when its
      standard input closes.
  python3 -u demo_shipping.py anonymous GATE_HOST GATE_IP CA
      Talks to the gate directly, from outside sluice, as a visitor with no passport.
  python3 -u demo_shipping.py replay GATE_HOST GATE_IP CA PASSPORT KEY
      Signs one request with the agent's key file by hand, as docs/gate.md describes, and sends
      the same bytes twice, straight to the gate.
  python3 -u demo_shipping.py fetch GATE_HOST GATE_IP CA PATH OUT
      GETs PATH from the gate (anonymous) and writes the answer's body, byte for byte, to OUT.
  Each prints what happens, then a last line `RESULT {json}` for `cargo xtask demo` to check.
"""

import base64
import hashlib
import json
import os
import secrets
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 64 * 1024


def service(port):
    shipments = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self, status, body):
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def note(self):
            who = self.headers.get("Sluice-Passport-Id") or "no passport (anonymous)"
            print(f"service: {self.command} {self.path} from {who}", flush=True)

        def do_GET(self):
            self.note()
            if self.path == "/v1/rates":
                self.answer(200, {"rates": [{"service": "standard", "cents_per_kg": 450}, {"service": "express", "cents_per_kg": 990}]})
            else:
                self.answer(404, {"error": "not found"})

        def do_POST(self):
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                self.answer(400, {"error": f"Content-Length must be 0 to {MAX_BODY}"})
                self.close_connection = True
                return
            self.rfile.read(length)
            self.note()
            if self.path == "/v1/shipments":
                shipments.append(self.headers.get("Sluice-Passport-Id"))
                self.answer(201, {"id": f"shp_{len(shipments)}", "status": "booked"})
            elif self.path == "/v1/refunds":
                self.answer(201, {"id": "rf_1", "status": "refunded"})
            else:
                self.answer(404, {"error": "not found"})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    # Never outlive the demo, even one killed with SIGKILL: its end of our stdin closes.
    sys.stdin.buffer.read()
    os._exit(0)


def b64(data):
    return base64.b64encode(data).decode()


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def send(gate_host, gate_ip, ca, method, path, headers, body=b"", raw=False):
    """One HTTP/1.1 request over TLS to the gate (certificate checked against CA for GATE_HOST).
    With raw, the answer's body is returned as bytes."""
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection((gate_ip, 443), timeout=30) as tcp, ctx.wrap_socket(tcp, server_hostname=gate_host) as s:
        head = f"{method} {path} HTTP/1.1\r\nHost: {gate_host}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    status = int(lines[0].split()[1])
    decision = next((l.split(":", 1)[1].strip() for l in lines if l.lower().startswith("sluice-decision:")), None)
    if raw:
        return status, decision, rest
    try:
        answer = json.loads(rest)
    except ValueError:
        answer = rest[:200].decode(errors="replace")
    return status, decision, answer


def say(step, text):
    print(f"[{step}] {text}", flush=True)


def show(step, status, decision, answer):
    say(step, f"{status}; Sluice-Decision: {decision}")
    if isinstance(answer, dict) and "decision" in answer:
        say(step, f"  {answer['decision']} {answer.get('reason')}: {answer.get('detail')}")
        if answer.get("hint"):
            say(step, f"  hint: {json.dumps(answer['hint'])}")
    else:
        say(step, f"  {json.dumps(answer)[:300]}")


def anonymous(gate_host, gate_ip, ca):
    results = {}

    say("k", f"GET https://{gate_host}/v1/rates with no passport at all (the gate's anonymous subset)")
    status, decision, answer = send(gate_host, gate_ip, ca, "GET", "/v1/rates", {})
    show("k", status, decision, answer)
    results["k"] = status

    say("l", f"POST https://{gate_host}/v1/shipments with no passport: the 401 says what it would take")
    status, decision, answer = send(gate_host, gate_ip, ca, "POST", "/v1/shipments", {"Content-Type": "application/json"}, b"{}")
    show("l", status, decision, answer)
    results["l"] = [status, answer.get("reason") if isinstance(answer, dict) else None]
    print("RESULT " + json.dumps(results), flush=True)


def replay(gate_host, gate_ip, ca, passport_file, key_file):
    from cryptography.hazmat.primitives import serialization

    results = {}

    # Sign one request with the agent's key, by hand: RFC 9530 digest, RFC 9421 signature base.
    token = open(passport_file).read().strip()
    key = serialization.load_pem_private_key(open(key_file, "rb").read(), password=None)
    raw_pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    jwk = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": b64url(raw_pub)}, separators=(",", ":"), sort_keys=True)
    jkt = b64url(hashlib.sha256(jwk.encode()).digest())
    body = json.dumps({"to": "Marseille", "parcel_kg": 5}).encode()
    digest = f"sha-256=:{b64(hashlib.sha256(body).digest())}:"
    params = (
        f'("@method" "@target-uri" "content-digest");created={int(time.time())};'
        f'nonce="{secrets.token_urlsafe(18)}";keyid="{jkt}";alg="ed25519";tag="sluice"'
    )
    base = (
        f'"@method": POST\n"@target-uri": https://{gate_host}/v1/shipments\n'
        f'"content-digest": {digest}\n"@signature-params": {params}'
    )
    headers = {
        "Content-Type": "application/json",
        "Sluice-Passport": token,
        "Sluice-Agent-Key": b64url(raw_pub),
        "Content-Digest": digest,
        "Signature-Input": f"sluice={params}",
        "Signature": f"sluice=:{b64(key.sign(base.encode()))}:",
    }
    request_hash = hashlib.sha256(base.encode()).hexdigest()
    results["hash"] = request_hash
    say("m", f"signed by hand with {key_file} (request hash {request_hash[:16]}…):")
    for name in ("Content-Digest", "Signature-Input", "Signature"):
        say("m", f"  {name}: {headers[name]}")
    say("m", "sent once:")
    status, decision, answer = send(gate_host, gate_ip, ca, "POST", "/v1/shipments", headers, body)
    show("m", status, decision, answer)
    results["m1"] = status
    say("m", "the very same bytes sent again, as anyone who captured them could (the signature is still valid):")
    status, decision, answer = send(gate_host, gate_ip, ca, "POST", "/v1/shipments", headers, body)
    show("m", status, decision, answer)
    results["m2"] = [status, answer.get("reason") if isinstance(answer, dict) else None]
    print("RESULT " + json.dumps(results), flush=True)


def fetch(gate_host, gate_ip, ca, path, out):
    status, _, body = send(gate_host, gate_ip, ca, "GET", path, {}, raw=True)
    with open(out, "wb") as f:
        f.write(body)
    say("o", f"GET https://{gate_host}{path}: {status}, {len(body)} bytes written to {out}")
    print("RESULT " + json.dumps({"status": status}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "service":
        service(int(sys.argv[2]))
    elif len(sys.argv) == 5 and sys.argv[1] == "anonymous":
        anonymous(*sys.argv[2:])
    elif len(sys.argv) == 7 and sys.argv[1] == "replay":
        replay(*sys.argv[2:])
    elif len(sys.argv) == 7 and sys.argv[1] == "fetch":
        fetch(*sys.argv[2:])
    else:
        sys.exit(__doc__)
