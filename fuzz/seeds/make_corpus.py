#!/usr/bin/env python3
"""Writes fuzz/corpus/TARGET/ seed files from the inputs the unit tests use.

Run from the repository root: python3 fuzz/seeds/make_corpus.py. The files are checked in; this
script documents where they come from and regenerates them (ClientHellos come from Python's
ssl module, i.e. OpenSSL, so those bytes differ on every run).
"""
import base64, hashlib, json, os, ssl, struct

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- sniff: real ClientHellos (OpenSSL) and HTTP heads from the unit tests -----------------
def client_hello(server, alpn, tls12=False):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols(alpn)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=server)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def records(handshake, chunk):
    out = b""
    for i in range(0, len(handshake), chunk):
        piece = handshake[i:i + chunk]
        out += bytes([0x16, 3, 1]) + struct.pack(">H", len(piece)) + piece
    return out


h13 = client_hello("API.example.com", ["h2", "http/1.1"])
write("sniff", "tls13-sni-alpn", h13)
write("sniff", "tls12-sni", client_hello("example.org", [], tls12=True))
write("sniff", "tls13-no-sni", client_hello(None, ["h2"]))
write("sniff", "tls13-split-records", records(h13[5:], 200))
write("sniff", "http-get", b"GET /v1/models HTTP/1.1\r\nUser-Agent: x\r\nhOsT:  API.example.com:8080 \t\r\nAccept: */*\r\n\r\nbody")
write("sniff", "http-connect", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
write("sniff", "http-absolute", b"POST http://a.test/x HTTP/1.0\r\n\r\n")
write("sniff", "http-two-hosts", b"GET / HTTP/1.1\r\nHost: a.test\r\nhost: a.test\r\n\r\n")
write("sniff", "http-bare-lf", b"GET / HTTP/1.1\nHost: a.test\n\n")
write("sniff", "ssh-banner", b"SSH-2.0-OpenSSH_9.6\r\n")

# ---- h1watch: request streams from its unit tests (first byte: the chunking seed) -----------
h1 = {
    "keep-alive": b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                  b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"
                  b"GET /d HTTP/1.1\r\nHost: x\r\n\r\n",
    "cl-te": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "te-cl": b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    "two-cl": b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "te-list": b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "folding": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n",
    "upgrade": b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nGET /x HTTP/1.1\r\n\r\n",
    "connect": b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\nGET /y HTTP/1.1\r\n\r\n",
}
for i, (name, stream) in enumerate(h1.items()):
    write("h1watch", name, bytes([i * 37 % 256]) + stream)

# ---- passports: the claims of crates/passport/src/tests.rs, with $ISS for the issuer ---------
claims = {
    "iss": "$ISS", "sub": "agent-1", "jti": "pp_0123456789abcdef0123456789abcdef",
    "iat": 1800000000, "nbf": 1800000000, "exp": 1800003600, "agent_name": "Test agent",
    "permissions": ["orders:read", "llm:*"], "trust_tier": "L1",
    "constraints": {"core:cost:max_per_action": 500},
    "cnf": {"jkt": "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"},
}
rich = dict(claims, constraints={
    "core:cost:max_per_action": 500, "core:cost:max_cumulative": 10000, "core:cost:cumulative_window": "weekly",
    "core:rate:max_per_minute": 60, "core:scope:domain_allowlist": ["api.openai.com", "*.example.com"],
    "core:cel:rules": [{"expr": "request.method == 'DELETE'", "decision": "block", "reason": "no_deletes"}],
})
header = {"alg": "EdDSA", "typ": "agent-passport+jwt"}
for name, c in [("plain", claims), ("constraints", rich)]:
    write("passport_verify", "signed-" + name, b"\x01" + json.dumps(header).encode() + b"\xff" + json.dumps(c).encode())
    write("passport_claims", name, json.dumps(c))
write("passport_verify", "signed-alg-none", b"\x01" + json.dumps({"alg": "none", "typ": "agent-passport+jwt"}).encode() + b"\xff" + json.dumps(claims).encode())
write("passport_verify", "signed-jwk", b"\x01" + json.dumps(dict(header, jwk={"kty": "OKP"})).encode() + b"\xff" + json.dumps(claims).encode())
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")
raw = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(claims).encode()) + b"." + b64(bytes(64))
write("passport_verify", "raw-token", b"\x00" + raw)
write("passport_verify", "raw-json-serialisation", b'\x00{"payload":"x","signatures":[]}')
write("passport_claims", "duplicate-nested", '{"a":{"b":1,"b":1}}')
write("passport_claims", "duplicate-escaped", '{"exp":1,"\\u0065xp":2}')
write("passport_claims", "unknown-claim", json.dumps(dict(claims, admin=True)))

# ---- policy_toml: the shipped policies (files separated by 0xff) -----------------------------
pol = lambda n: open(os.path.join(ROOT, "policies", n), "rb").read()
write("policy_toml", "openai", pol("openai.toml"))
write("policy_toml", "anthropic", pol("anthropic.toml"))
write("policy_toml", "host", pol("host.toml.example"))
write("policy_toml", "all-three", pol("openai.toml") + b"\xff" + pol("anthropic.toml") + b"\xff" + pol("host.toml.example"))
write("policy_toml", "conflict", pol("openai.toml") + b"\xff" + pol("openai.toml"))

# ---- DNS --------------------------------------------------------------------------------------
def name(n):
    out = b""
    for label in n.rstrip(".").split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def query(n, qtype, qid=0x1234, flags=0x0100, edns=False, qclass=1):
    q = struct.pack(">HHHHHH", qid, flags, 1, 0, 0, 1 if edns else 0) + name(n) + struct.pack(">HH", qtype, qclass)
    if edns:
        q += b"\x00" + struct.pack(">HHIH", 41, 1232, 0, 0)
    return q


write("dns_query", "a-allowed", query("api.allowed.test", 1))
write("dns_query", "aaaa-allowed-edns", query("API.Allowed.Test.", 28, edns=True))
write("dns_query", "txt-allowed", query("x.allowed.test", 16))
write("dns_query", "a-denied", query("exfil-data.evil.example", 1))
write("dns_query", "chaos-class", query("version.bind", 16, qclass=3))
write("dns_query", "notify-opcode", query("a.allowed.test", 1, flags=0x2000))
write("dns_query", "response-bit", query("a.allowed.test", 1, flags=0x8180))


def rr(owner, rtype, rdata, ttl=60):
    return owner + struct.pack(">HHIH", rtype, 1, ttl, len(rdata)) + rdata


def answer(qn, qtype, records, rcode=0):
    head = struct.pack(">HHHHHH", 0x4242, 0x8180 | rcode, 1, len(records), 0, 0)
    return head + name(qn) + struct.pack(">HH", qtype, 1) + b"".join(records)


write("dns_answer", "a", answer("api.example.com", 1, [rr(b"\xc0\x0c", 1, bytes([93, 184, 216, 34]))]))
write("dns_answer", "cname-chain", answer("api.example.com", 1, [
    rr(b"\xc0\x0c", 5, name("edge.cdn.test")),
    rr(name("edge.cdn.test"), 5, name("node.cdn.test")),
    rr(name("node.cdn.test"), 1, bytes([192, 0, 2, 7]), ttl=30),
    rr(name("other.test"), 1, bytes([192, 0, 2, 8])),
]))
write("dns_answer", "aaaa", answer("api.example.com", 28, [rr(b"\xc0\x0c", 28, bytes(15) + b"\x01")]))
write("dns_answer", "nxdomain", answer("api.example.com", 1, [], rcode=3))
write("dns_answer", "cname-loop", answer("api.example.com", 1, [
    rr(b"\xc0\x0c", 5, name("b.test")), rr(name("b.test"), 5, name("api.example.com")),
]))

# ---- meter: the response bodies of crates/policy/src/meter/tests.rs (first byte: vendor) -----
src = open(os.path.join(ROOT, "crates", "policy", "src", "meter", "tests.rs")).read()


def rust_const(name):
    start = src.index("const " + name)
    body = src[start:src.index(";\n", start)]
    if 'r#"' in body:
        return body[body.index('r#"') + 3:body.rindex('"#')]
    parts = []
    for line in body.splitlines():
        line = line.strip()
        if line.startswith('"'):
            parts.append(json.loads(line.rstrip(",")))
    return "".join(parts)


for i, (const, vendor) in enumerate([("OPENAI_JSON", 0), ("OPENAI_SSE", 0), ("OPENAI_RESPONSES_SSE", 0),
                                     ("ANTHROPIC_JSON", 1), ("ANTHROPIC_SSE", 1)]):
    write("meter_usage", const.lower(), bytes([vendor | (i << 1)]) + rust_const(const).encode())
write("meter_usage", "openai-sse-crlf", b"\x02" + rust_const("OPENAI_SSE").replace("\n", "\r\n").encode())
write("meter_request", "chat", json.dumps({"model": "gpt-4o-mini", "max_tokens": 300, "messages": [{"role": "user", "content": "hi"}]}))
write("meter_request", "responses", json.dumps({"model": "gpt-4o", "max_output_tokens": 50, "input": "hello"}))
write("meter_request", "two-models", '{"model":"gpt-4o-mini","messages":[],"model":"gpt-4o"}')
write("meter_request", "escaped-model", '{"model":"gpt\\u002d4o","max_completion_tokens":7}')

# ---- ledger ------------------------------------------------------------------------------------
export = open(os.path.join(ROOT, "crates", "ledger", "src", "testdata", "v1-export.json"), "rb").read()
write("ledger_verify", "v1-export", export)
doc = json.loads(export)
write("ledger_verify", "v1-export-with-older", export + b"\xff" + doc["checkpoint"].encode())
write("ledger_verify", "attestation-shape", json.dumps({"format": "sluice-attestation/v1", "checkpoint": doc["checkpoint"],
                                                        "record": doc["records"][3]["record"], "index": 3, "proof": []}))
write("ledger_checkpoint", "v1-note", doc["checkpoint"])
root = base64.b64encode(hashlib.sha256(b"x").digest()).decode()
write("ledger_checkpoint", "ours-unsigned", "$ORIGIN\n42\n" + root + "\n\n\u2014 $ORIGIN " + base64.b64encode(bytes(68)).decode() + "\n")
write("ledger_checkpoint", "witness-lines", "$ORIGIN\n7\n" + root + "\n\n\u2014 witness.example " + base64.b64encode(bytes(68)).decode()
      + "\n\u2014 other " + base64.b64encode(bytes(5)).decode() + "\n")

# ---- cel_rules: expressions of crates/decide/src/tests.rs (first byte: decision) -------------
exprs = [
    "request.method == 'DELETE'", "action == 'llm:train'", "request.path.startsWith('/admin')",
    "cost_cents > 1000 && usage.spent_cents + cost_cents > 5000",
    "passport.permissions.exists(p, p == 'llm:*') && now.getDayOfWeek() == 5",
    "'llm:*' in passport.permissions", "cost_cents + 9223372036854775807 > 0", "cost_cents / 0 == 1",
    "[1, 2, 3].map(x, x * 2).all(y, y > 0)", "request.host.matches('^api\\\\.')",
    "(" * 40 + "true" + ")" * 40, "timestamp('2026-05-01T12:00:00Z') < now",
]
for i, e in enumerate(exprs):
    write("cel_rules", "expr-%02d" % i, bytes([i % 2]) + e.encode())


# ---- catalog: a draft and (after 0xff) a served document ----------------------------------------
CATALOG_DRAFT = b"""[[permission]]
key = "shipments:create"
description = "Create a shipment"
risk_level = "medium"
[permission.constraints]
"core:pricing:per_call_cents" = 2.5
"core:pricing:model" = "per_call"
"core:platform_fee:basis_points" = 250
"core:sla:uptime_basis_points" = 9990
"core:sla:response_time_ms" = 800
"core:rate:max_per_minute" = 60
"core:approval:required" = false
"core:cost:approval_threshold" = 100

[[permission]]
key = "rates:read"
description = "Quote a rate"
risk_level = "low"
"""
write("catalog", "draft", CATALOG_DRAFT)
write("catalog", "draft-and-doc", CATALOG_DRAFT + b"\xff" + json.dumps({"catalog": {"gate_id": "gate_x", "version": 1}, "content_hash": "sha256:" + "0" * 64, "catalog_signature": ""}).encode())

# ---- httpsig_headers: the profile's headers (raw mode, byte 0) and requests to sign (byte 1) ---
good_cd = "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"
good_input = ('sluice=("@method" "@target-uri" "content-digest");created=1764650000;'
              'nonce="n0nce-AAAAAAAAAAAAAAAA";keyid="kN0jJ8a7H9h2Uf0uP8hPq1n1wT5bJ0lZl7tGx5M8vCQ";alg="ed25519";tag="sluice"')
good_sig = "sluice=:" + base64.b64encode(bytes(64)).decode() + ":"
for name, (cd, inp, sig) in {
    "profile": (good_cd, good_input, good_sig),
    "white-space": (" " + good_cd + "\t", good_input.replace('" "', '"   "'), good_sig + " "),
    "two-labels": (good_cd + ", sha-512=:AAAA:", good_input + ", sig1=()", good_sig + ", sig1=:AAAA:"),
    "dup-params": (good_cd, good_input + ";created=1", good_sig),
    "rfc-b26": (good_cd, 'sig-b26=("date" "@method" "@path" "@authority" "content-type" "content-length")'
                ';created=1618884473;keyid="test-key-ed25519"',
                "sig-b26=:wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1u02Gb04v9EDgwUPiu4A0w6vuQv5lIp5WPpBKRCw==:"),
}.items():
    write("httpsig_headers", name, b"\x00" + cd.encode() + b"\xff" + inp.encode() + b"\xff" + sig.encode())
write("httpsig_headers", "sign-post", b"\x01POST\xffhttps://api.example.com/v1/orders?id=7\xff{\"qty\":1}")
write("httpsig_headers", "sign-get-empty", b"\x03GET\xffhttps://api.example.com/\xff")
