//! Requests that the generated client cannot express (invalid UTF-8).

use csi_core::csi;
use tonic::transport::Channel;

/// CreateVolumeRequest with `name` as raw bytes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RawCreateVolume {
    /// Field 1 of CreateVolumeRequest, unchecked bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub name: Vec<u8>,
    /// Field 3 of CreateVolumeRequest.
    #[prost(message, repeated, tag = "3")]
    pub volume_capabilities: Vec<csi::VolumeCapability>,
}

/// Sends CreateVolume with a name that is not valid UTF-8.
pub async fn create_volume_raw(
    channel: Channel,
    name: Vec<u8>,
    caps: Vec<csi::VolumeCapability>,
) -> Result<csi::CreateVolumeResponse, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<RawCreateVolume, csi::CreateVolumeResponse>::default();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/csi.v1.Controller/CreateVolume");
    grpc.unary(
        tonic::Request::new(RawCreateVolume {
            name,
            volume_capabilities: caps,
        }),
        path,
        codec,
    )
    .await
    .map(tonic::Response::into_inner)
}
