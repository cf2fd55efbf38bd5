//! The volunteer page: the static files of `www/` (hand-written page and scripts, plus the
//! WebAssembly bundles `cargo xtask wasm` writes to `www/pkg`), read into memory when the
//! coordinator starts and served with the headers a threaded tab needs.
//!
//! WebAssembly threads need `SharedArrayBuffer`, which browsers give only to pages that are
//! cross-origin isolated: the page *and every script and worker it loads* must come with
//! `Cross-Origin-Opener-Policy: same-origin` and `Cross-Origin-Embedder-Policy:
//! require-corp`. Every file here gets both (and `Cross-Origin-Resource-Policy`), `.wasm`
//! goes out as `application/wasm` (streaming compilation refuses anything else), and
//! caching is by content: each file's ETag is a hash of its bytes and browsers revalidate
//! (`no-cache`), so a rebuilt bundle is never mixed with a stale script.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

/// The served files, by URL path without the leading `/`.
#[derive(Debug, Default)]
pub struct Site {
    files: HashMap<String, Asset>,
    /// Send the cross-origin isolation headers (always, but for the hidden test flag that
    /// shows how a non-isolated page falls back to one thread).
    isolated: bool,
}

#[derive(Debug)]
struct Asset {
    bytes: Bytes,
    content_type: &'static str,
    etag: HeaderValue,
}

/// Where the page was when this binary was built: right for `cargo run` from a checkout.
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../www")
}

/// What the page needs to be more than a message: the manifest of the built bundles.
const MANIFEST: &str = "pkg/manifest.json";

impl Site {
    /// Reads every file under `dir`. A missing directory gives an empty site (the API
    /// works; `/` explains what is missing).
    pub fn load(dir: &Path, isolated: bool) -> anyhow::Result<Site> {
        let mut site = Site {
            files: HashMap::new(),
            isolated,
        };
        if dir.is_dir() {
            site.add_dir(dir, dir)?;
        }
        Ok(site)
    }

    fn add_dir(&mut self, root: &Path, dir: &Path) -> anyhow::Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            if entry.file_type()?.is_dir() {
                self.add_dir(root, &path)?;
                continue;
            }
            let Some(url) = path
                .strip_prefix(root)
                .ok()
                .and_then(Path::to_str)
                .map(|p| p.replace('\\', "/"))
            else {
                continue;
            };
            let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let hash = blake3::hash(&bytes).to_hex();
            let etag = HeaderValue::from_str(&format!("\"{}\"", &hash[..32]))
                .expect("hex is a valid header value");
            self.files.insert(
                url,
                Asset {
                    content_type: content_type(&path),
                    bytes: Bytes::from(bytes),
                    etag,
                },
            );
        }
        Ok(())
    }

    /// Whether the page can start a tab worker: the page and a bundle manifest are there.
    pub fn has_bundles(&self) -> bool {
        self.files.contains_key(MANIFEST)
    }

    pub fn has_page(&self) -> bool {
        self.files.contains_key("index.html")
    }

    /// Answers a GET or HEAD for `uri`, or `None` when no such file is served.
    pub fn respond(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<Response> {
        if method != Method::GET && method != Method::HEAD {
            return None;
        }
        let path = uri.path().trim_start_matches('/');
        let path = if path.is_empty() { "index.html" } else { path };
        let Some(asset) = self.files.get(path) else {
            if path == "index.html" {
                return Some(self.missing_page());
            }
            return None;
        };
        let fresh = headers
            .get(header::IF_NONE_MATCH)
            .is_some_and(|tags| etag_matches(tags, &asset.etag));
        let mut response = if fresh {
            StatusCode::NOT_MODIFIED.into_response()
        } else if method == Method::HEAD {
            let mut response = Response::new(Body::empty());
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(asset.bytes.len()));
            response
        } else {
            Response::new(Body::from(asset.bytes.clone()))
        };
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
        headers.insert(header::ETAG, asset.etag.clone());
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        self.isolation_headers(headers);
        Some(response)
    }

    /// `/` on a coordinator without its `www/` directory: say so instead of a blank page.
    fn missing_page(&self) -> Response {
        let body = "<!doctype html><meta charset=utf-8><title>tabgrid</title>\
            <h1>tabgrid</h1><p>This coordinator cannot find its volunteer page. Start it \
            from a checkout with <code>cargo xtask cluster</code>, or pass \
            <code>--www DIR</code> pointing at the <code>www/</code> folder after \
            <code>cargo xtask wasm</code> has built the bundles into it.</p>";
        let mut response = (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        self.isolation_headers(headers);
        response
    }

    fn isolation_headers(&self, headers: &mut HeaderMap) {
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        if self.isolated {
            headers.insert(
                "cross-origin-opener-policy",
                HeaderValue::from_static("same-origin"),
            );
            headers.insert(
                "cross-origin-embedder-policy",
                HeaderValue::from_static("require-corp"),
            );
            headers.insert(
                "cross-origin-resource-policy",
                HeaderValue::from_static("same-origin"),
            );
        }
    }
}

/// `If-None-Match: "a", "b"` or `*` against one strong tag (weak ones compare equal too,
/// as RFC 9110 asks for this header).
fn etag_matches(tags: &HeaderValue, etag: &HeaderValue) -> bool {
    let Ok(tags) = tags.to_str() else {
        return false;
    };
    let ours = etag.to_str().unwrap_or_default();
    tags.split(',')
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == "*" || tag == ours)
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("wasm") => "application/wasm",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> (tempfile::TempDir, Site) {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("index.html"), "<p>hi</p>").unwrap();
        fs::create_dir_all(dir.path().join("pkg/threaded")).unwrap();
        fs::write(dir.path().join("pkg/threaded/x_bg.wasm"), b"\0asm").unwrap();
        fs::write(dir.path().join(".hidden"), "no").unwrap();
        let site = Site::load(dir.path(), true).unwrap();
        (dir, site)
    }

    fn get(site: &Site, path: &str, headers: &HeaderMap) -> Option<Response> {
        site.respond(&Method::GET, &path.parse().unwrap(), headers)
    }

    #[test]
    fn serves_files_with_type_isolation_and_etag() {
        let (_dir, site) = site();
        let page = get(&site, "/", &HeaderMap::new()).unwrap();
        assert_eq!(page.status(), StatusCode::OK);
        assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
        assert_eq!(page.headers()["cross-origin-opener-policy"], "same-origin");
        assert_eq!(
            page.headers()["cross-origin-embedder-policy"],
            "require-corp"
        );
        let wasm = get(&site, "/pkg/threaded/x_bg.wasm", &HeaderMap::new()).unwrap();
        assert_eq!(wasm.headers()["content-type"], "application/wasm");
        assert!(get(&site, "/.hidden", &HeaderMap::new()).is_none());
        assert!(get(&site, "/../Cargo.toml", &HeaderMap::new()).is_none());
        assert!(!site.has_bundles());

        let mut headers = HeaderMap::new();
        headers.insert(header::IF_NONE_MATCH, page.headers()["etag"].clone());
        let again = get(&site, "/index.html", &headers).unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert_eq!(get(&site, "/", &headers).unwrap().status(), StatusCode::OK);
    }

    #[test]
    fn a_missing_page_is_explained_not_blank() {
        let site = Site::load(Path::new("/nonexistent/tabgrid-www"), true).unwrap();
        let page = get(&site, "/", &HeaderMap::new()).unwrap();
        assert_eq!(page.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(get(&site, "/app.js", &HeaderMap::new()).is_none());
        let post = site.respond(&Method::POST, &"/".parse().unwrap(), &HeaderMap::new());
        assert!(post.is_none());
    }
}
