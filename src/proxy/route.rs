//! The proxy's allow-list: turns the request-target an agent sent into one
//! canonical path, matches it against a table of exact routes, and builds the
//! upstream URL from that canonical path alone, so what was checked is
//! byte for byte what is forwarded.
//!
//! Pure: no I/O, no logging. It must not let through anything an upstream
//! server could read as another path: dot segments in any encoding, encoded
//! or raw slashes and backslashes inside a segment, percent-escapes outside
//! the unreserved set (so no double encoding), `;` parameters, and any
//! character outside a small safe set are refused here, never normalised
//! into something that passes.

use hyper::Method;

use super::refusal::Api;
use super::usage::ApiKind;

/// Longest request path considered at all (bytes, as sent).
pub const MAX_PATH: usize = 1024;
/// Longest model id in `/v1/models/{id}` (bytes, decoded).
pub const MAX_MODEL_ID: usize = 256;

/// What an allowed request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// A metered model call (`POST`).
    Metered(ApiKind),
    /// Anthropic's free `POST /v1/messages/count_tokens`.
    CountTokens,
    /// `GET /v1/models`.
    Models,
    /// `GET /v1/models/{id}`.
    Model,
}

/// An allowed request: its endpoint and the canonical path to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub endpoint: Endpoint,
    /// Starts with `/`; only `/` and [`is_safe`] characters; no dot segment.
    pub path: String,
}

/// Why a path is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The path could be read differently upstream, or is not a plain path
    /// (400).
    Malformed(String),
    /// A plain path, but not one of the routes the proxy forwards (404).
    NotRouted,
}

/// Characters a canonical segment may hold: RFC 3986 unreserved ones plus
/// `:` and `@`, which model ids use (`ft:gpt-4o-mini:org::abc`,
/// `claude-3-5-sonnet@20240620`). Nothing here means anything to a path
/// parser.
pub fn is_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':' | b'@')
}

/// The canonical segments of `raw` (a request path without its query):
/// percent-escapes of [`is_safe`] characters decoded, empty segments (duplicate or trailing
/// slashes) dropped; everything ambiguous refused.
pub fn canonical_segments(raw: &str) -> Result<Vec<String>, String> {
    if raw.len() > MAX_PATH {
        return Err(format!("it is longer than {MAX_PATH} bytes"));
    }
    let Some(rest) = raw.strip_prefix('/') else {
        return Err("it does not start with `/`".to_owned());
    };
    let mut segments = Vec::new();
    for segment in rest.split('/') {
        if segment.is_empty() {
            continue;
        }
        let decoded = decode_segment(segment)?;
        if decoded.bytes().all(|b| b == b'.') {
            return Err(
                "it has a dot segment (`.` or `..`, in any encoding), which an upstream server would resolve to another path".to_owned(),
            );
        }
        segments.push(decoded);
    }
    Ok(segments)
}

fn decode_segment(segment: &str) -> Result<String, String> {
    let bytes = segment.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let byte = bytes
                .get(i + 1..i + 3)
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .filter(|hex| hex.bytes().all(|h| h.is_ascii_hexdigit()))
                .and_then(|hex| u8::from_str_radix(hex, 16).ok());
            let Some(byte) = byte else {
                return Err(
                    "it has a broken percent-escape (`%` not followed by two hex digits)"
                        .to_owned(),
                );
            };
            if !is_safe(byte) {
                return Err(match byte {
                    b'/' => "it has an encoded slash (`%2F`) inside a segment".to_owned(),
                    b'\\' => "it has an encoded backslash (`%5C`)".to_owned(),
                    b'%' => "it is percent-encoded twice (`%25`)".to_owned(),
                    _ => format!(
                        "it has a percent-escape (`%{byte:02X}`) of a character the proxy does not forward in a path"
                    ),
                });
            }
            out.push(char::from(byte));
            i += 3;
            continue;
        }
        if !is_safe(b) {
            return Err(match b {
                b'\\' => "it has a backslash, which some servers read as `/`".to_owned(),
                b';' => "it has a `;` parameter".to_owned(),
                0x21..=0x7e => format!(
                    "it has a character (`{}`) the proxy does not forward in a path",
                    char::from(b)
                ),
                _ => "it has a byte outside printable ASCII".to_owned(),
            });
        }
        out.push(char::from(b));
        i += 1;
    }
    Ok(out)
}

/// Resolves a request: `raw_path` is the path as the agent sent it (without
/// the query), `api` the dialect of the agent's provider. Route literals
/// match without regard to ASCII case and are forwarded lower-case; a model
/// id is forwarded as sent (decoded), in one segment.
pub fn resolve(api: Api, method: &Method, raw_path: &str) -> Result<Resolved, Refused> {
    let segments = canonical_segments(raw_path).map_err(Refused::Malformed)?;
    let literal = |i: usize, want: &str| {
        segments
            .get(i)
            .is_some_and(|s| s.eq_ignore_ascii_case(want))
    };
    let is = |want: &[&str]| {
        segments.len() == want.len() && want.iter().enumerate().all(|(i, w)| literal(i, w))
    };
    let fixed = |endpoint: Endpoint, want: &[&str]| Resolved {
        endpoint,
        path: format!("/{}", want.join("/")),
    };
    let post = method == Method::POST;
    let get = method == Method::GET;
    let resolved = match api {
        Api::Anthropic if post && is(&["v1", "messages"]) => {
            fixed(Endpoint::Metered(ApiKind::Anthropic), &["v1", "messages"])
        }
        Api::Anthropic if post && is(&["v1", "messages", "count_tokens"]) => {
            fixed(Endpoint::CountTokens, &["v1", "messages", "count_tokens"])
        }
        Api::OpenAi if post && is(&["v1", "chat", "completions"]) => fixed(
            Endpoint::Metered(ApiKind::OpenAiChat),
            &["v1", "chat", "completions"],
        ),
        Api::OpenAi if post && is(&["v1", "responses"]) => fixed(
            Endpoint::Metered(ApiKind::OpenAiResponses),
            &["v1", "responses"],
        ),
        _ if get && is(&["v1", "models"]) => fixed(Endpoint::Models, &["v1", "models"]),
        _ if get && segments.len() == 3 && literal(0, "v1") && literal(1, "models") => {
            let id = &segments[2];
            if id.len() > MAX_MODEL_ID {
                return Err(Refused::Malformed(format!(
                    "its model id is longer than {MAX_MODEL_ID} bytes"
                )));
            }
            Resolved {
                endpoint: Endpoint::Model,
                path: format!("/v1/models/{id}"),
            }
        }
        _ => return Err(Refused::NotRouted),
    };
    Ok(resolved)
}

/// The routes that pass for `api`, for refusal messages.
pub fn routes_for(api: Api) -> &'static str {
    match api {
        Api::Anthropic => {
            "`POST /v1/messages`, `POST /v1/messages/count_tokens`, `GET /v1/models` and `GET /v1/models/{id}`"
        }
        Api::OpenAi => {
            "`POST /v1/chat/completions`, `POST /v1/responses`, `GET /v1/models` and `GET /v1/models/{id}`"
        }
    }
}

/// Error shape to use before the agent is known: by the path it called.
pub fn shape_of(raw_path: &str) -> Api {
    let anthropic = raw_path
        .get(..12)
        .is_some_and(|p| p.eq_ignore_ascii_case("/v1/messages"));
    if anthropic {
        Api::Anthropic
    } else {
        Api::OpenAi
    }
}

/// A path for a refusal message: at most 120 bytes of it.
pub fn shown(raw_path: &str) -> String {
    const SHOWN: usize = 120;
    if raw_path.len() <= SHOWN {
        return raw_path.to_owned();
    }
    let mut end = SHOWN;
    while !raw_path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &raw_path[..end], raw_path.len())
}

/// The upstream URL: `origin` with exactly `path` and the agent's `query`.
/// Fails (rather than forwarding something else) if the URL type would
/// change the path; a canonical path never gives it a reason to.
pub fn upstream_url(
    origin: &reqwest::Url,
    path: &str,
    query: Option<&str>,
) -> Result<reqwest::Url, String> {
    let mut url = origin.clone();
    url.set_path(path);
    url.set_query(query);
    if url.path() != path {
        return Err(format!(
            "the upstream URL would change the checked path `{path}` to `{}`",
            url.path()
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Api = Api::Anthropic;
    const O: Api = Api::OpenAi;

    enum Want {
        Pass(Endpoint, &'static str),
        Bad(&'static str),
        NotRouted,
    }
    use Want::*;

    fn get() -> Method {
        Method::GET
    }
    fn post() -> Method {
        Method::POST
    }

    #[test]
    fn the_route_table() {
        let chat = Endpoint::Metered(ApiKind::OpenAiChat);
        let messages = Endpoint::Metered(ApiKind::Anthropic);
        let responses = Endpoint::Metered(ApiKind::OpenAiResponses);
        let dot = "dot segment";
        #[rustfmt::skip]
        let cases: Vec<(Api, Method, &str, Want)> = vec![
            // plain routes
            (A, post(), "/v1/messages", Pass(messages, "/v1/messages")),
            (A, post(), "/v1/messages/count_tokens", Pass(Endpoint::CountTokens, "/v1/messages/count_tokens")),
            (O, post(), "/v1/chat/completions", Pass(chat, "/v1/chat/completions")),
            (O, post(), "/v1/responses", Pass(responses, "/v1/responses")),
            (A, get(), "/v1/models", Pass(Endpoint::Models, "/v1/models")),
            (O, get(), "/v1/models", Pass(Endpoint::Models, "/v1/models")),
            (A, get(), "/v1/models/claude-sonnet-4-5-20250929", Pass(Endpoint::Model, "/v1/models/claude-sonnet-4-5-20250929")),
            (O, get(), "/v1/models/gpt-4.1", Pass(Endpoint::Model, "/v1/models/gpt-4.1")),
            (O, get(), "/v1/models/ft:gpt-4o-mini:org::abc", Pass(Endpoint::Model, "/v1/models/ft:gpt-4o-mini:org::abc")),
            (O, get(), "/v1/models/ft%3Agpt-4o-mini%3aorg%3A%3Aabc", Pass(Endpoint::Model, "/v1/models/ft:gpt-4o-mini:org::abc")),
            (A, get(), "/v1/models/claude-3-5-sonnet%4020240620", Pass(Endpoint::Model, "/v1/models/claude-3-5-sonnet@20240620")),
            (A, get(), "/v1/models/claude-3-5-sonnet@20240620", Pass(Endpoint::Model, "/v1/models/claude-3-5-sonnet@20240620")),
            (O, get(), "/v1/models/llama3.1:8b", Pass(Endpoint::Model, "/v1/models/llama3.1:8b")),
            (O, get(), "/v1/models/a...b", Pass(Endpoint::Model, "/v1/models/a...b")),
            (O, get(), "/v1/models/.hidden", Pass(Endpoint::Model, "/v1/models/.hidden")),
            // trailing, duplicate and empty segments collapse
            (O, post(), "/v1/chat/completions/", Pass(chat, "/v1/chat/completions")),
            (A, post(), "//v1//messages", Pass(messages, "/v1/messages")),
            (A, get(), "/v1/models/", Pass(Endpoint::Models, "/v1/models")),
            (A, get(), "/v1///models//x//", Pass(Endpoint::Model, "/v1/models/x")),
            // case: literals are matched case-blind and forwarded lower-case; ids as sent
            (A, post(), "/V1/MESSAGES", Pass(messages, "/v1/messages")),
            (O, get(), "/V1/Models/GPT-4.1", Pass(Endpoint::Model, "/v1/models/GPT-4.1")),
            // unreserved escapes decode, in either hex case
            (A, post(), "/v1/%6Dessages", Pass(messages, "/v1/messages")),
            (A, post(), "/v1/%6dessages", Pass(messages, "/v1/messages")),
            (O, get(), "/v1/models/gpt%2D4%2e1", Pass(Endpoint::Model, "/v1/models/gpt-4.1")),
            (O, get(), "/%76%31/%6d%6f%64%65%6c%73", Pass(Endpoint::Models, "/v1/models")),
            // dot segments, in every encoding and position
            (A, get(), "/v1/models/../../v1/organizations/api_keys", Bad(dot)),
            (A, get(), "/v1/models/..", Bad(dot)),
            (A, get(), "/v1/models/.", Bad(dot)),
            (A, get(), "/v1/models/./x", Bad(dot)),
            (A, post(), "/v1/./messages", Bad(dot)),
            (A, post(), "/./v1/messages", Bad(dot)),
            (A, post(), "/v1/messages/.", Bad(dot)),
            (A, post(), "/v1/messages/..", Bad(dot)),
            (A, get(), "/v1/models/%2e%2e/files/file_1/content", Bad(dot)),
            (A, get(), "/v1/models/%2E%2E/files/file_1/content", Bad(dot)),
            (A, get(), "/v1/models/.%2E/files", Bad(dot)),
            (A, get(), "/v1/models/.%2e/files", Bad(dot)),
            (A, get(), "/v1/models/%2e./files", Bad(dot)),
            (A, get(), "/v1/models/%2E./files", Bad(dot)),
            (A, get(), "/v1/models/%2e", Bad(dot)),
            (A, get(), "/v1/models/...", Bad(dot)),
            (O, get(), "/v1/models/%2e%2e%2e", Bad(dot)),
            (O, get(), "/v1/models/..;/x", Bad("`;`")),
            // double encoding is refused, not decoded twice
            (A, get(), "/v1/models/%252e%252e/files", Bad("twice")),
            (A, get(), "/v1/models/%252E%252E", Bad("twice")),
            (A, get(), "/v1/models/%25", Bad("twice")),
            // encoded and raw slashes and backslashes
            (O, get(), "/v1/models/Qwen%2FQwen2.5-7B", Bad("encoded slash")),
            (O, get(), "/v1/models/..%2f..%2fv1%2ffiles", Bad("encoded slash")),
            (O, get(), "/v1/models/%2F", Bad("encoded slash")),
            (O, get(), "/v1/models/a%5cb", Bad("encoded backslash")),
            (O, get(), "/v1/models/..\\..\\files", Bad("backslash")),
            (O, get(), "/v1\\models", Bad("backslash")),
            (O, get(), "/v1/models/Qwen/Qwen2.5-7B", NotRouted),
            // broken escapes, other escapes and characters
            (O, get(), "/v1/models/%", Bad("broken percent-escape")),
            (O, get(), "/v1/models/%2", Bad("broken percent-escape")),
            (O, get(), "/v1/models/%zz", Bad("broken percent-escape")),
            (O, get(), "/v1/models/a%00b", Bad("`%00`")),
            (O, get(), "/v1/models/a%20b", Bad("`%20`")),
            (O, get(), "/v1/models/%3F", Bad("`%3F`")),
            (O, get(), "/v1/models/%23", Bad("`%23`")),
            (O, get(), "/v1/models/caf%C3%A9", Bad("`%C3`")),
            (O, get(), "/v1/models/café", Bad("outside printable ASCII")),
            (O, get(), "/v1/models/a b", Bad("outside printable ASCII")),
            (O, get(), "/v1/models/a\tb", Bad("outside printable ASCII")),
            (O, get(), "/v1/models/a+b", Bad("`+`")),
            (O, get(), "/v1/models/a\"b", Bad("`\"`")),
            (O, get(), "/v1/models/{id}", Bad("`{`")),
            (O, get(), "/v1/models/a;b", Bad("`;`")),
            (A, post(), "/v1/messages;x=1", Bad("`;`")),
            // not a plain origin-form path
            (O, get(), "*", Bad("start with `/`")),
            (O, get(), "", Bad("start with `/`")),
            (O, get(), "v1/models", Bad("start with `/`")),
            // prefixes and neighbours of routes do not pass
            (A, get(), "/v1/models/x/y", NotRouted),
            (A, get(), "/v1/models/x/../../organizations", Bad(dot)),
            (A, get(), "/v1/modelsx", NotRouted),
            (A, get(), "/v1/models-x", NotRouted),
            (A, post(), "/v1/messages/batches", NotRouted),
            (A, get(), "/v1/messages/batches/msgbatch_1/results", NotRouted),
            (A, post(), "/v1/messages/count_tokens/x", NotRouted),
            (A, get(), "/v1/files/file_1/content", NotRouted),
            (A, get(), "/v1/organizations/api_keys", NotRouted),
            (O, get(), "/v1/responses/resp_1", NotRouted),
            (O, post(), "/v1/chat/completions/x", NotRouted),
            (O, get(), "/v1", NotRouted),
            (O, get(), "/", NotRouted),
            (O, get(), "//", NotRouted),
            // routes belong to one dialect and one method
            (O, post(), "/v1/messages", NotRouted),
            (A, post(), "/v1/chat/completions", NotRouted),
            (A, post(), "/v1/responses", NotRouted),
            (O, post(), "/v1/messages/count_tokens", NotRouted),
            (A, get(), "/v1/messages", NotRouted),
            (O, get(), "/v1/chat/completions", NotRouted),
            (A, post(), "/v1/models", NotRouted),
            (A, Method::DELETE, "/v1/models/x", NotRouted),
            (O, Method::HEAD, "/v1/models", NotRouted),
        ];
        let long_id = format!("/v1/models/{}", "a".repeat(MAX_MODEL_ID));
        let longer_id = format!("/v1/models/{}", "a".repeat(MAX_MODEL_ID + 1));
        let long_path = format!("/v1/models{}", "/".repeat(MAX_PATH));
        let long_dots = format!("/v1/messages{}", "/.".repeat(400));
        let mut failures = Vec::new();
        let mut check = |api: Api, method: &Method, path: &str, want: &Want| {
            let got = resolve(api, method, path);
            let ok = match (want, &got) {
                (Pass(e, p), Ok(r)) => r.endpoint == *e && r.path == *p,
                (Bad(needle), Err(Refused::Malformed(m))) => m.contains(needle),
                (NotRouted, Err(Refused::NotRouted)) => true,
                _ => false,
            };
            if !ok {
                failures.push(format!("{api:?} {method} {path:?}: got {got:?}"));
            }
        };
        for (api, method, path, want) in &cases {
            check(*api, method, path, want);
        }
        check(A, &get(), &longer_id, &Bad("longer than 256"));
        check(A, &get(), &long_path, &Bad("longer than 1024"));
        check(A, &post(), &long_dots, &Bad(dot));
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        assert_eq!(
            resolve(A, &get(), &long_id),
            Ok(Resolved {
                endpoint: Endpoint::Model,
                path: long_id.clone()
            })
        );
        assert!(cases.len() >= 90, "{} cases", cases.len());
    }

    #[test]
    fn a_canonical_path_has_only_safe_characters() {
        for raw in [
            "/v1/models/ft:gpt-4o-mini:org::abc",
            "/V1//Models/%41%2d",
            "/v1/messages/",
        ] {
            for api in [A, O] {
                if let Ok(r) = resolve(api, &get(), raw) {
                    assert!(r.path.starts_with('/'));
                    assert!(r.path.bytes().all(|b| b == b'/' || is_safe(b)), "{r:?}");
                    assert!(!r.path.contains("//"));
                }
            }
        }
    }

    #[test]
    fn the_upstream_url_carries_exactly_the_checked_path() {
        let origin = reqwest::Url::parse("https://api.anthropic.com").unwrap();
        for (path, query) in [
            ("/v1/messages", None),
            ("/v1/messages", Some("beta=true")),
            ("/v1/models", Some("limit=20&after_id=claude-3")),
            ("/v1/models/ft:gpt-4o-mini:org::abc", None),
            ("/v1/models/a...b", None),
            ("/v1/models/.hidden", None),
            ("/v1/models/x", Some("/../../v1/organizations/api_keys")),
            ("/v1/models/x", Some("a=%2e%2e%2f&b=..\\..")),
            ("/v1/models/x", Some("")),
        ] {
            let url = upstream_url(&origin, path, query).unwrap();
            assert_eq!(url.path(), path);
            assert_eq!(url.host_str(), Some("api.anthropic.com"));
            let want = match query {
                Some(q) => format!("https://api.anthropic.com{path}?{q}"),
                None => format!("https://api.anthropic.com{path}"),
            };
            assert_eq!(url.as_str(), want, "the query is forwarded as sent");
        }
        // The one change a query sees: the escaping the URL standard requires.
        let url = upstream_url(&origin, "/v1/models", Some("q='x'")).unwrap();
        assert_eq!(
            url.as_str(),
            "https://api.anthropic.com/v1/models?q=%27x%27"
        );
        // What the URL type would rewrite is refused rather than forwarded.
        for path in ["/v1/models/../x", "/v1/models/%2e%2e/x", "/v1\\models"] {
            assert!(upstream_url(&origin, path, None).is_err(), "{path}");
        }
    }

    #[test]
    fn shapes_and_shown_paths() {
        assert_eq!(shape_of("/v1/messages/batches"), A);
        assert_eq!(shape_of("/V1/Messages"), A);
        assert_eq!(shape_of("/v1/chat/completions"), O);
        assert_eq!(shape_of(""), O);
        assert_eq!(shown("/v1/models"), "/v1/models");
        let long = format!("/{}", "a".repeat(500));
        let s = shown(&long);
        assert!(s.len() < 160 && s.ends_with("(501 bytes)"), "{s}");
    }
}
