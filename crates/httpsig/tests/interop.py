"""An independent implementation of sluice's HTTP message signature profile, for
python_interop.rs: Python's hashlib and base64, the `cryptography` package's Ed25519, and the
RFC 9421 signature base built by hand from the RFC's text, not from the Rust code.

Reads one JSON object per line on stdin and writes one per line on stdout:
  {"op": "sign", "seed": hex, "method", "uri", "body": hex, "created", "nonce", "keyid"}
    -> {"content_digest", "signature_input", "signature", "request_hash"}
  {"op": "verify", "public": hex, "method", "uri", "body": hex,
   "content_digest", "signature_input", "signature"}
    -> {"ok": true, "request_hash", "created", "nonce", "keyid"} or {"ok": false, "why"}
"""
import base64, hashlib, json, re, sys
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

COMPONENTS = '("@method" "@target-uri" "content-digest")'


def digest(body):
    return "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"


def base(method, uri, content_digest, params):
    # RFC 9421 2.5: one line per covered component, then @signature-params; no final newline.
    return "\n".join([
        '"@method": ' + method,
        '"@target-uri": ' + uri,
        '"content-digest": ' + content_digest,
        '"@signature-params": ' + params,
    ])


def sign(m):
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(m["seed"]))
    cd = digest(bytes.fromhex(m["body"]))
    params = COMPONENTS + ';created=%d;nonce="%s";keyid="%s";alg="ed25519";tag="sluice"' % (
        m["created"], m["nonce"], m["keyid"])
    b = base(m["method"], m["uri"], cd, params).encode()
    sig = base64.b64encode(key.sign(b)).decode()
    return {"content_digest": cd, "signature_input": "sluice=" + params,
            "signature": "sluice=:" + sig + ":", "request_hash": hashlib.sha256(b).hexdigest()}


PARAMS = re.compile(r'^sluice=(\("@method" "@target-uri" "content-digest"\)'
                    r';created=(\d+);nonce="([^"\\]*)";keyid="([^"\\]*)";alg="ed25519";tag="sluice")$')


def verify(m):
    if m["content_digest"] != digest(bytes.fromhex(m["body"])):
        return {"ok": False, "why": "content-digest does not match the body"}
    p = PARAMS.match(m["signature_input"])
    if not p:
        return {"ok": False, "why": "signature-input is not the profile's"}
    s = re.match(r"^sluice=:([A-Za-z0-9+/=]+):$", m["signature"])
    if not s:
        return {"ok": False, "why": "signature is not sluice=:b64:"}
    b = base(m["method"], m["uri"], m["content_digest"], p.group(1)).encode()
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(m["public"])).verify(base64.b64decode(s.group(1)), b)
    except InvalidSignature:
        return {"ok": False, "why": "signature invalid"}
    return {"ok": True, "request_hash": hashlib.sha256(b).hexdigest(), "created": int(p.group(2)),
            "nonce": p.group(3), "keyid": p.group(4)}


for line in sys.stdin:
    m = json.loads(line)
    sys.stdout.write(json.dumps(sign(m) if m["op"] == "sign" else verify(m)) + "\n")
