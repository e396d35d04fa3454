//! Accepts any HTTP/2 `:authority` on unix-socket connections.
//!
//! gRPC clients in C-core (grpcio) and recent grpc-go (the kubelet's
//! registration client) send the percent-encoded socket path as
//! `:authority`. The HTTP/2 layer under tonic refuses it as a malformed URI
//! and resets every stream. On a unix socket the authority means nothing, so
//! [`AuthorityFix`] decodes each request header block from the client,
//! replaces an authority that is not a valid URI authority with `localhost`,
//! and re-encodes the block without the dynamic table. Every other byte
//! passes through unchanged. A connection whose first request carries a valid
//! authority (Go and Rust clients send `localhost`) is passed through
//! untouched from then on, without decoding.

use bytes::{Buf, BufMut, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Largest frame payload we emit: the minimum every peer must accept.
const MAX_OUT_FRAME: usize = 16_384;
/// Largest header block we buffer before giving up on the connection.
const MAX_BLOCK: usize = 1 << 20;
/// What replaces an authority the HTTP/2 layer would reject.
const REPLACEMENT: &[u8] = b"localhost";

/// A header block being collected across HEADERS and CONTINUATION frames.
struct Block {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// The frames as received, for a block that needs no change.
    raw: Vec<u8>,
}

enum Mode {
    /// Waiting for the client connection preface.
    Preface,
    /// Reading frames and rewriting header blocks.
    Frames,
    /// Something unexpected: forward bytes untouched and let HTTP/2 judge.
    Passthrough,
}

/// Wraps a server-side connection; see the module documentation.
pub struct AuthorityFix<S> {
    inner: S,
    mode: Mode,
    input: BytesMut,
    output: BytesMut,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    /// An earlier block was re-encoded, so every later one must be too (the
    /// server's HPACK table no longer matches the client's).
    rewriting: bool,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    /// Wraps a freshly accepted connection.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            mode: Mode::Preface,
            input: BytesMut::with_capacity(8192),
            output: BytesMut::with_capacity(8192),
            block: None,
            decoder: loona_hpack::Decoder::new(),
            rewriting: false,
            eof: false,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn passthrough(&mut self) {
        self.mode = Mode::Passthrough;
        self.dump_raw();
    }

    /// Hands over the partial block and unparsed input as they were, so
    /// HTTP/2 fails the way it would have without us.
    fn dump_raw(&mut self) {
        if let Some(b) = self.block.take() {
            let flags = b.flags & !PRIORITY;
            frame(&mut self.output, HEADERS, flags, b.stream, &b.fragment);
        }
        let rest = self.input.split();
        self.output.extend_from_slice(&rest);
    }

    /// Moves whatever complete units `input` holds to `output`.
    fn process(&mut self) {
        loop {
            match self.mode {
                Mode::Passthrough => {
                    let rest = self.input.split();
                    self.output.extend_from_slice(&rest);
                    return;
                }
                Mode::Preface => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        return self.passthrough();
                    }
                    if n < PREFACE.len() {
                        return;
                    }
                    let p = self.input.split_to(PREFACE.len());
                    self.output.extend_from_slice(&p);
                    self.mode = Mode::Frames;
                }
                Mode::Frames => {
                    if self.input.len() < FRAME_HEADER {
                        return;
                    }
                    let h = &self.input[..FRAME_HEADER];
                    let len =
                        (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                    let (kind, flags) = (h[3], h[4]);
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    if self.input.len() < FRAME_HEADER + len {
                        return;
                    }
                    match kind {
                        HEADERS if self.block.is_none() => {
                            let raw = self.input.split_to(FRAME_HEADER + len);
                            if !self.start_block(&raw, stream, flags) {
                                self.output.extend_from_slice(&raw);
                                return self.passthrough();
                            }
                        }
                        CONTINUATION if self.block.as_ref().is_some_and(|b| b.stream == stream) => {
                            let raw = self.input.split_to(FRAME_HEADER + len);
                            let b = self.block.as_mut().expect("checked above");
                            b.fragment.extend_from_slice(&raw[FRAME_HEADER..]);
                            b.raw.extend_from_slice(&raw);
                            b.flags |= flags & END_HEADERS;
                            if b.fragment.len() > MAX_BLOCK {
                                return self.passthrough();
                            }
                        }
                        _ if self.block.is_some() => return self.passthrough(),
                        _ => {
                            let raw = self.input.split_to(FRAME_HEADER + len);
                            self.output.extend_from_slice(&raw);
                        }
                    }
                    if self
                        .block
                        .as_ref()
                        .is_some_and(|b| b.flags & END_HEADERS != 0)
                        && !self.finish_block()
                    {
                        return self.passthrough();
                    }
                }
            }
        }
    }

    /// Starts collecting a HEADERS frame's block; false when it is malformed.
    fn start_block(&mut self, raw: &[u8], stream: u32, flags: u8) -> bool {
        let mut p = &raw[FRAME_HEADER..];
        let mut pad = 0usize;
        if flags & PADDED != 0 {
            let Some((&n, rest)) = p.split_first() else {
                return false;
            };
            pad = usize::from(n);
            p = rest;
        }
        let mut priority = None;
        if flags & PRIORITY != 0 {
            if p.len() < 5 {
                return false;
            }
            let mut pr = [0u8; 5];
            pr.copy_from_slice(&p[..5]);
            priority = Some(pr);
            p = &p[5..];
        }
        if pad > p.len() {
            return false;
        }
        self.block = Some(Block {
            stream,
            flags: flags & !PADDED,
            priority,
            fragment: p[..p.len() - pad].to_vec(),
            raw: raw.to_vec(),
        });
        true
    }

    /// Decodes the collected block, fixes the authority and emits it again;
    /// false when the block does not decode.
    fn finish_block(&mut self) -> bool {
        let Some(b) = self.block.take() else {
            return true;
        };
        let mut encoded = Vec::with_capacity(b.fragment.len() * 2);
        let mut replaced = false;
        let decoded = self.decoder.decode_with_cb(&b.fragment, |name, value| {
            let value: &[u8] = if &*name == b":authority" && !valid_authority(&value) {
                replaced = true;
                REPLACEMENT
            } else {
                &value
            };
            literal(&mut encoded, &name, value);
        });
        if decoded.is_err() {
            self.block = Some(b);
            return false;
        }
        if !replaced && !self.rewriting {
            // Nothing to fix so far: hand the connection over as it is.
            self.output.extend_from_slice(&b.raw);
            self.mode = Mode::Passthrough;
            return true;
        }
        self.rewriting = true;
        let mut chunks = encoded.chunks(MAX_OUT_FRAME - 5).peekable();
        let first = chunks.next().unwrap_or_default();
        let mut flags = b.flags & (END_STREAM | PRIORITY);
        if chunks.peek().is_none() {
            flags |= END_HEADERS;
        }
        let mut payload = Vec::with_capacity(first.len() + 5);
        if let Some(pr) = b.priority {
            payload.extend_from_slice(&pr);
        }
        payload.extend_from_slice(first);
        frame(&mut self.output, HEADERS, flags, b.stream, &payload);
        while let Some(c) = chunks.next() {
            let flags = if chunks.peek().is_none() {
                END_HEADERS
            } else {
                0
            };
            frame(&mut self.output, CONTINUATION, flags, b.stream, c);
        }
        true
    }
}

fn valid_authority(v: &[u8]) -> bool {
    http::uri::Authority::try_from(v).is_ok()
}

/// Appends one frame.
fn frame(out: &mut BytesMut, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.put_slice(&len.to_be_bytes()[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream & 0x7fff_ffff);
    out.put_slice(payload);
}

/// HPACK integer with an `n`-bit prefix whose high bits are `first`.
fn integer(out: &mut Vec<u8>, first: u8, n: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A literal header field without indexing, new name, no Huffman coding.
fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    integer(out, 0, 7, name.len());
    out.extend_from_slice(name);
    integer(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if matches!(this.mode, Mode::Passthrough) && this.input.is_empty() {
                // Nothing held back: read straight into the caller's buffer.
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            this.input.reserve(8192);
            if ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.input
            ))? == 0
            {
                this.eof = true;
                this.dump_raw();
                continue;
            }
            this.process();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn headers(enc: &mut loona_hpack::Encoder<'_>, authority: &str, extra: usize) -> Vec<u8> {
        let big = "v".repeat(extra);
        let mut h: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/csi.v1.Identity/Probe"),
            (b":authority", authority.as_bytes()),
            (b"content-type", b"application/grpc"),
        ];
        if extra > 0 {
            h.push((b"x-big", big.as_bytes()));
        }
        enc.encode(h)
    }

    /// Runs `input` through the fix; returns what HTTP/2 would read.
    async fn pass(input: &[u8]) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(input).await.unwrap();
        drop(client);
        let mut out = Vec::new();
        AuthorityFix::new(server)
            .read_to_end(&mut out)
            .await
            .unwrap();
        out
    }

    /// Runs `input` through the fix and parses the frames that come out.
    async fn rewrite(input: Vec<u8>) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let out = pass(&input).await;
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let mut frames = Vec::new();
        let mut p = &out[PREFACE.len()..];
        while !p.is_empty() {
            let len = (usize::from(p[0]) << 16) | (usize::from(p[1]) << 8) | usize::from(p[2]);
            let stream = u32::from_be_bytes([p[5], p[6], p[7], p[8]]);
            frames.push((p[3], p[4], stream, p[9..9 + len].to_vec()));
            p = &p[9 + len..];
        }
        frames
    }

    #[tokio::test]
    async fn bad_authorities_are_replaced_across_indexed_blocks_and_continuations() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        frame_vec(&mut input, 0x4, 0, 0, &[]); // SETTINGS
        // Stream 1: padded, with priority, split over a CONTINUATION.
        let b1 = headers(&mut enc, "%2Ftmp%2Fcsi.sock", 0);
        let (a, b) = b1.split_at(b1.len() / 2);
        let mut payload = vec![3u8];
        payload.extend_from_slice(&[0, 0, 0, 0, 16]);
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0, 0]);
        frame_vec(&mut input, HEADERS, PADDED | PRIORITY, 1, &payload);
        frame_vec(&mut input, CONTINUATION, END_HEADERS, 1, b);
        frame_vec(&mut input, 0x0, END_STREAM, 1, b"\0\0\0\0\0");
        // Stream 3: the encoder now refers to its dynamic table; a 40 KiB
        // header forces the re-encoded block over several frames.
        let b3 = headers(&mut enc, "%2Ftmp%2Fcsi.sock", 40_000);
        frame_vec(&mut input, HEADERS, END_HEADERS | END_STREAM, 3, &b3);
        // Stream 5: a valid authority stays as it is.
        let b5 = headers(&mut enc, "localhost:1234", 0);
        frame_vec(&mut input, HEADERS, END_HEADERS, 5, &b5);

        let frames = rewrite(input).await;
        let mut dec = loona_hpack::Decoder::new();
        let mut blocks: Vec<(u32, u8, Vec<u8>)> = Vec::new();
        for (kind, flags, stream, payload) in &frames {
            match *kind {
                HEADERS => {
                    assert_eq!(flags & PADDED, 0);
                    let skip = if flags & PRIORITY != 0 { 5 } else { 0 };
                    blocks.push((*stream, *flags, payload[skip..].to_vec()));
                }
                CONTINUATION => {
                    let last = blocks.last_mut().unwrap();
                    assert_eq!(last.0, *stream);
                    last.2.extend_from_slice(payload);
                }
                _ => {}
            }
            assert!(payload.len() <= MAX_OUT_FRAME);
        }
        assert_eq!(frames[0].0, 0x4, "SETTINGS passes through first");
        assert!(frames.iter().any(|f| f.0 == 0x0 && f.3 == b"\0\0\0\0\0"));
        let authorities: Vec<(u32, String, usize)> = blocks
            .iter()
            .map(|(s, _, b)| {
                let h = dec.decode(b).unwrap();
                let get = |n: &[u8]| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
                assert_eq!(get(b":path").unwrap(), b"/csi.v1.Identity/Probe");
                let a = String::from_utf8(get(b":authority").unwrap()).unwrap();
                (*s, a, get(b"x-big").map_or(0, |v| v.len()))
            })
            .collect();
        assert_eq!(
            authorities,
            [
                (1, "localhost".to_owned(), 0),
                (3, "localhost".to_owned(), 40_000),
                (5, "localhost:1234".to_owned(), 0)
            ]
        );
        assert_ne!(blocks[0].1 & PRIORITY, 0, "priority is kept");
        assert_ne!(blocks[1].1 & END_STREAM, 0, "END_STREAM is kept");
        assert!(frames.iter().filter(|f| f.0 == CONTINUATION).count() >= 2);
    }

    #[tokio::test]
    async fn a_connection_that_starts_with_a_valid_authority_passes_untouched() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        frame_vec(&mut input, 0x4, 0, 0, &[]);
        for (stream, authority) in [(1, "localhost"), (3, "%2Ftmp%2Fcsi.sock")] {
            let b = headers(&mut enc, authority, 0);
            frame_vec(&mut input, HEADERS, END_HEADERS | PADDED, stream, &{
                let mut p = vec![2u8];
                p.extend_from_slice(&b);
                p.extend_from_slice(&[0, 0]);
                p
            });
        }
        assert_eq!(pass(&input).await, input, "byte for byte, padding included");
    }

    #[tokio::test]
    async fn bytes_arriving_in_pieces_pass_untouched_before_and_after_the_handover() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        frame_vec(&mut input, 0x4, 0, 0, &[]);
        frame_vec(
            &mut input,
            HEADERS,
            END_HEADERS,
            1,
            &headers(&mut enc, "localhost", 0),
        );
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for chunk in data.chunks(16_384) {
            frame_vec(&mut input, 0x0, 0, 1, chunk);
        }
        let (mut client, server) = tokio::io::duplex(64);
        let sent = input.clone();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(7) {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut out = Vec::new();
        let mut fix = AuthorityFix::new(server);
        fix.read_to_end(&mut out).await.unwrap();
        writer.await.unwrap();
        assert!(matches!(fix.mode, Mode::Passthrough));
        assert_eq!(out, input);
    }

    #[tokio::test]
    async fn non_http2_bytes_pass_through() {
        let http1 = b"GET / HTTP/1.1\r\n\r\n";
        assert_eq!(pass(http1).await, http1);
    }

    fn frame_vec(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let mut b = BytesMut::new();
        frame(&mut b, kind, flags, stream, payload);
        out.extend_from_slice(&b);
    }
}
