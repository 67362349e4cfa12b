//! Passport templates: ready permissions and constraints for common agents, built into the
//! binary from `policies/templates/*.toml` (so they work from a package install), listed by
//! `sluice passport templates` and used by `sluice passport issue --template NAME`.
//!
//! A template is strict TOML: `description` (one line), `permissions` (a non-empty list) and a
//! `[constraints]` table whose keys and values are exactly those of `--constraints-file` (the
//! passport's `core:` constraints, checked by the same parser when the passport is issued).

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Every shipped template: (name, TOML text).
const SHIPPED: &[(&str, &str)] = &[
    ("llm-researcher", include_str!("../../../policies/templates/llm-researcher.toml")),
    ("web-readonly", include_str!("../../../policies/templates/web-readonly.toml")),
    ("internal-tools", include_str!("../../../policies/templates/internal-tools.toml")),
];

/// One parsed template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub name: &'static str,
    pub description: String,
    pub permissions: Vec<String>,
    /// The constraints as `--constraints-file` JSON (validated when a passport is issued).
    pub constraints: Map<String, Value>,
    /// The file as shipped (comments included), for `sluice passport templates NAME`.
    pub text: &'static str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    description: String,
    permissions: Vec<String>,
    #[serde(default)]
    constraints: toml::Table,
}

impl Template {
    fn parse(name: &'static str, text: &'static str) -> anyhow::Result<Template> {
        let raw: Raw = toml::from_str(text).with_context(|| format!("template {name}"))?;
        if raw.description.trim().is_empty() || raw.description.contains('\n') {
            bail!("template {name}: description must be one non-empty line");
        }
        if raw.permissions.is_empty() {
            bail!("template {name}: permissions must not be empty");
        }
        let constraints = match serde_json::to_value(&raw.constraints)? {
            Value::Object(m) => m,
            _ => bail!("template {name}: [constraints] must be a table"),
        };
        Ok(Template { name, description: raw.description, permissions: raw.permissions, constraints, text })
    }
}

/// Every shipped template, in a fixed order.
pub fn all() -> anyhow::Result<Vec<Template>> {
    SHIPPED.iter().map(|(name, text)| Template::parse(name, text)).collect()
}

/// The template called `name`; an unknown name is an error listing the known ones.
pub fn named(name: &str) -> anyhow::Result<Template> {
    match SHIPPED.iter().find(|(n, _)| *n == name) {
        Some((n, text)) => Template::parse(n, text),
        None => {
            let known: Vec<&str> = SHIPPED.iter().map(|(n, _)| *n).collect();
            bail!(
                "--template {name:?}: no such template; the templates are {} (`sluice passport templates`)",
                known.join(", ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{self, ActionRequest, CompiledPassport, Decision, EvalOptions, HostVerdict, Reason, Usage};
    use crate::domain::DomainName;
    use crate::passport::{self, Constraints, IssueRequest, IssuerId, NoRevocations, Permission, TrustTier, Verifier};
    use ed25519_dalek::SigningKey;

    /// Issues and verifies a passport from `t` (its permissions and constraints as they are).
    fn issued(t: &Template) -> CompiledPassport {
        let issuer = SigningKey::from_bytes(&[11u8; 32]);
        let permissions = t.permissions.iter().map(|p| Permission::parse(p).expect("permission")).collect();
        let constraints = Constraints::from_json(&t.constraints).unwrap_or_else(|e| panic!("{}: {e}", t.name));
        let now = passport::now();
        let issued = passport::issue(
            IssueRequest {
                agent_id: format!("{}-agent", t.name),
                agent_name: None,
                permissions,
                constraints,
                trust_tier: TrustTier::L2,
                lifetime_secs: 3600,
                now,
            },
            &issuer,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", t.name));
        let pinned = [IssuerId::from_key(&issuer.verifying_key())];
        let verified = Verifier::new(&pinned, &NoRevocations).verify(&issued.token, now).expect("verifies");
        CompiledPassport::compile(verified).expect("rules compile")
    }

    fn request(action: &str, cents: u64, host: &str, method: &str) -> ActionRequest {
        ActionRequest {
            action: action.into(),
            cost_millicents: cents * 1000,
            host: Some(DomainName::parse(host).expect("host")),
            method: Some(method.into()),
            path: Some("/".into()),
        }
    }

    fn decided(cp: &CompiledPassport, req: &ActionRequest) -> (Decision, Reason) {
        let opts = EvalOptions { skip_approval: false, host_rules: None };
        let e = decide::evaluate(cp, &Usage::default(), req, &HostVerdict::Allow, chrono::Utc::now(), opts);
        (e.decision, e.reason)
    }

    #[test]
    fn every_template_parses_and_issues_a_passport_that_verifies() {
        let all = all().expect("templates parse");
        let names: Vec<&str> = all.iter().map(|t| t.name).collect();
        assert_eq!(names, ["llm-researcher", "web-readonly", "internal-tools"]);
        for t in &all {
            assert!(t.text.contains(&t.description), "{}", t.name);
            let cp = issued(t);
            assert_eq!(
                cp.passport.claims.constraints.to_json(),
                Constraints::from_json(&t.constraints).unwrap().to_json()
            );
        }
    }

    #[test]
    fn llm_researcher_allows_an_llm_call_holds_one_above_its_threshold_and_refuses_other_hosts() {
        let cp = issued(&named("llm-researcher").unwrap());
        assert_eq!(decided(&cp, &request("llm:chat", 3, "api.openai.com", "POST")), (Decision::Allow, Reason::Allowed));
        assert_eq!(decided(&cp, &request("llm:chat", 3, "api.anthropic.com", "POST")).0, Decision::Allow);
        assert_eq!(decided(&cp, &request("llm:chat", 150, "api.openai.com", "POST")).0, Decision::RequestHold);
        assert_eq!(decided(&cp, &request("llm:chat", 600, "api.openai.com", "POST")).0, Decision::Block);
        assert_eq!(
            decided(&cp, &request("llm:chat", 1, "api.evil.example", "POST")),
            (Decision::Block, Reason::DomainNotAllowed)
        );
        assert_eq!(decided(&cp, &request("web:fetch", 0, "api.openai.com", "GET")).1, Reason::PermissionDenied);
    }

    /// The template's hosts are the shipped policies' services, and those policies route chat to
    /// an action the template grants: they cannot drift apart unnoticed.
    #[test]
    fn llm_researcher_hosts_are_the_shipped_llm_policies() {
        let policies = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let set = crate::policy::PolicySet::load_dir(&policies).expect("shipped policies load");
        let t = named("llm-researcher").unwrap();
        let hosts: Vec<&str> = t.constraints["core:scope:domain_allowlist"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(hosts, ["api.openai.com", "api.anthropic.com"]);
        let grant = Permission::parse("llm:*").unwrap();
        for (host, chat) in [("api.openai.com", "/v1/chat/completions"), ("api.anthropic.com", "/v1/messages")] {
            let routed = set.route(&DomainName::parse(host).unwrap(), "POST", chat);
            assert!(routed.service.is_some(), "no shipped policy claims {host}");
            assert!(grant.covers(&routed.action), "{host}{chat} is {}, which llm:* does not grant", routed.action);
        }
        assert!(t.permissions.iter().any(|p| p == grant.as_str()));
    }

    #[test]
    fn web_readonly_fetches_but_never_sends_or_spends() {
        let cp = issued(&named("web-readonly").unwrap());
        assert_eq!(decided(&cp, &request("web:fetch", 0, "docs.example.com", "GET")).0, Decision::Allow);
        assert_eq!(decided(&cp, &request("web:send", 0, "docs.example.com", "POST")).1, Reason::PermissionDenied);
        assert_eq!(decided(&cp, &request("llm:chat", 1, "api.openai.com", "POST")).1, Reason::PermissionDenied);
        assert_eq!(decided(&cp, &request("web:fetch", 1, "docs.example.com", "GET")).0, Decision::Block);
    }

    #[test]
    fn internal_tools_reads_and_holds_every_write() {
        let cp = issued(&named("internal-tools").unwrap());
        assert_eq!(decided(&cp, &request("web:fetch", 0, "wiki.tools.internal", "GET")).0, Decision::Allow);
        let (d, r) = decided(&cp, &request("web:send", 0, "wiki.tools.internal", "POST"));
        assert_eq!((d, r.as_str()), (Decision::RequestHold, "internal_write"));
        assert_eq!(decided(&cp, &request("web:fetch", 0, "example.com", "GET")).1, Reason::DomainNotAllowed);
    }

    #[test]
    fn an_unknown_template_names_the_known_ones() {
        let e = named("nope").unwrap_err().to_string();
        assert!(e.contains("llm-researcher, web-readonly, internal-tools"), "{e}");
    }

    #[test]
    fn templates_are_strict() {
        for bad in [
            "description = \"x\"\npermissions = [\"llm:*\"]\nextra = 1\n",
            "description = \"x\"\npermissions = []\n",
            "description = \"\"\npermissions = [\"llm:*\"]\n",
            "permissions = [\"llm:*\"]\n",
        ] {
            assert!(Template::parse("bad", bad).is_err(), "{bad:?} accepted");
        }
    }
}
