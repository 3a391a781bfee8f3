//! The web console (issue 22): `/console`, a page and its script and style, embedded in the
//! binary (no external network), that polls this node's `/admin/*` and `/stats` JSON from
//! the browser. It needs what those need (the `admin` permission when security is on; the
//! browser asks for the credentials once, as for any Basic-authenticated page). The content
//! security policy allows only the node's own script, style and JSON.

use super::{IntoResponse, Response, StatusCode, header};

const INDEX: &str = include_str!("console/index.html");
const APP: &str = include_str!("console/app.js");
const STYLE: &str = include_str!("console/style.css");
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                      connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; \
                      base-uri 'none'; form-action 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub(super) async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

pub(super) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP)
}

pub(super) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}
