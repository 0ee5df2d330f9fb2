//! The `alerts.webhook` URL. Webhook URLs are credentials (Slack's carries its
//! token in the path, others in the query), so this type only ever shows its
//! origin — scheme, host and port — in Debug, Display and errors. Only the
//! webhook sink reads the full URL, to send the request.

use std::fmt;

use reqwest::Url;

/// An http(s) URL with a host, printed as its origin only.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookUrl(Url);

impl WebhookUrl {
    /// Parses `text`. The error never repeats `text`: it may hold a token.
    pub fn parse(text: &str) -> Result<Self, String> {
        let hint = "use an http(s) URL like `https://hooks.slack.com/services/...`";
        let url = Url::parse(text.trim()).map_err(|e| format!("not a valid URL ({e}); {hint}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "the scheme must be `http` or `https`, not `{}`; {hint}",
                url.scheme()
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("the URL has no host; {hint}"));
        }
        Ok(Self(url))
    }

    /// The full URL, token included: for the request only, never for a message.
    pub(crate) fn expose(&self) -> &Url {
        &self.0
    }

    /// `scheme://host[:port]`, safe to log.
    pub fn origin(&self) -> String {
        let host = self.0.host_str().unwrap_or("?");
        match self.0.port() {
            Some(port) => format!("{}://{host}:{port}", self.0.scheme()),
            None => format!("{}://{host}", self.0.scheme()),
        }
    }
}

impl fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin())
    }
}

impl fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookUrl({}/[REDACTED])", self.origin())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "T000/B000/XXXXSECRETXXXX";

    #[test]
    fn shows_only_the_origin() {
        let cases = [
            (
                format!("https://hooks.slack.com/services/{TOKEN}"),
                "https://hooks.slack.com",
            ),
            (
                format!("http://127.0.0.1:9000/hook?token={TOKEN}"),
                "http://127.0.0.1:9000",
            ),
            (
                "https://user:XXXXSECRETXXXX@example.com/x".to_owned(),
                "https://example.com",
            ),
        ];
        for (text, origin) in cases {
            let url = WebhookUrl::parse(&text).unwrap();
            assert_eq!(url.origin(), origin);
            assert_eq!(url.to_string(), origin);
            let debug = format!("{url:?}");
            assert!(!debug.contains("SECRET"), "{debug}");
            assert!(
                debug.starts_with(&format!("WebhookUrl({origin}")),
                "{debug}"
            );
            assert_eq!(url.expose().as_str(), text);
        }
    }

    #[test]
    fn refusals_never_repeat_the_url() {
        let cases = [
            (format!("hooks.slack.com/{TOKEN}"), "not a valid URL"),
            (
                format!("ftp://example.com/{TOKEN}"),
                "the scheme must be `http` or `https`, not `ftp`",
            ),
            (format!("file:///{TOKEN}"), "the scheme must be"),
            (format!("http://[::1/{TOKEN}"), "not a valid URL"),
        ];
        for (text, want) in cases {
            let err = WebhookUrl::parse(&text).unwrap_err();
            assert!(err.starts_with(want), "{text}: {err}");
            assert!(!err.contains("SECRET"), "{err}");
            assert!(
                err.contains("https://hooks.slack.com/services/..."),
                "{err}"
            );
        }
    }
}
