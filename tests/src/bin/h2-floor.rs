//! h2-floor: CreateVolume and DeleteVolume answered by a unary gRPC server
//! written on the h2 crate alone (no hyper, no tonic, no rcsi core), each
//! call in its own task as hyper runs them. Run csi-bench against its socket
//! beside `core-floor`: the difference is what tonic, hyper and the core add
//! to a call, and this binary's own CPU is about the least any HTTP/2 gRPC
//! server on this runtime can spend.

use anyhow::{Result, bail};
use bytes::{BufMut, Bytes, BytesMut};
use clap::Parser;
use csi_core::csi;
use csi_core::server::{Endpoint, bind_unix};
use prost::Message;

#[derive(Parser)]
#[command(about = "Answer CreateVolume and DeleteVolume straight from the h2 crate")]
struct Args {
    /// Endpoint to serve: unix:///path/csi.sock.
    #[arg(long)]
    endpoint: Endpoint,
}

/// Largest request message accepted, as tonic's default.
const MAX_MESSAGE: usize = 4 << 20;
/// gRPC's status code for a method not served.
const UNIMPLEMENTED: u8 = 12;
/// gRPC's status code for a request that cannot be decoded.
const INVALID_ARGUMENT: u8 = 3;

/// The message of a gRPC request body: one uncompressed length-prefixed frame.
fn unframe(body: &[u8]) -> Result<&[u8]> {
    let Some((head, rest)) = body.split_first_chunk::<5>() else {
        bail!(
            "a gRPC message needs a 5-byte prefix, got {} bytes",
            body.len()
        );
    };
    if head[0] != 0 {
        bail!("compressed messages are not accepted");
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len != rest.len() {
        bail!("the prefix says {len} bytes but {} follow", rest.len());
    }
    Ok(rest)
}

/// `msg` as one gRPC frame.
fn frame(msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut b = BytesMut::with_capacity(5 + len);
    b.put_u8(0);
    b.put_u32(len as u32);
    msg.encode(&mut b).expect("a BytesMut grows");
    b.freeze()
}

/// The answer to one call: a message, or a gRPC status code and text.
fn answer(path: &str, body: &[u8]) -> Result<Bytes, (u8, String)> {
    let bad = |e: anyhow::Error| (INVALID_ARGUMENT, format!("{e:#}"));
    match path {
        "/csi.v1.Controller/CreateVolume" => {
            let req = csi::CreateVolumeRequest::decode(unframe(body).map_err(bad)?)
                .map_err(|e| bad(e.into()))?;
            Ok(frame(&csi::CreateVolumeResponse {
                volume: Some(csi::Volume {
                    capacity_bytes: req.capacity_range.map_or(0, |c| c.required_bytes),
                    volume_id: req.name,
                    ..Default::default()
                }),
            }))
        }
        "/csi.v1.Controller/DeleteVolume" => {
            csi::DeleteVolumeRequest::decode(unframe(body).map_err(bad)?)
                .map_err(|e| bad(e.into()))?;
            Ok(frame(&csi::DeleteVolumeResponse {}))
        }
        other => Err((UNIMPLEMENTED, format!("{other} is not served here"))),
    }
}

async fn call(
    mut req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) -> Result<()> {
    let path = req.uri().path().to_owned();
    let body = req.body_mut();
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        body.flow_control().release_capacity(chunk.len())?;
        if buf.len() + chunk.len() > MAX_MESSAGE + 5 {
            bail!("request body over {MAX_MESSAGE} bytes");
        }
        buf.extend_from_slice(&chunk);
    }
    let head = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc");
    match answer(&path, &buf) {
        Ok(msg) => {
            let mut send = respond.send_response(head.body(())?, false)?;
            send.send_data(msg, false)?;
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            send.send_trailers(trailers)?;
        }
        Err((code, text)) => {
            let head = head.header("grpc-status", code.to_string()).header(
                "grpc-message",
                text.replace(|c: char| !c.is_ascii_graphic() || c == '%', " "),
            );
            respond.send_response(head.body(())?, true)?;
        }
    }
    Ok(())
}

async fn connection(sock: tokio::net::UnixStream) -> Result<()> {
    let mut conn = h2::server::handshake(sock).await?;
    while let Some(accepted) = conn.accept().await {
        let (req, respond) = accepted?;
        tokio::spawn(async move {
            if let Err(e) = call(req, respond).await {
                eprintln!("call failed: {e:#}");
            }
        });
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let Endpoint::Unix(path) = Args::parse().endpoint else {
        bail!("h2-floor serves a unix socket only");
    };
    let listener = bind_unix(&path)?;
    loop {
        let (sock, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(e) = connection(sock).await {
                eprintln!("connection ended: {e:#}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_echoes_name_and_size_delete_answers_empty_others_unimplemented() {
        let req = csi::CreateVolumeRequest {
            name: "pvc-1".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 4096,
                limit_bytes: 0,
            }),
            ..Default::default()
        };
        let out = answer("/csi.v1.Controller/CreateVolume", &frame(&req)).unwrap();
        let vol = csi::CreateVolumeResponse::decode(unframe(&out).unwrap())
            .unwrap()
            .volume
            .unwrap();
        assert_eq!(
            (vol.volume_id.as_str(), vol.capacity_bytes),
            ("pvc-1", 4096)
        );

        let del = csi::DeleteVolumeRequest {
            volume_id: "pvc-1".into(),
            ..Default::default()
        };
        let out = answer("/csi.v1.Controller/DeleteVolume", &frame(&del)).unwrap();
        assert_eq!(&out[..], &[0, 0, 0, 0, 0]);

        let (code, _) = answer("/csi.v1.Node/NodeGetInfo", &frame(&del)).unwrap_err();
        assert_eq!(code, UNIMPLEMENTED);
    }

    #[test]
    fn malformed_frames_are_invalid_argument() {
        let good = frame(&csi::DeleteVolumeRequest {
            volume_id: "v".into(),
            ..Default::default()
        });
        let mut compressed = good.to_vec();
        compressed[0] = 1;
        let mut long = good.to_vec();
        long.push(0);
        for body in [&good[..3], &compressed[..], &long[..]] {
            let (code, text) = answer("/csi.v1.Controller/DeleteVolume", body).unwrap_err();
            assert_eq!(code, INVALID_ARGUMENT, "{text}");
        }
    }
}
