//! The ops dashboard: a web page the controller serves itself, on the admin port.
//!
//! `GET /` answers `ui/index.html`; `GET /ui/{file}` its script, stylesheet and the vendored uPlot
//! (ui/README.md says what each file is and how the vendored copy is made). Every file is
//! embedded in the binary at build time from a fixed table, so the page works offline and loads
//! nothing from anywhere else; an unknown name is a JSON 404 like every other error of the
//! endpoint. The page reads the JSON API as any client does and sends the bearer token only on
//! mutations and the session check.
//!
//! Every answer of this router carries a strict Content-Security-Policy (scripts, styles, images
//! and fetches from this origin only; no inline script, event handler or style attribute; no
//! framing), `X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer`; assets are
//! served with `Cache-Control: no-cache` and a strong `ETag` (a hash of the embedded bytes), so a
//! browser revalidates with `If-None-Match` and gets a 304 until the binary changes.

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::api::error::ApiError;
use crate::api::extract::ApiPath;

/// The policy of every dashboard answer. uPlot sets element styles through the CSSOM
/// (`element.style.x = ...`), which `style-src 'self'` allows; it injects no `<style>` element
/// and no `style` attribute from markup, so no `'unsafe-inline'` is needed. `img-src data:` is for
/// the page's empty favicon (`data:,`), which keeps the browser from asking for `/favicon.ico`.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data:; \
     style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; \
     base-uri 'none'; form-action 'self'";

/// One embedded file of the page.
struct Asset {
    /// The name after `/ui/`.
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    /// FNV-1a of `body`, computed at compile time: the strong ETag.
    hash: u64,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

macro_rules! asset {
    ($name:literal, $path:literal, $content_type:expr) => {
        Asset {
            name: $name,
            content_type: $content_type,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/ui/", $path)),
            hash: fnv1a(include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/ui/",
                $path
            ))),
        }
    };
}

/// Every file the page may ask for, by the name it is served under.
const ASSETS: &[Asset] = &[
    asset!("index.html", "index.html", HTML),
    asset!("errors.js", "errors.js", JS),
    asset!("app.js", "app.js", JS),
    asset!("app.css", "app.css", CSS),
    asset!("uPlot.iife.min.js", "vendor/uPlot.iife.min.js", JS),
    asset!("uPlot.min.css", "vendor/uPlot.min.css", CSS),
    asset!("uPlot.LICENSE", "vendor/uPlot.LICENSE", TEXT),
];

const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// `GET /` and `GET /ui/{file}`, every answer with the security headers.
pub fn router() -> Router {
    Router::new()
        .route("/", get(index))
        .route("/ui/{file}", get(asset))
        .layer(middleware::from_fn(security_headers))
}

async fn index(headers: HeaderMap) -> Response {
    serve(
        find("index.html").expect("index.html is embedded"),
        &headers,
    )
}

async fn asset(ApiPath(file): ApiPath<String>, headers: HeaderMap) -> Response {
    match find(&file) {
        Some(asset) => serve(asset, &headers),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no such dashboard file: {file}"),
        )
        .into_response(),
    }
}

fn find(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

fn serve(asset: &'static Asset, request: &HeaderMap) -> Response {
    let etag = format!("\"{:016x}\"", asset.hash);
    let cached = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag == etag
        });
    let common = [
        (header::CACHE_CONTROL, "no-cache".to_string()),
        (header::ETAG, etag),
    ];
    if cached {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(header::CONTENT_TYPE, asset.content_type)],
        asset.body,
    )
        .into_response()
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(path: &str, if_none_match: Option<&str>) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut request = http::Request::builder().uri(path);
        if let Some(tag) = if_none_match {
            request = request.header(header::IF_NONE_MATCH, tag);
        }
        let response = router()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, headers, body.to_vec())
    }

    fn header_of(headers: &HeaderMap, name: header::HeaderName) -> &str {
        headers
            .get(&name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
    }

    fn assert_security_headers(headers: &HeaderMap) {
        assert_eq!(
            header_of(headers, header::CONTENT_SECURITY_POLICY),
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
             connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
        );
        assert_eq!(
            header_of(headers, header::X_CONTENT_TYPE_OPTIONS),
            "nosniff"
        );
        assert_eq!(header_of(headers, header::REFERRER_POLICY), "no-referrer");
    }

    fn text(name: &str) -> &'static str {
        std::str::from_utf8(find(name).unwrap().body).unwrap()
    }

    #[tokio::test]
    async fn the_page_is_html_with_the_strict_policy() {
        let (status, headers, body) = get("/", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            header_of(&headers, header::CONTENT_TYPE),
            "text/html; charset=utf-8"
        );
        assert_eq!(header_of(&headers, header::CACHE_CONTROL), "no-cache");
        assert_security_headers(&headers);
        let html = String::from_utf8(body).unwrap();
        assert!(html.starts_with("<!doctype html>"), "{html}");
        assert!(html.contains("id=\"release-graph\""));
    }

    #[tokio::test]
    async fn every_asset_is_served_with_its_type() {
        let expected = [
            ("index.html", "text/html"),
            ("errors.js", "text/javascript"),
            ("app.js", "text/javascript"),
            ("app.css", "text/css"),
            ("uPlot.iife.min.js", "text/javascript"),
            ("uPlot.min.css", "text/css"),
            ("uPlot.LICENSE", "text/plain"),
        ];
        assert_eq!(expected.len(), ASSETS.len());
        for (name, content_type) in expected {
            let (status, headers, body) = get(&format!("/ui/{name}"), None).await;
            assert_eq!(status, StatusCode::OK, "{name}");
            let served = header_of(&headers, header::CONTENT_TYPE);
            assert_eq!(served, format!("{content_type}; charset=utf-8"), "{name}");
            assert_security_headers(&headers);
            assert_eq!(body, find(name).unwrap().body, "{name}");
            assert!(!body.is_empty(), "{name} is empty");
        }
    }

    #[tokio::test]
    async fn an_unchanged_asset_is_a_304_for_its_etag() {
        let (_, headers, _) = get("/ui/app.js", None).await;
        let etag = header_of(&headers, header::ETAG).to_string();
        assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
        let (status, headers, body) = get("/ui/app.js", Some(&etag)).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        assert!(body.is_empty());
        assert_eq!(header_of(&headers, header::ETAG), etag);
        assert_security_headers(&headers);
        let (status, _, _) = get("/ui/app.js", Some("\"0000000000000000\"")).await;
        assert_eq!(status, StatusCode::OK);
        let (_, css, _) = get("/ui/app.css", None).await;
        assert_ne!(header_of(&css, header::ETAG), etag);
    }

    #[tokio::test]
    async fn an_unknown_asset_is_a_json_404() {
        for path in ["/ui/nope.js", "/ui/..%2Fapp.js", "/ui/vendor"] {
            let (status, headers, body) = get(path, None).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert!(header_of(&headers, header::CONTENT_TYPE).starts_with("application/json"));
            assert_security_headers(&headers);
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let error = body["error"].as_str().unwrap();
            assert!(error.contains("no such dashboard file"), "{error}");
        }
    }

    /// Every `src="..."` and `href="..."` value of the page.
    fn references(html: &str) -> Vec<&str> {
        let mut found = Vec::new();
        for attribute in ["src=\"", "href=\""] {
            let mut rest = html;
            while let Some(at) = rest.find(attribute) {
                rest = &rest[at + attribute.len()..];
                let end = rest.find('"').unwrap();
                found.push(&rest[..end]);
                rest = &rest[end..];
            }
        }
        found
    }

    #[tokio::test]
    async fn the_page_loads_only_its_own_embedded_files() {
        let html = text("index.html");
        let references = references(html);
        assert!(references.len() >= 6, "{references:?}");
        for reference in references {
            if reference.starts_with('#') || reference == "data:," {
                continue;
            }
            let name = reference
                .strip_prefix("/ui/")
                .unwrap_or_else(|| panic!("{reference} is not a /ui/ asset"));
            assert!(find(name).is_some(), "{reference} is not embedded");
            let (status, _, _) = get(reference, None).await;
            assert_eq!(status, StatusCode::OK, "{reference}");
        }
    }

    #[test]
    fn no_file_of_the_page_names_another_site() {
        for name in [
            "index.html",
            "errors.js",
            "app.js",
            "app.css",
            "uPlot.min.css",
        ] {
            let body = text(name);
            assert!(
                !body.contains("http://") && !body.contains("https://"),
                "{name} has an http(s) URL"
            );
        }
        // uPlot names its home page in its banner comment, and nowhere else.
        let uplot = text("uPlot.iife.min.js");
        let banner_end = uplot.find("*/").unwrap();
        assert!(uplot[..banner_end].starts_with("/*! https://github.com/leeoniya/uPlot"));
        let rest = &uplot[banner_end..];
        assert!(!rest.contains("http://") && !rest.contains("https://"));
    }

    #[test]
    fn the_page_has_no_inline_script_style_or_handler() {
        let html = text("index.html");
        let mut scripts = Vec::new();
        let mut rest = html;
        while let Some(at) = rest.find("<script") {
            rest = &rest[at..];
            let end = rest.find('>').unwrap();
            let tag = &rest[..=end];
            let src = tag
                .split("src=\"")
                .nth(1)
                .map(|s| &s[..s.find('"').unwrap()]);
            let src = src.unwrap_or_else(|| panic!("inline script: {tag}"));
            assert!(
                rest[end + 1..].starts_with("</script>"),
                "script with a body: {tag}"
            );
            scripts.push(src);
            rest = &rest[end..];
        }
        assert_eq!(scripts.first(), Some(&"/ui/errors.js"), "{scripts:?}");
        assert!(!html.contains("<style"), "a <style> element");
        assert!(!html.contains(" style="), "a style attribute");
        let lower = html.to_ascii_lowercase();
        for (at, _) in lower.match_indices(" on") {
            let name: String = lower[at + 1..]
                .chars()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect();
            let after = &lower[at + 1 + name.len()..];
            assert!(
                !(name.len() > 2 && after.starts_with('=')),
                "an inline event handler: {name}="
            );
        }
        assert!(!lower.contains("javascript:"), "a javascript: URL");
        // The scripts build the page with textContent and DOM calls only.
        for name in ["app.js", "errors.js"] {
            let body = text(name);
            assert!(!body.contains(".innerHTML"), "{name} uses innerHTML");
            assert!(!body.contains("eval("), "{name} uses eval");
        }
    }

    #[test]
    fn the_dom_contract_of_the_browser_test_is_in_the_page() {
        let html = text("index.html");
        for id in [
            "signin-token",
            "signin-button",
            "signout-button",
            "signin-status",
            "error-banner",
            "updated",
            "release-graph",
            "release-form",
            "release-rollback-on-failure",
            "release-button",
            "releases",
            "rollout-phase",
            "rollout-rule",
            "evidence-id",
            "approve-button",
            "abort-button",
            "rollback-button",
            "latency-chart",
            "evidence-chart",
            "quantiles",
            "transitions",
            "machines-table",
        ] {
            assert!(
                html.contains(&format!("id=\"{id}\"")),
                "no #{id} in index.html"
            );
        }
        let token = html.split("id=\"signin-token\"").nth(1).unwrap();
        let token = &token[..token.find('>').unwrap()];
        assert!(token.contains("type=\"password\"") && token.contains("autocomplete=\"off\""));
    }
}
