//! A second, independent reading of an HTTP/1 request stream, only to refuse ambiguous framing.
//!
//! hyper copes with smuggling shapes by normalising them: given `Content-Length` and
//! `Transfer-Encoding: chunked` it drops the length header and closes after the response; a
//! repeated identical `Content-Length` is silently merged. The request it hands us then *looks*
//! clean, so a check on hyper's header map cannot see the attack, and the request would be
//! forwarded. Such requests are refused (and attested), never repaired.
//!
//! [`Watched`] wraps the agent's (decrypted) byte stream below hyper. [`Tracker`] follows the
//! stream as HTTP/1 framing dictates (head, then a `Content-Length` or chunked body, then the
//! next head) and, for each request head in order, queues a verdict: `Ok` or a
//! [`Refusal`] (`Content-Length` with `Transfer-Encoding`, several `Content-Length` headers, a
//! `Transfer-Encoding` that is not exactly `chunked`, obsolete line folding, a line ending in a
//! bare LF). hyper handles one
//! HTTP/1 request at a time and can only parse bytes after they passed through the wrapper, so
//! the n-th request hyper gives us takes the n-th verdict ([`Verdicts::next`]).
//!
//! After `CONNECT`, an `Upgrade`, or anything it cannot follow, the tracker stops; any later
//! request finds no verdict and is refused (fail closed).

use super::checks::Refusal;
use crate::decide::Reason;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

/// Longest chunk-size or trailer line followed.
const MAX_LINE: usize = 4096;

/// Verdicts for request heads, in stream order, shared by the wrapper and the request handler.
#[derive(Debug, Clone, Default)]
pub struct Verdicts(Arc<Mutex<VecDeque<Result<(), Refusal>>>>);

impl Verdicts {
    /// The verdict of the next request; `None` if the tracker could not follow the stream.
    pub fn next(&self) -> Option<Result<(), Refusal>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).pop_front()
    }

    fn push(&self, v: Result<(), Refusal>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push_back(v);
    }
}

#[derive(Debug)]
enum State {
    Head(Vec<u8>),
    Body(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    /// The CRLF after a chunk's data: how many of its two bytes are still expected.
    ChunkEnd(u8),
    Trailers(Vec<u8>),
    /// Stopped following (tunnel, or framing it cannot follow).
    Stopped,
}

/// Follows HTTP/1 request framing over a byte stream.
#[derive(Debug)]
pub struct Tracker {
    state: State,
    max_head: usize,
    verdicts: Verdicts,
}

impl Tracker {
    pub fn new(max_head: usize, verdicts: Verdicts) -> Tracker {
        Tracker { state: State::Head(Vec::new()), max_head, verdicts }
    }

    /// Feeds bytes as they are read from the agent.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let state = std::mem::replace(&mut self.state, State::Stopped);
            let (next, used) = self.step(state, bytes);
            self.state = next;
            if matches!(self.state, State::Stopped) {
                return;
            }
            bytes = bytes.get(used..).unwrap_or_default();
        }
    }

    fn step(&mut self, state: State, bytes: &[u8]) -> (State, usize) {
        match state {
            State::Stopped => (State::Stopped, bytes.len()),
            State::Head(mut head) => {
                // Leading empty lines before a request line are allowed (RFC 9112 §2.2) and
                // hyper skips them too.
                if head.is_empty() {
                    let skip = bytes.iter().take_while(|b| **b == b'\r' || **b == b'\n').count();
                    if skip > 0 {
                        return (State::Head(head), skip);
                    }
                }
                if head.is_empty() {
                    // A head that arrives whole in one read (the usual case) is judged where it
                    // lies: no copy, no allocation per request.
                    if let Some(end) = find(bytes, b"\r\n\r\n").map(|i| i + 4) {
                        let whole = bytes.get(..end).unwrap_or_default();
                        return (self.judged(whole), end);
                    }
                }
                let start = head.len().saturating_sub(3);
                head.extend_from_slice(bytes);
                let Some(end) = find(head.get(start..).unwrap_or_default(), b"\r\n\r\n").map(|i| start + i + 4) else {
                    if head.len() > self.max_head {
                        return (State::Stopped, bytes.len()); // hyper refuses it too
                    }
                    return (State::Head(head), bytes.len());
                };
                let used = bytes.len() - (head.len() - end);
                head.truncate(end);
                (self.judged(&head), used)
            }
            State::Body(left) => {
                let take = (bytes.len() as u64).min(left);
                let left = left - take;
                let next = if left == 0 { State::Head(Vec::new()) } else { State::Body(left) };
                (next, take as usize)
            }
            State::ChunkSize(mut line) => match line_end(&mut line, bytes) {
                LineStep::More(used) if line.len() <= MAX_LINE => (State::ChunkSize(line), used),
                LineStep::More(_) => (State::Stopped, bytes.len()),
                LineStep::Done(used) => {
                    let text = String::from_utf8_lossy(&line);
                    let size = text.split(';').next().unwrap_or("").trim();
                    match u64::from_str_radix(size, 16) {
                        Ok(0) => (State::Trailers(Vec::new()), used),
                        Ok(n) if !size.is_empty() && size.len() <= 16 => (State::ChunkData(n), used),
                        _ => (State::Stopped, used),
                    }
                }
            },
            State::ChunkData(left) => {
                let take = (bytes.len() as u64).min(left);
                let left = left - take;
                let next = if left == 0 { State::ChunkEnd(2) } else { State::ChunkData(left) };
                (next, take as usize)
            }
            State::ChunkEnd(n) => {
                let want: &[u8] = if n == 2 { b"\r\n" } else { b"\n" };
                let Some(&b) = bytes.first() else { return (State::ChunkEnd(n), 0) };
                if want.first() != Some(&b) {
                    return (State::Stopped, bytes.len());
                }
                (if n == 2 { State::ChunkEnd(1) } else { State::ChunkSize(Vec::new()) }, 1)
            }
            State::Trailers(mut line) => match line_end(&mut line, bytes) {
                LineStep::More(used) if line.len() <= MAX_LINE => (State::Trailers(line), used),
                LineStep::More(_) => (State::Stopped, bytes.len()),
                LineStep::Done(used) if line.is_empty() => (State::Head(Vec::new()), used),
                LineStep::Done(used) => (State::Trailers(Vec::new()), used),
            },
        }
    }
}

impl Tracker {
    /// Queues the verdict on one whole request head and says what follows it.
    fn judged(&mut self, head: &[u8]) -> State {
        let (verdict, body) = judge(head);
        self.verdicts.push(verdict);
        match body {
            Body::None => State::Head(Vec::new()),
            Body::Length(0) => State::Head(Vec::new()),
            Body::Length(n) => State::Body(n),
            Body::Chunked => State::ChunkSize(Vec::new()),
            Body::Opaque => State::Stopped,
        }
    }
}

enum LineStep {
    /// Consumed this many bytes, line not finished.
    More(usize),
    /// Consumed this many bytes (including CRLF); `line` holds the line without it.
    Done(usize),
}

/// Appends to `line` up to and including the next LF; strips the CR LF.
fn line_end(line: &mut Vec<u8>, bytes: &[u8]) -> LineStep {
    match bytes.iter().position(|b| *b == b'\n') {
        None => {
            line.extend_from_slice(bytes);
            LineStep::More(bytes.len())
        }
        Some(i) => {
            line.extend_from_slice(bytes.get(..i).unwrap_or_default());
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            LineStep::Done(i + 1)
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

enum Body {
    None,
    Length(u64),
    Chunked,
    Opaque,
}

/// The verdict on one request head (ending in CRLF CRLF) and how its body is framed.
fn judge(head: &[u8]) -> (Result<(), Refusal>, Body) {
    let smuggling = |detail: &str| Refusal { reason: Reason::RequestSmuggling, detail: detail.to_string() };
    // httparse (hyper's parser) also ends a line at a bare LF, where this reading (CRLF only)
    // would see one longer line: `Content-Length: 5\nTransfer-Encoding: chunked` is two headers
    // to hyper and none to us. Refused, and the stream is not followed further (its framing is
    // not the one hyper reads), so no later request gets a verdict. Found by fuzzing.
    if head.first() == Some(&b'\n') || head.windows(2).any(|w| matches!(w, [a, b'\n'] if *a != b'\r')) {
        return (
            Err(smuggling("The request head has a line that ends in a bare LF; end every line with CRLF.")),
            Body::Opaque,
        );
    }
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let connect = request_line.starts_with("CONNECT ");
    let mut cl: Vec<&str> = Vec::new();
    let mut te: Vec<&str> = Vec::new();
    let mut upgrade = false;
    let mut verdict = Ok(());
    for line in lines.filter(|l| !l.is_empty()) {
        if line.starts_with(' ') || line.starts_with('\t') {
            verdict = Err(smuggling("The request uses obsolete header line folding."));
            continue;
        }
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            cl.push(value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            te.push(value);
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    let te_ok = match te.as_slice() {
        [] => true,
        [one] => one.eq_ignore_ascii_case("chunked"),
        _ => false,
    };
    if verdict.is_ok() {
        verdict = if cl.len() > 1 {
            Err(smuggling("The request has more than one Content-Length header."))
        } else if !cl.is_empty() && !te.is_empty() {
            Err(smuggling("The request has both Content-Length and Transfer-Encoding; send one of them."))
        } else if !te_ok {
            Err(smuggling("Transfer-Encoding must be exactly one \"chunked\" (no lists, no other codings)."))
        } else {
            Ok(())
        };
    }
    let body = if connect || upgrade {
        Body::Opaque
    } else if !te.is_empty() {
        // hyper reads a chunked body whenever chunked is present; follow it the same way.
        if te.iter().any(|v| v.to_ascii_lowercase().contains("chunked")) {
            Body::Chunked
        } else {
            Body::Opaque
        }
    } else if let Some(v) = cl.first() {
        match v.parse::<u64>() {
            Ok(n) if v.bytes().all(|b| b.is_ascii_digit()) => Body::Length(n),
            _ => Body::Opaque,
        }
    } else {
        Body::None
    };
    (verdict, body)
}

/// The agent's stream, with every byte read also fed to a [`Tracker`].
pub struct Watched<S> {
    inner: S,
    tracker: Tracker,
}

impl<S> Watched<S> {
    pub fn new(inner: S, max_head: usize) -> (Watched<S>, Verdicts) {
        let verdicts = Verdicts::default();
        (Watched { inner, tracker: Tracker::new(max_head, verdicts.clone()) }, verdicts)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            this.tracker.feed(buf.filled().get(before..).unwrap_or_default());
        }
        poll
    }
}

// Writes go straight to the wrapped stream: only reads are watched or replayed.
delegate_async_write!(Watched);

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts_of(stream: &[u8], split: usize) -> Vec<Result<(), Reason>> {
        let v = Verdicts::default();
        let mut t = Tracker::new(64 * 1024, v.clone());
        for chunk in stream.chunks(split.max(1)) {
            t.feed(chunk);
        }
        std::iter::from_fn(|| v.next()).map(|r| r.map_err(|e| e.reason)).collect()
    }

    fn every_split(stream: &[u8]) -> Vec<Result<(), Reason>> {
        let first = verdicts_of(stream, stream.len());
        for split in 1..stream.len().min(64) {
            assert_eq!(verdicts_of(stream, split), first, "split {split}");
        }
        first
    }

    #[test]
    fn keep_alive_requests_with_bodies_each_get_a_verdict() {
        let s = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
                  POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
                  POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
                  GET /d HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(every_split(s), vec![Ok(()), Ok(()), Ok(()), Ok(())]);
    }

    #[test]
    fn cl_te_is_refused_and_the_hidden_request_never_counts_as_clean() {
        // Content-Length says the body is "0\r\n\r\nGET /smuggled..."; chunked says it is empty.
        let s = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n\
                  0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
        let v = every_split(s);
        assert_eq!(v.first(), Some(&Err(Reason::RequestSmuggling)));
    }

    #[test]
    fn te_cl_order_and_duplicates_and_folding_are_refused() {
        let cases: &[&[u8]] = &[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-LENGTH: 1\r\nTRANSFER-encoding: chunked\r\n\r\n0\r\n\r\n",
        ];
        for c in cases {
            assert_eq!(every_split(c).first(), Some(&Err(Reason::RequestSmuggling)), "{}", String::from_utf8_lossy(c));
        }
    }

    /// Found by fuzzing (`fuzz/corpus/h1watch/bare-lf-te`): hyper's parser ends a header line at a
    /// bare LF, so `X: 44\nTransfer-Encoding: chunked` hid a Transfer-Encoding header from this
    /// reading and the request was judged clean. Such heads are refused, and nothing after them
    /// gets a verdict.
    #[test]
    fn a_bare_lf_that_hides_a_header_is_refused_and_stops_tracking() {
        let found = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-th: 44\x81\nTransfer-Encoding: chunkednked\r\n\r\n\
                      0\r\n\r\nGET /smuggl,d HTTP/1.1\r\nHo\nT: x\r\n\r\n";
        assert_eq!(every_split(found), vec![Err(Reason::RequestSmuggling)]);
        let hidden_te = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\nTransfer-Encoding: chunked\r\n\r\n\
                          0\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(every_split(hidden_te), vec![Err(Reason::RequestSmuggling)]);
        // A head hyper ends at LF LF swallows the next request into "one head" here: refused too.
        let lf_head =
            b"GET / HTTP/1.1\nHost: x\n\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n\
                        0\r\n\r\nGET /clean HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(every_split(lf_head), vec![Err(Reason::RequestSmuggling)]);
    }

    #[test]
    fn tracking_stops_after_upgrade_connect_and_garbage() {
        let s =
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nGET /x HTTP/1.1\r\n\r\n";
        assert_eq!(every_split(s), vec![Ok(())]);
        let s = b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\nGET /y HTTP/1.1\r\n\r\n";
        assert_eq!(every_split(s), vec![Ok(())]);
        let s = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nGET /z HTTP/1.1\r\n\r\n";
        assert_eq!(every_split(s), vec![Ok(())]);
    }

    #[test]
    fn oversized_heads_stop_tracking() {
        let v = Verdicts::default();
        let mut t = Tracker::new(100, v.clone());
        t.feed(&[b'a'; 200]);
        t.feed(b"\r\n\r\n");
        assert!(v.next().is_none());
    }
}
