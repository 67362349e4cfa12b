//! A stream that first replays bytes already read from it.
//!
//! The proxy must read a connection's first bytes to know what it speaks ([`super::sniff`]), and
//! then hand the whole stream, those bytes included, to rustls, hyper or a raw tunnel. Reading
//! (rather than `MSG_PEEK`) keeps the wait for "enough bytes" an ordinary await.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed { prefix, pos: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(rest) = this.prefix.get(this.pos..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(rest.get(..n).unwrap_or_default());
            this.pos += n;
            if this.pos >= this.prefix.len() {
                this.prefix = Vec::new(); // free it
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

// Writes go straight to the wrapped stream: only reads are watched or replayed.
delegate_async_write!(Prefixed);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn replays_prefix_then_reads_inner() {
        let inner: &[u8] = b" world";
        let mut s = Prefixed::new(b"hello".to_vec(), inner);
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[tokio::test]
    async fn small_reads_split_the_prefix() {
        let inner: &[u8] = b"";
        let mut s = Prefixed::new(b"abcdef".to_vec(), inner);
        let mut buf = [0u8; 4];
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"abcd");
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ef");
        assert_eq!(s.read(&mut buf).await.unwrap(), 0);
    }
}
