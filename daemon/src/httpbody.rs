//! A response body fed by a channel: a task (often a blocking one, reading the store) produces
//! the parts, the connection sends them as they come, and a slow reader holds the producer back
//! through the channel's bound instead of letting parts pile up in memory. Used by the local
//! API's and a gate's streamed exports and by the console's event stream.

use bytes::Bytes;
use hyper::body::Frame;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc::Receiver;

/// The body: each `Ok` part is a data frame; an `Err` ends the response with that error (the
/// connection is cut, so a client never takes a truncated body for a whole one).
pub struct ChannelBody<E> {
    rx: Receiver<Result<Bytes, E>>,
}

impl<E> ChannelBody<E> {
    pub fn new(rx: Receiver<Result<Bytes, E>>) -> Self {
        ChannelBody { rx }
    }
}

impl<E> hyper::body::Body for ChannelBody<E> {
    type Data = Bytes;
    type Error = E;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, E>>> {
        self.rx.poll_recv(cx).map(|part| part.map(|r| r.map(Frame::data)))
    }
}
