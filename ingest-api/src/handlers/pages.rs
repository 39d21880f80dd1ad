//! The pages the binary serves beside the API: the chat page at `/` (plain HTML, CSS and
//! JavaScript: no framework, no build step, no Node toolchain) and the API reference at
//! `/docs` (Swagger UI from the `swagger-ui-dist` npm package, vendored under
//! `assets/swagger-ui` with its licence, rendering `/openapi.json`). Every asset is compiled
//! into the binary, so the pages work offline and a deploy is one file.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// What a page may load: only this origin's scripts, styles (Swagger UI sets inline styles)
/// and API; never framed.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                   script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
                   form-action 'self'";

fn asset(content_type: &'static str, body: &'static [u8]) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Short: a new release's page is picked up within minutes.
            (header::CACHE_CONTROL, "public, max-age=300"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (
                header::HeaderName::from_static("referrer-policy"),
                "no-referrer",
            ),
        ],
        body,
    )
        .into_response()
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

pub async fn index() -> Response {
    asset(HTML, include_bytes!("../../assets/app/index.html"))
}
pub async fn app_js() -> Response {
    asset(JS, include_bytes!("../../assets/app/app.js"))
}
pub async fn app_css() -> Response {
    asset(CSS, include_bytes!("../../assets/app/app.css"))
}
pub async fn docs() -> Response {
    asset(HTML, include_bytes!("../../assets/swagger-ui/docs.html"))
}
pub async fn docs_init() -> Response {
    asset(JS, include_bytes!("../../assets/swagger-ui/init.js"))
}
pub async fn docs_bundle() -> Response {
    asset(
        JS,
        include_bytes!("../../assets/swagger-ui/swagger-ui-bundle.js"),
    )
}
pub async fn docs_css() -> Response {
    asset(
        CSS,
        include_bytes!("../../assets/swagger-ui/swagger-ui.css"),
    )
}
pub async fn docs_licence() -> Response {
    asset(TEXT, include_bytes!("../../assets/swagger-ui/LICENSE"))
}
pub async fn docs_notice() -> Response {
    asset(TEXT, include_bytes!("../../assets/swagger-ui/NOTICE"))
}
pub async fn docs_bundle_licences() -> Response {
    asset(
        TEXT,
        include_bytes!("../../assets/swagger-ui/swagger-ui-bundle.js.LICENSE.txt"),
    )
}
