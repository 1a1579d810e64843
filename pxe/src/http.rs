//! The HTTP side: `/boot/<mac>.ipxe` (per-machine iPXE script), `/boot/<mac>/beacon` (the
//! script's "I got here" call), `/artifacts/sha256/<hex>` (content-addressed files with
//! Range and ETag) and `/artifacts/sha256/<hex>/cpio/<path>` (the same file wrapped as one
//! cpio entry at `/<path>`, for UEFI iPXE, which cannot wrap it), the iPXE binaries for UEFI
//! HTTP boot, and `/metrics`.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::artifacts::Store;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::recent::RecentMacs;
use crate::script::{self, CPIO_SUFFIX};
use crate::source::{self, BootSource};
use crate::tftp::Files;
use tether_boot::{Mac, initrd};

/// Response body type: small bodies in memory; artifact bodies are a [`SendFile`] extension.
pub type Body = Bytes;

/// Largest request head we accept.
const MAX_HEAD: usize = 16 * 1024;
/// How long an idle keep-alive connection may wait for its next request.
const IDLE: Duration = Duration::from_secs(60);

/// An artifact body, sent with sendfile(2) by the connection loop, between an optional
/// prefix and suffix written from memory (a cpio header and trailer).
#[derive(Clone)]
pub struct SendFile {
    prefix: Bytes,
    file: Arc<std::fs::File>,
    offset: u64,
    len: u64,
    suffix: Bytes,
    /// The download slot, released when the body has been sent.
    _permit: Arc<OwnedSemaphorePermit>,
}

/// Byte-range parsing (RFC 9110 §14), pure.
pub mod range {
    /// The outcome of a `Range` header against a representation of `size` bytes.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Ranged {
        /// No (usable) Range: send everything with 200. Multi-range requests land here too:
        /// a server may ignore Range, and boot clients never send them.
        Full,
        /// Send `start..=end` with 206.
        Partial(u64, u64),
        /// 416 Range Not Satisfiable.
        Unsatisfiable,
    }

    /// Interprets a `Range` header value.
    pub fn parse(value: Option<&str>, size: u64) -> Ranged {
        let Some(v) = value else { return Ranged::Full };
        let Some(spec) = v.trim().strip_prefix("bytes=") else {
            return Ranged::Full;
        };
        if spec.contains(',') {
            return Ranged::Full;
        }
        let Some((a, b)) = spec.trim().split_once('-') else {
            return Ranged::Full;
        };
        let num = |s: &str| -> Option<u64> {
            (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
                .then(|| s.parse().ok())
                .flatten()
        };
        match (a.is_empty(), b.is_empty()) {
            (true, true) => Ranged::Full,
            (true, false) => match num(b) {
                None => Ranged::Full,
                Some(0) => Ranged::Unsatisfiable,
                Some(_) if size == 0 => Ranged::Unsatisfiable,
                Some(n) => Ranged::Partial(size.saturating_sub(n), size - 1),
            },
            (false, _) => {
                let Some(start) = num(a) else {
                    return Ranged::Full;
                };
                let end = if b.is_empty() {
                    Some(u64::MAX)
                } else {
                    match num(b) {
                        Some(e) => Some(e),
                        None => return Ranged::Full,
                    }
                };
                let end = end.unwrap_or(u64::MAX);
                if end < start {
                    return Ranged::Full;
                }
                if start >= size {
                    return Ranged::Unsatisfiable;
                }
                Ranged::Partial(start, end.min(size - 1))
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn table() {
            let cases = [
                (None, Ranged::Full),
                (Some("bytes=0-99"), Ranged::Partial(0, 99)),
                (Some("bytes=100-"), Ranged::Partial(100, 999)),
                (Some("bytes=-10"), Ranged::Partial(990, 999)),
                (Some("bytes=-5000"), Ranged::Partial(0, 999)),
                (Some("bytes=990-5000"), Ranged::Partial(990, 999)),
                (Some("bytes=1000-"), Ranged::Unsatisfiable),
                (Some("bytes=-0"), Ranged::Unsatisfiable),
                (Some("bytes=5-1"), Ranged::Full),
                (Some("bytes=0-1,5-6"), Ranged::Full),
                (Some("items=0-1"), Ranged::Full),
                (Some("bytes=x-1"), Ranged::Full),
                (Some("bytes=+1-2"), Ranged::Full),
                (Some("bytes=-"), Ranged::Full),
                (Some("bytes=99999999999999999999999-"), Ranged::Full),
            ];
            for (h, want) in cases {
                assert_eq!(parse(h, 1000), want, "{h:?}");
            }
            assert_eq!(parse(Some("bytes=-1"), 0), Ranged::Unsatisfiable);
        }
    }
}

/// Everything a request handler needs.
pub struct App {
    /// Where assignments come from.
    pub source: Arc<dyn BootSource>,
    /// Content-addressed artifacts.
    pub store: Store,
    /// The iPXE binaries (served to UEFI HTTP-boot clients too).
    pub files: Files,
    /// Our base URL, as clients reach it.
    pub http_base: String,
    /// MACs that DHCP'd on our segment recently: only those may create objects.
    pub recent: Arc<RecentMacs>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Bounds concurrent artifact downloads; past it clients get 503 + Retry-After.
    pub artifact_slots: Arc<Semaphore>,
}

fn full(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    full(status, "text/plain; charset=utf-8", format!("{body}\n"))
}

/// Routes one request.
pub async fn handle(app: &App, req: &Request<()>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let (route, resp) = route(app, req, &path).await;
    app.metrics.http(route, resp.status().as_u16());
    resp
}

async fn route<B>(app: &App, req: &Request<B>, path: &str) -> (&'static str, Response<Body>) {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return (
            "other",
            text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD"),
        );
    }
    if let Some(rest) = path.strip_prefix("/artifacts/sha256/") {
        let (hex, tail) = match rest.split_once('/') {
            None => (rest, None),
            Some((hex, tail)) => (hex, Some(tail)),
        };
        if script::check_sha256("artifact hash", hex).is_err() {
            return (
                "artifact",
                text(
                    StatusCode::BAD_REQUEST,
                    "artifact name must be 64 lower-case hex digits",
                ),
            );
        }
        return match tail.map(|t| {
            t.strip_prefix(&CPIO_SUFFIX[1..])
                .and_then(|p| p.strip_prefix('/'))
        }) {
            None => ("artifact", artifact(app, req, hex, None).await),
            Some(Some(entry)) => (
                "artifact_cpio",
                artifact(app, req, hex, Some(&format!("/{entry}"))).await,
            ),
            Some(None) => ("other", text(StatusCode::NOT_FOUND, "not found")),
        };
    }
    if let Some(rest) = path.strip_prefix("/boot/") {
        if let Some(mac) = rest.strip_suffix(".ipxe") {
            return ("script", boot_script(app, mac).await);
        }
        if let Some(mac) = rest.strip_suffix("/beacon") {
            return ("beacon", beacon(app, mac));
        }
        return ("other", text(StatusCode::NOT_FOUND, "not found"));
    }
    if path == "/metrics" {
        return (
            "metrics",
            full(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                app.metrics.render(),
            ),
        );
    }
    if let Some(name) = path.strip_prefix('/')
        && let Some(data) = app.files.get(name)
    {
        return (
            "firmware",
            full(StatusCode::OK, "application/efi", data.clone()),
        );
    }
    ("other", text(StatusCode::NOT_FOUND, "not found"))
}

async fn boot_script(app: &App, mac: &str) -> Response<Body> {
    let mac: Mac = match mac.parse() {
        Ok(m) => m,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let seen = app.recent.seen(mac);
    let result = async {
        let a = app.source.assignment(mac, seen).await?;
        let plan = source::plan(&a, mac, &app.store, &app.http_base)?;
        let s = script::render(&plan, mac, &app.http_base)?;
        // Only a script that rendered gets its token recorded, and only a recorded token
        // is handed out.
        app.source.commit(mac, &a).await?;
        tracing::info!(%mac, machine = %plan.machine, image = %plan.image_version, discovered = a.discovered, token = a.enroll.token.is_some(), "served boot script");
        Ok::<_, Error>(s)
    }
    .await;
    match result {
        Ok(s) => full(StatusCode::OK, "text/plain; charset=utf-8", s),
        Err(e @ Error::NotSeen { .. }) => {
            tracing::info!(%mac, "no boot script: {e}");
            text(
                StatusCode::NOT_FOUND,
                &format!("{e}: boot it through DHCP on this segment"),
            )
        }
        Err(e @ Error::Unpublished(_)) => {
            tracing::warn!(%mac, "no boot script: {e}");
            let mut r = text(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
            r
        }
        Err(e) => {
            tracing::warn!(%mac, "no boot script: {e}");
            // Details stay in our log: the client is unauthenticated.
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no boot plan for this machine; see server log",
            )
        }
    }
}

fn beacon(app: &App, mac: &str) -> Response<Body> {
    match mac.parse::<Mac>() {
        Ok(m) => {
            app.metrics.boot(m, app.recent.seen(m));
            tracing::info!(mac = %m, "boot beacon");
            full(StatusCode::OK, "text/plain", "#!ipxe\n")
        }
        Err(e) => text(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

/// `/artifacts/sha256/<hex>`, or with `entry` its copy wrapped as that one cpio entry
/// (no Range on the wrapped copy: a server may ignore Range, and iPXE sends none).
async fn artifact<B>(
    app: &App,
    req: &Request<B>,
    hex: &str,
    entry: Option<&str>,
) -> Response<Body> {
    if let Some(p) = entry
        && let Err(e) = script::check_entry_path(p)
    {
        return text(StatusCode::BAD_REQUEST, &e.to_string());
    }
    let Some(stored) = app.store.get(hex) else {
        return text(StatusCode::NOT_FOUND, "no such artifact");
    };
    let wrap = match entry {
        None => None,
        Some(p) => match initrd::entry_header(p, stored.size) {
            Ok(h) => Some((
                Bytes::from(h),
                Bytes::from(initrd::entry_trailer(stored.size)),
            )),
            Err(e) => return text(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()),
        },
    };
    let etag = match entry {
        None => format!("\"sha256-{hex}\""),
        Some(p) => format!("\"sha256-{hex}-cpio-{}\"", p.trim_start_matches('/')),
    };
    if let Some(inm) = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        && (inm.trim() == "*"
            || inm
                .split(',')
                .any(|t| t.trim().trim_start_matches("W/") == etag))
    {
        let mut r = full(
            StatusCode::NOT_MODIFIED,
            "application/octet-stream",
            Bytes::new(),
        );
        r.headers_mut().insert(
            header::ETAG,
            HeaderValue::from_str(&etag).expect("hex etag"),
        );
        return r;
    }
    let Ok(permit) = app.artifact_slots.clone().try_acquire_owned() else {
        let mut r = text(StatusCode::SERVICE_UNAVAILABLE, "too many downloads; retry");
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    };
    let size = stored.size;
    let range_header = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    // A Range with a non-matching If-Range gets the full body.
    let if_range_ok = req
        .headers()
        .get(header::IF_RANGE)
        .is_none_or(|v| v.to_str().ok() == Some(etag.as_str()));
    let ranged = if if_range_ok && wrap.is_none() {
        range::parse(range_header, size)
    } else {
        range::Ranged::Full
    };
    let (status, start, len) = match ranged {
        range::Ranged::Full => (StatusCode::OK, 0, size),
        range::Ranged::Partial(s, e) => (StatusCode::PARTIAL_CONTENT, s, e - s + 1),
        range::Ranged::Unsatisfiable => {
            let mut r = text(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
            );
            return r;
        }
    };
    let (prefix, suffix) = wrap.unwrap_or_default();
    let body_len = prefix.len() as u64 + len + suffix.len() as u64;
    let mut r = Response::new(Bytes::new());
    if req.method() == Method::GET {
        r.extensions_mut().insert(SendFile {
            prefix: prefix.clone(),
            file: stored.file.clone(),
            offset: start,
            len,
            suffix: suffix.clone(),
            _permit: Arc::new(permit),
        });
    }
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
    h.insert(
        header::ACCEPT_RANGES,
        HeaderValue::from_static(if prefix.is_empty() { "bytes" } else { "none" }),
    );
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&etag).expect("hex etag"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {start}-{}/{size}", start + len - 1))
                .expect("ascii"),
        );
    }
    r
}

/// Pending connections the HTTP listener queues (the kernel caps it at
/// `net.core.somaxconn`, 4096 by default). A fleet powering on at once connects in one
/// burst: with the standard library's (and tokio's) 128, a 500-machine storm overflowed the
/// queue, the kernel fell back to SYN cookies and some connections were reset.
pub const HTTP_BACKLOG: u32 = 4096;

/// Binds the HTTP listener with [`HTTP_BACKLOG`].
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(HTTP_BACKLOG)
}

/// Serves HTTP/1.1 (keep-alive, no pipelining guarantees beyond in-order replies) on
/// `listener` until `shutdown` flips to true; connections finish the response in progress
/// (bounded to 10 s) and close.
///
/// A small server of our own rather than a general one: every route is a GET/HEAD without a
/// body, and artifact bodies go out with sendfile(2) — page cache to socket, as nginx does —
/// which a general server's body abstraction cannot express.
pub async fn serve(listener: TcpListener, app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    // Each connection holds a sender; when the last one is gone, recv() returns None.
    let (live, mut drained) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let token = live.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _token = token;
            if let Err(e) = connection(stream, &app, shutdown).await {
                tracing::debug!(%peer, "http connection: {e}");
            }
        });
    }
    drop(live);
    if tokio::time::timeout(Duration::from_secs(10), drained.recv())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open after 10 s; closing");
    }
}

/// A parsed request head: the request, the bytes it used, whether to close afterwards.
pub type Head = (Request<()>, usize, bool);

/// Parses one request head from `buf`; `Ok(None)` means more bytes are needed.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Request::new(&mut headers);
    let n = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("malformed request"),
    };
    let mut b = Request::builder()
        .method(r.method.unwrap_or("GET"))
        .uri(r.path.unwrap_or("/"));
    let mut close = r.version == Some(0);
    for h in r.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            close = v.contains("close") || (r.version == Some(0) && !v.contains("keep-alive"));
        }
        if (h.name.eq_ignore_ascii_case("content-length") && h.value.iter().any(|c| *c != b'0'))
            || h.name.eq_ignore_ascii_case("transfer-encoding")
        {
            return Err("request bodies are not accepted");
        }
        b = b.header(h.name, h.value);
    }
    let req = b.body(()).map_err(|_| "malformed request")?;
    Ok(Some((req, n, close)))
}

async fn connection(
    mut stream: TcpStream,
    app: &App,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let parsed = loop {
            match parse_head(&buf) {
                Ok(Some(p)) => break Ok(p),
                Ok(None) if buf.len() > MAX_HEAD => break Err("request head too large"),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            if *shutdown.borrow() {
                return Ok(());
            }
            let n = tokio::time::timeout(IDLE, stream.read_buf(&mut buf))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "idle"))??;
            if n == 0 {
                return Ok(());
            }
        };
        let (req, used, close) = match parsed {
            Ok(p) => p,
            Err(why) => {
                let r = text(StatusCode::BAD_REQUEST, why);
                write_response(&mut stream, &r, false, true).await?;
                app.metrics.http("other", 400);
                return Ok(());
            }
        };
        buf.advance(used);
        let resp = handle(app, &req).await;
        let close = close || *shutdown.borrow();
        write_response(&mut stream, &resp, req.method() == Method::HEAD, close).await?;
        if let Some(sf) = resp.extensions().get::<SendFile>() {
            stream.write_all(&sf.prefix).await?;
            send_file(&stream, sf).await?;
            stream.write_all(&sf.suffix).await?;
            app.metrics
                .http_bytes
                .inc_by(sf.prefix.len() as u64 + sf.len + sf.suffix.len() as u64);
        } else if req.method() != Method::HEAD {
            app.metrics.http_bytes.inc_by(resp.body().len() as u64);
        }
        if close {
            stream.shutdown().await?;
            return Ok(());
        }
    }
}

async fn write_response(
    stream: &mut TcpStream,
    r: &Response<Body>,
    head_only: bool,
    close: bool,
) -> std::io::Result<()> {
    let status = r.status();
    let mut out = Vec::with_capacity(256 + r.body().len());
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .as_bytes(),
    );
    for (k, v) in r.headers() {
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !r.headers().contains_key(header::CONTENT_LENGTH) {
        out.extend_from_slice(format!("content-length: {}\r\n", r.body().len()).as_bytes());
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(r.body());
    }
    stream.write_all(&out).await
}

/// Sends `sf` with sendfile(2), waiting for socket space when the kernel buffer is full.
async fn send_file(stream: &TcpStream, sf: &SendFile) -> std::io::Result<()> {
    let mut offset = sf.offset as i64;
    let end = (sf.offset + sf.len) as i64;
    while offset < end {
        let want = ((end - offset) as usize).min(1 << 30);
        let n = stream
            .async_io(Interest::WRITABLE, || {
                nix::sys::sendfile::sendfile(
                    stream.as_fd(),
                    sf.file.as_fd(),
                    Some(&mut offset),
                    want,
                )
                .map_err(std::io::Error::from)
            })
            .await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "artifact shorter than registered (changed on disk?)",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_head;

    #[test]
    fn request_heads() {
        let (r, n, close) = parse_head(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET")
            .unwrap()
            .unwrap();
        assert_eq!((r.uri().path(), n, close), ("/a", 28, false));
        let (_, _, close) = parse_head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(close);
        let (_, _, close) = parse_head(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(close, "HTTP/1.0 closes unless keep-alive");
        let (_, _, close) = parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!close);
        assert!(
            parse_head(b"GET / HTTP/1.1\r\nHost:").unwrap().is_none(),
            "partial"
        );
        for bad in [
            &b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"[..],
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"G\0T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/9.9\r\n\r\n",
        ] {
            assert!(parse_head(bad).is_err(), "{bad:?}");
        }
    }
}
