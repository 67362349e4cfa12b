//! The console's pages, built into the binary: plain HTML, one style sheet, one script. Nothing
//! is fetched from anywhere else at run time, and the Content-Security-Policy says so to the
//! browser: scripts, styles and connections only from the console itself, no inline script, no
//! frames.

pub const INDEX_HTML: &str = include_str!("assets/index.html");
pub const LOGIN_HTML: &str = include_str!("assets/login.html");
pub const CONSOLE_CSS: &str = include_str!("assets/console.css");
pub const CONSOLE_JS: &str = include_str!("assets/console.js");

/// Where the login page says what went wrong (a fixed sentence, never request text).
pub const LOGIN_MESSAGE_SLOT: &str = "<!--message-->";

pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// A static asset by path: (content type, text).
pub fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/assets/console.css" => Some(("text/css; charset=utf-8", CONSOLE_CSS)),
        "/assets/console.js" => Some(("text/javascript; charset=utf-8", CONSOLE_JS)),
        _ => None,
    }
}

/// The login page, with `message` (a fixed sentence) shown above the form.
pub fn login_page(message: Option<&str>) -> String {
    match message {
        Some(m) => LOGIN_HTML.replace(LOGIN_MESSAGE_SLOT, &format!("<p class=\"error\" role=\"alert\">{m}</p>")),
        None => LOGIN_HTML.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pages load nothing from elsewhere and run no inline script, so the strict policy
    /// above holds them whole.
    #[test]
    fn the_pages_reference_only_their_own_assets_and_carry_no_inline_script_or_style() {
        for (name, page) in [("index", INDEX_HTML), ("login", LOGIN_HTML)] {
            assert!(!page.contains("http://") && !page.contains("https://") && !page.contains("//cdn"), "{name}");
            assert!(!page.contains(" style=") && !page.contains("<style"), "{name}: inline style");
            for (i, _) in page.match_indices(" on") {
                let rest: String = page[i + 3..].chars().take_while(|c| c.is_ascii_alphabetic()).collect();
                assert!(!page[i + 3 + rest.len()..].starts_with('='), "{name}: inline event handler on{rest}=");
            }
            for (i, _) in page.match_indices("<script") {
                let tag = &page[i..page[i..].find('>').map_or(page.len(), |e| i + e)];
                assert!(tag.contains("src=\"/assets/"), "{name}: inline script {tag}");
            }
        }
        assert!(LOGIN_HTML.contains(LOGIN_MESSAGE_SLOT));
        assert!(!CONSOLE_JS.contains("eval(") && !CONSOLE_JS.contains("innerHTML") && !CONSOLE_JS.contains("http"));
        assert!(asset("/assets/console.js").is_some() && asset("/assets/../x").is_none());
    }
}
