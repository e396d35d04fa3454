//! gRPC codec: prost encoding, with undecodable requests (e.g. non-UTF-8
//! strings) reported as InvalidArgument instead of Internal.

use prost::Message;
use std::marker::PhantomData;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Prost codec whose decode errors are the caller's fault: InvalidArgument.
#[derive(Debug, Clone, Default)]
pub struct CsiCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Codec for CsiCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = CsiEncoder<T>;
    type Decoder = CsiDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        CsiEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        CsiDecoder(PhantomData)
    }
}

/// Encoder half of [`CsiCodec`].
#[derive(Debug)]
pub struct CsiEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for CsiEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding reply: {e}")))
    }
}

/// Decoder half of [`CsiCodec`].
#[derive(Debug)]
pub struct CsiDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for CsiDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            Status::invalid_argument(format!(
                "request is not a valid CSI message ({e}); string fields must be UTF-8"
            ))
        })
    }
}
