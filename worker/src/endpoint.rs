//! Coordinator addresses: what a volunteer types (`http://host:8080`) turned into the
//! WebSocket endpoint the worker dials (`ws://host:8080/api/v1/worker`).

use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::header::{AUTHORIZATION, HeaderValue};

use crate::WorkerError;

/// Path of the worker WebSocket on a coordinator, appended to base URLs.
pub const WORKER_PATH: &str = "/api/v1/worker";

/// Normalises one coordinator URL.
///
/// `http` becomes `ws` and `https` becomes `wss`, because volunteers copy the address
/// they open in a browser. A URL without a path (or with just `/`) gets [`WORKER_PATH`];
/// a URL with a path is kept as given, so a reverse proxy can publish the endpoint
/// elsewhere. A bare `host:port` is taken as `ws://host:port`.
pub fn normalise(url: &str) -> Result<String, WorkerError> {
    let invalid = |why: &str| WorkerError::InvalidUrl {
        url: url.to_owned(),
        why: why.to_owned(),
    };
    let trimmed = url.trim();
    if trimmed.is_empty() {
        return Err(invalid("it is empty"));
    }
    let (scheme, rest) = match trimmed.split_once("://") {
        Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
        None => ("ws".to_owned(), trimmed),
    };
    let scheme = match scheme.as_str() {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        _ => return Err(invalid("the scheme must be ws, wss, http or https")),
    };
    // The authority ends at the first path, query or fragment delimiter.
    let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(split);
    // http::Uri accepts any port text; the dialer would then fail on every reconnect.
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host_port)| host_port);
    let (host, port) = match host_port.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((host, rest)) => (host, rest.strip_prefix(':')),
            None => return Err(invalid("its IPv6 address lacks a closing ]")),
        },
        None => match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        },
    };
    if host.is_empty() {
        return Err(invalid("it names no host"));
    }
    if port.is_some_and(|port| port.parse::<u16>().is_err()) {
        return Err(invalid("its port is not a number from 0 to 65535"));
    }
    let path_end = tail.find(['?', '#']).unwrap_or(tail.len());
    let (path, suffix) = tail.split_at(path_end);
    let path = if path.is_empty() || path == "/" {
        WORKER_PATH
    } else {
        path
    };
    let normalised = format!("{scheme}://{authority}{path}{suffix}");
    // Let the WebSocket client judge host and port now rather than on every reconnect.
    normalised
        .as_str()
        .into_client_request()
        .map_err(|e| invalid(&e.to_string()))?;
    Ok(normalised)
}

/// The `Authorization` header value for a token, marked sensitive so that the HTTP stack
/// never prints it.
pub fn bearer(token: &str) -> Result<HeaderValue, WorkerError> {
    let mut value =
        HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| WorkerError::InvalidToken)?;
    value.set_sensitive(true);
    Ok(value)
}

/// The upgrade request for one connection attempt.
pub fn request(url: &str, auth: Option<&HeaderValue>) -> Result<Request, WorkerError> {
    let mut request = url
        .into_client_request()
        .map_err(|e| WorkerError::InvalidUrl {
            url: url.to_owned(),
            why: e.to_string(),
        })?;
    if let Some(auth) = auth {
        request.headers_mut().insert(AUTHORIZATION, auth.clone());
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(url: &str) -> String {
        normalise(url).unwrap()
    }

    #[test]
    fn http_base_urls_become_the_worker_endpoint() {
        assert_eq!(
            ok("http://127.0.0.1:8080"),
            "ws://127.0.0.1:8080/api/v1/worker"
        );
        assert_eq!(
            ok("http://127.0.0.1:8080/"),
            "ws://127.0.0.1:8080/api/v1/worker"
        );
        assert_eq!(
            ok("https://grid.example.org"),
            "wss://grid.example.org/api/v1/worker"
        );
        assert_eq!(ok("HTTP://Host:1"), "ws://Host:1/api/v1/worker");
        assert_eq!(ok("  http://h:1  "), "ws://h:1/api/v1/worker");
    }

    #[test]
    fn ws_urls_get_the_path_only_when_they_have_none() {
        assert_eq!(ok("ws://h:9"), "ws://h:9/api/v1/worker");
        assert_eq!(ok("ws://h:9/api/v1/worker"), "ws://h:9/api/v1/worker");
        assert_eq!(ok("wss://h/grid/worker"), "wss://h/grid/worker");
        assert_eq!(ok("http://h/proxy/ws"), "ws://h/proxy/ws");
        assert_eq!(ok("ws://h:9?x=1"), "ws://h:9/api/v1/worker?x=1");
    }

    #[test]
    fn bare_host_port_is_plain_websocket() {
        assert_eq!(ok("localhost:8080"), "ws://localhost:8080/api/v1/worker");
        assert_eq!(ok("[::1]:8080"), "ws://[::1]:8080/api/v1/worker");
    }

    #[test]
    fn nonsense_is_refused_with_the_url_named() {
        for bad in [
            "",
            "   ",
            "ftp://h",
            "http://",
            "http:///path",
            "ws://h:notaport",
        ] {
            let err = normalise(bad).unwrap_err();
            assert!(
                matches!(err, WorkerError::InvalidUrl { .. }),
                "{bad:?}: {err}"
            );
            assert!(err.to_string().contains(bad.trim()), "{err}");
        }
    }

    #[test]
    fn the_token_travels_as_a_sensitive_bearer_header() {
        let auth = bearer("abc.def").unwrap();
        assert!(auth.is_sensitive());
        let request = request("ws://h:1/api/v1/worker", Some(&auth)).unwrap();
        assert_eq!(request.headers()[AUTHORIZATION], "Bearer abc.def");
        assert!(format!("{:?}", request.headers()).contains("Sensitive"));
        assert!(matches!(bearer("a\nb"), Err(WorkerError::InvalidToken)));
    }
}
