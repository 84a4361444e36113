//! The operator console: one page (plain HTML, CSS and JavaScript, embedded in the binary)
//! over the management API. It asks for nothing from any other host (its Content Security
//! Policy says so to the browser too), keeps the token only in the tab's `sessionStorage`,
//! and writes every value from the API as text, never as markup.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/app.js");
const STYLE: &str = include_str!("../console/app.css");
const ICON: &str = include_str!("../console/icon.svg");

/// Only this origin, no inline script or style, no frames.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                      img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn page(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `GET /`
pub async fn index() -> Response {
    page(INDEX, "text/html; charset=utf-8")
}

/// `GET /favicon.ico`: browsers ask for it whatever the page says.
pub async fn favicon() -> Response {
    page(ICON, "image/svg+xml")
}

/// `GET /console/{asset}`
pub async fn asset(Path(asset): Path<String>) -> Response {
    match asset.as_str() {
        "app.js" => page(SCRIPT, "text/javascript; charset=utf-8"),
        "app.css" => page(STYLE, "text/css; charset=utf-8"),
        "icon.svg" => page(ICON, "image/svg+xml"),
        _ => (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    }
}
