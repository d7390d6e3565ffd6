//! JSON in and out for the device and admin APIs: every error is
//! `{"error": "..."}` with a 4xx/5xx status, and request bodies are
//! checked (content type, size, syntax) before anything is written.

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::store::StoreError;
use crate::logging::RateLimit;
use crate::module::Body;

/// An answer that is not a success, with what the client should be told.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
    }
    pub fn method(allowed: &str) -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method not allowed here (allowed: {allowed})"),
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, m),
            StoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
            StoreError::TokenRejected => ApiError::new(StatusCode::FORBIDDEN, e.to_string()),
            StoreError::Backend(m) => {
                // Database details are for the operator's log only; one
                // line a second at most: while the database is gone every
                // request fails, and a fleet would flood the log.
                static LOG: RateLimit = RateLimit::new(1000);
                if let Some(held) = LOG.allow() {
                    tracing::error!(error = %m, "devices: store failure ({held} similar errors suppressed)");
                }
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage unavailable, try again later",
                )
            }
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("API types serialize");
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    r
}

pub fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json(e.status, &serde_json::json!({ "error": e.message }));
    if e.status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
    }
    r
}

pub fn respond(result: ApiResult<Response<Body>>) -> Response<Body> {
    result.unwrap_or_else(|e| error_response(&e))
}

fn is_json(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// The body, at most `limit` bytes (413 beyond, before reading it all when
/// Content-Length tells).
pub async fn read_body(req: Request<Incoming>, limit: usize) -> ApiResult<Bytes> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request(format!(
            "reading the request body: {e}"
        ))),
    }
}

/// A JSON request body of type `T`: 415 for another content type, 413
/// when too large, 400 when it does not parse or does not fit `T`.
pub async fn read_json<T: DeserializeOwned>(req: Request<Incoming>, limit: usize) -> ApiResult<T> {
    if !is_json(&req) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected Content-Type: application/json",
        ));
    }
    let body = read_body(req, limit).await?;
    parse_json(&body)
}

pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match path.as_str() {
            "." | "" => ApiError::bad_request(format!("invalid JSON: {inner}")),
            _ => ApiError::bad_request(format!("invalid JSON at {path}: {inner}")),
        }
    })
}

/// Like `read_json`, but an empty body (no content type needed) is `None`.
pub async fn read_optional_json<T: DeserializeOwned>(
    req: Request<Incoming>,
    limit: usize,
) -> ApiResult<Option<T>> {
    let empty = req.headers().get(CONTENT_LENGTH).is_some_and(|v| v == "0")
        || (req.headers().get(CONTENT_TYPE).is_none()
            && hyper::body::Body::is_end_stream(req.body()));
    if empty {
        return Ok(None);
    }
    if !is_json(&req) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected Content-Type: application/json",
        ));
    }
    let body = read_body(req, limit).await?;
    if body.is_empty() {
        return Ok(None);
    }
    parse_json(&body).map(Some)
}

/// Query parameters, percent-decoded (`+` as space).
pub fn query_pairs(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Split a path into its segments, each percent-decoded.
pub fn segments(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_decode(&s.replace('+', "%2B")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%20b+c%2"), "a b c%2");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
        assert_eq!(
            segments("/modules/x/groups/floor%202/"),
            ["modules", "x", "groups", "floor 2"]
        );
        assert_eq!(segments("/a+b"), ["a+b"]);
    }

    #[test]
    fn json_errors_name_the_place() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct T {
            uses: u32,
        }
        let e = parse_json::<T>(br#"{"uses": "many"}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("uses"), "{}", e.message);
        assert!(parse_json::<T>(b"{").is_err());
    }

    #[test]
    fn store_errors_map_to_statuses_without_leaking_backend_details() {
        let e: ApiError =
            StoreError::Backend("password authentication failed for user x".into()).into();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!e.message.contains("password"));
        let e: ApiError = StoreError::TokenRejected.into();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
    }
}
