"""The demo's second agent: a shipping agent that calls a gated API and knows nothing about sluice.

It runs under `sluice run --passport P --key P.key`: it sets no proxy and adds no header; the
daemon signs its requests to the gate with its key. Everything it does is printed as it happens;
the last line is `RESULT {json}` for `cargo xtask demo` to check.

usage: python3 -u demo_gate_agent.py GATE_HOST          browse, book, try a refund
       python3 -u demo_gate_agent.py GATE_HOST again    book once more
"""

import json
import sys
import urllib.error
import urllib.request

BASE = f"https://{sys.argv[1]}"
results = {}


def say(step, text):
    print(f"[{step}] {text}", flush=True)


def call(step, method, path, body=None):
    """One request; returns (status, parsed JSON answer or text)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, raw, decision = r.status, r.read(), r.headers.get("Sluice-Decision")
    except urllib.error.HTTPError as e:
        status, raw, decision = e.code, e.read(), e.headers.get("Sluice-Decision")
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = raw[:200].decode(errors="replace")
    # The header is the daemon's decision: "allow" when it let the request out (a refusal is then
    # the gate's), "block" when the daemon refused it on this host.
    say(step, f"{status}; Sluice-Decision (the daemon's): {decision}")
    # "block; reason=…; attestation=N": the decision is the first item.
    decision = decision.split(";")[0].strip() if decision else decision
    if isinstance(answer, dict) and "decision" in answer:
        who = "the daemon" if decision == "block" else "the gate"
        say(step, f"  {who}'s answer: {answer['decision']} {answer.get('reason')}: {answer.get('detail')}")
    else:
        say(step, f"  {json.dumps(answer)[:300]}")
    return status, answer, decision


if sys.argv[2:] == ["again"]:
    say("n", f"POST {BASE}/v1/shipments: book another shipment, after the price went up")
    status, answer, _ = call("n", "POST", "/v1/shipments", {"to": "Nantes", "parcel_kg": 1})
    print("RESULT " + json.dumps({"n": status}), flush=True)
    sys.exit(0)


say("h", f"GET {BASE}/v1/rates: browse the public rates")
status, _, _ = call("h", "GET", "/v1/rates")
results["h"] = status

say("i", f"POST {BASE}/v1/shipments: book a shipment (needs shipments:create, which the passport grants)")
status, answer, _ = call("i", "POST", "/v1/shipments", {"to": "Lyon", "parcel_kg": 2})
results["i"] = status

say("j", f"POST {BASE}/v1/refunds: issue a refund (needs refunds:create, which the passport does not grant)")
status, answer, decision = call("j", "POST", "/v1/refunds", {"shipment": "shp_1", "amount_cents": 1200})
results["j"] = [status, answer.get("reason") if isinstance(answer, dict) else None, decision]

print("RESULT " + json.dumps(results), flush=True)
