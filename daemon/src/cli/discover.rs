//! `sluice discover https://HOST[:PORT]`: the daemon fetches a gate's catalog through its own
//! upstream path, verifies it (signatures, version chain, the inclusion proof of the version in
//! force, the log's consistency with what it pinned) and pins it; this prints the offer.

use super::ops::{call, ApiSocket};
use super::CmdResult;
use clap::Args;
use http::Method;
use serde_json::{json, Value};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct DiscoverArgs {
    /// The gate's origin: https://HOST or https://HOST:PORT.
    #[arg(value_name = "URL")]
    url: String,
    /// Print the verified offer as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: DiscoverArgs, socket: &ApiSocket) -> CmdResult {
    let offer = call(socket, Method::POST, "/v1/gates/discover", Some(json!({ "url": a.url })))?;
    if a.json {
        super::util::print_json(&offer);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", table(&offer));
    Ok(ExitCode::SUCCESS)
}

fn opt(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The offer as text: who, what was pinned, then one line per permission and the routes.
pub fn table(o: &Value) -> String {
    let mut out = String::new();
    out.push_str(&format!("gate {} ({}) at {}\n", opt(&o["host"]), opt(&o["name"]), opt(&o["url"])));
    out.push_str(&format!("gate id {}\n", opt(&o["gate_id"])));
    if o["first_use"] == true {
        out.push_str(
            "trust on first use: this gate key is now pinned for this host; later fetches must show the same key, \
             no older catalog and a log that extends this one (pin it ahead in [gates] pins to skip first use)\n",
        );
    }
    if o["catalog"] != true {
        out.push_str("the gate declares no catalog: its requests are not priced\n");
        return out;
    }
    out.push_str(&format!(
        "catalog version {} ({}), effective {}, minimum passport tier {}, verified in the gate's log (checkpoint of {} records)\n",
        opt(&o["catalog_version"]),
        opt(&o["content_hash"]),
        opt(&o["effective_at"]),
        opt(&o["trust_level"]),
        opt(&o["checkpoint_size"])
    ));
    out.push_str(&format!(
        "{:<32} {:>14} {:>9} {:>9} {:>9} {}\n",
        "PERMISSION", "PRICE (¢, FEE)", "UPTIME", "LATENCY", "RATE/MIN", "APPROVAL"
    ));
    for p in o["permissions"].as_array().into_iter().flatten() {
        let uptime = p["uptime_basis_points"].as_u64().map_or("-".into(), |b| format!("{}.{:02}%", b / 100, b % 100));
        let latency = p["response_time_ms"].as_u64().map_or("-".into(), |m| format!("{m} ms"));
        let approval = match (p["approval_required"].as_bool(), p["approval_threshold_millicents"].as_u64()) {
            (Some(true), _) => "always".to_string(),
            (_, Some(t)) => format!("above {}¢", crate::money::cents_text(t)),
            _ => "no".to_string(),
        };
        out.push_str(&format!(
            "{:<32} {:>14} {:>9} {:>9} {:>9} {}\n",
            opt(&p["permission"]),
            opt(&p["price_cents"]),
            uptime,
            latency,
            opt(&p["rate_max_per_minute"]),
            approval
        ));
    }
    out.push_str("prices include the platform fee; routes (first match wins; otherwise web:fetch for GET, HEAD, OPTIONS and web:send):\n");
    for r in o["routes"].as_array().into_iter().flatten() {
        out.push_str(&format!("  {:<8} {:<40} -> {}\n", opt(&r["method"]), opt(&r["path"]), opt(&r["permission"])));
    }
    out
}
