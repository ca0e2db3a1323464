//! HTTP/1.1 as the proxy speaks it to upstreams, with no I/O: a request's bytes
//! ([`encode_request`]), a response head taken from the bytes read so far ([`take_head`],
//! parsed by httparse), how its body is framed ([`Framing`], RFC 9112 6.3), and the
//! chunked decoder ([`Chunked`]). `upstream` does the reading and writing, in the
//! request's own task: no connection task, no channel between them.
//!
//! Limits: a response head of at most [`HEAD_BYTES_MAX`] bytes and [`HEADERS_MAX`]
//! fields, a chunk-size line of at most [`LINE_BYTES_MAX`] bytes.

use std::io::Write;

use bytes::{Buf, Bytes, BytesMut};
use hyper::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, COOKIE, HOST, TRANSFER_ENCODING};
use hyper::{HeaderMap, Method, StatusCode};

/// The largest response head read before the upstream is called broken.
pub const HEAD_BYTES_MAX: usize = 64 * 1024;
/// The most header fields in a response head.
pub const HEADERS_MAX: usize = 100;
/// The longest chunk-size or trailer line.
pub const LINE_BYTES_MAX: usize = 4 * 1024;

/// The request line, `host`, the client's fields but those of one hop and `content-length`
/// (written from the body), `x-forwarded-for` with `client` added, then the body: one
/// buffer, so one write(2) for most requests. Several `cookie` fields (as HTTP/2 sends
/// them) become one, joined by "; " (RFC 9113 8.2.3).
pub fn encode_request(
    method: &Method,
    path: &str,
    host: &HeaderValue,
    headers: &HeaderMap,
    client: &HeaderValue,
    body: &[u8],
) -> Vec<u8> {
    let fields: usize = headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    let mut out = Vec::with_capacity(method.as_str().len() + path.len() + host.len() + fields + body.len() + 96);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    let listed = connection_options(headers.get_all(CONNECTION).iter().map(HeaderValue::as_bytes));
    for name in headers.keys() {
        let skipped = name == HOST || name == CONTENT_LENGTH || name.as_str() == "x-forwarded-for";
        if skipped || hop_by_hop(name.as_str(), &listed) {
            continue;
        }
        let values = headers.get_all(name).iter().map(HeaderValue::as_bytes);
        if name == COOKIE {
            field(&mut out, name.as_str(), values, b"; ");
        } else {
            for value in values {
                field(&mut out, name.as_str(), std::iter::once(value), b"");
            }
        }
    }
    // The proxies before, then this client (as nginx's $proxy_add_x_forwarded_for).
    let before = headers.get_all("x-forwarded-for").iter().map(HeaderValue::as_bytes);
    field(&mut out, "x-forwarded-for", before.chain([client.as_bytes()]), b", ");
    // Like hyper and curl: no `content-length: 0` on methods whose requests carry no body.
    let bodiless = matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    );
    if !body.is_empty() || !bodiless {
        // Writing to a Vec cannot fail.
        let _ = write!(out, "content-length: {}\r\n", body.len());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// One field line, its values joined by `separator`.
fn field<'a>(out: &mut Vec<u8>, name: &str, values: impl Iterator<Item = &'a [u8]>, separator: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    for (i, value) in values.enumerate() {
        if i > 0 {
            out.extend_from_slice(separator);
        }
        out.extend_from_slice(value);
    }
    out.extend_from_slice(b"\r\n");
}

/// Fields that concern one hop only (RFC 9110 7.6.1), never passed on: the fixed ones,
/// and those the message's `connection` field names (`listed`).
fn hop_by_hop(name: &str, listed: &[String]) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    ) || listed.iter().any(|l| l == name)
}

/// The field names in `connection` values, lower case, but `close` and `keep-alive`
/// (hop-by-hop anyway). Empty, without allocating, for nearly every message.
fn connection_options<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<String> {
    let mut listed = Vec::new();
    for value in values {
        for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
            let usual = token.eq_ignore_ascii_case(b"close") || token.eq_ignore_ascii_case(b"keep-alive");
            if !token.is_empty() && !usual {
                listed.push(String::from_utf8_lossy(token).to_ascii_lowercase());
            }
        }
    }
    listed
}

/// How a response's body ends (RFC 9112 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// None: a response to HEAD, a 204 or a 304.
    Empty,
    /// `content-length` bytes.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Whatever comes until the upstream closes the connection.
    UntilClose,
}

/// A response head, taken off the front of the bytes read.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// Whether the connection may carry another request once the body is read.
    pub keep_alive: bool,
}

/// The final response head at the front of `buf`, removed from it with any informational
/// (1xx) heads before it; `None` until all of it has been read. Its fields are those to pass
/// on: those of one hop are left out. Their values share the head's bytes rather than
/// being copied.
pub fn take_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, String> {
    loop {
        // Where each field lies in `buf`, to be sliced once the head is split off.
        let (status, minor, fields, length) = {
            let mut slots = [httparse::EMPTY_HEADER; HEADERS_MAX];
            let mut response = httparse::Response::new(&mut slots);
            let length = match response.parse(buf) {
                Ok(httparse::Status::Complete(length)) => length,
                Ok(httparse::Status::Partial) if buf.len() > HEAD_BYTES_MAX => {
                    return Err(format!("sent a response head longer than {HEAD_BYTES_MAX} bytes"))
                }
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(e) => return Err(format!("sent a malformed response head: {e}")),
            };
            let status = response.code.unwrap_or(0);
            let minor = response.version.unwrap_or(1);
            let start = buf.as_ptr() as usize;
            let mut fields = Vec::with_capacity(response.headers.len());
            for field in response.headers.iter() {
                let name = HeaderName::from_bytes(field.name.as_bytes())
                    .map_err(|_| format!("sent an invalid header name {:?}", field.name))?;
                let at = field.value.as_ptr() as usize - start;
                fields.push((name, at, at + field.value.len()));
            }
            (status, minor, fields, length)
        };
        let bytes = buf.split_to(length).freeze();
        if (100..200).contains(&status) {
            if status == 101 {
                return Err("switched protocols, which the proxy does not pass on".to_string());
            }
            // 100 Continue, 103 Early Hints: the final response follows.
            continue;
        }
        let status = StatusCode::from_u16(status).map_err(|_| format!("sent status {status}, which is not one"))?;
        let fields: Vec<(HeaderName, Bytes)> = fields
            .into_iter()
            .map(|(name, from, to)| (name, bytes.slice(from..to)))
            .collect();
        let (framing, reusable) = framing(status, &fields, head_request)?;
        let keep_alive = reusable && keeps_alive(minor, &fields);
        let listed = connection_options(values(&fields, &CONNECTION));
        let mut headers = HeaderMap::with_capacity(fields.len());
        for (name, value) in fields {
            if hop_by_hop(name.as_str(), &listed) {
                continue;
            }
            let value = HeaderValue::from_maybe_shared(value)
                .map_err(|_| format!("sent an invalid value for header {name}"))?;
            headers.append(name, value);
        }
        return Ok(Some(Head {
            status,
            headers,
            framing,
            keep_alive,
        }));
    }
}

/// The values of the fields named `name`.
fn values<'a>(fields: &'a [(HeaderName, Bytes)], name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> {
    fields.iter().filter(move |(n, _)| n == name).map(|(_, v)| v.as_ref())
}

/// The body's framing, and whether the connection is sound after it (RFC 9112 6.3).
fn framing(status: StatusCode, fields: &[(HeaderName, Bytes)], head_request: bool) -> Result<(Framing, bool), String> {
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Empty, true));
    }
    if let Some(last) = values(fields, &TRANSFER_ENCODING).last() {
        let chunked_last = last
            .rsplit(|b| *b == b',')
            .next()
            .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        // Both framings at once may be an attempt at request smuggling: the connection is
        // not used again (RFC 9112 6.1).
        let sound = values(fields, &CONTENT_LENGTH).next().is_none();
        return Ok(if chunked_last {
            (Framing::Chunked, sound)
        } else {
            (Framing::UntilClose, false)
        });
    }
    let mut length = None;
    for value in values(fields, &CONTENT_LENGTH) {
        for part in value.split(|b| *b == b',') {
            let part = part.trim_ascii();
            let parsed = std::str::from_utf8(part)
                .ok()
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u64>().ok())
                .ok_or_else(|| format!("sent an invalid content-length {:?}", String::from_utf8_lossy(part)))?;
            if length.is_some_and(|l| l != parsed) {
                return Err("sent differing content-length values".to_string());
            }
            length = Some(parsed);
        }
    }
    Ok(match length {
        Some(length) => (Framing::Length(length), true),
        None => (Framing::UntilClose, false),
    })
}

/// HTTP/1.1 keeps the connection unless told `close`; HTTP/1.0 only if told `keep-alive`.
fn keeps_alive(minor: u8, fields: &[(HeaderName, Bytes)]) -> bool {
    let has = |token: &[u8]| {
        values(fields, &CONNECTION)
            .flat_map(|v| v.split(|b| *b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
    };
    if minor >= 1 {
        !has(b"close")
    } else {
        has(b"keep-alive")
    }
}

/// A chunked body being decoded from the bytes read so far.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Before a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk, this many bytes to go.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer fields (dropped), up to the empty line.
    Trailer,
    Done,
}

/// What the decoder made of the bytes it has.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// More bytes are needed.
    More,
    /// The last chunk and the trailer have been read.
    End,
}

impl Chunked {
    /// The next piece of the body from `buf`, consuming what it used.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, String> {
        loop {
            match self.state {
                ChunkState::Done => return Ok(Decoded::End),
                ChunkState::Size => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::More);
                    };
                    let size = chunk_size(&line)?;
                    self.state = if size == 0 {
                        ChunkState::Trailer
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Decoded::Data(data));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("sent a chunk longer than its size".to_string());
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailer => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::More);
                    };
                    if line.is_empty() {
                        self.state = ChunkState::Done;
                    }
                }
            }
        }
    }
}

/// A CRLF-ended line off the front of `buf`, without its CRLF.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, String> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(end) => {
            let mut line = buf.split_to(end + 2);
            line.truncate(end);
            Ok(Some(line))
        }
        None if buf.len() > LINE_BYTES_MAX => Err(format!("sent a chunk line longer than {LINE_BYTES_MAX} bytes")),
        None => Ok(None),
    }
}

/// The size in a chunk-size line (hex digits, then any `;extension`).
fn chunk_size(line: &[u8]) -> Result<u64, String> {
    let digits = line.split(|b| *b == b';').next().unwrap_or_default().trim_ascii();
    let invalid = || format!("sent an invalid chunk size {:?}", String::from_utf8_lossy(line));
    if digits.is_empty() || digits.len() > 15 {
        return Err(invalid());
    }
    let text = std::str::from_utf8(digits).map_err(|_| invalid())?;
    u64::from_str_radix(text, 16).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str, head_request: bool) -> (Result<Option<Head>, String>, BytesMut) {
        let mut buf = BytesMut::from(raw);
        let head = take_head(&mut buf, head_request);
        (head, buf)
    }

    #[test]
    fn a_request_is_written_with_host_its_body_length_and_the_client_added_to_x_forwarded_for() {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_static("ignored"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("999"));
        headers.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        headers.append(COOKIE, HeaderValue::from_static("a=1"));
        headers.append(COOKIE, HeaderValue::from_static("b=2"));
        for hop in ["keep-alive", "te", "transfer-encoding", "upgrade", "x-hop"] {
            headers.insert(hop, HeaderValue::from_static("1"));
        }
        headers.insert(CONNECTION, HeaderValue::from_static("Upgrade, X-Hop"));
        let (host, client) = (HeaderValue::from_static("svc"), HeaderValue::from_static("10.0.0.2"));
        let bytes = encode_request(&Method::POST, "/x?y=1", &host, &headers, &client, b"hello");
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "POST /x?y=1 HTTP/1.1\r\nhost: svc\r\ncookie: a=1; b=2\r\nx-forwarded-for: 10.0.0.1, 10.0.0.2\r\ncontent-length: 5\r\n\r\nhello"
        );
        let get = encode_request(&Method::GET, "/", &host, &HeaderMap::new(), &client, b"");
        assert_eq!(
            String::from_utf8(get).unwrap(),
            "GET / HTTP/1.1\r\nhost: svc\r\nx-forwarded-for: 10.0.0.2\r\n\r\n"
        );
        let put = encode_request(&Method::PUT, "/", &host, &HeaderMap::new(), &client, b"");
        assert!(String::from_utf8(put).unwrap().ends_with("content-length: 0\r\n\r\n"));
    }

    #[test]
    fn fields_of_one_hop_are_left_out_of_a_response() {
        let raw = "HTTP/1.1 200 OK\r\nconnection: keep-alive, x-hop\r\nkeep-alive: timeout=5\r\nx-hop: 1\r\n\
                   transfer-encoding: chunked\r\nx-kept: 2\r\n\r\n";
        let parsed = head(raw, false).0.unwrap().unwrap();
        assert_eq!((parsed.framing, parsed.keep_alive), (Framing::Chunked, true));
        let names: Vec<&str> = parsed.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn a_head_waits_for_its_end_then_leaves_the_body_in_the_buffer() {
        let (parsed, _) = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n", false);
        assert!(parsed.unwrap().is_none());
        let (parsed, rest) = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello", false);
        let parsed = parsed.unwrap().unwrap();
        assert_eq!(parsed.status, StatusCode::OK);
        assert_eq!(parsed.framing, Framing::Length(5));
        assert!(parsed.keep_alive);
        assert_eq!(parsed.headers["x-a"], "b");
        assert_eq!(&rest[..], b"hello");
    }

    #[test]
    fn informational_heads_are_skipped() {
        let (parsed, rest) = head(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
            false,
        );
        assert_eq!(parsed.unwrap().unwrap().status, StatusCode::CREATED);
        assert!(rest.is_empty());
        let (parsed, _) = head("HTTP/1.1 101 Switching Protocols\r\n\r\n", false);
        assert!(parsed.is_err());
    }

    #[test]
    fn framing_follows_rfc_9112() {
        // (head, to a HEAD request, framing, connection kept)
        let cases = [
            ("HTTP/1.1 200 OK\r\ncontent-length: 5", true, Framing::Empty, true),
            ("HTTP/1.1 204 No Content", false, Framing::Empty, true),
            ("HTTP/1.1 304 Not Modified", false, Framing::Empty, true),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked",
                false,
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3",
                false,
                Framing::Chunked,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip",
                false,
                Framing::UntilClose,
                false,
            ),
            ("HTTP/1.1 200 OK", false, Framing::UntilClose, false),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close",
                false,
                Framing::Length(3),
                false,
            ),
            ("HTTP/1.0 200 OK\r\ncontent-length: 3", false, Framing::Length(3), false),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 3\r\nconnection: Keep-Alive",
                false,
                Framing::Length(3),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 3, 3",
                false,
                Framing::Length(3),
                true,
            ),
        ];
        for (raw, head_request, framing, keep_alive) in cases {
            let parsed = head(&format!("{raw}\r\n\r\n"), head_request).0.unwrap().unwrap();
            assert_eq!((parsed.framing, parsed.keep_alive), (framing, keep_alive), "{raw:?}");
        }
        for bad in [
            "content-length: 3\r\ncontent-length: 4",
            "content-length: -1",
            "content-length: 0x10",
        ] {
            let raw = format!("HTTP/1.1 200 OK\r\n{bad}\r\n\r\n");
            assert!(head(&raw, false).0.is_err(), "{bad}");
        }
    }

    #[test]
    fn a_malformed_or_endless_head_is_an_error() {
        assert!(head("HTTP/1.1 abc\r\n\r\n", false).0.is_err());
        let endless = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(HEAD_BYTES_MAX));
        assert!(head(&endless, false).0.is_err());
    }

    #[test]
    fn chunks_are_decoded_across_reads_and_trailers_dropped() {
        let mut decoder = Chunked::default();
        let mut buf = BytesMut::from("5;ext=1\r\nhel");
        assert_eq!(decoder.decode(&mut buf).unwrap(), Decoded::Data(Bytes::from("hel")));
        assert_eq!(decoder.decode(&mut buf).unwrap(), Decoded::More);
        buf.extend_from_slice(b"lo\r");
        assert_eq!(decoder.decode(&mut buf).unwrap(), Decoded::Data(Bytes::from("lo")));
        assert_eq!(decoder.decode(&mut buf).unwrap(), Decoded::More);
        buf.extend_from_slice(b"\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n");
        assert_eq!(
            decoder.decode(&mut buf).unwrap(),
            Decoded::Data(Bytes::from("0123456789"))
        );
        assert_eq!(decoder.decode(&mut buf).unwrap(), Decoded::More);
        buf.extend_from_slice(b"\r\nnext");
        assert_eq!(decoder.decode(&mut buf).unwrap(), Decoded::End);
        assert_eq!(&buf[..], b"next");
    }

    #[test]
    fn bad_chunks_are_errors() {
        for raw in ["zz\r\n", "5\r\nhelloXX", "\r\n", "fffffffffffffffff\r\n"] {
            let mut decoder = Chunked::default();
            let mut buf = BytesMut::from(raw);
            let mut outcome = decoder.decode(&mut buf);
            while let Ok(Decoded::Data(_)) = outcome {
                outcome = decoder.decode(&mut buf);
            }
            assert!(outcome.is_err(), "{raw:?}: {outcome:?}");
        }
        let mut buf = BytesMut::from(vec![b'1'; LINE_BYTES_MAX + 1].as_slice());
        assert!(Chunked::default().decode(&mut buf).is_err());
    }
}
